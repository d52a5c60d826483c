//! The fused log-softmax-gather and the per-sequence sum: against the spec and its finite
//! differences, on ordinary rows, rows near 1e4 and a large vocabulary; the CUDA backend against the
//! CPU.

use rand::Rng;
use safedpo::backend::cpu::logsoftmax_gather::spec;
use safedpo::backend::cuda::{Device, Precision};
use safedpo::backend::prelude::*;

use crate::common::*;
use crate::device::Fixture;
use crate::{backend, packing};

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
    let (want_lp, want_lse) = spec::forward(&to_f64(&logits), &targets, v);
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
    assert_close("seq_logp", &seq, &spec::sequence_sums(&to_f64(&lp), &lens), 1e-6, 0.0);
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
    let (want_lp, want_lse) = spec::forward(&to_f64(&logits), &targets, v);
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
    let loss = |x: &[f64]| weighted_sum(&w, &spec::sequence_sums(&spec::forward(x, &targets, v).0, &lens));
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

// ---- the CUDA backend against the CPU (see `device`) -----------------------------------------------------

fn logsoftmax_gather(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 5);
    // v not a multiple of the block; rows with and without targets; a sequence of length 1
    let (lens, v) = ([1usize, 10, 18], 300);
    let n: usize = lens.iter().sum();
    let (cpu_packing, cuda_packing) = f.packing(&lens);
    let logits: Vec<f32> = f.randn(n * v, 3.0).iter().map(|x| x + 20.0).collect(); // large logits
    let logits = f.stored(logits);
    let targets: Vec<i32> = (0..n).map(|t| if t % 4 == 3 { -1 } else { f.rng.random_range(0..v as i32) }).collect();
    let (ct, gt) = (f.cpu.upload_ids(&targets).unwrap(), f.cuda.upload_ids(&targets).unwrap());
    let (mut cl, mut gl) = f.both(&logits);

    let (mut want_logp, mut got_logp) = f.poisoned(n);
    let (mut want_lse, mut got_lse) = f.poisoned(n);
    f.cpu.logsoftmax_gather_forward(&mut want_logp, &mut want_lse, &cl, &ct, n, v).unwrap();
    f.cuda.logsoftmax_gather_forward(&mut got_logp, &mut got_lse, &gl, &gt, n, v).unwrap();
    // f32 outputs in both modes, from the same stored logits
    f.check_at("logsoftmax_gather_forward token_logp", &got_logp, &want_logp, 1e-5);
    f.check_at("logsoftmax_gather_forward lse", &got_lse, &want_lse, 1e-5);

    let (mut want_seq, mut got_seq) = f.poisoned(lens.len());
    f.cpu.sequence_logp_sum(&mut want_seq, &want_logp, &cpu_packing).unwrap();
    f.cuda.sequence_logp_sum(&mut got_seq, &got_logp, &cuda_packing).unwrap();
    f.check_at("sequence_logp_sum", &got_seq, &want_seq, 1e-5);

    let dseq = randn(&mut f.rng, lens.len(), 1.0);
    let (cd, gd) = f.both(&dseq);
    f.cpu.logsoftmax_gather_backward(&mut cl, &want_lse, &ct, &cd, &cpu_packing, n, v).unwrap();
    f.cuda.logsoftmax_gather_backward(&mut gl, &got_lse, &gt, &gd, &cuda_packing, n, v).unwrap();
    f.check("logsoftmax_gather_backward dlogits", &gl, &cl);
}

device_tests!(logsoftmax_gather);
