//! A packed batch on a backend ([`DeviceBatch`]), with the rows of its LM head, and the plan of a
//! frozen model's head in chunks of whole sequences ([`plan_head_chunks`]).

use std::ops::Range;
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Result};

use crate::backend::{Backend, Packing};
use crate::data::PackedBatch;

/// A packed batch uploaded to a backend.
///
/// Only the rows with a target (response tokens) go through the LM head: prompt tokens and each
/// sequence's last token carry no loss, and skipping them saves their share of the head's products
/// and of the `[rows, V]` logits. The upload works out those rows on the host, once per batch.
pub struct DeviceBatch<B: Backend> {
    pub tokens: B::Ids,
    pub positions: B::Ids,
    pub packing: Packing<B>,
    /// `[M]` the tokens t with `targets[t] != -1`, increasing: the rows of the LM head.
    pub target_rows: B::Ids,
    /// `[M]` the targets of those rows (none is −1).
    pub row_targets: B::Ids,
    /// The sequences over the LM head's rows: `cu_seqlens` counts each sequence's target rows (a
    /// sequence without any is empty, and its log-prob is 0).
    pub row_packing: Packing<B>,
    /// Largest token id, position and target of the batch, checked against the model's vocabulary
    /// and context length before a forward (on the host, so no device read-back is needed).
    pub max_token: usize,
    pub max_position: usize,
    pub max_target: i32,
    /// Host copies of `target_rows` and `row_targets`, from which a frozen model's head chunks are
    /// planned (8 bytes per target row).
    host_target_rows: Vec<i32>,
    host_row_targets: Vec<i32>,
    /// The head chunks the last frozen model asked for, planned and uploaded on its first forward
    /// of this batch, so that a batch run again (the bench cycles through its batches) plans and
    /// uploads nothing more. Never built for a trainable model.
    head_chunks: Mutex<Option<Arc<HeadChunks<B>>>>,
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
        let target_rows: Vec<i32> = (0..n as i32).filter(|&t| batch.targets[t as usize] != -1).collect();
        let row_targets: Vec<i32> = target_rows.iter().map(|&t| batch.targets[t as usize]).collect();
        // Target rows before each sequence boundary: the boundaries of the compact rows.
        let row_cu_seqlens: Vec<i32> =
            batch.cu_seqlens.iter().map(|&start| target_rows.partition_point(|&t| t < start) as i32).collect();
        Ok(Self {
            tokens: backend.upload_ids(&batch.tokens)?,
            positions: backend.upload_ids(&batch.positions)?,
            packing: Packing::new(backend, &batch.cu_seqlens)?,
            target_rows: backend.upload_ids(&target_rows)?,
            row_targets: backend.upload_ids(&row_targets)?,
            row_packing: Packing::new(backend, &row_cu_seqlens)?,
            max_token: batch.tokens.iter().copied().max().unwrap_or(0) as usize,
            max_position: batch.positions.iter().copied().max().unwrap_or(0) as usize,
            max_target: batch.targets.iter().copied().max().unwrap_or(-1),
            host_target_rows: target_rows,
            host_row_targets: row_targets,
            head_chunks: Mutex::new(None),
        })
    }
    pub fn num_tokens(&self) -> usize {
        self.packing.num_tokens()
    }
    pub fn num_seqs(&self) -> usize {
        self.packing.num_seqs()
    }
    /// Number of tokens with a target: the rows of the LM head.
    pub fn num_target_rows(&self) -> usize {
        self.row_packing.num_tokens()
    }

    /// The LM head's rows split into chunks of whole sequences of about `max_rows` rows (see
    /// [`plan_head_chunks`]), on the device; planned and uploaded once per batch and `max_rows`.
    pub(super) fn head_chunks(&self, backend: &B, max_rows: usize) -> Result<Arc<HeadChunks<B>>> {
        let mut cached = self.head_chunks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(chunks) = cached.as_ref().filter(|c| c.max_rows == max_rows) {
            return Ok(chunks.clone());
        }
        let row_cu = &self.row_packing.host_cu_seqlens;
        let mut chunks = Vec::new();
        for seqs in plan_head_chunks(row_cu, max_rows) {
            let rows = row_cu[seqs.start] as usize..row_cu[seqs.end] as usize;
            // Every sequence of the batch, those outside the chunk empty (log-prob +0), so that the
            // chunk's sums land at their sequences' indices.
            let (start, end) = (rows.start as i32, rows.end as i32);
            let cu_seqlens: Vec<i32> = row_cu.iter().map(|&r| r.clamp(start, end) - start).collect();
            let mut packing = Packing::new(backend, &cu_seqlens)?;
            // The batch's longest sequence, not the chunk's: `sequence_logp_sum` then launches as for
            // the whole head, and sums each sequence in the same order.
            packing.max_seqlen = self.row_packing.max_seqlen;
            chunks.push(HeadChunk {
                num_rows: rows.len(),
                target_rows: backend.upload_ids(&self.host_target_rows[rows.clone()])?,
                row_targets: backend.upload_ids(&self.host_row_targets[rows])?,
                packing,
            });
        }
        // Largest first: the head's buffers take their size on the first chunk and only shrink
        // after it (no reallocation, and no zero-fill of a CPU buffer growing back).
        chunks.sort_by_key(|chunk| std::cmp::Reverse(chunk.num_rows));
        let chunks = Arc::new(HeadChunks { max_rows, chunks });
        *cached = Some(chunks.clone());
        Ok(chunks)
    }
}

/// Target rows a frozen model's LM head computes at once, unless set otherwise
/// ([`Decoder::set_head_chunk_rows`]). The logits are f32 in either precision (see
/// `Decoder`'s module documentation), so 1024 rows hold 206 MB at GPT-2's vocabulary, what 2048 rows
/// of bf16 logits held before the head kept its logits in f32; 1024 × 768 × 50257 is still large
/// enough a product to run at full speed.
///
/// [`Decoder::set_head_chunk_rows`]: super::Decoder::set_head_chunk_rows
pub const FROZEN_HEAD_CHUNK_ROWS: usize = 1024;

/// The fewest rows a chunk of the head has (unless the whole batch has fewer), whatever the chunk
/// size: matrix-product libraries take other kernels for very thin products (the CPU's `gemm` a
/// matrix-vector kernel for one row, a dot-product kernel while rows × V ≤ 256), which sum in
/// another order; chunks of at least this many rows stay on the kernel of the whole head.
pub const MIN_HEAD_CHUNK_ROWS: usize = 16;

/// Splits the sequences over the LM head's rows (`row_cu_seqlens`, as in `DeviceBatch::row_packing`)
/// into consecutive chunks of whole sequences, returned as ranges of sequence indices covering every
/// sequence once. A chunk closes before the sequence that would take it past `max_rows` rows, once
/// it has [`MIN_HEAD_CHUNK_ROWS`] rows; a last chunk with fewer joins the one before. So a chunk has
/// fewer than `max(max_rows, longest sequence) + 2 · MIN_HEAD_CHUNK_ROWS` rows, and a sequence
/// longer than `max_rows` gets a chunk of its own (with at most a few short neighbours).
pub fn plan_head_chunks(row_cu_seqlens: &[i32], max_rows: usize) -> Vec<Range<usize>> {
    let min_rows = MIN_HEAD_CHUNK_ROWS;
    let num_seqs = row_cu_seqlens.len().saturating_sub(1);
    let mut chunks = Vec::new();
    let (mut start, mut rows) = (0, 0);
    for s in 0..num_seqs {
        let len = (row_cu_seqlens[s + 1] - row_cu_seqlens[s]) as usize;
        if rows >= min_rows && rows + len > max_rows {
            chunks.push(start..s);
            (start, rows) = (s, 0);
        }
        rows += len;
    }
    if num_seqs > 0 {
        match chunks.last_mut() {
            Some(previous) if rows < min_rows => previous.end = num_seqs,
            _ => chunks.push(start..num_seqs),
        }
    }
    chunks
}

/// A frozen model's LM head in chunks (see [`plan_head_chunks`]), largest first.
pub(super) struct HeadChunks<B: Backend> {
    /// The chunk size they were planned for.
    pub(super) max_rows: usize,
    pub(super) chunks: Vec<HeadChunk<B>>,
}

/// One chunk of the LM head: some consecutive sequences' target rows.
pub(super) struct HeadChunk<B: Backend> {
    pub(super) num_rows: usize,
    /// `[rows]` the chunk's slice of `DeviceBatch::target_rows` and of `row_targets`.
    pub(super) target_rows: B::Ids,
    pub(super) row_targets: B::Ids,
    /// Every sequence of the batch over the chunk's rows: the chunk's own sequences count their
    /// rows, all the others are empty.
    pub(super) packing: Packing<B>,
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// The chunk plan covers every sequence once, in order, with chunks of at least
    /// `MIN_HEAD_CHUNK_ROWS` rows (unless there is one chunk), each under its bound, and none closed
    /// while the next sequence would still have fitted.
    #[test]
    fn head_chunks_cover_every_sequence_once_within_their_bounds() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for case in 0..400 {
            let num_seqs = rng.random_range(0..40usize);
            // Mostly short sequences, some empty, now and then a long one.
            let lens: Vec<i32> = (0..num_seqs)
                .map(|_| match rng.random_range(0..10) {
                    0 => 0,
                    1 => rng.random_range(30..120),
                    _ => rng.random_range(1..12),
                })
                .collect();
            let mut row_cu = vec![0];
            for len in &lens {
                row_cu.push(row_cu.last().unwrap() + len);
            }
            let longest = lens.iter().copied().max().unwrap_or(0) as usize;
            for max_rows in [1, 5, 16, 40, 100, 10_000] {
                let chunks = plan_head_chunks(&row_cu, max_rows);
                let what = format!("case {case}, lens {lens:?}, {max_rows} rows: {chunks:?}");
                let covered: Vec<usize> = chunks.iter().flat_map(|c| c.clone()).collect();
                assert_eq!(covered, (0..num_seqs).collect::<Vec<_>>(), "{what}");
                let rows = |c: &Range<usize>| (row_cu[c.end] - row_cu[c.start]) as usize;
                for (i, chunk) in chunks.iter().enumerate() {
                    assert!(rows(chunk) < max_rows.max(longest) + 2 * MIN_HEAD_CHUNK_ROWS, "{what}");
                    if chunks.len() > 1 {
                        assert!(rows(chunk) >= MIN_HEAD_CHUNK_ROWS, "{what}: chunk {i} is too thin");
                    }
                    if let Some(next) = chunks.get(i + 1) {
                        let first_next = (row_cu[next.start + 1] - row_cu[next.start]) as usize;
                        assert!(rows(chunk) + first_next > max_rows, "{what}: chunk {i} closed early");
                    }
                }
                let total = *row_cu.last().unwrap() as usize;
                if total <= max_rows && num_seqs > 0 {
                    assert_eq!(chunks, vec![0..num_seqs], "{what}: a head within the chunk size is one chunk");
                }
            }
        }
    }
}
