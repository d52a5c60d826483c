//! TR-DPO's reference sync (`sync_ref_model`): the synced reference is exactly the mix of the
//! policy into the previous reference (CPU), the trainer evaluates with it, an interrupted run
//! resumes bit for bit (the reference is in the checkpoint), the reference cache is refused, and the
//! settings are reachable from TOML and flags.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use safedpo::backend::cpu::CpuBackend;
use safedpo::config::RunConfig;
use safedpo::data::{synthetic_pku_rows, write_pku_jsonl};
use safedpo::model::checkpoint::load_dir;
use safedpo::model::{Decoder, HostWeights};
use safedpo::train::checkpoint::read_latest;
use safedpo::train::{mix_weights, train, Resume, RunSummary, Task, TrainOptions, REFERENCE_DIR};

fn backend() -> Arc<CpuBackend> {
    Arc::new(CpuBackend::new())
}

fn quiet() -> TrainOptions {
    TrainOptions { quiet: true, ..Default::default() }
}

fn synthetic_data(dir: &Path, n: usize, seed: u64) -> PathBuf {
    let path = dir.join("data.jsonl");
    write_pku_jsonl(&path, &synthetic_pku_rows(n, seed)).unwrap();
    path
}

/// A tiny DPO run with the reference synced every `every` steps at `alpha`.
fn tiny_config(out: &Path, data: &Path, alpha: f64, every: usize) -> RunConfig {
    let mut c = RunConfig { out_dir: out.to_path_buf(), seed: 11, precompute_ref: false, ..Default::default() };
    (c.sync_ref_model, c.ref_model_mixup_alpha, c.ref_model_sync_steps) = (true, alpha, every);
    c.objective = "dpo".parse().unwrap();
    c.data.path = Some(data.to_path_buf());
    c.data.template = "U: {prompt} A:".into();
    (c.data.max_len, c.model.n_positions, c.data.eval_fraction) = (96, 96, 0.2);
    (c.model.n_layer, c.model.n_embd, c.model.n_head) = (1, 16, 2);
    (c.batching.tokens_per_micro_batch, c.batching.grad_accum) = (1024, 2);
    (c.optimizer.lr, c.optimizer.warmup_steps, c.optimizer.total_steps) = (2e-3, 0, Some(6));
    (c.intervals.eval_every, c.intervals.checkpoint_every) = (1, 1);
    c
}

fn bits(w: &HostWeights) -> Vec<(String, Vec<u32>)> {
    w.tensors.iter().map(|(k, (_, v))| (k.clone(), v.iter().map(|x| x.to_bits()).collect())).collect()
}

/// The mix, written out here: `r · (1 − α) + α · p` in f32, `1 − α` and `α` rounded to f32.
fn mixed_by_hand(reference: &HostWeights, policy: &HostWeights, alpha: f64) -> HostWeights {
    let mut out = reference.clone();
    for (name, (_, values)) in out.tensors.iter_mut() {
        for (r, p) in values.iter_mut().zip(&policy.tensors[name].1) {
            let keep = *r * (1.0 - alpha) as f32;
            *r = keep + alpha as f32 * p;
        }
    }
    out
}

#[test]
fn the_synced_reference_is_the_mix_of_the_policy_into_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path(), 40, 3);
    let cfg = tiny_config(&dir.path().join("run"), &data, 0.6, 2);
    train(backend(), &cfg, Task::Preference, &quiet()).unwrap();
    let checkpoint = |step: usize| cfg.out_dir.join(format!("checkpoint-{step}"));
    let reference_at = |dir: &Path| load_dir(&dir.join(REFERENCE_DIR)).unwrap();
    let policy_at = |dir: &Path| load_dir(dir).unwrap();

    // Before the first sync the reference is the initial policy (the random init).
    let mut expected = Decoder::random(backend(), cfg.model.random_shape(258), cfg.seed).unwrap().to_host().unwrap();
    assert_eq!(bits(&reference_at(&checkpoint(1))), bits(&expected));
    for step in 2..=6 {
        let dir = if step == 6 { cfg.out_dir.join("final") } else { checkpoint(step) };
        if step % 2 == 0 {
            expected = mixed_by_hand(&expected, &policy_at(&dir), 0.6);
            let mut library = reference_at(&checkpoint(step - 1));
            mix_weights(&mut library, &policy_at(&dir), 0.6).unwrap();
            assert_eq!(bits(&library), bits(&expected), "step {step}: mix_weights");
        }
        assert_eq!(bits(&reference_at(&dir)), bits(&expected), "step {step}: the checkpoint's reference");
    }
    assert_ne!(bits(&expected), bits(&policy_at(&cfg.out_dir.join("final"))));
}

fn eval_value(rec: &serde_json::Map<String, serde_json::Value>, key: &str) -> f64 {
    rec[key].as_f64().unwrap_or_else(|| panic!("no {key} in {rec:?}"))
}

/// α = 1, τ = 1: after every step the reference is the policy, and the evaluation (after the sync)
/// sees every implicit reward at exactly 0: DPO's loss is log 2, KTO's ½ with a KL estimate of 0.
#[test]
fn the_trainer_evaluates_with_the_synced_reference() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path(), 30, 5);
    for (objective, want_loss) in [("dpo", std::f64::consts::LN_2), ("kto", 0.5)] {
        let mut cfg = tiny_config(&dir.path().join(objective), &data, 1.0, 1);
        cfg.objective = objective.parse().unwrap();
        (cfg.intervals.checkpoint_every, cfg.optimizer.total_steps) = (0, Some(3));
        if objective == "kto" {
            cfg.batching.tokens_per_micro_batch = 4 * cfg.data.max_len;
        }
        let summary = train(backend(), &cfg, Task::Preference, &quiet()).unwrap();
        let records = safedpo::plot::read_metrics(&cfg.out_dir.join("metrics.jsonl")).unwrap();
        let evals: Vec<_> = records.iter().filter(|r| r.contains_key("eval/loss")).collect();
        assert_eq!(evals.len(), 4, "{objective}: step 0 and three steps");
        for rec in &evals {
            assert_eq!(eval_value(rec, "eval/rewards/margins"), 0.0, "{objective}: {rec:?}");
            assert!((eval_value(rec, "eval/loss") - want_loss).abs() < 1e-6, "{objective}: {rec:?}");
        }
        // Each step's forward also sees the policy equal to its reference (synced after the step
        // before), but the gradient is not 0 there: the policy moves on, and its reference with it.
        let grad_norms: Vec<f64> =
            records.iter().filter(|r| r.contains_key("loss")).map(|r| eval_value(r, "grad_norm")).collect();
        assert!(grad_norms.len() == 3 && grad_norms.iter().all(|g| *g > 0.0), "{objective}: {grad_norms:?}");
        let init = Decoder::random(backend(), cfg.model.random_shape(258), cfg.seed).unwrap().to_host().unwrap();
        assert_ne!(bits(&init), bits(&load_dir(&cfg.out_dir.join("final")).unwrap()), "{objective}");
        let final_policy = load_dir(&cfg.out_dir.join("final")).unwrap();
        assert_eq!(bits(&load_dir(&cfg.out_dir.join("final").join(REFERENCE_DIR)).unwrap()), bits(&final_policy));
        assert!(summary.completed);
    }
}

#[test]
fn an_interrupted_run_resumes_bit_for_bit_with_its_synced_reference() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path(), 40, 7);
    let mut straight = tiny_config(&dir.path().join("straight"), &data, 0.6, 2);
    straight.intervals.checkpoint_every = 0;
    let mut resumed = straight.clone();
    resumed.out_dir = dir.path().join("resumed");
    let a: RunSummary = train(backend(), &straight, Task::Preference, &quiet()).unwrap();
    assert!(a.completed);
    // Stopped after step 3: one sync (step 2) behind it, the next (step 4) ahead.
    train(backend(), &resumed, Task::Preference, &TrainOptions { stop_after_step: Some(3), ..quiet() }).unwrap();
    assert!(read_latest(&resumed.out_dir).unwrap().unwrap().ends_with("checkpoint-3"));
    let b = train(backend(), &resumed, Task::Preference, &TrainOptions { resume: Some(Resume::Auto), ..quiet() });
    assert_eq!(b.unwrap().steps_this_run, 3);
    for file in ["model.safetensors", "optimizer.safetensors", "state.json", "reference/model.safetensors"] {
        let (x, y) = (straight.out_dir.join("final").join(file), resumed.out_dir.join("final").join(file));
        assert!(fs::read(x).unwrap() == fs::read(y).unwrap(), "final/{file} differs");
    }
    let strip = |run: &Path| {
        let mut records = safedpo::plot::read_metrics(&run.join("metrics.jsonl")).unwrap();
        records.iter_mut().for_each(|r| drop(r.remove("tokens_per_second")));
        records
    };
    assert_eq!(strip(&straight.out_dir), strip(&resumed.out_dir));

    // Another α is another trajectory: the checkpoint refuses it.
    let mut other = resumed.clone();
    other.ref_model_mixup_alpha = 0.5;
    other.optimizer.total_steps = Some(8);
    let err = train(backend(), &other, Task::Preference, &TrainOptions { resume: Some(Resume::Auto), ..quiet() });
    assert!(format!("{:#}", err.unwrap_err()).contains("configuration differs"));
}

#[test]
fn the_settings_are_checked_and_leave_other_runs_unchanged() {
    let data = PathBuf::from("data.jsonl");
    let base = tiny_config(Path::new("out"), &data, 0.6, 2);
    let errors =
        |cfg: &RunConfig| cfg.validate().into_iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>();
    assert!(errors(&base).is_empty(), "{:?}", errors(&base));
    let cached = RunConfig { precompute_ref: true, ..base.clone() };
    assert!(errors(&cached).iter().any(|e| e.starts_with("sync_ref_model") && e.contains("precompute_ref")));
    let alpha = RunConfig { ref_model_mixup_alpha: 1.5, ..base.clone() };
    assert!(errors(&alpha).iter().any(|e| e.starts_with("ref_model_mixup_alpha")));
    let every = RunConfig { ref_model_sync_steps: 0, ..base.clone() };
    assert!(errors(&every).iter().any(|e| e.starts_with("ref_model_sync_steps")));
    let mut free = base.clone();
    free.objective = "simpo".parse().unwrap();
    assert!(errors(&free).iter().any(|e| e.starts_with("sync_ref_model") && e.contains("simpo")));

    // Off, the settings change neither the written configuration nor the trajectory hash.
    let off = RunConfig { sync_ref_model: false, ..base.clone() };
    let plain = RunConfig { ref_model_mixup_alpha: 0.6, ref_model_sync_steps: 512, ..off.clone() };
    assert_eq!(off.trajectory_hash(), plain.trajectory_hash());
    assert!(!plain.to_toml().unwrap().contains("ref_model"));
    assert_ne!(base.trajectory_hash(), off.trajectory_hash());
}

#[test]
fn tr_dpo_runs_from_the_command_line_with_toml_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path(), 24, 2);
    let toml = dir.path().join("trdpo.toml");
    let text = format!(
        "precompute_ref = false\nsync_ref_model = true\nref_model_sync_steps = 2\n\n\
         [data]\npath = {:?}\ntemplate = \"U: {{prompt}} A:\"\nmax_len = 96\n\n\
         [model]\nn_layer = 1\nn_embd = 16\nn_head = 2\nn_positions = 96\n\n\
         [objective]\nname = \"dpo\"\n\n[batching]\ntokens_per_micro_batch = 800\n\n\
         [optimizer]\ntotal_steps = 4\nlr = 1e-3\n",
        data.to_str().unwrap()
    );
    fs::write(&toml, text).unwrap();
    let out_dir = dir.path().join("run");
    let run = |extra: &[&str]| {
        let mut args = vec!["train", "--config", toml.to_str().unwrap(), "--out-dir", out_dir.to_str().unwrap()];
        args.extend(["--no-progress", "--device", "cpu"]);
        args.extend(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_safedpo")).args(&args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, stderr) = run(&["--ref-model-mixup-alpha", "0.8"]);
    assert!(ok, "{stderr}");
    let resolved = RunConfig::from_toml_file(&out_dir.join("config.toml")).unwrap();
    assert!(resolved.sync_ref_model);
    assert_eq!((resolved.ref_model_mixup_alpha, resolved.ref_model_sync_steps), (0.8, 2));
    assert!(out_dir.join("final").join(REFERENCE_DIR).join("model.safetensors").is_file());

    let (ok, stderr) = run(&["--precompute-ref", "true"]);
    assert!(!ok && stderr.contains("sync_ref_model") && stderr.contains("precompute_ref"), "{stderr}");
}
