//! LayerNorm and the fused residual LayerNorm: against the spec and its finite differences; the CUDA
//! backend against the CPU.

use rand::Rng;
use safedpo::backend::cpu::layernorm::spec;
use safedpo::backend::cuda::{Device, Precision};
use safedpo::backend::prelude::*;

use crate::common::*;
use crate::device::{Fixture, ACCUMULATED_FLOOR};
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

// ---- the CUDA backend against the CPU (see `device`) -----------------------------------------------------

fn layernorm(device: &Device, precision: Precision) {
    for (seed, (n, c)) in [(1, 19), (1, 1), (5, 72), (3, 300)].into_iter().enumerate() {
        let mut f = Fixture::new(device, precision, 10 + seed as u64);
        let inp: Vec<f32> = f.randn(n * c, 2.0).iter().map(|x| x + 0.5).collect();
        let inp = f.stored(inp);
        let (w, b) = (f.randn(c, 1.0), f.randn(c, 0.5));
        let ((ci, gi), (cw, gw), (cb, gb)) = (f.both(&inp), f.both(&w), f.both(&b));
        let (mut want, mut got) = f.poisoned(n * c);
        let (mut want_mean, mut got_mean) = f.poisoned(n);
        let (mut want_rstd, mut got_rstd) = f.poisoned(n);
        f.cpu.layernorm_forward(&mut want, &mut want_mean, &mut want_rstd, &ci, &cw, &cb, n, c, 1e-5).unwrap();
        f.cuda.layernorm_forward(&mut got, &mut got_mean, &mut got_rstd, &gi, &gw, &gb, n, c, 1e-5).unwrap();
        let shape = format!("[{n}, {c}]");
        f.check(&format!("layernorm_forward out {shape}"), &got, &want);
        // mean and rstd are f32 in both modes, computed from the same (stored) inputs
        f.check_at(&format!("layernorm_forward mean {shape}"), &got_mean, &want_mean, 1e-5);
        f.check_at(&format!("layernorm_forward rstd {shape}"), &got_rstd, &want_rstd, 1e-5);

        let dout = f.randn(n * c, 1.0);
        let (cd, gd) = f.both(&dout);
        let (mut want_dinp, mut got_dinp) = f.fresh(n * c, 1.0);
        let (mut want_dw, mut got_dw) = f.fresh(c, 1.0);
        let (mut want_db, mut got_db) = f.fresh(c, 1.0);
        for _ in 0..2 {
            f.cpu
                .layernorm_backward(
                    &mut want_dinp,
                    &mut want_dw,
                    &mut want_db,
                    &cd,
                    &ci,
                    &cw,
                    &want_mean,
                    &want_rstd,
                    n,
                    c,
                )
                .unwrap();
            f.cuda
                .layernorm_backward(&mut got_dinp, &mut got_dw, &mut got_db, &gd, &gi, &gw, &got_mean, &got_rstd, n, c)
                .unwrap();
        }
        // Two accumulations onto a prior, each rounded: entries where the prior and the gradients
        // cancel keep the roundings of the larger partial sums.
        let (dinp, dweight, dbias) = (&got_dinp, &got_dw, &got_db);
        f.check_rounded(&format!("layernorm_backward dinp {shape}"), dinp, &want_dinp, 2.0, ACCUMULATED_FLOOR);
        f.check_rounded(&format!("layernorm_backward dweight {shape}"), dweight, &want_dw, 2.0, ACCUMULATED_FLOOR);
        f.check_rounded(&format!("layernorm_backward dbias {shape}"), dbias, &want_db, 2.0, ACCUMULATED_FLOOR);
    }
}

/// The fused residual add + LayerNorm. The residual is checked against the CPU's; the LayerNorm
/// outputs against the CPU's LayerNorm of the residual *as stored* (rounded to bf16 in Bf16 mode),
/// with the f32 statistics held to 1e-5 in both modes: the statistics must come from the rounded
/// residual that the backward re-reads, not from the f32 sums. The fused kernel must also equal the
/// unfused pair of launches on the same device bit for bit.
fn residual_layernorm(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 30);
    let mut shapes = vec![(1, 1), (1, 45), (4, 32), (9, 300)];
    for _ in 0..3 {
        shapes.push((f.rng.random_range(1..40), f.rng.random_range(1..200) * 2 + 1));
    }
    for (n, c) in shapes {
        let shape = format!("[{n}, {c}]");
        // a residual stream far from zero plus a branch: the bf16 rounding of the sum matters.
        let a: Vec<f32> = f.randn(n * c, 2.0).iter().map(|x| x + 20.0).collect();
        let a = f.stored(a);
        let b = f.randn(n * c, 1.0);
        let (w, bias) = (f.randn(c, 1.0), f.randn(c, 0.5));
        let ((ca, ga), (cb, gb), (cw, gw), (cbias, gbias)) = (f.both(&a), f.both(&b), f.both(&w), f.both(&bias));

        let (mut want_residual, mut got_residual) = f.poisoned(n * c);
        let (mut want, mut got) = f.poisoned(n * c);
        let (mut want_mean, mut got_mean) = f.poisoned(n);
        let (mut want_rstd, mut got_rstd) = f.poisoned(n);
        f.cuda
            .residual_layernorm_forward(
                &mut got_residual,
                &mut got,
                &mut got_mean,
                &mut got_rstd,
                &ga,
                &gb,
                &gw,
                &gbias,
                n,
                c,
                1e-5,
            )
            .unwrap();
        f.cpu
            .residual_layernorm_forward(
                &mut want_residual,
                &mut want,
                &mut want_mean,
                &mut want_rstd,
                &ca,
                &cb,
                &cw,
                &cbias,
                n,
                c,
                1e-5,
            )
            .unwrap();
        f.check(&format!("residual_layernorm_forward residual {shape}"), &got_residual, &want_residual);
        let stored_residual = f.stored(want_residual.clone());
        f.cpu
            .layernorm_forward(&mut want, &mut want_mean, &mut want_rstd, &stored_residual, &cw, &cbias, n, c, 1e-5)
            .unwrap();
        f.check(&format!("residual_layernorm_forward out {shape}"), &got, &want);
        f.check_at(&format!("residual_layernorm_forward mean {shape}"), &got_mean, &want_mean, 1e-5);
        f.check_at(&format!("residual_layernorm_forward rstd {shape}"), &got_rstd, &want_rstd, 1e-5);

        // the unfused launches on the same device
        let (_, mut residual) = f.poisoned(n * c);
        let (_, mut out) = f.poisoned(n * c);
        let ((_, mut mean), (_, mut rstd)) = (f.poisoned(n), f.poisoned(n));
        f.cuda.residual_forward(&mut residual, &ga, &gb).unwrap();
        f.cuda.layernorm_forward(&mut out, &mut mean, &mut rstd, &residual, &gw, &gbias, n, c, 1e-5).unwrap();
        for (what, fused, unfused) in [
            ("residual", &got_residual, &residual),
            ("out", &got, &out),
            ("mean", &got_mean, &mean),
            ("rstd", &got_rstd, &rstd),
        ] {
            let (fused, unfused) = (f.cuda.download(fused).unwrap(), f.cuda.download(unfused).unwrap());
            assert_bitwise_eq(&format!("fused vs unfused {what} {shape} ({precision})"), &fused, &unfused);
        }
    }
}

/// The fused backward over many blocks (the grid's last block sums their partials), at a width the
/// 128-bit path takes and one it does not: against the CPU, and the same bits on every run, while the
/// emulated device's test mode runs the blocks in another order each launch; the launches share the
/// backend's block counter, which each leaves at zero for the next (no memset).
fn layernorm_backward_blocks(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 50);
    let mut counter = None;
    for (n, c) in [(300, 64), (150, 771)] {
        let shape = format!("[{n}, {c}]");
        let inp = f.randn(n * c, 2.0);
        let (w, b, dout) = (f.randn(c, 1.0), f.randn(c, 0.5), f.randn(n * c, 1.0));
        let ((ci, gi), (cw, gw), (cb, _), (cd, gd)) = (f.both(&inp), f.both(&w), f.both(&b), f.both(&dout));
        let (mut mean, mut rstd, mut out) = (vec![0.0; n], vec![0.0; n], vec![0.0; n * c]);
        f.cpu.layernorm_forward(&mut out, &mut mean, &mut rstd, &ci, &cw, &cb, n, c, 1e-5).unwrap();
        let (gmean, grstd) = (f.cuda.upload(&mean).unwrap(), f.cuda.upload(&rstd).unwrap());
        let (prior, prior_w, prior_b) = (f.randn(n * c, 1.0), f.randn(c, 1.0), f.randn(c, 1.0));
        let (mut want_dinp, mut want_dw, mut want_db) = (prior.clone(), prior_w.clone(), prior_b.clone());
        f.cpu
            .layernorm_backward(&mut want_dinp, &mut want_dw, &mut want_db, &cd, &ci, &cw, &mean, &rstd, n, c)
            .unwrap();
        let mut first: Option<Vec<Vec<f32>>> = None;
        for run in 0..3 {
            let (mut dinp, mut dw, mut db) = (f.both(&prior).1, f.both(&prior_w).1, f.both(&prior_b).1);
            f.cuda.layernorm_backward(&mut dinp, &mut dw, &mut db, &gd, &gi, &gw, &gmean, &grstd, n, c).unwrap();
            f.check_block_counter(&mut counter);
            f.check_rounded(&format!("layernorm_backward dinp {shape}"), &dinp, &want_dinp, 1.0, ACCUMULATED_FLOOR);
            f.check_rounded(&format!("layernorm_backward dweight {shape}"), &dw, &want_dw, 1.0, ACCUMULATED_FLOOR);
            f.check_rounded(&format!("layernorm_backward dbias {shape}"), &db, &want_db, 1.0, ACCUMULATED_FLOOR);
            let got = [dinp, dw, db].map(|x| f.cuda.download(&x).unwrap()).to_vec();
            match &first {
                None => first = Some(got),
                Some(first) => {
                    for (k, (a, b)) in first.iter().zip(&got).enumerate() {
                        assert_bitwise_eq(&format!("run {run} output {k} {shape} ({precision})"), a, b);
                    }
                }
            }
        }
    }
}

device_tests!(layernorm, residual_layernorm, layernorm_backward_blocks);
