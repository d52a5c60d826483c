//! LoRA adapters (PEFT's): adapter gradients against central differences of the f64 reference on
//! the merged weights, the adapters off (or fresh) as the base bit for bit, the merged model as the
//! adapted one, only the adapters training, the emulated device against the CPU, PEFT's adapter
//! directories in and out (and PEFT's own log-probs, from committed fixtures), bad inputs, and a
//! LoRA run that resumes bit for bit.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::reference::*;
use common::*;
use safedpo::backend::cuda::{CudaBackend, Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::config::RunConfig;
use safedpo::data::{synthetic_pku_rows, write_pku_jsonl};
use safedpo::model::checkpoint::load_dir;
use safedpo::model::peft::{load_adapter, save_adapter};
use safedpo::model::{Decoder, DecoderConfig, DeviceBatch, HostAdapters, HostWeights, LoraSpec};
use safedpo::optim::{AdamW, AdamWConfig};
use safedpo::train::checkpoint::read_latest;
use safedpo::train::{train, Resume, Task, TrainOptions};

fn gpt2() -> DecoderConfig {
    DecoderConfig::gpt2(37, 32, 16, 2, 2)
}

/// A Llama with grouped-query attention (4 heads, 2 key/value heads) and an untied head.
fn llama() -> DecoderConfig {
    DecoderConfig::llama(41, 32, 16, 2, 4, 2, 24)
}

fn spec(r: usize, targets: &[&str]) -> LoraSpec {
    LoraSpec {
        r,
        alpha: 2.0 * r as f64,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
        use_rslora: false,
    }
}

/// PEFT's initialisation, then B drawn at random (non-zero), so that the adapters change the model.
fn random_adapters(config: &DecoderConfig, spec: LoraSpec, seed: u64) -> HostAdapters {
    let mut adapters = HostAdapters::init(config, spec, seed).unwrap();
    let mut r = rng(seed + 100);
    for (name, (_, data)) in adapters.tensors.iter_mut() {
        if name.contains("lora_B") {
            *data = randn(&mut r, data.len(), 0.2);
        }
    }
    adapters
}

fn logps<B: Backend>(model: &mut Decoder<B>, seqs: &[Seq]) -> Vec<f32> {
    let b = model.backend().clone();
    let batch = DeviceBatch::upload(&*b, &pack(seqs)).unwrap();
    b.download(model.forward(&batch).unwrap()).unwrap()
}

/// The engine parameter, its adapted output rows' offset, and whether it is stored `[in, out]`
/// (GPT-2's Conv1D), of a PEFT module path: written here from the two layouts, independently of
/// the library's merge.
fn merged_target(config: &DecoderConfig, module: &str) -> (String, usize, bool) {
    let parts: Vec<&str> = module.split('.').collect();
    let (layer, parent, name) = (parts[parts.len() - 3], parts[parts.len() - 2], parts[parts.len() - 1]);
    if config.family.is_gpt2() {
        return (format!("h.{layer}.{parent}.{name}.weight"), 0, true);
    }
    let hd = config.head_dim;
    let (q, kv, f) = (config.n_head * hd, config.n_kv_head * hd, config.intermediate_size);
    let (param, offset) = match name {
        "q_proj" => ("self_attn.qkv_proj", 0),
        "k_proj" => ("self_attn.qkv_proj", q),
        "v_proj" => ("self_attn.qkv_proj", q + kv),
        "gate_proj" => ("mlp.gate_up_proj", 0),
        "up_proj" => ("mlp.gate_up_proj", f),
        other => (if other == "o_proj" { "self_attn.o_proj" } else { "mlp.down_proj" }, 0),
    };
    (format!("layers.{layer}.{param}.weight"), offset, false)
}

/// `W + scale · B A` in f64, for every adapter: the f64 weights of the merged model.
fn merge_f64(
    base: &HostWeights,
    adapters: &BTreeMap<String, (Vec<usize>, Vec<f64>)>,
    scale: f64,
) -> BTreeMap<String, Vec<f64>> {
    let mut w: BTreeMap<String, Vec<f64>> =
        base.tensors.iter().map(|(k, (_, d))| (k.clone(), d.iter().map(|&x| x as f64).collect())).collect();
    for (name, (a_shape, a)) in adapters.iter().filter(|(n, _)| n.ends_with("lora_A.weight")) {
        let module = name.trim_start_matches("base_model.model.").trim_end_matches(".lora_A.weight");
        let b = &adapters[&name.replace("lora_A", "lora_B")].1;
        let (r, fan_in) = (a_shape[0], a_shape[1]);
        let fan_out = b.len() / r;
        let (param, offset, in_out) = merged_target(&base.config, module);
        let shape = &base.tensors[&param].0;
        let weight = w.get_mut(&param).unwrap();
        for o in 0..fan_out {
            for i in 0..fan_in {
                let delta: f64 = (0..r).map(|k| b[o * r + k] * a[k * fan_in + i]).sum();
                let at = if in_out { i * shape[1] + offset + o } else { (offset + o) * fan_in + i };
                weight[at] += scale * delta;
            }
        }
    }
    w
}

/// The CPU model's adapter gradients of `Σ w·logp` against central differences of the f64
/// reference on the weights merged in f64, at sampled entries and each tensor's largest.
fn adapter_gradients_match_finite_differences(config: DecoderConfig, targets: &[&str], seed: u64) {
    let base = test_weights(&config, seed);
    let adapters = random_adapters(&config, spec(3, targets), seed);
    let scale = adapters.spec.scale() as f64;
    let backend = cpu();
    let mut model = Decoder::with_lora(backend.clone(), &base, adapters.clone()).unwrap();
    let seqs = sequences(seed + 1, &LENS, config.vocab_size);
    let dev = DeviceBatch::upload(&*backend, &pack(&seqs)).unwrap();
    let weights: Vec<f64> = uniform(&mut rng(seed + 2), seqs.len(), -1.0, 1.0).into_iter().map(f64::from).collect();
    model.forward(&dev).unwrap();
    model.zero_grad().unwrap();
    let dseq = backend.upload(&weights.iter().map(|&w| w as f32).collect::<Vec<_>>()).unwrap();
    model.backward(&dev, &dseq).unwrap();
    let names: Vec<String> = model.params_and_grads_mut().unwrap().into_iter().map(|(n, _, _)| n.to_string()).collect();
    let grads: Vec<Vec<f32>> = model.grads().unwrap().into_iter().cloned().collect();
    let mut f64_adapters: BTreeMap<String, (Vec<usize>, Vec<f64>)> = adapters
        .tensors
        .iter()
        .map(|(k, (s, d))| (k.clone(), (s.clone(), d.iter().map(|&x| x as f64).collect())))
        .collect();
    let loss = |adapters: &BTreeMap<String, (Vec<usize>, Vec<f64>)>| {
        let reference = Reference::from_f64(&config, merge_f64(&base, adapters, scale));
        weighted_sum(&weights, &reference.forward(&seqs).1)
    };
    let mut r = rng(seed + 3);
    for (name, grad) in names.iter().zip(&grads) {
        let mut idx = sample_indices(&mut r, grad.len(), 3);
        let argmax = (0..grad.len()).max_by(|&a, &b| grad[a].abs().total_cmp(&grad[b].abs())).unwrap();
        idx.push(argmax);
        let h = 1e-5;
        let fd: Vec<f64> = idx
            .iter()
            .map(|&i| {
                let orig = f64_adapters[name].1[i];
                f64_adapters.get_mut(name).unwrap().1[i] = orig + h;
                let up = loss(&f64_adapters);
                f64_adapters.get_mut(name).unwrap().1[i] = orig - h;
                let down = loss(&f64_adapters);
                f64_adapters.get_mut(name).unwrap().1[i] = orig;
                (up - down) / (2.0 * h)
            })
            .collect();
        let got: Vec<f32> = idx.iter().map(|&i| grad[i]).collect();
        let top = fd.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(top > 0.0, "{name}: every sampled finite difference is 0; the test has no signal");
        assert_close(&format!("d/d {name}"), &got, &fd, 2e-3, 2e-3 * top);
    }
}

#[test]
fn adapter_gradients_match_finite_differences_gpt2() {
    adapter_gradients_match_finite_differences(gpt2(), &["c_attn", "c_proj", "c_fc"], 11);
}

#[test]
fn adapter_gradients_match_finite_differences_llama_fused_parts() {
    adapter_gradients_match_finite_differences(llama(), &["all-linear"], 12);
    adapter_gradients_match_finite_differences(llama(), &["k_proj", "up_proj"], 13);
}

/// Adapters off give the base model's log-probs bit for bit; fresh adapters (B = 0) too; random
/// ones change them. On the CPU and on the emulated device in f32 and bf16.
fn adapters_off_are_the_base<B: Backend>(backend: Arc<B>) {
    for config in [gpt2(), llama()] {
        let base = test_weights(&config, 3);
        let seqs = sequences(4, &LENS, config.vocab_size);
        let want = logps(&mut Decoder::from_host_frozen(backend.clone(), &base).unwrap(), &seqs);
        let mut model =
            Decoder::with_lora(backend.clone(), &base, random_adapters(&config, spec(2, &["all-linear"]), 5)).unwrap();
        let on = logps(&mut model, &seqs);
        assert!(on.iter().zip(&want).any(|(a, b)| a != b), "random adapters changed nothing");
        model.set_adapters_enabled(false).unwrap();
        assert_bitwise_eq("adapters off", &logps(&mut model, &seqs), &want);
        model.set_adapters_enabled(true).unwrap();
        assert_bitwise_eq("adapters on again", &logps(&mut model, &seqs), &on);
        // Fresh: B = 0 adds exact zeros (on q/v: no product changes its fused epilogue).
        let fresh = HostAdapters::init(
            &config,
            LoraSpec { target_modules: LoraSpec::default_targets(&config), ..spec(4, &[]) },
            6,
        );
        let mut fresh = Decoder::with_lora(backend.clone(), &base, fresh.unwrap()).unwrap();
        assert_bitwise_eq("fresh adapters", &logps(&mut fresh, &seqs), &want);
    }
}

#[test]
fn adapters_off_are_the_base_cpu() {
    adapters_off_are_the_base(cpu());
}

#[test]
fn adapters_off_are_the_base_emulated_device() {
    for precision in [Precision::F32, Precision::Bf16] {
        adapters_off_are_the_base(Arc::new(CudaBackend::new(Device::emulated().unwrap(), precision)));
    }
}

/// The merged model (PEFT's merge_and_unload) gives the adapted model's log-probs.
#[test]
fn merged_model_matches_the_adapted_model() {
    for (config, targets) in
        [(gpt2(), &["all-linear"][..]), (llama(), &["all-linear"][..]), (llama(), &["q_proj", "gate_proj"][..])]
    {
        let base = test_weights(&config, 7);
        let seqs = sequences(8, &LENS, config.vocab_size);
        let mut adapted = Decoder::with_lora(cpu(), &base, random_adapters(&config, spec(3, targets), 9)).unwrap();
        let merged = adapted.merged_to_host().unwrap();
        let want: Vec<f64> =
            logps(&mut Decoder::from_host(cpu(), &merged).unwrap(), &seqs).iter().map(|&x| x as f64).collect();
        assert_close("adapted vs merged", &logps(&mut adapted, &seqs), &want, 1e-5, 1e-5);
    }
}

/// The adapter gradients of `Σ dseq·logp` on a backend.
fn lora_grads<B: Backend>(
    b: Arc<B>,
    base: &HostWeights,
    a: &HostAdapters,
    seqs: &[Seq],
    dseq: &[f32],
) -> Vec<Vec<f32>> {
    let mut model = Decoder::with_lora(b.clone(), base, a.clone()).unwrap();
    let batch = DeviceBatch::upload(&*b, &pack(seqs)).unwrap();
    model.forward(&batch).unwrap();
    model.zero_grad().unwrap();
    model.backward(&batch, &b.upload(dseq).unwrap()).unwrap();
    model.grads().unwrap().into_iter().map(|g| b.download(g).unwrap()).collect()
}

/// The emulated device's adapter gradients against the CPU's: f32 tightly, bf16 loosely.
#[test]
fn emulated_device_adapter_gradients_match_the_cpu() {
    for config in [gpt2(), llama()] {
        let base = test_weights(&config, 21);
        let adapters = random_adapters(&config, spec(2, &["all-linear"]), 22);
        let seqs = sequences(23, &LENS, config.vocab_size);
        let dseq: Vec<f32> = uniform(&mut rng(24), seqs.len(), -1.0, 1.0);
        let want = lora_grads(cpu(), &base, &adapters, &seqs, &dseq);
        let f32_emu = Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::F32));
        for (i, (g, w)) in lora_grads(f32_emu, &base, &adapters, &seqs, &dseq).iter().zip(&want).enumerate() {
            let top = w.iter().fold(0.0f64, |m, x| m.max(x.abs() as f64));
            let w64: Vec<f64> = w.iter().map(|&x| x as f64).collect();
            assert_close(&format!("f32 adapter tensor {i}"), g, &w64, 1e-4, 1e-4 * top);
        }
        // bf16 storage: the weights rounded to bf16 for both (the same model); TESTING.md's bf16
        // gradient bound relative to each element (5e-2), and 1e-1 of the tensor's largest entry
        // (the whole model's 6e-2 widened: an adapter's gradient also reads its products `x Aᵀ` and
        // `dout B`, each rounded to bf16; the full model's gradients at these weights are off by
        // up to 4% of their largest entry).
        let round = |data: &mut Vec<f32>| data.iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
        let (mut base, mut adapters) = (base.clone(), adapters.clone());
        base.tensors.values_mut().for_each(|(_, d)| round(d));
        adapters.tensors.values_mut().for_each(|(_, d)| round(d));
        let want = lora_grads(cpu(), &base, &adapters, &seqs, &dseq);
        let bf16_emu = Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::Bf16));
        for (i, (g, w)) in lora_grads(bf16_emu, &base, &adapters, &seqs, &dseq).iter().zip(&want).enumerate() {
            let top = w.iter().fold(0.0f64, |m, x| m.max(x.abs() as f64));
            let w64: Vec<f64> = w.iter().map(|&x| x as f64).collect();
            assert_close(&format!("bf16 adapter tensor {i}"), g, &w64, 5e-2, 1e-1 * top);
        }
    }
}

/// Training steps change the adapters and nothing of the base; the optimizer holds state for the
/// adapters only.
#[test]
fn only_the_adapters_train() {
    let config = llama();
    let base = test_weights(&config, 31);
    let adapters = HostAdapters::init(&config, spec(2, &["all-linear"]), 32).unwrap();
    let backend = cpu();
    let mut model = Decoder::with_lora(backend.clone(), &base, adapters.clone()).unwrap();
    let listed: Vec<String> =
        model.params_and_grads_mut().unwrap().into_iter().map(|(n, _, _)| n.to_string()).collect();
    assert_eq!(listed.len(), 2 * 7 * config.n_layer);
    assert!(
        listed.iter().all(|n| n.starts_with("base_model.model.model.layers.") && n.contains(".lora_")),
        "{listed:?}"
    );
    let mut opt =
        AdamW::new(&mut model, AdamWConfig { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 })
            .unwrap();
    assert_eq!(opt.state_to_host().unwrap().keys().filter(|k| k.starts_with("m.")).count(), listed.len());
    let seqs = sequences(33, &LENS, config.vocab_size);
    let batch = DeviceBatch::upload(&*backend, &pack(&seqs)).unwrap();
    for _ in 0..3 {
        model.zero_grad().unwrap();
        model.forward(&batch).unwrap();
        model.backward(&batch, &backend.upload(&vec![1.0; seqs.len()]).unwrap()).unwrap();
        opt.step(&mut model, 1e-2, 1.0).unwrap();
    }
    assert_bit_identical(&model.to_host().unwrap(), &base);
    let trained = model.adapters_to_host().unwrap().unwrap();
    for (name, (_, data)) in &trained.tensors {
        assert_ne!(data, &adapters.tensors[name].1, "{name} did not train");
    }
}

/// PEFT's directory: written and read back exactly; an adapter that does not fit the base, a target
/// the model does not have, dropout and PEFT options the engine lacks are errors naming them.
#[test]
fn peft_directories_round_trip_and_bad_inputs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = gpt2();
    let adapters = random_adapters(&config, spec(2, &["c_attn", "mlp.c_proj"]), 41);
    save_adapter(&adapters, &config, "base", dir.path()).unwrap();
    let back = load_adapter(dir.path(), &config).unwrap();
    assert_eq!(back.tensors, adapters.tensors);
    // Saved as PEFT would match them: `mlp.c_proj`, as plain `c_proj` would take attn.c_proj too.
    assert_eq!(
        back.spec,
        LoraSpec { target_modules: vec!["c_attn".into(), "mlp.c_proj".into()], ..adapters.spec.clone() }
    );

    let mut wider = config.clone();
    wider.n_embd = 32;
    let err = format!("{:#}", load_adapter(dir.path(), &wider).unwrap_err());
    assert!(err.contains("lora_A.weight") && err.contains("shape"), "{err}");
    let err = format!("{:#}", load_adapter(dir.path(), &llama()).unwrap_err());
    assert!(err.contains("c_attn") && err.contains("q_proj"), "{err}");

    let err = format!("{:#}", HostAdapters::init(&config, spec(2, &["q_proj"]), 1).unwrap_err());
    assert!(err.contains("q_proj") && err.contains("attn.c_attn") && err.contains("mlp.c_fc"), "{err}");

    let path = dir.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"use_dora\": false", "\"use_dora\": true")).unwrap();
    assert!(format!("{:#}", load_adapter(dir.path(), &config).unwrap_err()).contains("use_dora"));

    let mut cfg = RunConfig::default();
    cfg.lora.r = 4;
    cfg.lora.dropout = 0.05;
    let errors = cfg.validate();
    assert!(errors.iter().any(|e| e.field == "lora.dropout" && e.message.contains("not implemented")), "{errors:?}");
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora").join(name)
}

/// PEFT's fixtures (scripts/make-lora-fixtures.py): the engine loads PEFT's adapter onto PEFT's base
/// and gives PEFT's log-probs; merged (`safedpo merge`'s function) too; adapters off, the base's.
#[test]
fn peft_fixtures_give_peft_log_probs() {
    for name in ["gpt2", "llama-gqa"] {
        let dir = fixture(name);
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let seqs: Vec<Seq> = expected["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let ids =
                    |k: &str| s[k].as_array().unwrap().iter().map(|v| v.as_i64().unwrap() as i32).collect::<Vec<_>>();
                Seq { prompt: ids("prompt"), response: ids("response") }
            })
            .collect();
        let values = |k: &str| expected[k].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect::<Vec<_>>();
        let base = load_dir(&dir.join("base")).unwrap();
        let adapters = load_adapter(&dir.join("adapter"), &base.config).unwrap();
        let mut model = Decoder::with_lora_frozen(cpu(), &base, adapters).unwrap();
        assert_close(&format!("{name}: adapted"), &logps(&mut model, &seqs), &values("logp"), 1e-5, 1e-5);
        model.set_adapters_enabled(false).unwrap();
        assert_close(&format!("{name}: base"), &logps(&mut model, &seqs), &values("base_logp"), 1e-5, 1e-5);
        let out = tempfile::tempdir().unwrap();
        safedpo::model::peft::merge_dirs(&dir.join("base"), &dir.join("adapter"), out.path()).unwrap();
        let mut merged = Decoder::load_frozen(cpu(), out.path()).unwrap();
        assert_close(&format!("{name}: merged"), &logps(&mut merged, &seqs), &values("logp"), 1e-5, 1e-5);
    }
}

/// An adapter the engine trains and saves, loaded by PEFT: PEFT's log-probs are the engine's.
/// Needs torch, transformers and peft (`python3` on PATH, or SAFEDPO_PYTHON).
#[test]
#[ignore]
fn peft_loads_an_adapter_the_engine_saved() {
    let python = std::env::var("SAFEDPO_PYTHON").unwrap_or_else(|_| "python3".into());
    for name in ["gpt2", "llama-gqa"] {
        let base_dir = fixture(name).join("base");
        let base = load_dir(&base_dir).unwrap();
        let config = base.config.clone();
        let targets = if config.family.is_gpt2() { vec!["c_attn", "c_proj", "c_fc"] } else { vec!["all-linear"] };
        let mut model = Decoder::with_lora(cpu(), &base, random_adapters(&config, spec(2, &targets), 51)).unwrap();
        let seqs = sequences(52, &[(4, 2), (6, 1), (3, 2)], config.vocab_size);
        let ours = logps(&mut model, &seqs);
        let out = tempfile::tempdir().unwrap();
        save_adapter(&model.adapters_to_host().unwrap().unwrap(), &config, &base_dir.display().to_string(), out.path())
            .unwrap();
        let seqs_json: Vec<serde_json::Value> =
            seqs.iter().map(|s| serde_json::json!({"prompt": s.prompt, "response": s.response})).collect();
        let seqs_path = out.path().join("seqs.json");
        std::fs::write(&seqs_path, serde_json::to_string(&seqs_json).unwrap()).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-lora-fixtures.py");
        let output = std::process::Command::new(&python)
            .arg(script)
            .arg("--score")
            .args([&base_dir, out.path(), &seqs_path])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let stdout = String::from_utf8(output.stdout).unwrap();
        let theirs: Vec<f64> = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_close(&format!("{name}: PEFT on the engine's adapter"), &ours, &theirs, 1e-5, 1e-5);
    }
}

/// A LoRA run N steps straight and N/2, an interruption and a resume: the same adapters, optimizer
/// state and merged model bit for bit; with the reference the policy's base (no cache) and cached.
#[test]
fn lora_runs_resume_bit_for_bit() {
    for precompute_ref in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.jsonl");
        write_pku_jsonl(&data, &synthetic_pku_rows(60, 3)).unwrap();
        let mut straight =
            RunConfig { out_dir: dir.path().join("straight"), seed: 7, precompute_ref, ..Default::default() };
        straight.data.path = Some(data);
        straight.data.template = "U: {prompt} A:".into();
        (straight.data.max_len, straight.model.n_positions, straight.data.eval_fraction) = (128, 128, 0.2);
        (straight.model.n_layer, straight.model.n_embd, straight.model.n_head) = (2, 16, 2);
        (straight.batching.tokens_per_micro_batch, straight.batching.grad_accum) = (1024, 2);
        (straight.optimizer.lr, straight.optimizer.total_steps) = (5e-3, Some(6));
        (straight.intervals.eval_every, straight.intervals.checkpoint_every) = (2, 0);
        (straight.lora.r, straight.lora.target_modules) = (2, "c_attn,c_fc".into());
        let mut resumed = straight.clone();
        resumed.out_dir = dir.path().join("resumed");
        let quiet = TrainOptions { quiet: true, ..Default::default() };
        assert!(train(cpu(), &straight, Task::Preference, &quiet).unwrap().completed);
        train(cpu(), &resumed, Task::Preference, &TrainOptions { stop_after_step: Some(3), ..quiet.clone() }).unwrap();
        assert!(read_latest(&resumed.out_dir).unwrap().unwrap().ends_with("checkpoint-3"));
        let again = TrainOptions { resume: Some(Resume::Auto), ..quiet.clone() };
        assert!(train(cpu(), &resumed, Task::Preference, &again).unwrap().completed);
        for file in [
            "adapter_model.safetensors",
            "adapter_config.json",
            "optimizer.safetensors",
            "model.safetensors",
            "state.json",
        ] {
            let x = std::fs::read(straight.out_dir.join("final").join(file)).unwrap();
            let y = std::fs::read(resumed.out_dir.join("final").join(file)).unwrap();
            assert!(
                x == y,
                "precompute_ref {precompute_ref}: final/{file} differs between the straight and the resumed run"
            );
        }
        // The optimizer state is the adapters' only, and training moved them.
        let final_dir = straight.out_dir.join("final");
        let moments = safedpo::train::checkpoint::read_optimizer_state(&final_dir).unwrap();
        assert!(moments.keys().filter(|k| *k != "step").all(|k| k.contains(".lora_")), "{:?}", moments.keys());
        let config = load_dir(&final_dir).unwrap().config;
        let trained = load_adapter(&final_dir, &config).unwrap();
        assert!(trained.tensors.iter().any(|(n, (_, d))| n.contains("lora_B") && d.iter().any(|&x| x != 0.0)));
    }
}
