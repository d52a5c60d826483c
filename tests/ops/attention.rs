//! Causal attention over packed sequences: against the spec and its finite differences, and
//! sequences independent of what they are packed with; the CUDA backend against the CPU.

use safedpo::backend::cpu::attention::spec;
use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::cuda::{Device, Precision};
use safedpo::backend::prelude::*;

use crate::common::*;
use crate::device::{Fixture, ATTENTION_DQKV_FLOOR};
use crate::{backend, packing, FD_STEP, GRAD_RTOL};

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
        let (want_out, want_p) = spec::forward(&to_f64(&qkv), lens, nh, c);
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
        let want = fd_grad_at(|x| weighted_sum(&dy, &spec::forward(x, lens, nh, c).0), &to_f64(&qkv), FD_STEP, &idx);
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

// ---- the CUDA backend against the CPU (see `device`) -----------------------------------------------------

fn attention(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 3);
    // (lengths, n_head, c). The kernels tile 64 rows for head dims ≤ 64 and 32 rows for ≤ 128.
    let cases: [(&[usize], usize, usize); 3] = [
        // hd = 8 (zero-padded to 64): lengths 1 and 0, shorter and longer than a warp, one tile.
        (&[1, 7, 33, 0, 5, 32], 3, 24),
        // hd = 64: tile boundaries 63/64/65, three tiles (130), a single token after them.
        (&[63, 64, 65, 130, 1], 2, 128),
        // hd = 72 (the 128 bound, 32-row tiles, padded channels): 1, 0, 33, 65 = 2 tiles + 1.
        (&[33, 1, 0, 65, 32], 1, 72),
    ];
    for (lens, nh, c) in cases {
        let what = format!("lens {lens:?}, n_head {nh}, c {c}");
        let n: usize = lens.iter().sum();
        let (cpu_packing, cuda_packing) = f.packing(lens);
        let qkv = f.randn(n * 3 * c, 1.0);
        let (cq, gq) = f.both(&qkv);
        let (mut want, mut got) = f.poisoned(n * c);
        let mut want_saved = f.cpu.zeros(f.cpu.attention_saved_len(&cpu_packing, nh)).unwrap();
        let mut got_saved = f.cuda.upload(&poison(f.cuda.attention_saved_len(&cuda_packing, nh))).unwrap();
        f.cpu.attention_forward(&mut want, &mut want_saved, &cq, &cpu_packing, nh, c).unwrap();
        f.cuda.attention_forward(&mut got, &mut got_saved, &gq, &cuda_packing, nh, c).unwrap();
        f.check(&format!("attention_forward out ({what})"), &got, &want);

        let dout = f.randn(n * c, 1.0);
        let (cd, gd) = f.both(&dout);
        let (mut want_dqkv, mut got_dqkv) = f.poisoned(n * 3 * c);
        f.cpu.attention_backward(&mut want_dqkv, &cd, &cq, &want, &want_saved, &cpu_packing, nh, c).unwrap();
        f.cuda.attention_backward(&mut got_dqkv, &gd, &gq, &got, &got_saved, &cuda_packing, nh, c).unwrap();
        // The CUDA backward forms `D = dout·out` from the output as stored (rounded to bf16), the
        // CPU's as `Σ_j P·dP` in f32: `dS = P(dout·v − D)` moves by an amount set by |dout|·|out|,
        // not by the result, and the sums over keys keep it as an absolute error (up to 2.4e-3 of
        // the largest entry in these cases).
        let what = format!("attention_backward dqkv ({what})");
        f.check_rounded(&what, &got_dqkv, &want_dqkv, 1.0, ATTENTION_DQKV_FLOOR);
    }
}

device_tests!(attention);
