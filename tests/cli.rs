//! The `safedpo` binary end to end: `demo --quick`, `sft`/`train` with resume, `logps`, `eval`,
//! `generate`, and clean user errors (exit code 1, a message naming the problem, no panic).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use safedpo::backend::cpu::CpuBackend;
use safedpo::data::{synthetic_pku_rows, write_pku_jsonl};
use safedpo::model::{Gpt2, Gpt2Config};

fn safedpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safedpo")).args(args).output().expect("running the safedpo binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts success and returns stdout.
fn ok(args: &[&str]) -> String {
    let out = safedpo(args);
    assert!(
        out.status.success(),
        "safedpo {args:?} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Asserts a clean user error (exit 1, no panic) and returns stderr.
fn user_error(args: &[&str]) -> String {
    let out = safedpo(args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "safedpo {args:?}: expected exit code 1\nstderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "safedpo {args:?} panicked:\n{stderr}");
    stderr
}

fn data_file(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("data.jsonl");
    write_pku_jsonl(&path, &synthetic_pku_rows(n, 11)).unwrap();
    path
}

/// A random byte-vocabulary model directory.
fn tiny_model(dir: &Path, seed: u64) -> PathBuf {
    let cfg =
        Gpt2Config { vocab_size: 258, n_positions: 96, n_embd: 16, n_layer: 1, n_head: 2, layer_norm_epsilon: 1e-5 };
    let model = Gpt2::random(Arc::new(CpuBackend::new()), cfg, seed).unwrap();
    let path = dir.join(format!("model-{seed}"));
    model.save(&path).unwrap();
    path
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn demo_quick_trains_and_writes_its_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("demo");
    let stdout = ok(&["demo", "--quick", "--quiet", "--out-dir", p(&out_dir)]);
    for needle in ["safe-preferred accuracy", "reward accuracy", "reward margin", "before", "after", "tokens/s"] {
        assert!(stdout.contains(needle), "summary lacks {needle:?}:\n{stdout}");
    }
    for file in [
        "train.jsonl",
        "eval.jsonl",
        "metrics.jsonl",
        "plot.svg",
        "sft/final/model.safetensors",
        "safedpo/final/config.json",
    ] {
        assert!(out_dir.join(file).is_file(), "demo did not write {file}");
    }
    let recs = safedpo::plot::read_metrics(&out_dir.join("metrics.jsonl")).unwrap();
    let evals: Vec<f64> =
        recs.iter().filter_map(|r| r.get("eval/safe_preferred_accuracy").and_then(|v| v.as_f64())).collect();
    assert!(evals.len() >= 2);
    assert_eq!(evals[0], 0.5, "before training the policy is the reference");
    assert!(*evals.last().unwrap() > 0.8, "safe-preferred accuracy after the quick demo: {evals:?}");
    assert!(fs::read_to_string(out_dir.join("plot.svg")).unwrap().contains("<svg"));
}

#[test]
fn sft_then_train_with_resume_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_file(dir.path(), 60);
    let sft_dir = dir.path().join("sft");
    let common = [
        "--data.path",
        p(&data),
        "--data.template",
        "U: {prompt} A:",
        "--data.max_len",
        "96",
        "--model.n_positions",
        "96",
        "--model.n_layer",
        "1",
        "--model.n_embd",
        "16",
        "--model.n_head",
        "2",
        "--batching.tokens_per_micro_batch",
        "800",
        "--no-progress",
    ];
    let mut args = vec!["sft", "--out-dir", p(&sft_dir), "--optimizer.total_steps", "3", "--optimizer.lr", "1e-3"];
    args.extend(common);
    let summary: serde_json::Value = serde_json::from_str(ok(&args).trim()).unwrap();
    assert_eq!(summary["completed"], true);
    assert!(sft_dir.join("final/model.safetensors").is_file());

    // SafeDPO from the SFT model, interrupted by nothing but run in two invocations: the second
    // `--resume auto` finds the run complete and does nothing.
    let run_dir = dir.path().join("dpo");
    let init = sft_dir.join("final");
    let mut args = vec!["train", "--out-dir", p(&run_dir), "--model.init", p(&init), "--optimizer.total_steps", "2"];
    args.extend(["--intervals.checkpoint_every", "1"]);
    args.extend(common);
    ok(&args);
    assert!(run_dir.join("checkpoint-1/optimizer.safetensors").is_file());
    assert_eq!(fs::read_to_string(run_dir.join("latest")).unwrap().trim(), "final");
    args.extend(["--resume", "auto"]);
    let again: serde_json::Value = serde_json::from_str(ok(&args).trim()).unwrap();
    assert_eq!(again["steps_this_run"], 0);

    // A changed configuration is refused on resume.
    let mut changed = args.clone();
    changed.extend(["--optimizer.lr", "0.5"]);
    let err = user_error(&changed);
    assert!(err.contains("configuration differs"), "{err}");
}

#[test]
fn logps_writes_one_line_per_pair_consistent_with_eval() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_file(dir.path(), 12);
    let policy = tiny_model(dir.path(), 1);
    let reference = tiny_model(dir.path(), 2);
    let out = dir.path().join("logps.jsonl");
    let common = [
        "--data.path",
        p(&data),
        "--data.template",
        "U: {prompt} A:",
        "--data.max_len",
        "96",
        "--data.selection",
        "better",
    ];
    let mut args = vec!["logps", "--model", p(&policy), "--model.reference", p(&reference), "--out", p(&out)];
    args.extend(common);
    ok(&args);
    let lines: Vec<serde_json::Value> =
        fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 12);
    let mut margin_sum = 0.0;
    for l in &lines {
        let prompt = l["prompt_tokens"].as_u64().unwrap() as usize;
        let chosen = l["chosen_ids"].as_array().unwrap();
        assert!(prompt >= 1 && chosen.len() > prompt);
        // Byte tokens (ids < 256) of the prompt, after any BOS; long prompts lose their start.
        let prefix: Vec<u8> =
            chosen[..prompt].iter().map(|v| v.as_u64().unwrap()).filter(|&id| id < 256).map(|id| id as u8).collect();
        assert!(String::from_utf8_lossy(&prefix).ends_with(" A:"), "{}", String::from_utf8_lossy(&prefix));
        for k in ["policy_chosen_logp", "policy_rejected_logp", "reference_chosen_logp", "reference_rejected_logp"] {
            let v = l[k].as_f64().unwrap();
            assert!(v.is_finite() && v < 0.0, "{k} = {v}");
        }
        let f = |k: &str| l[k].as_f64().unwrap();
        margin_sum += 0.1
            * ((f("policy_chosen_logp") - f("reference_chosen_logp"))
                - (f("policy_rejected_logp") - f("reference_rejected_logp")));
    }
    // `eval` on the same pairs reports the mean implicit-reward margin computed from these log-probs.
    let mut args = vec!["eval", "--model", p(&policy), "--model.reference", p(&reference), "--objective.name", "dpo"];
    args.extend(common);
    let metrics: serde_json::Value = serde_json::from_str(ok(&args).trim()).unwrap();
    assert_eq!(metrics["pairs"], 12);
    let margin = metrics["eval/rewards/margins"].as_f64().unwrap();
    assert!((margin - margin_sum / 12.0).abs() < 1e-4, "{margin} vs {}", margin_sum / 12.0);
}

#[test]
fn generate_greedy_is_deterministic_and_sampling_follows_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 3);
    let greedy = ["generate", "--model", p(&model), "--prompt", "How do I bake bread?", "--max-new-tokens", "8"];
    let a = ok(&greedy);
    assert_eq!(a, ok(&greedy));
    let sample = |seed: &str| {
        let mut args = vec!["generate", "--model", p(&model), "--prompt", "hi", "--raw", "--max-new-tokens", "12"];
        args.extend(["--temperature", "1.5", "--top-p", "0.95", "--seed", seed]);
        ok(&args)
    };
    assert_eq!(sample("1"), sample("1"));
    assert_ne!(sample("1"), sample("2"), "a random model sampled at T=1.5 should depend on the seed");
}

#[test]
fn user_errors_are_reported_without_panics() {
    let dir = tempfile::tempdir().unwrap();
    let err = user_error(&["train"]);
    assert!(err.contains("data.path"), "{err}");
    let err = user_error(&["train", "--data.path", "/definitely/not/here.jsonl"]);
    assert!(err.contains("/definitely/not/here.jsonl"), "{err}");
    if safedpo::backend::device::gpu_unavailable_reason().is_some() {
        let err = user_error(&["train", "--data.path", "x.jsonl", "--device", "cuda"]);
        assert!(err.contains("--device cuda"), "{err}");
    }
    let err = user_error(&["train", "--data.path", "x.jsonl", "--optimizer.lr", "-1"]);
    assert!(err.contains("optimizer.lr") && err.contains("--optimizer.lr"), "{err}");
    let bad = dir.path().join("bad.toml");
    fs::write(&bad, "[optimizer]\nlr = 0.1\nwarmup = 3\n").unwrap();
    let err = user_error(&["train", "--config", p(&bad)]);
    assert!(err.contains("warmup") && err.contains("bad.toml:3"), "{err}");
    let err = user_error(&["generate", "--model", p(&dir.path().join("none")), "--prompt", "x"]);
    assert!(err.contains("none"), "{err}");
    let err = user_error(&["train", "--no-such-flag"]);
    assert!(err.contains("--no-such-flag"), "{err}");
    let err = user_error(&["train", "--data.path", "x.jsonl", "--resume", p(dir.path())]);
    assert!(err.contains("--resume"), "{err}");
}
