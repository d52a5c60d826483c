//! GPT-2 forward and backward over a packed batch, generic over the backend.
//!
//! The model reads like llm.c's `gpt2_forward` / `gpt2_backward`: pre-LayerNorm blocks
//! (`x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`), a final LayerNorm, and the LM head tied to the
//! token embedding, followed by the fused log-softmax-gather that turns logits into per-sequence
//! log-probs. Every tensor is token-major over the whole packed batch; attention alone looks at
//! the sequence boundaries.
//!
//! Activation buffers are kept between batches and reallocated only when a batch does not fit
//! them (see `fits`).

use std::path::Path;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{checkpoint, Gpt2Config, HostWeights};
use crate::backend::{Backend, Packing, WeightLayout};
use crate::data::PackedBatch;

/// A packed batch uploaded to a backend.
pub struct DeviceBatch<B: Backend> {
    pub tokens: B::Ids,
    pub positions: B::Ids,
    pub targets: B::Ids,
    pub packing: Packing<B>,
    /// Largest token id, position and target of the batch, checked against the model's vocabulary
    /// and context length before a forward (on the host, so no device read-back is needed).
    pub max_token: usize,
    pub max_position: usize,
    pub max_target: i32,
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
        Ok(Self {
            tokens: backend.upload_ids(&batch.tokens)?,
            positions: backend.upload_ids(&batch.positions)?,
            targets: backend.upload_ids(&batch.targets)?,
            packing: Packing::new(backend, &batch.cu_seqlens)?,
            max_token: batch.tokens.iter().copied().max().unwrap_or(0) as usize,
            max_position: batch.positions.iter().copied().max().unwrap_or(0) as usize,
            max_target: batch.targets.iter().copied().max().unwrap_or(-1),
        })
    }
    pub fn num_tokens(&self) -> usize {
        self.packing.num_tokens()
    }
    pub fn num_seqs(&self) -> usize {
        self.packing.num_seqs()
    }
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
    layers: Vec<LayerActivations<T>>,
    /// `[N, C]` scratch for the output projections before they join the residual stream.
    proj: T,
    ln_f: T,
    ln_f_mean: T,
    ln_f_rstd: T,
    /// `[N, V]` logits; the backward overwrites them with their gradient.
    logits: T,
    /// `[N]` log-prob of each target and each row's log-sum-exp.
    token_logp: T,
    lse: T,
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
}

/// A GPT-2 model on a backend: parameters, their gradients, and the activations of the last
/// forward pass (kept for the backward).
pub struct Gpt2<B: Backend> {
    backend: Arc<B>,
    config: Gpt2Config,
    /// HF name and shape of each parameter, in `Params::ordered` order.
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    params: Params<B::Buf>,
    grads: Params<B::Buf>,
    acts: Option<Activations<B::Buf>>,
    scratch: Option<BackwardScratch<B::Buf>>,
    /// `[S]` sequence log-probs of the last forward.
    seq_logp: B::Buf,
    /// (tokens, sequences) of the last forward whose activations and logits a backward may use.
    pending_backward: Option<(usize, usize)>,
}

impl<B: Backend> Gpt2<B> {
    /// GPT-2's initialisation: N(0, 0.02) weights, residual projections scaled by 1/√(2L), zero
    /// biases, unit LayerNorm gains. Deterministic in `seed`.
    pub fn random(backend: Arc<B>, config: Gpt2Config, seed: u64) -> Result<Self> {
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
        Self::from_host(backend, &HostWeights { config, tensors })
    }

    /// Uploads host weights; their names and shapes must be exactly those of their config.
    pub fn from_host(backend: Arc<B>, weights: &HostWeights) -> Result<Self> {
        weights.validate()?;
        let config = weights.config.clone();
        let (names, shapes): (Vec<String>, Vec<Vec<usize>>) = config.parameter_shapes().into_iter().unzip();
        let mut params = Vec::with_capacity(names.len());
        let mut grads = Vec::with_capacity(names.len());
        for (name, shape) in names.iter().zip(&shapes) {
            let data = &weights.tensors[name].1;
            params.push(backend.upload(data).with_context(|| format!("uploading `{name}`"))?);
            grads.push(
                backend
                    .zeros(shape.iter().product())
                    .with_context(|| format!("allocating the gradient of `{name}`"))?,
            );
        }
        let seq_logp = backend.zeros(0)?;
        Ok(Self {
            params: Params::from_ordered(params, config.n_layer),
            grads: Params::from_ordered(grads, config.n_layer),
            backend,
            config,
            names,
            shapes,
            acts: None,
            scratch: None,
            seq_logp,
            pending_backward: None,
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

    /// Reads a HF model directory.
    pub fn load(backend: Arc<B>, dir: &Path) -> Result<Self> {
        let weights = checkpoint::load_dir(dir)?;
        Self::from_host(backend, &weights)
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

    /// HF name and shape of every parameter, in the order of `params_and_grads_mut` and `grads`.
    pub fn parameter_shapes(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.names.iter().map(String::as_str).zip(self.shapes.iter().map(Vec::as_slice))
    }

    /// Forward through the LM head and the fused log-softmax-gather; returns the per-sequence
    /// log-probs `[S]` and keeps what the backward needs.
    pub fn forward(&mut self, batch: &DeviceBatch<B>) -> Result<&B::Buf> {
        self.forward_trunk(batch)?;
        let (n, c, v) = (batch.num_tokens(), self.config.n_embd, self.config.vocab_size);
        let b = &*self.backend;
        let p = &self.params;
        let acts = self.acts.as_mut().expect("forward_trunk allocates the activations");

        // LM head, tied to the token embedding: logits = ln_f · wteᵀ.
        b.matmul_forward(&mut acts.logits, &acts.ln_f, &p.wte, None, n, c, v, WeightLayout::OutIn)?;
        b.logsoftmax_gather_forward(&mut acts.token_logp, &mut acts.lse, &acts.logits, &batch.targets, n, v)?;
        let num_seqs = batch.num_seqs();
        if b.buf_len(&self.seq_logp) != num_seqs {
            self.seq_logp = b.zeros(num_seqs)?;
        }
        b.sequence_logp_sum(&mut self.seq_logp, &acts.token_logp, &batch.packing)?;
        self.pending_backward = Some((n, num_seqs));
        Ok(&self.seq_logp)
    }

    /// Given dL/d(seq logp) `[S]`, accumulates every parameter gradient. Must follow `forward`
    /// on the same batch.
    pub fn backward(&mut self, batch: &DeviceBatch<B>, dseq: &B::Buf) -> Result<()> {
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
        let (p, g) = (&self.params, &mut self.grads);
        let acts = self.acts.as_mut().expect("a forward allocated the activations");
        let s = self.scratch.as_mut().expect("ensure_scratch allocated the scratch");
        use WeightLayout::InOut;

        // dlogits, in place, then the LM head: dL/d(ln_f) and the head's share of dL/d(wte).
        b.logsoftmax_gather_backward(&mut acts.logits, &acts.lse, &batch.targets, dseq, &batch.packing, n, v)?;
        b.matmul_backward(
            &mut s.dln,
            &mut g.wte,
            None,
            &acts.logits,
            &acts.ln_f,
            &p.wte,
            n,
            c,
            v,
            WeightLayout::OutIn,
        )?;
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
    pub fn params_and_grads_mut(&mut self) -> Vec<(&str, &mut B::Buf, &B::Buf)> {
        self.names
            .iter()
            .map(String::as_str)
            .zip(self.params.ordered_mut())
            .zip(self.grads.ordered())
            .map(|((name, param), grad)| (name, param, grad))
            .collect()
    }

    /// Every parameter tensor, in the order of `params_and_grads_mut`.
    pub fn params(&self) -> Vec<&B::Buf> {
        self.params.ordered()
    }

    /// Every gradient tensor, in the order of `params_and_grads_mut`.
    pub fn grads(&self) -> Vec<&B::Buf> {
        self.grads.ordered()
    }

    pub fn zero_grad(&mut self) -> Result<()> {
        for g in self.grads.ordered_mut() {
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
        let ln_f = b.download(&acts.ln_f)?;
        let last_row = b.upload(&ln_f[(n - 1) * c..n * c])?;
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
        for l in 0..cfg.n_layer {
            let (done, rest) = acts.layers.split_at_mut(l);
            let a = &mut rest[0];
            let x = if l == 0 { &acts.encoded } else { &done[l - 1].residual_3 };
            let w = &p.blocks[l];
            // Attention half: residual_2 = x + c_proj(attention(c_attn(ln_1(x)))).
            b.layernorm_forward(&mut a.ln_1, &mut a.ln_1_mean, &mut a.ln_1_rstd, x, &w.ln_1_w, &w.ln_1_b, n, c, eps)?;
            b.matmul_forward(&mut a.qkv, &a.ln_1, &w.c_attn_w, Some(&w.c_attn_b), n, c, 3 * c, InOut)?;
            b.attention_forward(&mut a.atty, &mut a.att_saved, &a.qkv, &batch.packing, nh, c)?;
            b.matmul_forward(&mut acts.proj, &a.atty, &w.c_proj_w, Some(&w.c_proj_b), n, c, c, InOut)?;
            b.residual_forward(&mut a.residual_2, x, &acts.proj)?;
            // MLP half: residual_3 = residual_2 + mlp_proj(gelu(c_fc(ln_2(residual_2)))).
            b.layernorm_forward(
                &mut a.ln_2,
                &mut a.ln_2_mean,
                &mut a.ln_2_rstd,
                &a.residual_2,
                &w.ln_2_w,
                &w.ln_2_b,
                n,
                c,
                eps,
            )?;
            b.matmul_bias_gelu_forward(&mut a.fch, &mut a.fch_gelu, &a.ln_2, &w.c_fc_w, &w.c_fc_b, n, c, 4 * c)?;
            b.matmul_forward(&mut acts.proj, &a.fch_gelu, &w.mlp_proj_w, Some(&w.mlp_proj_b), n, 4 * c, c, InOut)?;
            b.residual_forward(&mut a.residual_3, &a.residual_2, &acts.proj)?;
        }
        let last = &acts.layers.last().expect("n_layer > 0").residual_3;
        b.layernorm_forward(
            &mut acts.ln_f,
            &mut acts.ln_f_mean,
            &mut acts.ln_f_rstd,
            last,
            &p.ln_f_w,
            &p.ln_f_b,
            n,
            c,
            eps,
        )?;
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
            let layers = (0..self.config.n_layer).map(|_| LayerActivations::empty(b)).collect::<Result<_>>()?;
            self.acts = Some(Activations::empty(b, layers)?);
        }
        let acts = self.acts.as_mut().expect("allocated above");
        let (n, c, v) = (tokens, self.config.n_embd, self.config.vocab_size);
        for (buf, len) in acts.buffers_mut(n, c, v, saved) {
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
            logits: b.zeros(0)?,
            token_logp: b.zeros(0)?,
            lse: b.zeros(0)?,
        })
    }

    /// Every buffer (the layers' too) with its length for `n` tokens.
    fn buffers_mut(&mut self, n: usize, c: usize, v: usize, saved: usize) -> Vec<(&mut T, usize)> {
        let mut bufs = vec![
            (&mut self.encoded, n * c),
            (&mut self.proj, n * c),
            (&mut self.ln_f, n * c),
            (&mut self.ln_f_mean, n),
            (&mut self.ln_f_rstd, n),
            (&mut self.logits, n * v),
            (&mut self.token_logp, n),
            (&mut self.lse, n),
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
        })
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
