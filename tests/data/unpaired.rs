//! KTO's KL sequences in an unpaired batch: example k's prompt with example k−1's completion (the
//! first with the last's), as TRL's `KL_completion_ids`, never an example's own completion.

use super::*;

#[test]
fn kl_sequences_pair_each_prompt_with_the_previous_examples_completion() {
    let example = |prompt: i32, completion: i32| TokenizedExample {
        prompt: vec![prompt; 2],
        completion: vec![completion; 3],
        desirable: true,
        completion_unsafe: false,
    };
    let examples = [example(1, 10), example(2, 20), example(3, 30)];
    let batch = unpaired_batch(&examples, &[2, 0, 1], Some(64));
    let kl = batch.kl.expect("KL sequences were asked for");
    let sequences: Vec<&[i32]> = kl.cu_seqlens.windows(2).map(|w| &kl.tokens[w[0] as usize..w[1] as usize]).collect();
    // The order is examples 2, 0, 1: their previous ones in the batch are 1, 2, 0.
    assert_eq!(sequences, [&[3, 3, 20, 20, 20][..], &[1, 1, 30, 30, 30], &[2, 2, 10, 10, 10]]);
}
