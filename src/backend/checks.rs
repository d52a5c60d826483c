//! The argument checks every backend runs before an op: buffer lengths, `cu_seqlens`, id ranges.
//!
//! One function per `Backend` method, with the method's name and argument order: a float buffer is
//! passed as its length, ids as their host copy, the packing as its host `cu_seqlens`. The CPU and
//! the CUDA backends call the same function, so the same mistake gives the same error on both (the
//! tests assert on these messages). Checks only one backend needs (grid limits, device copies) stay
//! in that backend, after these.

use anyhow::{bail, ensure, Result};

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

pub(crate) use super::ops::{
    attention::check::*, decode_attention::check::*, embedding::check::*, layernorm::check::*,
    logsoftmax_gather::check::*, matmul::check::*, optimizer::check::*, pointwise::check::*, preference_loss::check::*,
    rmsnorm::check::*, rope::check::*, rows::check::*, swiglu::check::*,
};
