//! Packed, padding-free batches: sequences laid end to end with their offsets.

/// Token-major packed batch. For a sequence `x_0 … x_{T−1}` whose first `p` tokens are the prompt,
/// `targets[i] = x_{i+1}` for `p − 1 ≤ i < T − 1` (the response tokens, predicted from the position
/// before them) and `−1` elsewhere. So a sequence has exactly `T − p` targets.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PackedBatch {
    /// `[N]` token ids.
    pub tokens: Vec<i32>,
    /// `[N]` position of each token inside its own sequence.
    pub positions: Vec<i32>,
    /// `[N]` the next token where it carries loss, else −1.
    pub targets: Vec<i32>,
    /// `[S + 1]` sequence start offsets.
    pub cu_seqlens: Vec<i32>,
}

impl PackedBatch {
    /// Packs sequences given as (tokens, prompt length). The prompt length must be at least 1 and at
    /// most the sequence length.
    pub fn from_sequences<'a>(seqs: impl IntoIterator<Item = (&'a [i32], usize)>) -> Self {
        let mut b = PackedBatch { cu_seqlens: vec![0], ..Default::default() };
        for (toks, prompt_len) in seqs {
            b.push(toks, prompt_len);
        }
        b
    }

    /// Appends one sequence.
    pub fn push(&mut self, toks: &[i32], prompt_len: usize) {
        assert!(!toks.is_empty(), "empty sequence");
        assert!(prompt_len >= 1 && prompt_len <= toks.len(), "prompt length {prompt_len} out of 1..={}", toks.len());
        if self.cu_seqlens.is_empty() {
            self.cu_seqlens.push(0);
        }
        let t = toks.len();
        self.tokens.extend_from_slice(toks);
        self.positions.extend((0..t).map(|i| i as i32));
        self.targets.extend((0..t).map(|i| if i + 1 >= prompt_len && i + 1 < t { toks[i + 1] } else { -1 }));
        self.cu_seqlens.push(self.tokens.len() as i32);
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    pub fn num_seqs(&self) -> usize {
        self.cu_seqlens.len().saturating_sub(1)
    }

    /// Number of tokens carrying a target in sequence `s`.
    pub fn num_targets(&self, s: usize) -> usize {
        let (a, b) = (self.cu_seqlens[s] as usize, self.cu_seqlens[s + 1] as usize);
        self.targets[a..b].iter().filter(|&&t| t >= 0).count()
    }
}

/// A batch of P preference pairs packed as 2P sequences: sequence `2i` is pair i's chosen response
/// (with its prompt), `2i + 1` its rejected one.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PreferenceBatch {
    pub packed: PackedBatch,
    /// `[2P]` 1 where the response is unsafe.
    pub unsafe_flags: Vec<i32>,
    /// `[2P]` response lengths in tokens (the targets of each sequence).
    pub lengths: Vec<i32>,
    /// `[P]` index of each pair in its dataset (keys the reference log-prob cache).
    pub pair_ids: Vec<usize>,
}

impl PreferenceBatch {
    pub fn num_pairs(&self) -> usize {
        self.pair_ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_cover_exactly_the_response() {
        let b = PackedBatch::from_sequences([(&[1, 2, 3, 4][..], 2), (&[7][..], 1), (&[5, 6][..], 1)]);
        assert_eq!(b.cu_seqlens, vec![0, 4, 5, 7]);
        assert_eq!(b.positions, vec![0, 1, 2, 3, 0, 0, 1]);
        assert_eq!(b.targets, vec![-1, 3, 4, -1, -1, 6, -1]);
        assert_eq!((b.num_targets(0), b.num_targets(1), b.num_targets(2)), (2, 0, 1));
    }
}
