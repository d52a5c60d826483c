//! AdamW, SGD and the sum of squares against the spec; AdamW and SGD on the CUDA backend against the
//! CPU; the one-launch list forms (`adamw_tensors`, `sgd_tensors`) against a launch per tensor, bit
//! for bit, over tensors of ragged sizes, with some pointers misaligned for the kernels' 128-bit
//! accesses.

use half::bf16;
use safedpo::backend::cpu::optimizer::spec;
use safedpo::backend::cuda::kernels::constants::optimizer::MULTI_TENSOR_CHUNK;
use safedpo::backend::cuda::{CudaBuf, Device, DeviceBuffer, KernelArg, LaunchConfig, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::{AdamWParams, AdamWTensor, SgdTensor};

use crate::backend;
use crate::common::*;
use crate::device::Fixture;

#[test]
fn adamw_matches_pytorch_formula() {
    let be = backend();
    let mut r = rng(16);
    let len = 20_001;
    let mut param = randn(&mut r, len, 1.0);
    let (mut m, mut v) = (vec![0.0f32; len], vec![0.0f32; len]);
    let (mut p64, mut m64, mut v64) = (to_f64(&param), vec![0.0f64; len], vec![0.0f64; len]);
    let (lr, b1, b2, eps, wd, gs) = (3e-3f32, 0.9f32, 0.95f32, 1e-8f32, 0.1f32, 0.5f32);
    for step in 1..=3u32 {
        let grad = randn(&mut r, len, 1.0);
        let hp = AdamWParams { lr, beta1: b1, beta2: b2, eps, weight_decay: wd, step, grad_scale: gs };
        be.adamw(&mut param, &grad, &mut m, &mut v, &hp).unwrap();
        spec::adamw(&mut p64, &to_f64(&grad), &mut m64, &mut v64, &hp);
        assert_close(&format!("adamw param after step {step}"), &param, &p64, 1e-6, 1e-7);
        assert_close(&format!("adamw m after step {step}"), &m, &m64, 1e-5, 1e-8);
        assert_close(&format!("adamw v after step {step}"), &v, &v64, 1e-5, 1e-10);
    }
}

#[test]
fn sgd_and_sum_squares() {
    let be = backend();
    let mut r = rng(17);
    let len = 33_333;
    let mut param = randn(&mut r, len, 1.0);
    let grad = randn(&mut r, len, 1.0);
    let mut want = to_f64(&param);
    spec::sgd(&mut want, &to_f64(&grad), 0.01, 0.5);
    be.sgd(&mut param, &grad, 0.01, 0.5).unwrap();
    assert_close("sgd", &param, &want, 1e-6, 1e-7);

    let other = randn(&mut r, 77, 3.0);
    let got = be.sum_squares(&[&grad, &other, &Vec::new()]).unwrap();
    let want = safedpo::backend::cpu::grad_norm::spec::sum_squares(&[&grad, &other, &[]]);
    assert!((got - want).abs() <= 1e-12 * want, "sum_squares {got} vs {want}");
}

// ---- the CUDA backend against the CPU (see `device`) -----------------------------------------------------

fn optimizer(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 8);
    let n = 777;
    // Parameters as uploaded from a checkpoint: exact f32 (the master copy keeps them in Bf16 mode).
    let param = randn(&mut f.rng, n, 1.0);
    let (mut want_p, mut got_p) = f.both(&param);
    let (mut want_m, mut got_m) = f.cpu.zeros(n).and_then(|m| Ok((m, f.cuda.zeros(n)?))).unwrap();
    let (mut want_v, mut got_v) = f.cpu.zeros(n).and_then(|v| Ok((v, f.cuda.zeros(n)?))).unwrap();
    for step in 1..=3 {
        let grad = f.randn(n, 0.1);
        let (cg, gg) = f.both(&grad);
        let p = AdamWParams { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step, grad_scale: 0.8 };
        f.cpu.adamw(&mut want_p, &cg, &mut want_m, &mut want_v, &p).unwrap();
        f.cuda.adamw(&mut got_p, &gg, &mut got_m, &mut got_v, &p).unwrap();
    }
    // The master weights and the moments are f32 in both modes.
    f.check_at("adamw param", &got_p, &want_p, 1e-5);
    f.check_at("adamw m", &got_m, &want_m, 1e-5);
    f.check_at("adamw v", &got_v, &want_v, 1e-5);

    let grad = f.randn(n, 0.1);
    let (cg, gg) = f.both(&grad);
    f.cpu.sgd(&mut want_p, &cg, 0.05, 0.5).unwrap();
    f.cuda.sgd(&mut got_p, &gg, 0.05, 0.5).unwrap();
    f.check_at("sgd param", &got_p, &want_p, 1e-5);

    // What the kernels compute with is the stored parameter: the master rounded once.
    let zeros = f.cuda.zeros(n).unwrap();
    let mut stored = f.cuda.zeros(n).unwrap();
    f.cuda.residual_forward(&mut stored, &got_p, &zeros).unwrap();
    let expected = f.stored(f.cuda.download(&got_p).unwrap());
    assert_bitwise_eq(&format!("stored parameter ({precision})"), &f.cuda.download(&stored).unwrap(), &expected);
}

/// Tensor sizes of the list forms: empty, single, ragged tails (not multiples of 4), and lengths
/// just below, at and past one and two chunks of a multi-tensor launch.
fn ragged_lens() -> Vec<usize> {
    let chunk = MULTI_TENSOR_CHUNK as usize;
    vec![0, 1, 7, 4097, 3, chunk - 1, chunk, chunk + 1, 2 * chunk + 5, 0, 6, 2 * chunk]
}

/// Whether the list's tensor `i` is weight-decayed (some are, some are not).
fn decays(i: usize) -> bool {
    i % 3 != 1
}

/// The parameter as the kernels store it (the bf16 values in Bf16 mode, not the master).
fn stored(f: &Fixture, buf: &CudaBuf) -> Vec<f32> {
    let zeros = f.cuda.zeros(buf.len()).unwrap();
    let mut out = f.cuda.zeros(buf.len()).unwrap();
    f.cuda.residual_forward(&mut out, buf, &zeros).unwrap();
    f.cuda.download(&out).unwrap()
}

/// `adamw_tensors` and `sgd_tensors` against `adamw` and `sgd` called per tensor (the same bits:
/// master, stored parameter, moments) and against the CPU's list forms.
fn multi_tensor_updates(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 9);
    let lens = ragged_lens();
    let init: Vec<Vec<f32>> = lens.iter().map(|&n| randn(&mut f.rng, n, 1.0)).collect();
    let upload_state = |f: &Fixture| -> Vec<[CudaBuf; 3]> {
        init.iter()
            .map(|p| [f.cuda.upload(p).unwrap(), f.cuda.zeros(p.len()).unwrap(), f.cuda.zeros(p.len()).unwrap()])
            .collect()
    };
    let (mut single, mut multi) = (upload_state(&f), upload_state(&f));
    let mut cpu: Vec<[Vec<f32>; 3]> =
        init.iter().map(|p| [p.clone(), vec![0.0; p.len()], vec![0.0; p.len()]]).collect();
    for step in 1..=3 {
        let grads: Vec<Vec<f32>> = lens.iter().map(|&n| f.randn(n, 0.1)).collect();
        let (cg, gg): (Vec<_>, Vec<_>) = grads.iter().map(|g| f.both(g)).unzip();
        let p = AdamWParams { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step, grad_scale: 0.8 };
        for (i, ([param, m, v], grad)) in single.iter_mut().zip(&gg).enumerate() {
            let p = AdamWParams { weight_decay: if decays(i) { p.weight_decay } else { 0.0 }, ..p };
            f.cuda.adamw(param, grad, m, v, &p).unwrap();
        }
        let mut tensors: Vec<AdamWTensor<'_, CudaBuf>> = multi
            .iter_mut()
            .zip(&gg)
            .enumerate()
            .map(|(i, ([param, m, v], grad))| AdamWTensor { param, grad, m, v, decay: decays(i) })
            .collect();
        f.cuda.adamw_tensors(&mut tensors, &p).unwrap();
        let mut tensors: Vec<AdamWTensor<'_, Vec<f32>>> = cpu
            .iter_mut()
            .zip(&cg)
            .enumerate()
            .map(|(i, ([param, m, v], grad))| AdamWTensor { param, grad, m, v, decay: decays(i) })
            .collect();
        f.cpu.adamw_tensors(&mut tensors, &p).unwrap();
    }
    compare(&f, "adamw_tensors", &single, &multi, &cpu);

    let grads: Vec<Vec<f32>> = lens.iter().map(|&n| f.randn(n, 0.1)).collect();
    let (cg, gg): (Vec<_>, Vec<_>) = grads.iter().map(|g| f.both(g)).unzip();
    for ([param, ..], grad) in single.iter_mut().zip(&gg) {
        f.cuda.sgd(param, grad, 0.05, 0.5).unwrap();
    }
    let mut tensors: Vec<SgdTensor<'_, CudaBuf>> =
        multi.iter_mut().zip(&gg).map(|([param, ..], grad)| SgdTensor { param, grad }).collect();
    f.cuda.sgd_tensors(&mut tensors, 0.05, 0.5).unwrap();
    let mut tensors: Vec<SgdTensor<'_, Vec<f32>>> =
        cpu.iter_mut().zip(&cg).map(|([param, ..], grad)| SgdTensor { param, grad }).collect();
    f.cpu.sgd_tensors(&mut tensors, 0.05, 0.5).unwrap();
    compare(&f, "sgd_tensors", &single, &multi, &cpu);

    // A list with a wrong length fails before anything is updated, naming the tensor.
    let before = f.cuda.download(&multi[0][0]).unwrap();
    let short = f.cuda.zeros(3).unwrap();
    let [p0, m0, v0] = &mut multi[0];
    let [p1, m1, v1] = &mut single[1];
    let mut tensors = vec![
        AdamWTensor { param: p0, grad: &gg[0], m: m0, v: v0, decay: true },
        AdamWTensor { param: p1, grad: &short, m: m1, v: v1, decay: true },
    ];
    let p = AdamWParams { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 4, grad_scale: 1.0 };
    let err = format!("{:#}", f.cuda.adamw_tensors(&mut tensors, &p).unwrap_err());
    assert!(err.contains("tensor 1") && err.contains("grad"), "{err}");
    assert_bitwise_eq("param after a refused list", &f.cuda.download(&multi[0][0]).unwrap(), &before);
}

/// Each tensor's parameter and moments: one launch against a launch per tensor, bit for bit
/// (and the stored parameter too), and against the CPU.
fn compare(f: &Fixture, what: &str, single: &[[CudaBuf; 3]], multi: &[[CudaBuf; 3]], cpu: &[[Vec<f32>; 3]]) {
    for (i, ((a, b), c)) in single.iter().zip(multi).zip(cpu).enumerate() {
        let at = |part: &str| format!("{what} {part} of tensor {i} ({} elements, {})", c[0].len(), f.precision);
        for (k, part) in ["param", "m", "v"].into_iter().enumerate() {
            let got = f.cuda.download(&b[k]).unwrap();
            assert_bitwise_eq(&at(part), &got, &f.cuda.download(&a[k]).unwrap());
            f.check_at(&at(part), &b[k], &c[k], 1e-5);
        }
        assert_bitwise_eq(&at("stored param"), &stored(f, &b[0]), &stored(f, &a[0]));
    }
}

/// The multi-tensor kernels on tensors whose pointers are misaligned for their 128-bit accesses (one
/// array of the tensor at a time, one element off): the one-element path, against the per-tensor
/// kernel on the same data. The table is written here as the kernel reads it (`MultiTensorSlot`).
fn multi_tensor_misaligned(device: &Device, precision: Precision) {
    let mut r = rng(10);
    let bf16_params = precision == Precision::Bf16;
    let lens = [4097usize, 5, 16385, 33, 1000, 7];
    // Per tensor: which of param, master, grad, m, v (in the table's order) is one element off.
    let (mut single, mut multi, mut words, mut chunks) = (Vec::new(), Vec::new(), Vec::new(), 0u64);
    for (t, &n) in lens.iter().enumerate() {
        let off = |k: usize| usize::from(t % 5 == k);
        let values: Vec<Vec<f32>> = (0..5)
            .map(|k| {
                randn(&mut r, n + 1, if k == 4 { 0.01 } else { 1.0 })
                    .iter()
                    .map(|x| if k == 4 { x.abs() } else { *x })
                    .collect()
            })
            .collect();
        let upload = || -> Vec<Arrays> {
            (0..5)
                .map(|k| match (k, bf16_params) {
                    (0 | 2, true) => Arrays::Bf16(
                        device.upload(&values[k].iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()).unwrap(),
                    ),
                    _ => Arrays::F32(device.upload(&values[k]).unwrap()),
                })
                .collect()
        };
        let (a, b) = (upload(), upload());
        let ptr = |arrays: &[Arrays], k: usize| arrays[k].ptr(off(k));
        let master = if bf16_params { ptr(&b, 1) } else { 0 };
        words.extend([ptr(&b, 0), master, ptr(&b, 2), ptr(&b, 3), ptr(&b, 4), n as u64, chunks, u64::from(decays(t))]);
        chunks += n.div_ceil(MULTI_TENSOR_CHUNK as usize) as u64;
        single.push((a, n, t));
        multi.push(b);
    }
    let hyper = [1e-2f32, 0.9, 0.95, 1e-8, 0.1, 0.1, 0.05, 0.8];
    let suffix = if bf16_params { "bf16" } else { "f32" };
    let table = device.upload(&words).unwrap();
    let mut args = vec![KernelArg::Ptr(table.device_ptr()), KernelArg::I32(lens.len() as i32)];
    args.extend(hyper.map(KernelArg::F32));
    let config = LaunchConfig::grid_1d(chunks as u32, 256);
    device.launch(&format!("adamw_multi_{suffix}"), config, &args).unwrap();
    for (arrays, n, t) in &single {
        let off = |k: usize| usize::from(t % 5 == k);
        let ptr = |k: usize| KernelArg::Ptr(arrays[k].ptr(off(k)));
        let mut args = vec![ptr(0)];
        if bf16_params {
            args.push(ptr(1));
        }
        args.extend([ptr(2), ptr(3), ptr(4), KernelArg::I64(*n as i64)]);
        let mut h = hyper.map(KernelArg::F32);
        if !decays(*t) {
            h[4] = KernelArg::F32(0.0);
        }
        args.extend(h);
        device.launch(&format!("adamw_{suffix}"), LaunchConfig::for_elements(*n, 256), &args).unwrap();
    }
    for ((a, n, t), b) in single.iter().zip(&multi) {
        for k in 0..5 {
            if k == 1 && !bf16_params {
                continue;
            }
            let what = format!("misaligned adamw_multi_{suffix}: array {k} of tensor {t} ({n} elements)");
            assert_bitwise_eq(&what, &a[k].download(device), &b[k].download(device));
        }
    }
}

/// A test buffer of either storage type.
enum Arrays {
    F32(DeviceBuffer<f32>),
    Bf16(DeviceBuffer<bf16>),
}

impl Arrays {
    /// The address of element `offset`.
    fn ptr(&self, offset: usize) -> u64 {
        match self {
            Arrays::F32(b) => b.device_ptr() + 4 * offset as u64,
            Arrays::Bf16(b) => b.device_ptr() + 2 * offset as u64,
        }
    }
    fn download(&self, device: &Device) -> Vec<f32> {
        match self {
            Arrays::F32(b) => device.download(b).unwrap(),
            Arrays::Bf16(b) => device.download(b).unwrap().iter().map(|x| x.to_f32()).collect(),
        }
    }
}

device_tests!(optimizer, multi_tensor_updates, multi_tensor_misaligned);
