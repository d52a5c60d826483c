//! Times one op on the CPU backend through the building blocks (no engine): the matrix product
//! `out[n, oc] = inp[n, ic] · W`, a transformer layer's MLP projection, at GPT-2 small's width.
//!
//! `cargo run --release --example kernel_bench [-- ITERATIONS]` (default 20). The criterion benches
//! (`cargo bench --bench kernels_cpu`) time every op family; this is the pattern for one of them.

use std::time::Instant;

use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::prelude::*;
use safedpo::backend::WeightLayout;

fn main() -> anyhow::Result<()> {
    let iterations: usize = std::env::args().nth(1).map_or(Ok(20), |s| s.parse())?;
    let (n, ic, oc) = (256, 768, 3072);
    let backend = CpuBackend::new();
    let values = |len: usize, scale: f32| -> Vec<f32> {
        (0..len).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * scale).collect()
    };
    let inp = backend.upload(&values(n * ic, 1.0))?;
    let weight = backend.upload(&values(ic * oc, 0.05))?;
    let mut out = backend.zeros(n * oc)?;

    // One untimed call: first-touch of the output and the thread pool's start.
    backend.matmul_forward(&mut out, &inp, &weight, None, n, ic, oc, WeightLayout::InOut)?;
    backend.synchronize()?;
    let start = Instant::now();
    for _ in 0..iterations {
        backend.matmul_forward(&mut out, &inp, &weight, None, n, ic, oc, WeightLayout::InOut)?;
    }
    backend.synchronize()?;
    let seconds = start.elapsed().as_secs_f64() / iterations as f64;
    let flops = 2.0 * (n * ic * oc) as f64;
    println!(
        "{}: matmul_forward [{n}x{ic}]·[{ic}x{oc}]: {:.3} ms per call, {:.1} GFLOP/s",
        backend.name(),
        seconds * 1e3,
        flops / seconds / 1e9
    );
    let sample = backend.download(&out)?;
    anyhow::ensure!(sample.iter().all(|v| v.is_finite()), "non-finite output");
    Ok(())
}
