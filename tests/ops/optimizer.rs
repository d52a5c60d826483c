//! AdamW, SGD and the sum of squares against the spec; AdamW and SGD on the CUDA backend against the
//! CPU.

use safedpo::backend::cpu::optimizer::spec;
use safedpo::backend::cuda::{Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::AdamWParams;

use crate::backend;
use crate::common::*;
use crate::device::Fixture;

#[test]
fn adamw_matches_pytorch_formula() {
    let be = backend();
    let mut r = rng(16);
    let len = 20_001;
    let mut param = randn(&mut r, len, 1.0);
    let (mut m, mut v) = (vec![0.0f32; len], vec![0.0f32; len]);
    let (mut p64, mut m64, mut v64) = (to_f64(&param), vec![0.0f64; len], vec![0.0f64; len]);
    let (lr, b1, b2, eps, wd, gs) = (3e-3f32, 0.9f32, 0.95f32, 1e-8f32, 0.1f32, 0.5f32);
    for step in 1..=3u32 {
        let grad = randn(&mut r, len, 1.0);
        let hp = AdamWParams { lr, beta1: b1, beta2: b2, eps, weight_decay: wd, step, grad_scale: gs };
        be.adamw(&mut param, &grad, &mut m, &mut v, &hp).unwrap();
        spec::adamw(&mut p64, &to_f64(&grad), &mut m64, &mut v64, &hp);
        assert_close(&format!("adamw param after step {step}"), &param, &p64, 1e-6, 1e-7);
        assert_close(&format!("adamw m after step {step}"), &m, &m64, 1e-5, 1e-8);
        assert_close(&format!("adamw v after step {step}"), &v, &v64, 1e-5, 1e-10);
    }
}

#[test]
fn sgd_and_sum_squares() {
    let be = backend();
    let mut r = rng(17);
    let len = 33_333;
    let mut param = randn(&mut r, len, 1.0);
    let grad = randn(&mut r, len, 1.0);
    let mut want = to_f64(&param);
    spec::sgd(&mut want, &to_f64(&grad), 0.01, 0.5);
    be.sgd(&mut param, &grad, 0.01, 0.5).unwrap();
    assert_close("sgd", &param, &want, 1e-6, 1e-7);

    let other = randn(&mut r, 77, 3.0);
    let got = be.sum_squares(&[&grad, &other, &Vec::new()]).unwrap();
    let want = safedpo::backend::cpu::grad_norm::spec::sum_squares(&[&grad, &other, &[]]);
    assert!((got - want).abs() <= 1e-12 * want, "sum_squares {got} vs {want}");
}

// ---- the CUDA backend against the CPU (see `device`) -----------------------------------------------------

fn optimizer(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 8);
    let n = 777;
    // Parameters as uploaded from a checkpoint: exact f32 (the master copy keeps them in Bf16 mode).
    let param = randn(&mut f.rng, n, 1.0);
    let (mut want_p, mut got_p) = f.both(&param);
    let (mut want_m, mut got_m) = f.cpu.zeros(n).and_then(|m| Ok((m, f.cuda.zeros(n)?))).unwrap();
    let (mut want_v, mut got_v) = f.cpu.zeros(n).and_then(|v| Ok((v, f.cuda.zeros(n)?))).unwrap();
    for step in 1..=3 {
        let grad = f.randn(n, 0.1);
        let (cg, gg) = f.both(&grad);
        let p = AdamWParams { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step, grad_scale: 0.8 };
        f.cpu.adamw(&mut want_p, &cg, &mut want_m, &mut want_v, &p).unwrap();
        f.cuda.adamw(&mut got_p, &gg, &mut got_m, &mut got_v, &p).unwrap();
    }
    // The master weights and the moments are f32 in both modes.
    f.check_at("adamw param", &got_p, &want_p, 1e-5);
    f.check_at("adamw m", &got_m, &want_m, 1e-5);
    f.check_at("adamw v", &got_v, &want_v, 1e-5);

    let grad = f.randn(n, 0.1);
    let (cg, gg) = f.both(&grad);
    f.cpu.sgd(&mut want_p, &cg, 0.05, 0.5).unwrap();
    f.cuda.sgd(&mut got_p, &gg, 0.05, 0.5).unwrap();
    f.check_at("sgd param", &got_p, &want_p, 1e-5);

    // What the kernels compute with is the stored parameter: the master rounded once.
    let zeros = f.cuda.zeros(n).unwrap();
    let mut stored = f.cuda.zeros(n).unwrap();
    f.cuda.residual_forward(&mut stored, &got_p, &zeros).unwrap();
    let expected = f.stored(f.cuda.download(&got_p).unwrap());
    assert_bitwise_eq(&format!("stored parameter ({precision})"), &f.cuda.download(&stored).unwrap(), &expected);
}

device_tests!(optimizer);
