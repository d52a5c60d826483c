//! The decoder on a backend ([`Decoder`]): its forward and backward over a packed batch, written
//! once over [`Backend`] for every family, and its initialisation ([`random_weights`]).
//!
//! The forward reads like llm.c's `gpt2_forward`, top to bottom: the embeddings (GPT-2 adds its
//! learned positions), pre-norm blocks (`x + attn(norm_1(x))`, then `x + mlp(norm_2(x))`), a final
//! norm, the LM head, and the fused log-softmax-gather that turns logits into per-sequence
//! log-probs; the backward (llm.c's `gpt2_backward`) runs the same steps in reverse. A family is a
//! set of choices inside that one path ([`Family`]): the norm (LayerNorm, or RMSNorm), the
//! positions (learned, or RoPE applied to q and k after their projection), the MLP (GELU, or
//! SwiGLU), the weight layout (GPT-2's Conv1D `[in, out]`, `nn.Linear`'s `[out, in]`), which biases
//! exist, grouped-query attention, and whether the LM head is tied to the token embedding.
//!
//! Every tensor is token-major over the whole packed batch; attention alone looks at the sequence
//! boundaries (and RoPE at each token's position inside its sequence). The LM head, the largest
//! product and the largest activation, runs only on the rows that carry a target
//! (`DeviceBatch::target_rows`): the trunk's last output is gathered to those rows before the head,
//! and their gradient scattered back after it. The parameters are listed in `params.rs`, the
//! activations and their recycling in `activations.rs`.
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
//! [`FROZEN_HEAD_CHUNK_ROWS`] target rows at a time (`Decoder::set_head_chunk_rows`): nothing reads
//! its logits after the log-probs, so it holds the `[rows, V]` logits of one chunk instead of the
//! batch's (at GPT-2's vocabulary, 1024 rows are 0.2 GB, where a batch of 12k target rows would hold
//! 2.4 GB). Each sequence's log-prob is still one `sequence_logp_sum` over the same rows,
//! so it is unchanged bit for bit.
//!
//! A trainable model runs its head whole by default: the backward turns the kept logits into their
//! gradient in place. Given a chunk size, it runs the head in chunks too and keeps no logits; its
//! backward then recomputes each chunk's logits (the same rows through the same ops, so the same
//! bits), turns them into their gradient, and adds the chunk's share to the head's weight gradient
//! and to the trunk's (Liger-Kernel's trade: one more head product for `[chunk, V]` instead of
//! `[M, V]` of logits). The log-probs are bit-identical either way; the weight gradient sums its
//! chunks in another order.
//!
//! Activation checkpointing (`Decoder::set_gradient_checkpointing`) trades compute for memory the
//! same way inside the trunk: the forward keeps each block's boundary only (its first norm and its
//! output) and one interior slot, and the backward recomputes each block's interior from its
//! boundary just before taking the block's gradient (`block_interior_forward`, the forward's own
//! code: the same ops on the same values, so the same gradients bit for bit).
//!
//! The logits are f32 in either precision: on a bf16 device the head's product stores its f32
//! accumulator (`matmul_forward_f32_out`), because a bf16 step at logits of 30–120 is 0.25–0.5
//! nats, and a response's log-prob would carry the rounding of every one of its tokens into the
//! loss. The backward turns them into bf16 dlogits (one rounding of the gradient, as PyTorch's bf16
//! autocast and Liger-Kernel store it), which the head's two backward products read as cuBLASLt
//! needs their operands; the f32 logits are freed as the gradient replaces them. A bf16 model's
//! whole head so holds `[M, V]` f32 logits from its forward to its backward (twice the bf16 bytes)
//! and, for the time of one kernel, the bf16 gradient beside them; the chunked head holds the same
//! per chunk.
//!
//! [`FROZEN_HEAD_CHUNK_ROWS`]: super::FROZEN_HEAD_CHUNK_ROWS
//! [`Family`]: super::Family

use std::sync::Arc;

use anyhow::{ensure, Result};

use super::activations::{layer_input, two_slots_mut, Activations, BackwardScratch, KeptLayers, Widths};
use super::adapters::Lora;
use super::batch::DeviceBatch;
use super::block::{block_backward, block_interior_forward, head_backward, lm_head, mlp_down, BlockGrads, BlockKind};
pub use super::init::random_weights;
use super::logp_parts::{ForwardExtras, PartBuffers, RowSplit, SequenceLogps};
use super::params::Params;
use super::DecoderConfig;
use crate::backend::Backend;

/// A decoder on a backend: parameters, their gradients, and the activations of the last forward
/// pass (kept for the backward). A frozen model has no gradients and keeps two layers of
/// activations (see the module documentation).
pub struct Decoder<B: Backend> {
    pub(super) backend: Arc<B>,
    pub(super) config: DecoderConfig,
    /// Name and shape of each parameter, in `Params::ordered` order.
    pub(super) names: Vec<String>,
    pub(super) shapes: Vec<Vec<usize>>,
    pub(super) params: Params<B::Buf>,
    /// `None` in a frozen model: it has no gradients, and `backward` refuses to run.
    pub(super) grads: Option<Params<B::Buf>>,
    /// RoPE's inverse frequencies `[head_dim / 2]` (f32), for the families with RoPE.
    pub(super) rope_freqs: Option<B::Buf>,
    pub(super) acts: Option<Activations<B::Buf>>,
    pub(super) scratch: Option<BackwardScratch<B::Buf>>,
    /// `[S]` sequence log-probs of the last forward.
    pub(super) seq_logp: B::Buf,
    /// What the last forward computed besides them, when asked (`forward_with`); made on first use.
    pub(super) parts: Option<PartBuffers<B::Buf>>,
    /// (tokens, sequences) of the last forward whose activations and logits a backward may use.
    pub(super) pending_backward: Option<(usize, usize)>,
    /// Whether the last forward ran the LM head in chunks, keeping no logits: the backward
    /// recomputes them chunk by chunk.
    pub(super) head_chunked: bool,
    /// The LM head runs on about this many target rows at a time (see the module documentation):
    /// by default [`FROZEN_HEAD_CHUNK_ROWS`] in a frozen model, all of them (`usize::MAX`) in a
    /// trainable one.
    pub(super) head_chunk_rows: usize,
    /// Whether the backward recomputes each block's interior from its kept boundary instead of
    /// keeping every layer's activations (`set_gradient_checkpointing`).
    pub(super) gradient_checkpointing: bool,
    /// LoRA adapters on the frozen base (`lora.rs`); `None` without.
    pub(super) lora: Option<Lora<B>>,
}

impl<B: Backend> Decoder<B> {
    /// Embeddings, the blocks and the final norm: leaves `norm_f` `[N, C]` for the head.
    pub(super) fn forward_trunk(&mut self, batch: &DeviceBatch<B>) -> Result<()> {
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

        let kind = BlockKind::of(&self.config);
        let (n_layer, w) = (self.config.n_layer, kind.widths);
        let c = w.c;
        let b = &*self.backend;
        let p = &self.params;
        let rope = self.rope_freqs.as_ref();
        let mut lora = self.lora.as_mut();
        let acts = self.acts.as_mut().expect("ensure_activations allocated them");
        let (trunk, boundaries, interiors) = (&mut acts.trunk, &mut acts.boundaries, &mut acts.interiors);

        b.embedding_forward(&mut trunk.encoded, &batch.tokens, &batch.positions, &p.wte, p.wpe.as_ref(), n, c)?;
        // Every other norm is fused with the residual add that produces its input (norm_2 with
        // residual_2; the next block's norm_1, or norm_f, with residual_3). Only block 0's norm_1
        // reads a tensor that no add produces: the embeddings.
        let first = &mut boundaries[0];
        let w0 = &p.blocks[0].norm_1;
        kind.norm(b, &mut first.norm_1, &mut first.norm_1_mean, &mut first.norm_1_rstd, &trunk.encoded, w0, n)?;
        let (slots, interior_slots) = (boundaries.len(), interiors.len());
        for l in 0..n_layer {
            let a = &mut interiors[l % interior_slots];
            let x = layer_input(boundaries, &trunk.encoded, l);
            let norm_1 = &boundaries[l % slots].norm_1;
            let (wl, mut adapters) = (&p.blocks[l], lora.as_deref_mut().and_then(|lora| lora.block(l)));
            let kind = kind.layer(&self.config, l);
            block_interior_forward(b, &kind, wl, x, norm_1, a, &mut trunk.proj, batch, rope, adapters.as_mut())?;
            // The MLP's down projection joins the residual stream: residual_3 = residual_2 + down(mlp_act).
            mlp_down(b, &kind, wl, &mut trunk.proj, a, adapters.as_mut(), n)?;
            // residual_3 with the norm that reads it: the next block's norm_1 (in the next layer's
            // slot; in a frozen model that is the slot of this layer's input x, no longer needed), or
            // norm_f after the last block.
            let (out, residual_3, mean, rstd, wn) = if l + 1 < n_layer {
                let (this, next) = two_slots_mut(boundaries, l % slots, (l + 1) % slots);
                let wn = &p.blocks[l + 1].norm_1;
                (&mut next.norm_1, &mut this.residual_3, &mut next.norm_1_mean, &mut next.norm_1_rstd, wn)
            } else {
                let this = &mut boundaries[l % slots];
                (&mut trunk.norm_f, &mut this.residual_3, &mut trunk.norm_f_mean, &mut trunk.norm_f_rstd, &p.norm_f)
            };
            kind.residual_norm(b, residual_3, out, mean, rstd, &a.residual_2, &trunk.proj, wn, n)?;
        }
        Ok(())
    }

    /// Forward through the LM head and the fused log-softmax-gather; returns the per-sequence
    /// log-probs `[S]` and keeps what the backward needs.
    pub fn forward(&mut self, batch: &DeviceBatch<B>) -> Result<&B::Buf> {
        Ok(self.forward_with(batch, &ForwardExtras::none())?.total)
    }

    /// [`forward`](Self::forward), and what `extras` asks for besides the log-probs (see
    /// [`ForwardExtras`]); the log-probs are the same bits either way.
    pub fn forward_with(&mut self, batch: &DeviceBatch<B>, extras: &ForwardExtras<B>) -> Result<SequenceLogps<'_, B>> {
        self.forward_trunk(batch)?;
        let (n, c, v) = (batch.num_tokens(), self.config.n_embd, self.config.vocab_size);
        let m = batch.num_target_rows();
        let num_seqs = batch.num_seqs();
        // A frozen model keeps none of the logits: a batch with more target rows than a chunk goes
        // through the head chunk by chunk.
        let chunks =
            if m > self.head_chunk_rows { Some(batch.head_chunks(&self.backend, self.head_chunk_rows)?) } else { None };
        self.head_chunked = chunks.is_some();
        let b = &*self.backend;
        let weight = self.params.head();
        let acts = self.acts.as_mut().expect("forward_trunk allocates the activations");
        let (head, norm_f) = (&mut acts.head, &acts.trunk.norm_f);
        if b.buf_len(&self.seq_logp) != num_seqs {
            self.seq_logp = b.zeros(num_seqs)?;
        }
        let mut parts = PartBuffers::prepare(&mut self.parts, b, extras, num_seqs)?;

        // The LM head (logits = norm_f · Wᵀ, W the head's weight or the token embedding it is tied
        // to), on the M rows with a target only: the others would be computed to be multiplied by zero.
        let Some(chunks) = chunks else {
            head.resize(b, m, c, v)?;
            if m == 0 {
                // No target in the batch: every sequence log-prob is an empty sum (and no empty
                // product is launched).
                b.fill(&mut self.seq_logp, 0.0)?;
            } else {
                let squares = PartBuffers::squares(&mut parts, b, m)?;
                lm_head(b, head, norm_f, weight, &batch.target_rows, &batch.row_targets, squares, m, n, c, v)?;
                b.sequence_logp_sum(&mut self.seq_logp, &head.token_logp, &batch.row_packing)?;
                let split = extras.split.map(|s| &s.packing);
                PartBuffers::add_pass(&mut parts, b, &head.token_logp, true, &batch.row_packing, split)?;
            }
            self.pending_backward = Some((n, num_seqs));
            return Ok(SequenceLogps::of(&self.seq_logp, self.parts.as_ref(), extras));
        };

        // Chunk by chunk. Each chunk's packing holds every sequence, those of other chunks empty, so
        // its sums are each sequence's exact log-prob (the same rows summed as over the whole head)
        // or +0 (an empty sum); the first chunk writes the batch's log-probs, the others add theirs,
        // and x + 0 = x: the result is the whole head's bit for bit. (No sum is −0, which + 0 would
        // turn into +0: sums start from +0.)
        let split_chunks = extras.split.map(|s| s.chunk_packings(b, &chunks)).transpose()?;
        for (i, chunk) in chunks.chunks.iter().enumerate() {
            let rows = chunk.num_rows;
            head.resize(b, rows, c, v)?;
            let squares = PartBuffers::squares(&mut parts, b, rows)?;
            lm_head(b, head, norm_f, weight, &chunk.target_rows, &chunk.row_targets, squares, rows, n, c, v)?;
            if i == 0 {
                b.sequence_logp_sum(&mut self.seq_logp, &head.token_logp, &chunk.packing)?;
            } else {
                b.resize(&mut acts.chunk_seq_logp, num_seqs)?;
                b.sequence_logp_sum(&mut acts.chunk_seq_logp, &head.token_logp, &chunk.packing)?;
                b.add_inplace(&mut self.seq_logp, &acts.chunk_seq_logp)?;
            }
            let split = split_chunks.as_ref().map(|p| &p[i]);
            PartBuffers::add_pass(&mut parts, b, &head.token_logp, i == 0, &chunk.packing, split)?;
        }
        // The buffers keep the largest chunk's size, which is what they hold (a CPU buffer zero-fills
        // when it grows back within its storage: here rather than on the next batch's first chunk).
        head.resize(b, chunks.chunks[0].num_rows, c, v)?;
        // (A trainable model's backward recomputes the logits; a frozen model's refuses.)
        self.pending_backward = Some((n, num_seqs));
        Ok(SequenceLogps::of(&self.seq_logp, self.parts.as_ref(), extras))
    }

    /// Given dL/d(seq logp) `[S]`, accumulates every parameter gradient. Must follow `forward`
    /// on the same batch.
    pub fn backward(&mut self, batch: &DeviceBatch<B>, dseq: &B::Buf) -> Result<()> {
        self.backward_over(batch, dseq, None)
    }

    /// [`backward`](Self::backward) given a gradient per part of each sequence `[2S]` (sequence s's
    /// first part of `split` at `2s`, the rest at `2s + 1`), each row taking its part's: LD-DPO's.
    pub fn backward_split(&mut self, batch: &DeviceBatch<B>, split: &RowSplit<B>, dsplit: &B::Buf) -> Result<()> {
        self.backward_over(batch, dsplit, Some(split))
    }

    fn backward_over(&mut self, batch: &DeviceBatch<B>, dseq: &B::Buf, split: Option<&RowSplit<B>>) -> Result<()> {
        self.ensure_trainable("backward")?;
        let (n, num_seqs) = (batch.num_tokens(), batch.num_seqs());
        ensure!(
            self.pending_backward == Some((n, num_seqs)),
            "backward needs a forward on the same batch just before it (this batch: {n} tokens, {num_seqs} sequences; \
             last forward: {:?})",
            self.pending_backward
        );
        let (got, segments) = (self.backend.buf_len(dseq), if split.is_some() { 2 * num_seqs } else { num_seqs });
        ensure!(got == segments, "backward: dL/d(seq logp) has {got} entries for {segments} sequences (or parts)");
        // The backward overwrites the logits with their gradient: a second backward needs a new forward.
        self.pending_backward = None;
        self.ensure_scratch(n)?;

        let (c, v, b) = (self.config.n_embd, self.config.vocab_size, &*self.backend);
        let (p, mut g) = (&self.params, self.grads.as_mut());
        let acts = self.acts.as_mut().expect("a forward allocated the activations");
        let scratch = self.scratch.as_mut().expect("ensure_scratch allocated the scratch");
        let (d, dnorm_f_rows) = (&mut scratch.d, &mut scratch.dnorm_f_rows);
        let (head, trunk) = (&mut acts.head, &mut acts.trunk);

        // dlogits, in place, then the LM head on the target rows: dL/d(norm_f rows) and the head's
        // weight gradient (the token embedding's, when tied); the rows' gradient goes back to its
        // tokens, zeros elsewhere.
        let m = batch.num_target_rows();
        b.resize(dnorm_f_rows, m * c)?;
        if m > 0 && !self.head_chunked {
            let packing = split.map_or(&batch.row_packing, |s| &s.packing);
            b.logsoftmax_gather_backward(&mut head.logits, &head.lse, &batch.row_targets, dseq, packing, m, v)?;
            let (logits, rows) = (&head.logits, &head.norm_f_rows);
            head_backward(b, dnorm_f_rows, g.as_deref_mut(), logits, rows, p.head(), m, c, v)?;
        }
        if self.head_chunked {
            // Chunk by chunk, the logits recomputed: dL/d(norm_f) is the sum of the chunks' rows
            // scattered to their tokens (d.residual, zeroed below, holds each chunk's scatter).
            let chunks = batch.head_chunks(b, self.head_chunk_rows)?;
            let split_chunks = split.map(|s| s.chunk_packings(b, &chunks)).transpose()?;
            for (i, chunk) in chunks.chunks.iter().enumerate() {
                let (rows, targets) = (chunk.num_rows, &chunk.row_targets);
                head.resize(b, rows, c, v)?;
                lm_head(b, head, &trunk.norm_f, p.head(), &chunk.target_rows, targets, None, rows, n, c, v)?;
                let packing = split_chunks.as_ref().map_or(&chunk.packing, |p| &p[i]);
                b.logsoftmax_gather_backward(&mut head.logits, &head.lse, targets, dseq, packing, rows, v)?;
                b.resize(dnorm_f_rows, rows * c)?;
                let (logits, x) = (&head.logits, &head.norm_f_rows);
                head_backward(b, dnorm_f_rows, g.as_deref_mut(), logits, x, p.head(), rows, c, v)?;
                if i == 0 {
                    b.scatter_rows(&mut d.norm, dnorm_f_rows, &chunk.target_rows, rows, n, c)?;
                } else {
                    b.scatter_rows(&mut d.residual, dnorm_f_rows, &chunk.target_rows, rows, n, c)?;
                    b.add_inplace(&mut d.norm, &d.residual)?;
                }
            }
            head.resize(b, chunks.chunks[0].num_rows, c, v)?;
        } else {
            b.scatter_rows(&mut d.norm, dnorm_f_rows, &batch.target_rows, m, n, c)?;
        }
        self.backward_trunk(batch)
    }

    /// The trunk's backward from dL/d(norm_f) `[N, C]`, held in the scratch's `d.norm`: every
    /// gradient below the head (the adapters' under LoRA). Follows a forward on `batch` whose
    /// activations are still kept.
    pub(super) fn backward_trunk(&mut self, batch: &DeviceBatch<B>) -> Result<()> {
        let (kind, n, n_layer) = (BlockKind::of(&self.config), batch.num_tokens(), self.config.n_layer);
        let (c, b) = (kind.widths.c, &*self.backend);
        let rope = self.rope_freqs.as_ref();
        let (p, mut g, mut lora) = (&self.params, self.grads.as_mut(), self.lora.as_mut());
        let acts = self.acts.as_mut().expect("a forward allocated the activations");
        let d = &mut self.scratch.as_mut().expect("ensure_scratch allocated the scratch").d;
        let (checkpointed, trunk) = (acts.kept == KeptLayers::Boundaries, &mut acts.trunk);
        // A norm's backward accumulates into dinp, which is how the residual stream's gradient
        // gathers its two branches below without a separate add.
        b.fill(&mut d.residual, 0.0)?;
        let last = &acts.boundaries.last().expect("n_layer > 0").residual_3;
        let (mean, rstd) = (&trunk.norm_f_mean, &trunk.norm_f_rstd);
        let gn = match (&mut g, &mut lora) {
            (Some(g), _) => &mut g.norm_f,
            (None, Some(lora)) => &mut lora.norm_sink,
            (None, None) => unreachable!("ensure_trainable checked"),
        };
        kind.norm_backward(b, &mut d.residual, gn, &d.norm, last, &p.norm_f, mean, rstd, n)?;

        for l in (0..n_layer).rev() {
            let bnd = &acts.boundaries[l];
            let x = layer_input(&acts.boundaries, &trunk.encoded, l);
            let (wl, kind) = (&p.blocks[l], kind.layer(&self.config, l));
            let (mut adapters, sink) = match lora.as_deref_mut() {
                Some(lora) => lora.block_with_sink(l),
                None => (None, None),
            };
            let gl = match (g.as_deref_mut(), sink) {
                (Some(g), _) => BlockGrads::Full(&mut g.blocks[l]),
                (None, Some(sink)) => BlockGrads::Frozen(sink),
                (None, None) => unreachable!("ensure_trainable checked"),
            };
            let a = if checkpointed {
                // The interior again, from the kept boundary: the same ops on the same values as
                // the forward, so the same bits.
                let a = &mut acts.interiors[0];
                let (proj, l) = (&mut trunk.proj, adapters.as_mut());
                block_interior_forward(b, &kind, wl, x, &bnd.norm_1, a, proj, batch, rope, l)?;
                &*a
            } else {
                &acts.interiors[l]
            };
            block_backward(b, &kind, wl, gl, x, bnd, a, d, batch, rope, adapters.as_mut())?;
        }
        if let Some(g) = g {
            let (dwte, dwpe) = (&mut g.wte, g.wpe.as_mut());
            b.embedding_backward(dwte, dwpe, &d.residual, &batch.tokens, &batch.positions, n, c)?;
        }
        Ok(())
    }

    /// Whether this is a frozen, inference-only model (no gradients, no backward).
    pub fn is_frozen(&self) -> bool {
        self.grads.is_none() && self.lora.as_ref().is_none_or(|lora| lora.grads.is_none())
    }

    /// The error of a gradient operation on a frozen model.
    pub(super) fn ensure_trainable(&self, what: &str) -> Result<()> {
        ensure!(
            !self.is_frozen(),
            "{what}: this model is frozen (loaded for inference: no gradients); load it with `Decoder::from_host` or \
             `Decoder::load` to train it"
        );
        Ok(())
    }

    /// Sets how many target rows the LM head computes at once (default: [`FROZEN_HEAD_CHUNK_ROWS`]
    /// in a frozen model, all of them in a trainable one; chunks hold whole sequences, see
    /// [`plan_head_chunks`]). Fewer rows hold smaller logits; the log-probs are the same bit for bit.
    /// A trainable model with chunks recomputes each chunk's logits in its backward (one more head
    /// product per step); `usize::MAX` turns chunking off.
    ///
    /// [`FROZEN_HEAD_CHUNK_ROWS`]: super::FROZEN_HEAD_CHUNK_ROWS
    /// [`plan_head_chunks`]: super::plan_head_chunks
    pub fn set_head_chunk_rows(&mut self, rows: usize) -> Result<()> {
        ensure!(rows > 0, "set_head_chunk_rows: a chunk of the LM head needs at least one row");
        self.head_chunk_rows = rows;
        Ok(())
    }

    /// Target rows the LM head computes at once (see `set_head_chunk_rows`).
    pub fn head_chunk_rows(&self) -> usize {
        self.head_chunk_rows
    }

    /// Turns activation checkpointing on or off (off by default). On, a trainable model keeps each
    /// block's boundary only (its first norm and its output, 2·N·C floats a layer instead of about
    /// 16·N·C in GPT-2) and its backward recomputes the rest of each block before taking its
    /// gradient: about one more forward of the trunk per step, the same gradients bit for bit.
    /// Takes effect at the next forward; a frozen model keeps two layers anyway.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        if self.gradient_checkpointing != on {
            self.gradient_checkpointing = on;
            // Reallocated for the new plan at the next forward, which a backward needs anyway.
            self.acts = None;
            self.pending_backward = None;
        }
    }

    /// Whether activation checkpointing is on (see `set_gradient_checkpointing`).
    pub fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }

    /// Which layers' activations this model keeps.
    fn kept_layers(&self) -> KeptLayers {
        match (self.is_frozen(), self.gradient_checkpointing) {
            (true, _) => KeptLayers::Two,
            (false, true) => KeptLayers::Boundaries,
            (false, false) => KeptLayers::All,
        }
    }

    /// Makes the activation buffers fit a batch of `tokens` tokens with `saved` floats of attention
    /// state per layer: allocated on the first forward, resized in place after it.
    fn ensure_activations(&mut self, tokens: usize, saved: usize) -> Result<()> {
        let kept = self.kept_layers();
        let b = &*self.backend;
        if self.acts.is_none() {
            self.acts = Some(Activations::new(b, self.config.n_layer, kept)?);
        }
        self.acts.as_mut().expect("allocated above").resize(b, tokens, &Widths::of(&self.config), saved)
    }

    /// Sizes the backward's scratch for the tokens of the forward's activations: allocated on the
    /// first backward, resized in place after it.
    pub(super) fn ensure_scratch(&mut self, tokens: usize) -> Result<()> {
        let n = self.acts.as_ref().map_or(tokens, Activations::tokens);
        let b = &*self.backend;
        if self.scratch.is_none() {
            self.scratch = Some(BackwardScratch::new(b)?);
        }
        self.scratch.as_mut().expect("allocated above").resize(b, n, &Widths::of(&self.config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::cuda::{CudaBackend, Device, Precision};
    use crate::backend::prelude::*;
    use crate::backend::WeightLayout;
    use crate::data::PackedBatch;

    fn tiny_config() -> DecoderConfig {
        DecoderConfig::gpt2(37, 32, 16, 2, 2)
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
    /// `norm_f` of the head over every row bit for bit: the same rows go through the same kernels.
    #[test]
    fn head_on_target_rows_matches_the_full_head_bit_for_bit() {
        let backend = Arc::new(CpuBackend::new());
        let config = tiny_config();
        let (c, v) = (config.n_embd, config.vocab_size);
        let mut model = Decoder::random(backend.clone(), config.clone(), 5).unwrap();
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
        let (ln_f, wte) = (&acts.trunk.norm_f, &model.params.wte);
        backend.matmul_forward(&mut logits, ln_f, wte, None, n, c, v, WeightLayout::OutIn).unwrap();
        let (mut token_logp, mut lse) = (vec![0.0; n], vec![0.0; n]);
        backend.logsoftmax_gather_forward(&mut token_logp, &mut lse, &logits, &host.targets, n, v).unwrap();
        let mut full_seq_logp = vec![0.0; seqs];
        backend.sequence_logp_sum(&mut full_seq_logp, &token_logp, &batch.packing).unwrap();
        assert_same_bits("sequence log-probs", &seq_logp, &full_seq_logp);
        assert!(seq_logp[0] < 0.0 && seq_logp[1] == 0.0 && seq_logp[3] == 0.0);
        for (i, &t) in batch.target_rows.iter().enumerate() {
            let t = t as usize;
            assert_same_bits("logits row", &acts.head.logits[i * v..][..v], &logits[t * v..][..v]);
        }

        // Backward: dL/d(ln_f) of the full head, through ln_f's LayerNorm, vs the model's.
        let dseq: Vec<f32> = (0..seqs).map(|s| 0.3 - 0.2 * s as f32).collect();
        backend.logsoftmax_gather_backward(&mut logits, &lse, &host.targets, &dseq, &batch.packing, n, v).unwrap();
        let (mut dln_f, mut dwte) = (vec![f32::NAN; n * c], vec![0.0; v * c]);
        let layout = WeightLayout::OutIn;
        backend.matmul_backward(&mut dln_f, &mut dwte, None, &logits, ln_f, wte, n, c, v, layout).unwrap();
        let (mut dx, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
        let last = &acts.boundaries.last().unwrap().residual_3;
        let (w, mean, rstd) = (&model.params.norm_f.w, &acts.trunk.norm_f_mean, &acts.trunk.norm_f_rstd);
        backend.layernorm_backward(&mut dx, &mut dw, &mut db, &dln_f, last, w, mean, rstd, n, c).unwrap();
        model.backward(&batch, &dseq).unwrap();
        let scratch = model.scratch.as_ref().unwrap();
        for t in 0..n {
            let want = if host.targets[t] < 0 { vec![0.0; c] } else { dln_f[t * c..][..c].to_vec() };
            let i = batch.target_rows.iter().position(|&r| r as usize == t);
            let got = i.map_or(vec![0.0; c], |i| scratch.dnorm_f_rows[i * c..][..c].to_vec());
            assert_same_bits("dL/d(ln_f) row", &got, &want);
        }
        let grads = model.grads.as_ref().unwrap();
        assert_same_bits("dL/d(ln_f.weight)", &grads.norm_f.w, &dw);
        assert_same_bits("dL/d(ln_f.bias)", grads.norm_f.b.as_ref().unwrap(), &db);
    }

    /// A batch without a single target (every sequence all prompt): zero log-probs and zero
    /// gradients, no empty product launched, and the model still works on the next batch.
    fn batch_without_targets<B: Backend>(backend: Arc<B>) {
        let config = tiny_config();
        let mut model = Decoder::random(backend.clone(), config.clone(), 6).unwrap();
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
