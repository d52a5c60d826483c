//! Matrix products with a weight, both layouts, with and without bias: against the spec and its
//! finite differences, and the split weight gradient's independence of the thread count.

use safedpo::backend::cpu::matmul::spec;
use safedpo::backend::prelude::*;
use safedpo::backend::WeightLayout;

use crate::common::*;
use crate::{accumulated, backend, GRAD_RTOL};

pub const LAYOUTS: [WeightLayout; 2] = [WeightLayout::InOut, WeightLayout::OutIn];

#[test]
fn matmul_forward_matches_twin() {
    let be = backend();
    let mut r = rng(5);
    // Small (single-threaded gemm) and large (multi-threaded gemm) shapes.
    for &(n, ic, oc) in &[(7, 5, 9), (1, 3, 1), (96, 64, 80)] {
        for layout in LAYOUTS {
            for with_bias in [false, true] {
                let inp = randn(&mut r, n * ic, 1.0);
                let w = randn(&mut r, ic * oc, 1.0);
                let bias = randn(&mut r, oc, 1.0);
                let mut out = poison(n * oc);
                be.matmul_forward(&mut out, &inp, &w, with_bias.then_some(&bias), n, ic, oc, layout).unwrap();
                let b64 = to_f64(&bias);
                let want = spec::forward(&to_f64(&inp), &to_f64(&w), with_bias.then_some(&b64[..]), n, ic, oc, layout);
                assert_close_scaled(
                    &format!("matmul out {n}x{ic}x{oc} {layout:?} bias={with_bias}"),
                    &out,
                    &want,
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn matmul_backward_matches_finite_differences() {
    let be = backend();
    let mut r = rng(6);
    for &(n, ic, oc, probes) in &[(7, 5, 9, usize::MAX), (96, 64, 80, 150)] {
        for layout in LAYOUTS {
            for with_bias in [false, true] {
                let what = format!("{n}x{ic}x{oc} {layout:?} bias={with_bias}");
                let inp = randn(&mut r, n * ic, 1.0);
                let w = randn(&mut r, ic * oc, 1.0);
                let bias = randn(&mut r, oc, 1.0);
                let dout = randn(&mut r, n * oc, 1.0);
                let (x64, w64, b64, dy) = (to_f64(&inp), to_f64(&w), to_f64(&bias), to_f64(&dout));
                let loss = |x: &[f64], wt: &[f64], b: &[f64]| {
                    weighted_sum(&dy, &spec::forward(x, wt, with_bias.then_some(b), n, ic, oc, layout))
                };
                // The loss is linear in each input, so a large step is exact.
                let ix = sample_indices(&mut r, n * ic, probes);
                let iw = sample_indices(&mut r, ic * oc, probes);
                let want_dx = fd_grad_at(|x| loss(x, &w64, &b64), &x64, 1e-2, &ix);
                let want_dw = fd_grad_at(|wt| loss(&x64, wt, &b64), &w64, 1e-2, &iw);
                let want_db = fd_grad(|b| loss(&x64, &w64, b), &b64, 1e-2);

                let (pw, pb) = (randn(&mut r, ic * oc, 1.0), randn(&mut r, oc, 1.0));
                let (mut dx, mut dw, mut db) = (poison(n * ic), pw.clone(), pb.clone());
                for k in 1..=2 {
                    let dbias = if with_bias { Some(&mut db) } else { None };
                    be.matmul_backward(&mut dx, &mut dw, dbias, &dout, &inp, &w, n, ic, oc, layout).unwrap();
                    let pick = |v: &[f32], idx: &[usize]| idx.iter().map(|&i| v[i]).collect::<Vec<f32>>();
                    assert_close_scaled(&format!("dinp {what} call {k}"), &pick(&dx, &ix), &want_dx, GRAD_RTOL);
                    let pw_at = pick(&pw, &iw);
                    let want_w = accumulated(&pw_at, &want_dw, k as f64);
                    assert_close_scaled(&format!("dweight {what} call {k}"), &pick(&dw, &iw), &want_w, GRAD_RTOL);
                    let want_b = if with_bias { accumulated(&pb, &want_db, k as f64) } else { to_f64(&pb) };
                    assert_close_scaled(&format!("dbias {what} call {k}"), &db, &want_b, GRAD_RTOL);
                }
                assert!(dx.iter().all(|x| x.is_finite()), "dinp {what}: an element was left unwritten");
            }
        }
    }
}

/// Token counts long enough that the CPU backend splits the weight gradient's token dimension into
/// parts (2 parts of 650; 8 parts, the last one shorter): the gradient still matches the spec,
/// accumulates, and has the same bits on 1, 3 and the global pool's threads.
#[test]
fn matmul_backward_over_many_tokens_matches_twin_on_any_thread_count() {
    let be = backend();
    let mut r = rng(24);
    for &(n, ic, oc) in &[(1300, 24, 40), (4100, 40, 24)] {
        for layout in LAYOUTS {
            let what = format!("{n}x{ic}x{oc} {layout:?}");
            let inp = randn(&mut r, n * ic, 1.0);
            let w = randn(&mut r, ic * oc, 1.0);
            let dout = randn(&mut r, n * oc, 1.0);
            let (pw, pb) = (randn(&mut r, ic * oc, 1.0), randn(&mut r, oc, 1.0));
            let run = || {
                let (mut dx, mut dw, mut db) = (poison(n * ic), pw.clone(), pb.clone());
                for _ in 0..2 {
                    be.matmul_backward(&mut dx, &mut dw, Some(&mut db), &dout, &inp, &w, n, ic, oc, layout).unwrap();
                }
                (dx, dw, db)
            };
            let (dx, dw, db) = run();

            let (x64, w64, dy) = (to_f64(&inp), to_f64(&w), to_f64(&dout));
            let want_dw = accumulated(&pw, &spec::weight_grad(&x64, &dy, n, ic, oc, layout), 2.0);
            assert_close_scaled(&format!("dweight {what}"), &dw, &want_dw, GRAD_RTOL);
            // dinp = dout · Wᵀ: the spec's forward with dout as input and W transposed (the other layout).
            let flipped = match layout {
                WeightLayout::InOut => WeightLayout::OutIn,
                WeightLayout::OutIn => WeightLayout::InOut,
            };
            let want_dx = spec::forward(&dy, &w64, None, n, oc, ic, flipped);
            assert_close_scaled(&format!("dinp {what}"), &dx, &want_dx, GRAD_RTOL);
            let col_sums: Vec<f64> = (0..oc).map(|o| (0..n).map(|t| dy[t * oc + o]).sum()).collect();
            assert_close_scaled(&format!("dbias {what}"), &db, &accumulated(&pb, &col_sums, 2.0), GRAD_RTOL);

            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let (dx_t, dw_t, db_t) = pool.install(run);
                assert_bitwise_eq(&format!("dweight {what}, {threads} threads vs the global pool"), &dw_t, &dw);
                assert_bitwise_eq(&format!("dinp {what}, {threads} threads vs the global pool"), &dx_t, &dx);
                assert_bitwise_eq(&format!("dbias {what}, {threads} threads vs the global pool"), &db_t, &db);
            }
        }
    }
}
