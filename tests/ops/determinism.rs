//! Every op with a reduction, run twice and on 1, 3 and the global pool's threads: the same bits; on
//! the CUDA backend, the backward ops run twice.

use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::cuda::{Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::QkvLayout;

use crate::common::*;
use crate::device::Fixture;
use crate::matmul::LAYOUTS;
use crate::{backend, packing};

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
    be.embedding_backward(&mut dwte, Some(&mut dwpe), &dx, &tokens, &positions, n, c).unwrap();
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

    // Multi-head, then grouped-query (the backward sums a key/value head's gradient over 2 heads).
    for layout in [QkvLayout::mha(nh, c), QkvLayout { n_kv_head: nh / 2, ..QkvLayout::mha(nh, c) }] {
        let qkv = randn(&mut r, n * layout.width(), 1.0);
        let (mut att, mut saved) = (vec![0.0; n * c], vec![0.0; be.attention_saved_len(&pk, nh)]);
        be.attention_forward(&mut att, &mut saved, &qkv, &pk, layout, None).unwrap();
        let mut dqkv = vec![0.0; n * layout.width()];
        be.attention_backward(&mut dqkv, &dx, &qkv, &att, &saved, &pk, layout, None).unwrap();
        outputs.extend([att, saved, dqkv].concat());
    }

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

// ---- the CUDA backend against the CPU (see `device`) -----------------------------------------------------

/// Backward ops run twice on the same inputs give bit-identical results.
fn determinism(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 9);
    let (n, c, vocab) = (45, 36, 11);
    let tokens = rand_ids(&mut f.rng, n, vocab);
    let ids = f.cuda.upload_ids(&tokens).unwrap();
    let dout = f.fresh(n * c, 1.0).1;
    let inp = f.fresh(n * c, 1.0).1;
    let w = f.fresh(c, 1.0).1;
    let run = || {
        let mut dwte = f.cuda.zeros(vocab * c).unwrap();
        let mut dwpe = f.cuda.zeros(vocab * c).unwrap();
        f.cuda.embedding_backward(&mut dwte, Some(&mut dwpe), &dout, &ids, &ids, n, c).unwrap();
        let (mut mean, mut rstd, mut out) =
            (f.cuda.zeros(n).unwrap(), f.cuda.zeros(n).unwrap(), f.cuda.zeros(n * c).unwrap());
        f.cuda.layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &w, n, c, 1e-5).unwrap();
        let (mut dinp, mut dw, mut db) =
            (f.cuda.zeros(n * c).unwrap(), f.cuda.zeros(c).unwrap(), f.cuda.zeros(c).unwrap());
        f.cuda.layernorm_backward(&mut dinp, &mut dw, &mut db, &dout, &inp, &w, &mean, &rstd, n, c).unwrap();
        [dwte, dinp, dw, db].map(|b| f.cuda.download(&b).unwrap())
    };
    let (first, second) = (run(), run());
    for (k, (a, b)) in first.iter().zip(&second).enumerate() {
        assert_bitwise_eq(&format!("backward output {k} ({precision})"), a, b);
    }
}

device_tests!(determinism);
