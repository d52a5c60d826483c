//! The benchmark's FLOP count, synthetic data, statistics, report and steps.

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::report::parse_vm_hwm;
use super::*;
use crate::backend::prelude::*;
use crate::backend::MemoryStats;
use crate::model::Decoder;

/// FLOPs counted by walking every matrix product of the forward, one by one.
fn forward_flops_by_enumeration(m: &DecoderConfig, t: usize) -> f64 {
    let (d, v) = (m.n_embd, m.vocab_size);
    let mut flops = 0usize;
    for _layer in 0..m.n_layer {
        for (ic, oc) in [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] {
            flops += 2 * t * ic * oc;
        }
        let hd = d / m.n_head;
        for _head in 0..m.n_head {
            for q in 0..t {
                // q attends to keys 0..=q: scores then the weighted sum of values.
                flops += 2 * (q + 1) * hd + 2 * (q + 1) * hd;
            }
        }
    }
    flops += 2 * t * d * v;
    flops as f64
}

#[test]
fn flop_formula_matches_enumeration() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for _ in 0..20 {
        let heads = rng.random_range(1..5usize);
        let m = DecoderConfig::gpt2(
            rng.random_range(2..300),
            64,
            heads * rng.random_range(1..9usize),
            rng.random_range(1..4),
            heads,
        );
        let t = rng.random_range(1..40);
        let (a, b) = (forward_flops_per_sequence(&m, t), forward_flops_by_enumeration(&m, t));
        assert!((a - b).abs() <= 1e-9 * b, "{m:?} t={t}: formula {a} vs enumeration {b}");
    }
}

#[test]
fn step_flops_counts_reference_only_when_used() {
    let cfg = BenchConfig::default();
    let fwd = forward_flops_per_sequence(&cfg.model_config(), cfg.seq_len) * 16.0;
    assert_eq!(step_flops(&cfg), 4.0 * fwd);
    let simpo = BenchConfig { objective: Objective::Simpo { beta: 2.0, gamma: 0.5, safety_margin: 0.0 }, ..cfg };
    assert_eq!(step_flops(&simpo), 3.0 * fwd);
}

#[test]
fn synthetic_batch_has_the_configured_shape() {
    let cfg = BenchConfig { pairs: 3, seq_len: 10, prompt_len: 4, vocab_size: 17, ..BenchConfig::default() };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let b = synthetic_batch(&cfg, &mut rng);
    assert_eq!(b.num_pairs(), 3);
    assert_eq!(b.packed.num_seqs(), 6);
    assert_eq!(b.packed.num_tokens(), 60);
    assert!(b.packed.tokens.iter().all(|&t| (0..17).contains(&t)));
    for s in 0..6 {
        assert_eq!(b.packed.num_targets(s), 6, "sequence {s}");
        assert_eq!(b.lengths[s], 6);
    }
    for p in 0..3 {
        let (c, r) = (p * 20, p * 20 + 10);
        assert_eq!(b.packed.tokens[c..c + 4], b.packed.tokens[r..r + 4], "pair {p} shares its prompt");
        assert_eq!(b.unsafe_flags[2 * p], 0, "chosen responses are safe after T(D)");
    }
    let again = synthetic_batch(&cfg, &mut ChaCha8Rng::seed_from_u64(1));
    assert_eq!(again, b, "same seed, same batch");
}

#[test]
fn step_times_statistics() {
    let t = StepTimes::from_samples(&[5.0, 1.0, 3.0, 9.0]);
    assert_eq!(t, StepTimes { median: 4.0, mean: 4.5, min: 1.0, max: 9.0 });
    let t = StepTimes::from_samples(&[2.0, 7.0, 3.0]);
    assert_eq!((t.median, t.min, t.max), (3.0, 2.0, 7.0));
}

#[test]
fn vm_hwm_is_parsed_in_bytes() {
    let status = "Name:\tx\nVmPeak:\t  999 kB\nVmHWM:\t    1234 kB\nVmRSS:\t  10 kB\n";
    assert_eq!(parse_vm_hwm(status), Some(1234 * 1024));
    assert_eq!(parse_vm_hwm("VmRSS: 1 kB\n"), None);
    if cfg!(target_os = "linux") {
        let rss = peak_rss_bytes().expect("VmHWM on Linux");
        assert!(rss > 1 << 20, "a test process holds more than 1 MiB: {rss}");
    }
}

#[test]
fn report_fields_and_rates() {
    let cfg = BenchConfig::default();
    let phases = PhaseTimes {
        reference_forward: 1.0,
        policy_forward: 2.0,
        log_probs: None,
        loss: 0.5,
        backward: 4.0,
        optimizer: 0.5,
    };
    let samples: Vec<StepSample> =
        [8.0, 10.0, 12.0].iter().map(|&total_ms| StepSample { total_ms, phases, loss: 0.69 }).collect();
    let r = report_from_samples(&cfg, &samples, 1000, "cpu".into(), 2);
    assert_eq!(r.policy_tokens_per_step, 2048);
    assert!((r.tokens_per_s - 2048.0 / 0.010).abs() < 1e-6);
    assert!((r.tokens_per_s_best - 2048.0 / 0.008).abs() < 1e-6);
    assert!((r.flops_per_s - step_flops(&cfg) * 100.0).abs() < 1e-3);
    assert_eq!(r.mfu, None);
    assert_eq!(r.phases_ms, phases);
    let with_peak =
        report_from_samples(&BenchConfig { peak_flops: Some(1e12), ..cfg.clone() }, &samples, 1000, "cpu".into(), 2);
    assert!((with_peak.mfu.unwrap() - r.flops_per_s / 1e12).abs() < 1e-15);

    // The field names the PyTorch baseline and scripts/bench-compare.sh rely on.
    let json = serde_json::to_value(&r).unwrap();
    for key in [
        "engine",
        "device",
        "threads",
        "config",
        "num_params",
        "policy_tokens_per_step",
        "tokens_per_s",
        "tokens_per_s_best",
        "step_ms",
        "phases_ms",
        "flops_per_step",
        "flops_per_s",
        "mfu",
        "peak_memory_bytes",
        "memory_source",
        "peak_host_rss_bytes",
        "final_loss",
        "notes",
    ] {
        assert!(json.get(key).is_some(), "report JSON lacks {key}");
    }
    for key in ["reference_forward", "policy_forward", "log_probs", "loss", "backward", "optimizer"] {
        assert!(json["phases_ms"].get(key).is_some(), "phases_ms lacks {key}");
    }
    for key in ["median", "mean", "min", "max"] {
        assert!(json["step_ms"].get(key).is_some(), "step_ms lacks {key}");
    }
    assert_eq!(json["config"]["objective"]["name"], "dpo");
    let back: BenchReport = serde_json::from_value(json).unwrap();
    assert_eq!(back, r);
    let table = r.to_string();
    assert!(table.contains("policy tokens/s") && table.contains("backward"), "{table}");
}

fn tiny_cfg(objective: Objective) -> BenchConfig {
    BenchConfig {
        n_layer: 1,
        n_embd: 16,
        n_head: 2,
        vocab_size: 32,
        n_positions: 32,
        pairs: 2,
        seq_len: 12,
        prompt_len: 3,
        objective,
        warmup_steps: 1,
        steps: 3,
        ..BenchConfig::default()
    }
}

#[test]
fn cpu_steps_time_every_phase_and_train() {
    use crate::backend::cpu::CpuBackend;
    let ln2 = std::f64::consts::LN_2;
    // Policy = reference at the first step, so h = 0: DPO's loss is ln 2 for every pair, and
    // SafeDPO's is −log σ(−Δ) = softplus(Δ) for pairs whose rejected response is unsafe.
    let safedpo = Objective::SafeDpo { beta: 0.1, delta: 3.0 };
    for objective in [Objective::Dpo { beta: 0.1, safety_margin: 0.0 }, safedpo.clone()] {
        let cfg = tiny_cfg(objective.clone());
        let mut runner = StepRunner::new(Arc::new(CpuBackend::new()), &cfg).unwrap();
        let batch = synthetic_batch(&cfg, &mut ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5afe_d90b));
        let unsafe_pairs = (0..cfg.pairs).filter(|&p| batch.unsafe_flags[2 * p + 1] == 1).count() as f64;
        let expected = match objective {
            Objective::SafeDpo { delta, .. } => {
                (unsafe_pairs * (1.0 + delta.exp()).ln() + (cfg.pairs as f64 - unsafe_pairs) * ln2) / cfg.pairs as f64
            }
            _ => ln2,
        };
        let first = runner.step().unwrap();
        assert!((first.loss - expected).abs() < 1e-5, "{objective:?}: first loss {} vs {expected}", first.loss);
        for _ in 0..3 {
            let s = runner.step().unwrap();
            let p = &s.phases;
            for (name, ms) in [
                ("reference_forward", p.reference_forward),
                ("policy_forward", p.policy_forward),
                ("loss", p.loss),
                ("backward", p.backward),
                ("optimizer", p.optimizer),
            ] {
                assert!(ms > 0.0 && ms.is_finite(), "{name}: {ms} ms");
            }
            assert!((p.sum() - s.total_ms).abs() <= 1e-9 * s.total_ms.max(1.0), "{p:?} vs {}", s.total_ms);
            assert!(s.loss.is_finite());
        }
    }
    // Training moves the policy away from the reference: the same batch no longer gives ln 2.
    let cfg = BenchConfig { warmup_steps: 0, steps: 1, ..tiny_cfg(Objective::Dpo { beta: 0.1, safety_margin: 0.0 }) };
    let mut runner = StepRunner::new(Arc::new(CpuBackend::new()), &cfg).unwrap();
    assert!((runner.step().unwrap().loss - ln2).abs() < 1e-6);
    let again = runner.step().unwrap().loss;
    assert!((again - ln2).abs() > 1e-7, "after one AdamW step the loss is still {again}");
}

#[test]
fn run_bench_on_cpu_reports_the_run() {
    use crate::backend::cpu::CpuBackend;
    let cfg = tiny_cfg(Objective::Simpo { beta: 2.0, gamma: 0.5, safety_margin: 0.0 });
    let r = run_bench(Arc::new(CpuBackend::new()), &cfg).unwrap();
    assert_eq!(r.policy_tokens_per_step, 48);
    assert_eq!(r.num_params, Decoder::random(Arc::new(CpuBackend::new()), cfg.model_config(), 0).unwrap().num_params());
    assert!(r.step_ms.min <= r.step_ms.median && r.step_ms.median <= r.step_ms.max);
    assert!(r.tokens_per_s > 0.0 && r.tokens_per_s <= r.tokens_per_s_best);
    assert!(r.phases_ms.reference_forward < r.phases_ms.policy_forward, "SimPO runs no reference forward");
    assert!(r.final_loss.is_finite());
    if cfg!(target_os = "linux") {
        // The CPU counts no device memory: the headline peak is the resident set.
        assert_eq!(r.memory_source, HOST_MEMORY_SOURCE);
        assert!(r.peak_memory_bytes.unwrap() > 0);
        assert_eq!(r.peak_memory_bytes, r.peak_host_rss_bytes);
    }
    assert_eq!(r.config, cfg);
}

#[test]
fn memory_fields_prefer_the_device_and_keep_the_resident_set() {
    let mut r = report_from_samples(&BenchConfig::default(), &[StepSample::default()], 10, "x".into(), 1);
    r.set_memory(None, Some(7 << 20));
    assert_eq!((r.peak_memory_bytes, r.peak_host_rss_bytes), (Some(7 << 20), Some(7 << 20)));
    assert_eq!(r.memory_source, HOST_MEMORY_SOURCE);
    assert!(r.to_string().contains("peak memory       7.0 MiB (VmHWM)"), "{r}");
    assert!(!r.to_string().contains("host RSS"), "{r}");

    let device = MemoryStats { current_bytes: 1 << 20, peak_bytes: 3 << 20 };
    r.set_memory(Some(device), Some(7 << 20));
    assert_eq!((r.peak_memory_bytes, r.peak_host_rss_bytes), (Some(3 << 20), Some(7 << 20)));
    assert_eq!(r.memory_source, DEVICE_MEMORY_SOURCE);
    let table = r.to_string();
    assert!(table.contains("peak memory       3.0 MiB (device allocator)"), "{table}");
    assert!(table.contains("peak host RSS     7.0 MiB (VmHWM)"), "{table}");

    r.set_memory(None, None);
    assert_eq!((r.peak_memory_bytes, r.peak_host_rss_bytes), (None, None));
    assert!(r.to_string().contains("peak memory       n/a"));

    // A report written before `peak_host_rss_bytes` existed still reads.
    let mut json = serde_json::to_value(&r).unwrap();
    json.as_object_mut().unwrap().remove("peak_host_rss_bytes");
    assert_eq!(serde_json::from_value::<BenchReport>(json).unwrap(), r);
}

#[test]
fn run_bench_on_the_emulated_device_reports_its_memory() {
    use crate::backend::cuda::{CudaBackend, Device, Precision};
    let backend = Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::Bf16));
    let cfg = BenchConfig { device: "emu".into(), ..tiny_cfg(Objective::SafeDpo { beta: 0.1, delta: 3.0 }) };
    let r = run_bench(backend.clone(), &cfg).unwrap();
    assert!(r.final_loss.is_finite());
    match backend.memory_stats() {
        Some(stats) => {
            assert_eq!(r.memory_source, DEVICE_MEMORY_SOURCE);
            let peak = r.peak_memory_bytes.unwrap();
            // The peak holds at least both models' bf16 weights (the policy's with their fp32
            // masters and bf16 gradients) and two fp32 AdamW moments.
            let p = r.num_params as u64;
            assert!(peak >= (2 + (2 + 4 + 2) + 8) * p, "peak {peak} bytes for {p} parameters");
            assert!(peak >= stats.current_bytes, "{stats:?}");
        }
        None => assert_eq!(r.memory_source, HOST_MEMORY_SOURCE),
    }
    if cfg!(target_os = "linux") {
        assert!(r.peak_host_rss_bytes.unwrap() > 0);
    }
}

#[test]
fn args_map_to_config_and_validate() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }
    let cli = Cli::parse_from(["x"]);
    assert_eq!(cli.args.to_config().unwrap(), BenchConfig::default());
    let cli = Cli::parse_from(["x", "--objective.name", "safedpo", "--objective.delta", "5", "--seq-len", "64"]);
    let cfg = cli.args.to_config().unwrap();
    assert_eq!(cfg.objective, Objective::SafeDpo { beta: 0.1, delta: 5.0 });
    assert_eq!((cfg.seq_len, cfg.prompt_len), (64, 16));
    let bad = Cli::parse_from(["x", "--seq-len", "2000"]);
    let err = bad.args.to_config().unwrap_err().to_string();
    assert!(err.contains("seq_len"), "{err}");
    let bad = Cli::parse_from(["x", "--objective.name", "kto"]);
    assert!(bad.args.to_config().unwrap_err().to_string().contains("kto"));
}
