//! Rotary position embeddings: the host's frequency rules against values worked out by hand from
//! HF's formulas; the rotation against the spec and its finite differences, in the grouped-query
//! `qkv` layout; the CUDA backend against the CPU.

use safedpo::backend::cpu::rope::spec;
use safedpo::backend::cuda::{Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::{rope_inverse_frequencies, QkvLayout, RopeScaling};

use crate::common::*;
use crate::device::{Fixture, BF16_NOISE_FLOOR, F32_RTOL};
use crate::{backend, FD_STEP, FWD_RTOL, GRAD_RTOL};

/// Grouped-query layouts: (n_head, n_kv_head, head_dim), head_dim/2 odd and even, one kv head, MHA.
const LAYOUTS: [(usize, usize, usize); 4] = [(4, 2, 6), (3, 3, 8), (8, 1, 4), (2, 1, 2)];

fn layout((n_head, n_kv_head, head_dim): (usize, usize, usize)) -> QkvLayout {
    QkvLayout { n_head, n_kv_head, head_dim }
}

/// The positions of a packed batch: each token's index inside its sequence.
fn positions(lens: &[usize]) -> Vec<i32> {
    lens.iter().flat_map(|&len| 0..len as i32).collect()
}

#[test]
fn qkv_layout_places_q_then_k_then_v() {
    let gqa = QkvLayout { n_head: 8, n_kv_head: 2, head_dim: 16 };
    assert_eq!((gqa.q_width(), gqa.kv_width(), gqa.width()), (128, 32, 192));
    assert_eq!((gqa.k_offset(), gqa.v_offset(), gqa.rotated_heads()), (128, 160, 10));
    assert_eq!((0..8).map(|h| gqa.kv_head_of(h)).collect::<Vec<_>>(), [0, 0, 0, 0, 1, 1, 1, 1]);
    // multi-head attention is GPT-2's [n, 3c]
    let mha = QkvLayout::mha(12, 768);
    assert_eq!((mha.n_kv_head, mha.head_dim, mha.width()), (12, 64, 3 * 768));
}

/// θ = 10⁴ and head_dim = 8 make the default frequencies 10⁻ⁱ, so every rule can be worked out by
/// hand from HF's formulas; with `original_max_position_embeddings = 1000`, `low_freq_factor = 1`,
/// `high_freq_factor = 4`, the wavelengths 2π·10ⁱ fall one in each band of the llama3 rule: kept
/// (i = 0, 1: below 250), blended (i = 2: 628, with s = (1000/628.3 − 1)/3) and divided (i = 3).
#[test]
fn inverse_frequencies_follow_the_hf_rules() {
    let check = |what: &str, got: Vec<f32>, want: &[f64]| assert_close(what, &got, want, 1e-7, 0.0);
    check("default", rope_inverse_frequencies(8, 1e4, RopeScaling::Default).unwrap(), &[1.0, 0.1, 0.01, 0.001]);
    let linear = RopeScaling::Linear { factor: 4.0 };
    check("linear", rope_inverse_frequencies(8, 1e4, linear).unwrap(), &[0.25, 0.025, 0.0025, 0.00025]);
    let llama3 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 1000.0,
    };
    check(
        "llama3",
        rope_inverse_frequencies(8, 1e4, llama3).unwrap(),
        &[1.0, 0.1, 0.002_975_352_506_846_947, 0.000_125],
    );

    // Llama 3.1's own settings: the fastest frequency kept, the slowest divided by 8.
    let llama31 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    let (scaled, plain) = (
        rope_inverse_frequencies(128, 5e5, llama31).unwrap(),
        rope_inverse_frequencies(128, 5e5, RopeScaling::Default).unwrap(),
    );
    assert_eq!((scaled.len(), scaled[0]), (64, 1.0));
    assert_close("llama3.1 slowest", &scaled[63..], &[plain[63] as f64 / 8.0], 1e-7, 0.0);
    assert!(scaled.iter().zip(&plain).all(|(s, p)| s <= p && *s >= p / 8.0), "{scaled:?}");

    for (head_dim, theta, scaling, fragment) in [
        (7, 1e4, RopeScaling::Default, "head_dim = 7"),
        (8, 0.0, RopeScaling::Default, "rope_theta"),
        (8, 1e4, RopeScaling::Linear { factor: 0.0 }, "factor"),
        (
            8,
            1e4,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 1.0,
                original_max_position_embeddings: 1000.0,
            },
            "high_freq_factor",
        ),
    ] {
        let msg = format!("{:#}", rope_inverse_frequencies(head_dim, theta, scaling).unwrap_err());
        assert!(msg.contains(fragment), "{msg}");
    }
}

#[test]
fn rope_forward_matches_spec_and_leaves_v_alone() {
    let be = backend();
    let mut r = rng(91);
    for (k, &shape) in LAYOUTS.iter().enumerate() {
        let layout = layout(shape);
        // Ragged sequences (one empty) and, at the end, positions far past a short context: the angle
        // is rounded to f32 as HF rounds it, so long positions agree too.
        let mut pos = positions(&[5, 1, 0, 9]);
        pos.extend([8191, 30_000 + k as i32, 131_071]);
        let n = pos.len();
        let inv_freq = rope_inverse_frequencies(layout.head_dim, 1e4, RopeScaling::Default).unwrap();
        let qkv = randn(&mut r, n * layout.width(), 1.0);
        let mut got = qkv.clone();
        be.rope_forward(&mut got, &pos, &inv_freq, n, layout).unwrap();
        let want = spec::forward(&to_f64(&qkv), &pos, &inv_freq, layout);
        assert_close_scaled(&format!("rope_forward {shape:?}"), &got, &want, FWD_RTOL);
        for t in 0..n {
            let v = t * layout.width() + layout.v_offset()..(t + 1) * layout.width();
            assert_bitwise_eq(&format!("v of token {t} {shape:?}"), &got[v.clone()], &qkv[v]);
        }
        // position 0 is the identity
        assert_bitwise_eq("position 0", &got[..layout.width()], &qkv[..layout.width()]);
    }
}

#[test]
fn rope_backward_matches_finite_differences_and_inverts_the_forward() {
    let be = backend();
    let mut r = rng(92);
    for &shape in &LAYOUTS {
        let layout = layout(shape);
        let pos = positions(&[4, 3]);
        let n = pos.len();
        let llama3 = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 16.0,
        };
        let inv_freq = rope_inverse_frequencies(layout.head_dim, 100.0, llama3).unwrap();
        let qkv = randn(&mut r, n * layout.width(), 1.0);
        let dout = randn(&mut r, n * layout.width(), 1.0);
        let dy = to_f64(&dout);
        let want = fd_grad(|x| weighted_sum(&dy, &spec::forward(x, &pos, &inv_freq, layout)), &to_f64(&qkv), FD_STEP);
        // in place: dqkv holds the gradient of the output on entry, of the input on return
        let mut dqkv = dout.clone();
        be.rope_backward(&mut dqkv, &pos, &inv_freq, n, layout).unwrap();
        assert_close_scaled(&format!("rope_backward {shape:?}"), &dqkv, &want, GRAD_RTOL);

        let mut round_trip = qkv.clone();
        be.rope_forward(&mut round_trip, &pos, &inv_freq, n, layout).unwrap();
        be.rope_backward(&mut round_trip, &pos, &inv_freq, n, layout).unwrap();
        assert_close_scaled(&format!("backward ∘ forward {shape:?}"), &round_trip, &to_f64(&qkv), 1e-6);
    }
}

#[test]
fn rope_checks_its_arguments() {
    let be = backend();
    let good = QkvLayout { n_head: 4, n_kv_head: 2, head_dim: 6 };
    let (n, inv_freq) = (3, vec![1.0; 3]);
    let pos = vec![0, 1, 2];
    let mut qkv = vec![0.0; n * good.width()];
    let mut fails = |layout: QkvLayout, pos: &Vec<i32>, inv_freq: &Vec<f32>, fragments: &[&str]| {
        let msg = format!("{:#}", be.rope_forward(&mut qkv, pos, inv_freq, n, layout).unwrap_err());
        assert!(msg.contains("rope_forward") && fragments.iter().all(|f| msg.contains(f)), "{msg}");
    };
    fails(QkvLayout { n_kv_head: 3, ..good }, &pos, &inv_freq, &["n_head = 4", "n_kv_head = 3"]);
    fails(QkvLayout { head_dim: 5, ..good }, &pos, &inv_freq, &["head_dim = 5"]);
    fails(good, &pos, &vec![1.0; 2], &["`inv_freq`", "2", "3"]);
    fails(good, &vec![0, -1, 2], &inv_freq, &["positions[1]", "-1"]);
    fails(good, &vec![0, 1], &inv_freq, &["`positions`", "2", "3"]);
    let mut short = vec![0.0; n * good.width() - 1];
    let msg = format!("{:#}", be.rope_backward(&mut short, &pos, &inv_freq, n, good).unwrap_err());
    assert!(
        msg.contains("rope_backward") && msg.contains("`dqkv`") && msg.contains("143") && msg.contains("144"),
        "{msg}"
    );
}

// ---- the CUDA backend against the CPU (see `device`) -----------------------------------------------------

/// Forward and backward on the emulated device against the CPU, every layout, a packed batch of
/// ragged sequences (an empty one, one of one token, one longer than a warp) and long positions.
/// The v columns hold NaN: a kernel that reads or writes them fails (the rotated columns must stay
/// finite, the v columns NaN).
fn rope(device: &Device, precision: Precision) {
    for (seed, &shape) in LAYOUTS.iter().chain([(16, 4, 128)].iter()).enumerate() {
        let mut f = Fixture::new(device, precision, 100 + seed as u64);
        let layout = layout(shape);
        let mut pos = positions(&[3, 0, 1, 40]);
        pos.extend([4095, 70_001]);
        let n = pos.len();
        let (cpos, gpos) = (pos.clone(), f.cuda.upload_ids(&pos).unwrap());
        let inv_freq = rope_inverse_frequencies(layout.head_dim, 5e5, RopeScaling::Linear { factor: 2.0 }).unwrap();
        let (cf, gf) = f.both(&inv_freq);
        let rotated = layout.v_offset();
        let mut qkv = f.randn(n * layout.width(), 1.0);
        qkv.chunks_mut(layout.width()).for_each(|row| row[rotated..].fill(f32::NAN));
        for (direction, backward) in [("rope_forward", false), ("rope_backward", true)] {
            let (mut want, mut got) = f.both(&qkv);
            if backward {
                f.cpu.rope_backward(&mut want, &cpos, &cf, n, layout).unwrap();
                f.cuda.rope_backward(&mut got, &gpos, &gf, n, layout).unwrap();
            } else {
                f.cpu.rope_forward(&mut want, &cpos, &cf, n, layout).unwrap();
                f.cuda.rope_forward(&mut got, &gpos, &gf, n, layout).unwrap();
            }
            let got = f.cuda.download(&got).unwrap();
            let split = |x: &[f32]| -> (Vec<f32>, Vec<f32>) {
                let rows = x.chunks(layout.width());
                (
                    rows.clone().flat_map(|r| r[..rotated].to_vec()).collect(),
                    rows.flat_map(|r| r[rotated..].to_vec()).collect(),
                )
            };
            let ((got_qk, got_v), (want_qk, _)) = (split(&got), split(&want));
            let what = format!("{direction} {shape:?} ({precision})");
            match precision {
                Precision::F32 => assert_close_scaled(&what, &got_qk, &to_f64(&want_qk), F32_RTOL),
                // Rotated in f32, rounded once: each element within one bf16 rounding of itself,
                // plus the noise floor where q·cos − k·sin cancels.
                Precision::Bf16 => {
                    assert_close_with_floor(&what, &got_qk, &to_f64(&want_qk), BF16_ROUNDING, BF16_NOISE_FLOOR)
                }
            }
            assert!(got_v.iter().all(|x| x.is_nan()), "{what}: the v columns were written");
        }
    }
}

device_tests!(rope);
