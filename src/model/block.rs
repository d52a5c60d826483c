//! One block of the decoder, forward and backward, and the LM head: what `decoder.rs` runs per
//! layer. [`BlockKind`] holds the family's choices (norm, MLP, weight layout); the block's products
//! go through `adapters.rs` (`linear_forward`, `linear_backward`), which adds LoRA's when a
//! model has adapters.

use anyhow::Result;

use super::activations::{ActivationGrads, HeadActivations, LayerBoundary, LayerInterior, Widths};
use super::adapters::{input_gradient, linear_backward, linear_forward, BlockLora};
use super::batch::DeviceBatch;
use super::lora::Slot;
use super::params::{BlockParams, Linear, Norm, Params};
use super::DecoderConfig;
use crate::backend::{Backend, QkvLayout, WeightLayout, Window};

/// What a family's blocks are made of, decided once from its configuration.
#[derive(Clone, Copy)]
pub(super) struct BlockKind {
    /// LayerNorm (with bias) or RMSNorm.
    pub(super) layernorm: bool,
    /// GELU (tanh) MLP, or SwiGLU.
    pub(super) gelu: bool,
    /// Every projection's weight layout.
    pub(super) weights: WeightLayout,
    pub(super) qkv: QkvLayout,
    /// The attention's sliding window: none from [`BlockKind::of`], layer `l`'s from
    /// [`BlockKind::layer`].
    pub(super) window: Window,
    pub(super) widths: Widths,
    pub(super) eps: f32,
}

impl BlockKind {
    pub(super) fn of(config: &DecoderConfig) -> Self {
        let gpt2 = config.family.is_gpt2();
        Self {
            layernorm: gpt2,
            gelu: gpt2,
            weights: if gpt2 { WeightLayout::InOut } else { WeightLayout::OutIn },
            qkv: config.qkv_layout(),
            window: None,
            widths: Widths::of(config),
            eps: config.norm_eps,
        }
    }

    /// Layer `l`'s blocks: these, with the layer's attention window.
    pub(super) fn layer(&self, config: &DecoderConfig, l: usize) -> Self {
        Self { window: config.layer_window(l), ..*self }
    }

    /// `out = norm(inp)`, saving the row statistics the backward needs.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn norm<B: Backend>(
        &self,
        b: &B,
        out: &mut B::Buf,
        mean: &mut B::Buf,
        rstd: &mut B::Buf,
        inp: &B::Buf,
        w: &Norm<B::Buf>,
        n: usize,
    ) -> Result<()> {
        let (c, eps) = (self.widths.c, self.eps);
        match (&w.b, self.layernorm) {
            (Some(bias), true) => b.layernorm_forward(out, mean, rstd, inp, &w.w, bias, n, c, eps),
            (None, false) => b.rmsnorm_forward(out, rstd, inp, &w.w, n, c, eps),
            _ => unreachable!("the schema gives LayerNorm a bias and RMSNorm none"),
        }
    }

    /// `residual = a + r`, then `out = norm(residual)`, fused.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn residual_norm<B: Backend>(
        &self,
        b: &B,
        residual: &mut B::Buf,
        out: &mut B::Buf,
        mean: &mut B::Buf,
        rstd: &mut B::Buf,
        a: &B::Buf,
        r: &B::Buf,
        w: &Norm<B::Buf>,
        n: usize,
    ) -> Result<()> {
        let (c, eps) = (self.widths.c, self.eps);
        match (&w.b, self.layernorm) {
            (Some(bias), true) => b.residual_layernorm_forward(residual, out, mean, rstd, a, r, &w.w, bias, n, c, eps),
            (None, false) => b.residual_rmsnorm_forward(residual, out, rstd, a, r, &w.w, n, c, eps),
            _ => unreachable!("the schema gives LayerNorm a bias and RMSNorm none"),
        }
    }

    /// Accumulates into `dinp` and the norm's gradients.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn norm_backward<B: Backend>(
        &self,
        b: &B,
        dinp: &mut B::Buf,
        g: &mut Norm<B::Buf>,
        dout: &B::Buf,
        inp: &B::Buf,
        w: &Norm<B::Buf>,
        mean: &B::Buf,
        rstd: &B::Buf,
        n: usize,
    ) -> Result<()> {
        let c = self.widths.c;
        match (&mut g.b, self.layernorm) {
            (Some(dbias), true) => b.layernorm_backward(dinp, &mut g.w, dbias, dout, inp, &w.w, mean, rstd, n, c),
            (None, false) => b.rmsnorm_backward(dinp, &mut g.w, dout, inp, &w.w, rstd, n, c),
            _ => unreachable!("the schema gives LayerNorm a bias and RMSNorm none"),
        }
    }
}

/// Block `l` between its first norm (given, with the block's input `x`) and its output, over a
/// packed batch whose attention is causal within each sequence: [`block_interior_forward_with`]
/// with the backend's packed attention. The forward runs it once per layer; a checkpointed backward
/// runs it again from the kept boundary.
#[allow(clippy::too_many_arguments)]
pub(super) fn block_interior_forward<B: Backend>(
    b: &B,
    kind: &BlockKind,
    wl: &BlockParams<B::Buf>,
    x: &B::Buf,
    norm_1: &B::Buf,
    a: &mut LayerInterior<B::Buf>,
    proj: &mut B::Buf,
    batch: &DeviceBatch<B>,
    rope_freqs: Option<&B::Buf>,
    lora: Option<&mut BlockLora<'_, B>>,
) -> Result<()> {
    let tokens = (batch.num_tokens(), &batch.positions);
    let packed = |a: &mut LayerInterior<B::Buf>| {
        b.attention_forward(&mut a.atty, &mut a.att_saved, &a.qkv, &batch.packing, kind.qkv, kind.window)
    };
    block_interior_forward_with(b, kind, wl, x, norm_1, a, proj, tokens, rope_freqs, lora, packed)
}

/// The one block forward between the first norm and the MLP's down projection, for `n` tokens at
/// `positions`: q, k, v, RoPE, then `attend` (reads `a.qkv`, writes `a.atty`: the packed causal
/// attention of a batch, or a decoding step's attention against its KV cache, `kv_cache.rs`), the
/// output projection joining the residual stream (`residual_2`, fused with `norm_2`), then the
/// MLP's up projection and activation. `proj` is scratch. LoRA's adapters join every product.
#[allow(clippy::too_many_arguments)]
pub(super) fn block_interior_forward_with<B: Backend>(
    b: &B,
    kind: &BlockKind,
    wl: &BlockParams<B::Buf>,
    x: &B::Buf,
    norm_1: &B::Buf,
    a: &mut LayerInterior<B::Buf>,
    proj: &mut B::Buf,
    (n, positions): (usize, &B::Ids),
    rope_freqs: Option<&B::Buf>,
    mut lora: Option<&mut BlockLora<'_, B>>,
    attend: impl FnOnce(&mut LayerInterior<B::Buf>) -> Result<()>,
) -> Result<()> {
    let (w, layout) = (kind.widths, kind.weights);
    let c = w.c;
    linear_forward(b, &mut a.qkv, norm_1, &wl.qkv, lora.as_deref_mut(), Slot::Qkv, n, c, w.qkv, layout)?;
    if let Some(freqs) = rope_freqs {
        b.rope_forward(&mut a.qkv, positions, freqs, n, kind.qkv)?;
    }
    attend(a)?;
    linear_forward(b, proj, &a.atty, &wl.o, lora.as_deref_mut(), Slot::O, n, w.att, c, layout)?;
    let (norm_2, mean_2, rstd_2) = (&mut a.norm_2, &mut a.norm_2_mean, &mut a.norm_2_rstd);
    kind.residual_norm(b, &mut a.residual_2, norm_2, mean_2, rstd_2, x, proj, &wl.norm_2, n)?;
    // MLP: act(up(norm_2(residual_2))); the down projection is [`mlp_down`], the caller's.
    // (An adapter on GPT-2's c_fc joins the product before the GELU: no fused epilogue then.)
    let adapted_up = lora.as_ref().is_some_and(|l| l.adapts(Slot::Up));
    if kind.gelu && !adapted_up {
        let bias = wl.up.b.as_ref().expect("GPT-2's MLP has biases");
        b.matmul_bias_gelu_forward(&mut a.mlp_up, &mut a.mlp_act, &a.norm_2, &wl.up.w, bias, n, c, w.up)
    } else {
        linear_forward(b, &mut a.mlp_up, &a.norm_2, &wl.up, lora, Slot::Up, n, c, w.up, layout)?;
        if kind.gelu {
            b.gelu_forward(&mut a.mlp_act, &a.mlp_up)
        } else {
            b.swiglu_forward(&mut a.mlp_act, &a.mlp_up, n, w.hidden)
        }
    }
}

/// The MLP's down projection of `n` tokens' `a.mlp_act` into `proj` (LoRA's adapter included),
/// before it joins the residual stream.
pub(super) fn mlp_down<B: Backend>(
    b: &B,
    kind: &BlockKind,
    wl: &BlockParams<B::Buf>,
    proj: &mut B::Buf,
    a: &LayerInterior<B::Buf>,
    lora: Option<&mut BlockLora<'_, B>>,
    n: usize,
) -> Result<()> {
    let w = kind.widths;
    linear_forward(b, proj, &a.mlp_act, &wl.down, lora, Slot::Down, n, w.hidden, w.c, kind.weights)
}

/// The LM head on `rows` rows of `norm_f` (`target_rows`, with their `targets`): gathers them,
/// then `logits = norm_f_rows · weightᵀ` (`weight [V, C]`: the head's, or the token embedding it is
/// tied to) and their target log-probs and log-sum-exps (and into `squares`, when given, each row's
/// `log Σ_v p_v²`). Buffers sized by `HeadActivations::resize`; `rows > 0`.
#[allow(clippy::too_many_arguments)]
pub(super) fn lm_head<B: Backend>(
    b: &B,
    head: &mut HeadActivations<B::Buf>,
    norm_f: &B::Buf,
    weight: &B::Buf,
    target_rows: &B::Ids,
    targets: &B::Ids,
    squares: Option<&mut B::Buf>,
    rows: usize,
    n: usize,
    c: usize,
    v: usize,
) -> Result<()> {
    b.gather_rows(&mut head.norm_f_rows, norm_f, target_rows, rows, n, c)?;
    // f32 logits whatever the precision: a bf16 step at logits of 30–120 is 0.25–0.5 nats.
    b.matmul_forward_f32_out(&mut head.logits, &head.norm_f_rows, weight, rows, c, v, WeightLayout::OutIn)?;
    let (token_logp, lse, logits) = (&mut head.token_logp, &mut head.lse, &head.logits);
    match squares {
        Some(squares) => b.logsoftmax_gather_forward_sq(token_logp, lse, squares, logits, targets, rows, v),
        None => b.logsoftmax_gather_forward(token_logp, lse, logits, targets, rows, v),
    }
}

/// Where a block's parameter gradients go: its own, or (a frozen base under LoRA) nowhere but the
/// norms' weight gradients, which their kernels compute on the way, into one scratch norm.
pub(super) enum BlockGrads<'a, T> {
    Full(&'a mut BlockParams<T>),
    Frozen(&'a mut Norm<T>),
}

impl<T> BlockGrads<'_, T> {
    fn linear(&mut self, pick: impl Fn(&mut BlockParams<T>) -> &mut Linear<T>) -> Option<&mut Linear<T>> {
        match self {
            Self::Full(g) => Some(pick(&mut **g)),
            Self::Frozen(_) => None,
        }
    }
    fn norm(&mut self, pick: impl Fn(&mut BlockParams<T>) -> &mut Norm<T>) -> &mut Norm<T> {
        match self {
            Self::Full(g) => pick(&mut **g),
            Self::Frozen(sink) => sink,
        }
    }
}

/// The gradient of block `l` (its input `x`, its kept boundary `bnd`, its interior `a`), given
/// dL/d(its output) in `d.residual`: accumulates the block's parameter gradients into `gl` (and its
/// adapters' into theirs) and leaves dL/dx in `d.residual` (a norm's backward accumulates into its
/// input's gradient, which is how the residual stream gathers its two branches without a separate add).
#[allow(clippy::too_many_arguments)]
pub(super) fn block_backward<B: Backend>(
    b: &B,
    kind: &BlockKind,
    wl: &BlockParams<B::Buf>,
    mut gl: BlockGrads<'_, B::Buf>,
    x: &B::Buf,
    bnd: &LayerBoundary<B::Buf>,
    a: &LayerInterior<B::Buf>,
    d: &mut ActivationGrads<B::Buf>,
    batch: &DeviceBatch<B>,
    rope: Option<&B::Buf>,
    mut lora: Option<&mut BlockLora<'_, B>>,
) -> Result<()> {
    let (n, w, layout) = (batch.num_tokens(), kind.widths, kind.weights);
    let c = w.c;
    // residual_3 = residual_2 + mlp: dresidual flows unchanged to residual_2 and into the MLP.
    let g = gl.linear(|g| &mut g.down);
    let (mlp_act, l) = (&a.mlp_act, lora.as_deref_mut());
    linear_backward(b, &mut d.mlp_act, g, &d.residual, mlp_act, &wl.down, l, Slot::Down, n, w.hidden, c, layout)?;
    if kind.gelu {
        b.gelu_backward(&mut d.mlp_up, &a.mlp_up, &d.mlp_act)?;
    } else {
        b.swiglu_backward(&mut d.mlp_up, &a.mlp_up, &d.mlp_act, n, w.hidden)?;
    }
    let (g, l) = (gl.linear(|g| &mut g.up), lora.as_deref_mut());
    linear_backward(b, &mut d.norm, g, &d.mlp_up, &a.norm_2, &wl.up, l, Slot::Up, n, c, w.up, layout)?;
    let (mean, rstd, gn) = (&a.norm_2_mean, &a.norm_2_rstd, gl.norm(|g| &mut g.norm_2));
    kind.norm_backward(b, &mut d.residual, gn, &d.norm, &a.residual_2, &wl.norm_2, mean, rstd, n)?;
    // residual_2 = x + attn: the same again for the attention half.
    let (g, l) = (gl.linear(|g| &mut g.o), lora.as_deref_mut());
    linear_backward(b, &mut d.atty, g, &d.residual, &a.atty, &wl.o, l, Slot::O, n, w.att, c, layout)?;
    let (packing, window) = (&batch.packing, kind.window);
    b.attention_backward(&mut d.qkv, &d.atty, &a.qkv, &a.atty, &a.att_saved, packing, kind.qkv, window)?;
    if let Some(freqs) = rope {
        b.rope_backward(&mut d.qkv, &batch.positions, freqs, n, kind.qkv)?;
    }
    let (g, l) = (gl.linear(|g| &mut g.qkv), lora);
    linear_backward(b, &mut d.norm, g, &d.qkv, &bnd.norm_1, &wl.qkv, l, Slot::Qkv, n, c, w.qkv, layout)?;
    let (mean, rstd, gn) = (&bnd.norm_1_mean, &bnd.norm_1_rstd, gl.norm(|g| &mut g.norm_1));
    kind.norm_backward(b, &mut d.residual, gn, &d.norm, x, &wl.norm_1, mean, rstd, n)?;
    Ok(())
}

/// The LM head's backward on `rows` target rows: dL/d(rows) `[rows, C]`, and the head's weight
/// gradient (the token embedding's, when tied) unless the base is frozen (`g` none).
#[allow(clippy::too_many_arguments)]
pub(super) fn head_backward<B: Backend>(
    b: &B,
    drows: &mut B::Buf,
    g: Option<&mut Params<B::Buf>>,
    dlogits: &B::Buf,
    norm_f_rows: &B::Buf,
    weight: &B::Buf,
    rows: usize,
    c: usize,
    v: usize,
) -> Result<()> {
    let layout = WeightLayout::OutIn;
    match g {
        Some(g) => {
            let dhead = g.lm_head.as_mut().unwrap_or(&mut g.wte);
            b.matmul_backward(drows, dhead, None, dlogits, norm_f_rows, weight, rows, c, v, layout)
        }
        None => input_gradient(b, drows, dlogits, weight, rows, c, v, layout),
    }
}
