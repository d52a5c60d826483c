//! The `Backend` trait: every op a training step needs, one method per kernel family.
//!
//! The model (`crate::model`) and the trainer (`crate::train`) are written once, generic over
//! `Backend`. Semantics are those of f32 row-major tensors; a backend may store them in another
//! precision (the CUDA backend keeps bf16 activations with fp32 master weights).
//!
//! Conventions every implementation follows:
//! - Tensors are contiguous, row-major, token-major: activations are `[n, c]` with `n` the number of
//!   tokens of the whole packed batch laid end to end.
//! - Sequences are described by `Packing`: `cu_seqlens[s]..cu_seqlens[s+1]` are the tokens of
//!   sequence `s`. Attention never crosses a sequence boundary.
//! - Methods whose doc says "accumulates" add into their output (`+=`); parameter gradients always
//!   accumulate, so gradient accumulation over micro-batches needs no extra op. All others overwrite.
//! - Targets are token ids, `-1` where a position carries no loss (prompt tokens, last token).
//! - Every method is deterministic: the same inputs give bit-identical outputs (no float atomics).

mod checks;
pub mod cpu;
pub mod cuda;

pub use cuda::DeviceKind;

use anyhow::Result;

use crate::loss::Objective;

/// How a weight matrix is laid out in memory, for `matmul_*`.
///
/// HF GPT-2 stores its `Conv1D` weights `[in, out]` (`InOut`); the tied LM head multiplies by the
/// token embedding `wte`, stored `[vocab, c]`, i.e. `[out, in]` (`OutIn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `weight[i * out + o]`
    InOut,
    /// `weight[o * in + i]`
    OutIn,
}

/// The sequence layout of a packed batch, on the device and on the host.
pub struct Packing<B: Backend + ?Sized> {
    /// `[S + 1]` sequence start offsets, device copy.
    pub cu_seqlens: B::Ids,
    /// The same offsets on the host (launch planning, CPU loops).
    pub host_cu_seqlens: Vec<i32>,
    /// Length of the longest sequence.
    pub max_seqlen: usize,
}

impl<B: Backend + ?Sized> Packing<B> {
    pub fn new(backend: &B, cu_seqlens: &[i32]) -> Result<Self> {
        anyhow::ensure!(!cu_seqlens.is_empty() && cu_seqlens[0] == 0, "cu_seqlens must start at 0");
        let max_seqlen = cu_seqlens.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
        Ok(Self { cu_seqlens: backend.upload_ids(cu_seqlens)?, host_cu_seqlens: cu_seqlens.to_vec(), max_seqlen })
    }
    /// Number of sequences.
    pub fn num_seqs(&self) -> usize {
        self.host_cu_seqlens.len() - 1
    }
    /// Total number of tokens.
    pub fn num_tokens(&self) -> usize {
        *self.host_cu_seqlens.last().unwrap() as usize
    }
}

/// Number of float outputs per pair written by `preference_loss` into its `metrics` buffer, in this
/// order: loss, chosen reward, rejected reward, margin (chosen − rejected reward), accuracy (1 when
/// the chosen reward exceeds the rejected one, else 0).
pub const PAIR_METRICS: usize = 5;

/// Device memory held by a backend's allocations, in bytes (what `safedpo bench` reports as peak
/// memory on a device; the CPU backend reports none and the bench falls back to the process RSS).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes allocated now.
    pub current_bytes: u64,
    /// Most bytes allocated at once since the backend was made or `reset_peak_memory` was called.
    pub peak_bytes: u64,
}

/// Hyper-parameters of one AdamW update (decoupled weight decay, bias-corrected moments).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub step: u32,
    /// Multiplies the gradient before use (grad-norm clipping folded in).
    pub grad_scale: f32,
}

pub trait Backend: Send + Sync {
    /// A float tensor (f32 semantics).
    type Buf: Send + Sync;
    /// An i32 tensor (token ids, targets, offsets, flags).
    type Ids: Send + Sync;

    /// Human-readable name, e.g. "cpu (2 threads)" or "cuda:0 NVIDIA H100 (bf16)".
    fn name(&self) -> String;

    // ---- memory ------------------------------------------------------------------------------
    /// A new buffer of `len` zeros.
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// Uploads a tensor that no optimizer will ever update (a frozen reference model's weights): a
    /// backend with master copies may keep only the storage-precision values. `download` of such a
    /// buffer returns those values.
    fn upload_frozen(&self, data: &[f32]) -> Result<Self::Buf> {
        self.upload(data)
    }
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    fn upload_ids(&self, ids: &[i32]) -> Result<Self::Ids>;
    fn download_ids(&self, ids: &Self::Ids) -> Result<Vec<i32>>;
    /// Number of elements.
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    fn fill(&self, buf: &mut Self::Buf, value: f32) -> Result<()>;
    /// Sets `buf`'s length to `len`, reusing its storage when it is large enough (so a model whose
    /// batches change shape every step does not reallocate). Contents are unspecified afterwards.
    fn resize(&self, buf: &mut Self::Buf, len: usize) -> Result<()>;
    /// `dst = src` (same length).
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf) -> Result<()>;
    /// Waits for all queued work (no-op on the CPU).
    fn synchronize(&self) -> Result<()>;
    /// Bytes this backend's buffers hold on its device, now and at the peak; `None` where the
    /// backend does not count them (the CPU: its buffers are the process's heap).
    fn memory_stats(&self) -> Option<MemoryStats> {
        None
    }
    /// Restarts the peak of `memory_stats` from the current allocation.
    fn reset_peak_memory(&self) {}

    // ---- encoder -----------------------------------------------------------------------------
    /// `out[t, :] = wte[tokens[t], :] + wpe[positions[t], :]`; out `[n, c]`.
    #[allow(clippy::too_many_arguments)]
    fn embedding_forward(
        &self,
        out: &mut Self::Buf,
        tokens: &Self::Ids,
        positions: &Self::Ids,
        wte: &Self::Buf,
        wpe: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()>;
    /// Accumulates `dwte[tokens[t]] += dout[t]`, `dwpe[positions[t]] += dout[t]`, deterministically.
    #[allow(clippy::too_many_arguments)]
    fn embedding_backward(
        &self,
        dwte: &mut Self::Buf,
        dwpe: &mut Self::Buf,
        dout: &Self::Buf,
        tokens: &Self::Ids,
        positions: &Self::Ids,
        n: usize,
        c: usize,
    ) -> Result<()>;

    // ---- layernorm ---------------------------------------------------------------------------
    /// `out = (inp − mean) · rstd · weight + bias` per row; saves `mean [n]` and `rstd [n]`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        bias: &Self::Buf,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()>;
    /// Accumulates into `dinp`, `dweight`, `dbias`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dinp: &mut Self::Buf,
        dweight: &mut Self::Buf,
        dbias: &mut Self::Buf,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()>;

    /// The residual add fused with the next LayerNorm: `residual = a + b`, then `out`, `mean`, `rstd`
    /// as `layernorm_forward` of `residual`. One read of `a` and `b` instead of a write and a re-read
    /// of the residual stream.
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_forward(
        &self,
        residual: &mut Self::Buf,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        weight: &Self::Buf,
        bias: &Self::Buf,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        self.residual_forward(residual, a, b)?;
        self.layernorm_forward(out, mean, rstd, residual, weight, bias, n, c, eps)
    }

    // ---- matmul ------------------------------------------------------------------------------
    /// `out[n, oc] = inp[n, ic] · W (+ bias[oc])`, W laid out as `layout` says. Overwrites `out`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_forward(
        &self,
        out: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        bias: Option<&Self::Buf>,
        n: usize,
        ic: usize,
        oc: usize,
        layout: WeightLayout,
    ) -> Result<()>;
    /// `pre = inp · W + bias` (InOut layout) and `out = gelu(pre)` (tanh form), as `matmul_forward`
    /// then `gelu_forward`; a backend may fuse the GELU into the product's epilogue (cuBLASLt
    /// `GELU_AUX_BIAS`), computing it from the f32 accumulator before `pre` is rounded to storage.
    #[allow(clippy::too_many_arguments)]
    fn matmul_bias_gelu_forward(
        &self,
        pre: &mut Self::Buf,
        out: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        bias: &Self::Buf,
        n: usize,
        ic: usize,
        oc: usize,
    ) -> Result<()> {
        self.matmul_forward(pre, inp, weight, Some(bias), n, ic, oc, WeightLayout::InOut)?;
        self.gelu_forward(out, pre)
    }
    /// Overwrites `dinp [n, ic]`; accumulates into `dweight` (same layout as `weight`) and `dbias`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward(
        &self,
        dinp: &mut Self::Buf,
        dweight: &mut Self::Buf,
        dbias: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        n: usize,
        ic: usize,
        oc: usize,
        layout: WeightLayout,
    ) -> Result<()>;

    // ---- attention ---------------------------------------------------------------------------
    /// Length of the buffer `attention_forward` saves for the backward (backend-specific: the CPU
    /// keeps the probabilities, `n_head · Σ T_s²`; a flash-style kernel keeps only `n_head · n` lse).
    fn attention_saved_len(&self, packing: &Packing<Self>, n_head: usize) -> usize;
    /// Causal multi-head self-attention inside each sequence. `qkv [n, 3c]` holds q, k, v side by
    /// side (HF `c_attn` output); writes `out [n, c]` (heads concatenated) and `saved`.
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        saved: &mut Self::Buf,
        qkv: &Self::Buf,
        packing: &Packing<Self>,
        n_head: usize,
        c: usize,
    ) -> Result<()>;
    /// Overwrites `dqkv [n, 3c]`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dqkv: &mut Self::Buf,
        dout: &Self::Buf,
        qkv: &Self::Buf,
        out: &Self::Buf,
        saved: &Self::Buf,
        packing: &Packing<Self>,
        n_head: usize,
        c: usize,
    ) -> Result<()>;

    // ---- pointwise ---------------------------------------------------------------------------
    /// GELU, tanh form (HF `gelu_new`). Overwrites `out`.
    fn gelu_forward(&self, out: &mut Self::Buf, inp: &Self::Buf) -> Result<()>;
    /// Overwrites `dinp = dout · gelu'(inp)`.
    fn gelu_backward(&self, dinp: &mut Self::Buf, inp: &Self::Buf, dout: &Self::Buf) -> Result<()>;
    /// `out = a + b`.
    fn residual_forward(&self, out: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf) -> Result<()>;
    /// `dst += src`.
    fn add_inplace(&self, dst: &mut Self::Buf, src: &Self::Buf) -> Result<()>;
    /// `buf *= s`.
    fn scale(&self, buf: &mut Self::Buf, s: f32) -> Result<()>;

    // ---- row selection -----------------------------------------------------------------------
    // The LM head runs only on the rows that carry a target: the model gathers those rows of the
    // final LayerNorm's output before the head and scatters their gradient back after it.

    /// `out[i, :] = inp[rows[i], :]` for `i < m`: `out [m, c]`, `inp [n, c]`, `rows [m]`. Overwrites
    /// `out` with an exact copy of the selected rows (no rounding: `out` takes `inp`'s storage
    /// precision). `rows` are distinct and increasing, each in `0..n` (checked on the host).
    fn gather_rows(
        &self,
        out: &mut Self::Buf,
        inp: &Self::Buf,
        rows: &Self::Ids,
        m: usize,
        n: usize,
        c: usize,
    ) -> Result<()>;
    /// The backward of `gather_rows`: overwrites `dinp [n, c]` with zeros, except
    /// `dinp[rows[i], :] = dout[i, :]` for `i < m` (an exact copy, in `dout`'s storage precision);
    /// `dout [m, c]`. `rows` as for `gather_rows` (distinct, so no two rows land on one: no
    /// accumulation, deterministic). `m = 0` zeroes `dinp`.
    fn scatter_rows(
        &self,
        dinp: &mut Self::Buf,
        dout: &Self::Buf,
        rows: &Self::Ids,
        m: usize,
        n: usize,
        c: usize,
    ) -> Result<()>;

    // ---- fused log-softmax-gather ------------------------------------------------------------
    /// For each row t of `logits [n, v]`: `lse[t] = log Σ exp(logits[t])`, and
    /// `token_logp[t] = logits[t, targets[t]] − lse[t]`, or 0 where `targets[t] == -1`. Reads each
    /// row once (online max and sum-exp).
    #[allow(clippy::too_many_arguments)]
    fn logsoftmax_gather_forward(
        &self,
        token_logp: &mut Self::Buf,
        lse: &mut Self::Buf,
        logits: &Self::Buf,
        targets: &Self::Ids,
        n: usize,
        v: usize,
    ) -> Result<()>;
    /// `seq_logp[s] = Σ_{t in seq s} token_logp[t]`, a deterministic segmented sum (fixed order).
    fn sequence_logp_sum(
        &self,
        seq_logp: &mut Self::Buf,
        token_logp: &Self::Buf,
        packing: &Packing<Self>,
    ) -> Result<()>;
    /// In place over `logits`: row t of sequence s becomes
    /// `dseq[s] · (onehot(targets[t]) − exp(logits[t] − lse[t]))`, or zeros where `targets[t] == -1`.
    #[allow(clippy::too_many_arguments)]
    fn logsoftmax_gather_backward(
        &self,
        logits: &mut Self::Buf,
        lse: &Self::Buf,
        targets: &Self::Ids,
        dseq: &Self::Buf,
        packing: &Packing<Self>,
        n: usize,
        v: usize,
    ) -> Result<()>;

    // ---- preference loss ---------------------------------------------------------------------
    /// One call for the batch of P pairs. Sequence `2i` is pair i's chosen response, `2i + 1` its
    /// rejected one. Inputs `[2P]`: policy and reference sequence log-probs, `unsafe_flags` (1 =
    /// unsafe), `lengths` (response tokens). Writes `metrics [P, PAIR_METRICS]` (see
    /// `PAIR_METRICS`) and `dpolicy [2P]` = `grad_scale · dL_i/d(policy logp)`. `reference` is
    /// ignored by reference-free objectives. The CPU twin is `crate::loss::pair_loss`.
    #[allow(clippy::too_many_arguments)]
    fn preference_loss(
        &self,
        metrics: &mut Self::Buf,
        dpolicy: &mut Self::Buf,
        policy: &Self::Buf,
        reference: &Self::Buf,
        unsafe_flags: &Self::Ids,
        lengths: &Self::Ids,
        objective: &Objective,
        grad_scale: f32,
    ) -> Result<()>;

    // ---- optimizer ---------------------------------------------------------------------------
    /// One AdamW step on one tensor; `m`, `v` are fp32 state of the same length.
    fn adamw(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        p: &AdamWParams,
    ) -> Result<()>;
    /// `param −= lr · grad_scale · grad`.
    fn sgd(&self, param: &mut Self::Buf, grad: &Self::Buf, lr: f32, grad_scale: f32) -> Result<()>;
    /// `Σ x²` over all the buffers, accumulated in f64 on the host side of the reduction (or a
    /// deterministic two-pass tree on a device). Returns the squared global norm.
    fn sum_squares(&self, bufs: &[&Self::Buf]) -> Result<f64>;
}
