//! Matrix products with a weight, both layouts, with and without bias: against the spec and its
//! finite differences, and the split weight gradient's independence of the thread count; the CUDA
//! backend against the CPU, with and without the GELU epilogue.

use half::bf16;
use safedpo::backend::cpu::matmul::spec;
use safedpo::backend::cuda::{Device, Gemm, LaunchConfig, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::WeightLayout;
use safedpo::kernel_args;

use crate::common::*;
use crate::device::{Fixture, ACCUMULATED_FLOOR, BF16_NOISE_FLOOR};
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

// ---- the CUDA backend against the CPU (see `device`) -----------------------------------------------------

fn matmul(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 2);
    let (n, ic, oc) = (13, 24, 40);
    for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
        for with_bias in [false, true] {
            let what = format!("{layout:?}, bias {with_bias}");
            let inp = f.randn(n * ic, 1.0);
            let w = f.randn(ic * oc, 0.3);
            let bias = f.randn(oc, 1.0);
            let ((ci, gi), (cw, gw), (cb, gb)) = (f.both(&inp), f.both(&w), f.both(&bias));
            let (mut want, mut got) = f.poisoned(n * oc);
            f.cpu.matmul_forward(&mut want, &ci, &cw, with_bias.then_some(&cb), n, ic, oc, layout).unwrap();
            f.cuda.matmul_forward(&mut got, &gi, &gw, with_bias.then_some(&gb), n, ic, oc, layout).unwrap();
            f.check(&format!("matmul_forward ({what})"), &got, &want);

            let dout = f.randn(n * oc, 1.0);
            let (cd, gd) = f.both(&dout);
            let (mut want_dinp, mut got_dinp) = f.poisoned(n * ic);
            let (mut want_dw, mut got_dw) = f.fresh(ic * oc, 1.0);
            let (mut want_db, mut got_db) = f.fresh(oc, 1.0);
            for _ in 0..2 {
                let cdb = if with_bias { Some(&mut want_db) } else { None };
                f.cpu.matmul_backward(&mut want_dinp, &mut want_dw, cdb, &cd, &ci, &cw, n, ic, oc, layout).unwrap();
                let gdb = if with_bias { Some(&mut got_db) } else { None };
                f.cuda.matmul_backward(&mut got_dinp, &mut got_dw, gdb, &gd, &gi, &gw, n, ic, oc, layout).unwrap();
            }
            f.check(&format!("matmul_backward dinp ({what})"), &got_dinp, &want_dinp);
            // Two accumulations onto a prior, each rounded (dinp is overwritten: one rounding).
            let (dweight, dbias) = (&got_dw, &got_db);
            f.check_rounded(&format!("matmul_backward dweight ({what})"), dweight, &want_dw, 2.0, ACCUMULATED_FLOOR);
            f.check_rounded(&format!("matmul_backward dbias ({what})"), dbias, &want_db, 2.0, ACCUMULATED_FLOOR);
        }
    }
}

/// The product with the GELU epilogue (`matmul_bias_gelu_forward`) against the CPU's `matmul_forward`
/// then `gelu_forward`: the pre-activation and the GELU output. Shapes: odd ones, `oc` a multiple of 8
/// (where a GPU fuses) and not (where it falls back), a single row.
fn matmul_bias_gelu(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 12);
    for (n, ic, oc) in [(13, 24, 40), (7, 5, 3), (1, 9, 16), (29, 33, 72)] {
        let what = format!("n {n}, ic {ic}, oc {oc}");
        let inp = f.randn(n * ic, 1.0);
        let w = f.randn(ic * oc, 0.5);
        let bias = f.randn(oc, 1.0);
        let ((ci, gi), (cw, gw), (cb, gb)) = (f.both(&inp), f.both(&w), f.both(&bias));
        let (mut want_pre, mut got_pre) = f.poisoned(n * oc);
        let (mut want_out, mut got_out) = f.poisoned(n * oc);
        f.cpu.matmul_forward(&mut want_pre, &ci, &cw, Some(&cb), n, ic, oc, WeightLayout::InOut).unwrap();
        f.cpu.gelu_forward(&mut want_out, &want_pre).unwrap();
        f.cuda.matmul_bias_gelu_forward(&mut got_pre, &mut got_out, &gi, &gw, &gb, n, ic, oc).unwrap();
        f.check(&format!("matmul_bias_gelu_forward pre ({what})"), &got_pre, &want_pre);
        f.check(&format!("matmul_bias_gelu_forward out ({what})"), &got_out, &want_out);
        // wrong lengths are errors naming the tensor
        let mut short = f.cuda.zeros(n * oc - 1).unwrap();
        let err = f.cuda.matmul_bias_gelu_forward(&mut got_pre, &mut short, &gi, &gw, &gb, n, ic, oc).unwrap_err();
        assert!(err.to_string().contains("`out`"), "{err}");
    }

    // The device call refuses what its epilogue cannot do, before touching anything.
    let (m, n, k) = (4, 8, 3);
    let a = device.upload(&vec![1.0f32; m * k]).unwrap();
    let b = device.upload(&vec![1.0f32; k * n]).unwrap();
    let bias = device.upload(&vec![1.0f32; n]).unwrap();
    let mut pre = device.alloc::<f32>(m * n).unwrap();
    let mut out = device.alloc::<f32>(m * n).unwrap();
    let spec = Gemm::new(m, n, k);
    let err = device.gemm_bias_gelu(&spec.beta(1.0), &a, &b, &mut pre, &mut out, bias.view()).unwrap_err();
    assert!(err.to_string().contains("beta"), "{err}");
    let err = device.gemm_bias_gelu(&spec, &a, &b, pre.slice_mut(1..), &mut out, bias.view()).unwrap_err();
    assert!(err.to_string().contains("pre has"), "{err}");
    let err = device.gemm_bias_gelu(&spec, &a, &b, &mut pre, &mut out, bias.slice(1..)).unwrap_err();
    assert!(err.to_string().contains("bias"), "{err}");
}

/// GPU only: the fused cuBLASLt product (`GELU_AUX_BIAS` epilogue) against the unfused one (`gemm`
/// with the bias epilogue, then the GELU kernel), at GPT-2's MLP pattern (oc = 4·ic, a multiple of 8,
/// so cuBLASLt must fuse in bf16). In f32 the fusion is optional (the backend does not use it) and
/// the epilogue's GELU may be an approximation: compared at 2e-3, and the error is printed.
fn fused_gelu_epilogue_matches_unfused(device: &Device) {
    let mut rng = rng(13);
    for (n, ic) in [(77, 64), (300, 96)] {
        let oc = 4 * ic;
        let spec = Gemm::new(n, oc, ic);
        let inp = randn(&mut rng, n * ic, 1.0);
        let w = randn(&mut rng, ic * oc, 0.3);
        let bias = randn(&mut rng, oc, 1.0);
        let gelu = LaunchConfig::for_elements(n * oc, 256);
        let what = format!("n {n}, ic {ic}, oc {oc}");
        {
            let to_bf16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
            let (a, b, bias) = (
                device.upload(&to_bf16(&inp)).unwrap(),
                device.upload(&to_bf16(&w)).unwrap(),
                device.upload(&to_bf16(&bias)).unwrap(),
            );
            let nan = vec![bf16::NAN; n * oc];
            let (mut pre, mut out) = (device.upload(&nan).unwrap(), device.upload(&nan).unwrap());
            let fused = device.gemm_bias_gelu(&spec, &a, &b, &mut pre, &mut out, bias.view()).unwrap();
            assert!(fused, "bf16 {what}: cuBLASLt did not fuse the GELU epilogue");
            let (mut d, mut g) = (device.upload(&nan).unwrap(), device.upload(&nan).unwrap());
            device.gemm(&spec, &a, &b, &mut d, Some(bias.view())).unwrap();
            device.launch("gelu_forward_bf16", gelu, &kernel_args![&mut g, &d, (n * oc) as i64]).unwrap();
            let f32s = |v: Vec<bf16>| v.into_iter().map(f32::from).collect::<Vec<_>>();
            let wide = |v: Vec<bf16>| v.into_iter().map(|x| x.to_f64()).collect::<Vec<_>>();
            let (pre, out) = (f32s(device.download(&pre).unwrap()), f32s(device.download(&out).unwrap()));
            let (d, g) = (wide(device.download(&d).unwrap()), wide(device.download(&g).unwrap()));
            // Two roundings of the same f32 sums (accumulated in any order): one bf16 unit apart at
            // most. The GELU kernel reads the pre-activation rounded, the epilogue before rounding,
            // and its GELU may be an approximation: the f32 comparison below allows it 2e-3 of the
            // largest entry, and so does the floor here.
            let (pre_tol, gelu_floor) = (2.0 * BF16_ROUNDING, 2e-3);
            assert_close_with_floor(&format!("bf16 {what}: fused pre vs gemm"), &pre, &d, pre_tol, BF16_NOISE_FLOOR);
            assert_close_with_floor(&format!("bf16 {what}: fused gelu vs gelu kernel"), &out, &g, pre_tol, gelu_floor);
        }
        {
            let (a, b, bias) =
                (device.upload(&inp).unwrap(), device.upload(&w).unwrap(), device.upload(&bias).unwrap());
            let nan = vec![f32::NAN; n * oc];
            let (mut pre, mut out) = (device.upload(&nan).unwrap(), device.upload(&nan).unwrap());
            if !device.gemm_bias_gelu(&spec, &a, &b, &mut pre, &mut out, bias.view()).unwrap() {
                eprintln!("f32 {what}: cuBLASLt does not fuse the GELU epilogue in f32 (not used by the backend)");
                continue;
            }
            let (mut d, mut g) = (device.upload(&nan).unwrap(), device.upload(&nan).unwrap());
            device.gemm(&spec, &a, &b, &mut d, Some(bias.view())).unwrap();
            device.launch("gelu_forward_f32", gelu, &kernel_args![&mut g, &d, (n * oc) as i64]).unwrap();
            let (pre, out) = (device.download(&pre).unwrap(), device.download(&out).unwrap());
            let (d, g) = (to_f64(&device.download(&d).unwrap()), to_f64(&device.download(&g).unwrap()));
            let scale = g.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let (i, ratio) = worst_error(&out, &g, 1e-6, 1e-6 * scale);
            eprintln!("f32 {what}: fused GELU vs the kernel: worst element {i}, {ratio:.1}× (1e-6 scaled)");
            assert_close_scaled(&format!("f32 {what}: fused pre vs gemm"), &pre, &d, 1e-5);
            assert_close_scaled(&format!("f32 {what}: fused gelu vs gelu kernel"), &out, &g, 2e-3);
        }
    }
}

device_tests!(matmul, matmul_bias_gelu; gpu only: fused_gelu_epilogue_matches_unfused);
