//! Model directories in Hugging Face's format: round trips, the layouts HF produces (prefixed or
//! not, f32/bf16/f16, tied `lm_head`, mask buffers), and every malformed input with an error that
//! names what is wrong and where.

mod common;

use common::assert_bit_identical;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safedpo::model::checkpoint::{self, HostWeights};
use safedpo::model::DecoderConfig;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

fn tiny_config() -> DecoderConfig {
    DecoderConfig::gpt2(37, 32, 16, 2, 2)
}

/// Random weights of every parameter, with a few awkward f32 values (−0, subnormal, huge) so that
/// "bit-exact" means it.
fn random_weights(config: &DecoderConfig, seed: u64) -> HostWeights {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tensors = BTreeMap::new();
    for (name, shape) in config.parameter_shapes() {
        let len: usize = shape.iter().product();
        let mut data: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let specials = [-0.0f32, f32::from_bits(1), -3.0e38, 1.0e-30];
        for (i, s) in specials.iter().enumerate().take(len) {
            data[(i * 7919) % len] = *s;
        }
        tensors.insert(name, (shape, data));
    }
    HostWeights { config: config.clone(), tensors }
}

/// A tensor to write with the `safetensors` crate: name, dtype, shape, little-endian bytes.
struct RawTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The weights as raw f32 tensors named `prefix + name`.
fn raw_f32(weights: &HostWeights, prefix: &str) -> Vec<RawTensor> {
    weights
        .tensors
        .iter()
        .map(|(name, (shape, data))| RawTensor {
            name: format!("{prefix}{name}"),
            dtype: Dtype::F32,
            shape: shape.clone(),
            bytes: f32_bytes(data),
        })
        .collect()
}

fn serialize(tensors: &[RawTensor], metadata: Option<HashMap<String, String>>) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| (t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap()))
        .collect();
    safetensors::serialize(views, metadata).unwrap()
}

/// A model directory written by the `safetensors` crate, not by the code under test.
fn write_dir(dir: &Path, config_json: &str, tensors: &[RawTensor]) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("config.json"), config_json).unwrap();
    fs::write(dir.join("model.safetensors"), serialize(tensors, None)).unwrap();
}

/// `{e:#}`: the whole context chain, as `main` prints it.
fn load_error(dir: &Path) -> String {
    match checkpoint::load_dir(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_mentions(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "error message should mention {n:?}: {msg}");
    }
}

/// config.json with one field changed (`None` removes it).
fn edited_config(config: &DecoderConfig, field: &str, value: Option<Value>) -> String {
    let mut v: Value = serde_json::from_str(&config.to_hf_json()).unwrap();
    let obj = v.as_object_mut().unwrap();
    match value {
        Some(x) => obj.insert(field.to_string(), x),
        None => obj.remove(field),
    };
    serde_json::to_string_pretty(&v).unwrap()
}

#[test]
fn round_trip_is_bit_exact_and_resaving_gives_identical_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = random_weights(&tiny_config(), 1);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    checkpoint::save_dir(&weights, &a).unwrap();
    let loaded = checkpoint::load_dir(&a).unwrap();
    assert_bit_identical(&weights, &loaded);
    checkpoint::save_dir(&loaded, &b).unwrap();
    for file in ["config.json", "model.safetensors"] {
        assert_eq!(fs::read(a.join(file)).unwrap(), fs::read(b.join(file)).unwrap(), "{file} differs after resave");
    }
    // Atomic writes leave nothing else behind.
    let mut names: Vec<String> =
        fs::read_dir(&a).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["config.json", "model.safetensors"]);
}

#[test]
fn saved_file_is_what_save_pretrained_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = random_weights(&tiny_config(), 2);
    checkpoint::save_dir(&weights, tmp.path()).unwrap();
    let bytes = fs::read(tmp.path().join("model.safetensors")).unwrap();

    // Byte for byte what the reference serializer writes for prefixed f32 tensors + {"format": "pt"}.
    let format = HashMap::from([("format".to_string(), "pt".to_string())]);
    assert_eq!(bytes, serialize(&raw_f32(&weights, "transformer."), Some(format)));

    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(metadata.metadata().as_ref().unwrap()["format"], "pt");
    let file = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(file.len(), weights.tensors.len(), "no lm_head: it is tied");
    for (name, view) in file.tensors() {
        assert!(name.starts_with("transformer."), "{name} lacks the prefix");
        assert_eq!(view.dtype(), Dtype::F32);
    }
    assert_eq!(file.tensor("transformer.h.1.attn.c_attn.weight").unwrap().shape(), [16, 48], "Conv1D is [in, out]");
    assert_eq!(file.tensor("transformer.h.0.mlp.c_proj.weight").unwrap().shape(), [64, 16]);
}

#[test]
fn config_json_has_what_transformers_needs_and_reads_back() {
    let config = tiny_config();
    let v: Value = serde_json::from_str(&config.to_hf_json()).unwrap();
    assert_eq!(v["model_type"], "gpt2");
    assert_eq!(v["architectures"], serde_json::json!(["GPT2LMHeadModel"]));
    assert_eq!(v["activation_function"], "gelu_new");
    assert_eq!(v["tie_word_embeddings"], true);
    assert_eq!(v["torch_dtype"], "float32");
    assert_eq!((v["n_ctx"].as_u64(), v["n_positions"].as_u64()), (Some(32), Some(32)));
    assert_eq!((v["bos_token_id"].as_u64(), v["eos_token_id"].as_u64()), (Some(36), Some(36)));
    for dropout in ["attn_pdrop", "embd_pdrop", "resid_pdrop"] {
        assert_eq!(v[dropout].as_f64(), Some(0.0), "{dropout}");
    }
    assert_eq!(v["layer_norm_epsilon"].as_f64(), Some(1e-5), "epsilon printed as its shortest decimal");

    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("config.json");
    fs::write(&path, config.to_hf_json()).unwrap();
    assert_eq!(DecoderConfig::from_hf_json(&path).unwrap(), config);

    // The real GPT-2 124M config.json from the Hub (trimmed of task parameters): n_ctx and n_positions.
    let hub = r#"{"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
        "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "vocab_size": 50257}"#;
    fs::write(&path, hub).unwrap();
    assert_eq!(DecoderConfig::from_hf_json(&path).unwrap(), DecoderConfig::gpt2_124m());
    // Only n_ctx (older configs).
    fs::write(&path, edited_config(&config, "n_positions", None)).unwrap();
    assert_eq!(DecoderConfig::from_hf_json(&path).unwrap().n_positions, 32);
}

#[test]
fn reads_names_with_and_without_the_transformer_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config();
    let weights = random_weights(&config, 3);
    for prefix in ["", "transformer."] {
        let dir = tmp.path().join(format!("p{}", prefix.len()));
        write_dir(&dir, &config.to_hf_json(), &raw_f32(&weights, prefix));
        assert_bit_identical(&weights, &checkpoint::load_dir(&dir).unwrap());
    }
}

#[test]
fn reads_bf16_and_f16_and_skips_hf_mask_buffers() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config();
    let weights = random_weights(&config, 4);
    type Convert = fn(f32) -> (Vec<u8>, f32);
    let bf16: Convert = |x| {
        let h = half::bf16::from_f32(x);
        (h.to_le_bytes().to_vec(), h.to_f32())
    };
    let f16: Convert = |x| {
        let h = half::f16::from_f32(x);
        (h.to_le_bytes().to_vec(), h.to_f32())
    };
    for (dtype, convert) in [(Dtype::BF16, bf16), (Dtype::F16, f16)] {
        let mut raw = Vec::new();
        let mut expected = weights.clone();
        for (name, (shape, data)) in expected.tensors.iter_mut() {
            let mut bytes = Vec::new();
            for x in data.iter_mut() {
                let (b, rounded) = convert(*x);
                bytes.extend(b);
                *x = rounded;
            }
            raw.push(RawTensor { name: name.clone(), dtype, shape: shape.clone(), bytes });
        }
        // What older transformers versions save beside the parameters: the causal mask and its fill.
        for l in 0..config.n_layer {
            let p = config.n_positions;
            raw.push(RawTensor {
                name: format!("h.{l}.attn.bias"),
                dtype: Dtype::U8,
                shape: vec![1, 1, p, p],
                bytes: vec![1; p * p],
            });
            raw.push(RawTensor {
                name: format!("h.{l}.attn.masked_bias"),
                dtype: Dtype::F32,
                shape: vec![],
                bytes: f32_bytes(&[-1e4]),
            });
        }
        let dir = tmp.path().join(format!("{dtype:?}"));
        write_dir(&dir, &config.to_hf_json(), &raw);
        // f16 cannot hold -3e38: the file holds -inf, which a load refuses unless asked.
        let options = checkpoint::LoadOptions { allow_nonfinite: dtype == Dtype::F16 };
        assert_bit_identical(&expected, &checkpoint::load_dir_with(&dir, options).unwrap());
    }
}

#[test]
fn lm_head_equal_to_wte_is_accepted_and_a_different_one_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config();
    let weights = random_weights(&config, 5);
    let wte = &weights.tensors["wte.weight"];

    let mut raw = raw_f32(&weights, "transformer.");
    raw.push(RawTensor {
        name: "lm_head.weight".into(),
        dtype: Dtype::F32,
        shape: wte.0.clone(),
        bytes: f32_bytes(&wte.1),
    });
    let tied = tmp.path().join("tied");
    write_dir(&tied, &config.to_hf_json(), &raw);
    assert_bit_identical(&weights, &checkpoint::load_dir(&tied).unwrap());

    let mut head = wte.1.clone();
    head[17] += 0.25;
    raw.last_mut().unwrap().bytes = f32_bytes(&head);
    let untied = tmp.path().join("untied");
    write_dir(&untied, &config.to_hf_json(), &raw);
    assert_mentions(&load_error(&untied), &["lm_head.weight", "untied", "model.safetensors"]);
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config();
    let mut raw = raw_f32(&random_weights(&config, 6), "transformer.");
    raw.retain(|t| t.name != "transformer.h.1.mlp.c_fc.bias");
    write_dir(tmp.path(), &config.to_hf_json(), &raw);
    assert_mentions(&load_error(tmp.path()), &["missing tensor", "h.1.mlp.c_fc.bias", "model.safetensors"]);
}

#[test]
fn wrong_shape_names_tensor_expected_and_found() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config();
    let mut raw = raw_f32(&random_weights(&config, 7), "");
    // The transposed (nn.Linear, [out, in]) layout of a Conv1D weight.
    let t = raw.iter_mut().find(|t| t.name == "h.0.attn.c_attn.weight").unwrap();
    t.shape = vec![48, 16];
    write_dir(tmp.path(), &config.to_hf_json(), &raw);
    assert_mentions(&load_error(tmp.path()), &["h.0.attn.c_attn.weight", "[48, 16]", "[16, 48]", "model.safetensors"]);
}

#[test]
fn unknown_dtype_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config();
    let mut raw = raw_f32(&random_weights(&config, 8), "");
    let t = raw.iter_mut().find(|t| t.name == "ln_f.bias").unwrap();
    t.dtype = Dtype::I32;
    write_dir(tmp.path(), &config.to_hf_json(), &raw);
    assert_mentions(&load_error(tmp.path()), &["ln_f.bias", "I32", "dtype", "model.safetensors"]);
}

#[test]
fn unexpected_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config();
    let mut raw = raw_f32(&random_weights(&config, 9), "");
    raw.push(RawTensor {
        name: "h.2.ln_1.weight".into(),
        dtype: Dtype::F32,
        shape: vec![16],
        bytes: f32_bytes(&[1.0; 16]),
    });
    write_dir(tmp.path(), &config.to_hf_json(), &raw);
    assert_mentions(&load_error(tmp.path()), &["unexpected tensor", "h.2.ln_1.weight", "model.safetensors"]);
}

#[test]
fn truncated_or_corrupt_weights_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = random_weights(&tiny_config(), 10);
    checkpoint::save_dir(&weights, tmp.path()).unwrap();
    let path = tmp.path().join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    for cut in [bytes.len() - 1, bytes.len() / 2, 100, 5, 0] {
        fs::write(&path, &bytes[..cut]).unwrap();
        assert_mentions(&load_error(tmp.path()), &["model.safetensors"]);
    }
    let mut garbage = bytes.clone();
    garbage[8..40].fill(b'#');
    fs::write(&path, &garbage).unwrap();
    assert_mentions(&load_error(tmp.path()), &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn empty_or_missing_directory_names_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    assert_mentions(&load_error(tmp.path()), &["config.json"]);
    assert_mentions(&load_error(&tmp.path().join("nope")), &["nope", "does not exist"]);
    fs::write(tmp.path().join("config.json"), tiny_config().to_hf_json()).unwrap();
    assert_mentions(&load_error(tmp.path()), &["model.safetensors", "missing"]);
}

#[test]
fn bad_config_json_names_the_file_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config();
    let raw = raw_f32(&random_weights(&config, 11), "");
    let cases: Vec<(&str, Option<Value>, Vec<&str>)> = vec![
        ("model_type", Some("llama".into()), vec!["unknown architecture", "model_type", "llama"]),
        ("model_type", None, vec!["missing field", "model_type"]),
        (
            "architectures",
            Some(serde_json::json!(["LlamaForCausalLM"])),
            vec!["unknown architecture", "architectures", "LlamaForCausalLM"],
        ),
        ("architectures", Some("GPT2LMHeadModel".into()), vec!["architectures", "list"]),
        ("activation_function", Some("relu".into()), vec!["activation_function", "relu", "gelu_new"]),
        ("tie_word_embeddings", Some(false.into()), vec!["tie_word_embeddings", "untied"]),
        ("n_head", None, vec!["missing field", "n_head"]),
        ("vocab_size", None, vec!["missing field", "vocab_size"]),
        ("layer_norm_epsilon", None, vec!["missing field", "layer_norm_epsilon"]),
        ("n_embd", Some("16".into()), vec!["n_embd", "expected a non-negative integer", "\"16\""]),
        ("n_layer", Some((-2).into()), vec!["n_layer", "non-negative integer"]),
        ("layer_norm_epsilon", Some("tiny".into()), vec!["layer_norm_epsilon", "expected a number"]),
        ("n_head", Some(3.into()), vec!["n_embd", "n_head", "divisible"]),
        ("n_inner", Some(100.into()), vec!["n_inner", "100"]),
    ];
    for (i, (field, value, needles)) in cases.into_iter().enumerate() {
        let dir = tmp.path().join(format!("case{i}"));
        write_dir(&dir, &edited_config(&config, field, value.clone()), &raw);
        let msg = load_error(&dir);
        assert_mentions(&msg, &["config.json"]);
        assert_mentions(&msg, &needles);
    }
    // Both context fields missing.
    let dir = tmp.path().join("no_positions");
    let text = edited_config(&config, "n_positions", None);
    let mut v: Value = serde_json::from_str(&text).unwrap();
    v.as_object_mut().unwrap().remove("n_ctx");
    write_dir(&dir, &v.to_string(), &raw);
    assert_mentions(&load_error(&dir), &["config.json", "n_positions", "n_ctx"]);
    // Not JSON at all.
    let dir = tmp.path().join("not_json");
    write_dir(&dir, "{ \"model_type\": ", &raw);
    assert_mentions(&load_error(&dir), &["config.json", "not valid JSON"]);
}

#[test]
fn config_and_weights_of_different_sizes_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config();
    let raw = raw_f32(&random_weights(&config, 12), "");
    let bigger = DecoderConfig { n_embd: 32, ..config.clone() };
    write_dir(tmp.path(), &bigger.to_hf_json(), &raw);
    assert_mentions(&load_error(tmp.path()), &["wte.weight", "[37, 16]", "[37, 32]"]);
}

#[test]
fn save_rejects_weights_that_do_not_match_their_config() {
    let tmp = tempfile::tempdir().unwrap();
    let mut weights = random_weights(&tiny_config(), 13);
    weights.tensors.get_mut("h.0.ln_2.bias").unwrap().1.pop();
    let err = format!("{:#}", checkpoint::save_dir(&weights, tmp.path()).unwrap_err());
    assert_mentions(&err, &["h.0.ln_2.bias", "15", "16"]);
    assert!(!tmp.path().join("model.safetensors").exists());
}

#[test]
fn copy_tokenizer_copies_only_when_present() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    fs::create_dir_all(&src).unwrap();
    assert!(!checkpoint::copy_tokenizer(&src, &dst).unwrap());
    assert!(!dst.join("tokenizer.json").exists());
    let content = b"{\"version\": \"1.0\", \"model\": {}}";
    fs::write(src.join("tokenizer.json"), content).unwrap();
    assert!(checkpoint::copy_tokenizer(&src, &dst).unwrap());
    assert_eq!(fs::read(dst.join("tokenizer.json")).unwrap(), content);
}
