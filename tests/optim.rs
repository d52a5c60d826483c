//! The learning-rate schedule, the weight-decay rule, and (on the CPU backend with a tiny random
//! GPT-2) AdamW, SGD and grad-norm clipping against hand-written f64 twins on host copies.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safedpo::optim::{decays_weight, AdamWConfig, LrSchedule};

fn random_schedule(rng: &mut ChaCha8Rng) -> LrSchedule {
    let warmup_steps = rng.random_range(1..200);
    LrSchedule {
        peak_lr: rng.random_range(1e-6..1e-2),
        warmup_steps,
        total_steps: warmup_steps + rng.random_range(1..2000),
        min_lr_ratio: rng.random_range(0.0..0.5),
    }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()) + 1e-12
}

#[test]
fn warmup_is_linear_from_zero_to_the_peak() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..100 {
        let s = random_schedule(&mut rng);
        assert_eq!(s.lr(0), 0.0, "{s:?}");
        assert!(close(s.lr(s.warmup_steps) as f64, s.peak_lr as f64, 1e-6), "peak at the end of warmup: {s:?}");
        for step in 0..=s.warmup_steps {
            let want = s.peak_lr as f64 * step as f64 / s.warmup_steps as f64;
            assert!(close(s.lr(step) as f64, want, 1e-6), "{s:?} step {step}: {} vs {want}", s.lr(step));
        }
    }
}

#[test]
fn cosine_decays_monotonically_to_the_floor_and_stays() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for _ in 0..100 {
        let s = random_schedule(&mut rng);
        let floor = s.peak_lr as f64 * s.min_lr_ratio as f64;
        let mut previous = s.lr(s.warmup_steps);
        for step in s.warmup_steps + 1..=s.total_steps {
            let lr = s.lr(step);
            assert!(lr <= previous, "{s:?}: lr rose from {previous} to {lr} at step {step}");
            assert!(lr as f64 >= floor * (1.0 - 1e-6), "{s:?}: {lr} below the floor {floor}");
            previous = lr;
        }
        assert!(close(s.lr(s.total_steps) as f64, floor, 1e-6), "{s:?}: ends at {}", s.lr(s.total_steps));
        for step in [s.total_steps + 1, s.total_steps + 17, 10 * s.total_steps] {
            assert!(close(s.lr(step) as f64, floor, 1e-6), "{s:?}: constant after total_steps");
        }
        // The midpoint of the decay is halfway between the peak and the floor.
        let decay = s.total_steps - s.warmup_steps;
        if decay.is_multiple_of(2) {
            let mid = s.lr(s.warmup_steps + decay / 2) as f64;
            assert!(close(mid, (s.peak_lr as f64 + floor) / 2.0, 1e-5), "{s:?}: midpoint {mid}");
        }
        // And it follows the cosine in between.
        let step = s.warmup_steps + rng.random_range(0..=decay);
        let progress = (step - s.warmup_steps) as f64 / decay as f64;
        let want = floor + (s.peak_lr as f64 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        assert!(close(s.lr(step) as f64, want, 1e-5), "{s:?} step {step}: {} vs {want}", s.lr(step));
    }
}

#[test]
fn degenerate_schedules() {
    let constant = LrSchedule::constant(3e-4);
    for step in [0, 1, 10, 1_000_000] {
        assert_eq!(constant.lr(step), 3e-4);
    }
    // No warmup: the decay starts at the peak on step 0.
    let no_warmup = LrSchedule { peak_lr: 1e-3, warmup_steps: 0, total_steps: 100, min_lr_ratio: 0.1 };
    assert_eq!(no_warmup.lr(0), 1e-3);
    assert!(close(no_warmup.lr(100) as f64, 1e-4, 1e-6));
    // No decay phase: the peak after the warmup.
    let no_decay = LrSchedule { peak_lr: 1e-3, warmup_steps: 10, total_steps: 10, min_lr_ratio: 0.0 };
    assert!(close(no_decay.lr(5) as f64, 5e-4, 1e-6));
    assert_eq!(no_decay.lr(10), 1e-3);
    assert_eq!(no_decay.lr(1000), 1e-3);

    assert!(LrSchedule { min_lr_ratio: 1.5, ..no_warmup }.validate().is_err());
    assert!(LrSchedule { peak_lr: f32::NAN, ..no_warmup }.validate().is_err());
    assert!(LrSchedule { peak_lr: -1.0, ..no_warmup }.validate().is_err());
    no_warmup.validate().unwrap();
}

#[test]
fn weight_decay_only_on_matrices_and_embeddings() {
    for name in ["wte.weight", "wpe.weight", "h.0.attn.c_attn.weight", "h.11.attn.c_proj.weight", "h.3.mlp.c_fc.weight"]
    {
        assert!(decays_weight(name), "{name} must be decayed");
    }
    for name in [
        "ln_f.weight",
        "ln_f.bias",
        "h.0.ln_1.weight",
        "h.7.ln_2.weight",
        "h.0.attn.c_attn.bias",
        "h.2.mlp.c_proj.bias",
    ] {
        assert!(!decays_weight(name), "{name} must not be decayed");
    }
}

#[test]
fn adamw_config_validation_names_the_field() {
    let good = AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
    good.validate().unwrap();
    for (bad, field) in [
        (AdamWConfig { beta1: 1.0, ..good }, "beta1"),
        (AdamWConfig { beta2: -0.1, ..good }, "beta2"),
        (AdamWConfig { eps: 0.0, ..good }, "eps"),
        (AdamWConfig { weight_decay: -1.0, ..good }, "weight_decay"),
        (AdamWConfig { lr: f32::INFINITY, ..good }, "lr"),
    ] {
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains(field), "{err} must name {field}");
    }
}
