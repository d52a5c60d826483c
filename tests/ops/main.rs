//! The op families, one module per family (as `backend/ops/<op>.rs`): the CPU backend against the
//! op's spec (`safedpo::backend::cpu::<op>::spec`, plain f64 loops).
//!
//! Forward: the f32 op on random inputs, outputs poisoned with NaN first, against the spec.
//! Backward: the f32 backward against central differences of the spec's scalar loss `Σ w ⊙ out`
//! (w random), so the spec's forward is the only specification. Accumulating backwards start from
//! random priors and are called twice (the gradient must add twice); overwriting ones start from
//! NaN.
//!
//! Beside them, each family's CUDA kernels on the emulated device against the CPU backend, and their
//! GPU twins, ignored without a GPU (`device`: `<op>::emu::*`, `<op>::gpu::*`).

#[path = "../common/mod.rs"]
mod common;
#[macro_use]
mod device;

mod attention;
mod buffers;
mod decode_attention;
mod determinism;
mod embedding;
mod grad_f32;
mod grad_norm;
mod layernorm;
mod logsoftmax_gather;
mod logsoftmax_gather_f32_logits;
mod matmul;
mod misaligned;
mod optimizer;
mod pointwise;
mod preference_loss;
mod rmsnorm;
mod rope;
mod rows;
mod swiglu;
mod wide_offsets;

use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::prelude::*;
use safedpo::backend::Packing;

use common::cu_seqlens;

/// Relative tolerance of an f32 forward against its f64 spec.
const FWD_RTOL: f64 = 1e-5;
/// Relative tolerance (scaled to the largest entry) of an f32 gradient against f64 finite differences.
const GRAD_RTOL: f64 = 1e-4;
/// Finite-difference step for smooth f64 specs.
const FD_STEP: f64 = 1e-5;

fn backend() -> CpuBackend {
    CpuBackend::new()
}

fn packing(be: &CpuBackend, lens: &[usize]) -> Packing<CpuBackend> {
    Packing::new(be, &cu_seqlens(lens)).unwrap()
}

/// `prior + k · grad`, the expected state of an accumulating gradient after k backward calls.
fn accumulated(prior: &[f32], grad: &[f64], k: f64) -> Vec<f64> {
    prior.iter().zip(grad).map(|(&p, &g)| p as f64 + k * g).collect()
}

#[test]
fn name_reports_threads() {
    assert!(backend().name().starts_with("cpu ("), "{}", backend().name());
}
