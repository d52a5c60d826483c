//! Which device a run uses, and in which precision: the one place that turns `--device
//! auto|cpu|cuda|emu` (or `device = "…"` in a run config) into a backend.
//!
//! - [`DeviceKind`]: what was asked for;
//! - [`select_device`]: what is available (`auto` falls back to the CPU, saying why);
//! - [`precision_for`]: the CUDA backend's precision on a device (the policy: the emulated device
//!   runs f32, so that it matches the CPU backend closely; a GPU runs bf16 with fp32 master weights);
//! - [`select_backend`], [`AnyBackend`] and [`with_backend!`](crate::with_backend): the chosen backend,
//!   and a program written once over `Backend` run on it.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::cpu::CpuBackend;
use super::cuda::{gpu, kernels, CudaBackend, Device, Precision};

// ---- choosing a device ---------------------------------------------------------------------------

/// The compute device a run asks for (`--device auto|cpu|cuda|emu`, `device = "…"` in a run config).
///
/// The one device enum of the crate: the CLI parses it with clap (`ValueEnum`), run configs with serde
/// (lowercase names), and [`FromStr`] also takes the aliases `gpu` and `emulated`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// A GPU when one is built and present, else the CPU.
    #[default]
    Auto,
    /// The f32 CPU reference backend.
    Cpu,
    /// The CUDA backend on GPU 0; an error when there is none.
    Cuda,
    /// The CUDA backend on the emulated device: the CUDA sources run on the CPU (slow; for tests and
    /// debugging).
    Emu,
}

impl FromStr for DeviceKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            "emu" | "emulated" => Ok(Self::Emu),
            other => bail!("unknown device `{other}`: expected one of auto, cpu, cuda, emu"),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Emu => "emu",
        })
    }
}

/// What [`select_device`] chose.
pub enum Selection {
    /// The CPU backend; `reason` says why no GPU was taken when `auto` fell back.
    Cpu { reason: Option<String> },
    /// A CUDA device (GPU or emulated) for the CUDA backend.
    Device(Device),
}

/// Why the GPU path cannot run here, or `None` when a GPU is usable. Never panics: a missing driver
/// library, no device, or a build without nvcc each give a reason.
pub fn gpu_unavailable_reason() -> Option<String> {
    if cfg!(feature = "cuda") && !kernels::BUILT_WITH_NVCC {
        return Some(
            "this build has no GPU kernels (nvcc was not found at build time; run `bash \
             scripts/install-cuda-toolchain.sh` and rebuild)"
                .into(),
        );
    }
    gpu::probe().err()
}

/// Resolves `--device`: `cpu` and `emu` always succeed; `cuda` fails with the reason when no GPU is
/// usable; `auto` takes GPU 0 when usable and otherwise the CPU, with the reason.
pub fn select_device(kind: DeviceKind) -> Result<Selection> {
    match kind {
        DeviceKind::Cpu => Ok(Selection::Cpu { reason: None }),
        DeviceKind::Emu => Ok(Selection::Device(Device::emulated()?)),
        DeviceKind::Cuda => match gpu_unavailable_reason() {
            Some(reason) => bail!("--device cuda: {reason}"),
            None => Ok(Selection::Device(Device::gpu(0)?)),
        },
        DeviceKind::Auto => match gpu_unavailable_reason() {
            Some(reason) => Ok(Selection::Cpu { reason: Some(reason) }),
            None => match Device::gpu(0) {
                Ok(device) => Ok(Selection::Device(device)),
                Err(e) => Ok(Selection::Cpu { reason: Some(format!("GPU 0 failed to initialise: {e:#}")) }),
            },
        },
    }
}

/// The kind of a CUDA device (defined here rather than beside `Device`, so that the CUDA backend
/// needs nothing from this module).
impl Device {
    /// `Cuda` for a GPU, `Emu` for the emulated device.
    pub fn kind(&self) -> DeviceKind {
        if self.is_emulated() {
            DeviceKind::Emu
        } else {
            DeviceKind::Cuda
        }
    }
}

// ---- precision and backend -----------------------------------------------------------------------

/// The precision the CUDA backend runs in on `device`: f32 on the emulated device (held to the CPU
/// backend at f32 tolerances), bf16 with fp32 master weights on a GPU.
pub fn precision_for(device: &Device) -> Precision {
    if device.is_emulated() {
        Precision::F32
    } else {
        Precision::Bf16
    }
}

/// The backend `--device` selects: `cpu`; `cuda` (GPU 0, bf16 with fp32 master weights); `emu` (the
/// CUDA backend on the emulated device, f32 so that it matches the CPU closely; slow); `auto` (the GPU
/// when one is usable, else the CPU, saying why).
pub enum AnyBackend {
    Cpu(Arc<CpuBackend>),
    Cuda(Arc<CudaBackend>),
}

/// Resolves `device` ([`select_device`]) and makes its backend in the precision of
/// [`precision_for`]. When `auto` falls back to the CPU, says why on stderr.
pub fn select_backend(device: DeviceKind) -> Result<AnyBackend> {
    Ok(match select_device(device)? {
        Selection::Cpu { reason } => {
            if let Some(reason) = reason {
                eprintln!("device auto: running on the CPU ({reason})");
            }
            AnyBackend::Cpu(Arc::new(CpuBackend::new()))
        }
        Selection::Device(device) => {
            let precision = precision_for(&device);
            AnyBackend::Cuda(Arc::new(CudaBackend::new(device, precision)))
        }
    })
}

/// Runs `$body` with `$backend` bound to the backend `$device` selects (an `Arc<impl Backend>`), in a
/// function returning `anyhow::Result` (a failed selection returns its error):
/// `with_backend!(DeviceKind::Auto, |backend| run(backend, &cfg))`.
#[macro_export]
macro_rules! with_backend {
    ($device:expr, |$backend:ident| $body:expr) => {
        match $crate::backend::device::select_backend($device)? {
            $crate::backend::device::AnyBackend::Cpu($backend) => $body,
            $crate::backend::device::AnyBackend::Cuda($backend) => $body,
        }
    };
}
