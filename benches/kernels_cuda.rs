//! Every CUDA kernel family on GPU 0 at the GPU training shape: GPT-2 124M (12 layers, d = 768,
//! 12 heads, vocab 50257) on 16 sequences of 512 tokens, N = 8192 tokens, in the backend's bf16
//! training precision (`SAFEDPO_BENCH_PRECISION=f32` for the f32 variants).
//!
//! `cargo bench --bench kernels_cuda` (add `-- logsoftmax` to filter). Without a usable GPU it says
//! why and exits 0: the emulated device runs the same kernels, but its timings mean nothing.
//!
//! Timing: CUDA events around the launches (criterion's `iter_custom`), so a figure is device time
//! of back-to-back launches, not host round trips. Throughput: matrix products and attention declare
//! their FLOPs as criterion "elements", so `Gelem/s` reads as GFLOP/s; the memory-bound ops declare
//! the bytes they must move at least once (inputs read, outputs written, accumulators read and
//! written), counted from each tensor's actual storage type after a first call, so `GB/s` is the
//! achieved bandwidth (an H100 SXM's HBM3 peaks near 3350 GB/s).

mod common;

use common::{random, Shape};

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safedpo::backend::cuda::{CudaBackend, CudaBuf, CudaIds, Device, Precision};
use safedpo::backend::device::gpu_unavailable_reason;
use safedpo::backend::prelude::*;
use safedpo::backend::{AdamWParams, Packing};

/// The GPU training shape.
const GPT2_SMALL: Shape =
    Shape { seqs: 16, seq_len: 512, c: 768, n_head: 12, vocab: 50257, n_layer: 12, n_positions: 1024 };

/// Bytes a tensor occupies in its current storage type.
fn bytes(buf: &CudaBuf) -> u64 {
    (buf.len() * buf.dtype().size()) as u64
}

fn id_bytes(ids: &CudaIds) -> u64 {
    (ids.host().len() * 4) as u64
}

/// Bytes an optimizer update moves per tensor: a parameter with an fp32 master is read and written
/// through the master and written once more in its storage type; without one it is read and written
/// in its storage type.
fn param_update_bytes(param: &CudaBuf) -> u64 {
    if param.has_master() {
        (param.len() * 8) as u64 + bytes(param)
    } else {
        2 * bytes(param)
    }
}

/// Device time of `iters` back-to-back calls of `f`, between two CUDA events.
fn device_time(backend: &CudaBackend, iters: u64, mut f: impl FnMut()) -> Duration {
    let dev = backend.device();
    let start = dev.record_event().expect("record_event");
    for _ in 0..iters {
        f();
    }
    let end = dev.record_event().expect("record_event");
    let ms = dev.elapsed_ms(&start, &end).expect("elapsed_ms");
    Duration::from_secs_f64(ms as f64 / 1e3)
}

fn kernels(c: &mut Criterion, backend: &CudaBackend) {
    let s = GPT2_SMALL;
    let (n, ch, v) = (s.n(), s.c, s.vocab);
    let label = format!("cuda-{}", backend.precision());
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let up = |data: Vec<f32>| backend.upload(&data).expect("upload");
    let packing = Packing::new(backend, &s.cu_seqlens()).expect("packing");

    // ---- matmul (cuBLASLt through the backend): every product of a layer plus the tied LM head ----
    {
        let mut g = c.benchmark_group(format!("{label}/matmul (Gelem/s = GFLOP/s)"));
        for (name, ic, oc, layout, has_bias) in s.matmul_products() {
            let inp = up(random(n * ic, 1.0, &mut rng));
            let weight = up(random(ic * oc, 0.02, &mut rng));
            let bias = has_bias.then(|| up(random(oc, 0.02, &mut rng)));
            let mut out = backend.zeros(n * oc).unwrap();
            let dout = up(random(n * oc, 1.0, &mut rng));
            let mut dinp = backend.zeros(n * ic).unwrap();
            let mut dweight = backend.zeros(ic * oc).unwrap();
            let mut dbias = backend.zeros(oc).unwrap();
            let flops = (2 * n * ic * oc) as u64;
            g.throughput(Throughput::Elements(flops));
            g.bench_function(format!("{name}_fwd {n}x{ic}x{oc}"), |b| {
                b.iter_custom(|iters| {
                    device_time(backend, iters, || {
                        backend.matmul_forward(&mut out, &inp, &weight, bias.as_ref(), n, ic, oc, layout).unwrap()
                    })
                })
            });
            g.throughput(Throughput::Elements(2 * flops));
            g.bench_function(format!("{name}_bwd {n}x{ic}x{oc}"), |b| {
                b.iter_custom(|iters| {
                    device_time(backend, iters, || {
                        let db = if has_bias { Some(&mut dbias) } else { None };
                        backend
                            .matmul_backward(&mut dinp, &mut dweight, db, &dout, &inp, &weight, n, ic, oc, layout)
                            .unwrap()
                    })
                })
            });
        }
        g.finish();
    }

    // ---- the MLP's first product with its bias and GELU (fused into the epilogue where the backend can) --
    {
        let mut g = c.benchmark_group(format!("{label}/matmul (Gelem/s = GFLOP/s)"));
        let (ic, oc) = (ch, 4 * ch);
        let inp = up(random(n * ic, 1.0, &mut rng));
        let weight = up(random(ic * oc, 0.02, &mut rng));
        let bias = up(random(oc, 0.02, &mut rng));
        let (mut pre, mut out) = (backend.zeros(n * oc).unwrap(), backend.zeros(n * oc).unwrap());
        let mut fused =
            || backend.matmul_bias_gelu_forward(&mut pre, &mut out, &inp, &weight, &bias, n, ic, oc).unwrap();
        g.throughput(Throughput::Elements((2 * n * ic * oc) as u64));
        g.bench_function(format!("mlp_fc_gelu_fwd {n}x{ic}x{oc}"), |b| {
            b.iter_custom(|iters| device_time(backend, iters, &mut fused))
        });
    }

    // ---- attention -------------------------------------------------------------------------------
    {
        let qkv = up(random(n * 3 * ch, 1.0, &mut rng));
        let mut out = backend.zeros(n * ch).unwrap();
        let mut saved = backend.zeros(backend.attention_saved_len(&packing, s.n_head)).unwrap();
        let dout = up(random(n * ch, 1.0, &mut rng));
        let mut dqkv = backend.zeros(n * 3 * ch).unwrap();
        // Causal: QKᵀ and AV over the t(t+1)/2 unmasked pairs of each sequence, 2 FLOPs per MAC.
        let flops = (s.seqs * 2 * ch * s.seq_len * (s.seq_len + 1)) as u64;
        let mut g = c.benchmark_group(format!("{label}/attention (Gelem/s = GFLOP/s)"));
        g.throughput(Throughput::Elements(flops));
        g.bench_function(format!("fwd {}x{} h{} d{}", s.seqs, s.seq_len, s.n_head, ch), |b| {
            b.iter_custom(|iters| {
                device_time(backend, iters, || {
                    backend.attention_forward(&mut out, &mut saved, &qkv, &packing, s.n_head, ch).unwrap()
                })
            })
        });
        backend.attention_forward(&mut out, &mut saved, &qkv, &packing, s.n_head, ch).unwrap();
        g.throughput(Throughput::Elements(2 * flops));
        g.bench_function(format!("bwd {}x{} h{} d{}", s.seqs, s.seq_len, s.n_head, ch), |b| {
            b.iter_custom(|iters| {
                device_time(backend, iters, || {
                    backend.attention_backward(&mut dqkv, &dout, &qkv, &out, &saved, &packing, s.n_head, ch).unwrap()
                })
            })
        });
        g.finish();
    }

    let mut g = c.benchmark_group(format!("{label}/memory-bound (GB/s)"));

    // ---- the measured roofline: a device-to-device copy as large as the LM head's logits --------
    // The memory-bound kernels' GB/s read against this one (the target for the fused
    // log-softmax-gather forward is 80% of it), not against the datasheet's peak.
    {
        let len = n * v;
        let src = backend.zeros(len).unwrap();
        let mut dst = backend.zeros(len).unwrap();
        backend.copy(&mut dst, &src).unwrap();
        g.throughput(Throughput::BytesDecimal(bytes(&src) + bytes(&dst)));
        g.bench_function(format!("device_copy {n}x{v} (measured bandwidth)"), |b| {
            b.iter_custom(|iters| device_time(backend, iters, || backend.copy(&mut dst, &src).unwrap()))
        });
    }

    // ---- layernorm -------------------------------------------------------------------------------
    {
        let inp = up(random(n * ch, 1.0, &mut rng));
        let weight = up(random(ch, 1.0, &mut rng));
        let bias = up(random(ch, 0.1, &mut rng));
        let (mut out, mut mean, mut rstd) =
            (backend.zeros(n * ch).unwrap(), backend.zeros(n).unwrap(), backend.zeros(n).unwrap());
        let dout = up(random(n * ch, 1.0, &mut rng));
        let mut dinp = backend.zeros(n * ch).unwrap();
        let (mut dw, mut db) = (backend.zeros(ch).unwrap(), backend.zeros(ch).unwrap());
        backend.layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &weight, &bias, n, ch, 1e-5).unwrap();
        let moved = bytes(&inp) + bytes(&weight) + bytes(&bias) + bytes(&out) + bytes(&mean) + bytes(&rstd);
        g.throughput(Throughput::BytesDecimal(moved));
        g.bench_function(format!("layernorm_fwd {n}x{ch}"), |b| {
            b.iter_custom(|iters| {
                device_time(backend, iters, || {
                    backend
                        .layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &weight, &bias, n, ch, 1e-5)
                        .unwrap()
                })
            })
        });
        backend.layernorm_backward(&mut dinp, &mut dw, &mut db, &dout, &inp, &weight, &mean, &rstd, n, ch).unwrap();
        // dinp, dweight and dbias accumulate: read and written.
        let moved = bytes(&dout)
            + bytes(&inp)
            + bytes(&weight)
            + bytes(&mean)
            + bytes(&rstd)
            + 2 * (bytes(&dinp) + bytes(&dw) + bytes(&db));
        g.throughput(Throughput::BytesDecimal(moved));
        g.bench_function(format!("layernorm_bwd {n}x{ch}"), |b| {
            b.iter_custom(|iters| {
                device_time(backend, iters, || {
                    backend
                        .layernorm_backward(&mut dinp, &mut dw, &mut db, &dout, &inp, &weight, &mean, &rstd, n, ch)
                        .unwrap()
                })
            })
        });
    }

    // ---- residual add fused with the next LayerNorm, and the LM head's target-row selection -----
    {
        let a = up(random(n * ch, 1.0, &mut rng));
        let bb = up(random(n * ch, 1.0, &mut rng));
        let weight = up(random(ch, 1.0, &mut rng));
        let bias = up(random(ch, 0.1, &mut rng));
        let (mut residual, mut out) = (backend.zeros(n * ch).unwrap(), backend.zeros(n * ch).unwrap());
        let (mut mean, mut rstd) = (backend.zeros(n).unwrap(), backend.zeros(n).unwrap());
        let mut fused = || {
            backend
                .residual_layernorm_forward(
                    &mut residual,
                    &mut out,
                    &mut mean,
                    &mut rstd,
                    &a,
                    &bb,
                    &weight,
                    &bias,
                    n,
                    ch,
                    1e-5,
                )
                .unwrap()
        };
        fused();
        // a, b read; residual, out written (bf16 or f32 like a); weight, bias read, mean, rstd written (f32).
        let moved = 4 * bytes(&a) + 2 * bytes(&weight) + 2 * (4 * n) as u64;
        g.throughput(Throughput::BytesDecimal(moved));
        g.bench_function(format!("residual_layernorm_fwd {n}x{ch}"), |b| {
            b.iter_custom(|iters| device_time(backend, iters, &mut fused))
        });
        let rows: Vec<i32> =
            s.response_targets(&mut rng).iter().enumerate().filter(|(_, &t)| t >= 0).map(|(i, _)| i as i32).collect();
        let m = rows.len();
        let rows = backend.upload_ids(&rows).unwrap();
        let mut picked = backend.zeros(m * ch).unwrap();
        let mut scattered = backend.zeros(n * ch).unwrap();
        backend.gather_rows(&mut picked, &a, &rows, m, n, ch).unwrap();
        backend.scatter_rows(&mut scattered, &picked, &rows, m, n, ch).unwrap();
        g.throughput(Throughput::BytesDecimal(2 * bytes(&picked)));
        g.bench_function(format!("gather_rows {m} of {n}x{ch}"), |b| {
            b.iter_custom(|iters| {
                device_time(backend, iters, || backend.gather_rows(&mut picked, &a, &rows, m, n, ch).unwrap())
            })
        });
        g.throughput(Throughput::BytesDecimal(bytes(&picked) + bytes(&scattered)));
        g.bench_function(format!("scatter_rows {m} into {n}x{ch}"), |b| {
            b.iter_custom(|iters| {
                device_time(backend, iters, || backend.scatter_rows(&mut scattered, &picked, &rows, m, n, ch).unwrap())
            })
        });
    }

    // ---- gelu and residual ---------------------------------------------------------------------
    {
        let m = n * 4 * ch;
        let inp = up(random(m, 3.0, &mut rng));
        let dout = up(random(m, 1.0, &mut rng));
        let (mut out, mut dinp) = (backend.zeros(m).unwrap(), backend.zeros(m).unwrap());
        backend.gelu_forward(&mut out, &inp).unwrap();
        backend.gelu_backward(&mut dinp, &inp, &dout).unwrap();
        g.throughput(Throughput::BytesDecimal(bytes(&inp) + bytes(&out)));
        g.bench_function(format!("gelu_fwd {n}x{}", 4 * ch), |b| {
            b.iter_custom(|iters| device_time(backend, iters, || backend.gelu_forward(&mut out, &inp).unwrap()))
        });
        g.throughput(Throughput::BytesDecimal(bytes(&inp) + bytes(&dout) + bytes(&dinp)));
        g.bench_function(format!("gelu_bwd {n}x{}", 4 * ch), |b| {
            b.iter_custom(|iters| {
                device_time(backend, iters, || backend.gelu_backward(&mut dinp, &inp, &dout).unwrap())
            })
        });
        let a = up(random(n * ch, 1.0, &mut rng));
        let bb = up(random(n * ch, 1.0, &mut rng));
        let mut sum = backend.zeros(n * ch).unwrap();
        backend.residual_forward(&mut sum, &a, &bb).unwrap();
        g.throughput(Throughput::BytesDecimal(bytes(&a) + bytes(&bb) + bytes(&sum)));
        g.bench_function(format!("residual_fwd {n}x{ch}"), |b| {
            b.iter_custom(|iters| device_time(backend, iters, || backend.residual_forward(&mut sum, &a, &bb).unwrap()))
        });
    }

    // ---- embedding -------------------------------------------------------------------------------
    {
        let tokens: Vec<i32> = (0..n).map(|_| rng.random_range(0..v as i32)).collect();
        let positions: Vec<i32> = (0..n).map(|i| (i % s.seq_len) as i32).collect();
        let (tokens, positions) = (backend.upload_ids(&tokens).unwrap(), backend.upload_ids(&positions).unwrap());
        let wte = up(random(v * ch, 0.02, &mut rng));
        let wpe = up(random(s.n_positions * ch, 0.02, &mut rng));
        let mut out = backend.zeros(n * ch).unwrap();
        backend.embedding_forward(&mut out, &tokens, &positions, &wte, &wpe, n, ch).unwrap();
        // One row of wte and one of wpe read per token, the output row written.
        let moved = 3 * bytes(&out) + id_bytes(&tokens) + id_bytes(&positions);
        g.throughput(Throughput::BytesDecimal(moved));
        g.bench_function(format!("embedding_fwd {n}x{ch}"), |b| {
            b.iter_custom(|iters| {
                device_time(backend, iters, || {
                    backend.embedding_forward(&mut out, &tokens, &positions, &wte, &wpe, n, ch).unwrap()
                })
            })
        });
    }

    // ---- fused log-softmax-gather at [N, V] --------------------------------------------------------
    {
        let logits = up(random(n * v, 4.0, &mut rng));
        let targets = backend.upload_ids(&s.response_targets(&mut rng)).unwrap();
        let (mut token_logp, mut lse) = (backend.zeros(n).unwrap(), backend.zeros(n).unwrap());
        let mut seq_logp = backend.zeros(s.seqs).unwrap();
        let dseq = up(random(s.seqs, 1.0, &mut rng));
        backend.logsoftmax_gather_forward(&mut token_logp, &mut lse, &logits, &targets, n, v).unwrap();
        backend.sequence_logp_sum(&mut seq_logp, &token_logp, &packing).unwrap();
        let moved = bytes(&logits) + id_bytes(&targets) + bytes(&token_logp) + bytes(&lse);
        g.throughput(Throughput::BytesDecimal(moved));
        g.bench_function(format!("logsoftmax_gather_fwd {n}x{v}"), |b| {
            b.iter_custom(|iters| {
                device_time(backend, iters, || {
                    backend.logsoftmax_gather_forward(&mut token_logp, &mut lse, &logits, &targets, n, v).unwrap()
                })
            })
        });
        // In place over the logits: every iteration starts from a fresh copy of the logits, made
        // outside the timed span (each iteration is timed between its own pair of events).
        let mut work = backend.zeros(n * v).unwrap();
        backend.copy(&mut work, &logits).unwrap();
        backend.logsoftmax_gather_backward(&mut work, &lse, &targets, &dseq, &packing, n, v).unwrap();
        let moved = 2 * bytes(&work) + bytes(&lse) + id_bytes(&targets) + bytes(&dseq);
        g.throughput(Throughput::BytesDecimal(moved));
        g.bench_function(format!("logsoftmax_gather_bwd {n}x{v}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    backend.copy(&mut work, &logits).unwrap();
                    total += device_time(backend, 1, || {
                        backend.logsoftmax_gather_backward(&mut work, &lse, &targets, &dseq, &packing, n, v).unwrap()
                    });
                }
                total
            })
        });
        black_box(&seq_logp);
    }

    // ---- optimizer and grad norm over all of GPT-2 small's parameters as one tensor ---------------
    {
        let np = s.params();
        let mut param = up(random(np, 0.02, &mut rng));
        let grad = up(random(np, 1e-3, &mut rng));
        let (mut m, mut vv) = (backend.zeros(np).unwrap(), backend.zeros(np).unwrap());
        let mut p =
            AdamWParams { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 1, grad_scale: 1.0 };
        backend.adamw(&mut param, &grad, &mut m, &mut vv, &p).unwrap();
        let moved = param_update_bytes(&param) + bytes(&grad) + 2 * (bytes(&m) + bytes(&vv));
        g.throughput(Throughput::BytesDecimal(moved));
        g.bench_function(format!("adamw {np}"), |b| {
            b.iter_custom(|iters| {
                device_time(backend, iters, || {
                    p.step += 1;
                    backend.adamw(&mut param, &grad, &mut m, &mut vv, &p).unwrap()
                })
            })
        });
        g.throughput(Throughput::BytesDecimal(bytes(&grad)));
        g.bench_function(format!("sum_squares {np} (waits for its result)"), |b| {
            b.iter_custom(|iters| {
                device_time(backend, iters, || {
                    black_box(backend.sum_squares(&[&grad]).unwrap());
                })
            })
        });
    }
    g.finish();
}

fn main() {
    if let Some(reason) = gpu_unavailable_reason() {
        println!("kernels_cuda: no usable GPU, nothing to time ({reason})");
        return;
    }
    let precision = match std::env::var("SAFEDPO_BENCH_PRECISION") {
        Ok(p) => p.parse::<Precision>().expect("SAFEDPO_BENCH_PRECISION"),
        Err(_) => Precision::Bf16,
    };
    let backend = CudaBackend::new(Device::gpu(0).expect("GPU 0"), precision);
    println!("kernels_cuda: {}", backend.name());
    let mut c = common::quick_criterion();
    kernels(&mut c, &backend);
    c.final_summary();
}
