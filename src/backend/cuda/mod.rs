//! The CUDA backend: bf16 activations and parameters with fp32 master weights, hand-written kernels
//! from `kernels/`, cuBLASLt for matrix products. Runs on a GPU (cudarc) or on the emulated device.
//!
//! This module holds the device layer: [`Device`] allocates, copies, launches kernels by name, runs
//! GEMMs and keeps time, on either implementation —
//! - [`gpu`]: a real GPU through the CUDA driver API (cudarc), kernels from the embedded fatbins
//!   ([`kernels`]), GEMM through cuBLASLt;
//! - [`emu`]: the emulated device, which runs the same kernel sources compiled for the CPU
//!   (`kernels/emu`), with a CPU reference GEMM of the same semantics.
//!
//! [`select_device`] picks one for `--device auto|cpu|cuda|emu`.

pub mod backend;
pub mod device;
pub mod emu;
pub mod gpu;
pub mod kernels;

pub use backend::{CudaBackend, CudaBuf, CudaIds, Precision};
pub use device::{
    gpu_unavailable_reason, select_device, Device, DeviceBuffer, DeviceKind, DeviceScalar, Dtype, Event, Gemm,
    KernelArg, LaunchConfig, Selection, View, ViewMut,
};
