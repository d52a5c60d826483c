//! The LM head's f32 logits on the CUDA backend: `matmul_forward_f32_out` stores the product of
//! bf16 operands in f32 (no rounding of the accumulator), the log-softmax-gather forward (and its
//! `_sq` variant) reads f32 logits in either precision, and the backward turns them into the
//! gradient in the activation type: in Bf16 mode bf16 dlogits from f32 logits
//! (`logsoftmax_gather_backward_f32_to_bf16`), one rounding of the gradient. Against the CPU on the
//! device's own f32 logits, outputs poisoned, at a vocabulary that is not a multiple of the pack
//! (ragged tails) and, for the new kernel, on views that start off a 16-byte boundary.

use half::bf16;
use safedpo::backend::cuda::{CudaBuf, Device, DeviceBuffer, Dtype, KernelArg, LaunchConfig, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::WeightLayout;

use crate::common::*;
use crate::device::{Fixture, BF16_NOISE_FLOOR};
use crate::{backend, packing};

/// `x [n, k] · w [v, k]ᵀ` on the device into f32 logits, with the last column of `x` all ones and
/// the last of `w` all 40 (bf16-exact), so that the logits sit around 40: a bf16 step there is 0.25.
fn f32_logits(f: &mut Fixture, n: usize, k: usize, v: usize) -> CudaBuf {
    let mut x = f.randn(n * k, 1.0);
    let mut w = f.randn(v * k, 3.0);
    (0..n).for_each(|t| x[t * k + k - 1] = 1.0);
    (0..v).for_each(|j| w[j * k + k - 1] = 40.0);
    let (x, w) = (f.cuda.upload(&x).unwrap(), f.cuda.upload(&w).unwrap());
    let mut logits = f.cuda.upload(&poison(n * v)).unwrap();
    f.cuda.matmul_forward_f32_out(&mut logits, &x, &w, n, k, v, WeightLayout::OutIn).unwrap();
    assert_eq!(logits.dtype(), Dtype::F32, "the head's product stores f32 ({})", f.precision);
    assert!(!logits.has_master());
    logits
}

fn f32_logits_forward_and_backward(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 21);
    // v not a multiple of either pack (4 f32, 8 bf16) nor of the block; rows without targets; a
    // sequence of one row.
    let (lens, k, v) = ([1usize, 10, 18], 24, 300);
    let n: usize = lens.iter().sum();
    let gl = f32_logits(&mut f, n, k, v);
    // The CPU reads exactly what the device stored (f32 storage, no master: downloaded as is).
    let logits = f.cuda.download(&gl).unwrap();
    assert!(logits.iter().any(|&x| bf16::from_f32(x).to_f32() != x), "the logits must not all be bf16 values");
    let mean = logits.iter().map(|&x| x as f64).sum::<f64>() / logits.len() as f64;
    assert!((30.0..50.0).contains(&mean), "logits around 40, not {mean}");
    let targets: Vec<i32> = (0..n).map(|t| if t % 4 == 3 { -1 } else { (t * 37 % v) as i32 }).collect();
    let (ct, gt) = (f.cpu.upload_ids(&targets).unwrap(), f.cuda.upload_ids(&targets).unwrap());

    let (mut want_logp, mut got_logp) = f.poisoned(n);
    let (mut want_lse, mut got_lse) = f.poisoned(n);
    f.cpu.logsoftmax_gather_forward(&mut want_logp, &mut want_lse, &logits, &ct, n, v).unwrap();
    f.cuda.logsoftmax_gather_forward(&mut got_logp, &mut got_lse, &gl, &gt, n, v).unwrap();
    f.check_at("token_logp from f32 logits", &got_logp, &want_logp, 1e-5);
    f.check_at("lse from f32 logits", &got_lse, &want_lse, 1e-6);

    let (mut want_sq, mut got_sq) = f.poisoned(n);
    let ((_, mut sq_logp), (_, mut sq_lse)) = (f.poisoned(n), f.poisoned(n));
    let (mut cl, mut cs) = (want_logp.clone(), want_lse.clone());
    f.cpu.logsoftmax_gather_forward_sq(&mut cl, &mut cs, &mut want_sq, &logits, &ct, n, v).unwrap();
    f.cuda.logsoftmax_gather_forward_sq(&mut sq_logp, &mut sq_lse, &mut got_sq, &gl, &gt, n, v).unwrap();
    f.check_at("log_sum_sq from f32 logits", &got_sq, &want_sq, 1e-5);
    let download = |x: &CudaBuf| f.cuda.download(x).unwrap();
    assert_bitwise_eq("_sq token_logp", &download(&sq_logp), &download(&got_logp));
    assert_eq!(gl.dtype(), Dtype::F32, "the forward reads the logits without converting them");

    let (cpu_packing, cuda_packing) = f.packing(&lens);
    let dseq = randn(&mut f.rng, lens.len(), 1.0);
    let (cd, gd) = f.both(&dseq);
    let mut want = logits.clone();
    f.cpu.logsoftmax_gather_backward(&mut want, &want_lse, &ct, &cd, &cpu_packing, n, v).unwrap();
    let mut gl = gl;
    f.cuda.logsoftmax_gather_backward(&mut gl, &got_lse, &gt, &gd, &cuda_packing, n, v).unwrap();
    // The gradient in the activation type (what the head's backward products read).
    assert_eq!(gl.dtype(), precision.activation_dtype(), "dlogits storage ({precision})");
    assert_eq!(gl.len(), n * v);
    f.check("dlogits from f32 logits", &gl, &want);
}

/// Like `Shifted` of `misaligned.rs`, for one storage type given by the caller: `x` at element
/// `shift` of an allocation with NaN around it.
fn shifted<T: Copy + safedpo::backend::cuda::DeviceScalar>(
    device: &Device,
    x: &[f32],
    shift: usize,
    to: impl Fn(f32) -> T,
) -> (DeviceBuffer<T>, KernelArg) {
    let padded: Vec<T> =
        std::iter::repeat_n(f32::NAN, shift).chain(x.iter().copied()).chain([f32::NAN; 8]).map(to).collect();
    let buf = device.upload(&padded).unwrap();
    let arg = KernelArg::Ptr(buf.device_ptr() + (shift * std::mem::size_of::<T>()) as u64);
    (buf, arg)
}

/// `logsoftmax_gather_backward_f32_to_bf16` launched on f32 logits and bf16 dlogits views that start
/// at several offsets (the output's packs then fall on other elements than the input's), against
/// the CPU: each element within one bf16 rounding, the poison around the output untouched.
fn backward_f32_to_bf16_on_misaligned_views(device: &Device, precision: Precision) {
    if precision == Precision::F32 {
        return; // the kernel of Bf16 mode only
    }
    let be = backend();
    let mut r = rng(46);
    for v in [64, 771] {
        for (in_shift, out_shift) in [(0, 0), (1, 0), (0, 1), (3, 5), (2, 8)] {
            let what = format!("v {v}, f32 logits at +{in_shift}, bf16 dlogits at +{out_shift}");
            let n = 5;
            let logits: Vec<f32> = randn(&mut r, n * v, 3.0).iter().map(|x| x + 40.0).collect();
            let mut targets = rand_ids(&mut r, n, v);
            targets[2] = -1;
            let (mut lp, mut lse) = (vec![0.0; n], vec![0.0; n]);
            be.logsoftmax_gather_forward(&mut lp, &mut lse, &logits, &targets, n, v).unwrap();
            let pk = packing(&be, &[2, n - 2]);
            let dseq = vec![0.7f32, -1.3];
            let mut want = logits.clone();
            be.logsoftmax_gather_backward(&mut want, &lse, &targets, &dseq, &pk, n, v).unwrap();

            let (_logits_buf, logits_arg) = shifted(device, &logits, in_shift, |x| x);
            let (out, out_arg) = shifted(device, &poison(n * v), out_shift, bf16::from_f32);
            let (lse_dev, dseq_dev) = (device.upload(&lse).unwrap(), device.upload(&dseq).unwrap());
            let (targets_dev, cu) = (device.upload(&targets).unwrap(), device.upload(&[0, 2, n as i32]).unwrap());
            let ptr = |b: u64| KernelArg::Ptr(b);
            let args = [
                out_arg,
                logits_arg,
                ptr(lse_dev.device_ptr()),
                ptr(targets_dev.device_ptr()),
                ptr(dseq_dev.device_ptr()),
                ptr(cu.device_ptr()),
                KernelArg::I32(2),
                KernelArg::I32(v as i32),
            ];
            let name = "logsoftmax_gather_backward_f32_to_bf16";
            device
                .launch(name, LaunchConfig::grid_1d(n as u32, 256), &args)
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            let all: Vec<f32> = device.download(&out).unwrap().into_iter().map(f32::from).collect();
            let outside = all[..out_shift].iter().chain(&all[out_shift + n * v..]);
            assert!(outside.into_iter().all(|x| x.is_nan()), "{what}: a write outside the view");
            let got = &all[out_shift..out_shift + n * v];
            assert_close_with_floor(&what, got, &to_f64(&want), BF16_ROUNDING, BF16_NOISE_FLOOR);
            assert!(got[2 * v..3 * v].iter().all(|&x| x == 0.0), "{what}: a row without a target is zeros");
        }
    }
}

device_tests!(f32_logits_forward_and_backward, backward_f32_to_bf16_on_misaligned_views);
