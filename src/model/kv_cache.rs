//! Decoding, one sequence's next-token logits at a time: [`Decoder::last_logits`] runs the whole
//! prefix through the trunk and the LM head on its last row.

use anyhow::{ensure, Result};

use super::{Decoder, DeviceBatch};
use crate::backend::{Backend, WeightLayout};
use crate::data::PackedBatch;

impl<B: Backend> Decoder<B> {
    /// Logits `[V]` at the last position of `tokens` (one sequence), for generation. Only the last
    /// row goes through the LM head. Replaces the activations of any earlier forward.
    pub fn last_logits(&mut self, tokens: &[i32]) -> Result<Vec<f32>> {
        ensure!(!tokens.is_empty(), "last_logits: empty token sequence");
        let mut packed = PackedBatch::default();
        packed.push(tokens, tokens.len());
        let batch = DeviceBatch::upload(&*self.backend, &packed)?;
        self.forward_trunk(&batch)?;
        let (n, c, v) = (tokens.len(), self.config.n_embd, self.config.vocab_size);
        let b = &*self.backend;
        let acts = self.acts.as_ref().expect("forward_trunk allocates the activations");
        let mut last_row = b.zeros(c)?;
        b.gather_rows(&mut last_row, &acts.trunk.norm_f, &b.upload_ids(&[n as i32 - 1])?, 1, n, c)?;
        let mut logits = b.zeros(v)?;
        b.matmul_forward(&mut logits, &last_row, self.params.head(), None, 1, c, v, WeightLayout::OutIn)?;
        b.download(&logits)
    }
}
