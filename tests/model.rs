//! The GPT-2 model on the CPU backend, held to an independent naive f64 implementation written
//! here from the architecture's definition (HF `GPT2LMHeadModel` with `gelu_new`): forward values,
//! every parameter gradient against central differences of the f64 model, packing invariance,
//! determinism, buffer reuse across batch shapes, initialisation, generation logits, and the
//! end-to-end gradient through the model and every preference objective.

mod common;

use common::reference::*;
use common::*;
use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::prelude::*;
use safedpo::backend::RopeScaling;
use safedpo::backend::{PreferenceLossInputs, PAIR_METRICS};
use safedpo::loss::{batch_loss, Objective, PairInput};
use safedpo::model::{Decoder, DecoderConfig, DeviceBatch, Family, HostWeights, LayerAttention, Rope};

fn tiny_config() -> DecoderConfig {
    DecoderConfig::gpt2(37, 32, 16, 2, 2)
}

// ---- tests -------------------------------------------------------------------------------------

#[test]
fn parameter_listing_matches_hf_names_shapes_and_count() {
    let config = tiny_config();
    let mut model = Decoder::random(cpu(), config.clone(), 0).unwrap();
    let shapes = config.parameter_shapes();
    let listed: Vec<(String, usize, usize)> =
        model.params_and_grads_mut().unwrap().into_iter().map(|(n, p, g)| (n.to_string(), p.len(), g.len())).collect();
    assert_eq!(listed.len(), 4 + 12 * config.n_layer);
    for ((name, shape), (lname, plen, glen)) in shapes.iter().zip(&listed) {
        assert_eq!(name, lname);
        assert_eq!((*plen, *glen), (shape.iter().product(), shape.iter().product()), "{name}");
    }
    assert_eq!(listed[2].0, "h.0.ln_1.weight");
    assert_eq!(listed.last().unwrap().0, "ln_f.bias");
    assert_eq!(model.num_params(), listed.iter().map(|l| l.1).sum::<usize>());
    assert_eq!(model.num_params(), config.num_params());
    // GPT-2 small has 124,439,808 parameters (tied head counted once).
    assert_eq!(DecoderConfig::gpt2_124m().num_params(), 124_439_808);
}

#[test]
fn forward_matches_the_f64_reference() {
    let config = tiny_config();
    let host = test_weights(&config, 1);
    let backend = cpu();
    let mut model = Decoder::from_host(backend.clone(), &host).unwrap();
    let seqs = sequences(2, &LENS, config.vocab_size);
    let dev = DeviceBatch::upload(&*backend, &pack(&seqs)).unwrap();
    let got = backend.download(model.forward(&dev).unwrap()).unwrap();
    let (_, want) = Reference::new(&host).forward(&seqs);
    assert_eq!(want[1], 0.0, "the length-1 sequence has no target");
    assert!(want.iter().filter(|x| **x != 0.0).all(|x| x.abs() > 1.0), "log-probs of the test data are not trivial");
    assert_close("sequence log-probs", &got, &want, 1e-5, 1e-5);
}

#[test]
fn every_parameter_gradient_matches_finite_differences() {
    gradients_match_finite_differences(&tiny_config(), 3, 24, "Σ w·logp");
}

#[test]
fn packing_does_not_change_log_probs_or_gradients() {
    let config = tiny_config();
    let host = test_weights(&config, 7);
    let backend = cpu();
    let seqs = sequences(8, &[(1, 1), (7, 2), (13, 4), (4, 1), (20, 6), (2, 1)], config.vocab_size);
    let weights = uniform(&mut rng(9), seqs.len(), -1.0, 1.0);

    // Each sequence alone; gradients accumulate over the calls.
    let mut alone = Decoder::from_host(backend.clone(), &host).unwrap();
    let mut alone_logps = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        let dev = DeviceBatch::upload(&*backend, &pack(std::slice::from_ref(seq))).unwrap();
        alone_logps.push(backend.download(alone.forward(&dev).unwrap()).unwrap()[0]);
        alone.backward(&dev, &backend.upload(&[weights[s]]).unwrap()).unwrap();
    }

    let mut packed = Decoder::from_host(backend.clone(), &host).unwrap();
    let dev = DeviceBatch::upload(&*backend, &pack(&seqs)).unwrap();
    let packed_logps = backend.download(packed.forward(&dev).unwrap()).unwrap();
    packed.backward(&dev, &backend.upload(&weights).unwrap()).unwrap();

    let want: Vec<f64> = alone_logps.iter().map(|&x| x as f64).collect();
    assert_close("log-probs packed vs alone", &packed_logps, &want, 1e-5, 1e-5);
    for ((name, _), (g_packed, g_alone)) in
        config.parameter_shapes().iter().zip(download_grads(&packed).iter().zip(download_grads(&alone)))
    {
        assert_close_scaled(&format!("d/d {name} packed vs alone"), g_packed, &to_f64(&g_alone), 1e-4);
    }
}

#[test]
fn forward_and_backward_are_deterministic_and_buffers_survive_shape_changes() {
    let config = tiny_config();
    let host = test_weights(&config, 10);
    let backend = cpu();
    let big = pack(&sequences(11, &LENS, config.vocab_size));
    let small = pack(&sequences(12, &[(3, 1), (6, 2)], config.vocab_size));
    let dbig = DeviceBatch::upload(&*backend, &big).unwrap();
    let dsmall = DeviceBatch::upload(&*backend, &small).unwrap();
    let dseq_big = backend.upload(&uniform(&mut rng(13), big.num_seqs(), -1.0, 1.0)).unwrap();
    let dseq_small = backend.upload(&uniform(&mut rng(14), small.num_seqs(), -1.0, 1.0)).unwrap();

    let run = |model: &mut Decoder<CpuBackend>| -> (Vec<f32>, Vec<Vec<f32>>) {
        model.zero_grad().unwrap();
        let logps = model.forward(&dbig).unwrap().clone();
        model.backward(&dbig, &dseq_big).unwrap();
        (logps, download_grads(model))
    };
    let mut fresh = Decoder::from_host(backend.clone(), &host).unwrap();
    let first = run(&mut fresh);
    let again = run(&mut fresh);

    // The same model after batches of other shapes (smaller, then a generation call).
    let mut used = Decoder::from_host(backend.clone(), &host).unwrap();
    used.forward(&dsmall).unwrap();
    used.backward(&dsmall, &dseq_small).unwrap();
    used.last_logits(&[1, 2, 3]).unwrap();
    let after = run(&mut used);

    for (what, other) in [("repeat", &again), ("after other shapes", &after)] {
        assert_bitwise_eq(&format!("log-probs, {what}"), &first.0, &other.0);
        for ((name, _), (a, b)) in config.parameter_shapes().iter().zip(first.1.iter().zip(&other.1)) {
            assert_bitwise_eq(&format!("d/d {name}, {what}"), a, b);
        }
    }
}

#[test]
fn gradients_accumulate_until_zero_grad() {
    let config = tiny_config();
    let backend = cpu();
    let mut model = Decoder::from_host(backend.clone(), &test_weights(&config, 15)).unwrap();
    let dev = DeviceBatch::upload(&*backend, &pack(&sequences(16, &LENS, config.vocab_size))).unwrap();
    let dseq = backend.upload(&uniform(&mut rng(17), LENS.len(), -1.0, 1.0)).unwrap();
    model.forward(&dev).unwrap();
    model.backward(&dev, &dseq).unwrap();
    let once = download_grads(&model);
    model.forward(&dev).unwrap();
    model.backward(&dev, &dseq).unwrap();
    for (a, b) in once.iter().zip(download_grads(&model)) {
        let twice: Vec<f64> = a.iter().map(|&x| 2.0 * x as f64).collect();
        // Not bit-exact: a tensor fed by two ops (wte) adds its parts in another order the second time.
        assert_close_scaled("accumulated gradient", &b, &twice, 1e-5);
    }
    model.zero_grad().unwrap();
    assert!(download_grads(&model).iter().all(|g| g.iter().all(|&x| x == 0.0)));
}

#[test]
fn misuse_and_out_of_range_inputs_are_errors() {
    let config = tiny_config();
    let backend = cpu();
    let mut model = Decoder::random(backend.clone(), config.clone(), 1).unwrap();
    let message = |r: anyhow::Result<()>| format!("{:#}", r.expect_err("should fail"));

    let too_long = pack(&[Seq::split(&(0..33).map(|i| i % 37).collect::<Vec<_>>(), 1)]);
    let dev = DeviceBatch::upload(&*backend, &too_long).unwrap();
    let msg = message(model.forward(&dev).map(|_| ()));
    assert!(msg.contains("position 32") && msg.contains("n_positions"), "{msg}");
    assert!(message(model.last_logits(&[0; 33]).map(|_| ())).contains("n_positions"));
    assert!(message(model.last_logits(&[]).map(|_| ())).contains("empty"));

    let bad_token = pack(&[Seq::split(&[3, 37, 4], 1)]);
    let dev = DeviceBatch::upload(&*backend, &bad_token).unwrap();
    let msg = message(model.forward(&dev).map(|_| ()));
    assert!(msg.contains("37") && msg.contains("vocabulary"), "{msg}");

    let mut bad = pack(&[Seq::split(&[3, 4], 1)]);
    bad.tokens[0] = -2;
    assert!(DeviceBatch::<CpuBackend>::upload(&backend, &bad).is_err());

    let batch = pack(&sequences(18, &LENS, config.vocab_size));
    let dev = DeviceBatch::upload(&*backend, &batch).unwrap();
    let dseq = backend.upload(&vec![1.0; LENS.len()]).unwrap();
    assert!(message(model.backward(&dev, &dseq)).contains("forward"), "backward before any forward");
    model.forward(&dev).unwrap();
    let msg = message(model.backward(&dev, &backend.upload(&[1.0; 2]).unwrap()));
    assert!(msg.contains("2 entries") && msg.contains("5 sequences"), "{msg}");
    model.backward(&dev, &dseq).unwrap();
    assert!(message(model.backward(&dev, &dseq)).contains("forward"), "a second backward needs a new forward");
}

#[test]
fn random_init_is_deterministic_and_has_gpt2_statistics() {
    let config = DecoderConfig::gpt2(300, 64, 64, 4, 4);
    let backend = cpu();
    let a = Decoder::random(backend.clone(), config.clone(), 42).unwrap().to_host().unwrap();
    let b = Decoder::random(backend.clone(), config.clone(), 42).unwrap().to_host().unwrap();
    let c = Decoder::random(backend.clone(), config.clone(), 43).unwrap().to_host().unwrap();
    assert_eq!(a, b, "same seed, same weights");
    assert_ne!(a.tensors["wte.weight"], c.tensors["wte.weight"], "another seed, other weights");
    assert_ne!(a.tensors["wte.weight"].1[..64], a.tensors["wpe.weight"].1[..64], "tensors draw from their own streams");

    let residual_std = 0.02 / (2.0 * config.n_layer as f64).sqrt();
    for (name, (_, data)) in &a.tensors {
        let n = data.len() as f64;
        let mean = data.iter().map(|&x| x as f64).sum::<f64>() / n;
        let std = (data.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        if name.contains("ln_") && name.ends_with(".weight") {
            assert!(data.iter().all(|&x| x == 1.0), "{name}: LayerNorm gains start at 1");
        } else if name.ends_with(".bias") {
            assert!(data.iter().all(|&x| x == 0.0), "{name}: biases start at 0");
        } else {
            let want = if name.ends_with("c_proj.weight") { residual_std } else { 0.02 };
            assert!((std / want - 1.0).abs() < 0.08, "{name}: std {std}, expected {want}");
            assert!(mean.abs() < 4.0 * want / n.sqrt(), "{name}: mean {mean}");
        }
    }
}

#[test]
fn last_logits_match_the_reference_last_row() {
    let config = tiny_config();
    let host = test_weights(&config, 19);
    let mut model = Decoder::from_host(cpu(), &host).unwrap();
    let tokens = rand_ids(&mut rng(20), 9, config.vocab_size);
    let got = model.last_logits(&tokens).unwrap();
    let (logits, _) = Reference::new(&host).forward(&[Seq::split(&tokens, tokens.len())]);
    let v = config.vocab_size;
    assert_close("last logits", &got, &logits[8 * v..], 1e-5, 1e-5);
    assert_close(
        "one-token logits",
        &model.last_logits(&tokens[..1]).unwrap(),
        &{
            let (l, _) = Reference::new(&host).forward(&[Seq::split(&tokens[..1], 1)]);
            l
        },
        1e-5,
        1e-5,
    );
}

#[test]
fn save_and_load_keep_the_model_exactly() {
    let config = tiny_config();
    let backend = cpu();
    let mut model = Decoder::from_host(backend.clone(), &test_weights(&config, 21)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path()).unwrap();
    let mut loaded = Decoder::load(backend.clone(), dir.path()).unwrap();
    assert_eq!(loaded.to_host().unwrap(), model.to_host().unwrap());
    let dev = DeviceBatch::upload(&*backend, &pack(&sequences(22, &LENS, config.vocab_size))).unwrap();
    let a = model.forward(&dev).unwrap().clone();
    let b = loaded.forward(&dev).unwrap().clone();
    assert_bitwise_eq("log-probs after reload", &a, &b);
}

/// Model + `preference_loss` end to end: the gradient the backend's loss feeds into the backward
/// equals central differences of the batch loss (`batch_loss`) through the f64 model, for every objective.
#[test]
fn end_to_end_gradient_through_every_objective() {
    let config = tiny_config();
    let backend = cpu();
    let policy_host = test_weights(&config, 23);
    let reference_host = test_weights(&config, 24);
    // Three pairs sharing prompts: (chosen, rejected) with safety flags covering SafeDPO's cases.
    let mut r = rng(25);
    let mut seqs = Vec::new();
    let flags: Vec<i32> = vec![0, 1, 0, 0, 1, 0];
    for (prompt_len, chosen_len, rejected_len) in [(3, 4, 6), (1, 2, 1), (5, 7, 3)] {
        let prompt = rand_ids(&mut r, prompt_len, config.vocab_size);
        for len in [chosen_len, rejected_len] {
            seqs.push(Seq { prompt: prompt.clone(), response: rand_ids(&mut r, len, config.vocab_size) });
        }
    }
    // The loss's length normalisation counts response tokens, as the trainer's batches do.
    let lengths: Vec<i32> = seqs.iter().map(|s| s.response.len() as i32).collect();
    let num_pairs = seqs.len() / 2;
    let dev = DeviceBatch::upload(&*backend, &pack(&seqs)).unwrap();

    let mut reference_model = Decoder::from_host(backend.clone(), &reference_host).unwrap();
    let ref_logps = reference_model.forward(&dev).unwrap().clone();
    let (flags_dev, lengths_dev) = (backend.upload_ids(&flags).unwrap(), backend.upload_ids(&lengths).unwrap());

    for (k, name) in Objective::NAMES.iter().enumerate() {
        let objective = Objective::default_for(name).unwrap();
        let mut model = Decoder::from_host(backend.clone(), &policy_host).unwrap();
        let policy = model.forward(&dev).unwrap().clone();
        let mut metrics = backend.zeros(num_pairs * PAIR_METRICS).unwrap();
        let mut dpolicy = backend.zeros(2 * num_pairs).unwrap();
        backend
            .preference_loss(
                &mut metrics,
                &mut dpolicy,
                &PreferenceLossInputs::pairs(&policy, &ref_logps, &flags_dev, &lengths_dev, &objective),
            )
            .unwrap();
        model.backward(&dev, &dpolicy).unwrap();

        let pair_inputs = |seq: &[f64]| -> Vec<PairInput> {
            (0..num_pairs)
                .map(|i| PairInput {
                    policy_chosen: seq[2 * i],
                    policy_rejected: seq[2 * i + 1],
                    ref_chosen: ref_logps[2 * i] as f64,
                    ref_rejected: ref_logps[2 * i + 1] as f64,
                    chosen_unsafe: flags[2 * i] == 1,
                    rejected_unsafe: flags[2 * i + 1] == 1,
                    chosen_len: lengths[2 * i] as u32,
                    rejected_len: lengths[2 * i + 1] as u32,
                })
                .collect()
        };
        // The batch's loss (AOT sorts across the batch; every other objective is pair by pair).
        let total_loss = |seq: &[f64]| batch_loss(&objective, &pair_inputs(seq)).iter().map(|o| o.loss).sum::<f64>();

        let mut reference = Reference::new(&policy_host);
        let (_, policy_f64) = reference.forward(&seqs);
        let want_losses: Vec<f64> = batch_loss(&objective, &pair_inputs(&policy_f64)).iter().map(|o| o.loss).collect();
        let got_losses: Vec<f32> = (0..num_pairs).map(|i| metrics[i * PAIR_METRICS]).collect();
        assert_close(&format!("{name}: pair losses"), &got_losses, &want_losses, 1e-4, 1e-5);
        check_all_gradients(&model, &mut reference, &seqs, &total_loss, 6, 100 + k as u64, name);
    }
}

/// The same model in Hugging Face `transformers` (f64, eager attention): the saved directory loads
/// as the family's causal LM (`AutoModelForCausalLM`), and log-probs and every gradient agree. The
/// script gets the raw prompt and response tokens and picks the response rows itself. Needs a
/// Python with torch and transformers (`$PYTHON`, else `python3`), hence ignored by default:
/// `PYTHON=/path/to/venv/bin/python cargo test --release --test model -- --ignored`.
/// (tests/golden.rs holds the engine to committed `transformers` results without Python.)
fn matches_transformers(config: DecoderConfig, seed: u64) {
    const SCRIPT: &str = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM
d = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64, attn_implementation="eager")
model.eval()
batch = json.load(open(d + "/batch.json"))
total, logps = 0.0, []
for seq, w in zip(batch["seqs"], batch["weights"]):
    prompt, response = seq["prompt"], seq["response"]
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
    lp = torch.log_softmax(logits, -1)
    rows = list(range(len(prompt) - 1, len(prompt) + len(response) - 1))
    s = lp[rows, response].sum()
    logps.append(s.item())
    total = total + w * s
total.backward()
grads = {n: p.grad.flatten().tolist() for n, p in model.named_parameters()}
json.dump({"logps": logps, "grads": grads}, open(d + "/out.json", "w"))
model.to(torch.float32).save_pretrained(d + "/hf_f32")
model.to(torch.bfloat16).save_pretrained(d + "/hf_bf16")
"#;
    let host = test_weights(&config, seed);
    let backend = cpu();
    let mut model = Decoder::from_host(backend.clone(), &host).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path()).unwrap();

    let seqs = sequences(seed + 1, &LENS, config.vocab_size);
    let batch = pack(&seqs);
    let weights = uniform(&mut rng(seed + 2), seqs.len(), -1.0, 1.0);
    let json_seqs: Vec<serde_json::Value> =
        seqs.iter().map(|s| serde_json::json!({"prompt": &s.prompt, "response": &s.response})).collect();
    let batch_json = serde_json::json!({"seqs": json_seqs, "weights": weights});
    std::fs::write(dir.path().join("batch.json"), batch_json.to_string()).unwrap();
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let status = std::process::Command::new(&python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(dir.path())
        .status()
        .unwrap_or_else(|e| panic!("running {python}: {e}"));
    assert!(status.success(), "the transformers script failed ({python})");
    let out: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out.json")).unwrap()).unwrap();
    let floats =
        |v: &serde_json::Value| -> Vec<f64> { v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect() };

    let dev = DeviceBatch::upload(&*backend, &batch).unwrap();
    let logps = model.forward(&dev).unwrap().clone();
    assert_close("log-probs vs transformers", &logps, &floats(&out["logps"]), 1e-5, 1e-5);
    model.backward(&dev, &backend.upload(&weights).unwrap()).unwrap();
    // The gradients in HF's names and tensors (the fused projections split back).
    let grads = HostWeights {
        config: config.clone(),
        tensors: config
            .parameter_shapes()
            .into_iter()
            .zip(download_grads(&model))
            .map(|((n, s), g)| (n, (s, g)))
            .collect(),
    };
    let hf_grads = out["grads"].as_object().unwrap();
    let ours = grads.hf_tensors();
    assert_eq!(hf_grads.len(), ours.len(), "transformers sees the same parameters (a tied head once)");
    for (name, _, grad) in ours {
        assert_close_scaled(&format!("d/d {name} vs transformers"), grad, &floats(&hf_grads[&name]), 1e-4);
    }

    // What `save_pretrained` writes reads back: exactly in f32, rounded to bf16 in bf16.
    let mut hf_f32 = safedpo::model::checkpoint::load_dir(&dir.path().join("hf_f32")).unwrap();
    hf_f32.config.hf_extra = host.config.hf_extra.clone(); // token ids, versions: not the model
    assert_eq!(hf_f32, host);
    let hf_bf16 = safedpo::model::checkpoint::load_dir(&dir.path().join("hf_bf16")).unwrap();
    for (name, (_, data)) in &host.tensors {
        let rounded: Vec<f32> = data.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        assert_eq!(hf_bf16.tensors[name].1, rounded, "{name} read from a bf16 save_pretrained");
    }
}

#[test]
#[ignore = "needs a Python with torch and transformers ($PYTHON or python3)"]
fn matches_transformers_gpt2lmheadmodel() {
    matches_transformers(tiny_config(), 26);
}

/// Llama with GQA, llama3 RoPE and an untied head; Qwen2 with q/k/v biases, a tied head and
/// linear RoPE; Mistral with one key/value head; Mistral with a sliding window shorter than the
/// sequences, and Qwen2 with it in its second layer only.
#[test]
#[ignore = "needs a Python with torch and transformers ($PYTHON or python3)"]
fn matches_transformers_llama_family() {
    let mut llama = DecoderConfig::llama(41, 32, 24, 2, 4, 2, 40);
    llama.rope = Some(Rope {
        theta: 5e5,
        scaling: RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8.0,
        },
    });
    matches_transformers(llama, 30);
    let qwen2 = DecoderConfig {
        family: Family::Qwen2,
        qkv_bias: true,
        tie_word_embeddings: true,
        rope: Some(Rope { theta: 1e4, scaling: RopeScaling::Linear { factor: 2.0 } }),
        ..DecoderConfig::llama(37, 32, 16, 2, 4, 2, 24)
    };
    matches_transformers(qwen2, 31);
    let mistral = DecoderConfig {
        family: Family::Mistral,
        sliding_window: Some(32),
        ..DecoderConfig::llama(29, 32, 16, 1, 4, 1, 24)
    };
    matches_transformers(mistral, 32);
    let mistral = DecoderConfig { sliding_window: Some(4), ..DecoderConfig::llama(29, 32, 16, 2, 4, 2, 24) };
    matches_transformers(DecoderConfig { family: Family::Mistral, ..mistral }, 33);
    let qwen2 = DecoderConfig {
        family: Family::Qwen2,
        qkv_bias: true,
        sliding_window: Some(3),
        layer_types: Some(vec![LayerAttention::Full, LayerAttention::Sliding]),
        ..DecoderConfig::llama(37, 32, 16, 2, 4, 2, 24)
    };
    matches_transformers(qwen2, 34);
}
