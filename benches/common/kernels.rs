//! Every kernel family's benchmark, written once over `Backend`: one function per op family (as
//! `backend/ops/<op>.rs`), run by `kernels_cpu.rs` and `kernels_cuda.rs` with their backend, shape,
//! timer and byte count ([`Target`]).
//!
//! Throughput units: compute-bound ops (matmul, attention) declare their FLOPs as criterion
//! "elements", so `Gelem/s` in the output reads as GFLOP/s; memory-bound ops declare the bytes they
//! must move at least once (inputs read, outputs written, accumulators read and written), counted
//! from each tensor's storage after a first call (the backend's [`ByteCount`]), so `GB/s` is the
//! achieved bandwidth. The copy of `buffers` is the measured roofline to read them against.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safedpo::backend::prelude::*;
use safedpo::backend::{
    rope_inverse_frequencies, AdamWParams, DecodeSpans, Packing, PreferenceLossInputs, QkvLayout, RopeScaling,
    PAIR_METRICS,
};
use safedpo::loss::Objective;

use super::{random, Shape};

/// Measures `iters` back-to-back calls of `f` on a backend's device.
pub trait Timer {
    fn time(&self, iters: u64, f: &mut dyn FnMut()) -> Duration;
}

/// The wall clock between two waits for the backend (the CPU's timer: its waits return at once).
pub struct WallClock<'a, B: Buffers>(pub &'a B);

impl<B: Buffers> Timer for WallClock<'_, B> {
    fn time(&self, iters: u64, f: &mut dyn FnMut()) -> Duration {
        self.0.synchronize().expect("synchronize");
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        self.0.synchronize().expect("synchronize");
        start.elapsed()
    }
}

/// The bytes a backend's tensors occupy, for the memory-bound ops' throughput.
pub trait ByteCount<B: Buffers> {
    /// Bytes `buf` occupies in its storage.
    fn bytes(&self, buf: &B::Buf) -> u64;
    /// Bytes an optimizer update of `param` moves: by default the parameter read and written.
    fn update_bytes(&self, param: &B::Buf) -> u64 {
        2 * self.bytes(param)
    }
}

/// Four bytes per element: a backend that stores every tensor in f32 (the CPU).
pub struct F32Bytes<'a, B: Buffers>(pub &'a B);

impl<B: Buffers> ByteCount<B> for F32Bytes<'_, B> {
    fn bytes(&self, buf: &B::Buf) -> u64 {
        4 * self.0.buf_len(buf) as u64
    }
}

/// Bytes of `len` token ids (i32 on every backend).
fn id_bytes(len: usize) -> u64 {
    4 * len as u64
}

/// Where the benchmarks run: the backend, the shape, and how its time and bytes are measured.
pub struct Target<'a, B: Backend> {
    pub backend: &'a B,
    /// Names the backend in the benchmark ids ("cpu", "cuda-bf16").
    pub label: String,
    pub shape: Shape,
    pub timer: &'a dyn Timer,
    pub bytes: &'a dyn ByteCount<B>,
}

/// The benchmark groups: throughput in FLOPs for the compute-bound families, in bytes for the rest.
const MATMUL: &str = "matmul (Gelem/s = GFLOP/s)";
const ATTENTION: &str = "attention (Gelem/s = GFLOP/s)";
const MEMORY_BOUND: &str = "memory-bound (GB/s)";

impl<B: Backend> Target<'_, B> {
    fn group<'c>(&self, c: &'c mut Criterion, name: &str) -> BenchmarkGroup<'c, WallTime> {
        c.benchmark_group(format!("{}/{name}", self.label))
    }

    fn upload(&self, data: Vec<f32>) -> B::Buf {
        self.backend.upload(&data).expect("upload")
    }

    fn zeros(&self, len: usize) -> B::Buf {
        self.backend.zeros(len).expect("zeros")
    }

    fn ids(&self, ids: &[i32]) -> B::Ids {
        self.backend.upload_ids(ids).expect("upload_ids")
    }

    /// Bytes the storage of all of `bufs` occupies.
    fn storage(&self, bufs: &[&B::Buf]) -> u64 {
        bufs.iter().map(|b| self.bytes.bytes(b)).sum()
    }

    /// Benchmarks `iters` back-to-back calls of `f` as `id`, on the target's timer.
    fn bench(&self, g: &mut BenchmarkGroup<WallTime>, id: String, throughput: Throughput, mut f: impl FnMut()) {
        g.throughput(throughput);
        g.bench_function(id, |b| b.iter_custom(|iters| self.timer.time(iters, &mut f)));
    }
}

/// The data of every family: the same seed each time.
fn seeded() -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(0)
}

/// Every kernel family, in the order of the report: the compute-bound ones, then the memory-bound
/// ones after their roofline.
pub fn kernel_benches<B: Backend>(c: &mut Criterion, t: &Target<B>) {
    matmul(c, t);
    attention(c, t);
    decode_attention(c, t);
    buffers(c, t);
    layernorm(c, t);
    rmsnorm(c, t);
    rows(c, t);
    pointwise(c, t);
    swiglu(c, t);
    rope(c, t);
    embedding(c, t);
    logsoftmax_gather(c, t);
    optimizer(c, t);
    grad_norm(c, t);
    preference_loss(c, t);
}

/// Every product of a layer plus the tied LM head, forward and backward; the MLP's first product
/// with its bias and GELU (fused into the epilogue where the backend can).
pub fn matmul<B: Backend>(c: &mut Criterion, t: &Target<B>) {
    let (be, s) = (t.backend, &t.shape);
    let (n, ch) = (s.n(), s.c);
    let mut rng = seeded();
    let mut g = t.group(c, MATMUL);
    for (name, ic, oc, layout, has_bias) in s.matmul_products() {
        let inp = t.upload(random(n * ic, 1.0, &mut rng));
        let weight = t.upload(random(ic * oc, 0.02, &mut rng));
        let bias = has_bias.then(|| t.upload(random(oc, 0.02, &mut rng)));
        let mut out = t.zeros(n * oc);
        let dout = t.upload(random(n * oc, 1.0, &mut rng));
        let (mut dinp, mut dweight, mut dbias) = (t.zeros(n * ic), t.zeros(ic * oc), t.zeros(oc));
        let flops = (2 * n * ic * oc) as u64;
        t.bench(&mut g, format!("{name}_fwd {n}x{ic}x{oc}"), Throughput::Elements(flops), || {
            be.matmul_forward(&mut out, &inp, &weight, bias.as_ref(), n, ic, oc, layout).unwrap()
        });
        t.bench(&mut g, format!("{name}_bwd {n}x{ic}x{oc}"), Throughput::Elements(2 * flops), || {
            let db = if has_bias { Some(&mut dbias) } else { None };
            be.matmul_backward(&mut dinp, &mut dweight, db, &dout, &inp, &weight, n, ic, oc, layout).unwrap()
        });
    }

    let (ic, oc) = (ch, 4 * ch);
    let inp = t.upload(random(n * ic, 1.0, &mut rng));
    let weight = t.upload(random(ic * oc, 0.02, &mut rng));
    let bias = t.upload(random(oc, 0.02, &mut rng));
    let (mut pre, mut out) = (t.zeros(n * oc), t.zeros(n * oc));
    let flops = (2 * n * ic * oc) as u64;
    t.bench(&mut g, format!("mlp_fc_gelu_fwd {n}x{ic}x{oc}"), Throughput::Elements(flops), || {
        be.matmul_bias_gelu_forward(&mut pre, &mut out, &inp, &weight, &bias, n, ic, oc).unwrap()
    });
    g.finish();
}

/// A Llama-3.2-1B-like grouped-query attention: 32 query heads sharing 8 key/value heads of 64.
const LLAMA_GQA: QkvLayout = QkvLayout { n_head: 32, n_kv_head: 8, head_dim: 64 };

/// Causal attention over the batch's sequences, forward and backward: the shape's multi-head
/// attention, then a grouped-query one ([`LLAMA_GQA`]) over the same batch.
pub fn attention<B: Backend>(c: &mut Criterion, t: &Target<B>) {
    let (be, s) = (t.backend, &t.shape);
    let n = s.n();
    let mut rng = seeded();
    let packing = Packing::new(be, &s.cu_seqlens()).expect("packing");
    let mut g = t.group(c, ATTENTION);
    let mha = QkvLayout::mha(s.n_head, s.c);
    for layout in [mha, LLAMA_GQA] {
        let (nh, q_width) = (layout.n_head, layout.q_width());
        let qkv = t.upload(random(n * layout.width(), 1.0, &mut rng));
        let mut out = t.zeros(n * q_width);
        let mut saved = t.zeros(be.attention_saved_len(&packing, nh));
        let dout = t.upload(random(n * q_width, 1.0, &mut rng));
        let mut dqkv = t.zeros(n * layout.width());
        // Causal: QKᵀ and AV over the t(t+1)/2 unmasked pairs of each sequence, 2 FLOPs per MAC.
        let flops = (s.seqs * 2 * q_width * s.seq_len * (s.seq_len + 1)) as u64;
        let what = if layout == mha {
            format!("{}x{} h{nh}", s.seqs, s.seq_len)
        } else {
            format!("{}x{} h{nh}/{} hd{}", s.seqs, s.seq_len, layout.n_kv_head, layout.head_dim)
        };
        t.bench(&mut g, format!("fwd {what}"), Throughput::Elements(flops), || {
            be.attention_forward(&mut out, &mut saved, &qkv, &packing, layout, None).unwrap()
        });
        be.attention_forward(&mut out, &mut saved, &qkv, &packing, layout, None).unwrap();
        t.bench(&mut g, format!("bwd {what}"), Throughput::Elements(2 * flops), || {
            be.attention_backward(&mut dqkv, &dout, &qkv, &out, &saved, &packing, layout, None).unwrap()
        });
    }
    g.finish();
}

/// One decoding step with a KV cache: a query per sequence against its `seq_len` cached rows (the
/// shape's batch as a cache), multi-head, then grouped-query ([`LLAMA_GQA`]).
pub fn decode_attention<B: Backend>(c: &mut Criterion, t: &Target<B>) {
    let (be, s) = (t.backend, &t.shape);
    let mut rng = seeded();
    let starts: Vec<i32> = (0..s.seqs).map(|i| (i * s.seq_len) as i32).collect();
    let spans = DecodeSpans::new(be, &starts, &vec![s.seq_len as i32; s.seqs]).expect("spans");
    let mut g = t.group(c, ATTENTION);
    let mha = QkvLayout::mha(s.n_head, s.c);
    for layout in [mha, LLAMA_GQA] {
        let (nh, width) = (layout.n_head, layout.width());
        let qkv = t.upload(random(s.seqs * width, 1.0, &mut rng));
        let cache = t.upload(random(s.n() * width, 1.0, &mut rng));
        let mut out = t.zeros(s.seqs * layout.q_width());
        // q·k and p·v over every cached row, 2 FLOPs per MAC.
        let flops = (s.seqs * 4 * layout.q_width() * s.seq_len) as u64;
        let what = format!("{}x{} h{nh}/{} hd{}", s.seqs, s.seq_len, layout.n_kv_head, layout.head_dim);
        t.bench(&mut g, format!("decode {what}"), Throughput::Elements(flops), || {
            be.decode_attention_forward(&mut out, &qkv, &cache, &spans, layout, None).unwrap()
        });
    }
    g.finish();
}

/// The measured roofline: a device-to-device copy as large as the LM head's logits. The
/// memory-bound kernels' GB/s read against this one (the target for the fused
/// log-softmax-gather forward is 80% of it), not against the datasheet's peak.
pub fn buffers<B: Backend>(c: &mut Criterion, t: &Target<B>) {
    let s = &t.shape;
    let (n, v) = (s.n(), s.vocab);
    let src = t.zeros(n * v);
    let mut dst = t.zeros(n * v);
    t.backend.copy(&mut dst, &src).unwrap();
    let mut g = t.group(c, MEMORY_BOUND);
    let moved = t.storage(&[&src, &dst]);
    t.bench(&mut g, format!("device_copy {n}x{v} (measured bandwidth)"), Throughput::BytesDecimal(moved), || {
        t.backend.copy(&mut dst, &src).unwrap()
    });
    g.finish();
}

/// LayerNorm forward and backward, and the residual add fused with the next LayerNorm.
pub fn layernorm<B: Backend>(c: &mut Criterion, t: &Target<B>) {
    let (be, s) = (t.backend, &t.shape);
    let (n, ch) = (s.n(), s.c);
    let mut rng = seeded();
    let mut g = t.group(c, MEMORY_BOUND);
    let inp = t.upload(random(n * ch, 1.0, &mut rng));
    let weight = t.upload(random(ch, 1.0, &mut rng));
    let bias = t.upload(random(ch, 0.1, &mut rng));
    let (mut out, mut mean, mut rstd) = (t.zeros(n * ch), t.zeros(n), t.zeros(n));
    be.layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &weight, &bias, n, ch, 1e-5).unwrap();
    let moved = t.storage(&[&inp, &weight, &bias, &out, &mean, &rstd]);
    t.bench(&mut g, format!("layernorm_fwd {n}x{ch}"), Throughput::BytesDecimal(moved), || {
        be.layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &weight, &bias, n, ch, 1e-5).unwrap()
    });

    let dout = t.upload(random(n * ch, 1.0, &mut rng));
    let (mut dinp, mut dw, mut db) = (t.zeros(n * ch), t.zeros(ch), t.zeros(ch));
    be.layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &weight, &bias, n, ch, 1e-5).unwrap();
    be.layernorm_backward(&mut dinp, &mut dw, &mut db, &dout, &inp, &weight, &mean, &rstd, n, ch).unwrap();
    // dinp, dweight and dbias accumulate: read and written.
    let moved = t.storage(&[&dout, &inp, &weight, &mean, &rstd]) + 2 * t.storage(&[&dinp, &dw, &db]);
    t.bench(&mut g, format!("layernorm_bwd {n}x{ch}"), Throughput::BytesDecimal(moved), || {
        be.layernorm_backward(&mut dinp, &mut dw, &mut db, &dout, &inp, &weight, &mean, &rstd, n, ch).unwrap()
    });

    let (a, b) = (t.upload(random(n * ch, 1.0, &mut rng)), t.upload(random(n * ch, 1.0, &mut rng)));
    let mut residual = t.zeros(n * ch);
    let fused = |residual: &mut B::Buf, out: &mut B::Buf, mean: &mut B::Buf, rstd: &mut B::Buf| {
        be.residual_layernorm_forward(residual, out, mean, rstd, &a, &b, &weight, &bias, n, ch, 1e-5).unwrap()
    };
    fused(&mut residual, &mut out, &mut mean, &mut rstd);
    let moved = t.storage(&[&a, &b, &residual, &out, &weight, &bias, &mean, &rstd]);
    t.bench(&mut g, format!("residual_layernorm_fwd {n}x{ch}"), Throughput::BytesDecimal(moved), || {
        fused(&mut residual, &mut out, &mut mean, &mut rstd)
    });
    g.finish();
}

/// RMSNorm forward and backward, and the residual add fused with the next RMSNorm.
pub fn rmsnorm<B: Backend>(c: &mut Criterion, t: &Target<B>) {
    let (be, s) = (t.backend, &t.shape);
    let (n, ch) = (s.n(), s.c);
    let mut rng = seeded();
    let mut g = t.group(c, MEMORY_BOUND);
    let inp = t.upload(random(n * ch, 1.0, &mut rng));
    let weight = t.upload(random(ch, 1.0, &mut rng));
    let (mut out, mut rstd) = (t.zeros(n * ch), t.zeros(n));
    be.rmsnorm_forward(&mut out, &mut rstd, &inp, &weight, n, ch, 1e-5).unwrap();
    let moved = t.storage(&[&inp, &weight, &out, &rstd]);
    t.bench(&mut g, format!("rmsnorm_fwd {n}x{ch}"), Throughput::BytesDecimal(moved), || {
        be.rmsnorm_forward(&mut out, &mut rstd, &inp, &weight, n, ch, 1e-5).unwrap()
    });

    let dout = t.upload(random(n * ch, 1.0, &mut rng));
    let (mut dinp, mut dw) = (t.zeros(n * ch), t.zeros(ch));
    be.rmsnorm_backward(&mut dinp, &mut dw, &dout, &inp, &weight, &rstd, n, ch).unwrap();
    // dinp and dweight accumulate: read and written.
    let moved = t.storage(&[&dout, &inp, &weight, &rstd]) + 2 * t.storage(&[&dinp, &dw]);
    t.bench(&mut g, format!("rmsnorm_bwd {n}x{ch}"), Throughput::BytesDecimal(moved), || {
        be.rmsnorm_backward(&mut dinp, &mut dw, &dout, &inp, &weight, &rstd, n, ch).unwrap()
    });

    let (a, b) = (t.upload(random(n * ch, 1.0, &mut rng)), t.upload(random(n * ch, 1.0, &mut rng)));
    let mut residual = t.zeros(n * ch);
    be.residual_rmsnorm_forward(&mut residual, &mut out, &mut rstd, &a, &b, &weight, n, ch, 1e-5).unwrap();
    let moved = t.storage(&[&a, &b, &residual, &out, &weight, &rstd]);
    t.bench(&mut g, format!("residual_rmsnorm_fwd {n}x{ch}"), Throughput::BytesDecimal(moved), || {
        be.residual_rmsnorm_forward(&mut residual, &mut out, &mut rstd, &a, &b, &weight, n, ch, 1e-5).unwrap()
    });
    g.finish();
}

/// The LM head's target-row selection: gathering the rows with a target, scattering their gradient.
pub fn rows<B: Backend>(c: &mut Criterion, t: &Target<B>) {
    let (be, s) = (t.backend, &t.shape);
    let (n, ch) = (s.n(), s.c);
    let mut rng = seeded();
    let inp = t.upload(random(n * ch, 1.0, &mut rng));
    let rows: Vec<i32> = s
        .response_targets(&mut rng)
        .iter()
        .enumerate()
        .filter(|&(_, &target)| target >= 0)
        .map(|(i, _)| i as i32)
        .collect();
    let m = rows.len();
    let rows = t.ids(&rows);
    let (mut picked, mut scattered) = (t.zeros(m * ch), t.zeros(n * ch));
    be.gather_rows(&mut picked, &inp, &rows, m, n, ch).unwrap();
    be.scatter_rows(&mut scattered, &picked, &rows, m, n, ch).unwrap();
    let mut g = t.group(c, MEMORY_BOUND);
    let moved = 2 * t.storage(&[&picked]);
    t.bench(&mut g, format!("gather_rows {m} of {n}x{ch}"), Throughput::BytesDecimal(moved), || {
        be.gather_rows(&mut picked, &inp, &rows, m, n, ch).unwrap()
    });
    let moved = t.storage(&[&picked, &scattered]);
    t.bench(&mut g, format!("scatter_rows {m} into {n}x{ch}"), Throughput::BytesDecimal(moved), || {
        be.scatter_rows(&mut scattered, &picked, &rows, m, n, ch).unwrap()
    });
    g.finish();
}

/// GELU forward and backward on the MLP's hidden activations; the residual add.
pub fn pointwise<B: Backend>(c: &mut Criterion, t: &Target<B>) {
    let (be, s) = (t.backend, &t.shape);
    let (n, ch) = (s.n(), s.c);
    let mut rng = seeded();
    let mut g = t.group(c, MEMORY_BOUND);
    let m = n * 4 * ch;
    let inp = t.upload(random(m, 3.0, &mut rng));
    let dout = t.upload(random(m, 1.0, &mut rng));
    let (mut out, mut dinp) = (t.zeros(m), t.zeros(m));
    be.gelu_forward(&mut out, &inp).unwrap();
    be.gelu_backward(&mut dinp, &inp, &dout).unwrap();
    let moved = t.storage(&[&inp, &out]);
    t.bench(&mut g, format!("gelu_fwd {n}x{}", 4 * ch), Throughput::BytesDecimal(moved), || {
        be.gelu_forward(&mut out, &inp).unwrap()
    });
    let moved = t.storage(&[&inp, &dout, &dinp]);
    t.bench(&mut g, format!("gelu_bwd {n}x{}", 4 * ch), Throughput::BytesDecimal(moved), || {
        be.gelu_backward(&mut dinp, &inp, &dout).unwrap()
    });

    let (a, b) = (t.upload(random(n * ch, 1.0, &mut rng)), t.upload(random(n * ch, 1.0, &mut rng)));
    let mut sum = t.zeros(n * ch);
    be.residual_forward(&mut sum, &a, &b).unwrap();
    let moved = t.storage(&[&a, &b, &sum]);
    t.bench(&mut g, format!("residual_fwd {n}x{ch}"), Throughput::BytesDecimal(moved), || {
        be.residual_forward(&mut sum, &a, &b).unwrap()
    });
    g.finish();
}

/// SwiGLU forward and backward on the MLP's hidden activations (`f = 4c`, as GPT-2's MLP, so that
/// it reads against GELU's figures), gate and up side by side.
pub fn swiglu<B: Backend>(c: &mut Criterion, t: &Target<B>) {
    let (be, s) = (t.backend, &t.shape);
    let (n, f) = (s.n(), 4 * s.c);
    let mut rng = seeded();
    let mut g = t.group(c, MEMORY_BOUND);
    let inp = t.upload(random(n * 2 * f, 3.0, &mut rng));
    let dout = t.upload(random(n * f, 1.0, &mut rng));
    let (mut out, mut dinp) = (t.zeros(n * f), t.zeros(n * 2 * f));
    be.swiglu_forward(&mut out, &inp, n, f).unwrap();
    be.swiglu_backward(&mut dinp, &inp, &dout, n, f).unwrap();
    let moved = t.storage(&[&inp, &out]);
    t.bench(&mut g, format!("swiglu_fwd {n}x{f}"), Throughput::BytesDecimal(moved), || {
        be.swiglu_forward(&mut out, &inp, n, f).unwrap()
    });
    let moved = t.storage(&[&inp, &dout, &dinp]);
    t.bench(&mut g, format!("swiglu_bwd {n}x{f}"), Throughput::BytesDecimal(moved), || {
        be.swiglu_backward(&mut dinp, &inp, &dout, n, f).unwrap()
    });
    g.finish();
}

/// RoPE forward and backward, in place on the q and k heads of a grouped-query `qkv` (half as many
/// key/value heads as query heads, at least one), positions restarting with each sequence.
pub fn rope<B: Backend>(c: &mut Criterion, t: &Target<B>) {
    let (be, s) = (t.backend, &t.shape);
    let n = s.n();
    let layout = QkvLayout { n_kv_head: (s.n_head / 2).max(1), ..QkvLayout::mha(s.n_head, s.c) };
    let mut rng = seeded();
    let positions: Vec<i32> = (0..n).map(|i| (i % s.seq_len) as i32).collect();
    let positions = t.ids(&positions);
    let inv_freq = rope_inverse_frequencies(layout.head_dim, 1e4, RopeScaling::Default).expect("frequencies");
    let inv_freq = t.upload(inv_freq);
    let mut qkv = t.upload(random(n * layout.width(), 1.0, &mut rng));
    be.rope_forward(&mut qkv, &positions, &inv_freq, n, layout).unwrap();
    // The q and k columns read and written, a position per token (v is not touched).
    let rotated = t.storage(&[&qkv]) / layout.width() as u64 * layout.v_offset() as u64;
    let moved = 2 * rotated + id_bytes(n);
    let what = format!("{n}x{} h{}/{} hd{}", layout.width(), layout.n_head, layout.n_kv_head, layout.head_dim);
    let mut g = t.group(c, MEMORY_BOUND);
    t.bench(&mut g, format!("rope_fwd {what}"), Throughput::BytesDecimal(moved), || {
        be.rope_forward(&mut qkv, &positions, &inv_freq, n, layout).unwrap()
    });
    t.bench(&mut g, format!("rope_bwd {what}"), Throughput::BytesDecimal(moved), || {
        be.rope_backward(&mut qkv, &positions, &inv_freq, n, layout).unwrap()
    });
    g.finish();
}

/// Token and position embeddings, forward and backward.
pub fn embedding<B: Backend>(c: &mut Criterion, t: &Target<B>) {
    let (be, s) = (t.backend, &t.shape);
    let (n, ch, v) = (s.n(), s.c, s.vocab);
    let mut rng = seeded();
    let tokens: Vec<i32> = (0..n).map(|_| rng.random_range(0..v as i32)).collect();
    let positions: Vec<i32> = (0..n).map(|i| (i % s.seq_len) as i32).collect();
    let (tokens, positions) = (t.ids(&tokens), t.ids(&positions));
    let wte = t.upload(random(v * ch, 0.02, &mut rng));
    let wpe = t.upload(random(s.n_positions * ch, 0.02, &mut rng));
    let mut out = t.zeros(n * ch);
    let dout = t.upload(random(n * ch, 1.0, &mut rng));
    let (mut dwte, mut dwpe) = (t.zeros(v * ch), t.zeros(s.n_positions * ch));
    be.embedding_forward(&mut out, &tokens, &positions, &wte, Some(&wpe), n, ch).unwrap();
    be.embedding_backward(&mut dwte, Some(&mut dwpe), &dout, &tokens, &positions, n, ch).unwrap();
    let mut g = t.group(c, MEMORY_BOUND);
    // One row of wte and one of wpe read per token, the output row written.
    let moved = 3 * t.storage(&[&out]) + 2 * id_bytes(n);
    t.bench(&mut g, format!("embedding_fwd {n}x{ch}"), Throughput::BytesDecimal(moved), || {
        be.embedding_forward(&mut out, &tokens, &positions, &wte, Some(&wpe), n, ch).unwrap()
    });
    // Per token: its gradient row read, one row of each table's gradient read and written.
    let row = |table: &B::Buf, rows: usize| t.storage(&[table]) / rows as u64;
    let moved = t.storage(&[&dout]) + 2 * n as u64 * (row(&dwte, v) + row(&dwpe, s.n_positions)) + 2 * id_bytes(n);
    t.bench(&mut g, format!("embedding_bwd {n}x{ch}"), Throughput::BytesDecimal(moved), || {
        be.embedding_backward(&mut dwte, Some(&mut dwpe), &dout, &tokens, &positions, n, ch).unwrap()
    });
    g.finish();
}

/// The fused log-softmax-gather over the LM head's logits `[N, V]`, forward and backward.
pub fn logsoftmax_gather<B: Backend>(c: &mut Criterion, t: &Target<B>) {
    let (be, s) = (t.backend, &t.shape);
    let (n, v) = (s.n(), s.vocab);
    let mut rng = seeded();
    let packing = Packing::new(be, &s.cu_seqlens()).expect("packing");
    let logits = t.upload(random(n * v, 4.0, &mut rng));
    let targets = t.ids(&s.response_targets(&mut rng));
    let (mut token_logp, mut lse) = (t.zeros(n), t.zeros(n));
    let mut seq_logp = t.zeros(s.seqs);
    let dseq = t.upload(random(s.seqs, 1.0, &mut rng));
    be.logsoftmax_gather_forward(&mut token_logp, &mut lse, &logits, &targets, n, v).unwrap();
    be.sequence_logp_sum(&mut seq_logp, &token_logp, &packing).unwrap();
    let mut g = t.group(c, MEMORY_BOUND);
    let moved = t.storage(&[&logits, &token_logp, &lse]) + id_bytes(n);
    t.bench(&mut g, format!("logsoftmax_gather_fwd {n}x{v}"), Throughput::BytesDecimal(moved), || {
        be.logsoftmax_gather_forward(&mut token_logp, &mut lse, &logits, &targets, n, v).unwrap()
    });

    // In place over the logits: every iteration starts from a fresh copy of the logits, made
    // outside the timed span (each iteration is timed on its own).
    let mut work = t.zeros(n * v);
    be.copy(&mut work, &logits).unwrap();
    be.logsoftmax_gather_backward(&mut work, &lse, &targets, &dseq, &packing, n, v).unwrap();
    let moved = 2 * t.storage(&[&work]) + t.storage(&[&lse, &dseq]) + id_bytes(n);
    g.throughput(Throughput::BytesDecimal(moved));
    g.bench_function(format!("logsoftmax_gather_bwd {n}x{v}"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                be.copy(&mut work, &logits).unwrap();
                total += t.timer.time(1, &mut || {
                    be.logsoftmax_gather_backward(&mut work, &lse, &targets, &dseq, &packing, n, v).unwrap()
                });
            }
            total
        })
    });
    g.finish();
    black_box(&seq_logp);
}

/// AdamW over all of the model's parameters as one tensor.
pub fn optimizer<B: Backend>(c: &mut Criterion, t: &Target<B>) {
    let np = t.shape.params();
    let mut rng = seeded();
    let mut param = t.upload(random(np, 0.02, &mut rng));
    let grad = t.upload(random(np, 1e-3, &mut rng));
    let (mut m, mut v) = (t.zeros(np), t.zeros(np));
    let mut p =
        AdamWParams { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 1, grad_scale: 1.0 };
    t.backend.adamw(&mut param, &grad, &mut m, &mut v, &p).unwrap();
    // The parameter updated; the gradient read; the moments read and written.
    let moved = t.bytes.update_bytes(&param) + t.storage(&[&grad]) + 2 * t.storage(&[&m, &v]);
    let mut g = t.group(c, MEMORY_BOUND);
    t.bench(&mut g, format!("adamw {np}"), Throughput::BytesDecimal(moved), || {
        p.step += 1;
        t.backend.adamw(&mut param, &grad, &mut m, &mut v, &p).unwrap()
    });
    g.finish();
}

/// The sum of squares of all of the model's gradients as one tensor; each call waits for its result
/// (an f64 on the host).
pub fn grad_norm<B: Backend>(c: &mut Criterion, t: &Target<B>) {
    let np = t.shape.params();
    let grad = t.upload(random(np, 1e-3, &mut seeded()));
    let mut g = t.group(c, MEMORY_BOUND);
    t.bench(&mut g, format!("sum_squares {np}"), Throughput::BytesDecimal(t.storage(&[&grad])), || {
        black_box(t.backend.sum_squares(&[&grad]).unwrap());
    });
    g.finish();
}

/// The SafeDPO loss of the batch's pairs (one element per pair).
pub fn preference_loss<B: Backend>(c: &mut Criterion, t: &Target<B>) {
    let pairs = t.shape.seqs / 2;
    let mut rng = seeded();
    let policy = t.upload(random(2 * pairs, 50.0, &mut rng).iter().map(|x| x - 100.0).collect());
    let reference = t.upload(random(2 * pairs, 50.0, &mut rng).iter().map(|x| x - 100.0).collect());
    let flags: Vec<i32> = (0..2 * pairs).map(|i| (i % 4 == 1) as i32).collect();
    let (flags, lengths) = (t.ids(&flags), t.ids(&vec![96; 2 * pairs]));
    let (mut metrics, mut dpolicy) = (t.zeros(pairs * PAIR_METRICS), t.zeros(2 * pairs));
    let objective = Objective::SafeDpo { beta: 0.1, delta: 10.0 };
    let mut g = t.group(c, MEMORY_BOUND);
    t.bench(
        &mut g,
        format!("preference_loss safedpo {pairs} pairs (elem = pair)"),
        Throughput::Elements(pairs as u64),
        || {
            t.backend
                .preference_loss(
                    &mut metrics,
                    &mut dpolicy,
                    &PreferenceLossInputs::pairs(&policy, &reference, &flags, &lengths, &objective),
                )
                .unwrap()
        },
    );
    g.finish();
}
