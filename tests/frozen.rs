//! The frozen (inference-only) GPT-2: its forward gives bit-identical log-probs and generation
//! logits to a trainable model's with the same weights, on the CPU and on the emulated device in f32
//! and bf16, over several batch shapes and layer counts (so the two recycled activation slots are
//! exercised); every gradient operation on it is an error that says the model is frozen; it holds
//! no gradient, no backward scratch and two layers' boundaries and one interior of activations,
//! counted element by element and, on the emulated device, byte by byte (no fp32 master copies in
//! bf16). Its LM head, run in chunks of whole sequences, gives the same log-probs bit for bit as
//! the whole head (chunk sizes from 1 row up, a sequence longer than a chunk, sequences without
//! targets, a batch without any; and at GPT-2's width and vocabulary on the CPU), and holds the
//! logits of its largest chunk only.

mod common;

use std::sync::Arc;

use common::*;
use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::cuda::{CudaBackend, CudaBuf, Device, Dtype, Precision};
use safedpo::backend::prelude::*;
use safedpo::data::PackedBatch;
use safedpo::model::{plan_head_chunks, random_weights, FROZEN_HEAD_CHUNK_ROWS, MIN_HEAD_CHUNK_ROWS};
use safedpo::model::{Decoder, DecoderConfig, DeviceBatch};
use safedpo::optim::{clip_scale, sgd_step, AdamW, AdamWConfig};

fn config(n_layer: usize) -> DecoderConfig {
    DecoderConfig::gpt2(41, 32, 16, n_layer, 2)
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
        let w = test_weights(&cfg, 100 + n_layer as u64);
        let mut trainable = Decoder::from_host(backend.clone(), &w).unwrap();
        let mut frozen = Decoder::from_host_frozen(backend.clone(), &w).unwrap();
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
    let mut frozen = Decoder::from_host_frozen(backend.clone(), &test_weights(&cfg, 1)).unwrap();
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

/// Elements of one layer's boundary: ln_1 and residual_3 (2 C a token) and ln_1's two statistics.
fn boundary_elements(cfg: &DecoderConfig, tokens: usize) -> usize {
    tokens * (2 * cfg.n_embd + 2)
}

/// Elements of one layer's interior: qkv, atty, residual_2, ln_2, fch, fch_gelu (14 C a token),
/// ln_2's two statistics and the attention's saved state.
fn interior_elements(cfg: &DecoderConfig, tokens: usize, attention_saved: usize) -> usize {
    tokens * (14 * cfg.n_embd + 2) + attention_saved
}

#[test]
fn a_frozen_model_holds_no_gradients_and_two_layers_of_activations() {
    let backend = Arc::new(CpuBackend::new());
    let cfg = config(5);
    let w = test_weights(&cfg, 3);
    let mut trainable = Decoder::from_host(backend.clone(), &w).unwrap();
    let mut frozen = Decoder::from_host_frozen(backend.clone(), &w).unwrap();
    let elements = |m: &Decoder<CpuBackend>| m.held_buffers().into_iter().map(|b| backend.buf_len(b)).sum::<usize>();
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
    // The frozen model: two boundaries and one interior, against every layer's of each.
    let (boundary, interior) = (boundary_elements(&cfg, n), interior_elements(&cfg, n, saved));
    let kept_by_trainable_only = p + (cfg.n_layer - 2) * boundary + (cfg.n_layer - 1) * interior;
    assert_eq!(elements(&trainable) - elements(&frozen), kept_by_trainable_only);

    // The trainable model's backward adds its scratch; the frozen one never has any.
    trainable.backward(&dev, &backend.upload(&vec![1.0; packed.num_seqs()]).unwrap()).unwrap();
    assert!(elements(&trainable) - elements(&frozen) > kept_by_trainable_only);
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
    let w = test_weights(&cfg, 5);
    let mut trainable = Decoder::from_host(backend.clone(), &w).unwrap();
    let mut frozen = Decoder::from_host_frozen(backend.clone(), &w).unwrap();
    let p = cfg.num_params();
    for param in frozen.params() {
        assert_eq!((param.dtype(), param.has_master()), (Dtype::Bf16, false), "{param:?}");
    }
    let bytes = |m: &Decoder<CudaBackend>| m.held_buffers().into_iter().map(cuda_bytes).sum::<usize>();
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

// ---- the frozen model's LM head in chunks -----------------------------------------------------

/// Batches for the chunked head, as (length, prompt length) per sequence; each has more target rows
/// than `MIN_HEAD_CHUNK_ROWS` several times over, so that small chunk sizes give several chunks.
const CHUNK_SHAPES: [&[(usize, usize)]; 4] = [
    // Many sequences of mixed lengths, among them one without a target and a one-token one.
    &[(12, 3), (30, 5), (9, 9), (17, 2), (1, 1), (25, 20), (31, 4), (8, 1), (20, 6), (14, 7), (27, 3)],
    // A sequence longer than most chunk sizes (31 rows) between short ones; trailing sequences
    // without targets.
    &[(5, 1), (32, 1), (3, 2), (11, 4), (2, 1), (28, 2), (6, 6), (4, 4)],
    // Short sequences only: a last chunk thinner than MIN_HEAD_CHUNK_ROWS joins the one before.
    &[
        (4, 1),
        (3, 1),
        (5, 2),
        (2, 1),
        (6, 1),
        (4, 2),
        (3, 1),
        (5, 1),
        (4, 1),
        (6, 2),
        (3, 1),
        (2, 1),
        (4, 1),
        (5, 1),
        (4, 2),
        (6, 1),
        (3, 1),
        (5, 2),
        (4, 1),
        (2, 1),
        (6, 3),
        (5, 1),
        (3, 2),
        (4, 1),
        (6, 1),
        (3, 1),
    ],
    // Leading sequences without targets, then two long ones.
    &[(7, 7), (1, 1), (32, 2), (30, 1)],
];

/// Chunk sizes to try: 1 row (chunks of MIN_HEAD_CHUNK_ROWS), a few rows, a size below the longest
/// sequence, a size a little under the whole batch, and the default (one chunk: the whole head).
const CHUNK_ROWS: [usize; 6] = [1, 7, 20, 33, 60, FROZEN_HEAD_CHUNK_ROWS];

/// Elements of every buffer a model holds.
fn held_elements<B: Backend>(backend: &B, model: &Decoder<B>) -> usize {
    model.held_buffers().into_iter().map(|b| backend.buf_len(b)).sum()
}

/// For each batch shape and chunk size: the frozen model's chunked head gives the trainable model's
/// log-probs bit for bit (with one frozen model throughout, so chunk plans are replaced and the
/// head's buffers shrink and grow); and it holds the head buffers of its largest chunk only, counted
/// against a frozen model that runs the whole head.
fn chunked_head_matches_whole_head<B: Backend>(backend: Arc<B>, what: &str) {
    let cfg = config(2);
    let (c, v) = (cfg.n_embd, cfg.vocab_size);
    let w = test_weights(&cfg, 31);
    let mut trainable = Decoder::from_host(backend.clone(), &w).unwrap();
    let mut frozen = Decoder::from_host_frozen(backend.clone(), &w).unwrap();
    assert_eq!(frozen.head_chunk_rows(), FROZEN_HEAD_CHUNK_ROWS);
    let mut several_chunks = 0;
    for (i, lens) in CHUNK_SHAPES.iter().enumerate() {
        let packed = batch(50 + i as u64, lens, v);
        let dev = DeviceBatch::upload(&*backend, &packed).unwrap();
        let (m, seqs) = (dev.num_target_rows(), dev.num_seqs());
        let row_cu = &dev.row_packing.host_cu_seqlens;
        assert!(m > 3 * MIN_HEAD_CHUNK_ROWS, "{what}: batch {i} has only {m} target rows");
        let want = backend.download(trainable.forward(&dev).unwrap()).unwrap();
        assert!(want.iter().any(|&x| x != 0.0), "{what}: all log-probs are 0; the test has no signal");
        // A fresh frozen model on the whole head, for the memory count.
        let mut whole = Decoder::from_host_frozen(backend.clone(), &w).unwrap();
        whole.set_head_chunk_rows(m).unwrap();
        assert_bitwise_eq(
            &format!("{what}: batch {i}, whole head"),
            &backend.download(whole.forward(&dev).unwrap()).unwrap(),
            &want,
        );
        for rows in CHUNK_ROWS {
            frozen.set_head_chunk_rows(rows).unwrap();
            let chunks = plan_head_chunks(row_cu, rows);
            let chunk_rows: Vec<usize> = chunks.iter().map(|s| (row_cu[s.end] - row_cu[s.start]) as usize).collect();
            several_chunks += (chunks.len() > 1) as usize;
            // Twice: the second forward reuses the batch's uploaded chunks.
            for run in 0..2 {
                let got = backend.download(frozen.forward(&dev).unwrap()).unwrap();
                let label = format!("{what}: batch {i}, {rows}-row chunks {chunk_rows:?}, run {run}");
                assert_bitwise_eq(&label, &got, &want);
                // Sequences without a target: +0, as in the whole head.
                for (s, &x) in got.iter().enumerate() {
                    if row_cu[s] == row_cu[s + 1] {
                        assert_eq!(x.to_bits(), 0.0f32.to_bits(), "{label}: sequence {s} has no target");
                    }
                }
            }
            // Held by a fresh frozen model after this forward: the whole head's [m, C + V + 2] less
            // the largest chunk's, plus the chunk's [S] sequence log-probs.
            let mut fresh = Decoder::from_host_frozen(backend.clone(), &w).unwrap();
            fresh.set_head_chunk_rows(rows).unwrap();
            fresh.forward(&dev).unwrap();
            let largest = if m > rows { *chunk_rows.iter().max().unwrap() } else { m };
            let extra = if m > rows && chunks.len() > 1 { seqs } else { 0 };
            assert_eq!(
                held_elements(&*backend, &whole) + extra,
                held_elements(&*backend, &fresh) + (m - largest) * (c + v + 2),
                "{what}: batch {i}, {rows}-row chunks {chunk_rows:?}: held elements"
            );
            let longest = row_cu.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap();
            assert!(largest < rows.max(longest) + 2 * MIN_HEAD_CHUNK_ROWS, "{what}: chunks {chunk_rows:?}");
        }
    }
    assert!(several_chunks >= 10, "{what}: only {several_chunks} cases ran the head in several chunks");

    // A batch without a target: zeros, whatever the chunk size, and the model runs on afterwards.
    frozen.set_head_chunk_rows(1).unwrap();
    let none = DeviceBatch::upload(&*backend, &batch(60, &[(5, 5), (1, 1), (9, 9)], v)).unwrap();
    let got = backend.download(frozen.forward(&none).unwrap()).unwrap();
    assert_bitwise_eq(&format!("{what}: no targets"), &got, &[0.0; 3]);
    let dev = DeviceBatch::upload(&*backend, &batch(61, CHUNK_SHAPES[0], v)).unwrap();
    let want = backend.download(trainable.forward(&dev).unwrap()).unwrap();
    assert_bitwise_eq(
        &format!("{what}: after no targets"),
        &backend.download(frozen.forward(&dev).unwrap()).unwrap(),
        &want,
    );
}

#[test]
fn chunked_head_is_bit_identical_on_the_cpu() {
    chunked_head_matches_whole_head(Arc::new(CpuBackend::new()), "cpu");
}

#[test]
fn chunked_head_is_bit_identical_on_the_emulated_device_f32() {
    chunked_head_matches_whole_head(Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::F32)), "emu f32");
}

#[test]
fn chunked_head_is_bit_identical_on_the_emulated_device_bf16() {
    chunked_head_matches_whole_head(
        Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::Bf16)),
        "emu bf16",
    );
}

/// On the CPU, the storage the head's buffers keep (Vec capacity, what the process's memory holds,
/// not only their lengths): the largest chunk's, counted against a frozen model on the whole head.
#[test]
fn chunked_head_keeps_storage_for_its_largest_chunk_only_on_the_cpu() {
    let backend = Arc::new(CpuBackend::new());
    let cfg = config(2);
    let (c, v) = (cfg.n_embd, cfg.vocab_size);
    let w = test_weights(&cfg, 32);
    let capacity = |m: &Decoder<CpuBackend>| m.held_buffers().into_iter().map(Vec::capacity).sum::<usize>();
    for (i, lens) in CHUNK_SHAPES.iter().enumerate() {
        let dev = DeviceBatch::upload(&*backend, &batch(70 + i as u64, lens, v)).unwrap();
        let (m, seqs) = (dev.num_target_rows(), dev.num_seqs());
        let row_cu = &dev.row_packing.host_cu_seqlens;
        let mut whole = Decoder::from_host_frozen(backend.clone(), &w).unwrap();
        whole.set_head_chunk_rows(usize::MAX).unwrap();
        whole.forward(&dev).unwrap();
        for rows in [1, 24] {
            let chunks = plan_head_chunks(row_cu, rows);
            assert!(chunks.len() > 1, "batch {i}: one chunk of {rows} rows");
            let largest = chunks.iter().map(|s| (row_cu[s.end] - row_cu[s.start]) as usize).max().unwrap();
            let mut chunked = Decoder::from_host_frozen(backend.clone(), &w).unwrap();
            chunked.set_head_chunk_rows(rows).unwrap();
            chunked.forward(&dev).unwrap();
            assert_eq!(
                capacity(&whole) + seqs,
                capacity(&chunked) + (m - largest) * (c + v + 2),
                "batch {i}: {m} target rows in chunks of {rows} (largest {largest})"
            );
        }
    }
}

/// At GPT-2's width (768, so the product's inner dimension is split into blocks) and vocabulary,
/// one layer: the chunked head equals the whole head bit for bit on the CPU.
#[test]
fn chunked_head_is_bit_identical_at_gpt2_width_and_vocabulary_on_the_cpu() {
    let backend = Arc::new(CpuBackend::new());
    let cfg = DecoderConfig::gpt2(50257, 64, 768, 1, 12);
    let w = random_weights(cfg.clone(), 3).unwrap();
    let mut trainable = Decoder::from_host(backend.clone(), &w).unwrap();
    let mut frozen = Decoder::from_host_frozen(backend.clone(), &w).unwrap();
    let lens = [(40, 8), (64, 2), (17, 16), (50, 10), (33, 33), (61, 5), (20, 3)];
    let dev = DeviceBatch::upload(&*backend, &batch(80, &lens, cfg.vocab_size)).unwrap();
    let want = backend.download(trainable.forward(&dev).unwrap()).unwrap();
    for rows in [1, 40, 100] {
        frozen.set_head_chunk_rows(rows).unwrap();
        let row_cu = &dev.row_packing.host_cu_seqlens;
        assert!(plan_head_chunks(row_cu, rows).len() > 1);
        let got = backend.download(frozen.forward(&dev).unwrap()).unwrap();
        assert_bitwise_eq(&format!("GPT-2 head, {rows}-row chunks"), &got, &want);
    }
}

#[test]
fn a_head_chunk_has_at_least_one_row() {
    let backend = Arc::new(CpuBackend::new());
    let w = test_weights(&config(1), 33);
    let mut trainable = Decoder::from_host(backend.clone(), &w).unwrap();
    assert_eq!(trainable.head_chunk_rows(), usize::MAX, "a trainable model runs its head whole by default");
    assert!(message(trainable.set_head_chunk_rows(0)).contains("at least one row"));
    let mut frozen = Decoder::from_host_frozen(backend, &w).unwrap();
    assert!(message(frozen.set_head_chunk_rows(0)).contains("at least one row"));
    frozen.set_head_chunk_rows(64).unwrap();
    assert_eq!(frozen.head_chunk_rows(), 64);
}

/// A trainable model with a chunked head (its backward recomputes each chunk's logits) against the
/// whole head: the log-probs bit for bit, every gradient within f32 summation-order noise (the
/// head's weight gradient adds its chunks in another order), for every batch shape and chunk size,
/// with one chunked model throughout (chunk plans replaced, head buffers resized). Two steps each,
/// so that gradients accumulate across chunked backwards.
fn trainable_chunked_head_matches_whole_head<B: Backend>(backend: Arc<B>, what: &str, rtol: f64) {
    let cfg = config(2);
    let w = test_weights(&cfg, 37);
    let mut chunked = Decoder::from_host(backend.clone(), &w).unwrap();
    for (i, lens) in CHUNK_SHAPES.iter().enumerate() {
        let packed = batch(70 + i as u64, lens, cfg.vocab_size);
        let dev = DeviceBatch::upload(&*backend, &packed).unwrap();
        let dseq = backend.upload(&uniform(&mut rng(80 + i as u64), dev.num_seqs(), -1.0, 1.0)).unwrap();
        let run = |model: &mut Decoder<B>| {
            model.zero_grad().unwrap();
            let mut logps = Vec::new();
            for _ in 0..2 {
                logps = backend.download(model.forward(&dev).unwrap()).unwrap();
                model.backward(&dev, &dseq).unwrap();
            }
            let grads: Vec<Vec<f32>> =
                model.grads().unwrap().into_iter().map(|g| backend.download(g).unwrap()).collect();
            (logps, grads)
        };
        let mut whole = Decoder::from_host(backend.clone(), &w).unwrap();
        let (want_logps, want_grads) = run(&mut whole);
        for rows in [1, 7, 20, 33, 60] {
            chunked.set_head_chunk_rows(rows).unwrap();
            let (logps, grads) = run(&mut chunked);
            let label = format!("{what}: batch {i}, {rows}-row chunks");
            assert_bitwise_eq(&format!("{label}: log-probs"), &logps, &want_logps);
            for ((name, _), (got, want)) in cfg.parameter_shapes().iter().zip(grads.iter().zip(&want_grads)) {
                assert_close_scaled(&format!("{label}: d/d {name}"), got, &to_f64(want), rtol);
            }
        }
    }
}

#[test]
fn trainable_chunked_head_matches_whole_head_cpu() {
    trainable_chunked_head_matches_whole_head(Arc::new(CpuBackend::new()), "cpu", 1e-5);
}

#[test]
fn trainable_chunked_head_matches_whole_head_emulated_device() {
    let backend = Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::F32));
    trainable_chunked_head_matches_whole_head(backend, "emu f32", 1e-5);
}

/// The frozen model (weights without masters, chunked head) against the trainable one on a CUDA
/// device, at the precision's tolerance: on a GPU, cuBLASLt may choose another algorithm for another
/// row count, so bit-identity is a CPU/emulator property. Also checks, with the device's own byte
/// count, that the frozen weights take less memory than the trainable weights and gradients.
fn frozen_forward_close_to_trainable_on(device: &Device) {
    for precision in [Precision::F32, Precision::Bf16] {
        let backend = Arc::new(CudaBackend::new(device.clone(), precision));
        let rtol = if precision == Precision::F32 { 1e-5 } else { 1e-2 };
        let what = format!("{} {precision}", backend.name());
        let cfg = config(3);
        let w = test_weights(&cfg, 77);
        let bytes = || backend.memory_stats().expect("the CUDA backend counts its memory").current_bytes;
        let start = bytes();
        let mut trainable = Decoder::from_host(backend.clone(), &w).unwrap();
        let trainable_bytes = bytes() - start;
        let start = bytes();
        let mut frozen = Decoder::from_host_frozen(backend.clone(), &w).unwrap();
        let frozen_bytes = bytes() - start;
        assert!(
            frozen_bytes < trainable_bytes,
            "{what}: frozen weights take {frozen_bytes} bytes, trainable ones with gradients {trainable_bytes}"
        );
        frozen.set_head_chunk_rows(20).unwrap();
        for (i, lens) in CHUNK_SHAPES.iter().enumerate() {
            let dev = DeviceBatch::upload(&*backend, &batch(80 + i as u64, lens, cfg.vocab_size)).unwrap();
            let want = backend.download(trainable.forward(&dev).unwrap()).unwrap();
            let got = backend.download(frozen.forward(&dev).unwrap()).unwrap();
            assert!(want.iter().any(|&x| x != 0.0), "{what}: all log-probs are 0; the test has no signal");
            assert_close_scaled(&format!("{what}: batch {i}: sequence log-probs"), &got, &to_f64(&want), rtol);
        }
    }
}

#[test]
fn frozen_forward_is_close_to_trainable_on_the_emulated_device() {
    frozen_forward_close_to_trainable_on(&Device::emulated().unwrap());
}

#[test]
#[ignore = "needs a GPU"]
fn frozen_forward_is_close_to_trainable_on_the_gpu() {
    frozen_forward_close_to_trainable_on(&Device::gpu(0).expect("GPU 0"));
}
