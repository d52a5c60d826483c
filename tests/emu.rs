//! The emulated device's own guarantees (the checks shared with a GPU are in tests/gpu_device.rs):
//! NaN-poisoned memory, misuse that must fail loudly with the kernel's name, argument and pointer
//! checks, out-of-bounds writes, launch limits, the kernel registry, device selection, concurrent
//! launches, the cost of a context switch, the shared-memory race detector against the deliberately
//! racy kernels of kernels/selftest_races.cu, and the random schedule of the test mode.

use std::str::FromStr;

use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safedpo::backend::cuda::{emu, Device, KernelArg, LaunchConfig};
use safedpo::backend::device::{gpu_unavailable_reason, select_device, DeviceKind, Selection};
use safedpo::kernel_args;

fn emu_device() -> Device {
    emu::use_test_mode();
    Device::emulated().unwrap()
}

/// Launches `kernel` and returns its error message (the launch must fail).
fn launch_error(device: &Device, kernel: &str, config: LaunchConfig, args: &[KernelArg]) -> String {
    match device.launch(kernel, config, args) {
        Ok(()) => panic!("launching `{kernel}` with {config:?} should have failed"),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_contains(message: &str, fragments: &[&str]) {
    for fragment in fragments {
        assert!(message.contains(fragment), "expected {fragment:?} in the error:\n{message}");
    }
}

/// A kernel that works, to show the emulator recovers after a failed launch.
fn assert_still_works(device: &Device) {
    let mut out = device.upload(&vec![f32::NAN; 2 * 64]).unwrap();
    device.launch("selftest_shared_reload", LaunchConfig::grid_1d(1, 64), &kernel_args![&mut out]).unwrap();
    let host = device.download(&out).unwrap();
    assert!(host.chunks(2).all(|pair| pair == [1.0, 2.0]), "emulator broken after a failed launch: {host:?}");
}

#[test]
fn registry_knows_every_kernel_and_its_signature() {
    let names = emu::kernel_names();
    for name in ["adamw_f32", "adamw_bf16", "selftest_shuffles", "selftest_bad_assert"] {
        assert!(names.iter().any(|n| n == name), "{name} missing from {names:?}");
    }
    let adamw = emu::kernel_signature("adamw_bf16").unwrap();
    // param, master, grad, m, v: pointers; n: long long; then eight floats
    assert_eq!(adamw.signature, "pppppl".to_string() + &"f".repeat(8));
    assert_eq!(adamw.unit, "optimizer");
    let shuffles = emu::kernel_signature("selftest_shuffles").unwrap();
    assert_eq!(shuffles.signature, "ppiuii");
    let err = emu::kernel_signature("no_such_kernel").unwrap_err().to_string();
    assert_contains(&err, &["no_such_kernel"]);
    let device = emu_device();
    assert!(device.has_kernel("adamw_f32") && !device.has_kernel("adamw_f64"));
}

#[test]
fn device_and_buffers_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Device>();
    assert_send_sync::<safedpo::backend::cuda::DeviceBuffer<f32>>();
    assert_send_sync::<safedpo::backend::cuda::DeviceBuffer<bf16>>();
}

#[test]
fn fresh_buffers_hold_nan() {
    let device = emu_device();
    let floats = device.alloc::<f32>(1000).unwrap();
    assert!(device.download(&floats).unwrap().iter().all(|x| x.is_nan()));
    let halves = device.alloc::<bf16>(333).unwrap();
    assert!(device.download(&halves).unwrap().iter().all(|x| x.is_nan()));
}

#[test]
fn reading_unwritten_shared_memory_gives_nan_in_every_block() {
    let device = emu_device();
    let (blocks, threads, written) = (3usize, 256usize, 100usize);
    let mut out_static = device.upload(&vec![0f32; blocks * threads]).unwrap();
    let mut out_dynamic = device.upload(&vec![0f32; blocks * threads]).unwrap();
    let config = LaunchConfig::grid_1d(blocks as u32, threads as u32).with_shared_bytes((threads * 4) as u32);
    device
        .launch("selftest_uninit_shared", config, &kernel_args![&mut out_static, &mut out_dynamic, written as i32])
        .unwrap();
    for (what, host) in
        [("static", device.download(&out_static).unwrap()), ("dynamic", device.download(&out_dynamic).unwrap())]
    {
        for block in 0..blocks {
            for tid in 0..threads {
                let got = host[block * threads + tid];
                if tid < written {
                    assert_eq!(got, tid as f32, "{what} shared, block {block}, thread {tid}");
                } else if block == 0 {
                    // block 0 wrote -1 everywhere in an earlier phase of the same block
                    assert_eq!(got, -1.0, "{what} shared, block 0, thread {tid}");
                } else {
                    assert!(got.is_nan(), "{what} shared, block {block}, thread {tid}: read {got} from a slot no thread of this block wrote");
                }
            }
        }
    }
}

#[test]
fn syncthreads_skipped_by_exited_threads_fails() {
    let device = emu_device();
    let mut out = device.alloc::<f32>(64).unwrap();
    let err =
        launch_error(&device, "selftest_bad_barrier_exit", LaunchConfig::grid_1d(2, 64), &kernel_args![&mut out, 16]);
    assert_contains(
        &err,
        &[
            "selftest_bad_barrier_exit",
            "selftest.cu",
            "of grid (2,1,1)",
            "__syncthreads reached by 48 of 64 threads",
            "exited",
        ],
    );
    // the test mode runs the blocks in a random order: the error names whichever failed first
    assert!(err.contains("block (0,0,0)") || err.contains("block (1,0,0)"), "no block named in: {err}");
    assert_still_works(&device);
    // when every thread exits before the barrier, nobody waits: not an error
    device.launch("selftest_bad_barrier_exit", LaunchConfig::grid_1d(1, 64), &kernel_args![&mut out, 64]).unwrap();
}

#[test]
fn syncthreads_at_different_call_sites_fails() {
    let device = emu_device();
    let mut out = device.alloc::<f32>(128).unwrap();
    let err =
        launch_error(&device, "selftest_bad_barrier_sites", LaunchConfig::grid_1d(1, 128), &kernel_args![&mut out]);
    assert_contains(&err, &["selftest_bad_barrier_sites", "different barriers"]);
    assert_still_works(&device);
    // a single warp takes one branch only: fine
    device
        .launch("selftest_bad_barrier_sites", LaunchConfig::grid_1d(1, 32), &kernel_args![&mut out.slice_mut(0..32)])
        .unwrap();
}

#[test]
fn warp_masks_and_deadlocks_fail() {
    let device = emu_device();
    let mut out = device.alloc::<f32>(64).unwrap();
    let err = launch_error(&device, "selftest_bad_mask", LaunchConfig::grid_1d(1, 32), &kernel_args![&mut out]);
    assert_contains(&err, &["selftest_bad_mask", "__shfl_xor_sync", "0xfffffffe", "leaves out the calling lane 0"]);
    assert_still_works(&device);
    let err =
        launch_error(&device, "selftest_bad_warp_deadlock", LaunchConfig::grid_1d(1, 64), &kernel_args![&mut out]);
    assert_contains(&err, &["selftest_bad_warp_deadlock", "deadlock", "waits at __syncthreads", "__shfl_xor_sync"]);
    assert_still_works(&device);
}

/// CUDA lets lanes exit before a warp intrinsic (the rest complete it without them), and a partial
/// warp's missing lanes count as exited; reading such a lane is undefined, so the emulator gives NaN.
#[test]
fn exited_and_missing_lanes_take_no_part_in_warp_intrinsics() {
    let device = emu_device();
    let mut out = device.upload(&vec![-1.0f32; 64]).unwrap();
    device.launch("selftest_warp_exit", LaunchConfig::grid_1d(1, 64), &kernel_args![&mut out]).unwrap();
    let host = device.download(&out).unwrap();
    for (tid, &value) in host.iter().enumerate() {
        let lane = tid % 32;
        match lane {
            0 => assert_eq!(value, -1.0, "lane 0 exited without writing"),
            1 => assert!(value.is_nan(), "thread {tid} read its exited partner: {value}"),
            _ => assert_eq!(value, (lane ^ 1) as f32, "thread {tid}"),
        }
    }
    // 48 threads: the second warp has 16 lanes; a full-warp sum there reads missing lanes
    let mut sums = device.upload(&[0f32; 48]).unwrap();
    device.launch("selftest_shuffle_loop", LaunchConfig::grid_1d(1, 48), &kernel_args![&mut sums, 1]).unwrap();
    let host = device.download(&sums).unwrap();
    assert!(host[..32].iter().all(|&s| s == (0..32).sum::<i32>() as f32), "{:?}", &host[..32]);
    assert!(host[32..].iter().all(|s| s.is_nan()), "{:?}", &host[32..]);
}

#[test]
fn device_assert_fails_the_launch() {
    let device = emu_device();
    let mut values = vec![1i32; 64];
    values[37] = -5;
    let values = device.upload(&values).unwrap();
    let err = launch_error(&device, "selftest_bad_assert", LaunchConfig::grid_1d(1, 64), &kernel_args![&values]);
    assert_contains(
        &err,
        &["selftest_bad_assert", "thread (37,0,0)", "assertion `values[threadIdx.x] >= 0` failed", "selftest.cu:"],
    );
    assert_still_works(&device);
}

#[test]
fn launch_arguments_are_checked_against_the_signature() {
    let device = emu_device();
    let mut out = device.alloc::<f32>(64).unwrap();
    let config = LaunchConfig::grid_1d(1, 64);
    let err = launch_error(&device, "selftest_bad_barrier_exit", config, &kernel_args![&mut out]);
    assert_contains(&err, &["takes 2 arguments, the launch passed 1"]);
    let err = launch_error(&device, "selftest_bad_barrier_exit", config, &kernel_args![&mut out, 3i64]);
    assert_contains(&err, &["argument 1", "expected int (i32), got long long (i64)"]);
    let err = launch_error(&device, "selftest_bad_barrier_exit", config, &kernel_args![1.0f32, 3]);
    assert_contains(&err, &["argument 0", "expected a pointer"]);
    // a pointer into another device's buffer, and one into a freed buffer
    let other = emu_device();
    let foreign = other.alloc::<f32>(64).unwrap();
    let err = launch_error(&device, "selftest_bad_barrier_exit", config, &kernel_args![&foreign, 64]);
    assert_contains(&err, &["argument 0", "not inside a live buffer"]);
    let freed = device.alloc::<f32>(64).unwrap().device_ptr();
    let err = launch_error(&device, "selftest_bad_barrier_exit", config, &[KernelArg::Ptr(freed), KernelArg::I32(64)]);
    assert_contains(&err, &["not inside a live buffer"]);
    let err = launch_error(&device, "selftest_nonexistent", config, &[]);
    assert_contains(&err, &["no kernel named `selftest_nonexistent`"]);
}

#[test]
fn writes_past_the_end_of_a_buffer_are_reported() {
    let device = emu_device();
    // 2 blocks of 5 threads write 3 ints each (120 bytes); the buffer holds one int less
    let mut short = device.alloc::<i32>(29).unwrap();
    let config = LaunchConfig::grid_1d(2, 5);
    let err = launch_error(&device, "selftest_indices", config, &kernel_args![&mut short]);
    assert_contains(&err, &["selftest_indices", "wrote past the end of the buffer", "116 bytes"]);
    let mut exact = device.alloc::<i32>(30).unwrap();
    device.launch("selftest_indices", config, &kernel_args![&mut exact]).unwrap();
}

#[test]
fn launch_limits_are_the_gpus() {
    let device = emu_device();
    let mut out = device.alloc::<f32>(2048).unwrap();
    let err = launch_error(&device, "selftest_sync_loop", LaunchConfig::grid_1d(1, 1025), &kernel_args![&mut out, 1]);
    assert_contains(&err, &["invalid block (1025,1,1)"]);
    let err = launch_error(&device, "selftest_sync_loop", LaunchConfig::grid_1d(0, 32), &kernel_args![&mut out, 1]);
    assert_contains(&err, &["invalid grid (0,1,1)"]);
    let config = LaunchConfig::grid_1d(1, 32).with_shared_bytes(200 * 1024);
    let err = launch_error(&device, "selftest_sync_loop", config, &kernel_args![&mut out, 1]);
    assert_contains(&err, &["dynamic shared memory"]);
}

#[test]
fn concurrent_launches_from_many_threads_stay_correct() {
    std::thread::scope(|scope| {
        for seed in 0..4u64 {
            scope.spawn(move || {
                let device = emu_device();
                let mut rng = StdRng::seed_from_u64(seed);
                for _ in 0..5 {
                    let n: usize = rng.random_range(100..3000);
                    let input: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let input_buffer = device.upload(&input).unwrap();
                    let mut out = device.upload(&vec![f32::NAN; 256]).unwrap();
                    device
                        .launch(
                            "selftest_block_sum",
                            LaunchConfig::grid_1d(1, 256),
                            &kernel_args![&input_buffer, &mut out, n as i32],
                        )
                        .unwrap();
                    let exact: f64 = input.iter().map(|&x| x as f64).sum();
                    let got = device.download(&out).unwrap();
                    assert!(
                        got.iter().all(|&s| (s as f64 - exact).abs() < 1e-4),
                        "thread {seed}: {} vs {exact}",
                        got[0]
                    );
                }
            });
        }
    });
}

/// The block reductions of kernels/common.cuh called back to back (max, max, sum, sum): right values,
/// and no shared-memory race between one call's reads and the next call's writes (each helper ends
/// with a barrier for this; removing it fails here under the race detector).
#[test]
fn block_reductions_called_back_to_back() {
    let device = emu_device();
    let mut rng = StdRng::seed_from_u64(11);
    for threads in [32usize, 96, 256] {
        let input: Vec<f32> = (0..threads).map(|_| rng.random_range(-1.0..1.0)).collect();
        let input_buffer = device.upload(&input).unwrap();
        let mut out = device.upload(&vec![f32::NAN; 4 * threads]).unwrap();
        device
            .launch(
                "selftest_block_reduce_twice",
                LaunchConfig::grid_1d(1, threads as u32),
                &kernel_args![&input_buffer, &mut out],
            )
            .unwrap();
        let max = input.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let min = input.iter().cloned().fold(f32::INFINITY, f32::min);
        let sum: f64 = input.iter().map(|&x| x as f64).sum();
        let got = device.download(&out).unwrap();
        for (tid, r) in got.chunks(4).enumerate() {
            assert_eq!((r[0], r[1]), (max, -min), "{threads} threads, thread {tid}: max and max of -v");
            assert!(
                (r[2] as f64 - sum).abs() < 1e-4 && (r[3] as f64 + sum).abs() < 1e-4,
                "{threads} threads, thread {tid}: {r:?} vs sum {sum}"
            );
        }
    }
}

#[test]
fn device_selection() {
    assert_eq!(DeviceKind::from_str("EMU").unwrap(), DeviceKind::Emu);
    assert_eq!(DeviceKind::from_str("gpu").unwrap(), DeviceKind::Cuda);
    assert_eq!("auto".parse::<DeviceKind>().unwrap().to_string(), "auto");
    assert!(DeviceKind::from_str("tpu").unwrap_err().to_string().contains("auto, cpu, cuda, emu"));
    assert!(matches!(select_device(DeviceKind::Cpu).unwrap(), Selection::Cpu { reason: None }));
    match select_device(DeviceKind::Emu).unwrap() {
        Selection::Device(device) => assert!(device.is_emulated() && device.kind() == DeviceKind::Emu),
        Selection::Cpu { .. } => panic!("--device emu must give the emulated device"),
    }
    match gpu_unavailable_reason() {
        Some(reason) => {
            assert!(matches!(select_device(DeviceKind::Auto).unwrap(), Selection::Cpu { reason: Some(_) }));
            let err = select_device(DeviceKind::Cuda).err().expect("--device cuda without a GPU must fail");
            assert!(err.to_string().contains(&reason), "{err}");
        }
        None => assert!(matches!(select_device(DeviceKind::Auto).unwrap(), Selection::Device(_))),
    }
}

/// Measures what a barrier and a warp shuffle cost on the emulator in CPU time (printed with
/// --nocapture), and checks the switch counter against the work the kernel must have done.
#[test]
fn context_switch_cost() {
    let device = emu_device();
    let (threads, rounds) = (1024usize, 100usize);
    let mut out = device.alloc::<f32>(threads).unwrap();
    let config = LaunchConfig::grid_1d(1, threads as u32);
    let before = emu::counters();
    device.launch("selftest_sync_loop", config, &kernel_args![&mut out, rounds as i32]).unwrap();
    let after = emu::counters();
    // every thread is resumed once at the start and once after each of the 2·rounds barriers
    // (the counters are process-wide and other tests may launch concurrently: at least this many)
    let resumes = after.resumes - before.resumes;
    assert!(resumes >= (threads * (2 * rounds + 1)) as u64, "{resumes} resumes");
    let host = device.download(&out).unwrap();
    for (tid, &acc) in host.iter().enumerate() {
        let expected: f32 = (0..rounds).map(|r| ((tid + 1) % threads + r) as f32).sum();
        assert_eq!(acc, expected, "thread {tid}");
    }
    let barrier_ns = (after.cpu_ns - before.cpu_ns) as f64 / (threads * 2 * rounds) as f64;

    let before = emu::counters();
    device.launch("selftest_shuffle_loop", config, &kernel_args![&mut out, rounds as i32]).unwrap();
    let after = emu::counters();
    let shuffle_ns = (after.cpu_ns - before.cpu_ns) as f64 / (threads * 5 * rounds) as f64;
    eprintln!(
        "emulator ({}): {barrier_ns:.0} ns CPU per thread per __syncthreads, {shuffle_ns:.0} ns per lane per shuffle \
         ({threads} threads, {rounds} rounds; upper bounds when other tests launch concurrently)",
        emu::context_switch_kind()
    );
}

/// Runs `kernel(out, x, fixed)` (x = 0, 1, 2, …) on one block of `threads` threads; the error, if any.
fn run_race_kernel(
    kernel: &str,
    blocks: u32,
    threads: u32,
    shared_bytes: u32,
    fixed: bool,
) -> Result<Vec<f32>, String> {
    let device = emu_device();
    let n = (blocks * threads * 2) as usize;
    let x = device.upload(&(0..n).map(|i| i as f32).collect::<Vec<_>>()).unwrap();
    let mut out = device.upload(&vec![f32::NAN; n]).unwrap();
    let config = LaunchConfig::grid_1d(blocks, threads).with_shared_bytes(shared_bytes);
    let launched = if kernel == "selftest_race_tile_reuse" {
        device.launch(kernel, config, &kernel_args![&mut out, &x, 2i32, fixed as i32])
    } else {
        device.launch(kernel, config, &kernel_args![&mut out, &x, fixed as i32])
    };
    match launched {
        Ok(()) => Ok(device.download(&out).unwrap()),
        Err(e) => Err(format!("{e:#}")),
    }
}

#[test]
fn race_detector_is_on_in_the_test_mode() {
    let _device = emu_device();
    if std::env::var_os("SAFEDPO_EMU_RACECHECK").is_none() {
        assert!(emu::racecheck_enabled());
    }
}

#[test]
fn race_detector_reports_the_planted_races() {
    let _device = emu_device();
    if !emu::racecheck_enabled() {
        return; // SAFEDPO_EMU_RACECHECK=0
    }
    // kernel, blocks, threads, dynamic shared bytes, what the error must name
    let cases: [(&str, u32, u32, u32, &[&str]); 5] = [
        ("selftest_race_reduction", 2, 256, 0, &["selftest_race_reduction", "partial"]),
        ("selftest_race_tile_reuse", 1, 128, 0, &["selftest_race_tile_reuse", "tile"]),
        ("selftest_race_warp_exchange", 1, 32, 0, &["lanes", "same warp"]),
        ("selftest_race_warp_collective", 1, 32, 0, &["lanes", "same warp"]),
        ("selftest_race_dynamic", 1, 64, 256, &["dynamic shared memory offset"]),
    ];
    for (kernel, blocks, threads, shared, names) in cases {
        let err = run_race_kernel(kernel, blocks, threads, shared, false).expect_err(kernel);
        assert_contains(&err, &[kernel, "shared-memory race", "this thread", "thread (", "with no __syncthreads"]);
        assert_contains(&err, names);
        assert!(
            ["read after write", "write after read", "write after write"].iter().any(|kind| err.contains(kind)),
            "no race kind in: {err}"
        );
    }
    assert_still_works(&emu_device());
}

#[test]
fn race_detector_passes_the_synchronised_twins() {
    let n = |i: usize| i as f32;
    let sum = |lo: usize, len: usize| (lo..lo + len).map(|i| i as f32).sum::<f32>();
    let out = run_race_kernel("selftest_race_reduction", 2, 256, 0, true).unwrap();
    assert_eq!(&out[..2], &[sum(0, 256), sum(256, 256)]);
    let out = run_race_kernel("selftest_race_tile_reuse", 1, 128, 0, true).unwrap();
    assert!((0..128).all(|t| out[t] == n((t + 1) % 128) + n(128 + (t + 1) % 128)), "{out:?}");
    for kernel in ["selftest_race_warp_exchange", "selftest_race_warp_collective"] {
        let out = run_race_kernel(kernel, 1, 32, 0, true).unwrap();
        assert!((0..32).all(|l| out[l] == n(l ^ 1)), "{kernel}: {out:?}");
    }
    let out = run_race_kernel("selftest_race_dynamic", 1, 64, 256, true).unwrap();
    assert!((0..64).all(|t| out[t] == n((t + 1) % 64)), "{out:?}");
    // two threads writing the two bf16 halves of one word in one phase do not race
    let out = run_race_kernel("selftest_race_bf16_halves", 1, 256, 0, false).unwrap();
    assert!((0..256).all(|t| out[t] == n(t ^ 1)), "{out:?}");
}

#[test]
fn test_mode_runs_blocks_and_threads_in_random_orders() {
    let device = emu_device();
    let (blocks, threads) = (4usize, 96usize);
    let order = || {
        let mut ticket = device.upload(&vec![-1i32; blocks * threads]).unwrap();
        let mut counter = device.upload(&[0i32]).unwrap();
        let config = LaunchConfig::grid_1d(blocks as u32, threads as u32);
        device.launch("selftest_schedule_order", config, &kernel_args![&mut ticket, &mut counter]).unwrap();
        device.download(&ticket).unwrap()
    };
    let (first, second) = (order(), order());
    for tickets in [&first, &second] {
        let mut sorted = tickets.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..(blocks * threads) as i32).collect::<Vec<_>>(), "every thread ran once");
        // in order, thread i of block b would hold ticket b·threads + i
        assert!(tickets.iter().enumerate().any(|(i, &t)| t != i as i32), "random schedule ran in order: {tickets:?}");
    }
    assert_ne!(first, second, "two launches ran in the same order");
}
