//! GPT-2 forward and backward over a packed batch, generic over the backend.
//!
//! The model reads like llm.c's `gpt2_forward` / `gpt2_backward`: pre-LayerNorm blocks
//! (`x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`), a final LayerNorm, and the LM head tied to the
//! token embedding, followed by the fused log-softmax-gather that turns logits into per-sequence
//! log-probs. Every tensor is token-major over the whole packed batch; attention alone looks at
//! the sequence boundaries. The LM head, the largest product and the largest activation, runs only
//! on the rows that carry a target (`DeviceBatch::target_rows`): the trunk's last output is gathered
//! to those rows before the head, and their gradient scattered back after it.
//!
//! Activation buffers are kept between batches and resized in place when a batch's shape changes
//! (see `ensure_activations`).
//!
//! A model is either trainable (`from_host`, `load`, `random`: gradients, every layer's activations
//! kept for the backward) or frozen (`from_host_frozen`, `load_frozen`: inference only, for the
//! reference model, evaluation and generation). A frozen model uploads its weights with
//! `Backend::upload_frozen` (no fp32 master copy on a bf16 device), holds no gradient and no backward
//! scratch, and keeps the activations of two layers only, recycled: layer `l` writes slot `l % 2` and
//! reads its input from the other slot. Its forward runs the same ops on the same values as a
//! trainable model's, so the log-probs are bit-identical; what it saves is (L − 2) layers of
//! activations and a gradient per parameter.
//!
//! A frozen model also runs its LM head in chunks of whole sequences, about
//! [`FROZEN_HEAD_CHUNK_ROWS`] target rows at a time (`Gpt2::set_head_chunk_rows`): nothing reads its
//! logits after the log-probs, so it holds the `[rows, V]` logits of one chunk instead of the batch's
//! (at GPT-2's vocabulary, 2048 rows are 0.2 GB in bf16, where a batch of 12k target rows would hold
//! 1.2 GB). Each sequence's log-prob is still one `sequence_logp_sum` over the same rows, so it is
//! unchanged bit for bit.

use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{checkpoint, Gpt2Config, HostWeights};
use crate::backend::{Backend, Buffers, Packing, WeightLayout};
use crate::data::PackedBatch;

/// A packed batch uploaded to a backend.
///
/// Only the rows with a target (response tokens) go through the LM head: prompt tokens and each
/// sequence's last token carry no loss, and skipping them saves their share of the head's products
/// and of the `[rows, V]` logits. The upload works out those rows on the host, once per batch.
pub struct DeviceBatch<B: Backend> {
    pub tokens: B::Ids,
    pub positions: B::Ids,
    pub packing: Packing<B>,
    /// `[M]` the tokens t with `targets[t] != -1`, increasing: the rows of the LM head.
    pub target_rows: B::Ids,
    /// `[M]` the targets of those rows (none is −1).
    pub row_targets: B::Ids,
    /// The sequences over the LM head's rows: `cu_seqlens` counts each sequence's target rows (a
    /// sequence without any is empty, and its log-prob is 0).
    pub row_packing: Packing<B>,
    /// Largest token id, position and target of the batch, checked against the model's vocabulary
    /// and context length before a forward (on the host, so no device read-back is needed).
    pub max_token: usize,
    pub max_position: usize,
    pub max_target: i32,
    /// Host copies of `target_rows` and `row_targets`, from which a frozen model's head chunks are
    /// planned (8 bytes per target row).
    host_target_rows: Vec<i32>,
    host_row_targets: Vec<i32>,
    /// The head chunks the last frozen model asked for, planned and uploaded on its first forward
    /// of this batch, so that a batch run again (the bench cycles through its batches) plans and
    /// uploads nothing more. Never built for a trainable model.
    head_chunks: Mutex<Option<Arc<HeadChunks<B>>>>,
}

impl<B: Backend> DeviceBatch<B> {
    /// Checks the batch is well formed (consistent lengths, non-decreasing offsets, no negative ids or
    /// positions, targets ≥ −1) and uploads it.
    pub fn upload(backend: &B, batch: &PackedBatch) -> Result<Self> {
        let n = batch.tokens.len();
        ensure!(
            batch.positions.len() == n && batch.targets.len() == n,
            "packed batch: {n} tokens but {} positions and {} targets",
            batch.positions.len(),
            batch.targets.len()
        );
        ensure!(batch.cu_seqlens.len() >= 2, "packed batch: no sequences");
        ensure!(
            *batch.cu_seqlens.last().unwrap() as usize == n,
            "packed batch: cu_seqlens ends at {} but there are {n} tokens",
            batch.cu_seqlens.last().unwrap()
        );
        if let Some(s) = batch.cu_seqlens.windows(2).position(|w| w[1] < w[0]) {
            anyhow::bail!("packed batch: cu_seqlens decreases at sequence {s} ({:?})", &batch.cu_seqlens[s..s + 2]);
        }
        if let Some(i) = batch.tokens.iter().position(|&t| t < 0) {
            anyhow::bail!("packed batch: token {i} has negative id {}", batch.tokens[i]);
        }
        if let Some(i) = batch.positions.iter().position(|&p| p < 0) {
            anyhow::bail!("packed batch: token {i} has negative position {}", batch.positions[i]);
        }
        if let Some(i) = batch.targets.iter().position(|&t| t < -1) {
            anyhow::bail!("packed batch: token {i} has target {} (expected a token id or -1)", batch.targets[i]);
        }
        let target_rows: Vec<i32> = (0..n as i32).filter(|&t| batch.targets[t as usize] != -1).collect();
        let row_targets: Vec<i32> = target_rows.iter().map(|&t| batch.targets[t as usize]).collect();
        // Target rows before each sequence boundary: the boundaries of the compact rows.
        let row_cu_seqlens: Vec<i32> =
            batch.cu_seqlens.iter().map(|&start| target_rows.partition_point(|&t| t < start) as i32).collect();
        Ok(Self {
            tokens: backend.upload_ids(&batch.tokens)?,
            positions: backend.upload_ids(&batch.positions)?,
            packing: Packing::new(backend, &batch.cu_seqlens)?,
            target_rows: backend.upload_ids(&target_rows)?,
            row_targets: backend.upload_ids(&row_targets)?,
            row_packing: Packing::new(backend, &row_cu_seqlens)?,
            max_token: batch.tokens.iter().copied().max().unwrap_or(0) as usize,
            max_position: batch.positions.iter().copied().max().unwrap_or(0) as usize,
            max_target: batch.targets.iter().copied().max().unwrap_or(-1),
            host_target_rows: target_rows,
            host_row_targets: row_targets,
            head_chunks: Mutex::new(None),
        })
    }
    pub fn num_tokens(&self) -> usize {
        self.packing.num_tokens()
    }
    pub fn num_seqs(&self) -> usize {
        self.packing.num_seqs()
    }
    /// Number of tokens with a target: the rows of the LM head.
    pub fn num_target_rows(&self) -> usize {
        self.row_packing.num_tokens()
    }

    /// The LM head's rows split into chunks of whole sequences of about `max_rows` rows (see
    /// [`plan_head_chunks`]), on the device; planned and uploaded once per batch and `max_rows`.
    fn head_chunks(&self, backend: &B, max_rows: usize) -> Result<Arc<HeadChunks<B>>> {
        let mut cached = self.head_chunks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(chunks) = cached.as_ref().filter(|c| c.max_rows == max_rows) {
            return Ok(chunks.clone());
        }
        let row_cu = &self.row_packing.host_cu_seqlens;
        let mut chunks = Vec::new();
        for seqs in plan_head_chunks(row_cu, max_rows) {
            let rows = row_cu[seqs.start] as usize..row_cu[seqs.end] as usize;
            // Every sequence of the batch, those outside the chunk empty (log-prob +0), so that the
            // chunk's sums land at their sequences' indices.
            let (start, end) = (rows.start as i32, rows.end as i32);
            let cu_seqlens: Vec<i32> = row_cu.iter().map(|&r| r.clamp(start, end) - start).collect();
            let mut packing = Packing::new(backend, &cu_seqlens)?;
            // The batch's longest sequence, not the chunk's: `sequence_logp_sum` then launches as for
            // the whole head, and sums each sequence in the same order.
            packing.max_seqlen = self.row_packing.max_seqlen;
            chunks.push(HeadChunk {
                num_rows: rows.len(),
                target_rows: backend.upload_ids(&self.host_target_rows[rows.clone()])?,
                row_targets: backend.upload_ids(&self.host_row_targets[rows])?,
                packing,
            });
        }
        // Largest first: the head's buffers take their size on the first chunk and only shrink
        // after it (no reallocation, and no zero-fill of a CPU buffer growing back).
        chunks.sort_by_key(|chunk| std::cmp::Reverse(chunk.num_rows));
        let chunks = Arc::new(HeadChunks { max_rows, chunks });
        *cached = Some(chunks.clone());
        Ok(chunks)
    }
}

/// Target rows a frozen model's LM head computes at once, unless set otherwise
/// ([`Gpt2::set_head_chunk_rows`]). 2048 rows keep the product large enough to run at full speed
/// (2048 × 768 × 50257 for GPT-2), with logits of 206 MB in bf16 (412 MB in f32).
pub const FROZEN_HEAD_CHUNK_ROWS: usize = 2048;

/// The fewest rows a chunk of the head has (unless the whole batch has fewer), whatever the chunk
/// size: matrix-product libraries take other kernels for very thin products (the CPU's `gemm` a
/// matrix-vector kernel for one row, a dot-product kernel while rows × V ≤ 256), which sum in
/// another order; chunks of at least this many rows stay on the kernel of the whole head.
pub const MIN_HEAD_CHUNK_ROWS: usize = 16;

/// Splits the sequences over the LM head's rows (`row_cu_seqlens`, as in `DeviceBatch::row_packing`)
/// into consecutive chunks of whole sequences, returned as ranges of sequence indices covering every
/// sequence once. A chunk closes before the sequence that would take it past `max_rows` rows, once
/// it has [`MIN_HEAD_CHUNK_ROWS`] rows; a last chunk with fewer joins the one before. So a chunk has
/// fewer than `max(max_rows, longest sequence) + 2 · MIN_HEAD_CHUNK_ROWS` rows, and a sequence
/// longer than `max_rows` gets a chunk of its own (with at most a few short neighbours).
pub fn plan_head_chunks(row_cu_seqlens: &[i32], max_rows: usize) -> Vec<Range<usize>> {
    let min_rows = MIN_HEAD_CHUNK_ROWS;
    let num_seqs = row_cu_seqlens.len().saturating_sub(1);
    let mut chunks = Vec::new();
    let (mut start, mut rows) = (0, 0);
    for s in 0..num_seqs {
        let len = (row_cu_seqlens[s + 1] - row_cu_seqlens[s]) as usize;
        if rows >= min_rows && rows + len > max_rows {
            chunks.push(start..s);
            (start, rows) = (s, 0);
        }
        rows += len;
    }
    if num_seqs > 0 {
        match chunks.last_mut() {
            Some(previous) if rows < min_rows => previous.end = num_seqs,
            _ => chunks.push(start..num_seqs),
        }
    }
    chunks
}

/// A frozen model's LM head in chunks (see [`plan_head_chunks`]), largest first.
struct HeadChunks<B: Backend> {
    /// The chunk size they were planned for.
    max_rows: usize,
    chunks: Vec<HeadChunk<B>>,
}

/// One chunk of the LM head: some consecutive sequences' target rows.
struct HeadChunk<B: Backend> {
    num_rows: usize,
    /// `[rows]` the chunk's slice of `DeviceBatch::target_rows` and of `row_targets`.
    target_rows: B::Ids,
    row_targets: B::Ids,
    /// Every sequence of the batch over the chunk's rows: the chunk's own sequences count their
    /// rows, all the others are empty.
    packing: Packing<B>,
}

/// The parameters of one transformer block, in HF order (`h.N.*`). Also used for their gradients.
struct BlockParams<T> {
    ln_1_w: T,
    ln_1_b: T,
    /// `attn.c_attn`: `[C, 3C]` projection to q, k, v side by side.
    c_attn_w: T,
    c_attn_b: T,
    /// `attn.c_proj`: `[C, C]` output projection of the attention.
    c_proj_w: T,
    c_proj_b: T,
    ln_2_w: T,
    ln_2_b: T,
    /// `mlp.c_fc`: `[C, 4C]`.
    c_fc_w: T,
    c_fc_b: T,
    /// `mlp.c_proj`: `[4C, C]`.
    mlp_proj_w: T,
    mlp_proj_b: T,
}

const TENSORS_PER_BLOCK: usize = 12;

impl<T> BlockParams<T> {
    fn from_iter(it: &mut impl Iterator<Item = T>) -> Self {
        let mut next = || it.next().expect("parameter list shorter than the config says");
        Self {
            ln_1_w: next(),
            ln_1_b: next(),
            c_attn_w: next(),
            c_attn_b: next(),
            c_proj_w: next(),
            c_proj_b: next(),
            ln_2_w: next(),
            ln_2_b: next(),
            c_fc_w: next(),
            c_fc_b: next(),
            mlp_proj_w: next(),
            mlp_proj_b: next(),
        }
    }
    fn refs(&self) -> [&T; TENSORS_PER_BLOCK] {
        [
            &self.ln_1_w,
            &self.ln_1_b,
            &self.c_attn_w,
            &self.c_attn_b,
            &self.c_proj_w,
            &self.c_proj_b,
            &self.ln_2_w,
            &self.ln_2_b,
            &self.c_fc_w,
            &self.c_fc_b,
            &self.mlp_proj_w,
            &self.mlp_proj_b,
        ]
    }
    fn refs_mut(&mut self) -> [&mut T; TENSORS_PER_BLOCK] {
        [
            &mut self.ln_1_w,
            &mut self.ln_1_b,
            &mut self.c_attn_w,
            &mut self.c_attn_b,
            &mut self.c_proj_w,
            &mut self.c_proj_b,
            &mut self.ln_2_w,
            &mut self.ln_2_b,
            &mut self.c_fc_w,
            &mut self.c_fc_b,
            &mut self.mlp_proj_w,
            &mut self.mlp_proj_b,
        ]
    }
}

/// Every parameter tensor of the model, one backend buffer each, in the order of
/// [`Gpt2Config::parameter_shapes`]. Also used for the gradients.
struct Params<T> {
    /// `[V, C]` token embedding, also the LM head.
    wte: T,
    /// `[P, C]` position embedding.
    wpe: T,
    blocks: Vec<BlockParams<T>>,
    ln_f_w: T,
    ln_f_b: T,
}

impl<T> Params<T> {
    /// Builds from tensors listed in `parameter_shapes` order.
    fn from_ordered(tensors: Vec<T>, n_layer: usize) -> Self {
        assert_eq!(tensors.len(), 4 + TENSORS_PER_BLOCK * n_layer, "parameter count does not match the config");
        let mut it = tensors.into_iter();
        let wte = it.next().unwrap();
        let wpe = it.next().unwrap();
        let blocks = (0..n_layer).map(|_| BlockParams::from_iter(&mut it)).collect();
        let ln_f_w = it.next().unwrap();
        let ln_f_b = it.next().unwrap();
        Self { wte, wpe, blocks, ln_f_w, ln_f_b }
    }
    fn ordered(&self) -> Vec<&T> {
        let mut v = vec![&self.wte, &self.wpe];
        v.extend(self.blocks.iter().flat_map(|b| b.refs()));
        v.extend([&self.ln_f_w, &self.ln_f_b]);
        v
    }
    fn ordered_mut(&mut self) -> Vec<&mut T> {
        let mut v = vec![&mut self.wte, &mut self.wpe];
        v.extend(self.blocks.iter_mut().flat_map(|b| b.refs_mut()));
        v.extend([&mut self.ln_f_w, &mut self.ln_f_b]);
        v
    }
}

/// What one block's forward keeps for its backward. `[N, ·]` are token-major over the batch.
struct LayerActivations<T> {
    /// `[N, C]` ln_1 output, with its per-row mean and 1/std `[N]`.
    ln_1: T,
    ln_1_mean: T,
    ln_1_rstd: T,
    /// `[N, 3C]` q, k, v.
    qkv: T,
    /// `[N, C]` attention output, heads concatenated (before c_proj).
    atty: T,
    /// Whatever the backend's attention keeps for its backward.
    att_saved: T,
    /// `[N, C]` residual stream after the attention half: `x + c_proj(atty)`.
    residual_2: T,
    ln_2: T,
    ln_2_mean: T,
    ln_2_rstd: T,
    /// `[N, 4C]` c_fc output (GELU input) and the GELU output.
    fch: T,
    fch_gelu: T,
    /// `[N, C]` the block's output: `residual_2 + mlp_proj(fch_gelu)`.
    residual_3: T,
}

/// Forward activations for up to `tokens` tokens (and `saved` floats of attention state per layer).
struct Activations<T> {
    tokens: usize,
    saved: usize,
    /// `[N, C]` token + position embeddings: the input of block 0.
    encoded: T,
    /// One slot per layer in a trainable model; two, recycled, in a frozen one (see [`layer_slots`]).
    layers: Vec<LayerActivations<T>>,
    /// `[N, C]` scratch for the output projections before they join the residual stream.
    proj: T,
    ln_f: T,
    ln_f_mean: T,
    ln_f_rstd: T,
    /// The LM head's buffers are sized by the batch's `M` target rows, not its tokens (`forward`
    /// resizes them), or in a frozen model by its largest head chunk: `[M, C]` the rows of `ln_f`
    /// with a target, the head's input.
    ln_f_rows: T,
    /// `[M, V]` logits of those rows; the backward overwrites them with their gradient.
    logits: T,
    /// `[M]` log-prob of each target and each row's log-sum-exp.
    token_logp: T,
    lse: T,
    /// `[S]` one head chunk's sequence log-probs (a frozen model's chunked head only), before they
    /// are added to the batch's.
    chunk_seq_logp: T,
}

/// Activation gradients of the backward, for up to `tokens` tokens. Allocated on the first
/// backward only, so a model used for inference (the reference) never holds them.
struct BackwardScratch<T> {
    tokens: usize,
    /// `[N, C]` dL/d(residual stream) at the current point of the backward.
    dresidual: T,
    /// `[N, C]` gradient at a LayerNorm output.
    dln: T,
    /// `[N, C]` gradient at the attention output.
    datty: T,
    /// `[N, 3C]`
    dqkv: T,
    /// `[N, 4C]` gradients at the GELU output and input.
    dfch_gelu: T,
    dfch: T,
    /// `[M, C]` gradient at the LM head's input rows (sized by `backward`, like the head's buffers).
    dln_f_rows: T,
}

/// One parameter's HF name, the parameter (mutable, for the optimizer) and its gradient.
pub type ParamAndGrad<'a, B> = (&'a str, &'a mut <B as Buffers>::Buf, &'a <B as Buffers>::Buf);

/// A GPT-2 model on a backend: parameters, their gradients, and the activations of the last
/// forward pass (kept for the backward). A frozen model has no gradients and keeps two layers of
/// activations (see the module documentation).
pub struct Gpt2<B: Backend> {
    backend: Arc<B>,
    config: Gpt2Config,
    /// HF name and shape of each parameter, in `Params::ordered` order.
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    params: Params<B::Buf>,
    /// `None` in a frozen model: it has no gradients, and `backward` refuses to run.
    grads: Option<Params<B::Buf>>,
    acts: Option<Activations<B::Buf>>,
    scratch: Option<BackwardScratch<B::Buf>>,
    /// `[S]` sequence log-probs of the last forward.
    seq_logp: B::Buf,
    /// (tokens, sequences) of the last forward whose activations and logits a backward may use.
    pending_backward: Option<(usize, usize)>,
    /// A frozen model's LM head runs on about this many target rows at a time (see the module
    /// documentation); a trainable model's on all of them, since its backward needs every logit.
    head_chunk_rows: usize,
}

impl<B: Backend> Gpt2<B> {
    /// A trainable model with GPT-2's initialisation (see [`random_weights`]).
    pub fn random(backend: Arc<B>, config: Gpt2Config, seed: u64) -> Result<Self> {
        Self::from_host(backend, &random_weights(config, seed)?)
    }

    /// Uploads host weights as a trainable model; their names and shapes must be exactly those of
    /// their config.
    pub fn from_host(backend: Arc<B>, weights: &HostWeights) -> Result<Self> {
        Self::upload(backend, weights, false)
    }

    /// Uploads host weights as a frozen, inference-only model (see the module documentation).
    pub fn from_host_frozen(backend: Arc<B>, weights: &HostWeights) -> Result<Self> {
        Self::upload(backend, weights, true)
    }

    fn upload(backend: Arc<B>, weights: &HostWeights, frozen: bool) -> Result<Self> {
        weights.validate()?;
        let config = weights.config.clone();
        let (names, shapes): (Vec<String>, Vec<Vec<usize>>) = config.parameter_shapes().into_iter().unzip();
        let mut params = Vec::with_capacity(names.len());
        let mut grads = Vec::with_capacity(if frozen { 0 } else { names.len() });
        for (name, shape) in names.iter().zip(&shapes) {
            let data = &weights.tensors[name].1;
            let param = if frozen { backend.upload_frozen(data) } else { backend.upload(data) };
            params.push(param.with_context(|| format!("uploading `{name}`"))?);
            if !frozen {
                grads.push(
                    backend
                        .zeros(shape.iter().product())
                        .with_context(|| format!("allocating the gradient of `{name}`"))?,
                );
            }
        }
        let seq_logp = backend.zeros(0)?;
        Ok(Self {
            params: Params::from_ordered(params, config.n_layer),
            grads: (!frozen).then(|| Params::from_ordered(grads, config.n_layer)),
            backend,
            config,
            names,
            shapes,
            acts: None,
            scratch: None,
            seq_logp,
            pending_backward: None,
            head_chunk_rows: FROZEN_HEAD_CHUNK_ROWS,
        })
    }

    /// Downloads the parameters.
    pub fn to_host(&self) -> Result<HostWeights> {
        let mut tensors = std::collections::BTreeMap::new();
        for ((name, shape), buf) in self.names.iter().zip(&self.shapes).zip(self.params.ordered()) {
            let mut data = self.backend.download(buf).with_context(|| format!("downloading `{name}`"))?;
            data.truncate(shape.iter().product());
            tensors.insert(name.clone(), (shape.clone(), data));
        }
        Ok(HostWeights { config: self.config.clone(), tensors })
    }

    /// Reads a HF model directory as a trainable model.
    pub fn load(backend: Arc<B>, dir: &Path) -> Result<Self> {
        let weights = checkpoint::load_dir(dir)?;
        Self::from_host(backend, &weights)
    }

    /// Reads a HF model directory as a frozen, inference-only model.
    pub fn load_frozen(backend: Arc<B>, dir: &Path) -> Result<Self> {
        let weights = checkpoint::load_dir(dir)?;
        Self::from_host_frozen(backend, &weights)
    }

    /// Writes a HF model directory, atomically file by file.
    pub fn save(&self, dir: &Path) -> Result<()> {
        checkpoint::save_dir(&self.to_host()?, dir)
    }

    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    pub fn num_params(&self) -> usize {
        self.shapes.iter().map(|s| s.iter().product::<usize>()).sum()
    }

    /// Whether this is a frozen, inference-only model (no gradients, no backward).
    pub fn is_frozen(&self) -> bool {
        self.grads.is_none()
    }

    /// Sets how many target rows a frozen model's LM head computes at once (default
    /// [`FROZEN_HEAD_CHUNK_ROWS`]; chunks hold whole sequences, see [`plan_head_chunks`]). Fewer rows
    /// hold smaller logits; the log-probs are the same bit for bit. An error on a trainable model,
    /// whose backward needs the logits of every row.
    pub fn set_head_chunk_rows(&mut self, rows: usize) -> Result<()> {
        ensure!(rows > 0, "set_head_chunk_rows: a chunk of the LM head needs at least one row");
        ensure!(
            self.is_frozen(),
            "set_head_chunk_rows: only a frozen model computes its LM head in chunks (a trainable model's \
             backward needs the logits of every row)"
        );
        self.head_chunk_rows = rows;
        Ok(())
    }

    /// Target rows a frozen model's LM head computes at once (see `set_head_chunk_rows`).
    pub fn head_chunk_rows(&self) -> usize {
        self.head_chunk_rows
    }

    /// Every buffer the model holds now: parameters, gradients, activations, backward scratch and
    /// the sequence log-probs. For measuring what a model costs (sum `Backend::buf_len`, or bytes
    /// on a backend that says how it stores a buffer).
    pub fn held_buffers(&self) -> Vec<&B::Buf> {
        let mut bufs = self.params.ordered();
        if let Some(grads) = &self.grads {
            bufs.extend(grads.ordered());
        }
        if let Some(acts) = &self.acts {
            bufs.extend(acts.buffers());
        }
        if let Some(scratch) = &self.scratch {
            bufs.extend(scratch.buffers());
        }
        bufs.push(&self.seq_logp);
        bufs
    }

    /// The error of a gradient operation on a frozen model.
    fn ensure_trainable(&self, what: &str) -> Result<()> {
        ensure!(
            !self.is_frozen(),
            "{what}: this model is frozen (loaded for inference: no gradients); load it with `Gpt2::from_host` or \
             `Gpt2::load` to train it"
        );
        Ok(())
    }

    /// HF name and shape of every parameter, in the order of `params_and_grads_mut` and `grads`.
    pub fn parameter_shapes(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.names.iter().map(String::as_str).zip(self.shapes.iter().map(Vec::as_slice))
    }

    /// Forward through the LM head and the fused log-softmax-gather; returns the per-sequence
    /// log-probs `[S]` and keeps what the backward needs.
    pub fn forward(&mut self, batch: &DeviceBatch<B>) -> Result<&B::Buf> {
        self.forward_trunk(batch)?;
        let (n, c, v) = (batch.num_tokens(), self.config.n_embd, self.config.vocab_size);
        let m = batch.num_target_rows();
        let num_seqs = batch.num_seqs();
        // A frozen model keeps none of the logits: a batch with more target rows than a chunk goes
        // through the head chunk by chunk.
        let chunks = if self.is_frozen() && m > self.head_chunk_rows {
            Some(batch.head_chunks(&self.backend, self.head_chunk_rows)?)
        } else {
            None
        };
        let b = &*self.backend;
        let p = &self.params;
        let acts = self.acts.as_mut().expect("forward_trunk allocates the activations");
        if b.buf_len(&self.seq_logp) != num_seqs {
            self.seq_logp = b.zeros(num_seqs)?;
        }

        // The LM head, tied to the token embedding (logits = ln_f · wteᵀ), on the M rows with a
        // target only: the others would be computed to be multiplied by zero.
        let Some(chunks) = chunks else {
            acts.resize_head(b, m, c, v)?;
            if m == 0 {
                // No target in the batch: every sequence log-prob is an empty sum (and no empty
                // product is launched).
                b.fill(&mut self.seq_logp, 0.0)?;
            } else {
                acts.head(b, &p.wte, &batch.target_rows, &batch.row_targets, m, n, c, v)?;
                b.sequence_logp_sum(&mut self.seq_logp, &acts.token_logp, &batch.row_packing)?;
            }
            self.pending_backward = Some((n, num_seqs));
            return Ok(&self.seq_logp);
        };

        // Chunk by chunk. Each chunk's packing holds every sequence, those of other chunks empty, so
        // its sums are each sequence's exact log-prob (the same rows summed as over the whole head)
        // or +0 (an empty sum); the first chunk writes the batch's log-probs, the others add theirs,
        // and x + 0 = x: the result is the whole head's bit for bit. (No sum is −0, which + 0 would
        // turn into +0: sums start from +0.)
        for (i, chunk) in chunks.chunks.iter().enumerate() {
            let rows = chunk.num_rows;
            acts.resize_head(b, rows, c, v)?;
            acts.head(b, &p.wte, &chunk.target_rows, &chunk.row_targets, rows, n, c, v)?;
            if i == 0 {
                b.sequence_logp_sum(&mut self.seq_logp, &acts.token_logp, &chunk.packing)?;
            } else {
                b.resize(&mut acts.chunk_seq_logp, num_seqs)?;
                b.sequence_logp_sum(&mut acts.chunk_seq_logp, &acts.token_logp, &chunk.packing)?;
                b.add_inplace(&mut self.seq_logp, &acts.chunk_seq_logp)?;
            }
        }
        // The buffers keep the largest chunk's size, which is what they hold (a CPU buffer zero-fills
        // when it grows back within its storage: here rather than on the next batch's first chunk).
        acts.resize_head(b, chunks.chunks[0].num_rows, c, v)?;
        // (A frozen model's `backward` refuses before it would read the logits.)
        self.pending_backward = Some((n, num_seqs));
        Ok(&self.seq_logp)
    }

    /// Given dL/d(seq logp) `[S]`, accumulates every parameter gradient. Must follow `forward`
    /// on the same batch.
    pub fn backward(&mut self, batch: &DeviceBatch<B>, dseq: &B::Buf) -> Result<()> {
        self.ensure_trainable("backward")?;
        let (n, num_seqs) = (batch.num_tokens(), batch.num_seqs());
        ensure!(
            self.pending_backward == Some((n, num_seqs)),
            "backward needs a forward on the same batch just before it (this batch: {n} tokens, {num_seqs} sequences; \
             last forward: {:?})",
            self.pending_backward
        );
        ensure!(
            self.backend.buf_len(dseq) == num_seqs,
            "backward: dL/d(seq logp) has {} entries, the batch has {num_seqs} sequences",
            self.backend.buf_len(dseq)
        );
        // The backward overwrites the logits with their gradient: a second backward needs a new forward.
        self.pending_backward = None;
        self.ensure_scratch(n)?;

        let cfg = &self.config;
        let (c, v, nh) = (cfg.n_embd, cfg.vocab_size, cfg.n_head);
        let b = &*self.backend;
        let (p, g) = (&self.params, self.grads.as_mut().expect("ensure_trainable checked"));
        let acts = self.acts.as_mut().expect("a forward allocated the activations");
        let s = self.scratch.as_mut().expect("ensure_scratch allocated the scratch");
        use WeightLayout::InOut;

        // dlogits, in place, then the LM head on the target rows: dL/d(ln_f rows) and the head's
        // share of dL/d(wte); the rows' gradient goes back to its tokens, zeros elsewhere.
        let m = batch.num_target_rows();
        b.resize(&mut s.dln_f_rows, m * c)?;
        if m > 0 {
            b.logsoftmax_gather_backward(
                &mut acts.logits,
                &acts.lse,
                &batch.row_targets,
                dseq,
                &batch.row_packing,
                m,
                v,
            )?;
            b.matmul_backward(
                &mut s.dln_f_rows,
                &mut g.wte,
                None,
                &acts.logits,
                &acts.ln_f_rows,
                &p.wte,
                m,
                c,
                v,
                WeightLayout::OutIn,
            )?;
        }
        b.scatter_rows(&mut s.dln, &s.dln_f_rows, &batch.target_rows, m, n, c)?;
        // LayerNorm backward accumulates into dinp, which is how the residual stream's gradient
        // gathers its two branches below without a separate add.
        b.fill(&mut s.dresidual, 0.0)?;
        let last = &acts.layers.last().expect("n_layer > 0").residual_3;
        b.layernorm_backward(
            &mut s.dresidual,
            &mut g.ln_f_w,
            &mut g.ln_f_b,
            &s.dln,
            last,
            &p.ln_f_w,
            &acts.ln_f_mean,
            &acts.ln_f_rstd,
            n,
            c,
        )?;

        for l in (0..cfg.n_layer).rev() {
            let a = &acts.layers[l];
            let x = if l == 0 { &acts.encoded } else { &acts.layers[l - 1].residual_3 };
            let (w, gw) = (&p.blocks[l], &mut g.blocks[l]);
            // residual_3 = residual_2 + mlp: dresidual flows unchanged to residual_2 and into the MLP.
            b.matmul_backward(
                &mut s.dfch_gelu,
                &mut gw.mlp_proj_w,
                Some(&mut gw.mlp_proj_b),
                &s.dresidual,
                &a.fch_gelu,
                &w.mlp_proj_w,
                n,
                4 * c,
                c,
                InOut,
            )?;
            b.gelu_backward(&mut s.dfch, &a.fch, &s.dfch_gelu)?;
            b.matmul_backward(
                &mut s.dln,
                &mut gw.c_fc_w,
                Some(&mut gw.c_fc_b),
                &s.dfch,
                &a.ln_2,
                &w.c_fc_w,
                n,
                c,
                4 * c,
                InOut,
            )?;
            b.layernorm_backward(
                &mut s.dresidual,
                &mut gw.ln_2_w,
                &mut gw.ln_2_b,
                &s.dln,
                &a.residual_2,
                &w.ln_2_w,
                &a.ln_2_mean,
                &a.ln_2_rstd,
                n,
                c,
            )?;
            // residual_2 = x + attn: the same again for the attention half.
            b.matmul_backward(
                &mut s.datty,
                &mut gw.c_proj_w,
                Some(&mut gw.c_proj_b),
                &s.dresidual,
                &a.atty,
                &w.c_proj_w,
                n,
                c,
                c,
                InOut,
            )?;
            b.attention_backward(&mut s.dqkv, &s.datty, &a.qkv, &a.atty, &a.att_saved, &batch.packing, nh, c)?;
            b.matmul_backward(
                &mut s.dln,
                &mut gw.c_attn_w,
                Some(&mut gw.c_attn_b),
                &s.dqkv,
                &a.ln_1,
                &w.c_attn_w,
                n,
                c,
                3 * c,
                InOut,
            )?;
            b.layernorm_backward(
                &mut s.dresidual,
                &mut gw.ln_1_w,
                &mut gw.ln_1_b,
                &s.dln,
                x,
                &w.ln_1_w,
                &a.ln_1_mean,
                &a.ln_1_rstd,
                n,
                c,
            )?;
        }
        b.embedding_backward(&mut g.wte, &mut g.wpe, &s.dresidual, &batch.tokens, &batch.positions, n, c)?;
        Ok(())
    }

    /// Each parameter tensor with its gradient, in a fixed order, named as in HF (`h.0.attn.c_attn.weight`).
    /// An error on a frozen model.
    pub fn params_and_grads_mut(&mut self) -> Result<Vec<ParamAndGrad<'_, B>>> {
        self.ensure_trainable("params_and_grads_mut")?;
        let grads = self.grads.as_ref().expect("ensure_trainable checked");
        Ok(self
            .names
            .iter()
            .map(String::as_str)
            .zip(self.params.ordered_mut())
            .zip(grads.ordered())
            .map(|((name, param), grad)| (name, param, grad))
            .collect())
    }

    /// Every parameter tensor, in the order of `params_and_grads_mut`.
    pub fn params(&self) -> Vec<&B::Buf> {
        self.params.ordered()
    }

    /// Every gradient tensor, in the order of `params_and_grads_mut`. An error on a frozen model.
    pub fn grads(&self) -> Result<Vec<&B::Buf>> {
        self.ensure_trainable("grads")?;
        Ok(self.grads.as_ref().expect("ensure_trainable checked").ordered())
    }

    /// Sets every gradient to zero. An error on a frozen model.
    pub fn zero_grad(&mut self) -> Result<()> {
        self.ensure_trainable("zero_grad")?;
        for g in self.grads.as_mut().expect("ensure_trainable checked").ordered_mut() {
            self.backend.fill(g, 0.0)?;
        }
        Ok(())
    }

    /// Logits `[V]` at the last position of `tokens` (one sequence), for generation. Only the last
    /// row goes through the LM head. Replaces the activations of any earlier forward.
    pub fn last_logits(&mut self, tokens: &[i32]) -> Result<Vec<f32>> {
        ensure!(!tokens.is_empty(), "last_logits: empty token sequence");
        let mut packed = PackedBatch::default();
        packed.push(tokens, tokens.len());
        let batch = DeviceBatch::upload(&*self.backend, &packed)?;
        self.forward_trunk(&batch)?;
        let (n, c, v) = (tokens.len(), self.config.n_embd, self.config.vocab_size);
        let b = &*self.backend;
        let acts = self.acts.as_ref().expect("forward_trunk allocates the activations");
        let mut last_row = b.zeros(c)?;
        b.gather_rows(&mut last_row, &acts.ln_f, &b.upload_ids(&[n as i32 - 1])?, 1, n, c)?;
        let mut logits = b.zeros(v)?;
        b.matmul_forward(&mut logits, &last_row, &self.params.wte, None, 1, c, v, WeightLayout::OutIn)?;
        b.download(&logits)
    }

    /// Embeddings, the blocks and the final LayerNorm: leaves `acts.ln_f` `[N, C]` for the head.
    fn forward_trunk(&mut self, batch: &DeviceBatch<B>) -> Result<()> {
        self.pending_backward = None;
        let cfg = &self.config;
        let n = batch.num_tokens();
        ensure!(n > 0, "forward: the batch has no tokens");
        ensure!(
            batch.max_position < cfg.n_positions,
            "forward: token position {} is beyond the model's context of {} positions (n_positions)",
            batch.max_position,
            cfg.n_positions
        );
        ensure!(
            batch.max_token < cfg.vocab_size,
            "forward: token id {} is outside the vocabulary of {} tokens",
            batch.max_token,
            cfg.vocab_size
        );
        ensure!(
            batch.max_target < cfg.vocab_size as i32,
            "forward: target id {} is outside the vocabulary of {} tokens",
            batch.max_target,
            cfg.vocab_size
        );
        let saved = self.backend.attention_saved_len(&batch.packing, cfg.n_head);
        self.ensure_activations(n, saved)?;

        let cfg = &self.config;
        let (c, nh, eps) = (cfg.n_embd, cfg.n_head, cfg.layer_norm_epsilon);
        let b = &*self.backend;
        let p = &self.params;
        let acts = self.acts.as_mut().expect("ensure_activations allocated them");
        use WeightLayout::InOut;

        b.embedding_forward(&mut acts.encoded, &batch.tokens, &batch.positions, &p.wte, &p.wpe, n, c)?;
        // Every other LayerNorm is fused with the residual add that produces its input (ln_2 with
        // residual_2; the next block's ln_1, or ln_f, with residual_3). Only block 0's ln_1 reads a
        // tensor that no add produces: the embeddings.
        let (first, w0) = (&mut acts.layers[0], &p.blocks[0]);
        b.layernorm_forward(
            &mut first.ln_1,
            &mut first.ln_1_mean,
            &mut first.ln_1_rstd,
            &acts.encoded,
            &w0.ln_1_w,
            &w0.ln_1_b,
            n,
            c,
            eps,
        )?;
        for l in 0..cfg.n_layer {
            let (x, a) = layer_slots(&mut acts.layers, &acts.encoded, l);
            let w = &p.blocks[l];
            // Attention half: residual_2 = x + c_proj(attention(c_attn(ln_1(x)))); ln_1(x) is
            // already there.
            b.matmul_forward(&mut a.qkv, &a.ln_1, &w.c_attn_w, Some(&w.c_attn_b), n, c, 3 * c, InOut)?;
            b.attention_forward(&mut a.atty, &mut a.att_saved, &a.qkv, &batch.packing, nh, c)?;
            b.matmul_forward(&mut acts.proj, &a.atty, &w.c_proj_w, Some(&w.c_proj_b), n, c, c, InOut)?;
            b.residual_layernorm_forward(
                &mut a.residual_2,
                &mut a.ln_2,
                &mut a.ln_2_mean,
                &mut a.ln_2_rstd,
                x,
                &acts.proj,
                &w.ln_2_w,
                &w.ln_2_b,
                n,
                c,
                eps,
            )?;
            // MLP half: residual_3 = residual_2 + mlp_proj(gelu(c_fc(ln_2(residual_2)))).
            b.matmul_bias_gelu_forward(&mut a.fch, &mut a.fch_gelu, &a.ln_2, &w.c_fc_w, &w.c_fc_b, n, c, 4 * c)?;
            b.matmul_forward(&mut acts.proj, &a.fch_gelu, &w.mlp_proj_w, Some(&w.mlp_proj_b), n, 4 * c, c, InOut)?;
            // residual_3 with the LayerNorm that reads it: the next block's ln_1 (in the next layer's
            // slot; in a frozen model that is the slot of this layer's input x, no longer needed), or
            // ln_f after the last block.
            let slots = acts.layers.len();
            let (a, ln_out, ln_mean, ln_rstd, ln_w, ln_b) = if l + 1 < cfg.n_layer {
                let (a, next) = two_slots_mut(&mut acts.layers, l % slots, (l + 1) % slots);
                let wn = &p.blocks[l + 1];
                (a, &mut next.ln_1, &mut next.ln_1_mean, &mut next.ln_1_rstd, &wn.ln_1_w, &wn.ln_1_b)
            } else {
                let a = &mut acts.layers[l % slots];
                (a, &mut acts.ln_f, &mut acts.ln_f_mean, &mut acts.ln_f_rstd, &p.ln_f_w, &p.ln_f_b)
            };
            b.residual_layernorm_forward(
                &mut a.residual_3,
                ln_out,
                ln_mean,
                ln_rstd,
                &a.residual_2,
                &acts.proj,
                ln_w,
                ln_b,
                n,
                c,
                eps,
            )?;
        }
        Ok(())
    }

    /// Makes the activation buffers fit a batch of `tokens` tokens with `saved` floats of attention
    /// state per layer. Existing buffers are resized in place (the backend keeps their storage when
    /// it is large enough), so batches whose shape changes every step cost no reallocation.
    fn ensure_activations(&mut self, tokens: usize, saved: usize) -> Result<()> {
        if self.acts.as_ref().is_some_and(|a| a.tokens == tokens && a.saved == saved) {
            return Ok(());
        }
        let b = &*self.backend;
        if self.acts.is_none() {
            // A frozen model needs a layer's input and output only: two slots, recycled.
            let n_layer = self.config.n_layer;
            let slots = if self.is_frozen() { n_layer.min(2) } else { n_layer };
            let layers = (0..slots).map(|_| LayerActivations::empty(b)).collect::<Result<_>>()?;
            self.acts = Some(Activations::empty(b, layers)?);
        }
        let acts = self.acts.as_mut().expect("allocated above");
        let (n, c) = (tokens, self.config.n_embd);
        for (buf, len) in acts.buffers_mut(n, c, saved) {
            b.resize(buf, len)?;
        }
        acts.tokens = n;
        acts.saved = saved;
        Ok(())
    }

    /// Sizes the backward's activation gradients exactly like the forward's activations, so that
    /// ops without a token count (GELU backward) see equal lengths.
    fn ensure_scratch(&mut self, tokens: usize) -> Result<()> {
        let n = self.acts.as_ref().map_or(tokens, |a| a.tokens);
        if self.scratch.as_ref().is_some_and(|s| s.tokens == n) {
            return Ok(());
        }
        let b = &*self.backend;
        if self.scratch.is_none() {
            self.scratch = Some(BackwardScratch::empty(b)?);
        }
        let scratch = self.scratch.as_mut().expect("allocated above");
        for (buf, len) in scratch.buffers_mut(n, self.config.n_embd) {
            b.resize(buf, len)?;
        }
        scratch.tokens = n;
        Ok(())
    }
}

/// Layer `l`'s input (the embeddings, or the previous layer's `residual_3`) and its activation slot.
/// With one slot per layer this is layer `l - 1`'s and layer `l`'s; with fewer (a frozen model's
/// two) layer `l` uses slot `l % slots` and reads the slot before it, which the previous layer wrote.
fn layer_slots<'a, T>(
    layers: &'a mut [LayerActivations<T>],
    encoded: &'a T,
    l: usize,
) -> (&'a T, &'a mut LayerActivations<T>) {
    let slots = layers.len();
    let current = l % slots;
    if l == 0 {
        return (encoded, &mut layers[current]);
    }
    let previous = (l - 1) % slots;
    assert_ne!(previous, current, "layer {l}: {slots} activation slot(s) cannot hold both its input and output");
    if previous < current {
        let (before, from) = layers.split_at_mut(current);
        (&before[previous].residual_3, &mut from[0])
    } else {
        let (before, from) = layers.split_at_mut(previous);
        (&from[0].residual_3, &mut before[current])
    }
}

/// Mutable references to two different activation slots, `i` and `j`.
fn two_slots_mut<T>(
    layers: &mut [LayerActivations<T>],
    i: usize,
    j: usize,
) -> (&mut LayerActivations<T>, &mut LayerActivations<T>) {
    assert_ne!(i, j, "two_slots_mut: slot {i} twice");
    if i < j {
        let (before, from) = layers.split_at_mut(j);
        (&mut before[i], &mut from[0])
    } else {
        let (before, from) = layers.split_at_mut(i);
        (&mut from[0], &mut before[j])
    }
}

impl<T> LayerActivations<T> {
    fn empty<B: Backend<Buf = T>>(b: &B) -> Result<Self> {
        Ok(Self {
            ln_1: b.zeros(0)?,
            ln_1_mean: b.zeros(0)?,
            ln_1_rstd: b.zeros(0)?,
            qkv: b.zeros(0)?,
            atty: b.zeros(0)?,
            att_saved: b.zeros(0)?,
            residual_2: b.zeros(0)?,
            ln_2: b.zeros(0)?,
            ln_2_mean: b.zeros(0)?,
            ln_2_rstd: b.zeros(0)?,
            fch: b.zeros(0)?,
            fch_gelu: b.zeros(0)?,
            residual_3: b.zeros(0)?,
        })
    }

    fn buffers(&self) -> [&T; 13] {
        [
            &self.ln_1,
            &self.ln_1_mean,
            &self.ln_1_rstd,
            &self.qkv,
            &self.atty,
            &self.att_saved,
            &self.residual_2,
            &self.ln_2,
            &self.ln_2_mean,
            &self.ln_2_rstd,
            &self.fch,
            &self.fch_gelu,
            &self.residual_3,
        ]
    }

    /// Every buffer with its length for `n` tokens.
    fn buffers_mut(&mut self, n: usize, c: usize, saved: usize) -> [(&mut T, usize); 13] {
        [
            (&mut self.ln_1, n * c),
            (&mut self.ln_1_mean, n),
            (&mut self.ln_1_rstd, n),
            (&mut self.qkv, n * 3 * c),
            (&mut self.atty, n * c),
            (&mut self.att_saved, saved),
            (&mut self.residual_2, n * c),
            (&mut self.ln_2, n * c),
            (&mut self.ln_2_mean, n),
            (&mut self.ln_2_rstd, n),
            (&mut self.fch, n * 4 * c),
            (&mut self.fch_gelu, n * 4 * c),
            (&mut self.residual_3, n * c),
        ]
    }
}

impl<T> Activations<T> {
    fn empty<B: Backend<Buf = T>>(b: &B, layers: Vec<LayerActivations<T>>) -> Result<Self> {
        Ok(Self {
            tokens: 0,
            saved: 0,
            encoded: b.zeros(0)?,
            layers,
            proj: b.zeros(0)?,
            ln_f: b.zeros(0)?,
            ln_f_mean: b.zeros(0)?,
            ln_f_rstd: b.zeros(0)?,
            ln_f_rows: b.zeros(0)?,
            logits: b.zeros(0)?,
            token_logp: b.zeros(0)?,
            lse: b.zeros(0)?,
            chunk_seq_logp: b.zeros(0)?,
        })
    }

    /// Sizes the LM head's buffers for `rows` target rows (width `c`, vocabulary `v`).
    fn resize_head<B: Backend<Buf = T>>(&mut self, b: &B, rows: usize, c: usize, v: usize) -> Result<()> {
        let head = [
            (&mut self.ln_f_rows, rows * c),
            (&mut self.logits, rows * v),
            (&mut self.token_logp, rows),
            (&mut self.lse, rows),
        ];
        for (buf, len) in head {
            b.resize(buf, len)?;
        }
        Ok(())
    }

    /// The LM head on `rows` of `ln_f` (`target_rows`, with their `targets`): gathers them, then
    /// `logits = ln_f_rows · wteᵀ` and their target log-probs and log-sum-exps. Buffers sized by
    /// `resize_head`; `rows > 0`.
    #[allow(clippy::too_many_arguments)]
    fn head<B: Backend<Buf = T>>(
        &mut self,
        b: &B,
        wte: &T,
        target_rows: &B::Ids,
        targets: &B::Ids,
        rows: usize,
        n: usize,
        c: usize,
        v: usize,
    ) -> Result<()> {
        b.gather_rows(&mut self.ln_f_rows, &self.ln_f, target_rows, rows, n, c)?;
        b.matmul_forward(&mut self.logits, &self.ln_f_rows, wte, None, rows, c, v, WeightLayout::OutIn)?;
        b.logsoftmax_gather_forward(&mut self.token_logp, &mut self.lse, &self.logits, targets, rows, v)
    }

    fn buffers(&self) -> Vec<&T> {
        let mut bufs = vec![
            &self.encoded,
            &self.proj,
            &self.ln_f,
            &self.ln_f_mean,
            &self.ln_f_rstd,
            &self.ln_f_rows,
            &self.logits,
            &self.token_logp,
            &self.lse,
            &self.chunk_seq_logp,
        ];
        bufs.extend(self.layers.iter().flat_map(LayerActivations::buffers));
        bufs
    }

    /// Every buffer (the layers' too) with its length for `n` tokens, except the LM head's.
    fn buffers_mut(&mut self, n: usize, c: usize, saved: usize) -> Vec<(&mut T, usize)> {
        let mut bufs = vec![
            (&mut self.encoded, n * c),
            (&mut self.proj, n * c),
            (&mut self.ln_f, n * c),
            (&mut self.ln_f_mean, n),
            (&mut self.ln_f_rstd, n),
        ];
        for layer in &mut self.layers {
            bufs.extend(layer.buffers_mut(n, c, saved));
        }
        bufs
    }
}

impl<T> BackwardScratch<T> {
    fn empty<B: Backend<Buf = T>>(b: &B) -> Result<Self> {
        Ok(Self {
            tokens: 0,
            dresidual: b.zeros(0)?,
            dln: b.zeros(0)?,
            datty: b.zeros(0)?,
            dqkv: b.zeros(0)?,
            dfch_gelu: b.zeros(0)?,
            dfch: b.zeros(0)?,
            dln_f_rows: b.zeros(0)?,
        })
    }

    fn buffers(&self) -> [&T; 7] {
        [&self.dresidual, &self.dln, &self.datty, &self.dqkv, &self.dfch_gelu, &self.dfch, &self.dln_f_rows]
    }

    fn buffers_mut(&mut self, n: usize, c: usize) -> [(&mut T, usize); 6] {
        [
            (&mut self.dresidual, n * c),
            (&mut self.dln, n * c),
            (&mut self.datty, n * c),
            (&mut self.dqkv, n * 3 * c),
            (&mut self.dfch_gelu, n * 4 * c),
            (&mut self.dfch, n * 4 * c),
        ]
    }
}

/// GPT-2's initialisation: N(0, 0.02) weights, residual projections scaled by 1/√(2L), zero biases,
/// unit LayerNorm gains. Deterministic in `seed`. On the host, so that the same weights can become
/// a trainable policy and a frozen reference.
pub fn random_weights(config: Gpt2Config, seed: u64) -> Result<HostWeights> {
    config.validate()?;
    let residual_std = 0.02 / (2.0 * config.n_layer as f64).sqrt();
    let mut tensors = std::collections::BTreeMap::new();
    for (index, (name, shape)) in config.parameter_shapes().into_iter().enumerate() {
        let len: usize = shape.iter().product();
        let data = if name.ends_with("ln_1.weight") || name.ends_with("ln_2.weight") || name == "ln_f.weight" {
            vec![1.0; len]
        } else if name.ends_with(".bias") {
            vec![0.0; len]
        } else {
            // One ChaCha stream per tensor: a tensor's values do not depend on the others' sizes.
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(index as u64);
            let std = if name.ends_with("c_proj.weight") { residual_std } else { 0.02 };
            normal_samples(&mut rng, len, std)
        };
        tensors.insert(name, (shape, data));
    }
    Ok(HostWeights { config, tensors })
}

/// `len` samples of N(0, std²) by Box–Muller, in f64 then rounded to f32.
fn normal_samples(rng: &mut ChaCha8Rng, len: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(len + 1);
    while out.len() < len {
        // u1 in (0, 1] keeps the log finite.
        let u1 = 1.0 - rng.random::<f64>();
        let u2 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let theta = std::f64::consts::TAU * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::cuda::{CudaBackend, Device, Precision};
    use crate::backend::prelude::*;

    fn tiny_config() -> Gpt2Config {
        Gpt2Config { vocab_size: 37, n_positions: 32, n_embd: 16, n_layer: 2, n_head: 2, layer_norm_epsilon: 1e-5 }
    }

    /// Sequences of `(length, prompt length)`, tokens from a fixed pattern.
    fn packed(seqs: &[(usize, usize)], vocab: usize) -> PackedBatch {
        let mut batch = PackedBatch::default();
        for (s, &(len, prompt)) in seqs.iter().enumerate() {
            let tokens: Vec<i32> = (0..len).map(|t| ((t * 7 + s * 13 + 3) % vocab) as i32).collect();
            batch.push(&tokens, prompt);
        }
        batch
    }

    fn assert_same_bits(what: &str, a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert_eq!(x.to_bits(), y.to_bits(), "{what}[{i}]: {x} vs {y}");
        }
    }

    /// The LM head on the target rows only gives, on the CPU, the log-probs and the gradient at
    /// `ln_f` of the head over every row bit for bit: the same rows go through the same kernels.
    #[test]
    fn head_on_target_rows_matches_the_full_head_bit_for_bit() {
        let backend = Arc::new(CpuBackend::new());
        let config = tiny_config();
        let (c, v) = (config.n_embd, config.vocab_size);
        let mut model = Gpt2::random(backend.clone(), config.clone(), 5).unwrap();
        // Prompts of several lengths, a sequence without a target, one that is all prompt.
        let host = packed(&[(7, 3), (1, 1), (10, 2), (4, 4), (6, 1)], v);
        let batch = DeviceBatch::upload(&*backend, &host).unwrap();
        let (n, m, seqs) = (batch.num_tokens(), batch.num_target_rows(), batch.num_seqs());
        assert_eq!(m, host.targets.iter().filter(|&&t| t >= 0).count());
        assert!(0 < m && m < n, "the batch has prompt tokens and targets");
        assert_eq!(batch.row_packing.host_cu_seqlens, vec![0, 4, 4, 12, 12, 17]); // length − prompt each

        let seq_logp = model.forward(&batch).unwrap().clone();
        let acts = model.acts.as_ref().unwrap();
        // The full head over all n rows, as the model computed it before it skipped rows.
        let mut logits = vec![0.0; n * v];
        backend.matmul_forward(&mut logits, &acts.ln_f, &model.params.wte, None, n, c, v, WeightLayout::OutIn).unwrap();
        let (mut token_logp, mut lse) = (vec![0.0; n], vec![0.0; n]);
        backend.logsoftmax_gather_forward(&mut token_logp, &mut lse, &logits, &host.targets, n, v).unwrap();
        let mut full_seq_logp = vec![0.0; seqs];
        backend.sequence_logp_sum(&mut full_seq_logp, &token_logp, &batch.packing).unwrap();
        assert_same_bits("sequence log-probs", &seq_logp, &full_seq_logp);
        assert!(seq_logp[0] < 0.0 && seq_logp[1] == 0.0 && seq_logp[3] == 0.0);
        for (i, &t) in batch.target_rows.iter().enumerate() {
            let t = t as usize;
            assert_same_bits("logits row", &acts.logits[i * v..][..v], &logits[t * v..][..v]);
        }

        // Backward: dL/d(ln_f) of the full head, through ln_f's LayerNorm, vs the model's.
        let dseq: Vec<f32> = (0..seqs).map(|s| 0.3 - 0.2 * s as f32).collect();
        backend.logsoftmax_gather_backward(&mut logits, &lse, &host.targets, &dseq, &batch.packing, n, v).unwrap();
        let (mut dln_f, mut dwte) = (vec![f32::NAN; n * c], vec![0.0; v * c]);
        let (wte, layout) = (&model.params.wte, WeightLayout::OutIn);
        backend.matmul_backward(&mut dln_f, &mut dwte, None, &logits, &acts.ln_f, wte, n, c, v, layout).unwrap();
        let (mut dx, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
        let last = &acts.layers.last().unwrap().residual_3;
        let (w, mean, rstd) = (&model.params.ln_f_w, &acts.ln_f_mean, &acts.ln_f_rstd);
        backend.layernorm_backward(&mut dx, &mut dw, &mut db, &dln_f, last, w, mean, rstd, n, c).unwrap();
        model.backward(&batch, &dseq).unwrap();
        let scratch = model.scratch.as_ref().unwrap();
        for t in 0..n {
            let want = if host.targets[t] < 0 { vec![0.0; c] } else { dln_f[t * c..][..c].to_vec() };
            let i = batch.target_rows.iter().position(|&r| r as usize == t);
            let got = i.map_or(vec![0.0; c], |i| scratch.dln_f_rows[i * c..][..c].to_vec());
            assert_same_bits("dL/d(ln_f) row", &got, &want);
        }
        let grads = model.grads.as_ref().unwrap();
        assert_same_bits("dL/d(ln_f.weight)", &grads.ln_f_w, &dw);
        assert_same_bits("dL/d(ln_f.bias)", &grads.ln_f_b, &db);
    }

    /// The chunk plan covers every sequence once, in order, with chunks of at least
    /// `MIN_HEAD_CHUNK_ROWS` rows (unless there is one chunk), each under its bound, and none closed
    /// while the next sequence would still have fitted.
    #[test]
    fn head_chunks_cover_every_sequence_once_within_their_bounds() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for case in 0..400 {
            let num_seqs = rng.random_range(0..40usize);
            // Mostly short sequences, some empty, now and then a long one.
            let lens: Vec<i32> = (0..num_seqs)
                .map(|_| match rng.random_range(0..10) {
                    0 => 0,
                    1 => rng.random_range(30..120),
                    _ => rng.random_range(1..12),
                })
                .collect();
            let mut row_cu = vec![0];
            for len in &lens {
                row_cu.push(row_cu.last().unwrap() + len);
            }
            let longest = lens.iter().copied().max().unwrap_or(0) as usize;
            for max_rows in [1, 5, 16, 40, 100, 10_000] {
                let chunks = plan_head_chunks(&row_cu, max_rows);
                let what = format!("case {case}, lens {lens:?}, {max_rows} rows: {chunks:?}");
                let covered: Vec<usize> = chunks.iter().flat_map(|c| c.clone()).collect();
                assert_eq!(covered, (0..num_seqs).collect::<Vec<_>>(), "{what}");
                let rows = |c: &Range<usize>| (row_cu[c.end] - row_cu[c.start]) as usize;
                for (i, chunk) in chunks.iter().enumerate() {
                    assert!(rows(chunk) < max_rows.max(longest) + 2 * MIN_HEAD_CHUNK_ROWS, "{what}");
                    if chunks.len() > 1 {
                        assert!(rows(chunk) >= MIN_HEAD_CHUNK_ROWS, "{what}: chunk {i} is too thin");
                    }
                    if let Some(next) = chunks.get(i + 1) {
                        let first_next = (row_cu[next.start + 1] - row_cu[next.start]) as usize;
                        assert!(rows(chunk) + first_next > max_rows, "{what}: chunk {i} closed early");
                    }
                }
                let total = *row_cu.last().unwrap() as usize;
                if total <= max_rows && num_seqs > 0 {
                    assert_eq!(chunks, vec![0..num_seqs], "{what}: a head within the chunk size is one chunk");
                }
            }
        }
    }

    /// A batch without a single target (every sequence all prompt): zero log-probs and zero
    /// gradients, no empty product launched, and the model still works on the next batch.
    fn batch_without_targets<B: Backend>(backend: Arc<B>) {
        let config = tiny_config();
        let mut model = Gpt2::random(backend.clone(), config.clone(), 6).unwrap();
        let none = DeviceBatch::upload(&*backend, &packed(&[(5, 5), (1, 1), (3, 3)], config.vocab_size)).unwrap();
        assert_eq!(none.num_target_rows(), 0);
        let logp = backend.download(model.forward(&none).unwrap()).unwrap();
        assert_eq!(logp, vec![0.0; 3]);
        model.backward(&none, &backend.upload(&[1.0, -2.0, 0.5]).unwrap()).unwrap();
        for (name, grad) in model.names.iter().zip(model.grads().unwrap()) {
            let grad = backend.download(grad).unwrap();
            assert!(grad.iter().all(|&g| g == 0.0), "{name}: a batch without targets gave a nonzero gradient");
        }
        let some = DeviceBatch::upload(&*backend, &packed(&[(6, 2), (4, 1)], config.vocab_size)).unwrap();
        let logp = backend.download(model.forward(&some).unwrap()).unwrap();
        assert!(logp.iter().all(|&x| x < 0.0 && x.is_finite()), "{logp:?}");
        model.backward(&some, &backend.upload(&[1.0, -2.0]).unwrap()).unwrap();
    }

    #[test]
    fn batch_without_targets_cpu() {
        batch_without_targets(Arc::new(CpuBackend::new()));
    }

    #[test]
    fn batch_without_targets_emulated_device() {
        for precision in [Precision::F32, Precision::Bf16] {
            batch_without_targets(Arc::new(CudaBackend::new(Device::emulated().unwrap(), precision)));
        }
    }
}
