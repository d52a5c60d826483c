//! Model directories exactly as Hugging Face writes them: `config.json` + `model.safetensors`.
//!
//! Reading accepts what `transformers` and the Hub produce for GPT-2: tensor names with or without
//! the `transformer.` prefix, Conv1D weights `[in, out]`, f32/bf16/f16 data, an optional
//! `lm_head.weight` that must equal `wte.weight` (tied), and HF's attention-mask buffers
//! (`h.N.attn.bias`, `h.N.attn.masked_bias`), which are not parameters and are skipped. Writing
//! produces what `GPT2LMHeadModel.save_pretrained` does in f32: prefixed names, no `lm_head`
//! (tied), metadata `{"format": "pt"}`; each file is written atomically.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};

use super::Gpt2Config;
use crate::util::{write_atomic, write_atomic_with};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The prefix `GPT2LMHeadModel` puts before the trunk's tensor names.
const PREFIX: &str = "transformer.";
const LM_HEAD: &str = "lm_head.weight";

/// Parameters on the host in HF GPT-2 names without the `transformer.` prefix (`wte.weight`,
/// `h.0.attn.c_attn.weight`, …, `ln_f.bias`), Conv1D weights `[in, out]`, all f32.
#[derive(Clone, Debug, PartialEq)]
pub struct HostWeights {
    pub config: Gpt2Config,
    /// name → (shape, data)
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl HostWeights {
    /// Checks the tensors are exactly the parameters `config` defines, with their shapes, and
    /// that each tensor's data has the length its shape says.
    pub fn validate(&self) -> Result<()> {
        self.config.validate()?;
        let expected = self.config.parameter_shapes();
        for (name, shape) in &expected {
            let (got_shape, data) =
                self.tensors.get(name).with_context(|| format!("weights: missing tensor `{name}`"))?;
            ensure!(got_shape == shape, "weights: tensor `{name}` has shape {got_shape:?}, expected {shape:?}");
            let len: usize = shape.iter().product();
            ensure!(
                data.len() == len,
                "weights: tensor `{name}` holds {} values, its shape {shape:?} needs {len}",
                data.len()
            );
        }
        if self.tensors.len() != expected.len() {
            let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
            let extra = self.tensors.keys().find(|k| !known.contains(k.as_str())).expect("more tensors than expected");
            bail!("weights: unexpected tensor `{extra}` for a model with {} layers", self.config.n_layer);
        }
        Ok(())
    }
}

/// Reads a model directory: `config.json` and `model.safetensors`. Any `tokenizer.json` there is
/// left to the caller (see [`copy_tokenizer`]).
pub fn load_dir(dir: &Path) -> Result<HostWeights> {
    ensure!(dir.is_dir(), "model directory {} does not exist or is not a directory", dir.display());
    let config_path = dir.join(CONFIG_FILE);
    ensure!(config_path.is_file(), "{} is not a model directory: {CONFIG_FILE} is missing", dir.display());
    let config = Gpt2Config::from_hf_json(&config_path)?;
    let weights_path = dir.join(WEIGHTS_FILE);
    ensure!(weights_path.is_file(), "{} is not a model directory: {WEIGHTS_FILE} is missing", dir.display());
    let bytes = fs::read(&weights_path).with_context(|| format!("reading {}", weights_path.display()))?;
    read_safetensors(&bytes, config).with_context(|| format!("weights file {}", weights_path.display()))
}

/// Parses the bytes of a `model.safetensors` for a model of shape `config`.
fn read_safetensors(bytes: &[u8], config: Gpt2Config) -> Result<HostWeights> {
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("not a valid safetensors file, truncated or corrupt? ({e})"))?;

    // Strip the `transformer.` prefix; keep the file's own name for error messages.
    let mut by_name: HashMap<&str, &str> = HashMap::new();
    for stored in file.names() {
        let name = stored.strip_prefix(PREFIX).unwrap_or(stored);
        if let Some(other) = by_name.insert(name, stored) {
            bail!("tensor `{name}` is stored twice, as `{other}` and as `{stored}`");
        }
    }

    let expected = config.parameter_shapes();
    let mut tensors = BTreeMap::new();
    for (name, shape) in &expected {
        let stored = by_name.get(name.as_str()).with_context(|| {
            format!("missing tensor `{name}` (looked for `{name}` and `{PREFIX}{name}`), expected shape {shape:?}")
        })?;
        let data = read_f32_tensor(&file, stored, shape)?;
        tensors.insert(name.clone(), (shape.clone(), data));
    }

    // Everything else must be the tied LM head or one of HF's non-parameter buffers.
    for (&name, &stored) in &by_name {
        if tensors.contains_key(name) || is_hf_buffer(name, config.n_layer) {
            continue;
        }
        if name == LM_HEAD {
            let (wte_shape, wte) = &tensors["wte.weight"];
            let head = read_f32_tensor(&file, stored, wte_shape)
                .context("`lm_head.weight` must be tied to `wte.weight` (same shape and values)")?;
            ensure!(
                head == *wte,
                "`{stored}` differs from `wte.weight`: untied LM heads are not supported (the head must equal the \
                 token embedding)"
            );
            continue;
        }
        bail!(
            "unexpected tensor `{stored}` for a GPT-2 with {} layers (config.json and the weights disagree?)",
            config.n_layer
        );
    }
    Ok(HostWeights { config, tensors })
}

/// `h.N.attn.bias` / `h.N.attn.masked_bias`: the causal mask and its fill value, saved by older
/// `transformers` versions; not parameters.
fn is_hf_buffer(name: &str, n_layer: usize) -> bool {
    let Some(rest) = name.strip_prefix("h.") else { return false };
    let Some((layer, what)) = rest.split_once('.') else { return false };
    layer.parse::<usize>().is_ok_and(|l| l < n_layer) && (what == "attn.bias" || what == "attn.masked_bias")
}

/// One tensor as f32, its shape checked against `shape`.
fn read_f32_tensor(file: &SafeTensors<'_>, stored: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let view = file.tensor(stored).with_context(|| format!("reading tensor `{stored}`"))?;
    ensure!(view.shape() == shape, "tensor `{stored}` has shape {:?}, expected {shape:?}", view.shape());
    let bytes = view.data();
    let data = match view.dtype() {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => bail!("tensor `{stored}` has dtype {other:?}; supported dtypes are F32, BF16 and F16"),
    };
    Ok(data)
}

/// Writes a model directory (created if needed): `config.json` and `model.safetensors` (f32,
/// `transformer.`-prefixed names, no `lm_head`), each file atomically (temp file, fsync, rename).
/// The weights are written before the config, so a directory whose config is new also has new
/// weights.
pub fn save_dir(weights: &HostWeights, dir: &Path) -> Result<()> {
    weights.validate()?;
    fs::create_dir_all(dir).with_context(|| format!("creating model directory {}", dir.display()))?;
    let weights_path = dir.join(WEIGHTS_FILE);
    write_atomic_with(&weights_path, |f| write_safetensors(weights, f))
        .with_context(|| format!("writing {}", weights_path.display()))?;
    let config_path = dir.join(CONFIG_FILE);
    write_atomic(&config_path, weights.config.to_hf_json().as_bytes())
        .with_context(|| format!("writing {}", config_path.display()))
}

/// Streams the safetensors encoding of `weights` into `out` without building the file in memory.
/// The header is the `safetensors` crate's own serialisation (tensors sorted by name, all f32,
/// padded with spaces to 8 bytes), so the bytes equal `safetensors::serialize`'s.
fn write_safetensors(weights: &HostWeights, out: &mut fs::File) -> Result<()> {
    let mut infos = Vec::with_capacity(weights.tensors.len());
    let mut offset = 0usize;
    let mut named: Vec<(String, &Vec<usize>, &Vec<f32>)> =
        weights.tensors.iter().map(|(name, (shape, data))| (format!("{PREFIX}{name}"), shape, data)).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, shape, data) in &named {
        let len = data.len() * 4;
        infos.push((
            name.clone(),
            TensorInfo { dtype: Dtype::F32, shape: shape.to_vec(), data_offsets: (offset, offset + len) },
        ));
        offset += len;
    }
    let format = HashMap::from([("format".to_string(), "pt".to_string())]);
    let metadata = Metadata::new(Some(format), infos).map_err(|e| anyhow::anyhow!("safetensors header: {e}"))?;
    let mut header = serde_json::to_string(&metadata)?.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');

    let mut w = BufWriter::with_capacity(1 << 20, out);
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(&header)?;
    for (_, _, data) in &named {
        if cfg!(target_endian = "little") {
            w.write_all(bytemuck::cast_slice(data.as_slice()))?;
        } else {
            for x in data.iter() {
                w.write_all(&x.to_le_bytes())?;
            }
        }
    }
    w.flush()?;
    Ok(())
}

/// Copies `tokenizer.json` from `src_dir` to `dst_dir` atomically when the source has one.
/// Returns whether a file was copied.
pub fn copy_tokenizer(src_dir: &Path, dst_dir: &Path) -> Result<bool> {
    let src = src_dir.join(TOKENIZER_FILE);
    if !src.is_file() {
        return Ok(false);
    }
    let bytes = fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
    fs::create_dir_all(dst_dir).with_context(|| format!("creating {}", dst_dir.display()))?;
    let dst = dst_dir.join(TOKENIZER_FILE);
    write_atomic(&dst, &bytes).with_context(|| format!("writing {}", dst.display()))?;
    Ok(true)
}
