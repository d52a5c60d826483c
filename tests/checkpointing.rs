//! Activation checkpointing (`Decoder::set_gradient_checkpointing`, `batching.gradient_checkpointing`):
//! a checkpointed model gives the same log-probs and the same gradients, bit for bit, as one that
//! keeps every activation — on the CPU and on the emulated device in f32 and bf16, for GPT-2 and the
//! Llama family (GQA, RoPE, biases, tied head), over batches whose shape changes, with gradients
//! accumulated over two micro-batches and with the LM head in chunks; it holds every layer's
//! boundary and one interior, counted element by element; and toggling it between steps is safe.

mod common;

use std::sync::Arc;

use common::*;
use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::cuda::{CudaBackend, Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::data::PackedBatch;
use safedpo::model::{Decoder, DecoderConfig, DeviceBatch, Family};

fn configs() -> [(&'static str, DecoderConfig); 3] {
    let qwen2 = DecoderConfig {
        family: Family::Qwen2,
        qkv_bias: true,
        tie_word_embeddings: true,
        ..DecoderConfig::llama(37, 32, 16, 3, 4, 1, 24)
    };
    [
        ("gpt2", DecoderConfig::gpt2(41, 32, 16, 3, 2)),
        ("llama gqa", DecoderConfig::llama(41, 32, 24, 4, 4, 2, 28)),
        ("qwen2 mqa tied", qwen2),
    ]
}

fn batch(seed: u64, lens: &[(usize, usize)], vocab: usize) -> PackedBatch {
    let mut r = rng(seed);
    let seqs: Vec<(Vec<i32>, usize)> = lens.iter().map(|&(len, p)| (rand_ids(&mut r, len, vocab), p)).collect();
    PackedBatch::from_sequences(seqs.iter().map(|(t, p)| (t.as_slice(), *p)))
}

/// Micro-batches of changing shapes (the buffers grow, shrink and grow again).
const SHAPES: [&[(usize, usize)]; 3] = [&[(7, 2), (1, 1), (12, 4)], &[(3, 1)], &[(9, 3), (14, 5), (6, 2), (2, 1)]];

/// Forward and backward of the same micro-batches through a plain and a checkpointed model (each
/// with `head_chunk_rows`, if given), gradients accumulated over pairs of micro-batches: the
/// log-probs and every gradient equal bit for bit after each backward.
fn checkpointed_matches_plain<B: Backend>(backend: Arc<B>, head_chunk_rows: Option<usize>, what: &str) {
    for (name, cfg) in configs() {
        let w = test_weights(&cfg, 11);
        let mut plain = Decoder::from_host(backend.clone(), &w).unwrap();
        let mut checkpointed = Decoder::from_host(backend.clone(), &w).unwrap();
        checkpointed.set_gradient_checkpointing(true);
        assert!(checkpointed.gradient_checkpointing() && !plain.gradient_checkpointing());
        if let Some(rows) = head_chunk_rows {
            plain.set_head_chunk_rows(rows).unwrap();
            checkpointed.set_head_chunk_rows(rows).unwrap();
        }
        let what = format!("{what}, {name}");
        for (i, lens) in SHAPES.iter().cycle().take(4).enumerate() {
            if i % 2 == 0 {
                plain.zero_grad().unwrap();
                checkpointed.zero_grad().unwrap();
            }
            let packed = batch(40 + i as u64, lens, cfg.vocab_size);
            let dev = DeviceBatch::upload(&*backend, &packed).unwrap();
            let dseq = backend.upload(&uniform(&mut rng(60 + i as u64), lens.len(), -1.0, 1.0)).unwrap();
            let want = backend.download(plain.forward(&dev).unwrap()).unwrap();
            let got = backend.download(checkpointed.forward(&dev).unwrap()).unwrap();
            assert!(want.iter().any(|&x| x != 0.0), "{what}: all log-probs are 0; the test has no signal");
            assert_bitwise_eq(&format!("{what}: micro-batch {i}: log-probs"), &got, &want);
            plain.backward(&dev, &dseq).unwrap();
            checkpointed.backward(&dev, &dseq).unwrap();
            let names: Vec<String> = cfg.parameter_shapes().into_iter().map(|(n, _)| n).collect();
            let grads = plain.grads().unwrap().into_iter().zip(checkpointed.grads().unwrap());
            for (name, (want, got)) in names.iter().zip(grads) {
                let (want, got) = (backend.download(want).unwrap(), backend.download(got).unwrap());
                assert_bitwise_eq(&format!("{what}: micro-batch {i}: d/d {name}"), &got, &want);
            }
        }
    }
}

#[test]
fn checkpointed_gradients_are_bit_identical_on_the_cpu() {
    checkpointed_matches_plain(Arc::new(CpuBackend::new()), None, "cpu");
}

#[test]
fn checkpointed_gradients_are_bit_identical_with_a_chunked_head_on_the_cpu() {
    checkpointed_matches_plain(Arc::new(CpuBackend::new()), Some(7), "cpu, head chunks of 7 rows");
}

#[test]
fn checkpointed_gradients_are_bit_identical_on_the_emulated_device_f32() {
    safedpo::backend::cuda::emu::use_test_mode();
    let backend = Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::F32));
    checkpointed_matches_plain(backend, None, "emu f32");
}

#[test]
fn checkpointed_gradients_are_bit_identical_on_the_emulated_device_bf16() {
    safedpo::backend::cuda::emu::use_test_mode();
    let backend = Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::Bf16));
    checkpointed_matches_plain(backend, Some(9), "emu bf16, head chunks of 9 rows");
}

#[test]
fn a_checkpointed_model_keeps_every_boundary_and_one_interior() {
    let backend = Arc::new(CpuBackend::new());
    let cfg = DecoderConfig::gpt2(41, 32, 16, 5, 2);
    let w = test_weights(&cfg, 3);
    let mut plain = Decoder::from_host(backend.clone(), &w).unwrap();
    let mut checkpointed = Decoder::from_host(backend.clone(), &w).unwrap();
    checkpointed.set_gradient_checkpointing(true);
    let elements = |m: &Decoder<CpuBackend>| m.held_buffers().into_iter().map(|b| backend.buf_len(b)).sum::<usize>();

    let packed = batch(4, SHAPES[2], cfg.vocab_size);
    let dev = DeviceBatch::upload(&*backend, &packed).unwrap();
    plain.forward(&dev).unwrap();
    checkpointed.forward(&dev).unwrap();
    let n = packed.num_tokens();
    let saved = backend.attention_saved_len(&dev.packing, cfg.n_head);
    // A GPT-2 layer's interior: qkv, atty, residual_2, ln_2, fch, fch_gelu (14 C a token), ln_2's
    // two statistics and the attention's saved state; the checkpointed model keeps one of L.
    let interior = n * (14 * cfg.n_embd + 2) + saved;
    assert_eq!(elements(&plain) - elements(&checkpointed), (cfg.n_layer - 1) * interior);
}

#[test]
fn checkpointing_can_be_toggled_between_steps() {
    let backend = Arc::new(CpuBackend::new());
    let cfg = DecoderConfig::llama(41, 32, 24, 3, 4, 2, 28);
    let w = test_weights(&cfg, 5);
    let mut plain = Decoder::from_host(backend.clone(), &w).unwrap();
    let mut toggled = Decoder::from_host(backend.clone(), &w).unwrap();
    for (i, lens) in SHAPES.iter().enumerate() {
        toggled.set_gradient_checkpointing(i % 2 == 0);
        let packed = batch(70 + i as u64, lens, cfg.vocab_size);
        let dev = DeviceBatch::upload(&*backend, &packed).unwrap();
        let dseq = backend.upload(&vec![0.5; lens.len()]).unwrap();
        for model in [&mut plain, &mut toggled] {
            model.forward(&dev).unwrap();
            model.backward(&dev, &dseq).unwrap();
        }
    }
    for (want, got) in plain.grads().unwrap().into_iter().zip(toggled.grads().unwrap()) {
        assert_bitwise_eq("accumulated gradient", &backend.download(got).unwrap(), &backend.download(want).unwrap());
    }
    // Toggling between a forward and its backward drops the forward's activations: the backward
    // says it needs a forward instead of reading stale buffers.
    let packed = batch(80, SHAPES[0], cfg.vocab_size);
    let dev = DeviceBatch::upload(&*backend, &packed).unwrap();
    toggled.forward(&dev).unwrap();
    toggled.set_gradient_checkpointing(!toggled.gradient_checkpointing());
    let err = toggled.backward(&dev, &backend.upload(&[1.0; 3]).unwrap()).unwrap_err();
    assert!(format!("{err:#}").contains("needs a forward"), "{err:#}");
}

/// `batching.gradient_checkpointing = true` through the trainer (SafeDPO with a live reference, two
/// micro-batches a step, 2 layers): the same final weights and optimizer state, byte for byte, as
/// the same run without it.
#[test]
fn a_checkpointed_training_run_matches_the_plain_run_byte_for_byte() {
    use safedpo::config::RunConfig;
    use safedpo::data::{synthetic_pku_rows, write_pku_jsonl};
    use safedpo::train::{train, Task, TrainOptions};

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    write_pku_jsonl(&data, &synthetic_pku_rows(40, 5)).unwrap();
    let mut plain = RunConfig { out_dir: dir.path().join("plain"), seed: 3, ..Default::default() };
    plain.data.path = Some(data);
    plain.data.template = "U: {prompt} A:".into();
    plain.data.max_len = 96;
    plain.model.n_positions = 96;
    (plain.model.n_layer, plain.model.n_embd, plain.model.n_head) = (2, 16, 2);
    plain.batching.tokens_per_micro_batch = 768;
    plain.batching.grad_accum = 2;
    plain.precompute_ref = false;
    plain.optimizer.lr = 2e-3;
    plain.optimizer.total_steps = Some(3);
    plain.intervals.checkpoint_every = 0;
    let mut checkpointed = plain.clone();
    checkpointed.out_dir = dir.path().join("checkpointed");
    checkpointed.batching.gradient_checkpointing = true;

    let quiet = TrainOptions { quiet: true, ..Default::default() };
    train(Arc::new(CpuBackend::new()), &plain, Task::Preference, &quiet).unwrap();
    train(Arc::new(CpuBackend::new()), &checkpointed, Task::Preference, &quiet).unwrap();
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(plain.out_dir.join("final").join(file)).unwrap();
        let b = std::fs::read(checkpointed.out_dir.join("final").join(file)).unwrap();
        assert!(a == b, "final/{file} differs between the plain and the checkpointed run");
    }
    let saved = std::fs::read_to_string(checkpointed.out_dir.join("config.toml")).unwrap();
    assert!(saved.contains("gradient_checkpointing = true"), "the run's config does not record it:\n{saved}");
}
