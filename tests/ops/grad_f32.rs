//! Parameter gradients stored in f32 beside bf16 activations (`train.grad_dtype = "f32"`,
//! `Buffers::store_in_f32`): every op that writes a parameter gradient (the norms' and the
//! embedding's backward, the matrix products' dweight and dbias) on the emulated device against the
//! CPU, the gradients held to f32 tolerances (the same stored inputs, f32 sums in another order) and
//! still f32 afterwards; the fused norm backwards the same bits on every run while the test mode
//! runs their blocks in random order; the `_bf16_f32` kernels launched on views one element off
//! 16 bytes, with NaN around every output; AdamW and SGD reading f32 gradients, the one-launch list
//! forms against a launch per tensor bit for bit, in lists that mix f32 and bf16 gradients; the grad
//! norm over them. In F32 mode `store_in_f32` changes nothing and the same checks hold.

use half::bf16;
use safedpo::backend::cuda::kernels::constants::optimizer::MULTI_TENSOR_CHUNK;
use safedpo::backend::cuda::{CudaBuf, Device, DeviceBuffer, Dtype, KernelArg, LaunchConfig, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::{AdamWParams, AdamWTensor, SgdTensor, WeightLayout};

use crate::common::*;
use crate::device::{Fixture, ACCUMULATED_FLOOR, F32_RTOL};

/// `x` exactly, in f32 storage on the device (an f32 gradient accumulator).
fn f32_grad(f: &Fixture, x: &[f32]) -> CudaBuf {
    let mut buf = f.cuda.upload(x).unwrap();
    f.cuda.store_in_f32(&mut buf).unwrap();
    assert_eq!(buf.dtype(), Dtype::F32);
    buf
}

/// An f32 gradient against the CPU's: still f32 storage, within f32 tolerance of the largest entry.
#[track_caller]
fn check_grad(f: &Fixture, what: &str, got: &CudaBuf, want: &[f32]) {
    assert_eq!(got.dtype(), Dtype::F32, "{what}: the gradient left f32 storage");
    assert!(!got.has_master(), "{what}: an f32 gradient has no master copy");
    f.check_at(what, got, want, F32_RTOL);
}

/// The norms' backward into f32 gradients, accumulated twice onto random f32 priors, over one block
/// and over many (the grid's last block sums the partials); every run the same bits.
fn norm_backwards(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 60);
    for (n, c) in [(1, 19), (5, 72), (300, 64), (150, 771)] {
        let shape = format!("[{n}, {c}] ({precision})");
        let inp = f.randn(n * c, 2.0);
        let (w, b, dout) = (f.randn(c, 1.0), f.randn(c, 0.5), f.randn(n * c, 1.0));
        let ((ci, gi), (cw, gw), (cb, _), (cd, gd)) = (f.both(&inp), f.both(&w), f.both(&b), f.both(&dout));
        let (mut mean, mut rstd, mut out) = (vec![0.0; n], vec![0.0; n], vec![0.0; n * c]);
        f.cpu.layernorm_forward(&mut out, &mut mean, &mut rstd, &ci, &cw, &cb, n, c, 1e-5).unwrap();
        let (gmean, grstd) = (f.cuda.upload(&mean).unwrap(), f.cuda.upload(&rstd).unwrap());
        // Priors in f32, not representable in bf16: a rounding to bf16 anywhere shows.
        let (prior, prior_w, prior_b) = (f.randn(n * c, 1.0), randn(&mut f.rng, c, 1.0), randn(&mut f.rng, c, 1.0));
        let (mut want_dinp, mut want_dw, mut want_db) = (prior.clone(), prior_w.clone(), prior_b.clone());
        for _ in 0..2 {
            f.cpu
                .layernorm_backward(&mut want_dinp, &mut want_dw, &mut want_db, &cd, &ci, &cw, &mean, &rstd, n, c)
                .unwrap();
        }
        let mut first: Option<Vec<Vec<f32>>> = None;
        for run in 0..3 {
            let (mut dinp, mut dw, mut db) = (f.both(&prior).1, f32_grad(&f, &prior_w), f32_grad(&f, &prior_b));
            for _ in 0..2 {
                f.cuda.layernorm_backward(&mut dinp, &mut dw, &mut db, &gd, &gi, &gw, &gmean, &grstd, n, c).unwrap();
            }
            f.check_rounded(&format!("layernorm_backward dinp {shape}"), &dinp, &want_dinp, 2.0, ACCUMULATED_FLOOR);
            check_grad(&f, &format!("layernorm_backward dweight {shape}"), &dw, &want_dw);
            check_grad(&f, &format!("layernorm_backward dbias {shape}"), &db, &want_db);
            let got = [dinp, dw, db].map(|x| f.cuda.download(&x).unwrap()).to_vec();
            same_every_run(&mut first, got, &format!("layernorm_backward run {run} {shape}"));
        }

        let mut rms_rstd = vec![0.0; n];
        f.cpu.rmsnorm_forward(&mut out, &mut rms_rstd, &ci, &cw, n, c, 1e-5).unwrap();
        let grstd = f.cuda.upload(&rms_rstd).unwrap();
        let (mut want_dinp, mut want_dw) = (prior.clone(), prior_w.clone());
        for _ in 0..2 {
            f.cpu.rmsnorm_backward(&mut want_dinp, &mut want_dw, &cd, &ci, &cw, &rms_rstd, n, c).unwrap();
        }
        let mut first: Option<Vec<Vec<f32>>> = None;
        for run in 0..3 {
            let (mut dinp, mut dw) = (f.both(&prior).1, f32_grad(&f, &prior_w));
            for _ in 0..2 {
                f.cuda.rmsnorm_backward(&mut dinp, &mut dw, &gd, &gi, &gw, &grstd, n, c).unwrap();
            }
            f.check_rounded(&format!("rmsnorm_backward dinp {shape}"), &dinp, &want_dinp, 2.0, ACCUMULATED_FLOOR);
            check_grad(&f, &format!("rmsnorm_backward dweight {shape}"), &dw, &want_dw);
            let got = [dinp, dw].map(|x| f.cuda.download(&x).unwrap()).to_vec();
            same_every_run(&mut first, got, &format!("rmsnorm_backward run {run} {shape}"));
        }
    }
}

/// Records the first run's outputs and asserts every later run's are the same bits.
fn same_every_run(first: &mut Option<Vec<Vec<f32>>>, got: Vec<Vec<f32>>, what: &str) {
    match first {
        None => *first = Some(got),
        Some(first) => {
            for (k, (a, b)) in first.iter().zip(&got).enumerate() {
                assert_bitwise_eq(&format!("{what} output {k}"), a, b);
            }
        }
    }
}

/// The embedding backward into f32 table gradients, at widths on and off the 128-bit path (a
/// thread's pack of bf16 `dout` spans two packs of the f32 table), ids repeated.
fn embedding_backward(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 61);
    for (n, c, vocab, ctx) in [(37, 40, 23, 13), (50, 19, 7, 50), (9, 64, 3, 9)] {
        let what = format!("[{n}, {c}] ({precision})");
        let tokens = rand_ids(&mut f.rng, n, vocab);
        let positions = rand_ids(&mut f.rng, n, ctx);
        let (cpu_tok, cuda_tok) = (f.cpu.upload_ids(&tokens).unwrap(), f.cuda.upload_ids(&tokens).unwrap());
        let (cpu_pos, cuda_pos) = (f.cpu.upload_ids(&positions).unwrap(), f.cuda.upload_ids(&positions).unwrap());
        let (cd, gd) = f.fresh(n * c, 1.0);
        let (prior_wte, prior_wpe) = (randn(&mut f.rng, vocab * c, 1.0), randn(&mut f.rng, ctx * c, 1.0));
        let (mut want_wte, mut want_wpe) = (prior_wte.clone(), prior_wpe.clone());
        let (mut got_wte, mut got_wpe) = (f32_grad(&f, &prior_wte), f32_grad(&f, &prior_wpe));
        for _ in 0..2 {
            f.cpu.embedding_backward(&mut want_wte, Some(&mut want_wpe), &cd, &cpu_tok, &cpu_pos, n, c).unwrap();
            f.cuda.embedding_backward(&mut got_wte, Some(&mut got_wpe), &gd, &cuda_tok, &cuda_pos, n, c).unwrap();
        }
        check_grad(&f, &format!("embedding_backward dwte {what}"), &got_wte, &want_wte);
        check_grad(&f, &format!("embedding_backward dwpe {what}"), &got_wpe, &want_wpe);
    }
}

/// The matrix products' weight and bias gradients into f32 (bf16 operands into an f32 D), both
/// weight layouts; dinp (overwritten, poisoned first) stays in the activations' type.
fn matmul_backward(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 62);
    for (n, ic, oc) in [(37, 19, 24), (1, 8, 3), (130, 64, 40)] {
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            let what = format!("[{n}, {ic}, {oc}] {layout:?} ({precision})");
            let ((ci, gi), (cw, gw), (cd, gd)) = (f.fresh(n * ic, 1.0), f.fresh(ic * oc, 1.0), f.fresh(n * oc, 1.0));
            let (prior_w, prior_b) = (randn(&mut f.rng, ic * oc, 1.0), randn(&mut f.rng, oc, 1.0));
            let (mut want_dw, mut want_db) = (prior_w.clone(), prior_b.clone());
            let (mut got_dw, mut got_db) = (f32_grad(&f, &prior_w), f32_grad(&f, &prior_b));
            let (mut want_dx, mut got_dx) = f.poisoned(n * ic);
            for _ in 0..2 {
                let (cdb, gdb) = (Some(&mut want_db), Some(&mut got_db));
                f.cpu.matmul_backward(&mut want_dx, &mut want_dw, cdb, &cd, &ci, &cw, n, ic, oc, layout).unwrap();
                f.cuda.matmul_backward(&mut got_dx, &mut got_dw, gdb, &gd, &gi, &gw, n, ic, oc, layout).unwrap();
            }
            f.check(&format!("matmul_backward dinp {what}"), &got_dx, &want_dx);
            check_grad(&f, &format!("matmul_backward dweight {what}"), &got_dw, &want_dw);
            check_grad(&f, &format!("matmul_backward dbias {what}"), &got_db, &want_db);
        }
    }
}

/// Elements of NaN on each side of a view.
const MARGIN: usize = 8;

/// `x` at element `shift` of an allocation of `T` with NaN around it.
fn view<T: safedpo::backend::cuda::DeviceScalar>(
    device: &Device,
    x: &[f32],
    shift: usize,
    to: fn(f32) -> T,
) -> DeviceBuffer<T> {
    let padded: Vec<T> = std::iter::repeat_n(f32::NAN, shift)
        .chain(x.iter().copied())
        .chain(std::iter::repeat_n(f32::NAN, MARGIN))
        .map(to)
        .collect();
    device.upload(&padded).unwrap()
}

fn ptr<T: safedpo::backend::cuda::DeviceScalar>(buf: &DeviceBuffer<T>, shift: usize) -> KernelArg {
    KernelArg::Ptr(buf.device_ptr() + (shift * std::mem::size_of::<T>()) as u64)
}

/// The f32 view's elements; asserts the NaN around it is untouched.
fn read(device: &Device, buf: &DeviceBuffer<f32>, shift: usize, len: usize, what: &str) -> Vec<f32> {
    let all = device.download(buf).unwrap();
    let outside = all[..shift].iter().chain(&all[shift + len..]);
    assert!(outside.into_iter().all(|v| v.is_nan()), "{what}: a write outside the view");
    all[shift..shift + len].to_vec()
}

/// The `_bf16_f32` kernels launched directly on views one element past an allocation (f32
/// gradients 4 bytes off 16, bf16 inputs 2 bytes off), beside aligned ones: the one-element path of
/// kernels the backend only hands whole allocations. Bf16 mode only (the kernels' activation type).
fn misaligned(device: &Device, precision: Precision) {
    if precision != Precision::Bf16 {
        return;
    }
    let (cpu, mut r) = (crate::backend(), rng(63));
    let round = |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(|v| bf16::from_f32(v).to_f32()).collect() };
    let bf = |v: f32| bf16::from_f32(v);
    let same = |v: f32| v;
    for (n, c) in [(37, 64), (37, 77)] {
        for [sg, sx] in [[0, 0], [1, 0], [1, 1]] {
            let what = format!("[{n}, {c}], shifts {sg} {sx}");
            let x = round(randn(&mut r, n * c, 2.0));
            let (w, dy) = (round(randn(&mut r, c, 1.0)), round(randn(&mut r, n * c, 1.0)));
            let (prior, prior_w, prior_b) =
                (round(randn(&mut r, n * c, 1.0)), randn(&mut r, c, 1.0), randn(&mut r, c, 1.0));
            let (xv, wv, dyv) = (view(device, &x, sx, bf), view(device, &w, sx, bf), view(device, &dy, sx, bf));
            let (mut mean, mut rstd, mut out) = (vec![0.0; n], vec![0.0; n], vec![0.0; n * c]);
            cpu.layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &prior_b, n, c, 1e-5).unwrap();
            let (gmean, grstd) = (device.upload(&mean).unwrap(), device.upload(&rstd).unwrap());
            let (mut want_dx, mut want_dw, mut want_db) = (prior.clone(), prior_w.clone(), prior_b.clone());
            cpu.layernorm_backward(&mut want_dx, &mut want_dw, &mut want_db, &dy, &x, &w, &mean, &rstd, n, c).unwrap();
            let dx = view(device, &prior, sx, bf);
            let (dw, db) = (view(device, &prior_w, sg, same), view(device, &prior_b, sg, same));
            let (warps, rows_per_block) = (4, 3);
            let blocks = n.div_ceil(rows_per_block);
            let config =
                LaunchConfig::grid_1d(blocks as u32, 32 * warps as u32).with_shared_bytes((warps * 2 * c * 4) as u32);
            let scratch = device.alloc::<f32>(blocks * 2 * c).unwrap();
            let counter = device.alloc_zeros::<u32>(1).unwrap();
            let (ni, ci, rows) =
                (KernelArg::I32(n as i32), KernelArg::I32(c as i32), KernelArg::I32(rows_per_block as i32));
            let (scratch_arg, counter_arg) =
                (KernelArg::Ptr(scratch.device_ptr()), KernelArg::Ptr(counter.device_ptr()));
            let args = [
                ptr(&dx, sx),
                ptr(&dw, sg),
                ptr(&db, sg),
                scratch_arg,
                counter_arg,
                ptr(&dyv, sx),
                ptr(&xv, sx),
                ptr(&wv, sx),
                KernelArg::Ptr(gmean.device_ptr()),
                KernelArg::Ptr(grstd.device_ptr()),
                ni,
                ci,
                rows,
            ];
            device.launch("layernorm_backward_bf16_f32", config, &args).unwrap();
            let tol =
                |name: &str, got: Vec<f32>, want: &[f32]| assert_close_scaled(name, &got, &to_f64(want), F32_RTOL);
            tol(&format!("layernorm dweight {what}"), read(device, &dw, sg, c, &what), &want_dw);
            tol(&format!("layernorm dbias {what}"), read(device, &db, sg, c, &what), &want_db);

            let mut rms = vec![0.0; n];
            cpu.rmsnorm_forward(&mut out, &mut rms, &x, &w, n, c, 1e-5).unwrap();
            let grms = device.upload(&rms).unwrap();
            let (mut want_dx, mut want_dw) = (prior.clone(), prior_w.clone());
            cpu.rmsnorm_backward(&mut want_dx, &mut want_dw, &dy, &x, &w, &rms, n, c).unwrap();
            let (dx, dw) = (view(device, &prior, sx, bf), view(device, &prior_w, sg, same));
            let config =
                LaunchConfig::grid_1d(blocks as u32, 32 * warps as u32).with_shared_bytes((warps * c * 4) as u32);
            let args = [
                ptr(&dx, sx),
                ptr(&dw, sg),
                scratch_arg,
                counter_arg,
                ptr(&dyv, sx),
                ptr(&xv, sx),
                ptr(&wv, sx),
                KernelArg::Ptr(grms.device_ptr()),
                ni,
                ci,
                rows,
            ];
            device.launch("rmsnorm_backward_bf16_f32", config, &args).unwrap();
            tol(&format!("rmsnorm dweight {what}"), read(device, &dw, sg, c, &what), &want_dw);
            assert_eq!(device.download(&counter).unwrap(), [0], "the last block resets the counter");

            // The embedding backward: rows of three ids, in the bucket arrays the host would build.
            let vocab = 3;
            let ids: Vec<i32> = (0..n as i32).map(|t| t % vocab as i32).collect();
            let prior_table = randn(&mut r, vocab * c, 1.0);
            let mut want = prior_table.clone();
            let cpu_ids = cpu.upload_ids(&ids).unwrap();
            cpu.embedding_backward(&mut want, None, &dy, &cpu_ids, &cpu_ids, n, c).unwrap();
            let mut plan: Vec<i32> = (0..vocab as i32).flat_map(|id| (id..n as i32).step_by(vocab)).collect();
            let mut starts = vec![0];
            for id in 0..vocab as i32 {
                starts.push(starts.last().unwrap() + ids.iter().filter(|&&t| t == id).count() as i32);
            }
            plan.extend(&starts);
            plan.extend(0..vocab as i32);
            let plan = device.upload(&plan).unwrap();
            let table = view(device, &prior_table, sg, same);
            let groups = c.div_ceil(8);
            let threads = groups.next_multiple_of(32) as u32;
            let config = LaunchConfig { grid: (vocab as u32, 1, 1), block: (threads, 1, 1), shared_bytes: 0 };
            let at = |k: usize| KernelArg::Ptr(plan.device_ptr() + 4 * k as u64);
            let args = [ptr(&table, sg), ptr(&dyv, sx), at(0), at(n), at(n + vocab + 1), ci];
            device.launch("embedding_backward_bf16_f32", config, &args).unwrap();
            tol(&format!("embedding dtable {what}"), read(device, &table, sg, vocab * c, &what), &want);
        }
    }
}

/// Tensor sizes of the list forms: single, ragged tails, around one and two chunks.
fn ragged_lens() -> Vec<usize> {
    let chunk = MULTI_TENSOR_CHUNK as usize;
    vec![1, 7, 4097, 0, 3, chunk - 1, chunk + 1, 2 * chunk + 5, 6]
}

/// AdamW and SGD reading f32 gradients (odd-indexed tensors keep bf16 gradients, so one list takes
/// two launches): the list forms against a launch per tensor bit for bit (master, stored parameter,
/// moments), and against the CPU at f32 tolerance; the grad norm of the mixed list against a launch
/// per tensor and the CPU's.
fn updates(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 64);
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
    // Even tensors: f32 gradients (exact f32 values); odd: the activations' type (as stored).
    let gradients = |f: &mut Fixture| -> (Vec<Vec<f32>>, Vec<CudaBuf>) {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| match i % 2 {
                0 => {
                    let g = randn(&mut f.rng, n, 0.1);
                    let buf = f32_grad(f, &g);
                    (g, buf)
                }
                _ => f.fresh(n, 0.1),
            })
            .unzip()
    };
    for step in 1..=3 {
        let (cg, gg) = gradients(&mut f);
        let p = AdamWParams { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step, grad_scale: 0.8 };
        for ([param, m, v], grad) in single.iter_mut().zip(&gg) {
            f.cuda.adamw(param, grad, m, v, &p).unwrap();
        }
        let mut tensors: Vec<AdamWTensor<'_, CudaBuf>> = multi
            .iter_mut()
            .zip(&gg)
            .map(|([param, m, v], grad)| AdamWTensor { param, grad, m, v, decay: true })
            .collect();
        f.cuda.adamw_tensors(&mut tensors, &p).unwrap();
        let mut tensors: Vec<AdamWTensor<'_, Vec<f32>>> = cpu
            .iter_mut()
            .zip(&cg)
            .map(|([param, m, v], grad)| AdamWTensor { param, grad, m, v, decay: true })
            .collect();
        f.cpu.adamw_tensors(&mut tensors, &p).unwrap();
        for g in &gg[..1] {
            assert_eq!(g.dtype(), Dtype::F32, "the update reads the gradient as stored");
        }
        // The grad norm reads each gradient as stored, in one launch or one per tensor.
        let refs: Vec<&CudaBuf> = gg.iter().collect();
        let (one, per) = (f.cuda.sum_squares(&refs).unwrap(), f.cuda.sum_squares_per_tensor(&refs).unwrap());
        assert_eq!(one.to_bits(), per.to_bits(), "grad norm, one launch vs per tensor ({precision})");
        let want = f.cpu.sum_squares(&cg.iter().collect::<Vec<_>>()).unwrap();
        assert!((one - want).abs() <= 1e-6 * want, "grad norm {one} vs the CPU's {want} ({precision})");
    }
    let (cg, gg) = gradients(&mut f);
    for ([param, ..], grad) in single.iter_mut().zip(&gg) {
        f.cuda.sgd(param, grad, 0.05, 0.5).unwrap();
    }
    let mut tensors: Vec<SgdTensor<'_, CudaBuf>> =
        multi.iter_mut().zip(&gg).map(|([param, ..], grad)| SgdTensor { param, grad }).collect();
    f.cuda.sgd_tensors(&mut tensors, 0.05, 0.5).unwrap();
    let mut tensors: Vec<SgdTensor<'_, Vec<f32>>> =
        cpu.iter_mut().zip(&cg).map(|([param, ..], grad)| SgdTensor { param, grad }).collect();
    f.cpu.sgd_tensors(&mut tensors, 0.05, 0.5).unwrap();

    for (i, ((a, b), want)) in single.iter().zip(&multi).zip(&cpu).enumerate() {
        for (k, name) in ["param", "m", "v"].iter().enumerate() {
            let what = format!("tensor {i} ({} elements) {name} ({precision})", lens[i]);
            let (x, y) = (f.cuda.download(&a[k]).unwrap(), f.cuda.download(&b[k]).unwrap());
            assert_bitwise_eq(&format!("{what}: per tensor vs list"), &x, &y);
            // The master weights and the moments are f32 in both modes.
            f.check_at(&what, &b[k], &want[k], 1e-5);
        }
    }
}

device_tests!(norm_backwards, embedding_backward, matmul_backward, misaligned, updates);
