//! The optimizer's and the grad norm's one-launch paths on a model, on the emulated device: the
//! launches a step takes (one AdamW launch per storage type instead of one per tensor, two grad-norm
//! launches instead of one per tensor plus one), the same bits as the launch-per-tensor path, and
//! the device-side table built once and again only when the tensor set changes (moments restored
//! from a checkpoint, a ZeRO-1 shard's optimizer).
//!
//! The emulator's launch counter is process-wide: every test here takes `EMULATOR` first, so no
//! other launch of this binary lands in a count.

mod common;

use std::sync::{Arc, Mutex, MutexGuard};

use common::*;
use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::cuda::{emu, CudaBackend, CudaBuf, Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::AdamWParams;
use safedpo::model::{Decoder, DecoderConfig};
use safedpo::optim::{clip_scale, decays_weight, AdamW, AdamWConfig};

static EMULATOR: Mutex<()> = Mutex::new(());

fn emulator() -> MutexGuard<'static, ()> {
    EMULATOR.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

const CFG: AdamWConfig = AdamWConfig { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };

/// A tiny GPT-2 (2 layers: 28 parameter tensors, ragged sizes) on the emulated device.
fn model(backend: &Arc<CudaBackend>) -> Decoder<CudaBackend> {
    let host = Decoder::random(Arc::new(CpuBackend::new()), DecoderConfig::gpt2(61, 40, 48, 2, 4), 5)
        .unwrap()
        .to_host()
        .unwrap();
    Decoder::from_host(backend.clone(), &host).unwrap()
}

/// Random gradients written into the model's gradient buffers (they keep their addresses).
fn set_grads(model: &mut Decoder<CudaBackend>, seed: u64) {
    let backend = model.backend().clone();
    let mut r = rng(seed);
    for grad in model.grads_mut().unwrap() {
        let values = backend.upload(&randn(&mut r, grad.len(), 0.1)).unwrap();
        backend.copy(grad, &values).unwrap();
    }
}

/// Launches `body` makes on the emulated device (hold `EMULATOR`).
fn launches(body: impl FnOnce()) -> u64 {
    let before = emu::counters().launches;
    body();
    emu::counters().launches - before
}

/// One AdamW step of the model as the optimizer made it before the list form: `adamw` per tensor.
fn per_tensor_step(model: &mut Decoder<CudaBackend>, moments: &mut [(CudaBuf, CudaBuf)], step: u32) {
    let backend = model.backend().clone();
    for ((name, param, grad), (m, v)) in model.params_and_grads_mut().unwrap().into_iter().zip(moments) {
        let weight_decay = if decays_weight(name) { CFG.weight_decay } else { 0.0 };
        let p = AdamWParams {
            lr: CFG.lr,
            beta1: CFG.beta1,
            beta2: CFG.beta2,
            eps: CFG.eps,
            weight_decay,
            step,
            grad_scale: 0.7,
        };
        backend.adamw(param, grad, m, v, &p).unwrap();
    }
}

#[test]
fn a_step_is_one_launch_and_the_same_bits_as_a_launch_per_tensor() {
    let _emulator = emulator();
    let device = Device::emulated().unwrap();
    for precision in [Precision::F32, Precision::Bf16] {
        let backend = Arc::new(CudaBackend::new(device.clone(), precision));
        let (mut multi, mut single) = (model(&backend), model(&backend));
        let mut optimizer = AdamW::new(&mut multi, CFG).unwrap();
        let mut moments: Vec<(CudaBuf, CudaBuf)> = single
            .grads()
            .unwrap()
            .iter()
            .map(|g| (backend.zeros(g.len()).unwrap(), backend.zeros(g.len()).unwrap()))
            .collect();
        let tensors = moments.len();
        let (mut multi_launches, mut single_launches) = (0, 0);
        for step in 1..=3u32 {
            set_grads(&mut multi, 100 + step as u64);
            set_grads(&mut single, 100 + step as u64);
            multi_launches = launches(|| optimizer.step(&mut multi, CFG.lr, 0.7).unwrap());
            single_launches = launches(|| per_tensor_step(&mut single, &mut moments, step));
        }
        for ((name, a), b) in
            multi.parameter_shapes().map(|(n, _)| n.to_string()).zip(multi.params()).zip(single.params())
        {
            let what = format!("{name} after 3 steps ({precision})");
            assert_bitwise_eq(&what, &backend.download(a).unwrap(), &backend.download(b).unwrap());
        }
        // After the first step (which converts the zeroed moments to f32 in Bf16 mode).
        eprintln!(
            "AdamW step ({precision}, {tensors} tensors): {multi_launches} launch(es), per tensor {single_launches}"
        );
        assert_eq!(multi_launches, 1, "AdamW step ({precision})");
        assert_eq!(single_launches, tensors as u64, "AdamW per tensor ({precision})");

        let grads = multi.grads().unwrap();
        let mut norms = (0.0, 0.0);
        let one = launches(|| norms.0 = backend.sum_squares(&grads).unwrap());
        let per = launches(|| norms.1 = backend.sum_squares_per_tensor(&grads).unwrap());
        eprintln!("grad norm ({precision}): {one} launches, per tensor {per}");
        assert_eq!(norms.0.to_bits(), norms.1.to_bits(), "grad norm ({precision})");
        assert_eq!((one, per), (2, tensors as u64 + 1), "grad norm launches ({precision})");
        let (norm, _) = clip_scale(&multi, 1.0).unwrap();
        assert_eq!(norm, norms.0.sqrt() as f32);
    }
}

#[test]
fn the_table_is_built_once_and_again_when_the_tensors_change() {
    let _emulator = emulator();
    let backend = Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::Bf16));
    let mut policy = model(&backend);
    let mut optimizer = AdamW::new(&mut policy, CFG).unwrap();
    let start = backend.tensor_table_uploads();
    for step in 1..=3 {
        set_grads(&mut policy, step);
        optimizer.step(&mut policy, CFG.lr, 1.0).unwrap();
    }
    // (The first step switches the zeroed moments to f32 storage before it builds the table.)
    let after_steps = backend.tensor_table_uploads();
    assert_eq!(after_steps - start, 1, "tables for three steps");
    optimizer.step(&mut policy, CFG.lr, 1.0).unwrap();
    assert_eq!(backend.tensor_table_uploads(), after_steps, "the same tensors: the kept table");

    // Restored moments are new buffers: one new table, then kept again.
    let state = optimizer.state_to_host().unwrap();
    optimizer.load_state(&state, optimizer.step_count()).unwrap();
    optimizer.step(&mut policy, CFG.lr, 1.0).unwrap();
    assert_eq!(backend.tensor_table_uploads(), after_steps + 1, "restored moments: a new table");
    optimizer.step(&mut policy, CFG.lr, 1.0).unwrap();
    assert_eq!(backend.tensor_table_uploads(), after_steps + 1);

    // A ZeRO-1 shard's optimizer (every other tensor) updates its own subset with its own table,
    // and only that subset.
    let mut shard = AdamW::for_tensors(&mut policy, CFG, &|i| i % 2 == 0).unwrap();
    let before: Vec<Vec<f32>> = policy.params().iter().map(|p| backend.download(p).unwrap()).collect();
    shard.step(&mut policy, CFG.lr, 1.0).unwrap();
    for (i, (p, was)) in policy.params().iter().zip(&before).enumerate() {
        let now = backend.download(p).unwrap();
        assert_eq!(now != *was, i % 2 == 0, "tensor {i}: updated only when in the shard");
    }
    let tables = backend.tensor_table_uploads();
    shard.step(&mut policy, CFG.lr, 1.0).unwrap();
    optimizer.step(&mut policy, CFG.lr, 1.0).unwrap();
    assert_eq!(backend.tensor_table_uploads(), tables, "both optimizers' tables are kept");
}
