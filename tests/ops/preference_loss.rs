//! The preference loss of a batch against the spec (`pair_loss` per pair), every objective kind.

use safedpo::backend::cpu::preference_loss::spec;
use safedpo::backend::prelude::*;
use safedpo::backend::PAIR_METRICS;
use safedpo::loss::Objective;

use crate::backend;
use crate::common::*;

#[test]
fn preference_loss_applies_pair_loss_to_each_pair() {
    let be = backend();
    let mut r = rng(15);
    let pairs = 6;
    let policy = uniform(&mut r, 2 * pairs, -40.0, -5.0);
    let reference = uniform(&mut r, 2 * pairs, -40.0, -5.0);
    let flags: Vec<i32> = (0..2 * pairs).map(|i| ((i * 7 + 3) % 3 == 0) as i32).collect();
    let lengths: Vec<i32> = rand_ids(&mut r, 2 * pairs, 20).iter().map(|l| l + 1).collect();
    let grad_scale = 0.25;
    let objectives = [
        Objective::Dpo { beta: 0.1 },
        Objective::SafeDpo { beta: 0.1, delta: 10.0 },
        Objective::Simpo { beta: 2.0, gamma: 0.5 },
    ];
    for objective in &objectives {
        let (mut metrics, mut dpolicy) = (poison(pairs * PAIR_METRICS), poison(2 * pairs));
        // Reference-free objectives ignore the reference buffer (here: empty).
        let refs = if objective.uses_reference() { reference.clone() } else { Vec::new() };
        be.preference_loss(&mut metrics, &mut dpolicy, &policy, &refs, &flags, &lengths, objective, grad_scale)
            .unwrap();
        let (want_metrics, want_dpolicy) =
            spec::forward(objective, &to_f64(&policy), &to_f64(&reference), &flags, &lengths, grad_scale as f64);
        for i in 0..pairs {
            let (c, rj) = (2 * i, 2 * i + 1);
            let m = &metrics[i * PAIR_METRICS..(i + 1) * PAIR_METRICS];
            let want_m = &want_metrics[i * PAIR_METRICS..(i + 1) * PAIR_METRICS];
            assert_close(&format!("{objective:?} metrics of pair {i}"), m, want_m, 1e-6, 1e-7);
            let want_d = &want_dpolicy[c..=rj];
            assert_close(&format!("{objective:?} dpolicy of pair {i}"), &dpolicy[c..=rj], want_d, 1e-6, 1e-9);
        }
    }
}
