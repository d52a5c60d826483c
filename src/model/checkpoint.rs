//! Model directories exactly as Hugging Face writes them: `config.json` + `model.safetensors`.

use std::collections::BTreeMap;

use super::Gpt2Config;

/// Parameters on the host in HF GPT-2 names without the `transformer.` prefix (`wte.weight`,
/// `h.0.attn.c_attn.weight`, …, `ln_f.bias`), Conv1D weights `[in, out]`, all f32.
#[derive(Clone, Debug, PartialEq)]
pub struct HostWeights {
    pub config: Gpt2Config,
    /// name → (shape, data)
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}
