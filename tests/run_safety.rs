//! Nothing in a run directory is lost by mistake: a checkpoint commit killed at any step leaves
//! `latest` naming a checkpoint that loads; a diverged run stops before writing anything of the bad
//! step; the out_dir is locked while a run writes it, and a run already there is continued or
//! started over only when asked; weights that are not finite do not load unless asked.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use safedpo::backend::cpu::CpuBackend;
use safedpo::config::RunConfig;
use safedpo::data::{synthetic_pku_rows, write_pku_jsonl};
use safedpo::model::checkpoint::{load_dir, load_dir_with, save_dir, LoadOptions};
use safedpo::model::{Decoder, DecoderConfig};
use safedpo::train::checkpoint::{read_latest, CommitStep, TrainState, LATEST_FILE};
use safedpo::train::rundir::{LockOwner, RunLock, LOCK_FILE};
use safedpo::train::{train, Resume, Task, TrainOptions};

fn backend() -> Arc<CpuBackend> {
    Arc::new(CpuBackend::new())
}

fn synthetic_data(dir: &Path) -> PathBuf {
    let path = dir.join("data.jsonl");
    write_pku_jsonl(&path, &synthetic_pku_rows(60, 4)).unwrap();
    path
}

/// Four steps of a one-layer model, a checkpoint every two.
fn tiny_config(out: &Path, data: &Path) -> RunConfig {
    let mut c = RunConfig { out_dir: out.to_path_buf(), seed: 7, ..Default::default() };
    c.data.path = Some(data.to_path_buf());
    c.data.template = "U: {prompt} A:".into();
    (c.data.max_len, c.data.eval_fraction) = (128, 0.2);
    c.model.n_positions = 128;
    (c.model.n_layer, c.model.n_embd, c.model.n_head) = (1, 16, 2);
    c.batching.tokens_per_micro_batch = 1024;
    c.optimizer.lr = 2e-3;
    c.optimizer.total_steps = Some(4);
    c.intervals.eval_every = 2;
    c.intervals.checkpoint_every = 2;
    c
}

fn quiet() -> TrainOptions {
    TrainOptions { quiet: true, ..Default::default() }
}

fn resume() -> TrainOptions {
    TrainOptions { resume: Some(Resume::Auto), ..quiet() }
}

fn err_of(cfg: &RunConfig, opts: &TrainOptions) -> String {
    format!("{:#}", train(backend(), cfg, Task::Preference, opts).unwrap_err())
}

/// The checkpoint `latest` names: it exists, its state reads, its weights load.
fn latest_loads(out: &Path, case: &str) -> (PathBuf, TrainState) {
    let dir =
        read_latest(out).unwrap_or_else(|e| panic!("{case}: {e:#}")).unwrap_or_else(|| panic!("{case}: no latest"));
    let state = TrainState::read(&dir).unwrap_or_else(|e| panic!("{case}: {e:#}"));
    Decoder::load(backend(), &dir).unwrap_or_else(|e| panic!("{case}: {} does not load: {e:#}", dir.display()));
    (dir, state)
}

fn file(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A run's final commit killed after each of its steps, writing `final` for the first time and
/// replacing it (a resume from an earlier checkpoint of a finished run): `latest` always names a
/// checkpoint that loads, and resuming finishes with the weights of an uninterrupted run.
#[test]
fn a_checkpoint_commit_killed_at_any_step_leaves_latest_loadable() {
    use CommitStep::*;
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path());
    let straight = tiny_config(&dir.path().join("straight"), &data);
    train(backend(), &straight, Task::Preference, &quiet()).unwrap();
    let want = file(&straight.out_dir.join("final/model.safetensors"));

    for (replacing, stops) in [
        (false, &[Staged, InPlace, LatestMoved][..]),
        (true, &[Staged, LatestOnNew, OldRemoved, InPlace, LatestMoved][..]),
    ] {
        for &stop in stops {
            let case = format!("replacing {replacing}, killed after {stop:?}");
            let mut cfg = straight.clone();
            cfg.out_dir = dir.path().join(format!("run-{replacing}-{stop:?}"));
            let opts = match replacing {
                false => {
                    train(backend(), &cfg, Task::Preference, &TrainOptions { stop_after_step: Some(2), ..quiet() })
                        .unwrap();
                    resume()
                }
                true => {
                    train(backend(), &cfg, Task::Preference, &quiet()).unwrap();
                    TrainOptions { resume: Some(Resume::Dir(cfg.out_dir.join("checkpoint-2"))), ..quiet() }
                }
            };
            let err = err_of(&cfg, &TrainOptions { fail_commit_after: Some(stop), ..opts });
            assert!(err.contains("injected failure"), "{case}: {err}");
            let (_, state) = latest_loads(&cfg.out_dir, &case);
            assert!(state.step == 2 || state.step == 4, "{case}: latest at step {}", state.step);
            assert!(!cfg.out_dir.join(LOCK_FILE).exists(), "{case}: the lock outlived the run");

            let done = train(backend(), &cfg, Task::Preference, &resume()).unwrap();
            assert!(done.completed, "{case}");
            let (latest, _) = latest_loads(&cfg.out_dir, &case);
            assert_eq!(latest, cfg.out_dir.join("final"), "{case}");
            assert!(file(&latest.join("model.safetensors")) == want, "{case}: final differs from the straight run");
            let hidden: Vec<_> = fs::read_dir(&cfg.out_dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect();
            assert!(hidden.is_empty(), "{case}: left behind {hidden:?}");
        }
    }
}

/// Every checkpoint directory in `out` loads (its weights are finite).
fn every_checkpoint_loads(out: &Path) {
    for entry in fs::read_dir(out).unwrap() {
        let path = entry.unwrap().path();
        if path.join("model.safetensors").is_file() {
            Decoder::load(backend(), &path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        }
    }
}

/// lr 3e38: the first update makes parameters infinite; the run stops there, naming the step and
/// the value, with no checkpoint written and the lock released.
#[test]
fn a_diverged_update_stops_the_run_before_any_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path());
    let mut cfg = tiny_config(&dir.path().join("run"), &data);
    cfg.optimizer.lr = 3e38;
    cfg.intervals.checkpoint_every = 1;
    let err = err_of(&cfg, &quiet());
    assert!(err.contains("step 1: after the update, parameter `") && err.contains("inf"), "{err}");
    assert!(err.contains("training diverged") && err.contains("no checkpoint was written"), "{err}");
    assert_eq!(read_latest(&cfg.out_dir).unwrap(), None);
    every_checkpoint_loads(&cfg.out_dir);
    assert!(!cfg.out_dir.join(LOCK_FILE).exists());
}

/// A loss above `train.max_loss` (not part of the trajectory, so a resume may set it) stops the
/// run at that step: no record and no checkpoint of it, `latest` still at the last good one.
#[test]
fn a_loss_above_max_loss_stops_the_run_and_latest_stays_on_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path());
    let mut cfg = tiny_config(&dir.path().join("run"), &data);
    train(backend(), &cfg, Task::Preference, &TrainOptions { stop_after_step: Some(2), ..quiet() }).unwrap();
    let metrics_path = cfg.out_dir.join("metrics.jsonl");
    let records = || safedpo::plot::read_metrics(&metrics_path).unwrap();
    let metrics = records();
    cfg.train.max_loss = 1e-3;
    let err = err_of(&cfg, &resume());
    assert!(err.contains("step 3: the loss is") && err.contains("above train.max_loss = 1e-3"), "{err}");
    assert!(err.contains("checkpoint-2"), "{err}");
    assert_eq!(read_latest(&cfg.out_dir).unwrap().unwrap(), cfg.out_dir.join("checkpoint-2"));
    assert!(!cfg.out_dir.join("final").exists() && !cfg.out_dir.join("checkpoint-3").exists());
    assert_eq!(records(), metrics, "a record of the stopped step was written");

    // By default, a finite blow-up (IPO at β = 1e-4 starts at (1/2β)² = 2.5e7) stops too.
    let mut ipo = tiny_config(&dir.path().join("ipo"), &data);
    ipo.objective = "ipo:beta=0.0001".parse().unwrap();
    let err = err_of(&ipo, &quiet());
    assert!(err.contains("step 1: the loss is 2.") && err.contains("e7, above train.max_loss = 1e6"), "{err}");
    ipo.train.max_loss = f64::INFINITY;
    assert!(train(backend(), &ipo, Task::Preference, &TrainOptions { overwrite: true, ..quiet() }).is_ok());
}

/// A finished run is refused without --resume or --overwrite (its metrics untouched), an
/// unfinished one too; --resume continues it; --overwrite starts over, deleting its checkpoints.
#[test]
fn a_run_in_out_dir_is_continued_or_replaced_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path());
    let cfg = tiny_config(&dir.path().join("run"), &data);
    train(backend(), &cfg, Task::Preference, &TrainOptions { stop_after_step: Some(2), ..quiet() }).unwrap();
    let out = &cfg.out_dir;
    let metrics = file(&out.join("metrics.jsonl"));
    let err = err_of(&cfg, &quiet());
    assert!(
        err.contains("holds an unfinished run") && err.contains("--resume") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(file(&out.join("metrics.jsonl")), metrics);

    train(backend(), &cfg, Task::Preference, &resume()).unwrap();
    let finished = file(&out.join("metrics.jsonl"));
    let err = err_of(&cfg, &quiet());
    assert!(err.contains("holds a finished run (4/4 steps") && err.contains("--overwrite"), "{err}");
    assert_eq!(file(&out.join("metrics.jsonl")), finished, "a refused run touched the metrics");
    // Another configuration is refused the same way.
    let mut other = cfg.clone();
    other.seed = 8;
    assert!(err_of(&other, &quiet()).contains("holds a finished run"));

    // --overwrite: the previous run's checkpoints go (the new run writes none but final).
    let mut fresh = other.clone();
    fresh.intervals.checkpoint_every = 0;
    let overwrite = TrainOptions { overwrite: true, ..quiet() };
    train(backend(), &fresh, Task::Preference, &overwrite).unwrap();
    assert!(!out.join("checkpoint-2").exists(), "--overwrite kept the previous run's checkpoint");
    let (_, state) = latest_loads(out, "overwritten");
    assert_eq!(state.config_hash, fresh.trajectory_hash());
    let mut elsewhere = fresh.clone();
    elsewhere.out_dir = dir.path().join("elsewhere");
    train(backend(), &elsewhere, Task::Preference, &quiet()).unwrap();
    let records = |run: &Path| safedpo::plot::read_metrics(&run.join("metrics.jsonl")).unwrap().len();
    assert_eq!(records(out), records(&elsewhere.out_dir), "records of the previous run survived --overwrite");
    assert!(file(&out.join("final/model.safetensors")) == file(&elsewhere.out_dir.join("final/model.safetensors")));

    // --overwrite never deletes what the run reads.
    let mut from_own = fresh.clone();
    from_own.model.init = Some(out.join("final"));
    let err = err_of(&from_own, &overwrite);
    assert!(err.contains("--overwrite would delete") && err.contains("final"), "{err}");
    assert!(out.join("final/model.safetensors").is_file());
    let both = TrainOptions { overwrite: true, ..resume() };
    assert!(err_of(&fresh, &both).contains("exclude each other"));
}

/// While a run holds the lock another is refused, naming its pid; a lock whose process has ended
/// is taken over; a run releases its lock, on success and on error.
#[test]
fn the_out_dir_is_locked_while_a_run_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path());
    let cfg = tiny_config(&dir.path().join("run"), &data);
    fs::create_dir_all(&cfg.out_dir).unwrap();
    let held = RunLock::acquire(&cfg.out_dir, &|_| {}).unwrap();
    let err = err_of(&cfg, &quiet());
    assert!(err.contains(&format!("in use by another run (pid {}", std::process::id())), "{err}");
    assert!(!cfg.out_dir.join("metrics.jsonl").exists());
    drop(held);
    assert!(!cfg.out_dir.join(LOCK_FILE).exists());

    // A killed run's lock: a pid that has exited, on this host.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = LockOwner { pid: dead, ..LockOwner::this_process() };
    fs::write(cfg.out_dir.join(LOCK_FILE), serde_json::to_string(&stale).unwrap()).unwrap();
    let warnings = std::sync::Mutex::new(Vec::new());
    RunLock::acquire(&cfg.out_dir, &|w| warnings.lock().unwrap().push(w.to_string())).unwrap();
    let warnings = warnings.into_inner().unwrap();
    assert!(warnings.len() == 1 && warnings[0].contains(&format!("pid {dead}")), "{warnings:?}");
    assert!(!cfg.out_dir.join(LOCK_FILE).exists(), "a dropped lock stays");

    fs::write(cfg.out_dir.join(LOCK_FILE), serde_json::to_string(&stale).unwrap()).unwrap();
    train(backend(), &cfg, Task::Preference, &quiet()).unwrap();
    assert!(!cfg.out_dir.join(LOCK_FILE).exists());
}

/// A tiny GPT-2 directory whose tensor `name` holds `value` at `index`.
fn poisoned_model(dir: &Path, name: &str, index: usize, value: f32) -> PathBuf {
    let cfg = DecoderConfig::gpt2(258, 96, 16, 1, 2);
    let mut weights = Decoder::random(backend(), cfg, 1).unwrap().to_host().unwrap();
    weights.tensors.get_mut(name).unwrap().1[index] = value;
    let path = dir.join(format!("model-{}", name.replace('.', "-")));
    save_dir(&weights, &path).unwrap();
    path
}

#[test]
fn weights_that_are_not_finite_do_not_load_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let model = poisoned_model(dir.path(), "h.0.mlp.c_fc.weight", 7, f32::NAN);
    let err = format!("{:#}", load_dir(&model).unwrap_err());
    assert!(err.contains("model.safetensors") && err.contains("tensor `transformer.h.0.mlp.c_fc.weight`"), "{err}");
    assert!(err.contains("holds NaN at index 7 (1 of its") && err.contains("--allow-nonfinite"), "{err}");
    let weights = load_dir_with(&model, LoadOptions { allow_nonfinite: true }).unwrap();
    assert!(weights.tensors["h.0.mlp.c_fc.weight"].1[7].is_nan());
    assert!(
        format!("{:#}", weights.ensure_finite().unwrap_err()).contains("`h.0.mlp.c_fc.weight` holds NaN at index 7")
    );

    // The trainer refuses it as its initial model.
    let data = synthetic_data(dir.path());
    let mut cfg = tiny_config(&dir.path().join("run"), &data);
    (cfg.data.max_len, cfg.model.n_positions) = (48, 96);
    cfg.model.init = Some(model);
    let err = err_of(&cfg, &quiet());
    assert!(err.contains("holds NaN at index 7"), "{err}");
}

fn safedpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safedpo")).args(args).output().expect("running the safedpo binary")
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The command line: `eval` of a model with NaN weights fails, names the tensor, and with
/// --allow-nonfinite still fails rather than printing null metrics, unless the bad weights are
/// unused (a position beyond the data); `train` into a finished run exits 1; `--resume` alone is
/// `--resume auto`; a diverged run exits 1.
#[test]
fn the_command_line_refuses_what_would_lose_or_hide_something() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path());
    let p = |path: &Path| path.to_str().unwrap().to_string();
    let data_flags = ["--data.path", &p(&data), "--data.template", "U: {prompt} A:", "--data.max_len", "48"];
    let poisoned = poisoned_model(dir.path(), "ln_f.weight", 3, f32::INFINITY);
    let eval = |model: &Path, extra: &[&str]| {
        let mut args = vec!["eval", "--model", model.to_str().unwrap()];
        args.extend(data_flags);
        args.extend(extra);
        safedpo(&args)
    };
    let out = eval(&poisoned, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("`transformer.ln_f.weight` holds inf at index 3"), "{}", stderr_of(&out));
    let out = eval(&poisoned, &["--allow-nonfinite"]);
    assert_eq!(out.status.code(), Some(1), "stdout: {}", String::from_utf8_lossy(&out.stdout));
    let err = stderr_of(&out);
    assert!(err.contains("eval/loss is") && err.contains("not finite"), "{err}");
    assert!(out.stdout.is_empty());
    // The last position embedding (95) is beyond every sequence of at most 48 tokens.
    let unused = poisoned_model(dir.path(), "wpe.weight", 95 * 16, f32::NAN);
    assert_eq!(eval(&unused, &[]).status.code(), Some(1));
    let out = eval(&unused, &["--allow-nonfinite"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let metrics: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(metrics["eval/loss"].as_f64().unwrap().is_finite(), "{metrics}");

    let run = dir.path().join("run");
    let mut train_args = vec!["train", "--out-dir", run.to_str().unwrap(), "--no-progress", "--device", "cpu"];
    train_args.extend(data_flags);
    train_args.extend(["--model.n_positions", "48", "--model.n_layer", "1", "--model.n_embd", "16"]);
    train_args.extend(["--model.n_head", "2", "--optimizer.total_steps", "2"]);
    assert!(safedpo(&train_args).status.success());
    let out = safedpo(&train_args);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("holds a finished run"), "{}", stderr_of(&out));
    let mut again = train_args.clone();
    again.push("--resume");
    let out = safedpo(&again);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["steps_this_run"], 0);
    again.push("--overwrite");
    assert_eq!(safedpo(&again).status.code(), Some(1), "--resume with --overwrite");
    let mut overwrite = train_args.clone();
    overwrite.extend(["--overwrite", "--optimizer.lr", "3e38"]);
    let out = safedpo(&overwrite);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("step 1: after the update"), "{}", stderr_of(&out));
    assert!(!run.join(LATEST_FILE).exists() && !run.join("final").exists());
}

/// A step whose loss is NaN stops before the update, saying so (its gradient norm would only say
/// that the gradient is NaN).
#[test]
fn a_nan_loss_stops_the_step_before_the_update() {
    use safedpo::{DeviceKind, Engine, PreferencePair};
    let mut engine = Engine::new(DeviceKind::Cpu).unwrap();
    let config = DecoderConfig::gpt2(258, 64, 16, 1, 2);
    engine.random_policy(config.clone(), 1).unwrap();
    engine.reference_from_policy().unwrap();
    let mut weights = engine.policy_weights().unwrap();
    weights.tensors.get_mut("ln_f.weight").unwrap().1[0] = f32::NAN;
    engine.set_policy_weights(&weights).unwrap();
    let pairs = [PreferencePair::new("Hi.", "Hello.", "Go away.")];
    let err = format!("{:#}", engine.train_step(&pairs).unwrap_err());
    assert!(err.contains("step 1: the loss is NaN; training diverged"), "{err}");
}
