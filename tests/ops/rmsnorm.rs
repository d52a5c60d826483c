//! RMSNorm and the fused residual RMSNorm: against the spec and its finite differences, the weight
//! gradient's reduction independent of the thread count; the CUDA backend against the CPU.

use rand::Rng;
use safedpo::backend::cpu::rmsnorm::spec;
use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::cuda::{Device, Precision};
use safedpo::backend::prelude::*;

use crate::common::*;
use crate::device::{Fixture, ACCUMULATED_FLOOR};
use crate::{accumulated, backend, FD_STEP, FWD_RTOL, GRAD_RTOL};

#[test]
fn rmsnorm_forward_matches_spec() {
    let be = backend();
    let mut r = rng(61);
    for (n, c) in [(9, 33), (1, 1), (4, 8), (3, 771)] {
        let eps = 1e-6;
        // Rows of very different scales: rstd must follow each row.
        let inp: Vec<f32> =
            randn(&mut r, n * c, 1.0).iter().enumerate().map(|(i, x)| x * 10f32.powi((i / c) as i32 % 4 - 2)).collect();
        let w = randn(&mut r, c, 1.0);
        let (mut out, mut rstd) = (poison(n * c), poison(n));
        be.rmsnorm_forward(&mut out, &mut rstd, &inp, &w, n, c, eps).unwrap();
        let (want_out, want_rstd) = spec::forward(&to_f64(&inp), &to_f64(&w), n, c, eps as f64);
        assert_close_scaled(&format!("rmsnorm out [{n}, {c}]"), &out, &want_out, FWD_RTOL);
        assert_close(&format!("rmsnorm rstd [{n}, {c}]"), &rstd, &want_rstd, FWD_RTOL, 0.0);
    }
}

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let be = backend();
    let mut r = rng(62);
    // n spans several row chunks of the backend's partial sums.
    let (n, c, eps) = (70, 13, 1e-5f32);
    let inp = randn(&mut r, n * c, 2.0);
    let w = randn(&mut r, c, 1.0);
    let dout = randn(&mut r, n * c, 1.0);
    let (mut out, mut rstd) = (poison(n * c), poison(n));
    be.rmsnorm_forward(&mut out, &mut rstd, &inp, &w, n, c, eps).unwrap();

    let (x64, w64, dy) = (to_f64(&inp), to_f64(&w), to_f64(&dout));
    let loss = |x: &[f64], w: &[f64]| weighted_sum(&dy, &spec::forward(x, w, n, c, eps as f64).0);
    let want_dx = fd_grad(|x| loss(x, &w64), &x64, FD_STEP);
    let want_dw = fd_grad(|w| loss(&x64, w), &w64, FD_STEP);

    let (px, pw) = (randn(&mut r, n * c, 1.0), randn(&mut r, c, 1.0));
    let (mut dx, mut dw) = (px.clone(), pw.clone());
    for k in 1..=2 {
        be.rmsnorm_backward(&mut dx, &mut dw, &dout, &inp, &w, &rstd, n, c).unwrap();
        let kf = k as f64;
        assert_close_scaled(&format!("dinp after {k}"), &dx, &accumulated(&px, &want_dx, kf), GRAD_RTOL);
        assert_close_scaled(&format!("dweight after {k}"), &dw, &accumulated(&pw, &want_dw, kf), GRAD_RTOL);
    }
}

/// The weight gradient is a reduction over rows: the same bits on 1 and 3 threads as on the global
/// pool, and from one run to the next.
#[test]
fn rmsnorm_backward_is_independent_of_thread_count() {
    let be = backend();
    let mut r = rng(63);
    let (n, c) = (257, 64);
    let (inp, dout, w) = (randn(&mut r, n * c, 1.0), randn(&mut r, n * c, 1.0), randn(&mut r, c, 1.0));
    let run = |be: &CpuBackend| {
        let (mut out, mut rstd) = (poison(n * c), poison(n));
        be.rmsnorm_forward(&mut out, &mut rstd, &inp, &w, n, c, 1e-5).unwrap();
        let (mut dx, mut dw) = (vec![0.0; n * c], vec![0.0; c]);
        be.rmsnorm_backward(&mut dx, &mut dw, &dout, &inp, &w, &rstd, n, c).unwrap();
        [out, rstd, dx, dw].concat()
    };
    let first = run(&be);
    assert_bitwise_eq("two runs", &run(&be), &first);
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        assert_bitwise_eq(&format!("{threads} threads vs the global pool"), &pool.install(|| run(&be)), &first);
    }
}

/// The fused residual add + RMSNorm is the add followed by the RMSNorm, bit for bit. Odd widths
/// (tails shorter than a SIMD lane group), a single row and a single channel included.
#[test]
fn residual_rmsnorm_forward_is_residual_then_rmsnorm_bit_for_bit() {
    let be = backend();
    let mut r = rng(64);
    for (n, c) in [(1, 1), (1, 37), (9, 33), (70, 13), (5, 1), (33, 771)] {
        let eps = 1e-5;
        let a: Vec<f32> = randn(&mut r, n * c, 1.0).iter().map(|x| x + 20.0).collect();
        let b = randn(&mut r, n * c, 3.0);
        let w = randn(&mut r, c, 1.0);

        let mut want_residual = poison(n * c);
        be.residual_forward(&mut want_residual, &a, &b).unwrap();
        let (mut want_out, mut want_rstd) = (poison(n * c), poison(n));
        be.rmsnorm_forward(&mut want_out, &mut want_rstd, &want_residual, &w, n, c, eps).unwrap();

        let (mut residual, mut out, mut rstd) = (poison(n * c), poison(n * c), poison(n));
        be.residual_rmsnorm_forward(&mut residual, &mut out, &mut rstd, &a, &b, &w, n, c, eps).unwrap();
        let shape = format!("[{n}, {c}]");
        assert_bitwise_eq(&format!("residual {shape}"), &residual, &want_residual);
        assert_bitwise_eq(&format!("out {shape}"), &out, &want_out);
        assert_bitwise_eq(&format!("rstd {shape}"), &rstd, &want_rstd);
        let sum: Vec<f64> = a.iter().zip(&b).map(|(&x, &y)| x as f64 + y as f64).collect();
        let (spec_out, _) = spec::forward(&sum, &to_f64(&w), n, c, eps as f64);
        assert_close_scaled(&format!("out vs spec {shape}"), &out, &spec_out, 1e-4);
    }

    let (n, c) = (3, 4);
    let (mut residual, mut out, mut rstd) = (poison(n * c), poison(n * c), poison(n));
    let (x, w) = (vec![0.0; n * c], vec![1.0; c]);
    let short = vec![0.0; n * c - 1];
    let err = be.residual_rmsnorm_forward(&mut residual, &mut out, &mut rstd, &x, &short, &w, n, c, 1e-5).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("residual_rmsnorm_forward") && msg.contains("`b`") && msg.contains("11"), "{msg}");
    let err = be.rmsnorm_backward(&mut out, &mut vec![0.0; c + 1], &x, &x, &w, &rstd, n, c).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("rmsnorm_backward") && msg.contains("`dweight`") && msg.contains('5'), "{msg}");
}

// ---- the CUDA backend against the CPU (see `device`) -----------------------------------------------------

fn rmsnorm(device: &Device, precision: Precision) {
    // one row, one channel, rows past a block's warps, channels past a warp, several weight-gradient chunks
    for (seed, (n, c)) in [(1, 19), (1, 1), (5, 72), (3, 300), (70, 33)].into_iter().enumerate() {
        let mut f = Fixture::new(device, precision, 70 + seed as u64);
        let inp = f.randn(n * c, 2.0);
        let w: Vec<f32> = f.randn(c, 0.3).iter().map(|x| x + 1.0).collect();
        let w = f.stored(w);
        let ((ci, gi), (cw, gw)) = (f.both(&inp), f.both(&w));
        let (mut want, mut got) = f.poisoned(n * c);
        let (mut want_rstd, mut got_rstd) = f.poisoned(n);
        f.cpu.rmsnorm_forward(&mut want, &mut want_rstd, &ci, &cw, n, c, 1e-6).unwrap();
        f.cuda.rmsnorm_forward(&mut got, &mut got_rstd, &gi, &gw, n, c, 1e-6).unwrap();
        let shape = format!("[{n}, {c}]");
        f.check(&format!("rmsnorm_forward out {shape}"), &got, &want);
        // rstd is f32 in both modes, computed from the same (stored) inputs
        f.check_at(&format!("rmsnorm_forward rstd {shape}"), &got_rstd, &want_rstd, 1e-5);

        let dout = f.randn(n * c, 1.0);
        let (cd, gd) = f.both(&dout);
        let (mut want_dinp, mut got_dinp) = f.fresh(n * c, 1.0);
        let (mut want_dw, mut got_dw) = f.fresh(c, 1.0);
        for _ in 0..2 {
            f.cpu.rmsnorm_backward(&mut want_dinp, &mut want_dw, &cd, &ci, &cw, &want_rstd, n, c).unwrap();
            f.cuda.rmsnorm_backward(&mut got_dinp, &mut got_dw, &gd, &gi, &gw, &got_rstd, n, c).unwrap();
        }
        // Accumulated twice onto a random prior, as layernorm_backward's gradients are. dinp is
        // rstd·(w·dout − x̂·mean(w·dout·x̂)): where the two terms cancel, an element keeps the roundings
        // of the terms (measured up to 7.2e-4 of the largest entry), hence twice the floor.
        let dinp_floor = 2.0 * ACCUMULATED_FLOOR;
        f.check_rounded(&format!("rmsnorm_backward dinp {shape}"), &got_dinp, &want_dinp, 2.0, dinp_floor);
        f.check_rounded(&format!("rmsnorm_backward dweight {shape}"), &got_dw, &want_dw, 2.0, ACCUMULATED_FLOOR);

        // the weight gradient's reduction has a fixed order: the same bits again
        let mut again = f.cuda.zeros(c).unwrap();
        let mut scratch = f.cuda.zeros(n * c).unwrap();
        let mut once = f.cuda.zeros(c).unwrap();
        for dw in [&mut again, &mut once] {
            f.cuda.rmsnorm_backward(&mut scratch, dw, &gd, &gi, &gw, &got_rstd, n, c).unwrap();
        }
        let (again, once) = (f.cuda.download(&again).unwrap(), f.cuda.download(&once).unwrap());
        assert_bitwise_eq(&format!("rmsnorm_backward dweight twice {shape} ({precision})"), &again, &once);
    }
}

/// The fused residual add + RMSNorm. The residual is checked against the CPU's; the RMSNorm outputs
/// against the CPU's RMSNorm of the residual *as stored* (rounded to bf16 in Bf16 mode), rstd held to
/// 1e-5 in both modes: it must come from the rounded residual that the backward re-reads. The fused
/// kernel must also equal the unfused pair of launches on the same device bit for bit.
fn residual_rmsnorm(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 80);
    let mut shapes = vec![(1, 1), (1, 45), (4, 32), (9, 300)];
    for _ in 0..3 {
        shapes.push((f.rng.random_range(1..40), f.rng.random_range(1..200) * 2 + 1));
    }
    for (n, c) in shapes {
        let shape = format!("[{n}, {c}]");
        let a: Vec<f32> = f.randn(n * c, 2.0).iter().map(|x| x + 20.0).collect();
        let a = f.stored(a);
        let b = f.randn(n * c, 1.0);
        let w = f.randn(c, 1.0);
        let ((ca, ga), (cb, gb), (cw, gw)) = (f.both(&a), f.both(&b), f.both(&w));

        let (mut want_residual, mut got_residual) = f.poisoned(n * c);
        let (mut want, mut got) = f.poisoned(n * c);
        let (mut want_rstd, mut got_rstd) = f.poisoned(n);
        f.cuda.residual_rmsnorm_forward(&mut got_residual, &mut got, &mut got_rstd, &ga, &gb, &gw, n, c, 1e-5).unwrap();
        f.cpu
            .residual_rmsnorm_forward(&mut want_residual, &mut want, &mut want_rstd, &ca, &cb, &cw, n, c, 1e-5)
            .unwrap();
        f.check(&format!("residual_rmsnorm_forward residual {shape}"), &got_residual, &want_residual);
        let stored_residual = f.stored(want_residual.clone());
        f.cpu.rmsnorm_forward(&mut want, &mut want_rstd, &stored_residual, &cw, n, c, 1e-5).unwrap();
        f.check(&format!("residual_rmsnorm_forward out {shape}"), &got, &want);
        f.check_at(&format!("residual_rmsnorm_forward rstd {shape}"), &got_rstd, &want_rstd, 1e-5);

        // the unfused launches on the same device
        let ((_, mut residual), (_, mut out), (_, mut rstd)) = (f.poisoned(n * c), f.poisoned(n * c), f.poisoned(n));
        f.cuda.residual_forward(&mut residual, &ga, &gb).unwrap();
        f.cuda.rmsnorm_forward(&mut out, &mut rstd, &residual, &gw, n, c, 1e-5).unwrap();
        for (what, fused, unfused) in
            [("residual", &got_residual, &residual), ("out", &got, &out), ("rstd", &got_rstd, &rstd)]
        {
            let (fused, unfused) = (f.cuda.download(fused).unwrap(), f.cuda.download(unfused).unwrap());
            assert_bitwise_eq(&format!("fused vs unfused {what} {shape} ({precision})"), &fused, &unfused);
        }
    }
}

/// The fused backward over many blocks (the grid's last block sums their partials), at a width the
/// 128-bit path takes and one it does not: against the CPU, and the same bits on every run, while the
/// emulated device's test mode runs the blocks in another order each launch; the launches share the
/// backend's block counter, which each leaves at zero for the next (no memset).
fn rmsnorm_backward_blocks(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 51);
    let mut counter = None;
    for (n, c) in [(300, 64), (150, 771)] {
        let shape = format!("[{n}, {c}]");
        let inp = f.randn(n * c, 2.0);
        let (w, dout) = (f.randn(c, 1.0), f.randn(n * c, 1.0));
        let ((ci, gi), (cw, gw), (cd, gd)) = (f.both(&inp), f.both(&w), f.both(&dout));
        let (mut rstd, mut out) = (vec![0.0; n], vec![0.0; n * c]);
        f.cpu.rmsnorm_forward(&mut out, &mut rstd, &ci, &cw, n, c, 1e-6).unwrap();
        let grstd = f.cuda.upload(&rstd).unwrap();
        let (prior, prior_w) = (f.randn(n * c, 1.0), f.randn(c, 1.0));
        let (mut want_dinp, mut want_dw) = (prior.clone(), prior_w.clone());
        f.cpu.rmsnorm_backward(&mut want_dinp, &mut want_dw, &cd, &ci, &cw, &rstd, n, c).unwrap();
        let mut first: Option<Vec<Vec<f32>>> = None;
        for run in 0..3 {
            let (mut dinp, mut dw) = (f.both(&prior).1, f.both(&prior_w).1);
            f.cuda.rmsnorm_backward(&mut dinp, &mut dw, &gd, &gi, &gw, &grstd, n, c).unwrap();
            f.check_block_counter(&mut counter);
            f.check_rounded(&format!("rmsnorm_backward dinp {shape}"), &dinp, &want_dinp, 1.0, ACCUMULATED_FLOOR);
            f.check_rounded(&format!("rmsnorm_backward dweight {shape}"), &dw, &want_dw, 1.0, ACCUMULATED_FLOOR);
            let got = [dinp, dw].map(|x| f.cuda.download(&x).unwrap()).to_vec();
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

device_tests!(rmsnorm, residual_rmsnorm, rmsnorm_backward_blocks);
