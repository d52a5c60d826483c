//! Decoding: the next-token logits of one prefix ([`Decoder::last_logits`], the whole prefix through
//! the trunk), and of a batch of sequences that grow token by token with their keys and values kept
//! ([`KvCache`], [`Decoder::extend_cached`]).
//!
//! The cache keeps, per layer, each token's `qkv` row (RoPE applied), sequence `s` at rows
//! `s·(capacity + 1) + t`. A step runs its new tokens alone through the projections, the norms and
//! the MLP (`[M, ·]` for M new tokens in all); their `qkv` rows are added into the cache's zero rows
//! (`scatter_rows` then `add_inplace`), and the attention is the backend's packed causal attention
//! over the cache, whose segments are each sequence's tokens followed by a gap of unused zero rows
//! (at least one, so no segment is empty); the new tokens' rows of its output are gathered back.
//! Every op is one the training path runs, on every backend. What it costs: the projections and
//! the MLP on the new tokens only, as a KV cache should, but the attention over every cached row
//! again at each step (O(T²) per step, where a decode kernel would do O(T)): a dedicated
//! decode-attention kernel is left for later.

use anyhow::{ensure, Result};

use super::adapters::linear_forward;
use super::block::BlockKind;
use super::lora::Slot;
use super::{Decoder, DeviceBatch};
use crate::backend::{Backend, Packing, WeightLayout};
use crate::data::PackedBatch;

/// The keys and values (as whole `qkv` rows) of a batch of sequences, up to `capacity` tokens each.
pub struct KvCache<B: Backend> {
    capacity: usize,
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
        Ok(Self { capacity, lens: vec![0; sequences], layers })
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
        if let Some(window) = cfg.sliding_window {
            let longest = positions.iter().max().map_or(0, |&p| p as usize + 1);
            ensure!(longest <= window, "extend_cached: {longest} tokens exceed the sliding window of {window}");
        }
        for (s, toks) in new.iter().enumerate() {
            cache.lens[s] += toks.len();
        }
        // Each sequence's tokens, then its gap of unused rows (never empty: len ≤ capacity).
        let mut cu = vec![0i32];
        for &len in &cache.lens {
            cu.push(cu.last().unwrap() + len as i32);
            cu.push(cu.last().unwrap() + (stride - len) as i32);
        }
        let b = &*self.backend;
        let packing = Packing::new(b, &cu)?;
        let (kind, p, rope) = (BlockKind::of(cfg), &self.params, self.rope_freqs.as_ref());
        let (w, layout, m, r) = (kind.widths, kind.weights, tokens.len(), cache.lens.len() * stride);
        let c = w.c;
        let (token_ids, position_ids, row_ids) =
            (b.upload_ids(&tokens)?, b.upload_ids(&positions)?, b.upload_ids(&rows)?);
        let zeros = |len: usize| b.zeros(len);
        let (mut x, mut norm, mut mean, mut rstd) = (zeros(m * c)?, zeros(m * c)?, zeros(m)?, zeros(m)?);
        let (mut qkv, mut spread, mut att_all) = (zeros(m * w.qkv)?, zeros(r * w.qkv)?, zeros(r * w.att)?);
        let mut saved = zeros(b.attention_saved_len(&packing, cfg.n_head))?;
        let (mut atty, mut proj, mut residual_2) = (zeros(m * w.att)?, zeros(m * c)?, zeros(m * c)?);
        let (mut up, mut act, mut residual_3) = (zeros(m * w.up)?, zeros(m * w.hidden)?, zeros(m * c)?);

        b.embedding_forward(&mut x, &token_ids, &position_ids, &p.wte, p.wpe.as_ref(), m, c)?;
        kind.norm(b, &mut norm, &mut mean, &mut rstd, &x, &p.blocks[0].norm_1, m)?;
        for (l, wl) in p.blocks.iter().enumerate() {
            // The projections as the training forward runs them, LoRA's adapters included.
            let mut adapters = self.lora.as_mut().and_then(|lora| lora.block(l));
            linear_forward(b, &mut qkv, &norm, &wl.qkv, adapters.as_mut(), Slot::Qkv, m, c, w.qkv, layout)?;
            if let Some(freqs) = rope {
                b.rope_forward(&mut qkv, &position_ids, freqs, m, kind.qkv)?;
            }
            // Into the cache's zero rows, then attention over each sequence's cached rows.
            b.scatter_rows(&mut spread, &qkv, &row_ids, m, r, w.qkv)?;
            b.add_inplace(&mut cache.layers[l], &spread)?;
            b.attention_forward(&mut att_all, &mut saved, &cache.layers[l], &packing, kind.qkv)?;
            b.gather_rows(&mut atty, &att_all, &row_ids, m, r, w.att)?;
            linear_forward(b, &mut proj, &atty, &wl.o, adapters.as_mut(), Slot::O, m, w.att, c, layout)?;
            kind.residual_norm(b, &mut residual_2, &mut norm, &mut mean, &mut rstd, &x, &proj, &wl.norm_2, m)?;
            let adapted_up = adapters.as_ref().is_some_and(|a| a.adapts(Slot::Up));
            if kind.gelu && !adapted_up {
                let bias = wl.up.b.as_ref().expect("GPT-2's MLP has biases");
                b.matmul_bias_gelu_forward(&mut up, &mut act, &norm, &wl.up.w, bias, m, c, w.up)?;
            } else {
                linear_forward(b, &mut up, &norm, &wl.up, adapters.as_mut(), Slot::Up, m, c, w.up, layout)?;
                if kind.gelu {
                    b.gelu_forward(&mut act, &up)?;
                } else {
                    b.swiglu_forward(&mut act, &up, m, w.hidden)?;
                }
            }
            linear_forward(b, &mut proj, &act, &wl.down, adapters.as_mut(), Slot::Down, m, w.hidden, c, layout)?;
            let next = p.blocks.get(l + 1).map_or(&p.norm_f, |next| &next.norm_1);
            kind.residual_norm(b, &mut residual_3, &mut norm, &mut mean, &mut rstd, &residual_2, &proj, next, m)?;
            std::mem::swap(&mut x, &mut residual_3);
        }
        let (a, v) = (active.len(), vocab);
        let mut last_rows = zeros(a * c)?;
        b.gather_rows(&mut last_rows, &norm, &b.upload_ids(&last)?, a, m, c)?;
        let mut logits = zeros(a * v)?;
        b.matmul_forward(&mut logits, &last_rows, p.head(), None, a, c, v, WeightLayout::OutIn)?;
        let logits = b.download(&logits)?;
        Ok(active.into_iter().enumerate().map(|(i, s)| (s, logits[i * v..(i + 1) * v].to_vec())).collect())
    }
}
