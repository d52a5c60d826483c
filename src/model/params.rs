//! GPT-2's parameters: each group's tensors, written once in Hugging Face's order, names and shapes.
//!
//! The model is three groups in this order: the embeddings, then the blocks (`h.N.*`, in layer
//! order), then the final LayerNorm; the LM head is tied to the token embedding and has no tensor
//! of its own. Conv1D weights are `[in, out]`, as HF stores them. The same lists hold the
//! gradients. Checkpoints, the optimizer's state and the reference-log-prob cache's hash all follow
//! this order.

use super::tensor_list::tensor_list;
use super::Gpt2Config;

tensor_list! {
    /// The input embeddings.
    pub(super) struct EmbeddingParams<T> over (v, p, c) {
        /// `[V, C]` token embedding, also the LM head.
        wte: [v, c] = "wte.weight",
        /// `[P, C]` position embedding.
        wpe: [p, c] = "wpe.weight",
    }
}

tensor_list! {
    /// The parameters of one transformer block, in HF order; their names follow `h.N.`.
    pub(super) struct BlockParams<T> over (c) {
        ln_1_w: [c] = "ln_1.weight",
        ln_1_b: [c] = "ln_1.bias",
        /// `attn.c_attn`: `[C, 3C]` projection to q, k, v side by side.
        c_attn_w: [c, 3 * c] = "attn.c_attn.weight",
        c_attn_b: [3 * c] = "attn.c_attn.bias",
        /// `attn.c_proj`: `[C, C]` output projection of the attention.
        c_proj_w: [c, c] = "attn.c_proj.weight",
        c_proj_b: [c] = "attn.c_proj.bias",
        ln_2_w: [c] = "ln_2.weight",
        ln_2_b: [c] = "ln_2.bias",
        /// `mlp.c_fc`: `[C, 4C]`.
        c_fc_w: [c, 4 * c] = "mlp.c_fc.weight",
        c_fc_b: [4 * c] = "mlp.c_fc.bias",
        /// `mlp.c_proj`: `[4C, C]`.
        mlp_proj_w: [4 * c, c] = "mlp.c_proj.weight",
        mlp_proj_b: [c] = "mlp.c_proj.bias",
    }
}

tensor_list! {
    /// The final LayerNorm, before the LM head.
    pub(super) struct FinalNormParams<T> over (c) {
        w: [c] = "ln_f.weight",
        b: [c] = "ln_f.bias",
    }
}

/// Every parameter tensor of the model, one backend buffer each. Also used for the gradients.
pub(super) struct Params<T> {
    pub(super) embedding: EmbeddingParams<T>,
    pub(super) blocks: Vec<BlockParams<T>>,
    pub(super) ln_f: FinalNormParams<T>,
}

/// The groups' tensors in the model's order: the embeddings, each block in layer order, the final
/// LayerNorm. The one place that says the order.
fn in_model_order<U, K: IntoIterator<Item = U>>(
    embedding: impl IntoIterator<Item = U>,
    blocks: impl IntoIterator<Item = K>,
    ln_f: impl IntoIterator<Item = U>,
) -> Vec<U> {
    embedding.into_iter().chain(blocks.into_iter().flatten()).chain(ln_f).collect()
}

/// A group's tensors as (HF name, shape), each name after `prefix`.
fn named<const N: usize>(
    prefix: String,
    names: [&'static str; N],
    shapes: [Vec<usize>; N],
) -> impl Iterator<Item = (String, Vec<usize>)> {
    names.into_iter().map(move |name| format!("{prefix}{name}")).zip(shapes)
}

impl Gpt2Config {
    /// Every parameter tensor in HF order and names (without the `transformer.` prefix), with its
    /// shape; Conv1D weights are `[in, out]`. The model, the checkpoint reader and the writer all
    /// enumerate parameters through this one list.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (v, p, c) = (self.vocab_size, self.n_positions, self.n_embd);
        in_model_order(
            named(String::new(), EmbeddingParams::NAMES, EmbeddingParams::shapes(v, p, c)),
            (0..self.n_layer).map(|l| named(format!("h.{l}."), BlockParams::NAMES, BlockParams::shapes(c))),
            named(String::new(), FinalNormParams::NAMES, FinalNormParams::shapes(c)),
        )
    }

    /// Total number of parameters (the tied LM head counted once).
    pub fn num_params(&self) -> usize {
        self.parameter_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }
}

impl<T> Params<T> {
    /// Builds from tensors listed in [`Gpt2Config::parameter_shapes`] order.
    pub(super) fn from_ordered(tensors: Vec<T>, n_layer: usize) -> Self {
        let count = EmbeddingParams::LEN + n_layer * BlockParams::LEN + FinalNormParams::LEN;
        assert_eq!(tensors.len(), count, "parameter count does not match the config");
        let mut it = tensors.into_iter();
        let mut next = |_| it.next().ok_or(());
        // Fields are built in the order they are written: the order of `in_model_order`.
        let params = (|| {
            Ok::<_, ()>(Self {
                embedding: EmbeddingParams::try_from_fn(&mut next)?,
                blocks: (0..n_layer).map(|_| BlockParams::try_from_fn(&mut next)).collect::<Result<_, _>>()?,
                ln_f: FinalNormParams::try_from_fn(&mut next)?,
            })
        })();
        params.expect("counted above")
    }

    /// Every tensor, in [`Gpt2Config::parameter_shapes`] order.
    pub(super) fn ordered(&self) -> Vec<&T> {
        in_model_order(self.embedding.refs(), self.blocks.iter().map(BlockParams::refs), self.ln_f.refs())
    }

    /// Every tensor, mutable, in [`Gpt2Config::parameter_shapes`] order.
    pub(super) fn ordered_mut(&mut self) -> Vec<&mut T> {
        in_model_order(
            self.embedding.refs_mut(),
            self.blocks.iter_mut().map(BlockParams::refs_mut),
            self.ln_f.refs_mut(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parameters in HF's order, names and shapes, as GPT-2's checkpoints, the optimizer's
    /// state and the reference-log-prob cache's hash expect them.
    #[test]
    fn parameter_shapes_are_gpt2s_in_hf_order() {
        let config = Gpt2Config { vocab_size: 37, n_positions: 32, n_embd: 16, n_layer: 2, ..Gpt2Config::tiny() };
        let (v, p, c) = (37, 32, 16);
        let mut expected = vec![("wte.weight".to_string(), vec![v, c]), ("wpe.weight".to_string(), vec![p, c])];
        for l in 0..2 {
            let block = [
                ("ln_1.weight", vec![c]),
                ("ln_1.bias", vec![c]),
                ("attn.c_attn.weight", vec![c, 3 * c]),
                ("attn.c_attn.bias", vec![3 * c]),
                ("attn.c_proj.weight", vec![c, c]),
                ("attn.c_proj.bias", vec![c]),
                ("ln_2.weight", vec![c]),
                ("ln_2.bias", vec![c]),
                ("mlp.c_fc.weight", vec![c, 4 * c]),
                ("mlp.c_fc.bias", vec![4 * c]),
                ("mlp.c_proj.weight", vec![4 * c, c]),
                ("mlp.c_proj.bias", vec![c]),
            ];
            expected.extend(block.into_iter().map(|(name, shape)| (format!("h.{l}.{name}"), shape)));
        }
        expected.push(("ln_f.weight".to_string(), vec![c]));
        expected.push(("ln_f.bias".to_string(), vec![c]));
        assert_eq!(config.parameter_shapes(), expected);
        assert_eq!(config.num_params(), expected.iter().map(|(_, s)| s.iter().product::<usize>()).sum::<usize>());
    }

    /// Each field holds the tensor its HF name says, whichever way the parameters are walked: built
    /// from `parameter_shapes` order, and read back in that order, shared or mutable.
    #[test]
    fn params_fields_follow_parameter_shapes_order() {
        let config = Gpt2Config { n_layer: 3, ..Gpt2Config::tiny() };
        let names: Vec<String> = config.parameter_shapes().into_iter().map(|(name, _)| name).collect();
        let mut params = Params::from_ordered(names.clone(), config.n_layer);
        assert_eq!(params.embedding.wte, "wte.weight");
        assert_eq!(params.embedding.wpe, "wpe.weight");
        assert_eq!(params.blocks[0].ln_1_w, "h.0.ln_1.weight");
        assert_eq!(params.blocks[2].c_attn_w, "h.2.attn.c_attn.weight");
        assert_eq!(params.blocks[1].mlp_proj_b, "h.1.mlp.c_proj.bias");
        assert_eq!(params.ln_f.b, "ln_f.bias");
        assert_eq!(params.ordered(), names.iter().collect::<Vec<_>>());
        let mut names_mut = names.clone();
        assert_eq!(params.ordered_mut(), names_mut.iter_mut().collect::<Vec<_>>());
    }
}
