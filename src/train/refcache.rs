//! Reference log-probs: computed by a forward pass over fixed chunks of pairs, and cached on disk
//! so that the reference model can be dropped during training.
//!
//! The cache file holds one `[P, 2]` f32 tensor per named pair set (chosen, rejected log-prob per
//! pair) and, in its metadata, a key: the sha256 of the reference weights, the tokenized pairs of
//! every set and the prompt template. A file whose key differs is stale and is recomputed.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use sha2::{Digest, Sha256};

use super::checkpoint::{read_f32_safetensors, write_f32_safetensors};
use crate::backend::Backend;
use crate::data::{preference_batch, TokenizedPair};
use crate::model::{Decoder, DeviceBatch, HostWeights};

const CACHE_FORMAT: &str = "safedpo-reference-logps-v1";

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
/// when its key is `key`, else from `compute` (which returns one `[2P]` vector per set), then
/// written to `path` atomically.
pub fn load_or_compute(
    path: &Path,
    key: &str,
    sets: &[(&str, usize)],
    compute: impl FnOnce() -> Result<Vec<Vec<f32>>>,
) -> Result<(Vec<Vec<f32>>, CacheStatus)> {
    let status = match read_cache(path, sets) {
        Ok(Some((found_key, values))) if found_key == key => return Ok((values, CacheStatus::Hit)),
        Ok(Some(_)) => CacheStatus::Stale,
        // Unreadable or of another shape: treat as stale (it is replaced).
        Err(_) => CacheStatus::Stale,
        Ok(None) => CacheStatus::Miss,
    };
    let values = compute()?;
    ensure!(values.len() == sets.len(), "reference cache: {} sets computed for {} names", values.len(), sets.len());
    let tensors: Vec<(String, Vec<usize>, &[f32])> = sets
        .iter()
        .zip(&values)
        .map(|((name, n), v)| {
            ensure!(v.len() == 2 * n, "reference cache: set {name} has {} values for {n} pairs", v.len());
            Ok((name.to_string(), vec![*n, 2], v.as_slice()))
        })
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), CACHE_FORMAT.to_string()), ("key".to_string(), key.to_string())]);
    write_f32_safetensors(path, &tensors, meta)
        .with_context(|| format!("writing reference cache {}", path.display()))?;
    Ok((values, status))
}

/// `Ok(None)` when there is no file; the key and values when it matches `sets` in shape.
fn read_cache(path: &Path, sets: &[(&str, usize)]) -> Result<Option<(String, Vec<Vec<f32>>)>> {
    if !path.exists() {
        return Ok(None);
    }
    let (mut tensors, meta) = read_f32_safetensors(path)?;
    ensure!(meta.get("format").map(String::as_str) == Some(CACHE_FORMAT), "not a reference cache");
    let key = meta.get("key").cloned().context("reference cache without a key")?;
    let mut values = Vec::with_capacity(sets.len());
    for (name, n) in sets {
        let (shape, data) = tensors.remove(*name).with_context(|| format!("reference cache lacks set {name}"))?;
        ensure!(shape == vec![*n, 2], "reference cache: set {name} has shape {shape:?}, expected [{n}, 2]");
        values.push(data);
    }
    Ok(Some((key, values)))
}
