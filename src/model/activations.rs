//! What the forward keeps for the backward, and the backward's scratch: each list written once
//! with its shapes, sized per batch and resized in place.
//!
//! Every `[N, ·]` tensor is token-major over the whole packed batch. The buffers are kept between
//! batches and resized in place when a batch's shape changes (the backend keeps their storage when
//! it is large enough), so batches whose shape changes every step cost no reallocation.
//!
//! A layer's activations come in two parts: its boundary ([`LayerBoundary`]: the first norm and the
//! block's output, `2·N·C` floats) and its interior ([`LayerInterior`]: everything in between, about
//! `14·N·C` in GPT-2). A trainable model keeps both for every layer ([`KeptLayers::All`]). With
//! activation checkpointing it keeps every boundary and one interior, which the backward recomputes
//! for each layer from its boundary and input ([`KeptLayers::Boundaries`]). A frozen model keeps two
//! boundaries and one interior, recycled: layer `l` writes boundary `l % 2` and reads its input from
//! the other one, which the layer before wrote ([`layer_input`]).

use anyhow::Result;

use super::config::DecoderConfig;
use super::tensor_list::tensor_list;
use crate::backend::Buffers;

/// The widths of a model's activations, from its configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Widths {
    /// The residual stream.
    pub(super) c: usize,
    /// A `qkv` row (`QkvLayout::width`).
    pub(super) qkv: usize,
    /// The attention's output, heads concatenated (`n_head · head_dim`).
    pub(super) att: usize,
    /// The MLP's up projection: GPT-2's 4C, the Llama family's gate and up side by side, 2F.
    pub(super) up: usize,
    /// The MLP's activation, the down projection's input: 4C, or F.
    pub(super) hidden: usize,
    /// LayerNorm keeps each row's mean for its backward; RMSNorm has none.
    pub(super) keeps_mean: bool,
}

impl Widths {
    pub(super) fn of(config: &DecoderConfig) -> Self {
        let layout = config.qkv_layout();
        let f = config.intermediate_size;
        let gpt2 = config.family.is_gpt2();
        Self {
            c: config.n_embd,
            qkv: layout.width(),
            att: layout.q_width(),
            up: if gpt2 { f } else { 2 * f },
            hidden: f,
            keeps_mean: gpt2,
        }
    }

    /// The length of a norm's saved mean for `n` rows (0 for RMSNorm).
    pub(super) fn mean_rows(&self, n: usize) -> usize {
        if self.keeps_mean {
            n
        } else {
            0
        }
    }
}

tensor_list! {
    /// What one block keeps at its boundary, for `n` tokens: its first norm (output, per-row mean
    /// (LayerNorm) and 1/std) and its output. Enough to recompute the rest of the block
    /// ([`LayerInterior`]) and to take its first norm's backward; `m` is `n` where the norms keep
    /// a mean, 0 where they do not.
    pub(super) struct LayerBoundary<T> over (n, m, c) {
        /// `[N, C]` the first norm's output, with its per-row mean (LayerNorm) and 1/std `[N]`.
        norm_1: [n, c],
        norm_1_mean: [m],
        norm_1_rstd: [n],
        /// `[N, C]` the block's output: `residual_2 + down(mlp_act)`.
        residual_3: [n, c],
    }
}

tensor_list! {
    /// The rest of what one block's forward keeps for its backward, for `n` tokens (and `saved`
    /// floats of attention state): everything between its first norm and its output.
    pub(super) struct LayerInterior<T> over (n, m, c, qkv, att, up, hidden, saved) {
        /// `[N, width]` q, k, v (RoPE applied, in the Llama family).
        qkv: [n, qkv],
        /// `[N, n_head · head_dim]` attention output, heads concatenated (before the output projection).
        atty: [n, att],
        /// Whatever the backend's attention keeps for its backward.
        att_saved: [saved],
        /// `[N, C]` residual stream after the attention half: `x + o(atty)`.
        residual_2: [n, c],
        norm_2: [n, c],
        norm_2_mean: [m],
        norm_2_rstd: [n],
        /// `[N, up]` the MLP's up projection (GELU input, or gate and up side by side) and
        /// `[N, hidden]` its activation (GELU, or SwiGLU).
        mlp_up: [n, up],
        mlp_act: [n, hidden],
    }
}

tensor_list! {
    /// The trunk's activations outside the blocks, for `n` tokens.
    pub(super) struct TrunkActivations<T> over (n, m, c) {
        /// `[N, C]` the embeddings: the input of block 0.
        encoded: [n, c],
        /// `[N, C]` scratch for the output projections before they join the residual stream.
        proj: [n, c],
        /// `[N, C]` the final norm's output, with its per-row mean (LayerNorm) and 1/std `[N]`.
        norm_f: [n, c],
        norm_f_mean: [m],
        norm_f_rstd: [n],
    }
}

tensor_list! {
    /// The LM head's buffers, sized by its `rows`, not the batch's tokens: the batch's `M` target
    /// rows, or in a frozen model its largest head chunk.
    pub(super) struct HeadActivations<T> over (rows, c, v) {
        /// `[M, C]` the rows of `norm_f` with a target, the head's input.
        norm_f_rows: [rows, c],
        /// `[M, V]` logits of those rows; the backward overwrites them with their gradient.
        logits: [rows, v],
        /// `[M]` log-prob of each target and each row's log-sum-exp.
        token_logp: [rows],
        lse: [rows],
    }
}

tensor_list! {
    /// The backward's gradients at the activations (`d.x` is dL/dx), for `n` tokens: sized exactly
    /// like the forward's activations, so that ops without a token count (GELU backward) see equal
    /// lengths.
    pub(super) struct ActivationGrads<T> over (n, c, qkv, att, up, hidden) {
        /// `[N, C]` dL/d(residual stream) at the current point of the backward.
        residual: [n, c],
        /// `[N, C]` gradient at a norm's output.
        norm: [n, c],
        /// `[N, att]` gradient at the attention output.
        atty: [n, att],
        qkv: [n, qkv],
        /// Gradients at the MLP's activation and at its up projection.
        mlp_act: [n, hidden],
        mlp_up: [n, up],
    }
}

/// How many layers' activations a model keeps (see the decoder's module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum KeptLayers {
    /// Every layer's boundary and interior: a trainable model's default.
    All,
    /// Every layer's boundary, one interior the backward recomputes layer by layer (activation
    /// checkpointing).
    Boundaries,
    /// Two boundaries and one interior, recycled: a frozen model needs a layer's input and output only.
    Two,
}

/// Forward activations for up to `tokens` tokens (and `saved` floats of attention state per layer).
pub(super) struct Activations<T> {
    tokens: usize,
    saved: usize,
    pub(super) kept: KeptLayers,
    pub(super) trunk: TrunkActivations<T>,
    /// Layer `l` uses boundary `l % boundaries.len()` and interior `l % interiors.len()`.
    pub(super) boundaries: Vec<LayerBoundary<T>>,
    pub(super) interiors: Vec<LayerInterior<T>>,
    /// Sized by the forward, for its head's rows.
    pub(super) head: HeadActivations<T>,
    /// `[S]` one head chunk's sequence log-probs (a frozen model's chunked head only), before they
    /// are added to the batch's.
    pub(super) chunk_seq_logp: T,
}

impl<T> Activations<T> {
    /// Empty activations for a model of `n_layer` layers keeping `kept` of them.
    pub(super) fn new<B: Buffers<Buf = T>>(b: &B, n_layer: usize, kept: KeptLayers) -> Result<Self> {
        let (boundaries, interiors) = match kept {
            KeptLayers::All => (n_layer, n_layer),
            KeptLayers::Boundaries => (n_layer, 1),
            KeptLayers::Two => (n_layer.min(2), 1),
        };
        Ok(Self {
            tokens: 0,
            saved: 0,
            kept,
            trunk: TrunkActivations::empty(b)?,
            boundaries: (0..boundaries).map(|_| LayerBoundary::empty(b)).collect::<Result<_>>()?,
            interiors: (0..interiors).map(|_| LayerInterior::empty(b)).collect::<Result<_>>()?,
            head: HeadActivations::empty(b)?,
            chunk_seq_logp: b.zeros(0)?,
        })
    }

    /// The number of tokens the activations are sized for.
    pub(super) fn tokens(&self) -> usize {
        self.tokens
    }

    /// Makes every buffer but the head's fit `tokens` tokens of widths `w` with `saved` floats of
    /// attention state per layer.
    pub(super) fn resize<B: Buffers<Buf = T>>(&mut self, b: &B, tokens: usize, w: &Widths, saved: usize) -> Result<()> {
        if (self.tokens, self.saved) == (tokens, saved) {
            return Ok(());
        }
        let (n, m) = (tokens, w.mean_rows(tokens));
        self.trunk.resize(b, n, m, w.c)?;
        for boundary in &mut self.boundaries {
            boundary.resize(b, n, m, w.c)?;
        }
        for interior in &mut self.interiors {
            interior.resize(b, n, m, w.c, w.qkv, w.att, w.up, w.hidden, saved)?;
        }
        (self.tokens, self.saved) = (tokens, saved);
        Ok(())
    }

    /// Every buffer held.
    pub(super) fn buffers(&self) -> Vec<&T> {
        let mut bufs: Vec<&T> = self.trunk.refs().into();
        bufs.extend(self.head.refs());
        bufs.push(&self.chunk_seq_logp);
        bufs.extend(self.boundaries.iter().flat_map(LayerBoundary::refs));
        bufs.extend(self.interiors.iter().flat_map(LayerInterior::refs));
        bufs
    }
}

/// Layer `l`'s input: the embeddings for layer 0, else layer `l - 1`'s output, in its boundary slot
/// (with two slots recycled, the one layer `l` does not use).
pub(super) fn layer_input<'a, T>(boundaries: &'a [LayerBoundary<T>], encoded: &'a T, l: usize) -> &'a T {
    if l == 0 {
        return encoded;
    }
    let slots = boundaries.len();
    assert_ne!((l - 1) % slots, l % slots, "layer {l}: {slots} boundary slot(s) cannot hold its input and output");
    &boundaries[(l - 1) % slots].residual_3
}

/// Mutable references to two different activation slots, `i` and `j`.
pub(super) fn two_slots_mut<T>(layers: &mut [T], i: usize, j: usize) -> (&mut T, &mut T) {
    assert_ne!(i, j, "two_slots_mut: slot {i} twice");
    if i < j {
        let (before, from) = layers.split_at_mut(j);
        (&mut before[i], &mut from[0])
    } else {
        let (before, from) = layers.split_at_mut(i);
        (&mut from[0], &mut before[j])
    }
}

/// The backward's scratch for up to `tokens` tokens. Allocated on the first backward only, so a
/// model used for inference (the reference) never holds it.
pub(super) struct BackwardScratch<T> {
    tokens: usize,
    pub(super) d: ActivationGrads<T>,
    /// `[M, C]` gradient at the LM head's input rows (sized by the backward, like the head's buffers).
    pub(super) dnorm_f_rows: T,
}

impl<T> BackwardScratch<T> {
    pub(super) fn new<B: Buffers<Buf = T>>(b: &B) -> Result<Self> {
        Ok(Self { tokens: 0, d: ActivationGrads::empty(b)?, dnorm_f_rows: b.zeros(0)? })
    }

    /// Makes the token-sized buffers fit `tokens` tokens of widths `w`.
    pub(super) fn resize<B: Buffers<Buf = T>>(&mut self, b: &B, tokens: usize, w: &Widths) -> Result<()> {
        if self.tokens != tokens {
            self.d.resize(b, tokens, w.c, w.qkv, w.att, w.up, w.hidden)?;
            self.tokens = tokens;
        }
        Ok(())
    }

    /// Every buffer held.
    pub(super) fn buffers(&self) -> Vec<&T> {
        let mut bufs: Vec<&T> = self.d.refs().into();
        bufs.push(&self.dnorm_f_rows);
        bufs
    }
}
