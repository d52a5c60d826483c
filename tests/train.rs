//! The training loop on the CPU backend with tiny models and the synthetic data: exact resume,
//! crash-safe checkpoints, the reference cache, configuration errors, and that SafeDPO learns.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::run::{synthetic_data, tiny_run};
use safedpo::backend::cpu::CpuBackend;
use safedpo::config::{RunConfig, RunOverrides};
use safedpo::data::{synthetic_pku_rows, tokenize_pairs, ByteTokenizer, Template};
use safedpo::model::Decoder;
use safedpo::train::checkpoint::{read_latest, LATEST_FILE};
use safedpo::train::refcache::{cache_key, load_or_compute, sequence_logp_parts, sequence_logps, CacheStatus};
use safedpo::train::{train, Resume, Task, TrainOptions};

fn backend() -> Arc<CpuBackend> {
    Arc::new(CpuBackend::new())
}

/// A run small enough for a test: one layer, d=16, a few steps, two micro-batches per step.
fn tiny_config(out: &Path, data: &Path) -> RunConfig {
    let mut c = tiny_run(out, data, 128);
    c.batching.tokens_per_micro_batch = 1024;
    c.batching.grad_accum = 2;
    c.optimizer.warmup_steps = 2;
    c.optimizer.total_steps = Some(6);
    c.optimizer.weight_decay = 0.01;
    c.intervals.eval_every = 2;
    c
}

fn quiet() -> TrainOptions {
    TrainOptions { quiet: true, ..Default::default() }
}

/// Every file of a directory (recursively), by relative path.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// The metrics of a run without the wall-clock ones.
fn metrics_without_timing(run: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let mut recs = safedpo::plot::read_metrics(&run.join("metrics.jsonl")).unwrap();
    for r in &mut recs {
        r.remove("tokens_per_second");
    }
    recs
}

/// N steps straight vs N/2, an interruption, and a resume: bit-identical weights, optimizer
/// state, training state and metrics.
fn check_resume_is_exact(task: Task, precompute_ref: bool) {
    check_resume_is_exact_with(task, precompute_ref, None);
}

/// [`check_resume_is_exact`] with `objective` in place of the default one.
fn check_resume_is_exact_with(task: Task, precompute_ref: bool, objective: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path(), 80, 3);
    let mut straight = tiny_config(&dir.path().join("straight"), &data);
    straight.precompute_ref = precompute_ref;
    if let Some(text) = objective {
        straight.objective = text.parse().unwrap();
    }
    let mut resumed = straight.clone();
    resumed.out_dir = dir.path().join("resumed");

    let a = train(backend(), &straight, task, &quiet()).unwrap();
    assert!(a.completed && a.steps_this_run == 6);

    let first = train(backend(), &resumed, task, &TrainOptions { stop_after_step: Some(3), ..quiet() }).unwrap();
    assert!(!first.completed);
    assert_eq!(first.steps_this_run, 3);
    let latest = read_latest(&resumed.out_dir).unwrap().unwrap();
    assert!(latest.ends_with("checkpoint-3"), "{}", latest.display());
    let second = train(backend(), &resumed, task, &TrainOptions { resume: Some(Resume::Auto), ..quiet() }).unwrap();
    assert!(second.completed);
    assert_eq!(second.steps_this_run, 3);

    for file in ["model.safetensors", "optimizer.safetensors", "state.json", "config.json"] {
        let x = fs::read(straight.out_dir.join("final").join(file)).unwrap();
        let y = fs::read(resumed.out_dir.join("final").join(file)).unwrap();
        assert!(x == y, "{task:?}: final/{file} differs between the straight and the resumed run");
    }
    assert_eq!(metrics_without_timing(&straight.out_dir), metrics_without_timing(&resumed.out_dir));
    // Training moved the weights.
    let init = Decoder::random(backend(), straight.model.random_shape(258), straight.seed).unwrap().to_host().unwrap();
    let trained = Decoder::load(backend(), &straight.out_dir.join("final")).unwrap().to_host().unwrap();
    assert_ne!(init.tensors["h.0.attn.c_attn.weight"], trained.tensors["h.0.attn.c_attn.weight"]);
}

#[test]
fn resume_is_bit_identical_preference_with_reference_model() {
    check_resume_is_exact(Task::Preference, false);
}

#[test]
fn resume_is_bit_identical_preference_with_cached_reference() {
    check_resume_is_exact(Task::Preference, true);
}

#[test]
fn resume_is_bit_identical_sft() {
    check_resume_is_exact(Task::Sft, false);
}

/// MPO with `bco_pair`'s running reward mean: the mean is trainer state, saved with the checkpoint
/// and restored on resume (a resumed run that started the mean again would train differently).
#[test]
fn resume_is_bit_identical_with_bco_pairs_running_mean() {
    check_resume_is_exact_with(Task::Preference, true, Some("0.8*dpo+0.2*bco_pair+sft:bco_running_mean=true"));
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path(), 80, 3);
    let mut cfg = tiny_config(&dir.path().join("run"), &data);
    cfg.objective = "bco_pair:bco_running_mean=true".parse().unwrap();
    train(backend(), &cfg, Task::Preference, &TrainOptions { stop_after_step: Some(2), ..quiet() }).unwrap();
    let state = safedpo::train::checkpoint::TrainState::read(&cfg.out_dir.join("checkpoint-2")).unwrap();
    // Two steps of two micro-batches: four updates of the mean, each one sample.
    assert_eq!(state.loss.bco_reward_mean.count, 4.0);
    assert!(state.loss.bco_reward_mean.mean != 0.0 && state.loss.bco_reward_mean.mean.is_finite(), "{state:?}");
}

#[test]
fn failed_checkpoint_write_leaves_the_previous_one_intact() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path(), 60, 4);
    let mut cfg = tiny_config(&dir.path().join("run"), &data);
    cfg.optimizer.total_steps = Some(4);
    cfg.intervals.checkpoint_every = 2;
    let out = cfg.out_dir.clone();

    // Steps 1–2 and checkpoint-2, then an interruption.
    train(backend(), &cfg, Task::Preference, &TrainOptions { stop_after_step: Some(2), ..quiet() }).unwrap();
    assert_eq!(fs::read_to_string(out.join(LATEST_FILE)).unwrap().trim(), "checkpoint-2");
    let before = snapshot(&out.join("checkpoint-2"));

    // Resume; every write of the next checkpoint (the final one, at step 4) fails at some file.
    for file in ["model.safetensors", "optimizer.safetensors", "metrics.jsonl", "state.json"] {
        let opts = TrainOptions { resume: Some(Resume::Auto), fail_checkpoint_file: Some(file.to_string()), ..quiet() };
        let err = train(backend(), &cfg, Task::Preference, &opts).unwrap_err();
        assert!(format!("{err:#}").contains("previous checkpoint is intact"), "{err:#}");
        assert_eq!(fs::read_to_string(out.join(LATEST_FILE)).unwrap().trim(), "checkpoint-2", "after failing {file}");
        assert_eq!(snapshot(&out.join("checkpoint-2")), before, "checkpoint-2 changed after failing {file}");
        assert!(!out.join("final").exists(), "a final directory appeared after failing {file}");
        let leftovers: Vec<_> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
    }

    // The intact checkpoint still resumes to the same weights as an uninterrupted run.
    let done =
        train(backend(), &cfg, Task::Preference, &TrainOptions { resume: Some(Resume::Auto), ..quiet() }).unwrap();
    assert!(done.completed);
    let mut straight = cfg.clone();
    straight.out_dir = dir.path().join("straight");
    train(backend(), &straight, Task::Preference, &quiet()).unwrap();
    assert!(
        fs::read(out.join("final/model.safetensors")).unwrap()
            == fs::read(straight.out_dir.join("final/model.safetensors")).unwrap()
    );
}

#[test]
fn reference_cache_hit_miss_and_stale() {
    let dir = tempfile::tempdir().unwrap();
    let rows = synthetic_pku_rows(30, 5);
    let pairs: Vec<_> = rows.iter().map(|r| r.better_pair()).collect();
    let template = Template::new("U: {prompt} A:").unwrap();
    let (tokenized, _) = tokenize_pairs(&pairs, &ByteTokenizer, &template, 128).unwrap();
    let (train_set, eval_set) = tokenized.split_at(20);
    let cfg = safedpo::model::DecoderConfig::gpt2(258, 128, 16, 1, 2);
    let mut model = Decoder::random(backend(), cfg.clone(), 1).unwrap();
    let sets = [("train", train_set), ("eval", eval_set)];
    let shapes = [("train", train_set.len()), ("eval", eval_set.len())];
    let path = dir.path().join("ref.safetensors");
    let key = cache_key(&model.to_host().unwrap(), &sets, &template.0);

    let direct = |m: &mut Decoder<CpuBackend>| {
        vec![sequence_logp_parts(m, train_set, 700).unwrap(), sequence_logp_parts(m, eval_set, 700).unwrap()]
    };
    let expected = direct(&mut model);
    assert!(expected[0].totals.iter().all(|x| x.is_finite() && *x < 0.0));
    assert_eq!(expected[0].totals, sequence_logps(&mut model, train_set, 700).unwrap());
    assert_eq!(expected[0].split.len(), 2 * expected[0].totals.len());

    let (values, status) = load_or_compute(&path, &key, &shapes, || Ok(direct(&mut model))).unwrap();
    assert_eq!(status, CacheStatus::Miss);
    assert_eq!(values, expected);
    assert!(path.is_file());

    let (values, status) = load_or_compute(&path, &key, &shapes, || panic!("a cache hit must not recompute")).unwrap();
    assert_eq!(status, CacheStatus::Hit);
    assert_eq!(values, expected);

    // Other weights: the key changes, the file is stale and recomputed.
    let mut other = Decoder::random(backend(), cfg, 2).unwrap();
    let other_key = cache_key(&other.to_host().unwrap(), &sets, &template.0);
    assert_ne!(other_key, key);
    let other_expected = direct(&mut other);
    assert_ne!(other_expected, expected);
    let (values, status) = load_or_compute(&path, &other_key, &shapes, || Ok(direct(&mut other))).unwrap();
    assert_eq!(status, CacheStatus::Stale);
    assert_eq!(values, other_expected);

    // Other data or another template also change the key.
    let fewer = [("train", &train_set[1..]), ("eval", eval_set)];
    assert_ne!(cache_key(&other.to_host().unwrap(), &fewer, &template.0), other_key);
    assert_ne!(cache_key(&other.to_host().unwrap(), &sets, "Q: {prompt} A:"), other_key);

    // A corrupt file is replaced, not trusted.
    fs::write(&path, b"not a safetensors file").unwrap();
    let (values, status) = load_or_compute(&path, &other_key, &shapes, || Ok(direct(&mut other))).unwrap();
    assert_eq!(status, CacheStatus::Stale);
    assert_eq!(values, other_expected);
}

#[test]
fn training_reuses_the_reference_cache_and_notices_a_new_reference() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path(), 40, 6);
    let mut cfg = tiny_config(&dir.path().join("run"), &data);
    cfg.optimizer.total_steps = Some(1);
    cfg.optimizer.warmup_steps = 0;
    let first = train(backend(), &cfg, Task::Preference, &quiet()).unwrap();
    assert_eq!(first.reference_cache, Some(CacheStatus::Miss));
    // The same out_dir again: the finished run there is started over (the cache is kept).
    let overwrite = TrainOptions { overwrite: true, ..quiet() };
    let again = train(backend(), &cfg, Task::Preference, &overwrite).unwrap();
    assert_eq!(again.reference_cache, Some(CacheStatus::Hit));
    // Another seed: another random reference.
    cfg.seed += 1;
    let other = train(backend(), &cfg, Task::Preference, &overwrite).unwrap();
    assert_eq!(other.reference_cache, Some(CacheStatus::Stale));
}

fn resolve_err(toml_text: &str, overrides: RunOverrides) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    fs::write(&path, toml_text).unwrap();
    let overrides = RunOverrides { config: Some(path), ..overrides };
    format!("{:#}", RunConfig::resolve(&overrides).unwrap_err())
}

#[test]
fn config_errors_name_the_field_and_where_it_was_set() {
    let e = resolve_err("seed = 1\n\n[optimizer]\nlr = -0.5\n", RunOverrides::default());
    assert!(e.contains("optimizer.lr") && e.contains("run.toml:4"), "{e}");

    let e = resolve_err("[optimizer]\nlearning_rate = 0.1\n", RunOverrides::default());
    assert!(e.contains("learning_rate") && e.contains("run.toml:2"), "{e}");

    let e = resolve_err("[data]\nmax_len = \"long\"\n", RunOverrides::default());
    assert!(e.contains("max_len") && e.contains("run.toml:2"), "{e}");

    let e = resolve_err("[objective]\nname = \"dpo\"\ndelta = 3.0\n", RunOverrides::default());
    assert!(e.contains("objective.delta") && e.contains("dpo") && e.contains("run.toml:3"), "{e}");

    let e = resolve_err("[optimizer]\ntotal_steps = 10\nepochs = 2.0\n", RunOverrides::default());
    assert!(e.contains("optimizer.total_steps") && e.contains("epochs"), "{e}");

    // A flag overrides the file, and the error says so.
    let e = resolve_err("[optimizer]\nlr = 0.1\n", RunOverrides::default().set("optimizer.lr", "nan"));
    assert!(e.contains("optimizer.lr") && e.contains("--optimizer.lr"), "{e}");

    let e = resolve_err("[model]\nn_embd = 30\nn_head = 4\n", RunOverrides::default());
    assert!(e.contains("model.n_embd") && e.contains("run.toml:2"), "{e}");

    // Valid files resolve, and flags win.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.toml");
    fs::write(&path, "seed = 3\n[optimizer]\nlr = 0.1\ntotal_steps = 5\n").unwrap();
    let overrides = RunOverrides { config: Some(path), ..RunOverrides::default().set("optimizer.lr", "0.2") };
    let cfg = RunConfig::resolve(&overrides).unwrap();
    assert_eq!((cfg.seed, cfg.optimizer.lr, cfg.optimizer.total_steps), (3, 0.2, Some(5)));
}

#[test]
fn short_safedpo_run_improves_held_out_safe_preferred_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path(), 300, 8);
    let mut cfg = tiny_config(&dir.path().join("run"), &data);
    (cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head) = (1, 32, 2);
    cfg.data.eval_fraction = 0.2;
    cfg.batching.grad_accum = 1;
    cfg.batching.tokens_per_micro_batch = 4096;
    cfg.optimizer.lr = 3e-3;
    cfg.optimizer.total_steps = Some(12);
    cfg.intervals.eval_every = 0;
    let s = train(backend(), &cfg, Task::Preference, &quiet()).unwrap();
    let get =
        |r: &Option<serde_json::Map<String, serde_json::Value>>, k: &str| r.as_ref().unwrap()[k].as_f64().unwrap();
    let before = get(&s.first_eval, "eval/safe_preferred_accuracy");
    let after = get(&s.last_eval, "eval/safe_preferred_accuracy");
    // Policy = reference before training: every implicit reward is 0, a tie, counted as chance.
    assert_eq!(before, 0.5);
    assert!(after >= 0.9, "safe-preferred accuracy {before} -> {after}");
    assert!(get(&s.last_eval, "eval/rewards/margins") > 0.0);
    assert!(get(&s.last_eval, "eval/loss") < get(&s.first_eval, "eval/loss"));
}

#[test]
fn epochs_cover_the_training_pairs_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path(), 50, 9);
    for epochs in [1.0, 2.0] {
        let mut cfg = tiny_config(&dir.path().join(format!("run-{epochs}")), &data);
        cfg.batching.grad_accum = 1;
        cfg.batching.tokens_per_micro_batch = 900;
        cfg.optimizer.total_steps = None;
        cfg.optimizer.epochs = Some(epochs);
        cfg.optimizer.warmup_steps = 0;
        cfg.intervals.eval_every = 0;
        let s = train(backend(), &cfg, Task::Preference, &quiet()).unwrap();
        let state = safedpo::train::checkpoint::TrainState::read(&cfg.out_dir.join("final")).unwrap();
        assert_eq!((state.batcher.epoch, state.batcher.position), (epochs as usize, 0), "{epochs} epochs");
        assert_eq!(state.step, s.total_steps);
        assert!(s.total_steps as f64 >= epochs * s.train_pairs as f64 / 10.0, "{} steps", s.total_steps);
        let last = safedpo::plot::read_metrics(&cfg.out_dir.join("metrics.jsonl")).unwrap();
        let epoch = last.iter().rev().find_map(|r| r.get("epoch").and_then(|v| v.as_f64())).unwrap();
        assert_eq!(epoch, epochs);
    }
}

#[test]
fn trainer_on_the_emulated_cuda_backend_matches_the_cpu() {
    use safedpo::backend::cuda::{CudaBackend, Device, Precision};
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path(), 40, 10);
    let mut cpu_cfg = tiny_config(&dir.path().join("cpu"), &data);
    cpu_cfg.optimizer.total_steps = Some(3);
    cpu_cfg.optimizer.warmup_steps = 0;
    cpu_cfg.precompute_ref = false;
    cpu_cfg.intervals.eval_every = 0;
    let mut emu_cfg = cpu_cfg.clone();
    emu_cfg.out_dir = dir.path().join("emu");
    let emu = Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::F32));
    let a = train(backend(), &cpu_cfg, Task::Preference, &quiet()).unwrap();
    let b = train(emu, &emu_cfg, Task::Preference, &quiet()).unwrap();
    let wa = Decoder::load(backend(), &cpu_cfg.out_dir.join("final")).unwrap().to_host().unwrap();
    let wb = Decoder::load(backend(), &emu_cfg.out_dir.join("final")).unwrap().to_host().unwrap();
    for (name, (_, x)) in &wa.tensors {
        let y = &wb.tensors[name].1;
        let max = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
        // Three AdamW steps at lr 2e-3 move weights by ~6e-3; the backends agree far closer.
        assert!(max < 2e-4, "{name}: max |cpu − emu| = {max}");
    }
    let eval = |s: &safedpo::train::RunSummary, k: &str| s.last_eval.as_ref().unwrap()[k].as_f64().unwrap();
    for k in ["eval/loss", "eval/rewards/margins", "eval/logps/chosen"] {
        let (x, y) = (eval(&a, k), eval(&b, k));
        assert!((x - y).abs() <= 1e-3 * (1.0 + x.abs()), "{k}: cpu {x} vs emu {y}");
    }
}

/// The trainer's reference is a frozen model; it must give what a trainable model with the same
/// weights gives. The step-0 evaluation (whose reference log-probs the frozen model computes) equals
/// one computed here with trainable twins, with the reference run every step and with the cache;
/// and the cache is keyed by the exact weights, as a trainable model's `to_host` gives them.
#[test]
fn the_frozen_reference_gives_what_a_trainable_model_gives() {
    use safedpo::train::metrics::Record;
    use safedpo::train::{evaluate_pairs, prepare_data, run_tokenizer};
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path(), 50, 12);
    let mut cfg = tiny_config(&dir.path().join("run"), &data);
    (cfg.model.n_layer, cfg.model.n_embd) = (3, 16);
    cfg.optimizer.total_steps = Some(2);
    cfg.optimizer.warmup_steps = 0;
    let tok = run_tokenizer(&cfg).unwrap();
    // A reference other than the policy's init, so that the evaluation depends on it.
    let ref_dir = dir.path().join("reference");
    Decoder::random(backend(), cfg.model.random_shape(tok.vocab_size()), 99).unwrap().save(&ref_dir).unwrap();
    cfg.model.reference = Some(ref_dir.clone());

    let prepared = prepare_data(&cfg, tok.as_ref(), Task::Preference).unwrap();
    let budget = cfg.batching.tokens_per_micro_batch;
    let mut reference = Decoder::load(backend(), &ref_dir).unwrap();
    let mut policy = Decoder::random(backend(), cfg.model.random_shape(tok.vocab_size()), cfg.seed).unwrap();
    assert!(!reference.is_frozen() && !policy.is_frozen());
    let reference_logps = sequence_logps(&mut reference, &prepared.eval, budget).unwrap();
    let stats = evaluate_pairs(&mut policy, &reference_logps, &prepared.eval, &cfg.objective, budget).unwrap();
    let mut expected = Record::new();
    stats.write_means("eval/", &mut expected);
    assert!(expected["eval/loss"].as_f64().unwrap() != std::f64::consts::LN_2, "the reference must matter");

    for precompute_ref in [false, true] {
        let mut run = cfg.clone();
        run.precompute_ref = precompute_ref;
        run.out_dir = dir.path().join(format!("run-{precompute_ref}"));
        let s = train(backend(), &run, Task::Preference, &quiet()).unwrap();
        let first = s.first_eval.unwrap();
        for (key, value) in &expected {
            assert_eq!(&first[key], value, "precompute_ref = {precompute_ref}: {key}");
        }
        if precompute_ref {
            let key = cache_key(
                &reference.to_host().unwrap(),
                &[("train", &prepared.train), ("eval", &prepared.eval)],
                &cfg.data.template,
            );
            let shapes = [("train", prepared.train.len()), ("eval", prepared.eval.len())];
            let path = run.out_dir.join("reference_logps.safetensors");
            let (values, status) =
                load_or_compute(&path, &key, &shapes, || panic!("the trainer's cache must match this key")).unwrap();
            assert_eq!(status, CacheStatus::Hit);
            assert_eq!(values[1].totals, reference_logps);
        }
    }
}

/// The reference cache is an optimisation only: the same run with the reference log-probs cached
/// (`precompute_ref = true`, computed once over fixed chunks of pairs) and with the frozen reference
/// run on every micro-batch gives bit-identical weights, optimizer state and metrics. (Each sequence's
/// log-prob does not depend on what it is packed with, so the two orders of computation agree to the
/// bit.) A cache lookup that reads the wrong pair's values, or a pair's chosen and rejected swapped,
/// changes the training trajectory.
#[test]
fn cached_and_live_reference_train_identically() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path(), 60, 13);
    let mut live = tiny_config(&dir.path().join("live"), &data);
    live.optimizer.total_steps = Some(4);
    live.intervals.eval_every = 2;
    // A reference other than the policy's init, so that the reference log-probs matter from step 1.
    let tok = safedpo::train::run_tokenizer(&live).unwrap();
    let ref_dir = dir.path().join("reference");
    Decoder::random(backend(), live.model.random_shape(tok.vocab_size()), 31).unwrap().save(&ref_dir).unwrap();
    live.model.reference = Some(ref_dir);
    live.precompute_ref = false;
    let mut cached = live.clone();
    cached.precompute_ref = true;
    cached.out_dir = dir.path().join("cached");

    let a = train(backend(), &live, Task::Preference, &quiet()).unwrap();
    let b = train(backend(), &cached, Task::Preference, &quiet()).unwrap();
    assert_eq!((a.reference_cache, b.reference_cache), (None, Some(CacheStatus::Miss)));
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let x = fs::read(live.out_dir.join("final").join(file)).unwrap();
        let y = fs::read(cached.out_dir.join("final").join(file)).unwrap();
        assert!(x == y, "final/{file} differs between the live and the cached reference");
    }
    let (ma, mb) = (metrics_without_timing(&live.out_dir), metrics_without_timing(&cached.out_dir));
    assert_eq!(ma.len(), mb.len());
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(x, y, "a metrics record differs between the live and the cached reference");
    }
    // The training records carry the reference: the implicit rewards are not the policy's log-probs.
    assert!(ma.iter().any(|r| r.contains_key("rewards/margins") && r["rewards/margins"].as_f64() != Some(0.0)));
}

/// The loss and metric records of a run, each value finite and each metric within its range.
fn check_records_are_sane(name: &str, run: &Path) {
    let records = safedpo::plot::read_metrics(&run.join("metrics.jsonl")).unwrap();
    assert!(records.iter().any(|r| r.contains_key("loss")) && records.iter().any(|r| r.contains_key("eval/loss")));
    for r in &records {
        for (key, value) in r {
            let x = value.as_f64().unwrap_or_else(|| panic!("{name}: {key} = {value} is not a number"));
            assert!(x.is_finite(), "{name}: {key} = {x}");
            if key.ends_with("accuracies") || key.ends_with("accuracy") {
                assert!((0.0..=1.0).contains(&x), "{name}: {key} = {x}");
            }
        }
        for prefix in ["", "eval/"] {
            let get = |k: &str| r.get(&format!("{prefix}{k}")).and_then(|v| v.as_f64());
            if let (Some(c), Some(rj), Some(m)) =
                (get("rewards/chosen"), get("rewards/rejected"), get("rewards/margins"))
            {
                assert!((c - rj - m).abs() <= 1e-6 * (1.0 + m.abs()), "{name}: margin {m} ≠ {c} − {rj}");
            }
            if let Some(lp) = get("logps/chosen") {
                assert!(lp < 0.0, "{name}: {prefix}logps/chosen = {lp}");
            }
        }
    }
}

/// Every objective of `Objective::ALL` (so one added later is covered) through the trainer, on the
/// CPU and on the emulated device (f32): a few full-batch steps (every step sees all the pairs, and
/// the evaluation runs on those same pairs) lower the loss, every record is finite and in range, and
/// both backends end with the same weights and metrics.
#[test]
fn every_objective_trains_on_the_cpu_and_on_the_emulated_device() {
    use safedpo::backend::cuda::{CudaBackend, Device, Precision};
    use safedpo::loss::{batch_loss, Objective, PairInput};
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path(), 5, 14);
    let emu = Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::F32));
    let mut base = tiny_config(dir.path(), &data);
    base.data.eval_path = Some(data.clone());
    (base.data.max_len, base.model.n_positions) = (32, 32);
    (base.batching.grad_accum, base.batching.tokens_per_micro_batch) = (1, 4096);
    (base.optimizer.total_steps, base.optimizer.warmup_steps, base.optimizer.weight_decay) = (Some(3), 0, 0.0);
    base.intervals.eval_every = 0;

    // Before the first step the policy is its reference (both the random init): the log-probs that
    // every objective's step-0 evaluation starts from.
    let tok = safedpo::train::run_tokenizer(&base).unwrap();
    let pairs = safedpo::train::prepare_data(&base, tok.as_ref(), Task::Preference).unwrap().eval;
    let mut init = Decoder::random(backend(), base.model.random_shape(tok.vocab_size()), base.seed).unwrap();
    let logps = sequence_logps(&mut init, &pairs, 4096).unwrap();
    let inputs: Vec<PairInput> = pairs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (chosen, rejected) = (logps[2 * i] as f64, logps[2 * i + 1] as f64);
            PairInput {
                policy_chosen: chosen,
                policy_rejected: rejected,
                ref_chosen: chosen,
                ref_rejected: rejected,
                chosen_unsafe: p.chosen_unsafe,
                rejected_unsafe: p.rejected_unsafe,
                chosen_len: p.chosen.len() as u32,
                rejected_len: p.rejected.len() as u32,
            }
        })
        .collect();

    for spec in Objective::ALL.iter() {
        let name = spec.name;
        let mut cpu_cfg = base.clone();
        cpu_cfg.out_dir = dir.path().join(format!("{name}-cpu"));
        cpu_cfg.objective = spec.defaults();
        let mut emu_cfg = cpu_cfg.clone();
        emu_cfg.out_dir = dir.path().join(format!("{name}-emu"));

        let a = train(backend(), &cpu_cfg, Task::Preference, &quiet()).unwrap();
        let b = train(emu.clone(), &emu_cfg, Task::Preference, &quiet()).unwrap();
        assert!(a.completed && b.completed && a.train_pairs == a.eval_pairs, "{name}");
        for run in [&cpu_cfg.out_dir, &emu_cfg.out_dir] {
            check_records_are_sane(name, run);
        }
        let eval = |s: &safedpo::train::RunSummary, first: bool, k: &str| {
            let rec = if first { &s.first_eval } else { &s.last_eval };
            rec.as_ref().unwrap()[k].as_f64().unwrap()
        };
        // The trainer ran this objective: its step-0 loss is the objective's, from its specification
        // (of the batch: the eval pairs are one micro-batch, and `sft`'s token mean runs over it).
        let batch = batch_loss(&cpu_cfg.objective, &inputs);
        let want = batch.iter().map(|o| o.loss).sum::<f64>() / inputs.len() as f64;
        for (backend, summary) in [("cpu", &a), ("emu", &b)] {
            let got = eval(summary, true, "eval/loss");
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{name} ({backend}): step-0 loss {got}, want {want}"
            );
        }
        let (before, after) = (eval(&a, true, "eval/loss"), eval(&a, false, "eval/loss"));
        assert!(after < before, "{name}: the loss on the training pairs went from {before} to {after}");

        // Every record, training and evaluation: the backends agree to ~6e-5 of each value (the
        // rewards are differences of log-probs, hence the absolute part).
        let (ra, rb) = (metrics_without_timing(&cpu_cfg.out_dir), metrics_without_timing(&emu_cfg.out_dir));
        assert_eq!(ra.len(), rb.len(), "{name}");
        for (x, y) in ra.iter().zip(&rb) {
            for (k, v) in x {
                let (p, q) = (v.as_f64().unwrap(), y[k].as_f64().unwrap());
                assert!(
                    (p - q).abs() <= 5e-4 * (p.abs() + 1e-3),
                    "{name}: {k} at step {}: cpu {p} vs emu {q}",
                    x["step"]
                );
            }
        }
        let wa = Decoder::load(backend(), &cpu_cfg.out_dir.join("final")).unwrap().to_host().unwrap();
        let wb = Decoder::load(backend(), &emu_cfg.out_dir.join("final")).unwrap().to_host().unwrap();
        for (tensor, (_, x)) in &wa.tensors {
            let y = &wb.tensors[tensor].1;
            let max = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
            // Three AdamW steps at lr 2e-3 move weights by up to 6e-3; the backends agree far closer.
            assert!(max < 2e-4, "{name}: {tensor}: max |cpu − emu| = {max}");
        }
    }
}

/// LD-DPO's log-probs as its loss reads them (logged, and the running mean's input) are each
/// response's `shared + α·tail`: at α = 0.5 and 0.25 against the plain total (α = 1), the tail
/// `total − read(α)` is `(1 − α)·tail`, nonzero only for the longer response of a pair.
#[test]
fn ld_dpo_reads_the_shared_part_plus_alpha_times_the_tail() {
    use safedpo::{DecoderConfig, DeviceKind, Engine, PreferencePair};
    let mut engine = Engine::new(DeviceKind::Cpu).unwrap();
    engine.random_policy(DecoderConfig::gpt2(258, 64, 32, 2, 2), 5).unwrap();
    engine.reference_from_policy().unwrap();
    // Chosen longer in one pair, rejected in the other.
    let pairs =
        [PreferencePair::new("2+2?", "Four, of course.", "5"), PreferencePair::new("Sky?", "Blue", "A green one")];
    let mut read = |objective: &str| {
        let logps = engine.loss(&pairs, &objective.parse().unwrap()).unwrap().logps.policy;
        [logps.chosen, logps.rejected].concat()
    };
    let (total, half, quarter) = (read("dpo"), read("dpo:ld_alpha=0.5"), read("dpo:ld_alpha=0.25"));
    let mut tails = 0;
    for i in 0..total.len() {
        let (t, h, q) = (f64::from(total[i]), f64::from(half[i]), f64::from(quarter[i]));
        let tail = 2.0 * (t - h);
        assert!((t - q - 0.75 * tail).abs() < 1e-3 * (1.0 + tail.abs()), "sequence {i}: {t} {h} {q}");
        tails += usize::from(tail.abs() > 1.0);
    }
    assert_eq!(tails, 2, "the longer response of each pair has a tail: {total:?} {half:?}");
}
