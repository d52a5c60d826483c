//! AdamW, SGD and the sum of squares against the spec.

use safedpo::backend::cpu::optimizer::spec;
use safedpo::backend::prelude::*;
use safedpo::backend::AdamWParams;

use crate::backend;
use crate::common::*;

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
