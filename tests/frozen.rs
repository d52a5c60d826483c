//! The frozen (inference-only) GPT-2: its forward gives bit-identical log-probs and generation
//! logits to a trainable model's with the same weights, on the CPU and on the emulated device in f32
//! and bf16, over several batch shapes and layer counts (so the two recycled activation slots are
//! exercised); every gradient operation on it is an error that says the model is frozen; it holds
//! no gradient, no backward scratch and two layers of activations, counted element by element and,
//! on the emulated device, byte by byte (no fp32 master copies in bf16).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::cuda::{CudaBackend, CudaBuf, Device, Dtype, Precision};
use safedpo::backend::Backend;
use safedpo::data::PackedBatch;
use safedpo::model::{DeviceBatch, Gpt2, Gpt2Config, HostWeights};
use safedpo::optim::{clip_scale, sgd_step, AdamW, AdamWConfig};

fn config(n_layer: usize) -> Gpt2Config {
    Gpt2Config { vocab_size: 41, n_positions: 32, n_embd: 16, n_layer, n_head: 2, layer_norm_epsilon: 1e-5 }
}

/// Random weights well away from the init scale (peaked attention, curved GELU), so that a layer
/// reading the wrong slot changes the output.
fn weights(config: &Gpt2Config, seed: u64) -> HostWeights {
    let mut r = rng(seed);
    let mut tensors = BTreeMap::new();
    for (name, shape) in config.parameter_shapes() {
        let len: usize = shape.iter().product();
        let data = if name.contains("ln_") && name.ends_with(".weight") {
            randn(&mut r, len, 0.2).into_iter().map(|x| 1.0 + x).collect()
        } else if name.ends_with(".bias") {
            randn(&mut r, len, 0.1)
        } else {
            randn(&mut r, len, 0.3)
        };
        tensors.insert(name, (shape, data));
    }
    HostWeights { config: config.clone(), tensors }
}

/// A packed batch of random sequences with the given (length, prompt length) pairs.
fn batch(seed: u64, lens: &[(usize, usize)], vocab: usize) -> PackedBatch {
    let mut r = rng(seed);
    let seqs: Vec<(Vec<i32>, usize)> = lens.iter().map(|&(len, p)| (rand_ids(&mut r, len, vocab), p)).collect();
    PackedBatch::from_sequences(seqs.iter().map(|(t, p)| (t.as_slice(), *p)))
}

/// Batch shapes run one after the other: the buffers grow, shrink and grow again.
const SHAPES: [&[(usize, usize)]; 3] = [&[(7, 2), (1, 1), (12, 4)], &[(3, 1)], &[(9, 3), (14, 5), (6, 2), (2, 1)]];

/// For 1 to 4 layers: the frozen model's sequence log-probs and last-position logits equal the
/// trainable model's bit for bit, batch after batch.
fn frozen_forward_matches_trainable<B: Backend>(backend: Arc<B>, what: &str) {
    for n_layer in 1..=4 {
        let cfg = config(n_layer);
        let w = weights(&cfg, 100 + n_layer as u64);
        let mut trainable = Gpt2::from_host(backend.clone(), &w).unwrap();
        let mut frozen = Gpt2::from_host_frozen(backend.clone(), &w).unwrap();
        assert!(frozen.is_frozen() && !trainable.is_frozen());
        for (i, lens) in SHAPES.iter().enumerate() {
            let packed = batch(7 * i as u64 + n_layer as u64, lens, cfg.vocab_size);
            let dev = DeviceBatch::upload(&*backend, &packed).unwrap();
            let want = backend.download(trainable.forward(&dev).unwrap()).unwrap();
            let got = backend.download(frozen.forward(&dev).unwrap()).unwrap();
            assert_eq!(got.len(), lens.len());
            assert!(want.iter().any(|&x| x != 0.0), "{what}: all log-probs are 0; the test has no signal");
            assert_bitwise_eq(&format!("{what}: {n_layer} layers, batch {i}: sequence log-probs"), &got, &want);
        }
        let prompt = rand_ids(&mut rng(n_layer as u64), 11, cfg.vocab_size);
        let want = trainable.last_logits(&prompt).unwrap();
        let got = frozen.last_logits(&prompt).unwrap();
        assert_bitwise_eq(&format!("{what}: {n_layer} layers: last logits"), &got, &want);
    }
}

#[test]
fn frozen_forward_is_bit_identical_on_the_cpu() {
    frozen_forward_matches_trainable(Arc::new(CpuBackend::new()), "cpu");
}

#[test]
fn frozen_forward_is_bit_identical_on_the_emulated_device_f32() {
    let backend = Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::F32));
    frozen_forward_matches_trainable(backend, "emu f32");
}

#[test]
fn frozen_forward_is_bit_identical_on_the_emulated_device_bf16() {
    let backend = Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::Bf16));
    frozen_forward_matches_trainable(backend, "emu bf16");
}

const ADAMW: AdamWConfig = AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };

fn message<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn gradient_operations_on_a_frozen_model_are_errors() {
    let backend = Arc::new(CpuBackend::new());
    let cfg = config(3);
    let mut frozen = Gpt2::from_host_frozen(backend.clone(), &weights(&cfg, 1)).unwrap();
    let packed = batch(2, SHAPES[0], cfg.vocab_size);
    let dev = DeviceBatch::upload(&*backend, &packed).unwrap();
    frozen.forward(&dev).unwrap();
    let dseq = backend.upload(&vec![1.0; packed.num_seqs()]).unwrap();
    let before = frozen.held_buffers().len();

    let errors = [
        ("backward", message(frozen.backward(&dev, &dseq))),
        ("zero_grad", message(frozen.zero_grad())),
        ("grads", message(frozen.grads())),
        ("params_and_grads_mut", message(frozen.params_and_grads_mut())),
        ("adamw", message(AdamW::new(&mut frozen, ADAMW))),
        ("clip", message(clip_scale(&frozen, 1.0))),
        ("sgd", message(sgd_step(&mut frozen, 0.1, 1.0))),
    ];
    for (what, msg) in errors {
        assert!(msg.contains("frozen"), "{what}: the error does not say the model is frozen: {msg}");
    }
    // The failed backward allocated nothing (no scratch), and the model still runs forwards.
    assert_eq!(frozen.held_buffers().len(), before);
    let again = backend.download(frozen.forward(&dev).unwrap()).unwrap();
    assert!(again.iter().all(|x| x.is_finite()));
}

/// Elements per token of one layer's activations: ln_1, qkv, atty, residual_2, ln_2, fch, fch_gelu,
/// residual_3 (16 C) and the four LayerNorm statistics.
fn layer_elements(cfg: &Gpt2Config, tokens: usize, attention_saved: usize) -> usize {
    tokens * (16 * cfg.n_embd + 4) + attention_saved
}

#[test]
fn a_frozen_model_holds_no_gradients_and_two_layers_of_activations() {
    let backend = Arc::new(CpuBackend::new());
    let cfg = config(5);
    let w = weights(&cfg, 3);
    let mut trainable = Gpt2::from_host(backend.clone(), &w).unwrap();
    let mut frozen = Gpt2::from_host_frozen(backend.clone(), &w).unwrap();
    let elements = |m: &Gpt2<CpuBackend>| m.held_buffers().into_iter().map(|b| backend.buf_len(b)).sum::<usize>();
    // Before any forward: the parameters (and the frozen model nothing else, not even gradients).
    let p = cfg.num_params();
    assert_eq!(elements(&frozen), p);
    assert_eq!(elements(&trainable), 2 * p);

    let packed = batch(4, SHAPES[2], cfg.vocab_size);
    let dev = DeviceBatch::upload(&*backend, &packed).unwrap();
    trainable.forward(&dev).unwrap();
    frozen.forward(&dev).unwrap();
    let n = packed.num_tokens();
    let saved = backend.attention_saved_len(&dev.packing, cfg.n_head);
    let layer = layer_elements(&cfg, n, saved);
    assert_eq!(elements(&trainable) - elements(&frozen), p + (cfg.n_layer - 2) * layer);

    // The trainable model's backward adds its scratch; the frozen one never has any.
    trainable.backward(&dev, &backend.upload(&vec![1.0; packed.num_seqs()]).unwrap()).unwrap();
    assert!(elements(&trainable) - elements(&frozen) > p + (cfg.n_layer - 2) * layer);
}

/// Bytes a CUDA buffer holds: its values in their storage type and its fp32 master, if any.
fn cuda_bytes(b: &CudaBuf) -> usize {
    let value = match b.dtype() {
        Dtype::Bf16 => 2,
        _ => 4,
    };
    b.len() * value + if b.has_master() { 4 * b.len() } else { 0 }
}

#[test]
fn on_a_bf16_device_frozen_weights_keep_no_master_copy() {
    let backend = Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::Bf16));
    let cfg = config(4);
    let w = weights(&cfg, 5);
    let mut trainable = Gpt2::from_host(backend.clone(), &w).unwrap();
    let mut frozen = Gpt2::from_host_frozen(backend.clone(), &w).unwrap();
    let p = cfg.num_params();
    for param in frozen.params() {
        assert_eq!((param.dtype(), param.has_master()), (Dtype::Bf16, false), "{param:?}");
    }
    let bytes = |m: &Gpt2<CudaBackend>| m.held_buffers().into_iter().map(cuda_bytes).sum::<usize>();
    // bf16 values only, against bf16 values + fp32 master + bf16 gradient.
    assert_eq!(bytes(&frozen), 2 * p);
    assert_eq!(bytes(&trainable), (2 + 4 + 2) * p);

    // download of a frozen weight: its bf16 values.
    let name = "h.1.mlp.c_fc.weight";
    let index = cfg.parameter_shapes().iter().position(|(n, _)| n == name).unwrap();
    let got = backend.download(frozen.params()[index]).unwrap();
    let want: Vec<f32> = w.tensors[name].1.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
    assert_bitwise_eq(name, &got, &want);

    let packed = batch(6, SHAPES[2], cfg.vocab_size);
    let dev = DeviceBatch::upload(&*backend, &packed).unwrap();
    trainable.forward(&dev).unwrap();
    frozen.forward(&dev).unwrap();
    assert!(
        bytes(&trainable) > bytes(&frozen) + 6 * p,
        "after a forward: trainable {} bytes, frozen {}",
        bytes(&trainable),
        bytes(&frozen)
    );
}

#[test]
fn upload_frozen_in_f32_mode_is_upload() {
    let backend = CudaBackend::new(Device::emulated().unwrap(), Precision::F32);
    let data = randn(&mut rng(9), 300, 1.0);
    let buf = backend.upload_frozen(&data).unwrap();
    assert_eq!((buf.dtype(), buf.has_master()), (Dtype::F32, false));
    assert_bitwise_eq("f32 frozen upload", &backend.download(&buf).unwrap(), &data);
}
