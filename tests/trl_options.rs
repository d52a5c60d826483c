//! TRL's `DPOConfig` / transformers' `TrainingArguments` options where the engine has them: the
//! learning-rate schedules against transformers' own values (tests/fixtures/trl_lr_schedules.json,
//! scripts/make-trl-option-fixtures.py), `warmup_ratio`, `pairs_per_micro_batch`, the truncation and
//! data settings as configuration, and the README's table of every `DPOConfig` option. The
//! conversational rows and TRL's truncation are held to TRL in tests/data/conversation.rs.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use safedpo::backend::cpu::CpuBackend;
use safedpo::config::cli::KEYS;
use safedpo::config::{RunConfig, RunOverrides};
use safedpo::data::{
    synthetic_pku_rows, write_pku_jsonl, BatchLimit, Batcher, ByteTokenizer, TokenizedPair, TruncationMode,
};
use safedpo::optim::{LrSchedule, LrSchedulerType, Scheduler};
use safedpo::train::{prepare_data, train, Task, TrainOptions};

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// f32 values `a` and `b` are at most `ulps` representable values apart.
fn within_ulps(a: f32, b: f32, ulps: u32) -> bool {
    let key = |x: f32| {
        let bits = x.to_bits() as i64;
        if bits < 0x8000_0000 {
            bits
        } else {
            0x8000_0000 - bits
        }
    };
    (key(a) - key(b)).unsigned_abs() <= u64::from(ulps)
}

fn resolve(flags: &[(&str, &str)]) -> anyhow::Result<RunConfig> {
    let overrides = flags.iter().fold(RunOverrides::default(), |o, (k, v)| o.set(k, v));
    RunConfig::resolve(&overrides)
}

fn resolve_err(flags: &[(&str, &str)]) -> String {
    format!("{:#}", resolve(flags).unwrap_err())
}

// ---------------------------------------------------------------------------------------------
// learning-rate schedules

/// Every case of the fixture: transformers' multiplier of each update to a few f64 ulps (the same
/// operations; `cos` is the platform's), and the rate of each update as transformers' rate rounded to
/// f32 (ours is computed from the f32 peak as transformers' is: exactly, but for the default, whose
/// own arithmetic is kept, to one f32 ulp). The warmup of a ratio is transformers' `ceil`.
#[test]
fn lr_schedules_match_transformers() {
    let cases = fixture("trl_lr_schedules.json")["cases"].as_array().unwrap().clone();
    assert!(cases.len() >= 60);
    let mut seen = std::collections::BTreeSet::new();
    for case in &cases {
        let kind: LrSchedulerType = case["type"].as_str().unwrap().parse().unwrap();
        seen.insert(kind.name());
        let total = case["total_steps"].as_u64().unwrap() as usize;
        let mut op = RunConfig::default().optimizer;
        match &case["warmup"] {
            Value::Number(n) if n.is_u64() => op.warmup_steps = n.as_u64().unwrap() as usize,
            ratio => op.warmup_ratio = Some(ratio.as_f64().unwrap()),
        }
        let warmup = op.warmup_for(total);
        assert_eq!(warmup as u64, case["warmup_steps"].as_u64().unwrap(), "{case}");
        let peak = case["peak_lr"].as_f64().unwrap() as f32;
        let min_lr_rate = case["min_lr_rate"].as_f64().map_or(0.1, |r| r as f32);
        let schedule =
            LrSchedule { peak_lr: peak, warmup_steps: warmup, total_steps: total, min_lr_ratio: min_lr_rate };
        let scheduler = Scheduler { kind, schedule };
        let (lrs, multipliers) = (floats(&case["lr"]), floats(&case["multiplier"]));
        assert_eq!((lrs.len(), multipliers.len()), (total, total));
        for k in 0..total {
            let ours = kind.multiplier(k, warmup, total, f64::from(min_lr_rate));
            let want = multipliers[k];
            assert!((ours - want).abs() <= 4.0 * f64::EPSILON * want.abs(), "{kind} λ({k}): {ours} vs {want}: {case}");
            let (lr, want) = (scheduler.lr(k + 1), lrs[k] as f32);
            let ulps = if kind == LrSchedulerType::default() { 1 } else { 0 };
            assert!(within_ulps(lr, want, ulps), "{kind}: update {} at {lr}, transformers {want}: {case}", k + 1);
        }
    }
    assert_eq!(seen.len(), LrSchedulerType::ALL.len(), "{seen:?}");
}

/// The default is the schedule runs have always had (`LrSchedule::lr`, bit for bit), and
/// transformers' `cosine_with_min_lr` is the same curve one update later.
#[test]
fn the_default_schedule_is_ours_and_cosine_with_min_lr_is_one_update_later() {
    let schedule = LrSchedule { peak_lr: 3e-4, warmup_steps: 7, total_steps: 50, min_lr_ratio: 0.1 };
    let default = Scheduler { kind: LrSchedulerType::default(), schedule };
    let hf = Scheduler { kind: LrSchedulerType::CosineWithMinLr, schedule };
    assert_eq!(RunConfig::default().optimizer.lr_scheduler_type, LrSchedulerType::CosineWarmupWithMinLr);
    for k in 1..=50 {
        assert_eq!(default.lr(k).to_bits(), schedule.lr(k).to_bits(), "update {k}");
        assert!(within_ulps(hf.lr(k + 1), default.lr(k), 1), "update {k}: {} vs {}", hf.lr(k + 1), default.lr(k));
    }
    // transformers' warmup starts at 0 (the first update), ours at peak / warmup.
    assert_eq!(hf.lr(1), 0.0);
    assert_eq!(default.lr(1), 3e-4 / 7.0);
    // constant ignores the warmup, as transformers' does.
    let constant = Scheduler { kind: LrSchedulerType::Constant, schedule };
    assert!((1..=60).all(|k| constant.lr(k) == 3e-4));
}

#[test]
fn lr_scheduler_type_and_warmup_ratio_as_settings() {
    let cfg = resolve(&[("optimizer.lr_scheduler_type", "linear"), ("optimizer.warmup_ratio", "0.07")]).unwrap();
    assert_eq!(cfg.optimizer.lr_scheduler_type, LrSchedulerType::Linear);
    assert_eq!(cfg.optimizer.warmup_for(100), 8, "ceil(100 · 0.07) as transformers computes it");
    assert_eq!(cfg.optimizer.warmup_for(10), 1);
    let file = RunConfig::from_toml_str(
        "[optimizer]\nlr_scheduler_type = \"constant_with_warmup\"\nwarmup_ratio = 0.5\n",
        Path::new("x.toml"),
    )
    .unwrap();
    assert_eq!(file.optimizer.lr_scheduler_type, LrSchedulerType::ConstantWithWarmup);
    for kind in LrSchedulerType::ALL {
        let cfg = resolve(&[("optimizer.lr_scheduler_type", kind.name())]).unwrap();
        assert_eq!(cfg.optimizer.lr_scheduler_type, kind);
        assert_eq!(kind.name().parse::<LrSchedulerType>().unwrap(), kind);
    }

    let err = resolve_err(&[("optimizer.lr_scheduler_type", "polynomial")]);
    assert!(err.contains("optimizer.lr_scheduler_type") && err.contains("polynomial"), "{err}");
    assert!(err.contains("linear") && err.contains("cosine_with_min_lr"), "names the choices: {err}");
    for bad in ["1.0", "-0.1", "nan"] {
        let err = resolve_err(&[("optimizer.warmup_ratio", bad)]);
        assert!(err.contains("optimizer.warmup_ratio: must be in [0, 1)"), "{bad}: {err}");
    }
    // A layer (the file, the flags) setting one replaces the other set below it, as total_steps and
    // epochs do; one layer setting both is an error.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("steps.toml");
    fs::write(&path, "[optimizer]\nwarmup_steps = 3\n").unwrap();
    let over_file = |key: &str, value: &str| {
        let overrides = RunOverrides { config: Some(path.clone()), values: vec![] }.set(key, value);
        RunConfig::resolve(&overrides).unwrap().optimizer
    };
    let op = over_file("optimizer.warmup_ratio", "0.1");
    assert_eq!((op.warmup_steps, op.warmup_ratio), (0, Some(0.1)));
    let op = over_file("optimizer.warmup_steps", "5");
    assert_eq!((op.warmup_steps, op.warmup_ratio), (5, None));
    let err = resolve_err(&[("optimizer.warmup_steps", "3"), ("optimizer.warmup_ratio", "0.1")]);
    assert!(err.contains("optimizer.warmup_ratio: and optimizer.warmup_steps are exclusive"), "{err}");
    let both = dir.path().join("both.toml");
    fs::write(&both, "[optimizer]\nwarmup_steps = 3\nwarmup_ratio = 0.1\n").unwrap();
    let err = format!("{:#}", RunConfig::resolve(&RunOverrides { config: Some(both), values: vec![] }).unwrap_err());
    assert!(err.contains("optimizer.warmup_ratio: and optimizer.warmup_steps are exclusive"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// the options in a run

fn backend() -> Arc<CpuBackend> {
    Arc::new(CpuBackend::new())
}

/// A tiny preference run on synthetic data (one layer, d = 16).
fn tiny_config(dir: &Path, pairs: usize) -> RunConfig {
    let data = dir.join("data.jsonl");
    write_pku_jsonl(&data, &synthetic_pku_rows(pairs, 3)).unwrap();
    let mut c = RunConfig { out_dir: dir.join("run"), seed: 5, ..Default::default() };
    c.data.path = Some(data);
    c.data.template = "U: {prompt} A:".into();
    c.data.max_len = 128;
    c.data.eval_fraction = 0.0;
    c.model.n_positions = 128;
    (c.model.n_layer, c.model.n_embd, c.model.n_head) = (1, 16, 2);
    c.batching.tokens_per_micro_batch = 1024;
    c.optimizer.lr = 1e-3;
    c.intervals.eval_every = 0;
    c.intervals.checkpoint_every = 0;
    c
}

fn quiet() -> TrainOptions {
    TrainOptions { quiet: true, ..Default::default() }
}

fn train_records(cfg: &RunConfig) -> Vec<serde_json::Map<String, Value>> {
    let summary = train(backend(), cfg, Task::Preference, &quiet()).unwrap();
    assert!(summary.completed);
    safedpo::plot::read_metrics(&cfg.out_dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.contains_key("learning_rate"))
        .collect()
}

/// The trainer runs the schedule and warmup it is given: transformers' linear schedule with a
/// ratio's warmup (update 1 at rate 0, as transformers' first warmup update).
#[test]
fn a_run_follows_lr_scheduler_type_and_warmup_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(dir.path(), 24);
    cfg.optimizer.total_steps = Some(6);
    cfg.optimizer.lr_scheduler_type = LrSchedulerType::Linear;
    cfg.optimizer.warmup_ratio = Some(0.3);
    let records = train_records(&cfg);
    let lrs: Vec<f32> = records.iter().map(|r| r["learning_rate"].as_f64().unwrap() as f32).collect();
    // transformers: warmup ceil(6 · 0.3) = 2; λ(k) = k/2 while k < 2, then (6 − k)/4.
    let peak = f64::from(1e-3f32);
    let want: Vec<f32> = [0.0, 0.5, 1.0, 0.75, 0.5, 0.25].iter().map(|m| (peak * m) as f32).collect();
    assert_eq!(lrs, want);
}

#[test]
fn pairs_per_micro_batch_cuts_exact_pair_counts() {
    let pairs: Vec<TokenizedPair> = (0..23)
        .map(|i| TokenizedPair {
            prompt: vec![1; 1 + i % 5],
            chosen: vec![2; 1 + i % 7],
            rejected: vec![3],
            ..Default::default()
        })
        .collect();
    let mut batcher = Batcher::new(pairs.len(), 9);
    for epoch in 0..3 {
        let order = batcher.order_of_epoch(epoch);
        assert_eq!(batcher.batches_in_epoch_under(&pairs, BatchLimit::Pairs(5), epoch), 5);
        let mut seen = Vec::new();
        for size in [5, 5, 5, 5, 3] {
            let batch = batcher.next_batch_under(&pairs, BatchLimit::Pairs(5));
            assert_eq!(batch.num_pairs(), size, "epoch {epoch}: the last batch holds what is left");
            // Still packed: the pairs' tokens laid end to end, nothing padded.
            let tokens: usize = batch.pair_ids.iter().map(|&i| pairs[i].num_tokens()).sum();
            assert_eq!(batch.packed.num_tokens(), tokens);
            seen.extend(batch.pair_ids);
        }
        assert_eq!(seen, order, "epoch {epoch} in its order, each pair once");
        assert_eq!(batcher.epoch(), epoch + 1);
    }
    // SFT batches too.
    let mut sft = Batcher::new(pairs.len(), 9);
    assert_eq!(sft.next_sft_batch_under(&pairs, BatchLimit::Pairs(4)).1.len(), 4);
    // The token budget as a bound: the first batch over it is named, with the run's largest.
    let batcher = Batcher::new(pairs.len(), 9);
    let cost = |i: usize| pairs[i].num_tokens();
    batcher.check_token_budget(BatchLimit::Pairs(5), 10_000, 50, cost).unwrap();
    let err = batcher.check_token_budget(BatchLimit::Pairs(5), 30, 50, cost).unwrap_err().to_string();
    assert!(err.contains("over the budget of 30") && err.contains("the largest micro-batch of the run holds"), "{err}");
}

/// In a run: one epoch of 20 pairs at 3 pairs per micro-batch and 2 micro-batches per step is
/// ceil(ceil(20 / 3) / 2) = 4 steps, each step 6 pairs further on (the epoch's seventh micro-batch
/// holds its last 2 pairs, the eighth, which completes the last step, the next epoch's first 3); a
/// budget too small for the micro-batches stops the run before training, naming both settings.
#[test]
fn a_run_takes_pairs_per_micro_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(dir.path(), 20);
    cfg.data.selection = safedpo::data::PairSelection::Better;
    cfg.batching.pairs_per_micro_batch = Some(3);
    cfg.batching.grad_accum = 2;
    let records = train_records(&cfg);
    let n = cfg.out_dir.join("metrics.jsonl");
    assert_eq!(records.len(), 4, "{}", fs::read_to_string(n).unwrap());
    let epochs: Vec<f64> = records.iter().map(|r| r["epoch"].as_f64().unwrap()).collect();
    assert_eq!(epochs, vec![6.0 / 20.0, 12.0 / 20.0, 18.0 / 20.0, 1.0 + 3.0 / 20.0]);

    fs::create_dir_all(dir.path().join("small")).unwrap();
    let mut small = tiny_config(&dir.path().join("small"), 20);
    small.batching.pairs_per_micro_batch = Some(8);
    small.batching.tokens_per_micro_batch = 256;
    small.data.max_len = 64;
    small.model.n_positions = 64;
    let err = format!("{:#}", train(backend(), &small, Task::Preference, &quiet()).unwrap_err());
    assert!(err.contains("batching.pairs_per_micro_batch") && err.contains("batching.tokens_per_micro_batch"), "{err}");
    assert!(err.contains("over the budget of 256"), "{err}");

    let err = resolve_err(&[("batching.pairs_per_micro_batch", "0")]);
    assert!(err.contains("batching.pairs_per_micro_batch: must be at least 1"), "{err}");
}

/// A run's data goes through the truncation its settings ask for, and conversational rows need the
/// chat template (the error names the file and line).
#[test]
fn a_run_truncates_as_its_data_settings_say() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(dir.path(), 40);
    let tok = ByteTokenizer;
    let default = prepare_data(&cfg, &tok, Task::Preference).unwrap().train;
    cfg.data.max_prompt_length = Some(6);
    cfg.data.max_completion_length = Some(9);
    let limited = prepare_data(&cfg, &tok, Task::Preference).unwrap().train;
    assert!(default.iter().any(|p| p.prompt.len() > 6 && p.chosen.len() > 9));
    assert!(limited.iter().all(|p| p.prompt.len() <= 6 && p.chosen.len() <= 9 && p.rejected.len() <= 9));
    cfg.data.max_prompt_length = None;
    cfg.data.max_completion_length = None;
    cfg.data.max_len = 40;
    cfg.data.truncation_mode = TruncationMode::KeepStart;
    let keep_start = prepare_data(&cfg, &tok, Task::Preference).unwrap();
    let full = default.iter().map(|p| p.prompt.clone()).collect::<std::collections::HashSet<_>>();
    assert!(keep_start.train.iter().all(|p| full.contains(&p.prompt)), "keep_start keeps prompts whole");
    assert!(keep_start.report.iter().any(|line| line.contains("dropped") && !line.contains("dropped 0 too long")));

    let chat = dir.path().join("chat.jsonl");
    let row = r#"{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}"#;
    fs::write(&chat, format!("{row}\n")).unwrap();
    cfg.data.path = Some(chat.clone());
    let err = format!("{:#}", prepare_data(&cfg, &tok, Task::Preference).err().unwrap());
    assert!(err.starts_with(&format!("{}:1: a conversational row", chat.display())), "{err}");
}

// ---------------------------------------------------------------------------------------------
// the settings' forms

/// The new settings left at their defaults change nothing a run writes: the saved configuration
/// (and so the trajectory hash resumes check) has none of their keys.
#[test]
fn defaults_leave_saved_configurations_unchanged() {
    let cfg = RunConfig::default();
    let text = cfg.to_toml().unwrap();
    for key in [
        "lr_scheduler_type",
        "warmup_ratio",
        "truncation_mode",
        "max_prompt_length",
        "max_completion_length",
        "pairs_per_micro_batch",
    ] {
        assert!(!text.contains(key), "{key} in\n{text}");
    }
    assert_eq!(cfg.data.truncation(), safedpo::data::Truncation::new(cfg.data.max_len));
    assert_eq!(cfg.batching.limit(), BatchLimit::Tokens(cfg.batching.tokens_per_micro_batch));
    // Set, they are saved and read back.
    let cfg = resolve(&[
        ("data.truncation_mode", "keep_end"),
        ("data.max_prompt_length", "100"),
        ("data.max_completion_length", "200"),
        ("batching.pairs_per_micro_batch", "4"),
        ("optimizer.lr_scheduler_type", "cosine"),
    ])
    .unwrap();
    let back = RunConfig::from_toml_str(&cfg.to_toml().unwrap(), Path::new("x.toml")).unwrap();
    assert_eq!(back, cfg);
    assert_ne!(cfg.trajectory_hash(), RunConfig::default().trajectory_hash());
    let t = cfg.data.truncation();
    assert_eq!((t.mode, t.max_prompt_length, t.max_completion_length), (TruncationMode::KeepEnd, Some(100), Some(200)));
    let err = resolve_err(&[("data.truncation_mode", "keep_middle")]);
    assert!(err.contains("data.truncation_mode") && err.contains("keep_start"), "{err}");
    for key in ["data.max_prompt_length", "data.max_completion_length"] {
        let err = resolve_err(&[(key, "0")]);
        assert!(err.contains(&format!("{key}: must be at least 1")), "{err}");
    }
}

// ---------------------------------------------------------------------------------------------
// the README's table

/// Every `DPOConfig` option has a row in the README's table of options, and every setting a row names
/// (`[section] key` written as `section.key`) exists, but those of the rows marked as another
/// change's (TR-DPO, WPO, LD-DPO), which may land separately.
#[test]
fn readme_maps_every_dpo_config_option() {
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme.find("| `DPOConfig` option").expect("the README's DPOConfig table");
    let rows: Vec<&str> = readme[start..].lines().take_while(|l| l.starts_with('|')).skip(2).collect();
    let options = [
        "beta",
        "loss_type",
        "loss_weights",
        "label_smoothing",
        "rpo_alpha",
        "f_divergence_type",
        "use_weighting",
        "ld_alpha",
        "reference_free",
        "precompute_ref_log_probs",
        "max_length",
        "max_prompt_length",
        "max_completion_length",
        "truncation_mode",
        "padding_free",
        "learning_rate",
        "lr_scheduler_type",
        "warmup_ratio",
        "warmup_steps",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "max_steps",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "seed",
        "gradient_checkpointing",
        "sync_ref_model",
        "ref_model_mixup_alpha",
        "ref_model_sync_steps",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "save_total_limit",
    ];
    for option in options {
        let named = rows.iter().filter(|r| r.split('|').nth(1).is_some_and(|c| c.contains(&format!("`{option}`"))));
        assert_eq!(named.count(), 1, "{option}: one row of the README's DPOConfig table");
    }
    let keys: Vec<&str> = KEYS.iter().map(|k| k.path.as_str()).collect();
    let pattern = regex::Regex::new(r"`((?:model|data|objective|optimizer|batching|intervals)\.[a-z0-9_]+)").unwrap();
    let mut checked = 0;
    for row in &rows {
        let ours = row.split('|').nth(2).unwrap_or_default();
        let pending = ["(TR-DPO)", "(WPO)", "(LD-DPO)"].iter().any(|mark| row.contains(mark));
        for key in pattern.captures_iter(ours).map(|c| c.get(1).unwrap().as_str()) {
            assert!(pending || keys.contains(&key), "README names `{key}`, which is no setting: {row}");
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked}");
}
