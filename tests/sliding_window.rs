//! Sliding-window attention in the model: Mistral (every layer) and Qwen2 (the layers `layer_types`
//! names) against the independent f64 reference in value and in the gradient of every parameter,
//! with windows shorter than the sequences; the emulated device against the CPU; a model with a
//! window as long as its sequences is the model without one, bit for bit; and the configuration
//! as `transformers` writes it, 4.x and 5.x, read and written back. Generation with a KV cache
//! under a window is in tests/kv_cache.rs, `transformers` itself in tests/golden.rs.

mod common;

use std::sync::Arc;

use common::reference::*;
use common::*;
use safedpo::backend::cuda::{CudaBackend, Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::model::{Decoder, DecoderConfig, DeviceBatch, Family, HostWeights, LayerAttention};

/// Mistral, 2 layers, 4 query heads on 2 key/value heads, a window of 3 tokens in both layers
/// (the sequences of `LENS` are up to 17 tokens long).
fn mistral() -> DecoderConfig {
    DecoderConfig { family: Family::Mistral, sliding_window: Some(3), ..DecoderConfig::llama(31, 32, 16, 2, 4, 2, 24) }
}

/// Qwen2, 3 layers, one key/value head, q/k/v biases, tied: a window of 3 in layers 0 and 2, the
/// whole prefix in layer 1.
fn qwen2() -> DecoderConfig {
    use LayerAttention::{Full, Sliding};
    DecoderConfig {
        family: Family::Qwen2,
        qkv_bias: true,
        tie_word_embeddings: true,
        sliding_window: Some(3),
        layer_types: Some(vec![Sliding, Full, Sliding]),
        ..DecoderConfig::llama(37, 32, 16, 3, 4, 1, 24)
    }
}

fn configs() -> [(&'static str, DecoderConfig); 2] {
    [("mistral, window 3", mistral()), ("qwen2, window 3 in layers 0 and 2", qwen2())]
}

/// The model's log-probs on `LENS`.
fn logps<B: Backend>(backend: Arc<B>, host: &HostWeights, seed: u64) -> Vec<f32> {
    let mut model = Decoder::from_host(backend.clone(), host).unwrap();
    let seqs = sequences(seed, &LENS, host.config.vocab_size);
    let dev = DeviceBatch::upload(&*backend, &pack(&seqs)).unwrap();
    backend.download(model.forward(&dev).unwrap()).unwrap()
}

#[test]
fn forward_matches_the_f64_reference() {
    for (what, config) in configs() {
        let host = test_weights(&config, 1);
        let got = logps(cpu(), &host, 2);
        let (_, want) = Reference::new(&host).forward(&sequences(2, &LENS, config.vocab_size));
        assert_close(&format!("{what}: sequence log-probs"), &got, &want, 1e-5, 1e-5);
        // The window matters: without it the log-probs differ.
        let full = HostWeights { config: DecoderConfig { sliding_window: None, ..config.clone() }, ..host.clone() };
        let unwindowed = logps(cpu(), &full, 2);
        let moved = got.iter().zip(&unwindowed).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(moved > 1e-2, "{what}: the window changes nothing ({moved})");
    }
}

#[test]
fn every_parameter_gradient_matches_finite_differences() {
    for (what, config) in configs() {
        gradients_match_finite_differences(&config, 3, 16, what);
    }
}

/// A window at least as long as every sequence is no window: the same bits, forward and backward.
#[test]
fn a_window_as_long_as_the_sequences_is_full_attention() {
    let config = mistral();
    let longest = LENS.iter().map(|(p, r)| p + r).max().unwrap();
    let host = test_weights(&config, 4);
    let seqs = sequences(5, &LENS, config.vocab_size);
    let run = |window: Option<usize>| {
        let config = DecoderConfig { sliding_window: window, ..config.clone() };
        let (logp, grads) =
            model_step(cpu(), &HostWeights { config, ..host.clone() }, &pack(&seqs), &vec![0.5; seqs.len()]);
        (logp, grads.concat())
    };
    let (full, windowed) = (run(None), run(Some(longest)));
    assert_bitwise_eq("log-probs", &windowed.0, &full.0);
    assert_bitwise_eq("gradients", &windowed.1, &full.1);
}

/// The emulated device runs the windowed models as the CPU does: log-probs and every gradient,
/// f32 and bf16.
#[test]
fn emulated_device_matches_the_cpu() {
    safedpo::backend::cuda::emu::use_test_mode();
    let device = Device::emulated().unwrap();
    for (what, config) in configs() {
        let host = test_weights(&config, 7);
        let seqs = sequences(8, &LENS, config.vocab_size);
        let batch = pack(&seqs);
        let dseq: Vec<f32> = uniform(&mut rng(9), seqs.len(), -1.0, 1.0);
        let (want_logp, want_grads) = model_step(cpu(), &host, &batch, &dseq);
        for (precision, rtol, floor) in [(Precision::F32, 1e-4, 1e-4), (Precision::Bf16, 5e-2, 6e-2)] {
            let cuda = Arc::new(CudaBackend::new(device.clone(), precision));
            let (logp, grads) = model_step(cuda, &host, &batch, &dseq);
            let at = |s: &str| format!("{what} ({precision:?}): {s}");
            assert_close(&at("log-probs"), &logp, &to_f64(&want_logp), rtol, rtol);
            for ((name, _), (got, want)) in config.parameter_shapes().iter().zip(grads.iter().zip(&want_grads)) {
                assert_close_with_floor(&at(&format!("d/d {name}")), got, &to_f64(want), rtol, floor);
            }
        }
    }
}

// ---- the configuration -------------------------------------------------------------------------------

fn read(fields: serde_json::Value) -> anyhow::Result<DecoderConfig> {
    let mut obj = serde_json::json!({
        "model_type": "qwen2", "vocab_size": 37, "max_position_embeddings": 32, "hidden_size": 16,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1,
        "intermediate_size": 24, "rms_norm_eps": 1e-6,
    });
    obj.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
    DecoderConfig::from_hf_object(obj.as_object().unwrap())
}

fn windows(config: &DecoderConfig) -> Vec<Option<usize>> {
    (0..config.n_layer).map(|l| config.layer_window(l)).collect()
}

/// Qwen2 as 4.x writes it (`max_window_layers`, no `layer_types`) and as 5.x does (`layer_types`);
/// `use_sliding_window` false or the window null is full attention; what is written back reads
/// back the same, in both fields transformers reads.
#[test]
fn qwen2_windows_per_layer_from_either_form() {
    let hf4 =
        read(serde_json::json!({"use_sliding_window": true, "sliding_window": 4, "max_window_layers": 1})).unwrap();
    assert_eq!(windows(&hf4), [None, Some(4), Some(4)]);
    let hf5 = read(serde_json::json!({
        "use_sliding_window": true, "sliding_window": 4, "max_window_layers": 28,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    }))
    .unwrap();
    assert_eq!(windows(&hf5), [Some(4), None, Some(4)]);
    // `max_window_layers` absent: Qwen2Config's default of 28, so no layer of three slides.
    let default = read(serde_json::json!({"use_sliding_window": true, "sliding_window": 4})).unwrap();
    assert_eq!(windows(&default), [None; 3]);
    for off in [
        serde_json::json!({"use_sliding_window": false, "sliding_window": 4, "max_window_layers": 0}),
        serde_json::json!({"use_sliding_window": true, "sliding_window": null, "max_window_layers": 0}),
        serde_json::json!({}),
    ] {
        assert_eq!(windows(&read(off.clone()).unwrap()), [None; 3], "{off}");
    }

    for config in [hf4, hf5] {
        let text = config.to_hf_json();
        let written: serde_json::Value = serde_json::from_str(&text).unwrap();
        let again = DecoderConfig::from_hf_object(written.as_object().unwrap()).unwrap();
        assert_eq!(windows(&again), windows(&config), "{text}");
        // 4.x reads `max_window_layers` alone: it must say the same where it can.
        let mut hf4_form = written.as_object().unwrap().clone();
        hf4_form.remove("layer_types");
        let hf4_again = DecoderConfig::from_hf_object(&hf4_form).unwrap();
        if windows(&config) == [None, Some(4), Some(4)] {
            assert_eq!(written["max_window_layers"], 1, "{text}");
            assert_eq!(windows(&hf4_again), windows(&config), "{text}");
        } else {
            assert_eq!(written["max_window_layers"], 28, "the file's own value is kept: {text}");
        }
    }
}

/// Mistral: `sliding_window` for every layer, `null` for none, absent for MistralConfig's 4096; a
/// window of 0 and Qwen2's malformed `layer_types` are refused with the field's name.
#[test]
fn mistral_windows_and_bad_fields() {
    let with = |window: serde_json::Value| {
        let mut obj = serde_json::json!({"model_type": "mistral", "sliding_window": window});
        if window.is_string() {
            obj.as_object_mut().unwrap().remove("sliding_window");
        }
        read(obj)
    };
    assert_eq!(windows(&with(serde_json::json!(6)).unwrap()), [Some(6); 3]);
    assert_eq!(windows(&with(serde_json::Value::Null).unwrap()), [None; 3]);
    assert_eq!(windows(&with(serde_json::json!("absent")).unwrap()), [Some(4096); 3]);
    let saved: serde_json::Value = serde_json::from_str(&with(serde_json::json!(6)).unwrap().to_hf_json()).unwrap();
    assert_eq!(saved["sliding_window"], 6);
    let err = format!("{:#}", with(serde_json::json!(0)).unwrap_err());
    assert!(err.contains("sliding_window") && err.contains('0'), "{err}");
    let bad_types = [
        (serde_json::json!(["sliding_attention", "full_attention"]), "2 layers"),
        (serde_json::json!(["sliding_attention", "chunked_attention", "full_attention"]), "chunked_attention"),
        (serde_json::json!("sliding_attention"), "expected a list"),
    ];
    for (layer_types, fragment) in bad_types {
        let fields = serde_json::json!({"use_sliding_window": true, "sliding_window": 2, "layer_types": layer_types});
        let err = format!("{:#}", read(fields).unwrap_err());
        assert!(err.contains("layer_types") && err.contains(fragment), "{err}");
    }
}
