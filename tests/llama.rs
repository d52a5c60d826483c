//! The Llama family (Llama, Mistral, Qwen2) as configurations of the one decoder: the CPU model
//! against the independent f64 reference (tests/common/reference.rs) in value and in the
//! gradient of every parameter (GQA, biases, tied and untied heads, RoPE scaling); the emulated
//! device against the CPU; HF directories in and out, sharded, bit-exact; and every malformed
//! configuration or checkpoint with an error that says what is wrong. The comparison with
//! `transformers` itself is in tests/golden.rs.

mod common;

use std::fs;
use std::sync::Arc;

use common::reference::*;
use common::*;
use safedpo::backend::cuda::{CudaBackend, Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::RopeScaling;
use safedpo::model::checkpoint::{self, SaveDtype, SaveOptions};
use safedpo::model::{Decoder, DecoderConfig, DeviceBatch, Family, Rope};

/// Llama with 4 query heads sharing 2 key/value heads of width 6, llama3 RoPE scaling, an untied head.
fn llama() -> DecoderConfig {
    let mut config = DecoderConfig::llama(41, 32, 20, 2, 4, 2, 28);
    config.head_dim = 6;
    config.rope = Some(Rope {
        theta: 500.0,
        scaling: RopeScaling::Llama3 {
            factor: 4.0,
            low_freq_factor: 1.0,
            high_freq_factor: 2.0,
            original_max_position_embeddings: 8.0,
        },
    });
    config
}

/// Qwen2: q/k/v biases, a tied head, one key/value head (MQA), linear RoPE scaling.
fn qwen2() -> DecoderConfig {
    let mut config = DecoderConfig::llama(37, 32, 16, 2, 4, 1, 24);
    config.family = Family::Qwen2;
    config.qkv_bias = true;
    config.tie_word_embeddings = true;
    config.rope = Some(Rope { theta: 10000.0, scaling: RopeScaling::Linear { factor: 2.0 } });
    config
}

/// Llama with `attention_bias` and `mlp_bias`: every projection has a bias.
fn llama_with_biases() -> DecoderConfig {
    DecoderConfig { qkv_bias: true, o_bias: true, mlp_bias: true, ..DecoderConfig::llama(29, 32, 16, 1, 2, 2, 20) }
}

fn configs() -> [(&'static str, DecoderConfig); 3] {
    [("llama", llama()), ("qwen2", qwen2()), ("llama with biases", llama_with_biases())]
}

#[test]
fn forward_matches_the_f64_reference() {
    for (what, config) in configs() {
        let host = test_weights(&config, 1);
        let backend = cpu();
        let mut model = Decoder::from_host(backend.clone(), &host).unwrap();
        let seqs = sequences(2, &LENS, config.vocab_size);
        let dev = DeviceBatch::upload(&*backend, &pack(&seqs)).unwrap();
        let got = backend.download(model.forward(&dev).unwrap()).unwrap();
        let (_, want) = Reference::new(&host).forward(&seqs);
        assert!(want.iter().filter(|x| **x != 0.0).all(|x| x.abs() > 1.0), "{what}: trivial log-probs");
        assert_close(&format!("{what}: sequence log-probs"), &got, &want, 1e-5, 1e-5);
    }
}

#[test]
fn every_parameter_gradient_matches_finite_differences() {
    for (what, config) in configs() {
        gradients_match_finite_differences(&config, 3, 16, what);
    }
}

/// The emulated device runs the same model as the CPU: log-probs and every gradient, in f32 at f32
/// tolerances and in bf16 at bf16's, for each configuration.
#[test]
fn emulated_device_matches_the_cpu() {
    safedpo::backend::cuda::emu::use_test_mode(); // random schedule, race detector
    let device = Device::emulated().unwrap();
    for (what, config) in configs() {
        let host = test_weights(&config, 7);
        let seqs = sequences(8, &LENS, config.vocab_size);
        let batch = pack(&seqs);
        let dseq: Vec<f32> = uniform(&mut rng(9), seqs.len(), -1.0, 1.0);
        let cpu = cpu();
        let (want_logp, want_grads) = model_step(cpu, &host, &batch, &dseq);
        for (precision, rtol, floor) in [(Precision::F32, 1e-4, 1e-4), (Precision::Bf16, 5e-2, 6e-2)] {
            let cuda = Arc::new(CudaBackend::new(device.clone(), precision));
            let (logp, grads) = model_step(cuda, &host, &batch, &dseq);
            let at = |s: &str| format!("{what} ({precision:?}): {s}");
            let want: Vec<f64> = want_logp.iter().map(|&x| x as f64).collect();
            assert_close(&at("log-probs"), &logp, &want, rtol, rtol);
            for ((name, _), (got, want)) in config.parameter_shapes().iter().zip(grads.iter().zip(&want_grads)) {
                assert_close_with_floor(&at(&format!("d/d {name}")), got, &to_f64(want), rtol, floor);
            }
        }
    }
}

/// A save and a load give back the same bits, in one file and in shards; a directory that changes
/// from one form to the other keeps no stale file; HF's split names are what is on disk.
#[test]
fn checkpoints_round_trip_bit_exact_in_one_file_and_in_shards() {
    for (what, config) in configs() {
        let weights = test_weights(&config, 11);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        checkpoint::save_dir(&weights, path).unwrap();
        assert_bit_identical(&weights, &checkpoint::load_dir(path).unwrap());

        let small = SaveOptions { max_shard_bytes: 4096, ..SaveOptions::default() };
        checkpoint::save_dir_with(&weights, path, small).unwrap();
        assert!(!path.join("model.safetensors").exists(), "{what}: the single file is gone");
        let index: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(path.join("model.safetensors.index.json")).unwrap()).unwrap();
        let map = index["weight_map"].as_object().unwrap();
        let shards: std::collections::BTreeSet<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
        assert!(shards.len() > 2, "{what}: {shards:?}");
        assert!(map.contains_key("model.layers.0.self_attn.k_proj.weight"), "{what}: HF names on disk");
        assert!(map.contains_key("model.layers.0.mlp.up_proj.weight"), "{what}");
        assert_eq!(map.contains_key("lm_head.weight"), !config.tie_word_embeddings, "{what}");
        assert_bit_identical(&weights, &checkpoint::load_dir(path).unwrap());

        // Back to one file: the shards and the index go.
        checkpoint::save_dir(&weights, path).unwrap();
        let mut left: Vec<String> =
            fs::read_dir(path).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["config.json", "model.safetensors"], "{what}");
    }
}

/// bf16 saves hold each weight rounded to nearest even, and say so in config.json.
#[test]
fn bf16_saves_round_each_weight() {
    let weights = test_weights(&llama(), 12);
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save_dir_with(&weights, dir.path(), SaveOptions { dtype: SaveDtype::Bf16, ..Default::default() })
        .unwrap();
    let config = fs::read_to_string(dir.path().join("config.json")).unwrap();
    assert!(config.contains("\"torch_dtype\": \"bfloat16\""), "{config}");
    let loaded = checkpoint::load_dir(dir.path()).unwrap();
    for (name, (_, data)) in &weights.tensors {
        let rounded: Vec<f32> = data.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        assert_eq!(loaded.tensors[name].1, rounded, "{name}");
    }
}

fn load_error(dir: &std::path::Path) -> String {
    format!("{:#}", checkpoint::load_dir(dir).expect_err("loading should fail"))
}

/// A shard listed in the index but not on disk is named; so is a tensor no shard holds.
#[test]
fn a_sharded_checkpoint_with_a_missing_shard_or_tensor_is_refused() {
    let weights = test_weights(&llama(), 13);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    checkpoint::save_dir_with(&weights, path, SaveOptions { max_shard_bytes: 4096, ..SaveOptions::default() }).unwrap();
    let index_path = path.join("model.safetensors.index.json");
    let index = fs::read_to_string(&index_path).unwrap();
    let second = "model-00002-of-";
    let shard = fs::read_dir(path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|f| f.starts_with(second))
        .unwrap();
    let saved = fs::read(path.join(&shard)).unwrap();
    fs::remove_file(path.join(&shard)).unwrap();
    let msg = load_error(path);
    assert!(msg.contains(&shard) && msg.contains("missing"), "{msg}");
    fs::write(path.join(&shard), saved).unwrap();

    // An index that no longer lists that shard: its tensors are missing.
    let mut value: serde_json::Value = serde_json::from_str(&index).unwrap();
    let map = value["weight_map"].as_object_mut().unwrap();
    map.retain(|_, file| file.as_str() != Some(shard.as_str()));
    fs::write(&index_path, serde_json::to_string(&value).unwrap()).unwrap();
    let msg = load_error(path);
    assert!(msg.contains("missing tensor") && msg.contains("index.json"), "{msg}");

    fs::write(&index_path, "{\"weight_map\": {\"a\": \"../x.safetensors\"}}").unwrap();
    assert!(load_error(path).contains("not a file name"));
}

/// config.json with `edit` applied to a valid Llama config.
fn config_error(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save_dir(&test_weights(&llama(), 14), dir.path()).unwrap();
    let path = dir.path().join("config.json");
    let mut value: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    edit(value.as_object_mut().unwrap());
    fs::write(&path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
    load_error(dir.path())
}

#[test]
fn bad_configs_are_refused_with_the_field_named() {
    let msg = config_error(|c| {
        c.insert("num_key_value_heads".into(), 3.into());
    });
    assert!(msg.contains("num_attention_heads") && msg.contains("num_key_value_heads") && msg.contains("multiple"));
    assert!(msg.contains("config.json"), "{msg}");

    let msg = config_error(|c| {
        c.insert("rope_scaling".into(), serde_json::json!({"rope_type": "yarn", "factor": 4.0}));
    });
    assert!(msg.contains("rope_scaling") && msg.contains("yarn") && msg.contains("not supported"), "{msg}");

    let msg = config_error(|c| {
        c.remove("rope_scaling");
        c.insert("rope_parameters".into(), serde_json::json!({"rope_type": "dynamic", "rope_theta": 1e4}));
    });
    assert!(msg.contains("rope_parameters") && msg.contains("dynamic"), "{msg}");

    let msg = config_error(|c| {
        c.insert("rope_scaling".into(), serde_json::json!({"rope_type": "llama3", "factor": 4.0}));
    });
    assert!(msg.contains("rope_scaling.low_freq_factor") && msg.contains("missing"), "{msg}");

    let msg = config_error(|c| {
        c.insert("hidden_act".into(), "gelu".into());
    });
    assert!(msg.contains("hidden_act") && msg.contains("silu"), "{msg}");

    let msg = config_error(|c| {
        c.insert("model_type".into(), "gemma".into());
    });
    assert!(msg.contains("model_type") && msg.contains("gemma"), "{msg}");

    let msg = config_error(|c| {
        c.insert("architectures".into(), serde_json::json!(["Qwen2ForCausalLM"]));
    });
    assert!(msg.contains("Qwen2ForCausalLM") && msg.contains("llama"), "{msg}");
}

/// Both forms of RoPE settings read to the same configuration.
#[test]
fn rope_settings_read_in_the_4x_and_the_5x_form() {
    let base = serde_json::json!({
        "model_type": "llama", "vocab_size": 10, "max_position_embeddings": 16, "hidden_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 12, "rms_norm_eps": 1e-6,
    });
    let read = |extra: serde_json::Value| {
        let mut obj = base.as_object().unwrap().clone();
        obj.extend(extra.as_object().unwrap().clone());
        DecoderConfig::from_hf_object(&obj).unwrap()
    };
    let hf4 = read(serde_json::json!({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 3.0}}));
    let hf5 = read(serde_json::json!({"rope_parameters": {"rope_type": "linear", "factor": 3.0, "rope_theta": 5e5}}));
    assert_eq!(hf4.rope, hf5.rope);
    assert_eq!(hf4.rope, Some(Rope { theta: 5e5, scaling: RopeScaling::Linear { factor: 3.0 } }));
    let plain = read(serde_json::json!({}));
    assert_eq!(plain.rope, Some(Rope { theta: 10000.0, scaling: RopeScaling::Default }));
    assert_eq!((plain.n_kv_head, plain.head_dim, plain.tie_word_embeddings), (2, 4, false));
}

/// The Llama family's initialisation: unit RMSNorm gains, N(0, 0.02) everywhere else (no GPT-2
/// residual scaling), zero biases.
#[test]
fn random_init_has_the_llama_statistics() {
    let mut config = llama_with_biases();
    config.n_embd = 64;
    config.head_dim = 32;
    config.intermediate_size = 96;
    config.vocab_size = 300;
    let host = safedpo::model::random_weights(config.clone(), 3).unwrap();
    for (name, (_, data)) in &host.tensors {
        let n = data.len() as f64;
        let mean = data.iter().map(|&x| x as f64).sum::<f64>() / n;
        let std = (data.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        if name.ends_with("norm.weight") {
            assert!(data.iter().all(|&x| x == 1.0), "{name}");
        } else if name.ends_with(".bias") {
            assert!(data.iter().all(|&x| x == 0.0), "{name}");
        } else {
            assert!((std / 0.02 - 1.0).abs() < 0.1, "{name}: std {std}");
        }
    }
}

/// Two models of one architecture may differ in the config fields the engine does not read (token
/// ids, versions): a reference saved by another tool still pairs with the policy; a size does not.
#[test]
fn same_architecture_ignores_unread_config_fields_only() {
    let a = llama();
    let mut b = llama();
    b.hf_extra.insert("bos_token_id".into(), 7.into());
    assert!(a.same_architecture(&b) && a != b);
    let c = DecoderConfig { n_kv_head: 4, ..llama() };
    assert!(!a.same_architecture(&c));
    assert!(a.summary().contains("llama") && a.summary().contains("4 heads on 2 key/value heads"), "{}", a.summary());
}
