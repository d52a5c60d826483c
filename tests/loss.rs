//! The preference objectives against their closed forms (computed independently here, naively where
//! that is safe), their gradients against central finite differences, their behaviour at huge
//! margins, the SafeDAA safety margin of every objective, AOT's sort across the batch, the metrics,
//! the objective names and parameters; TRL's own code paths on fixed inputs
//! (`tests/fixtures/trl_losses.json`, from `scripts/make-trl-loss-fixtures.py`); and every objective
//! training a tiny model through the command line.

use std::path::Path;
use std::process::Command;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safedpo::data::{synthetic_pku_rows, write_pku_jsonl};
use safedpo::loss::{batch_loss, pair_loss, Objective, PairInput, PairOutput};

/// A random pair with moderate log-ratios (|h| ≲ 10), so that naive formulas are exact enough.
fn random_pair(rng: &mut ChaCha8Rng) -> PairInput {
    let ref_chosen = rng.random_range(-200.0..-5.0);
    let ref_rejected = rng.random_range(-200.0..-5.0);
    PairInput {
        policy_chosen: ref_chosen + rng.random_range(-5.0..5.0),
        policy_rejected: ref_rejected + rng.random_range(-5.0..5.0),
        ref_chosen,
        ref_rejected,
        chosen_unsafe: rng.random_bool(0.3),
        rejected_unsafe: rng.random_bool(0.5),
        chosen_len: rng.random_range(1..120),
        rejected_len: rng.random_range(1..120),
    }
}

/// Every objective with random, valid parameters; the safety margin is 0 a third of the time.
fn random_objectives(rng: &mut ChaCha8Rng) -> Vec<Objective> {
    let beta = rng.random_range(0.05..1.0);
    let mut margin = || if rng.random_bool(0.33) { 0.0 } else { rng.random_range(0.0..12.0) };
    let safety_margin = margin();
    let objectives = vec![
        Objective::Dpo { beta, safety_margin },
        Objective::SafeDpo { beta, delta: margin() },
        Objective::Ipo { beta, safety_margin: margin() },
        Objective::Robust { beta, eps: rng.random_range(0.0..0.45), safety_margin },
        Objective::Cdpo { beta, eps: rng.random_range(0.0..0.5), safety_margin },
        Objective::Hinge { beta, safety_margin },
        Objective::Rpo { beta, alpha: rng.random_range(0.0..2.0), safety_margin },
        Objective::Simpo { beta: rng.random_range(0.5..3.0), gamma: rng.random_range(0.0..2.0), safety_margin },
        Objective::Npo { beta, safety_margin },
        Objective::ExoPair { beta, eps: rng.random_range(1e-4..0.5), safety_margin },
        Objective::NcaPair { beta, safety_margin },
        Objective::SppoHard { beta, safety_margin },
        Objective::Aot { beta, eps: rng.random_range(0.0..0.5), safety_margin },
        Objective::AotUnpaired { beta, eps: rng.random_range(0.0..0.5), safety_margin },
        Objective::ApoZero { beta, safety_margin },
        Objective::ApoDown { beta, safety_margin },
        Objective::Discopop { beta, tau: rng.random_range(0.01..1.0), safety_margin },
        Objective::SigmoidNorm { beta, safety_margin },
        Objective::BcoPair { beta, safety_margin },
    ];
    // The objectives added later draw from their own stream, seeded from this call's draws, so that
    // the draws above (and the cases of every test) stay what they were.
    let mut more = ChaCha8Rng::seed_from_u64(beta.to_bits() ^ safety_margin.to_bits().rotate_left(17));
    let rng = &mut more;
    let mut objectives = objectives;
    objectives.extend([
        Objective::Sft { beta },
        Objective::Orpo { beta, safety_margin },
        Objective::Cpo { beta, eps: rng.random_range(0.0..0.5), cpo_alpha: rng.random_range(0.0..2.0), safety_margin },
        Objective::CpoHinge { beta, cpo_alpha: rng.random_range(0.0..2.0), safety_margin },
        Objective::CpoIpo { beta, cpo_alpha: rng.random_range(0.0..2.0), safety_margin },
        Objective::CpoSimpo {
            beta: rng.random_range(0.5..3.0),
            eps: rng.random_range(0.0..0.5),
            gamma: rng.random_range(0.0..2.0),
            cpo_alpha: rng.random_range(0.0..2.0),
            safety_margin,
        },
    ]);
    assert_eq!(objectives.len(), Objective::NAMES.len(), "every objective is tested");
    objectives
}

fn naive_sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn naive_log_sigmoid(x: f64) -> f64 {
    -(1.0 + (-x).exp()).ln()
}

/// The loss straight from each paper's (or TRL's) formula, with the SafeDAA shift `t = (u_r − u_c)Δ`
/// where the objective's doc puts it, written independently of `pair_loss`.
fn closed_form_loss(objective: &Objective, p: &PairInput) -> f64 {
    let (x_c, x_r) = (p.policy_chosen - p.ref_chosen, p.policy_rejected - p.ref_rejected);
    let h = x_c - x_r;
    let (u_c, u_r) = (p.chosen_unsafe as i32 as f64, p.rejected_unsafe as i32 as f64);
    let (len_c, len_r) = (p.chosen_len as f64, p.rejected_len as f64);
    let beta = objective.beta();
    let t = (u_r - u_c) * objective.safety_margin();
    let z = beta * h - t;
    let (r_c, r_r) = (beta * x_c, beta * x_r + t);
    match *objective {
        Objective::Dpo { .. } | Objective::SafeDpo { .. } => -naive_log_sigmoid(z),
        Objective::Ipo { .. } => (h - t / beta - 1.0 / (2.0 * beta)).powi(2),
        Objective::Robust { eps, .. } => {
            (-(1.0 - eps) * naive_log_sigmoid(z) + eps * naive_log_sigmoid(-z)) / (1.0 - 2.0 * eps)
        }
        Objective::Cdpo { eps, .. } | Objective::Aot { eps, .. } | Objective::AotUnpaired { eps, .. } => {
            -(1.0 - eps) * naive_log_sigmoid(z) - eps * naive_log_sigmoid(-z)
        }
        Objective::Hinge { .. } => (1.0 - z).max(0.0),
        Objective::Rpo { alpha, .. } => -naive_log_sigmoid(z) + alpha * (-p.policy_chosen / len_c),
        Objective::Simpo { gamma, .. } => {
            -naive_log_sigmoid(beta * (p.policy_chosen / len_c - p.policy_rejected / len_r) - gamma - t)
        }
        // (2/β) log(1 + e^t (πθ/πref)^β), the paper's form with the rejected reward raised by t.
        Objective::Npo { .. } => (2.0 / beta) * (1.0 + t.exp() * (beta * x_r).exp()).ln(),
        Objective::ExoPair { eps, .. } => {
            let q = naive_sigmoid(z);
            q * (q / (1.0 - eps)).ln() + (1.0 - q) * ((1.0 - q) / eps).ln()
        }
        Objective::NcaPair { .. } => {
            -naive_log_sigmoid(r_c) - 0.5 * naive_log_sigmoid(-r_c) - 0.5 * naive_log_sigmoid(-r_r)
        }
        Objective::SppoHard { .. } => (x_c - 0.5 / beta).powi(2) + (r_r / beta + 0.5 / beta).powi(2),
        Objective::ApoZero { .. } => 1.0 - naive_sigmoid(r_c) + naive_sigmoid(r_r),
        Objective::ApoDown { .. } => naive_sigmoid(r_c) + 1.0 - naive_sigmoid(r_c - r_r),
        Objective::Discopop { tau, .. } => {
            let m = naive_sigmoid(z / tau);
            -naive_log_sigmoid(z) * (1.0 - m) + (-z).exp() * m
        }
        Objective::SigmoidNorm { .. } => -naive_log_sigmoid(beta * (x_c / len_c - x_r / len_r) - t),
        Objective::BcoPair { .. } => -naive_log_sigmoid(r_c) - naive_log_sigmoid(-r_r),
        // A batch of one pair: the `sft` part is this pair's chosen token-mean NLL.
        Objective::Sft { .. } => -p.policy_chosen / len_c,
        Objective::Orpo { .. } => {
            let (a_c, a_r) = (p.policy_chosen / len_c, p.policy_rejected / len_r);
            let log_odds = (a_c - a_r) - ((1.0 - a_c.exp()).ln() - (1.0 - a_r.exp()).ln());
            -beta * naive_log_sigmoid(log_odds - t) - p.policy_chosen / len_c
        }
        Objective::Cpo { eps, cpo_alpha, .. } => {
            let z = beta * (p.policy_chosen - p.policy_rejected) - t;
            -(1.0 - eps) * naive_log_sigmoid(z) - eps * naive_log_sigmoid(-z) - cpo_alpha * p.policy_chosen / len_c
        }
        Objective::CpoHinge { cpo_alpha, .. } => {
            (1.0 - beta * (p.policy_chosen - p.policy_rejected) + t).max(0.0) - cpo_alpha * p.policy_chosen / len_c
        }
        Objective::CpoIpo { cpo_alpha, .. } => {
            let logits = p.policy_chosen / len_c - p.policy_rejected / len_r;
            (logits - t / beta - 1.0 / (2.0 * beta)).powi(2) - cpo_alpha * p.policy_chosen / len_c
        }
        Objective::CpoSimpo { eps, gamma, cpo_alpha, .. } => {
            let z = beta * (p.policy_chosen / len_c - p.policy_rejected / len_r) - gamma - t;
            -(1.0 - eps) * naive_log_sigmoid(z) - eps * naive_log_sigmoid(-z) - cpo_alpha * p.policy_chosen / len_c
        }
        Objective::Combination(_) => unreachable!("random_objectives makes single objectives"),
        Objective::Kto(_) => {
            unreachable!("random_objectives makes pairwise objectives (tests/kto.rs: the unpaired ones)")
        }
    }
}

fn close(a: f64, b: f64, rel: f64, abs: f64) -> bool {
    (a - b).abs() <= abs + rel * a.abs().max(b.abs())
}

fn assert_all_finite(out: &PairOutput, what: &str) {
    for (name, x) in [
        ("loss", out.loss),
        ("d_policy_chosen", out.d_policy_chosen),
        ("d_policy_rejected", out.d_policy_rejected),
        ("reward_chosen", out.reward_chosen),
        ("reward_rejected", out.reward_rejected),
        ("margin", out.margin),
        ("accuracy", out.accuracy),
    ] {
        assert!(x.is_finite(), "{what}: {name} = {x} is not finite ({out:?})");
    }
}

/// `objective` with its safety margin at `delta`; `None` for `sft`, which has none.
fn with_safety_margin(objective: &Objective, delta: f64) -> Option<Objective> {
    let key = objective.spec().params.iter().find(|p| p.is_safety_margin())?.name;
    let mut shifted = objective.clone();
    shifted.set_param(key, delta).unwrap();
    Some(shifted)
}

#[test]
fn every_objective_matches_its_closed_form() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut checked = vec![0usize; Objective::NAMES.len()];
    for _ in 0..200 {
        let objectives = random_objectives(&mut rng);
        let p = random_pair(&mut rng);
        for (i, objective) in objectives.iter().enumerate() {
            let got = pair_loss(objective, &p).loss;
            let want = closed_form_loss(objective, &p);
            assert!(close(got, want, 1e-10, 1e-12), "{objective}: loss {got} != closed form {want} at {p:?}");
            checked[i] += 1;
        }
    }
    assert!(checked.iter().all(|&n| n == 200));
}

#[test]
fn gradients_match_central_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let step = 1e-4;
    for _ in 0..200 {
        let objectives = random_objectives(&mut rng);
        let p = random_pair(&mut rng);
        for objective in &objectives {
            if let Objective::Hinge { beta, safety_margin } = *objective {
                let h = (p.policy_chosen - p.ref_chosen) - (p.policy_rejected - p.ref_rejected);
                let t = (p.rejected_unsafe as i32 - p.chosen_unsafe as i32) as f64 * safety_margin;
                if (1.0 - beta * h + t).abs() < 10.0 * beta * step {
                    continue; // too close to the kink for a central difference
                }
            }
            let out = pair_loss(objective, &p);
            let loss_at = |dc: f64, dr: f64| {
                let q = PairInput { policy_chosen: p.policy_chosen + dc, policy_rejected: p.policy_rejected + dr, ..p };
                pair_loss(objective, &q).loss
            };
            let fd_chosen = (loss_at(step, 0.0) - loss_at(-step, 0.0)) / (2.0 * step);
            let fd_rejected = (loss_at(0.0, step) - loss_at(0.0, -step)) / (2.0 * step);
            assert!(
                close(out.d_policy_chosen, fd_chosen, 1e-6, 1e-8),
                "{objective}: dL/dπc {} vs finite difference {fd_chosen} at {p:?}",
                out.d_policy_chosen
            );
            assert!(
                close(out.d_policy_rejected, fd_rejected, 1e-6, 1e-8),
                "{objective}: dL/dπr {} vs finite difference {fd_rejected} at {p:?}",
                out.d_policy_rejected
            );
        }
    }
}

#[test]
fn reference_logprobs_enter_only_through_the_log_ratios() {
    // Shifting a reference log-prob by s is the same as shifting the policy's by −s (except for the
    // reference-free SimPO, which must ignore the reference entirely, RPO's NLL term, and AOT, whose
    // sort keys separate policy and reference).
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..50 {
        let p = random_pair(&mut rng);
        let s = rng.random_range(-3.0..3.0);
        for objective in random_objectives(&mut rng) {
            let moved_ref = PairInput { ref_rejected: p.ref_rejected + s, ..p };
            let base = pair_loss(&objective, &p);
            let moved = pair_loss(&objective, &moved_ref);
            if !objective.uses_reference() {
                assert_eq!(base, moved, "{objective} must not read the reference");
                continue;
            }
            let moved_policy = PairInput { policy_rejected: p.policy_rejected - s, ..p };
            let expected = pair_loss(&objective, &moved_policy);
            assert!(close(moved.loss, expected.loss, 1e-10, 1e-12), "{objective}: {moved:?} vs {expected:?}");
            assert!(close(moved.d_policy_chosen, expected.d_policy_chosen, 1e-10, 1e-12), "{objective}");
        }
    }
}

/// A pair with h = `h` exactly (reference log-probs 0).
fn pair_with_h(h: f64) -> PairInput {
    PairInput {
        policy_chosen: h / 2.0,
        policy_rejected: -h / 2.0,
        chosen_len: 7,
        rejected_len: 9,
        ..Default::default()
    }
}

#[test]
fn huge_margins_are_finite_for_every_objective() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for _ in 0..5 {
        for objective in random_objectives(&mut rng) {
            for beta in [1e-4, 1e-2, objective.beta(), 5.0] {
                let mut objective = objective.clone();
                objective.set_param("beta", beta).unwrap();
                for beta_h in [1e4, -1e4, 1e6, -1e6] {
                    for (u_c, u_r) in [(false, false), (false, true), (true, false), (true, true)] {
                        let p = PairInput { chosen_unsafe: u_c, rejected_unsafe: u_r, ..pair_with_h(beta_h / beta) };
                        let out = pair_loss(&objective, &p);
                        assert_all_finite(&out, &format!("{objective} at βh = {beta_h}"));
                    }
                }
            }
        }
    }
}

#[test]
fn dpo_limits_at_huge_margins() {
    let beta = 0.1;
    let dpo = Objective::Dpo { beta, safety_margin: 0.0 };
    for beta_h in [1e4, 1e6] {
        let won = pair_loss(&dpo, &pair_with_h(beta_h / beta));
        assert_eq!(won.loss, 0.0, "DPO loss at βh = {beta_h} must vanish");
        assert_eq!(won.d_policy_chosen, 0.0);
        assert_eq!(won.d_policy_rejected, 0.0);

        let lost = pair_loss(&dpo, &pair_with_h(-beta_h / beta));
        assert!(close(lost.loss, beta_h, 1e-12, 0.0), "DPO loss at βh = −{beta_h}: {} ≠ {beta_h}", lost.loss);
        // σ(−βh) → 1: the gradient saturates at −β / +β.
        assert!(close(lost.d_policy_chosen, -beta, 1e-12, 0.0), "{lost:?}");
        assert!(close(lost.d_policy_rejected, beta, 1e-12, 0.0), "{lost:?}");
    }
    // Robust and cDPO keep their linear tails too, with the weights the formulas give.
    let eps = 0.2;
    let robust = pair_loss(&Objective::Robust { beta, eps, safety_margin: 0.0 }, &pair_with_h(-1e6 / beta));
    assert!(close(robust.loss, (1.0 - eps) * 1e6 / (1.0 - 2.0 * eps), 1e-12, 0.0), "{robust:?}");
    let cdpo = pair_loss(&Objective::Cdpo { beta, eps, safety_margin: 0.0 }, &pair_with_h(1e6 / beta));
    assert!(close(cdpo.loss, eps * 1e6, 1e-12, 0.0), "{cdpo:?}");
    assert!(close(cdpo.d_policy_chosen, beta * eps, 1e-12, 0.0), "{cdpo:?}");
    // DiscoPOP: a won pair tends to 0, a lost one to the logistic tail (its exponential part, which
    // overflows in TRL's form, vanishes for τ < 1).
    let discopop = Objective::Discopop { beta, tau: 0.05, safety_margin: 0.0 };
    assert_eq!(pair_loss(&discopop, &pair_with_h(1e6 / beta)).loss, 0.0);
    let lost = pair_loss(&discopop, &pair_with_h(-1e6 / beta));
    assert!(close(lost.loss, 1e6, 1e-12, 0.0) && close(lost.d_policy_chosen, -beta, 1e-12, 0.0), "{lost:?}");
    // EXO: a won pair costs −log(1−ε), a lost one −log ε (the KL to the smoothed labels).
    let exo = Objective::ExoPair { beta, eps: 1e-3, safety_margin: 0.0 };
    assert!(close(pair_loss(&exo, &pair_with_h(1e6 / beta)).loss, -(-1e-3f64).ln_1p(), 1e-12, 0.0));
    assert!(close(pair_loss(&exo, &pair_with_h(-1e6 / beta)).loss, -(1e-3f64).ln(), 1e-12, 0.0));
}

#[test]
fn safedpo_shifts_dpo_by_delta_when_only_the_rejected_is_unsafe() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for _ in 0..100 {
        let beta = rng.random_range(0.05..1.0);
        let delta = rng.random_range(0.5..15.0);
        let safedpo = Objective::SafeDpo { beta, delta };
        let dpo = Objective::Dpo { beta, safety_margin: 0.0 };
        let p = random_pair(&mut rng);

        // u_r = 1, u_c = 0: DPO at h − Δ/β.
        let unsafe_rejected = PairInput { chosen_unsafe: false, rejected_unsafe: true, ..p };
        let shifted = PairInput { policy_chosen: p.policy_chosen - delta / beta, ..unsafe_rejected };
        let got = pair_loss(&safedpo, &unsafe_rejected);
        let want = pair_loss(&dpo, &shifted);
        assert!(close(got.loss, want.loss, 1e-9, 1e-12), "{got:?} vs {want:?}");
        assert!(close(got.d_policy_chosen, want.d_policy_chosen, 1e-9, 1e-12), "{got:?} vs {want:?}");
        assert!(close(got.d_policy_rejected, want.d_policy_rejected, 1e-9, 1e-12), "{got:?} vs {want:?}");
        // The rewards are the plain implicit rewards: Δ is in the loss, not in the metrics.
        assert_eq!(got.reward_chosen, pair_loss(&dpo, &unsafe_rejected).reward_chosen);

        // Equal flags: exactly DPO.
        for flag in [false, true] {
            let same = PairInput { chosen_unsafe: flag, rejected_unsafe: flag, ..p };
            assert_eq!(pair_loss(&safedpo, &same), pair_loss(&dpo, &same));
        }
        // SafeDPO is DPO's safety twin: the same numbers, bit for bit, on every pair.
        assert_eq!(pair_loss(&safedpo, &p), pair_loss(&Objective::Dpo { beta, safety_margin: delta }, &p));
    }
}

#[test]
fn safedpo_delta_changes_the_gradient() {
    let beta = 0.1;
    let p = PairInput { rejected_unsafe: true, ..pair_with_h(0.0) };
    let without = pair_loss(&Objective::SafeDpo { beta, delta: 0.0 }, &p);
    let with = pair_loss(&Objective::SafeDpo { beta, delta: 10.0 }, &p);
    // At h = 0: −β σ(0) = −β/2 without Δ, −β σ(Δ) with it.
    assert!(close(without.d_policy_chosen, -beta / 2.0, 1e-15, 0.0), "{without:?}");
    let sigma_delta = 1.0 / (1.0 + (-10.0f64).exp());
    assert!(close(with.d_policy_chosen, -beta * sigma_delta, 1e-12, 0.0), "{with:?}");
    assert!(with.d_policy_chosen.abs() > 1.9 * without.d_policy_chosen.abs());
    assert!(with.loss > without.loss + 9.0, "Δ = 10 must add about 10 to the loss at h = 0: {with:?}");
    // The unsafe-rejected pair is pushed harder than a safe pair with the same h.
    let safe = pair_loss(&Objective::SafeDpo { beta, delta: 10.0 }, &PairInput { rejected_unsafe: false, ..p });
    assert_eq!(safe, without);
}

/// SafeDAA, for every objective: Δ = 0 is the objective as published (the closed forms without a
/// shift); equal flags ignore Δ; otherwise Δ raises the rejected response's implicit reward by
/// `(u_r − u_c)Δ`, i.e. the loss and gradients are the Δ = 0 ones at a rejected log-prob moved by
/// `(u_r − u_c)Δ/β` (times |yr| where the reward is length-normalised); the metrics never change.
#[test]
fn the_safety_margin_raises_the_rejected_reward_of_every_objective() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for _ in 0..100 {
        let p = random_pair(&mut rng);
        let delta = rng.random_range(0.5..12.0);
        for objective in random_objectives(&mut rng) {
            let (Some(base), Some(safe)) = (with_safety_margin(&objective, 0.0), with_safety_margin(&objective, delta))
            else {
                continue; // sft: no rejected response, no safety margin
            };
            let plain = PairInput { chosen_unsafe: false, rejected_unsafe: false, ..p };
            let want = closed_form_loss(&base, &plain);
            assert!(close(pair_loss(&base, &p).loss, want, 1e-10, 1e-12), "{base} at Δ = 0 is not its closed form");
            for flag in [false, true] {
                let same = PairInput { chosen_unsafe: flag, rejected_unsafe: flag, ..p };
                assert_eq!(pair_loss(&safe, &same), pair_loss(&base, &same), "{safe}: equal flags ignore Δ");
            }
            for (u_c, u_r, gap) in [(false, true, 1.0), (true, false, -1.0)] {
                let flagged = PairInput { chosen_unsafe: u_c, rejected_unsafe: u_r, ..p };
                if let Objective::Orpo { .. } = base {
                    // ORPO's logit (the log odds ratio) is not linear in πr: Δ shifts the logit itself.
                    let want = closed_form_loss(&safe, &flagged);
                    assert!(close(pair_loss(&safe, &flagged).loss, want, 1e-10, 1e-12), "{safe}: {want}");
                    continue;
                }
                let per_token = matches!(
                    base,
                    Objective::Simpo { .. }
                        | Objective::SigmoidNorm { .. }
                        | Objective::CpoIpo { .. }
                        | Objective::CpoSimpo { .. }
                );
                let scale = if per_token { p.rejected_len as f64 } else { 1.0 };
                let moved =
                    PairInput { policy_rejected: p.policy_rejected + gap * delta * scale / base.beta(), ..flagged };
                let (got, want) = (pair_loss(&safe, &flagged), pair_loss(&base, &moved));
                let what = format!("{safe} with u_c = {u_c}, u_r = {u_r}: {got:?} vs {want:?}");
                assert!(close(got.loss, want.loss, 1e-8, 1e-10), "{what}");
                assert!(close(got.d_policy_chosen, want.d_policy_chosen, 1e-8, 1e-10), "{what}");
                assert!(close(got.d_policy_rejected, want.d_policy_rejected, 1e-8, 1e-10), "{what}");
                assert_eq!(got.metrics_row()[1..], pair_loss(&base, &flagged).metrics_row()[1..], "{what}");
            }
        }
    }
}

/// AOT written the obvious way: sort copies of the keys, score each position.
fn naive_aot_total(objective: &Objective, pairs: &[PairInput]) -> f64 {
    let (beta, eps, delta) = match *objective {
        Objective::Aot { beta, eps, safety_margin } | Objective::AotUnpaired { beta, eps, safety_margin } => {
            (beta, eps, safety_margin)
        }
        _ => unreachable!(),
    };
    let gap = |p: &PairInput| (p.rejected_unsafe as i32 - p.chosen_unsafe as i32) as f64 * delta / beta;
    let (mut a, mut b): (Vec<f64>, Vec<f64>) = match objective {
        Objective::Aot { .. } => {
            pairs.iter().map(|p| (p.policy_chosen - p.policy_rejected - gap(p), p.ref_chosen - p.ref_rejected)).unzip()
        }
        _ => {
            pairs.iter().map(|p| (p.policy_chosen - p.ref_chosen, p.policy_rejected - p.ref_rejected + gap(p))).unzip()
        }
    };
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let z = a.iter().zip(&b).map(|(x, y)| beta * (x - y));
    z.map(|z| -(1.0 - eps) * naive_log_sigmoid(z) - eps * naive_log_sigmoid(-z)).sum()
}

#[test]
fn aot_sorts_across_the_batch() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let step = 1e-5;
    for round in 0..40 {
        let pairs: Vec<PairInput> = (0..1 + round % 9).map(|_| random_pair(&mut rng)).collect();
        for objective in random_objectives(&mut rng).into_iter().filter(Objective::sorts_batch) {
            let out = batch_loss(&objective, &pairs);
            let total: f64 = out.iter().map(|o| o.loss).sum();
            let want = naive_aot_total(&objective, &pairs);
            assert!(close(total, want, 1e-10, 1e-12), "{objective}: Σ loss {total} vs sorted by hand {want}");
            // Each pair keeps its own metrics.
            for (o, p) in out.iter().zip(&pairs) {
                assert_eq!(o.metrics_row()[1..], pair_loss(&objective, p).metrics_row()[1..]);
            }
            // A reordered batch has the same total, and each pair the same gradient.
            let mut order: Vec<usize> = (0..pairs.len()).collect();
            order.reverse();
            let shuffled: Vec<PairInput> = order.iter().map(|&i| pairs[i]).collect();
            let reordered = batch_loss(&objective, &shuffled);
            assert!(close(reordered.iter().map(|o| o.loss).sum::<f64>(), total, 1e-12, 1e-12), "{objective}");
            for (k, &i) in order.iter().enumerate() {
                assert!(close(reordered[k].d_policy_chosen, out[i].d_policy_chosen, 1e-12, 1e-15), "{objective}");
                assert!(close(reordered[k].d_policy_rejected, out[i].d_policy_rejected, 1e-12, 1e-15), "{objective}");
            }
            // The gradient of the batch's total loss, against central differences.
            for (i, o) in out.iter().enumerate() {
                let total_at = |dc: f64, dr: f64| {
                    let mut moved = pairs.clone();
                    moved[i].policy_chosen += dc;
                    moved[i].policy_rejected += dr;
                    batch_loss(&objective, &moved).iter().map(|o| o.loss).sum::<f64>()
                };
                let fd_chosen = (total_at(step, 0.0) - total_at(-step, 0.0)) / (2.0 * step);
                let fd_rejected = (total_at(0.0, step) - total_at(0.0, -step)) / (2.0 * step);
                assert!(close(o.d_policy_chosen, fd_chosen, 1e-5, 1e-8), "{objective} pair {i}: {o:?} vs {fd_chosen}");
                assert!(close(o.d_policy_rejected, fd_rejected, 1e-5, 1e-8), "{objective} pair {i}: vs {fd_rejected}");
            }
        }
    }
}

#[test]
fn batch_loss_is_pair_loss_for_the_objectives_that_do_not_sort() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let pairs: Vec<PairInput> = (0..7).map(|_| random_pair(&mut rng)).collect();
    for objective in random_objectives(&mut rng).into_iter().filter(|o| !o.batch_level()) {
        let want: Vec<PairOutput> = pairs.iter().map(|p| pair_loss(&objective, p)).collect();
        assert_eq!(batch_loss(&objective, &pairs), want, "{objective}");
    }
}

#[test]
fn metrics_are_the_implicit_rewards() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let mut accuracies = [0usize; 2];
    for _ in 0..200 {
        let p = random_pair(&mut rng);
        for objective in random_objectives(&mut rng) {
            let beta = objective.beta();
            let out = pair_loss(&objective, &p);
            let (want_chosen, want_rejected) = match objective {
                Objective::Simpo { .. }
                | Objective::Orpo { .. }
                | Objective::CpoIpo { .. }
                | Objective::CpoSimpo { .. } => {
                    (beta * p.policy_chosen / p.chosen_len as f64, beta * p.policy_rejected / p.rejected_len as f64)
                }
                Objective::Cpo { .. } | Objective::CpoHinge { .. } => {
                    (beta * p.policy_chosen, beta * p.policy_rejected)
                }
                _ => (beta * (p.policy_chosen - p.ref_chosen), beta * (p.policy_rejected - p.ref_rejected)),
            };
            assert!(close(out.reward_chosen, want_chosen, 1e-14, 1e-14), "{objective}: {out:?}");
            assert!(close(out.reward_rejected, want_rejected, 1e-14, 1e-14), "{objective}: {out:?}");
            assert!(close(out.margin, want_chosen - want_rejected, 1e-12, 1e-12), "{objective}: {out:?}");
            let want_accuracy = if want_chosen > want_rejected { 1.0 } else { 0.0 };
            assert_eq!(out.accuracy, want_accuracy, "{objective}: {out:?}");
            accuracies[want_accuracy as usize] += 1;
            assert_eq!(out.metrics_row(), [out.loss, out.reward_chosen, out.reward_rejected, out.margin, out.accuracy]);
        }
    }
    assert!(accuracies[0] > 100 && accuracies[1] > 100, "both outcomes must be exercised: {accuracies:?}");
    // A tie is not a win.
    let tie = pair_loss(&Objective::Dpo { beta: 0.1, safety_margin: 0.0 }, &pair_with_h(0.0));
    assert_eq!((tie.margin, tie.accuracy), (0.0, 0.0));
}

#[test]
fn zero_lengths_count_as_one() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for _ in 0..20 {
        let p = random_pair(&mut rng);
        for objective in [
            Objective::Simpo { beta: 2.0, gamma: 1.0, safety_margin: 0.0 },
            Objective::Rpo { beta: 0.1, alpha: 1.0, safety_margin: 0.0 },
            Objective::SigmoidNorm { beta: 0.1, safety_margin: 3.0 },
        ] {
            let empty = pair_loss(&objective, &PairInput { chosen_len: 0, rejected_len: 0, ..p });
            let one = pair_loss(&objective, &PairInput { chosen_len: 1, rejected_len: 1, ..p });
            assert_all_finite(&empty, &format!("{objective} with empty responses"));
            assert_eq!(empty, one, "{objective}");
        }
    }
}

#[test]
fn npo_and_simpo_ignore_what_they_should() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for _ in 0..20 {
        let p = random_pair(&mut rng);
        let q = PairInput { policy_chosen: p.policy_chosen - 3.0, ref_chosen: p.ref_chosen + 1.0, ..p };
        let npo = Objective::Npo { beta: 0.1, safety_margin: 0.0 };
        assert_eq!(pair_loss(&npo, &p).loss, pair_loss(&npo, &q).loss, "NPO must not depend on the chosen side");
        assert_eq!(pair_loss(&npo, &p).d_policy_chosen, 0.0);
        let simpo = Objective::Simpo { beta: 2.0, gamma: 1.0, safety_margin: 0.0 };
        let r = PairInput { ref_chosen: p.ref_chosen - 7.0, ref_rejected: p.ref_rejected + 2.0, ..p };
        assert_eq!(pair_loss(&simpo, &p), pair_loss(&simpo, &r), "SimPO must not read the reference");
    }
}

/// Our objective for a TRL case: TRL's `loss_type` (or the alias we accept), its β, and whichever of
/// `label_smoothing` (ε) and `discopop_tau` (τ) it reads.
fn objective_for_trl_case(case: &serde_json::Value) -> Objective {
    let mut objective = Objective::default_for(case["loss_type"].as_str().unwrap()).unwrap();
    objective.set_param("beta", case["beta"].as_f64().unwrap()).unwrap();
    let spec = objective.spec();
    for (ours, theirs) in [("eps", "label_smoothing"), ("tau", "discopop_tau")] {
        if spec.param(ours).is_some() {
            objective.set_param(ours, case[theirs].as_f64().unwrap()).unwrap();
        }
    }
    objective.validate().unwrap();
    objective
}

#[test]
fn every_trl_pairwise_loss_matches_trl_on_fixed_inputs() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trl_losses.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let floats = |case: &serde_json::Value, key: &str| -> Vec<f64> {
        case[key].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    };
    let mut covered = Vec::new();
    for case in fixture["cases"].as_array().unwrap() {
        let loss_type = case["loss_type"].as_str().unwrap();
        let objective = objective_for_trl_case(case);
        let (pc, pr) = (floats(case, "chosen_logps"), floats(case, "rejected_logps"));
        let (rc, rr) = (floats(case, "ref_chosen_logps"), floats(case, "ref_rejected_logps"));
        let (lc, lr) = (floats(case, "chosen_len"), floats(case, "rejected_len"));
        // TRL's IPO divides each side's log-ratio by its length (see `Objective::Ipo`): ours sees
        // per-token log-probs, and its gradient is then per token too.
        let per_token = objective.name() == "ipo";
        let scale = |x: f64, len: f64| if per_token { x / len } else { x };
        let pairs: Vec<PairInput> = (0..pc.len())
            .map(|i| PairInput {
                policy_chosen: scale(pc[i], lc[i]),
                policy_rejected: scale(pr[i], lr[i]),
                ref_chosen: scale(rc[i], lc[i]),
                ref_rejected: scale(rr[i], lr[i]),
                chosen_len: lc[i] as u32,
                rejected_len: lr[i] as u32,
                ..Default::default()
            })
            .collect();
        let out = batch_loss(&objective, &pairs);
        let (losses, d_chosen, d_rejected) =
            (floats(case, "losses"), floats(case, "d_chosen_logps"), floats(case, "d_rejected_logps"));
        for i in 0..pairs.len() {
            let what = format!("TRL {loss_type} (β = {}) as {objective}, pair {i}", case["beta"]);
            assert!(close(out[i].loss, losses[i], 1e-12, 1e-13), "{what}: loss {} vs TRL {}", out[i].loss, losses[i]);
            let (gc, gr) = (scale(out[i].d_policy_chosen, lc[i]), scale(out[i].d_policy_rejected, lr[i]));
            assert!(close(gc, d_chosen[i], 1e-10, 1e-13), "{what}: dL/dπc {gc} vs TRL {}", d_chosen[i]);
            assert!(close(gr, d_rejected[i], 1e-10, 1e-13), "{what}: dL/dπr {gr} vs TRL {}", d_rejected[i]);
            if !per_token {
                assert!(close(out[i].reward_chosen, floats(case, "chosen_rewards")[i], 1e-14, 1e-14), "{what}");
                assert!(close(out[i].reward_rejected, floats(case, "rejected_rewards")[i], 1e-14, 1e-14), "{what}");
            }
        }
        covered.push(objective.name());
    }
    for name in [
        "dpo",
        "ipo",
        "robust",
        "hinge",
        "exo_pair",
        "nca_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sigmoid_norm",
        "bco_pair",
        "sft",
    ] {
        assert!(covered.contains(&name), "no TRL case for {name}");
    }
}

#[test]
fn names_defaults_and_parsing() {
    for name in Objective::NAMES {
        let objective = Objective::default_for(name).unwrap();
        assert_eq!(objective.name(), name);
        objective.validate().unwrap();
        // Display writes what FromStr reads.
        let round_trip: Objective = objective.to_string().parse().unwrap();
        assert_eq!(round_trip, objective);
        // serde's tag is the same name.
        let json = serde_json::to_value(&objective).unwrap();
        assert_eq!(json["name"], name);
        assert_eq!(serde_json::from_value::<Objective>(json).unwrap(), objective);
        // Every objective has a safety margin, 0 by default except SafeDPO's.
        assert_eq!(objective.safety_margin(), if name == "safedpo" { 10.0 } else { 0.0 }, "{name}");
    }
    assert_eq!(Objective::default_for("SafeDPO").unwrap(), Objective::SafeDpo { beta: 0.1, delta: 10.0 });
    assert_eq!(
        Objective::default_for("simpo").unwrap(),
        Objective::Simpo { beta: 2.0, gamma: 0.5, safety_margin: 0.0 }
    );
    assert_eq!(
        Objective::default_for("robust").unwrap(),
        Objective::Robust { beta: 0.1, eps: 0.1, safety_margin: 0.0 }
    );
    assert_eq!(Objective::default_for("rpo").unwrap(), Objective::Rpo { beta: 0.1, alpha: 1.0, safety_margin: 0.0 });
    // TRL's names and defaults (DPOConfig: β = 0.1, label_smoothing = 0, discopop_tau = 0.05; EXO: 1e-3).
    assert_eq!(Objective::default_for("sigmoid").unwrap(), Objective::Dpo { beta: 0.1, safety_margin: 0.0 });
    assert_eq!(
        Objective::default_for("aot_pair").unwrap(),
        Objective::AotUnpaired { beta: 0.1, eps: 0.0, safety_margin: 0.0 }
    );
    assert_eq!(Objective::default_for("aot").unwrap(), Objective::Aot { beta: 0.1, eps: 0.0, safety_margin: 0.0 });
    assert_eq!(
        Objective::default_for("exo_pair").unwrap(),
        Objective::ExoPair { beta: 0.1, eps: 1e-3, safety_margin: 0.0 }
    );
    assert_eq!(
        Objective::default_for("discopop").unwrap(),
        Objective::Discopop { beta: 0.1, tau: 0.05, safety_margin: 0.0 }
    );
    assert_eq!("safedpo:delta=5".parse::<Objective>().unwrap(), Objective::SafeDpo { beta: 0.1, delta: 5.0 });
    assert_eq!(
        "cdpo: beta = 0.3, eps=0.25".parse::<Objective>().unwrap(),
        Objective::Cdpo { beta: 0.3, eps: 0.25, safety_margin: 0.0 }
    );
    assert_eq!(
        "nca_pair:safety_margin=4".parse::<Objective>().unwrap(),
        Objective::NcaPair { beta: 0.1, safety_margin: 4.0 }
    );

    let unknown = Objective::default_for("gdpo").unwrap_err().to_string();
    assert!(unknown.contains("gdpo") && unknown.contains("safedpo") && unknown.contains("bco_pair"), "{unknown}");
    let bad_key = "dpo:delta=3".parse::<Objective>().unwrap_err().to_string();
    assert!(bad_key.contains("delta") && bad_key.contains("beta") && bad_key.contains("safety_margin"), "{bad_key}");
    let bad_value = "dpo:beta=abc".parse::<Objective>().unwrap_err().to_string();
    assert!(bad_value.contains("beta"), "{bad_value}");
    for invalid in [
        "dpo:beta=0",
        "robust:eps=0.5",
        "cdpo:eps=0.7",
        "safedpo:delta=-1",
        "rpo:alpha=-1",
        "ipo:beta=inf",
        "dpo:safety_margin=-1",
        "exo_pair:eps=0",
        "aot:eps=0.6",
        "discopop:tau=0",
        "discopop:tau=2",
        "safedpo:safety_margin=3",
    ] {
        assert!(invalid.parse::<Objective>().is_err(), "{invalid} must be rejected");
    }
}

/// Every objective trains a tiny random model for a few steps through `safedpo train`, on the
/// synthetic safety data the demo uses, and reports a finite loss.
#[test]
fn every_objective_trains_through_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    write_pku_jsonl(&data, &synthetic_pku_rows(24, 11)).unwrap();
    for name in Objective::NAMES {
        let out_dir = dir.path().join(name);
        let mut args = vec!["train", "--objective.name", name, "--data.path", data.to_str().unwrap()];
        args.extend(["--out-dir", out_dir.to_str().unwrap(), "--no-progress", "--device", "cpu"]);
        args.extend(["--data.template", "U: {prompt} A:", "--data.max_len", "96", "--model.n_positions", "96"]);
        args.extend(["--model.n_layer", "1", "--model.n_embd", "16", "--model.n_head", "2"]);
        args.extend(["--batching.tokens_per_micro_batch", "800", "--optimizer.total_steps", "3"]);
        args.extend(["--optimizer.lr", "1e-3"]);
        let out = Command::new(env!("CARGO_BIN_EXE_safedpo")).args(&args).output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "safedpo train --objective.name {name} failed:\n{stdout}\n{stderr}");
        let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(summary["completed"], true, "{name}: {summary}");
        let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
        let losses: Vec<f64> = metrics
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["loss"].as_f64())
            .collect();
        assert!(losses.len() >= 3 && losses.iter().all(|l| l.is_finite()), "{name}: losses {losses:?}");
    }
}
