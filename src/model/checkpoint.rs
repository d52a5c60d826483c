//! Model directories exactly as Hugging Face writes them: `config.json` + `model.safetensors`, or
//! the shards listed in `model.safetensors.index.json`.
//!
//! Reading accepts what `transformers` and the Hub produce: tensor names with or without the trunk
//! prefix (`transformer.` for GPT-2, `model.` for the Llama family), f32/bf16/f16 data, one file or
//! shards, an optional `lm_head.weight` that must equal the token embedding when the config ties
//! them, and the buffers older `transformers` versions saved beside the parameters (GPT-2's
//! `h.N.attn.bias` / `h.N.attn.masked_bias`, Llama's `rotary_emb.inv_freq`), which are skipped. The
//! Llama family's q/k/v and gate/up projections are joined into the engine's fused parameters on
//! the way in and split back on the way out (`params::fused_parts`).
//!
//! Writing produces what `save_pretrained` does: prefixed names (the untied `lm_head.weight`
//! without), the tied head left out, metadata `{"format": "pt"}`, f32 by default (bf16/f16 on
//! request), one file or, above the shard size, `model-0000i-of-0000N.safetensors` + the index;
//! every file atomically, the weights before the config.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

use super::params::fused_parts;
use super::DecoderConfig;
use crate::util::{write_atomic, write_atomic_with};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

const LM_HEAD: &str = "lm_head.weight";

/// HF's default shard size for `save_pretrained` (`max_shard_size="5GB"`, decimal).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// The prefix a family's causal LM puts before the trunk's tensor names.
fn trunk_prefix(config: &DecoderConfig) -> &'static str {
    if config.family.is_gpt2() {
        "transformer."
    } else {
        "model."
    }
}

/// The name a tensor has in a file: prefixed, except the LM head.
fn stored_name(config: &DecoderConfig, name: &str) -> String {
    if name == LM_HEAD {
        name.to_string()
    } else {
        format!("{}{name}", trunk_prefix(config))
    }
}

/// Parameters on the host in the names of [`DecoderConfig::parameter_shapes`] (HF's without the
/// trunk prefix; the Llama family's fused projections), all f32.
#[derive(Clone, Debug, PartialEq)]
pub struct HostWeights {
    pub config: DecoderConfig,
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

    /// The tensors as HF stores them, in the model's order: each fused parameter split into its
    /// parts, each name as `save_pretrained` writes it (prefixed); the tied head is not stored.
    /// Also the names `named_parameters()` gives a `transformers` model.
    pub fn hf_tensors(&self) -> Vec<HfTensor<'_>> {
        let mut out = Vec::new();
        for (name, _) in self.config.parameter_shapes() {
            let (shape, data) = &self.tensors[&name];
            match fused_parts(&self.config, &name) {
                None => out.push((stored_name(&self.config, &name), shape.clone(), data.as_slice())),
                Some(parts) => {
                    let row: usize = shape[1..].iter().product();
                    let mut start = 0;
                    for (part, rows) in parts {
                        let mut part_shape = shape.clone();
                        part_shape[0] = rows;
                        let slice = &data[start * row..(start + rows) * row];
                        out.push((stored_name(&self.config, &part), part_shape, slice));
                        start += rows;
                    }
                }
            }
        }
        out
    }
}

/// The first NaN or infinite value of `data`: its index and value.
pub fn first_nonfinite(data: &[f32]) -> Option<(usize, f32)> {
    data.iter().position(|x| !x.is_finite()).map(|i| (i, data[i]))
}

/// `what` holds no NaN or infinite value; else an error naming the first one and their count.
fn ensure_finite(what: &str, data: &[f32]) -> Result<()> {
    match first_nonfinite(data) {
        None => Ok(()),
        Some((i, x)) => {
            let count = data.iter().filter(|x| !x.is_finite()).count();
            bail!("{what} holds {x} at index {i} ({count} of its {} values are not finite)", data.len())
        }
    }
}

impl HostWeights {
    /// Every parameter finite; else an error naming the tensor, the first bad index and its value.
    pub fn ensure_finite(&self) -> Result<()> {
        self.tensors.iter().try_for_each(|(name, (_, data))| ensure_finite(&format!("parameter `{name}`"), data))
    }
}

/// How [`load_dir_with`] reads weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Load tensors that hold NaN or infinite values (a diverged model, to inspect); by default they
    /// are an error naming the file, the tensor and the first bad value.
    pub allow_nonfinite: bool,
}

/// Reads a model directory: `config.json` and `model.safetensors` (or its shards). Any
/// `tokenizer.json` there is left to the caller (see [`copy_tokenizer`]). A NaN or infinite weight
/// is an error (see [`load_dir_with`]).
pub fn load_dir(dir: &Path) -> Result<HostWeights> {
    load_dir_with(dir, LoadOptions::default())
}

/// [`load_dir`] with `options`.
pub fn load_dir_with(dir: &Path, options: LoadOptions) -> Result<HostWeights> {
    ensure!(dir.is_dir(), "model directory {} does not exist or is not a directory", dir.display());
    let config_path = dir.join(CONFIG_FILE);
    ensure!(config_path.is_file(), "{} is not a model directory: {CONFIG_FILE} is missing", dir.display());
    let config = DecoderConfig::from_hf_json(&config_path)?;
    Ok(load_weights(dir, config, options, &[])?.0)
}

/// The weights of a model directory read as a trunk of shape `config` (its `config.json` already
/// read by the caller), and the tensors `extra` names (stored unprefixed, of the shapes given)
/// beside it: a sequence classifier's `score.weight`.
pub(crate) fn load_weights(
    dir: &Path,
    config: DecoderConfig,
    options: LoadOptions,
    extra: &[(&str, Vec<usize>)],
) -> Result<(HostWeights, Vec<Vec<f32>>)> {
    let single = dir.join(WEIGHTS_FILE);
    let index = dir.join(WEIGHTS_INDEX_FILE);
    // As `transformers` does: the single file first, then the index.
    let files: Vec<(String, Vec<u8>)> = if single.is_file() {
        let bytes = fs::read(&single).with_context(|| format!("reading {}", single.display()))?;
        vec![(single.display().to_string(), bytes)]
    } else if index.is_file() {
        read_shards(dir, &index)?
    } else {
        bail!(
            "{} is not a model directory: {WEIGHTS_FILE} is missing (and there is no sharded {WEIGHTS_INDEX_FILE})",
            dir.display()
        );
    };
    let source = if single.is_file() { single } else { index };
    let mut parsed = Vec::with_capacity(files.len());
    for (path, bytes) in &files {
        let file = SafeTensors::deserialize(bytes).map_err(|e| {
            anyhow::anyhow!("weights file {path}: not a valid safetensors file, truncated or corrupt? ({e})")
        })?;
        parsed.push((path.as_str(), file));
    }
    read_tensors(&parsed, config, &source.display().to_string(), options, extra)
}

/// The shard files `index` lists, read whole: (path, bytes) each.
fn read_shards(dir: &Path, index: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let text = fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let value: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index.display()))?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .with_context(|| format!("{}: field `weight_map` is missing or not an object", index.display()))?;
    let mut shards: Vec<&str> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .with_context(|| format!("{}: `weight_map.{tensor}`: expected a file name, got {file}", index.display()))?;
        ensure!(
            !file.contains('/') && !file.contains('\\') && file != ".." && !file.is_empty(),
            "{}: `weight_map.{tensor}`: \"{file}\" is not a file name in the model directory",
            index.display()
        );
        if !shards.contains(&file) {
            shards.push(file);
        }
    }
    shards.sort_unstable();
    shards
        .into_iter()
        .map(|file| {
            let path = dir.join(file);
            ensure!(
                path.is_file(),
                "{}: shard {file} is missing (listed in {WEIGHTS_INDEX_FILE}), the checkpoint is incomplete",
                dir.display()
            );
            let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            Ok((path.display().to_string(), bytes))
        })
        .collect()
}

/// Where each tensor is: (file path, file) by stored name.
type TensorIndex<'a, 'b> = HashMap<&'a str, (&'a str, &'a SafeTensors<'b>, &'a str)>;

/// The parameters of a model of shape `config` from parsed safetensors files (one, or the shards
/// of the index `source`).
fn read_tensors(
    files: &[(&str, SafeTensors<'_>)],
    config: DecoderConfig,
    source: &str,
    options: LoadOptions,
    extra: &[(&str, Vec<usize>)],
) -> Result<(HostWeights, Vec<Vec<f32>>)> {
    let prefix = trunk_prefix(&config);
    // Strip the trunk prefix; keep the file's own name for error messages.
    let mut by_name: TensorIndex<'_, '_> = HashMap::new();
    for (path, file) in files {
        for stored in file.names() {
            let name = stored.strip_prefix(prefix).unwrap_or(stored);
            if let Some((other_path, _, other)) = by_name.insert(name, (path, file, stored)) {
                bail!("tensor `{name}` is stored twice, as `{other}` ({other_path}) and as `{stored}` ({path})");
            }
        }
    }
    let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let (path, file, stored) = by_name.get(name).with_context(|| {
            format!(
                "{source}: missing tensor `{name}` (looked for `{name}` and `{prefix}{name}`), expected shape {shape:?}"
            )
        })?;
        let data = read_f32_tensor(file, stored, shape).with_context(|| format!("weights file {path}"))?;
        if !options.allow_nonfinite {
            ensure_finite(&format!("weights file {path}: tensor `{stored}`"), &data).map_err(|e| {
                anyhow::anyhow!(
                    "{e}: a diverged or corrupt model? (`eval`, `logps` and `generate` load it anyway with \
                     --allow-nonfinite)"
                )
            })?;
        }
        Ok(data)
    };

    let mut tensors = BTreeMap::new();
    let mut used: std::collections::HashSet<String> = std::collections::HashSet::new();
    for (name, shape) in config.parameter_shapes() {
        let data = match fused_parts(&config, &name) {
            None => {
                used.insert(name.clone());
                read(&name, &shape)?
            }
            Some(parts) => {
                let mut data = Vec::with_capacity(shape.iter().product());
                for (part, rows) in parts {
                    let mut part_shape = shape.clone();
                    part_shape[0] = rows;
                    data.extend(read(&part, &part_shape)?);
                    used.insert(part);
                }
                data
            }
        };
        tensors.insert(name, (shape, data));
    }
    let extra_data = extra.iter().map(|(name, shape)| read(name, shape)).collect::<Result<Vec<_>>>()?;
    used.extend(extra.iter().map(|(name, _)| name.to_string()));

    // Everything else must be a tied LM head or one of HF's non-parameter buffers.
    let embedding = &config.parameter_shapes()[0].0;
    for (&name, &(path, file, stored)) in &by_name {
        if used.contains(name) || is_hf_buffer(name, config.n_layer) {
            continue;
        }
        if name == LM_HEAD && config.tie_word_embeddings {
            let (shape, wte) = &tensors[embedding];
            let head = read_f32_tensor(file, stored, shape)
                .with_context(|| format!("{path}: `lm_head.weight` must be tied to `{embedding}` (same shape)"))?;
            ensure!(
                head == *wte,
                "`{stored}` ({path}) differs from `{embedding}`, but the config ties them (tie_word_embeddings)"
            );
            continue;
        }
        bail!(
            "unexpected tensor `{stored}` in {path} for a {} with {} layers (config.json and the weights disagree?)",
            config.family,
            config.n_layer
        );
    }
    Ok((HostWeights { config, tensors }, extra_data))
}

/// Buffers older `transformers` versions saved beside the parameters: GPT-2's causal mask and its
/// fill value (`h.N.attn.bias`, `h.N.attn.masked_bias`), Llama's RoPE frequencies
/// (`layers.N.self_attn.rotary_emb.inv_freq`).
fn is_hf_buffer(name: &str, n_layer: usize) -> bool {
    let in_layer = |rest: &str, what: &[&str]| {
        rest.split_once('.')
            .is_some_and(|(layer, tail)| layer.parse::<usize>().is_ok_and(|l| l < n_layer) && what.contains(&tail))
    };
    if let Some(rest) = name.strip_prefix("h.") {
        return in_layer(rest, &["attn.bias", "attn.masked_bias"]);
    }
    if let Some(rest) = name.strip_prefix("layers.") {
        return in_layer(rest, &["self_attn.rotary_emb.inv_freq"]);
    }
    false
}

/// One tensor as f32, its shape checked against `shape`.
pub(super) fn read_f32_tensor(file: &SafeTensors<'_>, stored: &str, shape: &[usize]) -> Result<Vec<f32>> {
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

/// A tensor as HF stores it: its name in the file, its shape, its values.
pub type HfTensor<'a> = (String, Vec<usize>, &'a [f32]);

/// The storage type of saved weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SaveDtype {
    /// Exact: a save and a load give back the same bits.
    #[default]
    F32,
    /// Rounded to nearest even, as `model.to(torch.bfloat16)` does.
    Bf16,
    F16,
}

impl SaveDtype {
    fn dtype(self) -> Dtype {
        match self {
            SaveDtype::F32 => Dtype::F32,
            SaveDtype::Bf16 => Dtype::BF16,
            SaveDtype::F16 => Dtype::F16,
        }
    }
    fn bytes_per_value(self) -> usize {
        if self == SaveDtype::F32 {
            4
        } else {
            2
        }
    }
    /// HF `torch_dtype` / `dtype`.
    fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::Bf16 => "bfloat16",
            SaveDtype::F16 => "float16",
        }
    }
}

/// How [`save_dir_with`] writes the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaveOptions {
    pub dtype: SaveDtype,
    /// Weights larger than this go into shards of at most this size (a single larger tensor gets a
    /// shard of its own), as `save_pretrained(max_shard_size=…)` does.
    pub max_shard_bytes: u64,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self { dtype: SaveDtype::F32, max_shard_bytes: DEFAULT_MAX_SHARD_BYTES }
    }
}

/// Writes a model directory in f32, sharded above HF's default 5 GB (see [`save_dir_with`]).
pub fn save_dir(weights: &HostWeights, dir: &Path) -> Result<()> {
    save_dir_with(weights, dir, SaveOptions::default())
}

/// Writes a model directory (created if needed): `config.json` and `model.safetensors`, or shards
/// and their index, each file atomically (temp file, fsync, rename). The weights are written before
/// the config, so a directory whose config is new also has new weights; the files of the other
/// form (a single file where shards are written now, or the other way round) are removed after.
pub fn save_dir_with(weights: &HostWeights, dir: &Path, options: SaveOptions) -> Result<()> {
    let config_text = weights.config.to_hf_json_with_dtype(options.dtype.torch_name());
    save_weights(weights, Vec::new(), &config_text, dir, options)
}

/// [`save_dir_with`] with `extra` tensors after the trunk's (named as stored) and the given
/// `config.json` text: a sequence classifier's.
pub(crate) fn save_weights(
    weights: &HostWeights,
    extra: Vec<HfTensor<'_>>,
    config_text: &str,
    dir: &Path,
    options: SaveOptions,
) -> Result<()> {
    weights.validate()?;
    fs::create_dir_all(dir).with_context(|| format!("creating model directory {}", dir.display()))?;
    let mut tensors = weights.hf_tensors();
    tensors.extend(extra);
    let bytes = |t: &HfTensor<'_>| (t.2.len() * options.dtype.bytes_per_value()) as u64;
    // Shards in the model's order, each filled until the next tensor would overflow it.
    let mut shards: Vec<Vec<&HfTensor<'_>>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in &tensors {
        let last = shards.last_mut().expect("one shard at least");
        if !last.is_empty() && size + bytes(t) > options.max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("pushed").push(t);
        size += bytes(t);
    }
    let old_index = dir.join(WEIGHTS_INDEX_FILE);
    let old_shards = listed_shards(&old_index);
    if shards.len() == 1 {
        let path = dir.join(WEIGHTS_FILE);
        write_atomic_with(&path, |f| write_safetensors(&shards[0], options.dtype, f))
            .with_context(|| format!("writing {}", path.display()))?;
        remove_files(dir, old_shards.iter().map(String::as_str).chain([WEIGHTS_INDEX_FILE]))?;
    } else {
        let count = shards.len();
        let mut weight_map = serde_json::Map::new();
        let mut names = Vec::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
            let path = dir.join(&file);
            write_atomic_with(&path, |f| write_safetensors(shard, options.dtype, f))
                .with_context(|| format!("writing {}", path.display()))?;
            for (name, _, _) in shard {
                weight_map.insert(name.clone(), json!(file));
            }
            names.push(file);
        }
        let total: u64 = tensors.iter().map(bytes).sum();
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let mut text = serde_json::to_string_pretty(&index)?;
        text.push('\n');
        write_atomic(&old_index, text.as_bytes()).with_context(|| format!("writing {}", old_index.display()))?;
        let stale = old_shards.iter().filter(|f| !names.contains(f)).map(String::as_str);
        remove_files(dir, stale.chain([WEIGHTS_FILE]))?;
    }
    let config_path = dir.join(CONFIG_FILE);
    write_atomic(&config_path, config_text.as_bytes()).with_context(|| format!("writing {}", config_path.display()))
}

/// The shard files an index lists (none when there is no readable index).
fn listed_shards(index: &Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(index) else { return Vec::new() };
    let Ok(value) = serde_json::from_str::<Value>(&text) else { return Vec::new() };
    let mut files: Vec<String> = value
        .get("weight_map")
        .and_then(Value::as_object)
        .map(|m| m.values().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();
    files.sort_unstable();
    files.dedup();
    files.retain(|f| !f.contains('/') && !f.contains('\\') && f.ends_with(".safetensors"));
    files
}

fn remove_files<'a>(dir: &Path, files: impl IntoIterator<Item = &'a str>) -> Result<()> {
    for file in files {
        let path = dir.join(file);
        if path.is_file() {
            fs::remove_file(&path).with_context(|| format!("removing stale {}", path.display()))?;
        }
    }
    Ok(())
}

/// Streams the safetensors encoding of `tensors` into `out` without building the file in memory.
/// The header is the `safetensors` crate's own serialisation (tensors sorted by name, padded with
/// spaces to 8 bytes), so the bytes equal `safetensors::serialize`'s.
fn write_safetensors(tensors: &[&HfTensor<'_>], dtype: SaveDtype, out: &mut fs::File) -> Result<()> {
    let mut named: Vec<&HfTensor<'_>> = tensors.to_vec();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut infos = Vec::with_capacity(named.len());
    let mut offset = 0usize;
    for (name, shape, data) in &named {
        let len = data.len() * dtype.bytes_per_value();
        infos.push((
            name.clone(),
            TensorInfo { dtype: dtype.dtype(), shape: shape.to_vec(), data_offsets: (offset, offset + len) },
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
        match dtype {
            SaveDtype::F32 if cfg!(target_endian = "little") => w.write_all(bytemuck::cast_slice(data))?,
            SaveDtype::F32 => data.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))?,
            SaveDtype::Bf16 => data.iter().try_for_each(|&x| w.write_all(&half::bf16::from_f32(x).to_le_bytes()))?,
            SaveDtype::F16 => data.iter().try_for_each(|&x| w.write_all(&half::f16::from_f32(x).to_le_bytes()))?,
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
