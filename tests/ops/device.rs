//! The CUDA backend against the CPU backend (the oracle), in both precision modes: the fixture the
//! `emu::*` and `gpu::*` tests of each op module share, and `device_tests!`, which makes them.
//!
//! `<op>::emu::*` run on the emulated device (the CUDA kernels compiled for the CPU), so every launch
//! shape, argument list and buffer size is exercised in CI; `<op>::gpu::*` run the same checks on
//! GPU 0 and are ignored without one (`cargo test --release --test ops -- --ignored gpu::`).
//!
//! Each check generates random inputs of awkward shapes (sizes that are not multiples of the block
//! size, sequences of length 0 and 1, sequences longer than a warp), poisons every output with NaN
//! first (an element a kernel forgets to write fails the comparison), starts accumulating outputs
//! from random priors and accumulates twice. In Bf16 mode both backends get the same bf16-rounded
//! inputs, so the comparison measures the kernels, not the rounding of the inputs. Tolerances: 1e-5
//! relative in F32 mode, 1e-2 in Bf16 mode, with the absolute part scaled to the tensor's largest
//! entry (`assert_close_scaled`); ops whose inputs and outputs are f32 in every mode (the preference
//! loss, the optimizer with its master weights, the grad norm) are held to f32 tolerances in both.

use half::bf16;
use rand_chacha::ChaCha8Rng;
use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::cuda::{CudaBackend, CudaBuf, Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::Packing;

use crate::common::*;

/// One CUDA backend, the CPU oracle, and seeded random data.
pub struct Fixture {
    pub cpu: CpuBackend,
    pub cuda: CudaBackend,
    pub precision: Precision,
    pub rng: ChaCha8Rng,
}

impl Fixture {
    pub fn new(device: &Device, precision: Precision, seed: u64) -> Self {
        Self { cpu: CpuBackend::new(), cuda: CudaBackend::new(device.clone(), precision), precision, rng: rng(seed) }
    }

    /// Relative tolerance of tensors stored in the activation type.
    pub fn rtol(&self) -> f64 {
        match self.precision {
            Precision::F32 => 1e-5,
            Precision::Bf16 => 1e-2,
        }
    }

    /// The values as the backend stores them: rounded to bf16 in Bf16 mode.
    pub fn stored(&self, x: Vec<f32>) -> Vec<f32> {
        match self.precision {
            Precision::F32 => x,
            Precision::Bf16 => x.into_iter().map(|v| bf16::from_f32(v).to_f32()).collect(),
        }
    }

    /// `len` N(0, std²) values, as stored.
    pub fn randn(&mut self, len: usize, std: f32) -> Vec<f32> {
        let x = randn(&mut self.rng, len, std);
        self.stored(x)
    }

    /// `len` fresh N(0, std²) values (as stored) on both backends.
    pub fn fresh(&mut self, len: usize, std: f32) -> (Vec<f32>, CudaBuf) {
        let x = self.randn(len, std);
        self.both(&x)
    }

    /// The same data on both backends.
    pub fn both(&self, x: &[f32]) -> (Vec<f32>, CudaBuf) {
        (x.to_vec(), self.cuda.upload(x).unwrap())
    }

    /// A NaN-filled output on both backends.
    pub fn poisoned(&self, len: usize) -> (Vec<f32>, CudaBuf) {
        self.both(&poison(len))
    }

    pub fn packing(&self, lens: &[usize]) -> (Packing<CpuBackend>, Packing<CudaBackend>) {
        let cu = cu_seqlens(lens);
        (Packing::new(&self.cpu, &cu).unwrap(), Packing::new(&self.cuda, &cu).unwrap())
    }

    /// Asserts the CUDA tensor matches the CPU one at `rtol` (absolute part scaled to the largest entry).
    #[track_caller]
    pub fn check_at(&self, what: &str, got: &CudaBuf, want: &[f32], rtol: f64) {
        let got = self.cuda.download(got).unwrap();
        let what = format!("{what} ({})", self.precision);
        assert_close_scaled(&what, &got, &to_f64(want), rtol);
    }

    #[track_caller]
    pub fn check(&self, what: &str, got: &CudaBuf, want: &[f32]) {
        self.check_at(what, got, want, self.rtol());
    }
}

/// Runs `check(device, precision)` in both precision modes.
pub fn both_precisions(device: &Device, check: fn(&Device, Precision)) {
    for precision in [Precision::F32, Precision::Bf16] {
        check(device, precision);
    }
}

/// `device_tests!(check, …; gpu only: gpu_check, …)` in an op module: for each
/// `check(&Device, Precision)` of the module, the test `emu::check` on the emulated device and its
/// ignored twin `gpu::check` on GPU 0, both running the check in both precision modes; for each
/// `gpu_check(&Device)`, only the GPU test.
macro_rules! device_tests {
    ($($check:ident),* $(; gpu only: $($gpu_check:ident),*)? $(,)?) => {
        /// On the emulated device (CI).
        mod emu {
            $(#[test]
            fn $check() {
                let device = safedpo::backend::cuda::Device::emulated().unwrap();
                $crate::device::both_precisions(&device, super::$check);
            })*
        }
        /// On GPU 0.
        mod gpu {
            $(#[test]
            #[ignore = "needs a GPU"]
            fn $check() {
                let device = safedpo::backend::cuda::Device::gpu(0).expect("GPU 0");
                $crate::device::both_precisions(&device, super::$check);
            })*
            $($(#[test]
            #[ignore = "needs a GPU"]
            fn $gpu_check() {
                super::$gpu_check(&safedpo::backend::cuda::Device::gpu(0).expect("GPU 0"));
            })*)?
        }
    };
}
