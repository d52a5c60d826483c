//! The preference loss of a batch against the spec (`batch_loss`: `pair_loss` per pair, AOT's sort
//! across the batch, the `sft` term's token mean), every objective, with and without its safety
//! margin, and combinations of them with TRL's modifiers (the f-divergences, `bco_pair`'s running
//! mean); the CUDA backend against the CPU, at ordinary margins and at extreme ones (|h| up to 1e4, β
//! from 1e-3 to 5, where a naive softplus, log-sigmoid or exponential would overflow in f32); and
//! with TRL's log-prob modifiers (LD-DPO's split log-probs, WPO's aligned sums), every objective that
//! takes them, with its safety margin, on both backends; and the objectives on unpaired examples
//! (KTO, `apo_zero_unpaired`: `spec::forward_examples`, KTO's KL estimate formed by the op), with
//! their safety margin, on both backends.

use rand::Rng;
use safedpo::backend::cpu::preference_loss::spec;
use safedpo::backend::cuda::{Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::{ExampleParts, LogpParts, PreferenceLossInputs, EXAMPLE_METRICS, PAIR_METRICS};
use safedpo::loss::{Kto, LossState, Objective, RunningMean};

use crate::backend;
use crate::common::*;
use crate::device::Fixture;

/// Every objective with its defaults and, beside it, its safety twin at Δ = `delta` (for `safedpo`,
/// whose Δ is 10 by default, Δ = 0 instead; `sft` has no safety margin, hence no twin).
fn every_objective(delta: f64) -> Vec<Objective> {
    let mut objectives = Vec::new();
    for name in Objective::NAMES {
        let objective = Objective::default_for(name).unwrap();
        if let Some(key) = objective.spec().params.iter().find(|p| p.is_safety_margin()).map(|p| p.name) {
            let mut twin = objective.clone();
            twin.set_param(key, if objective.safety_margin() == 0.0 { delta } else { 0.0 }).unwrap();
            objectives.push(twin);
        }
        objectives.push(objective);
    }
    objectives
}

/// Combinations and modifiers, each with the loss state it runs at: mixtures (a sorting term first
/// and later, the `sft` term), every f-divergence, `bco_pair`'s running mean, safety margins.
fn combinations() -> Vec<(Objective, LossState)> {
    let state = LossState { bco_reward_mean: RunningMean { mean: 0.37, count: 3.0 } };
    let texts = [
        "0.8*dpo+0.2*bco_pair+sft",
        "0.8*dpo+0.2*bco_pair+sft:bco_running_mean=true,safety_margin=2",
        "aot+0.5*ipo+0.25*aot_unpaired:eps=0.1",
        "nca_pair+2*aot:safety_margin=1.5",
        "dpo:rpo_alpha=0.7,f_divergence_type=js_divergence",
        "hinge+robust+exo_pair:eps=0.2,f_divergence_type=forward_kl",
        "discopop+sigmoid_norm+sft:f_divergence_type=alpha_divergence,f_alpha_divergence_coef=0.3",
        "cdpo+rpo:f_divergence_type=alpha_divergence,f_alpha_divergence_coef=1.6,safety_margin=3",
        "orpo+0.5*cpo_simpo:beta=0.4,safety_margin=1",
        "simpo+cpo_ipo+cpo_hinge:beta=0.5,gamma=0.3",
    ];
    texts.iter().map(|text| (text.parse::<Objective>().unwrap(), state)).collect()
}

/// `objective` at β = `beta`.
fn with_beta(objective: &Objective, beta: f64) -> Objective {
    let mut objective = objective.clone();
    objective.set_param("beta", beta).unwrap();
    objective
}

#[test]
fn preference_loss_applies_the_spec_to_the_batch() {
    let be = backend();
    let mut r = rng(15);
    let pairs = 6;
    let policy = uniform(&mut r, 2 * pairs, -40.0, -5.0);
    let reference = uniform(&mut r, 2 * pairs, -40.0, -5.0);
    let flags: Vec<i32> = (0..2 * pairs).map(|i| ((i * 7 + 3) % 3 == 0) as i32).collect();
    let lengths: Vec<i32> = rand_ids(&mut r, 2 * pairs, 20).iter().map(|l| l + 1).collect();
    let grad_scale = 0.25;
    let singles = every_objective(3.0).into_iter().map(|o| (o, LossState::default()));
    for (objective, state) in &singles.chain(combinations()).collect::<Vec<_>>() {
        let (mut metrics, mut dpolicy) = (poison(pairs * PAIR_METRICS), poison(2 * pairs));
        // Reference-free objectives ignore the reference buffer (here: empty).
        let refs = if objective.uses_reference() { reference.clone() } else { Vec::new() };
        let (p, f, l) = (&policy, &flags, &lengths);
        let inputs = PreferenceLossInputs {
            state: *state,
            grad_scale,
            ..PreferenceLossInputs::pairs(p, &refs, f, l, objective)
        };
        be.preference_loss(&mut metrics, &mut dpolicy, &inputs).unwrap();
        let (policy, reference) = (to_f64(&policy), to_f64(&reference));
        let (want_metrics, want_dpolicy) =
            spec::forward_with(objective, state, &policy, &reference, &flags, &lengths, grad_scale as f64);
        for i in 0..pairs {
            let (c, rj) = (2 * i, 2 * i + 1);
            let m = &metrics[i * PAIR_METRICS..(i + 1) * PAIR_METRICS];
            let want_m = &want_metrics[i * PAIR_METRICS..(i + 1) * PAIR_METRICS];
            assert_close(&format!("{objective} metrics of pair {i}"), m, want_m, 1e-6, 1e-7);
            let want_d = &want_dpolicy[c..=rj];
            assert_close(&format!("{objective} dpolicy of pair {i}"), &dpolicy[c..=rj], want_d, 1e-6, 1e-9);
        }
    }
}

/// Every objective (and twin) that takes `modifiers`, and combinations with them.
fn with_modifiers(modifiers: &str) -> Vec<Objective> {
    let singles = every_objective(3.0).into_iter().map(|o| o.to_string());
    let combined = ["0.8*dpo+0.2*bco_pair+sft:safety_margin=2", "dpo:rpo_alpha=0.7,f_divergence_type=js_divergence"];
    let texts = singles.chain(combined.iter().map(|t| t.to_string()));
    texts.filter_map(|t| format!("{t},{modifiers}").parse().ok()).collect()
}

/// Per-pair inputs of a batch with the modifiers' parts: splits `[4P]` whose sums are the totals,
/// aligned sums `[2P]`.
struct PartsInputs {
    policy: Vec<f32>,
    reference: Vec<f32>,
    policy_split: Vec<f32>,
    reference_split: Vec<f32>,
    aligned: Vec<f32>,
    flags: Vec<i32>,
    lengths: Vec<i32>,
}

fn parts_inputs(r: &mut impl Rng, pairs: usize) -> PartsInputs {
    let policy_split = uniform(r, 4 * pairs, -30.0, -1.0);
    let reference_split: Vec<f32> = policy_split.iter().map(|p| p + r.random_range(-2.0..2.0)).collect();
    let totals = |split: &[f32]| split.chunks(2).map(|s| s[0] + s[1]).collect::<Vec<f32>>();
    let lengths: Vec<i32> = rand_ids(r, 2 * pairs, 40).iter().map(|l| l + 1).collect();
    let aligned = lengths.iter().map(|&l| l as f32 * r.random_range(-0.6..0.4)).collect();
    PartsInputs {
        policy: totals(&policy_split),
        reference: totals(&reference_split),
        policy_split,
        reference_split,
        aligned,
        flags: rand_ids(r, 2 * pairs, 2),
        lengths,
    }
}

#[test]
fn preference_loss_with_the_modifiers_lays_out_the_spec() {
    let be = backend();
    let mut r = rng(16);
    let pairs = 5;
    let x = parts_inputs(&mut r, pairs);
    let (ps, rs, al) = (&x.policy_split, &x.reference_split, &x.aligned);
    for objective in with_modifiers("ld_alpha=0.3,use_weighting=true") {
        let state = LossState::default();
        let ld = objective.ld_alpha().is_some();
        let (mut metrics, mut grads) = (poison(pairs * PAIR_METRICS), poison(if ld { 4 } else { 2 } * pairs));
        let (p, rf, f, l) = (&x.policy, &x.reference, &x.flags, &x.lengths);
        let inputs = PreferenceLossInputs {
            parts: LogpParts { policy_split: Some(ps), reference_split: Some(rs), policy_aligned: Some(al) },
            grad_scale: 0.5,
            ..PreferenceLossInputs::pairs(p, rf, f, l, &objective)
        };
        be.preference_loss(&mut metrics, &mut grads, &inputs).unwrap();
        let host = spec::HostParts {
            policy_split: Some(&to_f64(ps)),
            reference_split: Some(&to_f64(rs)),
            policy_aligned: Some(&to_f64(al)),
        };
        let (want_m, want_g) = spec::forward_parts(&objective, &state, &to_f64(p), &to_f64(rf), f, l, &host, 0.5);
        assert_close(&format!("{objective} metrics"), &metrics, &want_m, 1e-6, 1e-7);
        assert_close(&format!("{objective} grads"), &grads, &want_g, 1e-6, 1e-9);
        // Without the parts the objective is refused, naming what it reads.
        let inputs = PreferenceLossInputs { parts: LogpParts::none(), ..inputs };
        let err = format!("{:#}", be.preference_loss(&mut metrics, &mut grads, &inputs).unwrap_err());
        assert!(err.contains(if ld { "policy_split" } else { "policy_aligned" }), "{objective}: {err}");
    }
}

/// The objectives on unpaired examples, with and without the safety margin and with weights, as
/// `Objective`s.
fn unpaired_objectives() -> Vec<Objective> {
    let texts = [
        "kto",
        "kto:beta=0.3,desirable_weight=1.33,undesirable_weight=0.7,safety_margin=2",
        "apo_zero_unpaired",
        "apo_zero_unpaired:beta=0.5,undesirable_weight=1.5,safety_margin=1",
    ];
    texts.iter().map(|t| t.parse().unwrap()).collect()
}

/// Inputs of a batch of `n` examples with `m` KL sequences (the KL log-ratios mostly positive).
struct ExampleInputs {
    policy: Vec<f32>,
    reference: Vec<f32>,
    flags: Vec<i32>,
    desirable: Vec<i32>,
    lengths: Vec<i32>,
    policy_kl: Vec<f32>,
    reference_kl: Vec<f32>,
}

fn example_inputs(r: &mut impl Rng, n: usize, m: usize, spread: f32) -> ExampleInputs {
    let reference = uniform(r, n, -80.0, -5.0);
    let policy = reference.iter().map(|x| x + r.random_range(-spread..spread)).collect();
    let reference_kl = uniform(r, m, -80.0, -5.0);
    let policy_kl = reference_kl.iter().map(|x| x + r.random_range(-1.0..3.0)).collect();
    let lengths = rand_ids(r, n, 30).iter().map(|l| l + 1).collect();
    ExampleInputs {
        policy,
        reference,
        flags: rand_ids(r, n, 2),
        desirable: rand_ids(r, n, 2),
        lengths,
        policy_kl,
        reference_kl,
    }
}

#[test]
fn preference_loss_on_examples_lays_out_the_spec() {
    let be = backend();
    let mut r = rng(17);
    let n = 7;
    let x = example_inputs(&mut r, n, n, 4.0);
    for objective in unpaired_objectives() {
        let kto: Kto = *objective.as_unpaired().unwrap();
        for with_kl in [true, false] {
            let (mut metrics, mut grads) = (poison(n * EXAMPLE_METRICS), poison(n));
            let examples = ExampleParts {
                desirable: &x.desirable,
                policy_kl: with_kl.then_some(&x.policy_kl),
                reference_kl: with_kl.then_some(&x.reference_kl),
            };
            let inputs = PreferenceLossInputs {
                grad_scale: 0.25,
                ..PreferenceLossInputs::examples(&x.policy, &x.reference, &x.flags, &x.lengths, examples, &objective)
            };
            be.preference_loss(&mut metrics, &mut grads, &inputs).unwrap();
            let kl = with_kl.then(|| (to_f64(&x.policy_kl), to_f64(&x.reference_kl)));
            let kl = kl.as_ref().map(|(p, r)| (p.as_slice(), r.as_slice()));
            let (p, rf) = (to_f64(&x.policy), to_f64(&x.reference));
            let (want_m, want_g) = spec::forward_examples(&kto, &p, &rf, &x.flags, &x.desirable, kl, 0.25);
            assert_close(&format!("{objective} metrics (KL {with_kl})"), &metrics, &want_m, 1e-6, 1e-7);
            assert_close(&format!("{objective} grads (KL {with_kl})"), &grads, &want_g, 1e-6, 1e-9);
            // The KL column: KTO's clamped estimate on every row, 0 where the objective reads none.
            let estimate = metrics[2];
            assert!(metrics.chunks(EXAMPLE_METRICS).all(|row| row[2] == estimate), "{objective}");
            assert_eq!(estimate > 0.0, with_kl && kto.estimates_kl(), "{objective}: KL {estimate}");
        }
    }
    // Pairs and examples do not mix, and the KL log-probs come in two.
    let (mut metrics, mut grads) = (poison(n * EXAMPLE_METRICS), poison(n));
    let kto: Objective = "kto".parse().unwrap();
    let dpo: Objective = "dpo".parse().unwrap();
    let examples = || ExampleParts { desirable: &x.desirable, policy_kl: Some(&x.policy_kl), reference_kl: None };
    let cases: [(PreferenceLossInputs<'_, _>, &str); 3] = [
        (PreferenceLossInputs::pairs(&x.policy, &x.reference, &x.flags, &x.lengths, &kto), "unpaired examples"),
        (PreferenceLossInputs::examples(&x.policy, &x.reference, &x.flags, &x.lengths, examples(), &dpo), "on pairs"),
        (
            PreferenceLossInputs::examples(&x.policy, &x.reference, &x.flags, &x.lengths, examples(), &kto),
            "reference_kl",
        ),
    ];
    for (inputs, words) in cases {
        let err = format!("{:#}", be.preference_loss(&mut metrics, &mut grads, &inputs).unwrap_err());
        assert!(err.contains(words), "{err}");
    }
}

// ---- the CUDA backend against the CPU (see `device`) -----------------------------------------------------

/// Runs `objective` on both backends and compares each metric column and the gradient, each element
/// to `rtol` of itself plus `atol` (`scaled`: `atol` relative to the column's largest entry).
#[allow(clippy::too_many_arguments)]
fn compare(
    f: &mut Fixture,
    what: &str,
    objective: &Objective,
    policy: &[f32],
    reference: &[f32],
    flags: &[i32],
    lengths: &[i32],
    tolerance: (f64, f64, bool),
) {
    compare_with(f, what, objective, &LossState::default(), policy, reference, flags, lengths, tolerance)
}

/// [`compare`] at the loss state `state`.
#[allow(clippy::too_many_arguments)]
fn compare_with(
    f: &mut Fixture,
    what: &str,
    objective: &Objective,
    state: &LossState,
    policy: &[f32],
    reference: &[f32],
    flags: &[i32],
    lengths: &[i32],
    tolerance: (f64, f64, bool),
) {
    let pairs = policy.len() / 2;
    let ((cp, gp), (cr, gr)) = (f.both(policy), f.both(reference));
    let (cf, gf) = (f.cpu.upload_ids(flags).unwrap(), f.cuda.upload_ids(flags).unwrap());
    let (cl, gl) = (f.cpu.upload_ids(lengths).unwrap(), f.cuda.upload_ids(lengths).unwrap());
    let (mut want_m, mut got_m) = f.poisoned(pairs * PAIR_METRICS);
    let (mut want_d, mut got_d) = f.poisoned(2 * pairs);
    let cpu_inputs = PreferenceLossInputs::pairs(&cp, &cr, &cf, &cl, objective);
    let cuda_inputs = PreferenceLossInputs::pairs(&gp, &gr, &gf, &gl, objective);
    let (state, grad_scale) = (*state, 0.7);
    f.cpu.preference_loss(&mut want_m, &mut want_d, &PreferenceLossInputs { state, grad_scale, ..cpu_inputs }).unwrap();
    f.cuda.preference_loss(&mut got_m, &mut got_d, &PreferenceLossInputs { state, grad_scale, ..cuda_inputs }).unwrap();
    let (got_m, got_d) = (f.cuda.download(&got_m).unwrap(), f.cuda.download(&got_d).unwrap());
    let (rtol, atol, scaled) = tolerance;
    let check = |name: String, got: &[f32], want: &[f32]| {
        let want = to_f64(want);
        let scale = if scaled { want.iter().fold(0.0f64, |a, &w| a.max(w.abs())) } else { 1.0 };
        assert_close(
            &format!("{what}: preference_loss {objective} {name} ({})", f.precision),
            got,
            &want,
            rtol,
            atol * scale,
        );
    };
    // Each metric column on its own scale; inputs and outputs are f32 in both modes.
    for k in 0..PAIR_METRICS {
        let column = |x: &[f32]| -> Vec<f32> { x.iter().skip(k).step_by(PAIR_METRICS).copied().collect() };
        check(format!("metric {k}"), &column(&got_m), &column(&want_m));
    }
    check("dpolicy".into(), &got_d, &want_d);
}

fn preference_loss(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 6);
    let pairs = 37;
    let policy = uniform(&mut f.rng, 2 * pairs, -60.0, -5.0);
    let reference: Vec<f32> = policy.iter().map(|p| p + f.rng.random_range(-3.0..3.0)).collect();
    let flags = rand_ids(&mut f.rng, 2 * pairs, 2);
    let mut lengths = rand_ids(&mut f.rng, 2 * pairs, 40);
    lengths[3] = 0;
    for objective in every_objective(3.0) {
        compare(&mut f, "ordinary margins", &objective, &policy, &reference, &flags, &lengths, (2e-5, 2e-5, true));
    }
    for (objective, state) in combinations() {
        let (p, r, fl, l) = (&policy, &reference, &flags, &lengths);
        compare_with(&mut f, "ordinary margins", &objective, &state, p, r, fl, l, (2e-5, 2e-5, true));
    }
}

/// Margins a naive formula cannot take: |h| from 0.5 to 1e4 (log-ratios in the thousands), β from
/// 1e-3 to 5, so |βh| reaches 5e4 (f32's `exp` overflows past 88), with and without the safety shift.
/// Every element is held to its own relative tolerance: a saturated tail must come out as exactly
/// the limit the f64 spec gives (0, a linear tail, a constant), not as NaN or inf.
fn preference_loss_at_extreme_margins(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 7);
    let magnitudes = [1e4f32, 3e3, 300.0, 30.0, 3.0, 0.5];
    let pairs = 2 * magnitudes.len() * 2;
    let (mut policy, mut reference) = (Vec::new(), Vec::new());
    for i in 0..pairs {
        let h = magnitudes[i % magnitudes.len()] * if (i / magnitudes.len()).is_multiple_of(2) { 1.0 } else { -1.0 };
        let (rc, rr) = (f.rng.random_range(-60.0f32..-5.0), f.rng.random_range(-60.0f32..-5.0));
        // h split unevenly between the sides, so the chosen and rejected rewards saturate apart.
        let split = f.rng.random_range(0.2f32..0.8);
        policy.extend([rc + split * h, rr - (1.0 - split) * h]);
        reference.extend([rc, rr]);
    }
    let flags = rand_ids(&mut f.rng, 2 * pairs, 2);
    let lengths: Vec<i32> = rand_ids(&mut f.rng, 2 * pairs, 30).iter().map(|l| l + 1).collect();
    for objective in every_objective(3.0) {
        for beta in [1e-3, 0.1, 1.0, 5.0] {
            let objective = with_beta(&objective, beta);
            compare(&mut f, "extreme margins", &objective, &policy, &reference, &flags, &lengths, (2e-5, 1e-6, false));
        }
    }
}

/// TRL's log-prob modifiers, alone and together, on every objective that takes them (the CUDA side
/// composes LD-DPO's log-probs and the split's gradients in launches of its own).
fn preference_loss_with_the_modifiers(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 8);
    let pairs = 29;
    let x = parts_inputs(&mut f.rng, pairs);
    let (cp, gp) = f.both(&x.policy);
    let (cr, gr) = f.both(&x.reference);
    let (cps, gps) = f.both(&x.policy_split);
    let (crs, grs) = f.both(&x.reference_split);
    let (ca, ga) = f.both(&x.aligned);
    let (cf, gf) = (f.cpu.upload_ids(&x.flags).unwrap(), f.cuda.upload_ids(&x.flags).unwrap());
    let (cl, gl) = (f.cpu.upload_ids(&x.lengths).unwrap(), f.cuda.upload_ids(&x.lengths).unwrap());
    let cpu_parts = LogpParts { policy_split: Some(&cps), reference_split: Some(&crs), policy_aligned: Some(&ca) };
    let cuda_parts = LogpParts { policy_split: Some(&gps), reference_split: Some(&grs), policy_aligned: Some(&ga) };
    let state = LossState { bco_reward_mean: RunningMean { mean: 0.2, count: 2.0 } };
    for modifiers in ["ld_alpha=0.4", "use_weighting=true", "ld_alpha=0,use_weighting=true"] {
        for objective in with_modifiers(modifiers) {
            let grads = if objective.ld_alpha().is_some() { 4 * pairs } else { 2 * pairs };
            let (mut want_m, mut got_m) = f.poisoned(pairs * PAIR_METRICS);
            let (mut want_g, mut got_g) = f.poisoned(grads);
            let o = &objective;
            let cpu_inputs = PreferenceLossInputs {
                parts: LogpParts { ..cpu_parts },
                state,
                grad_scale: 0.7,
                ..PreferenceLossInputs::pairs(&cp, &cr, &cf, &cl, o)
            };
            let cuda_inputs = PreferenceLossInputs {
                parts: LogpParts { ..cuda_parts },
                state,
                grad_scale: 0.7,
                ..PreferenceLossInputs::pairs(&gp, &gr, &gf, &gl, o)
            };
            f.cpu.preference_loss(&mut want_m, &mut want_g, &cpu_inputs).unwrap();
            f.cuda.preference_loss(&mut got_m, &mut got_g, &cuda_inputs).unwrap();
            let (got_m, got_g) = (f.cuda.download(&got_m).unwrap(), f.cuda.download(&got_g).unwrap());
            for k in 0..PAIR_METRICS {
                let column =
                    |x: &[f32]| -> Vec<f64> { x.iter().skip(k).step_by(PAIR_METRICS).map(|&v| v as f64).collect() };
                let got: Vec<f32> = got_m.iter().skip(k).step_by(PAIR_METRICS).copied().collect();
                assert_close_scaled(&format!("{objective} metric {k} ({})", f.precision), &got, &column(&want_m), 2e-5);
            }
            assert_close_scaled(&format!("{objective} grads ({})", f.precision), &got_g, &to_f64(&want_g), 2e-5);
        }
    }
}

/// The objectives on unpaired examples: the kernel (KTO's KL estimate formed in it) against the CPU,
/// with and without KL sequences (as many as examples, fewer, none), at ordinary rewards and at
/// saturated ones (log-ratios in the thousands).
fn preference_loss_on_examples(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 9);
    for (n, m, spread) in [(45, 45, 6.0), (130, 17, 6.0), (9, 0, 6.0), (24, 24, 3000.0)] {
        let x = example_inputs(&mut f.rng, n, m, spread);
        let ((cp, gp), (cr, gr)) = (f.both(&x.policy), f.both(&x.reference));
        let ((cpk, gpk), (crk, grk)) = (f.both(&x.policy_kl), f.both(&x.reference_kl));
        let ids = |f: &Fixture, v: &[i32]| (f.cpu.upload_ids(v).unwrap(), f.cuda.upload_ids(v).unwrap());
        let ((cf, gf), (cd, gd), (cl, gl)) = (ids(&f, &x.flags), ids(&f, &x.desirable), ids(&f, &x.lengths));
        for objective in unpaired_objectives() {
            let (mut want_m, mut got_m) = f.poisoned(n * EXAMPLE_METRICS);
            let (mut want_g, mut got_g) = f.poisoned(n);
            let cpu_examples = ExampleParts { desirable: &cd, policy_kl: Some(&cpk), reference_kl: Some(&crk) };
            let cuda_examples = ExampleParts { desirable: &gd, policy_kl: Some(&gpk), reference_kl: Some(&grk) };
            let cpu_inputs = PreferenceLossInputs {
                grad_scale: 0.7,
                ..PreferenceLossInputs::examples(&cp, &cr, &cf, &cl, cpu_examples, &objective)
            };
            let cuda_inputs = PreferenceLossInputs {
                grad_scale: 0.7,
                ..PreferenceLossInputs::examples(&gp, &gr, &gf, &gl, cuda_examples, &objective)
            };
            f.cpu.preference_loss(&mut want_m, &mut want_g, &cpu_inputs).unwrap();
            f.cuda.preference_loss(&mut got_m, &mut got_g, &cuda_inputs).unwrap();
            let (got_m, got_g) = (f.cuda.download(&got_m).unwrap(), f.cuda.download(&got_g).unwrap());
            let what = format!("{objective}, {n} examples, {m} KL sequences, spread {spread} ({})", f.precision);
            for k in 0..EXAMPLE_METRICS {
                let column = |x: &[f32]| -> Vec<f32> { x.iter().skip(k).step_by(EXAMPLE_METRICS).copied().collect() };
                assert_close_scaled(&format!("{what}: metric {k}"), &column(&got_m), &to_f64(&column(&want_m)), 1e-5);
            }
            assert_close_scaled(&format!("{what}: grads"), &got_g, &to_f64(&want_g), 1e-5);
        }
    }
}

device_tests!(
    preference_loss,
    preference_loss_at_extreme_margins,
    preference_loss_with_the_modifiers,
    preference_loss_on_examples
);
