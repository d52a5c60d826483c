//! The CPU f32 reference backend: the oracle every other backend is checked against, and the
//! default where there is no GPU. Parallel across rows and (sequence, head) pairs (rayon); matrix
//! products through the `gemm` crate.
//!
//! Determinism: no result depends on how rayon schedules work. Reductions across rows (parameter
//! gradients of LayerNorm and biases, `sum_squares`) use partial sums over fixed-size row chunks,
//! added in chunk order; the embedding backward buckets tokens by id so that each gradient row is
//! owned by one task that adds its tokens in order; `gemm` never splits the inner dimension
//! across threads, and where we split it ourselves (weight gradients, over tokens) the parts are
//! fixed by the shape and added in part order.
//!
//! The attention forward saves the softmax probabilities for the backward
//! (`attention_saved_len = n_head · Σ T_s²`): sequence by sequence, head by head, one row-major
//! `[T_s, T_s]` block `P[i, j]` (query i, key j, zeros above the diagonal) at offset
//! `n_head · Σ_{s'<s} T_{s'}² + h · T_s²`.
//!
//! Row kernels (softmaxes, GELU, LayerNorm rows, AdamW) are compiled three times, portable, with
//! AVX2 and with AVX-512, the widest the CPU has chosen at run time (`simd_kernel!`); all give
//! bit-identical results. Exponentials use a
//! vectorisable Cephes-style `expf` (≈1 ulp).

use anyhow::Result;
use gemm::Parallelism;
use rayon::prelude::*;

use super::prelude::*;
use super::{checks, AdamWParams, Packing, WeightLayout, PAIR_METRICS};
use crate::loss::{pair_loss, Objective, PairInput};

/// The CPU backend. Stateless: buffers are plain `Vec`s, work runs on rayon's global pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

/// Elements per task for pointwise ops (large enough to amortise rayon's scheduling).
const POINTWISE_CHUNK: usize = 1 << 14;
/// Rows per partial sum in row reductions. A constant, so results do not depend on thread count.
const REDUCE_ROWS: usize = 32;
/// Query rows per block in attention: scores are computed for whole blocks, so the wasted work
/// above the causal diagonal is at most one block per row block.
const ATTN_BLOCK: usize = 32;
/// Products with at least this many multiply-adds run multi-threaded inside `gemm`.
const GEMM_PARALLEL_FLOPS: usize = 1 << 18;
/// Tokens per part when a weight gradient's token dimension is split (see [`weight_grad_parts`]).
const WGRAD_PART_TOKENS: usize = 512;
/// Most parts a weight gradient is split into.
const WGRAD_MAX_PARTS: usize = 8;
/// Bound on the scratch partial gradients of a split weight gradient, in elements (16 MiB).
const WGRAD_SCRATCH_ELEMS: usize = 1 << 22;

/// A raw pointer that may cross threads. Used only where parallel tasks write provably disjoint
/// strided regions of one buffer (attention heads), which safe slices cannot express.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer. (A method, so that closures capture the whole `SyncPtr`, not its field.)
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// A strided matrix view for [`gemm_f32`]: `ptr[r * rs + c * cs]` is element `(r, c)`.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}
// A `Mat` is only ever read through, so tasks on several threads may share one.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

impl Mat {
    fn new(ptr: *const f32, rs: usize, cs: usize) -> Self {
        Mat { ptr, rs: rs as isize, cs: cs as isize }
    }

    /// The view whose element `(0, 0)` is this one's `(r, c)`.
    fn from(self, r: usize, c: usize) -> Self {
        Mat { ptr: self.ptr.wrapping_offset(r as isize * self.rs + c as isize * self.cs), ..self }
    }
}

/// `dst[m, n] = (accumulate ? dst : 0) + scale · lhs[m, k] · rhs[k, n]`.
///
/// # Safety
/// Every view must address valid memory for its shape; `dst` must not alias `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    parallel: bool,
) {
    let parallelism =
        if parallel && m * n * k >= GEMM_PARALLEL_FLOPS { Parallelism::Rayon(0) } else { Parallelism::None };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        1.0,
        scale,
        false,
        false,
        false,
        parallelism,
    );
}

/// How many parts of the token dimension a weight gradient `[m, n]` summed over `k` tokens is split
/// into: about [`WGRAD_PART_TOKENS`] tokens each, at most [`WGRAD_MAX_PARTS`], and only as many as
/// [`WGRAD_SCRATCH_ELEMS`] of scratch allows. A function of the shape alone, never of the thread
/// count, so the gradient's bits are the same on any machine.
fn weight_grad_parts(m: usize, n: usize, k: usize) -> usize {
    let by_scratch = 1 + WGRAD_SCRATCH_ELEMS / (m * n).max(1);
    (k / WGRAD_PART_TOKENS).min(WGRAD_MAX_PARTS).min(by_scratch).max(1)
}

/// `dst[m, n] += lhs[m, k] · rhs[k, n]` for a weight gradient, whose inner dimension `k` (tokens)
/// is long and whose output is small.
///
/// Why split: `gemm` parallelises over the output only, and for a small output with a long `k`
/// (the QKV weight gradient: 128 × 384 over 2,048 tokens) each thread repacks the whole of one
/// operand for a narrow slice of columns, and meets at two barriers per 512-token block; it ran no
/// faster on two threads than on one. Here each part of [`weight_grad_parts`] runs `gemm` over its
/// own tokens (single-threaded when there are at least as many parts as threads), part 0 straight
/// into `dst`, the others into scratch, added after in part order: `dst = ((dst + P₀) + P₁) + …`.
///
/// # Safety
/// As [`gemm_f32`]: the views address valid memory for their shapes, `dst` aliases neither.
#[allow(clippy::too_many_arguments)]
unsafe fn accumulate_weight_grad(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, lhs: Mat, rhs: Mat) {
    let parts = weight_grad_parts(m, n, k);
    if parts == 1 {
        gemm_f32(m, n, k, dst, dst_rs, true, lhs, rhs, 1.0, true);
        return;
    }
    // Only the speed depends on this: `gemm`'s results do not depend on its threading.
    let inner_parallel = parts < rayon::current_num_threads();
    let tokens = k.div_ceil(parts);
    let part_views = |p: usize| {
        let t0 = p * tokens;
        let len = tokens.min(k.saturating_sub(t0));
        (len, lhs.from(0, t0), rhs.from(t0, 0))
    };
    let dst = SyncPtr(dst);
    let mut scratch = vec![0.0f32; (parts - 1) * m * n];
    rayon::join(
        || {
            let (len, lhs_0, rhs_0) = part_views(0);
            // SAFETY: part 0 of the caller's views; `dst` is written by this task only.
            unsafe { gemm_f32(m, n, len, dst.get(), dst_rs, true, lhs_0, rhs_0, 1.0, inner_parallel) }
        },
        || {
            scratch.par_chunks_mut(m * n).enumerate().for_each(|(i, partial)| {
                let (len, lhs_p, rhs_p) = part_views(i + 1);
                // SAFETY: a part of the caller's views; `partial` is this task's own [m, n] matrix.
                unsafe { gemm_f32(m, n, len, partial.as_mut_ptr(), n, false, lhs_p, rhs_p, 1.0, inner_parallel) }
            });
        },
    );
    // dst += P₁ + … in part order, in parallel over rows of dst.
    (0..m).into_par_iter().with_min_len(16).for_each(|r| {
        // SAFETY: row r of dst (n elements at stride 1 from r · dst_rs) is touched by this task only.
        let row = unsafe { std::slice::from_raw_parts_mut(dst.get().add(r * dst_rs), n) };
        for partial in scratch.chunks_exact(m * n) {
            row.iter_mut().zip(&partial[r * n..(r + 1) * n]).for_each(|(d, &p)| *d += p);
        }
    });
}

/// `acc[j] += Σ_rows rows[r, j]` over a row-major `[rows, width]` matrix, deterministically.
fn accumulate_column_sums(acc: &mut [f32], rows: &[f32], width: usize) {
    let partials: Vec<Vec<f32>> = rows
        .par_chunks(REDUCE_ROWS * width)
        .map(|chunk| {
            let mut part = vec![0.0f32; width];
            for row in chunk.chunks_exact(width) {
                part.iter_mut().zip(row).for_each(|(p, &x)| *p += x);
            }
            part
        })
        .collect();
    for part in &partials {
        acc.iter_mut().zip(part).for_each(|(a, &p)| *a += p);
    }
}

/// Defines a kernel function three times: as written, and compiled with AVX2 (8 lanes instead of
/// SSE2's 4) and with AVX-512 (16 lanes) enabled, picking the widest the CPU has at run time. Only
/// elementwise work and explicitly laned reductions go in these kernels, and Rust never fuses
/// multiply-adds on its own (nor reorders float operations), so all versions give bit-identical
/// results.
macro_rules! simd_kernel {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                match simd_level() {
                    // SAFETY: the CPU supports AVX-512 (F, BW, DQ, VL; checked by `simd_level`).
                    SimdLevel::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: the CPU supports AVX2 (checked by `simd_level`).
                    SimdLevel::Avx2 => return unsafe { avx2($($arg),*) },
                    SimdLevel::Portable => {}
                }
            }
            portable($($arg),*)
        }
    };
}

/// Which compiled version [`simd_kernel!`] functions take.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SimdLevel {
    Portable,
    Avx2,
    Avx512,
}

/// The widest [`SimdLevel`] the CPU supports. Unit tests can cap it on their own thread, to check
/// that every version agrees bit for bit.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn simd_level() -> SimdLevel {
    let detected = if std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512dq")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx2")
    {
        SimdLevel::Avx512
    } else if std::is_x86_feature_detected!("avx2") {
        SimdLevel::Avx2
    } else {
        SimdLevel::Portable
    };
    #[cfg(test)]
    if let Some(cap) = tests::SIMD_CAP.with(|f| f.get()) {
        return match (cap, detected) {
            (SimdLevel::Portable, _) | (_, SimdLevel::Portable) => SimdLevel::Portable,
            (SimdLevel::Avx2, _) | (_, SimdLevel::Avx2) => SimdLevel::Avx2,
            _ => SimdLevel::Avx512,
        };
    }
    detected
}

/// Accumulator lanes for row sums: independent partial sums that the compiler keeps in one SIMD
/// register, combined in a fixed order at the end (deterministic, and more accurate than one
/// running sum).
const LANES: usize = 8;

/// `Σ f(x)` over a slice with [`LANES`] partial sums.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for l in 0..LANES {
            acc[l] += f(chunk[l]);
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        acc[l] += f(v);
    }
    combine_lanes(acc)
}

/// `Σ a ⊙ b` with [`LANES`] partial sums.
#[inline(always)]
fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (&x, &y)) in ta.iter().zip(tb).enumerate() {
        acc[l] += x * y;
    }
    combine_lanes(acc)
}

/// `max x` with [`LANES`] partial maxima (NaNs are skipped, as by `f32::max`).
#[inline(always)]
fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for l in 0..LANES {
            acc[l] = acc[l].max(chunk[l]);
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        acc[l] = acc[l].max(v);
    }
    acc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// Adds the [`LANES`] partial sums pairwise, in a fixed order.
#[inline(always)]
fn combine_lanes(acc: [f32; LANES]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `eˣ` in f32 to about 1 ulp (Cephes `expf`), written with plain arithmetic and bit operations
/// so that loops over it vectorise (libm's `expf` is a scalar call, and the softmaxes and GELU of
/// a step evaluate millions of exponentials). `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`; `eʳ` by a
/// degree-7 polynomial; `2ⁿ` built in the exponent bits. Underflows to 0 below −87.3 (no
/// subnormals), overflows to +∞ above 88.7, and propagates NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const MIN_X: f32 = -87.336_55; // ln of the smallest normal f32
    const MAX_X: f32 = 88.722_83;
    let xc = x.clamp(MIN_X, MAX_X);
    let shifted = xc * LOG2E + ROUND;
    let n = shifted - ROUND;
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = (p * r) * r + r + 1.0;
    // 2ⁿ in two factors so that n = 128 (x near MAX_X) does not overflow the exponent field.
    let half = n_int >> 1;
    let s1 = f32::from_bits(((half + 127) << 23) as u32);
    let s2 = f32::from_bits(((n_int - half + 127) << 23) as u32);
    let y = er * s1 * s2;
    if x < MIN_X {
        0.0
    } else if x > MAX_X {
        f32::INFINITY
    } else {
        y
    }
}

/// `(max, ln Σ_j exp(row[j] − max))`, reading the row once: chunks of 64 values give a running
/// maximum, and the running sum is rescaled only when a chunk raises it. The log-sum-exp is the sum
/// of the two; keeping them apart lets `x − lse` be formed as `(x − max) − ln Σ` without rounding
/// `lse` first (large logits keep their precision).
#[inline(always)]
fn row_logsumexp(row: &[f32]) -> (f32, f32) {
    let mut max = f32::NEG_INFINITY;
    let mut sum = 0.0f32;
    for chunk in row.chunks(64) {
        let chunk_max = lane_max(chunk);
        if chunk_max > max {
            if sum != 0.0 {
                sum *= exp_f32(max - chunk_max);
            }
            max = chunk_max;
        }
        // Exponentials into a small buffer first, then the laned sum: both loops vectorise.
        let mut exps = [0.0f32; 64];
        for (e, &x) in exps.iter_mut().zip(chunk) {
            *e = exp_f32(x - max);
        }
        sum += lane_sum(&exps[..chunk.len()], |e| e);
    }
    (max, sum.ln())
}

simd_kernel! {
    /// One row of the fused log-softmax-gather forward: returns `(lse, token log-prob)`.
    fn logsoftmax_gather_row(row: &[f32], target: i32) -> (f32, f32) {
        let (max, log_sum) = row_logsumexp(row);
        let logp = if target >= 0 { (row[target as usize] - max) - log_sum } else { 0.0 };
        (max + log_sum, logp)
    }
}

simd_kernel! {
    /// One row of the fused log-softmax-gather backward, in place: `g · (onehot(target) − softmax)`.
    fn logsoftmax_gather_backward_row(row: &mut [f32], target: usize, g: f32, lse: f32) {
        for x in row.iter_mut() {
            *x = -g * exp_f32(*x - lse);
        }
        row[target] += g;
    }
}

simd_kernel! {
    /// Softmax in place over the causal part of a score row; zeros the masked rest.
    fn causal_softmax_row(live: &mut [f32], masked: &mut [f32]) {
        let max = lane_max(live);
        live.iter_mut().for_each(|x| *x = exp_f32(*x - max));
        let inv = 1.0 / lane_sum(live, |x| x);
        live.iter_mut().for_each(|x| *x *= inv);
        masked.fill(0.0);
    }
}

simd_kernel! {
    /// Softmax backward for one row, in place over `dp`: `dS = P ⊙ (dP − Σ_j P dP)`.
    fn softmax_backward_row(dp: &mut [f32], p: &[f32]) {
        let dot = lane_dot(p, dp);
        for (d, &pp) in dp.iter_mut().zip(p) {
            *d = pp * (*d - dot);
        }
    }
}

/// AdamW's per-step constants.
#[derive(Clone, Copy)]
struct AdamWStep {
    beta1: f32,
    beta2: f32,
    eps: f32,
    grad_scale: f32,
    /// `lr · weight_decay`
    decay: f32,
    /// `lr / (1 − β1ᵗ)`
    step_size: f32,
    /// `1 / √(1 − β2ᵗ)`
    inv_sqrt_bc2: f32,
}

simd_kernel! {
    /// AdamW over one chunk (PyTorch semantics; see `Backend::adamw`).
    fn adamw_kernel(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], k: AdamWStep) {
        for (((w, &g), m), v) in param.iter_mut().zip(grad).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = g * k.grad_scale;
            *w -= k.decay * *w;
            *m = k.beta1 * *m + (1.0 - k.beta1) * g;
            *v = k.beta2 * *v + (1.0 - k.beta2) * g * g;
            *w -= k.step_size * *m / (v.sqrt() * k.inv_sqrt_bc2 + k.eps);
        }
    }
}

/// `√(2/π)`, the GELU tanh approximation's constant.
const GELU_SCALE: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

/// HF `gelu_new`, `½x(1 + tanh u)` with `u = √(2/π)(x + 0.044715x³)`, evaluated as the identical
/// `x·σ(2u)` (since `1 + tanh u = 2σ(2u)`): one exponential, and no cancellation for negative x.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    let u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
    x / (1.0 + exp_f32(-2.0 * u))
}

/// `d gelu/dx = ½(1 + tanh u) + ½x(1 − tanh²u)·u'`, i.e. with `s = σ(2u)`:
/// `s + 2x·s(1 − s)·u'`, `u' = √(2/π)(1 + 3·0.044715x²)`.
#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    let u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
    let s = 1.0 / (1.0 + exp_f32(-2.0 * u));
    let du = GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x * x);
    s + 2.0 * x * s * (1.0 - s) * du
}

simd_kernel! {
    /// `out = gelu(inp)` over one chunk.
    fn gelu_forward_kernel(out: &mut [f32], inp: &[f32]) {
        out.iter_mut().zip(inp).for_each(|(o, &x)| *o = gelu(x));
    }
}

simd_kernel! {
    /// `dinp = dout · gelu'(inp)` over one chunk.
    fn gelu_backward_kernel(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        dinp.iter_mut().zip(inp.iter().zip(dout)).for_each(|(dx, (&x, &dy))| *dx = dy * gelu_grad(x));
    }
}

/// The rest of a LayerNorm row once its sum is known: the mean, the centred variance (a second
/// pass, as llm.c: no cancellation for rows far from zero), then `out`; returns `(mean, rstd)`.
/// Shared by [`layernorm_row`] and [`residual_layernorm_row`] and inlined into both, so it is
/// compiled at their SIMD level.
#[inline(always)]
fn layernorm_row_from_sum(out: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32], eps: f32, sum: f32) -> (f32, f32) {
    let c = x.len() as f32;
    let mean = sum / c;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / c;
    let rstd = 1.0 / (var + eps).sqrt();
    for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
        *o = (v - mean) * rstd * w + b;
    }
    (mean, rstd)
}

simd_kernel! {
    /// One LayerNorm row: writes `out` and returns `(mean, rstd)`.
    fn layernorm_row(out: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32], eps: f32) -> (f32, f32) {
        layernorm_row_from_sum(out, x, weight, bias, eps, lane_sum(x, |v| v))
    }
}

/// `sum = a + b` elementwise, returning `Σ sum` with [`LANES`] partial sums: the same values in the
/// same lanes as `lane_sum(sum, |v| v)`, so bit-identical to it, without reading `sum` back.
#[inline(always)]
fn add_lane_sum(sum: &mut [f32], a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut sums = sum.chunks_exact_mut(LANES);
    let (mut ac, mut bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for ((s, x), y) in sums.by_ref().zip(ac.by_ref()).zip(bc.by_ref()) {
        for l in 0..LANES {
            s[l] = x[l] + y[l];
            acc[l] += s[l];
        }
    }
    let tails = sums.into_remainder().iter_mut().zip(ac.remainder().iter().zip(bc.remainder()));
    for (l, (s, (&x, &y))) in tails.enumerate() {
        *s = x + y;
        acc[l] += *s;
    }
    combine_lanes(acc)
}

simd_kernel! {
    /// One row of the residual add fused with LayerNorm: `residual = a + b`, summed as it is
    /// written, then the rest of the LayerNorm while the row is in L1; returns `(mean, rstd)`.
    /// Bit-identical to the add followed by [`layernorm_row`].
    fn residual_layernorm_row(
        residual: &mut [f32],
        out: &mut [f32],
        a: &[f32],
        b: &[f32],
        weight: &[f32],
        bias: &[f32],
        eps: f32,
    ) -> (f32, f32) {
        let sum = add_lane_sum(residual, a, b);
        layernorm_row_from_sum(out, residual, weight, bias, eps, sum)
    }
}

simd_kernel! {
    /// One LayerNorm backward row (llm.c): `dx += rstd · (dy·w − mean(dy·w) − x̂ · mean(dy·w·x̂))`
    /// with `x̂ = (x − mean) · rstd`; adds the row's `x̂·dy` to `dweight_part` and `dy` to
    /// `dbias_part`.
    fn layernorm_backward_row(
        dx: &mut [f32],
        dy: &[f32],
        x: &[f32],
        weight: &[f32],
        mean: f32,
        rstd: f32,
        dweight_part: &mut [f32],
        dbias_part: &mut [f32],
    ) {
        let c = x.len();
        let (mut acc_dnorm, mut acc_dnorm_norm) = ([0.0f32; LANES], [0.0f32; LANES]);
        let full = c - c % LANES;
        let (xs, ws) = (x[..full].chunks_exact(LANES), weight[..full].chunks_exact(LANES));
        for ((xs, ws), dys) in xs.zip(ws).zip(dy[..full].chunks_exact(LANES)) {
            for l in 0..LANES {
                let dnorm = ws[l] * dys[l];
                acc_dnorm[l] += dnorm;
                acc_dnorm_norm[l] += dnorm * ((xs[l] - mean) * rstd);
            }
        }
        for (l, j) in (full..c).enumerate() {
            let dnorm = weight[j] * dy[j];
            acc_dnorm[l] += dnorm;
            acc_dnorm_norm[l] += dnorm * ((x[j] - mean) * rstd);
        }
        let dnorm_mean = combine_lanes(acc_dnorm) / c as f32;
        let dnorm_norm_mean = combine_lanes(acc_dnorm_norm) / c as f32;
        for j in 0..c {
            let norm = (x[j] - mean) * rstd;
            let dnorm = weight[j] * dy[j];
            dbias_part[j] += dy[j];
            dweight_part[j] += norm * dy[j];
            dx[j] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * rstd;
        }
    }
}

/// One (sequence, head) unit of attention work.
#[derive(Clone, Copy)]
struct HeadTask {
    /// First token of the sequence.
    start: usize,
    /// Sequence length.
    len: usize,
    head: usize,
    /// Offset of this head's `[len, len]` probability block in the saved buffer.
    saved_offset: usize,
}

/// The tasks of a packed batch, in the saved buffer's order: sequence-major, then head. The saved
/// buffer holds, for sequence s and head h, the causal softmax probabilities `P[i, j]` (query i,
/// key j, zero for j > i) as a row-major `[T_s, T_s]` block at `n_head · Σ_{s'<s} T_{s'}² + h · T_s²`.
fn head_tasks(seqs: &[(usize, usize)], n_head: usize) -> Vec<HeadTask> {
    let mut tasks = Vec::with_capacity(seqs.len() * n_head);
    let mut offset = 0;
    for &(start, len) in seqs {
        for head in 0..n_head {
            tasks.push(HeadTask { start, len, head, saved_offset: offset });
            offset += len * len;
        }
    }
    tasks
}

impl Buffers for CpuBackend {
    type Buf = Vec<f32>;
    type Ids = Vec<i32>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    // ---- memory ------------------------------------------------------------------------------
    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }
    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }
    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
    fn upload_ids(&self, ids: &[i32]) -> Result<Vec<i32>> {
        Ok(ids.to_vec())
    }
    fn download_ids(&self, ids: &Vec<i32>) -> Result<Vec<i32>> {
        Ok(ids.clone())
    }
    fn buf_len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn resize(&self, buf: &mut Vec<f32>, len: usize) -> Result<()> {
        // Vec keeps its capacity when shrinking, so a batch that fits reuses the storage. Growing
        // reserves exactly: `resize` alone may double the capacity, and a [rows, V] logits buffer
        // would then hold up to twice what the largest batch needs.
        if len > buf.capacity() {
            buf.reserve_exact(len - buf.len());
        }
        buf.resize(len, 0.0);
        Ok(())
    }

    fn fill(&self, buf: &mut Vec<f32>, value: f32) -> Result<()> {
        buf.fill(value);
        Ok(())
    }
    fn copy(&self, dst: &mut Vec<f32>, src: &Vec<f32>) -> Result<()> {
        checks::copy(dst.len(), src.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

impl EmbeddingOps for CpuBackend {
    fn embedding_forward(
        &self,
        out: &mut Vec<f32>,
        tokens: &Vec<i32>,
        positions: &Vec<i32>,
        wte: &Vec<f32>,
        wpe: &Vec<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::embedding_forward(out.len(), tokens, positions, wte.len(), wpe.len(), n, c)?;
        out.par_chunks_mut(c).with_min_len(64).zip(tokens.par_iter().zip(positions.par_iter())).for_each(
            |(row, (&tok, &pos))| {
                let te = &wte[tok as usize * c..][..c];
                let pe = &wpe[pos as usize * c..][..c];
                for ((o, &a), &b) in row.iter_mut().zip(te).zip(pe) {
                    *o = a + b;
                }
            },
        );
        Ok(())
    }

    fn embedding_backward(
        &self,
        dwte: &mut Vec<f32>,
        dwpe: &mut Vec<f32>,
        dout: &Vec<f32>,
        tokens: &Vec<i32>,
        positions: &Vec<i32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::embedding_backward(dwte.len(), dwpe.len(), dout.len(), tokens, positions, n, c)?;
        rayon::join(|| scatter_add_rows(dwte, dout, tokens, c), || scatter_add_rows(dwpe, dout, positions, c));
        Ok(())
    }
}

impl LayerNormOps for CpuBackend {
    fn layernorm_forward(
        &self,
        out: &mut Vec<f32>,
        mean: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        bias: &Vec<f32>,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        checks::layernorm_forward(out.len(), mean.len(), rstd.len(), inp.len(), weight.len(), bias.len(), n, c)?;
        out.par_chunks_mut(c)
            .zip(inp.par_chunks(c))
            .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
            .with_min_len(16)
            .for_each(|((o, x), (mu, rs))| (*mu, *rs) = layernorm_row(o, x, weight, bias, eps));
        Ok(())
    }

    fn residual_layernorm_forward(
        &self,
        residual: &mut Vec<f32>,
        out: &mut Vec<f32>,
        mean: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        weight: &Vec<f32>,
        bias: &Vec<f32>,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        checks::residual_layernorm_forward(
            residual.len(),
            out.len(),
            mean.len(),
            rstd.len(),
            a.len(),
            b.len(),
            weight.len(),
            bias.len(),
            n,
            c,
        )?;
        // One task per row: the add and both LayerNorm passes touch the row while it is in cache,
        // instead of a pass over the whole residual stream for the add and another for the norm.
        residual
            .par_chunks_mut(c)
            .zip(out.par_chunks_mut(c))
            .zip(a.par_chunks(c).zip(b.par_chunks(c)))
            .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
            .with_min_len(16)
            .for_each(|(((r, o), (a, b)), (mu, rs))| {
                (*mu, *rs) = residual_layernorm_row(r, o, a, b, weight, bias, eps)
            });
        Ok(())
    }

    fn layernorm_backward(
        &self,
        dinp: &mut Vec<f32>,
        dweight: &mut Vec<f32>,
        dbias: &mut Vec<f32>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        mean: &Vec<f32>,
        rstd: &Vec<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::layernorm_backward(
            dinp.len(),
            dweight.len(),
            dbias.len(),
            dout.len(),
            inp.len(),
            weight.len(),
            mean.len(),
            rstd.len(),
            n,
            c,
        )?;
        let chunk = REDUCE_ROWS * c;
        // Per chunk of rows: dinp in place, and the chunk's partial [dweight | dbias].
        let partials: Vec<Vec<f32>> = dinp
            .par_chunks_mut(chunk)
            .zip(dout.par_chunks(chunk))
            .zip(inp.par_chunks(chunk))
            .zip(mean.par_chunks(REDUCE_ROWS).zip(rstd.par_chunks(REDUCE_ROWS)))
            .map(|(((dx, dy), x), (mu, rs))| {
                let mut part = vec![0.0f32; 2 * c];
                let (pw, pb) = part.split_at_mut(c);
                for r in 0..mu.len() {
                    let rows = (&mut dx[r * c..][..c], &dy[r * c..][..c], &x[r * c..][..c]);
                    layernorm_backward_row(rows.0, rows.1, rows.2, weight, mu[r], rs[r], pw, pb);
                }
                part
            })
            .collect();
        for part in &partials {
            dweight.iter_mut().zip(&part[..c]).for_each(|(a, &p)| *a += p);
            dbias.iter_mut().zip(&part[c..]).for_each(|(a, &p)| *a += p);
        }
        Ok(())
    }
}

impl MatmulOps for CpuBackend {
    fn matmul_forward(
        &self,
        out: &mut Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        bias: Option<&Vec<f32>>,
        n: usize,
        ic: usize,
        oc: usize,
        layout: WeightLayout,
    ) -> Result<()> {
        checks::matmul_forward(out.len(), inp.len(), weight.len(), bias.map(Vec::len), n, ic, oc)?;
        if let Some(b) = bias {
            if oc > 0 {
                out.par_chunks_mut(oc).with_min_len(64).for_each(|row| row.copy_from_slice(b));
            }
        }
        // W as a [ic, oc] matrix: element (i, o).
        let w = match layout {
            WeightLayout::InOut => Mat::new(weight.as_ptr(), oc, 1),
            WeightLayout::OutIn => Mat::new(weight.as_ptr(), 1, ic),
        };
        // SAFETY: shapes checked above; `out` is a distinct allocation.
        unsafe {
            gemm_f32(n, oc, ic, out.as_mut_ptr(), oc, bias.is_some(), Mat::new(inp.as_ptr(), ic, 1), w, 1.0, true);
        }
        Ok(())
    }

    // `matmul_bias_gelu_forward` keeps the trait's unfused default. A fusion over row blocks (gemm
    // on 128–2048-row blocks, then the GELU row kernel on each block while it is in L2) gave the
    // same bits but measured no faster (0.90 vs 0.89 ms at 2048 × 128 → 512): the GELU is bound by
    // its arithmetic, not by memory, and each block repacks the weight. (On bits: gemm 0.19's
    // per-row sums do depend on the rows in a call on its one-output-column gemv path, seen in a
    // test, and for k > 512 on its small-matrix blocking of k, by its source; not on its blocked
    // path, where the fusion was bit-identical on odd shapes.)

    /// `dinp`, `dweight` and `dbias` are independent and computed side by side (`rayon::join`), so
    /// that one fills the others' idle moments at gemm's internal barriers; no bits change.
    fn matmul_backward(
        &self,
        dinp: &mut Vec<f32>,
        dweight: &mut Vec<f32>,
        dbias: Option<&mut Vec<f32>>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        n: usize,
        ic: usize,
        oc: usize,
        layout: WeightLayout,
    ) -> Result<()> {
        let dbias_len = dbias.as_ref().map(|db| db.len());
        checks::matmul_backward(dinp.len(), dweight.len(), dbias_len, dout.len(), inp.len(), weight.len(), n, ic, oc)?;
        let dout_m = Mat::new(dout.as_ptr(), oc, 1);
        let inp_m = Mat::new(inp.as_ptr(), ic, 1);
        // dinp[n, ic] = dout[n, oc] · Wᵀ, Wᵀ element (o, i) = W(i, o).
        let wt = match layout {
            WeightLayout::InOut => Mat::new(weight.as_ptr(), 1, oc),
            WeightLayout::OutIn => Mat::new(weight.as_ptr(), ic, 1),
        };
        // dW[ic, oc] += inpᵀ · dout (InOut), or dW[oc, ic] += doutᵀ · inp (OutIn).
        let (w_rows, w_cols, w_lhs, w_rhs) = match layout {
            WeightLayout::InOut => (ic, oc, Mat::new(inp.as_ptr(), 1, ic), dout_m),
            WeightLayout::OutIn => (oc, ic, Mat::new(dout.as_ptr(), 1, oc), inp_m),
        };
        // SAFETY (both products): shapes checked above; destinations are distinct allocations from
        // the sources.
        let dinp_task = || unsafe { gemm_f32(n, ic, oc, dinp.as_mut_ptr(), ic, false, dout_m, wt, 1.0, true) };
        let dweight_task =
            || unsafe { accumulate_weight_grad(w_rows, w_cols, n, dweight.as_mut_ptr(), w_cols, w_lhs, w_rhs) };
        let dbias_task = || {
            if let (Some(db), true) = (dbias, oc > 0) {
                accumulate_column_sums(db, dout, oc);
            }
        };
        rayon::join(dinp_task, || rayon::join(dweight_task, dbias_task));
        Ok(())
    }
}

impl AttentionOps for CpuBackend {
    fn attention_saved_len(&self, packing: &Packing<Self>, n_head: usize) -> usize {
        n_head * packing.host_cu_seqlens.windows(2).map(|w| ((w[1] - w[0]).max(0) as usize).pow(2)).sum::<usize>()
    }

    fn attention_forward(
        &self,
        out: &mut Vec<f32>,
        saved: &mut Vec<f32>,
        qkv: &Vec<f32>,
        packing: &Packing<Self>,
        n_head: usize,
        c: usize,
    ) -> Result<()> {
        let saved_len = self.attention_saved_len(packing, n_head);
        let seqs = checks::attention_forward(
            out.len(),
            saved.len(),
            qkv.len(),
            &packing.host_cu_seqlens,
            n_head,
            c,
            saved_len,
        )?;
        let hd = c / n_head;
        let scale = 1.0 / (hd as f32).sqrt();
        let (out_ptr, saved_ptr) = (SyncPtr(out.as_mut_ptr()), SyncPtr(saved.as_mut_ptr()));
        head_tasks(&seqs, n_head).into_par_iter().for_each(|task| {
            let HeadTask { start, len: t, head, saved_offset } = task;
            // SAFETY: each task writes only its own probability block and the columns of its head
            // in the rows of its sequence; all offsets are in bounds by the length checks above.
            unsafe {
                let q = qkv.as_ptr().add(start * 3 * c + head * hd);
                let k = q.add(c);
                let v = q.add(2 * c);
                let p = saved_ptr.get().add(saved_offset);
                let o = out_ptr.get().add(start * c + head * hd);
                for i0 in (0..t).step_by(ATTN_BLOCK) {
                    let i1 = (i0 + ATTN_BLOCK).min(t);
                    // Scores S[i0..i1, 0..i1] = scale · Q Kᵀ (Kᵀ element (d, j) = K[j, d]).
                    gemm_f32(
                        i1 - i0,
                        i1,
                        hd,
                        p.add(i0 * t),
                        t,
                        false,
                        Mat::new(q.add(i0 * 3 * c), 3 * c, 1),
                        Mat::new(k, 1, 3 * c),
                        scale,
                        false,
                    );
                    for i in i0..i1 {
                        let row = std::slice::from_raw_parts_mut(p.add(i * t), t);
                        let (live, masked) = row.split_at_mut(i + 1);
                        causal_softmax_row(live, masked);
                    }
                    // out[i0..i1] = P[i0..i1, 0..i1] · V[0..i1]
                    gemm_f32(
                        i1 - i0,
                        hd,
                        i1,
                        o.add(i0 * c),
                        c,
                        false,
                        Mat::new(p.add(i0 * t), t, 1),
                        Mat::new(v, 3 * c, 1),
                        1.0,
                        false,
                    );
                }
            }
        });
        Ok(())
    }

    fn attention_backward(
        &self,
        dqkv: &mut Vec<f32>,
        dout: &Vec<f32>,
        qkv: &Vec<f32>,
        out: &Vec<f32>,
        saved: &Vec<f32>,
        packing: &Packing<Self>,
        n_head: usize,
        c: usize,
    ) -> Result<()> {
        let saved_len = self.attention_saved_len(packing, n_head);
        let seqs = checks::attention_backward(
            dqkv.len(),
            dout.len(),
            qkv.len(),
            out.len(),
            saved.len(),
            &packing.host_cu_seqlens,
            n_head,
            c,
            saved_len,
        )?;
        let hd = c / n_head;
        let scale = 1.0 / (hd as f32).sqrt();
        let dqkv_ptr = SyncPtr(dqkv.as_mut_ptr());
        head_tasks(&seqs, n_head).into_par_iter().for_each_init(Vec::<f32>::new, |ds_buf, task| {
            let HeadTask { start, len: t, head, saved_offset } = task;
            if t == 0 {
                return;
            }
            ds_buf.resize(t * t, 0.0);
            let ds = ds_buf.as_mut_ptr();
            // SAFETY: each task writes only the q, k and v columns of its head in the rows of its
            // sequence (and its own scratch); offsets are in bounds by the length checks above.
            unsafe {
                let q = qkv.as_ptr().add(start * 3 * c + head * hd);
                let k = q.add(c);
                let v = q.add(2 * c);
                let dq = dqkv_ptr.get().add(start * 3 * c + head * hd);
                let dk = dq.add(c);
                let dv = dq.add(2 * c);
                let p = saved.as_ptr().add(saved_offset);
                let dy = dout.as_ptr().add(start * c + head * hd);
                // Row blocks last to first: the last block's dK, dV products cover every key, so
                // they overwrite, and the earlier (shorter) blocks accumulate onto them.
                let blocks: Vec<usize> = (0..t).step_by(ATTN_BLOCK).collect();
                for (nth, &i0) in blocks.iter().rev().enumerate() {
                    let i1 = (i0 + ATTN_BLOCK).min(t);
                    let rows = i1 - i0;
                    let first = nth == 0;
                    // dP[i0..i1, 0..i1] = dY Vᵀ
                    gemm_f32(
                        rows,
                        i1,
                        hd,
                        ds.add(i0 * t),
                        t,
                        false,
                        Mat::new(dy.add(i0 * c), c, 1),
                        Mat::new(v, 1, 3 * c),
                        1.0,
                        false,
                    );
                    // dS = P ⊙ (dP − Σ_j P dP), causal part only (the rest of the block row is 0).
                    for i in i0..i1 {
                        let prow = std::slice::from_raw_parts(p.add(i * t), i1);
                        let drow = std::slice::from_raw_parts_mut(ds.add(i * t), i1);
                        softmax_backward_row(&mut drow[..=i], &prow[..=i]);
                        drow[i + 1..].fill(0.0);
                    }
                    let ds_block = ds.add(i0 * t);
                    // dQ[i0..i1] = scale · dS K
                    gemm_f32(
                        rows,
                        hd,
                        i1,
                        dq.add(i0 * 3 * c),
                        3 * c,
                        false,
                        Mat::new(ds_block, t, 1),
                        Mat::new(k, 3 * c, 1),
                        scale,
                        false,
                    );
                    // dK[0..i1] (+)= scale · dSᵀ Q[i0..i1]
                    gemm_f32(
                        i1,
                        hd,
                        rows,
                        dk,
                        3 * c,
                        !first,
                        Mat::new(ds_block, 1, t),
                        Mat::new(q.add(i0 * 3 * c), 3 * c, 1),
                        scale,
                        false,
                    );
                    // dV[0..i1] (+)= Pᵀ dY[i0..i1]
                    gemm_f32(
                        i1,
                        hd,
                        rows,
                        dv,
                        3 * c,
                        !first,
                        Mat::new(p.add(i0 * t), 1, t),
                        Mat::new(dy.add(i0 * c), c, 1),
                        1.0,
                        false,
                    );
                }
            }
        });
        Ok(())
    }
}

impl PointwiseOps for CpuBackend {
    fn gelu_forward(&self, out: &mut Vec<f32>, inp: &Vec<f32>) -> Result<()> {
        checks::gelu_forward(out.len(), inp.len())?;
        out.par_chunks_mut(POINTWISE_CHUNK).zip(inp.par_chunks(POINTWISE_CHUNK)).for_each(|(o, x)| {
            gelu_forward_kernel(o, x);
        });
        Ok(())
    }

    fn gelu_backward(&self, dinp: &mut Vec<f32>, inp: &Vec<f32>, dout: &Vec<f32>) -> Result<()> {
        checks::gelu_backward(dinp.len(), inp.len(), dout.len())?;
        dinp.par_chunks_mut(POINTWISE_CHUNK)
            .zip(inp.par_chunks(POINTWISE_CHUNK).zip(dout.par_chunks(POINTWISE_CHUNK)))
            .for_each(|(dx, (x, dy))| gelu_backward_kernel(dx, x, dy));
        Ok(())
    }

    fn residual_forward(&self, out: &mut Vec<f32>, a: &Vec<f32>, b: &Vec<f32>) -> Result<()> {
        checks::residual_forward(out.len(), a.len(), b.len())?;
        out.par_chunks_mut(POINTWISE_CHUNK)
            .zip(a.par_chunks(POINTWISE_CHUNK).zip(b.par_chunks(POINTWISE_CHUNK)))
            .for_each(|(o, (a, b))| o.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&a, &b))| *o = a + b));
        Ok(())
    }

    fn add_inplace(&self, dst: &mut Vec<f32>, src: &Vec<f32>) -> Result<()> {
        checks::add_inplace(dst.len(), src.len())?;
        dst.par_chunks_mut(POINTWISE_CHUNK)
            .zip(src.par_chunks(POINTWISE_CHUNK))
            .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| *d += s));
        Ok(())
    }

    fn scale(&self, buf: &mut Vec<f32>, s: f32) -> Result<()> {
        buf.par_chunks_mut(POINTWISE_CHUNK).for_each(|b| b.iter_mut().for_each(|x| *x *= s));
        Ok(())
    }
}

impl RowOps for CpuBackend {
    fn gather_rows(
        &self,
        out: &mut Vec<f32>,
        inp: &Vec<f32>,
        rows: &Vec<i32>,
        m: usize,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::gather_rows(out.len(), inp.len(), rows, m, n, c)?;
        out.par_chunks_mut(c).zip(rows.par_iter()).with_min_len(64).for_each(|(dst, &r)| {
            dst.copy_from_slice(&inp[r as usize * c..][..c]);
        });
        Ok(())
    }

    fn scatter_rows(
        &self,
        dinp: &mut Vec<f32>,
        dout: &Vec<f32>,
        rows: &Vec<i32>,
        m: usize,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::scatter_rows(dinp.len(), dout.len(), rows, m, n, c)?;
        // Each output row finds its source by binary search (rows are increasing): one pass that
        // writes every element once.
        dinp.par_chunks_mut(c).enumerate().with_min_len(64).for_each(|(t, dst)| {
            match rows.binary_search(&(t as i32)) {
                Ok(i) => dst.copy_from_slice(&dout[i * c..][..c]),
                Err(_) => dst.fill(0.0),
            }
        });
        Ok(())
    }
}

impl LogSoftmaxGatherOps for CpuBackend {
    fn logsoftmax_gather_forward(
        &self,
        token_logp: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        logits: &Vec<f32>,
        targets: &Vec<i32>,
        n: usize,
        v: usize,
    ) -> Result<()> {
        checks::logsoftmax_gather_forward(token_logp.len(), lse.len(), logits.len(), targets, n, v)?;
        token_logp
            .par_iter_mut()
            .zip(lse.par_iter_mut())
            .zip(logits.par_chunks(v).zip(targets.par_iter()))
            .with_min_len(8)
            .for_each(|((lp, l), (row, &target))| (*l, *lp) = logsoftmax_gather_row(row, target));
        Ok(())
    }

    fn sequence_logp_sum(&self, seq_logp: &mut Vec<f32>, token_logp: &Vec<f32>, packing: &Packing<Self>) -> Result<()> {
        let seqs = checks::sequence_logp_sum(seq_logp.len(), token_logp.len(), &packing.host_cu_seqlens)?;
        // Summed in f64 in token order: fixed, and exact enough to be the reference. From +0 (not
        // `Sum`'s −0), so that an empty sequence gets +0, as on the device.
        for (out, &(start, len)) in seq_logp.iter_mut().zip(&seqs) {
            *out = token_logp[start..start + len].iter().fold(0.0f64, |acc, &x| acc + x as f64) as f32;
        }
        Ok(())
    }

    fn logsoftmax_gather_backward(
        &self,
        logits: &mut Vec<f32>,
        lse: &Vec<f32>,
        targets: &Vec<i32>,
        dseq: &Vec<f32>,
        packing: &Packing<Self>,
        n: usize,
        v: usize,
    ) -> Result<()> {
        checks::logsoftmax_gather_backward(
            logits.len(),
            lse.len(),
            targets,
            dseq.len(),
            &packing.host_cu_seqlens,
            n,
            v,
        )?;
        let cu = &packing.host_cu_seqlens;
        logits.par_chunks_mut(v).enumerate().with_min_len(8).for_each(|(t, row)| {
            let target = targets[t];
            if target < 0 {
                row.fill(0.0);
                return;
            }
            // The sequence holding token t: the last s with cu[s] <= t (empty sequences skipped).
            let s = cu.partition_point(|&start| start as usize <= t) - 1;
            logsoftmax_gather_backward_row(row, target as usize, dseq[s], lse[t]);
        });
        Ok(())
    }
}

impl PreferenceLossOps for CpuBackend {
    fn preference_loss(
        &self,
        metrics: &mut Vec<f32>,
        dpolicy: &mut Vec<f32>,
        policy: &Vec<f32>,
        reference: &Vec<f32>,
        unsafe_flags: &Vec<i32>,
        lengths: &Vec<i32>,
        objective: &Objective,
        grad_scale: f32,
    ) -> Result<()> {
        let uses_reference = objective.uses_reference();
        let pairs = checks::preference_loss(
            metrics.len(),
            dpolicy.len(),
            policy.len(),
            reference.len(),
            unsafe_flags,
            lengths,
            uses_reference,
        )?;
        for i in 0..pairs {
            let (c, r) = (2 * i, 2 * i + 1);
            let reference_of = |s: usize| if uses_reference { reference[s] as f64 } else { 0.0 };
            let out = pair_loss(
                objective,
                &PairInput {
                    policy_chosen: policy[c] as f64,
                    policy_rejected: policy[r] as f64,
                    ref_chosen: reference_of(c),
                    ref_rejected: reference_of(r),
                    chosen_unsafe: unsafe_flags[c] != 0,
                    rejected_unsafe: unsafe_flags[r] != 0,
                    chosen_len: lengths[c] as u32,
                    rejected_len: lengths[r] as u32,
                },
            );
            metrics[i * PAIR_METRICS..(i + 1) * PAIR_METRICS].copy_from_slice(&[
                out.loss as f32,
                out.reward_chosen as f32,
                out.reward_rejected as f32,
                out.margin as f32,
                out.accuracy as f32,
            ]);
            dpolicy[c] = (grad_scale as f64 * out.d_policy_chosen) as f32;
            dpolicy[r] = (grad_scale as f64 * out.d_policy_rejected) as f32;
        }
        Ok(())
    }
}

impl OptimizerOps for CpuBackend {
    fn adamw(
        &self,
        param: &mut Vec<f32>,
        grad: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        p: &AdamWParams,
    ) -> Result<()> {
        checks::adamw(param.len(), grad.len(), m.len(), v.len(), p.step)?;
        // Bias corrections in f64 (as PyTorch computes them in Python floats).
        let bc1 = 1.0 - (p.beta1 as f64).powi(p.step as i32);
        let bc2 = 1.0 - (p.beta2 as f64).powi(p.step as i32);
        let k = AdamWStep {
            beta1: p.beta1,
            beta2: p.beta2,
            eps: p.eps,
            grad_scale: p.grad_scale,
            decay: p.lr * p.weight_decay,
            step_size: (p.lr as f64 / bc1) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
        };
        param
            .par_chunks_mut(POINTWISE_CHUNK)
            .zip(grad.par_chunks(POINTWISE_CHUNK))
            .zip(m.par_chunks_mut(POINTWISE_CHUNK).zip(v.par_chunks_mut(POINTWISE_CHUNK)))
            .for_each(|((w, g), (m, v))| adamw_kernel(w, g, m, v, k));
        Ok(())
    }

    fn sgd(&self, param: &mut Vec<f32>, grad: &Vec<f32>, lr: f32, grad_scale: f32) -> Result<()> {
        checks::sgd(param.len(), grad.len())?;
        let step = lr * grad_scale;
        param
            .par_chunks_mut(POINTWISE_CHUNK)
            .zip(grad.par_chunks(POINTWISE_CHUNK))
            .for_each(|(w, g)| w.iter_mut().zip(g).for_each(|(w, &g)| *w -= step * g));
        Ok(())
    }
}

impl GradNormOps for CpuBackend {
    fn sum_squares(&self, bufs: &[&Vec<f32>]) -> Result<f64> {
        // Fixed chunks, each summed in f64, partials added in order: deterministic.
        let mut total = 0.0f64;
        for buf in bufs {
            let partials: Vec<f64> = buf
                .par_chunks(POINTWISE_CHUNK)
                .map(|chunk| chunk.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .collect();
            total += partials.iter().sum::<f64>();
        }
        Ok(total)
    }
}

/// `dtable[ids[t]] += dout[t]` for every row t, deterministically: tokens are bucketed by id
/// (a counting sort that keeps token order), then each table row is owned by one task that adds
/// its tokens in order.
fn scatter_add_rows(dtable: &mut [f32], dout: &[f32], ids: &[i32], c: usize) {
    let rows = dtable.len() / c;
    let mut bucket_start = vec![0u32; rows + 1];
    for &id in ids {
        bucket_start[id as usize + 1] += 1;
    }
    for r in 0..rows {
        bucket_start[r + 1] += bucket_start[r];
    }
    let mut fill = bucket_start.clone();
    let mut order = vec![0u32; ids.len()];
    for (t, &id) in ids.iter().enumerate() {
        order[fill[id as usize] as usize] = t as u32;
        fill[id as usize] += 1;
    }
    dtable.par_chunks_mut(c).enumerate().with_min_len(64).for_each(|(r, drow)| {
        for &t in &order[bucket_start[r] as usize..bucket_start[r + 1] as usize] {
            let src = &dout[t as usize * c..][..c];
            drow.iter_mut().zip(src).for_each(|(d, &s)| *d += s);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// Caps `simd_level` on this thread (`None`: no cap).
        pub(super) static SIMD_CAP: Cell<Option<SimdLevel>> = const { Cell::new(None) };
    }

    /// Runs `f` with the portable kernels, with at most AVX2, and with the dispatched (widest) ones;
    /// checks that the AVX2 result equals the portable one bit for bit and returns
    /// `(portable, dispatched)`.
    fn both_paths(f: impl Fn() -> Vec<f32>) -> (Vec<f32>, Vec<f32>) {
        SIMD_CAP.with(|p| p.set(Some(SimdLevel::Portable)));
        let portable = f();
        SIMD_CAP.with(|p| p.set(Some(SimdLevel::Avx2)));
        let avx2 = f();
        SIMD_CAP.with(|p| p.set(None));
        assert_same_bits("AVX2 kernels", &portable, &avx2);
        (portable, f())
    }

    fn assert_same_bits(what: &str, a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert_eq!(x.to_bits(), y.to_bits(), "{what}[{i}]: portable {x} vs dispatched {y}");
        }
    }

    /// Deterministic pseudo-random values in [-scale, scale).
    fn values(len: usize, seed: u32, scale: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
                ((state >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    #[test]
    fn weight_gradients_split_by_shape_within_the_scratch_bound() {
        assert_eq!(weight_grad_parts(128, 384, 2048), 4, "the step's QKV weight gradient");
        assert_eq!(weight_grad_parts(128, 384, 1023), 1, "under two parts' worth of tokens");
        assert_eq!(weight_grad_parts(64, 64, 1 << 20), WGRAD_MAX_PARTS);
        // GPT-2 small's MLP weight: 2.4 M elements, so one scratch partial at most.
        assert_eq!(weight_grad_parts(768, 3072, 8192), 2);
        assert_eq!(weight_grad_parts(4096, 4096, 8192), 1);
    }

    #[test]
    fn resize_grows_to_exactly_the_length_asked_and_keeps_storage_when_shrinking() {
        let b = CpuBackend::new();
        let mut buf = b.zeros(1000).unwrap();
        for len in [1001, 1500, 2500, 4097] {
            b.resize(&mut buf, len).unwrap();
            assert_eq!((buf.len(), buf.capacity()), (len, len), "growing to {len}");
        }
        b.resize(&mut buf, 10).unwrap();
        b.resize(&mut buf, 4000).unwrap();
        assert_eq!((buf.len(), buf.capacity()), (4000, 4097), "a smaller batch reuses the storage");
    }

    #[test]
    fn simd_kernels_are_bit_identical_to_portable_ones() {
        let len = 1037; // not a multiple of any lane count
        let (x, y, w, b) = (values(len, 1, 6.0), values(len, 2, 1.0), values(len, 3, 1.0), values(len, 4, 1.0));

        let (p, d) = both_paths(|| {
            let mut out = vec![0.0; len];
            gelu_forward_kernel(&mut out, &x);
            let mut dx = vec![0.0; len];
            gelu_backward_kernel(&mut dx, &x, &y);
            [out, dx].concat()
        });
        assert_same_bits("gelu", &p, &d);

        let (p, d) = both_paths(|| {
            let mut out = vec![0.0; len];
            let (mean, rstd) = layernorm_row(&mut out, &x, &w, &b, 1e-5);
            let (mut dx, mut dw, mut db) = (y.clone(), vec![0.0; len], vec![0.0; len]);
            layernorm_backward_row(&mut dx, &y, &x, &w, mean, rstd, &mut dw, &mut db);
            [out, dx, dw, db, vec![mean, rstd]].concat()
        });
        assert_same_bits("layernorm", &p, &d);

        let (p, d) = both_paths(|| {
            let (mut residual, mut out) = (vec![0.0; len], vec![0.0; len]);
            let (mean, rstd) = residual_layernorm_row(&mut residual, &mut out, &x, &y, &w, &b, 1e-5);
            [residual, out, vec![mean, rstd]].concat()
        });
        assert_same_bits("residual layernorm", &p, &d);

        let (p, d) = both_paths(|| {
            let (lse, logp) = logsoftmax_gather_row(&x, 17);
            let mut row = x.clone();
            logsoftmax_gather_backward_row(&mut row, 17, 0.7, lse);
            let (mut live, mut masked) = (x[..700].to_vec(), vec![1.0; 5]);
            causal_softmax_row(&mut live, &mut masked);
            let mut dp = y[..700].to_vec();
            softmax_backward_row(&mut dp, &live);
            [row, live, masked, dp, vec![lse, logp]].concat()
        });
        assert_same_bits("softmaxes", &p, &d);

        let (p, d) = both_paths(|| {
            let (mut param, mut m, mut v) = (x.clone(), y.clone(), w.iter().map(|a| a * a).collect::<Vec<_>>());
            let k = AdamWStep {
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                grad_scale: 0.5,
                decay: 1e-4,
                step_size: 1e-3,
                inv_sqrt_bc2: 1.3,
            };
            adamw_kernel(&mut param, &b, &mut m, &mut v, k);
            [param, m, v].concat()
        });
        assert_same_bits("adamw", &p, &d);
    }

    /// `exp_f32` against f64 `exp` over its whole range, on a dense grid and at the edges.
    #[test]
    fn exp_f32_is_accurate_to_two_ulp() {
        let mut worst = 0.0f64;
        let grid = (-2_000_000..=2_000_000).map(|i| i as f32 * 4.36e-5);
        for x in grid.chain([-87.33, -87.336, 88.7, 88.72, 0.0, -0.0, 1e-30, -1e-30]) {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            let rel = (got - want).abs() / want;
            assert!(rel < 2.5e-7, "exp_f32({x}) = {got}, want {want} (relative error {rel:e})");
            worst = worst.max(rel);
        }
        assert!(worst > 0.0);
        assert_eq!(exp_f32(-88.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    /// `gather_rows` copies the chosen rows exactly; `scatter_rows` puts them back and zeroes the
    /// rest, and is its adjoint: `<gather(x), y> = <x, scatter(y)>` (the backward of a linear map).
    #[test]
    fn gather_and_scatter_rows_are_exact_adjoint_copies() {
        let cpu = CpuBackend::new();
        let (n, c) = (23, 5);
        let x = values(n * c, 7, 1.0);
        let some: Vec<i32> = (0..n as i32).filter(|t| t % 3 != 1).collect();
        for rows in [some, vec![], (0..n as i32).collect(), vec![n as i32 - 1]] {
            let m = rows.len();
            let mut gathered = vec![f32::NAN; m * c];
            cpu.gather_rows(&mut gathered, &x, &rows, m, n, c).unwrap();
            for (i, &r) in rows.iter().enumerate() {
                assert_same_bits("gathered row", &gathered[i * c..][..c], &x[r as usize * c..][..c]);
            }
            let y = values(m * c, 8, 1.0);
            let mut scattered = vec![f32::NAN; n * c];
            cpu.scatter_rows(&mut scattered, &y, &rows, m, n, c).unwrap();
            for t in 0..n {
                let want = match rows.iter().position(|&r| r as usize == t) {
                    Some(i) => y[i * c..][..c].to_vec(),
                    None => vec![0.0; c],
                };
                assert_same_bits("scattered row", &scattered[t * c..][..c], &want);
            }
            let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(&p, &q)| p as f64 * q as f64).sum::<f64>();
            let (lhs, rhs) = (dot(&gathered, &y), dot(&x, &scattered));
            assert!((lhs - rhs).abs() <= 1e-12 * (1.0 + lhs.abs()), "adjoint: {lhs} vs {rhs}");
        }
        let mut out = vec![0.0; 2 * c];
        let err = cpu.gather_rows(&mut out, &x, &vec![3, 3], 2, n, c).unwrap_err().to_string();
        assert!(err.contains("strictly increasing"), "{err}");
        let err = cpu.gather_rows(&mut out, &x, &vec![3, n as i32], 2, n, c).unwrap_err().to_string();
        assert!(err.contains("rows[1]"), "{err}");
        let err = cpu.scatter_rows(&mut out, &x[..2 * c].to_vec(), &vec![0, 1], 2, n, c).unwrap_err().to_string();
        assert!(err.contains("scatter_rows") && err.contains("dinp"), "{err}");
    }

    #[test]
    fn lane_sums_match_plain_sums() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let y: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let want_sum: f64 = x.iter().map(|&v| v as f64).sum();
        let want_dot: f64 = x.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
        assert!((lane_sum(&x, |v| v) as f64 - want_sum).abs() < 1e-5);
        assert!((lane_dot(&x, &y) as f64 - want_dot).abs() < 1e-5);
    }
}
