//! The whole CPU DPO training step at the shape: L=4, d=128, 4 heads, vocab 512, 8 pairs of
//! 128 tokens each side (32 prompt): reference forward, policy forward + backward on chosen and
//! rejected, DPO loss, grad-norm clip, AdamW. Throughput `Kelem/s` reads as thousands of policy
//! tokens per second. `safedpo bench` reports the same step with a per-phase breakdown.
//! The CUDA twin goes in `step_cuda.rs`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use safedpo::backend::cpu::CpuBackend;
use safedpo::bench::{BenchConfig, StepRunner};
use safedpo::loss::Objective;

fn step(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/dpo_step (Kelem/s = 1000 policy tokens/s)");
    for (name, objective) in [
        ("dpo", Objective::Dpo { beta: 0.1, safety_margin: 0.0 }),
        ("safedpo", Objective::SafeDpo { beta: 0.1, delta: 10.0 }),
    ] {
        let cfg = BenchConfig { objective, ..BenchConfig::default() };
        let mut runner = StepRunner::new(Arc::new(CpuBackend::new()), &cfg).expect("building the step");
        g.throughput(Throughput::Elements(cfg.policy_tokens_per_step() as u64));
        g.bench_function(format!("{name} L4 d128 V512 8x2x128"), |b| b.iter(|| runner.step().expect("step")));
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::quick_criterion().sample_size(10).measurement_time(Duration::from_secs(15));
    targets = step
}
criterion_main!(benches);
