//! Decode attention (one query per sequence against its cached rows): the CPU against the spec, and
//! the CUDA backend against the CPU, over ragged spans (empty, one row, odd lengths, more than one
//! split of the kernels), multi-head and grouped-query.

use safedpo::backend::cpu::decode_attention::spec;
use safedpo::backend::cuda::{Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::{DecodeSpans, QkvLayout};

use crate::common::*;
use crate::device::Fixture;
use crate::{backend, FWD_RTOL};

fn layouts() -> [QkvLayout; 3] {
    [
        QkvLayout { n_head: 2, n_kv_head: 2, head_dim: 8 },
        QkvLayout { n_head: 4, n_kv_head: 2, head_dim: 5 },
        QkvLayout { n_head: 6, n_kv_head: 1, head_dim: 64 },
    ]
}

/// Spans over a cache of `stride` rows per sequence, sequence `s` at row `s · stride`.
const LENS: [i32; 7] = [0, 1, 7, 2, 130, 257, 33];
const STRIDE: usize = 260;

fn starts() -> Vec<i32> {
    (0..LENS.len()).map(|s| (s * STRIDE) as i32).collect()
}

#[test]
fn decode_attention_forward_matches_spec() {
    let be = backend();
    let mut r = rng(301);
    for layout in layouts() {
        let (m, width) = (LENS.len(), layout.width());
        let qkv = randn(&mut r, m * width, 1.0);
        let cache = randn(&mut r, m * STRIDE * width, 1.0);
        let spans = DecodeSpans::new(&be, &starts(), &LENS).unwrap();
        let mut out = poison(m * layout.q_width());
        be.decode_attention_forward(&mut out, &qkv, &cache, &spans, layout).unwrap();
        let want = spec::forward(&to_f64(&qkv), &to_f64(&cache), &starts(), &LENS, layout);
        assert_close(&format!("decode attention {layout:?}"), &out, &want, FWD_RTOL, 1e-6);
        // An empty span gives zeros.
        assert!(out[..layout.q_width()].iter().all(|&x| x == 0.0));
    }
}

#[test]
fn decode_attention_refuses_spans_outside_the_cache() {
    let be = backend();
    let layout = layouts()[1];
    let width = layout.width();
    let (qkv, cache) = (vec![0.0; 2 * width], vec![0.0; 10 * width]);
    let mut out = poison(2 * layout.q_width());
    let spans = DecodeSpans::new(&be, &[0, 5], &[3, 6]).unwrap();
    let err = be.decode_attention_forward(&mut out, &qkv, &cache, &spans, layout).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("decode_attention_forward") && msg.contains("query 1"), "{msg}");
    let spans = DecodeSpans::new(&be, &[0, 5], &[3, 5]).unwrap();
    let err = be.decode_attention_forward(&mut out, &qkv[..width].to_vec(), &cache, &spans, layout).unwrap_err();
    assert!(format!("{err:#}").contains("`qkv`"), "{err:#}");
}

// ---- the CUDA backend against the CPU (see `device`) -----------------------------------------------------

fn decode_attention(device: &Device, precision: Precision) {
    for (seed, layout) in layouts().into_iter().enumerate() {
        let mut fx = Fixture::new(device, precision, 310 + seed as u64);
        let (m, width) = (LENS.len(), layout.width());
        let (cq, gq) = fx.fresh(m * width, 1.0);
        let (cc, gc) = fx.fresh(m * STRIDE * width, 1.0);
        let cpu_spans = DecodeSpans::new(&fx.cpu, &starts(), &LENS).unwrap();
        let cuda_spans = DecodeSpans::new(&fx.cuda, &starts(), &LENS).unwrap();
        let (mut want, mut got) = fx.poisoned(m * layout.q_width());
        fx.cpu.decode_attention_forward(&mut want, &cq, &cc, &cpu_spans, layout).unwrap();
        fx.cuda.decode_attention_forward(&mut got, &gq, &gc, &cuda_spans, layout).unwrap();
        fx.check(&format!("decode_attention_forward {layout:?}"), &got, &want);
    }
}

device_tests!(decode_attention);
