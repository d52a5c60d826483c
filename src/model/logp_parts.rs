//! What a forward computes besides the sequence log-probs, on request, for TRL's log-prob
//! modifiers (`crate::loss::batch_loss_parts`):
//!
//! - each sequence's log-prob split in two at a count of its target rows ([`RowSplit`]: for
//!   LD-DPO, each response of a pair at the pair's shared length), as `[2S]` (first part at `2s`,
//!   the rest at `2s + 1`). The split is another packing of the same rows, with `2S` sequences,
//!   so the sums are `sequence_logp_sum` over it, and the backward takes a gradient per part with
//!   the same packing: `logsoftmax_gather_backward` gives each row its part's gradient;
//! - each sequence's sum of aligned log-probs `log p_t − log Σ_v p_{t,v}²` (WPO), `[S]`, from the
//!   head's `logsoftmax_gather_forward_sq`.
//!
//! The sequence log-probs themselves are computed as without the extras, bit for bit. A head in
//! chunks sums each chunk's rows as it sums the log-probs (the first chunk writes, the others add).

use std::sync::{Arc, Mutex};

use anyhow::{ensure, Result};

use super::batch::{DeviceBatch, HeadChunks};
use crate::backend::{Backend, Packing};

/// Each sequence's target rows split in two: its first `first[s]` rows (at most all of them) and
/// the rest.
pub struct RowSplit<B: Backend> {
    /// `[S]` rows of each sequence's first part, as asked (clamped to the sequence where used).
    first: Vec<usize>,
    /// The batch's target rows in `2S` sequences: sequence s's first part at `2s`, the rest at `2s + 1`.
    pub(super) packing: Packing<B>,
    /// The same split of each head chunk's rows, made on first use.
    chunks: Mutex<Option<ChunkSplits<B>>>,
}

/// The split of each head chunk's rows (in the chunks' order), and the chunk size they were planned for.
type ChunkSplits<B> = (usize, Arc<Vec<Packing<B>>>);

impl<B: Backend> RowSplit<B> {
    /// The split of `batch`'s sequences after `first[s]` target rows each.
    pub fn new(backend: &B, batch: &DeviceBatch<B>, first: &[usize]) -> Result<Self> {
        let num_seqs = batch.num_seqs();
        ensure!(first.len() == num_seqs, "RowSplit: {} counts for {num_seqs} sequences", first.len());
        let packing = Packing::new(backend, &split_cu_seqlens(&batch.row_packing.host_cu_seqlens, first))?;
        Ok(Self { first: first.to_vec(), packing, chunks: Mutex::new(None) })
    }

    /// Preference pairs, sequences `2i` and `2i + 1`, each split at the pair's shared length: the
    /// smaller of the two responses' target rows (LD-DPO's; TRL's `min(chosen_lens, rejected_lens)`).
    pub fn shared_length(backend: &B, batch: &DeviceBatch<B>) -> Result<Self> {
        let cu = &batch.row_packing.host_cu_seqlens;
        ensure!(cu.len() % 2 == 1, "RowSplit::shared_length: {} sequences are not pairs", cu.len() - 1);
        let rows = |s: usize| (cu[s + 1] - cu[s]) as usize;
        let first: Vec<usize> = (0..(cu.len() - 1) / 2).flat_map(|i| [rows(2 * i).min(rows(2 * i + 1)); 2]).collect();
        Self::new(backend, batch, &first)
    }

    /// The split of each of `chunks` (every sequence over a chunk's rows, those of other chunks
    /// empty, so they split into two empty parts).
    pub(super) fn chunk_packings(&self, backend: &B, chunks: &HeadChunks<B>) -> Result<Arc<Vec<Packing<B>>>> {
        let mut cached = self.chunks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((_, packings)) = cached.as_ref().filter(|(max_rows, _)| *max_rows == chunks.max_rows) {
            return Ok(packings.clone());
        }
        let packings = chunks
            .chunks
            .iter()
            .map(|chunk| Packing::new(backend, &split_cu_seqlens(&chunk.packing.host_cu_seqlens, &self.first)))
            .collect::<Result<Vec<_>>>()?;
        let packings = Arc::new(packings);
        *cached = Some((chunks.max_rows, packings.clone()));
        Ok(packings)
    }
}

/// The offsets of `cu_seqlens`'s sequences split after `first[s]` rows each: `2S + 1` offsets.
fn split_cu_seqlens(cu_seqlens: &[i32], first: &[usize]) -> Vec<i32> {
    let mut out = Vec::with_capacity(2 * first.len() + 1);
    out.push(0);
    for (s, &count) in first.iter().enumerate() {
        let (start, end) = (cu_seqlens[s], cu_seqlens[s + 1]);
        out.push(start + (count as i32).min(end - start));
        out.push(end);
    }
    out
}

/// What a forward computes besides the sequence log-probs (see the module documentation).
pub struct ForwardExtras<'a, B: Backend> {
    /// Each sequence's log-prob split by this (`[2S]`).
    pub split: Option<&'a RowSplit<B>>,
    /// Each sequence's sum of aligned log-probs `log p − log Σ_v p_v²` (`[S]`).
    pub aligned: bool,
}

impl<B: Backend> ForwardExtras<'_, B> {
    /// The log-probs alone.
    pub fn none() -> Self {
        ForwardExtras { split: None, aligned: false }
    }
}

/// A forward's outputs, on the backend.
pub struct SequenceLogps<'a, B: Backend> {
    /// `[S]` each sequence's log-prob, the sum over its target rows.
    pub total: &'a B::Buf,
    /// `[2S]` when asked for: the sums over each sequence's two parts.
    pub split: Option<&'a B::Buf>,
    /// `[S]` when asked for: each sequence's sum of aligned log-probs.
    pub aligned: Option<&'a B::Buf>,
}

impl<'a, B: Backend> SequenceLogps<'a, B> {
    /// The log-probs `total` and, of `parts`, what `extras` asked for.
    pub(super) fn of(total: &'a B::Buf, parts: Option<&'a PartBuffers<B::Buf>>, extras: &ForwardExtras<B>) -> Self {
        SequenceLogps {
            total,
            split: parts.filter(|_| extras.split.is_some()).map(|p| &p.split_sums),
            aligned: parts.filter(|_| extras.aligned).map(|p| &p.aligned_sums),
        }
    }
}

/// The decoder's buffers for the extras: the outputs and one head pass's scratch.
pub(super) struct PartBuffers<T> {
    /// `[2S]` and `[S]`: the outputs of the last forward that asked for them.
    split_sums: T,
    aligned_sums: T,
    /// What the current forward asked for.
    wants_split: bool,
    wants_aligned: bool,
    /// `[rows]` the head pass's `log Σ_v p_v²`, then its aligned log-probs.
    log_sum_sq: T,
    /// A chunk's sums before they are added to the batch's.
    chunk_split: T,
    chunk_aligned: T,
}

impl<T> PartBuffers<T> {
    /// The buffers for a forward with `extras` over `num_seqs` sequences (in `slot`, made on first
    /// use), their outputs at 0 (the sums of a batch without targets); `None` without extras.
    pub(super) fn prepare<'a, B: Backend<Buf = T>>(
        slot: &'a mut Option<Self>,
        b: &B,
        extras: &ForwardExtras<B>,
        num_seqs: usize,
    ) -> Result<Option<&'a mut Self>> {
        if extras.split.is_none() && !extras.aligned {
            return Ok(None);
        }
        if slot.is_none() {
            let zeros = || b.zeros(0);
            *slot = Some(PartBuffers {
                split_sums: zeros()?,
                aligned_sums: zeros()?,
                wants_split: false,
                wants_aligned: false,
                log_sum_sq: zeros()?,
                chunk_split: zeros()?,
                chunk_aligned: zeros()?,
            });
        }
        let parts = slot.as_mut().expect("made above");
        (parts.wants_split, parts.wants_aligned) = (extras.split.is_some(), extras.aligned);
        for (wanted, sums, len) in [
            (parts.wants_split, &mut parts.split_sums, 2 * num_seqs),
            (parts.wants_aligned, &mut parts.aligned_sums, num_seqs),
        ] {
            if wanted {
                b.resize(sums, len)?;
                b.fill(sums, 0.0)?;
            }
        }
        Ok(Some(parts))
    }

    /// The head pass's `log Σ_v p_v²` buffer, sized for its `rows` rows, when the aligned sums are
    /// asked for.
    pub(super) fn squares<'a, B: Backend<Buf = T>>(
        parts: &'a mut Option<&mut Self>,
        b: &B,
        rows: usize,
    ) -> Result<Option<&'a mut T>> {
        match parts.as_deref_mut().filter(|p| p.wants_aligned) {
            Some(p) => {
                b.resize(&mut p.log_sum_sq, rows)?;
                Ok(Some(&mut p.log_sum_sq))
            }
            None => Ok(None),
        }
    }

    /// Adds one head pass (`token_logp` and, for the aligned sums, the squared masses `squares`
    /// wrote, over the same rows) to the outputs: the whole head or its first chunk (`first`: they
    /// write), or a later chunk (it adds), its rows laid out by `packing` and split by `split`.
    pub(super) fn add_pass<B: Backend<Buf = T>>(
        parts: &mut Option<&mut Self>,
        b: &B,
        token_logp: &T,
        first: bool,
        packing: &Packing<B>,
        split: Option<&Packing<B>>,
    ) -> Result<()> {
        let Some(p) = parts.as_deref_mut() else { return Ok(()) };
        if let Some(split) = split.filter(|_| p.wants_split) {
            sum_into(b, &mut p.split_sums, &mut p.chunk_split, token_logp, split, first)?;
        }
        if p.wants_aligned {
            // log p − log Σ p², in place over the squared mass: −x then + log p (exact).
            b.scale(&mut p.log_sum_sq, -1.0)?;
            b.add_inplace(&mut p.log_sum_sq, token_logp)?;
            sum_into(b, &mut p.aligned_sums, &mut p.chunk_aligned, &p.log_sum_sq, packing, first)?;
        }
        Ok(())
    }
}

/// `out` = the sums of `values` over `packing` (`first`), or `out` += them (through `scratch`).
fn sum_into<B: Backend>(
    b: &B,
    out: &mut B::Buf,
    scratch: &mut B::Buf,
    values: &B::Buf,
    packing: &Packing<B>,
    first: bool,
) -> Result<()> {
    if first {
        return b.sequence_logp_sum(out, values, packing);
    }
    b.resize(scratch, packing.num_seqs())?;
    b.sequence_logp_sum(scratch, values, packing)?;
    b.add_inplace(out, scratch)
}

#[cfg(test)]
mod tests {
    use super::split_cu_seqlens;

    #[test]
    fn a_split_keeps_every_row_once_in_order() {
        // Sequences of 3, 0, 5 and 2 rows split after 2, 4, 9 and 0.
        assert_eq!(split_cu_seqlens(&[0, 3, 3, 8, 10], &[2, 4, 9, 0]), [0, 2, 3, 3, 3, 8, 8, 8, 10]);
    }
}
