//! Every kernel at offsets past 2^31 elements, where a 32-bit index product wraps.
//!
//! A tensor that large takes 8 GiB in f32, more than a CI machine can fill for every kernel. On the
//! emulated device two switches make the check cheap: fresh buffers stay zero pages that take memory
//! only where written (`emu::set_lazy_alloc`), and a block window (`emu::BlockWindow`) runs only the
//! blocks at the far end of the grid. Each case writes its inputs only where those blocks read, runs
//! the op through the backend as the model calls it, and compares the outputs there with the CPU
//! backend run on just those rows. A wrapped offset reads or writes the wrong memory (a crash, or
//! values other than the CPU's): each case runs in a child process (this test binary), so that a
//! crash fails the case by name.
//!
//! Grid-stride kernels: with `n` a multiple of the launch's stride (grid × block, checked from the
//! window's record), the last `block` elements are the last block's final iteration. Row kernels:
//! the last two blocks hold at least the last two rows. Multi-tensor kernels (one launch over a list
//! of tensors): the wide tensor last in the list, so that the launch's last block is its last chunk.
//!
//! The GPU twin (ignored without a GPU) runs every case whole, with no window: about 9 GiB a buffer.

use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::cuda::kernels::constants::optimizer::MULTI_TENSOR_CHUNK;
use safedpo::backend::cuda::{emu, CudaBackend, CudaBuf, Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::{AdamWParams, AdamWTensor, DecodeSpans, Packing, QkvLayout};

use crate::common::*;

/// Elements of a grid-stride tensor: past 2^31, a multiple of every grid-stride launch's stride.
const WIDE: usize = (1 << 31) + (1 << 20);
/// Elements of a packed grid-stride tensor (4 f32 per thread): past 2^31, and WIDE_PACKED / 4 a
/// multiple of every grid-stride launch's stride.
const WIDE_PACKED: usize = (1 << 31) + (1 << 22);
/// f32 elements per 128-bit pack.
const F32_PACK: usize = 4;
/// Channels of the row cases; `ROWS` rows of them reach past 2^31 elements.
const C: usize = 1024;
const ROWS: usize = (1 << 31) / C + 8;
/// Rows checked at the end of a row tensor.
const TAIL_ROWS: usize = 2;

struct Wide {
    cuda: CudaBackend,
    cpu: CpuBackend,
    emulated: bool,
}

impl Wide {
    fn new(device: &Device) -> Self {
        Self::with_precision(device, Precision::F32)
    }

    fn with_precision(device: &Device, precision: Precision) -> Self {
        Self {
            cuda: CudaBackend::new(device.clone(), precision),
            cpu: CpuBackend::new(),
            emulated: device.is_emulated(),
        }
    }

    /// Runs `body` with the block window on the kernels named `prefix…` (emulated device only) and
    /// returns the window's record (None on a GPU).
    fn windowed<T>(
        &self,
        windows: &[(&str, emu::BlockRange)],
        body: impl FnOnce() -> T,
    ) -> (T, Option<emu::WindowRecord>) {
        if !self.emulated {
            return (body(), None);
        }
        let window = emu::BlockWindow::new(windows);
        let out = body();
        let record = window.record();
        assert!(record.launches > 0 && record.blocks > 0, "{windows:?}: no launch ran under the window: {record:?}");
        (out, Some(record))
    }

    /// A zeroed device buffer of `len` with `values` written at `offset`.
    fn sparse(&self, len: usize, offset: usize, values: &[f32]) -> CudaBuf {
        let mut buf = self.cuda.zeros(len).unwrap();
        self.cuda.write_range(&mut buf, offset, values).unwrap();
        buf
    }

    fn read(&self, buf: &CudaBuf, offset: usize, len: usize) -> Vec<f32> {
        self.cuda.read_range(buf, offset..offset + len).unwrap()
    }
}

/// The window's stride divides `n`, so the last `block` elements are the last block's.
fn assert_tail_in_last_block(record: Option<emu::WindowRecord>, n: usize) -> usize {
    match record {
        None => 256,
        Some(r) => {
            let stride = r.grid[0] as usize * r.block[0] as usize;
            assert!(n.is_multiple_of(stride), "the launch's stride {stride} does not divide {n}: {r:?}");
            r.block[0] as usize
        }
    }
}

/// As [`assert_tail_in_last_block`], for a kernel whose threads take `width`-element packs (128-bit
/// accesses, `grid_stride_packed`): the stride is grid × block × width, and the last block's final
/// iteration covers the last `block × width` elements, which this returns.
fn assert_tail_in_last_packed_block(record: Option<emu::WindowRecord>, n: usize, width: usize) -> usize {
    match record {
        None => 256 * width,
        Some(r) => {
            let stride = r.grid[0] as usize * r.block[0] as usize * width;
            assert!(n.is_multiple_of(stride), "the launch's stride {stride} does not divide {n}: {r:?}");
            r.block[0] as usize * width
        }
    }
}

fn check(what: &str, got: &[f32], want: &[f32]) {
    assert_close_scaled(what, got, &to_f64(want), 1e-5);
}

fn gelu(w: &Wide) {
    let tail = 256;
    let x = randn(&mut rng(1), tail, 1.5);
    let inp = w.sparse(WIDE_PACKED, WIDE_PACKED - tail, &x);
    let mut out = w.sparse(WIDE_PACKED, WIDE_PACKED - tail, &poison(tail));
    let ((), record) =
        w.windowed(&[("gelu_forward", emu::BlockRange::last_x(1))], || w.cuda.gelu_forward(&mut out, &inp).unwrap());
    assert!(assert_tail_in_last_packed_block(record, WIDE_PACKED, F32_PACK) >= tail);
    let mut want = w.cpu.zeros(tail).unwrap();
    w.cpu.gelu_forward(&mut want, &w.cpu.upload(&x).unwrap()).unwrap();
    check("gelu_forward past 2^31", &w.read(&out, WIDE_PACKED - tail, tail), &w.cpu.download(&want).unwrap());
}

fn swiglu(w: &Wide) {
    // out [n, f] (a multiple of the stride), inp [n, 2f] past 2^31: the last row's last 256 columns.
    let f = 1024;
    let n = (1 << 20) + 4096;
    let tail = 256;
    let row = randn(&mut rng(2), 2 * f, 1.0);
    let inp = w.sparse(n * 2 * f, (n - 1) * 2 * f, &row);
    let mut out = w.sparse(n * f, n * f - tail, &poison(tail));
    let ((), record) = w.windowed(&[("swiglu_forward", emu::BlockRange::last_x(1))], || {
        w.cuda.swiglu_forward(&mut out, &inp, n, f).unwrap()
    });
    assert!(assert_tail_in_last_packed_block(record, n * f, F32_PACK) >= tail);
    let mut want = w.cpu.zeros(f).unwrap();
    w.cpu.swiglu_forward(&mut want, &w.cpu.upload(&row).unwrap(), 1, f).unwrap();
    let want = w.cpu.download(&want).unwrap();
    check("swiglu_forward past 2^31", &w.read(&out, n * f - tail, tail), &want[f - tail..]);

    let dout = randn(&mut rng(3), tail, 1.0);
    let dout_buf = w.sparse(n * f, n * f - tail, &dout);
    let mut dinp = w.sparse(n * 2 * f, (n - 1) * 2 * f, &poison(2 * f));
    let ((), record) = w.windowed(&[("swiglu_backward", emu::BlockRange::last_x(1))], || {
        w.cuda.swiglu_backward(&mut dinp, &inp, &dout_buf, n, f).unwrap()
    });
    assert_tail_in_last_packed_block(record, n * f, F32_PACK);
    let mut full_dout = vec![0.0; f];
    full_dout[f - tail..].copy_from_slice(&dout);
    let mut want = w.cpu.zeros(2 * f).unwrap();
    let (inp_row, dout_row) = (w.cpu.upload(&row).unwrap(), w.cpu.upload(&full_dout).unwrap());
    w.cpu.swiglu_backward(&mut want, &inp_row, &dout_row, 1, f).unwrap();
    let want = w.cpu.download(&want).unwrap();
    let got = w.read(&dinp, (n - 1) * 2 * f, 2 * f);
    // The gate's and the up projection's gradient columns of the checked outputs.
    check("swiglu_backward gate past 2^31", &got[f - tail..f], &want[f - tail..f]);
    check("swiglu_backward up past 2^31", &got[2 * f - tail..], &want[2 * f - tail..]);
}

fn adamw(w: &Wide) {
    let tail = 256;
    let mut r = rng(4);
    let (p, g, m, v) =
        (randn(&mut r, tail, 1.0), randn(&mut r, tail, 1.0), randn(&mut r, tail, 0.1), uniform(&mut r, tail, 0.0, 0.1));
    let hyper =
        AdamWParams { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step: 3, grad_scale: 0.5 };
    let at = WIDE - tail;
    let (mut pd, gd, mut md, mut vd) =
        (w.sparse(WIDE, at, &p), w.sparse(WIDE, at, &g), w.sparse(WIDE, at, &m), w.sparse(WIDE, at, &v));
    let ((), record) = w.windowed(&[("adamw", emu::BlockRange::last_x(1))], || {
        w.cuda.adamw(&mut pd, &gd, &mut md, &mut vd, &hyper).unwrap()
    });
    assert_eq!(assert_tail_in_last_block(record, WIDE), tail);
    let up = |x: &[f32]| w.cpu.upload(x).unwrap();
    let (mut pc, gc, mut mc, mut vc) = (up(&p), up(&g), up(&m), up(&v));
    w.cpu.adamw(&mut pc, &gc, &mut mc, &mut vc, &hyper).unwrap();
    for (name, dev, host) in [("param", &pd, &pc), ("m", &md, &mc), ("v", &vd, &vc)] {
        check(&format!("adamw {name} past 2^31"), &w.read(dev, at, tail), &w.cpu.download(host).unwrap());
    }
}

/// The multi-tensor AdamW (`adamw_tensors`, kernel `adamw_multi_*`): a small tensor, then the wide
/// one, whose last chunk is the launch's last block (`WIDE` is a multiple of the chunk).
fn adamw_multi_tensor(w: &Wide) {
    let tail = 256;
    let mut r = rng(6);
    let (p, g, m, v) =
        (randn(&mut r, tail, 1.0), randn(&mut r, tail, 1.0), randn(&mut r, tail, 0.1), uniform(&mut r, tail, 0.0, 0.1));
    let hyper =
        AdamWParams { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step: 3, grad_scale: 0.5 };
    let at = WIDE - tail;
    let (mut pd, gd, mut md, mut vd) =
        (w.sparse(WIDE, at, &p), w.sparse(WIDE, at, &g), w.sparse(WIDE, at, &m), w.sparse(WIDE, at, &v));
    let small = 1000;
    let (mut ps, gs, mut ms, mut vs) =
        (w.sparse(small, 0, &[]), w.sparse(small, 0, &[]), w.sparse(small, 0, &[]), w.sparse(small, 0, &[]));
    let ((), record) = w.windowed(&[("adamw_multi", emu::BlockRange::last_x(1))], || {
        let mut tensors = [
            AdamWTensor { param: &mut ps, grad: &gs, m: &mut ms, v: &mut vs, decay: true },
            AdamWTensor { param: &mut pd, grad: &gd, m: &mut md, v: &mut vd, decay: true },
        ];
        w.cuda.adamw_tensors(&mut tensors, &hyper).unwrap()
    });
    if let Some(r) = record {
        let chunk = MULTI_TENSOR_CHUNK as usize;
        assert!(WIDE.is_multiple_of(chunk), "the last block holds the last {chunk} elements");
        assert_eq!(r.grid[0] as usize, small.div_ceil(chunk) + WIDE / chunk, "{r:?}");
    }
    let up = |x: &[f32]| w.cpu.upload(x).unwrap();
    let (mut pc, gc, mut mc, mut vc) = (up(&p), up(&g), up(&m), up(&v));
    w.cpu.adamw(&mut pc, &gc, &mut mc, &mut vc, &hyper).unwrap();
    for (name, dev, host) in [("param", &pd, &pc), ("m", &md, &mc), ("v", &vd, &vc)] {
        check(&format!("adamw_tensors {name} past 2^31"), &w.read(dev, at, tail), &w.cpu.download(host).unwrap());
    }
}

/// The one-launch sum of squares (kernel `sum_squares_partial_multi`) over a small tensor and the
/// wide one: the wide one's last block (the launch's last) holds the last elements.
fn sum_squares(w: &Wide) {
    let tail = 256;
    let x = randn(&mut rng(5), tail, 1.0);
    let buf = w.sparse(WIDE, WIDE - tail, &x);
    let small = w.sparse(1000, 0, &[]);
    let (got, record) = w.windowed(&[("sum_squares_partial_multi", emu::BlockRange::last_x(1))], || {
        w.cuda.sum_squares(&[&small, &buf]).unwrap()
    });
    if let Some(r) = record {
        // One block for the small tensor, then the wide one's, whose stride divides WIDE.
        let (blocks, threads) = (r.grid[0] as usize - 1, r.block[0] as usize);
        assert!(WIDE.is_multiple_of(blocks * threads), "the stride {blocks}×{threads} does not divide WIDE: {r:?}");
    }
    let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    assert!((got - want).abs() <= 1e-5 * want, "sum_squares past 2^31: {got} vs {want}");
}

/// The last `TAIL_ROWS` rows of a `[ROWS, C]` tensor: random values, and where they start.
fn tail_rows(seed: u64) -> (Vec<f32>, usize) {
    (randn(&mut rng(seed), TAIL_ROWS * C, 1.0), (ROWS - TAIL_ROWS) * C)
}

fn layernorm(w: &Wide) {
    let (x, at) = tail_rows(6);
    let mut r = rng(7);
    let (weight, bias) = (randn(&mut r, C, 1.0), randn(&mut r, C, 1.0));
    let inp = w.sparse(ROWS * C, at, &x);
    let (wd, bd) = (w.cuda.upload(&weight).unwrap(), w.cuda.upload(&bias).unwrap());
    let mut out = w.sparse(ROWS * C, at, &poison(TAIL_ROWS * C));
    let (mut mean, mut rstd) = (w.cuda.zeros(ROWS).unwrap(), w.cuda.zeros(ROWS).unwrap());
    w.windowed(&[("layernorm_forward", emu::BlockRange::last_x(2))], || {
        w.cuda.layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &wd, &bd, ROWS, C, 1e-5).unwrap()
    });
    let up = |x: &[f32]| w.cpu.upload(x).unwrap();
    let (mut want, mut want_mean, mut want_rstd) =
        (w.cpu.zeros(x.len()).unwrap(), w.cpu.zeros(TAIL_ROWS).unwrap(), w.cpu.zeros(TAIL_ROWS).unwrap());
    let (xc, wc, bc) = (up(&x), up(&weight), up(&bias));
    w.cpu.layernorm_forward(&mut want, &mut want_mean, &mut want_rstd, &xc, &wc, &bc, TAIL_ROWS, C, 1e-5).unwrap();
    check("layernorm_forward past 2^31", &w.read(&out, at, x.len()), &w.cpu.download(&want).unwrap());
    check("layernorm_forward rstd", &w.read(&rstd, ROWS - TAIL_ROWS, TAIL_ROWS), &w.cpu.download(&want_rstd).unwrap());
    residual_norm_forward(w, "residual_layernorm_forward", &inp, &x, |residual, out, sum, a, b| {
        let (mut mean, mut rstd) = (w.cuda.zeros(ROWS).unwrap(), w.cuda.zeros(ROWS).unwrap());
        w.cuda.residual_layernorm_forward(residual, out, &mut mean, &mut rstd, a, b, &wd, &bd, ROWS, C, 1e-5).unwrap();
        let mut want = w.cpu.zeros(sum.len()).unwrap();
        let (mut want_mean, mut want_rstd) = (w.cpu.zeros(TAIL_ROWS).unwrap(), w.cpu.zeros(TAIL_ROWS).unwrap());
        w.cpu
            .layernorm_forward(&mut want, &mut want_mean, &mut want_rstd, &up(sum), &wc, &bc, TAIL_ROWS, C, 1e-5)
            .unwrap();
        w.cpu.download(&want).unwrap()
    });

    // The backward: dinp of the last rows, and the parameter gradients, of which only the last rows'
    // share is nonzero (every other row's dout is zero); the window runs the block of the last rows.
    let dout = randn(&mut rng(8), x.len(), 1.0);
    let dout_buf = w.sparse(ROWS * C, at, &dout);
    // The norms' dinp accumulates (the residual stream's gradient): from a zero prior here.
    let mut dinp = w.cuda.zeros(ROWS * C).unwrap();
    let (mut dw, mut db) = (w.cuda.zeros(C).unwrap(), w.cuda.zeros(C).unwrap());
    w.windowed(&backward_window("layernorm_backward"), || {
        w.cuda.layernorm_backward(&mut dinp, &mut dw, &mut db, &dout_buf, &inp, &wd, &mean, &rstd, ROWS, C).unwrap()
    });
    let mut want_dinp = w.cpu.zeros(x.len()).unwrap();
    let (mut want_dw, mut want_db) = (w.cpu.zeros(C).unwrap(), w.cpu.zeros(C).unwrap());
    w.cpu
        .layernorm_backward(
            &mut want_dinp,
            &mut want_dw,
            &mut want_db,
            &up(&dout),
            &xc,
            &wc,
            &want_mean,
            &want_rstd,
            TAIL_ROWS,
            C,
        )
        .unwrap();
    check("layernorm_backward dinp past 2^31", &w.read(&dinp, at, x.len()), &w.cpu.download(&want_dinp).unwrap());
    if !w.emulated {
        // Under a window the grid's last block to finish never comes (see `backward_window`).
        check("layernorm_backward dweight", &w.read(&dw, 0, C), &w.cpu.download(&want_dw).unwrap());
        check("layernorm_backward dbias", &w.read(&db, 0, C), &w.cpu.download(&want_db).unwrap());
    }
}

/// The fused residual add + norm (`kernel`) on `a = b = inp`, whose last rows hold `x`: the residual
/// `2x` and the norm of it on those rows, against `norm_of(residual, out, 2x, a, b)`, which runs the
/// op and returns the CPU's norm of `2x`.
fn residual_norm_forward(
    w: &Wide,
    kernel: &str,
    inp: &CudaBuf,
    x: &[f32],
    norm_of: impl FnOnce(&mut CudaBuf, &mut CudaBuf, &[f32], &CudaBuf, &CudaBuf) -> Vec<f32>,
) {
    let at = (ROWS - TAIL_ROWS) * C;
    let mut residual = w.sparse(ROWS * C, at, &poison(x.len()));
    let mut out = w.sparse(ROWS * C, at, &poison(x.len()));
    let sum: Vec<f32> = x.iter().map(|v| v + v).collect();
    let (want, _) =
        w.windowed(&[(kernel, emu::BlockRange::last_x(2))], || norm_of(&mut residual, &mut out, &sum, inp, inp));
    check(&format!("{kernel} residual past 2^31"), &w.read(&residual, at, x.len()), &sum);
    check(&format!("{kernel} past 2^31"), &w.read(&out, at, x.len()), &want);
}

/// A norm's fused backward under a window: the block holding the last rows. Its loads of dout and inp
/// feed both dinp (checked) and the block's parameter-gradient partials; the final sum of the partials
/// runs in the grid's last block to finish, which a window never reaches, so the parameter gradients are
/// checked on the GPU only (whole grid) and, for their ordered sum, by the ops tests.
fn backward_window(kernel: &'static str) -> [(&'static str, emu::BlockRange); 1] {
    [(kernel, emu::BlockRange::last_x(1))]
}

fn rmsnorm(w: &Wide) {
    let (x, at) = tail_rows(9);
    let weight = randn(&mut rng(10), C, 1.0);
    let inp = w.sparse(ROWS * C, at, &x);
    let wd = w.cuda.upload(&weight).unwrap();
    let mut out = w.sparse(ROWS * C, at, &poison(TAIL_ROWS * C));
    let mut rstd = w.cuda.zeros(ROWS).unwrap();
    w.windowed(&[("rmsnorm_forward", emu::BlockRange::last_x(2))], || {
        w.cuda.rmsnorm_forward(&mut out, &mut rstd, &inp, &wd, ROWS, C, 1e-6).unwrap()
    });
    let up = |x: &[f32]| w.cpu.upload(x).unwrap();
    let (mut want, mut want_rstd) = (w.cpu.zeros(x.len()).unwrap(), w.cpu.zeros(TAIL_ROWS).unwrap());
    let (xc, wc) = (up(&x), up(&weight));
    w.cpu.rmsnorm_forward(&mut want, &mut want_rstd, &xc, &wc, TAIL_ROWS, C, 1e-6).unwrap();
    check("rmsnorm_forward past 2^31", &w.read(&out, at, x.len()), &w.cpu.download(&want).unwrap());
    check("rmsnorm_forward rstd", &w.read(&rstd, ROWS - TAIL_ROWS, TAIL_ROWS), &w.cpu.download(&want_rstd).unwrap());
    residual_norm_forward(w, "residual_rmsnorm_forward", &inp, &x, |residual, out, sum, a, b| {
        let mut rstd = w.cuda.zeros(ROWS).unwrap();
        w.cuda.residual_rmsnorm_forward(residual, out, &mut rstd, a, b, &wd, ROWS, C, 1e-6).unwrap();
        let mut want = w.cpu.zeros(sum.len()).unwrap();
        let mut want_rstd = w.cpu.zeros(TAIL_ROWS).unwrap();
        w.cpu.rmsnorm_forward(&mut want, &mut want_rstd, &up(sum), &wc, TAIL_ROWS, C, 1e-6).unwrap();
        w.cpu.download(&want).unwrap()
    });

    let dout = randn(&mut rng(11), x.len(), 1.0);
    let dout_buf = w.sparse(ROWS * C, at, &dout);
    // The norms' dinp accumulates (the residual stream's gradient): from a zero prior here.
    let mut dinp = w.cuda.zeros(ROWS * C).unwrap();
    let mut dw = w.cuda.zeros(C).unwrap();
    w.windowed(&backward_window("rmsnorm_backward"), || {
        w.cuda.rmsnorm_backward(&mut dinp, &mut dw, &dout_buf, &inp, &wd, &rstd, ROWS, C).unwrap()
    });
    let (mut want_dinp, mut want_dw) = (w.cpu.zeros(x.len()).unwrap(), w.cpu.zeros(C).unwrap());
    w.cpu.rmsnorm_backward(&mut want_dinp, &mut want_dw, &up(&dout), &xc, &wc, &want_rstd, TAIL_ROWS, C).unwrap();
    check("rmsnorm_backward dinp past 2^31", &w.read(&dinp, at, x.len()), &w.cpu.download(&want_dinp).unwrap());
    if !w.emulated {
        // Under a window the grid's last block to finish never comes (see `backward_window`).
        check("rmsnorm_backward dweight", &w.read(&dw, 0, C), &w.cpu.download(&want_dw).unwrap());
    }
}

fn embedding(w: &Wide) {
    // out [n, C] with n·C / 4 (f32 packs) a multiple of the stride; the token table and the position
    // table both past 2^31 elements, the last token reading their last rows.
    let n = (1 << 21) + 4096;
    let vocab = (1 << 21) + 1;
    let tail = 256;
    let mut tokens = vec![0i32; n];
    tokens[n - 1] = vocab as i32 - 1;
    let positions: Vec<i32> = (0..n as i32).collect();
    let mut r = rng(12);
    let (te, pe) = (randn(&mut r, C, 1.0), randn(&mut r, C, 1.0));
    let wte = w.sparse(vocab * C, (vocab - 1) * C, &te);
    let wpe = w.sparse(n * C, (n - 1) * C, &pe);
    let (tok, pos) = (w.cuda.upload_ids(&tokens).unwrap(), w.cuda.upload_ids(&positions).unwrap());
    let mut out = w.sparse(n * C, n * C - tail, &poison(tail));
    let ((), record) = w.windowed(&[("embedding_forward", emu::BlockRange::last_x(1))], || {
        w.cuda.embedding_forward(&mut out, &tok, &pos, &wte, Some(&wpe), n, C).unwrap()
    });
    assert!(assert_tail_in_last_packed_block(record, n * C, F32_PACK) >= tail);
    let want: Vec<f32> = te.iter().zip(&pe).map(|(a, b)| a + b).collect();
    check("embedding_forward past 2^31", &w.read(&out, n * C - tail, tail), &want[C - tail..]);

    // The backward buckets tokens by id, ascending: the window's last bucket is the last token's
    // table row (and, for the positions, the last position's), fed by the last row of dout.
    let d = randn(&mut rng(17), C, 1.0);
    let dout = w.sparse(n * C, (n - 1) * C, &d);
    let (mut dwte, mut dwpe) = (w.cuda.zeros(vocab * C).unwrap(), w.cuda.zeros(n * C).unwrap());
    w.windowed(&[("embedding_backward", emu::BlockRange::last_x(1))], || {
        w.cuda.embedding_backward(&mut dwte, Some(&mut dwpe), &dout, &tok, &pos, n, C).unwrap()
    });
    check("embedding_backward token row past 2^31", &w.read(&dwte, (vocab - 1) * C, C), &d);
    check("embedding_backward position row past 2^31", &w.read(&dwpe, (n - 1) * C, C), &d);
}

fn rows(w: &Wide) {
    // Every row but one three from the end: out row i comes from inp row i + 1 at the tail, so the
    // two offsets differ. scatter_rows puts them back.
    let (x, at) = tail_rows(13);
    let ids: Vec<i32> = (0..ROWS as i32).filter(|&r| r != ROWS as i32 - 3).collect();
    let m = ids.len();
    let selected = w.cuda.upload_ids(&ids).unwrap();
    let inp = w.sparse(ROWS * C, at, &x);
    let out_at = (m - TAIL_ROWS) * C;
    let mut out = w.sparse(m * C, out_at, &poison(x.len()));
    w.windowed(&[("gather_rows", emu::BlockRange::last_x(2))], || {
        w.cuda.gather_rows(&mut out, &inp, &selected, m, ROWS, C).unwrap()
    });
    check("gather_rows past 2^31", &w.read(&out, out_at, x.len()), &x);

    let mut dinp = w.sparse(ROWS * C, at - C, &poison(x.len() + C));
    w.windowed(&[("scatter_rows", emu::BlockRange::last_x(3))], || {
        w.cuda.scatter_rows(&mut dinp, &out, &selected, m, ROWS, C).unwrap()
    });
    let want: Vec<f32> = vec![0.0; C].into_iter().chain(x.iter().copied()).collect();
    check("scatter_rows past 2^31", &w.read(&dinp, at - C, want.len()), &want);
}

fn rope(w: &Wide) {
    // qkv [n, (4 + 2·4)·128] past 2^31 elements; n·64 rotation pairs a multiple of the stride, so
    // the last 4 tokens are the last block's.
    let layout = QkvLayout { n_head: 4, n_kv_head: 4, head_dim: 128 };
    let width = layout.width();
    let n = 1_409_024;
    assert!(n * width > 1 << 31);
    let tokens = 4;
    let x = randn(&mut rng(14), tokens * width, 1.0);
    let at = (n - tokens) * width;
    let mut qkv = w.sparse(n * width, at, &x);
    let positions: Vec<i32> = (0..n as i32).map(|t| t % 4096).collect();
    let pos = w.cuda.upload_ids(&positions).unwrap();
    let inv_freq =
        safedpo::backend::rope_inverse_frequencies(128, 10_000.0, safedpo::backend::RopeScaling::Default).unwrap();
    let freq = w.cuda.upload(&inv_freq).unwrap();
    let ((), record) = w.windowed(&[("rope_forward", emu::BlockRange::last_x(1))], || {
        w.cuda.rope_forward(&mut qkv, &pos, &freq, n, layout).unwrap()
    });
    assert_tail_in_last_block(record, n * layout.head_dim / 2);
    let mut want = w.cpu.upload(&x).unwrap();
    let tail_pos = w.cpu.upload_ids(&positions[n - tokens..]).unwrap();
    w.cpu.rope_forward(&mut want, &tail_pos, &w.cpu.upload(&inv_freq).unwrap(), tokens, layout).unwrap();
    check("rope_forward past 2^31", &w.read(&qkv, at, x.len()), &w.cpu.download(&want).unwrap());
}

/// Attention over packed sequences of 256 tokens whose `qkv` rows reach past 2^31 elements; the
/// window runs the last sequence (grid y), which straddles element 2^31, forward and backward.
/// In f32 the portable kernels, in bf16 the tensor-core ones (head dim 64).
fn attention_in(w: &Wide, tolerance: f64) {
    let layout = QkvLayout { n_head: 4, n_kv_head: 4, head_dim: 64 };
    let (width, q_width) = (layout.width(), layout.q_width());
    let len = 256;
    let n = ((1usize << 31) / width + 1).next_multiple_of(len);
    let start = n - len;
    assert!(start * width < 1 << 31 && n * width > 1 << 31);
    let cu: Vec<i32> = (0..=n / len).map(|s| (s * len) as i32).collect();
    let packing = Packing::new(&w.cuda, &cu).unwrap();
    let stored = |x: Vec<f32>| -> Vec<f32> {
        match w.cuda.precision() {
            Precision::F32 => x,
            Precision::Bf16 => x.into_iter().map(|v| half::bf16::from_f32(v).to_f32()).collect(),
        }
    };
    let x = stored(randn(&mut rng(15), len * width, 1.0));
    let qkv = w.sparse(n * width, start * width, &x);
    let mut out = w.sparse(n * q_width, start * q_width, &poison(len * q_width));
    let mut saved = w.cuda.zeros(w.cuda.attention_saved_len(&packing, layout.n_head)).unwrap();
    let last_sequence = [("attention", emu::BlockRange::last_y(1))];
    w.windowed(&last_sequence, || {
        w.cuda.attention_forward(&mut out, &mut saved, &qkv, &packing, layout, None).unwrap()
    });

    let cpu_packing = Packing::new(&w.cpu, &[0, len as i32]).unwrap();
    let up = |x: &[f32]| w.cpu.upload(x).unwrap();
    let xc = up(&x);
    let mut want = w.cpu.zeros(len * q_width).unwrap();
    let mut want_saved = w.cpu.zeros(w.cpu.attention_saved_len(&cpu_packing, layout.n_head)).unwrap();
    w.cpu.attention_forward(&mut want, &mut want_saved, &xc, &cpu_packing, layout, None).unwrap();
    let got_out = w.read(&out, start * q_width, len * q_width);
    assert_close_scaled("attention_forward past 2^31", &got_out, &to_f64(&w.cpu.download(&want).unwrap()), tolerance);

    let dout = stored(randn(&mut rng(16), len * q_width, 1.0));
    let dout_buf = w.sparse(n * q_width, start * q_width, &dout);
    let mut dqkv = w.sparse(n * width, start * width, &poison(len * width));
    w.windowed(&last_sequence, || {
        w.cuda.attention_backward(&mut dqkv, &dout_buf, &qkv, &out, &saved, &packing, layout, None).unwrap()
    });
    // The CPU backward from the device's own forward output, as the model runs it.
    let mut want_dqkv = w.cpu.zeros(len * width).unwrap();
    w.cpu
        .attention_backward(&mut want_dqkv, &up(&dout), &xc, &up(&got_out), &want_saved, &cpu_packing, layout, None)
        .unwrap();
    let got = w.read(&dqkv, start * width, len * width);
    assert_close_scaled("attention_backward past 2^31", &got, &to_f64(&w.cpu.download(&want_dqkv).unwrap()), tolerance);
}

fn attention(w: &Wide) {
    attention_in(w, 1e-5);
}

/// bf16 on tensor cores: the tolerance of tests/ops/attention.rs's tensor-core checks.
fn attention_tensor_cores(w: &Wide) {
    let device = w.cuda.device().clone();
    attention_in(&Wide::with_precision(&device, Precision::Bf16), 1e-2);
}

/// Decoding one token against a KV cache whose rows pass 2^31 elements: the query's span straddles
/// element 2^31 (the whole grid is small; only the cache is large).
fn decode_attention(w: &Wide) {
    let layout = QkvLayout { n_head: 4, n_kv_head: 2, head_dim: 64 };
    let width = layout.width();
    let (rows, len) = ((1usize << 31) / width + 100, 200);
    let start = rows - len;
    assert!(start * width < 1 << 31 && rows * width > 1 << 31);
    let mut r = rng(18);
    let (span, q) = (randn(&mut r, len * width, 1.0), randn(&mut r, width, 1.0));
    let cache = w.sparse(rows * width, start * width, &span);
    let qkv = w.cuda.upload(&q).unwrap();
    let mut out = w.cuda.upload(&poison(layout.q_width())).unwrap();
    let spans = DecodeSpans::new(&w.cuda, &[start as i32], &[len as i32]).unwrap();
    w.cuda.decode_attention_forward(&mut out, &qkv, &cache, &spans, layout, None).unwrap();
    let mut want = w.cpu.zeros(layout.q_width()).unwrap();
    let cpu_spans = DecodeSpans::new(&w.cpu, &[0], &[len as i32]).unwrap();
    let (qc, cache_c) = (w.cpu.upload(&q).unwrap(), w.cpu.upload(&span).unwrap());
    w.cpu.decode_attention_forward(&mut want, &qc, &cache_c, &cpu_spans, layout, None).unwrap();
    check("decode_attention_forward past 2^31", &w.cuda.download(&out).unwrap(), &w.cpu.download(&want).unwrap());
}

/// A case: writes its inputs, runs its op, checks the outputs past 2^31.
type Case = fn(&Wide);

/// The cases, by name (each runs in its own child process).
const CASES: &[(&str, Case)] = &[
    ("gelu", gelu),
    ("swiglu", swiglu),
    ("adamw", adamw),
    ("adamw_multi_tensor", adamw_multi_tensor),
    ("sum_squares", sum_squares),
    ("layernorm", layernorm),
    ("rmsnorm", rmsnorm),
    ("embedding", embedding),
    ("rows", rows),
    ("rope", rope),
    ("attention", attention),
    ("attention_tensor_cores", attention_tensor_cores),
    ("decode_attention", decode_attention),
];

/// Set (to the case's name) in a child process of `past_2_pow_31_on_the_emulated_device`.
const CASE_ENV: &str = "SAFEDPO_WIDE_OFFSETS_CASE";
const CHILD: &str = "wide_offsets::past_2_pow_31_child";

/// Every case on the emulated device, one child process each, one after another (each maps a few
/// 8 GiB buffers but touches only megabytes of them).
#[test]
fn past_2_pow_31_on_the_emulated_device() {
    let mut failures = Vec::new();
    for (name, _) in CASES {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", CHILD, "--nocapture", "--test-threads", "1"])
            .env(CASE_ENV, name)
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let ran = format!("wide offsets {name}: checked");
        if !out.status.success() || !stderr.contains(&ran) {
            failures.push(format!("{name} ({}):\n{stdout}\n{stderr}", out.status));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), CASES.len(), failures.join("\n"));
}

/// The child: runs the case its environment names; nothing in any other process.
#[test]
fn past_2_pow_31_child() {
    let Ok(name) = std::env::var(CASE_ENV) else { return };
    let (_, case) = CASES.iter().find(|(n, _)| *n == name).expect("a known case");
    emu::use_test_mode();
    emu::set_lazy_alloc(true);
    case(&Wide::new(&Device::emulated().unwrap()));
    eprintln!("wide offsets {name}: checked");
}

/// Every case whole on GPU 0 (about 9 GiB a buffer, up to four at once).
#[test]
#[ignore = "needs a GPU"]
fn past_2_pow_31_on_the_gpu() {
    let w = Wide::new(&Device::gpu(0).unwrap());
    for (name, case) in CASES {
        case(&w);
        eprintln!("wide offsets {name}: checked");
    }
}
