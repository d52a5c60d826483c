//! Every CPU backend kernel family at the training step's shape (see `common`).
//!
//! `cargo bench --bench kernels_cpu` (add `-- matmul` to filter). Throughput: `Gelem/s` reads as
//! GFLOP/s for matmul and attention, `GB/s` is achieved bandwidth for the memory-bound ops.
//! The CUDA twin goes in `kernels_cuda.rs`, calling `common::kernel_benches` with the CUDA backend.

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use safedpo::backend::cpu::CpuBackend;

fn kernels(c: &mut Criterion) {
    let backend = CpuBackend::new();
    common::kernel_benches(c, &backend, "cpu");
}

criterion_group! {
    name = benches;
    config = common::quick_criterion();
    targets = kernels
}
criterion_main!(benches);
