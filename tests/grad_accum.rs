//! f32 gradient accumulation in bf16 mode (`train.grad_dtype`, `optim::set_grad_dtype`).
//!
//! A step of many micro-batches of a tiny GPT-2 (tied head: the token embedding gets the head's and
//! the encoder's contributions) on the emulated device in bf16: the accumulated gradients with f32
//! storage are much closer to the f32 result (the CPU backend on the same bf16-rounded weights and
//! the same upstream gradients) than with bf16 storage, where each micro-batch's add rounds to 8
//! bits of mantissa. The bound asserted is one the bf16 accumulation fails. And the trainer on the
//! emulated device in bf16 with f32 gradients: a resumed run is bit-identical to a straight one,
//! `auto` with grad_accum > 1 is `f32`, and `bf16` trains differently.

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;

use common::*;
use half::bf16;
use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::cuda::{CudaBackend, Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::config::RunConfig;
use safedpo::data::PackedBatch;
use safedpo::model::{Decoder, DecoderConfig, DeviceBatch, HostWeights};
use safedpo::optim::{set_grad_dtype, GradDtype};
use safedpo::train::checkpoint::read_latest;
use safedpo::train::{train, Resume, Task, TrainOptions};

/// Micro-batches of the accumulation test.
const MICRO_BATCHES: usize = 32;

/// A tiny GPT-2 (tied head), its weights rounded to bf16 so that every backend starts from the same
/// model.
fn weights() -> HostWeights {
    let config = DecoderConfig::gpt2(61, 40, 48, 2, 4);
    let mut weights = Decoder::random(Arc::new(CpuBackend::new()), config, 5).unwrap().to_host().unwrap();
    for (_, data) in weights.tensors.values_mut() {
        data.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32());
    }
    weights
}

/// `MICRO_BATCHES` packed micro-batches of four random sequences each, and each sequence's upstream
/// gradient dL/d(logp) (bf16-representable, the step's mean folded in).
fn micro_batches() -> Vec<(PackedBatch, Vec<f32>)> {
    let mut r = rng(21);
    (0..MICRO_BATCHES)
        .map(|_| {
            let mut packed = PackedBatch::default();
            for len in [7, 12, 5, 16] {
                packed.push(&rand_ids(&mut r, len, 61), 2);
            }
            // One sign for every sequence (as SFT's, or a loss whose micro-batches agree), so that the
            // micro-batches' gradients add up rather than cancel.
            let dlogp = randn(&mut r, 4, 0.25).into_iter().map(|x| (1.0 + x.abs()) / MICRO_BATCHES as f32);
            (packed, dlogp.map(|x| bf16::from_f32(x).to_f32()).collect())
        })
        .collect()
}

/// Every gradient tensor after the backward of every micro-batch: accumulated on the backend, or
/// (`separately`) each micro-batch's own gradient from zero, summed on the host in f64.
fn accumulated_gradient<B: Backend>(
    backend: Arc<B>,
    weights: &HostWeights,
    grad_dtype: GradDtype,
    separately: bool,
) -> Vec<Vec<f64>> {
    let b = &*backend;
    let mut model = Decoder::from_host(backend.clone(), weights).unwrap();
    set_grad_dtype(&mut model, grad_dtype, MICRO_BATCHES).unwrap();
    let mut sum: Vec<Vec<f64>> = model.grads().unwrap().iter().map(|g| vec![0.0; b.buf_len(g)]).collect();
    model.zero_grad().unwrap();
    for (k, (packed, dlogp)) in micro_batches().into_iter().enumerate() {
        if separately {
            model.zero_grad().unwrap();
        }
        let batch = DeviceBatch::upload(b, &packed).unwrap();
        model.forward(&batch).unwrap();
        let dlogp = b.upload(&dlogp).unwrap();
        model.backward(&batch, &dlogp).unwrap();
        if separately || k + 1 == MICRO_BATCHES {
            for (s, g) in sum.iter_mut().zip(model.grads().unwrap()) {
                s.iter_mut().zip(b.download(g).unwrap()).for_each(|(s, x)| *s += x as f64);
            }
        }
    }
    sum
}

/// ‖got − want‖ / ‖want‖ over every tensor.
fn relative_error(got: &[Vec<f64>], want: &[Vec<f64>]) -> f64 {
    let (got, want) = (got.concat(), want.concat());
    let diff: f64 = got.iter().zip(&want).map(|(g, w)| (g - w).powi(2)).sum();
    let norm: f64 = want.iter().map(|w| w.powi(2)).sum();
    (diff / norm).sqrt()
}

#[test]
fn f32_accumulation_over_many_micro_batches_is_much_closer_to_f32() {
    safedpo::backend::cuda::emu::use_test_mode();
    let w = weights();
    let emu = || Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::Bf16));
    let f32_storage = accumulated_gradient(emu(), &w, GradDtype::F32, false);
    let bf16_storage = accumulated_gradient(emu(), &w, GradDtype::Bf16, false);

    // The accumulation alone: the same micro-batch gradients (bf16 activations) summed in f64.
    let contributions = accumulated_gradient(emu(), &w, GradDtype::F32, true);
    let (f32_sum_err, bf16_sum_err) =
        (relative_error(&f32_storage, &contributions), relative_error(&bf16_storage, &contributions));
    // Against the f32 result (the CPU backend, f32 activations and gradients).
    let want = accumulated_gradient(Arc::new(CpuBackend::new()), &w, GradDtype::F32, false);
    let (f32_err, bf16_err) = (relative_error(&f32_storage, &want), relative_error(&bf16_storage, &want));
    println!(
        "{MICRO_BATCHES} micro-batches, relative L2 error of the accumulated gradient: against the f64 sum of \
         the micro-batches' own gradients: f32 storage {f32_sum_err:.3e}, bf16 storage {bf16_sum_err:.3e}; \
         against the f32 result: f32 storage {f32_err:.3e}, bf16 storage {bf16_err:.3e}"
    );
    // f32 storage adds the contributions in f32 (other orders of f32 sums only); bf16 storage
    // rounds the running sum to 8 bits at every micro-batch and every op that adds into it.
    const SUM_BOUND: f64 = 1e-5;
    assert!(f32_sum_err < SUM_BOUND, "f32 accumulation: {f32_sum_err:.3e} from the sum of the contributions");
    assert!(bf16_sum_err > 100.0 * SUM_BOUND, "bf16 accumulation: only {bf16_sum_err:.3e}: the test shows nothing");
    // Against f32 the bf16 activations' own rounding (about 5e-3 here) is left in both; bf16
    // storage adds its accumulation error on top.
    const F32_BOUND: f64 = 7e-3;
    assert!(f32_err < F32_BOUND, "f32 accumulation: {f32_err:.3e} from the f32 result");
    assert!(bf16_err > F32_BOUND, "bf16 accumulation passes the bound too ({bf16_err:.3e}): the test shows nothing");
}

/// A run of the trainer on the emulated device in bf16, two micro-batches per step.
fn emu_config(out: &Path, data: &Path, grad_dtype: GradDtype) -> RunConfig {
    let mut c = run::tiny_run(out, data, 96);
    c.batching.tokens_per_micro_batch = 512;
    c.batching.grad_accum = 2;
    c.optimizer.warmup_steps = 1;
    c.optimizer.total_steps = Some(4);
    c.intervals.eval_every = 0;
    c.precompute_ref = false;
    c.train.grad_dtype = grad_dtype;
    c
}

fn quiet() -> TrainOptions {
    TrainOptions { quiet: true, ..Default::default() }
}

fn emu() -> Arc<CudaBackend> {
    Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::Bf16))
}

fn final_file(cfg: &RunConfig, file: &str) -> Vec<u8> {
    fs::read(cfg.out_dir.join("final").join(file)).unwrap()
}

#[test]
fn resume_with_f32_gradients_is_bit_identical_and_auto_is_f32() {
    let dir = tempfile::tempdir().unwrap();
    let data = run::synthetic_data(dir.path(), 40, 3);
    let straight = emu_config(&dir.path().join("straight"), &data, GradDtype::F32);
    let mut resumed = straight.clone();
    resumed.out_dir = dir.path().join("resumed");
    assert!(train(emu(), &straight, Task::Preference, &quiet()).unwrap().completed);
    let first =
        train(emu(), &resumed, Task::Preference, &TrainOptions { stop_after_step: Some(2), ..quiet() }).unwrap();
    assert!(!first.completed);
    assert!(read_latest(&resumed.out_dir).unwrap().unwrap().ends_with("checkpoint-2"));
    let second = train(emu(), &resumed, Task::Preference, &TrainOptions { resume: Some(Resume::Auto), ..quiet() });
    assert!(second.unwrap().completed);
    for file in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        assert!(final_file(&straight, file) == final_file(&resumed, file), "final/{file}: straight vs resumed");
    }

    let auto = emu_config(&dir.path().join("auto"), &data, GradDtype::Auto);
    let bf16 = emu_config(&dir.path().join("bf16"), &data, GradDtype::Bf16);
    for cfg in [&auto, &bf16] {
        train(emu(), cfg, Task::Preference, &quiet()).unwrap();
    }
    let weights = |cfg: &RunConfig| final_file(cfg, "model.safetensors");
    assert!(weights(&auto) == weights(&straight), "auto with grad_accum 2 trains as f32");
    assert!(weights(&bf16) != weights(&straight), "bf16 gradients train differently from f32 ones");
}
