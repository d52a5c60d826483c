//! LayerNorm and the fused residual LayerNorm: against the spec and its finite differences.

use safedpo::backend::cpu::layernorm::spec;
use safedpo::backend::prelude::*;

use crate::common::*;
use crate::{accumulated, backend, FD_STEP, FWD_RTOL, GRAD_RTOL};

#[test]
fn layernorm_forward_matches_twin() {
    let be = backend();
    let mut r = rng(3);
    let (n, c, eps) = (9, 33, 1e-5);
    // Rows with a large common offset: the variance must not cancel.
    let inp: Vec<f32> = randn(&mut r, n * c, 1.0).iter().map(|x| x + 30.0).collect();
    let (w, b) = (randn(&mut r, c, 1.0), randn(&mut r, c, 1.0));
    let (mut out, mut mean, mut rstd) = (poison(n * c), poison(n), poison(n));
    be.layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &b, n, c, eps).unwrap();
    let (want_out, want_mean, want_rstd) = spec::forward(&to_f64(&inp), &to_f64(&w), &to_f64(&b), n, c, eps as f64);
    assert_close_scaled("layernorm out", &out, &want_out, 1e-5);
    assert_close("layernorm mean", &mean, &want_mean, FWD_RTOL, 0.0);
    assert_close("layernorm rstd", &rstd, &want_rstd, 1e-4, 0.0);
}

#[test]
fn layernorm_backward_matches_finite_differences() {
    let be = backend();
    let mut r = rng(4);
    // n spans several row chunks of the backend's partial sums.
    let (n, c, eps) = (70, 13, 1e-5f32);
    let inp = randn(&mut r, n * c, 2.0);
    let (w, b) = (randn(&mut r, c, 1.0), randn(&mut r, c, 1.0));
    let dout = randn(&mut r, n * c, 1.0);
    let (mut out, mut mean, mut rstd) = (poison(n * c), poison(n), poison(n));
    be.layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &b, n, c, eps).unwrap();

    let (x64, w64, b64, dy) = (to_f64(&inp), to_f64(&w), to_f64(&b), to_f64(&dout));
    let loss = |x: &[f64], w: &[f64], b: &[f64]| weighted_sum(&dy, &spec::forward(x, w, b, n, c, eps as f64).0);
    let want_dx = fd_grad(|x| loss(x, &w64, &b64), &x64, FD_STEP);
    let want_dw = fd_grad(|w| loss(&x64, w, &b64), &w64, FD_STEP);
    let want_db = fd_grad(|b| loss(&x64, &w64, b), &b64, FD_STEP);

    let (px, pw, pb) = (randn(&mut r, n * c, 1.0), randn(&mut r, c, 1.0), randn(&mut r, c, 1.0));
    let (mut dx, mut dw, mut db) = (px.clone(), pw.clone(), pb.clone());
    for k in 1..=2 {
        be.layernorm_backward(&mut dx, &mut dw, &mut db, &dout, &inp, &w, &mean, &rstd, n, c).unwrap();
        let kf = k as f64;
        assert_close_scaled(&format!("dinp after {k}"), &dx, &accumulated(&px, &want_dx, kf), GRAD_RTOL);
        assert_close_scaled(&format!("dweight after {k}"), &dw, &accumulated(&pw, &want_dw, kf), GRAD_RTOL);
        assert_close_scaled(&format!("dbias after {k}"), &db, &accumulated(&pb, &want_db, kf), GRAD_RTOL);
    }
}

/// The fused residual add + LayerNorm is the add followed by the LayerNorm, bit for bit (the model's
/// gradient checks cover the composition; this pins the fusion to it). Odd widths (tails shorter
/// than a SIMD lane group), a single row and a single channel included.
#[test]
fn residual_layernorm_forward_is_residual_then_layernorm_bit_for_bit() {
    let be = backend();
    let mut r = rng(21);
    for (n, c) in [(1, 1), (1, 37), (9, 33), (70, 13), (5, 1), (33, 771)] {
        let eps = 1e-5;
        // A large common offset in one input, as in a residual stream far from zero.
        let a: Vec<f32> = randn(&mut r, n * c, 1.0).iter().map(|x| x + 20.0).collect();
        let b = randn(&mut r, n * c, 3.0);
        let (w, bias) = (randn(&mut r, c, 1.0), randn(&mut r, c, 1.0));

        let mut want_residual = poison(n * c);
        be.residual_forward(&mut want_residual, &a, &b).unwrap();
        let (mut want_out, mut want_mean, mut want_rstd) = (poison(n * c), poison(n), poison(n));
        be.layernorm_forward(&mut want_out, &mut want_mean, &mut want_rstd, &want_residual, &w, &bias, n, c, eps)
            .unwrap();

        let (mut residual, mut out, mut mean, mut rstd) = (poison(n * c), poison(n * c), poison(n), poison(n));
        be.residual_layernorm_forward(&mut residual, &mut out, &mut mean, &mut rstd, &a, &b, &w, &bias, n, c, eps)
            .unwrap();
        let shape = format!("[{n}, {c}]");
        assert_bitwise_eq(&format!("residual {shape}"), &residual, &want_residual);
        assert_bitwise_eq(&format!("out {shape}"), &out, &want_out);
        assert_bitwise_eq(&format!("mean {shape}"), &mean, &want_mean);
        assert_bitwise_eq(&format!("rstd {shape}"), &rstd, &want_rstd);
        // and the values are right, not just consistent: against the spec of the composition
        let sum: Vec<f64> = a.iter().zip(&b).map(|(&x, &y)| x as f64 + y as f64).collect();
        let (twin_out, _, _) = spec::forward(&sum, &to_f64(&w), &to_f64(&bias), n, c, eps as f64);
        assert_close_scaled(&format!("out vs twin {shape}"), &out, &twin_out, 1e-4);
    }

    let (n, c) = (3, 4);
    let (mut residual, mut out, mut mean, mut rstd) = (poison(n * c), poison(n * c), poison(n), poison(n));
    let (x, w) = (vec![0.0; n * c], vec![1.0; c]);
    let short = vec![0.0; n * c - 1];
    let err = be
        .residual_layernorm_forward(&mut residual, &mut out, &mut mean, &mut rstd, &x, &short, &w, &w, n, c, 1e-5)
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("residual_layernorm_forward") && msg.contains("`b`") && msg.contains("11"), "{msg}");
}
