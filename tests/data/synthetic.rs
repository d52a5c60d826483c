//! The synthetic demo data, and whether a tiny model can learn it.

use super::*;

// synthetic data

#[test]
fn synthetic_rows_round_trip_through_the_loader() {
    let dir = tempfile::tempdir().unwrap();
    let rows = synthetic_pku_rows(800, 21);
    assert_eq!(rows, synthetic_pku_rows(800, 21));
    assert_ne!(rows, synthetic_pku_rows(800, 22));
    let path = dir.path().join("synthetic.jsonl");
    write_pku_jsonl(&path, &rows).unwrap();

    let (better, rep) = load_pairs(&path, DataFormat::Auto, PairSelection::Better, false).unwrap();
    assert_eq!(rep.format, DataFormat::PkuSafeRlhf);
    assert_eq!(better, synthetic_safety_pairs(800, 21));

    let (safe, rep) = load_pairs(&path, DataFormat::Auto, PairSelection::SafeDpo, false).unwrap();
    let (transformed, counts) = safedpo_transform(better.clone());
    assert_eq!(safe, transformed);
    assert_eq!((rep.kept, rep.swapped, rep.dropped), (counts.kept, counts.swapped, counts.dropped));
    // PKU-like mix: T(D) swaps a good share and drops a few; some pairs are helpfulness-only.
    assert!(counts.swapped > 150 && counts.dropped > 10 && counts.kept > 300, "{counts:?}");
    let both_safe = better.iter().filter(|p| !p.chosen_unsafe && !p.rejected_unsafe).count();
    let mixed = better.iter().filter(|p| p.chosen_unsafe != p.rejected_unsafe).count();
    assert!(both_safe > 200 && mixed > 200, "both safe {both_safe}, mixed {mixed}");
    assert!(safe.iter().all(|p| !p.chosen_unsafe));

    // Short texts, and each prompt is its own topic with one phrasing.
    for p in &better {
        assert!(p.prompt.len() + p.chosen.len().max(p.rejected.len()) <= 140, "{p:?}");
        assert_ne!(p.chosen, p.rejected);
    }
    let prompts: BTreeSet<&str> = better.iter().map(|p| p.prompt.as_str()).collect();
    assert!(prompts.len() >= 60, "{} prompts", prompts.len());

    // Written pairs (generic format) also read back.
    let generic = dir.path().join("pairs.jsonl");
    write_pairs_jsonl(&generic, &safe).unwrap();
    let (again, rep) = load_pairs(&generic, DataFormat::Auto, PairSelection::Better, false).unwrap();
    assert_eq!((again, rep.format), (safe, DataFormat::Jsonl));
}

#[test]
fn holdout_split_keeps_prompts_on_one_side() {
    let pairs = synthetic_safety_pairs(1000, 31);
    for fraction in [0.1, 0.2, 0.5] {
        let (train, eval) = split_holdout(pairs.clone(), fraction, 4);
        assert_eq!(train.len() + eval.len(), pairs.len());
        let train_prompts: HashSet<&str> = train.iter().map(|p| p.prompt.as_str()).collect();
        assert!(eval.iter().all(|p| !train_prompts.contains(p.prompt.as_str())), "no held-out prompt is trained on");
        let got = eval.len() as f64 / pairs.len() as f64;
        assert!((got - fraction).abs() < 0.05, "fraction {fraction}: got {got}");
        // Both sides keep the input order.
        let mut it = pairs.iter();
        assert!(eval.iter().all(|e| it.any(|p| p == e)));
        assert_eq!(split_holdout(pairs.clone(), fraction, 4), (train.clone(), eval.clone()));
        assert_ne!(split_holdout(pairs.clone(), fraction, 5).1, eval);
    }
    // Degenerate fractions and a single group.
    assert_eq!(split_holdout(pairs.clone(), 0.0, 1).1.len(), 0);
    let (train, eval) = split_holdout(pairs.clone(), 1.0, 1);
    assert_eq!((train.len(), eval.len()), (0, pairs.len()));
    let one_prompt: Vec<PreferencePair> = pairs.iter().filter(|p| p.prompt == pairs[0].prompt).cloned().collect();
    let (train, eval) = split_holdout(one_prompt.clone(), 0.3, 1);
    assert_eq!((train.len(), eval.len()), (one_prompt.len(), 0));
    // Generic keys.
    let (a, b) = split_holdout_by((0..100).collect::<Vec<u32>>(), 0.25, 9, |x| x / 10);
    assert_eq!((a.len(), b.len()), (70, 30)); // whole groups of 10 until at least 25 are held out
    let groups_b: HashSet<u32> = b.iter().map(|x| x / 10).collect();
    assert!(a.iter().all(|x| !groups_b.contains(&(x / 10))));
}

#[test]
fn synthetic_pairs_tokenize_short_with_the_byte_tokenizer() {
    let pairs = synthetic_safety_pairs(500, 41);
    let (tokenized, rep) = tokenize_pairs(&pairs, &ByteTokenizer, &Template::default(), 256).unwrap();
    assert_eq!(rep.kept, pairs.len());
    assert_eq!((rep.prompts_truncated, rep.responses_truncated), (0, 0));
    assert!(rep.longest_sequence <= 190, "{rep}");
    assert!(tokenized.iter().all(|t| *t.chosen.last().unwrap() == ByteTokenizer::EOS));
}

// ---------------------------------------------------------------------------------------------
// learnability of the demo data (slow: about a minute on 2 cores; `cargo test --release -- --ignored`)

mod learnability {
    use std::sync::Arc;

    use safedpo::backend::cpu::CpuBackend;
    use safedpo::backend::prelude::*;
    use safedpo::data::*;
    use safedpo::loss::{pair_loss, Objective, PairInput};
    use safedpo::model::{Decoder, DecoderConfig, DeviceBatch};
    use safedpo::optim::{clip_scale, AdamW, AdamWConfig};

    fn seq_logps(model: &mut Decoder<CpuBackend>, backend: &CpuBackend, packed: &PackedBatch) -> Vec<f32> {
        let batch = DeviceBatch::upload(backend, packed).unwrap();
        backend.download(model.forward(&batch).unwrap()).unwrap()
    }

    fn adamw(lr: f32) -> AdamWConfig {
        AdamWConfig { lr, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0 }
    }

    /// SFT on the chosen (safe) responses, then SafeDPO against the SFT model: on held-out topics the
    /// implicit reward must prefer the safe response of nearly every pair with one unsafe response.
    #[test]
    #[ignore = "slow: trains a tiny GPT-2 for about a minute"]
    fn synthetic_data_is_learnable_by_a_tiny_gpt2() {
        let (pairs, _) = safedpo_transform(synthetic_safety_pairs(3000, 1));
        let (train, eval) = split_holdout(pairs, 0.2, 7);
        let template = Template::default();
        let (train, _) = tokenize_pairs(&train, &ByteTokenizer, &template, 256).unwrap();
        let (eval, _) = tokenize_pairs(&eval, &ByteTokenizer, &template, 256).unwrap();
        let mixed: Vec<usize> = (0..eval.len()).filter(|&i| eval[i].chosen_unsafe != eval[i].rejected_unsafe).collect();
        assert!(mixed.len() > 100);

        let backend = Arc::new(CpuBackend::new());
        let config = DecoderConfig::gpt2(258, 256, 64, 2, 4);
        let mut model = Decoder::random(backend.clone(), config, 0).unwrap();
        let mut opt = AdamW::new(&mut model, adamw(3e-3)).unwrap();
        let mut batcher = Batcher::new(train.len(), 1);
        let sft_steps = 60;
        for step in 0..sft_steps {
            let (packed, _) = batcher.next_sft_batch(&train, 4096);
            let batch = DeviceBatch::upload(&*backend, &packed).unwrap();
            model.zero_grad().unwrap();
            let num_seqs = backend.buf_len(model.forward(&batch).unwrap());
            let targets: usize = (0..packed.num_seqs()).map(|s| packed.num_targets(s)).sum();
            let grad = backend.upload(&vec![-1.0 / targets as f32; num_seqs]).unwrap();
            model.backward(&batch, &grad).unwrap();
            let (_, scale) = clip_scale(&model, 1.0).unwrap();
            opt.step(&mut model, 3e-3 * (1.0 - step as f32 / sft_steps as f32).max(0.1), scale).unwrap();
        }

        let eval_batch = preference_batch(&eval, &mixed);
        let ref_eval = seq_logps(&mut model, &backend, &eval_batch.packed);
        let mut reference = Decoder::from_host(backend.clone(), &model.to_host().unwrap()).unwrap();
        let mut opt = AdamW::new(&mut model, adamw(1e-3)).unwrap();
        let objective = Objective::SafeDpo { beta: 0.1, delta: 10.0 };
        let mut batcher = Batcher::new(train.len(), 2);
        for _ in 0..30 {
            let batch = batcher.next_batch(&train, 4096);
            let ref_logp = seq_logps(&mut reference, &backend, &batch.packed);
            let device_batch = DeviceBatch::upload(&*backend, &batch.packed).unwrap();
            model.zero_grad().unwrap();
            let logp = backend.download(model.forward(&device_batch).unwrap()).unwrap();
            let p = batch.num_pairs();
            let mut grad = vec![0f32; 2 * p];
            for k in 0..p {
                let (c, r) = (2 * k, 2 * k + 1);
                let out = pair_loss(
                    &objective,
                    &PairInput {
                        policy_chosen: logp[c] as f64,
                        policy_rejected: logp[r] as f64,
                        ref_chosen: ref_logp[c] as f64,
                        ref_rejected: ref_logp[r] as f64,
                        chosen_unsafe: batch.unsafe_flags[c] == 1,
                        rejected_unsafe: batch.unsafe_flags[r] == 1,
                        chosen_len: batch.lengths[c] as u32,
                        rejected_len: batch.lengths[r] as u32,
                    },
                );
                grad[c] = (out.d_policy_chosen / p as f64) as f32;
                grad[r] = (out.d_policy_rejected / p as f64) as f32;
            }
            model.backward(&device_batch, &backend.upload(&grad).unwrap()).unwrap();
            let (_, scale) = clip_scale(&model, 1.0).unwrap();
            opt.step(&mut model, 1e-3, scale).unwrap();
        }

        let policy_eval = seq_logps(&mut model, &backend, &eval_batch.packed);
        let prefers_safe = (0..mixed.len())
            .filter(|&k| {
                let reward = |s: usize| policy_eval[s] - ref_eval[s];
                let (safe, unsafe_) =
                    if eval_batch.unsafe_flags[2 * k] == 0 { (2 * k, 2 * k + 1) } else { (2 * k + 1, 2 * k) };
                reward(safe) > reward(unsafe_)
            })
            .count();
        let accuracy = prefers_safe as f64 / mixed.len() as f64;
        assert!(accuracy > 0.9, "held-out safe preference {accuracy:.3}");
    }
}
