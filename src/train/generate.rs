//! Text generation from a policy: greedy decoding, or temperature plus top-k and nucleus (top-p)
//! sampling with a seeded RNG, stopping at a stop token (EOS, or a chat model's end of turn) or
//! after a token budget. The prompt's tokens come from the run's `SequenceFormat`
//! (`data::sequence_format`): a text template, or the model's chat template with its generation
//! prompt.
//!
//! [`generate_batch`] continues several prompts at once with a KV cache ([`KvCache`]): each prompt
//! goes through the model once, then each step runs one new token per unfinished sequence. Sequence
//! `i` samples from its own random stream (ChaCha stream `i` of the seed), so its tokens do not
//! depend on the other prompts of the batch; [`generate`] is a batch of one.

use anyhow::{ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::Backend;
use crate::model::{Decoder, KvCache};

/// How the next token is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0: greedy (argmax). Otherwise logits are divided by it before the softmax.
    pub temperature: f32,
    /// Nucleus sampling: sample among the most likely tokens whose probabilities sum to at least
    /// `top_p` (1 keeps them all).
    pub top_p: f32,
    /// Sample among the `top_k` most likely tokens only (0 keeps them all); applied before top-p.
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 }
    }
}

/// The index of the largest logit (the lowest index among ties; NaN never wins).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best
}

/// Picks the next token from `logits [V]` (`top_k` 0: no top-k cut).
pub fn sample_next(logits: &[f32], temperature: f32, top_p: f32, top_k: usize, rng: &mut impl Rng) -> usize {
    if temperature <= 0.0 || logits.len() == 1 {
        return argmax(logits);
    }
    // Softmax in f64 at the given temperature, then the smallest set of most likely tokens whose
    // mass reaches top_p, renormalised.
    let inv_t = 1.0 / temperature as f64;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> =
        logits.iter().enumerate().map(|(i, &x)| (i, ((x as f64 - max) * inv_t).exp())).collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let total = if top_k > 0 && top_k < probs.len() {
        probs.truncate(top_k);
        probs.iter().map(|p| p.1).sum()
    } else {
        total
    };
    let target = top_p.clamp(0.0, 1.0) as f64 * total;
    let mut kept = 0;
    let mut mass = 0.0;
    for &(_, p) in &probs {
        kept += 1;
        mass += p;
        if mass >= target {
            break;
        }
    }
    let r = rng.random::<f64>() * mass;
    let mut acc = 0.0;
    for &(i, p) in &probs[..kept] {
        acc += p;
        if r < acc {
            return i;
        }
    }
    probs[kept - 1].0
}

/// Continues `prompt` token by token until one of `stop` is produced (not included in the result),
/// `max_new_tokens` are generated, or the model's context is full. Returns the new tokens.
pub fn generate<B: Backend>(
    model: &mut Decoder<B>,
    prompt: &[i32],
    stop: &[i32],
    max_new_tokens: usize,
    params: &SamplingParams,
) -> Result<Vec<i32>> {
    Ok(generate_batch(model, &[prompt.to_vec()], stop, max_new_tokens, params)?.remove(0))
}

/// [`generate`] for several prompts at once, with a KV cache (see the module documentation).
pub fn generate_batch<B: Backend>(
    model: &mut Decoder<B>,
    prompts: &[Vec<i32>],
    stop: &[i32],
    max_new_tokens: usize,
    params: &SamplingParams,
) -> Result<Vec<Vec<i32>>> {
    let context = model.config().n_positions;
    for prompt in prompts {
        ensure!(!prompt.is_empty(), "generate: the prompt encodes to no tokens");
        ensure!(
            prompt.len() < context,
            "generate: the prompt has {} tokens, the model's context (n_positions) is {context}",
            prompt.len()
        );
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let capacity = context.min(longest + max_new_tokens);
    let mut cache = KvCache::new(model, prompts.len(), capacity)?;
    let mut rngs: Vec<ChaCha8Rng> = (0..prompts.len())
        .map(|i| {
            let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
            rng.set_stream(i as u64);
            rng
        })
        .collect();
    let mut out = vec![Vec::new(); prompts.len()];
    let room = |new: &Vec<i32>, len: usize| new.len() < max_new_tokens && len < context;
    let mut feed: Vec<Vec<i32>> =
        prompts.iter().map(|p| if room(&Vec::new(), p.len()) { p.clone() } else { Vec::new() }).collect();
    while feed.iter().any(|f| !f.is_empty()) {
        let logits = model.extend_cached(&mut cache, &feed)?;
        feed.iter_mut().for_each(Vec::clear);
        for (s, logits) in logits {
            let next = sample_next(&logits, params.temperature, params.top_p, params.top_k, &mut rngs[s]) as i32;
            if stop.contains(&next) {
                continue;
            }
            out[s].push(next);
            if room(&out[s], cache.len(s) + 1) {
                feed[s].push(next);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_ties_take_the_lowest_index() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(sample_next(&[0.1, 3.0, -1.0, 3.0], 0.0, 1.0, 0, &mut rng), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.5]), 1);
    }

    #[test]
    fn small_top_p_keeps_only_the_most_likely_token() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for _ in 0..200 {
            assert_eq!(sample_next(&[0.0, 2.0, 1.0], 1.0, 0.01, 0, &mut rng), 1);
        }
    }

    #[test]
    fn sampling_frequencies_follow_the_tempered_softmax() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let logits = [0.0f32, 1.0, 2.0];
        let t = 2.0f32;
        let w: Vec<f64> = logits.iter().map(|&x| (x as f64 / t as f64).exp()).collect();
        let z: f64 = w.iter().sum();
        let n = 40_000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[sample_next(&logits, t, 1.0, 0, &mut rng)] += 1;
        }
        for i in 0..3 {
            let p = w[i] / z;
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            let freq = counts[i] as f64 / n as f64;
            assert!((freq - p).abs() < 5.0 * sd, "token {i}: frequency {freq}, probability {p}");
        }
    }

    #[test]
    fn top_p_drops_the_tail_and_renormalises() {
        // Probabilities ~ [0.665, 0.245, 0.090]: top_p 0.8 keeps tokens 2 and 1 only.
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let logits = [0.0f32, 1.0, 2.0];
        let n = 20_000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[sample_next(&logits, 1.0, 0.8, 0, &mut rng)] += 1;
        }
        assert_eq!(counts[0], 0);
        let p2 = 1.0f64.exp() / (1.0 + 1.0f64.exp());
        let freq = counts[2] as f64 / n as f64;
        assert!((freq - p2).abs() < 0.02, "{freq} vs {p2}");
    }

    #[test]
    fn top_k_keeps_the_k_most_likely_tokens() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let logits = [0.0f32, 1.0, 3.0, 2.0];
        let mut seen = [false; 4];
        for _ in 0..2000 {
            seen[sample_next(&logits, 1.0, 1.0, 2, &mut rng)] = true;
        }
        assert_eq!(seen, [false, false, true, true]);
    }
}
