//! One block of the decoder, forward and backward, and the LM head: what `decoder.rs` runs per
//! layer. [`BlockKind`] holds the family's choices (norm, MLP, weight layout); the block's products
//! go through `linear.rs`.

use anyhow::Result;

use super::activations::{ActivationGrads, HeadActivations, LayerBoundary, LayerInterior, Widths};
use super::batch::DeviceBatch;
use super::params::{BlockParams, Norm};
use super::DecoderConfig;
use crate::backend::{Backend, QkvLayout, WeightLayout};

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
            widths: Widths::of(config),
            eps: config.norm_eps,
        }
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

/// Block `l` between its first norm (given, with the block's input `x`) and its output: q, k, v,
/// RoPE, attention and the output projection joining the residual stream (`residual_2`, fused
/// with `norm_2`), then the MLP's up projection and activation. `proj` is scratch. The forward runs
/// it once per layer; a checkpointed backward runs it again from the kept boundary.
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
) -> Result<()> {
    let (n, w, layout) = (batch.num_tokens(), kind.widths, kind.weights);
    let c = w.c;
    b.matmul_forward(&mut a.qkv, norm_1, &wl.qkv.w, wl.qkv.b.as_ref(), n, c, w.qkv, layout)?;
    if let Some(freqs) = rope_freqs {
        b.rope_forward(&mut a.qkv, &batch.positions, freqs, n, kind.qkv)?;
    }
    b.attention_forward(&mut a.atty, &mut a.att_saved, &a.qkv, &batch.packing, kind.qkv)?;
    b.matmul_forward(proj, &a.atty, &wl.o.w, wl.o.b.as_ref(), n, w.att, c, layout)?;
    let (norm_2, mean_2, rstd_2) = (&mut a.norm_2, &mut a.norm_2_mean, &mut a.norm_2_rstd);
    kind.residual_norm(b, &mut a.residual_2, norm_2, mean_2, rstd_2, x, proj, &wl.norm_2, n)?;
    // MLP: act(up(norm_2(residual_2))); the down projection is the caller's.
    if kind.gelu {
        let bias = wl.up.b.as_ref().expect("GPT-2's MLP has biases");
        b.matmul_bias_gelu_forward(&mut a.mlp_up, &mut a.mlp_act, &a.norm_2, &wl.up.w, bias, n, c, w.up)
    } else {
        b.matmul_forward(&mut a.mlp_up, &a.norm_2, &wl.up.w, wl.up.b.as_ref(), n, c, w.up, layout)?;
        b.swiglu_forward(&mut a.mlp_act, &a.mlp_up, n, w.hidden)
    }
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
    b.matmul_forward(&mut head.logits, &head.norm_f_rows, weight, None, rows, c, v, WeightLayout::OutIn)?;
    let (token_logp, lse, logits) = (&mut head.token_logp, &mut head.lse, &head.logits);
    match squares {
        Some(squares) => b.logsoftmax_gather_forward_sq(token_logp, lse, squares, logits, targets, rows, v),
        None => b.logsoftmax_gather_forward(token_logp, lse, logits, targets, rows, v),
    }
}

/// The gradient of block `l` (its input `x`, its kept boundary `bnd`, its interior `a`), given
/// dL/d(its output) in `d.residual`: accumulates the block's parameter gradients into `gl` and
/// leaves dL/dx in `d.residual` (a norm's backward accumulates into its input's gradient, which
/// is how the residual stream gathers its two branches without a separate add).
#[allow(clippy::too_many_arguments)]
pub(super) fn block_backward<B: Backend>(
    b: &B,
    kind: &BlockKind,
    wl: &BlockParams<B::Buf>,
    gl: &mut BlockParams<B::Buf>,
    x: &B::Buf,
    bnd: &LayerBoundary<B::Buf>,
    a: &LayerInterior<B::Buf>,
    d: &mut ActivationGrads<B::Buf>,
    batch: &DeviceBatch<B>,
    rope: Option<&B::Buf>,
) -> Result<()> {
    let (n, w, layout) = (batch.num_tokens(), kind.widths, kind.weights);
    let c = w.c;
    // residual_3 = residual_2 + mlp: dresidual flows unchanged to residual_2 and into the MLP.
    let (dw, db) = (&mut gl.down.w, gl.down.b.as_mut());
    b.matmul_backward(&mut d.mlp_act, dw, db, &d.residual, &a.mlp_act, &wl.down.w, n, w.hidden, c, layout)?;
    if kind.gelu {
        b.gelu_backward(&mut d.mlp_up, &a.mlp_up, &d.mlp_act)?;
    } else {
        b.swiglu_backward(&mut d.mlp_up, &a.mlp_up, &d.mlp_act, n, w.hidden)?;
    }
    let (dw, db) = (&mut gl.up.w, gl.up.b.as_mut());
    b.matmul_backward(&mut d.norm, dw, db, &d.mlp_up, &a.norm_2, &wl.up.w, n, c, w.up, layout)?;
    let (mean, rstd) = (&a.norm_2_mean, &a.norm_2_rstd);
    kind.norm_backward(b, &mut d.residual, &mut gl.norm_2, &d.norm, &a.residual_2, &wl.norm_2, mean, rstd, n)?;
    // residual_2 = x + attn: the same again for the attention half.
    let (dw, db) = (&mut gl.o.w, gl.o.b.as_mut());
    b.matmul_backward(&mut d.atty, dw, db, &d.residual, &a.atty, &wl.o.w, n, w.att, c, layout)?;
    b.attention_backward(&mut d.qkv, &d.atty, &a.qkv, &a.atty, &a.att_saved, &batch.packing, kind.qkv)?;
    if let Some(freqs) = rope {
        b.rope_backward(&mut d.qkv, &batch.positions, freqs, n, kind.qkv)?;
    }
    let (dw, db) = (&mut gl.qkv.w, gl.qkv.b.as_mut());
    b.matmul_backward(&mut d.norm, dw, db, &d.qkv, &bnd.norm_1, &wl.qkv.w, n, c, w.qkv, layout)?;
    let (mean, rstd) = (&bnd.norm_1_mean, &bnd.norm_1_rstd);
    kind.norm_backward(b, &mut d.residual, &mut gl.norm_1, &d.norm, x, &wl.norm_1, mean, rstd, n)?;
    Ok(())
}
