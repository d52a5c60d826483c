//! The objectives beyond one pairwise loss: `sft` (the batch's token-mean NLL), ORPO and CPO
//! (reference-free, with their NLL terms), combinations (TRL's `loss_type` list with `loss_weights`,
//! `rpo_alpha`), the f-divergences and `bco_pair`'s running reward mean; each against an f64
//! reference written here from its formula, its gradient against central differences of the batch's
//! total loss, and TRL's own code paths on fixed inputs (`tests/fixtures/trl_loss_modifiers.json`,
//! from `scripts/make-trl-loss-fixtures.py`). Then how they are written (text, TOML, flags), and
//! training through the command line.

use std::path::Path;
use std::process::Command;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safedpo::config::{RunConfig, RunOverrides};
use safedpo::data::{synthetic_pku_rows, write_pku_jsonl};
use safedpo::loss::{
    batch_loss, batch_loss_with, pair_loss, Combination, FDivergence, LossState, Objective, PairInput, PairOutput,
    RunningMean,
};

fn close(a: f64, b: f64, rel: f64, abs: f64) -> bool {
    (a - b).abs() <= abs + rel * a.abs().max(b.abs())
}

/// A random pair with moderate log-ratios, log-probs of real text (mean token log-probs in
/// [−4, −0.05]).
fn random_pair(rng: &mut ChaCha8Rng) -> PairInput {
    let (chosen_len, rejected_len) = (rng.random_range(1..60), rng.random_range(1..60));
    let ref_chosen = -(chosen_len as f64) * rng.random_range(0.3..3.0);
    let ref_rejected = -(rejected_len as f64) * rng.random_range(0.3..3.0);
    let policy = |r: f64, len: u32, rng: &mut ChaCha8Rng| (r + rng.random_range(-3.0..3.0)).min(-0.05 * len as f64);
    PairInput {
        policy_chosen: policy(ref_chosen, chosen_len, rng),
        policy_rejected: policy(ref_rejected, rejected_len, rng),
        ref_chosen,
        ref_rejected,
        chosen_unsafe: rng.random_bool(0.3),
        rejected_unsafe: rng.random_bool(0.5),
        chosen_len,
        rejected_len,
    }
}

fn random_batch(rng: &mut ChaCha8Rng) -> Vec<PairInput> {
    let n = rng.random_range(1..8);
    (0..n).map(|_| random_pair(rng)).collect()
}

fn naive_log_sigmoid(x: f64) -> f64 {
    -(1.0 + (-x).exp()).ln()
}

fn total(out: &[PairOutput]) -> f64 {
    out.iter().map(|o| o.loss).sum()
}

/// Every row's gradient against central differences of the batch's total loss.
fn check_gradients(objective: &Objective, state: &LossState, pairs: &[PairInput], what: &str) {
    let out = batch_loss_with(objective, pairs, state);
    let step = 1e-5;
    for (i, o) in out.iter().enumerate() {
        let total_at = |dc: f64, dr: f64| {
            let mut moved = pairs.to_vec();
            moved[i].policy_chosen += dc;
            moved[i].policy_rejected += dr;
            total(&batch_loss_with(objective, &moved, state))
        };
        let fd_chosen = (total_at(step, 0.0) - total_at(-step, 0.0)) / (2.0 * step);
        let fd_rejected = (total_at(0.0, step) - total_at(0.0, -step)) / (2.0 * step);
        assert!(
            close(o.d_policy_chosen, fd_chosen, 1e-5, 1e-8),
            "{what}, pair {i}: dπc {} vs {fd_chosen}",
            o.d_policy_chosen
        );
        assert!(
            close(o.d_policy_rejected, fd_rejected, 1e-5, 1e-8),
            "{what}, pair {i}: dπr {} vs {fd_rejected}",
            o.d_policy_rejected
        );
    }
}

/// The batch's chosen token-mean NLL, written out.
fn naive_nll(pairs: &[PairInput]) -> f64 {
    let tokens: u32 = pairs.iter().map(|p| p.chosen_len).sum();
    -pairs.iter().map(|p| p.policy_chosen).sum::<f64>() / tokens.max(1) as f64
}

#[test]
fn sft_is_the_batch_token_mean_nll_on_every_row() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..50 {
        let pairs = random_batch(&mut rng);
        let sft = Objective::Sft { beta: rng.random_range(0.05..1.0) };
        let out = batch_loss(&sft, &pairs);
        let tokens: u32 = pairs.iter().map(|p| p.chosen_len).sum();
        for (o, p) in out.iter().zip(&pairs) {
            assert!(close(o.loss, naive_nll(&pairs), 1e-13, 0.0), "{o:?}");
            // The gradient of P copies of the batch value.
            assert!(close(o.d_policy_chosen, -(pairs.len() as f64) / tokens as f64, 1e-13, 0.0));
            assert_eq!(o.d_policy_rejected, 0.0);
            // TRL's logged rewards.
            assert_eq!(o.reward_chosen, sft.beta() * (p.policy_chosen - p.ref_chosen));
        }
        check_gradients(&sft, &LossState::default(), &pairs, "sft");
    }
    // An empty chosen response (length 0) counts no token; a batch of only such stays finite.
    let empty = PairInput { chosen_len: 0, rejected_len: 0, ..Default::default() };
    assert!(batch_loss(&Objective::Sft { beta: 0.1 }, &[empty, empty]).iter().all(|o| o.loss.is_finite()));
}

/// ORPO's and CPO's preference terms, written from TRL's formulas (per pair, without the NLL).
fn naive_preference_term(objective: &Objective, p: &PairInput) -> f64 {
    let t = (p.rejected_unsafe as i32 - p.chosen_unsafe as i32) as f64 * objective.safety_margin();
    let (a_c, a_r) = (p.policy_chosen / p.chosen_len as f64, p.policy_rejected / p.rejected_len as f64);
    let smoothed = |z: f64, eps: f64| -(1.0 - eps) * naive_log_sigmoid(z) - eps * naive_log_sigmoid(-z);
    match *objective {
        Objective::Orpo { beta, .. } => {
            let log_odds = (a_c - a_r) - ((1.0 - a_c.exp()).ln() - (1.0 - a_r.exp()).ln());
            -beta * naive_log_sigmoid(log_odds - t)
        }
        Objective::Cpo { beta, eps, .. } => smoothed(beta * (p.policy_chosen - p.policy_rejected) - t, eps),
        Objective::CpoHinge { beta, .. } => (1.0 - beta * (p.policy_chosen - p.policy_rejected) + t).max(0.0),
        Objective::CpoIpo { beta, .. } => (a_c - a_r - t / beta - 1.0 / (2.0 * beta)).powi(2),
        Objective::CpoSimpo { beta, eps, gamma, .. } => smoothed(beta * (a_c - a_r - gamma / beta) - t, eps),
        _ => unreachable!(),
    }
}

#[test]
fn orpo_and_cpo_are_their_preference_term_plus_the_weighted_nll_and_read_no_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for _ in 0..40 {
        let pairs = random_batch(&mut rng);
        let (beta, margin) = (rng.random_range(0.05..2.0), if rng.random_bool(0.5) { 0.0 } else { 2.5 });
        let cpo_alpha = rng.random_range(0.0..2.0);
        let eps = rng.random_range(0.0..0.5);
        for (objective, nll_weight) in [
            (Objective::Orpo { beta, safety_margin: margin }, 1.0),
            (Objective::Cpo { beta, eps, cpo_alpha, safety_margin: margin }, cpo_alpha),
            (Objective::CpoHinge { beta, cpo_alpha, safety_margin: margin }, cpo_alpha),
            (Objective::CpoIpo { beta, cpo_alpha, safety_margin: margin }, cpo_alpha),
            (Objective::CpoSimpo { beta, eps, gamma: 0.7, cpo_alpha, safety_margin: margin }, cpo_alpha),
        ] {
            assert!(!objective.uses_reference(), "{objective}");
            let out = batch_loss(&objective, &pairs);
            for (o, p) in out.iter().zip(&pairs) {
                let want = naive_preference_term(&objective, p) + nll_weight * naive_nll(&pairs);
                assert!(close(o.loss, want, 1e-10, 1e-12), "{objective}: {} vs {want}", o.loss);
                // The reference is not read.
                let moved = PairInput { ref_chosen: p.ref_chosen - 5.0, ref_rejected: p.ref_rejected + 3.0, ..*p };
                assert_eq!(pair_loss(&objective, p), pair_loss(&objective, &moved), "{objective}");
            }
            if !matches!(objective, Objective::CpoHinge { .. }) {
                check_gradients(&objective, &LossState::default(), &pairs, &objective.to_string());
            }
        }
    }
    // ORPO at an empty response (log-prob 0, a probability of 1) or a tiny positive f32 rounding:
    // finite, with no gradient through the clamped side.
    let orpo = Objective::Orpo { beta: 0.1, safety_margin: 0.0 };
    for chosen in [0.0, 1e-7, -1e-9] {
        let p = PairInput {
            policy_chosen: chosen,
            policy_rejected: -20.0,
            chosen_len: 1,
            rejected_len: 10,
            ..Default::default()
        };
        let out = pair_loss(&orpo, &p);
        assert!(
            out.loss.is_finite() && out.d_policy_chosen.is_finite() && out.d_policy_rejected.is_finite(),
            "{out:?}"
        );
    }
}

/// Random valid combinations: terms sharing β, ε and the safety margin, weights in [0, 2).
fn random_combination(rng: &mut ChaCha8Rng) -> Objective {
    let pool = [
        "dpo",
        "ipo",
        "robust",
        "cdpo",
        "hinge",
        "rpo",
        "npo",
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
        "orpo",
        "cpo",
        "cpo_ipo",
        "cpo_simpo",
    ];
    let n = rng.random_range(2..5);
    let names: Vec<String> = (0..n)
        .map(|_| format!("{:.3}*{}", rng.random_range(0.0..2.0), pool[rng.random_range(0..pool.len())]))
        .collect();
    let mut text = format!("{}:beta={}", names.join("+"), rng.random_range(0.05..1.0));
    let takes = |key: &str| {
        names.iter().any(|n| Objective::default_for(n.split('*').nth(1).unwrap()).unwrap().spec().param(key).is_some())
    };
    for (key, value) in [
        ("eps", rng.random_range(0.01..0.45)),
        ("safety_margin", rng.random_range(0.0..5.0)),
        ("gamma", rng.random_range(0.0..1.0)),
        ("cpo_alpha", rng.random_range(0.0..2.0)),
        ("alpha", rng.random_range(0.0..2.0)),
        ("tau", rng.random_range(0.05..1.0)),
    ] {
        if takes(key) {
            text += &format!(",{key}={value}");
        }
    }
    text.parse().unwrap_or_else(|e| panic!("{text}: {e:#}"))
}

#[test]
fn a_combination_is_the_weighted_sum_of_its_terms_with_the_first_terms_metrics() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..100 {
        let objective = random_combination(&mut rng);
        let pairs = random_batch(&mut rng);
        let out = batch_loss(&objective, &pairs);
        let terms: Vec<(f64, Vec<PairOutput>)> =
            objective.terms().into_iter().map(|(w, t)| (w, batch_loss(t, &pairs))).collect();
        for (i, o) in out.iter().enumerate() {
            let sum = |field: fn(&PairOutput) -> f64| terms.iter().map(|(w, rows)| w * field(&rows[i])).sum::<f64>();
            assert!(close(o.loss, sum(|r| r.loss), 1e-12, 1e-12), "{objective}");
            assert!(close(o.d_policy_chosen, sum(|r| r.d_policy_chosen), 1e-12, 1e-12), "{objective}");
            assert!(close(o.d_policy_rejected, sum(|r| r.d_policy_rejected), 1e-12, 1e-12), "{objective}");
            assert_eq!(o.metrics_row()[1..], terms[0].1[i].metrics_row()[1..], "{objective}");
        }
        check_gradients(&objective, &LossState::default(), &pairs, &objective.to_string());
        // SafeDAA: Δ = 0 is every term's published form.
        if objective.params().iter().any(|(k, _)| *k == "safety_margin") {
            let mut plain = objective.clone();
            plain.set_param("safety_margin", 0.0).unwrap();
            let unflagged: Vec<PairInput> =
                pairs.iter().map(|p| PairInput { chosen_unsafe: false, rejected_unsafe: false, ..*p }).collect();
            assert_eq!(batch_loss(&plain, &unflagged), batch_loss(&objective, &unflagged), "{objective}");
        }
    }
}

/// TRL's f-divergence scores, written out.
fn naive_score(f: FDivergence, x: f64) -> f64 {
    match f {
        FDivergence::ReverseKl => x,
        FDivergence::ForwardKl => 1.0 - (-x).exp(),
        FDivergence::JsDivergence => 2f64.ln() + naive_log_sigmoid(x),
        FDivergence::Alpha(a) if (a - 1.0).abs() < 1e-6 => x,
        FDivergence::Alpha(a) => (((a - 1.0) * x).min(80.0).exp() - 1.0) / (a - 1.0),
    }
}

#[test]
fn f_divergences_score_the_log_ratios_of_the_objectives_built_on_their_difference() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let divergences = [
        FDivergence::ForwardKl,
        FDivergence::JsDivergence,
        FDivergence::Alpha(0.5),
        FDivergence::Alpha(1.8),
        FDivergence::Alpha(1.0),
    ];
    for f in divergences {
        for name in
            ["dpo", "safedpo", "cdpo", "robust", "hinge", "ipo", "rpo", "exo_pair", "discopop", "sigmoid_norm", "sft"]
        {
            let base = Objective::default_for(name).unwrap();
            assert!(base.takes_f_divergence());
            let objective = Combination { f_divergence: f, ..Combination::of(base.clone()) }.into_objective();
            objective.validate().unwrap();
            for _ in 0..10 {
                let p = random_pair(&mut rng);
                // The objective at the scores is the plain objective at log-ratios equal to the scores
                // (the NLL terms read the log-probs themselves).
                let (score_c, score_r) = (
                    naive_score(f, p.policy_chosen - p.ref_chosen),
                    naive_score(f, p.policy_rejected - p.ref_rejected),
                );
                let at_scores =
                    PairInput { ref_chosen: p.policy_chosen - score_c, ref_rejected: p.policy_rejected - score_r, ..p };
                let (got, want) = (pair_loss(&objective, &p).loss, pair_loss(&base, &at_scores).loss);
                if !matches!(base, Objective::Rpo { .. } | Objective::Sft { .. }) {
                    assert!(close(got, want, 1e-9, 1e-12), "{objective}: {got} vs {want}");
                }
                let pairs = vec![p, random_pair(&mut rng)];
                if !matches!(base, Objective::Hinge { .. }) {
                    check_gradients(&objective, &LossState::default(), &pairs, &objective.to_string());
                }
            }
        }
        // TRL refuses the others: the β·log Z(x) of f-DPO cancels only in the difference.
        for name in ["npo", "nca_pair", "bco_pair", "aot", "apo_zero", "simpo", "orpo", "cpo"] {
            let objective = Combination { f_divergence: f, ..Combination::of(Objective::default_for(name).unwrap()) };
            let err = objective.into_objective().validate().unwrap_err().to_string();
            assert!(err.contains("f_divergence_type") && err.contains(name), "{err}");
        }
    }
}

#[test]
fn bco_pairs_running_mean_is_trls_running_moments_and_shifts_both_rewards() {
    // RunningMoments with one sample per update, from mean 0 and count 1e-24.
    let mut mean = RunningMean::default();
    let samples = [0.3, -1.2, 0.05, 2.0];
    for (k, &x) in samples.iter().enumerate() {
        let got = mean.update(x);
        let want = samples[..=k].iter().sum::<f64>() / (k + 1) as f64;
        assert!(close(got, want, 1e-15, 1e-15), "after {} samples: {got} vs {want}", k + 1);
    }
    let objective: Objective = "bco_pair:beta=0.2,bco_running_mean=true,safety_margin=1".parse().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut state = LossState::default();
    for _ in 0..5 {
        let pairs = random_batch(&mut rng);
        let policy: Vec<f32> = pairs.iter().flat_map(|p| [p.policy_chosen as f32, p.policy_rejected as f32]).collect();
        let reference: Vec<f32> = pairs.iter().flat_map(|p| [p.ref_chosen as f32, p.ref_rejected as f32]).collect();
        let before = state.bco_reward_mean;
        state.before_loss(&objective, &policy, &reference);
        let batch_mean = policy.iter().zip(&reference).map(|(&p, &r)| 0.2 * (p as f64 - r as f64)).sum::<f64>()
            / policy.len() as f64;
        let mut want_mean = before;
        want_mean.update(batch_mean);
        assert_eq!(state.bco_reward_mean, want_mean);
        let delta = state.bco_reward_mean.mean;
        for (o, p) in batch_loss_with(&objective, &pairs, &state).iter().zip(&pairs) {
            let t = (p.rejected_unsafe as i32 - p.chosen_unsafe as i32) as f64;
            let (r_c, r_r) = (0.2 * (p.policy_chosen - p.ref_chosen), 0.2 * (p.policy_rejected - p.ref_rejected) + t);
            let want = -naive_log_sigmoid(r_c - delta) - naive_log_sigmoid(-(r_r - delta));
            assert!(close(o.loss, want, 1e-12, 1e-12), "{o:?} vs {want}");
            // The logged rewards stay the plain ones.
            assert_eq!(o.reward_chosen, r_c);
        }
        check_gradients(&objective, &state, &pairs, "bco_pair with its running mean");
    }
    // Without `bco_running_mean` the state is neither read nor updated.
    let plain = Objective::BcoPair { beta: 0.2, safety_margin: 1.0 };
    let pairs = random_batch(&mut rng);
    assert_eq!(batch_loss_with(&plain, &pairs, &state), batch_loss(&plain, &pairs));
    let mut untouched = LossState::default();
    untouched.before_loss(&plain, &[-1.0, -2.0], &[-1.5, -1.0]);
    assert_eq!(untouched, LossState::default());
}

fn floats(case: &serde_json::Value, key: &str) -> Vec<f64> {
    case[key].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn fixture_pairs(case: &serde_json::Value) -> Vec<PairInput> {
    let (pc, pr) = (floats(case, "chosen_logps"), floats(case, "rejected_logps"));
    let (rc, rr) = (floats(case, "ref_chosen_logps"), floats(case, "ref_rejected_logps"));
    let (lc, lr) = (floats(case, "chosen_len"), floats(case, "rejected_len"));
    (0..pc.len())
        .map(|i| PairInput {
            policy_chosen: pc[i],
            policy_rejected: pr[i],
            ref_chosen: rc[i],
            ref_rejected: rr[i],
            chosen_len: lc[i] as u32,
            rejected_len: lr[i] as u32,
            ..Default::default()
        })
        .collect()
}

/// `out` against a fixture case's losses, gradients and rewards, to `rel` (losses, rewards) and
/// `rel_grad`.
fn check_against_trl(what: &str, case: &serde_json::Value, out: &[PairOutput], rel: f64, rel_grad: f64) {
    let (losses, d_chosen, d_rejected) =
        (floats(case, "losses"), floats(case, "d_chosen_logps"), floats(case, "d_rejected_logps"));
    let (chosen_rewards, rejected_rewards) = (floats(case, "chosen_rewards"), floats(case, "rejected_rewards"));
    for (i, o) in out.iter().enumerate() {
        assert!(close(o.loss, losses[i], rel, 1e-13), "{what}, pair {i}: loss {} vs TRL {}", o.loss, losses[i]);
        assert!(
            close(o.d_policy_chosen, d_chosen[i], rel_grad, 1e-13),
            "{what}, pair {i}: dπc {} vs TRL {}",
            o.d_policy_chosen,
            d_chosen[i]
        );
        assert!(
            close(o.d_policy_rejected, d_rejected[i], rel_grad, 1e-13),
            "{what}, pair {i}: dπr {} vs TRL {}",
            o.d_policy_rejected,
            d_rejected[i]
        );
        assert!(close(o.reward_chosen, chosen_rewards[i], 1e-14, 1e-14), "{what}, pair {i}: chosen reward");
        assert!(close(o.reward_rejected, rejected_rewards[i], 1e-14, 1e-14), "{what}, pair {i}: rejected reward");
    }
}

#[test]
fn mixtures_f_divergences_orpo_cpo_and_the_running_mean_match_trl_on_fixed_inputs() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trl_loss_modifiers.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut covered: Vec<String> = Vec::new();
    for case in fixture["cases"].as_array().unwrap() {
        let text = case["objective"].as_str().unwrap();
        let objective: Objective = text.parse().unwrap_or_else(|e| panic!("{text}: {e:#}"));
        let what = format!("{text} (TRL {})", case["trl"]);
        match case.get("batches") {
            None => check_against_trl(&what, case, &batch_loss(&objective, &fixture_pairs(case)), 1e-12, 1e-10),
            Some(batches) => {
                // TRL's running mean is updated in float32: δ agrees to f32's precision.
                let mut state = LossState::default();
                for (k, batch) in batches.as_array().unwrap().iter().enumerate() {
                    let pairs = fixture_pairs(batch);
                    let beta = objective.beta();
                    let mean = pairs
                        .iter()
                        .map(|p| beta * ((p.policy_chosen - p.ref_chosen) + (p.policy_rejected - p.ref_rejected)))
                        .sum::<f64>()
                        / (2 * pairs.len()) as f64;
                    state.bco_reward_mean.update(mean);
                    let delta = batch["delta"].as_f64().unwrap();
                    assert!(
                        close(state.bco_reward_mean.mean, delta, 1e-6, 1e-7),
                        "{what}, batch {k}: δ {} vs TRL {delta}",
                        state.bco_reward_mean.mean
                    );
                    check_against_trl(
                        &format!("{what}, batch {k}"),
                        batch,
                        &batch_loss_with(&objective, &pairs, &state),
                        1e-6,
                        1e-6,
                    );
                }
            }
        }
        covered.push(match &objective {
            Objective::Combination(c) if c.terms.len() > 1 => "mixture".into(),
            Objective::Combination(c) if c.bco_running_mean => "bco_running_mean".into(),
            Objective::Combination(c) => c.f_divergence.name().into(),
            single => single.name().into(),
        });
    }
    for kind in [
        "mixture",
        "forward_kl",
        "js_divergence",
        "alpha_divergence",
        "orpo",
        "cpo",
        "cpo_hinge",
        "cpo_ipo",
        "cpo_simpo",
        "bco_running_mean",
    ] {
        assert!(covered.iter().any(|c| c == kind), "no TRL case for {kind}");
    }
}

#[test]
fn combinations_are_written_as_trl_writes_them() {
    let mpo: Objective = "0.8*sigmoid+0.2*bco_pair+sft".parse().unwrap();
    let Objective::Combination(c) = &mpo else { panic!("{mpo:?}") };
    assert_eq!(
        c.terms.iter().map(|(w, t)| (*w, t.name())).collect::<Vec<_>>(),
        [(0.8, "dpo"), (0.2, "bco_pair"), (1.0, "sft")]
    );
    // TRL's spelling: a list of names and `loss_weights`, in TOML (the `[objective]` table) and as text.
    let table = "name = [\"sigmoid\", \"bco_pair\", \"sft\"]\nloss_weights = [0.8, 0.2, 1.0]\n";
    assert_eq!(toml::from_str::<Objective>(table).unwrap(), mpo);
    let flags = "name = \"sigmoid,bco_pair,sft\"\nloss_weights = \"0.8,0.2,1\"\n";
    assert_eq!(toml::from_str::<Objective>(flags).unwrap(), mpo);
    // Display, serde: round trips; the written table is TRL's list.
    for text in [
        "0.8*dpo+0.2*bco_pair+sft:bco_running_mean=true,safety_margin=3",
        "dpo:f_divergence_type=alpha_divergence,f_alpha_divergence_coef=0.3",
        "orpo+0.5*cpo_simpo:beta=0.4",
        "safedpo+sft:delta=5",
    ] {
        let objective: Objective = text.parse().unwrap();
        assert_eq!(objective.to_string().parse::<Objective>().unwrap(), objective, "{text}");
        let written = toml::to_string(&objective).unwrap();
        assert_eq!(toml::from_str::<Objective>(&written).unwrap(), objective, "{written}");
        let json = serde_json::to_value(&objective).unwrap();
        assert_eq!(serde_json::from_value::<Objective>(json).unwrap(), objective, "{text}");
    }
    let written = toml::to_string(&mpo).unwrap();
    assert!(
        written.contains("name = [\"dpo\", \"bco_pair\", \"sft\"]")
            && written.contains("loss_weights = [0.8, 0.2, 1.0]"),
        "{written}"
    );
    // rpo_alpha is the sft term with that weight (TRL < 1.0's `rpo_alpha`, TRL 1.x's ["sigmoid", "sft"]).
    assert_eq!("dpo:rpo_alpha=0.5".parse::<Objective>().unwrap(), "dpo+0.5*sft".parse::<Objective>().unwrap());
    assert_eq!("ipo:rpo_alpha=0".parse::<Objective>().unwrap(), Objective::Ipo { beta: 0.1, safety_margin: 0.0 });
    // One objective with TRL's defaults is that objective, not a combination.
    assert_eq!(
        "dpo:f_divergence_type=reverse_kl".parse::<Objective>().unwrap(),
        Objective::Dpo { beta: 0.1, safety_margin: 0.0 }
    );
    // TRL's spellings of parameters.
    assert_eq!(
        "robust:label_smoothing=0.2".parse::<Objective>().unwrap(),
        Objective::Robust { beta: 0.1, eps: 0.2, safety_margin: 0.0 }
    );
    assert_eq!(
        "discopop:discopop_tau=0.2".parse::<Objective>().unwrap(),
        Objective::Discopop { beta: 0.1, tau: 0.2, safety_margin: 0.0 }
    );
    assert_eq!(
        "cpo_simpo:simpo_gamma=0.9,label_smoothing=0.1".parse::<Objective>().unwrap(),
        Objective::CpoSimpo { beta: 0.1, eps: 0.1, gamma: 0.9, cpo_alpha: 1.0, safety_margin: 0.0 }
    );
    // A parameter shared by the terms applies to each of them.
    let shared: Objective = "robust+exo_pair:eps=0.2,beta=0.3".parse().unwrap();
    for (_, term) in shared.terms() {
        assert_eq!((term.beta(), term.params().iter().find(|(k, _)| *k == "eps").unwrap().1), (0.3, 0.2), "{term}");
    }

    for (bad, words) in [
        ("dpo+sft:loss_weights=1", &["loss_weights", "1 weights for 2"][..]),
        ("0.5*dpo+sft:rpo_alpha=-1", &["rpo_alpha"]),
        ("dpo+simpo", &["beta", "dpo: 0.1", "simpo: 2", "set it"]),
        ("robust+exo_pair", &["eps", "robust: 0.1", "exo_pair: 0.001"]),
        ("nca_pair:f_divergence_type=js_divergence", &["f_divergence_type", "nca_pair"]),
        ("dpo:f_divergence_type=kl", &["f_divergence_type", "reverse_kl"]),
        ("dpo:f_alpha_divergence_coef=0.2", &["alpha_divergence"]),
        ("dpo:bco_running_mean=true", &["bco_running_mean", "bco_pair"]),
        ("-1*dpo+sft", &["loss_weights", "-1"]),
        ("dpo+sft:gamma=1", &["gamma", "dpo+sft", "beta", "safety_margin", "loss_weights"]),
        ("robust:eps=0.1,label_smoothing=0.2", &["twice"]),
        ("dpo+kto", &["kto", "dpo"]),
    ] {
        let err = match bad.parse::<Objective>() {
            Ok(o) => panic!("{bad} must be refused, got {o:?}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(words.iter().all(|w| err.contains(w)), "{bad}: {err}");
    }
}

fn resolve(args: &[(&str, &str)], file: Option<&str>) -> anyhow::Result<Objective> {
    let dir = tempfile::tempdir().unwrap();
    let mut overrides = RunOverrides::default();
    if let Some(text) = file {
        let path = dir.path().join("run.toml");
        std::fs::write(&path, text).unwrap();
        overrides.config = Some(path);
    }
    for (key, value) in args {
        overrides = overrides.set(key, value);
    }
    Ok(RunConfig::resolve(&overrides)?.objective)
}

#[test]
fn the_objective_table_and_flags_take_lists_weights_and_modifiers() {
    let mpo: Objective = "0.8*dpo+0.2*bco_pair+sft:bco_running_mean=true".parse().unwrap();
    let flags = [
        ("objective.name", "sigmoid,bco_pair,sft"),
        ("objective.loss_weights", "0.8,0.2,1"),
        ("objective.bco_running_mean", "true"),
    ];
    assert_eq!(resolve(&flags, None).unwrap(), mpo);
    let file = "[objective]\nname = [\"sigmoid\", \"bco_pair\", \"sft\"]\nloss_weights = [0.8, 0.2, 1.0]\nbco_running_mean = true\n";
    assert_eq!(resolve(&[], Some(file)).unwrap(), mpo);
    // A flag over the file: the file's list, another β.
    let mut want = mpo.clone();
    want.set_param("beta", 0.3).unwrap();
    assert_eq!(resolve(&[("objective.beta", "0.3")], Some(file)).unwrap(), want);
    let js = resolve(
        &[("objective.name", "dpo"), ("objective.f_divergence_type", "js_divergence"), ("objective.rpo_alpha", "1")],
        None,
    );
    assert_eq!(js.unwrap(), "dpo+sft:f_divergence_type=js_divergence".parse::<Objective>().unwrap());
    assert_eq!(
        resolve(&[("objective.name", "robust"), ("objective.label_smoothing", "0.3")], None).unwrap().params()[1],
        ("eps", 0.3)
    );

    // Errors name the key and where it was set.
    let err = resolve(&[], Some("[objective]\nname = [\"sigmoid\", \"sft\"]\ngamma = 1\n")).unwrap_err().to_string();
    assert!(err.contains("objective.gamma") && err.contains("run.toml:3"), "{err}");
    let err = resolve(&[("objective.name", "nca_pair"), ("objective.f_divergence_type", "js_divergence")], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("objective.f_divergence_type") && err.contains("--objective.f_divergence_type"), "{err}");
    let err = resolve(&[("objective.name", "dpo+simpo")], None).unwrap_err().to_string();
    assert!(err.contains("objective.beta") && err.contains("set it"), "{err}");
}

/// Combinations and the reference-free objectives train a tiny model for a few steps through
/// `safedpo train` on the CPU (the kernels' side is `tests/ops/preference_loss.rs` and
/// `tests/train.rs`) and report finite losses; a reference-free run loads no reference.
#[test]
fn combinations_and_modifiers_train_through_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    write_pku_jsonl(&data, &synthetic_pku_rows(24, 11)).unwrap();
    let runs: [&[&str]; 5] = [
        &[
            "--objective.name",
            "sigmoid,bco_pair,sft",
            "--objective.loss_weights",
            "0.8,0.2,1.0",
            "--objective.bco_running_mean",
        ],
        &["--objective.name", "ipo", "--objective.rpo_alpha", "0.5", "--objective.safety_margin", "2"],
        &[
            "--objective.name",
            "dpo",
            "--objective.f_divergence_type",
            "alpha_divergence",
            "--objective.f_alpha_divergence_coef",
            "0.5",
        ],
        &["--objective.name", "orpo", "--objective.safety_margin", "1"],
        &["--objective.name", "cpo_simpo", "--objective.cpo_alpha", "0.5", "--objective.label_smoothing", "0.1"],
    ];
    for (k, objective) in runs.iter().enumerate() {
        let out_dir = dir.path().join(format!("run{k}"));
        let mut args = vec!["train", "--data.path", data.to_str().unwrap()];
        args.extend_from_slice(objective);
        args.extend(["--out-dir", out_dir.to_str().unwrap(), "--no-progress", "--device", "cpu"]);
        args.extend(["--data.template", "U: {prompt} A:", "--data.max_len", "96", "--model.n_positions", "96"]);
        args.extend(["--model.n_layer", "1", "--model.n_embd", "16", "--model.n_head", "2"]);
        args.extend([
            "--batching.tokens_per_micro_batch",
            "800",
            "--optimizer.total_steps",
            "3",
            "--optimizer.lr",
            "1e-3",
        ]);
        let out = Command::new(env!("CARGO_BIN_EXE_safedpo")).args(&args).output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "safedpo train {objective:?} failed:\n{stdout}\n{stderr}");
        let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
        let losses: Vec<f64> = metrics
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["loss"].as_f64())
            .collect();
        assert!(losses.len() >= 3 && losses.iter().all(|l| l.is_finite()), "{objective:?}: losses {losses:?}");
        let reference_free = objective[1] == "orpo" || objective[1] == "cpo_simpo";
        assert_eq!(!out_dir.join("reference_logps.safetensors").exists(), reference_free, "{objective:?}: {stderr}");
        // The run's configuration reads back as the objective it trained.
        let config = RunConfig::from_toml_file(&out_dir.join("config.toml")).unwrap();
        assert!(config.validate().is_empty(), "{objective:?}");
    }
}
