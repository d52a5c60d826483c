//! Batching: a deterministic shuffle per epoch and packing of whole pairs up to a token budget, or a
//! fixed number of pairs.
//!
//! Epoch `e` visits the pairs in the order of a Fisher–Yates shuffle driven by ChaCha8 seeded with
//! the run's seed on stream `e`, so any epoch's order can be recomputed from (seed, epoch) alone and a
//! resumed run needs only (epoch, position). A batch ([`BatchLimit`]) takes pairs in that order while
//! the tokens of both sequences of every pair stay within the budget (a pair larger than the budget
//! forms a batch alone), or exactly `n` pairs (TRL's `per_device_train_batch_size`; the last batch of
//! an epoch holds what is left). Batches never span two epochs, so each epoch covers every pair
//! exactly once. Either way the pairs are packed, without padding.

use anyhow::{bail, ensure, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{PackedBatch, PreferenceBatch, TokenizedPair};

/// What closes a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchLimit {
    /// Whole pairs while their tokens stay within this budget (a pair over it forms a batch alone).
    Tokens(usize),
    /// Exactly this many pairs (the last batch of an epoch holds what is left), whatever their tokens.
    Pairs(usize),
}

/// Where a [`Batcher`] stands: the next batch starts at `position` in epoch `epoch`'s order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatcherState {
    pub epoch: usize,
    pub position: usize,
    /// The dataset size the state belongs to (checked on restore).
    pub num_pairs: usize,
}

/// Shuffles pair indices per epoch and cuts them into batches by a token budget.
#[derive(Clone, Debug)]
pub struct Batcher {
    num_pairs: usize,
    seed: u64,
    epoch: usize,
    position: usize,
    order: Vec<usize>,
}

/// The visiting order of epoch `epoch`.
fn epoch_order(num_pairs: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch as u64);
    let mut order: Vec<usize> = (0..num_pairs).collect();
    order.shuffle(&mut rng);
    order
}

impl Batcher {
    /// A batcher at the start of epoch 0.
    pub fn new(num_pairs: usize, seed: u64) -> Self {
        Batcher { num_pairs, seed, epoch: 0, position: 0, order: epoch_order(num_pairs, seed, 0) }
    }

    /// A batcher at a saved state; the dataset must have the size the state was saved with.
    pub fn restore(num_pairs: usize, seed: u64, state: BatcherState) -> Result<Self> {
        ensure!(
            state.num_pairs == num_pairs,
            "saved data position is for a dataset of {} pairs, but this dataset has {num_pairs}",
            state.num_pairs
        );
        ensure!(
            state.position < num_pairs.max(1),
            "saved data position {} is outside the dataset of {num_pairs} pairs",
            state.position
        );
        Ok(Batcher {
            num_pairs,
            seed,
            epoch: state.epoch,
            position: state.position,
            order: epoch_order(num_pairs, seed, state.epoch),
        })
    }

    pub fn state(&self) -> BatcherState {
        BatcherState { epoch: self.epoch, position: self.position, num_pairs: self.num_pairs }
    }

    /// The epoch the next batch comes from (= epochs completed).
    pub fn epoch(&self) -> usize {
        self.epoch
    }

    /// Pairs of the current epoch already handed out.
    pub fn position(&self) -> usize {
        self.position
    }

    pub fn num_pairs(&self) -> usize {
        self.num_pairs
    }

    /// The visiting order of any epoch.
    pub fn order_of_epoch(&self, epoch: usize) -> Vec<usize> {
        epoch_order(self.num_pairs, self.seed, epoch)
    }

    /// The next batch's pair ids, where pair `i` costs `cost(i)` tokens, within `token_budget`.
    /// Advances to the next epoch when this one is used up.
    ///
    /// # Panics
    /// When the batcher has no pairs.
    pub fn next_ids(&mut self, token_budget: usize, cost: impl Fn(usize) -> usize) -> Vec<usize> {
        self.next_ids_under(BatchLimit::Tokens(token_budget), cost)
    }

    /// [`Batcher::next_ids`] under any [`BatchLimit`].
    ///
    /// # Panics
    /// When the batcher has no pairs.
    pub fn next_ids_under(&mut self, limit: BatchLimit, cost: impl Fn(usize) -> usize) -> Vec<usize> {
        assert!(self.num_pairs > 0, "Batcher: no pairs to batch");
        let (ids, end) = take_batch(&self.order, self.position, limit, &cost);
        self.position = end;
        if self.position == self.num_pairs {
            self.epoch += 1;
            self.position = 0;
            self.order = epoch_order(self.num_pairs, self.seed, self.epoch);
        }
        ids
    }

    /// The next preference batch (chosen as sequence 2i, rejected as 2i + 1) within `token_budget`.
    pub fn next_batch(&mut self, pairs: &[TokenizedPair], token_budget: usize) -> PreferenceBatch {
        self.next_batch_under(pairs, BatchLimit::Tokens(token_budget))
    }

    /// [`Batcher::next_batch`] under any [`BatchLimit`].
    pub fn next_batch_under(&mut self, pairs: &[TokenizedPair], limit: BatchLimit) -> PreferenceBatch {
        self.check_len(pairs);
        let ids = self.next_ids_under(limit, |i| pairs[i].num_tokens());
        preference_batch(pairs, &ids)
    }

    /// The next SFT batch (prompt + chosen per pair) with its pair ids, within `token_budget`.
    pub fn next_sft_batch(&mut self, pairs: &[TokenizedPair], token_budget: usize) -> (PackedBatch, Vec<usize>) {
        self.next_sft_batch_under(pairs, BatchLimit::Tokens(token_budget))
    }

    /// [`Batcher::next_sft_batch`] under any [`BatchLimit`].
    pub fn next_sft_batch_under(&mut self, pairs: &[TokenizedPair], limit: BatchLimit) -> (PackedBatch, Vec<usize>) {
        self.check_len(pairs);
        let ids = self.next_ids_under(limit, |i| pairs[i].sft_tokens());
        (sft_batch(pairs, &ids), ids)
    }

    /// How many preference batches epoch `epoch` has under `token_budget` (for schedules).
    pub fn batches_in_epoch(&self, pairs: &[TokenizedPair], token_budget: usize, epoch: usize) -> usize {
        self.batches_in_epoch_under(pairs, BatchLimit::Tokens(token_budget), epoch)
    }

    /// [`Batcher::batches_in_epoch`] under any [`BatchLimit`].
    pub fn batches_in_epoch_under(&self, pairs: &[TokenizedPair], limit: BatchLimit, epoch: usize) -> usize {
        self.check_len(pairs);
        count_batches(&self.order_of_epoch(epoch), limit, |i| pairs[i].num_tokens())
    }

    /// How many SFT batches epoch `epoch` has under `token_budget`.
    pub fn sft_batches_in_epoch(&self, pairs: &[TokenizedPair], token_budget: usize, epoch: usize) -> usize {
        self.sft_batches_in_epoch_under(pairs, BatchLimit::Tokens(token_budget), epoch)
    }

    /// [`Batcher::sft_batches_in_epoch`] under any [`BatchLimit`].
    pub fn sft_batches_in_epoch_under(&self, pairs: &[TokenizedPair], limit: BatchLimit, epoch: usize) -> usize {
        self.check_len(pairs);
        count_batches(&self.order_of_epoch(epoch), limit, |i| pairs[i].sft_tokens())
    }

    /// Checks that each of the first `batches` batches from the start of epoch 0 under `limit`, pair
    /// `i` costing `cost(i)` tokens, holds at most `token_budget` tokens: with
    /// [`BatchLimit::Pairs`] the budget bounds the batches instead of cutting them. The error names
    /// the first batch over it and the largest batch of the lot.
    pub fn check_token_budget(
        &self,
        limit: BatchLimit,
        token_budget: usize,
        batches: usize,
        cost: impl Fn(usize) -> usize,
    ) -> Result<()> {
        let (mut epoch, mut order, mut pos) = (0, self.order_of_epoch(0), 0);
        let (mut first_over, mut largest) = (None, 0);
        for _ in 0..batches.min(usize::MAX / 2) {
            if self.num_pairs == 0 {
                break;
            }
            let (ids, end) = take_batch(&order, pos, limit, &cost);
            let tokens: usize = ids.iter().map(|&i| cost(i)).sum();
            largest = largest.max(tokens);
            if tokens > token_budget && first_over.is_none() {
                first_over = Some((epoch, pos, ids.len(), tokens));
            }
            pos = end;
            if pos == self.num_pairs {
                (epoch, pos) = (epoch + 1, 0);
                order = self.order_of_epoch(epoch);
            }
        }
        if let Some((epoch, pos, pairs, tokens)) = first_over {
            bail!(
                "the micro-batch at pair {pos} of epoch {epoch} ({pairs} pairs) holds {tokens} tokens, over the \
                 budget of {token_budget}; the largest micro-batch of the run holds {largest}"
            );
        }
        Ok(())
    }

    /// How many batches epoch `epoch` has under `token_budget`, item `i` costing `cost(i)` tokens (for
    /// items other than pairs: unpaired examples).
    pub fn batches_in_epoch_by(&self, token_budget: usize, epoch: usize, cost: impl Fn(usize) -> usize) -> usize {
        count_batches(&self.order_of_epoch(epoch), BatchLimit::Tokens(token_budget), cost)
    }

    fn check_len(&self, pairs: &[TokenizedPair]) {
        assert_eq!(
            pairs.len(),
            self.num_pairs,
            "Batcher was built for {} pairs, given {}",
            self.num_pairs,
            pairs.len()
        );
    }
}

/// Takes ids from `order[start..]` under `limit` (at least one id). Returns the ids and the position
/// after them.
fn take_batch(order: &[usize], start: usize, limit: BatchLimit, cost: &impl Fn(usize) -> usize) -> (Vec<usize>, usize) {
    let budget = match limit {
        BatchLimit::Pairs(n) => {
            let end = (start + n.max(1)).min(order.len());
            return (order[start..end].to_vec(), end);
        }
        BatchLimit::Tokens(budget) => budget,
    };
    let mut ids = Vec::new();
    let mut total = 0usize;
    let mut pos = start;
    while pos < order.len() {
        let c = cost(order[pos]);
        if !ids.is_empty() && total + c > budget {
            break;
        }
        ids.push(order[pos]);
        total += c;
        pos += 1;
    }
    (ids, pos)
}

/// Items `0..n` in order, cut into consecutive runs within `token_budget` (an item larger than the
/// budget is a run alone): the fixed chunks of an evaluation.
pub fn chunks_by_cost(n: usize, token_budget: usize, cost: impl Fn(usize) -> usize) -> Vec<Vec<usize>> {
    let order: Vec<usize> = (0..n).collect();
    let mut chunks = Vec::new();
    let mut pos = 0;
    while pos < n {
        let (ids, end) = take_batch(&order, pos, BatchLimit::Tokens(token_budget), &cost);
        chunks.push(ids);
        pos = end;
    }
    chunks
}

fn count_batches(order: &[usize], limit: BatchLimit, cost: impl Fn(usize) -> usize) -> usize {
    let (mut pos, mut n) = (0, 0);
    while pos < order.len() {
        pos = take_batch(order, pos, limit, &cost).1;
        n += 1;
    }
    n
}

/// Packs the given pairs (in the given order) as a preference batch: pair `k` of `ids` becomes
/// sequences `2k` (prompt + chosen) and `2k + 1` (prompt + rejected); `lengths` are the response
/// token counts (= targets per sequence); `pair_ids` are `ids`.
pub fn preference_batch(pairs: &[TokenizedPair], ids: &[usize]) -> PreferenceBatch {
    let total: usize = ids.iter().map(|&i| pairs[i].num_tokens()).sum();
    let mut batch = PreferenceBatch {
        packed: PackedBatch {
            tokens: Vec::with_capacity(total),
            positions: Vec::with_capacity(total),
            targets: Vec::with_capacity(total),
            cu_seqlens: Vec::with_capacity(2 * ids.len() + 1),
        },
        unsafe_flags: Vec::with_capacity(2 * ids.len()),
        lengths: Vec::with_capacity(2 * ids.len()),
        pair_ids: ids.to_vec(),
    };
    batch.packed.cu_seqlens.push(0);
    let mut seq = Vec::new();
    for &id in ids {
        let pair = &pairs[id];
        for (response, is_unsafe) in [(&pair.chosen, pair.chosen_unsafe), (&pair.rejected, pair.rejected_unsafe)] {
            seq.clear();
            seq.extend_from_slice(&pair.prompt);
            seq.extend_from_slice(response);
            batch.packed.push(&seq, pair.prompt.len());
            batch.unsafe_flags.push(is_unsafe as i32);
            batch.lengths.push(response.len() as i32);
        }
    }
    batch
}

/// Packs prompt + chosen response of the given pairs, one sequence per pair, loss on the response
/// (SFT on the preferred — after T(D), safe — responses).
pub fn sft_batch(pairs: &[TokenizedPair], ids: &[usize]) -> PackedBatch {
    let mut packed = PackedBatch { cu_seqlens: vec![0], ..Default::default() };
    let mut seq = Vec::new();
    for &id in ids {
        let pair = &pairs[id];
        seq.clear();
        seq.extend_from_slice(&pair.prompt);
        seq.extend_from_slice(&pair.chosen);
        packed.push(&seq, pair.prompt.len());
    }
    packed
}
