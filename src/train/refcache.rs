//! Reference log-probs: computed by a forward pass over fixed chunks of pairs, and cached on disk
//! so that the reference model can be dropped during training.
//!
//! The cache file holds two f32 tensors per named pair set: `<set>` `[P, 2]` (chosen, rejected
//! log-prob per pair) and `<set>.shared_split` `[P, 4]` (each response's log-prob split at the
//! pair's shared length, LD-DPO's parts: chosen shared, chosen tail, rejected shared, rejected
//! tail), and, in its metadata, its format and a key: the sha256 of the reference weights, the
//! tokenized pairs of every set and the prompt template. A file whose key differs is stale and is
//! recomputed, as is a file of another format (v1 files had no split).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use sha2::{Digest, Sha256};

use super::checkpoint::{read_f32_safetensors, write_f32_safetensors};
use crate::backend::Backend;
use crate::data::{preference_batch, TokenizedPair};
use crate::model::{Decoder, DeviceBatch, ForwardExtras, HostWeights, RowSplit};

const CACHE_FORMAT: &str = "safedpo-reference-logps-v2";

/// A pair set's reference log-probs, as the cache holds them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReferenceLogps {
    /// `[2P]` each response's log-prob: chosen at `2i`, rejected at `2i + 1`.
    pub totals: Vec<f32>,
    /// `[4P]` each response's log-prob split at its pair's shared length (LD-DPO): sequence s's
    /// shared part at `2s`, its tail at `2s + 1`; empty where not computed.
    pub split: Vec<f32>,
}

impl ReferenceLogps {
    /// Log-probs without the split (`ld_alpha` then refuses them).
    pub fn totals(totals: Vec<f32>) -> Self {
        ReferenceLogps { totals, split: Vec::new() }
    }

    /// The values of pairs `ids` (in that order): totals `[2k]` and, when held, the split `[4k]`.
    pub fn of_pairs(&self, ids: &[usize]) -> ReferenceLogps {
        let pick = |values: &[f32], width: usize| {
            ids.iter().flat_map(|&i| values[width * i..width * (i + 1)].iter().copied()).collect::<Vec<f32>>()
        };
        let split = if self.split.is_empty() { Vec::new() } else { pick(&self.split, 4) };
        ReferenceLogps { totals: pick(&self.totals, 2), split }
    }
}

/// Consecutive runs of pair ids whose tokens fit `token_budget` (a pair larger than the budget is a
/// chunk alone). Used wherever a fixed set of pairs is evaluated.
pub fn chunk_pairs(pairs: &[TokenizedPair], token_budget: usize) -> Vec<Vec<usize>> {
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut tokens = 0;
    for (i, p) in pairs.iter().enumerate() {
        let cost = p.num_tokens();
        if !current.is_empty() && tokens + cost > token_budget {
            chunks.push(std::mem::take(&mut current));
            tokens = 0;
        }
        current.push(i);
        tokens += cost;
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// The sequence log-probs of every pair under `model`: `[2P]`, chosen at `2i`, rejected at `2i + 1`.
pub fn sequence_logps<B: Backend>(
    model: &mut Decoder<B>,
    pairs: &[TokenizedPair],
    token_budget: usize,
) -> Result<Vec<f32>> {
    let backend = model.backend().clone();
    let mut out = Vec::with_capacity(2 * pairs.len());
    for ids in chunk_pairs(pairs, token_budget) {
        let batch = preference_batch(pairs, &ids);
        let dev = DeviceBatch::upload(&*backend, &batch.packed)?;
        let logps = model.forward(&dev)?;
        out.extend(backend.download(logps)?);
    }
    ensure!(out.len() == 2 * pairs.len(), "reference log-probs: {} values for {} pairs", out.len(), pairs.len());
    Ok(out)
}

/// [`sequence_logps`] with each response's log-prob split at its pair's shared length too (see
/// [`ReferenceLogps`]): the totals are `sequence_logps`'s, bit for bit.
pub fn sequence_logp_parts<B: Backend>(
    model: &mut Decoder<B>,
    pairs: &[TokenizedPair],
    token_budget: usize,
) -> Result<ReferenceLogps> {
    let backend = model.backend().clone();
    let mut out =
        ReferenceLogps { totals: Vec::with_capacity(2 * pairs.len()), split: Vec::with_capacity(4 * pairs.len()) };
    for ids in chunk_pairs(pairs, token_budget) {
        let batch = preference_batch(pairs, &ids);
        let dev = DeviceBatch::upload(&*backend, &batch.packed)?;
        let split = RowSplit::shared_length(&*backend, &dev)?;
        let logps = model.forward_with(&dev, &ForwardExtras { split: Some(&split), aligned: false })?;
        out.totals.extend(backend.download(logps.total)?);
        out.split.extend(backend.download(logps.split.expect("asked for"))?);
    }
    ensure!(
        out.totals.len() == 2 * pairs.len(),
        "reference log-probs: {} values for {} pairs",
        out.totals.len(),
        pairs.len()
    );
    Ok(out)
}

/// The cache key: sha256 over the reference weights (names, shapes, f32 bits), every pair set (name,
/// then per pair its prompt, chosen and rejected token ids and safety flags) and the template.
pub fn cache_key(weights: &HostWeights, sets: &[(&str, &[TokenizedPair])], template: &str) -> String {
    let mut h = Sha256::new();
    h.update(CACHE_FORMAT.as_bytes());
    h.update(weights.config.to_hf_json().as_bytes());
    for (name, (shape, data)) in &weights.tensors {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        for d in shape {
            h.update((*d as u64).to_le_bytes());
        }
        h.update(bytemuck::cast_slice::<f32, u8>(data));
    }
    for (name, pairs) in sets {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((pairs.len() as u64).to_le_bytes());
        for p in pairs.iter() {
            for ids in [&p.prompt, &p.chosen, &p.rejected] {
                h.update((ids.len() as u64).to_le_bytes());
                h.update(bytemuck::cast_slice::<i32, u8>(ids));
            }
            h.update([p.chosen_unsafe as u8, p.rejected_unsafe as u8]);
        }
    }
    h.update((template.len() as u64).to_le_bytes());
    h.update(template.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// What `load_or_compute` found on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheStatus {
    /// The file existed with the same key: nothing was computed.
    Hit,
    /// There was no (readable) file.
    Miss,
    /// The file's key differed (other weights, data or template): recomputed and replaced.
    Stale,
}

/// The reference log-probs of every set (in the order of `sets`), from the cache file at `path`
/// when its key is `key`, else from `compute` (which returns one [`ReferenceLogps`] per set, split
/// included), then written to `path` atomically.
pub fn load_or_compute(
    path: &Path,
    key: &str,
    sets: &[(&str, usize)],
    compute: impl FnOnce() -> Result<Vec<ReferenceLogps>>,
) -> Result<(Vec<ReferenceLogps>, CacheStatus)> {
    let status = match read_cache(path, sets) {
        Ok(Some((found_key, values))) if found_key == key => return Ok((values, CacheStatus::Hit)),
        Ok(Some(_)) => CacheStatus::Stale,
        // Unreadable, of another format or of another shape: treat as stale (it is replaced).
        Err(_) => CacheStatus::Stale,
        Ok(None) => CacheStatus::Miss,
    };
    let values = compute()?;
    ensure!(values.len() == sets.len(), "reference cache: {} sets computed for {} names", values.len(), sets.len());
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    for ((name, n), v) in sets.iter().zip(&values) {
        ensure!(v.totals.len() == 2 * n, "reference cache: set {name} has {} values for {n} pairs", v.totals.len());
        ensure!(v.split.len() == 4 * n, "reference cache: set {name} has {} split values for {n} pairs", v.split.len());
        tensors.push((name.to_string(), vec![*n, 2], v.totals.as_slice()));
        tensors.push((split_tensor(name), vec![*n, 4], v.split.as_slice()));
    }
    let meta = HashMap::from([("format".to_string(), CACHE_FORMAT.to_string()), ("key".to_string(), key.to_string())]);
    write_f32_safetensors(path, &tensors, meta)
        .with_context(|| format!("writing reference cache {}", path.display()))?;
    Ok((values, status))
}

/// The name of a set's split tensor.
fn split_tensor(set: &str) -> String {
    format!("{set}.shared_split")
}

/// `Ok(None)` when there is no file; the key and values when it is of this format and matches `sets`
/// in shape.
fn read_cache(path: &Path, sets: &[(&str, usize)]) -> Result<Option<(String, Vec<ReferenceLogps>)>> {
    if !path.exists() {
        return Ok(None);
    }
    let (mut tensors, meta) = read_f32_safetensors(path)?;
    let format = meta.get("format").map(String::as_str);
    ensure!(format == Some(CACHE_FORMAT), "not a reference cache of format {CACHE_FORMAT} (found {format:?})");
    let key = meta.get("key").cloned().context("reference cache without a key")?;
    let mut values = Vec::with_capacity(sets.len());
    for (name, n) in sets {
        let mut take = |tensor: String, width: usize| {
            let (shape, data) = tensors.remove(&tensor).with_context(|| format!("reference cache lacks {tensor}"))?;
            ensure!(shape == vec![*n, width], "reference cache: {tensor} has shape {shape:?}, expected [{n}, {width}]");
            Ok(data)
        };
        let totals = take(name.to_string(), 2)?;
        let split = take(split_tensor(name), 4)?;
        values.push(ReferenceLogps { totals, split });
    }
    Ok(Some((key, values)))
}
