//! The whole model with its attention on tensor cores: the emulated device in bf16 runs
//! kernels/attention_mma.cu at head dims 64 and 128 (the other model tests use smaller heads, which
//! the portable kernels take), and must match the CPU model as closely as the same models with heads
//! of 32, which run the portable kernels: log-probs and the gradient of every parameter.
//!
//! The weights are the model's own initialisation (`random_weights`): with the peaked attention of
//! `test_weights` over sequences of 130 tokens, bf16 rounding anywhere in the model moves gradients
//! by up to 28% of their largest entry with the portable kernels too (47% with tensor cores), so the
//! comparison would measure the conditioning of the test, not the kernels.

mod common;

use std::sync::Arc;

use common::reference::*;
use common::*;
use safedpo::backend::cuda::{CudaBackend, Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::model::{Decoder, DecoderConfig, DeviceBatch, HostWeights};

/// (length, prompt length): lengths across the kernels' 64-row tiles, and a single token.
const TILE_LENS: [(usize, usize); 4] = [(130, 40), (1, 1), (65, 10), (17, 5)];

/// One forward and backward: the log-probs and every gradient, downloaded.
fn step<B: Backend>(backend: Arc<B>, host: &HostWeights, seqs: &[Seq], dseq: &[f32]) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut model = Decoder::from_host(backend.clone(), host).unwrap();
    let dev = DeviceBatch::upload(&*backend, &pack(seqs)).unwrap();
    let logp = backend.download(model.forward(&dev).unwrap()).unwrap();
    model.backward(&dev, &backend.upload(dseq).unwrap()).unwrap();
    let grads = model.grads().unwrap().into_iter().map(|g| backend.download(g).unwrap()).collect();
    (logp, grads)
}

#[test]
fn models_with_head_dims_64_and_128_match_the_cpu_in_bf16_on_the_emulated_device() {
    safedpo::backend::cuda::emu::use_test_mode(); // random schedule, race detector
    let device = Device::emulated().unwrap();
    // Llama with one key/value head of 64 for 2 query heads, GPT-2 with heads of 128; the same
    // shapes with heads of 32 (the portable kernels) as the control.
    let configs = [
        ("llama, head dim 64, MQA", DecoderConfig::llama(53, 160, 128, 1, 2, 1, 96)),
        ("gpt2, head dim 128", DecoderConfig::gpt2(53, 160, 256, 1, 2)),
        ("llama, head dim 32 (portable kernels)", DecoderConfig::llama(53, 160, 128, 1, 4, 2, 96)),
        ("gpt2, head dim 32 (portable kernels)", DecoderConfig::gpt2(53, 160, 256, 1, 8)),
    ];
    for (what, config) in configs {
        let host = safedpo::model::random_weights(config.clone(), 5).unwrap();
        let seqs = sequences(6, &TILE_LENS, config.vocab_size);
        let dseq: Vec<f32> = uniform(&mut rng(7), seqs.len(), -1.0, 1.0);
        let (want_logp, want_grads) = step(cpu(), &host, &seqs, &dseq);
        // tests/llama.rs's bf16 rtol; a floor of 2e-2 of the largest entry (measured: up to 8.5e-3
        // with tensor cores, 6.7e-3 with the portable kernels).
        let (rtol, floor) = (5e-2, 2e-2);
        let cuda = Arc::new(CudaBackend::new(device.clone(), Precision::Bf16));
        let (logp, grads) = step(cuda, &host, &seqs, &dseq);
        assert_close(&format!("{what}: log-probs"), &logp, &to_f64(&want_logp), rtol, rtol);
        for ((name, _), (got, want)) in config.parameter_shapes().iter().zip(grads.iter().zip(&want_grads)) {
            assert_close_with_floor(&format!("{what}: d/d {name}"), got, &to_f64(want), rtol, floor);
        }
    }
}
