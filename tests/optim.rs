//! The learning-rate schedule, the weight-decay rule, and (on the CPU backend with a tiny random
//! GPT-2) AdamW, SGD and grad-norm clipping against the ops' f64 specs on host copies.

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safedpo::backend::cpu::{grad_norm, optimizer, CpuBackend};
use safedpo::backend::prelude::*;
use safedpo::backend::AdamWParams;
use safedpo::data::PackedBatch;
use safedpo::model::{Decoder, DecoderConfig, DeviceBatch};
use safedpo::optim::{clip_scale, decays_weight, sgd_step, AdamW, AdamWConfig, LrSchedule, STEP_KEY};

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
    // The Llama family: every norm gain exempt, every matrix (the head included) decayed.
    let llama = DecoderConfig::llama(40, 16, 16, 2, 2, 1, 24);
    let llama = DecoderConfig { tie_word_embeddings: false, qkv_bias: true, ..llama };
    for (name, shape) in llama.parameter_shapes() {
        let matrix = shape.len() == 2;
        assert_eq!(decays_weight(&name), matrix, "{name} {shape:?}");
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

// ---- AdamW, SGD and clipping on a tiny random GPT-2 (CPU backend) ---------------------------------

fn micro_config() -> DecoderConfig {
    DecoderConfig::gpt2(48, 32, 16, 2, 2)
}

fn tiny_model(seed: u64) -> Decoder<CpuBackend> {
    Decoder::random(Arc::new(CpuBackend::new()), micro_config(), seed).unwrap()
}

/// Fresh random gradients: zero, then one forward and backward of a random packed batch with a
/// random dL/d(seq logp).
fn random_grads(model: &mut Decoder<CpuBackend>, rng: &mut ChaCha8Rng) {
    let vocab = model.config().vocab_size as i32;
    // Fixed lengths (random tokens and prompt lengths): the model reuses its activation buffers
    // across batches, and the shape is not what these tests are about.
    let seqs: Vec<(Vec<i32>, usize)> = [9usize, 5, 12]
        .into_iter()
        .map(|len| {
            let toks = (0..len).map(|_| rng.random_range(0..vocab)).collect();
            (toks, rng.random_range(1..len))
        })
        .collect();
    let batch = PackedBatch::from_sequences(seqs.iter().map(|(t, p)| (t.as_slice(), *p)));
    let backend = model.backend().clone();
    let device_batch = DeviceBatch::upload(&*backend, &batch).unwrap();
    model.zero_grad().unwrap();
    model.forward(&device_batch).unwrap();
    let dseq: Vec<f32> = (0..batch.num_seqs()).map(|_| rng.random_range(-1.0..1.0)).collect();
    model.backward(&device_batch, &backend.upload(&dseq).unwrap()).unwrap();
}

/// Host copies, in the optimizer's order: (name, param, grad).
fn host_params_and_grads(model: &Decoder<CpuBackend>, opt: &AdamW<CpuBackend>) -> Vec<(String, Vec<f32>, Vec<f32>)> {
    let weights = model.to_host().unwrap();
    let grads = model.grads().unwrap();
    let plan = opt.decay_plan();
    assert_eq!(plan.len(), grads.len());
    plan.iter()
        .zip(grads)
        .map(|((name, _), grad)| {
            let param = weights.tensors.get(*name).unwrap_or_else(|| panic!("to_host has no {name}")).1.clone();
            (name.to_string(), param, model.backend().download(grad).unwrap())
        })
        .collect()
}

/// The f64 AdamW twin: the op's spec (`optimizer::spec::adamw`, PyTorch's `AdamW`) on host copies,
/// with each tensor's moments kept by name. Beside each value it tracks the size of the operands
/// that produced it (`m_size`, and the parameter's in `step`'s second result), the scale of the f32
/// rounding error the backend may make.
struct HostAdamW {
    m: BTreeMap<String, Vec<f64>>,
    m_size: BTreeMap<String, Vec<f64>>,
    v: BTreeMap<String, Vec<f64>>,
    step: u32,
}

impl HostAdamW {
    fn new() -> Self {
        Self { m: BTreeMap::new(), m_size: BTreeMap::new(), v: BTreeMap::new(), step: 0 }
    }

    /// The updated parameter and, per element, the size of its operands.
    fn step(
        &mut self,
        cfg: &AdamWConfig,
        lr: f32,
        scale: f32,
        name: &str,
        param: &[f32],
        grad: &[f32],
    ) -> (Vec<f64>, Vec<f64>) {
        let weight_decay = if decays_weight(name) { cfg.weight_decay } else { 0.0 };
        let (beta1, beta2, eps) = (cfg.beta1, cfg.beta2, cfg.eps);
        let hp = AdamWParams { lr, beta1, beta2, eps, weight_decay, step: self.step, grad_scale: scale };
        let zeros = || vec![0.0; param.len()];
        let m = self.m.entry(name.to_string()).or_insert_with(zeros);
        let m_size = self.m_size.entry(name.to_string()).or_insert_with(zeros);
        let v = self.v.entry(name.to_string()).or_insert_with(zeros);
        let mut new: Vec<f64> = param.iter().map(|&p| p as f64).collect();
        let grad: Vec<f64> = grad.iter().map(|&g| g as f64).collect();
        optimizer::spec::adamw(&mut new, &grad, m, v, &hp);
        // The operands' size: the update's terms taken in absolute value.
        let (b1, b2, lr) = (beta1 as f64, beta2 as f64, lr as f64);
        let (bc1, bc2) = (1.0 - b1.powi(self.step as i32), 1.0 - b2.powi(self.step as i32));
        let size = (0..param.len())
            .map(|i| {
                let g = grad[i] * scale as f64;
                m_size[i] = b1 * m_size[i] + (1.0 - b1) * g.abs();
                let denominator = (v[i] / bc2).sqrt() + eps as f64;
                (param[i] as f64).abs() + lr * (m_size[i] / bc1) / denominator
            })
            .collect();
        (new, size)
    }
}

/// `got` (f32, from the backend) against `want` (the f64 twin), element by element, within `rel`
/// of `magnitude[i]`: the size of the operands that produced the element (an update `p − δ` that
/// nearly cancels carries the rounding error of `p`, not of the small result).
fn assert_close_slices(what: &str, got: &[f32], want: &[f64], magnitude: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g as f64;
        let tolerance = rel * magnitude[i].max(g.abs()).max(w.abs());
        assert!((g - w).abs() <= tolerance, "{what}[{i}]: {g} vs f64 twin {w} (tolerance {tolerance:e})");
    }
}

fn abs_plus(xs: &[f32], floor: f64) -> Vec<f64> {
    xs.iter().map(|&x| (x as f64).abs() + floor).collect()
}

const ADAMW: AdamWConfig = AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };

#[test]
fn adamw_steps_match_an_f64_twin() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let mut model = tiny_model(11);
    let mut opt = AdamW::new(&mut model, ADAMW).unwrap();
    assert_eq!(opt.step_count(), 0);
    let mut twin = HostAdamW::new();
    for (lr, scale) in [(1e-3f32, 1.0f32), (3e-3, 0.5), (5e-4, 0.25)] {
        random_grads(&mut model, &mut rng);
        let before = host_params_and_grads(&model, &opt);
        assert!(before.iter().any(|(_, _, g)| g.iter().any(|&x| x != 0.0)), "the test needs nonzero gradients");
        twin.step += 1;
        opt.step(&mut model, lr, scale).unwrap();
        let after = model.to_host().unwrap();
        let state = opt.state_to_host().unwrap();
        for (name, param, grad) in &before {
            let (want, size) = twin.step(&ADAMW, lr, scale, name, param, grad);
            assert_close_slices(name, &after.tensors[name].1, &want, &size, 1e-6);
            let (m_key, v_key) = (format!("m.{name}"), format!("v.{name}"));
            assert_close_slices(&m_key, &state[&m_key], &twin.m[name], &twin.m_size[name], 1e-6);
            assert_close_slices(&v_key, &state[&v_key], &twin.v[name], &twin.v[name], 1e-6);
        }
        assert_eq!(opt.step_count(), twin.step);
    }
}

#[test]
fn weight_decay_applies_only_to_matrices_and_embeddings() {
    let mut model = tiny_model(12);
    let mut opt = AdamW::new(&mut model, AdamWConfig { weight_decay: 0.5, ..ADAMW }).unwrap();
    let plan: Vec<(String, bool)> = opt.decay_plan().iter().map(|(n, d)| (n.to_string(), *d)).collect();
    assert!(plan.iter().any(|(_, d)| *d) && plan.iter().any(|(_, d)| !*d));
    for (name, decay) in &plan {
        // Stated independently of `decays_weight`: LayerNorm tensors and biases are exempt.
        let exempt = name.starts_with("ln_") || name.contains(".ln_") || name.ends_with(".bias");
        assert_eq!(*decay, !exempt, "{name}");
    }
    // With zero gradients the moments stay 0 and the Adam term vanishes: only the decay moves weights.
    let before = model.to_host().unwrap();
    model.zero_grad().unwrap();
    let lr = 0.01f32;
    opt.step(&mut model, lr, 1.0).unwrap();
    let after = model.to_host().unwrap();
    for (name, decay) in &plan {
        let (old, new) = (&before.tensors[name].1, &after.tensors[name].1);
        if *decay {
            let want: Vec<f64> = old.iter().map(|&p| p as f64 * (1.0 - lr as f64 * 0.5)).collect();
            assert_close_slices(name, new, &want, &abs_plus(old, 0.0), 1e-6);
            assert!(old.iter().zip(new).any(|(a, b)| a != b), "{name} must decay");
        } else {
            assert_eq!(old, new, "{name} must not be decayed");
        }
    }
}

#[test]
fn sgd_step_matches_the_host() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let mut model = tiny_model(14);
    let opt = AdamW::new(&mut model, ADAMW).unwrap(); // only for the names
    random_grads(&mut model, &mut rng);
    let before = host_params_and_grads(&model, &opt);
    let (lr, scale) = (0.05f32, 0.7f32);
    sgd_step(&mut model, lr, scale).unwrap();
    let after = model.to_host().unwrap();
    for (name, param, grad) in &before {
        let mut want: Vec<f64> = param.iter().map(|&p| p as f64).collect();
        optimizer::spec::sgd(&mut want, &grad.iter().map(|&g| g as f64).collect::<Vec<_>>(), lr as f64, scale as f64);
        let magnitude: Vec<f64> = param
            .iter()
            .zip(grad)
            .map(|(&p, &g)| (p as f64).abs() + (lr as f64 * scale as f64 * g as f64).abs())
            .collect();
        assert_close_slices(name, &after.tensors[name].1, &want, &magnitude, 1e-6);
    }
}

#[test]
fn clip_scale_uses_the_global_norm_of_all_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let mut model = tiny_model(16);
    let opt = AdamW::new(&mut model, ADAMW).unwrap();
    random_grads(&mut model, &mut rng);
    let host = host_params_and_grads(&model, &opt);
    let grads: Vec<&[f32]> = host.iter().map(|(_, _, g)| g.as_slice()).collect();
    let norm = grad_norm::spec::sum_squares(&grads).sqrt();
    assert!(norm > 0.0);
    let (got, no_clip) = clip_scale(&model, 0.0).unwrap();
    assert!(close(got as f64, norm, 1e-6), "norm {got} vs host {norm}");
    assert_eq!(no_clip, 1.0, "max_norm 0 means no clipping");
    assert_eq!(clip_scale(&model, (2.0 * norm) as f32).unwrap().1, 1.0, "a norm under the limit is not scaled");
    let max_norm = (norm / 3.0) as f32;
    let (_, scale) = clip_scale(&model, max_norm).unwrap();
    assert!(close(scale as f64, max_norm as f64 / (norm + 1e-6), 1e-6), "scale {scale}");
    assert!(close(scale as f64 * norm, max_norm as f64, 1e-5), "the clipped norm is max_norm");
}

#[test]
fn state_round_trip_resumes_bit_identically() {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let mut model = tiny_model(18);
    let mut opt = AdamW::new(&mut model, ADAMW).unwrap();
    for _ in 0..2 {
        random_grads(&mut model, &mut rng);
        opt.step(&mut model, 2e-3, 0.9).unwrap();
    }
    let state = opt.state_to_host().unwrap();
    assert_eq!(state[STEP_KEY], vec![2.0]);
    assert_eq!(state.len(), 2 * opt.decay_plan().len() + 1);

    // A resumed copy: the same weights, a fresh optimizer with the saved state.
    let mut resumed = Decoder::from_host(Arc::new(CpuBackend::new()), &model.to_host().unwrap()).unwrap();
    let mut resumed_opt = AdamW::new(&mut resumed, ADAMW).unwrap();
    resumed_opt.load_state(&state, opt.step_count()).unwrap();
    assert_eq!(resumed_opt.step_count(), 2);
    assert_eq!(resumed_opt.state_to_host().unwrap(), state);

    // The same next step on both gives bit-identical weights.
    let mut rng_resumed = rng.clone();
    random_grads(&mut model, &mut rng);
    random_grads(&mut resumed, &mut rng_resumed);
    opt.step(&mut model, 1e-3, 1.0).unwrap();
    resumed_opt.step(&mut resumed, 1e-3, 1.0).unwrap();
    assert_eq!(model.to_host().unwrap(), resumed.to_host().unwrap());
    assert_eq!(opt.state_to_host().unwrap(), resumed_opt.state_to_host().unwrap());
}

#[test]
fn load_state_rejects_a_mismatched_state_and_changes_nothing() {
    let mut rng = ChaCha8Rng::seed_from_u64(19);
    let mut model = tiny_model(20);
    let mut opt = AdamW::new(&mut model, ADAMW).unwrap();
    random_grads(&mut model, &mut rng);
    opt.step(&mut model, 1e-3, 1.0).unwrap();
    let good = opt.state_to_host().unwrap();
    let first = opt.decay_plan()[0].0.to_string();

    let mut missing = good.clone();
    missing.remove(&format!("v.{first}"));
    let mut short = good.clone();
    short.get_mut(&format!("m.{first}")).unwrap().pop();
    let mut extra = good.clone();
    extra.insert("m.h.9.attn.c_attn.weight".into(), vec![0.0; 4]);
    let mut nan = good.clone();
    nan.get_mut(&format!("v.{first}")).unwrap()[0] = f32::NAN;
    let mut fresh = AdamW::new(&mut model, ADAMW).unwrap();
    let zeros = fresh.state_to_host().unwrap();
    for (state, step, expected) in [
        (&missing, 1, format!("v.{first}")),
        (&short, 1, format!("m.{first}")),
        (&extra, 1, "m.h.9.attn.c_attn.weight".to_string()),
        (&nan, 1, format!("v.{first}")),
        (&good, 5, STEP_KEY.to_string()),
    ] {
        let err = fresh.load_state(state, step).unwrap_err().to_string();
        assert!(err.contains(&expected), "error {err:?} must name {expected}");
        assert_eq!(fresh.step_count(), 0);
        assert_eq!(fresh.state_to_host().unwrap(), zeros, "a failed load must change nothing");
    }
    fresh.load_state(&good, 1).unwrap();
    assert_eq!(fresh.state_to_host().unwrap(), good);
}

#[test]
fn step_refuses_a_model_on_another_backend() {
    let mut model = tiny_model(21);
    let mut opt = AdamW::new(&mut model, ADAMW).unwrap();
    let mut other = tiny_model(21);
    let err = opt.step(&mut other, 1e-3, 1.0).unwrap_err().to_string();
    assert!(err.contains("backend"), "{err}");
}
