//! The memory-bound kernels off their 128-bit path: each launched directly on views that start one
//! element past an allocation (not 16-byte aligned), beside aligned ones, at widths that are and are
//! not multiples of the pack (4 f32, 8 bf16), against the CPU backend on the same stored inputs. The
//! backend only ever hands the kernels whole allocations, so these launches are the only way to reach
//! the one-element-at-a-time path for even widths; odd widths reach it through the backend as well.
//! Every output view is poisoned with NaN and so are the elements around it, which must stay NaN (no
//! stray writes). F32 at 1e-5 of the largest entry; bf16 within one rounding per element (plus the
//! floor of `Fixture::check`).

use half::bf16;
use safedpo::backend::cuda::{Device, DeviceBuffer, KernelArg, LaunchConfig, Precision};
use safedpo::backend::prelude::*;

use crate::common::*;
use crate::device::{ACCUMULATED_FLOOR, BF16_NOISE_FLOOR};
use crate::{backend, packing};

/// Elements of poison on each side of a view.
const MARGIN: usize = 8;

enum Storage {
    F32(DeviceBuffer<f32>),
    Bf16(DeviceBuffer<bf16>),
}

/// A tensor in the precision's storage type at element `shift` of an allocation with NaN around it.
struct Shifted {
    storage: Storage,
    shift: usize,
    len: usize,
}

impl Shifted {
    fn new(device: &Device, precision: Precision, x: &[f32], shift: usize) -> Self {
        let mut padded = vec![f32::NAN; shift];
        padded.extend_from_slice(x);
        padded.extend(vec![f32::NAN; MARGIN]);
        let storage = match precision {
            Precision::F32 => Storage::F32(device.upload(&padded).unwrap()),
            Precision::Bf16 => {
                Storage::Bf16(device.upload(&padded.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()).unwrap())
            }
        };
        Self { storage, shift, len: x.len() }
    }

    fn arg(&self) -> KernelArg {
        let (base, size) = match &self.storage {
            Storage::F32(b) => (b.device_ptr(), 4),
            Storage::Bf16(b) => (b.device_ptr(), 2),
        };
        KernelArg::Ptr(base + (self.shift * size) as u64)
    }

    /// The whole allocation as f32.
    fn all(&self, device: &Device) -> Vec<f32> {
        match &self.storage {
            Storage::F32(b) => device.download(b).unwrap(),
            Storage::Bf16(b) => device.download(b).unwrap().into_iter().map(f32::from).collect(),
        }
    }

    /// The view's elements; asserts the poison around it is untouched.
    fn read(&self, device: &Device, what: &str) -> Vec<f32> {
        let all = self.all(device);
        let outside = all[..self.shift].iter().chain(&all[self.shift + self.len..]);
        assert!(outside.into_iter().all(|v| v.is_nan()), "{what}: a write outside the view");
        all[self.shift..self.shift + self.len].to_vec()
    }
}

/// One precision's launches: the stored (rounded) inputs, views, kernel names, and the comparison.
struct Case<'a> {
    device: &'a Device,
    precision: Precision,
}

impl Case<'_> {
    fn stored(&self, x: Vec<f32>) -> Vec<f32> {
        match self.precision {
            Precision::F32 => x,
            Precision::Bf16 => x.into_iter().map(|v| bf16::from_f32(v).to_f32()).collect(),
        }
    }

    fn view(&self, x: &[f32], shift: usize) -> Shifted {
        Shifted::new(self.device, self.precision, x, shift)
    }

    fn poisoned(&self, len: usize, shift: usize) -> Shifted {
        self.view(&poison(len), shift)
    }

    fn kernel(&self, op: &str) -> String {
        let suffix = match self.precision {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        };
        format!("{op}_{suffix}")
    }

    fn launch(&self, op: &str, config: LaunchConfig, args: &[KernelArg]) {
        let name = self.kernel(op);
        self.device.launch(&name, config, args).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }

    /// `got` (rounded `roundings` times to the storage type) against the CPU's `want`.
    #[track_caller]
    fn check(&self, what: &str, got: &Shifted, want: &[f32], roundings: f64, floor: f64) {
        let what = format!("{what} ({})", self.precision);
        let got = got.read(self.device, &what);
        match self.precision {
            Precision::F32 => assert_close_scaled(&what, &got, &to_f64(want), 1e-5),
            Precision::Bf16 => assert_close_with_floor(&what, &got, &to_f64(want), roundings * BF16_ROUNDING, floor),
        }
    }

    /// An f32 output (statistics) against the CPU's.
    fn check_f32(&self, what: &str, got: &DeviceBuffer<f32>, want: &[f32]) {
        let got = self.device.download(got).unwrap();
        assert_close_scaled(&format!("{what} ({})", self.precision), &got, &to_f64(want), 1e-5);
    }
}

/// Shifts of the views of one launch: every view aligned, then one or all of them one element off.
const SHIFTS: [[usize; 3]; 3] = [[0, 0, 0], [1, 0, 0], [1, 1, 1]];

fn pointwise(device: &Device, precision: Precision) {
    let case = Case { device, precision };
    let be = backend();
    let mut r = rng(40);
    for n in [1024, 1001] {
        for [s0, s1, s2] in SHIFTS {
            let what = format!("n {n}, shifts {s0} {s1} {s2}");
            let grid = LaunchConfig::for_elements(n, 256);
            let (x, y) = (case.stored(randn(&mut r, n, 1.5)), case.stored(randn(&mut r, n, 1.0)));
            let (xv, yv) = (case.view(&x, s1), case.view(&y, s2));

            let mut want = vec![0.0; n];
            be.gelu_forward(&mut want, &x).unwrap();
            let out = case.poisoned(n, s0);
            case.launch("gelu_forward", grid, &[out.arg(), xv.arg(), KernelArg::I64(n as i64)]);
            case.check(&format!("gelu_forward {what}"), &out, &want, 1.0, BF16_NOISE_FLOOR);

            be.gelu_backward(&mut want, &x, &y).unwrap();
            let out = case.poisoned(n, s0);
            case.launch("gelu_backward", grid, &[out.arg(), xv.arg(), yv.arg(), KernelArg::I64(n as i64)]);
            case.check(&format!("gelu_backward {what}"), &out, &want, 1.0, BF16_NOISE_FLOOR);

            be.residual_forward(&mut want, &x, &y).unwrap();
            let out = case.poisoned(n, s0);
            case.launch("residual_forward", grid, &[out.arg(), xv.arg(), yv.arg(), KernelArg::I64(n as i64)]);
            case.check(&format!("residual_forward {what}"), &out, &want, 1.0, BF16_NOISE_FLOOR);

            let mut want = x.clone();
            be.add_inplace(&mut want, &y).unwrap();
            let dst = case.view(&x, s0);
            case.launch("add_inplace", grid, &[dst.arg(), yv.arg(), KernelArg::I64(n as i64)]);
            case.check(&format!("add_inplace {what}"), &dst, &want, 1.0, BF16_NOISE_FLOOR);

            let mut want = x.clone();
            be.scale(&mut want, 0.3).unwrap();
            let buf = case.view(&x, s0);
            case.launch("scale", grid, &[buf.arg(), KernelArg::F32(0.3), KernelArg::I64(n as i64)]);
            case.check(&format!("scale {what}"), &buf, &want, 1.0, BF16_NOISE_FLOOR);
        }
    }
}

/// The fused backward of a norm at a launch shape of the test's own (any shape is valid: `warps`
/// warps, `rows_per_block` rows a block), with the scratch and the zeroed counter it needs.
struct NormBackwardLaunch {
    config: LaunchConfig,
    rows_per_block: usize,
    scratch: DeviceBuffer<f32>,
    counter: DeviceBuffer<u32>,
}

impl NormBackwardLaunch {
    fn new(device: &Device, n: usize, c: usize, gradients: usize, warps: usize, rows_per_block: usize) -> Self {
        let blocks = n.div_ceil(rows_per_block);
        let config = LaunchConfig::grid_1d(blocks as u32, 32 * warps as u32)
            .with_shared_bytes((warps * gradients * c * 4) as u32);
        Self {
            config,
            rows_per_block,
            scratch: device.alloc(blocks * gradients * c).unwrap(),
            counter: device.alloc_zeros(1).unwrap(),
        }
    }
}

fn layernorm(device: &Device, precision: Precision) {
    let case = Case { device, precision };
    let be = backend();
    let mut r = rng(41);
    for (n, c) in [(37, 64), (37, 77)] {
        for [s0, s1, s2] in SHIFTS {
            let what = format!("[{n}, {c}], shifts {s0} {s1} {s2}");
            let x = case.stored(randn(&mut r, n * c, 2.0));
            let (w, b) = (case.stored(randn(&mut r, c, 1.0)), case.stored(randn(&mut r, c, 0.5)));
            let (xv, wv, bv) = (case.view(&x, s1), case.view(&w, s2), case.view(&b, 0));
            let (mut want, mut want_mean, mut want_rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
            be.layernorm_forward(&mut want, &mut want_mean, &mut want_rstd, &x, &w, &b, n, c, 1e-5).unwrap();
            let out = case.poisoned(n * c, s0);
            let (mean, rstd) = (device.alloc::<f32>(n).unwrap(), device.alloc::<f32>(n).unwrap());
            let rows = LaunchConfig::grid_1d(n.div_ceil(4) as u32, 128);
            let (ni, ci) = (KernelArg::I32(n as i32), KernelArg::I32(c as i32));
            let stats = [KernelArg::Ptr(mean.device_ptr()), KernelArg::Ptr(rstd.device_ptr())];
            let args = [out.arg(), stats[0], stats[1], xv.arg(), wv.arg(), bv.arg(), ni, ci, KernelArg::F32(1e-5)];
            case.launch("layernorm_forward", rows, &args);
            case.check(&format!("layernorm_forward {what}"), &out, &want, 1.0, BF16_NOISE_FLOOR);
            case.check_f32(&format!("layernorm_forward rstd {what}"), &rstd, &want_rstd);

            // The fused residual form on a = x, b = 0 (the residual is x exactly, as stored).
            let zero = case.view(&vec![0.0; n * c], s2);
            let (residual, out) = (case.poisoned(n * c, s1), case.poisoned(n * c, s0));
            let args = [
                residual.arg(),
                out.arg(),
                stats[0],
                stats[1],
                xv.arg(),
                zero.arg(),
                wv.arg(),
                bv.arg(),
                ni,
                ci,
                KernelArg::F32(1e-5),
            ];
            case.launch("residual_layernorm_forward", rows, &args);
            case.check(&format!("residual_layernorm_forward residual {what}"), &residual, &x, 1.0, 0.0);
            case.check(&format!("residual_layernorm_forward {what}"), &out, &want, 1.0, BF16_NOISE_FLOOR);

            let dy = case.stored(randn(&mut r, n * c, 1.0));
            let (prior, prior_w, prior_b) = (
                case.stored(randn(&mut r, n * c, 1.0)),
                case.stored(randn(&mut r, c, 1.0)),
                case.stored(randn(&mut r, c, 1.0)),
            );
            let (mut want_dx, mut want_dw, mut want_db) = (prior.clone(), prior_w.clone(), prior_b.clone());
            be.layernorm_backward(&mut want_dx, &mut want_dw, &mut want_db, &dy, &x, &w, &want_mean, &want_rstd, n, c)
                .unwrap();
            let (dx, dw, db) = (case.view(&prior, s0), case.view(&prior_w, s2), case.view(&prior_b, 0));
            let dyv = case.view(&dy, s2);
            let (mean, rstd) = (device.upload(&want_mean).unwrap(), device.upload(&want_rstd).unwrap());
            let plan = NormBackwardLaunch::new(device, n, c, 2, 2, 5);
            let args = [
                dx.arg(),
                dw.arg(),
                db.arg(),
                KernelArg::Ptr(plan.scratch.device_ptr()),
                KernelArg::Ptr(plan.counter.device_ptr()),
                dyv.arg(),
                xv.arg(),
                wv.arg(),
                KernelArg::Ptr(mean.device_ptr()),
                KernelArg::Ptr(rstd.device_ptr()),
                ni,
                ci,
                KernelArg::I32(plan.rows_per_block as i32),
            ];
            case.launch("layernorm_backward", plan.config, &args);
            case.check(&format!("layernorm_backward dinp {what}"), &dx, &want_dx, 1.0, ACCUMULATED_FLOOR);
            case.check(&format!("layernorm_backward dweight {what}"), &dw, &want_dw, 1.0, ACCUMULATED_FLOOR);
            case.check(&format!("layernorm_backward dbias {what}"), &db, &want_db, 1.0, ACCUMULATED_FLOOR);
            assert_eq!(device.download(&plan.counter).unwrap(), [0], "the last block resets the counter");
        }
    }
}

fn rmsnorm(device: &Device, precision: Precision) {
    let case = Case { device, precision };
    let be = backend();
    let mut r = rng(42);
    for (n, c) in [(37, 64), (37, 77)] {
        for [s0, s1, s2] in SHIFTS {
            let what = format!("[{n}, {c}], shifts {s0} {s1} {s2}");
            let x = case.stored(randn(&mut r, n * c, 2.0));
            let w = case.stored(randn(&mut r, c, 1.0));
            let (xv, wv) = (case.view(&x, s1), case.view(&w, s2));
            let (mut want, mut want_rstd) = (vec![0.0; n * c], vec![0.0; n]);
            be.rmsnorm_forward(&mut want, &mut want_rstd, &x, &w, n, c, 1e-6).unwrap();
            let out = case.poisoned(n * c, s0);
            let rstd = device.alloc::<f32>(n).unwrap();
            let rows = LaunchConfig::grid_1d(n.div_ceil(4) as u32, 128);
            let (ni, ci) = (KernelArg::I32(n as i32), KernelArg::I32(c as i32));
            let rstd_arg = KernelArg::Ptr(rstd.device_ptr());
            case.launch(
                "rmsnorm_forward",
                rows,
                &[out.arg(), rstd_arg, xv.arg(), wv.arg(), ni, ci, KernelArg::F32(1e-6)],
            );
            case.check(&format!("rmsnorm_forward {what}"), &out, &want, 1.0, BF16_NOISE_FLOOR);
            case.check_f32(&format!("rmsnorm_forward rstd {what}"), &rstd, &want_rstd);

            let dy = case.stored(randn(&mut r, n * c, 1.0));
            let (prior, prior_w) = (case.stored(randn(&mut r, n * c, 1.0)), case.stored(randn(&mut r, c, 1.0)));
            let (mut want_dx, mut want_dw) = (prior.clone(), prior_w.clone());
            be.rmsnorm_backward(&mut want_dx, &mut want_dw, &dy, &x, &w, &want_rstd, n, c).unwrap();
            let (dx, dw, dyv) = (case.view(&prior, s0), case.view(&prior_w, s2), case.view(&dy, s2));
            let rstd = device.upload(&want_rstd).unwrap();
            let plan = NormBackwardLaunch::new(device, n, c, 1, 4, 3);
            let args = [
                dx.arg(),
                dw.arg(),
                KernelArg::Ptr(plan.scratch.device_ptr()),
                KernelArg::Ptr(plan.counter.device_ptr()),
                dyv.arg(),
                xv.arg(),
                wv.arg(),
                KernelArg::Ptr(rstd.device_ptr()),
                ni,
                ci,
                KernelArg::I32(plan.rows_per_block as i32),
            ];
            case.launch("rmsnorm_backward", plan.config, &args);
            case.check(&format!("rmsnorm_backward dinp {what}"), &dx, &want_dx, 1.0, ACCUMULATED_FLOOR);
            case.check(&format!("rmsnorm_backward dweight {what}"), &dw, &want_dw, 1.0, ACCUMULATED_FLOOR);
            assert_eq!(device.download(&plan.counter).unwrap(), [0], "the last block resets the counter");
        }
    }
}

fn swiglu(device: &Device, precision: Precision) {
    let case = Case { device, precision };
    let be = backend();
    let mut r = rng(43);
    for (n, f) in [(5, 64), (5, 37)] {
        for [s0, s1, s2] in SHIFTS {
            let what = format!("[{n}, {f}], shifts {s0} {s1} {s2}");
            let grid = LaunchConfig::for_elements(n * f, 256);
            let x = case.stored(randn(&mut r, n * 2 * f, 2.0));
            let dy = case.stored(randn(&mut r, n * f, 1.0));
            let (xv, dyv) = (case.view(&x, s1), case.view(&dy, s2));
            let (nl, fi) = (KernelArg::I64(n as i64), KernelArg::I32(f as i32));
            let mut want = vec![0.0; n * f];
            be.swiglu_forward(&mut want, &x, n, f).unwrap();
            let out = case.poisoned(n * f, s0);
            case.launch("swiglu_forward", grid, &[out.arg(), xv.arg(), nl, fi]);
            case.check(&format!("swiglu_forward {what}"), &out, &want, 1.0, BF16_NOISE_FLOOR);

            let mut want = vec![0.0; n * 2 * f];
            be.swiglu_backward(&mut want, &x, &dy, n, f).unwrap();
            let dx = case.poisoned(n * 2 * f, s0);
            case.launch("swiglu_backward", grid, &[dx.arg(), xv.arg(), dyv.arg(), nl, fi]);
            case.check(&format!("swiglu_backward {what}"), &dx, &want, 1.0, BF16_NOISE_FLOOR);
        }
    }
}

fn embedding_and_rows(device: &Device, precision: Precision) {
    let case = Case { device, precision };
    let be = backend();
    let mut r = rng(44);
    let (n, vocab) = (9, 13);
    let tokens = rand_ids(&mut r, n, vocab);
    let positions: Vec<i32> = (0..n as i32).collect();
    let (tok, pos) = (device.upload(&tokens).unwrap(), device.upload(&positions).unwrap());
    let picked = vec![0i32, 3, 4, 8];
    let picked_dev = device.upload(&picked).unwrap();
    for c in [64, 37] {
        for [s0, s1, s2] in SHIFTS {
            let what = format!("c {c}, shifts {s0} {s1} {s2}");
            let (wte, wpe) = (case.stored(randn(&mut r, vocab * c, 1.0)), case.stored(randn(&mut r, n * c, 1.0)));
            let (wte_v, wpe_v) = (case.view(&wte, s1), case.view(&wpe, s2));
            let mut want = vec![0.0; n * c];
            be.embedding_forward(&mut want, &tokens, &positions, &wte, Some(&wpe), n, c).unwrap();
            let out = case.poisoned(n * c, s0);
            let args = [
                out.arg(),
                KernelArg::Ptr(tok.device_ptr()),
                KernelArg::Ptr(pos.device_ptr()),
                wte_v.arg(),
                wpe_v.arg(),
                KernelArg::I32(n as i32),
                KernelArg::I32(c as i32),
            ];
            case.launch("embedding_forward", LaunchConfig::for_elements(n * c, 256), &args);
            case.check(&format!("embedding_forward {what}"), &out, &want, 1.0, BF16_NOISE_FLOOR);

            // Rows of the token table (as [vocab, c]), gathered and scattered back.
            let m = picked.len();
            let mut want = vec![0.0; m * c];
            be.gather_rows(&mut want, &wte, &picked, m, vocab, c).unwrap();
            let out = case.poisoned(m * c, s0);
            let (rows_arg, ci) = (KernelArg::Ptr(picked_dev.device_ptr()), KernelArg::I32(c as i32));
            case.launch("gather_rows", LaunchConfig::grid_1d(m as u32, 32), &[out.arg(), wte_v.arg(), rows_arg, ci]);
            case.check(&format!("gather_rows {what}"), &out, &want, 0.0, 0.0);
            let mut want_back = vec![0.0; vocab * c];
            be.scatter_rows(&mut want_back, &want, &picked, m, vocab, c).unwrap();
            let back = case.poisoned(vocab * c, s2);
            let args = [back.arg(), out.arg(), rows_arg, KernelArg::I32(m as i32), ci];
            case.launch("scatter_rows", LaunchConfig::grid_1d(vocab as u32, 32), &args);
            case.check(&format!("scatter_rows {what}"), &back, &want_back, 0.0, 0.0);
        }
    }
}

fn logsoftmax_gather(device: &Device, precision: Precision) {
    let case = Case { device, precision };
    let be = backend();
    let mut r = rng(45);
    for v in [64, 771] {
        for shift in [0, 1, 3] {
            let what = format!("v {v}, shift {shift}");
            let n = 5;
            let logits = case.stored(randn(&mut r, n * v, 3.0));
            let mut targets = rand_ids(&mut r, n, v);
            targets[2] = -1;
            let (mut want_lp, mut want_lse) = (vec![0.0; n], vec![0.0; n]);
            be.logsoftmax_gather_forward(&mut want_lp, &mut want_lse, &logits, &targets, n, v).unwrap();
            let lv = case.view(&logits, shift);
            let (lp, lse) = (device.alloc::<f32>(n).unwrap(), device.alloc::<f32>(n).unwrap());
            let targets_dev = device.upload(&targets).unwrap();
            let rows = LaunchConfig::grid_1d(n as u32, 256);
            let (lp_arg, lse_arg, t_arg) = (
                KernelArg::Ptr(lp.device_ptr()),
                KernelArg::Ptr(lse.device_ptr()),
                KernelArg::Ptr(targets_dev.device_ptr()),
            );
            case.launch(
                "logsoftmax_gather_forward",
                rows,
                &[lp_arg, lse_arg, lv.arg(), t_arg, KernelArg::I32(v as i32)],
            );
            case.check_f32(&format!("logsoftmax_gather_forward token_logp {what}"), &lp, &want_lp);
            case.check_f32(&format!("logsoftmax_gather_forward lse {what}"), &lse, &want_lse);

            let pk = packing(&be, &[n]);
            let dseq = vec![0.7f32];
            let mut want = logits.clone();
            be.logsoftmax_gather_backward(&mut want, &want_lse, &targets, &dseq, &pk, n, v).unwrap();
            let (lse, dseq_dev, cu) = (
                device.upload(&want_lse).unwrap(),
                device.upload(&dseq).unwrap(),
                device.upload(&[0, n as i32]).unwrap(),
            );
            let args = [
                lv.arg(),
                KernelArg::Ptr(lse.device_ptr()),
                t_arg,
                KernelArg::Ptr(dseq_dev.device_ptr()),
                KernelArg::Ptr(cu.device_ptr()),
                KernelArg::I32(1),
                KernelArg::I32(v as i32),
            ];
            case.launch("logsoftmax_gather_backward", rows, &args);
            case.check(&format!("logsoftmax_gather_backward {what}"), &lv, &want, 1.0, BF16_NOISE_FLOOR);
        }
    }
}

device_tests!(pointwise, layernorm, rmsnorm, swiglu, embedding_and_rows, logsoftmax_gather);
