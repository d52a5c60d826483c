//! `Engine`'s gradient accumulation: a step over several micro-batches is the step over their union
//! (the mean loss over all pairs), on the CPU and on the emulated device; and TRL-style training.

use safedpo::{DecoderConfig, DeviceKind, Engine, PreferencePair};

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
