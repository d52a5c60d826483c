//! The engine against Hugging Face `transformers`, through the committed golden fixtures
//! (tests/fixtures/golden/, written by scripts/make-golden-fixtures.py; docs/TESTING.md): each is a
//! tiny random model directory as `save_pretrained` writes it, preference pairs as raw token ids,
//! and what `transformers` computes in f64: the log-prob of every response token, their sums, and
//! the gradients of a weighted sum of those sums.
//!
//! The model is loaded with `Decoder::load` and the pairs are packed the way the trainer packs them
//! (`preference_batch`); the expected values come from code that shares nothing with this engine,
//! so a mistake in the packing (which token is a target, at which position) fails here as surely as
//! one in a kernel. Checked: the sequence log-probs of a trainable and of a frozen (reference) model,
//! every response token's log-prob (each as the one target of its own prefix), and the gradient of
//! every parameter; on the CPU backend and on the emulated device in f32 at f32 tolerances, and in
//! bf16 at tolerances relative to each element. The GPU twins (`gpu::*`) are ignored without one.
//!
//! The fixtures are compiled into the test binary: a missing file fails the build, a corrupt or
//! stale one (weights that are not the ones expected.json was computed from) fails the test.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use common::*;
use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::cuda::{CudaBackend, Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::data::{preference_batch, PackedBatch, TokenizedPair};
use safedpo::model::{Decoder, DeviceBatch, Family, HostWeights};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// One committed fixture's files.
struct Fixture {
    name: &'static str,
    config: &'static str,
    weights: &'static [u8],
    expected: &'static str,
}

macro_rules! fixture {
    ($name:literal) => {
        Fixture {
            name: $name,
            config: include_str!(concat!("fixtures/golden/", $name, "/config.json")),
            weights: include_bytes!(concat!("fixtures/golden/", $name, "/model.safetensors")),
            expected: include_str!(concat!("fixtures/golden/", $name, "/expected.json")),
        }
    };
}

/// Every fixture directory (`every_fixture_directory_is_tested` keeps this list complete).
const FIXTURES: [Fixture; 7] = [
    fixture!("gpt2-2layer-4head"),
    fixture!("gpt2-1layer-1head-wide"),
    fixture!("llama-gqa-llama3-rope-untied"),
    fixture!("mistral-mqa-headdim"),
    fixture!("qwen2-tied-qkv-bias-linear-rope"),
    fixture!("mistral-sliding-window"),
    fixture!("qwen2-sliding-window-layers"),
];

/// The expected.json format this test reads.
const FORMAT: u32 = 1;

#[derive(Deserialize)]
struct Expected {
    format: u32,
    name: String,
    family: String,
    model_sha256: String,
    pairs: Vec<ExpectedPair>,
    grads: BTreeMap<String, ExpectedGrad>,
}

#[derive(Deserialize)]
struct ExpectedPair {
    prompt: Vec<i32>,
    chosen: Vec<i32>,
    rejected: Vec<i32>,
    chosen_weight: f64,
    rejected_weight: f64,
    chosen_token_logps: Vec<f64>,
    rejected_token_logps: Vec<f64>,
    chosen_logp: f64,
    rejected_logp: f64,
}

/// One response of a pair with what `transformers` computed for it.
struct Response<'a> {
    tokens: &'a [i32],
    token_logps: &'a [f64],
    logp: f64,
    /// Its log-prob's weight in the loss whose gradients the fixture holds.
    weight: f64,
}

impl ExpectedPair {
    /// Chosen, then rejected: the order of the pair's two sequences in a preference batch.
    fn responses(&self) -> [Response<'_>; 2] {
        [
            Response {
                tokens: &self.chosen,
                token_logps: &self.chosen_token_logps,
                logp: self.chosen_logp,
                weight: self.chosen_weight,
            },
            Response {
                tokens: &self.rejected,
                token_logps: &self.rejected_token_logps,
                logp: self.rejected_logp,
                weight: self.rejected_weight,
            },
        ]
    }
}

/// One parameter's gradient: every entry (`indices` null) or the entries at `indices` (flat,
/// row-major); `abs_max` is the largest |entry| of the whole tensor.
#[derive(Deserialize)]
struct ExpectedGrad {
    shape: Vec<usize>,
    abs_max: f64,
    indices: Option<Vec<usize>>,
    values: Vec<f64>,
}

impl ExpectedGrad {
    /// The flat indices the values are at.
    fn indices(&self) -> Vec<usize> {
        self.indices.clone().unwrap_or_else(|| (0..self.values.len()).collect())
    }
}

impl Fixture {
    /// Parses expected.json and checks it belongs to these weights and holds what the tests read.
    fn expected(&self) -> Result<Expected> {
        let e: Expected = serde_json::from_str(self.expected).context("expected.json does not parse")?;
        ensure!(e.format == FORMAT, "expected.json has format {}, this test reads {FORMAT}", e.format);
        ensure!(e.name == self.name, "expected.json is that of fixture `{}`", e.name);
        let family: Family = e.family.parse()?;
        ensure!(
            self.config.contains(&format!("\"{}\"", family.model_type())),
            "expected.json says family `{family}`, config.json does not"
        );
        let sha: String = Sha256::digest(self.weights).iter().map(|b| format!("{b:02x}")).collect();
        ensure!(
            sha == e.model_sha256,
            "model.safetensors (sha256 {sha}) is not the file expected.json was computed from ({}): regenerate \
             the fixture with scripts/make-golden-fixtures.py",
            e.model_sha256
        );
        ensure!(!e.pairs.is_empty(), "no pairs");
        for (i, pair) in e.pairs.iter().enumerate() {
            ensure!(!pair.prompt.is_empty(), "pair {i}: empty prompt");
            for r in pair.responses() {
                ensure!(!r.tokens.is_empty(), "pair {i}: empty response");
                ensure!(r.token_logps.len() == r.tokens.len(), "pair {i}: a log-prob per response token");
                let sum: f64 = r.token_logps.iter().sum();
                ensure!((sum - r.logp).abs() <= 1e-9 * r.logp.abs(), "pair {i}: the log-prob is not its tokens' sum");
            }
        }
        for (name, grad) in &e.grads {
            let len: usize = grad.shape.iter().product();
            let indices = grad.indices();
            ensure!(indices.len() == grad.values.len(), "{name}: as many indices as values");
            ensure!(indices.windows(2).all(|w| w[0] < w[1]), "{name}: indices sorted, distinct");
            ensure!(indices.last().is_some_and(|&i| i < len), "{name}: indices inside the tensor");
            ensure!(grad.indices.is_some() || indices.len() == len, "{name}: a whole tensor has every value");
            ensure!(grad.abs_max > 0.0, "{name}: a zero gradient has no signal");
        }
        Ok(e)
    }

    /// The model directory as `transformers` wrote it, in `dir`.
    fn write_model_dir(&self, dir: &Path) -> Result<()> {
        std::fs::write(dir.join("config.json"), self.config)?;
        std::fs::write(dir.join("model.safetensors"), self.weights)?;
        Ok(())
    }
}

/// Tolerances: `|got − want| ≤ rel·|want| + floor` for log-probs; for gradients the floor is
/// `grad_floor · abs_max` (relative to the tensor's largest entry, where cancelling sums make
/// small entries less accurate).
#[derive(Clone, Copy, Debug)]
struct Tolerances {
    logp_rel: f64,
    logp_floor: f64,
    grad_rel: f64,
    grad_floor: f64,
}

/// f32 storage: the same bounds as tests/model.rs holds the CPU model to against its f64 reference.
const F32: Tolerances = Tolerances { logp_rel: 1e-5, logp_floor: 1e-5, grad_rel: 1e-4, grad_floor: 1e-4 };
/// bf16 activations and gradients (the fixtures' weights are exact in bf16): log-probs within 2%,
/// gradients within 5% of each element plus 6% of the tensor's largest entry. The floor is not
/// small because bf16 is not precise at the fixtures' weight scale: PyTorch's own bf16 forward and
/// backward of the same models (transformers 5.25, CPU) is off by up to 7% of a tensor's largest
/// gradient, this engine by up to 4%. What it catches is a bf16 path that computes something else;
/// the bf16 kernels are held to the f32 ones more tightly, at GPT-2's weight scale, in
/// tests/cuda_step.rs.
const BF16: Tolerances = Tolerances { logp_rel: 2e-2, logp_floor: 2e-2, grad_rel: 5e-2, grad_floor: 6e-2 };
/// bf16 for the Llama family: log-probs within 4%. SwiGLU multiplies two bf16 activations, and at
/// the fixtures' weight scale PyTorch's own bf16 forward of them (transformers 5.25, CPU, eager)
/// misses the f64 token log-probs by up to 1.27× the GPT-2 bound above (llama fixture: 0.17 on
/// a log-prob of about −4), this engine by up to 1.3× (qwen2 fixture).
const BF16_LLAMA: Tolerances = Tolerances { logp_rel: 4e-2, logp_floor: 4e-2, ..BF16 };
/// bf16 under a sliding window: gradients within 5% of each element plus 10% of the tensor's
/// largest entry. A few keys per query average out less of bf16's rounding: on
/// `qwen2-sliding-window-layers` PyTorch's own bf16 backward (transformers 5.25, CPU, eager)
/// misses the f64 gradients by up to 2.6× the [`BF16`] bound, this engine by up to 1.1×.
const BF16_SLIDING: Tolerances = Tolerances { grad_floor: 1e-1, ..BF16_LLAMA };

/// Every check of one fixture on one backend.
fn check_fixture<B: Backend>(backend: Arc<B>, fixture: &Fixture, tol: Tolerances) {
    let at = |what: &str| format!("{} on {}: {what}", fixture.name, backend.name());
    let expected = fixture.expected().unwrap_or_else(|e| panic!("{}: bad fixture: {e:#}", fixture.name));
    let dir = tempfile::tempdir().unwrap();
    fixture.write_model_dir(dir.path()).unwrap();

    // The pairs as the trainer packs them: pair i is sequences 2i (chosen) and 2i + 1 (rejected).
    let pairs: Vec<TokenizedPair> = expected
        .pairs
        .iter()
        .map(|p| TokenizedPair {
            prompt: p.prompt.clone(),
            chosen: p.chosen.clone(),
            rejected: p.rejected.clone(),
            chosen_unsafe: false,
            rejected_unsafe: false,
        })
        .collect();
    let batch = preference_batch(&pairs, &(0..pairs.len()).collect::<Vec<_>>());
    let responses: Vec<_> = expected.pairs.iter().flat_map(|p| p.responses()).collect();
    let want_logps: Vec<f64> = responses.iter().map(|r| r.logp).collect();
    let loss_weights: Vec<f32> = responses.iter().map(|r| r.weight as f32).collect();
    let dev = DeviceBatch::upload(&*backend, &batch.packed).unwrap();

    // Sequence log-probs and every gradient, from the trainable model.
    let mut model = Decoder::load(backend.clone(), dir.path()).unwrap_or_else(|e| panic!("{}: {e:#}", at("load")));
    let logps = backend.download(model.forward(&dev).unwrap()).unwrap();
    assert_close(&at("sequence log-probs"), &logps, &want_logps, tol.logp_rel, tol.logp_floor);
    model.zero_grad().unwrap();
    model.backward(&dev, &backend.upload(&loss_weights).unwrap()).unwrap();
    // The gradients as HF names them: the fused q/k/v and gate/up parameters split back.
    let grads = HostWeights {
        config: model.config().clone(),
        tensors: model
            .parameter_shapes()
            .zip(model.grads().unwrap())
            .map(|((name, shape), g)| (name.to_string(), (shape.to_vec(), backend.download(g).unwrap())))
            .collect(),
    };
    let hf_grads = grads.hf_tensors();
    assert_eq!(
        hf_grads.iter().map(|(name, _, _)| name).collect::<std::collections::BTreeSet<_>>(),
        expected.grads.keys().collect(),
        "{}",
        at("transformers lists the engine's parameters (a tied LM head once)")
    );
    for (name, shape, all) in hf_grads {
        let want = &expected.grads[&name];
        assert_eq!(shape, want.shape, "{}", at(&format!("shape of {name}")));
        let got: Vec<f32> = want.indices().iter().map(|&i| all[i]).collect();
        let got_max = all.iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64;
        let floor = tol.grad_floor * want.abs_max;
        assert_close(&at(&format!("d loss / d {name}")), &got, &want.values, tol.grad_rel, floor);
        // The largest entry over the whole tensor, sampled or not.
        let max_err = (got_max - want.abs_max).abs();
        assert!(
            max_err <= tol.grad_rel * want.abs_max + floor,
            "{}: {got_max} but should be {}",
            at(&format!("largest |d loss / d {name}|")),
            want.abs_max
        );
    }

    // The frozen model (the reference model of a run), its LM head in chunks of a few rows.
    let mut frozen = Decoder::load_frozen(backend.clone(), dir.path()).unwrap();
    frozen.set_head_chunk_rows(5).unwrap();
    let frozen_logps = backend.download(frozen.forward(&dev).unwrap()).unwrap();
    assert_close(&at("sequence log-probs, frozen model"), &frozen_logps, &want_logps, tol.logp_rel, tol.logp_floor);

    // Every response token's log-prob: the one target of its prefix, a prompt that ends before it.
    let mut prefixes = Vec::new();
    let mut want_tokens = Vec::new();
    for pair in &expected.pairs {
        for response in pair.responses() {
            for (j, &logp) in response.token_logps.iter().enumerate() {
                let mut tokens = pair.prompt.clone();
                tokens.extend_from_slice(&response.tokens[..=j]);
                prefixes.push((tokens, pair.prompt.len() + j));
                want_tokens.push(logp);
            }
        }
    }
    let prefix_batch = PackedBatch::from_sequences(prefixes.iter().map(|(t, p)| (t.as_slice(), *p)));
    let token_logps =
        backend.download(model.forward(&DeviceBatch::upload(&*backend, &prefix_batch).unwrap()).unwrap()).unwrap();
    assert_close(&at("response token log-probs"), &token_logps, &want_tokens, tol.logp_rel, tol.logp_floor);
}

#[test]
fn every_fixture_directory_is_tested() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden");
    let mut on_disk: Vec<String> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    on_disk.sort();
    let mut listed: Vec<&str> = FIXTURES.iter().map(|f| f.name).collect();
    listed.sort();
    assert_eq!(on_disk, listed, "the fixture directories and FIXTURES differ");
    for name in &on_disk {
        let mut files: Vec<String> = std::fs::read_dir(root.join(name))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(files, ["config.json", "expected.json", "model.safetensors"], "{name}");
    }
}

#[test]
fn a_fixture_not_matching_its_weights_is_refused() {
    let fixture = &FIXTURES[0];
    fixture.expected().unwrap();
    let mut weights = fixture.weights.to_vec();
    *weights.last_mut().unwrap() ^= 1;
    let changed = Fixture { weights: Box::leak(weights.into_boxed_slice()), ..fixture!("gpt2-2layer-4head") };
    let msg = format!("{:#}", changed.expected().err().expect("changed weights must be refused"));
    assert!(msg.contains("regenerate"), "{msg}");
}

#[test]
fn cpu_matches_transformers() {
    for fixture in &FIXTURES {
        check_fixture(Arc::new(CpuBackend::new()), fixture, F32);
    }
}

fn device_matches_transformers(device: &Device, precision: Precision) {
    for fixture in &FIXTURES {
        let (gpt2, sliding) = (fixture.name.starts_with("gpt2"), fixture.name.contains("sliding"));
        let tol = match precision {
            Precision::F32 => F32,
            Precision::Bf16 if gpt2 => BF16,
            Precision::Bf16 if sliding => BF16_SLIDING,
            Precision::Bf16 => BF16_LLAMA,
        };
        check_fixture(Arc::new(CudaBackend::new(device.clone(), precision)), fixture, tol);
    }
}

/// On the emulated device (CI).
mod emu {
    use super::*;

    #[test]
    fn f32_matches_transformers() {
        safedpo::backend::cuda::emu::use_test_mode(); // random schedule, race detector
        device_matches_transformers(&Device::emulated().unwrap(), Precision::F32);
    }

    #[test]
    fn bf16_matches_transformers() {
        safedpo::backend::cuda::emu::use_test_mode();
        device_matches_transformers(&Device::emulated().unwrap(), Precision::Bf16);
    }
}

/// On GPU 0.
mod gpu {
    use super::*;

    #[test]
    #[ignore = "needs a GPU"]
    fn f32_matches_transformers() {
        device_matches_transformers(&Device::gpu(0).expect("GPU 0"), Precision::F32);
    }

    #[test]
    #[ignore = "needs a GPU"]
    fn bf16_matches_transformers() {
        device_matches_transformers(&Device::gpu(0).expect("GPU 0"), Precision::Bf16);
    }
}
