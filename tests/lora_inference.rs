//! `--lora.adapter` on `eval`, `logps` and `generate`: a PEFT adapter directory merged into the
//! `--model` base in memory gives what the `safedpo merge`d model gives, bit for bit; an adapter of
//! another model is a clean error naming the setting and the tensor.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::run::{ok, safedpo, text};
use safedpo::backend::cpu::CpuBackend;
use safedpo::data::{synthetic_pku_rows, write_pku_jsonl};
use safedpo::model::peft::{merge_dirs, save_adapter};
use safedpo::model::{Decoder, DecoderConfig, HostAdapters, LoraSpec};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A random byte-vocabulary GPT-2 of width `n_embd` saved in `dir/name`.
fn base_model(dir: &Path, name: &str, n_embd: usize) -> PathBuf {
    let model = Decoder::random(Arc::new(CpuBackend::new()), DecoderConfig::gpt2(258, 96, n_embd, 2, 2), 5).unwrap();
    let path = dir.join(name);
    model.save(&path).unwrap();
    path
}

/// An adapter for `base` in PEFT's format, with every B non-zero (PEFT starts B at zero, which
/// would leave the model as it is).
fn adapter_for(base: &Path, out: &Path) -> PathBuf {
    let config = Decoder::load(Arc::new(CpuBackend::new()), base).unwrap().config().clone();
    let spec = LoraSpec { r: 2, alpha: 4.0, target_modules: vec!["c_attn".into(), "c_fc".into()], use_rslora: false };
    let mut adapters = HostAdapters::init(&config, spec, 9).unwrap();
    for (name, (_, values)) in adapters.tensors.iter_mut().filter(|(n, _)| n.contains("lora_B")) {
        let salt = name.len() as f32;
        values.iter_mut().enumerate().for_each(|(i, v)| *v = 0.05 * ((i as f32 * 0.37 + salt).sin()));
    }
    save_adapter(&adapters, &config, &base.display().to_string(), out).unwrap();
    out.to_path_buf()
}

struct Fixture {
    _dir: tempfile::TempDir,
    data: PathBuf,
    base: PathBuf,
    adapter: PathBuf,
    merged: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    write_pku_jsonl(&data, &synthetic_pku_rows(10, 3)).unwrap();
    let base = base_model(dir.path(), "base", 16);
    let adapter = adapter_for(&base, &dir.path().join("adapter"));
    let merged = dir.path().join("merged");
    merge_dirs(&base, &adapter, &merged).unwrap();
    Fixture { data, base, adapter, merged, _dir: dir }
}

const DATA_FLAGS: [&str; 6] =
    ["--data.template", "U: {prompt} A:", "--data.max_len", "96", "--data.selection", "better"];

#[test]
fn logps_and_eval_with_the_adapter_are_the_merged_models() {
    let f = fixture();
    let run = |command: &str, model: &Path, adapter: Option<&Path>, out: Option<&Path>| -> String {
        let mut args = vec![command, "--model", p(model), "--model.reference", p(&f.base), "--data.path", p(&f.data)];
        args.extend(DATA_FLAGS);
        if let Some(adapter) = adapter {
            args.extend(["--lora.adapter", p(adapter)]);
        }
        if let Some(out) = out {
            args.extend(["--out", p(out)]);
        }
        let stdout = ok(&args);
        match out {
            Some(out) => fs::read_to_string(out).unwrap(),
            None => stdout,
        }
    };
    let out = f.data.with_file_name("logps.jsonl");
    let adapted = run("logps", &f.base, Some(&f.adapter), Some(&out));
    let merged = run("logps", &f.merged, None, Some(&out));
    let base = run("logps", &f.base, None, Some(&out));
    assert_eq!(adapted, merged, "logps: the adapter against the merged model");
    assert_ne!(adapted, base, "the adapter changed nothing");
    let adapted = run("eval", &f.base, Some(&f.adapter), None);
    assert_eq!(adapted, run("eval", &f.merged, None, None), "eval: the adapter against the merged model");
    assert!(adapted.contains("eval/rewards/margins"), "{adapted}");
}

#[test]
fn generate_with_the_adapter_is_the_merged_models() {
    let f = fixture();
    let generate = |model: &Path, adapter: Option<&Path>, sampled: bool| -> String {
        let mut args = vec!["generate", "--model", p(model), "--prompt", "How do I", "--max-new-tokens", "10"];
        if let Some(adapter) = adapter {
            args.extend(["--lora.adapter", p(adapter)]);
        }
        if sampled {
            args.extend(["--temperature", "1.2", "--seed", "4"]);
        }
        ok(&args)
    };
    for sampled in [false, true] {
        let adapted = generate(&f.base, Some(&f.adapter), sampled);
        assert_eq!(adapted, generate(&f.merged, None, sampled), "generate (sampled: {sampled})");
    }
}

#[test]
fn an_adapter_of_another_model_is_a_clean_error() {
    let f = fixture();
    let wider = base_model(f.base.parent().unwrap(), "wider", 32);
    let wrong = adapter_for(&wider, &f.base.with_file_name("wider-adapter"));
    let commands: [Vec<&str>; 2] = [
        vec!["eval", "--model", p(&f.base), "--data.path", p(&f.data)],
        vec!["generate", "--model", p(&f.base), "--prompt", "x"],
    ];
    for mut args in commands {
        args.extend(["--lora.adapter", p(&wrong)]);
        let out = safedpo(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: expected exit code 1\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.contains("lora.adapter") && stderr.contains("lora_A.weight") && stderr.contains("shape"),
            "{stderr}"
        );
    }
}
