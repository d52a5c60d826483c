//! The preference loss of a batch against the spec (`pair_loss` per pair), every objective kind; the
//! CUDA backend against the CPU.

use rand::Rng;
use safedpo::backend::cpu::preference_loss::spec;
use safedpo::backend::cuda::{Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::PAIR_METRICS;
use safedpo::loss::Objective;

use crate::backend;
use crate::common::*;
use crate::device::Fixture;

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
        Objective::Dpo { beta: 0.1, safety_margin: 0.0 },
        Objective::SafeDpo { beta: 0.1, delta: 10.0 },
        Objective::Simpo { beta: 2.0, gamma: 0.5, safety_margin: 0.0 },
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

// ---- the CUDA backend against the CPU (see `device`) -----------------------------------------------------

fn preference_loss(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 6);
    let pairs = 37;
    let policy = uniform(&mut f.rng, 2 * pairs, -60.0, -5.0);
    let reference: Vec<f32> = policy.iter().map(|p| p + f.rng.random_range(-3.0..3.0)).collect();
    let flags = rand_ids(&mut f.rng, 2 * pairs, 2);
    let mut lengths = rand_ids(&mut f.rng, 2 * pairs, 40);
    lengths[3] = 0;
    let ((cp, gp), (cr, gr)) = (f.both(&policy), f.both(&reference));
    let (cf, gf) = (f.cpu.upload_ids(&flags).unwrap(), f.cuda.upload_ids(&flags).unwrap());
    let (cl, gl) = (f.cpu.upload_ids(&lengths).unwrap(), f.cuda.upload_ids(&lengths).unwrap());
    for name in Objective::NAMES {
        let objective = Objective::default_for(name).unwrap();
        let (mut want_m, mut got_m) = f.poisoned(pairs * PAIR_METRICS);
        let (mut want_d, mut got_d) = f.poisoned(2 * pairs);
        f.cpu.preference_loss(&mut want_m, &mut want_d, &cp, &cr, &cf, &cl, &objective, 0.7).unwrap();
        f.cuda.preference_loss(&mut got_m, &mut got_d, &gp, &gr, &gf, &gl, &objective, 0.7).unwrap();
        // Each metric column on its own scale; inputs and outputs are f32 in both modes.
        let got = f.cuda.download(&got_m).unwrap();
        for k in 0..PAIR_METRICS {
            let column = |x: &[f32]| -> Vec<f32> { x.iter().skip(k).step_by(PAIR_METRICS).copied().collect() };
            assert_close_scaled(
                &format!("preference_loss {objective} metric {k} ({precision})"),
                &column(&got),
                &to_f64(&column(&want_m)),
                2e-5,
            );
        }
        f.check_at(&format!("preference_loss {objective} dpolicy"), &got_d, &want_d, 2e-5);
    }
}

device_tests!(preference_loss);
