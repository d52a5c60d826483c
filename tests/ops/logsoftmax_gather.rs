//! The fused log-softmax-gather and the per-sequence sum: against the spec and its finite
//! differences, on ordinary rows, rows near 1e4 and a large vocabulary; the softmax's log squared mass
//! (`_sq`, WPO's) against the spec, beside log-probs bit-identical to the plain forward's; the CUDA
//! backend against the CPU.

use half::bf16;
use rand::Rng;
use safedpo::backend::cpu::logsoftmax_gather::spec;
use safedpo::backend::cuda::{CudaBackend, CudaBuf, Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::Packing;

use crate::common::*;
use crate::device::Fixture;
use crate::{backend, packing};

/// Logits with a mix of scales: ordinary rows, rows near 1e4, and a row with one huge logit.
fn lsg_inputs(r: &mut impl Rng, lens: &[usize], v: usize) -> (Vec<f32>, Vec<i32>) {
    let n: usize = lens.iter().sum();
    let mut logits = randn(r, n * v, 3.0);
    for t in (0..n).step_by(5) {
        logits[t * v..(t + 1) * v].iter_mut().for_each(|x| *x += 1e4);
    }
    if n > 3 {
        logits[3 * v..4 * v].fill(0.0);
        logits[3 * v + v / 2] = 1e4;
    }
    let mut targets = rand_ids(r, n, v);
    for (t, target) in targets.iter_mut().enumerate() {
        if t % 4 == 1 {
            *target = -1;
        }
    }
    (logits, targets)
}

#[test]
fn logsoftmax_gather_forward_matches_twin() {
    let be = backend();
    let mut r = rng(12);
    let (lens, v) = ([4usize, 1, 9, 7, 2], 37);
    let n: usize = lens.iter().sum();
    let (logits, targets) = lsg_inputs(&mut r, &lens, v);
    let (mut lp, mut lse) = (poison(n), poison(n));
    be.logsoftmax_gather_forward(&mut lp, &mut lse, &logits, &targets, n, v).unwrap();
    let (want_lp, want_lse) = spec::forward(&to_f64(&logits), &targets, v);
    assert_close("lse", &lse, &want_lse, 1e-6, 1e-6);
    assert_close("token_logp", &lp, &want_lp, 1e-5, 1e-5);
    for (t, &target) in targets.iter().enumerate() {
        if target == -1 {
            assert_eq!(lp[t], 0.0, "token_logp[{t}] has no target and must be 0");
        }
    }

    let pk = packing(&be, &lens);
    let mut seq = poison(lens.len());
    be.sequence_logp_sum(&mut seq, &lp, &pk).unwrap();
    assert_close("seq_logp", &seq, &spec::sequence_sums(&to_f64(&lp), &lens), 1e-6, 0.0);
}

#[test]
fn logsoftmax_gather_forward_large_vocab_is_accurate() {
    let be = backend();
    let mut r = rng(13);
    let (n, v) = (6, 50_257);
    let logits = randn(&mut r, n * v, 4.0);
    let targets = rand_ids(&mut r, n, v);
    let (mut lp, mut lse) = (poison(n), poison(n));
    be.logsoftmax_gather_forward(&mut lp, &mut lse, &logits, &targets, n, v).unwrap();
    let (want_lp, want_lse) = spec::forward(&to_f64(&logits), &targets, v);
    assert_close("lse (V = 50257)", &lse, &want_lse, 1e-6, 0.0);
    assert_close("token_logp (V = 50257)", &lp, &want_lp, 1e-5, 0.0);
}

#[test]
fn logsoftmax_gather_forward_sq_matches_twin_and_keeps_the_forwards_bits() {
    let be = backend();
    let mut r = rng(16);
    for (lens, v) in [(vec![4usize, 1, 9, 7, 2], 37), (vec![2, 3], 50_257)] {
        let n: usize = lens.iter().sum();
        let (logits, targets) = lsg_inputs(&mut r, &lens, v);
        let (mut lp, mut lse, mut sq) = (poison(n), poison(n), poison(n));
        be.logsoftmax_gather_forward_sq(&mut lp, &mut lse, &mut sq, &logits, &targets, n, v).unwrap();
        let (_, _, want_sq) = spec::forward_sq(&to_f64(&logits), &targets, v);
        assert_close(&format!("log_sum_sq (V = {v})"), &sq, &want_sq, 1e-5, 2e-6);
        let (mut plain_lp, mut plain_lse) = (poison(n), poison(n));
        be.logsoftmax_gather_forward(&mut plain_lp, &mut plain_lse, &logits, &targets, n, v).unwrap();
        assert_bitwise_eq("token_logp beside the squared mass", &lp, &plain_lp);
        assert_bitwise_eq("lse beside the squared mass", &lse, &plain_lse);
    }
    // A row with one huge logit has all its mass there: log Σ p² = 0.
    let mut row = vec![0.0f32; 40];
    row[7] = 1e4;
    let (mut lp, mut lse, mut sq) = (poison(1), poison(1), poison(1));
    be.logsoftmax_gather_forward_sq(&mut lp, &mut lse, &mut sq, &row, &vec![7], 1, 40).unwrap();
    assert_eq!((lp[0], sq[0]), (0.0, 0.0));
    let err = be.logsoftmax_gather_forward_sq(&mut lp, &mut lse, &mut poison(2), &row, &vec![7], 1, 40).unwrap_err();
    assert!(format!("{err:#}").contains("log_sum_sq"), "{err:#}");
}

#[test]
fn logsoftmax_gather_backward_matches_finite_differences() {
    let be = backend();
    let mut r = rng(14);
    let (lens, v) = ([4usize, 1, 9, 7, 2], 37);
    let n: usize = lens.iter().sum();
    let pk = packing(&be, &lens);
    let (logits, targets) = lsg_inputs(&mut r, &lens, v);
    let dseq = randn(&mut r, lens.len(), 1.0);
    let (mut lp, mut lse) = (poison(n), poison(n));
    be.logsoftmax_gather_forward(&mut lp, &mut lse, &logits, &targets, n, v).unwrap();
    let mut grad = logits.clone();
    be.logsoftmax_gather_backward(&mut grad, &lse, &targets, &dseq, &pk, n, v).unwrap();

    let w = to_f64(&dseq);
    let loss = |x: &[f64]| weighted_sum(&w, &spec::sequence_sums(&spec::forward(x, &targets, v).0, &lens));
    // A step of 1e-3 still resolves rows near 1e4 in f64.
    let want = fd_grad(loss, &to_f64(&logits), 1e-3);
    // Rows near 1e4 hold lse rounded to f32 (≈ 5e-4 absolute), hence the absolute tolerance.
    assert_close("dlogits", &grad, &want, 1e-4, 2e-3);
    for (t, &target) in targets.iter().enumerate() {
        if target == -1 {
            assert!(grad[t * v..(t + 1) * v].iter().all(|&x| x == 0.0), "row {t} has no target and must be zeros");
        }
    }
    // Ordinary-scale rows are held to a tight tolerance.
    let ordinary: Vec<usize> = (0..n).filter(|t| t % 5 != 0 && *t != 3).collect();
    let pick = |g: &[f32]| ordinary.iter().flat_map(|&t| g[t * v..(t + 1) * v].to_vec()).collect::<Vec<f32>>();
    let pick64 = |g: &[f64]| ordinary.iter().flat_map(|&t| g[t * v..(t + 1) * v].to_vec()).collect::<Vec<f64>>();
    assert_close_scaled("dlogits (ordinary rows)", &pick(&grad), &pick64(&want), 1e-5);
}

#[test]
fn logsoftmax_gather_rejects_bad_targets() {
    let be = backend();
    let (mut lp, mut lse) = (poison(2), poison(2));
    let err = be.logsoftmax_gather_forward(&mut lp, &mut lse, &vec![0.0; 6], &vec![0, 3], 2, 3).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("targets[1]") && msg.contains("-1 or 0..3"), "{msg}");
}

// ---- the CUDA backend against the CPU (see `device`) -----------------------------------------------------

fn logsoftmax_gather(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 5);
    // v not a multiple of the block; rows with and without targets; a sequence of length 1
    let (lens, v) = ([1usize, 10, 18], 300);
    let n: usize = lens.iter().sum();
    let (cpu_packing, cuda_packing) = f.packing(&lens);
    let logits: Vec<f32> = f.randn(n * v, 3.0).iter().map(|x| x + 20.0).collect(); // large logits
    let logits = f.stored(logits);
    let targets: Vec<i32> = (0..n).map(|t| if t % 4 == 3 { -1 } else { f.rng.random_range(0..v as i32) }).collect();
    let (ct, gt) = (f.cpu.upload_ids(&targets).unwrap(), f.cuda.upload_ids(&targets).unwrap());
    let (mut cl, mut gl) = f.both(&logits);

    let (mut want_logp, mut got_logp) = f.poisoned(n);
    let (mut want_lse, mut got_lse) = f.poisoned(n);
    f.cpu.logsoftmax_gather_forward(&mut want_logp, &mut want_lse, &cl, &ct, n, v).unwrap();
    f.cuda.logsoftmax_gather_forward(&mut got_logp, &mut got_lse, &gl, &gt, n, v).unwrap();
    // f32 outputs in both modes, from the same stored logits
    f.check_at("logsoftmax_gather_forward token_logp", &got_logp, &want_logp, 1e-5);
    f.check_at("logsoftmax_gather_forward lse", &got_lse, &want_lse, 1e-5);

    let (mut want_sq, mut got_sq) = f.poisoned(n);
    let ((_, mut got_sq_logp), (_, mut got_sq_lse)) = (f.poisoned(n), f.poisoned(n));
    f.cpu
        .logsoftmax_gather_forward_sq(&mut want_logp.clone(), &mut want_lse.clone(), &mut want_sq, &cl, &ct, n, v)
        .unwrap();
    f.cuda.logsoftmax_gather_forward_sq(&mut got_sq_logp, &mut got_sq_lse, &mut got_sq, &gl, &gt, n, v).unwrap();
    f.check_at("logsoftmax_gather_forward_sq log_sum_sq", &got_sq, &want_sq, 1e-5);
    let download = |x: &CudaBuf| f.cuda.download(x).unwrap();
    assert_bitwise_eq("_sq token_logp (device)", &download(&got_sq_logp), &download(&got_logp));
    assert_bitwise_eq("_sq lse (device)", &download(&got_sq_lse), &download(&got_lse));

    let (mut want_seq, mut got_seq) = f.poisoned(lens.len());
    f.cpu.sequence_logp_sum(&mut want_seq, &want_logp, &cpu_packing).unwrap();
    f.cuda.sequence_logp_sum(&mut got_seq, &got_logp, &cuda_packing).unwrap();
    f.check_at("sequence_logp_sum", &got_seq, &want_seq, 1e-5);

    let dseq = randn(&mut f.rng, lens.len(), 1.0);
    let (cd, gd) = f.both(&dseq);
    f.cpu.logsoftmax_gather_backward(&mut cl, &want_lse, &ct, &cd, &cpu_packing, n, v).unwrap();
    f.cuda.logsoftmax_gather_backward(&mut gl, &got_lse, &gt, &gd, &cuda_packing, n, v).unwrap();
    f.check("logsoftmax_gather_backward dlogits", &gl, &cl);
}

/// Logits of more than 2^31 elements (a chunk of 42,734 rows of GPT-2's 50,257-token vocabulary, 4.3
/// GB in bf16): the rows past element 2^31 are found by a 64-bit product of row and vocabulary, in the
/// backward and in the forward. Through the backend as the model calls it, in Bf16 mode, from
/// all-zero logits (whose lse is ln V in every row):
/// 1. the backward, with targets only on the last rows and on the first, writes
///    `g·(onehot(target) − 1/V)` there (bf16) and zeros everywhere else;
/// 2. the forward reads them back: `lse = log((V−1)·e^a + e^b)` with `a`, `b` the stored off-target
///    and target values, the target's log-prob `b − lse`; ln V and 0 in the other rows.
///
/// A 32-bit product wraps below the buffer for the last rows: the backward writes, or the forward
/// reads, the wrong memory (a crash, or other values than these). The emulated device takes about
/// 25 s (allocating and zeroing 4.3 GB, then two passes over it) and 4.3 GB of memory.
fn rows_past_2_pow_31(device: &Device) {
    let v = 50_257usize;
    let first_high_row = (1usize << 31).div_ceil(v); // the first row starting past element 2^31
    let n = first_high_row + 3;
    assert!(n * v > 1 << 31 && (first_high_row - 1) * v < 1 << 31);
    let cuda = CudaBackend::new(device.clone(), Precision::Bf16);
    let mut logits = cuda.zeros(n * v).unwrap();
    // Targets on the first row, on the row that straddles element 2^31 and on every row after it.
    let target_rows: Vec<usize> = [0].into_iter().chain(first_high_row - 1..n).collect();
    let mut targets = vec![-1i32; n];
    for (k, &t) in target_rows.iter().enumerate() {
        targets[t] = [0, 17, v as i32 / 2, 4097, v as i32 - 1][k];
    }
    let ids = cuda.upload_ids(&targets).unwrap();
    // Two sequences, the second made of the straddling row and those after it, with distinct dL/dseq.
    let packing = Packing::new(&cuda, &[0, first_high_row as i32 - 1, n as i32]).unwrap();
    let dseq = [1.0f32, 2.0];
    let g_of = |t: usize| if t < first_high_row - 1 { dseq[0] } else { dseq[1] };

    let ln_v = (v as f64).ln();
    let mut lse = cuda.upload(&vec![ln_v as f32; n]).unwrap();
    let dseq_buf = cuda.upload(&dseq).unwrap();
    cuda.logsoftmax_gather_backward(&mut logits, &lse, &ids, &dseq_buf, &packing, n, v).unwrap();

    let mut logp = cuda.upload(&poison(n)).unwrap();
    cuda.fill(&mut lse, f32::NAN).unwrap();
    cuda.logsoftmax_gather_forward(&mut logp, &mut lse, &logits, &ids, n, v).unwrap();
    let (got_logp, got_lse) = (cuda.download(&logp).unwrap(), cuda.download(&lse).unwrap());
    let stored = |x: f32| bf16::from_f32(x).to_f64();
    let (mut want_lse, mut want_logp) = (vec![ln_v; n], vec![0.0; n]);
    for &t in &target_rows {
        let g = g_of(t);
        let (a, b) = (stored(-g / v as f32), stored(g - g / v as f32));
        want_lse[t] = ((v - 1) as f64 * a.exp() + b.exp()).ln();
        want_logp[t] = b - want_lse[t];
    }
    assert_close("lse after the backward", &got_lse, &want_lse, 1e-6, 0.0);
    assert_close("token_logp after the backward", &got_logp, &want_logp, 1e-5, 0.0);
}

/// On the emulated device, in a child process (this test binary, running `rows_past_2_pow_31_child`):
/// a wrong index product may crash the process, and the child's crash then fails this test by name
/// instead of taking the whole test binary down. The 4.3 GB go with the child.
#[test]
fn rows_past_2_pow_31_on_the_emulated_device() {
    let child = "logsoftmax_gather::rows_past_2_pow_31_child";
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", child, "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, child)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{child} failed ({}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("1 passed") && stderr.contains(CHILD_RAN), "{child} did not run:\n{stdout}\n{stderr}");
}

/// Set (to the test's name) in the child process of `rows_past_2_pow_31_on_the_emulated_device`.
const CHILD_ENV: &str = "SAFEDPO_TEST_CHILD";
const CHILD_RAN: &str = "rows past 2^31: checked";

/// The child of `rows_past_2_pow_31_on_the_emulated_device`; does nothing in any other process.
#[test]
fn rows_past_2_pow_31_child() {
    if std::env::var(CHILD_ENV).is_ok_and(|name| name.ends_with("rows_past_2_pow_31_child")) {
        rows_past_2_pow_31(&Device::emulated().unwrap());
        eprintln!("{CHILD_RAN}");
    }
}

device_tests!(logsoftmax_gather; gpu only: rows_past_2_pow_31);
