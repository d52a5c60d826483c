//! A whole SafeDPO training step on `CudaBackend` against the CPU backend: reference and policy
//! forward, the preference loss, the policy backward, the global grad norm with clipping, and one
//! AdamW update. Compared: the sequence log-probs, the loss metrics and dL/d(logp), every gradient
//! tensor, the grad norm, and every updated parameter. Tight in F32 mode. In Bf16 mode (bf16
//! activations and gradients) the log-probs, the metrics and the grad norm are held element by
//! element to what bf16 rounding allows them, tightly enough that a rounding biased one way
//! (truncation) fails; the gradients to a bound scaled to each tensor. Two runs on the same device
//! are bit-identical.
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
use safedpo::backend::{AdamWParams, PreferenceLossInputs, PAIR_METRICS};
use safedpo::data::{PackedBatch, PreferenceBatch};
use safedpo::loss::Objective;
use safedpo::model::{Decoder, DecoderConfig, DeviceBatch, HostWeights};
use safedpo::optim::{clip_scale, decays_weight, AdamW, AdamWConfig};

/// A tiny GPT-2: 2 layers, 4 heads of width 12, a vocabulary that is not a multiple of 32.
fn config() -> DecoderConfig {
    DecoderConfig::gpt2(61, 40, 48, 2, 4)
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
    let mut policy = Decoder::from_host(backend.clone(), policy).unwrap();
    let mut reference = Decoder::from_host(backend.clone(), reference).unwrap();
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
    let mean = 1.0 / pairs as f32;
    let inputs = PreferenceLossInputs {
        grad_scale: mean,
        ..PreferenceLossInputs::pairs(&policy_logps, &reference_logps, &flags, &lengths, &OBJECTIVE)
    };
    b.preference_loss(&mut metrics, &mut dpolicy, &inputs).unwrap();

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
    let mut weights = Decoder::random(Arc::new(CpuBackend::new()), config(), seed).unwrap().to_host().unwrap();
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

/// Tolerances of the gradients (relative, scaled to each tensor's largest entry) and, in F32 mode, of
/// the log-probs; Bf16 mode holds the log-probs, metrics and the grad norm to per-element bounds
/// (`check_bf16_outputs`).
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

/// β of the step's objective (SafeDPO, Δ = 10).
const BETA: f64 = 0.1;
const OBJECTIVE: Objective = Objective::SafeDpo { beta: BETA, delta: 10.0 };

/// Bf16 mode: each sequence log-prob within this fraction of itself. A log-prob sums f32 token
/// log-probs computed from bf16 activations; their independent roundings largely cancel over a
/// sequence (about 1.6e-4 here), while a rounding biased one way (truncation, 5.6e-4) does not.
const BF16_LOGP_RTOL: f64 = 3e-4;
/// Bf16 mode: the global grad norm within this fraction of the CPU's. A root of ~60k squared entries,
/// each off by independent bf16 roundings that average out (3e-4 here); truncation shrinks every
/// gradient and the norm with them (3.6e-3).
const BF16_GRAD_NORM_RTOL: f64 = 1.5e-3;

/// Bf16 mode: the log-probs, metrics, dL/d(logp) and grad norm against the CPU, element by element.
/// The metrics and dL/d(logp) are functions of log-prob differences, so each pair's bound is what
/// the log-prob tolerance allows through them (plus f32 rounding): with `s` the sum of |log-prob|
/// of the pair's four inputs, `h` moves by at most `e·s` (e = `BF16_LOGP_RTOL`), a reward or the
/// margin by `β·e·s`, the loss `−log σ(βh − …)` by `β·e·s` (its slope in βh is below 1) and
/// dL/d(logp) `= ∓β·σ(·)/P` by `β²·e·s/(4P)`; the accuracy is exact unless the margin is within its
/// bound of 0.
fn check_bf16_outputs(got: &StepResult, want: &StepResult) {
    let e = BF16_LOGP_RTOL;
    let f32_rtol = 1e-5;
    let at = |what: &str| format!("{what} (bf16)");
    assert_close_with_floor(&at("reference seq logps"), &got.reference_logps, &to_f64(&want.reference_logps), e, 0.0);
    assert_close_with_floor(&at("policy seq logps"), &got.policy_logps, &to_f64(&want.policy_logps), e, 0.0);

    let pairs = want.policy_logps.len() / 2;
    for i in 0..pairs {
        let side = |k: usize| (want.policy_logps[2 * i + k].abs() + want.reference_logps[2 * i + k].abs()) as f64;
        let (s_chosen, s_rejected) = (side(0), side(1));
        let s = s_chosen + s_rejected;
        let row = |x: &StepResult| x.metrics[i * PAIR_METRICS..(i + 1) * PAIR_METRICS].to_vec();
        let (got_row, want_row) = (row(got), row(want));
        let margin_bound = BETA * e * s;
        let bounds = [margin_bound, BETA * e * s_chosen, BETA * e * s_rejected, margin_bound];
        let names = ["loss", "chosen reward", "rejected reward", "margin"];
        for k in 0..4 {
            let (g, w) = (got_row[k] as f64, want_row[k] as f64);
            let bound = bounds[k] + f32_rtol * w.abs();
            assert!(
                (g - w).abs() <= bound,
                "{}: pair {i}: {g} but should be {w} (|err| {:.3e} > {bound:.3e})",
                at(names[k]),
                (g - w).abs()
            );
        }
        if (want_row[3] as f64).abs() > margin_bound {
            assert_eq!(got_row[4], want_row[4], "{}: pair {i}", at("accuracy"));
        }
        let dbound = BETA * BETA * e * s / (4.0 * pairs as f64);
        for k in 0..2 {
            let (g, w) = (got.dpolicy[2 * i + k] as f64, want.dpolicy[2 * i + k] as f64);
            let bound = dbound + f32_rtol * w.abs();
            assert!((g - w).abs() <= bound, "{}: sequence {}: {g} but should be {w}", at("dL/d(logp)"), 2 * i + k);
        }
    }
    let norm_err = ((got.grad_norm - want.grad_norm).abs() / want.grad_norm) as f64;
    assert!(
        norm_err <= BF16_GRAD_NORM_RTOL,
        "grad norm (bf16): {} vs {} (relative error {norm_err:.2e} > {BF16_GRAD_NORM_RTOL:e})",
        got.grad_norm,
        want.grad_norm
    );
}

fn step_matches_cpu(device: &Device, precision: Precision) {
    let (policy, reference) = (weights(1, precision), weights(2, precision));
    let batch = batch(config().vocab_size);
    let want = train_step(Arc::new(CpuBackend::new()), &policy, &reference, &batch);
    let got = train_step(Arc::new(CudaBackend::new(device.clone(), precision)), &policy, &reference, &batch);
    let tol = tolerances(precision);
    let at = |what: &str| format!("{what} ({precision})");

    assert!(want.metrics.iter().all(|x| x.is_finite()) && want.grad_norm > 0.05, "degenerate reference step");
    match precision {
        Precision::F32 => {
            let (got_ref, want_ref) = (&got.reference_logps, to_f64(&want.reference_logps));
            assert_close_scaled(&at("reference seq logps"), got_ref, &want_ref, tol.logps);
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
        }
        Precision::Bf16 => check_bf16_outputs(&got, &want),
    }
    // Gradient entries are sums over tokens whose small entries come from cancellation: in both
    // modes they are held to a tolerance scaled to the tensor's largest entry. (In Bf16 mode the
    // entries of this step need up to 0.97e-2 of it: a per-element bound would be as loose, and the
    // grad norm above catches a bias in their magnitude.)
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
