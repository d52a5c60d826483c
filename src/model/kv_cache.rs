//! Decoding: the next-token logits of one prefix ([`Decoder::last_logits`], the whole prefix through
//! the trunk), and of a batch of sequences that grow token by token with their keys and values kept
//! ([`KvCache`], [`Decoder::extend_cached`]).
//!
//! The cache keeps, per layer, each token's `qkv` row (RoPE applied), sequence `s` at rows
//! `s·(capacity + 1) + t`. A step runs its new tokens alone through the block forward the training
//! path runs (`block.rs`, LoRA's adapters included), `[M, ·]` for M new tokens in all; only the
//! attention differs ([`CachedAttention`]): the new rows go into the cache, and a decoding step (one
//! new token per sequence) attends with the decode-attention op, O(T) per token, while a prompt
//! runs the packed causal attention over the cache. Under a layer's sliding window both read only
//! the window (older keys stay in the cache, unread).

use anyhow::{ensure, Result};

use super::activations::LayerInterior;
use super::block::{block_interior_forward_with, mlp_down, BlockKind};
use super::{Decoder, DeviceBatch};
use crate::backend::{Backend, DecodeSpans, Packing, QkvLayout, WeightLayout, Window};
use crate::data::PackedBatch;

/// The keys and values (as whole `qkv` rows) of a batch of sequences, up to `capacity` tokens each.
pub struct KvCache<B: Backend> {
    capacity: usize,
    layout: QkvLayout,
    /// Tokens cached per sequence.
    lens: Vec<usize>,
    /// Per layer `[S·(capacity + 1), qkv width]`, zero where no token is.
    layers: Vec<B::Buf>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `sequences` sequences of up to `capacity` tokens each (at most the
    /// model's context).
    pub fn new(model: &Decoder<B>, sequences: usize, capacity: usize) -> Result<Self> {
        let cfg = model.config();
        ensure!(
            capacity <= cfg.n_positions,
            "kv cache: {capacity} tokens per sequence is more than the model's context of {} positions",
            cfg.n_positions
        );
        let rows = sequences * (capacity + 1) * cfg.qkv_layout().width();
        let layers = (0..cfg.n_layer).map(|_| model.backend().zeros(rows)).collect::<Result<_>>()?;
        Ok(Self { capacity, layout: cfg.qkv_layout(), lens: vec![0; sequences], layers })
    }

    /// Tokens cached for sequence `s`.
    pub fn len(&self, s: usize) -> usize {
        self.lens[s]
    }

    pub fn num_sequences(&self) -> usize {
        self.lens.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn stride(&self) -> usize {
        self.capacity + 1
    }
}

impl<B: Backend> Decoder<B> {
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
        b.gather_rows(&mut last_row, &acts.trunk.norm_f, &b.upload_ids(&[n as i32 - 1])?, 1, n, c)?;
        let mut logits = b.zeros(v)?;
        b.matmul_forward(&mut logits, &last_row, self.params.head(), None, 1, c, v, WeightLayout::OutIn)?;
        b.download(&logits)
    }

    /// Appends `new[s]` to sequence `s` of `cache` (an empty list leaves it as it is: a finished
    /// sequence) and returns, for each sequence given tokens, its index and the logits `[V]` after
    /// its last new token. A prompt goes in as one call; each generated token as the next.
    pub fn extend_cached(&mut self, cache: &mut KvCache<B>, new: &[Vec<i32>]) -> Result<Vec<(usize, Vec<f32>)>> {
        ensure!(
            new.len() == cache.num_sequences(),
            "extend_cached: {} token lists for a cache of {} sequences",
            new.len(),
            cache.num_sequences()
        );
        let cfg = &self.config;
        let (stride, vocab) = (cache.stride(), cfg.vocab_size);
        let (mut tokens, mut positions, mut rows, mut last, mut active) = (vec![], vec![], vec![], vec![], vec![]);
        for (s, toks) in new.iter().enumerate() {
            let len = cache.lens[s];
            ensure!(
                len + toks.len() <= cache.capacity,
                "extend_cached: sequence {s} would hold {} tokens, the cache {}",
                len + toks.len(),
                cache.capacity
            );
            for (i, &t) in toks.iter().enumerate() {
                ensure!(t >= 0 && (t as usize) < vocab, "extend_cached: token id {t} is outside the vocabulary");
                tokens.push(t);
                positions.push((len + i) as i32);
                rows.push((s * stride + len + i) as i32);
            }
            if !toks.is_empty() {
                last.push(tokens.len() as i32 - 1);
                active.push(s);
            }
        }
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        for (s, toks) in new.iter().enumerate() {
            cache.lens[s] += toks.len();
        }
        let b = &*self.backend;
        let mut attention = CachedAttention::new(b, cache, new, &rows)?;
        let (kind, p, rope) = (BlockKind::of(cfg), &self.params, self.rope_freqs.as_ref());
        let (w, m, c) = (kind.widths, tokens.len(), kind.widths.c);
        let (token_ids, position_ids) = (b.upload_ids(&tokens)?, b.upload_ids(&positions)?);
        let zeros = |len: usize| b.zeros(len);
        let mean_rows = w.mean_rows(m);
        let (mut x, mut norm, mut mean, mut rstd) = (zeros(m * c)?, zeros(m * c)?, zeros(mean_rows)?, zeros(m)?);
        let (mut proj, mut residual_3) = (zeros(m * c)?, zeros(m * c)?);
        let mut a = LayerInterior::empty(b)?;
        a.resize(b, m, mean_rows, c, w.qkv, w.att, w.up, w.hidden, 0)?;

        b.embedding_forward(&mut x, &token_ids, &position_ids, &p.wte, p.wpe.as_ref(), m, c)?;
        kind.norm(b, &mut norm, &mut mean, &mut rstd, &x, &p.blocks[0].norm_1, m)?;
        for (l, wl) in p.blocks.iter().enumerate() {
            // The block as the training forward runs it, LoRA's adapters included; only the
            // attention differs.
            let mut adapters = self.lora.as_mut().and_then(|lora| lora.block(l));
            let kind = kind.layer(cfg, l);
            let attend = |a: &mut LayerInterior<B::Buf>| attention.attend(b, a, l, kind.qkv, kind.window);
            let tokens = (m, &position_ids);
            block_interior_forward_with(
                b,
                &kind,
                wl,
                &x,
                &norm,
                &mut a,
                &mut proj,
                tokens,
                rope,
                adapters.as_mut(),
                attend,
            )?;
            mlp_down(b, &kind, wl, &mut proj, &a, adapters.as_mut(), m)?;
            let next = p.blocks.get(l + 1).map_or(&p.norm_f, |next| &next.norm_1);
            kind.residual_norm(b, &mut residual_3, &mut norm, &mut mean, &mut rstd, &a.residual_2, &proj, next, m)?;
            std::mem::swap(&mut x, &mut residual_3);
        }
        let (n_active, v) = (active.len(), vocab);
        let mut last_rows = zeros(n_active * c)?;
        b.gather_rows(&mut last_rows, &norm, &b.upload_ids(&last)?, n_active, m, c)?;
        let mut logits = zeros(n_active * v)?;
        b.matmul_forward(&mut logits, &last_rows, p.head(), None, n_active, c, v, WeightLayout::OutIn)?;
        let logits = b.download(&logits)?;
        Ok(active.into_iter().enumerate().map(|(i, s)| (s, logits[i * v..(i + 1) * v].to_vec())).collect())
    }
}

/// A step's attention against the cache: the new tokens' `qkv` rows go into the cache's zero rows
/// (`scatter_rows` then `add_inplace`); then, when every sequence given tokens adds one (a decoding
/// step), the decode-attention op over each sequence's cached rows, else (a prompt) the packed
/// causal attention over the whole cache, whose segments are each sequence's tokens followed by a
/// gap of unused zero rows (at least one, so no segment is empty), the new tokens' rows of its
/// output gathered back.
struct CachedAttention<'c, B: Backend> {
    cache: &'c mut KvCache<B>,
    /// `[M]` the new tokens' cache rows.
    rows: B::Ids,
    spread: B::Buf,
    path: CachedPath<B>,
}

enum CachedPath<B: Backend> {
    Decode(DecodeSpans<B>),
    Packed { packing: Packing<B>, att_all: B::Buf, saved: B::Buf },
}

impl<'c, B: Backend> CachedAttention<'c, B> {
    /// For a step that has added `new[s]` to each sequence `s` (the cache's lengths already counting
    /// them) at cache rows `rows`.
    fn new(b: &B, cache: &'c mut KvCache<B>, new: &[Vec<i32>], rows: &[i32]) -> Result<Self> {
        let (stride, layout) = (cache.stride(), cache.layout);
        let r = cache.lens.len() * stride;
        let one_each = new.iter().all(|toks| toks.len() <= 1);
        let path = if one_each {
            let (mut starts, mut lens) = (Vec::new(), Vec::new());
            for (s, _) in new.iter().enumerate().filter(|(_, toks)| !toks.is_empty()) {
                starts.push((s * stride) as i32);
                lens.push(cache.lens[s] as i32);
            }
            CachedPath::Decode(DecodeSpans::new(b, &starts, &lens)?)
        } else {
            let mut cu = vec![0i32];
            for &len in &cache.lens {
                cu.push(cu.last().unwrap() + len as i32);
                cu.push(cu.last().unwrap() + (stride - len) as i32);
            }
            let packing = Packing::new(b, &cu)?;
            let saved = b.zeros(b.attention_saved_len(&packing, layout.n_head))?;
            CachedPath::Packed { packing, att_all: b.zeros(r * layout.q_width())?, saved }
        };
        Ok(Self { rows: b.upload_ids(rows)?, spread: b.zeros(r * layout.width())?, cache, path })
    }

    /// Layer `l`: `a.qkv`'s rows into the cache, then `a.atty`, under the layer's `window` (a
    /// decoding step reads only the window's rows; the older ones stay in the cache).
    fn attend(
        &mut self,
        b: &B,
        a: &mut LayerInterior<B::Buf>,
        l: usize,
        layout: QkvLayout,
        window: Window,
    ) -> Result<()> {
        let (m, r, width) =
            (b.buf_len(&a.qkv) / layout.width(), b.buf_len(&self.spread) / layout.width(), layout.width());
        let layer = &mut self.cache.layers[l];
        b.scatter_rows(&mut self.spread, &a.qkv, &self.rows, m, r, width)?;
        b.add_inplace(layer, &self.spread)?;
        match &mut self.path {
            CachedPath::Decode(spans) => b.decode_attention_forward(&mut a.atty, &a.qkv, layer, spans, layout, window),
            CachedPath::Packed { packing, att_all, saved } => {
                b.attention_forward(att_all, saved, layer, packing, layout, window)?;
                b.gather_rows(&mut a.atty, att_all, &self.rows, m, r, layout.q_width())
            }
        }
    }
}
