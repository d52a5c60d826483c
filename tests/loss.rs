//! The preference objectives against their closed forms (computed independently here, naively where
//! that is safe), their gradients against central finite differences, their behaviour at huge
//! margins, SafeDPO's safety shift, the metrics, and the objective names and parameters.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safedpo::loss::{pair_loss, Objective, PairInput, PairOutput};

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

/// Every objective with random, valid parameters.
fn random_objectives(rng: &mut ChaCha8Rng) -> Vec<Objective> {
    let beta = rng.random_range(0.05..1.0);
    vec![
        Objective::Dpo { beta },
        Objective::SafeDpo { beta, delta: rng.random_range(0.0..12.0) },
        Objective::Ipo { beta },
        Objective::Robust { beta, eps: rng.random_range(0.0..0.45) },
        Objective::Cdpo { beta, eps: rng.random_range(0.0..0.5) },
        Objective::Hinge { beta },
        Objective::Rpo { beta, alpha: rng.random_range(0.0..2.0) },
        Objective::Simpo { beta: rng.random_range(0.5..3.0), gamma: rng.random_range(0.0..2.0) },
        Objective::Npo { beta },
    ]
}

fn naive_log_sigmoid(x: f64) -> f64 {
    -(1.0 + (-x).exp()).ln()
}

/// The loss straight from each paper's formula, written independently of `pair_loss`.
fn closed_form_loss(objective: &Objective, p: &PairInput) -> f64 {
    let h = (p.policy_chosen - p.ref_chosen) - (p.policy_rejected - p.ref_rejected);
    let (u_c, u_r) = (p.chosen_unsafe as i32 as f64, p.rejected_unsafe as i32 as f64);
    match *objective {
        Objective::Dpo { beta } => -naive_log_sigmoid(beta * h),
        Objective::SafeDpo { beta, delta } => -naive_log_sigmoid(beta * h - (u_r - u_c) * delta),
        Objective::Ipo { beta } => (h - 1.0 / (2.0 * beta)).powi(2),
        Objective::Robust { beta, eps } => {
            (-(1.0 - eps) * naive_log_sigmoid(beta * h) + eps * naive_log_sigmoid(-beta * h)) / (1.0 - 2.0 * eps)
        }
        Objective::Cdpo { beta, eps } => {
            -(1.0 - eps) * naive_log_sigmoid(beta * h) - eps * naive_log_sigmoid(-beta * h)
        }
        Objective::Hinge { beta } => (1.0 - beta * h).max(0.0),
        Objective::Rpo { beta, alpha } => {
            -naive_log_sigmoid(beta * h) + alpha * (-p.policy_chosen / p.chosen_len as f64)
        }
        Objective::Simpo { beta, gamma } => {
            let z = beta * (p.policy_chosen / p.chosen_len as f64 - p.policy_rejected / p.rejected_len as f64) - gamma;
            -naive_log_sigmoid(z)
        }
        Objective::Npo { beta } => {
            // (2/β) log(1 + (πθ/πref)^β), the paper's form.
            (2.0 / beta) * (1.0 + (beta * (p.policy_rejected - p.ref_rejected)).exp()).ln()
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

#[test]
fn every_objective_matches_its_closed_form() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut checked = [0usize; 9];
    for _ in 0..200 {
        let objectives = random_objectives(&mut rng);
        let p = random_pair(&mut rng);
        for (i, objective) in objectives.iter().enumerate() {
            let got = pair_loss(objective, &p).loss;
            let want = closed_form_loss(objective, &p);
            assert!(close(got, want, 1e-12, 1e-12), "{objective}: loss {got} != closed form {want} at {p:?}");
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
            if let Objective::Hinge { beta } = *objective {
                let h = (p.policy_chosen - p.ref_chosen) - (p.policy_rejected - p.ref_rejected);
                if (1.0 - beta * h).abs() < 10.0 * beta * step {
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
    // reference-free SimPO, which must ignore the reference entirely, and RPO's NLL term).
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
            assert!(close(moved.loss, expected.loss, 1e-12, 1e-12), "{objective}: {moved:?} vs {expected:?}");
            assert!(close(moved.d_policy_chosen, expected.d_policy_chosen, 1e-12, 1e-12), "{objective}");
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
    let objectives = random_objectives(&mut rng);
    for objective in &objectives {
        let beta = objective.beta();
        for beta_h in [1e4, -1e4, 1e6, -1e6] {
            for (u_c, u_r) in [(false, false), (false, true), (true, true)] {
                let p = PairInput { chosen_unsafe: u_c, rejected_unsafe: u_r, ..pair_with_h(beta_h / beta) };
                let out = pair_loss(objective, &p);
                assert_all_finite(&out, &format!("{objective} at βh = {beta_h}"));
            }
        }
    }
}

#[test]
fn dpo_limits_at_huge_margins() {
    let beta = 0.1;
    let dpo = Objective::Dpo { beta };
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
    let robust = pair_loss(&Objective::Robust { beta, eps }, &pair_with_h(-1e6 / beta));
    assert!(close(robust.loss, (1.0 - eps) * 1e6 / (1.0 - 2.0 * eps), 1e-12, 0.0), "{robust:?}");
    let cdpo = pair_loss(&Objective::Cdpo { beta, eps }, &pair_with_h(1e6 / beta));
    assert!(close(cdpo.loss, eps * 1e6, 1e-12, 0.0), "{cdpo:?}");
    assert!(close(cdpo.d_policy_chosen, beta * eps, 1e-12, 0.0), "{cdpo:?}");
}

#[test]
fn safedpo_shifts_dpo_by_delta_when_only_the_rejected_is_unsafe() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for _ in 0..100 {
        let beta = rng.random_range(0.05..1.0);
        let delta = rng.random_range(0.5..15.0);
        let safedpo = Objective::SafeDpo { beta, delta };
        let dpo = Objective::Dpo { beta };
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
                Objective::Simpo { .. } => {
                    (beta * p.policy_chosen / p.chosen_len as f64, beta * p.policy_rejected / p.rejected_len as f64)
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
    let tie = pair_loss(&Objective::Dpo { beta: 0.1 }, &pair_with_h(0.0));
    assert_eq!((tie.margin, tie.accuracy), (0.0, 0.0));
}

#[test]
fn zero_lengths_count_as_one() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for _ in 0..20 {
        let p = random_pair(&mut rng);
        for objective in [Objective::Simpo { beta: 2.0, gamma: 1.0 }, Objective::Rpo { beta: 0.1, alpha: 1.0 }] {
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
        let npo = Objective::Npo { beta: 0.1 };
        assert_eq!(pair_loss(&npo, &p).loss, pair_loss(&npo, &q).loss, "NPO must not depend on the chosen side");
        assert_eq!(pair_loss(&npo, &p).d_policy_chosen, 0.0);
        let simpo = Objective::Simpo { beta: 2.0, gamma: 1.0 };
        let r = PairInput { ref_chosen: p.ref_chosen - 7.0, ref_rejected: p.ref_rejected + 2.0, ..p };
        assert_eq!(pair_loss(&simpo, &p), pair_loss(&simpo, &r), "SimPO must not read the reference");
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
    }
    assert_eq!(Objective::default_for("SafeDPO").unwrap(), Objective::SafeDpo { beta: 0.1, delta: 10.0 });
    assert_eq!(Objective::default_for("simpo").unwrap(), Objective::Simpo { beta: 2.0, gamma: 0.5 });
    assert_eq!(Objective::default_for("robust").unwrap(), Objective::Robust { beta: 0.1, eps: 0.1 });
    assert_eq!(Objective::default_for("rpo").unwrap(), Objective::Rpo { beta: 0.1, alpha: 1.0 });
    assert_eq!("safedpo:delta=5".parse::<Objective>().unwrap(), Objective::SafeDpo { beta: 0.1, delta: 5.0 });
    assert_eq!("cdpo: beta = 0.3, eps=0.25".parse::<Objective>().unwrap(), Objective::Cdpo { beta: 0.3, eps: 0.25 });

    let unknown = Objective::default_for("kto").unwrap_err().to_string();
    assert!(unknown.contains("kto") && unknown.contains("safedpo") && unknown.contains("npo"), "{unknown}");
    let bad_key = "dpo:delta=3".parse::<Objective>().unwrap_err().to_string();
    assert!(bad_key.contains("delta") && bad_key.contains("beta"), "{bad_key}");
    let bad_value = "dpo:beta=abc".parse::<Objective>().unwrap_err().to_string();
    assert!(bad_value.contains("beta"), "{bad_value}");
    for invalid in ["dpo:beta=0", "robust:eps=0.5", "cdpo:eps=0.7", "safedpo:delta=-1", "rpo:alpha=-1", "ipo:beta=inf"]
    {
        assert!(invalid.parse::<Objective>().is_err(), "{invalid} must be rejected");
    }
}
