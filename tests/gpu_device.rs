//! The device interface, checked the same way on the emulated device (always) and on a real GPU
//! (`cargo test --release --test gpu_device -- --ignored` on a machine with one): memory operations,
//! launch geometry, barriers, shuffles, votes, block reductions, atomics, bf16/fp16 conversion, GEMM
//! against an f64 host reference, and the AdamW kernel against the op's f64 spec (`optimizer::spec`).
//!
//! Every check generates its own random data; outputs are poisoned before a kernel writes them.

use anyhow::{ensure, Result};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safedpo::backend::cpu::optimizer;
use safedpo::backend::cuda::{kernels, CudaBackend, Device, DeviceBuffer, Gemm, LaunchConfig, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::{AdamWParams, MemoryStats};
use safedpo::kernel_args;

/// One test per check and device: `<name>_emu` runs everywhere, `<name>_gpu` only with `--ignored`.
macro_rules! device_tests {
    ($($check:ident),* $(,)?) => {
        mod on_emu {
            $(#[test]
            fn $check() {
                let device = safedpo::backend::cuda::Device::emulated().unwrap();
                super::$check(&device).unwrap();
            })*
        }
        mod on_gpu {
            $(#[test]
            #[ignore = "needs a GPU"]
            fn $check() {
                let device = safedpo::backend::cuda::Device::gpu(0).unwrap();
                super::$check(&device).unwrap();
            })*
        }
    };
}

device_tests!(
    memory_operations,
    memory_accounting,
    launch_geometry,
    barrier_rounds,
    shared_reload,
    shuffles_follow_cuda_semantics,
    shuffles_of_64_bit_and_bf16_values,
    votes_and_partial_masks,
    block_sum,
    atomics_under_contention,
    conversions_round_to_nearest_even,
    gemm_matches_host_reference,
    adamw_f32_matches_host_reference,
    adamw_bf16_matches_host_reference,
);

/// (kind, sm) of every image in a fatbin: kind 1 is PTX, 2 is a cubin (ELF).
fn fatbin_images(fatbin: &[u8]) -> Vec<(u16, u32)> {
    let u16_at = |p: usize| u16::from_le_bytes(fatbin[p..p + 2].try_into().unwrap());
    let u32_at = |p: usize| u32::from_le_bytes(fatbin[p..p + 4].try_into().unwrap());
    let u64_at = |p: usize| u64::from_le_bytes(fatbin[p..p + 8].try_into().unwrap());
    assert_eq!(u32_at(0), 0xba55_ed50, "not a fatbin");
    let (header, size) = (u16_at(6) as usize, u64_at(8) as usize);
    let mut images = Vec::new();
    let mut pos = header;
    while pos < header + size {
        images.push((u16_at(pos), u32_at(pos + 28)));
        pos += u32_at(pos + 4) as usize + u64_at(pos + 8) as usize;
    }
    images.sort();
    images
}

/// build.rs embeds one fatbin per kernel file with sm_80 and sm_90 cubins and compute_80 PTX. CI
/// (.ci/run) sets SAFEDPO_REQUIRE_NVCC=1 so that a build that silently lost nvcc fails here.
#[test]
fn embedded_fatbins_hold_sm80_sm90_and_ptx() {
    if !kernels::BUILT_WITH_NVCC {
        assert!(
            std::env::var_os("SAFEDPO_REQUIRE_NVCC").is_none(),
            "built without nvcc, but SAFEDPO_REQUIRE_NVCC is set"
        );
        eprintln!("built without nvcc: no fatbins to check");
        return;
    }
    assert!(kernels::NVCC_VERSION.contains("release 13.0"), "kernels built by {}", kernels::NVCC_VERSION);
    let stems: Vec<&str> = kernels::MODULES.iter().map(|(stem, _)| *stem).collect();
    assert!(stems.contains(&"optimizer") && stems.contains(&"selftest"), "{stems:?}");
    for (stem, fatbin) in kernels::MODULES {
        assert_eq!(fatbin_images(fatbin), vec![(1, 80), (2, 80), (2, 90)], "kernels/{stem}.cu");
    }
}

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

fn random_f32(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// A buffer of `len` elements poisoned with NaN, so that an element a kernel fails to write shows.
fn poisoned_f32(device: &Device, len: usize) -> Result<DeviceBuffer<f32>> {
    device.upload(&vec![f32::NAN; len])
}

fn memory_operations(device: &Device) -> Result<()> {
    let mut rng = rng(1);
    let data = random_f32(&mut rng, 1000, -5.0, 5.0);
    let mut buffer = device.upload(&data)?;
    ensure!(device.download(&buffer)? == data, "upload/download round trip");

    // slices: copy a middle range over another, fill and zero sub-ranges
    let mut copy = device.alloc_zeros::<f32>(1000)?;
    ensure!(device.download(&copy)?.iter().all(|&x| x == 0.0), "alloc_zeros");
    device.copy(copy.slice_mut(100..600), buffer.slice(300..800))?;
    device.fill(copy.slice_mut(900..950), 2.5f32)?;
    let host = device.download(&copy)?;
    for (i, &x) in host.iter().enumerate() {
        let expected = match i {
            100..600 => data[i + 200],
            900..950 => 2.5,
            _ => 0.0,
        };
        ensure!(x == expected, "copy/fill: element {i} is {x}, expected {expected}");
    }
    device.zero(buffer.slice_mut(10..20))?;
    let mut part = vec![0f32; 30];
    device.copy_out(buffer.slice(0..30), &mut part)?;
    for (i, &x) in part.iter().enumerate() {
        let expected = if (10..20).contains(&i) { 0.0 } else { data[i] };
        ensure!(x == expected, "zero: element {i} is {x}, expected {expected}");
    }
    device.copy_in(buffer.slice_mut(990..1000), &[7.0; 10])?;
    ensure!(device.download(buffer.slice(990..1000))? == vec![7.0; 10], "copy_in into a slice");

    // 2-byte and 1-byte element types
    let mut halves = device.alloc::<bf16>(33)?;
    device.fill(&mut halves, bf16::from_f32(-1.5))?;
    ensure!(device.download(&halves)?.iter().all(|&x| x == bf16::from_f32(-1.5)), "bf16 fill");
    let mut bytes = device.alloc::<u8>(77)?;
    device.fill(&mut bytes, 0x5au8)?;
    ensure!(device.download(&bytes)?.iter().all(|&x| x == 0x5a), "u8 fill");
    let ids: Vec<i32> = (0..500).map(|_| rng.random_range(-1000..1000)).collect();
    ensure!(device.download(&device.upload(&ids)?)? == ids, "i32 round trip");

    // empty buffers and mismatched lengths
    let empty = device.alloc::<f32>(0)?;
    ensure!(device.download(&empty)?.is_empty(), "empty buffer");
    ensure!(device.copy_in(&mut copy, &data[..10]).is_err(), "a length mismatch must be an error");
    ensure!(device.fill(&mut device.alloc::<u64>(4)?, 1u64).is_err(), "8-byte fill is unsupported");
    device.synchronize()
}

/// The device's count of live buffer bytes: allocation and drop move `current`, `peak` keeps the
/// high-water mark until `reset_peak_memory`; clones share the count; views cost nothing; the CUDA
/// backend reports the same numbers (a bf16 upload holds bf16 values plus an f32 master copy).
fn memory_accounting(device: &Device) -> Result<()> {
    let stats = |current, peak| MemoryStats { current_bytes: current, peak_bytes: peak };
    ensure!(device.memory_stats() == stats(0, 0), "a fresh device holds nothing: {:?}", device.memory_stats());
    let a = device.alloc::<f32>(1000)?;
    let b = device.alloc::<bf16>(333)?;
    let empty = device.alloc::<f32>(0)?;
    ensure!(device.memory_stats() == stats(4666, 4666), "after two allocations: {:?}", device.memory_stats());
    let _views = (a.slice(10..20), b.view(), empty.view());
    drop(a);
    ensure!(device.memory_stats() == stats(666, 4666), "after a drop: {:?}", device.memory_stats());
    let clone = device.clone();
    let c = clone.upload(&[1u8; 10])?;
    ensure!(device.memory_stats() == stats(676, 4666), "a clone's buffer counts: {:?}", device.memory_stats());
    device.reset_peak_memory();
    ensure!(device.memory_stats() == stats(676, 676), "after reset_peak_memory: {:?}", device.memory_stats());
    let d = device.alloc_zeros::<u64>(50)?;
    drop(d);
    ensure!(clone.memory_stats() == stats(676, 1076), "a new peak: {:?}", clone.memory_stats());
    drop((b, c, empty));
    ensure!(device.memory_stats() == stats(0, 1076), "all dropped: {:?}", device.memory_stats());

    let backend = CudaBackend::new(device.clone(), Precision::Bf16);
    backend.reset_peak_memory();
    let zeros = backend.zeros(100)?;
    let weights = backend.upload(&random_f32(&mut rng(2), 30, -1.0, 1.0))?;
    ensure!(backend.memory_stats() == Some(stats(200 + 30 * 6, 200 + 30 * 6)), "backend: {:?}", backend.memory_stats());
    drop((zeros, weights));
    ensure!(backend.memory_stats() == Some(stats(0, 380)), "backend after drops: {:?}", backend.memory_stats());
    Ok(())
}

fn launch_geometry(device: &Device) -> Result<()> {
    let config = LaunchConfig { grid: (3, 2, 2), block: (8, 4, 2), shared_bytes: 0 };
    let (blocks, threads) = (12usize, 64usize);
    let mut out = device.upload(&vec![-7i32; 3 * blocks * threads])?;
    device.launch("selftest_indices", config, &kernel_args![&mut out])?;
    let host = device.download(&out)?;
    for block in 0..blocks {
        for thread in 0..threads {
            let i = block * threads + thread;
            let got = &host[3 * i..3 * i + 3];
            ensure!(got == [block as i32, thread as i32, 3_020_202], "block {block} thread {thread}: got {got:?}");
        }
    }
    Ok(())
}

fn barrier_rounds(device: &Device) -> Result<()> {
    for (blocks, threads, rounds) in [(2u32, 64u32, 5usize), (1, 1024, 3), (3, 96, 4)] {
        let n = threads as usize;
        let mut out = poisoned_f32(device, blocks as usize * rounds * n)?;
        device.launch(
            "selftest_barrier_rounds",
            LaunchConfig::grid_1d(blocks, threads),
            &kernel_args![&mut out, rounds as i32],
        )?;
        let host = device.download(&out)?;
        for b in 0..blocks as usize {
            for r in 0..rounds {
                for tid in 0..n {
                    let expected = (((tid + r + 1) % n) * (r + 1)) as f32;
                    let got = host[(b * rounds + r) * n + tid];
                    ensure!(
                        got == expected,
                        "{threads} threads, block {b} round {r} thread {tid}: {got} != {expected}"
                    );
                }
            }
        }
    }
    Ok(())
}

fn shared_reload(device: &Device) -> Result<()> {
    let mut out = poisoned_f32(device, 2 * 128)?;
    device.launch("selftest_shared_reload", LaunchConfig::grid_1d(1, 128), &kernel_args![&mut out])?;
    let host = device.download(&out)?;
    for tid in 0..128 {
        ensure!(host[2 * tid] == 1.0 && host[2 * tid + 1] == 2.0, "thread {tid}: {:?}", &host[2 * tid..2 * tid + 2]);
    }
    let mut data = device.upload(&[5.0f32])?;
    let mut out = poisoned_f32(device, 2 * 96)?;
    device.launch("selftest_global_reload", LaunchConfig::grid_1d(1, 96), &kernel_args![&mut data, &mut out])?;
    let host = device.download(&out)?;
    for tid in 0..96 {
        ensure!(
            host[2 * tid] == 5.0 && host[2 * tid + 1] == 6.0,
            "global, thread {tid}: {:?}",
            &host[2 * tid..2 * tid + 2]
        );
    }
    Ok(())
}

/// The shuffles as the CUDA Programming Guide defines them, lane by lane within a warp of 32.
fn shuffle_reference(kind: usize, v: &[f32], lane: usize, param: usize, width: usize) -> f32 {
    let group = lane / width * width;
    match kind {
        0 => v[group + param % width],
        1 if lane % width < param => v[lane],
        1 => v[lane - param],
        2 if lane % width + param >= width => v[lane],
        2 => v[lane + param],
        _ if (lane ^ param) >= group + width => v[lane], // later groups are out of reach
        _ => v[lane ^ param],
    }
}

fn shuffles_follow_cuda_semantics(device: &Device) -> Result<()> {
    let mut rng = rng(2);
    let (blocks, threads) = (2usize, 64usize);
    let input = random_f32(&mut rng, blocks * threads, -10.0, 10.0);
    let input_buffer = device.upload(&input)?;
    // (src_lane, delta, lane_mask, width)
    let cases = [
        (0, 1, 1, 32),
        (5, 3, 16, 32),
        (31, 31, 31, 32),
        (7, 0, 0, 32),
        (37, 2, 4, 16),
        (3, 5, 16, 16),
        (9, 1, 2, 8),
        (1, 1, 1, 2),
        (0, 0, 0, 1),
    ];
    for (src_lane, delta, lane_mask, width) in cases {
        let mut out = poisoned_f32(device, blocks * 4 * threads)?;
        device.launch(
            "selftest_shuffles",
            LaunchConfig::grid_1d(blocks as u32, threads as u32),
            &kernel_args![&input_buffer, &mut out, src_lane as i32, delta as u32, lane_mask as i32, width as i32],
        )?;
        let host = device.download(&out)?;
        for b in 0..blocks {
            for warp in 0..threads / 32 {
                let values = &input[b * threads + warp * 32..][..32];
                for lane in 0..32 {
                    let tid = warp * 32 + lane;
                    for (kind, param) in [(0, src_lane), (1, delta), (2, delta), (3, lane_mask)] {
                        let expected = shuffle_reference(kind, values, lane, param, width);
                        let got = host[b * 4 * threads + kind * threads + tid];
                        ensure!(
                            got == expected,
                            "shuffle kind {kind} (idx/up/down/xor) param {param} width {width}: block {b} thread {tid} got \
                             {got}, expected {expected}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

fn shuffles_of_64_bit_and_bf16_values(device: &Device) -> Result<()> {
    let mut rng = rng(3);
    let n = 64;
    let wide: Vec<i64> = (0..n).map(|_| rng.random::<i64>()).collect();
    let narrow: Vec<bf16> = random_f32(&mut rng, n, -3.0, 3.0).into_iter().map(bf16::from_f32).collect();
    let (wide_in, narrow_in) = (device.upload(&wide)?, device.upload(&narrow)?);
    let mut wide_out = device.upload(&vec![0i64; n])?;
    let mut narrow_out = device.upload(&vec![bf16::NAN; n])?;
    device.launch(
        "selftest_shuffle_types",
        LaunchConfig::grid_1d(1, n as u32),
        &kernel_args![&wide_in, &mut wide_out, &narrow_in, &mut narrow_out],
    )?;
    let (wide_got, narrow_got) = (device.download(&wide_out)?, device.download(&narrow_out)?);
    for tid in 0..n {
        let (warp, lane) = (tid / 32 * 32, tid % 32);
        ensure!(wide_got[tid] == wide[warp + (lane + 1) % 32], "i64 shuffle at thread {tid}");
        ensure!(narrow_got[tid].to_bits() == narrow[warp + (lane ^ 1)].to_bits(), "bf16 shuffle at thread {tid}");
    }
    Ok(())
}

fn votes_and_partial_masks(device: &Device) -> Result<()> {
    let mut rng = rng(4);
    let n = 96;
    for density in [0.0, 0.3, 1.0] {
        let pred: Vec<i32> = (0..n).map(|_| (rng.random::<f64>() < density) as i32 * rng.random_range(1..5)).collect();
        let pred_buffer = device.upload(&pred)?;
        let mut out = device.upload(&vec![0xdeadbeefu32; 4 * n])?;
        device.launch("selftest_votes", LaunchConfig::grid_1d(1, n as u32), &kernel_args![&pred_buffer, &mut out])?;
        let host = device.download(&out)?;
        for tid in 0..n {
            let warp = &pred[tid / 32 * 32..][..32];
            let ballot = warp.iter().enumerate().fold(0u32, |acc, (l, &p)| acc | (((p != 0) as u32) << l));
            let any = warp.iter().any(|&p| p != 0) as u32;
            let all = warp.iter().all(|&p| p != 0) as u32;
            let half = if tid % 32 < 16 { &warp[..16] } else { &warp[16..] };
            let half_sum = half.iter().map(|&p| p as u32).sum::<u32>();
            let got = &host[4 * tid..4 * tid + 4];
            ensure!(got == [ballot, any, all, half_sum], "density {density}, thread {tid}: got {got:?}");
        }
    }
    Ok(())
}

fn block_sum(device: &Device) -> Result<()> {
    let mut rng = rng(5);
    let (rows, n) = (5usize, 1000usize);
    let input = random_f32(&mut rng, rows * n, -1.0, 1.0);
    let input_buffer = device.upload(&input)?;
    for threads in [32usize, 256, 1024] {
        let mut out = poisoned_f32(device, rows * threads)?;
        device.launch(
            "selftest_block_sum",
            LaunchConfig::grid_1d(rows as u32, threads as u32),
            &kernel_args![&input_buffer, &mut out, n as i32],
        )?;
        let host = device.download(&out)?;
        for row in 0..rows {
            let exact: f64 = input[row * n..(row + 1) * n].iter().map(|&x| x as f64).sum();
            let first = host[row * threads];
            ensure!((first as f64 - exact).abs() < 1e-4, "{threads} threads, row {row}: {first} vs {exact}");
            for tid in 0..threads {
                ensure!(
                    host[row * threads + tid].to_bits() == first.to_bits(),
                    "{threads} threads, row {row}: thread {tid} got a different sum"
                );
            }
        }
    }
    Ok(())
}

fn atomics_under_contention(device: &Device) -> Result<()> {
    let mut rng = rng(6);
    let n = 5000;
    let values: Vec<i32> = (0..n).map(|_| rng.random_range(-100_000..100_000)).collect();
    let values_buffer = device.upload(&values)?;
    let mut fsum = device.alloc_zeros::<f32>(1)?;
    let mut isum = device.alloc_zeros::<i32>(1)?;
    let mut imax = device.upload(&[i32::MIN])?;
    let mut umax = device.alloc_zeros::<u32>(1)?;
    let mut counter = device.alloc_zeros::<u32>(1)?;
    device.launch(
        "selftest_atomics",
        LaunchConfig::for_elements(n, 128),
        &kernel_args![&values_buffer, n as i32, &mut fsum, &mut isum, &mut imax, &mut umax, &mut counter],
    )?;
    let expected_umax = values.iter().map(|&v| (v as u32).wrapping_mul(2_654_435_761)).max().unwrap();
    ensure!(device.download(&fsum)?[0] == n as f32, "float atomicAdd");
    ensure!(device.download(&isum)?[0] == values.iter().sum::<i32>(), "int atomicAdd");
    ensure!(device.download(&imax)?[0] == *values.iter().max().unwrap(), "int atomicMax");
    ensure!(device.download(&umax)?[0] == expected_umax, "unsigned atomicMax");
    ensure!(device.download(&counter)?[0] == n as u32, "unsigned atomicAdd");
    Ok(())
}

/// f32 values that exercise rounding: random magnitudes, exact bf16 and fp16 ties (both parities),
/// fp16 subnormals and the fp16 overflow threshold, infinities, signed zeros.
fn rounding_inputs(rng: &mut StdRng) -> Vec<f32> {
    let mut values = vec![
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN_POSITIVE,
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        5.96e-8,
        2.98e-8,
        2.99e-8,
        6.1e-5,
    ];
    for _ in 0..2000 {
        let bits: u32 = rng.random();
        let x = f32::from_bits(bits);
        if x.is_finite() {
            values.push(x);
        }
        values.push(rng.random_range(-70000.0..70000.0));
        values.push(rng.random_range(-1e-4..1e-4));
        // a bf16 tie: the 16 dropped bits are exactly 0x8000
        values.push(f32::from_bits((bits & 0xffff_0000 & !0x7f80_0000) | 0x3f80_0000 | 0x8000));
        // an fp16 tie: the 13 dropped bits are exactly 0x1000, exponent within fp16's normal range
        let exponent = rng.random_range(113u32..142) << 23;
        values.push(f32::from_bits((bits & 0x807f_e000) | exponent | 0x1000));
    }
    values
}

fn conversions_round_to_nearest_even(device: &Device) -> Result<()> {
    let mut rng = rng(7);
    let input = rounding_inputs(&mut rng);
    let n = input.len();
    let input_buffer = device.upload(&input)?;
    let mut out_bf16 = device.upload(&vec![bf16::from_bits(0x7fff); n])?;
    let mut back_bf16 = poisoned_f32(device, n)?;
    let mut out_f16 = device.upload(&vec![f16::from_bits(0x7fff); n])?;
    let mut back_f16 = poisoned_f32(device, n)?;
    device.launch(
        "selftest_convert",
        LaunchConfig::for_elements(n, 256),
        &kernel_args![&input_buffer, &mut out_bf16, &mut back_bf16, &mut out_f16, &mut back_f16, n as i32],
    )?;
    let (b, bb, h, hb) = (
        device.download(&out_bf16)?,
        device.download(&back_bf16)?,
        device.download(&out_f16)?,
        device.download(&back_f16)?,
    );
    for (i, &x) in input.iter().enumerate() {
        let (want_b, want_h) = (bf16::from_f32(x), f16::from_f32(x));
        ensure!(
            b[i].to_bits() == want_b.to_bits(),
            "bf16({x:e} = {:#010x}): got {:#06x}, half gives {:#06x}",
            x.to_bits(),
            b[i].to_bits(),
            want_b.to_bits()
        );
        ensure!(bb[i].to_bits() == want_b.to_f32().to_bits(), "bf16 → f32 of {x:e}");
        ensure!(
            h[i].to_bits() == want_h.to_bits(),
            "fp16({x:e} = {:#010x}): got {:#06x}, half gives {:#06x}",
            x.to_bits(),
            h[i].to_bits(),
            want_h.to_bits()
        );
        ensure!(hb[i].to_bits() == want_h.to_f32().to_bits(), "fp16 → f32 of {x:e}");
    }
    Ok(())
}

// ---- GEMM ----------------------------------------------------------------------------------------

/// f64 reference of `alpha·op(A)·op(B) + beta·D + bias`, row-major.
#[allow(clippy::too_many_arguments)]
fn gemm_reference(spec: &Gemm, a: &[f64], b: &[f64], d: &[f64], bias: Option<&[f64]>) -> Vec<f64> {
    let (m, n, k) = (spec.m, spec.n, spec.k);
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0;
            for p in 0..k {
                let av = if spec.trans_a { a[p * m + i] } else { a[i * k + p] };
                let bv = if spec.trans_b { b[j * k + p] } else { b[p * n + j] };
                acc += av * bv;
            }
            out[i * n + j] = spec.alpha as f64 * acc + spec.beta as f64 * d[i * n + j] + bias.map_or(0.0, |v| v[j]);
        }
    }
    out
}

fn gemm_matches_host_reference(device: &Device) -> Result<()> {
    let mut rng = rng(8);
    let (m, n, k) = (37, 29, 53);
    for trans_a in [false, true] {
        for trans_b in [false, true] {
            for (alpha, beta, with_bias) in [(1.0, 0.0, false), (0.5, 1.0, true), (-1.0, 0.25, false)] {
                let spec = Gemm::new(m, n, k).trans_a(trans_a).trans_b(trans_b).alpha(alpha).beta(beta);
                let a = random_f32(&mut rng, m * k, -1.0, 1.0);
                let b = random_f32(&mut rng, k * n, -1.0, 1.0);
                let d0 = random_f32(&mut rng, m * n, -1.0, 1.0);
                let bias = random_f32(&mut rng, n, -1.0, 1.0);
                let what = format!("gemm {spec:?} bias {with_bias}");
                // f32 → f32
                {
                    let (a_dev, b_dev, bias_dev) = (device.upload(&a)?, device.upload(&b)?, device.upload(&bias)?);
                    let mut d_dev = device.upload(&d0)?;
                    device.gemm(&spec, &a_dev, &b_dev, &mut d_dev, with_bias.then(|| bias_dev.view()))?;
                    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
                    let expected = gemm_reference(
                        &spec,
                        &f64s(&a),
                        &f64s(&b),
                        &f64s(&d0),
                        with_bias.then(|| f64s(&bias)).as_deref(),
                    );
                    let got = device.download(&d_dev)?;
                    for (i, (&g, &e)) in got.iter().zip(&expected).enumerate() {
                        ensure!((g as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()), "{what} f32: element {i} {g} vs {e}");
                    }
                }
                // bf16 → bf16 and bf16 → f32: the reference uses the bf16-rounded inputs
                let to_bf16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
                let (a16, b16) = (to_bf16(&a), to_bf16(&b));
                let f64s = |v: &[bf16]| v.iter().map(|x| x.to_f64()).collect::<Vec<_>>();
                let (a_dev, b_dev) = (device.upload(&a16)?, device.upload(&b16)?);
                {
                    let (d16, bias16) = (to_bf16(&d0), to_bf16(&bias));
                    let mut d_dev = device.upload(&d16)?;
                    let bias_dev = device.upload(&bias16)?;
                    device.gemm(&spec, &a_dev, &b_dev, &mut d_dev, with_bias.then(|| bias_dev.view()))?;
                    let expected = gemm_reference(
                        &spec,
                        &f64s(&a16),
                        &f64s(&b16),
                        &f64s(&d16),
                        with_bias.then(|| f64s(&bias16)).as_deref(),
                    );
                    let got = device.download(&d_dev)?;
                    for (i, (&g, &e)) in got.iter().zip(&expected).enumerate() {
                        // one rounding to bf16 (half an ulp, 2^-9 relative) plus f32 accumulation error
                        let tol = e.abs() * 2f64.powi(-8) + 1e-5;
                        ensure!((g.to_f64() - e).abs() <= tol, "{what} bf16→bf16: element {i} {g} vs {e}");
                    }
                }
                {
                    let mut d_dev = device.upload(&d0)?;
                    let bias_dev = device.upload(&bias)?;
                    device.gemm(&spec, &a_dev, &b_dev, &mut d_dev, with_bias.then(|| bias_dev.view()))?;
                    let d0_64: Vec<f64> = d0.iter().map(|&x| x as f64).collect();
                    let bias64: Vec<f64> = bias.iter().map(|&x| x as f64).collect();
                    let expected =
                        gemm_reference(&spec, &f64s(&a16), &f64s(&b16), &d0_64, with_bias.then_some(&bias64[..]));
                    let got = device.download(&d_dev)?;
                    for (i, (&g, &e)) in got.iter().zip(&expected).enumerate() {
                        ensure!(
                            (g as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()),
                            "{what} bf16→f32: element {i} {g} vs {e}"
                        );
                    }
                }
            }
        }
    }
    // mismatched operand sizes are errors, not out-of-bounds accesses
    let a = device.alloc_zeros::<f32>(10)?;
    let mut d = device.alloc_zeros::<f32>(4)?;
    ensure!(device.gemm(&Gemm::new(2, 2, 4), &a, &a, &mut d, None).is_err(), "size mismatch must be an error");
    Ok(())
}

// ---- AdamW ---------------------------------------------------------------------------------------

/// The bias corrections the kernels take, computed in f64 as the backend will.
fn bias_corrections(p: &AdamWParams) -> (f32, f32) {
    ((1.0 - (p.beta1 as f64).powi(p.step as i32)) as f32, (1.0 - (p.beta2 as f64).powi(p.step as i32)) as f32)
}

fn adamw_steps() -> Vec<AdamWParams> {
    (1..=4)
        .map(|step| AdamWParams {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: if step % 2 == 0 { 0.1 } else { 0.0 },
            step,
            grad_scale: if step == 3 { 0.5 } else { 1.0 },
        })
        .collect()
}

fn close(got: f32, expected: f64, rtol: f64, atol: f64) -> bool {
    (got as f64 - expected).abs() <= atol + rtol * expected.abs()
}

fn adamw_f32_matches_host_reference(device: &Device) -> Result<()> {
    let mut rng = rng(9);
    let n = 10_000;
    let param0 = random_f32(&mut rng, n, -1.0, 1.0);
    let (mut param, mut m, mut v) =
        (device.upload(&param0)?, device.alloc_zeros::<f32>(n)?, device.alloc_zeros::<f32>(n)?);
    let mut ref_param: Vec<f64> = param0.iter().map(|&x| x as f64).collect();
    let (mut ref_m, mut ref_v) = (vec![0.0; n], vec![0.0; n]);
    for p in adamw_steps() {
        let grad_host = random_f32(&mut rng, n, -2.0, 2.0);
        let grad = device.upload(&grad_host)?;
        let (bc1, bc2) = bias_corrections(&p);
        // few blocks, so that the grid-stride loop runs several times per thread
        device.launch(
            "adamw_f32",
            LaunchConfig::grid_1d(7, 128),
            &kernel_args![
                &mut param,
                &grad,
                &mut m,
                &mut v,
                n as i64,
                p.lr,
                p.beta1,
                p.beta2,
                p.eps,
                p.weight_decay,
                bc1,
                bc2,
                p.grad_scale
            ],
        )?;
        let grad64: Vec<f64> = grad_host.iter().map(|&x| x as f64).collect();
        optimizer::spec::adamw(&mut ref_param, &grad64, &mut ref_m, &mut ref_v, &p);
        let (got_p, got_m, got_v) = (device.download(&param)?, device.download(&m)?, device.download(&v)?);
        for i in 0..n {
            ensure!(
                close(got_p[i], ref_param[i], 1e-5, 1e-6),
                "step {}: param[{i}] {} vs {}",
                p.step,
                got_p[i],
                ref_param[i]
            );
            ensure!(close(got_m[i], ref_m[i], 1e-5, 1e-7), "step {}: m[{i}] {} vs {}", p.step, got_m[i], ref_m[i]);
            ensure!(close(got_v[i], ref_v[i], 1e-5, 1e-8), "step {}: v[{i}] {} vs {}", p.step, got_v[i], ref_v[i]);
        }
    }
    Ok(())
}

fn adamw_bf16_matches_host_reference(device: &Device) -> Result<()> {
    let mut rng = rng(10);
    let n = 6_000;
    let master0 = random_f32(&mut rng, n, -1.0, 1.0);
    let param0: Vec<bf16> = master0.iter().map(|&x| bf16::from_f32(x)).collect();
    let mut param = device.upload(&param0)?;
    let mut master = device.upload(&master0)?;
    let (mut m, mut v) = (device.alloc_zeros::<f32>(n)?, device.alloc_zeros::<f32>(n)?);
    let mut ref_master: Vec<f64> = master0.iter().map(|&x| x as f64).collect();
    let (mut ref_m, mut ref_v) = (vec![0.0; n], vec![0.0; n]);
    for p in adamw_steps() {
        let grad_host: Vec<bf16> = random_f32(&mut rng, n, -2.0, 2.0).into_iter().map(bf16::from_f32).collect();
        let grad = device.upload(&grad_host)?;
        let (bc1, bc2) = bias_corrections(&p);
        device.launch(
            "adamw_bf16",
            LaunchConfig::for_elements(n, 256),
            &kernel_args![
                &mut param,
                &mut master,
                &grad,
                &mut m,
                &mut v,
                n as i64,
                p.lr,
                p.beta1,
                p.beta2,
                p.eps,
                p.weight_decay,
                bc1,
                bc2,
                p.grad_scale
            ],
        )?;
        let grad64: Vec<f64> = grad_host.iter().map(|x| x.to_f64()).collect();
        optimizer::spec::adamw(&mut ref_master, &grad64, &mut ref_m, &mut ref_v, &p);
        let (got_param, got_master) = (device.download(&param)?, device.download(&master)?);
        let (got_m, got_v) = (device.download(&m)?, device.download(&v)?);
        for i in 0..n {
            ensure!(
                close(got_master[i], ref_master[i], 1e-5, 1e-6),
                "step {}: master[{i}] {} vs {}",
                p.step,
                got_master[i],
                ref_master[i]
            );
            ensure!(close(got_m[i], ref_m[i], 1e-5, 1e-7), "step {}: m[{i}]", p.step);
            ensure!(close(got_v[i], ref_v[i], 1e-5, 1e-8), "step {}: v[{i}]", p.step);
            // the bf16 parameter is the master weight rounded to nearest even, never an accumulation
            ensure!(
                got_param[i].to_bits() == bf16::from_f32(got_master[i]).to_bits(),
                "step {}: param[{i}] {} is not bf16(master {})",
                p.step,
                got_param[i],
                got_master[i]
            );
        }
    }
    Ok(())
}
