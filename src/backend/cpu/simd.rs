//! The vector plumbing of the CPU row kernels: [`simd_kernel!`] (one kernel compiled portable, with
//! AVX2 and with AVX-512, dispatched at run time), the laned sums and maxima that keep reductions
//! deterministic, and a vectorisable `expf`.
//!
//! Every version of a kernel gives the same bits: only elementwise work and explicitly laned
//! reductions go in them, and Rust never fuses multiply-adds nor reorders float operations.

/// Defines a kernel function three times: as written, and compiled with AVX2 (8 lanes instead of
/// SSE2's 4) and with AVX-512 (16 lanes) enabled, picking the widest the CPU has at run time. Only
/// elementwise work and explicitly laned reductions go in these kernels, and Rust never fuses
/// multiply-adds on its own (nor reorders float operations), so all versions give bit-identical
/// results.
macro_rules! simd_kernel {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                use $crate::backend::cpu::simd::{simd_level, SimdLevel};
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                match simd_level() {
                    // SAFETY: the CPU supports AVX-512 (F, BW, DQ, VL; checked by `simd_level`).
                    SimdLevel::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: the CPU supports AVX2 (checked by `simd_level`).
                    SimdLevel::Avx2 => return unsafe { avx2($($arg),*) },
                    SimdLevel::Portable => {}
                }
            }
            portable($($arg),*)
        }
    };
}
pub(super) use simd_kernel;

/// Which compiled version `simd_kernel!` functions take.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    Portable,
    Avx2,
    Avx512,
}

impl SimdLevel {
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Portable => "portable",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }
}

/// The environment variable that caps the row kernels' [`SimdLevel`] (`portable`, `avx2`,
/// `avx512`), so that a narrower path can be measured on a wider CPU.
pub const CPU_ISA_ENV: &str = "SAFEDPO_CPU_ISA";

/// The widest level the CPU supports.
#[cfg(target_arch = "x86_64")]
fn detected_level() -> SimdLevel {
    if std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512dq")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx2")
    {
        SimdLevel::Avx512
    } else if std::is_x86_feature_detected!("avx2") {
        SimdLevel::Avx2
    } else {
        SimdLevel::Portable
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detected_level() -> SimdLevel {
    SimdLevel::Portable
}

/// The level the row kernels run at: the CPU's widest, capped by [`CPU_ISA_ENV`] when it is set.
/// Decided once per process; an unknown value is reported once on stderr and ignored.
pub fn row_kernel_level() -> SimdLevel {
    static LEVEL: std::sync::OnceLock<SimdLevel> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let detected = detected_level();
        let Ok(cap) = std::env::var(CPU_ISA_ENV) else { return detected };
        let cap = match cap.trim().to_ascii_lowercase().as_str() {
            "portable" | "scalar" | "sse2" => SimdLevel::Portable,
            "avx2" => SimdLevel::Avx2,
            "avx512" | "" => SimdLevel::Avx512,
            other => {
                eprintln!("warning: {CPU_ISA_ENV}={other} is not one of portable, avx2, avx512; ignored");
                SimdLevel::Avx512
            }
        };
        detected.min(cap)
    })
}

/// The instruction-set path of each CPU kernel family, for reports: the row kernels' level (see
/// [`row_kernel_level`]) and the `gemm` crate's matrix-product kernels, which it picks once from
/// the CPU (AVX-512 only in builds with the `avx512` feature; [`CPU_ISA_ENV`] does not reach it).
pub fn isa_paths() -> Vec<(&'static str, &'static str)> {
    vec![("row kernels", row_kernel_level().name()), ("gemm", gemm_path())]
}

/// The vector extensions among those the kernels care about that this CPU has (for the record
/// that goes with every CPU figure).
pub fn cpu_flags() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut flags = Vec::new();
        macro_rules! check {
            ($($f:tt),*) => {$(
                if std::is_x86_feature_detected!($f) {
                    flags.push($f);
                }
            )*};
        }
        check!("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512bf16");
        flags
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

fn gemm_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if cfg!(feature = "avx512") && std::is_x86_feature_detected!("avx512f") {
            return "avx512f";
        }
        if std::is_x86_feature_detected!("fma") {
            return "avx2+fma";
        }
        "scalar"
    }
    #[cfg(target_arch = "aarch64")]
    {
        "neon"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}

/// The level [`simd_kernel!`] functions take: [`row_kernel_level`]. Unit tests can cap it on their
/// own thread, to check that every version agrees bit for bit.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn simd_level() -> SimdLevel {
    let detected = row_kernel_level();
    #[cfg(test)]
    if let Some(cap) = testing::SIMD_CAP.with(|f| f.get()) {
        return match (cap, detected) {
            (SimdLevel::Portable, _) | (_, SimdLevel::Portable) => SimdLevel::Portable,
            (SimdLevel::Avx2, _) | (_, SimdLevel::Avx2) => SimdLevel::Avx2,
            _ => SimdLevel::Avx512,
        };
    }
    detected
}

/// Accumulator lanes for row sums: independent partial sums that the compiler keeps in one SIMD
/// register, combined in a fixed order at the end (deterministic, and more accurate than one
/// running sum).
pub(super) const LANES: usize = 8;

/// `Σ f(x)` over a slice with [`LANES`] partial sums.
#[inline(always)]
pub(super) fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for l in 0..LANES {
            acc[l] += f(chunk[l]);
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        acc[l] += f(v);
    }
    combine_lanes(acc)
}

/// `sum = a + b` elementwise, returning `Σ sum` with [`LANES`] partial sums: the same values in the
/// same lanes as `lane_sum(sum, |v| v)`, so bit-identical to it, without reading `sum` back.
#[inline(always)]
pub(super) fn add_lane_sum(sum: &mut [f32], a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut sums = sum.chunks_exact_mut(LANES);
    let (mut ac, mut bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for ((s, x), y) in sums.by_ref().zip(ac.by_ref()).zip(bc.by_ref()) {
        for l in 0..LANES {
            s[l] = x[l] + y[l];
            acc[l] += s[l];
        }
    }
    let tails = sums.into_remainder().iter_mut().zip(ac.remainder().iter().zip(bc.remainder()));
    for (l, (s, (&x, &y))) in tails.enumerate() {
        *s = x + y;
        acc[l] += *s;
    }
    combine_lanes(acc)
}

/// `Σ a ⊙ b` with [`LANES`] partial sums.
#[inline(always)]
pub(super) fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (&x, &y)) in ta.iter().zip(tb).enumerate() {
        acc[l] += x * y;
    }
    combine_lanes(acc)
}

/// `max x` with [`LANES`] partial maxima (NaNs are skipped, as by `f32::max`).
#[inline(always)]
pub(super) fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for l in 0..LANES {
            acc[l] = acc[l].max(chunk[l]);
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        acc[l] = acc[l].max(v);
    }
    acc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// Adds the [`LANES`] partial sums pairwise, in a fixed order.
#[inline(always)]
pub(super) fn combine_lanes(acc: [f32; LANES]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `eˣ` in f32 to about 1 ulp (Cephes `expf`), written with plain arithmetic and bit operations
/// so that loops over it vectorise (libm's `expf` is a scalar call, and the softmaxes and GELU of
/// a step evaluate millions of exponentials). `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`; `eʳ` by a
/// degree-7 polynomial; `2ⁿ` built in the exponent bits. Underflows to 0 below −87.3 (no
/// subnormals), overflows to +∞ above 88.7, and propagates NaN.
#[inline(always)]
pub(super) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const MIN_X: f32 = -87.336_55; // ln of the smallest normal f32
    const MAX_X: f32 = 88.722_83;
    let xc = x.clamp(MIN_X, MAX_X);
    let shifted = xc * LOG2E + ROUND;
    let n = shifted - ROUND;
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = (p * r) * r + r + 1.0;
    // 2ⁿ in two factors so that n = 128 (x near MAX_X) does not overflow the exponent field.
    let half = n_int >> 1;
    let s1 = f32::from_bits(((half + 127) << 23) as u32);
    let s2 = f32::from_bits(((n_int - half + 127) << 23) as u32);
    let y = er * s1 * s2;
    if x < MIN_X {
        0.0
    } else if x > MAX_X {
        f32::INFINITY
    } else {
        y
    }
}

/// Test support for the row kernels of every op family: a per-thread cap on the SIMD level, and
/// runs of a kernel at each level compared bit for bit.
#[cfg(test)]
pub(super) mod testing {
    use super::SimdLevel;
    use std::cell::Cell;

    thread_local! {
        /// Caps `simd_level` on this thread (`None`: no cap).
        pub(super) static SIMD_CAP: Cell<Option<SimdLevel>> = const { Cell::new(None) };
    }

    /// Runs `f` with the portable kernels, with at most AVX2, and with the dispatched (widest) ones;
    /// checks that the AVX2 result equals the portable one bit for bit and returns
    /// `(portable, dispatched)`.
    pub(in crate::backend::cpu) fn both_paths(f: impl Fn() -> Vec<f32>) -> (Vec<f32>, Vec<f32>) {
        SIMD_CAP.with(|p| p.set(Some(SimdLevel::Portable)));
        let portable = f();
        SIMD_CAP.with(|p| p.set(Some(SimdLevel::Avx2)));
        let avx2 = f();
        SIMD_CAP.with(|p| p.set(None));
        assert_same_bits("AVX2 kernels", &portable, &avx2);
        (portable, f())
    }

    pub(in crate::backend::cpu) fn assert_same_bits(what: &str, a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert_eq!(x.to_bits(), y.to_bits(), "{what}[{i}]: portable {x} vs dispatched {y}");
        }
    }

    /// Deterministic pseudo-random values in [-scale, scale).
    pub(in crate::backend::cpu) fn values(len: usize, seed: u32, scale: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
                ((state >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// Inputs for the kernels' bit-identity tests: `[x, y, w, b]`, 1,037 values each (not a
    /// multiple of any lane count), `x` in [-6, 6) and the others in [-1, 1).
    pub(in crate::backend::cpu) fn kernel_inputs() -> [Vec<f32>; 4] {
        let len = 1037;
        [values(len, 1, 6.0), values(len, 2, 1.0), values(len, 3, 1.0), values(len, 4, 1.0)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp_f32` against f64 `exp` over its whole range, on a dense grid and at the edges.
    #[test]
    fn exp_f32_is_accurate_to_two_ulp() {
        let mut worst = 0.0f64;
        let grid = (-2_000_000..=2_000_000).map(|i| i as f32 * 4.36e-5);
        for x in grid.chain([-87.33, -87.336, 88.7, 88.72, 0.0, -0.0, 1e-30, -1e-30]) {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            let rel = (got - want).abs() / want;
            assert!(rel < 2.5e-7, "exp_f32({x}) = {got}, want {want} (relative error {rel:e})");
            worst = worst.max(rel);
        }
        assert!(worst > 0.0);
        assert_eq!(exp_f32(-88.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn lane_sums_match_plain_sums() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let y: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let want_sum: f64 = x.iter().map(|&v| v as f64).sum();
        let want_dot: f64 = x.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
        assert!((lane_sum(&x, |v| v) as f64 - want_sum).abs() < 1e-5);
        assert!((lane_dot(&x, &y) as f64 - want_dot).abs() < 1e-5);
    }
}
