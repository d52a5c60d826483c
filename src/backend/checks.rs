//! The argument checks every backend runs before an op: buffer lengths, `cu_seqlens`, id ranges.
//!
//! One function per `Backend` method, with the method's name and argument order: a float buffer is
//! passed as its length, ids as their host copy, the packing as its host `cu_seqlens`. The CPU and
//! the CUDA backends call the same function, so the same mistake gives the same error on both (the
//! tests assert on these messages). Checks only one backend needs (grid limits, device copies) stay
//! in that backend, after these.

use anyhow::{bail, ensure, Result};

use super::PAIR_METRICS;

/// `(start, len)` of each sequence of a packed batch, in order.
pub(crate) type Sequences = Vec<(usize, usize)>;

/// Returns an error naming the op, the tensor, and the expected and actual lengths.
pub(crate) fn check_len(op: &str, tensor: &str, actual: usize, expected: usize) -> Result<()> {
    ensure!(actual == expected, "{op}: `{tensor}` has {actual} elements, expected {expected}");
    Ok(())
}

/// Checks that every id is in `0..limit` (or is `-1` when `allow_ignore`).
pub(crate) fn check_ids(op: &str, tensor: &str, ids: &[i32], limit: usize, allow_ignore: bool) -> Result<()> {
    if let Some((t, &id)) =
        ids.iter().enumerate().find(|&(_, &id)| !((id >= 0 && (id as usize) < limit) || (allow_ignore && id == -1)))
    {
        let range = if allow_ignore { format!("-1 or 0..{limit}") } else { format!("0..{limit}") };
        bail!("{op}: `{tensor}[{t}]` = {id} is outside {range}");
    }
    Ok(())
}

/// Checks `cu_seqlens` (starts at 0, non-decreasing, ends at `n`) and returns the `(start, len)` of
/// each sequence.
pub(crate) fn sequences(op: &str, cu_seqlens: &[i32], n: usize) -> Result<Sequences> {
    let cu = cu_seqlens;
    ensure!(!cu.is_empty() && cu[0] == 0, "{op}: cu_seqlens must start at 0");
    ensure!(
        *cu.last().unwrap() as usize == n,
        "{op}: cu_seqlens ends at {}, but the batch has {n} tokens",
        cu.last().unwrap()
    );
    cu.windows(2)
        .enumerate()
        .map(|(s, w)| {
            ensure!(w[1] >= w[0], "{op}: cu_seqlens decreases at sequence {s} ({} then {})", w[0], w[1]);
            Ok((w[0] as usize, (w[1] - w[0]) as usize))
        })
        .collect()
}

pub(crate) fn copy(dst: usize, src: usize) -> Result<()> {
    check_len("copy", "dst", dst, src)
}

// ---- encoder ---------------------------------------------------------------------------------

pub(crate) fn embedding_forward(
    out: usize,
    tokens: &[i32],
    positions: &[i32],
    wte: usize,
    wpe: usize,
    n: usize,
    c: usize,
) -> Result<()> {
    const OP: &str = "embedding_forward";
    ensure!(c > 0, "{OP}: channels must be positive");
    check_len(OP, "out", out, n * c)?;
    check_len(OP, "tokens", tokens.len(), n)?;
    check_len(OP, "positions", positions.len(), n)?;
    ensure!(wte.is_multiple_of(c) && wpe.is_multiple_of(c), "{OP}: wte/wpe lengths must be multiples of c = {c}");
    check_ids(OP, "tokens", tokens, wte / c, false)?;
    check_ids(OP, "positions", positions, wpe / c, false)
}

pub(crate) fn embedding_backward(
    dwte: usize,
    dwpe: usize,
    dout: usize,
    tokens: &[i32],
    positions: &[i32],
    n: usize,
    c: usize,
) -> Result<()> {
    const OP: &str = "embedding_backward";
    ensure!(c > 0, "{OP}: channels must be positive");
    check_len(OP, "dout", dout, n * c)?;
    check_len(OP, "tokens", tokens.len(), n)?;
    check_len(OP, "positions", positions.len(), n)?;
    ensure!(dwte.is_multiple_of(c) && dwpe.is_multiple_of(c), "{OP}: dwte/dwpe lengths must be multiples of c = {c}");
    check_ids(OP, "tokens", tokens, dwte / c, false)?;
    check_ids(OP, "positions", positions, dwpe / c, false)
}

// ---- layernorm -------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
pub(crate) fn layernorm_forward(
    out: usize,
    mean: usize,
    rstd: usize,
    inp: usize,
    weight: usize,
    bias: usize,
    n: usize,
    c: usize,
) -> Result<()> {
    const OP: &str = "layernorm_forward";
    ensure!(c > 0, "{OP}: channels must be positive");
    check_len(OP, "out", out, n * c)?;
    check_len(OP, "inp", inp, n * c)?;
    check_len(OP, "mean", mean, n)?;
    check_len(OP, "rstd", rstd, n)?;
    check_len(OP, "weight", weight, c)?;
    check_len(OP, "bias", bias, c)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn residual_layernorm_forward(
    residual: usize,
    out: usize,
    mean: usize,
    rstd: usize,
    a: usize,
    b: usize,
    weight: usize,
    bias: usize,
    n: usize,
    c: usize,
) -> Result<()> {
    const OP: &str = "residual_layernorm_forward";
    ensure!(c > 0, "{OP}: channels must be positive");
    check_len(OP, "residual", residual, n * c)?;
    check_len(OP, "out", out, n * c)?;
    check_len(OP, "a", a, n * c)?;
    check_len(OP, "b", b, n * c)?;
    check_len(OP, "mean", mean, n)?;
    check_len(OP, "rstd", rstd, n)?;
    check_len(OP, "weight", weight, c)?;
    check_len(OP, "bias", bias, c)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn layernorm_backward(
    dinp: usize,
    dweight: usize,
    dbias: usize,
    dout: usize,
    inp: usize,
    weight: usize,
    mean: usize,
    rstd: usize,
    n: usize,
    c: usize,
) -> Result<()> {
    const OP: &str = "layernorm_backward";
    ensure!(c > 0, "{OP}: channels must be positive");
    check_len(OP, "dinp", dinp, n * c)?;
    check_len(OP, "dout", dout, n * c)?;
    check_len(OP, "inp", inp, n * c)?;
    check_len(OP, "mean", mean, n)?;
    check_len(OP, "rstd", rstd, n)?;
    check_len(OP, "weight", weight, c)?;
    check_len(OP, "dweight", dweight, c)?;
    check_len(OP, "dbias", dbias, c)
}

// ---- matmul ----------------------------------------------------------------------------------

pub(crate) fn matmul_forward(
    out: usize,
    inp: usize,
    weight: usize,
    bias: Option<usize>,
    n: usize,
    ic: usize,
    oc: usize,
) -> Result<()> {
    const OP: &str = "matmul_forward";
    check_len(OP, "out", out, n * oc)?;
    check_len(OP, "inp", inp, n * ic)?;
    check_len(OP, "weight", weight, ic * oc)?;
    if let Some(bias) = bias {
        check_len(OP, "bias", bias, oc)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_backward(
    dinp: usize,
    dweight: usize,
    dbias: Option<usize>,
    dout: usize,
    inp: usize,
    weight: usize,
    n: usize,
    ic: usize,
    oc: usize,
) -> Result<()> {
    const OP: &str = "matmul_backward";
    check_len(OP, "dinp", dinp, n * ic)?;
    check_len(OP, "dout", dout, n * oc)?;
    check_len(OP, "inp", inp, n * ic)?;
    check_len(OP, "weight", weight, ic * oc)?;
    check_len(OP, "dweight", dweight, ic * oc)?;
    if let Some(dbias) = dbias {
        check_len(OP, "dbias", dbias, oc)?;
    }
    Ok(())
}

// ---- attention -------------------------------------------------------------------------------

/// `n_head` divides `c`, and `cu_seqlens` is valid; returns the sequences and the token count.
fn attention_shape(op: &str, cu_seqlens: &[i32], n_head: usize, c: usize) -> Result<(Sequences, usize)> {
    ensure!(n_head > 0 && c.is_multiple_of(n_head), "{op}: c = {c} is not a positive multiple of n_head = {n_head}");
    let n = cu_seqlens.last().map_or(0, |&last| last as usize);
    Ok((sequences(op, cu_seqlens, n)?, n))
}

/// `saved_len` is the backend's `attention_saved_len` for this packing.
pub(crate) fn attention_forward(
    out: usize,
    saved: usize,
    qkv: usize,
    cu_seqlens: &[i32],
    n_head: usize,
    c: usize,
    saved_len: usize,
) -> Result<Sequences> {
    const OP: &str = "attention_forward";
    let (seqs, n) = attention_shape(OP, cu_seqlens, n_head, c)?;
    check_len(OP, "out", out, n * c)?;
    check_len(OP, "qkv", qkv, n * 3 * c)?;
    check_len(OP, "saved", saved, saved_len)?;
    Ok(seqs)
}

/// `saved_len` is the backend's `attention_saved_len` for this packing.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    dqkv: usize,
    dout: usize,
    qkv: usize,
    out: usize,
    saved: usize,
    cu_seqlens: &[i32],
    n_head: usize,
    c: usize,
    saved_len: usize,
) -> Result<Sequences> {
    const OP: &str = "attention_backward";
    let (seqs, n) = attention_shape(OP, cu_seqlens, n_head, c)?;
    check_len(OP, "dqkv", dqkv, n * 3 * c)?;
    check_len(OP, "dout", dout, n * c)?;
    check_len(OP, "qkv", qkv, n * 3 * c)?;
    check_len(OP, "out", out, n * c)?;
    check_len(OP, "saved", saved, saved_len)?;
    Ok(seqs)
}

// ---- pointwise -------------------------------------------------------------------------------

pub(crate) fn gelu_forward(out: usize, inp: usize) -> Result<()> {
    check_len("gelu_forward", "out", out, inp)
}

pub(crate) fn gelu_backward(dinp: usize, inp: usize, dout: usize) -> Result<()> {
    check_len("gelu_backward", "dinp", dinp, inp)?;
    check_len("gelu_backward", "dout", dout, inp)
}

pub(crate) fn residual_forward(out: usize, a: usize, b: usize) -> Result<()> {
    check_len("residual_forward", "a", a, out)?;
    check_len("residual_forward", "b", b, out)
}

pub(crate) fn add_inplace(dst: usize, src: usize) -> Result<()> {
    check_len("add_inplace", "src", src, dst)
}

// ---- row selection ---------------------------------------------------------------------------

/// Shapes of `gather_rows` / `scatter_rows`: `selected [m, c]`, `full [n, c]`, and `rows` of length
/// `m`, strictly increasing, in `0..n`.
#[allow(clippy::too_many_arguments)]
fn row_selection(
    op: &str,
    selected_name: &str,
    selected: usize,
    full_name: &str,
    full: usize,
    rows: &[i32],
    m: usize,
    n: usize,
    c: usize,
) -> Result<()> {
    ensure!(c > 0, "{op}: channels must be positive");
    check_len(op, selected_name, selected, m * c)?;
    check_len(op, full_name, full, n * c)?;
    check_len(op, "rows", rows.len(), m)?;
    check_ids(op, "rows", rows, n, false)?;
    if let Some(i) = rows.windows(2).position(|w| w[1] <= w[0]) {
        let (a, b) = (rows[i], rows[i + 1]);
        bail!("{op}: `rows` must be strictly increasing, but rows[{i}] = {a} and rows[{}] = {b}", i + 1);
    }
    Ok(())
}

pub(crate) fn gather_rows(out: usize, inp: usize, rows: &[i32], m: usize, n: usize, c: usize) -> Result<()> {
    row_selection("gather_rows", "out", out, "inp", inp, rows, m, n, c)
}

pub(crate) fn scatter_rows(dinp: usize, dout: usize, rows: &[i32], m: usize, n: usize, c: usize) -> Result<()> {
    row_selection("scatter_rows", "dout", dout, "dinp", dinp, rows, m, n, c)
}

// ---- fused log-softmax-gather ----------------------------------------------------------------

pub(crate) fn logsoftmax_gather_forward(
    token_logp: usize,
    lse: usize,
    logits: usize,
    targets: &[i32],
    n: usize,
    v: usize,
) -> Result<()> {
    const OP: &str = "logsoftmax_gather_forward";
    ensure!(v > 0, "{OP}: vocabulary size must be positive");
    check_len(OP, "logits", logits, n * v)?;
    check_len(OP, "targets", targets.len(), n)?;
    check_len(OP, "token_logp", token_logp, n)?;
    check_len(OP, "lse", lse, n)?;
    check_ids(OP, "targets", targets, v, true)
}

pub(crate) fn sequence_logp_sum(seq_logp: usize, token_logp: usize, cu_seqlens: &[i32]) -> Result<Sequences> {
    const OP: &str = "sequence_logp_sum";
    let seqs = sequences(OP, cu_seqlens, token_logp)?;
    check_len(OP, "seq_logp", seq_logp, seqs.len())?;
    Ok(seqs)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn logsoftmax_gather_backward(
    logits: usize,
    lse: usize,
    targets: &[i32],
    dseq: usize,
    cu_seqlens: &[i32],
    n: usize,
    v: usize,
) -> Result<Sequences> {
    const OP: &str = "logsoftmax_gather_backward";
    ensure!(v > 0, "{OP}: vocabulary size must be positive");
    let seqs = sequences(OP, cu_seqlens, n)?;
    check_len(OP, "logits", logits, n * v)?;
    check_len(OP, "lse", lse, n)?;
    check_len(OP, "targets", targets.len(), n)?;
    check_len(OP, "dseq", dseq, seqs.len())?;
    check_ids(OP, "targets", targets, v, true)?;
    Ok(seqs)
}

// ---- preference loss -------------------------------------------------------------------------

/// `reference` is checked only when the objective `uses_reference`. Returns the number of pairs.
pub(crate) fn preference_loss(
    metrics: usize,
    dpolicy: usize,
    policy: usize,
    reference: usize,
    unsafe_flags: &[i32],
    lengths: &[i32],
    uses_reference: bool,
) -> Result<usize> {
    const OP: &str = "preference_loss";
    ensure!(policy.is_multiple_of(2), "{OP}: `policy` has {policy} elements, expected an even number");
    let pairs = policy / 2;
    if uses_reference {
        check_len(OP, "reference", reference, 2 * pairs)?;
    }
    check_len(OP, "unsafe_flags", unsafe_flags.len(), 2 * pairs)?;
    check_len(OP, "lengths", lengths.len(), 2 * pairs)?;
    check_len(OP, "metrics", metrics, pairs * PAIR_METRICS)?;
    check_len(OP, "dpolicy", dpolicy, 2 * pairs)?;
    if let Some(s) = lengths.iter().position(|&l| l < 0) {
        bail!("{OP}: pair {} has a negative response length", s / 2);
    }
    Ok(pairs)
}

// ---- optimizer -------------------------------------------------------------------------------

pub(crate) fn adamw(param: usize, grad: usize, m: usize, v: usize, step: u32) -> Result<()> {
    const OP: &str = "adamw";
    check_len(OP, "grad", grad, param)?;
    check_len(OP, "m", m, param)?;
    check_len(OP, "v", v, param)?;
    ensure!(step >= 1, "{OP}: step is 1-based, got 0");
    Ok(())
}

pub(crate) fn sgd(param: usize, grad: usize) -> Result<()> {
    check_len("sgd", "grad", grad, param)
}
