//! Shared test helpers: seeded random data, NaN-poisoned outputs, an f64 central-difference
//! gradient checker, and relative-error comparisons that name the worst element.
//!
//! Use from a test file with `mod common;` and `use common::*;`. Not every test file uses every
//! helper, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod reference;
pub mod run;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A deterministic RNG for test data.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `len` values uniform in `[lo, hi)`.
pub fn uniform(rng: &mut impl Rng, len: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(lo..hi)).collect()
}

/// `len` values from N(0, std²) (Box–Muller, so no extra dependency).
pub fn randn(rng: &mut impl Rng, len: usize, std: f32) -> Vec<f32> {
    (0..len)
        .map(|_| {
            let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            let u2: f64 = rng.random::<f64>();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * std
        })
        .collect()
}

/// `len` ids uniform in `0..hi`.
pub fn rand_ids(rng: &mut impl Rng, len: usize, hi: usize) -> Vec<i32> {
    (0..len).map(|_| rng.random_range(0..hi) as i32).collect()
}

/// A buffer of NaNs: an op that forgets to write an element leaves a NaN that the comparison catches.
pub fn poison(len: usize) -> Vec<f32> {
    vec![f32::NAN; len]
}

/// `cu_seqlens` for sequences of the given lengths.
pub fn cu_seqlens(lens: &[usize]) -> Vec<i32> {
    let mut cu = vec![0i32];
    for &l in lens {
        cu.push(cu.last().unwrap() + l as i32);
    }
    cu
}

pub fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Central-difference gradient of a scalar function of `x`, in f64: `(f(x + h e_i) − f(x − h e_i)) / 2h`.
pub fn fd_grad(f: impl Fn(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + h;
            let up = f(&xp);
            xp[i] = orig - h;
            let down = f(&xp);
            xp[i] = orig;
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// `Σ w ⊙ out`, the scalar loss whose gradient w.r.t. `out` is `w`.
pub fn weighted_sum(w: &[f64], out: &[f64]) -> f64 {
    w.iter().zip(out).map(|(a, b)| a * b).sum()
}

/// The worst element of `got` against `want` by `|got − want| / (atol + rtol·|want|)`; returns
/// (index, that ratio). A NaN anywhere counts as infinitely bad. A ratio ≤ 1 means within tolerance.
pub fn worst_error(got: &[f32], want: &[f64], rtol: f64, atol: f64) -> (usize, f64) {
    assert_eq!(got.len(), want.len(), "length mismatch: got {} values, want {}", got.len(), want.len());
    let mut worst = (0, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let diff = (g as f64 - w).abs();
        // An exact match passes even at zero tolerance (0 / 0); a NaN never does.
        let err = if diff == 0.0 { 0.0 } else { diff / (atol + rtol * w.abs()) };
        let err = if err.is_nan() { f64::INFINITY } else { err };
        if err > worst.1 {
            worst = (i, err);
        }
    }
    worst
}

/// Asserts `|got − want| ≤ atol + rtol·|want|` elementwise (NaN fails), naming the worst element.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f64], rtol: f64, atol: f64) {
    let (i, ratio) = worst_error(got, want, rtol, atol);
    assert!(
        ratio <= 1.0,
        "{what}: element {i} is {} but should be {} (|err| = {:.3e}, {ratio:.2}× the tolerance \
         rtol {rtol:e}, atol {atol:e})",
        got[i],
        want[i],
        (got[i] as f64 - want[i]).abs()
    );
}

/// Asserts that two f32 buffers are bit-identical (determinism), naming the first difference.
#[track_caller]
pub fn assert_bitwise_eq(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits()) {
        panic!("{what}: element {i} differs between runs: {} vs {}", a[i], b[i]);
    }
}

/// Central differences at the coordinates `idx` only (for tensors too large to perturb one by one).
pub fn fd_grad_at(f: impl Fn(&[f64]) -> f64, x: &[f64], h: f64, idx: &[usize]) -> Vec<f64> {
    let mut xp = x.to_vec();
    idx.iter()
        .map(|&i| {
            let orig = xp[i];
            xp[i] = orig + h;
            let up = f(&xp);
            xp[i] = orig - h;
            let down = f(&xp);
            xp[i] = orig;
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// `count` distinct indices in `0..len` (all of them when `count >= len`), sorted.
pub fn sample_indices(rng: &mut impl Rng, len: usize, count: usize) -> Vec<usize> {
    if count >= len {
        return (0..len).collect();
    }
    let mut picked = std::collections::BTreeSet::new();
    while picked.len() < count {
        picked.insert(rng.random_range(0..len));
    }
    picked.into_iter().collect()
}

/// [`assert_close`] with the absolute tolerance scaled to the largest `|want|`: `atol = rtol · max|want|`.
/// The right check for gradients, whose small entries come from cancelling sums.
#[track_caller]
pub fn assert_close_scaled(what: &str, got: &[f32], want: &[f64], rtol: f64) {
    let scale = want.iter().fold(0.0f64, |a, &w| a.max(w.abs())).max(1e-30);
    assert_close(what, got, want, rtol, rtol * scale);
}

/// bf16 keeps 8 significant bits: rounding to nearest moves a value by at most 2^-8 of itself (half
/// a unit in the last place, at the bottom of a binade), truncation by up to 2^-7. One rounding of
/// an exactly computed value is therefore within `BF16_ROUNDING · |value|`.
pub const BF16_ROUNDING: f64 = 1.0 / 256.0;

/// Asserts each element within `rtol` of itself plus an absolute floor of `floor` × the largest
/// `|want|`: `|got − want| ≤ rtol·|want| + floor·max|want|` (NaN fails), naming the worst element.
/// The check for values stored in bf16: `rtol` is what the roundings allow every element, and the
/// floor, kept small, only what cancellation leaves to the smallest entries of a sum. (Unlike
/// [`assert_close_scaled`], a large element cannot use up a tolerance sized for the whole tensor.)
#[track_caller]
pub fn assert_close_with_floor(what: &str, got: &[f32], want: &[f64], rtol: f64, floor: f64) {
    let scale = want.iter().fold(0.0f64, |a, &w| a.max(w.abs()));
    assert_close(what, got, want, rtol, floor * scale);
}

/// Random weights far from GPT-2's init scale, so that attention is peaked, GELU is curved, and
/// LayerNorm gains and biases matter: a gradient bug cannot hide in a near-linear regime.
pub fn test_weights(config: &safedpo::model::DecoderConfig, seed: u64) -> safedpo::model::HostWeights {
    let mut r = rng(seed);
    let mut tensors = std::collections::BTreeMap::new();
    for (name, shape) in config.parameter_shapes() {
        let len: usize = shape.iter().product();
        let is_norm = name.contains("ln_") || name.contains("norm");
        let data = if is_norm && name.ends_with(".weight") {
            randn(&mut r, len, 0.2).into_iter().map(|x| 1.0 + x).collect()
        } else if name.ends_with(".bias") {
            randn(&mut r, len, 0.1)
        } else {
            randn(&mut r, len, 0.3)
        };
        tensors.insert(name, (shape, data));
    }
    safedpo::model::HostWeights { config: config.clone(), tensors }
}

/// Two sets of host weights are the same bit for bit: config, names, shapes and every value's bits.
pub fn assert_bit_identical(a: &safedpo::model::HostWeights, b: &safedpo::model::HostWeights) {
    assert_eq!(a.config, b.config);
    assert_eq!(a.tensors.keys().collect::<Vec<_>>(), b.tensors.keys().collect::<Vec<_>>());
    for (name, (shape, data)) in &a.tensors {
        let (shape_b, data_b) = &b.tensors[name];
        assert_eq!(shape, shape_b, "{name}");
        let bits = |d: &[f32]| d.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(data), bits(data_b), "tensor {name} differs");
    }
}
