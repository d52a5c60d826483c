//! Causal attention over packed sequences, multi-head and grouped-query, with and without a sliding
//! window: against the spec and its finite differences, and sequences independent of what they are
//! packed with; the CUDA backend against the CPU.

use safedpo::backend::cpu::attention::spec;
use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::cuda::{AttentionKernels, CudaBackend, Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::{QkvLayout, Window};

use crate::common::*;
use crate::device::{Fixture, ATTENTION_DQKV_FLOOR, BF16_NOISE_FLOOR};
use crate::{backend, packing, FD_STEP, GRAD_RTOL};

/// `(n_head, n_kv_head, head_dim)` as a layout.
fn gqa(n_head: usize, n_kv_head: usize, head_dim: usize) -> QkvLayout {
    QkvLayout { n_head, n_kv_head, head_dim }
}

/// Runs the forward on a packed batch; returns (out, saved).
fn run_attention(
    be: &CpuBackend,
    qkv: &[f32],
    lens: &[usize],
    layout: QkvLayout,
    window: Window,
) -> (Vec<f32>, Vec<f32>) {
    let pk = packing(be, lens);
    let n = pk.num_tokens();
    let nh = layout.n_head;
    let saved_len = be.attention_saved_len(&pk, nh);
    assert_eq!(saved_len, nh * lens.iter().map(|l| l * l).sum::<usize>());
    let (mut out, mut saved) = (poison(n * layout.q_width()), poison(saved_len));
    be.attention_forward(&mut out, &mut saved, &qkv.to_vec(), &pk, layout, window).unwrap();
    (out, saved)
}

/// The forward against the spec: outputs and saved probabilities.
fn check_forward(be: &CpuBackend, r: &mut rand_chacha::ChaCha8Rng, lens: &[usize], layout: QkvLayout, window: Window) {
    let n: usize = lens.iter().sum();
    let qkv = randn(r, n * layout.width(), 1.5);
    let (out, saved) = run_attention(be, &qkv, lens, layout, window);
    let (want_out, want_p) = spec::forward(&to_f64(&qkv), lens, layout, window);
    let what = format!("{lens:?} {layout:?} window {window:?}");
    assert_close_scaled(&format!("attention out {what}"), &out, &want_out, 1e-5);
    assert_close(&format!("attention probabilities {what}"), &saved, &want_p, 1e-5, 1e-7);
}

#[test]
fn attention_forward_matches_twin() {
    let be = backend();
    let mut r = rng(7);
    // Lengths of 1, below, at and above the backend's 32-row blocks, packed together.
    for &(ref lens, nh, c) in &[(vec![1usize, 5, 33, 70, 2, 32], 4, 16), (vec![1], 2, 8), (vec![64, 3], 3, 24)] {
        check_forward(&be, &mut r, lens, QkvLayout::mha(nh, c), None);
    }
}

#[test]
fn attention_forward_with_grouped_queries_matches_twin() {
    let be = backend();
    let mut r = rng(17);
    let lens = [1usize, 5, 33, 70, 2, 1];
    // One key/value head for all, 2 of 8 (groups of 4), head dims 24 and 64, and an odd one.
    for layout in [gqa(8, 1, 24), gqa(8, 2, 64), gqa(8, 2, 24), gqa(6, 3, 13)] {
        check_forward(&be, &mut r, &lens, layout, None);
    }
}

/// The backward against central differences of the spec at `probes` sampled elements of `qkv`,
/// then run again: the same bits (overwrite semantics, a fixed order of the group sums).
fn check_backward(
    be: &CpuBackend,
    r: &mut rand_chacha::ChaCha8Rng,
    lens: &[usize],
    layout: QkvLayout,
    window: Window,
    probes: usize,
) {
    let n: usize = lens.iter().sum();
    let pk = packing(be, lens);
    let qkv = randn(r, n * layout.width(), 1.0);
    let dout = randn(r, n * layout.q_width(), 1.0);
    let (out, saved) = run_attention(be, &qkv, lens, layout, window);
    let mut dqkv = poison(n * layout.width());
    be.attention_backward(&mut dqkv, &dout, &qkv, &out, &saved, &pk, layout, window).unwrap();

    let dy = to_f64(&dout);
    let idx = sample_indices(r, n * layout.width(), probes);
    let loss = |x: &[f64]| weighted_sum(&dy, &spec::forward(x, lens, layout, window).0);
    let want = fd_grad_at(loss, &to_f64(&qkv), FD_STEP, &idx);
    let got: Vec<f32> = idx.iter().map(|&i| dqkv[i]).collect();
    let what = format!("{lens:?} {layout:?} window {window:?}");
    assert_close_scaled(&format!("dqkv {what}"), &got, &want, GRAD_RTOL);
    assert!(dqkv.iter().all(|x| x.is_finite()), "dqkv {what}: an element was left unwritten");

    // Overwrite semantics: a second call gives the same values, not twice them.
    let first = dqkv.clone();
    be.attention_backward(&mut dqkv, &dout, &qkv, &out, &saved, &pk, layout, window).unwrap();
    assert_bitwise_eq("dqkv second call", &dqkv, &first);
}

#[test]
fn attention_backward_matches_finite_differences() {
    let be = backend();
    let mut r = rng(8);
    for &(ref lens, nh, c, probes) in &[(vec![3usize, 1, 4], 2, 8, usize::MAX), (vec![1, 40, 33, 70], 3, 12, 400)] {
        check_backward(&be, &mut r, lens, QkvLayout::mha(nh, c), None, probes);
    }
}

#[test]
fn attention_backward_with_grouped_queries_matches_finite_differences() {
    let be = backend();
    let mut r = rng(18);
    // Every element where the tensor is small; otherwise a sample, a third of it in k and v.
    let cases = [
        (vec![3usize, 1, 4], gqa(4, 1, 8), usize::MAX),
        (vec![1, 33, 6], gqa(8, 2, 24), 400),
        (vec![5, 1, 34], gqa(8, 1, 24), 300),
        (vec![2, 1, 9], gqa(8, 2, 64), 300),
    ];
    for (lens, layout, probes) in cases {
        check_backward(&be, &mut r, &lens, layout, None, probes);
    }
}

/// Windows of one key, shorter than the 32-row blocks, across them, and longer than every sequence
/// (`100`, which must be the unwindowed op bit for bit), forward and backward, multi-head and
/// grouped-query, on ragged lengths.
#[test]
fn attention_with_a_sliding_window_matches_twin_and_finite_differences() {
    let be = backend();
    let mut r = rng(19);
    let lens = [1usize, 5, 33, 70, 2, 0, 32];
    for layout in [QkvLayout::mha(2, 16), gqa(4, 2, 8), gqa(6, 1, 13)] {
        for window in [1, 3, 32, 33, 100] {
            check_forward(&be, &mut r, &lens, layout, Some(window));
            check_backward(&be, &mut r, &[3, 1, 0, 9], layout, Some(window), usize::MAX);
            check_backward(&be, &mut r, &lens, layout, Some(window), 300);
        }
        let n: usize = lens.iter().sum();
        let (qkv, dout) = (randn(&mut r, n * layout.width(), 1.0), randn(&mut r, n * layout.q_width(), 1.0));
        let pk = packing(&be, &lens);
        let run = |window: Window| {
            let (out, saved) = run_attention(&be, &qkv, &lens, layout, window);
            let mut dqkv = poison(n * layout.width());
            be.attention_backward(&mut dqkv, &dout, &qkv, &out, &saved, &pk, layout, window).unwrap();
            [out, saved, dqkv]
        };
        let (full, wide) = (run(None), run(Some(70)));
        for (name, (a, b)) in ["out", "saved", "dqkv"].iter().zip(full.iter().zip(&wide)) {
            assert_bitwise_eq(&format!("{name}: a window as long as the longest sequence vs none"), b, a);
        }
    }
    let pk = packing(&be, &lens);
    let layout = gqa(4, 2, 8);
    let n: usize = lens.iter().sum();
    let (mut out, mut saved) = (vec![0.0; n * layout.q_width()], vec![0.0; be.attention_saved_len(&pk, 4)]);
    let err = be.attention_forward(&mut out, &mut saved, &vec![0.0; n * layout.width()], &pk, layout, Some(0));
    assert!(format!("{:#}", err.unwrap_err()).contains("window of 0"));
}

#[test]
fn attention_sequences_are_independent() {
    let be = backend();
    let mut r = rng(9);
    for layout in [QkvLayout::mha(2, 16), gqa(4, 2, 8)] {
        let (width, q_width) = (layout.width(), layout.q_width());
        let (la, lb, lc) = (45, 7, 1);
        let qkv_a = randn(&mut r, la * width, 1.0);
        let dout_a = randn(&mut r, la * q_width, 1.0);
        let (qkv_b, qkv_c) = (randn(&mut r, lb * width, 1.0), randn(&mut r, lc * width, 1.0));
        let (dout_b, dout_c) = (randn(&mut r, lb * q_width, 1.0), randn(&mut r, lc * q_width, 1.0));
        let qkv_packed = [qkv_b.clone(), qkv_a.clone(), qkv_c].concat();
        let dout_packed = [dout_b, dout_a.clone(), dout_c].concat();

        let backward = |qkv: &[f32], dout: &[f32], lens: &[usize]| {
            let pk = packing(&be, lens);
            let (out, saved) = run_attention(&be, qkv, lens, layout, None);
            let mut dqkv = poison(qkv.len());
            be.attention_backward(&mut dqkv, &dout.to_vec(), &qkv.to_vec(), &out, &saved, &pk, layout, None).unwrap();
            (out, dqkv)
        };
        let (out_alone, dqkv_alone) = backward(&qkv_a, &dout_a, &[la]);
        let (out_packed, dqkv_packed) = backward(&qkv_packed, &dout_packed, &[lb, la, lc]);
        let what = format!("{layout:?}");
        assert_bitwise_eq(
            &format!("out of A packed vs alone, {what}"),
            &out_packed[lb * q_width..][..la * q_width],
            &out_alone,
        );
        assert_bitwise_eq(
            &format!("dqkv of A packed vs alone, {what}"),
            &dqkv_packed[lb * width..][..la * width],
            &dqkv_alone,
        );
    }
}

#[test]
fn attention_checks_its_arguments() {
    let be = backend();
    let lens = [3usize, 2];
    let pk = packing(&be, &lens);
    let good = gqa(4, 2, 6);
    let n = 5;
    let saved_len = be.attention_saved_len(&pk, good.n_head);
    let (mut out, mut saved, qkv) = (vec![0.0; n * good.q_width()], vec![0.0; saved_len], vec![0.0; n * good.width()]);
    let mut fails = |layout: QkvLayout, qkv: &Vec<f32>, fragments: &[&str]| {
        let msg = format!("{:#}", be.attention_forward(&mut out, &mut saved, qkv, &pk, layout, None).unwrap_err());
        assert!(msg.contains("attention_forward") && fragments.iter().all(|f| msg.contains(f)), "{msg}");
    };
    fails(gqa(4, 3, 6), &qkv, &["n_head = 4", "n_kv_head = 3"]);
    fails(gqa(4, 0, 6), &qkv, &["n_head = 4", "n_kv_head = 0"]);
    fails(gqa(4, 2, 0), &qkv, &["head_dim = 0"]);
    fails(good, &vec![0.0; n * good.width() - 1], &["`qkv`", "239", "240"]);
    // `qkv` as wide as with 4 key/value heads: a multi-head row is not a grouped one.
    fails(good, &vec![0.0; n * QkvLayout::mha(4, 24).width()], &["`qkv`", "360", "240"]);
    let mut dqkv = vec![0.0; n * good.width()];
    let msg = format!(
        "{:#}",
        be.attention_backward(&mut dqkv, &vec![0.0; n * good.width()], &qkv, &out, &saved, &pk, good, None)
            .unwrap_err()
    );
    assert!(
        msg.contains("attention_backward") && msg.contains("`dout`") && msg.contains("240") && msg.contains("120"),
        "{msg}"
    );
}

// ---- the CUDA backend against the CPU (see `device`) -----------------------------------------------------

/// Forward and backward of `layout` on `lens`, the CUDA backend against the CPU, outputs poisoned
/// first; the backward run twice on the device must give the same bits.
fn check_on_device(f: &mut Fixture, lens: &[usize], layout: QkvLayout, window: Window) {
    let nh = layout.n_head;
    let what = format!("lens {lens:?}, {layout:?}, window {window:?}");
    let n: usize = lens.iter().sum();
    let (cpu_packing, cuda_packing) = f.packing(lens);
    let qkv = f.randn(n * layout.width(), 1.0);
    let (cq, gq) = f.both(&qkv);
    let (mut want, mut got) = f.poisoned(n * layout.q_width());
    let mut want_saved = f.cpu.zeros(f.cpu.attention_saved_len(&cpu_packing, nh)).unwrap();
    let mut got_saved = f.cuda.upload(&poison(f.cuda.attention_saved_len(&cuda_packing, nh))).unwrap();
    f.cpu.attention_forward(&mut want, &mut want_saved, &cq, &cpu_packing, layout, window).unwrap();
    f.cuda.attention_forward(&mut got, &mut got_saved, &gq, &cuda_packing, layout, window).unwrap();
    // On tensor cores (bf16 at head dims 64, 128) P is rounded to bf16 before P·V.
    let out_floor = if on_tensor_cores(f.precision, layout) { TENSOR_CORE_FLOOR } else { BF16_NOISE_FLOOR };
    f.check_rounded(&format!("attention_forward out ({what})"), &got, &want, 1.0, out_floor);

    let dout = f.randn(n * layout.q_width(), 1.0);
    let (cd, gd) = f.both(&dout);
    let (mut want_dqkv, mut got_dqkv) = f.poisoned(n * layout.width());
    f.cpu.attention_backward(&mut want_dqkv, &cd, &cq, &want, &want_saved, &cpu_packing, layout, window).unwrap();
    f.cuda.attention_backward(&mut got_dqkv, &gd, &gq, &got, &got_saved, &cuda_packing, layout, window).unwrap();
    // The CUDA backward forms `D = dout·out` from the output as stored (rounded to bf16), the
    // CPU's as `Σ_j P·dP` in f32: `dS = P(dout·v − D)` moves by an amount set by |dout|·|out|,
    // not by the result, and the sums over keys keep it as an absolute error (up to 2.4e-3 of
    // the largest entry in these cases).
    f.check_rounded(&format!("attention_backward dqkv ({what})"), &got_dqkv, &want_dqkv, 1.0, ATTENTION_DQKV_FLOOR);

    let first = f.cuda.download(&got_dqkv).unwrap();
    f.cuda.attention_backward(&mut got_dqkv, &gd, &gq, &got, &got_saved, &cuda_packing, layout, window).unwrap();
    assert_bitwise_eq(
        &format!("attention_backward dqkv, second run ({what})"),
        &f.cuda.download(&got_dqkv).unwrap(),
        &first,
    );
}

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
        check_on_device(&mut f, lens, QkvLayout::mha(nh, c), None);
    }
}

fn attention_grouped_queries(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 13);
    let cases: [(&[usize], QkvLayout); 4] = [
        // One key/value head for 8 query heads, hd = 24 (the 64 bound): lengths 1 and 0, one tile.
        (&[1, 7, 33, 0, 5], gqa(8, 1, 24)),
        // 2 of 8, hd = 64: a tile boundary (65 = 64 + 1), a single token.
        (&[65, 1, 12], gqa(8, 2, 64)),
        // hd = 80 (the 128 bound, 32-row tiles): two tiles and one row past them.
        (&[33, 1, 0, 40], gqa(4, 2, 80)),
        // hd = 128, the largest head dim, one key/value head.
        (&[1, 34], gqa(2, 1, 128)),
    ];
    for (lens, layout) in cases {
        check_on_device(&mut f, lens, layout, None);
    }
    // A head dim past the kernels' largest bound is refused before anything runs.
    let layout = gqa(2, 1, 136);
    let (_, cuda_packing) = f.packing(&[3]);
    let (_, mut out) = f.poisoned(3 * layout.q_width());
    let mut saved = f.cuda.zeros(f.cuda.attention_saved_len(&cuda_packing, 2)).unwrap();
    let qkv = f.cuda.zeros(3 * layout.width()).unwrap();
    let msg =
        format!("{:#}", f.cuda.attention_forward(&mut out, &mut saved, &qkv, &cuda_packing, layout, None).unwrap_err());
    assert!(msg.contains("attention_forward") && msg.contains("head_dim = 136") && msg.contains("128"), "{msg}");
}

/// Sliding windows on the device against the CPU: one key, shorter than a tile, a tile and one
/// more, longer than every sequence; ragged lengths across the tiles (0, 1, 17, 63, 64, 65, 130);
/// the portable kernels (hd 8 and 72: the 64- and 128-channel bounds) and, in bf16, the tensor-core
/// ones (hd 64 and 128), multi-head and grouped-query.
fn attention_sliding_window(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 23);
    let lens: &[usize] = &[0, 1, 17, 63, 64, 65, 130];
    let cases: [(QkvLayout, &[usize]); 4] = [
        (QkvLayout::mha(3, 24), &[1, 7, 65, 200]),
        (gqa(4, 2, 72), &[1, 33]),
        (gqa(4, 1, 64), &[1, 17, 65, 200]),
        (gqa(2, 1, 128), &[1, 40]),
    ];
    for (layout, windows) in cases {
        for &window in windows {
            check_on_device(&mut f, lens, layout, Some(window));
        }
    }
}

/// Log-sum-exp of every (token, query head) row of scaled scores, in f64: `[n, n_head]`, what the CUDA
/// forward saves.
fn log_sum_exp(qkv: &[f32], lens: &[usize], layout: QkvLayout) -> Vec<f64> {
    let (hd, width) = (layout.head_dim, layout.width());
    let scale = 1.0 / (hd as f64).sqrt();
    let dot = |a: usize, b: usize| (0..hd).map(|d| f64::from(qkv[a + d]) * f64::from(qkv[b + d])).sum::<f64>();
    let mut lse = vec![0.0; lens.iter().sum::<usize>() * layout.n_head];
    let mut start = 0;
    for &len in lens {
        for i in 0..len {
            for h in 0..layout.n_head {
                let q = (start + i) * width + h * hd;
                let k = |j: usize| (start + j) * width + layout.k_offset() + layout.kv_head_of(h) * hd;
                let scores: Vec<f64> = (0..=i).map(|j| scale * dot(q, k(j))).collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                lse[(start + i) * layout.n_head + h] = max + scores.iter().map(|s| (s - max).exp()).sum::<f64>().ln();
            }
        }
        start += len;
    }
    lse
}

/// Columns `cols` of each row of a `[n, width]` tensor.
fn columns(x: &[f32], width: usize, cols: std::ops::Range<usize>) -> Vec<f32> {
    x.chunks(width).flat_map(|row| row[cols.clone()].to_vec()).collect()
}

/// Whether the CUDA backend runs `layout` on the tensor-core kernels (kernels/attention_mma.cu).
fn on_tensor_cores(precision: Precision, layout: QkvLayout) -> bool {
    precision == Precision::Bf16 && matches!(layout.head_dim, 64 | 128)
}

/// Bf16 mode, tensor-core kernels: P (and in the backward dS) is rounded to bf16 as the operand of the
/// second product of each pair (as FlashAttention-2 does), so an entry moves by up to 2^-9 of the
/// terms of its sum, not of itself: each element is held to one bf16 rounding of itself plus this
/// part of the tensor's largest entry. Measured in `attention_tensor_cores`: out up to 9.4e-4.
const TENSOR_CORE_FLOOR: f64 = 2e-3;

/// As [`TENSOR_CORE_FLOOR`] for dq, dk and dv, which also carry `D = dout·out` formed from the
/// stored (bf16) output, as the portable kernels do ([`ATTENTION_DQKV_FLOOR`]): measured up to
/// 4.2e-3 (dq), 2.9e-3 (dk), 1.2e-3 (dv).
const TENSOR_CORE_GRAD_FLOOR: f64 = 1e-2;

/// The shapes the tensor-core kernels run (bf16 at head dims 64 and 128; in F32 mode the same cases
/// run the portable kernels): out, the saved log-sum-exp, and dq, dk, dv each, against the CPU (the
/// log-sum-exp against f64), outputs poisoned first; the backward twice, bit for bit.
fn attention_tensor_cores(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 12);
    // Ragged lengths across the 64-row tiles (1, 17, 63, 64, 65, 130 = 2 tiles + 2, an empty one).
    let cases: [(&[usize], QkvLayout); 6] = [
        (&[1, 17, 64, 130, 0, 65], QkvLayout::mha(2, 128)),
        (&[130, 1, 17], QkvLayout::mha(1, 128)),
        (&[17, 65, 1], gqa(4, 2, 64)),
        (&[63, 130], gqa(4, 1, 64)),
        (&[130, 1, 33], gqa(4, 2, 128)),
        (&[1, 66, 17], gqa(3, 1, 128)),
    ];
    for (lens, layout) in cases {
        let what = format!("lens {lens:?}, {layout:?}");
        let (n, nh, width) = (lens.iter().sum::<usize>(), layout.n_head, layout.width());
        let (cpu_packing, cuda_packing) = f.packing(lens);
        let qkv = f.randn(n * width, 1.0);
        let (cq, gq) = f.both(&qkv);
        let (mut want, mut got) = f.poisoned(n * layout.q_width());
        let mut want_saved = f.cpu.zeros(f.cpu.attention_saved_len(&cpu_packing, nh)).unwrap();
        let mut got_saved = f.cuda.upload(&poison(f.cuda.attention_saved_len(&cuda_packing, nh))).unwrap();
        f.cpu.attention_forward(&mut want, &mut want_saved, &cq, &cpu_packing, layout, None).unwrap();
        f.cuda.attention_forward(&mut got, &mut got_saved, &gq, &cuda_packing, layout, None).unwrap();
        f.check_rounded(&format!("out ({what})"), &got, &want, 1.0, TENSOR_CORE_FLOOR);
        let lse = f.cuda.download(&got_saved).unwrap();
        assert_close(&format!("log-sum-exp ({what}, {precision})"), &lse, &log_sum_exp(&qkv, lens, layout), 1e-5, 1e-5);

        let dout = f.randn(n * layout.q_width(), 1.0);
        let (cd, gd) = f.both(&dout);
        let (mut want_dqkv, mut got_dqkv) = f.poisoned(n * width);
        f.cpu.attention_backward(&mut want_dqkv, &cd, &cq, &want, &want_saved, &cpu_packing, layout, None).unwrap();
        f.cuda.attention_backward(&mut got_dqkv, &gd, &gq, &got, &got_saved, &cuda_packing, layout, None).unwrap();
        let first = f.cuda.download(&got_dqkv).unwrap();
        let parts = [
            ("dq", 0..layout.k_offset()),
            ("dk", layout.k_offset()..layout.v_offset()),
            ("dv", layout.v_offset()..width),
        ];
        for (name, cols) in parts {
            let (got, want) = (columns(&first, width, cols.clone()), columns(&want_dqkv, width, cols));
            let what = format!("{name} ({what}, {precision})");
            match precision {
                Precision::F32 => assert_close_scaled(&what, &got, &to_f64(&want), 1e-5),
                Precision::Bf16 => {
                    assert_close_with_floor(&what, &got, &to_f64(&want), BF16_ROUNDING, TENSOR_CORE_GRAD_FLOOR)
                }
            }
        }
        f.cuda.attention_backward(&mut got_dqkv, &gd, &gq, &got, &got_saved, &cuda_packing, layout, None).unwrap();
        assert_bitwise_eq(&format!("dqkv, second run ({what})"), &f.cuda.download(&got_dqkv).unwrap(), &first);
    }
}

/// `AttentionKernels::Portable` really switches kernels: at bf16 and head dim 64 the portable
/// kernels' output and gradients differ in bits from the tensor-core ones (P is rounded to bf16 on
/// tensor cores only) and agree with them within the tensor-core tolerance; in f32 both backends
/// run the portable kernels, bit for bit.
fn attention_kernels_switch(device: &Device, precision: Precision) {
    let f = Fixture::new(device, precision, 21);
    let portable = CudaBackend::new(device.clone(), precision).with_attention_kernels(AttentionKernels::Portable);
    assert_eq!(
        (f.cuda.attention_kernels(), portable.attention_kernels()),
        (AttentionKernels::Auto, AttentionKernels::Portable)
    );
    let (lens, layout) = ([65usize, 17, 130], gqa(4, 2, 64));
    let (n, nh) = (lens.iter().sum::<usize>(), layout.n_head);
    let (_, packing) = f.packing(&lens);
    let mut rng = rng(5);
    let qkv = f.cuda.upload(&randn(&mut rng, n * layout.width(), 1.0)).unwrap();
    let dout = f.cuda.upload(&randn(&mut rng, n * layout.q_width(), 1.0)).unwrap();
    let run = |be: &CudaBackend| {
        let mut out = be.upload(&poison(n * layout.q_width())).unwrap();
        let mut saved = be.upload(&poison(be.attention_saved_len(&packing, nh))).unwrap();
        be.attention_forward(&mut out, &mut saved, &qkv, &packing, layout, None).unwrap();
        let mut dqkv = be.upload(&poison(n * layout.width())).unwrap();
        be.attention_backward(&mut dqkv, &dout, &qkv, &out, &saved, &packing, layout, None).unwrap();
        (be.download(&out).unwrap(), be.download(&dqkv).unwrap())
    };
    let ((out_auto, d_auto), (out_portable, d_portable)) = (run(&f.cuda), run(&portable));
    match precision {
        Precision::F32 => {
            assert_bitwise_eq("out, f32 (both portable)", &out_portable, &out_auto);
            assert_bitwise_eq("dqkv, f32 (both portable)", &d_portable, &d_auto);
        }
        Precision::Bf16 => {
            assert!(out_auto != out_portable, "bf16 at head dim 64: the portable backend ran the tensor-core kernels");
            assert_close_with_floor(
                "out, portable vs tensor cores",
                &out_portable,
                &to_f64(&out_auto),
                BF16_ROUNDING,
                TENSOR_CORE_FLOOR,
            );
            assert_close_with_floor(
                "dqkv, portable vs tensor cores",
                &d_portable,
                &to_f64(&d_auto),
                BF16_ROUNDING,
                TENSOR_CORE_GRAD_FLOOR,
            );
        }
    }
}

device_tests!(
    attention,
    attention_grouped_queries,
    attention_sliding_window,
    attention_tensor_cores,
    attention_kernels_switch
);
