//! PEFT's adapter directories, in and out: `adapter_config.json` (the `LoraConfig` PEFT saves) and
//! `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight` `[r, in]`,
//! `….lora_B.weight` `[out, r]`), as `PeftModel.save_pretrained` writes them and
//! `PeftModel.from_pretrained` reads them. Reading refuses what the engine does not implement (DoRA,
//! per-module ranks or alphas, trained biases, regex targets) with an error naming it.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

use super::checkpoint::read_f32_tensor;
use super::lora::{HostAdapters, LoraSpec};
use super::DecoderConfig;
use crate::util::write_atomic;

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Whether `dir` holds a PEFT adapter (its `adapter_config.json`).
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG_FILE).is_file()
}

/// Writes `adapters` as PEFT does (f32), atomically file by file, the weights before the config.
/// `base` is recorded as `base_model_name_or_path`.
pub fn save_adapter(adapters: &HostAdapters, config: &DecoderConfig, base: &str, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating adapter directory {}", dir.display()))?;
    let views = adapters
        .tensors
        .iter()
        .map(|(name, (shape, data))| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(data))
                .map_err(|e| anyhow::anyhow!("tensor {name}: {e}"))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::tensor::serialize(views, Some(meta)).map_err(|e| anyhow::anyhow!("serialising: {e}"))?;
    write_atomic(&dir.join(ADAPTER_WEIGHTS_FILE), &bytes)?;
    let spec = &adapters.spec;
    let cfg = json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base,
        "bias": "none",
        "fan_in_fan_out": config.family.is_gpt2(),
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": spec.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": adapters.target_names(config),
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": spec.use_rslora,
    });
    let mut text = serde_json::to_string_pretty(&cfg)?;
    text.push('\n');
    write_atomic(&dir.join(ADAPTER_CONFIG_FILE), text.as_bytes())
}

/// The spec an `adapter_config.json` gives, and its `lora_dropout`.
pub fn read_adapter_spec(dir: &Path) -> Result<(LoraSpec, f64)> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let cfg: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let field = |key: &str| cfg.get(key).filter(|v| !v.is_null());
    let peft_type = field("peft_type").and_then(Value::as_str).unwrap_or("LORA");
    ensure!(peft_type == "LORA", "{}: peft_type {peft_type}; only LORA adapters are supported", path.display());
    let r = field("r").and_then(Value::as_u64).with_context(|| format!("{}: no integer `r`", path.display()))? as usize;
    let alpha = field("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
    let dropout = field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    let bias = field("bias").and_then(Value::as_str).unwrap_or("none");
    ensure!(bias == "none", "{}: bias \"{bias}\"; only bias \"none\" is supported", path.display());
    for flag in ["use_dora", "lora_bias", "use_qalora"] {
        ensure!(!field(flag).and_then(Value::as_bool).unwrap_or(false), "{}: {flag} is not supported", path.display());
    }
    for pattern in ["rank_pattern", "alpha_pattern"] {
        let empty = field(pattern).and_then(Value::as_object).is_none_or(|m| m.is_empty());
        ensure!(empty, "{}: {pattern} (per-module ranks or alphas) is not supported", path.display());
    }
    for key in [
        "layers_to_transform",
        "modules_to_save",
        "exclude_modules",
        "layer_replication",
        "target_parameters",
        "trainable_token_indices",
    ] {
        ensure!(field(key).is_none(), "{}: {key} is not supported", path.display());
    }
    let target_modules = match field("target_modules") {
        Some(Value::Array(names)) => names
            .iter()
            .map(|v| v.as_str().map(str::to_string).context("a target module that is not a string"))
            .collect::<Result<Vec<_>>>()?,
        Some(Value::String(s)) if s == "all-linear" => vec![s.clone()],
        Some(Value::String(s)) => {
            bail!("{}: target_modules is the regular expression {s:?}; give a list of module names", path.display())
        }
        _ => bail!("{}: no target_modules", path.display()),
    };
    let use_rslora = field("use_rslora").and_then(Value::as_bool).unwrap_or(false);
    Ok((LoraSpec { r, alpha, target_modules, use_rslora }, dropout))
}

/// Reads a PEFT adapter directory for the base model `config`: an error for an adapter that does
/// not fit it, naming the tensor (missing, extra or of another shape).
pub fn load_adapter(dir: &Path, config: &DecoderConfig) -> Result<HostAdapters> {
    let (spec, _) = read_adapter_spec(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in file.tensors() {
        let shape = view.shape().to_vec();
        let data = read_f32_tensor(&file, &name, &shape)?;
        tensors.insert(name, (shape, data));
    }
    HostAdapters::from_tensors(config, spec, tensors).with_context(|| format!("loading the adapter {}", dir.display()))
}

/// `safedpo merge`: the base model directory `base` with the adapter `adapter` merged in, written to
/// `out` as a HF model directory (with the base's tokenizer files).
pub fn merge_dirs(base: &Path, adapter: &Path, out: &Path) -> Result<()> {
    let weights = super::checkpoint::load_dir(base).with_context(|| format!("loading the base {}", base.display()))?;
    let adapters = load_adapter(adapter, &weights.config)?;
    let merged = adapters.merge_into(&weights)?;
    super::checkpoint::save_dir(&merged, out)?;
    super::checkpoint::copy_tokenizer(base, out)?;
    Ok(())
}
