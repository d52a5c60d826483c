//! Every op of `CudaBackend` against the CPU backend (the oracle), in both precision modes.
//!
//! `emu::*` run on the emulated device (the CUDA kernels compiled for the CPU), so every launch shape,
//! argument list and buffer size is exercised in CI; `gpu::*` run the same checks on GPU 0 and are
//! ignored without one (`cargo test --release --test cuda_kernels -- --ignored gpu::`).
//!
//! Each check generates random inputs of awkward shapes (sizes that are not multiples of the block
//! size, sequences of length 0 and 1, sequences longer than a warp), poisons every output with NaN
//! first (an element a kernel forgets to write fails the comparison), starts accumulating outputs
//! from random priors and accumulates twice. In Bf16 mode both backends get the same bf16-rounded
//! inputs, so the comparison measures the kernels, not the rounding of the inputs. Tolerances: 1e-5
//! relative in F32 mode, 1e-2 in Bf16 mode, with the absolute part scaled to the tensor's largest
//! entry (`assert_close_scaled`); ops whose inputs and outputs are f32 in every mode (the preference
//! loss, the optimizer with its master weights, the grad norm) are held to f32 tolerances in both.

mod common;

use common::*;
use half::bf16;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::cuda::{CudaBackend, CudaBuf, Device, Gemm, LaunchConfig, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::{AdamWParams, Packing, WeightLayout, PAIR_METRICS};
use safedpo::kernel_args;
use safedpo::loss::Objective;

/// One CUDA backend, the CPU oracle, and seeded random data.
struct Fixture {
    cpu: CpuBackend,
    cuda: CudaBackend,
    precision: Precision,
    rng: ChaCha8Rng,
}

impl Fixture {
    fn new(device: &Device, precision: Precision, seed: u64) -> Self {
        Self { cpu: CpuBackend::new(), cuda: CudaBackend::new(device.clone(), precision), precision, rng: rng(seed) }
    }

    /// Relative tolerance of tensors stored in the activation type.
    fn rtol(&self) -> f64 {
        match self.precision {
            Precision::F32 => 1e-5,
            Precision::Bf16 => 1e-2,
        }
    }

    /// The values as the backend stores them: rounded to bf16 in Bf16 mode.
    fn stored(&self, x: Vec<f32>) -> Vec<f32> {
        match self.precision {
            Precision::F32 => x,
            Precision::Bf16 => x.into_iter().map(|v| bf16::from_f32(v).to_f32()).collect(),
        }
    }

    /// `len` N(0, std²) values, as stored.
    fn randn(&mut self, len: usize, std: f32) -> Vec<f32> {
        let x = randn(&mut self.rng, len, std);
        self.stored(x)
    }

    /// `len` fresh N(0, std²) values (as stored) on both backends.
    fn fresh(&mut self, len: usize, std: f32) -> (Vec<f32>, CudaBuf) {
        let x = self.randn(len, std);
        self.both(&x)
    }

    /// The same data on both backends.
    fn both(&self, x: &[f32]) -> (Vec<f32>, CudaBuf) {
        (x.to_vec(), self.cuda.upload(x).unwrap())
    }

    /// A NaN-filled output on both backends.
    fn poisoned(&self, len: usize) -> (Vec<f32>, CudaBuf) {
        self.both(&poison(len))
    }

    fn packing(&self, lens: &[usize]) -> (Packing<CpuBackend>, Packing<CudaBackend>) {
        let cu = cu_seqlens(lens);
        (Packing::new(&self.cpu, &cu).unwrap(), Packing::new(&self.cuda, &cu).unwrap())
    }

    /// Asserts the CUDA tensor matches the CPU one at `rtol` (absolute part scaled to the largest entry).
    #[track_caller]
    fn check_at(&self, what: &str, got: &CudaBuf, want: &[f32], rtol: f64) {
        let got = self.cuda.download(got).unwrap();
        let what = format!("{what} ({})", self.precision);
        assert_close_scaled(&what, &got, &to_f64(want), rtol);
    }

    #[track_caller]
    fn check(&self, what: &str, got: &CudaBuf, want: &[f32]) {
        self.check_at(what, got, want, self.rtol());
    }
}

/// Runs `check(device, precision)` in both precision modes.
fn both_precisions(device: &Device, check: fn(&Device, Precision)) {
    for precision in [Precision::F32, Precision::Bf16] {
        check(device, precision);
    }
}

// ---- checks ------------------------------------------------------------------------------------------

fn embedding(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 1);
    let (n, c, vocab, ctx) = (37, 40, 23, 13);
    let tokens = rand_ids(&mut f.rng, n, vocab);
    let positions = rand_ids(&mut f.rng, n, ctx);
    let (wte, wpe) = (f.randn(vocab * c, 1.0), f.randn(ctx * c, 1.0));
    let (cpu_tok, cuda_tok) = (f.cpu.upload_ids(&tokens).unwrap(), f.cuda.upload_ids(&tokens).unwrap());
    let (cpu_pos, cuda_pos) = (f.cpu.upload_ids(&positions).unwrap(), f.cuda.upload_ids(&positions).unwrap());
    let ((cw, gw), (cp, gp)) = (f.both(&wte), f.both(&wpe));

    let (mut want, mut got) = f.poisoned(n * c);
    f.cpu.embedding_forward(&mut want, &cpu_tok, &cpu_pos, &cw, &cp, n, c).unwrap();
    f.cuda.embedding_forward(&mut got, &cuda_tok, &cuda_pos, &gw, &gp, n, c).unwrap();
    f.check("embedding_forward out", &got, &want);

    let dout = f.randn(n * c, 1.0);
    let (cd, gd) = f.both(&dout);
    let (mut want_wte, mut got_wte) = f.fresh(vocab * c, 1.0);
    let (mut want_wpe, mut got_wpe) = f.fresh(ctx * c, 1.0);
    for _ in 0..2 {
        f.cpu.embedding_backward(&mut want_wte, &mut want_wpe, &cd, &cpu_tok, &cpu_pos, n, c).unwrap();
        f.cuda.embedding_backward(&mut got_wte, &mut got_wpe, &gd, &cuda_tok, &cuda_pos, n, c).unwrap();
    }
    f.check("embedding_backward dwte", &got_wte, &want_wte);
    f.check("embedding_backward dwpe", &got_wpe, &want_wpe);
}

fn layernorm(device: &Device, precision: Precision) {
    for (seed, (n, c)) in [(1, 19), (1, 1), (5, 72), (3, 300)].into_iter().enumerate() {
        let mut f = Fixture::new(device, precision, 10 + seed as u64);
        let inp: Vec<f32> = f.randn(n * c, 2.0).iter().map(|x| x + 0.5).collect();
        let inp = f.stored(inp);
        let (w, b) = (f.randn(c, 1.0), f.randn(c, 0.5));
        let ((ci, gi), (cw, gw), (cb, gb)) = (f.both(&inp), f.both(&w), f.both(&b));
        let (mut want, mut got) = f.poisoned(n * c);
        let (mut want_mean, mut got_mean) = f.poisoned(n);
        let (mut want_rstd, mut got_rstd) = f.poisoned(n);
        f.cpu.layernorm_forward(&mut want, &mut want_mean, &mut want_rstd, &ci, &cw, &cb, n, c, 1e-5).unwrap();
        f.cuda.layernorm_forward(&mut got, &mut got_mean, &mut got_rstd, &gi, &gw, &gb, n, c, 1e-5).unwrap();
        let shape = format!("[{n}, {c}]");
        f.check(&format!("layernorm_forward out {shape}"), &got, &want);
        // mean and rstd are f32 in both modes, computed from the same (stored) inputs
        f.check_at(&format!("layernorm_forward mean {shape}"), &got_mean, &want_mean, 1e-5);
        f.check_at(&format!("layernorm_forward rstd {shape}"), &got_rstd, &want_rstd, 1e-5);

        let dout = f.randn(n * c, 1.0);
        let (cd, gd) = f.both(&dout);
        let (mut want_dinp, mut got_dinp) = f.fresh(n * c, 1.0);
        let (mut want_dw, mut got_dw) = f.fresh(c, 1.0);
        let (mut want_db, mut got_db) = f.fresh(c, 1.0);
        for _ in 0..2 {
            f.cpu
                .layernorm_backward(
                    &mut want_dinp,
                    &mut want_dw,
                    &mut want_db,
                    &cd,
                    &ci,
                    &cw,
                    &want_mean,
                    &want_rstd,
                    n,
                    c,
                )
                .unwrap();
            f.cuda
                .layernorm_backward(&mut got_dinp, &mut got_dw, &mut got_db, &gd, &gi, &gw, &got_mean, &got_rstd, n, c)
                .unwrap();
        }
        f.check(&format!("layernorm_backward dinp {shape}"), &got_dinp, &want_dinp);
        f.check(&format!("layernorm_backward dweight {shape}"), &got_dw, &want_dw);
        f.check(&format!("layernorm_backward dbias {shape}"), &got_db, &want_db);
    }
}

/// The fused residual add + LayerNorm. The residual is checked against the CPU's; the LayerNorm
/// outputs against the CPU's LayerNorm of the residual *as stored* (rounded to bf16 in Bf16 mode),
/// with the f32 statistics held to 1e-5 in both modes: the statistics must come from the rounded
/// residual that the backward re-reads, not from the f32 sums. The fused kernel must also equal the
/// unfused pair of launches on the same device bit for bit.
fn residual_layernorm(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 30);
    let mut shapes = vec![(1, 1), (1, 45), (4, 32), (9, 300)];
    for _ in 0..3 {
        shapes.push((f.rng.random_range(1..40), f.rng.random_range(1..200) * 2 + 1));
    }
    for (n, c) in shapes {
        let shape = format!("[{n}, {c}]");
        // a residual stream far from zero plus a branch: the bf16 rounding of the sum matters.
        let a: Vec<f32> = f.randn(n * c, 2.0).iter().map(|x| x + 20.0).collect();
        let a = f.stored(a);
        let b = f.randn(n * c, 1.0);
        let (w, bias) = (f.randn(c, 1.0), f.randn(c, 0.5));
        let ((ca, ga), (cb, gb), (cw, gw), (cbias, gbias)) = (f.both(&a), f.both(&b), f.both(&w), f.both(&bias));

        let (mut want_residual, mut got_residual) = f.poisoned(n * c);
        let (mut want, mut got) = f.poisoned(n * c);
        let (mut want_mean, mut got_mean) = f.poisoned(n);
        let (mut want_rstd, mut got_rstd) = f.poisoned(n);
        f.cuda
            .residual_layernorm_forward(
                &mut got_residual,
                &mut got,
                &mut got_mean,
                &mut got_rstd,
                &ga,
                &gb,
                &gw,
                &gbias,
                n,
                c,
                1e-5,
            )
            .unwrap();
        f.cpu
            .residual_layernorm_forward(
                &mut want_residual,
                &mut want,
                &mut want_mean,
                &mut want_rstd,
                &ca,
                &cb,
                &cw,
                &cbias,
                n,
                c,
                1e-5,
            )
            .unwrap();
        f.check(&format!("residual_layernorm_forward residual {shape}"), &got_residual, &want_residual);
        let stored_residual = f.stored(want_residual.clone());
        f.cpu
            .layernorm_forward(&mut want, &mut want_mean, &mut want_rstd, &stored_residual, &cw, &cbias, n, c, 1e-5)
            .unwrap();
        f.check(&format!("residual_layernorm_forward out {shape}"), &got, &want);
        f.check_at(&format!("residual_layernorm_forward mean {shape}"), &got_mean, &want_mean, 1e-5);
        f.check_at(&format!("residual_layernorm_forward rstd {shape}"), &got_rstd, &want_rstd, 1e-5);

        // the unfused launches on the same device
        let (_, mut residual) = f.poisoned(n * c);
        let (_, mut out) = f.poisoned(n * c);
        let ((_, mut mean), (_, mut rstd)) = (f.poisoned(n), f.poisoned(n));
        f.cuda.residual_forward(&mut residual, &ga, &gb).unwrap();
        f.cuda.layernorm_forward(&mut out, &mut mean, &mut rstd, &residual, &gw, &gbias, n, c, 1e-5).unwrap();
        for (what, fused, unfused) in [
            ("residual", &got_residual, &residual),
            ("out", &got, &out),
            ("mean", &got_mean, &mean),
            ("rstd", &got_rstd, &rstd),
        ] {
            let (fused, unfused) = (f.cuda.download(fused).unwrap(), f.cuda.download(unfused).unwrap());
            assert_bitwise_eq(&format!("fused vs unfused {what} {shape} ({precision})"), &fused, &unfused);
        }
    }
}

fn matmul(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 2);
    let (n, ic, oc) = (13, 24, 40);
    for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
        for with_bias in [false, true] {
            let what = format!("{layout:?}, bias {with_bias}");
            let inp = f.randn(n * ic, 1.0);
            let w = f.randn(ic * oc, 0.3);
            let bias = f.randn(oc, 1.0);
            let ((ci, gi), (cw, gw), (cb, gb)) = (f.both(&inp), f.both(&w), f.both(&bias));
            let (mut want, mut got) = f.poisoned(n * oc);
            f.cpu.matmul_forward(&mut want, &ci, &cw, with_bias.then_some(&cb), n, ic, oc, layout).unwrap();
            f.cuda.matmul_forward(&mut got, &gi, &gw, with_bias.then_some(&gb), n, ic, oc, layout).unwrap();
            f.check(&format!("matmul_forward ({what})"), &got, &want);

            let dout = f.randn(n * oc, 1.0);
            let (cd, gd) = f.both(&dout);
            let (mut want_dinp, mut got_dinp) = f.poisoned(n * ic);
            let (mut want_dw, mut got_dw) = f.fresh(ic * oc, 1.0);
            let (mut want_db, mut got_db) = f.fresh(oc, 1.0);
            for _ in 0..2 {
                let cdb = if with_bias { Some(&mut want_db) } else { None };
                f.cpu.matmul_backward(&mut want_dinp, &mut want_dw, cdb, &cd, &ci, &cw, n, ic, oc, layout).unwrap();
                let gdb = if with_bias { Some(&mut got_db) } else { None };
                f.cuda.matmul_backward(&mut got_dinp, &mut got_dw, gdb, &gd, &gi, &gw, n, ic, oc, layout).unwrap();
            }
            f.check(&format!("matmul_backward dinp ({what})"), &got_dinp, &want_dinp);
            f.check(&format!("matmul_backward dweight ({what})"), &got_dw, &want_dw);
            f.check(&format!("matmul_backward dbias ({what})"), &got_db, &want_db);
        }
    }
}

/// The product with the GELU epilogue (`matmul_bias_gelu_forward`) against the CPU's `matmul_forward`
/// then `gelu_forward`: the pre-activation and the GELU output. Shapes: odd ones, `oc` a multiple of 8
/// (where a GPU fuses) and not (where it falls back), a single row.
fn matmul_bias_gelu(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 12);
    for (n, ic, oc) in [(13, 24, 40), (7, 5, 3), (1, 9, 16), (29, 33, 72)] {
        let what = format!("n {n}, ic {ic}, oc {oc}");
        let inp = f.randn(n * ic, 1.0);
        let w = f.randn(ic * oc, 0.5);
        let bias = f.randn(oc, 1.0);
        let ((ci, gi), (cw, gw), (cb, gb)) = (f.both(&inp), f.both(&w), f.both(&bias));
        let (mut want_pre, mut got_pre) = f.poisoned(n * oc);
        let (mut want_out, mut got_out) = f.poisoned(n * oc);
        f.cpu.matmul_forward(&mut want_pre, &ci, &cw, Some(&cb), n, ic, oc, WeightLayout::InOut).unwrap();
        f.cpu.gelu_forward(&mut want_out, &want_pre).unwrap();
        f.cuda.matmul_bias_gelu_forward(&mut got_pre, &mut got_out, &gi, &gw, &gb, n, ic, oc).unwrap();
        f.check(&format!("matmul_bias_gelu_forward pre ({what})"), &got_pre, &want_pre);
        f.check(&format!("matmul_bias_gelu_forward out ({what})"), &got_out, &want_out);
        // wrong lengths are errors naming the tensor
        let mut short = f.cuda.zeros(n * oc - 1).unwrap();
        let err = f.cuda.matmul_bias_gelu_forward(&mut got_pre, &mut short, &gi, &gw, &gb, n, ic, oc).unwrap_err();
        assert!(err.to_string().contains("`out`"), "{err}");
    }

    // The device call refuses what its epilogue cannot do, before touching anything.
    let (m, n, k) = (4, 8, 3);
    let a = device.upload(&vec![1.0f32; m * k]).unwrap();
    let b = device.upload(&vec![1.0f32; k * n]).unwrap();
    let bias = device.upload(&vec![1.0f32; n]).unwrap();
    let mut pre = device.alloc::<f32>(m * n).unwrap();
    let mut out = device.alloc::<f32>(m * n).unwrap();
    let spec = Gemm::new(m, n, k);
    let err = device.gemm_bias_gelu(&spec.beta(1.0), &a, &b, &mut pre, &mut out, bias.view()).unwrap_err();
    assert!(err.to_string().contains("beta"), "{err}");
    let err = device.gemm_bias_gelu(&spec, &a, &b, pre.slice_mut(1..), &mut out, bias.view()).unwrap_err();
    assert!(err.to_string().contains("pre has"), "{err}");
    let err = device.gemm_bias_gelu(&spec, &a, &b, &mut pre, &mut out, bias.slice(1..)).unwrap_err();
    assert!(err.to_string().contains("bias"), "{err}");
}

fn attention(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 3);
    // (lengths, n_head, c). The kernels tile 64 rows for head dims ≤ 64 and 32 rows for ≤ 128.
    let cases: [(&[usize], usize, usize); 3] = [
        // hd = 8 (zero-padded to 64): lengths 1 and 0, shorter and longer than a warp, one tile.
        (&[1, 7, 33, 0, 5, 32], 3, 24),
        // hd = 64: tile boundaries 63/64/65, three tiles (130), a single token after them.
        (&[63, 64, 65, 130, 1], 2, 128),
        // hd = 72 (the 128 bound, 32-row tiles, padded channels): 1, 0, 33, 65 = 2 tiles + 1.
        (&[33, 1, 0, 65, 32], 1, 72),
    ];
    for (lens, nh, c) in cases {
        let what = format!("lens {lens:?}, n_head {nh}, c {c}");
        let n: usize = lens.iter().sum();
        let (cpu_packing, cuda_packing) = f.packing(lens);
        let qkv = f.randn(n * 3 * c, 1.0);
        let (cq, gq) = f.both(&qkv);
        let (mut want, mut got) = f.poisoned(n * c);
        let mut want_saved = f.cpu.zeros(f.cpu.attention_saved_len(&cpu_packing, nh)).unwrap();
        let mut got_saved = f.cuda.upload(&poison(f.cuda.attention_saved_len(&cuda_packing, nh))).unwrap();
        f.cpu.attention_forward(&mut want, &mut want_saved, &cq, &cpu_packing, nh, c).unwrap();
        f.cuda.attention_forward(&mut got, &mut got_saved, &gq, &cuda_packing, nh, c).unwrap();
        f.check(&format!("attention_forward out ({what})"), &got, &want);

        let dout = f.randn(n * c, 1.0);
        let (cd, gd) = f.both(&dout);
        let (mut want_dqkv, mut got_dqkv) = f.poisoned(n * 3 * c);
        f.cpu.attention_backward(&mut want_dqkv, &cd, &cq, &want, &want_saved, &cpu_packing, nh, c).unwrap();
        f.cuda.attention_backward(&mut got_dqkv, &gd, &gq, &got, &got_saved, &cuda_packing, nh, c).unwrap();
        f.check(&format!("attention_backward dqkv ({what})"), &got_dqkv, &want_dqkv);
    }
}

fn pointwise(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 4);
    let n = 1003;
    let (a, b) = (f.randn(n, 2.0), f.randn(n, 1.0));
    let ((ca, ga), (cb, gb)) = (f.both(&a), f.both(&b));

    let (mut want, mut got) = f.poisoned(n);
    f.cpu.gelu_forward(&mut want, &ca).unwrap();
    f.cuda.gelu_forward(&mut got, &ga).unwrap();
    f.check("gelu_forward", &got, &want);

    let (mut want, mut got) = f.poisoned(n);
    f.cpu.gelu_backward(&mut want, &ca, &cb).unwrap();
    f.cuda.gelu_backward(&mut got, &ga, &gb).unwrap();
    f.check("gelu_backward", &got, &want);

    let (mut want, mut got) = f.poisoned(n);
    f.cpu.residual_forward(&mut want, &ca, &cb).unwrap();
    f.cuda.residual_forward(&mut got, &ga, &gb).unwrap();
    f.check("residual_forward", &got, &want);

    let (mut want, mut got) = f.both(&a);
    f.cpu.add_inplace(&mut want, &cb).unwrap();
    f.cuda.add_inplace(&mut got, &gb).unwrap();
    f.check("add_inplace", &got, &want);

    f.cpu.scale(&mut want, -0.37).unwrap();
    f.cuda.scale(&mut got, -0.37).unwrap();
    f.check("scale", &got, &want);

    let (mut want, mut got) = f.poisoned(n);
    f.cpu.copy(&mut want, &ca).unwrap();
    f.cuda.copy(&mut got, &ga).unwrap();
    f.check("copy", &got, &want);

    f.cpu.fill(&mut want, 0.25).unwrap();
    f.cuda.fill(&mut got, 0.25).unwrap();
    f.check("fill", &got, &want);

    // zeros, and empty tensors, go through without launching anything
    assert!(f.cuda.download(&f.cuda.zeros(n).unwrap()).unwrap().iter().all(|&x| x == 0.0));
    let (mut empty, none) = (f.cuda.zeros(0).unwrap(), f.cuda.zeros(0).unwrap());
    f.cuda.gelu_forward(&mut empty, &none).unwrap();
    f.cuda.scale(&mut empty, 2.0).unwrap();
}

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

/// `gather_rows` and `scatter_rows` are exact copies: bit-identical to the CPU in both modes. Random
/// row subsets (increasing), none (m = 0) and all (m = n); c below, at and above a block's width.
fn rows(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 12);
    for (n, c, keep) in [(37, 40, 0.6), (5, 1, 0.5), (20, 300, 0.3), (9, 32, 0.0), (9, 32, 1.0), (1, 7, 1.0)] {
        let rows: Vec<i32> = (0..n as i32).filter(|_| f.rng.random_bool(keep)).collect();
        let m = rows.len();
        let (cr, gr) = (f.cpu.upload_ids(&rows).unwrap(), f.cuda.upload_ids(&rows).unwrap());
        let what = |op: &str| format!("{op} n={n} c={c} m={m} ({precision})");

        let (ci, gi) = f.fresh(n * c, 1.0);
        let (mut want, mut got) = f.poisoned(m * c);
        f.cpu.gather_rows(&mut want, &ci, &cr, m, n, c).unwrap();
        f.cuda.gather_rows(&mut got, &gi, &gr, m, n, c).unwrap();
        assert_bitwise_eq(&what("gather_rows"), &f.cuda.download(&got).unwrap(), &want);

        let (cd, gd) = f.fresh(m * c, 1.0);
        let (mut want, mut got) = f.poisoned(n * c);
        f.cpu.scatter_rows(&mut want, &cd, &cr, m, n, c).unwrap();
        f.cuda.scatter_rows(&mut got, &gd, &gr, m, n, c).unwrap();
        assert_bitwise_eq(&what("scatter_rows"), &f.cuda.download(&got).unwrap(), &want);
    }
    // The host-side checks: rows must increase and lie in 0..n.
    let (inp, mut out) = (f.cuda.zeros(4 * 3).unwrap(), f.cuda.zeros(2 * 3).unwrap());
    for (bad, expect) in [([2, 1], "strictly increasing"), ([1, 1], "strictly increasing"), ([0, 4], "rows[1]")] {
        let rows = f.cuda.upload_ids(&bad).unwrap();
        let err = f.cuda.gather_rows(&mut out, &inp, &rows, 2, 4, 3).unwrap_err().to_string();
        assert!(err.contains("gather_rows") && err.contains(expect), "{err}");
        let mut dinp = f.cuda.zeros(4 * 3).unwrap();
        let err = f.cuda.scatter_rows(&mut dinp, &out, &rows, 2, 4, 3).unwrap_err().to_string();
        assert!(err.contains("scatter_rows") && err.contains(expect), "{err}");
    }
}

fn preference_loss(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 6);
    let pairs = 37;
    let policy = uniform(&mut f.rng, 2 * pairs, -60.0, -5.0);
    let reference: Vec<f32> = policy.iter().map(|p| p + f.rng.random_range(-3.0..3.0)).collect();
    let flags = rand_ids(&mut f.rng, 2 * pairs, 2);
    let mut lengths = rand_ids(&mut f.rng, 2 * pairs, 40);
    lengths[3] = 0;
    let ((cp, gp), (cr, gr)) = (f.both(&policy), f.both(&reference));
    let (cf, gf) = (f.cpu.upload_ids(&flags).unwrap(), f.cuda.upload_ids(&flags).unwrap());
    let (cl, gl) = (f.cpu.upload_ids(&lengths).unwrap(), f.cuda.upload_ids(&lengths).unwrap());
    for name in Objective::NAMES {
        let objective = Objective::default_for(name).unwrap();
        let (mut want_m, mut got_m) = f.poisoned(pairs * PAIR_METRICS);
        let (mut want_d, mut got_d) = f.poisoned(2 * pairs);
        f.cpu.preference_loss(&mut want_m, &mut want_d, &cp, &cr, &cf, &cl, &objective, 0.7).unwrap();
        f.cuda.preference_loss(&mut got_m, &mut got_d, &gp, &gr, &gf, &gl, &objective, 0.7).unwrap();
        // Each metric column on its own scale; inputs and outputs are f32 in both modes.
        let got = f.cuda.download(&got_m).unwrap();
        for k in 0..PAIR_METRICS {
            let column = |x: &[f32]| -> Vec<f32> { x.iter().skip(k).step_by(PAIR_METRICS).copied().collect() };
            assert_close_scaled(
                &format!("preference_loss {objective} metric {k} ({precision})"),
                &column(&got),
                &to_f64(&column(&want_m)),
                2e-5,
            );
        }
        f.check_at(&format!("preference_loss {objective} dpolicy"), &got_d, &want_d, 2e-5);
    }
}

fn sum_squares(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 7);
    let tensors: Vec<Vec<f32>> = [0usize, 1, 5000, 300, 70_001].iter().map(|&len| f.randn(len, 1.5)).collect();
    let cpu: Vec<Vec<f32>> = tensors.clone();
    let cuda: Vec<CudaBuf> = tensors.iter().map(|t| f.cuda.upload(t).unwrap()).collect();
    let want = f.cpu.sum_squares(&cpu.iter().collect::<Vec<_>>()).unwrap();
    let got = f.cuda.sum_squares(&cuda.iter().collect::<Vec<_>>()).unwrap();
    assert!((got - want).abs() <= 1e-5 * want, "sum_squares ({precision}): {got} vs {want}");
    let again = f.cuda.sum_squares(&cuda.iter().collect::<Vec<_>>()).unwrap();
    assert_eq!(got.to_bits(), again.to_bits(), "sum_squares ({precision}) differs between runs");
    assert_eq!(f.cuda.sum_squares(&[]).unwrap(), 0.0);
}

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

/// `resize` to a shorter length reuses the storage (and its type), to a longer one reallocates; ops
/// then see the new length only.
fn resize(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 11);
    let (long, short) = (1100, 333);
    let (a, b) = (f.randn(short, 1.0), f.randn(short, 1.0));
    let ((ca, ga), (cb, gb)) = (f.both(&a), f.both(&b));
    let (mut want, mut got) = f.poisoned(long);
    f.cpu.resize(&mut want, short).unwrap();
    f.cuda.resize(&mut got, short).unwrap();
    assert_eq!(f.cuda.buf_len(&got), short);
    f.cpu.residual_forward(&mut want, &ca, &cb).unwrap();
    f.cuda.residual_forward(&mut got, &ga, &gb).unwrap();
    f.check("residual_forward after shrinking", &got, &want);
    let (mut want_filled, mut got_filled) = f.both(&a);
    f.cuda.resize(&mut got_filled, 10).unwrap();
    f.cuda.fill(&mut got_filled, 2.0).unwrap();
    f.cuda.scale(&mut got_filled, 0.5).unwrap();
    f.cpu.resize(&mut want_filled, 10).unwrap();
    f.cpu.fill(&mut want_filled, 1.0).unwrap();
    f.check("fill and scale after shrinking", &got_filled, &want_filled);
    // An f32-stored tensor (a log-prob buffer in Bf16 mode) keeps its type through a resize.
    let logits = f.randn(short * 3, 1.0);
    let (cl, gl) = f.both(&logits);
    let targets = vec![1i32; short];
    let (ct, gt) = (f.cpu.upload_ids(&targets).unwrap(), f.cuda.upload_ids(&targets).unwrap());
    let (mut want_logp, mut got_logp) = f.poisoned(short);
    let (mut want_lse, mut got_lse) = f.poisoned(short);
    f.cuda.logsoftmax_gather_forward(&mut got_logp, &mut got_lse, &gl, &gt, short, 3).unwrap();
    let dtype = got_logp.dtype();
    f.cuda.resize(&mut got_logp, long).unwrap();
    f.cuda.resize(&mut got_logp, short).unwrap();
    f.cuda.resize(&mut got_lse, 7).unwrap();
    f.cuda.resize(&mut got_lse, short).unwrap();
    assert_eq!(got_logp.dtype(), dtype);
    f.cpu.logsoftmax_gather_forward(&mut want_logp, &mut want_lse, &cl, &ct, short, 3).unwrap();
    f.cuda.logsoftmax_gather_forward(&mut got_logp, &mut got_lse, &gl, &gt, short, 3).unwrap();
    f.check_at("token_logp after resizing", &got_logp, &want_logp, 1e-5);
    // copy into a longer-capacity buffer, and from a resized one
    let (mut want_copy, mut got_copy) = f.poisoned(long);
    f.cuda.resize(&mut got_copy, short).unwrap();
    f.cpu.resize(&mut want_copy, short).unwrap();
    f.cpu.copy(&mut want_copy, &want).unwrap();
    f.cuda.copy(&mut got_copy, &got).unwrap();
    f.check("copy of a resized buffer", &got_copy, &want_copy);
}

/// Backward ops run twice on the same inputs give bit-identical results.
fn determinism(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 9);
    let (n, c, vocab) = (45, 36, 11);
    let tokens = rand_ids(&mut f.rng, n, vocab);
    let ids = f.cuda.upload_ids(&tokens).unwrap();
    let dout = f.fresh(n * c, 1.0).1;
    let inp = f.fresh(n * c, 1.0).1;
    let w = f.fresh(c, 1.0).1;
    let run = || {
        let mut dwte = f.cuda.zeros(vocab * c).unwrap();
        let mut dwpe = f.cuda.zeros(vocab * c).unwrap();
        f.cuda.embedding_backward(&mut dwte, &mut dwpe, &dout, &ids, &ids, n, c).unwrap();
        let (mut mean, mut rstd, mut out) =
            (f.cuda.zeros(n).unwrap(), f.cuda.zeros(n).unwrap(), f.cuda.zeros(n * c).unwrap());
        f.cuda.layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &w, n, c, 1e-5).unwrap();
        let (mut dinp, mut dw, mut db) =
            (f.cuda.zeros(n * c).unwrap(), f.cuda.zeros(c).unwrap(), f.cuda.zeros(c).unwrap());
        f.cuda.layernorm_backward(&mut dinp, &mut dw, &mut db, &dout, &inp, &w, &mean, &rstd, n, c).unwrap();
        [dwte, dinp, dw, db].map(|b| f.cuda.download(&b).unwrap())
    };
    let (first, second) = (run(), run());
    for (k, (a, b)) in first.iter().zip(&second).enumerate() {
        assert_bitwise_eq(&format!("backward output {k} ({precision})"), a, b);
    }
}

/// Errors name the op and the tensor; nothing is launched on bad input.
fn errors(device: &Device, precision: Precision) {
    let f = Fixture::new(device, precision, 10);
    let mut out = f.cuda.zeros(10).unwrap();
    let ids = f.cuda.upload_ids(&[0, 7]).unwrap();
    let table = f.cuda.zeros(5 * 4).unwrap();
    let err = f.cuda.embedding_forward(&mut out, &ids, &ids, &table, &table, 2, 5).unwrap_err().to_string();
    assert!(err.contains("embedding_forward") && err.contains("out"), "{err}");
    let mut out = f.cuda.zeros(8).unwrap();
    let err = f.cuda.embedding_forward(&mut out, &ids, &ids, &table, &table, 2, 4).unwrap_err().to_string();
    assert!(err.contains("tokens[1]") && err.contains("7"), "{err}");
}

/// GPU only: the fused cuBLASLt product (`GELU_AUX_BIAS` epilogue) against the unfused one (`gemm`
/// with the bias epilogue, then the GELU kernel), at GPT-2's MLP pattern (oc = 4·ic, a multiple of 8,
/// so cuBLASLt must fuse in bf16). In f32 the fusion is optional (the backend does not use it) and
/// the epilogue's GELU may be an approximation: compared at 2e-3, and the error is printed.
fn fused_gelu_epilogue_matches_unfused(device: &Device) {
    let mut rng = rng(13);
    for (n, ic) in [(77, 64), (300, 96)] {
        let oc = 4 * ic;
        let spec = Gemm::new(n, oc, ic);
        let inp = randn(&mut rng, n * ic, 1.0);
        let w = randn(&mut rng, ic * oc, 0.3);
        let bias = randn(&mut rng, oc, 1.0);
        let gelu = LaunchConfig::for_elements(n * oc, 256);
        let what = format!("n {n}, ic {ic}, oc {oc}");
        {
            let to_bf16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
            let (a, b, bias) = (
                device.upload(&to_bf16(&inp)).unwrap(),
                device.upload(&to_bf16(&w)).unwrap(),
                device.upload(&to_bf16(&bias)).unwrap(),
            );
            let nan = vec![bf16::NAN; n * oc];
            let (mut pre, mut out) = (device.upload(&nan).unwrap(), device.upload(&nan).unwrap());
            let fused = device.gemm_bias_gelu(&spec, &a, &b, &mut pre, &mut out, bias.view()).unwrap();
            assert!(fused, "bf16 {what}: cuBLASLt did not fuse the GELU epilogue");
            let (mut d, mut g) = (device.upload(&nan).unwrap(), device.upload(&nan).unwrap());
            device.gemm(&spec, &a, &b, &mut d, Some(bias.view())).unwrap();
            device.launch("gelu_forward_bf16", gelu, &kernel_args![&mut g, &d, (n * oc) as i64]).unwrap();
            let f32s = |v: Vec<bf16>| v.into_iter().map(f32::from).collect::<Vec<_>>();
            let wide = |v: Vec<bf16>| v.into_iter().map(|x| x.to_f64()).collect::<Vec<_>>();
            let (pre, out) = (f32s(device.download(&pre).unwrap()), f32s(device.download(&out).unwrap()));
            let (d, g) = (wide(device.download(&d).unwrap()), wide(device.download(&g).unwrap()));
            assert_close_scaled(&format!("bf16 {what}: fused pre vs gemm"), &pre, &d, 1e-2);
            assert_close_scaled(&format!("bf16 {what}: fused gelu vs gelu kernel"), &out, &g, 1e-2);
        }
        {
            let (a, b, bias) =
                (device.upload(&inp).unwrap(), device.upload(&w).unwrap(), device.upload(&bias).unwrap());
            let nan = vec![f32::NAN; n * oc];
            let (mut pre, mut out) = (device.upload(&nan).unwrap(), device.upload(&nan).unwrap());
            if !device.gemm_bias_gelu(&spec, &a, &b, &mut pre, &mut out, bias.view()).unwrap() {
                eprintln!("f32 {what}: cuBLASLt does not fuse the GELU epilogue in f32 (not used by the backend)");
                continue;
            }
            let (mut d, mut g) = (device.upload(&nan).unwrap(), device.upload(&nan).unwrap());
            device.gemm(&spec, &a, &b, &mut d, Some(bias.view())).unwrap();
            device.launch("gelu_forward_f32", gelu, &kernel_args![&mut g, &d, (n * oc) as i64]).unwrap();
            let (pre, out) = (device.download(&pre).unwrap(), device.download(&out).unwrap());
            let (d, g) = (to_f64(&device.download(&d).unwrap()), to_f64(&device.download(&g).unwrap()));
            let scale = g.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let (i, ratio) = worst_error(&out, &g, 1e-6, 1e-6 * scale);
            eprintln!("f32 {what}: fused GELU vs the kernel: worst element {i}, {ratio:.1}× (1e-6 scaled)");
            assert_close_scaled(&format!("f32 {what}: fused pre vs gemm"), &pre, &d, 1e-5);
            assert_close_scaled(&format!("f32 {what}: fused gelu vs gelu kernel"), &out, &g, 2e-3);
        }
    }
}

macro_rules! device_tests {
    ($($check:ident),* ; gpu only: $($gpu_check:ident),* $(,)?) => {
        /// On the emulated device (CI).
        mod emu {
            use super::*;
            $(#[test]
            fn $check() {
                both_precisions(&Device::emulated().unwrap(), super::$check);
            })*
        }
        /// On GPU 0.
        mod gpu {
            use super::*;
            $(#[test]
            #[ignore = "needs a GPU"]
            fn $check() {
                both_precisions(&Device::gpu(0).expect("GPU 0"), super::$check);
            })*
            $(#[test]
            #[ignore = "needs a GPU"]
            fn $gpu_check() {
                super::$gpu_check(&Device::gpu(0).expect("GPU 0"));
            })*
        }
    };
}

device_tests!(
    embedding,
    layernorm,
    residual_layernorm,
    matmul,
    matmul_bias_gelu,
    attention,
    pointwise,
    rows,
    logsoftmax_gather,
    preference_loss,
    sum_squares,
    optimizer,
    resize,
    determinism,
    errors;
    gpu only: fused_gelu_epilogue_matches_unfused,
);
