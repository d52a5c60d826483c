//! Kernel benchmarks written once over `Backend`, at the shape of the training step:
//! N = 2048 tokens (16 sequences of 128), d = 128, 4 heads, vocab 512.
//!
//! `kernels_cpu.rs` runs them on the CPU backend; a CUDA twin (`kernels_cuda.rs`, calling
//! [`kernel_benches`] with the CUDA backend and skipping itself without a device) goes beside it.
//!
//! Throughput units: compute-bound ops (matmul, attention) declare their FLOPs as criterion
//! "elements", so `Gelem/s` in the output reads as GFLOP/s; memory-bound ops declare the bytes they
//! must move at least once (inputs read, outputs written, accumulators read and written), so `GB/s`
//! is the achieved bandwidth.

#![allow(dead_code)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safedpo::backend::prelude::*;
use safedpo::backend::{AdamWParams, Packing, WeightLayout, PAIR_METRICS};
use safedpo::loss::Objective;

/// A training-step shape: the batch (sequences of equal length) and the GPT-2 model.
pub struct Shape {
    pub seqs: usize,
    pub seq_len: usize,
    pub c: usize,
    pub n_head: usize,
    pub vocab: usize,
    /// Layers and position embeddings of the model, for the optimizer and grad-norm benches.
    pub n_layer: usize,
    pub n_positions: usize,
}

/// The step shape.
pub const STEP_SHAPE: Shape =
    Shape { seqs: 16, seq_len: 128, c: 128, n_head: 4, vocab: 512, n_layer: 4, n_positions: 1024 };

impl Shape {
    pub fn n(&self) -> usize {
        self.seqs * self.seq_len
    }
    /// Parameters of the GPT-2 model of this shape (tied LM head): 989,952 for the step shape,
    /// 124,439,808 for GPT-2 small.
    pub fn params(&self) -> usize {
        let c = self.c;
        let layer = 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c);
        self.vocab * c + self.n_positions * c + self.n_layer * layer + 2 * c
    }
    /// `cu_seqlens` of the batch: `seqs` sequences of `seq_len` tokens.
    pub fn cu_seqlens(&self) -> Vec<i32> {
        (0..=self.seqs).map(|i| (i * self.seq_len) as i32).collect()
    }
    /// Every matrix product of a layer plus the tied LM head: (name, in, out, layout, has bias).
    pub fn matmul_products(&self) -> [(&'static str, usize, usize, WeightLayout, bool); 5] {
        let (ch, v) = (self.c, self.vocab);
        [
            ("qkv", ch, 3 * ch, WeightLayout::InOut, true),
            ("attn_proj", ch, ch, WeightLayout::InOut, true),
            ("mlp_fc", ch, 4 * ch, WeightLayout::InOut, true),
            ("mlp_proj", 4 * ch, ch, WeightLayout::InOut, true),
            ("lm_head", ch, v, WeightLayout::OutIn, false),
        ]
    }
    /// Log-softmax-gather targets: random tokens on the last three quarters of each sequence (the
    /// response), -1 elsewhere.
    pub fn response_targets(&self, rng: &mut ChaCha8Rng) -> Vec<i32> {
        (0..self.n())
            .map(|i| {
                let p = i % self.seq_len;
                if p + 1 >= self.seq_len / 4 && p + 1 < self.seq_len {
                    rng.random_range(0..self.vocab as i32)
                } else {
                    -1
                }
            })
            .collect()
    }
}

/// Criterion settings that keep a full run within a few minutes on a small machine.
pub fn quick_criterion() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args()
}

/// `len` values uniform in `-scale..scale`.
pub fn random(len: usize, scale: f32, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Runs `f` then waits for the device, so that asynchronous backends are timed for their work.
fn timed<B: Backend>(backend: &B, f: impl FnOnce()) {
    f();
    backend.synchronize().expect("synchronize");
}

/// Every kernel family at the step shape; `label` names the backend in the benchmark ids.
pub fn kernel_benches<B: Backend>(c: &mut Criterion, backend: &B, label: &str) {
    let s = STEP_SHAPE;
    let (n, ch, v) = (s.n(), s.c, s.vocab);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let up = |data: Vec<f32>| backend.upload(&data).expect("upload");
    let f32b = |elems: usize| (4 * elems) as u64;

    // ---- matmul: every product of a layer plus the tied LM head --------------------------------
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
            let flops = 2 * n * ic * oc;
            g.throughput(Throughput::Elements(flops as u64));
            g.bench_function(format!("{name}_fwd {n}x{ic}x{oc}"), |b| {
                b.iter(|| {
                    timed(backend, || {
                        backend.matmul_forward(&mut out, &inp, &weight, bias.as_ref(), n, ic, oc, layout).unwrap()
                    })
                })
            });
            g.throughput(Throughput::Elements(2 * flops as u64));
            g.bench_function(format!("{name}_bwd {n}x{ic}x{oc}"), |b| {
                b.iter(|| {
                    timed(backend, || {
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
        g.bench_function(format!("mlp_fc_gelu_fwd {n}x{ic}x{oc}"), |b| b.iter(|| timed(backend, &mut fused)));
    }

    // ---- attention -------------------------------------------------------------------------------
    {
        let packing = Packing::new(backend, &s.cu_seqlens()).unwrap();
        let qkv = up(random(n * 3 * ch, 1.0, &mut rng));
        let mut out = backend.zeros(n * ch).unwrap();
        let mut saved = backend.zeros(backend.attention_saved_len(&packing, s.n_head)).unwrap();
        let dout = up(random(n * ch, 1.0, &mut rng));
        let mut dqkv = backend.zeros(n * 3 * ch).unwrap();
        // Causal: QKᵀ and AV over the t(t+1)/2 unmasked pairs of each sequence, 2 FLOPs per MAC.
        let flops = (s.seqs * 2 * ch * s.seq_len * (s.seq_len + 1)) as u64;
        let mut g = c.benchmark_group(format!("{label}/attention (Gelem/s = GFLOP/s)"));
        g.throughput(Throughput::Elements(flops));
        g.bench_function(format!("fwd {}x{} h{}", s.seqs, s.seq_len, s.n_head), |b| {
            b.iter(|| {
                timed(backend, || {
                    backend.attention_forward(&mut out, &mut saved, &qkv, &packing, s.n_head, ch).unwrap()
                })
            })
        });
        backend.attention_forward(&mut out, &mut saved, &qkv, &packing, s.n_head, ch).unwrap();
        g.throughput(Throughput::Elements(2 * flops));
        g.bench_function(format!("bwd {}x{} h{}", s.seqs, s.seq_len, s.n_head), |b| {
            b.iter(|| {
                timed(backend, || {
                    backend.attention_backward(&mut dqkv, &dout, &qkv, &out, &saved, &packing, s.n_head, ch).unwrap()
                })
            })
        });
        g.finish();
    }

    let mut g = c.benchmark_group(format!("{label}/memory-bound (GB/s)"));

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
        g.throughput(Throughput::BytesDecimal(f32b(2 * n * ch + 2 * n)));
        g.bench_function(format!("layernorm_fwd {n}x{ch}"), |b| {
            b.iter(|| {
                timed(backend, || {
                    backend
                        .layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &weight, &bias, n, ch, 1e-5)
                        .unwrap()
                })
            })
        });
        backend.layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &weight, &bias, n, ch, 1e-5).unwrap();
        g.throughput(Throughput::BytesDecimal(f32b(4 * n * ch + 2 * n)));
        g.bench_function(format!("layernorm_bwd {n}x{ch}"), |b| {
            b.iter(|| {
                timed(backend, || {
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
        g.throughput(Throughput::BytesDecimal(f32b(4 * n * ch + 2 * n)));
        g.bench_function(format!("residual_layernorm_fwd {n}x{ch}"), |b| {
            b.iter(|| {
                timed(backend, || {
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
                })
            })
        });
        let rows: Vec<i32> =
            s.response_targets(&mut rng).iter().enumerate().filter(|(_, &t)| t >= 0).map(|(i, _)| i as i32).collect();
        let m = rows.len();
        let rows = backend.upload_ids(&rows).unwrap();
        let mut picked = backend.zeros(m * ch).unwrap();
        let mut scattered = backend.zeros(n * ch).unwrap();
        g.throughput(Throughput::BytesDecimal(f32b(2 * m * ch)));
        g.bench_function(format!("gather_rows {m} of {n}x{ch}"), |b| {
            b.iter(|| timed(backend, || backend.gather_rows(&mut picked, &a, &rows, m, n, ch).unwrap()))
        });
        g.throughput(Throughput::BytesDecimal(f32b(m * ch + n * ch)));
        g.bench_function(format!("scatter_rows {m} into {n}x{ch}"), |b| {
            b.iter(|| timed(backend, || backend.scatter_rows(&mut scattered, &picked, &rows, m, n, ch).unwrap()))
        });
    }

    // ---- gelu and residual ---------------------------------------------------------------------
    {
        let m = n * 4 * ch;
        let inp = up(random(m, 3.0, &mut rng));
        let dout = up(random(m, 1.0, &mut rng));
        let (mut out, mut dinp) = (backend.zeros(m).unwrap(), backend.zeros(m).unwrap());
        g.throughput(Throughput::BytesDecimal(f32b(2 * m)));
        g.bench_function(format!("gelu_fwd {n}x{}", 4 * ch), |b| {
            b.iter(|| timed(backend, || backend.gelu_forward(&mut out, &inp).unwrap()))
        });
        g.throughput(Throughput::BytesDecimal(f32b(3 * m)));
        g.bench_function(format!("gelu_bwd {n}x{}", 4 * ch), |b| {
            b.iter(|| timed(backend, || backend.gelu_backward(&mut dinp, &inp, &dout).unwrap()))
        });
        let a = up(random(n * ch, 1.0, &mut rng));
        let bb = up(random(n * ch, 1.0, &mut rng));
        let mut sum = backend.zeros(n * ch).unwrap();
        g.throughput(Throughput::BytesDecimal(f32b(3 * n * ch)));
        g.bench_function(format!("residual_fwd {n}x{ch}"), |b| {
            b.iter(|| timed(backend, || backend.residual_forward(&mut sum, &a, &bb).unwrap()))
        });
    }

    // ---- embedding -------------------------------------------------------------------------------
    {
        let tokens: Vec<i32> = (0..n).map(|_| rng.random_range(0..v as i32)).collect();
        let positions: Vec<i32> = (0..n).map(|i| (i % s.seq_len) as i32).collect();
        let (tokens, positions) = (backend.upload_ids(&tokens).unwrap(), backend.upload_ids(&positions).unwrap());
        let wte = up(random(v * ch, 0.02, &mut rng));
        let wpe = up(random(s.seq_len * ch, 0.02, &mut rng));
        let mut out = backend.zeros(n * ch).unwrap();
        let dout = up(random(n * ch, 1.0, &mut rng));
        let (mut dwte, mut dwpe) = (backend.zeros(v * ch).unwrap(), backend.zeros(s.seq_len * ch).unwrap());
        g.throughput(Throughput::BytesDecimal(f32b(3 * n * ch)));
        g.bench_function(format!("embedding_fwd {n}x{ch}"), |b| {
            b.iter(|| {
                timed(backend, || backend.embedding_forward(&mut out, &tokens, &positions, &wte, &wpe, n, ch).unwrap())
            })
        });
        g.bench_function(format!("embedding_bwd {n}x{ch}"), |b| {
            b.iter(|| {
                timed(backend, || {
                    backend.embedding_backward(&mut dwte, &mut dwpe, &dout, &tokens, &positions, n, ch).unwrap()
                })
            })
        });
    }

    // ---- fused log-softmax-gather --------------------------------------------------------------
    {
        let packing = Packing::new(backend, &s.cu_seqlens()).unwrap();
        let logits = up(random(n * v, 4.0, &mut rng));
        let targets = backend.upload_ids(&s.response_targets(&mut rng)).unwrap();
        let (mut token_logp, mut lse) = (backend.zeros(n).unwrap(), backend.zeros(n).unwrap());
        let mut seq_logp = backend.zeros(s.seqs).unwrap();
        let dseq = up(random(s.seqs, 1.0, &mut rng));
        g.throughput(Throughput::BytesDecimal(f32b(n * v + 3 * n)));
        g.bench_function(format!("logsoftmax_gather_fwd {n}x{v}"), |b| {
            b.iter(|| {
                timed(backend, || {
                    backend.logsoftmax_gather_forward(&mut token_logp, &mut lse, &logits, &targets, n, v).unwrap();
                    backend.sequence_logp_sum(&mut seq_logp, &token_logp, &packing).unwrap();
                })
            })
        });
        backend.logsoftmax_gather_forward(&mut token_logp, &mut lse, &logits, &targets, n, v).unwrap();
        g.throughput(Throughput::BytesDecimal(f32b(2 * n * v + 2 * n)));
        g.bench_function(format!("logsoftmax_gather_bwd {n}x{v}"), |b| {
            // In place over the logits: each iteration gets a fresh copy (the copy is not timed).
            b.iter_batched_ref(
                || {
                    let mut fresh = backend.zeros(n * v).unwrap();
                    backend.copy(&mut fresh, &logits).unwrap();
                    backend.synchronize().unwrap();
                    fresh
                },
                |work| {
                    timed(backend, || {
                        backend.logsoftmax_gather_backward(work, &lse, &targets, &dseq, &packing, n, v).unwrap()
                    })
                },
                BatchSize::LargeInput,
            )
        });
        black_box(&seq_logp);
    }

    // ---- optimizer and grad norm ---------------------------------------------------------------
    {
        let np = s.params();
        let mut param = up(random(np, 0.02, &mut rng));
        let grad = up(random(np, 1e-3, &mut rng));
        let (mut m, mut vv) = (backend.zeros(np).unwrap(), backend.zeros(np).unwrap());
        let mut p =
            AdamWParams { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 0, grad_scale: 1.0 };
        // Reads param, grad, m, v; writes param, m, v.
        g.throughput(Throughput::BytesDecimal(f32b(7 * np)));
        g.bench_function(format!("adamw {np}"), |b| {
            b.iter(|| {
                p.step += 1;
                timed(backend, || backend.adamw(&mut param, &grad, &mut m, &mut vv, &p).unwrap())
            })
        });
        g.throughput(Throughput::BytesDecimal(f32b(np)));
        g.bench_function(format!("sum_squares {np}"), |b| b.iter(|| black_box(backend.sum_squares(&[&grad]).unwrap())));
    }

    // ---- preference loss -----------------------------------------------------------------------
    {
        let pairs = s.seqs / 2;
        let policy = up(random(2 * pairs, 50.0, &mut rng).iter().map(|x| x - 100.0).collect());
        let reference = up(random(2 * pairs, 50.0, &mut rng).iter().map(|x| x - 100.0).collect());
        let flags: Vec<i32> = (0..2 * pairs).map(|i| (i % 4 == 1) as i32).collect();
        let flags = backend.upload_ids(&flags).unwrap();
        let lengths = backend.upload_ids(&vec![96; 2 * pairs]).unwrap();
        let (mut metrics, mut dpolicy) =
            (backend.zeros(pairs * PAIR_METRICS).unwrap(), backend.zeros(2 * pairs).unwrap());
        let objective = Objective::SafeDpo { beta: 0.1, delta: 10.0 };
        g.throughput(Throughput::Elements(pairs as u64));
        g.bench_function(format!("preference_loss safedpo {pairs} pairs (elem = pair)"), |b| {
            b.iter(|| {
                timed(backend, || {
                    backend
                        .preference_loss(
                            &mut metrics,
                            &mut dpolicy,
                            &policy,
                            &reference,
                            &flags,
                            &lengths,
                            &objective,
                            1.0,
                        )
                        .unwrap()
                })
            })
        });
    }
    g.finish();
}
