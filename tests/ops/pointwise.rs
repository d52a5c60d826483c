//! GELU against the spec and its derivative; the adds and the scale exact.

use safedpo::backend::cpu::pointwise::spec;
use safedpo::backend::prelude::*;

use crate::common::*;
use crate::{backend, FD_STEP};

#[test]
fn gelu_matches_twin_and_its_derivative() {
    let be = backend();
    let mut r = rng(10);
    let mut inp = uniform(&mut r, 3001, -6.0, 6.0);
    inp.extend_from_slice(&[0.0, -20.0, 20.0, 1e-3, -1e-3]);
    let mut out = poison(inp.len());
    be.gelu_forward(&mut out, &inp).unwrap();
    let want: Vec<f64> = inp.iter().map(|&x| spec::gelu(x as f64)).collect();
    assert_close("gelu out", &out, &want, 1e-5, 1e-7);

    let dout = randn(&mut r, inp.len(), 1.0);
    let mut dinp = poison(inp.len());
    be.gelu_backward(&mut dinp, &inp, &dout).unwrap();
    // Pointwise: d/dx_i of Σ w gelu(x) is w_i gelu'(x_i), one central difference per element.
    let want_d: Vec<f64> = inp
        .iter()
        .zip(&dout)
        .map(|(&x, &w)| {
            let x = x as f64;
            w as f64 * (spec::gelu(x + FD_STEP) - spec::gelu(x - FD_STEP)) / (2.0 * FD_STEP)
        })
        .collect();
    assert_close("gelu dinp", &dinp, &want_d, 1e-4, 1e-6);
}

#[test]
fn residual_add_and_scale_are_exact() {
    let be = backend();
    let mut r = rng(11);
    let len = 40_000; // several pointwise chunks
    let (a, b) = (randn(&mut r, len, 1.0), randn(&mut r, len, 1.0));
    let mut out = poison(len);
    be.residual_forward(&mut out, &a, &b).unwrap();
    let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_bitwise_eq("residual", &out, &sum);

    let mut acc = a.clone();
    be.add_inplace(&mut acc, &b).unwrap();
    assert_bitwise_eq("add_inplace", &acc, &sum);

    be.scale(&mut acc, -0.375).unwrap();
    let scaled: Vec<f32> = sum.iter().map(|x| x * -0.375).collect();
    assert_bitwise_eq("scale", &acc, &scaled);

    let err = be.residual_forward(&mut poison(3), &vec![0.0; 3], &vec![0.0; 4]).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("residual_forward") && msg.contains("`b`") && msg.contains('4') && msg.contains('3'), "{msg}");
}
