//! The decoder's configuration ([`DecoderConfig`]), read from and written to Hugging Face's
//! `config.json`, for every family the engine runs: GPT-2, and the Llama family (Llama, Mistral,
//! Qwen2). A family is a set of choices of one decoder ([`Family`]: norm, positions, MLP, weight
//! layout, biases); the sizes are the config's. The parameters a configuration defines
//! (`DecoderConfig::parameter_shapes`) are listed in `params.rs`.
//!
//! Reading accepts the configs `transformers` writes, 4.x and 5.x: RoPE as `rope_theta` +
//! `rope_scaling` (4.x) or as `rope_parameters` (5.x), `rope_type` or the older `type`, `head_dim`
//! absent or null. Anything that would change the math away from what the engine computes is an
//! error that names the field.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};

use super::sliding_window::{self, LayerAttention};
use crate::backend::{QkvLayout, RopeScaling, Window};

/// A model family: which norm, positions, MLP, weight layout and biases the decoder uses, and the
/// HF names of its tensors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// GPT-2: LayerNorm with bias, learned positions, GELU (tanh) MLP, biases everywhere, Conv1D
    /// weights `[in, out]`, LM head tied to the token embedding.
    #[default]
    Gpt2,
    /// Llama: RMSNorm, RoPE, SwiGLU MLP, no biases (unless `attention_bias` / `mlp_bias`),
    /// `nn.Linear` weights `[out, in]`, grouped-query attention, head tied or not.
    Llama,
    /// Mistral: Llama's architecture, plus a sliding attention window.
    Mistral,
    /// Qwen2: Llama's architecture with biases on q, k and v (not on o).
    Qwen2,
}

impl Family {
    pub const ALL: [Family; 4] = [Family::Gpt2, Family::Llama, Family::Mistral, Family::Qwen2];

    /// HF `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Gpt2 => "gpt2",
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
        }
    }

    /// HF `architectures` entry of the causal-LM class.
    pub fn causal_lm_class(self) -> &'static str {
        match self {
            Family::Gpt2 => "GPT2LMHeadModel",
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// The `architectures` entries whose weights this family reads (the causal LM, or its trunk).
    fn known_architectures(self) -> [&'static str; 2] {
        match self {
            Family::Gpt2 => ["GPT2LMHeadModel", "GPT2Model"],
            Family::Llama => ["LlamaForCausalLM", "LlamaModel"],
            Family::Mistral => ["MistralForCausalLM", "MistralModel"],
            Family::Qwen2 => ["Qwen2ForCausalLM", "Qwen2Model"],
        }
    }

    pub fn from_model_type(name: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|f| f.model_type() == name).with_context(|| {
            let known: Vec<&str> = Self::ALL.iter().map(|f| f.model_type()).collect();
            format!("unknown architecture: field `model_type` is \"{name}\", supported: {known:?}")
        })
    }

    /// GPT-2's blocks (LayerNorm, learned positions, GELU, Conv1D); else the Llama family's.
    pub fn is_gpt2(self) -> bool {
        self == Family::Gpt2
    }

    /// [`Family::is_gpt2`] by reference (for serde's `skip_serializing_if`).
    pub fn is_gpt2_ref(&self) -> bool {
        self.is_gpt2()
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

impl std::str::FromStr for Family {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_model_type(s)
    }
}

/// Rotary position embeddings: the base and the frequency rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// The sizes and options of a decoder. GPT-2 fills the Llama-only fields with what GPT-2 is
/// (`n_kv_head = n_head`, `intermediate_size = 4·n_embd`, no RoPE, tied, biases).
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderConfig {
    pub family: Family,
    pub vocab_size: usize,
    /// Context length: GPT-2's `n_positions`, the Llama family's `max_position_embeddings`.
    pub n_positions: usize,
    /// Width of the residual stream (`n_embd` / `hidden_size`).
    pub n_embd: usize,
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (`num_key_value_heads`): grouped-query attention when fewer than `n_head`.
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// Width of the MLP's hidden layer (GPT-2: 4·n_embd).
    pub intermediate_size: usize,
    /// `layer_norm_epsilon` / `rms_norm_eps`.
    pub norm_eps: f32,
    /// RoPE (the Llama family); `None`: learned positions (GPT-2).
    pub rope: Option<Rope>,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (GPT-2, Qwen2, Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the attention's output projection (GPT-2, Llama's `attention_bias`).
    pub o_bias: bool,
    /// Biases in the MLP (GPT-2, Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Mistral's (or Qwen2's, with `use_sliding_window`) attention window: in the layers that use
    /// it a query sees its `w` latest tokens, itself included; `None`: every layer attends to the
    /// whole causal prefix (`sliding_window.rs`).
    pub sliding_window: Option<usize>,
    /// Which layers use the window (HF `layer_types`; Qwen2's); `None`: every layer (Mistral).
    pub layer_types: Option<Vec<LayerAttention>>,
    /// The fields of the HF config this engine does not interpret (token ids, dropout,
    /// `transformers_version`, …), written back on save so that a saved model keeps them. GPT-2
    /// writes its own fixed set instead.
    pub hf_extra: Map<String, Value>,
}

impl DecoderConfig {
    /// A GPT-2 of the given sizes (`n_kv_head = n_head`, MLP 4·n_embd, eps 1e-5).
    pub fn gpt2(vocab_size: usize, n_positions: usize, n_embd: usize, n_layer: usize, n_head: usize) -> Self {
        Self {
            family: Family::Gpt2,
            vocab_size,
            n_positions,
            n_embd,
            n_layer,
            n_head,
            n_kv_head: n_head,
            head_dim: n_embd / n_head.max(1),
            intermediate_size: 4 * n_embd,
            norm_eps: 1e-5,
            rope: None,
            tie_word_embeddings: true,
            qkv_bias: true,
            o_bias: true,
            mlp_bias: true,
            sliding_window: None,
            layer_types: None,
            hf_extra: Map::new(),
        }
    }

    /// A Llama of the given sizes: `n_kv_head` key/value heads, MLP `intermediate_size`, RoPE
    /// θ = 10000 unscaled, eps 1e-5, no biases, untied head.
    pub fn llama(
        vocab_size: usize,
        n_positions: usize,
        n_embd: usize,
        n_layer: usize,
        n_head: usize,
        n_kv_head: usize,
        intermediate_size: usize,
    ) -> Self {
        Self {
            family: Family::Llama,
            n_kv_head,
            intermediate_size,
            rope: Some(Rope { theta: 10000.0, scaling: RopeScaling::Default }),
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            ..Self::gpt2(vocab_size, n_positions, n_embd, n_layer, n_head)
        }
    }

    /// The tiny shape of the CPU benchmark: L=4, d=128, 4 heads, vocab 512.
    pub fn tiny() -> Self {
        Self::gpt2(512, 1024, 128, 4, 4)
    }

    /// GPT-2 124M (vocab 50257, 12 layers, d=768, 12 heads).
    pub fn gpt2_124m() -> Self {
        Self::gpt2(50257, 1024, 768, 12, 12)
    }

    /// A Llama-3.2-1B-shaped model (16 layers, d=2048, 32 heads, 8 KV heads of 64, MLP 8192,
    /// vocab 128256, llama3 RoPE scaling, tied head).
    pub fn llama_1b() -> Self {
        let mut config = Self::llama(128256, 131072, 2048, 16, 32, 8, 8192);
        config.rope = Some(Rope {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        });
        config.tie_word_embeddings = true;
        config
    }

    /// Whether `other` is the same architecture: every field but `hf_extra` (token ids, versions
    /// and the other fields the engine does not read may differ between two models of one shape).
    pub fn same_architecture(&self, other: &Self) -> bool {
        let strip = |c: &Self| Self { hf_extra: Map::new(), ..c.clone() };
        strip(self) == strip(other)
    }

    /// One line for logs: family, layers, width, heads (and key/value heads), MLP, vocabulary.
    pub fn summary(&self) -> String {
        let heads = if self.n_kv_head == self.n_head {
            format!("{} heads", self.n_head)
        } else {
            format!("{} heads on {} key/value heads", self.n_head, self.n_kv_head)
        };
        format!(
            "{} with {} layers, d={}, {heads} of {}, MLP {}, vocab {}",
            self.family, self.n_layer, self.n_embd, self.head_dim, self.intermediate_size, self.vocab_size
        )
    }

    /// Layer `l`'s attention window (`None`: the whole causal prefix).
    pub fn layer_window(&self, l: usize) -> Window {
        match &self.layer_types {
            Some(layers) if layers.get(l) != Some(&LayerAttention::Sliding) => None,
            _ => self.sliding_window,
        }
    }

    /// The layout of the attention's `qkv` rows.
    pub fn qkv_layout(&self) -> QkvLayout {
        QkvLayout { n_head: self.n_head, n_kv_head: self.n_kv_head, head_dim: self.head_dim }
    }

    /// Checks the shape is one the model can run.
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("num_key_value_heads", self.n_kv_head),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
        ] {
            ensure!(value > 0, "model config: `{field}` must be positive, got 0");
        }
        ensure!(
            self.n_head.is_multiple_of(self.n_kv_head),
            "model config: `num_attention_heads` ({}) must be a multiple of `num_key_value_heads` ({})",
            self.n_head,
            self.n_kv_head
        );
        ensure!(
            self.norm_eps.is_finite() && self.norm_eps > 0.0,
            "model config: the norm epsilon must be a positive number, got {}",
            self.norm_eps
        );
        ensure!(self.sliding_window != Some(0), "model config: `sliding_window` must be positive, got 0");
        if let Some(layers) = &self.layer_types {
            ensure!(
                layers.len() == self.n_layer,
                "model config: `layer_types` lists {} layers for {} layers",
                layers.len(),
                self.n_layer
            );
        }
        if self.family.is_gpt2() {
            ensure!(self.sliding_window.is_none(), "model config: GPT-2 has no sliding attention window");
            ensure!(
                self.n_embd.is_multiple_of(self.n_head),
                "model config: `n_embd` ({}) must be divisible by `n_head` ({})",
                self.n_embd,
                self.n_head
            );
            ensure!(
                self.head_dim * self.n_head == self.n_embd && self.n_kv_head == self.n_head,
                "model config: GPT-2 has n_embd / n_head channels per head and one key/value head per query head"
            );
            ensure!(self.rope.is_none(), "model config: GPT-2 has learned positions, not RoPE");
        } else {
            let rope = self.rope.context("model config: the Llama family needs RoPE (`rope_theta`)")?;
            ensure!(
                self.head_dim.is_multiple_of(2),
                "model config: `head_dim` ({}) must be even for RoPE",
                self.head_dim
            );
            crate::backend::rope_inverse_frequencies(self.head_dim, rope.theta, rope.scaling)
                .context("model config: RoPE")?;
        }
        Ok(())
    }

    /// Reads HF's `config.json`. Anything the engine does not compute is an error that names the
    /// file and the field.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading model config {}", path.display()))?;
        let value: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        let Value::Object(obj) = value else {
            bail!("{}: expected a JSON object at the top level", path.display());
        };
        Self::from_hf_object(&obj).with_context(|| format!("model config {}", path.display()))
    }

    /// Parses a config object (see [`DecoderConfig::from_hf_json`]).
    pub fn from_hf_object(obj: &Map<String, Value>) -> Result<Self> {
        let family = Family::from_model_type(str_field(obj, "model_type")?)?;
        if let Some(archs) = obj.get("architectures").filter(|v| !v.is_null()) {
            let Value::Array(archs) = archs else {
                bail!("field `architectures`: expected a list of strings, got {archs}");
            };
            let known = family.known_architectures();
            for arch in archs {
                let name =
                    arch.as_str().with_context(|| format!("field `architectures`: expected strings, got {arch}"))?;
                ensure!(
                    known.contains(&name),
                    "unknown architecture: field `architectures` lists \"{name}\", expected one of {known:?} for \
                     model_type \"{family}\""
                );
            }
        }
        let config = if family.is_gpt2() { gpt2_from_hf(obj)? } else { llama_from_hf(family, obj)? };
        config.validate()?;
        Ok(config)
    }

    /// The `config.json` `transformers` loads as this family's causal LM, for f32 weights.
    pub fn to_hf_json(&self) -> String {
        self.to_hf_json_with_dtype("float32")
    }

    /// [`DecoderConfig::to_hf_json`] for weights stored as `torch_dtype` (`float32`, `bfloat16`,
    /// `float16`).
    pub fn to_hf_json_with_dtype(&self, torch_dtype: &str) -> String {
        let mut value = if self.family.is_gpt2() { self.gpt2_to_hf() } else { self.llama_to_hf() };
        value["torch_dtype"] = json!(torch_dtype);
        let mut text = serde_json::to_string_pretty(&value).expect("a JSON value always serialises");
        text.push('\n');
        text
    }

    /// GPT-2 as `GPT2LMHeadModel` expects it: `gelu_new`, zero dropout, tied embeddings, BOS/EOS at
    /// the last token id, f32 weights.
    fn gpt2_to_hf(&self) -> Value {
        let special = self.vocab_size.saturating_sub(1);
        json!({
            "activation_function": "gelu_new",
            "architectures": ["GPT2LMHeadModel"],
            "attn_pdrop": 0.0,
            "bos_token_id": special,
            "embd_pdrop": 0.0,
            "eos_token_id": special,
            "initializer_range": 0.02,
            "layer_norm_epsilon": shortest(self.norm_eps),
            "model_type": "gpt2",
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_inner": null,
            "n_layer": self.n_layer,
            "n_positions": self.n_positions,
            "reorder_and_upcast_attn": false,
            "resid_pdrop": 0.0,
            "scale_attn_by_inverse_layer_idx": false,
            "scale_attn_weights": true,
            "summary_activation": null,
            "summary_first_dropout": 0.0,
            "summary_proj_to_labels": true,
            "summary_type": "cls_index",
            "summary_use_proj": true,
            "tie_word_embeddings": true,
            "torch_dtype": "float32",
            "use_cache": true,
            "vocab_size": self.vocab_size,
        })
    }

    /// The Llama family in `transformers` 4.x form (`rope_theta` + `rope_scaling`), which 5.x reads
    /// too; the fields the engine does not interpret come back from `hf_extra`.
    fn llama_to_hf(&self) -> Value {
        let mut obj = self.hf_extra.clone();
        let rope = self.rope.expect("validated: the Llama family has RoPE");
        let rope_scaling = match rope.scaling {
            RopeScaling::Default => Value::Null,
            RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                json!({
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings as u64,
                })
            }
        };
        let fields = [
            ("architectures", json!([self.family.causal_lm_class()])),
            ("model_type", json!(self.family.model_type())),
            ("vocab_size", json!(self.vocab_size)),
            ("max_position_embeddings", json!(self.n_positions)),
            ("hidden_size", json!(self.n_embd)),
            ("num_hidden_layers", json!(self.n_layer)),
            ("num_attention_heads", json!(self.n_head)),
            ("num_key_value_heads", json!(self.n_kv_head)),
            ("head_dim", json!(self.head_dim)),
            ("intermediate_size", json!(self.intermediate_size)),
            ("hidden_act", json!("silu")),
            ("rms_norm_eps", shortest(self.norm_eps)),
            ("rope_theta", json!(rope.theta)),
            ("rope_scaling", rope_scaling),
            ("tie_word_embeddings", json!(self.tie_word_embeddings)),
        ];
        for (key, value) in fields {
            obj.insert(key.to_string(), value);
        }
        match self.family {
            Family::Qwen2 => {
                let layers = self.layer_types.as_deref();
                sliding_window::qwen2_to_hf(&mut obj, self.sliding_window, layers, self.n_layer);
            }
            Family::Mistral => sliding_window::mistral_to_hf(&mut obj, self.sliding_window),
            _ => {
                obj.insert("attention_bias".into(), json!(self.qkv_bias));
                obj.insert("mlp_bias".into(), json!(self.mlp_bias));
            }
        }
        // Sorted keys, as `transformers` writes them.
        Value::Object(obj.into_iter().collect::<std::collections::BTreeMap<_, _>>().into_iter().collect())
    }
}

/// An f32 written through its shortest decimal form, so 1e-5 stays 1e-5 and not 9.99…e-6.
fn shortest(x: f32) -> Value {
    json!(x.to_string().parse::<f64>().unwrap_or(x as f64))
}

/// GPT-2 as `transformers` defines it, with the options this engine implements (`gelu_new`, tied
/// embeddings, standard attention scaling).
fn gpt2_from_hf(obj: &Map<String, Value>) -> Result<DecoderConfig> {
    if obj.get("activation_function").is_some_and(|v| !v.is_null()) {
        let act = str_field(obj, "activation_function")?;
        ensure!(act == "gelu_new", "field `activation_function` is \"{act}\"; only \"gelu_new\" is supported");
    }
    // Options that change the math away from what this engine computes.
    expect_bool_if_present(obj, "tie_word_embeddings", true, "untied LM heads are not supported for GPT-2")?;
    expect_bool_if_present(obj, "scale_attn_weights", true, "attention must be scaled by 1/sqrt(head_dim)")?;
    expect_bool_if_present(obj, "scale_attn_by_inverse_layer_idx", false, "layer-index attention scaling")?;

    let n_positions = match obj.get("n_positions") {
        Some(_) => usize_field(obj, "n_positions")?,
        None => usize_field(obj, "n_ctx").context("neither `n_positions` nor `n_ctx` is usable")?,
    };
    let (n_embd, n_head) = (usize_field(obj, "n_embd")?, usize_field(obj, "n_head")?);
    ensure!(n_head > 0, "model config: `n_head` must be positive, got 0");
    let mut config =
        DecoderConfig::gpt2(usize_field(obj, "vocab_size")?, n_positions, n_embd, usize_field(obj, "n_layer")?, n_head);
    config.norm_eps = f64_field(obj, "layer_norm_epsilon")? as f32;
    if let Some(n_inner) = obj.get("n_inner").filter(|v| !v.is_null()) {
        let n_inner = usize_field(obj, "n_inner").map_err(|_| anyhow::anyhow!("field `n_inner`: got {n_inner}"))?;
        ensure!(
            n_inner == 4 * n_embd,
            "field `n_inner` is {n_inner}; only the default 4·n_embd = {} is supported",
            4 * n_embd
        );
    }
    Ok(config)
}

/// The fields `llama_from_hf` interprets; the others travel in `hf_extra` (Qwen2's
/// `max_window_layers` and `layer_types` too, which saving rewrites when they no longer say the
/// layers' attention: `sliding_window.rs`).
const LLAMA_FIELDS: [&str; 23] = [
    "torch_dtype",
    "dtype",
    "architectures",
    "model_type",
    "vocab_size",
    "max_position_embeddings",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
    "use_sliding_window",
    "pretraining_tp",
];

/// Llama, Mistral and Qwen2 as `transformers` 4.x and 5.x write them.
fn llama_from_hf(family: Family, obj: &Map<String, Value>) -> Result<DecoderConfig> {
    let hidden_act = obj.get("hidden_act").and_then(Value::as_str).unwrap_or("silu");
    ensure!(hidden_act == "silu", "field `hidden_act` is \"{hidden_act}\"; only \"silu\" (SwiGLU) is supported");
    if let Some(tp) = obj.get("pretraining_tp").filter(|v| !v.is_null()) {
        ensure!(tp.as_u64() == Some(1), "field `pretraining_tp` is {tp}; only 1 is supported");
    }
    let n_embd = usize_field(obj, "hidden_size")?;
    let n_head = usize_field(obj, "num_attention_heads")?;
    ensure!(n_head > 0, "field `num_attention_heads` must be positive, got 0");
    let n_kv_head = optional_usize(obj, "num_key_value_heads")?.unwrap_or(n_head);
    ensure!(
        n_kv_head > 0 && n_head.is_multiple_of(n_kv_head),
        "field `num_attention_heads` ({n_head}) must be a multiple of `num_key_value_heads` ({n_kv_head})"
    );
    let head_dim = match optional_usize(obj, "head_dim")? {
        Some(d) => d,
        None => {
            ensure!(
                n_embd.is_multiple_of(n_head),
                "field `hidden_size` ({n_embd}) is not a multiple of `num_attention_heads` ({n_head}) and no \
                 `head_dim` is given"
            );
            n_embd / n_head
        }
    };
    // `tie_word_embeddings`: `PretrainedConfig`'s default is true, but LlamaConfig, MistralConfig
    // and Qwen2Config all default it to false.
    let tie = match obj.get("tie_word_embeddings") {
        None | Some(Value::Null) => false,
        Some(v) => v.as_bool().with_context(|| format!("field `tie_word_embeddings`: expected a boolean, got {v}"))?,
    };
    let flag = |name: &str| -> Result<bool> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(false),
            Some(v) => v.as_bool().with_context(|| format!("field `{name}`: expected a boolean, got {v}")),
        }
    };
    let (qkv_bias, o_bias, mlp_bias) = match family {
        Family::Qwen2 => (true, false, false),
        _ => (flag("attention_bias")?, flag("attention_bias")?, flag("mlp_bias")?),
    };
    let n_layer = usize_field(obj, "num_hidden_layers")?;
    let (sliding_window, layer_types) = match family {
        Family::Mistral => sliding_window::mistral_from_hf(obj)?,
        Family::Qwen2 => sliding_window::qwen2_from_hf(obj, n_layer)?,
        _ => (None, None),
    };
    let hf_extra = obj.iter().filter(|(k, _)| !LLAMA_FIELDS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone()));
    Ok(DecoderConfig {
        family,
        vocab_size: usize_field(obj, "vocab_size")?,
        n_positions: usize_field(obj, "max_position_embeddings")?,
        n_embd,
        n_layer,
        n_head,
        n_kv_head,
        head_dim,
        intermediate_size: usize_field(obj, "intermediate_size")?,
        norm_eps: f64_field(obj, "rms_norm_eps")? as f32,
        rope: Some(rope_from_hf(obj)?),
        tie_word_embeddings: tie,
        qkv_bias,
        o_bias,
        mlp_bias,
        sliding_window,
        layer_types,
        hf_extra: hf_extra.collect(),
    })
}

/// RoPE from `rope_theta` + `rope_scaling` (transformers 4.x) or `rope_parameters` (5.x, which
/// holds `rope_theta` itself).
fn rope_from_hf(obj: &Map<String, Value>) -> Result<Rope> {
    let parameters = obj.get("rope_parameters").filter(|v| !v.is_null());
    let (params, field) = match parameters {
        Some(p) => (Some(p), "rope_parameters"),
        None => (obj.get("rope_scaling").filter(|v| !v.is_null()), "rope_scaling"),
    };
    let params = match params {
        None => None,
        Some(Value::Object(p)) => Some(p),
        Some(other) => bail!("field `{field}`: expected an object, got {other}"),
    };
    let theta = match params.and_then(|p| p.get("rope_theta")).filter(|v| !v.is_null()) {
        Some(v) => v.as_f64().with_context(|| format!("field `{field}.rope_theta`: expected a number, got {v}"))?,
        None => match obj.get("rope_theta").filter(|v| !v.is_null()) {
            Some(_) => f64_field(obj, "rope_theta")?,
            None => 10000.0, // LlamaConfig's default
        },
    };
    let Some(p) = params else {
        return Ok(Rope { theta, scaling: RopeScaling::Default });
    };
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    let number = |name: &str| -> Result<f64> {
        let v = p.get(name).with_context(|| format!("field `{field}.{name}` is missing (rope_type \"{kind}\")"))?;
        v.as_f64().with_context(|| format!("field `{field}.{name}`: expected a number, got {v}"))
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: number("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: number("original_max_position_embeddings")?,
        },
        other => bail!(
            "field `{field}`: rope_type \"{other}\" is not supported (supported: \"default\", \"linear\", \"llama3\")"
        ),
    };
    Ok(Rope { theta, scaling })
}

fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a Value> {
    obj.get(name).with_context(|| format!("missing field `{name}`"))
}

fn str_field<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a str> {
    let v = field(obj, name)?;
    v.as_str().with_context(|| format!("field `{name}`: expected a string, got {v}"))
}

fn usize_field(obj: &Map<String, Value>, name: &str) -> Result<usize> {
    let v = field(obj, name)?;
    v.as_u64()
        .and_then(|x| usize::try_from(x).ok())
        .with_context(|| format!("field `{name}`: expected a non-negative integer, got {v}"))
}

/// A non-negative integer field that may be absent or null.
fn optional_usize(obj: &Map<String, Value>, name: &str) -> Result<Option<usize>> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => usize_field(obj, name).map(Some),
    }
}

fn f64_field(obj: &Map<String, Value>, name: &str) -> Result<f64> {
    let v = field(obj, name)?;
    v.as_f64().with_context(|| format!("field `{name}`: expected a number, got {v}"))
}

/// A boolean option that, when present, must have the one value this engine implements.
fn expect_bool_if_present(obj: &Map<String, Value>, name: &str, expected: bool, why: &str) -> Result<()> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Bool(b)) if *b == expected => Ok(()),
        Some(Value::Bool(b)) => bail!("field `{name}` is {b}; only {expected} is supported ({why})"),
        Some(v) => bail!("field `{name}`: expected a boolean, got {v}"),
    }
}
