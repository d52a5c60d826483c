//! The `safedpo` binary end to end: `demo --quick`, `sft`/`train` with resume, `logps`, `eval`,
//! `generate`, and clean user errors (exit code 1, a message naming the problem, no panic).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::run::{ok, safedpo, text};
use safedpo::backend::cpu::CpuBackend;
use safedpo::data::{synthetic_pku_rows, write_pku_jsonl};
use safedpo::model::{Decoder, DecoderConfig, Family};

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
    let cfg = DecoderConfig::gpt2(258, 96, 16, 1, 2);
    let model = Decoder::random(Arc::new(CpuBackend::new()), cfg, seed).unwrap();
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

/// The JSON object a command prints on stdout.
fn json_out(args: &[&str]) -> serde_json::Value {
    let stdout = ok(args);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("safedpo {args:?}: stdout is not JSON ({e}):\n{stdout}"))
}

fn num(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} missing or not a number in {v}"))
}

/// Relative closeness with an absolute part (rewards and margins are differences).
fn close(a: f64, b: f64, rtol: f64) -> bool {
    (a - b).abs() <= rtol * (a.abs() + 1e-3)
}

const PAIR_MEANS: [&str; 7] = [
    "eval/loss",
    "eval/rewards/chosen",
    "eval/rewards/rejected",
    "eval/rewards/accuracies",
    "eval/rewards/margins",
    "eval/logps/chosen",
    "eval/logps/rejected",
];

/// `eval --split` and `logps --split` take the two sides of the run's holdout split (which together
/// are `--split all`), and `--data.eval_path` replaces the holdout: the eval side is then that file's
/// pairs, the train side all of `--data.path`, in `eval` and in `train`.
#[test]
fn splits_and_the_eval_path_select_the_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_file(dir.path(), 30);
    let other = dir.path().join("other.jsonl");
    write_pku_jsonl(&other, &synthetic_pku_rows(10, 12)).unwrap();
    let (policy, reference) = (tiny_model(dir.path(), 1), tiny_model(dir.path(), 2));
    let common = [
        "--model",
        p(&policy),
        "--model.reference",
        p(&reference),
        "--data.template",
        "U: {prompt} A:",
        "--data.max_len",
        "96",
        "--data.eval_fraction",
        "0.25",
        "--seed",
        "5",
        "--objective.name",
        "dpo",
    ];
    let eval = |extra: &[&str]| {
        let mut args = vec!["eval"];
        args.extend(common);
        args.extend(extra);
        json_out(&args)
    };
    let on_data = |split: &str| eval(&["--data.path", p(&data), "--split", split]);
    let (all, train, held_out) = (on_data("all"), on_data("train"), on_data("eval"));
    let (n, nt, ne) = (num(&all, "pairs"), num(&train, "pairs"), num(&held_out, "pairs"));
    assert!(nt > 0.0 && ne > 0.0 && nt + ne == n, "pairs: train {nt} + eval {ne} vs all {n}");
    // The two sides are disjoint and cover every pair: their means, weighted, are the whole's.
    for k in PAIR_MEANS {
        let weighted = (num(&train, k) * nt + num(&held_out, k) * ne) / n;
        assert!(close(weighted, num(&all, k), 1e-5), "{k}: train and eval give {weighted}, all {}", num(&all, k));
    }

    // `logps --split eval` writes the held-out pairs, whose log-probs `eval` averaged.
    let out = dir.path().join("eval-logps.jsonl");
    let mut args = vec!["logps", "--out", p(&out), "--data.path", p(&data), "--split", "eval"];
    args.extend(common);
    ok(&args);
    let lines: Vec<serde_json::Value> =
        fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len() as f64, ne);
    for (key, metric) in [("policy_chosen_logp", "eval/logps/chosen"), ("policy_rejected_logp", "eval/logps/rejected")]
    {
        let mean = lines.iter().map(|l| num(l, key)).sum::<f64>() / ne;
        assert!(close(mean, num(&held_out, metric), 1e-5), "{key}: mean {mean} vs eval's {}", num(&held_out, metric));
    }

    // A separate eval file: the eval side is its pairs (as `--split all` of that file gives them),
    // the train side every pair of --data.path.
    let with_path = |split: &str| eval(&["--data.path", p(&data), "--data.eval_path", p(&other), "--split", split]);
    let other_all = eval(&["--data.path", p(&other), "--split", "all"]);
    assert_eq!(with_path("eval"), other_all);
    assert_eq!(num(&with_path("train"), "pairs"), n);

    // `train` with --data.eval_path: trains on all of --data.path, evaluates on the other file.
    let run = dir.path().join("run");
    let mut args = vec!["train", "--out-dir", p(&run), "--data.path", p(&data), "--data.eval_path", p(&other)];
    args.extend(["--data.template", "U: {prompt} A:", "--data.max_len", "96", "--model.n_positions", "96"]);
    args.extend(["--model.n_layer", "1", "--model.n_embd", "16", "--model.n_head", "2"]);
    args.extend(["--optimizer.total_steps", "1", "--no-progress"]);
    let summary = json_out(&args);
    assert_eq!((num(&summary, "train_pairs"), num(&summary, "eval_pairs")), (n, num(&other_all, "pairs")));
}

/// `bench --json` on a tiny shape: every field present, and the derived ones consistent with the
/// measured step time, the shape (parameters, tokens, model FLOPs as the bench module documents
/// them) and `--peak-flops`; the only timed step is the first, where the policy is its reference and
/// DPO's loss is ln 2.
#[test]
fn bench_json_reports_a_consistent_step() {
    let (layers, c, heads, vocab, pairs, seq) = (1usize, 16usize, 2usize, 64usize, 2usize, 16usize);
    let shape = [layers.to_string(), c.to_string(), heads.to_string(), vocab.to_string(), seq.to_string()];
    let pairs_arg = pairs.to_string();
    let bench = |device: &str, steps: &str, extra: &[&str]| {
        let mut args = vec!["bench", "--device", device, "--steps", steps, "--warmup", "0", "--json"];
        args.extend(["--pairs", &pairs_arg, "--seq-len", &shape[4], "--model.n_positions", &shape[4]]);
        args.extend(["--model.n_layer", &shape[0], "--model.n_embd", &shape[1], "--model.n_head", &shape[2]]);
        args.extend(["--model.vocab_size", &shape[3]]);
        args.extend(extra);
        json_out(&args)
    };
    let peak = 1e9;
    let report = bench("cpu", "1", &["--peak-flops", "1e9"]);
    assert_eq!(report["engine"], "safedpo");
    assert!(report["device"].as_str().unwrap().starts_with("cpu"), "{}", report["device"]);
    let config = &report["config"];
    for (key, want) in [("n_layer", layers), ("n_embd", c), ("n_head", heads), ("vocab_size", vocab)] {
        assert_eq!(config[key].as_u64(), Some(want as u64), "config.{key}");
    }
    assert_eq!((config["pairs"].as_u64(), config["seq_len"].as_u64()), (Some(pairs as u64), Some(seq as u64)));
    assert_eq!((config["steps"].as_u64(), config["warmup_steps"].as_u64()), (Some(1), Some(0)));
    assert_eq!(config["objective"]["name"], "dpo");

    let params = vocab * c + seq * c + layers * (12 * c * c + 13 * c) + 2 * c;
    assert_eq!(num(&report, "num_params"), params as f64);
    let tokens = 2 * pairs * seq;
    assert_eq!(num(&report, "policy_tokens_per_step"), tokens as f64);
    // Model FLOPs: the matrix products (tied LM head included) at 2 per multiply-add, forward once for
    // the reference and the policy, backward twice the forward; causal attention's unmasked half.
    let matmul = 2 * tokens * (layers * 12 * c * c + vocab * c);
    let attention = layers * 2 * pairs * 2 * (2 * c * seq * (seq + 1) / 2);
    assert_eq!(num(&report, "flops_per_step"), (4 * matmul + 4 * attention) as f64);

    let step = &report["step_ms"];
    let median_s = num(step, "median") / 1e3;
    assert!(median_s > 0.0 && num(step, "min") <= num(step, "median") && num(step, "median") <= num(step, "max"));
    assert!(close(num(&report, "tokens_per_s"), tokens as f64 / median_s, 1e-9));
    assert!(close(num(&report, "flops_per_s"), num(&report, "flops_per_step") / median_s, 1e-9));
    assert!(close(num(&report, "mfu"), num(&report, "flops_per_s") / peak, 1e-9));
    let phases = &report["phases_ms"];
    let phase_sum: f64 =
        ["reference_forward", "policy_forward", "loss", "backward", "optimizer"].iter().map(|k| num(phases, k)).sum();
    assert!(phase_sum > 0.0 && phase_sum <= num(step, "median") * 1.001, "phases {phase_sum} ms, step {step}");
    assert!(num(&report, "peak_memory_bytes") > 0.0);
    assert_eq!(report["memory_source"], "VmHWM");
    assert!((num(&report, "final_loss") - std::f64::consts::LN_2).abs() < 1e-6, "{}", report["final_loss"]);

    // Three timed steps: the median and the best step give the two rates.
    let three = bench("cpu", "3", &[]);
    let step = &three["step_ms"];
    assert_eq!(three["config"]["steps"].as_u64(), Some(3));
    assert!(num(step, "min") <= num(step, "median") && num(step, "median") <= num(step, "max"), "{step}");
    assert!(close(num(&three, "tokens_per_s"), tokens as f64 * 1e3 / num(step, "median"), 1e-9));
    assert!(close(num(&three, "tokens_per_s_best"), tokens as f64 * 1e3 / num(step, "min"), 1e-9));
    assert!(three["mfu"].is_null() && num(&three, "final_loss").is_finite());

    // The same on the emulated device, which counts its own buffers; no peak given, no MFU.
    let emu = bench("emu", "1", &[]);
    assert!(emu["device"].as_str().unwrap().starts_with("emu"), "{}", emu["device"]);
    assert_eq!(emu["memory_source"], "device allocator");
    assert!(emu["mfu"].is_null());
    assert_eq!((num(&emu, "num_params"), num(&emu, "flops_per_step")), (params as f64, num(&report, "flops_per_step")));
    assert!((num(&emu, "final_loss") - std::f64::consts::LN_2).abs() < 1e-6, "{}", emu["final_loss"]);
}

/// `--device emu` runs `train`, `eval`, `logps` and `generate` through the CUDA kernels on the
/// emulated device, with what `--device cpu` gives; `generate` on a trained model wraps the prompt
/// in the template the model was trained with.
#[test]
fn device_emu_from_the_command_line_matches_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_file(dir.path(), 16);
    let common = [
        "--data.path",
        p(&data),
        "--data.template",
        "U: {prompt} A:",
        "--data.max_len",
        "64",
        "--objective.name",
        "dpo",
    ];
    let train_on = |device: &str| {
        let run = dir.path().join(format!("run-{device}"));
        let mut args = vec!["train", "--device", device, "--out-dir", p(&run), "--no-progress"];
        args.extend(common);
        args.extend(["--model.n_positions", "64", "--model.n_layer", "1", "--model.n_embd", "16"]);
        args.extend(["--model.n_head", "2", "--optimizer.total_steps", "2", "--optimizer.lr", "1e-3"]);
        let out = safedpo(&args);
        assert!(out.status.success(), "train --device {device}:\n{}", text(&out.stderr));
        assert!(text(&out.stderr).contains(&format!("on {device}")), "{}", text(&out.stderr));
        let summary: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
        (run.join("final"), summary)
    };
    let (cpu_model, cpu_run) = train_on("cpu");
    let (emu_model, emu_run) = train_on("emu");
    for k in ["eval/loss", "eval/rewards/margins", "eval/logps/chosen"] {
        let (x, y) = (num(&cpu_run["eval"], k), num(&emu_run["eval"], k));
        assert!(close(x, y, 1e-4), "train: {k}: cpu {x} vs emu {y}");
    }
    let load = |dir: &Path| Decoder::load(Arc::new(CpuBackend::new()), dir).unwrap().to_host().unwrap();
    let (wa, wb) = (load(&cpu_model), load(&emu_model));
    for (name, (_, x)) in &wa.tensors {
        let max = x.iter().zip(&wb.tensors[name].1).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(max < 1e-4, "{name}: max |cpu − emu| = {max}");
    }

    // eval and logps of the same trained model on both devices (the reference: its init).
    fn args_of<'a>(cmd: &'a str, device: &'a str, model: &'a str, rest: &[&[&'a str]]) -> Vec<&'a str> {
        let mut args = vec![cmd, "--device", device, "--model", model];
        rest.iter().for_each(|r| args.extend(*r));
        args
    }
    let model = p(&cpu_model);
    let on = |cmd: &'static str, device: &'static str, extra: &[&'static str]| {
        args_of(cmd, device, model, &[&common, extra])
    };
    let (x, y) = (json_out(&on("eval", "cpu", &[])), json_out(&on("eval", "emu", &[])));
    assert_eq!(x["pairs"], y["pairs"]);
    for k in PAIR_MEANS {
        assert!(close(num(&x, k), num(&y, k), 1e-4), "eval {k}: cpu {} vs emu {}", x[k], y[k]);
    }
    let logps = |device: &'static str| {
        let out = dir.path().join(format!("logps-{device}.jsonl"));
        let mut args = on("logps", device, &[]);
        args.extend(["--out", p(&out)]);
        ok(&args);
        let text = fs::read_to_string(&out).unwrap();
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).collect::<Vec<_>>()
    };
    let (lx, ly) = (logps("cpu"), logps("emu"));
    assert_eq!(lx.len(), ly.len());
    for (a, b) in lx.iter().zip(&ly) {
        assert_eq!(a["chosen_ids"], b["chosen_ids"]);
        for k in ["policy_chosen_logp", "policy_rejected_logp", "reference_chosen_logp", "reference_rejected_logp"] {
            assert!(close(num(a, k), num(b, k), 1e-5), "logps {k}: cpu {} vs emu {}", a[k], b[k]);
        }
    }

    // generate: greedy on both devices; without --data.template the trained model's own template.
    let generate = |device: &str, extra: &[&str]| {
        let mut args = vec!["generate", "--device", device, "--model", p(&cpu_model), "--prompt", "How do I"];
        args.extend(["--max-new-tokens", "12"]);
        args.extend(extra);
        ok(&args)
    };
    let greedy = generate("cpu", &[]);
    assert_eq!(greedy, generate("emu", &[]));
    assert_eq!(greedy, generate("cpu", &["--data.template", "U: {prompt} A:"]));
}

/// `--data.template chat` with a Qwen2-style tokenizer (tests/fixtures/tokenizers/qwen2): `sft` renders
/// the model's chat template, the trained model keeps the tokenizer's files, `logps` shows the ChatML
/// sequences, `generate` starts from the chat prompt (the trained model's template by default), and a
/// model without a chat template is a clean error naming its files.
#[test]
fn chat_template_runs_through_sft_logps_and_generate() {
    use safedpo::data::load_tokenizer;
    let dir = tempfile::tempdir().unwrap();
    let data = data_file(dir.path(), 24);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers/qwen2");
    let tok = load_tokenizer(Some(&fixture)).unwrap();
    // A tiny Qwen2 (q/k/v biases, two query heads on one key/value head) with the Qwen2 tokenizer.
    let cfg = DecoderConfig {
        family: Family::Qwen2,
        qkv_bias: true,
        ..DecoderConfig::llama(tok.vocab_size(), 256, 16, 1, 2, 1, 24)
    };
    let init = dir.path().join("qwen-tiny");
    Decoder::random(Arc::new(CpuBackend::new()), cfg, 5).unwrap().save(&init).unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        fs::copy(fixture.join(file), init.join(file)).unwrap();
    }
    let common = ["--data.path", p(&data), "--data.template", "chat", "--data.max_len", "256"];
    let sft_dir = dir.path().join("sft");
    let mut args = vec!["sft", "--out-dir", p(&sft_dir), "--model.init", p(&init), "--no-progress"];
    args.extend(["--optimizer.total_steps", "2", "--batching.tokens_per_micro_batch", "1024"]);
    args.extend(common);
    ok(&args);
    let trained = sft_dir.join("final");
    for file in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(trained.join(file).is_file(), "{file} not copied");
    }

    let out = dir.path().join("logps.jsonl");
    let mut args = vec!["logps", "--model", p(&trained), "--split", "all", "--out", p(&out)];
    args.extend(common);
    ok(&args);
    let header = tok.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n");
    let end_of_turn = tok.encode("<|im_end|>\n");
    let lines = fs::read_to_string(&out).unwrap();
    assert!(!lines.is_empty());
    for line in lines.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let ids: Vec<i32> = serde_json::from_value(row["chosen_ids"].clone()).unwrap();
        assert!(ids.starts_with(&header) && ids.ends_with(&end_of_turn), "{}", tok.decode(&ids));
    }

    let generate = |model: &Path, extra: &[&str]| {
        let mut args = vec!["generate", "--model", p(model), "--prompt", "How do I", "--max-new-tokens", "6"];
        args.extend(extra);
        ok(&args)
    };
    assert_eq!(generate(&trained, &[]), generate(&trained, &["--data.template", "chat"]));
    generate(&init, &["--data.template", "chat"]);
    let bytes_model = tiny_model(dir.path(), 4);
    let err = user_error(&["generate", "--model", p(&bytes_model), "--prompt", "x", "--data.template", "chat"]);
    assert!(err.contains("no chat template") && err.contains("tokenizer_config.json"), "{err}");
}
