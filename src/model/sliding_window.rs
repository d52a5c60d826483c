//! Sliding-window attention in the model configuration: the window and the layers that use it, read
//! from and written to HF `config.json` the way `transformers` 5.x reads them (and 4.x writes them).
//!
//! - Mistral (`MistralConfig`): `sliding_window`, every layer; `null` is full attention, and an
//!   absent field is the class default of 4096.
//! - Qwen2 (`Qwen2Config`): a window only with `use_sliding_window` (`sliding_window`, default
//!   4096, `null`: none); each layer full or sliding by `layer_types` (`"full_attention"`,
//!   `"sliding_attention"`), or, in a config without it (4.x), the layers from `max_window_layers`
//!   (default 28) on slide, as `Qwen2Config` derives `layer_types`.
//!
//! A query sees its `window` latest tokens, itself included (`Window` in
//! `backend/ops/attention.rs`).

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};

/// `MistralConfig`'s and `Qwen2Config`'s default `sliding_window`.
const DEFAULT_WINDOW: usize = 4096;

/// `Qwen2Config`'s default `max_window_layers`.
const DEFAULT_MAX_WINDOW_LAYERS: usize = 28;

/// A layer's attention (an entry of HF `layer_types`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerAttention {
    /// The whole causal prefix (`"full_attention"`).
    Full,
    /// The sliding window (`"sliding_attention"`).
    Sliding,
}

impl LayerAttention {
    pub fn hf_name(self) -> &'static str {
        match self {
            LayerAttention::Full => "full_attention",
            LayerAttention::Sliding => "sliding_attention",
        }
    }

    fn from_hf_name(name: &str) -> Option<Self> {
        [LayerAttention::Full, LayerAttention::Sliding].into_iter().find(|kind| kind.hf_name() == name)
    }
}

/// A model's windowed attention: the window, and the layers that use it (`None`: every layer).
pub type SlidingWindow = (Option<usize>, Option<Vec<LayerAttention>>);

/// Mistral's window: `sliding_window`, for every layer.
pub fn mistral_from_hf(obj: &Map<String, Value>) -> Result<SlidingWindow> {
    Ok((window_field(obj)?, None))
}

/// Qwen2's window and per-layer attention (module doc).
pub fn qwen2_from_hf(obj: &Map<String, Value>, n_layer: usize) -> Result<SlidingWindow> {
    let enabled = match obj.get("use_sliding_window") {
        None | Some(Value::Null) => false,
        Some(v) => v.as_bool().with_context(|| format!("field `use_sliding_window`: expected a boolean, got {v}"))?,
    };
    let window = if enabled { window_field(obj)? } else { None };
    if window.is_none() {
        return Ok((None, None));
    }
    let layers = match obj.get("layer_types").filter(|v| !v.is_null()) {
        Some(list) => layer_types_field(list, n_layer)?,
        None => {
            let full_layers = match obj.get("max_window_layers").filter(|v| !v.is_null()) {
                Some(v) => v
                    .as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .with_context(|| format!("field `max_window_layers`: expected a non-negative integer, got {v}"))?,
                None => DEFAULT_MAX_WINDOW_LAYERS,
            };
            threshold_layers(full_layers, n_layer)
        }
    };
    Ok((window, Some(layers)))
}

/// Writes Mistral's `sliding_window` into a config object.
pub fn mistral_to_hf(obj: &mut Map<String, Value>, window: Option<usize>) {
    obj.insert("sliding_window".into(), json!(window));
}

/// Writes Qwen2's `use_sliding_window`, `sliding_window`, `layer_types` (5.x) and
/// `max_window_layers` (4.x) into a config object that may already hold a `max_window_layers`
/// from the file read (kept when it gives the same layers).
pub fn qwen2_to_hf(
    obj: &mut Map<String, Value>,
    window: Option<usize>,
    layers: Option<&[LayerAttention]>,
    n_layer: usize,
) {
    obj.insert("use_sliding_window".into(), json!(window.is_some()));
    let Some(window) = window else {
        return;
    };
    obj.insert("sliding_window".into(), json!(window));
    let all_sliding = vec![LayerAttention::Sliding; n_layer];
    let layers = layers.unwrap_or(&all_sliding);
    let names: Vec<&str> = layers.iter().map(|kind| kind.hf_name()).collect();
    obj.insert("layer_types".into(), json!(names));
    // 4.x reads `max_window_layers` only, the count of leading full layers, which says the layers
    // whenever the sliding ones are the last: then it is written unless the file's own says the
    // same. Another pattern it cannot say; the file's own value, if any, stays.
    let leading_full = layers.iter().position(|&kind| kind == LayerAttention::Sliding).unwrap_or(n_layer);
    let sayable = threshold_layers(leading_full, n_layer) == layers;
    let kept = obj.get("max_window_layers").and_then(Value::as_u64).map(|k| k as usize);
    let kept_says_it = kept.is_some_and(|k| threshold_layers(k, n_layer) == layers);
    if kept.is_none() || (sayable && !kept_says_it) {
        obj.insert("max_window_layers".into(), json!(leading_full));
    }
}

/// `sliding_window`: absent, the classes' default; `null`, none.
fn window_field(obj: &Map<String, Value>) -> Result<Option<usize>> {
    let window =
        match obj.get("sliding_window") {
            None => Some(DEFAULT_WINDOW),
            Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().and_then(|x| usize::try_from(x).ok()).with_context(|| {
                format!("field `sliding_window`: expected a non-negative integer or null, got {v}")
            })?),
        };
    ensure!(window != Some(0), "field `sliding_window` is 0; a window holds at least the query's own token");
    Ok(window)
}

/// `layer_types`: one known name per layer.
fn layer_types_field(list: &Value, n_layer: usize) -> Result<Vec<LayerAttention>> {
    let Value::Array(entries) = list else {
        bail!("field `layer_types`: expected a list of strings, got {list}");
    };
    ensure!(
        entries.len() == n_layer,
        "field `layer_types` lists {} layers for `num_hidden_layers` = {n_layer}",
        entries.len()
    );
    entries
        .iter()
        .map(|entry| {
            entry.as_str().and_then(LayerAttention::from_hf_name).with_context(|| {
                format!("field `layer_types`: {entry} is not supported (supported: \"full_attention\", \"sliding_attention\")")
            })
        })
        .collect()
}

/// `Qwen2Config`'s rule: the first `full_layers` layers full, the rest sliding.
fn threshold_layers(full_layers: usize, n_layer: usize) -> Vec<LayerAttention> {
    (0..n_layer).map(|l| if l >= full_layers { LayerAttention::Sliding } else { LayerAttention::Full }).collect()
}
