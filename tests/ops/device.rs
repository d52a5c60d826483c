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
//! inputs, so the comparison measures the kernels, not the rounding of the inputs. Tolerances: in F32
//! mode 1e-5 relative, with the absolute part scaled to the tensor's largest entry
//! (`assert_close_scaled`); in Bf16 mode each element within the bf16 roundings it went through
//! (2^-8 of itself per rounding, so that truncation fails), plus a floor, a small part of the
//! largest entry, only where sums cancel (`Fixture::check`, `Fixture::check_rounded`); ops whose
//! inputs and outputs are f32 in every mode (the preference loss, the optimizer with its master
//! weights, the grad norm) are held to f32 tolerances in both.

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

    /// After a norm backward: the backend's block counter is back at zero, and it is the one buffer
    /// `seen` holds from the fixture's earlier backwards (one counter, no memset between launches).
    pub fn check_block_counter(&self, seen: &mut Option<u64>) {
        let (ptr, value) = self.cuda.block_counter_state().unwrap().expect("a norm backward made the counter");
        assert_eq!(value, 0, "the norm backward's last block leaves the counter at zero");
        assert_eq!(*seen.get_or_insert(ptr), ptr, "the counter moved: one buffer serves every launch");
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

    /// Asserts the CUDA tensor matches the CPU one at `rtol` (absolute part scaled to the largest
    /// entry): for tensors stored in f32 in both modes.
    #[track_caller]
    pub fn check_at(&self, what: &str, got: &CudaBuf, want: &[f32], rtol: f64) {
        let got = self.cuda.download(got).unwrap();
        let what = format!("{what} ({})", self.precision);
        assert_close_scaled(&what, &got, &to_f64(want), rtol);
    }

    /// Asserts a tensor stored in the activation type matches the CPU's, computed in f32 and rounded
    /// once to its storage type: in F32 mode at `F32_RTOL` scaled to the largest entry; in Bf16 mode
    /// each element within one bf16 rounding of itself (`BF16_ROUNDING`, so that a rounding biased
    /// one way, up to twice that, fails), plus [`BF16_NOISE_FLOOR`] of the largest entry.
    #[track_caller]
    pub fn check(&self, what: &str, got: &CudaBuf, want: &[f32]) {
        self.check_rounded(what, got, want, 1.0, BF16_NOISE_FLOOR);
    }

    /// As [`check`](Self::check), for a tensor rounded to bf16 `roundings` times (an accumulated
    /// gradient, an op applied to a stored result) or the result of a sum whose cancellation leaves
    /// its small entries within `floor` × the largest (Bf16 mode: `roundings · BF16_ROUNDING` per
    /// element plus that floor; F32 mode: as `check`).
    #[track_caller]
    pub fn check_rounded(&self, what: &str, got: &CudaBuf, want: &[f32], roundings: f64, floor: f64) {
        match self.precision {
            Precision::F32 => self.check_at(what, got, want, F32_RTOL),
            Precision::Bf16 => {
                let got = self.cuda.download(got).unwrap();
                let what = format!("{what} ({})", self.precision);
                assert_close_with_floor(&what, &got, &to_f64(want), roundings * BF16_ROUNDING, floor);
            }
        }
    }
}

/// F32 mode: the relative tolerance of every tensor, scaled to its largest entry.
pub const F32_RTOL: f64 = 1e-5;

/// Bf16 mode: the part of a tensor's largest entry by which f32 arithmetic in another order (the
/// CPU's, cuBLASLt's) may move an element before it is rounded, which matters near zero.
pub const BF16_NOISE_FLOOR: f64 = 1e-5;

/// Bf16 mode: the floor of a gradient accumulated twice onto a random prior (`roundings` 2): where
/// prior and gradients cancel, the entry keeps the roundings of the larger partial sums (up to
/// 2.6e-4 of the largest entry in these tests; truncation leaves up to 2.3e-3).
pub const ACCUMULATED_FLOOR: f64 = 5e-4;

/// Bf16 mode: the floor of the attention backward's dqkv (see `attention::attention`).
pub const ATTENTION_DQKV_FLOOR: f64 = 5e-3;

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
                safedpo::backend::cuda::emu::use_test_mode(); // random schedule, race detector
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
