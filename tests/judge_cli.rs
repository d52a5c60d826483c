//! The judges from the command line: `sft`, then `rm --rm.kind reward` and `rm --rm.kind cost` from
//! the SFT model, then `eval --generate` with both judges: the files each writes and the metrics it
//! reports.

use std::path::Path;
use std::process::Command;

fn safedpo(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_safedpo")).args(args).output().unwrap();
    assert!(out.status.success(), "safedpo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
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
}
