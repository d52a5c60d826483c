//! Packing into padding-free batches: token budgets, shuffling, resume, SFT batches.

use super::*;

// batching

fn random_tokenized(n: usize, seed: u64) -> Vec<TokenizedPair> {
    let mut r = rng(seed);
    let seq = |r: &mut ChaCha8Rng, lo: usize, hi: usize| -> Vec<i32> {
        (0..r.random_range(lo..=hi)).map(|_| r.random_range(0..258)).collect()
    };
    (0..n)
        .map(|_| TokenizedPair {
            prompt: seq(&mut r, 1, 30),
            chosen: seq(&mut r, 1, 40),
            rejected: seq(&mut r, 1, 40),
            chosen_unsafe: r.random_bool(0.3),
            rejected_unsafe: r.random_bool(0.5),
        })
        .collect()
}

fn check_preference_batch(batch: &PreferenceBatch, pairs: &[TokenizedPair]) {
    let pk = &batch.packed;
    assert_eq!(pk.num_seqs(), 2 * batch.num_pairs());
    assert_eq!((batch.unsafe_flags.len(), batch.lengths.len()), (2 * batch.num_pairs(), 2 * batch.num_pairs()));
    assert_eq!(
        (pk.tokens.len(), pk.targets.len(), pk.positions.len()),
        (pk.num_tokens(), pk.num_tokens(), pk.num_tokens())
    );
    for (k, &id) in batch.pair_ids.iter().enumerate() {
        let p = &pairs[id];
        for (s, resp, uns) in [(2 * k, &p.chosen, p.chosen_unsafe), (2 * k + 1, &p.rejected, p.rejected_unsafe)] {
            let (a, b) = (pk.cu_seqlens[s] as usize, pk.cu_seqlens[s + 1] as usize);
            assert_eq!(&pk.tokens[a..b], &[p.prompt.clone(), resp.clone()].concat()[..]);
            assert_eq!(batch.lengths[s] as usize, resp.len());
            assert_eq!(pk.num_targets(s), resp.len());
            assert_eq!(batch.unsafe_flags[s], uns as i32);
            // Targets: the response tokens, from the last prompt position on.
            let want: Vec<i32> = (0..b - a)
                .map(|i| if i + 1 >= p.prompt.len() && i + 1 < b - a { resp[i + 1 - p.prompt.len()] } else { -1 })
                .collect();
            assert_eq!(&pk.targets[a..b], &want[..]);
        }
    }
}

#[test]
fn batches_respect_the_budget_and_cover_each_pair_once_per_epoch() {
    let pairs = random_tokenized(97, 11);
    let max_pair = pairs.iter().map(TokenizedPair::num_tokens).max().unwrap();
    for budget in [1usize, 60, max_pair, 400, 5000] {
        let mut b = Batcher::new(pairs.len(), 42);
        for epoch in 0..3 {
            assert_eq!(b.epoch(), epoch);
            let expected_batches = b.batches_in_epoch(&pairs, budget, epoch);
            let order = b.order_of_epoch(epoch);
            let mut seen = Vec::new();
            let mut batches = 0;
            loop {
                let batch = b.next_batch(&pairs, budget);
                batches += 1;
                check_preference_batch(&batch, &pairs);
                let tokens: usize = batch.pair_ids.iter().map(|&i| pairs[i].num_tokens()).sum();
                assert_eq!(tokens, batch.packed.num_tokens());
                assert!(
                    tokens <= budget || batch.num_pairs() == 1,
                    "budget {budget}: {tokens} tokens in {} pairs",
                    batch.num_pairs()
                );
                seen.extend(batch.pair_ids.iter().copied());
                // Greedy: the next pair in this epoch's order would not have fit.
                if seen.len() < pairs.len() {
                    assert!(tokens + pairs[order[seen.len()]].num_tokens() > budget);
                }
                if b.epoch() != epoch {
                    break;
                }
            }
            assert_eq!(seen, order, "epoch {epoch} visits the pairs in its order, each once");
            let unique: HashSet<_> = seen.iter().collect();
            assert_eq!(unique.len(), pairs.len());
            assert_eq!(batches, expected_batches);
            if budget == 1 {
                assert_eq!(batches, pairs.len());
            }
            if budget == 5000 {
                assert!(batches < pairs.len() / 3);
            }
        }
    }
}

#[test]
fn shuffle_is_deterministic_by_seed_and_differs_across_epochs() {
    let pairs = random_tokenized(60, 12);
    let run = |seed: u64| -> Vec<Vec<usize>> {
        let mut b = Batcher::new(pairs.len(), seed);
        (0..40).map(|_| b.next_batch(&pairs, 300).pair_ids).collect()
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5), run(6));
    let b = Batcher::new(pairs.len(), 5);
    assert_ne!(b.order_of_epoch(0), b.order_of_epoch(1));
    let mut sorted = b.order_of_epoch(3);
    sorted.sort();
    assert_eq!(sorted, (0..60).collect::<Vec<_>>());
}

#[test]
fn restored_batcher_yields_the_same_batches() {
    let pairs = random_tokenized(37, 13);
    let budget = 250;
    let mut reference = Batcher::new(pairs.len(), 77);
    let all: Vec<PreferenceBatch> = (0..60).map(|_| reference.next_batch(&pairs, budget)).collect();
    assert!(reference.epoch() >= 3, "the run must cross epochs");
    for stop in [0usize, 1, 7, 19, 33, 59] {
        let mut b = Batcher::new(pairs.len(), 77);
        for batch in &all[..stop] {
            assert_eq!(&b.next_batch(&pairs, budget), batch);
        }
        // Save through JSON, as a checkpoint's state.json would.
        let saved = serde_json::to_string(&b.state()).unwrap();
        let state: BatcherState = serde_json::from_str(&saved).unwrap();
        let mut resumed = Batcher::restore(pairs.len(), 77, state).unwrap();
        assert_eq!((resumed.epoch(), resumed.position()), (b.epoch(), b.position()));
        for batch in &all[stop..] {
            assert_eq!(&resumed.next_batch(&pairs, budget), batch);
        }
    }
    let state = BatcherState { epoch: 2, position: 3, num_pairs: 37 };
    let err = Batcher::restore(40, 77, state).unwrap_err().to_string();
    assert!(err.contains("37 pairs") && err.contains("40"), "{err}");
    let err = Batcher::restore(37, 77, BatcherState { position: 37, ..state }).unwrap_err().to_string();
    assert!(err.contains("outside"), "{err}");
}

#[test]
fn sft_batches_pack_prompt_and_chosen() {
    let pairs = random_tokenized(30, 14);
    let ids: Vec<usize> = vec![4, 0, 17, 4];
    let packed = sft_batch(&pairs, &ids);
    assert_eq!(packed.num_seqs(), ids.len());
    for (s, &id) in ids.iter().enumerate() {
        let (a, b) = (packed.cu_seqlens[s] as usize, packed.cu_seqlens[s + 1] as usize);
        assert_eq!(&packed.tokens[a..b], &[pairs[id].prompt.clone(), pairs[id].chosen.clone()].concat()[..]);
        assert_eq!(packed.num_targets(s), pairs[id].chosen.len());
    }
    let mut b = Batcher::new(pairs.len(), 3);
    let mut seen = BTreeSet::new();
    while b.epoch() == 0 {
        let (packed, ids) = b.next_sft_batch(&pairs, 100);
        assert!(packed.num_tokens() <= 100 || ids.len() == 1);
        assert_eq!(packed.num_tokens(), ids.iter().map(|&i| pairs[i].sft_tokens()).sum::<usize>());
        for i in ids {
            assert!(seen.insert(i));
        }
    }
    assert_eq!(seen.len(), pairs.len());
    let eval = preference_batch(&pairs, &[3, 1]);
    check_preference_batch(&eval, &pairs);
    assert_eq!(eval.pair_ids, vec![3, 1]);
}
