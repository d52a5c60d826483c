//! The judges from the command line: `sft`, then `rm --rm.kind reward` and `rm --rm.kind cost` from
//! the SFT model, then `eval --generate` with both judges: the files each writes and the metrics it
//! reports; a judge with another tokenizer refused; `demo --compare` end to end at the quick size (its
//! trained BPE tokenizer in every model directory, the figures by prompt kind), and on the byte model.

use std::path::Path;
use std::process::Command;

use safedpo::data::load_tokenizer;

fn safedpo(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_safedpo")).args(args).output().unwrap();
    assert!(out.status.success(), "safedpo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn safedpo_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_safedpo")).args(args).output().unwrap();
    assert!(!out.status.success(), "safedpo {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn rm_then_eval_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    safedpo(&["demo", "--data-only", "--rows", "200", "--quiet", "--out_dir", &dir("data")]);
    let data = dir("data/data.jsonl");
    let common = ["--data.path", &data, "--device", "cpu", "--data.eval_fraction", "0.2", "--seed", "3"];
    let run = |command: &[&str], extra: &[&str]| {
        safedpo(&[command, &common[..], extra, &["--batching.tokens_per_micro_batch", "4096"]].concat())
    };
    let shape = ["--model.n_layer", "1", "--model.n_embd", "16", "--model.n_head", "2"];
    run(&["sft", "--no-progress"], &[&shape[..], &["--optimizer.total_steps", "5", "--out_dir", &dir("sft")]].concat());
    let sft = dir("sft/final");
    for kind in ["reward", "cost"] {
        let out = last_json(&run(
            &["rm", "--rm.kind", kind, "--quiet"],
            &["--model.init", &sft, "--optimizer.total_steps", "4", "--out_dir", &dir(kind)],
        ));
        assert_eq!(out["kind"], kind);
        assert_eq!(out["steps"], 4);
        assert!(out["eval"]["accuracy"].as_f64().is_some(), "{out}");
        assert_eq!(out["eval"]["sign_accuracy"].is_null(), kind == "reward", "{out}");
        let config = std::fs::read_to_string(Path::new(&dir(kind)).join("final/config.json")).unwrap();
        assert!(config.contains("GPT2ForSequenceClassification"), "{config}");
    }
    // `[rm]` in a config file says the same as the flag; a kind that is neither is refused by name.
    let config = tmp.path().join("rm.toml");
    std::fs::write(&config, "[rm]\nkind = \"cost\"\n").unwrap();
    let toml_run = [&["--config", config.to_str().unwrap()][..], &["--model.init", &sft]].concat();
    let steps = ["--optimizer.total_steps", "1", "--out_dir", &dir("cost-toml")];
    let out = last_json(&run(&["rm", "--quiet"], &[&toml_run[..], &steps].concat()));
    assert_eq!(out["kind"], "cost");
    let err = safedpo_fails(&[&["rm", "--rm.kind", "judge"][..], &common, &["--model.init", &sft]].concat());
    assert!(err.contains("rm.kind") && err.contains("reward or cost"), "{err}");
    let out = last_json(&run(
        &["eval", "--model", &sft, "--split", "eval", "--generate", "--samples", "2", "--max-new-tokens", "8"],
        &["--judge.reward", &dir("reward/final"), "--judge.cost", &dir("cost/final"), "--out", &dir("judged")],
    ));
    let samples = out["samples"].as_u64().unwrap();
    assert_eq!(samples, 2 * out["prompts"].as_u64().unwrap());
    // The policy is its own reference here: every response ties with the reference's.
    assert_eq!(out["win_rate"], 0.5);
    for key in ["helpfulness", "harmlessness", "harmless_ratio"] {
        assert!(out[key].as_f64().is_some(), "{key}: {out}");
    }
    let lines = std::fs::read_to_string(Path::new(&dir("judged")).join("generations.jsonl")).unwrap();
    assert_eq!(lines.lines().count() as u64, samples);

    // A judge whose tokenizer is not the policy's reads other ids: refused, naming the flag.
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    for entry in std::fs::read_dir(dir("reward/final")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, foreign.join(path.file_name().unwrap())).unwrap();
    }
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(Path::new(TOKENIZER).join(name), foreign.join(name)).unwrap();
    }
    let err = safedpo_fails(
        &[
            &["eval", "--model", &sft, "--split", "eval", "--generate", "--max-new-tokens", "4"][..],
            &common,
            &["--judge.reward", foreign.to_str().unwrap(), "--out", &dir("refused")],
        ]
        .concat(),
    );
    assert!(err.contains("--judge.reward") && err.contains("tokenizer"), "{err}");
}

/// A tokenizer other than the byte tokenizer the tiny models use.
const TOKENIZER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenizers/qwen2");

#[test]
fn demo_compare_quick_writes_the_table() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("compare");
    let stdout =
        safedpo(&["demo", "--compare", "--quick", "--quiet", "--device", "cpu", "--out-dir", out.to_str().unwrap()]);
    for method in ["SFT (start)", "DPO (helpfulness)", "DPO (safety)", "SafeDPO"] {
        assert!(stdout.contains(&format!("| {method} |")), "{method}: {stdout}");
    }
    assert!(stdout.contains("harmless ratio") && stdout.contains("win rate vs SFT"), "{stdout}");
    assert_eq!(std::fs::read_to_string(out.join("compare.md")).unwrap().trim(), stdout.trim());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    let methods = json["methods"].as_array().unwrap();
    assert_eq!(methods.len(), 4);
    // The SFT model is its own baseline: every answer ties with itself.
    assert_eq!(methods[0]["metrics"]["win_rate"], 0.5);
    for m in methods {
        let metrics = &m["metrics"];
        assert_eq!(metrics["samples"], 4 * metrics["prompts"].as_u64().unwrap(), "{m}");
        // The figures again on the harmful and the benign prompts apart, which share out the answers.
        let (harmful, benign) = (&m["harmful"], &m["benign"]);
        for key in ["prompts", "samples"] {
            let (h, b) = (harmful[key].as_u64().unwrap(), benign[key].as_u64().unwrap());
            assert!(h > 0 && b > 0, "{key}: {m}");
            assert_eq!(h + b, metrics[key].as_u64().unwrap(), "{key}: {m}");
        }
        for key in ["helpfulness", "harmlessness", "harmless_ratio", "win_rate"] {
            for figures in [metrics, harmful, benign] {
                assert!(figures[key].as_f64().is_some_and(f64::is_finite), "{key}: {m}");
            }
        }
        // Every model the comparison writes is an HF directory with its (trained BPE) tokenizer.
        let dir = Path::new(m["model_dir"].as_str().unwrap());
        assert!(dir.join("config.json").is_file(), "{m}");
        let tok = load_tokenizer(Some(dir)).unwrap();
        assert_eq!(tok.vocab_size() as u64, json["model"]["vocab_size"].as_u64().unwrap(), "{m}");
        assert_eq!(tok.id_to_token(tok.eos_id() as u32).as_deref(), Some("<|endoftext|>"));
        assert!(tok.vocab_size() > 258, "more than the bytes: {}", tok.vocab_size());
    }
    assert_eq!(json["model"]["tokenizer"], "bpe");
    for method in ["SFT (start)", "SafeDPO"] {
        for kind in ["harmful", "benign"] {
            assert!(stdout.contains(&format!("| {method} | {kind} |")), "{method}, {kind}: {stdout}");
        }
    }
    // The judges read the policies' tokens: they carry the same tokenizer.json.
    let sft_tokenizer = std::fs::read(out.join("sft/final/tokenizer.json")).unwrap();
    for dir in ["init", "judge-reward/final", "judge-cost/final", "safedpo/final"] {
        assert_eq!(std::fs::read(out.join(dir).join("tokenizer.json")).unwrap(), sft_tokenizer, "{dir}");
    }
    let plot = std::fs::read_to_string(out.join("compare.svg")).unwrap();
    for method in ["SFT (start)", "DPO (helpfulness)", "DPO (safety)", "SafeDPO"] {
        assert!(plot.contains(method), "the plot's legend names {method}");
    }
    assert_eq!(json["judges"][0]["kind"], "reward");
    assert!(json["judges"][1]["eval_sign_accuracy"].as_f64().is_some(), "{json}");
    for stem in ["sft", "dpo-helpful", "dpo-safe", "safedpo"] {
        let lines = std::fs::read_to_string(out.join("generations").join(format!("{stem}.jsonl"))).unwrap();
        assert_eq!(lines.lines().count() as u64, methods[0]["metrics"]["samples"].as_u64().unwrap());
    }
}

#[test]
fn demo_compare_quick_on_the_byte_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("compare");
    let args = ["demo", "--compare", "--quick", "--quiet", "--device", "cpu", "--tokenizer", "byte", "--out-dir"];
    let stdout = safedpo(&[&args[..], &[out.to_str().unwrap()]].concat());
    assert!(stdout.contains("| SafeDPO | harmful |") && stdout.contains("byte tokenizer of 258 tokens"), "{stdout}");
    assert!(!out.join("init").exists());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    assert_eq!(json["model"]["tokenizer"], "byte");
    // --tokenizer belongs to the comparison.
    let err = safedpo_fails(&["demo", "--quick", "--tokenizer", "byte"]);
    assert!(err.contains("--compare"), "{err}");
}
