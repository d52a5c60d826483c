//! The tensor-core wrappers of kernels/mma.cuh (`mma_m16n8k16_bf16`, `ldmatrix_x4`, `ldmatrix_x2` and
//! their `.trans` forms) against the PTX ISA's fragment tables for `mma.m16n8k16` with bf16 inputs
//! and f32 accumulators, written out here on their own (not taken from the kernels): every lane's
//! registers after each load, and the product C + A·B, exact where the sums are exact. On the
//! emulated device (its test mode: random lane order, race detector) and, ignored, on a GPU.

use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safedpo::backend::cuda::{emu, Device, LaunchConfig};
use safedpo::kernel_args;

/// PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type": with groupID = lane >> 2
/// and threadID_in_group = lane % 4, element a_i (i < 8) of a lane is A[row][col] with
/// row = groupID for a0, a1, a4, a5 and groupID + 8 for a2, a3, a6, a7;
/// col = threadID_in_group · 2 + (i & 1) for i < 4, plus 8 for i ≥ 4.
fn a_element(lane: usize, i: usize) -> (usize, usize) {
    let (group, thread) = (lane >> 2, lane % 4);
    let row = if matches!(i, 0 | 1 | 4 | 5) { group } else { group + 8 };
    let col = thread * 2 + (i & 1) + if i >= 4 { 8 } else { 0 };
    (row, col)
}

/// Element b_i (i < 4): B[row][col] with row (k) = threadID_in_group · 2 + (i & 1), plus 8 for i ≥ 2,
/// and col (n) = groupID.
fn b_element(lane: usize, i: usize) -> (usize, usize) {
    let (group, thread) = (lane >> 2, lane % 4);
    (thread * 2 + (i & 1) + if i >= 2 { 8 } else { 0 }, group)
}

/// Element c_i / d_i (i < 4): row = groupID for c0, c1 and groupID + 8 for c2, c3;
/// col = threadID_in_group · 2 + (i & 1).
fn c_element(lane: usize, i: usize) -> (usize, usize) {
    let (group, thread) = (lane >> 2, lane % 4);
    (group + if i >= 2 { 8 } else { 0 }, thread * 2 + (i & 1))
}

/// Register j of a bf16 fragment holds elements 2j (low 16 bits) and 2j + 1 (high 16 bits).
fn packed(lo: bf16, hi: bf16) -> u32 {
    u32::from(lo.to_bits()) | (u32::from(hi.to_bits()) << 16)
}

/// Runs the selftest kernel on A [16][16], B [16][8] (k, n) and C [16][8]; returns each lane's 12
/// registers and 8 accumulator values.
fn run(device: &Device, a: &[bf16], b: &[bf16], c: &[f32]) -> (Vec<u32>, Vec<f32>) {
    let a_t: Vec<bf16> = (0..256).map(|e| a[(e % 16) * 16 + e / 16]).collect();
    let b_t: Vec<bf16> = (0..128).map(|e| b[(e % 16) * 8 + e / 16]).collect(); // [n][k]
    let [a, a_t, b_t, b] = [a, &a_t[..], &b_t[..], b].map(|m| device.upload(m).unwrap());
    let c = device.upload(c).unwrap();
    let mut regs = device.upload(&[u32::MAX; 32 * 12]).unwrap();
    let mut d = device.upload(&[f32::NAN; 32 * 8]).unwrap();
    device
        .launch(
            "selftest_mma_fragments",
            LaunchConfig::grid_1d(1, 32),
            &kernel_args![&mut regs, &mut d, &a, &a_t, &b_t, &b, &c],
        )
        .unwrap();
    (device.download(&regs).unwrap(), device.download(&d).unwrap())
}

/// Every lane's registers and accumulators against the tables above, for A, B, C given row-major.
fn check_fragments(device: &Device, a: &[f32], b: &[f32], c: &[f32], exact: bool) {
    let (a16, b16): (Vec<bf16>, Vec<bf16>) =
        (a.iter().map(|&x| bf16::from_f32(x)).collect(), b.iter().map(|&x| bf16::from_f32(x)).collect());
    let (regs, d) = run(device, &a16, &b16, c);
    for lane in 0..32 {
        let mine = &regs[lane * 12..][..12];
        for j in 0..4 {
            let (lo, hi) = (a_element(lane, 2 * j), a_element(lane, 2 * j + 1));
            let want = packed(a16[lo.0 * 16 + lo.1], a16[hi.0 * 16 + hi.1]);
            assert_eq!(mine[j], want, "lane {lane}: A register {j} by ldmatrix.x4 (a{}, a{})", 2 * j, 2 * j + 1);
            assert_eq!(mine[4 + j], want, "lane {lane}: A register {j} by ldmatrix.x4.trans of Aᵀ");
        }
        for j in 0..2 {
            let (lo, hi) = (b_element(lane, 2 * j), b_element(lane, 2 * j + 1));
            let want = packed(b16[lo.0 * 8 + lo.1], b16[hi.0 * 8 + hi.1]);
            assert_eq!(
                mine[8 + j],
                want,
                "lane {lane}: B register {j} by ldmatrix.x2 of Bᵀ (b{}, b{})",
                2 * j,
                2 * j + 1
            );
            assert_eq!(mine[10 + j], want, "lane {lane}: B register {j} by ldmatrix.x2.trans of B");
        }
        for i in 0..4 {
            let (row, col) = c_element(lane, i);
            let want = f64::from(c[row * 8 + col])
                + (0..16).map(|k| f64::from(a16[row * 16 + k]) * f64::from(b16[k * 8 + col])).sum::<f64>();
            for (copy, got) in [d[lane * 8 + i], d[lane * 8 + 4 + i]].into_iter().enumerate() {
                let what = format!("lane {lane}: d{i} = D[{row}][{col}] (operands loaded by form {copy})");
                if exact {
                    assert_eq!(f64::from(got), want, "{what}");
                } else {
                    let tol = 1e-6 * (1.0 + want.abs());
                    assert!((f64::from(got) - want).abs() <= tol, "{what}: {got} vs {want}");
                }
            }
        }
    }
}

fn mma_fragments(device: &Device) {
    let mut rng = StdRng::seed_from_u64(12);
    // Small integers: every sum exact in f32, so the product must be exact; all distinct enough that
    // a misplaced element changes some entry.
    let ints = |rng: &mut StdRng, n: usize| (0..n).map(|_| rng.random_range(-8i32..=8) as f32).collect::<Vec<_>>();
    let (a, b, c) = (ints(&mut rng, 256), ints(&mut rng, 128), ints(&mut rng, 128));
    check_fragments(device, &a, &b, &c, true);
    // Every element distinct (its index), for the registers; the sums stay exact (< 2^24).
    let a: Vec<f32> = (0..256).map(|e| e as f32).collect();
    let b: Vec<f32> = (0..128).map(|e| -(e as f32)).collect();
    check_fragments(device, &a, &b, &vec![0.5; 128], true);
    // Random values: the f32 sum of exact products, within f32 rounding of the f64 product.
    let normal = |rng: &mut StdRng, n: usize| (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect::<Vec<_>>();
    let (a, b, c) = (normal(&mut rng, 256), normal(&mut rng, 128), normal(&mut rng, 128));
    check_fragments(device, &a, &b, &c, false);
}

#[test]
fn mma_fragments_match_the_ptx_tables_on_the_emulated_device() {
    emu::use_test_mode(); // random lane order, race detector
    mma_fragments(&Device::emulated().unwrap());
}

#[test]
#[ignore = "needs a GPU"]
fn mma_fragments_match_the_ptx_tables_on_a_gpu() {
    mma_fragments(&Device::gpu(0).unwrap());
}
