//! The objectives on unpaired examples (KTO, TRL's `apo_zero_unpaired`): their loss against the
//! formula (computed naively here) and its gradient against finite differences, against TRL's own
//! code (`tests/fixtures/trl_kto.json`, from `scripts/make-trl-kto-fixtures.py`), the f64
//! specification and the preference-loss op on the CPU and the emulated device; the reader's
//! errors; training end to end (the loss goes down), on the CPU and on the emulated device, an
//! interrupted run resumed bit for bit, and both reachable from `safedpo train` (TOML and flags).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::prelude::*;
use safedpo::backend::{ExampleParts, PreferenceLossInputs, EXAMPLE_METRICS};
use safedpo::config::RunConfig;
use safedpo::data::{
    load_examples, synthetic_pku_rows, write_examples_jsonl, write_pku_jsonl, DataFormat, PairSelection,
    UnpairedExample,
};
use safedpo::loss::{kl_estimate, unpaired_loss, ExampleInput, Kto, KtoLoss, Objective};
use safedpo::model::Decoder;
use safedpo::train::checkpoint::read_latest;
use safedpo::train::{train, Resume, RunSummary, Task, TrainOptions};

fn kto(loss: KtoLoss, beta: f64, desirable_weight: f64, undesirable_weight: f64, safety_margin: f64) -> Kto {
    Kto { loss, beta, desirable_weight, undesirable_weight, safety_margin }
}

/// `1 − σ(x)` as the papers write it (naive: the inputs are moderate).
fn one_minus_sigmoid(x: f64) -> f64 {
    1.0 - 1.0 / (1.0 + (-x).exp())
}

/// The batch's mean loss from the formula, the KL estimate given.
fn naive_mean_loss(objective: &Kto, examples: &[ExampleInput], kl: f64) -> f64 {
    let total: f64 = examples
        .iter()
        .map(|e| {
            let shift = if e.completion_unsafe { objective.safety_margin } else { 0.0 };
            let r = objective.beta * (e.policy - e.reference) + shift;
            let kl_term = if objective.loss == KtoLoss::Kto { objective.beta * kl } else { 0.0 };
            match (objective.loss, e.desirable) {
                (_, true) => objective.desirable_weight * one_minus_sigmoid(r - kl_term),
                (KtoLoss::Kto, false) => objective.undesirable_weight * one_minus_sigmoid(kl_term - r),
                (KtoLoss::ApoZeroUnpaired, false) => objective.undesirable_weight * (1.0 - one_minus_sigmoid(r)),
            }
        })
        .sum();
    total / examples.len() as f64
}

#[test]
fn the_loss_is_the_formula_and_its_gradient_the_derivative() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for case in 0..40 {
        let loss = if case % 2 == 0 { KtoLoss::Kto } else { KtoLoss::ApoZeroUnpaired };
        let margin = if case % 3 == 0 { 0.0 } else { rng.random_range(0.0..4.0) };
        let objective =
            kto(loss, rng.random_range(0.05..1.0), rng.random_range(0.0..2.0), rng.random_range(0.0..2.0), margin);
        let n = rng.random_range(1..9);
        let examples: Vec<ExampleInput> = (0..n)
            .map(|_| {
                let reference = rng.random_range(-150.0..-5.0);
                ExampleInput {
                    policy: reference + rng.random_range(-6.0..6.0),
                    reference,
                    desirable: rng.random_bool(0.5),
                    completion_unsafe: rng.random_bool(0.4),
                }
            })
            .collect();
        let policy_kl: Vec<f64> = (0..n).map(|_| rng.random_range(-80.0..-10.0)).collect();
        let reference_kl: Vec<f64> = policy_kl.iter().map(|p| p - rng.random_range(-2.0..3.0)).collect();
        let kl = kl_estimate(&policy_kl, &reference_kl);
        let naive_kl = (policy_kl.iter().zip(&reference_kl).map(|(p, r)| p - r).sum::<f64>() / n as f64).max(0.0);
        assert!((kl - naive_kl).abs() < 1e-12);

        let out = unpaired_loss(&objective, &examples, kl);
        let mean = out.iter().map(|o| o.loss).sum::<f64>() / n as f64;
        let want = naive_mean_loss(&objective, &examples, kl);
        assert!((mean - want).abs() < 1e-12, "case {case}: {mean} vs {want}");
        for (i, o) in out.iter().enumerate() {
            assert_eq!(o.reward, objective.beta * (examples[i].policy - examples[i].reference));
            // d(mean)/dπ_i by central differences, the KL estimate held (TRL detaches it).
            let h = 1e-5;
            let at = |delta: f64| {
                let mut moved = examples.clone();
                moved[i].policy += delta;
                naive_mean_loss(&objective, &moved, kl)
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            let got = o.d_policy / n as f64;
            assert!((got - fd).abs() < 1e-8 * (1.0 + fd.abs()), "case {case}, example {i}: {got} vs {fd}");
        }
    }
}

#[test]
fn the_loss_is_trls() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trl_kto.json");
    let fixture: serde_json::Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    let floats = |case: &serde_json::Value, key: &str| -> Vec<f64> {
        case[key].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    };
    let mut covered = Vec::new();
    for case in fixture["cases"].as_array().unwrap() {
        let loss_type = case["loss_type"].as_str().unwrap();
        let mut objective = Objective::default_for(loss_type).unwrap();
        for key in ["beta", "desirable_weight", "undesirable_weight"] {
            objective.set_param(key, case[key].as_f64().unwrap()).unwrap();
        }
        let objective = *objective.as_unpaired().unwrap();
        let labels: Vec<bool> = case["labels"].as_array().unwrap().iter().map(|b| b.as_bool().unwrap()).collect();
        let (policy, reference) = (floats(case, "policy_logps"), floats(case, "ref_logps"));
        let examples: Vec<ExampleInput> = (0..labels.len())
            .map(|i| ExampleInput {
                policy: policy[i],
                reference: reference[i],
                desirable: labels[i],
                ..Default::default()
            })
            .collect();
        let kl = if objective.estimates_kl() {
            kl_estimate(&floats(case, "policy_kl_logps"), &floats(case, "ref_kl_logps"))
        } else {
            0.0
        };
        let close = |what: &str, got: f64, want: f64| {
            assert!((got - want).abs() <= 1e-12 * (1.0 + want.abs()), "{loss_type} {what}: {got} vs TRL's {want}");
        };
        close("kl", kl, case["kl"].as_f64().unwrap());
        let out = unpaired_loss(&objective, &examples, kl);
        let (losses, grad, rewards) = (floats(case, "losses"), floats(case, "grad"), floats(case, "rewards"));
        let n = labels.len() as f64;
        for (i, o) in out.iter().enumerate() {
            close("loss", o.loss, losses[i]);
            close("gradient", o.d_policy / n, grad[i]);
            close("reward", o.reward, rewards[i]);
        }
        close("batch loss", out.iter().map(|o| o.loss).sum::<f64>() / n, case["loss"].as_f64().unwrap());
        covered.push(loss_type.to_string());
    }
    for name in ["kto", "apo_zero_unpaired"] {
        assert!(covered.iter().any(|c| c == name), "the fixture has no {name} case");
    }
}

/// The op's metrics and gradient of a fixture case on `b`: the examples' log-probs, labels and KL
/// sequences uploaded as f32, `grad_scale` = 1/N (the gradient of the batch's mean loss).
fn op_outputs<B: Backend>(b: &B, objective: &Objective, case: &serde_json::Value) -> (Vec<f32>, Vec<f32>) {
    let floats = |key: &str| -> Vec<f32> {
        case[key].as_array().map_or(Vec::new(), |a| a.iter().map(|x| x.as_f64().unwrap() as f32).collect())
    };
    let desirable: Vec<i32> =
        case["labels"].as_array().unwrap().iter().map(|l| i32::from(l.as_bool().unwrap())).collect();
    let n = desirable.len();
    let (policy, reference) = (b.upload(&floats("policy_logps")).unwrap(), b.upload(&floats("ref_logps")).unwrap());
    let (policy_kl, reference_kl) =
        (b.upload(&floats("policy_kl_logps")).unwrap(), b.upload(&floats("ref_kl_logps")).unwrap());
    let (flags, lengths, desirable) =
        (b.upload_ids(&vec![0; n]).unwrap(), b.upload_ids(&vec![1; n]).unwrap(), b.upload_ids(&desirable).unwrap());
    let examples =
        ExampleParts { desirable: &desirable, policy_kl: Some(&policy_kl), reference_kl: Some(&reference_kl) };
    let inputs = PreferenceLossInputs {
        grad_scale: 1.0 / n as f32,
        ..PreferenceLossInputs::examples(&policy, &reference, &flags, &lengths, examples, objective)
    };
    let (mut metrics, mut grads) =
        (b.upload(&vec![f32::NAN; n * EXAMPLE_METRICS]).unwrap(), b.upload(&vec![f32::NAN; n]).unwrap());
    b.preference_loss(&mut metrics, &mut grads, &inputs).unwrap();
    (b.download(&metrics).unwrap(), b.download(&grads).unwrap())
}

/// TRL's fixture cases through the preference-loss op, on the CPU (the f64 specification, rounded
/// to f32) and on the emulated device (the f32 kernel, the KL estimate formed in it), to f32's
/// precision: each value within 1e-5 of itself plus what rounding the log-probs to f32 moves it
/// (a log-ratio by up to `e = 2^-23 · max|logp|`: a reward by β·e, a loss by λ·β·e, a gradient by
/// λ·β²·e/N).
#[test]
fn the_loss_op_is_trls_on_the_cpu_and_the_emulated_device() {
    use safedpo::backend::cuda::{CudaBackend, Device, Precision};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trl_kto.json");
    let fixture: serde_json::Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    let emu = CudaBackend::new(Device::emulated().unwrap(), Precision::F32);
    for case in fixture["cases"].as_array().unwrap() {
        let loss_type = case["loss_type"].as_str().unwrap();
        let mut objective = Objective::default_for(loss_type).unwrap();
        for key in ["beta", "desirable_weight", "undesirable_weight"] {
            objective.set_param(key, case[key].as_f64().unwrap()).unwrap();
        }
        let want =
            |key: &str| -> Vec<f64> { case[key].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect() };
        let largest = ["policy_logps", "ref_logps", "policy_kl_logps", "ref_kl_logps"]
            .iter()
            .flat_map(|key| case[*key].as_array().into_iter().flatten().map(|x| x.as_f64().unwrap().abs()))
            .fold(0.0, f64::max);
        let kto = *objective.as_unpaired().unwrap();
        let (e, weight, n) =
            (largest * 2f64.powi(-23), kto.desirable_weight.max(kto.undesirable_weight), want("losses").len());
        let (reward_error, loss_error) = (kto.beta * e, weight * kto.beta * e);
        let grad_error = weight * kto.beta * kto.beta * e / n as f64;
        for (device, (metrics, grads)) in
            [("cpu", op_outputs(&CpuBackend::new(), &objective, case)), ("emu", op_outputs(&emu, &objective, case))]
        {
            let close = |what: &str, got: f32, want: f64, rounding: f64| {
                let tolerance = 1e-5 * want.abs() + rounding + 1e-9;
                assert!(
                    (f64::from(got) - want).abs() <= tolerance,
                    "{loss_type} on {device}, {what}: {got} vs TRL's {want}"
                );
            };
            let rows: Vec<&[f32]> = metrics.chunks(EXAMPLE_METRICS).collect();
            for (i, row) in rows.iter().enumerate() {
                close(&format!("loss {i}"), row[0], want("losses")[i], loss_error);
                close(&format!("reward {i}"), row[1], want("rewards")[i], reward_error);
                close(&format!("kl {i}"), row[2], case["kl"].as_f64().unwrap(), e);
                close(&format!("gradient {i}"), grads[i], want("grad")[i], grad_error);
            }
            let mean = rows.iter().map(|row| f64::from(row[0])).sum::<f64>() / rows.len() as f64;
            close("batch loss", mean as f32, case["loss"].as_f64().unwrap(), loss_error);
        }
    }
}

#[test]
fn the_objectives_parse_validate_and_refuse_pairs() {
    let parsed: Objective = "kto:beta=0.2,desirable_weight=1.33,undesirable_weight=0.5".parse().unwrap();
    assert_eq!(parsed, Objective::Kto(kto(KtoLoss::Kto, 0.2, 1.33, 0.5, 0.0)));
    assert_eq!(parsed.to_string(), "kto:beta=0.2,desirable_weight=1.33,undesirable_weight=0.5,safety_margin=0");
    assert_eq!(parsed.to_string().parse::<Objective>().unwrap(), parsed);
    let apo = Objective::default_for("APO_ZERO_UNPAIRED").unwrap();
    assert_eq!(apo, Objective::Kto(kto(KtoLoss::ApoZeroUnpaired, 0.1, 1.0, 1.0, 0.0)));
    assert!(apo.uses_reference() && !apo.as_unpaired().unwrap().estimates_kl());
    for (bad, words) in [
        ("kto:desirable_weight=-1", &["desirable_weight", ">= 0"][..]),
        ("kto:beta=0", &["beta"]),
        ("kto:eps=0.1", &["eps", "desirable_weight"]),
        ("kto+sft", &["unpaired"]),
        ("kto:rpo_alpha=1", &["unpaired"]),
    ] {
        let err = format!("{:#}", bad.parse::<Objective>().unwrap_err());
        assert!(words.iter().all(|w| err.contains(w)), "{bad}: {err}");
    }
    let backend = CpuBackend::new();
    let (mut metrics, mut dpolicy) = (vec![0.0; 5], vec![0.0; 2]);
    let (logps, ids) = (vec![0.0; 2], vec![1; 2]);
    let inputs = PreferenceLossInputs::pairs(&logps, &logps, &ids, &ids, &parsed);
    let err = backend.preference_loss(&mut metrics, &mut dpolicy, &inputs).unwrap_err();
    assert!(format!("{err:#}").contains("unpaired"), "{err:#}");
}

#[test]
fn the_reader_names_the_file_the_line_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = r#"{"prompt": "p", "completion": "c", "label": true}"#;
    for (row, words) in [
        (r#"{"prompt": "p", "completion": "c"}"#, &["field 'label'", "missing", "true or false"][..]),
        (r#"{"prompt": "p", "completion": "c", "label": "yes"}"#, &["field 'label'", "string \"yes\""]),
        (r#"{"prompt": "p", "completion": "c", "label": 1}"#, &["field 'label'", "number 1"]),
        (r#"{"prompt": "p", "completion": "", "label": true}"#, &["field 'completion'", "empty string"]),
        (r#"{"prompt": 3, "completion": "c", "label": true}"#, &["field 'prompt'", "number 3"]),
        (r#"{"prompt": "p", "label": false}"#, &["field 'completion'", "missing"]),
        (r#"{"prompt": "p", "completion": "c", "label": true, "completion_unsafe": "no"}"#, &["completion_unsafe"]),
        (r#"{"prompt": "p", "completion": "c", "label": true"#, &["malformed JSON"]),
        (r#"[1, 2]"#, &["JSON object", "array"]),
        (r#"{"prompt": "p", "completion": "c", "label": true, "label": false}"#, &["field 'label'", "twice"]),
    ] {
        let path = dir.path().join("bad.jsonl");
        fs::write(&path, format!("{good}\n\n{row}\n{good}\n")).unwrap();
        let err = format!("{:#}", load_examples(&path, DataFormat::Auto, PairSelection::Better, false).unwrap_err());
        let at = format!("{}:3: ", path.display());
        assert!(err.contains(&at) && words.iter().all(|w| err.contains(w)), "{row}: {err}");
        // Skipped and counted when asked.
        let (examples, report) = load_examples(&path, DataFormat::Unpaired, PairSelection::Better, true).unwrap();
        assert_eq!((examples.len(), report.skipped_invalid, report.lines), (2, 1, 3), "{row}");
    }
    // A byte order mark at the start of the file is no part of the first row.
    let path = dir.path().join("bom.jsonl");
    fs::write(&path, format!("\u{feff}{good}\n")).unwrap();
    assert_eq!(load_examples(&path, DataFormat::Auto, PairSelection::Better, false).unwrap().0.len(), 1);
    // Unpaired rows are no pairs: the pairs' reader says whose data they are.
    let path = dir.path().join("unpaired.jsonl");
    fs::write(&path, format!("{good}\n")).unwrap();
    let err = safedpo::data::load_pairs(&path, DataFormat::Auto, PairSelection::Better, false).unwrap_err();
    assert!(format!("{err:#}").contains("kto"), "{err:#}");
}

#[test]
fn the_selection_relabels_and_pairs_are_unpaired() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.jsonl");
    let rows = [
        UnpairedExample::new("p0", "safe good", true),
        UnpairedExample::new("p1", "unsafe good", true).with_unsafe(true),
        UnpairedExample::new("p2", "safe bad", false),
        UnpairedExample::new("p3", "unsafe bad", false).with_unsafe(true),
    ];
    write_examples_jsonl(&path, &rows).unwrap();
    let labels = |selection| {
        let (examples, report) = load_examples(&path, DataFormat::Auto, selection, false).unwrap();
        (examples.iter().map(|e| e.label).collect::<Vec<_>>(), report.relabelled)
    };
    assert_eq!(labels(PairSelection::Better), (vec![true, true, false, false], 0));
    assert_eq!(labels(PairSelection::SafeDpo), (vec![true, false, false, false], 1));
    assert_eq!(labels(PairSelection::Safer), (vec![true, false, true, false], 2));

    // PKU rows: T(D), then each pair's chosen response desirable and its rejected one not.
    let pku = dir.path().join("pku.jsonl");
    write_pku_jsonl(&pku, &synthetic_pku_rows(30, 2)).unwrap();
    let (pairs, _) = safedpo::data::load_pairs(&pku, DataFormat::Auto, PairSelection::SafeDpo, false).unwrap();
    let (examples, report) = load_examples(&pku, DataFormat::Auto, PairSelection::SafeDpo, false).unwrap();
    assert_eq!(examples, safedpo::data::unpair(pairs.clone()));
    assert_eq!((report.desirable, report.undesirable), (pairs.len(), pairs.len()));
    assert!(examples.iter().filter(|e| e.label).all(|e| !e.completion_unsafe), "T(D) leaves no unsafe chosen");
}

fn backend() -> Arc<CpuBackend> {
    Arc::new(CpuBackend::new())
}

fn quiet() -> TrainOptions {
    TrainOptions { quiet: true, ..Default::default() }
}

/// The demo's synthetic safety pairs, unpaired, as unpaired rows.
fn unpaired_data(dir: &Path, n: usize, seed: u64) -> PathBuf {
    let pku = dir.join("pku.jsonl");
    write_pku_jsonl(&pku, &synthetic_pku_rows(n, seed)).unwrap();
    let (examples, _) = load_examples(&pku, DataFormat::Auto, PairSelection::SafeDpo, false).unwrap();
    let path = dir.join("unpaired.jsonl");
    write_examples_jsonl(&path, &examples).unwrap();
    path
}

fn tiny_kto_config(out: &Path, data: &Path, objective: &str) -> RunConfig {
    let mut c = RunConfig { out_dir: out.to_path_buf(), seed: 7, precompute_ref: false, ..Default::default() };
    c.objective = objective.parse().unwrap();
    c.data.path = Some(data.to_path_buf());
    c.data.template = "U: {prompt} A:".into();
    (c.data.max_len, c.model.n_positions) = (96, 96);
    c.data.eval_fraction = 0.2;
    (c.model.n_layer, c.model.n_embd, c.model.n_head) = (1, 16, 2);
    (c.batching.tokens_per_micro_batch, c.batching.grad_accum) = (1200, 2);
    (c.optimizer.lr, c.optimizer.warmup_steps, c.optimizer.total_steps) = (3e-3, 0, Some(6));
    c.intervals.eval_every = 0;
    c.intervals.checkpoint_every = 0;
    c
}

fn eval(summary: &RunSummary, first: bool, key: &str) -> f64 {
    let rec = if first { &summary.first_eval } else { &summary.last_eval };
    rec.as_ref().unwrap()[key].as_f64().unwrap_or_else(|| panic!("no {key}"))
}

/// Both objectives lower their held-out loss on the CPU and on the emulated device, which agree;
/// before the first step the policy is its reference, so every example's loss is ½ its weight and
/// the KL estimate 0.
#[test]
fn kto_trains_on_the_cpu_and_on_the_emulated_device() {
    use safedpo::backend::cuda::{CudaBackend, Device, Precision};
    let dir = tempfile::tempdir().unwrap();
    let data = unpaired_data(dir.path(), 60, 4);
    let emu = Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::F32));
    for objective in ["kto:desirable_weight=1.2", "apo_zero_unpaired"] {
        let name = objective.split(':').next().unwrap();
        let cpu_cfg = tiny_kto_config(&dir.path().join(format!("{name}-cpu")), &data, objective);
        let mut emu_cfg = cpu_cfg.clone();
        emu_cfg.out_dir = dir.path().join(format!("{name}-emu"));
        let a = train(backend(), &cpu_cfg, Task::Preference, &quiet()).unwrap();
        let b = train(emu.clone(), &emu_cfg, Task::Preference, &quiet()).unwrap();
        assert!(a.completed && b.completed && a.train_pairs > 0 && a.eval_pairs > 0, "{name}");
        let kto = *cpu_cfg.objective.as_unpaired().unwrap();
        let records = safedpo::plot::read_metrics(&cpu_cfg.out_dir.join("metrics.jsonl")).unwrap();
        let eval0 = &records[0];
        let (desirable, undesirable) = (eval0["eval/rewards/chosen"].as_f64(), eval0["eval/rewards/rejected"].as_f64());
        assert_eq!((desirable, undesirable, eval0["eval/kl"].as_f64()), (Some(0.0), Some(0.0), Some(0.0)), "{name}");
        let before = eval(&a, true, "eval/loss");
        assert!(before > 0.5 * kto.undesirable_weight.min(kto.desirable_weight) - 1e-12, "{name}: {before}");
        assert!(before < 0.5 * kto.undesirable_weight.max(kto.desirable_weight) + 1e-12, "{name}: {before}");
        let after = eval(&a, false, "eval/loss");
        assert!(after < before, "{name}: held-out loss {before} -> {after}");
        assert!(eval(&a, false, "eval/rewards/margins") > 0.0, "{name}");
        let train_records: Vec<_> = records.iter().filter(|r| r.contains_key("loss")).collect();
        assert_eq!(train_records.len(), 6, "{name}");
        for r in &train_records {
            for key in ["loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "grad_norm"] {
                assert!(r[key].as_f64().is_some_and(f64::is_finite), "{name}: {key} in {r:?}");
            }
            assert!(r["kl"].as_f64().unwrap() >= 0.0);
        }
        for k in ["eval/loss", "eval/rewards/margins", "eval/kl", "eval/logps/chosen"] {
            let (x, y) = (eval(&a, false, k), eval(&b, false, k));
            assert!((x - y).abs() <= 1e-3 * (1.0 + x.abs()), "{name} {k}: cpu {x} vs emu {y}");
        }
    }
}

/// An interrupted run resumed from its checkpoint ends bit for bit where the uninterrupted one does.
#[test]
fn an_interrupted_kto_run_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = unpaired_data(dir.path(), 40, 9);
    let straight = tiny_kto_config(&dir.path().join("straight"), &data, "kto:safety_margin=2");
    let mut resumed = straight.clone();
    resumed.out_dir = dir.path().join("resumed");
    train(backend(), &straight, Task::Preference, &quiet()).unwrap();
    train(backend(), &resumed, Task::Preference, &TrainOptions { stop_after_step: Some(3), ..quiet() }).unwrap();
    assert!(read_latest(&resumed.out_dir).unwrap().unwrap().ends_with("checkpoint-3"));
    let second = train(backend(), &resumed, Task::Preference, &TrainOptions { resume: Some(Resume::Auto), ..quiet() });
    assert_eq!(second.unwrap().steps_this_run, 3);
    for file in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        let (x, y) = (straight.out_dir.join("final").join(file), resumed.out_dir.join("final").join(file));
        assert!(fs::read(x).unwrap() == fs::read(y).unwrap(), "final/{file} differs");
    }
    let init = Decoder::random(backend(), straight.model.random_shape(258), straight.seed).unwrap().to_host().unwrap();
    let trained = Decoder::load(backend(), &straight.out_dir.join("final")).unwrap().to_host().unwrap();
    assert_ne!(init.tensors["h.0.attn.c_attn.weight"], trained.tensors["h.0.attn.c_attn.weight"]);
}

fn safedpo(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_safedpo")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn kto_runs_from_the_command_line_with_toml_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let data = unpaired_data(dir.path(), 30, 6);
    let toml = dir.path().join("kto.toml");
    let text = format!(
        "precompute_ref = false\n\n[data]\npath = {:?}\ntemplate = \"U: {{prompt}} A:\"\nmax_len = 96\n\n\
         [model]\nn_layer = 1\nn_embd = 16\nn_head = 2\nn_positions = 96\n\n\
         [objective]\nname = \"kto\"\nbeta = 0.2\nundesirable_weight = 1.5\n\n\
         [batching]\ntokens_per_micro_batch = 800\n\n[optimizer]\ntotal_steps = 3\nlr = 1e-3\n",
        data.to_str().unwrap()
    );
    fs::write(&toml, text).unwrap();
    let out_dir = dir.path().join("run");
    let common = ["--config", toml.to_str().unwrap(), "--out-dir", out_dir.to_str().unwrap(), "--no-progress"];
    let (ok, stdout, stderr) =
        safedpo(&[&["train"][..], &common, &["--device", "cpu", "--objective.desirable_weight", "0.8"]].concat());
    assert!(ok, "{stdout}\n{stderr}");
    let resolved = RunConfig::from_toml_file(&out_dir.join("config.toml")).unwrap();
    assert_eq!(resolved.objective, Objective::Kto(kto(KtoLoss::Kto, 0.2, 0.8, 1.5, 0.0)));
    let metrics = fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    let kls: Vec<f64> =
        metrics.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kl"].as_f64()).collect();
    assert!(kls.len() >= 3, "{metrics}");

    // The reference cache is refused, with the setting named; so is a pairwise objective on
    // unpaired rows.
    let cached = dir.path().join("cached");
    let (ok, _, stderr) = safedpo(&[
        "train",
        "--config",
        toml.to_str().unwrap(),
        "--out-dir",
        cached.to_str().unwrap(),
        "--precompute-ref",
        "true",
    ]);
    assert!(!ok && stderr.contains("precompute_ref") && stderr.contains("kto"), "{stderr}");
    let (ok, _, stderr) = safedpo(&[
        "train",
        "--data.path",
        data.to_str().unwrap(),
        "--out-dir",
        cached.to_str().unwrap(),
        "--objective.name",
        "dpo",
        "--data.format",
        "unpaired",
    ]);
    assert!(!ok && stderr.contains("data.format"), "{stderr}");
}
