//! Decode attention (one query per sequence against its cached rows): the CPU against the spec, and
//! the CUDA backend against the CPU, over ragged spans (empty, one row, odd lengths, more than one
//! split of the kernels), multi-head and grouped-query, with and without a sliding window (of one
//! row, shorter than most spans, across a split, longer than every span).

use safedpo::backend::cpu::decode_attention::spec;
use safedpo::backend::cuda::{Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::{DecodeSpans, QkvLayout, Window};

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

/// No window, one row, a few rows, a split and then some, longer than every span.
const WINDOWS: [Window; 5] = [None, Some(1), Some(5), Some(129), Some(1000)];

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
        for window in WINDOWS {
            let mut out = poison(m * layout.q_width());
            be.decode_attention_forward(&mut out, &qkv, &cache, &spans, layout, window).unwrap();
            let want = spec::forward(&to_f64(&qkv), &to_f64(&cache), &starts(), &LENS, layout, window);
            assert_close(&format!("decode attention {layout:?}, window {window:?}"), &out, &want, FWD_RTOL, 1e-6);
            // An empty span gives zeros.
            assert!(out[..layout.q_width()].iter().all(|&x| x == 0.0));
        }
    }
}

/// A window is each span's last rows: the same as the span cut to them, and the rows before it
/// are never read (NaN there changes nothing).
#[test]
fn decode_attention_window_reads_only_the_last_rows() {
    let be = backend();
    let mut r = rng(302);
    let layout = layouts()[1];
    let (m, width, window) = (LENS.len(), layout.width(), 6usize);
    let qkv = randn(&mut r, m * width, 1.0);
    let mut cache = randn(&mut r, m * STRIDE * width, 1.0);
    let (mut cut_starts, mut cut_lens) = (starts(), LENS.to_vec());
    for (s, (start, len)) in cut_starts.iter_mut().zip(&mut cut_lens).enumerate() {
        let skipped = (*len as usize).saturating_sub(window);
        cache[s * STRIDE * width..][..skipped * width].fill(f32::NAN);
        (*start, *len) = (*start + skipped as i32, *len - skipped as i32);
    }
    let run = |starts: &[i32], lens: &[i32], window: Window| {
        let spans = DecodeSpans::new(&be, starts, lens).unwrap();
        let mut out = poison(m * layout.q_width());
        be.decode_attention_forward(&mut out, &qkv, &cache, &spans, layout, window).unwrap();
        out
    };
    let windowed = run(&starts(), &LENS, Some(window));
    assert!(windowed.iter().all(|x| x.is_finite()), "a row before the window was read");
    assert_bitwise_eq("window vs the cut spans", &windowed, &run(&cut_starts, &cut_lens, None));
    let spans = DecodeSpans::new(&be, &starts(), &LENS).unwrap();
    let mut out = poison(m * layout.q_width());
    let err = be.decode_attention_forward(&mut out, &qkv, &cache, &spans, layout, Some(0)).unwrap_err();
    assert!(format!("{err:#}").contains("window of 0"), "{err:#}");
}

#[test]
fn decode_attention_refuses_spans_outside_the_cache() {
    let be = backend();
    let layout = layouts()[1];
    let width = layout.width();
    let (qkv, cache) = (vec![0.0; 2 * width], vec![0.0; 10 * width]);
    let mut out = poison(2 * layout.q_width());
    let spans = DecodeSpans::new(&be, &[0, 5], &[3, 6]).unwrap();
    let err = be.decode_attention_forward(&mut out, &qkv, &cache, &spans, layout, None).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("decode_attention_forward") && msg.contains("query 1"), "{msg}");
    let spans = DecodeSpans::new(&be, &[0, 5], &[3, 5]).unwrap();
    let err = be.decode_attention_forward(&mut out, &qkv[..width].to_vec(), &cache, &spans, layout, None).unwrap_err();
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
        for window in WINDOWS {
            let (mut want, mut got) = fx.poisoned(m * layout.q_width());
            fx.cpu.decode_attention_forward(&mut want, &cq, &cc, &cpu_spans, layout, window).unwrap();
            fx.cuda.decode_attention_forward(&mut got, &gq, &gc, &cuda_spans, layout, window).unwrap();
            fx.check(&format!("decode_attention_forward {layout:?}, window {window:?}"), &got, &want);
        }
    }
}

device_tests!(decode_attention);
