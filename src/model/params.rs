//! The decoder's parameters: which tensors a configuration has, their names, shapes and order,
//! written once ([`Params::schema`]) and walked in that one order everywhere.
//!
//! The model is four groups in this order: the embeddings (the token embedding; GPT-2's position
//! embedding), the blocks (in layer order), the final norm, and the untied LM head (absent when the
//! head is tied to the token embedding). Each block is the same six pieces in every family —
//! first norm, q/k/v projection, output projection, second norm, MLP up projection, MLP down
//! projection — each a weight with an optional bias; a family decides which biases exist, the
//! weights' layout (GPT-2's Conv1D `[in, out]`, the Llama family's `nn.Linear` `[out, in]`) and
//! the names. The same lists hold the gradients. Checkpoints, the optimizer's state and the
//! reference-log-prob cache's hash all follow this order.
//!
//! Names are HF's without the trunk prefix (`transformer.`, `model.`). The Llama family's q, k and
//! v projections are one parameter, `self_attn.qkv_proj` (`[q_proj; k_proj; v_proj]` stacked on
//! the output dimension, the `qkv` layout attention reads), and its gate and up projections one,
//! `mlp.gate_up_proj` (`[gate_proj; up_proj]`, the layout SwiGLU reads); `checkpoint.rs` splits
//! them into HF's tensors and joins them back ([`fused_parts`]).

use super::config::{DecoderConfig, Family};

/// A norm's gain and, for LayerNorm, its bias.
pub(super) struct Norm<T> {
    pub(super) w: T,
    pub(super) b: Option<T>,
}

/// A projection's weight and optional bias.
pub(super) struct Linear<T> {
    pub(super) w: T,
    pub(super) b: Option<T>,
}

/// One block's parameters.
pub(super) struct BlockParams<T> {
    pub(super) norm_1: Norm<T>,
    /// `[C, width]` (GPT-2 `attn.c_attn`) or `[width, C]` (`self_attn.qkv_proj`), see `QkvLayout`.
    pub(super) qkv: Linear<T>,
    /// The attention's output projection, `n_head · head_dim` → C.
    pub(super) o: Linear<T>,
    pub(super) norm_2: Norm<T>,
    /// GPT-2's `mlp.c_fc` (C → 4C) or `mlp.gate_up_proj` (C → 2F, gate then up).
    pub(super) up: Linear<T>,
    /// The MLP's down projection (4C or F → C).
    pub(super) down: Linear<T>,
}

/// Every parameter tensor of the model, one backend buffer each. Also used for the gradients.
pub(super) struct Params<T> {
    /// `[V, C]` token embedding (also the LM head when tied).
    pub(super) wte: T,
    /// `[P, C]` GPT-2's position embedding; `None` with RoPE.
    pub(super) wpe: Option<T>,
    pub(super) blocks: Vec<BlockParams<T>>,
    pub(super) norm_f: Norm<T>,
    /// `[V, C]` the untied LM head; `None` when tied to `wte`.
    pub(super) lm_head: Option<T>,
}

/// A tensor's name and shape, what [`Params::schema`] holds.
pub(super) type Described = (String, Vec<usize>);

impl Norm<Described> {
    fn new(name: &str, c: usize, bias: bool) -> Self {
        Self { w: (format!("{name}.weight"), vec![c]), b: bias.then(|| (format!("{name}.bias"), vec![c])) }
    }
}

impl Linear<Described> {
    /// `name.weight` of `shape` (its output dimension `out`), and `name.bias [out]` when `bias`.
    fn new(name: &str, shape: [usize; 2], out: usize, bias: bool) -> Self {
        Self { w: (format!("{name}.weight"), shape.to_vec()), b: bias.then(|| (format!("{name}.bias"), vec![out])) }
    }
}

impl Params<Described> {
    /// The parameters `config` defines, as (name, shape): the one place that says which tensors a
    /// family has and what they are called.
    pub(super) fn schema(config: &DecoderConfig) -> Self {
        let (v, c) = (config.vocab_size, config.n_embd);
        let (q, width, f) = (config.qkv_layout().q_width(), config.qkv_layout().width(), config.intermediate_size);
        let gpt2 = config.family == Family::Gpt2;
        let block = |l: usize| {
            if gpt2 {
                let h = format!("h.{l}");
                BlockParams {
                    norm_1: Norm::new(&format!("{h}.ln_1"), c, true),
                    qkv: Linear::new(&format!("{h}.attn.c_attn"), [c, width], width, true),
                    o: Linear::new(&format!("{h}.attn.c_proj"), [q, c], c, true),
                    norm_2: Norm::new(&format!("{h}.ln_2"), c, true),
                    up: Linear::new(&format!("{h}.mlp.c_fc"), [c, f], f, true),
                    down: Linear::new(&format!("{h}.mlp.c_proj"), [f, c], c, true),
                }
            } else {
                let h = format!("layers.{l}");
                BlockParams {
                    norm_1: Norm::new(&format!("{h}.input_layernorm"), c, false),
                    qkv: Linear::new(&format!("{h}.self_attn.qkv_proj"), [width, c], width, config.qkv_bias),
                    o: Linear::new(&format!("{h}.self_attn.o_proj"), [c, q], c, config.o_bias),
                    norm_2: Norm::new(&format!("{h}.post_attention_layernorm"), c, false),
                    up: Linear::new(&format!("{h}.mlp.gate_up_proj"), [2 * f, c], 2 * f, config.mlp_bias),
                    down: Linear::new(&format!("{h}.mlp.down_proj"), [c, f], c, config.mlp_bias),
                }
            }
        };
        let (wte, norm_f) = if gpt2 { ("wte.weight", "ln_f") } else { ("embed_tokens.weight", "norm") };
        Params {
            wte: (wte.to_string(), vec![v, c]),
            wpe: gpt2.then(|| ("wpe.weight".to_string(), vec![config.n_positions, c])),
            blocks: (0..config.n_layer).map(block).collect(),
            norm_f: Norm::new(norm_f, c, gpt2),
            lm_head: (!config.tie_word_embeddings).then(|| ("lm_head.weight".to_string(), vec![v, c])),
        }
    }
}

impl DecoderConfig {
    /// Every parameter tensor in the model's order, with its name (HF's, without the trunk prefix;
    /// the Llama family's fused `qkv_proj` and `gate_up_proj`, see the module documentation) and
    /// shape. The model, the checkpoint reader and the writer all enumerate parameters through this
    /// one list.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        Params::schema(self).into_ordered()
    }

    /// Total number of parameters (a tied LM head counted once).
    pub fn num_params(&self) -> usize {
        self.parameter_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }
}

/// The HF tensors a parameter joins, with their number of rows (the parameter is their
/// concatenation along dimension 0, in this order), or `None` for a parameter stored as it is.
pub fn fused_parts(config: &DecoderConfig, name: &str) -> Option<Vec<(String, usize)>> {
    let layout = config.qkv_layout();
    if let Some(prefix) = name.strip_suffix(".qkv_proj.weight").or_else(|| name.strip_suffix(".qkv_proj.bias")) {
        let kind = if name.ends_with("weight") { "weight" } else { "bias" };
        let rows = [("q_proj", layout.q_width()), ("k_proj", layout.kv_width()), ("v_proj", layout.kv_width())];
        return Some(rows.iter().map(|(part, r)| (format!("{prefix}.{part}.{kind}"), *r)).collect());
    }
    if let Some(prefix) = name.strip_suffix(".gate_up_proj.weight").or_else(|| name.strip_suffix(".gate_up_proj.bias"))
    {
        let kind = if name.ends_with("weight") { "weight" } else { "bias" };
        let f = config.intermediate_size;
        return Some(vec![(format!("{prefix}.gate_proj.{kind}"), f), (format!("{prefix}.up_proj.{kind}"), f)]);
    }
    None
}

/// How `random_weights` initialises a tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Init {
    /// A norm's gain.
    One,
    /// A bias.
    Zero,
    /// A weight, N(0, 0.02²); `residual`: an output projection into the residual stream (the
    /// attention's `o`, the MLP's `down`), which GPT-2 scales down.
    Normal { residual: bool },
}

impl Params<Described> {
    /// Each tensor's initialisation, in the model's order.
    pub(super) fn initialisation(self) -> Vec<Init> {
        let norm = |n: Norm<Described>| Norm { w: Init::One, b: n.b.map(|_| Init::Zero) };
        let linear = |l: Linear<Described>, residual: bool| {
            let w = Init::Normal { residual };
            Linear { w, b: l.b.map(|_| Init::Zero) }
        };
        let blocks = self
            .blocks
            .into_iter()
            .map(|b| BlockParams {
                norm_1: norm(b.norm_1),
                qkv: linear(b.qkv, false),
                o: linear(b.o, true),
                norm_2: norm(b.norm_2),
                up: linear(b.up, false),
                down: linear(b.down, true),
            })
            .collect();
        let normal = Init::Normal { residual: false };
        Params {
            wte: normal,
            wpe: self.wpe.map(|_| normal),
            blocks,
            norm_f: norm(self.norm_f),
            lm_head: self.lm_head.map(|_| normal),
        }
        .into_ordered()
    }
}

impl<T> Norm<T> {
    fn map<U>(self, f: &mut impl FnMut(T) -> U) -> Norm<U> {
        let w = f(self.w);
        Norm { w, b: self.b.map(f) }
    }
    fn refs(&self) -> impl Iterator<Item = &T> {
        std::iter::once(&self.w).chain(&self.b)
    }
    fn refs_mut(&mut self) -> impl Iterator<Item = &mut T> {
        std::iter::once(&mut self.w).chain(&mut self.b)
    }
}

impl<T> Linear<T> {
    fn map<U>(self, f: &mut impl FnMut(T) -> U) -> Linear<U> {
        let w = f(self.w);
        Linear { w, b: self.b.map(f) }
    }
    fn refs(&self) -> impl Iterator<Item = &T> {
        std::iter::once(&self.w).chain(&self.b)
    }
    fn refs_mut(&mut self) -> impl Iterator<Item = &mut T> {
        std::iter::once(&mut self.w).chain(&mut self.b)
    }
}

impl<T> BlockParams<T> {
    /// The pieces in order; `map` below calls its function in this same order.
    fn map<U>(self, f: &mut impl FnMut(T) -> U) -> BlockParams<U> {
        let norm_1 = self.norm_1.map(f);
        let qkv = self.qkv.map(f);
        let o = self.o.map(f);
        let norm_2 = self.norm_2.map(f);
        let up = self.up.map(f);
        let down = self.down.map(f);
        BlockParams { norm_1, qkv, o, norm_2, up, down }
    }
    fn refs(&self) -> impl Iterator<Item = &T> {
        self.norm_1
            .refs()
            .chain(self.qkv.refs())
            .chain(self.o.refs())
            .chain(self.norm_2.refs())
            .chain(self.up.refs().chain(self.down.refs()))
    }
    fn refs_mut(&mut self) -> impl Iterator<Item = &mut T> {
        let Self { norm_1, qkv, o, norm_2, up, down } = self;
        norm_1
            .refs_mut()
            .chain(qkv.refs_mut())
            .chain(o.refs_mut())
            .chain(norm_2.refs_mut())
            .chain(up.refs_mut().chain(down.refs_mut()))
    }
}

impl<T> Params<T> {
    /// The same parameters with each tensor replaced by `f(tensor)`, `f` called in the model's
    /// order (the order of `ordered`).
    pub(super) fn map<U>(self, mut f: impl FnMut(T) -> U) -> Params<U> {
        let wte = f(self.wte);
        let wpe = self.wpe.map(&mut f);
        let blocks = self.blocks.into_iter().map(|b| b.map(&mut f)).collect();
        let norm_f = self.norm_f.map(&mut f);
        let lm_head = self.lm_head.map(&mut f);
        Params { wte, wpe, blocks, norm_f, lm_head }
    }

    /// Builds from tensors listed in [`DecoderConfig::parameter_shapes`] order.
    pub(super) fn from_ordered(tensors: Vec<T>, config: &DecoderConfig) -> Self {
        let schema = Params::schema(config);
        assert_eq!(tensors.len(), schema.ordered().len(), "parameter count does not match the config");
        let mut it = tensors.into_iter();
        schema.map(|_| it.next().expect("counted above"))
    }

    /// Every tensor, in [`DecoderConfig::parameter_shapes`] order.
    pub(super) fn ordered(&self) -> Vec<&T> {
        std::iter::once(&self.wte)
            .chain(&self.wpe)
            .chain(self.blocks.iter().flat_map(BlockParams::refs))
            .chain(self.norm_f.refs())
            .chain(&self.lm_head)
            .collect()
    }

    /// Every tensor, mutable, in [`DecoderConfig::parameter_shapes`] order.
    pub(super) fn ordered_mut(&mut self) -> Vec<&mut T> {
        let Self { wte, wpe, blocks, norm_f, lm_head } = self;
        std::iter::once(wte)
            .chain(wpe)
            .chain(blocks.iter_mut().flat_map(BlockParams::refs_mut))
            .chain(norm_f.refs_mut())
            .chain(lm_head)
            .collect()
    }

    /// Every tensor, by value, in order.
    pub(super) fn into_ordered(self) -> Vec<T> {
        let mut out = Vec::new();
        self.map(|t| out.push(t));
        out
    }

    /// The LM head's weight `[V, C]`: its own, or the token embedding it is tied to.
    pub(super) fn head(&self) -> &T {
        self.lm_head.as_ref().unwrap_or(&self.wte)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GPT-2's parameters in HF's order, names and shapes, as GPT-2's checkpoints, the optimizer's
    /// state and the reference-log-prob cache's hash expect them.
    #[test]
    fn parameter_shapes_are_gpt2s_in_hf_order() {
        let config = DecoderConfig::gpt2(37, 32, 16, 2, 2);
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

    /// A Llama with GQA, Qwen2's q/k/v biases and an untied head: names, fused shapes, order.
    #[test]
    fn parameter_shapes_of_the_llama_family() {
        let mut config = DecoderConfig::llama(50, 64, 32, 1, 4, 2, 48);
        config.family = Family::Qwen2;
        config.qkv_bias = true;
        let (hd, c, f) = (8, 32, 48);
        let width = 4 * hd + 2 * 2 * hd;
        let names: Vec<(String, Vec<usize>)> = [
            ("embed_tokens.weight", vec![50, c]),
            ("layers.0.input_layernorm.weight", vec![c]),
            ("layers.0.self_attn.qkv_proj.weight", vec![width, c]),
            ("layers.0.self_attn.qkv_proj.bias", vec![width]),
            ("layers.0.self_attn.o_proj.weight", vec![c, 4 * hd]),
            ("layers.0.post_attention_layernorm.weight", vec![c]),
            ("layers.0.mlp.gate_up_proj.weight", vec![2 * f, c]),
            ("layers.0.mlp.down_proj.weight", vec![c, f]),
            ("norm.weight", vec![c]),
            ("lm_head.weight", vec![50, c]),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s))
        .collect();
        assert_eq!(config.parameter_shapes(), names);
        let parts = fused_parts(&config, "layers.0.self_attn.qkv_proj.weight").unwrap();
        assert_eq!(parts[1], ("layers.0.self_attn.k_proj.weight".to_string(), 2 * hd));
        let parts = fused_parts(&config, "layers.0.mlp.gate_up_proj.weight").unwrap();
        assert_eq!(parts, vec![("layers.0.mlp.gate_proj.weight".into(), f), ("layers.0.mlp.up_proj.weight".into(), f)]);
        assert!(fused_parts(&config, "layers.0.self_attn.o_proj.weight").is_none());
        config.tie_word_embeddings = true;
        assert_eq!(config.parameter_shapes().last().unwrap().0, "norm.weight");
    }

    /// Each field holds the tensor its name says, whichever way the parameters are walked: built
    /// from `parameter_shapes` order, and read back in that order, shared, mutable or by value.
    #[test]
    fn params_fields_follow_parameter_shapes_order() {
        let mut llama = DecoderConfig::llama(50, 64, 32, 2, 4, 2, 48);
        llama.o_bias = true;
        for config in [DecoderConfig::gpt2(37, 32, 16, 3, 2), llama] {
            let names: Vec<String> = config.parameter_shapes().into_iter().map(|(name, _)| name).collect();
            let mut params = Params::from_ordered(names.clone(), &config);
            assert!(params.blocks[1].o.b.as_ref().unwrap().starts_with(if config.family.is_gpt2() {
                "h.1.attn.c_proj.bias"
            } else {
                "layers.1.self_attn.o_proj.bias"
            }));
            assert!(params.blocks[0].down.w.ends_with("_proj.weight"));
            assert_eq!(params.ordered(), names.iter().collect::<Vec<_>>());
            let mut names_mut = names.clone();
            assert_eq!(params.ordered_mut(), names_mut.iter_mut().collect::<Vec<_>>());
            assert_eq!(params.into_ordered(), names);
        }
    }
}
