//! Generation with a KV cache (`Decoder::extend_cached`, `train::generate::generate_batch`): greedy
//! decoding token for token equal to decoding without the cache (the whole prefix through the model
//! at each step), for GPT-2, a grouped-query Llama, a Mistral whose sliding window is shorter than
//! the caches and a Qwen2 with the window in one layer of two, on the CPU and the emulated device; a batch
//! of prompts generating what each prompt generates alone, sampled, for a seed.

use std::sync::Arc;

use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::cuda::{CudaBackend, Device, Precision};
use safedpo::backend::Backend;
use safedpo::model::{random_weights, Decoder, DecoderConfig, Family, HostWeights, LayerAttention};
use safedpo::train::generate::{argmax, generate, generate_batch, SamplingParams};

/// A model whose weights are drawn ten times wider than the initialisation, so that its logits
/// are far from uniform and greedy choices are not near-ties.
fn weights(config: DecoderConfig) -> HostWeights {
    let mut w = random_weights(config, 17).unwrap();
    for (name, (_, data)) in w.tensors.iter_mut() {
        if !name.contains("ln") && !name.contains("norm") {
            data.iter_mut().for_each(|x| *x *= 10.0);
        }
    }
    w
}

fn configs() -> Vec<DecoderConfig> {
    let llama = DecoderConfig::llama(29, 40, 16, 2, 4, 2, 24);
    let mistral = DecoderConfig { family: Family::Mistral, sliding_window: Some(5), ..llama.clone() };
    let qwen2 = DecoderConfig {
        family: Family::Qwen2,
        qkv_bias: true,
        sliding_window: Some(3),
        layer_types: Some(vec![LayerAttention::Full, LayerAttention::Sliding]),
        ..llama.clone()
    };
    vec![DecoderConfig::gpt2(29, 40, 16, 2, 2), llama, mistral, qwen2]
}

/// Greedy decoding without a cache: the whole prefix through the model at each step.
fn greedy_without_cache<B: Backend>(model: &mut Decoder<B>, prompt: &[i32], max_new: usize) -> Vec<i32> {
    let mut ids = prompt.to_vec();
    let mut new = Vec::new();
    while new.len() < max_new && ids.len() < model.config().n_positions {
        let next = argmax(&model.last_logits(&ids).unwrap()) as i32;
        ids.push(next);
        new.push(next);
    }
    new
}

fn prompts() -> Vec<Vec<i32>> {
    vec![vec![3, 1, 4, 1, 5], vec![9], vec![2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3]]
}

fn greedy_matches<B: Backend>(backend: Arc<B>) {
    for config in configs() {
        let family = config.family;
        let mut model = Decoder::from_host_frozen(backend.clone(), &weights(config)).unwrap();
        let greedy = SamplingParams::default();
        let batch = generate_batch(&mut model, &prompts(), &[], 20, &greedy).unwrap();
        for (prompt, cached) in prompts().iter().zip(&batch) {
            let want = greedy_without_cache(&mut model, prompt, 20);
            assert_eq!(cached, &want, "{family}: prompt {prompt:?}");
            assert_eq!(&generate(&mut model, prompt, &[], 20, &greedy).unwrap(), cached);
        }
        // Up to the context's end: 40 positions, the longest prompt 12.
        let long = generate_batch(&mut model, &prompts(), &[], 100, &greedy).unwrap();
        for (prompt, out) in prompts().iter().zip(&long) {
            assert_eq!(prompt.len() + out.len(), 40);
            assert_eq!(out, &greedy_without_cache(&mut model, prompt, 100), "{family}: to the context's end");
        }
    }
}

#[test]
fn greedy_with_the_cache_equals_greedy_without_it_cpu() {
    greedy_matches(Arc::new(CpuBackend::new()));
}

#[test]
fn greedy_with_the_cache_equals_greedy_without_it_emulated_device() {
    greedy_matches(Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::F32)));
}

/// Sampled: a batch generates, for each prompt, what that prompt generates alone (its own random
/// stream), the same for the same seed; a stop token ends a sequence without ending the others.
#[test]
fn sampling_is_per_sequence_and_deterministic() {
    let backend = Arc::new(CpuBackend::new());
    let mut model = Decoder::from_host_frozen(backend, &weights(configs().remove(1))).unwrap();
    let params = SamplingParams { temperature: 1.0, top_p: 0.9, top_k: 10, seed: 3 };
    let batch = generate_batch(&mut model, &prompts(), &[], 15, &params).unwrap();
    assert_eq!(batch, generate_batch(&mut model, &prompts(), &[], 15, &params).unwrap());
    assert_eq!(batch[0], generate(&mut model, &prompts()[0], &[], 15, &params).unwrap());
    let other = SamplingParams { seed: 4, ..params };
    assert_ne!(batch, generate_batch(&mut model, &prompts(), &[], 15, &other).unwrap());
    // Stop at the first token sequence 2 produced: it ends there, the others go on as before
    // (unless they produce it too, where they stop).
    let stop = batch[2][0];
    let stopped = generate_batch(&mut model, &prompts(), &[stop], 15, &params).unwrap();
    assert!(stopped[2].is_empty());
    for (s, full) in batch.iter().enumerate().take(2) {
        let cut = full.iter().position(|&t| t == stop).unwrap_or(full.len());
        assert_eq!(stopped[s], full[..cut]);
    }
}
