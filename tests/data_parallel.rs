//! Data-parallel training with in-process ranks (threads, each with its own backend): N ranks
//! sharing a step's micro-batches against one rank with the whole step, on the CPU backend and the
//! emulated device; reproducibility; ZeRO-1 against plain data parallelism; exact resume; a failing
//! rank; LoRA; SFT, the unpaired objectives (KTO, `apo_zero_unpaired`), `bco_running_mean` and
//! TR-DPO's reference sync on N ranks; and the settings that are refused.
//!
//! Why N ranks are compared within a tolerance and not bit for bit: one rank accumulates the step's
//! micro-batch gradients in order, `((g1 + g2) + g3) + g4`, while two ranks sum their shares and
//! then each other's, `(g1 + g3) + (g2 + g4)`; f32 addition is not associative, so the gradients
//! differ by a few ulps of the summands and the weights, after a few AdamW steps, by a few ulps of
//! the learning rate times the steps (the bound below leaves room for that and nothing like a
//! wrong gradient, which moves weights by ~lr per step). Everything whose order is fixed
//! (the same world size twice, ZeRO-1 against plain data parallelism, a resume) is bit-exact.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::cuda::{CudaBackend, Device, Precision};
use safedpo::backend::Backend;
use safedpo::config::RunConfig;
use safedpo::dist::{in_process, Collective, HostTransport, Staged};
use safedpo::model::{Decoder, HostWeights};
use safedpo::train::checkpoint::{read_latest, read_optimizer_state};
use safedpo::train::data_parallel::train_in_group;
use safedpo::train::{train, Resume, RunSummary, Task, TrainOptions};

fn synthetic_data(dir: &Path) -> PathBuf {
    common::run::synthetic_data(dir, 80, 3)
}

/// A tiny run: four micro-batches a step (to share among the ranks), a few steps, clipping on.
fn tiny_config(out: &Path, data: &Path) -> RunConfig {
    let mut c = common::run::tiny_run(out, data, 96);
    c.batching.tokens_per_micro_batch = 400;
    c.batching.grad_accum = 4;
    c.optimizer.warmup_steps = 1;
    c.optimizer.total_steps = Some(4);
    c.optimizer.weight_decay = 0.01;
    c.optimizer.grad_clip = 0.5;
    c.intervals.eval_every = 2;
    c
}

fn quiet() -> TrainOptions {
    TrainOptions { quiet: true, ..Default::default() }
}

/// `world_size` ranks as threads, rank `r` on `backend()` with `opts(r)`; every rank's result.
fn run_group<B: Backend + 'static>(
    world_size: usize,
    cfg: &RunConfig,
    opts: impl Fn(usize) -> TrainOptions + Sync,
    backend: impl Fn() -> Arc<B> + Sync,
) -> Vec<anyhow::Result<RunSummary>> {
    run_task_group(world_size, cfg, Task::Preference, opts, backend)
}

/// [`run_group`] for `task`.
fn run_task_group<B: Backend + 'static>(
    world_size: usize,
    cfg: &RunConfig,
    task: Task,
    opts: impl Fn(usize) -> TrainOptions + Sync,
    backend: impl Fn() -> Arc<B> + Sync,
) -> Vec<anyhow::Result<RunSummary>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = in_process::group(world_size)
            .into_iter()
            .enumerate()
            .map(|(rank, handle)| {
                let (opts, backend) = (&opts, &backend);
                s.spawn(move || {
                    let group: Arc<dyn Collective<B>> = Arc::new(Staged(handle));
                    train_in_group(backend(), cfg, task, &opts(rank), group)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn run_ok<B: Backend + 'static>(world_size: usize, cfg: &RunConfig, backend: impl Fn() -> Arc<B> + Sync) {
    for (rank, result) in run_group(world_size, cfg, |_| quiet(), backend).into_iter().enumerate() {
        let summary = result.unwrap_or_else(|e| panic!("rank {rank}: {e:#}"));
        assert!(summary.completed, "rank {rank} did not complete");
    }
}

fn cpu() -> Arc<CpuBackend> {
    Arc::new(CpuBackend::new())
}

fn emu(precision: Precision) -> impl Fn() -> Arc<CudaBackend> + Sync {
    move || Arc::new(CudaBackend::new(Device::emulated().unwrap(), precision))
}

fn final_weights(out: &Path) -> HostWeights {
    Decoder::load(cpu(), &out.join("final")).unwrap().to_host().unwrap()
}

fn read(out: &Path, file: &str) -> Vec<u8> {
    fs::read(out.join(file)).unwrap_or_else(|e| panic!("{}/{file}: {e}", out.display()))
}

/// The metrics of a run without the wall-clock ones.
fn metrics_without_timing(run: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let mut recs = safedpo::plot::read_metrics(&run.join("metrics.jsonl")).unwrap();
    for r in &mut recs {
        r.remove("tokens_per_second");
    }
    recs
}

/// The files whose bytes two runs on the same trajectory share.
const EXACT_FILES: [&str; 3] = ["final/model.safetensors", "final/optimizer.safetensors", "final/state.json"];

fn assert_same_run(a: &Path, b: &Path, what: &str) {
    for file in EXACT_FILES {
        assert!(read(a, file) == read(b, file), "{what}: {file} differs");
    }
    assert_eq!(metrics_without_timing(a), metrics_without_timing(b), "{what}: metrics differ");
}

/// The largest |a − b| over every weight.
fn max_weight_difference(a: &HostWeights, b: &HostWeights) -> f32 {
    let mut worst = 0.0f32;
    for (name, (_, x)) in &a.tensors {
        for (p, q) in x.iter().zip(&b.tensors[name].1) {
            worst = worst.max((p - q).abs());
        }
    }
    worst
}

/// N ranks against one rank with the whole step: weights within `bound` (see the module docs), the
/// same number of records, and per-step metrics within 1e-5 relative plus 1e-6 absolute (a margin is
/// a difference of rewards: its rounding is that of the rewards, not of itself).
fn assert_matches_one_rank(one: &Path, many: &Path, bound: f32, what: &str) {
    let (w1, wn) = (final_weights(one), final_weights(many));
    let worst = max_weight_difference(&w1, &wn);
    eprintln!("{what}: largest weight difference {worst:e}");
    assert!(worst <= bound, "{what}: weights differ by {worst:e} (bound {bound:e})");
    let (r1, rn) = (metrics_without_timing(one), metrics_without_timing(many));
    assert_eq!(r1.len(), rn.len(), "{what}: record counts");
    for (a, b) in r1.iter().zip(&rn) {
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}: record keys");
        for key in ["loss", "eval/loss", "grad_norm", "rewards/margins"] {
            if let (Some(x), Some(y)) = (a.get(key).and_then(|v| v.as_f64()), b.get(key).and_then(|v| v.as_f64())) {
                assert!((x - y).abs() <= 1e-5 * x.abs() + 1e-6, "{what}: {key} {x} vs {y} at {a:?}");
            }
        }
    }
}

/// The bound on |w_N − w_1| after four steps at lr 2e-3 (see the module docs).
const WEIGHT_BOUND: f32 = 2e-5;

fn check_ranks_match_one_rank<B: Backend + 'static>(backend: impl Fn() -> Arc<B> + Sync, label: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path());
    let one = tiny_config(&dir.path().join("one"), &data);
    train(backend(), &one, Task::Preference, &quiet()).unwrap();
    for world_size in [2, 4] {
        let cfg = RunConfig { out_dir: dir.path().join(format!("ranks{world_size}")), ..one.clone() };
        run_ok(world_size, &cfg, &backend);
        assert_matches_one_rank(&one.out_dir, &cfg.out_dir, WEIGHT_BOUND, &format!("{label}, {world_size} ranks"));
    }
}

#[test]
fn two_and_four_ranks_match_one_rank_on_the_cpu() {
    check_ranks_match_one_rank(cpu, "cpu");
}

#[test]
fn two_and_four_ranks_match_one_rank_on_the_emulated_device() {
    check_ranks_match_one_rank(emu(Precision::F32), "emu f32");
}

#[test]
fn a_rank_without_a_micro_batch_still_takes_part() {
    // One micro-batch a step on 2 ranks: rank 1 has nothing to run and contributes zero gradients.
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path());
    let mut one = tiny_config(&dir.path().join("one"), &data);
    one.batching.grad_accum = 1;
    train(cpu(), &one, Task::Preference, &quiet()).unwrap();
    for zero_stage in [0, 1] {
        let mut two = RunConfig { out_dir: dir.path().join(format!("two{zero_stage}")), ..one.clone() };
        two.train.zero_stage = zero_stage;
        run_ok(2, &two, cpu);
        // The gradients are rank 0's (x + 0 = x); the grad norm is summed by owner, hence the bound.
        assert_matches_one_rank(&one.out_dir, &two.out_dir, WEIGHT_BOUND, &format!("an idle rank, zero {zero_stage}"));
    }
}

#[test]
fn the_same_world_size_twice_is_bit_identical_and_rank_0_alone_writes() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path());
    let a = tiny_config(&dir.path().join("a"), &data);
    let b = RunConfig { out_dir: dir.path().join("b"), ..a.clone() };
    run_ok(2, &a, cpu);
    run_ok(2, &b, cpu);
    assert_same_run(&a.out_dir, &b.out_dir, "two 2-rank runs");
    // One record per step and evaluation (no rank appended twice), and the files a run of one
    // rank writes.
    let single = RunConfig { out_dir: dir.path().join("single"), ..a.clone() };
    train(cpu(), &single, Task::Preference, &quiet()).unwrap();
    assert_eq!(metrics_without_timing(&a.out_dir).len(), metrics_without_timing(&single.out_dir).len());
    let names = |d: &Path| {
        let mut n: Vec<String> =
            fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        n.sort();
        n
    };
    assert_eq!(names(&a.out_dir), names(&single.out_dir));
}

fn check_zero_matches_plain<B: Backend + 'static>(world_size: usize, backend: impl Fn() -> Arc<B> + Sync, label: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path());
    let plain = tiny_config(&dir.path().join("plain"), &data);
    let mut zero = RunConfig { out_dir: dir.path().join("zero"), ..plain.clone() };
    zero.train.zero_stage = 1;
    run_ok(world_size, &plain, &backend);
    run_ok(world_size, &zero, &backend);
    // The optimizer state ZeRO-1 gathers to rank 0 is the state plain data parallelism keeps whole.
    assert_same_run(&plain.out_dir, &zero.out_dir, &format!("{label}: ZeRO-1 vs plain, {world_size} ranks"));
}

#[test]
fn zero_1_is_bit_identical_to_plain_data_parallel_on_the_cpu() {
    check_zero_matches_plain(2, cpu, "cpu");
    check_zero_matches_plain(3, cpu, "cpu");
}

#[test]
fn zero_1_is_bit_identical_to_plain_data_parallel_on_the_emulated_device() {
    check_zero_matches_plain(2, emu(Precision::F32), "emu f32");
    check_zero_matches_plain(2, emu(Precision::Bf16), "emu bf16");
}

fn stop_at_2(_: usize) -> TrainOptions {
    TrainOptions { stop_after_step: Some(2), ..quiet() }
}

fn resume(_: usize) -> TrainOptions {
    TrainOptions { resume: Some(Resume::Auto), ..quiet() }
}

/// A ZeRO-1 run of 2 ranks stopped after step 2 and resumed ends as the same run straight through;
/// returns the straight run's config.
fn check_resume_is_bit_exact<B: Backend + 'static>(
    dir: &Path,
    backend: impl Fn() -> Arc<B> + Sync,
    label: &str,
) -> RunConfig {
    let data = synthetic_data(dir);
    let mut straight = tiny_config(&dir.join("straight"), &data);
    straight.train.zero_stage = 1;
    let resumed = RunConfig { out_dir: dir.join("resumed"), ..straight.clone() };
    run_ok(2, &straight, &backend);
    for r in run_group(2, &resumed, stop_at_2, &backend) {
        assert!(!r.unwrap().completed);
    }
    assert!(read_latest(&resumed.out_dir).unwrap().unwrap().ends_with("checkpoint-2"));
    for r in run_group(2, &resumed, resume, &backend) {
        assert!(r.unwrap().completed);
    }
    assert_same_run(&straight.out_dir, &resumed.out_dir, &format!("{label}: 2 ranks resumed"));
    straight
}

/// In bf16 only each tensor's owner keeps its fp32 master: the checkpoint gathers them to rank 0, or
/// the resumed run would start from rounded weights.
#[test]
fn a_zero_1_resume_in_bf16_on_the_emulated_device_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    check_resume_is_bit_exact(dir.path(), emu(Precision::Bf16), "emu bf16");
}

#[test]
fn a_resume_at_the_same_world_size_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let straight = check_resume_is_bit_exact(dir.path(), cpu, "cpu");
    let (stop, resume) = (stop_at_2, resume);

    // Another world size continues from the consolidated checkpoint (its own summation order).
    let other = RunConfig { out_dir: dir.path().join("other"), ..straight.clone() };
    run_group(2, &other, stop, cpu).into_iter().for_each(|r| assert!(!r.unwrap().completed));
    run_group(3, &other, resume, cpu).into_iter().for_each(|r| assert!(r.unwrap().completed));
    let worst = max_weight_difference(&final_weights(&straight.out_dir), &final_weights(&other.out_dir));
    assert!(worst <= WEIGHT_BOUND, "resumed on 3 ranks: weights differ by {worst:e}");
}

#[test]
fn a_failing_rank_ends_every_rank_and_the_last_checkpoint_loads() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path());
    let mut cfg = tiny_config(&dir.path().join("run"), &data);
    cfg.intervals.checkpoint_every = 2;
    cfg.train.zero_stage = 1;
    let opts = |rank| TrainOptions { fail_at_step: (rank == 1).then_some(4), ..quiet() };
    let results = run_group(3, &cfg, opts, cpu);
    for (rank, result) in results.into_iter().enumerate() {
        let err = format!("{:#}", result.expect_err("every rank fails"));
        let expected = if rank == 1 { "injected failure at step 4" } else { "rank 1 left the group" };
        assert!(err.contains(expected), "rank {rank}: {err}");
    }
    let latest = read_latest(&cfg.out_dir).unwrap().unwrap();
    assert!(latest.ends_with("checkpoint-2"), "{}", latest.display());
    Decoder::load(cpu(), &latest).unwrap();
    let state = read_optimizer_state(&latest).unwrap();
    // Every tensor's moments are there, whichever rank owned them.
    assert!(state.keys().any(|k| k.starts_with("m.")) && state.len() > 10);
    // And it resumes on the same group.
    let resume = |_| TrainOptions { resume: Some(Resume::Auto), ..quiet() };
    run_group(3, &cfg, resume, cpu).into_iter().for_each(|r| assert!(r.unwrap().completed));
}

#[test]
fn lora_adapters_train_data_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path());
    let mut one = tiny_config(&dir.path().join("one"), &data);
    one.lora.r = 2;
    one.optimizer.lr = 2e-2;
    train(cpu(), &one, Task::Preference, &quiet()).unwrap();
    let mut two = RunConfig { out_dir: dir.path().join("two"), ..one.clone() };
    two.train.zero_stage = 1;
    run_ok(2, &two, cpu);
    assert!(two.out_dir.join("final/adapter_model.safetensors").is_file());
    assert_matches_one_rank(&one.out_dir, &two.out_dir, 10.0 * WEIGHT_BOUND, "LoRA, 2 ranks");
    let state = read_optimizer_state(&two.out_dir.join("final")).unwrap();
    assert!(state.keys().all(|k| k == "step" || k.contains("lora_")), "{:?}", state.keys().collect::<Vec<_>>());
}

#[test]
fn settings_that_would_make_ranks_disagree_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path());
    let base = tiny_config(&dir.path().join("run"), &data);
    let mut cases: Vec<(RunConfig, Task, &str)> = Vec::new();
    let mut zero2 = base.clone();
    zero2.train.zero_stage = 2;
    cases.push((zero2, Task::Preference, "train.zero_stage = 2"));
    let mut sft_zero3 = base.clone();
    sft_zero3.train.zero_stage = 3;
    cases.push((sft_zero3, Task::Sft, "train.zero_stage = 3"));
    for (cfg, task, expected) in cases {
        let results: Vec<BTreeMap<usize, String>> = std::thread::scope(|s| {
            let hs: Vec<_> = in_process::group(2)
                .into_iter()
                .map(|h| {
                    let cfg = &cfg;
                    s.spawn(move || {
                        let rank = h.rank();
                        let group: Arc<dyn Collective<CpuBackend>> = Arc::new(Staged(h));
                        let err = train_in_group(cpu(), cfg, task, &quiet(), group).unwrap_err();
                        BTreeMap::from([(rank, format!("{err:#}"))])
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for errs in results {
            for (rank, err) in errs {
                assert!(err.contains(expected), "rank {rank}: {err}");
            }
        }
        assert!(!cfg.out_dir.exists(), "a refused run wrote {}", cfg.out_dir.display());
    }
}

/// `task` on 2 and 3 ranks (`zero_stage` 0 and 1, bit-identical) against one rank: weights within
/// `bound`, metrics as [`assert_matches_one_rank`] checks them; returns the runs' directories.
fn check_task_matches_one_rank(one: &RunConfig, task: Task, bound: f32, label: &str) -> Vec<PathBuf> {
    train(cpu(), one, task, &quiet()).unwrap();
    let mut dirs = vec![one.out_dir.clone()];
    for world_size in [2, 3] {
        let name = |suffix: &str| one.out_dir.with_file_name(format!("{label}-ranks{world_size}{suffix}"));
        let plain = RunConfig { out_dir: name(""), ..one.clone() };
        let mut zero = RunConfig { out_dir: name("-zero"), ..plain.clone() };
        zero.train.zero_stage = 1;
        for cfg in [&plain, &zero] {
            for (rank, result) in run_task_group(world_size, cfg, task, |_| quiet(), cpu).into_iter().enumerate() {
                assert!(result.unwrap_or_else(|e| panic!("{label}, rank {rank}: {e:#}")).completed);
            }
        }
        let what = format!("{label}, {world_size} ranks");
        assert_matches_one_rank(&one.out_dir, &plain.out_dir, bound, &what);
        assert_same_run(&plain.out_dir, &zero.out_dir, &format!("{what}: ZeRO-1 vs plain"));
        dirs.push(plain.out_dir);
    }
    dirs
}

#[test]
fn sft_on_two_and_three_ranks_matches_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path());
    let one = tiny_config(&dir.path().join("sft"), &data);
    check_task_matches_one_rank(&one, Task::Sft, WEIGHT_BOUND, "sft");
}

/// The synthetic pairs unpaired, as unpaired rows.
fn unpaired_data(dir: &Path) -> PathBuf {
    use safedpo::data::{load_examples, write_examples_jsonl, DataFormat, PairSelection};
    let (examples, _) = load_examples(&synthetic_data(dir), DataFormat::Auto, PairSelection::SafeDpo, false).unwrap();
    let path = dir.join("unpaired.jsonl");
    write_examples_jsonl(&path, &examples).unwrap();
    path
}

/// KTO (with its per-micro-batch KL estimate) and `apo_zero_unpaired` on unpaired examples.
#[test]
fn the_unpaired_objectives_on_two_and_three_ranks_match_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let data = unpaired_data(dir.path());
    for objective in ["kto", "apo_zero_unpaired"] {
        let mut one = tiny_config(&dir.path().join(objective), &data);
        one.objective = objective.parse().unwrap();
        one.precompute_ref = false;
        let dirs = check_task_matches_one_rank(&one, Task::Preference, WEIGHT_BOUND, objective);
        // The KL estimate is logged as one rank logs it (the mean of the micro-batches' estimates).
        let kl = |run: &Path| -> Vec<f64> {
            metrics_without_timing(run).iter().filter_map(|r| r.get("kl").and_then(|v| v.as_f64())).collect()
        };
        let want = kl(&dirs[0]);
        assert_eq!(want.len(), 4, "{objective}: a kl per step");
        for run in &dirs[1..] {
            for (x, y) in want.iter().zip(kl(run)) {
                assert!((x - y).abs() <= 1e-5 * x.abs() + 1e-6, "{objective}: kl {x} vs {y}");
            }
        }
    }
}

/// The running mean is replayed on every rank over the whole step's micro-batches in order: after
/// 4 steps of 4 micro-batches it holds 16 samples, and it is one rank's up to the rounding of the
/// weights the samples come from.
#[test]
fn bco_running_mean_on_two_and_three_ranks_matches_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path());
    let mut one = tiny_config(&dir.path().join("bco"), &data);
    one.objective = "bco_pair:beta=0.1,bco_running_mean=true".parse().unwrap();
    let dirs = check_task_matches_one_rank(&one, Task::Preference, WEIGHT_BOUND, "bco_running_mean");
    let mean_of = |run: &Path| -> (f64, f64) {
        let state: serde_json::Value = serde_json::from_slice(&read(run, "final/state.json")).unwrap();
        let mean = &state["loss"]["bco_reward_mean"];
        (mean["mean"].as_f64().unwrap(), mean["count"].as_f64().unwrap())
    };
    let (want_mean, want_count) = mean_of(&dirs[0]);
    assert!((want_count - 16.0).abs() < 1e-9 && want_mean != 0.0, "{want_mean} over {want_count}");
    for run in &dirs[1..] {
        let (mean, count) = mean_of(run);
        assert_eq!(count, want_count, "{}", run.display());
        assert!((mean - want_mean).abs() <= 1e-5 * want_mean.abs() + 1e-7, "running mean {mean} vs {want_mean}");
    }
}

/// TR-DPO: every rank holds the same policy after each update and syncs its own reference; rank 0
/// writes the synced reference into the checkpoints. Under ZeRO-1 in bf16 the owners' fp32 masters
/// are brought to every rank for the mix, so the run equals plain data parallelism bit for bit.
#[test]
fn sync_ref_model_on_two_and_three_ranks_matches_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path());
    let mut one = tiny_config(&dir.path().join("trdpo"), &data);
    (one.sync_ref_model, one.ref_model_mixup_alpha, one.ref_model_sync_steps) = (true, 0.5, 2);
    one.precompute_ref = false;
    let dirs = check_task_matches_one_rank(&one, Task::Preference, WEIGHT_BOUND, "sync_ref_model");
    let reference = |run: &Path| Decoder::load(cpu(), &run.join("final/reference")).unwrap().to_host().unwrap();
    for run in &dirs[1..] {
        let worst = max_weight_difference(&reference(&dirs[0]), &reference(run));
        assert!(worst <= WEIGHT_BOUND, "{}: synced references differ by {worst:e}", run.display());
    }
    let plain = RunConfig { out_dir: dir.path().join("bf16-plain"), ..one.clone() };
    let mut zero = RunConfig { out_dir: dir.path().join("bf16-zero"), ..one.clone() };
    zero.train.zero_stage = 1;
    run_ok(2, &plain, emu(Precision::Bf16));
    run_ok(2, &zero, emu(Precision::Bf16));
    assert_same_run(&plain.out_dir, &zero.out_dir, "sync_ref_model in bf16: ZeRO-1 vs plain");
    let bytes = |run: &Path| read(run, "final/reference/model.safetensors");
    assert!(bytes(&plain.out_dir) == bytes(&zero.out_dir), "sync_ref_model in bf16: the synced references differ");
}

/// SFT, KTO, `bco_running_mean` and TR-DPO (under ZeRO-1) stopped after step 2 on 2 ranks and
/// resumed end as the same run straight through.
#[test]
fn the_newly_parallel_steps_resume_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path());
    let base = tiny_config(&dir.path().join("x"), &data);
    let mut bco = base.clone();
    bco.objective = "bco_pair:beta=0.1,bco_running_mean=true".parse().unwrap();
    let mut trdpo = base.clone();
    (trdpo.sync_ref_model, trdpo.ref_model_sync_steps, trdpo.precompute_ref) = (true, 1, false);
    trdpo.train.zero_stage = 1;
    let mut kto = tiny_config(&dir.path().join("x"), &unpaired_data(dir.path()));
    (kto.objective, kto.precompute_ref) = ("kto".parse().unwrap(), false);
    let cases = [
        ("sft", base, Task::Sft),
        ("kto", kto, Task::Preference),
        ("bco", bco, Task::Preference),
        ("trdpo", trdpo, Task::Preference),
    ];
    for (name, cfg, task) in cases {
        let straight = RunConfig { out_dir: dir.path().join(format!("{name}-straight")), ..cfg.clone() };
        let resumed = RunConfig { out_dir: dir.path().join(format!("{name}-resumed")), ..cfg };
        run_task_group(2, &straight, task, |_| quiet(), cpu).into_iter().for_each(|r| assert!(r.unwrap().completed));
        run_task_group(2, &resumed, task, stop_at_2, cpu).into_iter().for_each(|r| assert!(!r.unwrap().completed));
        run_task_group(2, &resumed, task, resume, cpu).into_iter().for_each(|r| assert!(r.unwrap().completed));
        assert_same_run(&straight.out_dir, &resumed.out_dir, &format!("{name}: 2 ranks resumed"));
    }
}
