//! Every kernel family (`common::kernels`) on the CPU backend at the training step's shape
//! (`common::STEP_SHAPE`), timed by the wall clock, 4 bytes per element.
//!
//! `cargo bench --bench kernels_cpu` (add `-- matmul` to filter). Throughput: `Gelem/s` reads as
//! GFLOP/s for matmul and attention, `GB/s` is achieved bandwidth for the memory-bound ops.

mod common;

use common::kernels::{kernel_benches, F32Bytes, Target, WallClock};
use criterion::{criterion_group, criterion_main, Criterion};
use safedpo::backend::cpu::CpuBackend;

fn kernels(c: &mut Criterion) {
    let backend = CpuBackend::new();
    let target = Target {
        backend: &backend,
        label: "cpu".to_string(),
        shape: common::STEP_SHAPE,
        timer: &WallClock(&backend),
        bytes: &F32Bytes(&backend),
    };
    kernel_benches(c, &target);
}

criterion_group! {
    name = benches;
    config = common::quick_criterion();
    targets = kernels
}
criterion_main!(benches);
