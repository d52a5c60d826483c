//! A whole SafeDPO training step on `CudaBackend` against the CPU backend: reference and policy
//! forward, the preference loss, the policy backward, the global grad norm with clipping, and one
//! AdamW update. Compared: the sequence log-probs, the loss metrics and dL/d(logp), every gradient
//! tensor, the grad norm, and every updated parameter. Tight in F32 mode, loose in Bf16 mode (bf16
//! activations and gradients). Two runs on the same device are bit-identical.
//!
//! `emu::*` run on the emulated device (CI); `gpu::*` on GPU 0, ignored without one.

mod common;

use std::sync::Arc;

use common::*;
use half::bf16;
use rand::Rng;
use safedpo::backend::cpu::optimizer::spec;
use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::cuda::{CudaBackend, Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::{AdamWParams, PAIR_METRICS};
use safedpo::data::{PackedBatch, PreferenceBatch};
use safedpo::loss::Objective;
use safedpo::model::{DeviceBatch, Gpt2, Gpt2Config, HostWeights};
use safedpo::optim::{clip_scale, decays_weight, AdamW, AdamWConfig};

/// A tiny GPT-2: 2 layers, 4 heads of width 12, a vocabulary that is not a multiple of 32.
fn config() -> Gpt2Config {
    Gpt2Config { vocab_size: 61, n_positions: 40, n_embd: 48, n_layer: 2, n_head: 4, layer_norm_epsilon: 1e-5 }
}

/// Three pairs of random sequences: prompts of several lengths, a response of one token, and a
/// prompt-only sequence (length 1, no target).
fn batch(vocab: usize) -> PreferenceBatch {
    let mut rng = rng(11);
    // (sequence length, prompt length) of chosen, rejected for each pair
    let shapes = [((9, 4), (12, 4)), ((5, 4), (1, 1)), ((17, 3), (8, 3))];
    let mut packed = PackedBatch::default();
    let mut lengths = Vec::new();
    for &(chosen, rejected) in &shapes {
        for (len, prompt) in [chosen, rejected] {
            let tokens = rand_ids(&mut rng, len, vocab);
            packed.push(&tokens, prompt);
            lengths.push((len - prompt) as i32);
        }
    }
    let unsafe_flags = vec![0, 1, 1, 0, 0, 0];
    PreferenceBatch { packed, unsafe_flags, lengths, pair_ids: (0..shapes.len()).collect() }
}

/// The step's AdamW hyper-parameters.
const LR: f32 = 1e-3;
const BETA1: f32 = 0.9;
const BETA2: f32 = 0.95;
const EPS: f32 = 1e-8;
const WEIGHT_DECAY: f32 = 0.1;

/// Everything one step produces, on the host.
struct StepResult {
    reference_logps: Vec<f32>,
    policy_logps: Vec<f32>,
    metrics: Vec<f32>,
    dpolicy: Vec<f32>,
    grads: Vec<(String, Vec<f32>)>,
    grad_norm: f32,
    /// The clipping factor the optimizer applied.
    grad_scale: f32,
    params: Vec<(String, Vec<f32>)>,
}

/// One SafeDPO step of `policy` against `reference` on `backend`.
fn train_step<B: Backend>(
    backend: Arc<B>,
    policy: &HostWeights,
    reference: &HostWeights,
    batch: &PreferenceBatch,
) -> StepResult {
    let b = &*backend;
    let mut policy = Gpt2::from_host(backend.clone(), policy).unwrap();
    let mut reference = Gpt2::from_host(backend.clone(), reference).unwrap();
    let device_batch = DeviceBatch::upload(b, &batch.packed).unwrap();
    let seqs = batch.packed.num_seqs();
    let pairs = batch.num_pairs();

    let mut reference_logps = b.zeros(seqs).unwrap();
    b.copy(&mut reference_logps, reference.forward(&device_batch).unwrap()).unwrap();
    let mut policy_logps = b.zeros(seqs).unwrap();
    b.copy(&mut policy_logps, policy.forward(&device_batch).unwrap()).unwrap();

    let flags = b.upload_ids(&batch.unsafe_flags).unwrap();
    let lengths = b.upload_ids(&batch.lengths).unwrap();
    let (mut metrics, mut dpolicy) = (b.zeros(pairs * PAIR_METRICS).unwrap(), b.zeros(seqs).unwrap());
    let objective = Objective::SafeDpo { beta: 0.1, delta: 10.0 };
    let mean = 1.0 / pairs as f32;
    b.preference_loss(&mut metrics, &mut dpolicy, &policy_logps, &reference_logps, &flags, &lengths, &objective, mean)
        .unwrap();

    policy.zero_grad().unwrap();
    policy.backward(&device_batch, &dpolicy).unwrap();
    let names: Vec<String> = policy.parameter_shapes().map(|(name, _)| name.to_string()).collect();
    let grads = names.iter().cloned().zip(policy.grads().unwrap().iter().map(|g| b.download(g).unwrap())).collect();
    // A max norm below the actual norm, so that clipping is exercised.
    let (grad_norm, grad_scale) = clip_scale(&policy, 0.05).unwrap();
    let cfg = AdamWConfig { lr: LR, beta1: BETA1, beta2: BETA2, eps: EPS, weight_decay: WEIGHT_DECAY };
    let mut optimizer = AdamW::new(&mut policy, cfg).unwrap();
    optimizer.step(&mut policy, cfg.lr, grad_scale).unwrap();
    let params = names.iter().cloned().zip(policy.params().iter().map(|p| b.download(p).unwrap())).collect();

    StepResult {
        reference_logps: b.download(&reference_logps).unwrap(),
        policy_logps: b.download(&policy_logps).unwrap(),
        metrics: b.download(&metrics).unwrap(),
        dpolicy: b.download(&dpolicy).unwrap(),
        grads,
        grad_norm,
        grad_scale,
        params,
    }
}

/// Random weights; in Bf16 mode rounded to bf16, so that both backends start from the same model.
fn weights(seed: u64, precision: Precision) -> HostWeights {
    let mut weights = Gpt2::random(Arc::new(CpuBackend::new()), config(), seed).unwrap().to_host().unwrap();
    // LayerNorm gains and biases away from 1 and 0, so that their gradients are exercised.
    let mut rng = rng(seed + 100);
    for (name, (_, data)) in weights.tensors.iter_mut() {
        if name.contains("ln_") {
            data.iter_mut().for_each(|x| *x += rng.random_range(-0.2f32..0.2));
        }
    }
    if precision == Precision::Bf16 {
        for (_, data) in weights.tensors.values_mut() {
            data.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32());
        }
    }
    weights
}

/// Tolerances (relative, scaled to each tensor's largest entry).
struct Tolerances {
    logps: f64,
    grads: f64,
}

fn tolerances(precision: Precision) -> Tolerances {
    match precision {
        Precision::F32 => Tolerances { logps: 1e-5, grads: 1e-4 },
        Precision::Bf16 => Tolerances { logps: 1e-2, grads: 1e-2 },
    }
}

fn step_matches_cpu(device: &Device, precision: Precision) {
    let (policy, reference) = (weights(1, precision), weights(2, precision));
    let batch = batch(config().vocab_size);
    let want = train_step(Arc::new(CpuBackend::new()), &policy, &reference, &batch);
    let got = train_step(Arc::new(CudaBackend::new(device.clone(), precision)), &policy, &reference, &batch);
    let tol = tolerances(precision);
    let at = |what: &str| format!("{what} ({precision})");

    assert!(want.metrics.iter().all(|x| x.is_finite()) && want.grad_norm > 0.05, "degenerate reference step");
    assert_close_scaled(&at("reference seq logps"), &got.reference_logps, &to_f64(&want.reference_logps), tol.logps);
    assert_close_scaled(&at("policy seq logps"), &got.policy_logps, &to_f64(&want.policy_logps), tol.logps);
    // The loss sees log-prob differences; its inputs differ by the tolerance above.
    for k in 0..PAIR_METRICS {
        let column = |x: &[f32]| -> Vec<f32> { x.iter().skip(k).step_by(PAIR_METRICS).copied().collect() };
        assert_close_scaled(
            &at(&format!("metric {k}")),
            &column(&got.metrics),
            &to_f64(&column(&want.metrics)),
            tol.logps * 10.0,
        );
    }
    assert_close_scaled(&at("dL/d(policy logp)"), &got.dpolicy, &to_f64(&want.dpolicy), tol.logps * 10.0);
    let norm_err = ((got.grad_norm - want.grad_norm).abs() / want.grad_norm) as f64;
    assert!(norm_err <= tol.grads, "grad norm ({precision}): {} vs {}", got.grad_norm, want.grad_norm);
    for ((name, g), (_, w)) in got.grads.iter().zip(&want.grads) {
        assert_close_scaled(&at(&format!("gradient of {name}")), g, &to_f64(w), tol.grads);
    }
    // The update given the gradients this backend computed: against an f64 AdamW twin, tightly in
    // both modes (the bf16 parameters are updated through their fp32 master copies).
    for ((name, p), (_, g)) in got.params.iter().zip(&got.grads) {
        let expected = adamw_first_step_twin(&policy.tensors[name].1, g, got.grad_scale, decays_weight(name));
        assert_close(&at(&format!("updated {name}, against its own gradient")), p, &expected, 1e-6, 1e-5 * LR as f64);
    }
    // Against the CPU's update: AdamW's first step moves a weight by ±lr whatever the gradient's
    // size, so an element whose gradient is as small as the gradient tolerance can land 2·lr away.
    // In F32 mode such elements must be rare; in Bf16 mode (gradient tolerance 1e-2) only the bound
    // holds.
    let (mut unchecked, mut total) = (0, 0);
    for ((((name, p), (_, w)), (_, got_grad)), (_, want_grad)) in
        got.params.iter().zip(&want.params).zip(&got.grads).zip(&want.grads)
    {
        unchecked += check_update(&at(&format!("updated {name}")), p, w, got_grad, want_grad, tol.grads);
        total += p.len();
    }
    if precision == Precision::F32 {
        // (the key biases, whose gradient is zero in exact arithmetic, are among the few)
        assert!(unchecked * 20 <= total, "{}: {unchecked} of {total} updates could not be checked closely", at("step"));
    }
}

/// The first AdamW step (m = v = 0 before it) in f64 (the op's spec), as `AdamW::step` configures it.
fn adamw_first_step_twin(param: &[f32], grad: &[f32], grad_scale: f32, decay: bool) -> Vec<f64> {
    let weight_decay = if decay { WEIGHT_DECAY } else { 0.0 };
    let p = AdamWParams { lr: LR, beta1: BETA1, beta2: BETA2, eps: EPS, weight_decay, step: 1, grad_scale };
    let (mut param, mut m, mut v) = (to_f64(param), vec![0.0; param.len()], vec![0.0; param.len()]);
    spec::adamw(&mut param, &to_f64(grad), &mut m, &mut v, &p);
    param
}

/// Checks parameters after one AdamW step. At step 1 AdamW moves each weight by ±lr (the moments
/// normalise the gradient away), so the update depends on the gradient's sign only, and where a
/// gradient is as small as the gradient tolerance its sign is not determined by the comparison.
/// Elements whose gradient exceeds 5× the gradient tolerance must match closely (f32 rounding, and
/// the step's `eps` sensitivity); the others only within the largest step AdamW can take (2·lr
/// apart), and are counted (returned). Gradients zero on both backends (rows the batch does not
/// touch) leave weight decay only and must match closely.
#[track_caller]
fn check_update(what: &str, got: &[f32], want: &[f32], got_grad: &[f32], want_grad: &[f32], grad_tol: f64) -> usize {
    let grad_max = want_grad.iter().fold(0.0f32, |a, &g| a.max(g.abs())) as f64;
    let threshold = 5.0 * grad_tol * grad_max;
    let mut ill_conditioned = 0;
    for (i, (((&g, &w), &grad), &other_grad)) in got.iter().zip(want).zip(want_grad).zip(got_grad).enumerate() {
        let err = (g as f64 - w as f64).abs();
        // A zero gradient (a position or token the batch does not use) leaves weight decay only.
        let bound = if (grad == 0.0 && other_grad == 0.0) || (grad.abs() as f64) >= threshold {
            1e-5 * (w.abs() as f64) + 1e-3 * LR as f64
        } else {
            ill_conditioned += 1;
            1e-5 * (w.abs() as f64) + 2.001 * LR as f64
        };
        assert!(err <= bound, "{what}: element {i} is {g} but should be {w} (|err| = {err:.3e} > {bound:.3e})");
    }
    ill_conditioned
}

fn step_is_deterministic(device: &Device, precision: Precision) {
    let (policy, reference) = (weights(3, precision), weights(4, precision));
    let batch = batch(config().vocab_size);
    let backend = Arc::new(CudaBackend::new(device.clone(), precision));
    let first = train_step(backend.clone(), &policy, &reference, &batch);
    let second = train_step(backend, &policy, &reference, &batch);
    let at = |what: &str| format!("{what} ({precision})");
    assert_bitwise_eq(&at("reference seq logps"), &first.reference_logps, &second.reference_logps);
    assert_bitwise_eq(&at("policy seq logps"), &first.policy_logps, &second.policy_logps);
    assert_bitwise_eq(&at("metrics"), &first.metrics, &second.metrics);
    assert_bitwise_eq(&at("dL/d(policy logp)"), &first.dpolicy, &second.dpolicy);
    for ((name, a), (_, b)) in first.grads.iter().zip(&second.grads) {
        assert_bitwise_eq(&at(&format!("gradient of {name}")), a, b);
    }
    assert_eq!(first.grad_norm.to_bits(), second.grad_norm.to_bits(), "grad norm ({precision})");
    assert!(first.grad_scale < 1.0, "the step should clip (norm {})", first.grad_norm);
    for ((name, a), (_, b)) in first.params.iter().zip(&second.params) {
        assert_bitwise_eq(&at(&format!("updated {name}")), a, b);
    }
}

macro_rules! device_tests {
    ($($check:ident),* $(,)?) => {
        /// On the emulated device (CI).
        mod emu {
            use super::*;
            $(#[test]
            fn $check() {
                let device = Device::emulated().unwrap();
                for precision in [Precision::F32, Precision::Bf16] {
                    super::$check(&device, precision);
                }
            })*
        }
        /// On GPU 0.
        mod gpu {
            use super::*;
            $(#[test]
            #[ignore = "needs a GPU"]
            fn $check() {
                let device = Device::gpu(0).expect("GPU 0");
                for precision in [Precision::F32, Precision::Bf16] {
                    super::$check(&device, precision);
                }
            })*
        }
    };
}

device_tests!(step_matches_cpu, step_is_deterministic);
