//! The LM head of a bf16 model keeps its logits in f32: the head's product stores its f32
//! accumulator, the log-softmax-gather reads it, and the backward makes bf16 dlogits from it. At
//! logits of 30–100 a bf16 step is 0.25–0.5 nats, so bf16 logits put nats of rounding into a long
//! response's log-prob; these tests measure that the f32 logits take it out:
//!
//! - the head alone (a bf16 backend, stored rows and weight) against the f64 reference on the same
//!   stored values, beside the bf16-logits path on the same inputs: the error drops by orders of
//!   magnitude, and the bound asserted is one the bf16-logits path fails (checked in the test);
//! - the whole bf16 model on the emulated device against the CPU's f32 model, head weights scaled
//!   so the logits reach 30–100;
//! - the head in chunks gives the whole head's log-probs bit for bit in bf16 too (frozen and
//!   trainable, chunk sizes that do and do not divide the rows), the trainable one's gradients
//!   within bf16 rounding of the whole head's;
//! - the head's gradients (the tied embedding's, the final norm's) in bf16 within the bf16
//!   tolerance of docs/TESTING.md (5e-2 relative + 6e-2 of the largest entry) of the CPU's.

mod common;

use std::sync::Arc;

use common::*;
use half::bf16;
use safedpo::backend::cpu::logsoftmax_gather::spec;
use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::cuda::{CudaBackend, Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::{Packing, WeightLayout};
use safedpo::data::PackedBatch;
use safedpo::model::{Decoder, DecoderConfig, DeviceBatch, HostWeights};

fn emu_bf16() -> Arc<CudaBackend> {
    Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::Bf16))
}

fn rounded(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

/// The largest absolute difference.
fn max_error(got: &[f32], want: &[f64]) -> f64 {
    got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max)
}

/// The head on a bf16 backend: `rows [m, c] · weight [v, c]ᵀ`, then each sequence's log-prob, with
/// the logits stored in f32 (`f32_logits`) or, as before, in bf16.
#[allow(clippy::too_many_arguments)]
fn head_logps(
    be: &CudaBackend,
    rows: &[f32],
    weight: &[f32],
    targets: &[i32],
    lens: &[usize],
    c: usize,
    v: usize,
    f32_logits: bool,
) -> Vec<f32> {
    let m = targets.len();
    let (x, w) = (be.upload(rows).unwrap(), be.upload(weight).unwrap());
    let mut logits = be.zeros(m * v).unwrap();
    if f32_logits {
        be.matmul_forward_f32_out(&mut logits, &x, &w, m, c, v, WeightLayout::OutIn).unwrap();
    } else {
        be.matmul_forward(&mut logits, &x, &w, None, m, c, v, WeightLayout::OutIn).unwrap();
    }
    let (mut logp, mut lse, mut seq) = (be.zeros(m).unwrap(), be.zeros(m).unwrap(), be.zeros(lens.len()).unwrap());
    let ids = be.upload_ids(targets).unwrap();
    be.logsoftmax_gather_forward(&mut logp, &mut lse, &logits, &ids, m, v).unwrap();
    be.sequence_logp_sum(&mut seq, &logp, &Packing::new(be, &cu_seqlens(lens)).unwrap()).unwrap();
    be.download(&seq).unwrap()
}

/// The head alone at logits of 30–100 (rows of unit scale, weights of std 5 over 64 channels):
/// f32 logits against the f64 reference on the same stored (bf16) rows and weight, beside bf16
/// logits on the same inputs.
#[test]
fn bf16_head_with_f32_logits_is_close_to_the_f64_reference() {
    let be = emu_bf16();
    let mut r = rng(3);
    let (lens, c, v) = ([40usize, 25, 60, 1], 64, 1000);
    let m: usize = lens.iter().sum();
    let rows = rounded(&randn(&mut r, m * c, 1.0));
    let weight = rounded(&randn(&mut r, v * c, 5.0));
    let targets = rand_ids(&mut r, m, v);
    // The reference: exact logits of the stored values, log-softmax in f64.
    let logits: Vec<f64> =
        (0..m * v).map(|i| (0..c).map(|k| rows[i / v * c + k] as f64 * weight[i % v * c + k] as f64).sum()).collect();
    let typical = logits.iter().map(|x| x.abs()).sum::<f64>() / logits.len() as f64;
    let largest = logits.iter().fold(0.0f64, |a, x| a.max(x.abs()));
    assert!((25.0..50.0).contains(&typical) && (100.0..250.0).contains(&largest), "{typical} {largest}");
    let want = spec::sequence_sums(&spec::forward(&logits, &targets, v).0, &lens);

    let f32_error = max_error(&head_logps(&be, &rows, &weight, &targets, &lens, c, v, true), &want);
    let bf16_error = max_error(&head_logps(&be, &rows, &weight, &targets, &lens, c, v, false), &want);
    eprintln!("per-sequence log-prob error (nats): f32 logits {f32_error:.3e}, bf16 logits {bf16_error:.3e}");
    // f32 sums of 64 products at 1e2 and an f32 log-sum-exp: about 1e-5 a row, 1e-3 at most a sequence.
    const BOUND: f64 = 2e-3;
    assert!(f32_error < BOUND, "f32 logits: {f32_error} nats");
    assert!(bf16_error > 50.0 * BOUND, "the bf16-logits path would pass the bound ({bf16_error}): no signal");
}

/// GPT-2 with an untied head whose logits reach 30–100 the way a trained model's large logits do,
/// by alignment: every head row is `a_j·u` plus noise and the final norm's bias is `4·u` (`u` of ±1
/// entries), so each logit is mostly a sum of 96 terms of one sign. The final norm's gain is 0.1, so
/// that the trunk's own bf16 noise (these test weights are far from an initialisation: about 1 nat a
/// sequence at gain 1) reaches the logits damped and the head's rounding is what is measured. Every
/// weight rounded to bf16, for both backends.
fn large_logit_weights(cfg: &DecoderConfig) -> HostWeights {
    let mut w = test_weights(cfg, 9);
    let c = cfg.n_embd;
    let u: Vec<f32> = (0..c).map(|i| if (i * 7 + i / 3) % 2 == 0 { 1.0 } else { -1.0 }).collect();
    let a = randn(&mut rng(10), cfg.vocab_size, 0.08);
    for (name, (_, data)) in w.tensors.iter_mut() {
        if name == "lm_head.weight" {
            data.iter_mut().enumerate().for_each(|(i, x)| *x += a[i / c] * u[i % c]);
        } else if name == "ln_f.weight" {
            data.fill(0.1);
        } else if name == "ln_f.bias" {
            data.iter_mut().zip(&u).for_each(|(x, &u)| *x = 4.0 * u);
        }
        *data = rounded(data);
    }
    w
}

fn batch(seed: u64, lens: &[(usize, usize)], vocab: usize) -> PackedBatch {
    let mut r = rng(seed);
    let seqs: Vec<(Vec<i32>, usize)> = lens.iter().map(|&(len, p)| (rand_ids(&mut r, len, vocab), p)).collect();
    PackedBatch::from_sequences(seqs.iter().map(|(t, p)| (t.as_slice(), *p)))
}

#[test]
fn bf16_model_log_probs_at_large_logits_are_close_to_the_cpu() {
    let mut cfg = DecoderConfig::gpt2(301, 96, 96, 2, 2);
    cfg.tie_word_embeddings = false;
    let w = large_logit_weights(&cfg);
    let packed = batch(4, &[(90, 10), (60, 5), (40, 20)], cfg.vocab_size);
    let cpu = Arc::new(CpuBackend::new());
    let want = {
        let mut model = Decoder::from_host(cpu.clone(), &w).unwrap();
        let dev = DeviceBatch::upload(&*cpu, &packed).unwrap();
        model.forward(&dev).unwrap().clone()
    };
    let emu = emu_bf16();
    let mut model = Decoder::from_host(emu.clone(), &w).unwrap();
    let dev = DeviceBatch::upload(&*emu, &packed).unwrap();
    let got = emu.download(model.forward(&dev).unwrap()).unwrap();
    let error = max_error(&got, &to_f64(&want));
    let (got_mean, want_mean) = (got.iter().sum::<f32>() / 3.0, want.iter().sum::<f32>() / 3.0);
    eprintln!("bf16 model vs CPU f32: per-sequence log-prob error {error:.3e} nats (log-probs {got:?}, {want:?})");
    assert!(want_mean < -100.0, "the logits are not large: mean log-prob {want_mean} ({got_mean})");
    // Measured: 0.49 nats (what remains is mostly the head's input, the final norm's bf16 rows);
    // with the logits stored in bf16, 1.79 nats.
    assert!(error < 0.75, "{error} nats");
}

/// Chunked heads against the whole head on the emulated device in bf16: the log-probs bit for bit
/// (a frozen and a trainable model, chunk sizes that divide the batch's rows and some that do not);
/// the trainable model's gradients within bf16 rounding (each chunk adds its share of the weight
/// gradient, rounded to storage, in another order).
#[test]
fn bf16_chunked_head_matches_the_whole_head() {
    let be = emu_bf16();
    let cfg = DecoderConfig::gpt2(301, 64, 32, 2, 2);
    let w = test_weights(&cfg, 12);
    // 8 sequences of 8 target rows: 64 rows, divided by chunks of 16 and 32, not by 20 or 40.
    let packed = batch(5, &[(10, 2); 8], cfg.vocab_size);
    let dev = DeviceBatch::upload(&*be, &packed).unwrap();
    assert_eq!(dev.num_target_rows(), 64);
    let dseq = be.upload(&uniform(&mut rng(6), dev.num_seqs(), -1.0, 1.0)).unwrap();
    let run = |model: &mut Decoder<CudaBackend>| {
        let logps = be.download(model.forward(&dev).unwrap()).unwrap();
        model.backward(&dev, &dseq).unwrap();
        let grads: Vec<Vec<f32>> = model.grads().unwrap().into_iter().map(|g| be.download(g).unwrap()).collect();
        (logps, grads)
    };
    let mut whole = Decoder::from_host(be.clone(), &w).unwrap();
    let (want_logps, want_grads) = run(&mut whole);
    assert!(want_logps.iter().all(|&x| x < 0.0));
    let mut frozen = Decoder::from_host_frozen(be.clone(), &w).unwrap();
    for rows in [16, 20, 32, 40] {
        let label = format!("{rows}-row chunks");
        frozen.set_head_chunk_rows(rows).unwrap();
        assert_bitwise_eq(
            &format!("frozen, {label}"),
            &be.download(frozen.forward(&dev).unwrap()).unwrap(),
            &want_logps,
        );
        let mut chunked = Decoder::from_host(be.clone(), &w).unwrap();
        chunked.set_head_chunk_rows(rows).unwrap();
        let (logps, grads) = run(&mut chunked);
        assert_bitwise_eq(&format!("trainable, {label}: log-probs"), &logps, &want_logps);
        for ((name, _), (got, want)) in cfg.parameter_shapes().iter().zip(grads.iter().zip(&want_grads)) {
            // A few bf16 roundings of each entry, and of the largest where the chunks' sums cancel.
            assert_close_with_floor(&format!("{label}: d/d {name}"), got, &to_f64(want), 4.0 * BF16_ROUNDING, 1e-2);
        }
    }
}

/// The head's gradients in bf16 (the tied token embedding's and the final norm's, with the
/// trunk's below them) against the CPU's f32 model on the same bf16-rounded weights, at the bf16
/// gradient tolerance of docs/TESTING.md.
#[test]
fn bf16_head_gradients_are_within_the_bf16_tolerance() {
    let cfg = DecoderConfig::gpt2(301, 64, 32, 2, 2);
    let mut w = test_weights(&cfg, 13);
    w.tensors.values_mut().for_each(|(_, data)| *data = rounded(data));
    let packed = batch(7, &[(30, 4), (12, 3), (25, 10)], cfg.vocab_size);
    let dseq = [0.8f32, -1.1, 0.5];
    let cpu = Arc::new(CpuBackend::new());
    let want: Vec<Vec<f32>> = {
        let mut model = Decoder::from_host(cpu.clone(), &w).unwrap();
        let dev = DeviceBatch::upload(&*cpu, &packed).unwrap();
        model.forward(&dev).unwrap();
        model.backward(&dev, &dseq.to_vec()).unwrap();
        model.grads().unwrap().into_iter().cloned().collect()
    };
    let emu = emu_bf16();
    let mut model = Decoder::from_host(emu.clone(), &w).unwrap();
    let dev = DeviceBatch::upload(&*emu, &packed).unwrap();
    model.forward(&dev).unwrap();
    model.backward(&dev, &emu.upload(&dseq).unwrap()).unwrap();
    let got: Vec<Vec<f32>> = model.grads().unwrap().into_iter().map(|g| emu.download(g).unwrap()).collect();
    for ((name, _), (got, want)) in cfg.parameter_shapes().iter().zip(got.iter().zip(&want)) {
        assert!(want.iter().any(|&x| x != 0.0), "{name}: a zero gradient, no signal");
        assert_close_with_floor(&format!("bf16 d/d {name}"), got, &to_f64(want), 5e-2, 6e-2);
    }
}

/// The emulated device's peak memory over a trainable step (forward and backward, whole head) and a
/// frozen forward (chunks of 512 rows) at GPT-2's vocabulary, for docs/PERFORMANCE.md. Prints; run
/// with `--ignored --nocapture` (about a minute on the emulated device).
#[test]
#[ignore = "a measurement (docs/PERFORMANCE.md), not a check"]
fn head_peak_memory_at_gpt2_vocabulary() {
    let cfg = DecoderConfig::gpt2(50_257, 1024, 64, 1, 2);
    let w = test_weights(&cfg, 1);
    let packed = batch(8, &[(260, 4); 4], cfg.vocab_size);
    let be = emu_bf16();
    let dev = DeviceBatch::upload(&*be, &packed).unwrap();
    let m = dev.num_target_rows();
    let mb = |bytes: u64| bytes as f64 / 1e6;
    let mut model = Decoder::from_host(be.clone(), &w).unwrap();
    let dseq = be.upload(&[1.0, -1.0, 0.5, -0.5]).unwrap();
    model.forward(&dev).unwrap();
    model.backward(&dev, &dseq).unwrap();
    let before = be.memory_stats().unwrap().current_bytes;
    be.reset_peak_memory();
    model.forward(&dev).unwrap();
    let after_forward = be.memory_stats().unwrap().current_bytes;
    model.backward(&dev, &dseq).unwrap();
    let peak = be.memory_stats().unwrap().peak_bytes;
    eprintln!(
        "trainable, {m} rows x V {}: held before the step {:.1} MB, after the forward {:.1} MB, step peak {:.1} MB",
        cfg.vocab_size,
        mb(before),
        mb(after_forward),
        mb(peak)
    );
    drop(model);
    let mut frozen = Decoder::from_host_frozen(be.clone(), &w).unwrap();
    frozen.set_head_chunk_rows(512).unwrap();
    frozen.forward(&dev).unwrap();
    let before = be.memory_stats().unwrap().current_bytes;
    be.reset_peak_memory();
    frozen.forward(&dev).unwrap();
    let peak = be.memory_stats().unwrap().peak_bytes;
    eprintln!("frozen, 512-row chunks: held {:.1} MB, forward peak {:.1} MB", mb(before), mb(peak));
}
