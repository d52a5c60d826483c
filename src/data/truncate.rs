//! Truncation of a tokenized pair to the model's context (`data.max_len`), by one of three modes, after
//! TRL < 1.0's separate prompt and completion limits.
//!
//! A pair's two sequences, prompt + chosen and prompt + rejected, share one prompt here (they are
//! packed and cached as one prompt and two responses), and each must fit in `max_len` tokens. In order:
//!
//! 1. `max_prompt_length` / `max_completion_length` (TRL < 1.0's `DPOTrainer.tokenize_row`; TRL 1.0
//!    removed both): the prompt keeps its last `max_prompt_length` tokens (BOS included, so it may go),
//!    each response its first `max_completion_length` tokens.
//! 2. `max_len`, by [`TruncationMode`]:
//!    - `prompt_then_responses` (ours, the default): when the longer sequence does not fit, the
//!      prompt is cut from its start down to what fits, but not below `min_prompt_tokens`; then each
//!      response still too long is cut at its end. A pair that cannot keep one response token per side
//!      is dropped.
//!    - `keep_start` (TRL 1.x's `truncation_mode` default): each sequence keeps its first `max_len`
//!      tokens, so the prompt stays whole and each response is cut at its end to
//!      `max_len − prompt`; a pair whose prompt alone has `max_len` tokens or more is dropped (TRL's
//!      `_prepare_dataset` filter). Exactly TRL's sequences.
//!    - `keep_end` (TRL, deprecated since 1.x): each sequence keeps its last `max_len` tokens. TRL cuts
//!      the two sequences of a pair each on its own, so its chosen and rejected sequences can keep
//!      different numbers of prompt tokens; the shared prompt here is cut so that the longer sequence
//!      keeps exactly its last `max_len` tokens (TRL's cut), and the shorter one loses the same prompt
//!      tokens (TRL keeps them). When a response alone has `max_len` tokens or more, the prompt keeps
//!      its last token and the response its last `max_len − 1` (TRL keeps the last `max_len` response
//!      tokens and no prompt; the tokens that carry loss are the same).
//!
//! A response cut at its end loses its EOS (or end of turn): the model must not learn to stop where
//! the text was cut.

use serde::{Deserialize, Serialize};

/// The smallest number of prompt tokens `prompt_then_responses` keeps (the whole prompt if shorter).
pub const DEFAULT_MIN_PROMPT_TOKENS: usize = 8;

/// How a pair longer than `max_len` is cut (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncationMode {
    /// The prompt's start first (down to `min_prompt_tokens`), then the responses' ends.
    #[default]
    PromptThenResponses,
    /// TRL's `keep_start`: each sequence's first `max_len` tokens.
    KeepStart,
    /// TRL's `keep_end`: each sequence's last `max_len` tokens (the prompt shared, see above).
    KeepEnd,
}

impl TruncationMode {
    /// Whether `self == Default::default()` (serde: the default is left out of saved configurations).
    pub fn is_default(&self) -> bool {
        *self == TruncationMode::default()
    }
}

/// Truncation limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truncation {
    /// Longest sequence (prompt + response + EOS) in tokens.
    pub max_len: usize,
    /// Prompt tokens `prompt_then_responses` keeps at least (the whole prompt if shorter); values
    /// below 1 count as 1.
    pub min_prompt_tokens: usize,
    pub mode: TruncationMode,
    /// TRL < 1.0's `max_prompt_length`: the prompt's last tokens kept before `max_len` applies.
    pub max_prompt_length: Option<usize>,
    /// TRL < 1.0's `max_completion_length`: each response's first tokens kept before `max_len` applies.
    pub max_completion_length: Option<usize>,
}

impl Truncation {
    /// `max_len` in the default mode, without the prompt and completion limits.
    pub fn new(max_len: usize) -> Self {
        Truncation {
            max_len,
            min_prompt_tokens: DEFAULT_MIN_PROMPT_TOKENS,
            mode: TruncationMode::default(),
            max_prompt_length: None,
            max_completion_length: None,
        }
    }

    /// Cuts a pair in place. Returns whether the prompt was cut and how many responses were, or
    /// `None` when the pair is dropped as too long. The prompt must not be empty.
    pub(super) fn apply(&self, prompt: &mut Vec<i32>, responses: [&mut Vec<i32>; 2]) -> Option<(bool, usize)> {
        let mut prompt_cut = false;
        let mut responses_cut = [false; 2];
        if let Some(keep) = self.max_prompt_length {
            prompt_cut |= keep_last(prompt, keep.max(1));
        }
        let [chosen, rejected] = responses;
        let mut responses = [chosen, rejected];
        if let Some(keep) = self.max_completion_length {
            for (response, cut) in responses.iter_mut().zip(&mut responses_cut) {
                *cut |= keep_first(response, keep.max(1));
            }
        }
        let max_len = self.max_len;
        if self.mode == TruncationMode::KeepStart && prompt.len() >= max_len {
            return None;
        }
        let longest = responses[0].len().max(responses[1].len());
        if prompt.len() + longest > max_len {
            // How many tokens each response keeps, and from which end.
            let (room, keep_end) = match self.mode {
                TruncationMode::PromptThenResponses => {
                    let min_prompt = prompt.len().min(self.min_prompt_tokens.max(1));
                    prompt_cut |= keep_last(prompt, max_len.saturating_sub(longest).max(min_prompt));
                    (max_len.saturating_sub(prompt.len()), false)
                }
                TruncationMode::KeepStart => (max_len - prompt.len(), false),
                TruncationMode::KeepEnd => {
                    // The longer sequence's cut, from the prompt while it lasts (one token stays).
                    let cut = prompt.len() + longest - max_len;
                    let keep = prompt.len().saturating_sub(cut).max(1);
                    prompt_cut |= keep_last(prompt, keep);
                    (max_len.saturating_sub(prompt.len()), true)
                }
            };
            if room == 0 {
                return None;
            }
            for (response, cut) in responses.iter_mut().zip(&mut responses_cut) {
                *cut |= if keep_end { keep_last(response, room) } else { keep_first(response, room) };
            }
        }
        Some((prompt_cut, responses_cut.iter().filter(|&&cut| cut).count()))
    }
}

/// Keeps the last `n` tokens; whether any were cut.
fn keep_last(ids: &mut Vec<i32>, n: usize) -> bool {
    let cut = ids.len() > n;
    if cut {
        ids.drain(..ids.len() - n);
    }
    cut
}

/// Keeps the first `n` tokens; whether any were cut.
fn keep_first(ids: &mut Vec<i32>, n: usize) -> bool {
    let cut = ids.len() > n;
    ids.truncate(n);
    cut
}
