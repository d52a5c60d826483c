//! GPT-2 model configuration, read from and written to Hugging Face's `config.json`. The parameters
//! a configuration defines (`Gpt2Config::parameter_shapes`) are listed in `params.rs`.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// The fields of HF's `GPT2Config` that define the architecture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub layer_norm_epsilon: f32,
}

/// The `architectures` entries whose weights are a GPT-2 trunk (with or without the tied LM head).
const KNOWN_ARCHITECTURES: [&str; 2] = ["GPT2LMHeadModel", "GPT2Model"];

impl Gpt2Config {
    /// The tiny shape of the CPU benchmark: L=4, d=128, 4 heads, vocab 512.
    pub fn tiny() -> Self {
        Self { vocab_size: 512, n_positions: 1024, n_embd: 128, n_layer: 4, n_head: 4, layer_norm_epsilon: 1e-5 }
    }
    /// GPT-2 124M (vocab 50257, 12 layers, d=768, 12 heads).
    pub fn gpt2_124m() -> Self {
        Self { vocab_size: 50257, n_positions: 1024, n_embd: 768, n_layer: 12, n_head: 12, layer_norm_epsilon: 1e-5 }
    }

    /// Checks the shape is one the model can run: every size positive, `n_embd` divisible by `n_head`.
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ] {
            ensure!(value > 0, "model config: `{field}` must be positive, got 0");
        }
        ensure!(
            self.n_embd.is_multiple_of(self.n_head),
            "model config: `n_embd` ({}) must be divisible by `n_head` ({})",
            self.n_embd,
            self.n_head
        );
        ensure!(
            self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0,
            "model config: `layer_norm_epsilon` must be a positive number, got {}",
            self.layer_norm_epsilon
        );
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Reads HF's `config.json`. Accepts only GPT-2 as `transformers` defines it with the options
    /// this engine implements (`gelu_new`, tied embeddings, standard attention scaling); anything
    /// else is an error that names the file and the field.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading model config {}", path.display()))?;
        let value: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        let Value::Object(obj) = value else {
            bail!("{}: expected a JSON object at the top level", path.display());
        };
        Self::from_hf_object(&obj).with_context(|| format!("model config {}", path.display()))
    }

    fn from_hf_object(obj: &Map<String, Value>) -> Result<Self> {
        let model_type = str_field(obj, "model_type")?;
        ensure!(
            model_type == "gpt2",
            "unknown architecture: field `model_type` is \"{model_type}\", only \"gpt2\" is supported"
        );
        if let Some(archs) = obj.get("architectures") {
            let Value::Array(archs) = archs else {
                bail!("field `architectures`: expected a list of strings, got {archs}");
            };
            for arch in archs {
                let name =
                    arch.as_str().with_context(|| format!("field `architectures`: expected strings, got {arch}"))?;
                ensure!(
                    KNOWN_ARCHITECTURES.contains(&name),
                    "unknown architecture: field `architectures` lists \"{name}\", expected one of {KNOWN_ARCHITECTURES:?}"
                );
            }
        }
        if obj.get("activation_function").is_some_and(|v| !v.is_null()) {
            let act = str_field(obj, "activation_function")?;
            ensure!(act == "gelu_new", "field `activation_function` is \"{act}\"; only \"gelu_new\" is supported");
        }
        // Options that change the math away from what this engine computes.
        expect_bool_if_present(obj, "tie_word_embeddings", true, "untied LM heads are not supported")?;
        expect_bool_if_present(obj, "scale_attn_weights", true, "attention must be scaled by 1/sqrt(head_dim)")?;
        expect_bool_if_present(obj, "scale_attn_by_inverse_layer_idx", false, "layer-index attention scaling")?;

        let n_positions = match obj.get("n_positions") {
            Some(_) => usize_field(obj, "n_positions")?,
            None => usize_field(obj, "n_ctx").context("neither `n_positions` nor `n_ctx` is usable")?,
        };
        let config = Self {
            vocab_size: usize_field(obj, "vocab_size")?,
            n_positions,
            n_embd: usize_field(obj, "n_embd")?,
            n_layer: usize_field(obj, "n_layer")?,
            n_head: usize_field(obj, "n_head")?,
            layer_norm_epsilon: f64_field(obj, "layer_norm_epsilon")? as f32,
        };
        if let Some(n_inner) = obj.get("n_inner").filter(|v| !v.is_null()) {
            let n_inner = usize_field(obj, "n_inner").map_err(|_| anyhow::anyhow!("field `n_inner`: got {n_inner}"))?;
            ensure!(
                n_inner == 4 * config.n_embd,
                "field `n_inner` is {n_inner}; only the default 4·n_embd = {} is supported",
                4 * config.n_embd
            );
        }
        config.validate()?;
        Ok(config)
    }

    /// Everything `transformers` needs to load the directory as `GPT2LMHeadModel`: the architecture,
    /// `gelu_new`, zero dropout, tied embeddings, BOS/EOS at the last token id, f32 weights.
    pub fn to_hf_json(&self) -> String {
        // An f32 printed through its shortest decimal form, so 1e-5 stays 1e-5 and not 9.99…e-6.
        let eps: f64 = self.layer_norm_epsilon.to_string().parse().unwrap_or(self.layer_norm_epsilon as f64);
        let special = self.vocab_size.saturating_sub(1);
        let value = json!({
            "activation_function": "gelu_new",
            "architectures": ["GPT2LMHeadModel"],
            "attn_pdrop": 0.0,
            "bos_token_id": special,
            "embd_pdrop": 0.0,
            "eos_token_id": special,
            "initializer_range": 0.02,
            "layer_norm_epsilon": eps,
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
        });
        let mut text = serde_json::to_string_pretty(&value).expect("a JSON value always serialises");
        text.push('\n');
        text
    }
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
