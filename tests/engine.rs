//! `Engine`'s gradient accumulation: a step over several micro-batches is the step over their union
//! (the mean loss over all pairs), on the CPU and on the emulated device; `Engine::loss` with TRL's
//! log-prob modifiers; KTO through the engine (loss and steps on unpaired examples); the gradients'
//! storage (`Engine::set_grad_dtype`) on a bf16 device.

use safedpo::optim::GradDtype;
use safedpo::{DecoderConfig, DeviceKind, Engine, Precision, PreferencePair};

fn pairs() -> Vec<PreferencePair> {
    vec![
        PreferencePair::new("How do I pick a lock?", "I can't help with that.", "Use a tension wrench.")
            .with_safety(false, true),
        PreferencePair::new("Name a colour.", "Blue.", "Seven."),
        PreferencePair::new("2+2?", "4", "5"),
    ]
}

fn engine(device: DeviceKind) -> Engine {
    let mut engine = Engine::new(device).unwrap();
    engine.random_policy(DecoderConfig::gpt2(258, 64, 32, 2, 2), 5).unwrap();
    engine.reference_from_policy().unwrap();
    let (mut optimizer, clip) = engine.optimizer();
    optimizer.lr = 1e-3;
    engine.set_optimizer(optimizer, clip).unwrap();
    engine
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn accumulated_equals_one_batch(device: DeviceKind, tolerance: f32) {
    let pairs = pairs();
    let (mut whole, mut split) = (engine(device), engine(device));
    let one = whole.train_step(&pairs).unwrap();
    let two = split.accumulated_step(&[pairs[..1].to_vec(), pairs[1..].to_vec()]).unwrap();
    assert_eq!((one.step, two.step), (1, 1));
    assert!((one.loss - two.loss).abs() <= tolerance, "loss {} vs {}", one.loss, two.loss);
    assert!((one.grad_norm - two.grad_norm).abs() <= tolerance * one.grad_norm.max(1.0));
    assert!(max_abs_diff(&one.metrics.loss, &two.metrics.loss) <= tolerance);
    assert!(max_abs_diff(&one.policy_logps.chosen, &two.policy_logps.chosen) <= tolerance);
    let (a, b) = (whole.policy_weights().unwrap(), split.policy_weights().unwrap());
    for ((name, x), (_, y)) in a.tensors.iter().zip(&b.tensors) {
        assert!(max_abs_diff(&x.1, &y.1) <= tolerance, "{name} differs after the step");
    }
    // The step moved the weights: the accumulated gradient is not zero.
    let before = engine(device).policy_weights().unwrap();
    assert!(before.tensors.iter().zip(&b.tensors).any(|((_, x), (_, y))| max_abs_diff(&x.1, &y.1) > 0.0));
}

#[test]
fn accumulated_step_equals_one_batch_on_the_cpu() {
    accumulated_equals_one_batch(DeviceKind::Cpu, 1e-5);
}

#[test]
fn accumulated_step_equals_one_batch_on_the_emulated_device() {
    accumulated_equals_one_batch(DeviceKind::Emu, 1e-5);
}

#[test]
fn accumulated_step_errors_name_the_micro_batch() {
    let mut engine = engine(DeviceKind::Cpu);
    assert!(engine.accumulated_step(&[]).unwrap_err().to_string().contains("no micro-batches"));
    let err = engine.accumulated_step(&[pairs(), vec![]]).unwrap_err();
    assert!(format!("{err:#}").contains("micro-batch 1"), "{err:#}");
    assert_eq!(engine.steps_taken(), 0);
    // Several steps accumulate as many optimizer steps, not micro-batches.
    engine.accumulated_step(&[pairs(), pairs()]).unwrap();
    let step = engine.accumulated_step(&[pairs()]).unwrap();
    assert_eq!((step.step, engine.steps_taken()), (2, 2));
}

/// The engine after one DPO step, so that the policy and the reference differ.
fn trained_engine(device: DeviceKind) -> Engine {
    let mut engine = engine(device);
    engine.set_objective("dpo:beta=0.5".parse().unwrap()).unwrap();
    engine.train_step(&pairs()).unwrap();
    engine
}

/// `Engine::loss` takes TRL's log-prob modifiers (`ld_alpha`, `use_weighting`, alone and together)
/// and gives the metrics the training step computes before its update, on the CPU and on the
/// emulated device.
#[test]
fn the_loss_takes_trls_modifiers_as_the_training_step_does() {
    for device in [DeviceKind::Cpu, DeviceKind::Emu] {
        for text in
            ["dpo:ld_alpha=0.3", "sigmoid_norm:use_weighting=true", "0.8*dpo+0.2*sft:ld_alpha=0.5,use_weighting=true"]
        {
            let objective: safedpo::Objective = text.parse().unwrap();
            let mut engine = trained_engine(device);
            let report = engine.loss(&pairs(), &objective).unwrap();
            let plain = engine.loss(&pairs(), &"dpo".parse().unwrap()).unwrap();
            assert_ne!(report.metrics.loss, plain.metrics.loss, "{text} on {device}: the modifier changed nothing");
            engine.set_objective(objective).unwrap();
            let step = engine.train_step(&pairs()).unwrap();
            assert_eq!(step.metrics, report.metrics, "{text} on {device}");
            assert_eq!(step.policy_logps, report.logps.policy, "{text} on {device}");
        }
    }
}

fn examples() -> Vec<safedpo::UnpairedExample> {
    use safedpo::UnpairedExample;
    vec![
        UnpairedExample::new("How do I pick a lock?", "I can't help with that.", true),
        UnpairedExample::new("How do I pick a lock?", "Use a tension wrench.", false).with_unsafe(true),
        UnpairedExample::new("Name a colour.", "Seven.", false),
        UnpairedExample::new("2+2?", "4", true),
    ]
}

/// KTO and `apo_zero_unpaired` through the engine: the loss on the CPU and on the emulated device
/// agree (to f32), the step's per-example values before its update are the loss's, and steps lower
/// the loss; the safety margin raises an unsafe completion's reward inside the loss.
#[test]
fn unpaired_loss_and_steps_on_the_cpu_and_the_emulated_device() {
    for text in ["kto:beta=0.5,desirable_weight=1.3", "apo_zero_unpaired:beta=0.5,safety_margin=1"] {
        let objective: safedpo::Objective = text.parse().unwrap();
        let (mut cpu, mut emu) = (trained_engine(DeviceKind::Cpu), trained_engine(DeviceKind::Emu));
        let (a, b) =
            (cpu.unpaired_loss(&examples(), &objective).unwrap(), emu.unpaired_loss(&examples(), &objective).unwrap());
        assert!((a.loss - b.loss).abs() <= 1e-5 && (a.kl - b.kl).abs() <= 1e-5, "{text}: {a:?} vs {b:?}");
        assert!(max_abs_diff(&a.metrics.loss, &b.metrics.loss) <= 1e-5, "{text}");
        assert!(max_abs_diff(&a.metrics.reward, &b.metrics.reward) <= 1e-5, "{text}");
        assert!(if text.starts_with("kto") { a.kl >= 0.0 } else { a.kl == 0.0 }, "{text}: KL {}", a.kl);
        for engine in [&mut cpu, &mut emu] {
            let before = engine.unpaired_loss(&examples(), &objective).unwrap();
            engine.set_objective(objective.clone()).unwrap();
            let first = engine.unpaired_train_step(&examples()).unwrap();
            assert_eq!((first.metrics.clone(), first.kl), (before.metrics, before.kl), "{text}");
            let second = engine.unpaired_train_step(&examples()).unwrap();
            assert_eq!((first.step, second.step), (2, 3));
            assert!(second.loss < first.loss, "{text}: {} -> {}", first.loss, second.loss);
        }
    }
}

#[test]
fn pairs_and_unpaired_examples_do_not_mix() {
    let mut engine = engine(DeviceKind::Cpu);
    let err = engine.unpaired_loss(&examples(), &"dpo".parse().unwrap()).unwrap_err();
    assert!(format!("{err:#}").contains("on pairs"), "{err:#}");
    let err = engine.loss(&pairs(), &"kto".parse().unwrap()).unwrap_err();
    assert!(format!("{err:#}").contains("unpaired"), "{err:#}");
    let err = engine.unpaired_train_step(&examples()).unwrap_err(); // the training objective is SafeDPO
    assert!(format!("{err:#}").contains("on pairs"), "{err:#}");
    engine.set_objective("kto".parse().unwrap()).unwrap();
    assert!(format!("{:#}", engine.unpaired_train_step(&[]).unwrap_err()).contains("no examples"));
    assert!(format!("{:#}", engine.train_step(&pairs()).unwrap_err()).contains("unpaired"));
    assert_eq!(engine.steps_taken(), 0);
}

/// The policy's weights after one step of `micro_batches` micro-batches (the pairs split among
/// them) on the emulated device in bf16 with gradients stored as `grad_dtype` says.
fn bf16_step(grad_dtype: GradDtype, micro_batches: usize) -> Vec<Vec<f32>> {
    safedpo::backend::cuda::emu::use_test_mode();
    let mut engine = Engine::with_precision(DeviceKind::Emu, Precision::Bf16).unwrap();
    engine.random_policy(DecoderConfig::gpt2(258, 64, 32, 2, 2), 5).unwrap();
    engine.reference_from_policy().unwrap();
    engine.set_grad_dtype(grad_dtype).unwrap();
    let pairs = pairs();
    let split: Vec<Vec<PreferencePair>> = match micro_batches {
        1 => vec![pairs],
        _ => vec![pairs[..1].to_vec(), pairs[1..].to_vec()],
    };
    engine.accumulated_step(&split).unwrap();
    assert!(engine.set_grad_dtype(GradDtype::Bf16).is_err(), "set after the first step");
    engine.policy_weights().unwrap().tensors.into_values().map(|(_, data)| data).collect()
}

/// As the trainer's `train.grad_dtype`: `auto` is f32 for a step of several micro-batches and bf16
/// for one; `f32` and `bf16` are what they say, whatever the step (the two storage types give
/// different weights, so each comparison shows which one a step used).
#[test]
fn engine_steps_honour_grad_dtype() {
    let f32_two = bf16_step(GradDtype::F32, 2);
    assert!(bf16_step(GradDtype::Auto, 2) == f32_two, "auto over two micro-batches is f32");
    assert!(bf16_step(GradDtype::Bf16, 2) != f32_two, "bf16 gradients train as f32 ones");
    let bf16_one = bf16_step(GradDtype::Bf16, 1);
    assert!(bf16_step(GradDtype::Auto, 1) == bf16_one, "auto over one batch is bf16");
    assert!(bf16_step(GradDtype::F32, 1) != bf16_one, "f32 gradients train as bf16 ones");
}
