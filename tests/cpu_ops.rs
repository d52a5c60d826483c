//! The CPU backend against naive f64 twins of every op.
//!
//! Forward: the f32 op on random inputs, outputs poisoned with NaN first, against an f64 twin
//! written as plain loops. Backward: the f32 backward against central differences of the f64
//! twin's scalar loss `Σ w ⊙ out` (w random), so the twin's forward is the only specification.
//! Accumulating backwards start from random priors and are called twice (the gradient must add
//! twice); overwriting ones start from NaN.

mod common;

use common::*;
use rand::Rng;
use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::prelude::*;
use safedpo::backend::{AdamWParams, Packing, WeightLayout, PAIR_METRICS};
use safedpo::loss::{pair_loss, Objective, PairInput};

/// Relative tolerance of an f32 forward against its f64 twin.
const FWD_RTOL: f64 = 1e-5;
/// Relative tolerance (scaled to the largest entry) of an f32 gradient against f64 finite differences.
const GRAD_RTOL: f64 = 1e-4;
/// Finite-difference step for smooth f64 twins.
const FD_STEP: f64 = 1e-5;

fn backend() -> CpuBackend {
    CpuBackend::new()
}

fn packing(be: &CpuBackend, lens: &[usize]) -> Packing<CpuBackend> {
    Packing::new(be, &cu_seqlens(lens)).unwrap()
}

/// `prior + k · grad`, the expected state of an accumulating gradient after k backward calls.
fn accumulated(prior: &[f32], grad: &[f64], k: f64) -> Vec<f64> {
    prior.iter().zip(grad).map(|(&p, &g)| p as f64 + k * g).collect()
}

// ---- twins --------------------------------------------------------------------------------------

fn embedding_twin(tokens: &[i32], positions: &[i32], wte: &[f64], wpe: &[f64], c: usize) -> Vec<f64> {
    let mut out = vec![0.0; tokens.len() * c];
    for t in 0..tokens.len() {
        for j in 0..c {
            out[t * c + j] = wte[tokens[t] as usize * c + j] + wpe[positions[t] as usize * c + j];
        }
    }
    out
}

/// LayerNorm in f64: (out, mean, rstd).
fn layernorm_twin(inp: &[f64], w: &[f64], b: &[f64], n: usize, c: usize, eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    for t in 0..n {
        let x = &inp[t * c..(t + 1) * c];
        let m = x.iter().sum::<f64>() / c as f64;
        let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / c as f64;
        let r = 1.0 / (var + eps).sqrt();
        for j in 0..c {
            out[t * c + j] = (x[j] - m) * r * w[j] + b[j];
        }
        mean[t] = m;
        rstd[t] = r;
    }
    (out, mean, rstd)
}

#[allow(clippy::too_many_arguments)]
fn matmul_twin(
    inp: &[f64],
    w: &[f64],
    bias: Option<&[f64]>,
    n: usize,
    ic: usize,
    oc: usize,
    layout: WeightLayout,
) -> Vec<f64> {
    let mut out = vec![0.0; n * oc];
    for t in 0..n {
        for o in 0..oc {
            let mut acc = bias.map_or(0.0, |b| b[o]);
            for i in 0..ic {
                let wv = match layout {
                    WeightLayout::InOut => w[i * oc + o],
                    WeightLayout::OutIn => w[o * ic + i],
                };
                acc += inp[t * ic + i] * wv;
            }
            out[t * oc + o] = acc;
        }
    }
    out
}

/// Causal attention in f64: (out [n, c], probabilities in the CPU backend's saved layout).
fn attention_twin(qkv: &[f64], lens: &[usize], nh: usize, c: usize) -> (Vec<f64>, Vec<f64>) {
    let n: usize = lens.iter().sum();
    let hd = c / nh;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0.0; n * c];
    let mut probs = Vec::new();
    let mut start = 0;
    for &t in lens {
        for h in 0..nh {
            let q = |i: usize, d: usize| qkv[(start + i) * 3 * c + h * hd + d];
            let k = |j: usize, d: usize| qkv[(start + j) * 3 * c + c + h * hd + d];
            let v = |j: usize, d: usize| qkv[(start + j) * 3 * c + 2 * c + h * hd + d];
            for i in 0..t {
                let scores: Vec<f64> =
                    (0..=i).map(|j| (0..hd).map(|d| q(i, d) * k(j, d)).sum::<f64>() * scale).collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                let p: Vec<f64> = scores.iter().map(|s| (s - max).exp() / z).collect();
                for d in 0..hd {
                    out[(start + i) * c + h * hd + d] = (0..=i).map(|j| p[j] * v(j, d)).sum();
                }
                probs.extend_from_slice(&p);
                probs.extend(std::iter::repeat_n(0.0, t - i - 1));
            }
        }
        start += t;
    }
    (out, probs)
}

fn gelu_twin(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

/// (token_logp, lse) in f64.
fn logsoftmax_gather_twin(logits: &[f64], targets: &[i32], v: usize) -> (Vec<f64>, Vec<f64>) {
    let n = targets.len();
    let (mut lp, mut lse) = (vec![0.0; n], vec![0.0; n]);
    for t in 0..n {
        let row = &logits[t * v..(t + 1) * v];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        lse[t] = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        lp[t] = if targets[t] >= 0 { row[targets[t] as usize] - lse[t] } else { 0.0 };
    }
    (lp, lse)
}

fn seq_sums(token_values: &[f64], lens: &[usize]) -> Vec<f64> {
    let mut start = 0;
    lens.iter()
        .map(|&l| {
            let s = token_values[start..start + l].iter().sum();
            start += l;
            s
        })
        .collect()
}

// ---- embedding ----------------------------------------------------------------------------------

#[test]
fn embedding_forward_matches_naive() {
    let be = backend();
    let mut r = rng(1);
    let (n, c, vocab, max_pos) = (37, 12, 11, 9);
    let tokens = rand_ids(&mut r, n, vocab);
    let positions = rand_ids(&mut r, n, max_pos);
    let wte = randn(&mut r, vocab * c, 1.0);
    let wpe = randn(&mut r, max_pos * c, 1.0);
    let mut out = poison(n * c);
    be.embedding_forward(&mut out, &tokens, &positions, &wte, &wpe, n, c).unwrap();
    // a + b rounds the same in f32 and f64→f32, so the comparison is exact.
    let want = embedding_twin(&tokens, &positions, &to_f64(&wte), &to_f64(&wpe), c);
    assert_close("embedding out", &out, &want, 1e-7, 0.0);
}

#[test]
fn embedding_backward_accumulates_the_gradient() {
    let be = backend();
    let mut r = rng(2);
    let (n, c, vocab, max_pos) = (29, 6, 7, 5);
    let tokens = rand_ids(&mut r, n, vocab);
    let positions = rand_ids(&mut r, n, max_pos);
    let (wte, wpe) = (randn(&mut r, vocab * c, 1.0), randn(&mut r, max_pos * c, 1.0));
    let dout = randn(&mut r, n * c, 1.0);
    let w = to_f64(&dout);
    let want_dwte =
        fd_grad(|x| weighted_sum(&w, &embedding_twin(&tokens, &positions, x, &to_f64(&wpe), c)), &to_f64(&wte), 1e-3);
    let want_dwpe =
        fd_grad(|x| weighted_sum(&w, &embedding_twin(&tokens, &positions, &to_f64(&wte), x, c)), &to_f64(&wpe), 1e-3);
    let (prior_te, prior_pe) = (randn(&mut r, vocab * c, 1.0), randn(&mut r, max_pos * c, 1.0));
    let (mut dwte, mut dwpe) = (prior_te.clone(), prior_pe.clone());
    for k in 1..=2 {
        be.embedding_backward(&mut dwte, &mut dwpe, &dout, &tokens, &positions, n, c).unwrap();
        assert_close_scaled(
            &format!("dwte after {k} calls"),
            &dwte,
            &accumulated(&prior_te, &want_dwte, k as f64),
            1e-5,
        );
        assert_close_scaled(
            &format!("dwpe after {k} calls"),
            &dwpe,
            &accumulated(&prior_pe, &want_dwpe, k as f64),
            1e-5,
        );
    }
}

#[test]
fn embedding_rejects_out_of_range_ids() {
    let be = backend();
    let (n, c) = (3, 2);
    let mut out = poison(n * c);
    let err = be.embedding_forward(&mut out, &vec![0, 4, 1], &vec![0, 1, 2], &vec![0.0; 8], &vec![0.0; 6], n, c);
    let msg = format!("{:#}", err.unwrap_err());
    assert!(msg.contains("embedding_forward") && msg.contains("tokens[1]") && msg.contains('4'), "{msg}");
}

// ---- layernorm ----------------------------------------------------------------------------------

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
    let (want_out, want_mean, want_rstd) = layernorm_twin(&to_f64(&inp), &to_f64(&w), &to_f64(&b), n, c, eps as f64);
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
    let loss = |x: &[f64], w: &[f64], b: &[f64]| weighted_sum(&dy, &layernorm_twin(x, w, b, n, c, eps as f64).0);
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
        // and the values are right, not just consistent: against the f64 twin of the composition
        let sum: Vec<f64> = a.iter().zip(&b).map(|(&x, &y)| x as f64 + y as f64).collect();
        let (twin_out, _, _) = layernorm_twin(&sum, &to_f64(&w), &to_f64(&bias), n, c, eps as f64);
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

// ---- matmul -------------------------------------------------------------------------------------

const LAYOUTS: [WeightLayout; 2] = [WeightLayout::InOut, WeightLayout::OutIn];

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
                let want = matmul_twin(&to_f64(&inp), &to_f64(&w), with_bias.then_some(&b64[..]), n, ic, oc, layout);
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
                    weighted_sum(&dy, &matmul_twin(x, wt, with_bias.then_some(b), n, ic, oc, layout))
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

/// The weight gradient of `out = inp · W` summed over `n` tokens, in f64, in `layout`: `inpᵀ · dout`.
fn weight_grad_twin(inp: &[f64], dout: &[f64], n: usize, ic: usize, oc: usize, layout: WeightLayout) -> Vec<f64> {
    let mut dw = vec![0.0; ic * oc];
    for t in 0..n {
        for i in 0..ic {
            for o in 0..oc {
                let at = match layout {
                    WeightLayout::InOut => i * oc + o,
                    WeightLayout::OutIn => o * ic + i,
                };
                dw[at] += inp[t * ic + i] * dout[t * oc + o];
            }
        }
    }
    dw
}

/// Token counts long enough that the CPU backend splits the weight gradient's token dimension into
/// parts (2 parts of 650; 8 parts, the last one shorter): the gradient still matches the f64 twin,
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
            let want_dw = accumulated(&pw, &weight_grad_twin(&x64, &dy, n, ic, oc, layout), 2.0);
            assert_close_scaled(&format!("dweight {what}"), &dw, &want_dw, GRAD_RTOL);
            // dinp = dout · Wᵀ: the twin's forward with dout as input and W transposed (the other layout).
            let flipped = match layout {
                WeightLayout::InOut => WeightLayout::OutIn,
                WeightLayout::OutIn => WeightLayout::InOut,
            };
            let want_dx = matmul_twin(&dy, &w64, None, n, oc, ic, flipped);
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

// ---- attention ----------------------------------------------------------------------------------

/// Runs the forward on a packed batch; returns (out, saved).
fn run_attention(be: &CpuBackend, qkv: &[f32], lens: &[usize], nh: usize, c: usize) -> (Vec<f32>, Vec<f32>) {
    let pk = packing(be, lens);
    let n = pk.num_tokens();
    let saved_len = be.attention_saved_len(&pk, nh);
    assert_eq!(saved_len, nh * lens.iter().map(|l| l * l).sum::<usize>());
    let (mut out, mut saved) = (poison(n * c), poison(saved_len));
    be.attention_forward(&mut out, &mut saved, &qkv.to_vec(), &pk, nh, c).unwrap();
    (out, saved)
}

#[test]
fn attention_forward_matches_twin() {
    let be = backend();
    let mut r = rng(7);
    // Lengths of 1, below, at and above the backend's 32-row blocks, packed together.
    for &(ref lens, nh, c) in &[(vec![1usize, 5, 33, 70, 2, 32], 4, 16), (vec![1], 2, 8), (vec![64, 3], 3, 24)] {
        let n: usize = lens.iter().sum();
        let qkv = randn(&mut r, n * 3 * c, 1.5);
        let (out, saved) = run_attention(&be, &qkv, lens, nh, c);
        let (want_out, want_p) = attention_twin(&to_f64(&qkv), lens, nh, c);
        assert_close_scaled(&format!("attention out {lens:?}"), &out, &want_out, 1e-5);
        assert_close(&format!("attention probabilities {lens:?}"), &saved, &want_p, 1e-5, 1e-7);
    }
}

#[test]
fn attention_backward_matches_finite_differences() {
    let be = backend();
    let mut r = rng(8);
    for &(ref lens, nh, c, probes) in &[(vec![3usize, 1, 4], 2, 8, usize::MAX), (vec![1, 40, 33, 70], 3, 12, 400)] {
        let n: usize = lens.iter().sum();
        let pk = packing(&be, lens);
        let qkv = randn(&mut r, n * 3 * c, 1.0);
        let dout = randn(&mut r, n * c, 1.0);
        let (out, saved) = run_attention(&be, &qkv, lens, nh, c);
        let mut dqkv = poison(n * 3 * c);
        be.attention_backward(&mut dqkv, &dout, &qkv, &out, &saved, &pk, nh, c).unwrap();

        let dy = to_f64(&dout);
        let idx = sample_indices(&mut r, n * 3 * c, probes);
        let want = fd_grad_at(|x| weighted_sum(&dy, &attention_twin(x, lens, nh, c).0), &to_f64(&qkv), FD_STEP, &idx);
        let got: Vec<f32> = idx.iter().map(|&i| dqkv[i]).collect();
        assert_close_scaled(&format!("dqkv {lens:?}"), &got, &want, GRAD_RTOL);
        assert!(dqkv.iter().all(|x| x.is_finite()), "dqkv {lens:?}: an element was left unwritten");

        // Overwrite semantics: a second call gives the same values, not twice them.
        let first = dqkv.clone();
        be.attention_backward(&mut dqkv, &dout, &qkv, &out, &saved, &pk, nh, c).unwrap();
        assert_bitwise_eq("dqkv second call", &dqkv, &first);
    }
}

#[test]
fn attention_sequences_are_independent() {
    let be = backend();
    let mut r = rng(9);
    let (nh, c) = (2, 16);
    let (la, lb, lc) = (45, 7, 1);
    let qkv_a = randn(&mut r, la * 3 * c, 1.0);
    let dout_a = randn(&mut r, la * c, 1.0);
    let (qkv_b, qkv_c) = (randn(&mut r, lb * 3 * c, 1.0), randn(&mut r, lc * 3 * c, 1.0));
    let (dout_b, dout_c) = (randn(&mut r, lb * c, 1.0), randn(&mut r, lc * c, 1.0));
    let qkv_packed = [qkv_b.clone(), qkv_a.clone(), qkv_c].concat();
    let dout_packed = [dout_b, dout_a.clone(), dout_c].concat();

    let backward = |qkv: &[f32], dout: &[f32], lens: &[usize]| {
        let pk = packing(&be, lens);
        let (out, saved) = run_attention(&be, qkv, lens, nh, c);
        let mut dqkv = poison(qkv.len());
        be.attention_backward(&mut dqkv, &dout.to_vec(), &qkv.to_vec(), &out, &saved, &pk, nh, c).unwrap();
        (out, dqkv)
    };
    let (out_alone, dqkv_alone) = backward(&qkv_a, &dout_a, &[la]);
    let (out_packed, dqkv_packed) = backward(&qkv_packed, &dout_packed, &[lb, la, lc]);
    assert_bitwise_eq("out of A packed vs alone", &out_packed[lb * c..(lb + la) * c], &out_alone);
    assert_bitwise_eq("dqkv of A packed vs alone", &dqkv_packed[lb * 3 * c..(lb + la) * 3 * c], &dqkv_alone);
}

// ---- pointwise ----------------------------------------------------------------------------------

#[test]
fn gelu_matches_twin_and_its_derivative() {
    let be = backend();
    let mut r = rng(10);
    let mut inp = uniform(&mut r, 3001, -6.0, 6.0);
    inp.extend_from_slice(&[0.0, -20.0, 20.0, 1e-3, -1e-3]);
    let mut out = poison(inp.len());
    be.gelu_forward(&mut out, &inp).unwrap();
    let want: Vec<f64> = inp.iter().map(|&x| gelu_twin(x as f64)).collect();
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
            w as f64 * (gelu_twin(x + FD_STEP) - gelu_twin(x - FD_STEP)) / (2.0 * FD_STEP)
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

// ---- fused log-softmax-gather -------------------------------------------------------------------

/// Logits with a mix of scales: ordinary rows, rows near 1e4, and a row with one huge logit.
fn lsg_inputs(r: &mut impl Rng, lens: &[usize], v: usize) -> (Vec<f32>, Vec<i32>) {
    let n: usize = lens.iter().sum();
    let mut logits = randn(r, n * v, 3.0);
    for t in (0..n).step_by(5) {
        logits[t * v..(t + 1) * v].iter_mut().for_each(|x| *x += 1e4);
    }
    if n > 3 {
        logits[3 * v..4 * v].fill(0.0);
        logits[3 * v + v / 2] = 1e4;
    }
    let mut targets = rand_ids(r, n, v);
    for (t, target) in targets.iter_mut().enumerate() {
        if t % 4 == 1 {
            *target = -1;
        }
    }
    (logits, targets)
}

#[test]
fn logsoftmax_gather_forward_matches_twin() {
    let be = backend();
    let mut r = rng(12);
    let (lens, v) = ([4usize, 1, 9, 7, 2], 37);
    let n: usize = lens.iter().sum();
    let (logits, targets) = lsg_inputs(&mut r, &lens, v);
    let (mut lp, mut lse) = (poison(n), poison(n));
    be.logsoftmax_gather_forward(&mut lp, &mut lse, &logits, &targets, n, v).unwrap();
    let (want_lp, want_lse) = logsoftmax_gather_twin(&to_f64(&logits), &targets, v);
    assert_close("lse", &lse, &want_lse, 1e-6, 1e-6);
    assert_close("token_logp", &lp, &want_lp, 1e-5, 1e-5);
    for (t, &target) in targets.iter().enumerate() {
        if target == -1 {
            assert_eq!(lp[t], 0.0, "token_logp[{t}] has no target and must be 0");
        }
    }

    let pk = packing(&be, &lens);
    let mut seq = poison(lens.len());
    be.sequence_logp_sum(&mut seq, &lp, &pk).unwrap();
    assert_close("seq_logp", &seq, &seq_sums(&to_f64(&lp), &lens), 1e-6, 0.0);
}

#[test]
fn logsoftmax_gather_forward_large_vocab_is_accurate() {
    let be = backend();
    let mut r = rng(13);
    let (n, v) = (6, 50_257);
    let logits = randn(&mut r, n * v, 4.0);
    let targets = rand_ids(&mut r, n, v);
    let (mut lp, mut lse) = (poison(n), poison(n));
    be.logsoftmax_gather_forward(&mut lp, &mut lse, &logits, &targets, n, v).unwrap();
    let (want_lp, want_lse) = logsoftmax_gather_twin(&to_f64(&logits), &targets, v);
    assert_close("lse (V = 50257)", &lse, &want_lse, 1e-6, 0.0);
    assert_close("token_logp (V = 50257)", &lp, &want_lp, 1e-5, 0.0);
}

#[test]
fn logsoftmax_gather_backward_matches_finite_differences() {
    let be = backend();
    let mut r = rng(14);
    let (lens, v) = ([4usize, 1, 9, 7, 2], 37);
    let n: usize = lens.iter().sum();
    let pk = packing(&be, &lens);
    let (logits, targets) = lsg_inputs(&mut r, &lens, v);
    let dseq = randn(&mut r, lens.len(), 1.0);
    let (mut lp, mut lse) = (poison(n), poison(n));
    be.logsoftmax_gather_forward(&mut lp, &mut lse, &logits, &targets, n, v).unwrap();
    let mut grad = logits.clone();
    be.logsoftmax_gather_backward(&mut grad, &lse, &targets, &dseq, &pk, n, v).unwrap();

    let w = to_f64(&dseq);
    let loss = |x: &[f64]| weighted_sum(&w, &seq_sums(&logsoftmax_gather_twin(x, &targets, v).0, &lens));
    // A step of 1e-3 still resolves rows near 1e4 in f64.
    let want = fd_grad(loss, &to_f64(&logits), 1e-3);
    // Rows near 1e4 hold lse rounded to f32 (≈ 5e-4 absolute), hence the absolute tolerance.
    assert_close("dlogits", &grad, &want, 1e-4, 2e-3);
    for (t, &target) in targets.iter().enumerate() {
        if target == -1 {
            assert!(grad[t * v..(t + 1) * v].iter().all(|&x| x == 0.0), "row {t} has no target and must be zeros");
        }
    }
    // Ordinary-scale rows are held to a tight tolerance.
    let ordinary: Vec<usize> = (0..n).filter(|t| t % 5 != 0 && *t != 3).collect();
    let pick = |g: &[f32]| ordinary.iter().flat_map(|&t| g[t * v..(t + 1) * v].to_vec()).collect::<Vec<f32>>();
    let pick64 = |g: &[f64]| ordinary.iter().flat_map(|&t| g[t * v..(t + 1) * v].to_vec()).collect::<Vec<f64>>();
    assert_close_scaled("dlogits (ordinary rows)", &pick(&grad), &pick64(&want), 1e-5);
}

#[test]
fn logsoftmax_gather_rejects_bad_targets() {
    let be = backend();
    let (mut lp, mut lse) = (poison(2), poison(2));
    let err = be.logsoftmax_gather_forward(&mut lp, &mut lse, &vec![0.0; 6], &vec![0, 3], 2, 3).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("targets[1]") && msg.contains("-1 or 0..3"), "{msg}");
}

// ---- preference loss ----------------------------------------------------------------------------

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
        for i in 0..pairs {
            let (c, rj) = (2 * i, 2 * i + 1);
            let rf = |s: usize| if objective.uses_reference() { reference[s] as f64 } else { 0.0 };
            let want = pair_loss(
                objective,
                &PairInput {
                    policy_chosen: policy[c] as f64,
                    policy_rejected: policy[rj] as f64,
                    ref_chosen: rf(c),
                    ref_rejected: rf(rj),
                    chosen_unsafe: flags[c] == 1,
                    rejected_unsafe: flags[rj] == 1,
                    chosen_len: lengths[c] as u32,
                    rejected_len: lengths[rj] as u32,
                },
            );
            let m = &metrics[i * PAIR_METRICS..(i + 1) * PAIR_METRICS];
            let want_m = [want.loss, want.reward_chosen, want.reward_rejected, want.margin, want.accuracy];
            assert_close(&format!("{objective:?} metrics of pair {i}"), m, &want_m, 1e-6, 1e-7);
            let want_d = [grad_scale as f64 * want.d_policy_chosen, grad_scale as f64 * want.d_policy_rejected];
            assert_close(&format!("{objective:?} dpolicy of pair {i}"), &dpolicy[c..=rj], &want_d, 1e-6, 1e-9);
        }
    }
}

// ---- optimizer ----------------------------------------------------------------------------------

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
        let (lr, b1, b2, eps, wd) = (lr as f64, b1 as f64, b2 as f64, eps as f64, wd as f64);
        for i in 0..len {
            let g = grad[i] as f64 * gs as f64;
            p64[i] -= lr * wd * p64[i];
            m64[i] = b1 * m64[i] + (1.0 - b1) * g;
            v64[i] = b2 * v64[i] + (1.0 - b2) * g * g;
            let mhat = m64[i] / (1.0 - b1.powi(step as i32));
            let vhat = v64[i] / (1.0 - b2.powi(step as i32));
            p64[i] -= lr * mhat / (vhat.sqrt() + eps);
        }
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
    let want: Vec<f64> = param.iter().zip(&grad).map(|(&p, &g)| p as f64 - 0.01 * 0.5 * g as f64).collect();
    be.sgd(&mut param, &grad, 0.01, 0.5).unwrap();
    assert_close("sgd", &param, &want, 1e-6, 1e-7);

    let other = randn(&mut r, 77, 3.0);
    let got = be.sum_squares(&[&grad, &other, &Vec::new()]).unwrap();
    let want: f64 = grad.iter().chain(&other).map(|&x| (x as f64).powi(2)).sum();
    assert!((got - want).abs() <= 1e-12 * want, "sum_squares {got} vs {want}");
}

// ---- determinism --------------------------------------------------------------------------------

/// Every op with a reduction on a bench-like shape; returns all outputs concatenated.
fn run_all_ops(be: &CpuBackend, seed: u64) -> Vec<f32> {
    let mut r = rng(seed);
    let lens = [128usize, 1, 70, 57];
    let (nh, c, vocab, v) = (4, 64, 300, 300);
    let n: usize = lens.iter().sum();
    let pk = packing(be, &lens);
    let mut outputs = Vec::new();

    let tokens = rand_ids(&mut r, n, vocab);
    let positions: Vec<i32> = lens.iter().flat_map(|&l| 0..l as i32).collect();
    let dx = randn(&mut r, n * c, 1.0);
    let (mut dwte, mut dwpe) = (vec![0.0; vocab * c], vec![0.0; 128 * c]);
    be.embedding_backward(&mut dwte, &mut dwpe, &dx, &tokens, &positions, n, c).unwrap();
    outputs.extend([dwte, dwpe].concat());

    let x = randn(&mut r, n * c, 1.0);
    let (w, b) = (randn(&mut r, c, 1.0), randn(&mut r, c, 1.0));
    let (mut y, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    be.layernorm_forward(&mut y, &mut mean, &mut rstd, &x, &w, &b, n, c, 1e-5).unwrap();
    let (mut dxl, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
    be.layernorm_backward(&mut dxl, &mut dw, &mut db, &dx, &x, &w, &mean, &rstd, n, c).unwrap();
    outputs.extend([y, dxl, dw, db].concat());
    let (mut res, mut y2) = (vec![0.0; n * c], vec![0.0; n * c]);
    be.residual_layernorm_forward(&mut res, &mut y2, &mut mean, &mut rstd, &x, &dx, &w, &b, n, c, 1e-5).unwrap();
    outputs.extend([res, y2, mean.clone(), rstd.clone()].concat());

    for layout in LAYOUTS {
        let wm = randn(&mut r, c * v, 0.1);
        let bias = randn(&mut r, v, 0.1);
        let mut out = vec![0.0; n * v];
        be.matmul_forward(&mut out, &x, &wm, Some(&bias), n, c, v, layout).unwrap();
        let dout = randn(&mut r, n * v, 1.0);
        let (mut dinp, mut dwm, mut dbias) = (vec![0.0; n * c], vec![0.0; c * v], vec![0.0; v]);
        be.matmul_backward(&mut dinp, &mut dwm, Some(&mut dbias), &dout, &x, &wm, n, c, v, layout).unwrap();
        outputs.extend([out, dinp, dwm, dbias].concat());
    }

    let qkv = randn(&mut r, n * 3 * c, 1.0);
    let (mut att, mut saved) = (vec![0.0; n * c], vec![0.0; be.attention_saved_len(&pk, nh)]);
    be.attention_forward(&mut att, &mut saved, &qkv, &pk, nh, c).unwrap();
    let mut dqkv = vec![0.0; n * 3 * c];
    be.attention_backward(&mut dqkv, &dx, &qkv, &att, &saved, &pk, nh, c).unwrap();
    outputs.extend([att, saved, dqkv].concat());

    let mut logits = randn(&mut r, n * v, 2.0);
    let targets = rand_ids(&mut r, n, v);
    let (mut lp, mut lse, mut seq) = (vec![0.0; n], vec![0.0; n], vec![0.0; lens.len()]);
    be.logsoftmax_gather_forward(&mut lp, &mut lse, &logits, &targets, n, v).unwrap();
    be.sequence_logp_sum(&mut seq, &lp, &pk).unwrap();
    be.logsoftmax_gather_backward(&mut logits, &lse, &targets, &seq, &pk, n, v).unwrap();
    outputs.extend([lp, lse, seq, logits].concat());

    let norm = be.sum_squares(&[&outputs]).unwrap();
    outputs.push(norm as f32);
    outputs.push((norm - norm as f32 as f64) as f32);
    outputs
}

#[test]
fn every_op_is_deterministic_and_independent_of_thread_count() {
    let be = backend();
    let first = run_all_ops(&be, 18);
    let second = run_all_ops(&be, 18);
    assert_bitwise_eq("two runs", &first, &second);
    let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let serial = one_thread.install(|| run_all_ops(&be, 18));
    assert_bitwise_eq("1 thread vs the global pool", &serial, &first);
    let three_threads = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let three = three_threads.install(|| run_all_ops(&be, 18));
    assert_bitwise_eq("3 threads vs the global pool", &three, &first);
}

#[test]
fn name_reports_threads() {
    assert!(backend().name().starts_with("cpu ("), "{}", backend().name());
}
