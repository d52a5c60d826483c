//! Token and position embeddings: forward against the spec, backward against its finite differences.

use safedpo::backend::cpu::embedding::spec;
use safedpo::backend::prelude::*;

use crate::common::*;
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
    be.embedding_forward(&mut out, &tokens, &positions, &wte, &wpe, n, c).unwrap();
    // a + b rounds the same in f32 and f64→f32, so the comparison is exact.
    let want = spec::forward(&tokens, &positions, &to_f64(&wte), &to_f64(&wpe), c);
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
        fd_grad(|x| weighted_sum(&w, &spec::forward(&tokens, &positions, x, &to_f64(&wpe), c)), &to_f64(&wte), 1e-3);
    let want_dwpe =
        fd_grad(|x| weighted_sum(&w, &spec::forward(&tokens, &positions, &to_f64(&wte), x, c)), &to_f64(&wpe), 1e-3);
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
