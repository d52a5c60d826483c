//! Token and position embeddings: forward against the spec, backward against its finite differences;
//! the CUDA backend against the CPU, and its argument errors.

use safedpo::backend::cpu::embedding::spec;
use safedpo::backend::cuda::{Device, Precision};
use safedpo::backend::prelude::*;

use crate::common::*;
use crate::device::{Fixture, ACCUMULATED_FLOOR};
use crate::{accumulated, backend};

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
    be.embedding_forward(&mut out, &tokens, &positions, &wte, Some(&wpe), n, c).unwrap();
    // a + b rounds the same in f32 and f64→f32, so the comparison is exact.
    let want = spec::forward(&tokens, &positions, &to_f64(&wte), Some(&to_f64(&wpe)), c);
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
    let want_dwte = fd_grad(
        |x| weighted_sum(&w, &spec::forward(&tokens, &positions, x, Some(&to_f64(&wpe)), c)),
        &to_f64(&wte),
        1e-3,
    );
    let want_dwpe = fd_grad(
        |x| weighted_sum(&w, &spec::forward(&tokens, &positions, &to_f64(&wte), Some(x), c)),
        &to_f64(&wpe),
        1e-3,
    );
    let (prior_te, prior_pe) = (randn(&mut r, vocab * c, 1.0), randn(&mut r, max_pos * c, 1.0));
    let (mut dwte, mut dwpe) = (prior_te.clone(), prior_pe.clone());
    for k in 1..=2 {
        be.embedding_backward(&mut dwte, Some(&mut dwpe), &dout, &tokens, &positions, n, c).unwrap();
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

/// Without a position table: each row is its token's embedding, bit for bit; the backward adds
/// into the token table only, and positions beyond any table are not looked at.
#[test]
fn embedding_without_positions_is_the_token_rows() {
    let be = backend();
    let mut r = rng(3);
    let (n, c, vocab) = (23, 10, 9);
    let tokens = rand_ids(&mut r, n, vocab);
    let positions = vec![1000; n];
    let wte = randn(&mut r, vocab * c, 1.0);
    let mut out = poison(n * c);
    be.embedding_forward(&mut out, &tokens, &positions, &wte, None, n, c).unwrap();
    let want = spec::forward(&tokens, &positions, &to_f64(&wte), None, c);
    assert_close("embedding out", &out, &want, 0.0, 0.0);
    let dout = randn(&mut r, n * c, 1.0);
    let want_dwte =
        fd_grad(|x| weighted_sum(&to_f64(&dout), &spec::forward(&tokens, &positions, x, None, c)), &to_f64(&wte), 1e-3);
    let mut dwte = vec![0.0; vocab * c];
    be.embedding_backward(&mut dwte, None, &dout, &tokens, &positions, n, c).unwrap();
    assert_close_scaled("dwte", &dwte, &want_dwte, 1e-5);
}

#[test]
fn embedding_rejects_out_of_range_ids() {
    let be = backend();
    let (n, c) = (3, 2);
    let mut out = poison(n * c);
    let err = be.embedding_forward(&mut out, &vec![0, 4, 1], &vec![0, 1, 2], &vec![0.0; 8], Some(&vec![0.0; 6]), n, c);
    let msg = format!("{:#}", err.unwrap_err());
    assert!(msg.contains("embedding_forward") && msg.contains("tokens[1]") && msg.contains('4'), "{msg}");
}

// ---- the CUDA backend against the CPU (see `device`) -----------------------------------------------------

fn embedding(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 1);
    let (n, c, vocab, ctx) = (37, 40, 23, 13);
    let tokens = rand_ids(&mut f.rng, n, vocab);
    let positions = rand_ids(&mut f.rng, n, ctx);
    let (wte, wpe) = (f.randn(vocab * c, 1.0), f.randn(ctx * c, 1.0));
    let (cpu_tok, cuda_tok) = (f.cpu.upload_ids(&tokens).unwrap(), f.cuda.upload_ids(&tokens).unwrap());
    let (cpu_pos, cuda_pos) = (f.cpu.upload_ids(&positions).unwrap(), f.cuda.upload_ids(&positions).unwrap());
    let ((cw, gw), (cp, gp)) = (f.both(&wte), f.both(&wpe));

    let (mut want, mut got) = f.poisoned(n * c);
    f.cpu.embedding_forward(&mut want, &cpu_tok, &cpu_pos, &cw, Some(&cp), n, c).unwrap();
    f.cuda.embedding_forward(&mut got, &cuda_tok, &cuda_pos, &gw, Some(&gp), n, c).unwrap();
    f.check("embedding_forward out", &got, &want);

    let dout = f.randn(n * c, 1.0);
    let (cd, gd) = f.both(&dout);
    let (mut want_wte, mut got_wte) = f.fresh(vocab * c, 1.0);
    let (mut want_wpe, mut got_wpe) = f.fresh(ctx * c, 1.0);
    for _ in 0..2 {
        f.cpu.embedding_backward(&mut want_wte, Some(&mut want_wpe), &cd, &cpu_tok, &cpu_pos, n, c).unwrap();
        f.cuda.embedding_backward(&mut got_wte, Some(&mut got_wpe), &gd, &cuda_tok, &cuda_pos, n, c).unwrap();
    }
    // Two accumulations onto a prior, each rounded: rows where the prior and the gradients cancel
    // keep the roundings of the larger partial sums.
    f.check_rounded("embedding_backward dwte", &got_wte, &want_wte, 2.0, ACCUMULATED_FLOOR);
    f.check_rounded("embedding_backward dwpe", &got_wpe, &want_wpe, 2.0, ACCUMULATED_FLOOR);

    // Without a position table (RoPE models): the token rows exactly, and only dwte accumulates.
    let (mut want, mut got) = f.poisoned(n * c);
    f.cpu.embedding_forward(&mut want, &cpu_tok, &cpu_pos, &cw, None, n, c).unwrap();
    f.cuda.embedding_forward(&mut got, &cuda_tok, &cuda_pos, &gw, None, n, c).unwrap();
    f.check("embedding_forward out, no positions", &got, &want);
    let (mut want_wte, mut got_wte) = f.fresh(vocab * c, 1.0);
    f.cpu.embedding_backward(&mut want_wte, None, &cd, &cpu_tok, &cpu_pos, n, c).unwrap();
    f.cuda.embedding_backward(&mut got_wte, None, &gd, &cuda_tok, &cuda_pos, n, c).unwrap();
    f.check_rounded("embedding_backward dwte, no positions", &got_wte, &want_wte, 1.0, ACCUMULATED_FLOOR);
}

/// Errors name the op and the tensor; nothing is launched on bad input.
fn errors(device: &Device, precision: Precision) {
    let f = Fixture::new(device, precision, 10);
    let mut out = f.cuda.zeros(10).unwrap();
    let ids = f.cuda.upload_ids(&[0, 7]).unwrap();
    let table = f.cuda.zeros(5 * 4).unwrap();
    let err = f.cuda.embedding_forward(&mut out, &ids, &ids, &table, Some(&table), 2, 5).unwrap_err().to_string();
    assert!(err.contains("embedding_forward") && err.contains("out"), "{err}");
    let mut out = f.cuda.zeros(8).unwrap();
    let err = f.cuda.embedding_forward(&mut out, &ids, &ids, &table, Some(&table), 2, 4).unwrap_err().to_string();
    assert!(err.contains("tokens[1]") && err.contains("7"), "{err}");
}

device_tests!(embedding, errors);
