//! The model's independent f64 reference, written from the architectures' definitions (HF
//! `GPT2LMHeadModel` with `gelu_new`; `LlamaForCausalLM` and its relatives) out of the ops' specs,
//! and what the model tests share around it: raw sequences, packing, a finite-difference gradient
//! check of every parameter.

use std::collections::BTreeMap;

use safedpo::backend::cpu::{attention, embedding, layernorm, matmul, pointwise, rmsnorm, rope, swiglu, CpuBackend};
use safedpo::backend::prelude::*;
use safedpo::backend::{rope_inverse_frequencies, QkvLayout, WeightLayout};
use safedpo::data::PackedBatch;
use safedpo::model::{Decoder, DecoderConfig, HostWeights};

use super::*;

pub fn cpu() -> std::sync::Arc<CpuBackend> {
    std::sync::Arc::new(CpuBackend::new())
}

/// A sequence as raw token lists: the prompt, then the response, whose tokens carry the loss.
#[derive(Clone, Debug)]
pub struct Seq {
    pub prompt: Vec<i32>,
    pub response: Vec<i32>,
}

impl Seq {
    /// `tokens` with its first `prompt_len` tokens as the prompt.
    pub fn split(tokens: &[i32], prompt_len: usize) -> Self {
        Seq { prompt: tokens[..prompt_len].to_vec(), response: tokens[prompt_len..].to_vec() }
    }

    pub fn tokens(&self) -> Vec<i32> {
        [self.prompt.as_slice(), &self.response].concat()
    }
}

/// Sequences of (length, prompt length): varied lengths, including 1 (no target), and prompts of
/// several lengths.
pub fn sequences(seed: u64, lens: &[(usize, usize)], vocab: usize) -> Vec<Seq> {
    let mut r = rng(seed);
    lens.iter().map(|&(len, prompt)| Seq::split(&rand_ids(&mut r, len, vocab), prompt)).collect()
}

/// The batch under test, packed by the library.
pub fn pack(seqs: &[Seq]) -> PackedBatch {
    let tokens: Vec<Vec<i32>> = seqs.iter().map(Seq::tokens).collect();
    PackedBatch::from_sequences(tokens.iter().zip(seqs).map(|(t, s)| (t.as_slice(), s.prompt.len())))
}

pub const LENS: [(usize, usize); 5] = [(5, 2), (1, 1), (9, 3), (3, 1), (12, 5)];

// ---- the naive f64 reference -------------------------------------------------------------------

/// GPT-2 in f64, composed from the ops' specs (`safedpo::backend::cpu::<op>::spec`, plain f64 loops),
/// sharing nothing with the code under test but the weights: it runs each sequence on its own from
/// its raw token lists (positions `0..T`, the loss on the
/// response tokens, each predicted from the position before it), never reading a `PackedBatch`.
pub struct Reference {
    config: DecoderConfig,
    w: BTreeMap<String, Vec<f64>>,
}

fn layernorm(x: &[f64], w: &[f64], b: &[f64], c: usize, eps: f64) -> Vec<f64> {
    layernorm::spec::forward(x, w, b, x.len() / c, c, eps).0
}

/// `x [n, ic] · w [ic, oc] + b` (HF Conv1D layout).
fn conv1d(x: &[f64], w: &[f64], b: &[f64], ic: usize, oc: usize) -> Vec<f64> {
    matmul::spec::forward(x, w, Some(b), x.len() / ic, ic, oc, WeightLayout::InOut)
}

/// `x [n, ic] · wᵀ + b` with `w [oc, ic]` (`nn.Linear`).
fn linear(x: &[f64], w: &[f64], b: Option<&[f64]>, ic: usize, oc: usize) -> Vec<f64> {
    matmul::spec::forward(x, w, b, x.len() / ic, ic, oc, WeightLayout::OutIn)
}

fn add(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

impl Reference {
    pub fn new(weights: &HostWeights) -> Self {
        let w = weights.tensors.iter().map(|(k, (_, d))| (k.clone(), d.iter().map(|&x| x as f64).collect())).collect();
        Self { config: weights.config.clone(), w }
    }

    /// The reference of `config` with f64 weights (merged in f64, say), in the names of
    /// [`DecoderConfig::parameter_shapes`].
    pub fn from_f64(config: &DecoderConfig, w: BTreeMap<String, Vec<f64>>) -> Self {
        Self { config: config.clone(), w }
    }

    fn p(&self, name: &str) -> &[f64] {
        &self.w[name]
    }

    /// Logits `[T, v]` of one sequence; token `t` sits at position `t`.
    fn sequence_logits(&self, tokens: &[i32]) -> Vec<f64> {
        if self.config.family.is_gpt2() {
            self.gpt2_logits(tokens)
        } else {
            self.llama_logits(tokens)
        }
    }

    /// HF `GPT2LMHeadModel`: learned positions, LayerNorm, GELU, Conv1D, tied head.
    fn gpt2_logits(&self, tokens: &[i32]) -> Vec<f64> {
        let cfg = &self.config;
        let (c, v, eps) = (cfg.n_embd, cfg.vocab_size, cfg.norm_eps as f64);
        let n = tokens.len();
        let wte = self.p("wte.weight");
        let positions: Vec<i32> = (0..n as i32).collect();
        let mut x = embedding::spec::forward(tokens, &positions, wte, Some(self.p("wpe.weight")), c);
        for l in 0..cfg.n_layer {
            let p = |s: &str| self.p(&format!("h.{l}.{s}"));
            let h = layernorm(&x, p("ln_1.weight"), p("ln_1.bias"), c, eps);
            let qkv = conv1d(&h, p("attn.c_attn.weight"), p("attn.c_attn.bias"), c, 3 * c);
            let (y, _) = attention::spec::forward(&qkv, &[n], QkvLayout::mha(cfg.n_head, c), None);
            x = add(&x, &conv1d(&y, p("attn.c_proj.weight"), p("attn.c_proj.bias"), c, c));
            let h = layernorm(&x, p("ln_2.weight"), p("ln_2.bias"), c, eps);
            let f: Vec<f64> = conv1d(&h, p("mlp.c_fc.weight"), p("mlp.c_fc.bias"), c, 4 * c)
                .into_iter()
                .map(pointwise::spec::gelu)
                .collect();
            x = add(&x, &conv1d(&f, p("mlp.c_proj.weight"), p("mlp.c_proj.bias"), 4 * c, c));
        }
        let h = layernorm(&x, self.p("ln_f.weight"), self.p("ln_f.bias"), c, eps);
        // The tied LM head: `wte` is `[vocab, c]`.
        matmul::spec::forward(&h, wte, None, n, c, v, WeightLayout::OutIn)
    }

    /// HF `LlamaForCausalLM` (and Mistral, Qwen2): RMSNorm, RoPE on q and k, grouped-query
    /// attention (each layer's sliding window, if any), SwiGLU, `nn.Linear` weights `[out, in]`, the biases the config has, the head tied
    /// or not. The fused `qkv_proj` / `gate_up_proj` are read as the concatenations they are.
    fn llama_logits(&self, tokens: &[i32]) -> Vec<f64> {
        let cfg = &self.config;
        let (c, v, eps, f) = (cfg.n_embd, cfg.vocab_size, cfg.norm_eps as f64, cfg.intermediate_size);
        let layout = cfg.qkv_layout();
        let n = tokens.len();
        let positions: Vec<i32> = (0..n as i32).collect();
        let rope = cfg.rope.unwrap();
        let inv_freq = rope_inverse_frequencies(cfg.head_dim, rope.theta, rope.scaling).unwrap();
        let opt = |name: String| self.w.get(&name).map(Vec::as_slice);
        let mut x = embedding::spec::forward(tokens, &positions, self.p("embed_tokens.weight"), None, c);
        for l in 0..cfg.n_layer {
            let p = |s: &str| format!("layers.{l}.{s}");
            let h = rmsnorm::spec::forward(&x, self.p(&p("input_layernorm.weight")), n, c, eps).0;
            let qkv_w = self.p(&p("self_attn.qkv_proj.weight"));
            let qkv = linear(&h, qkv_w, opt(p("self_attn.qkv_proj.bias")), c, layout.width());
            let qkv = rope::spec::forward(&qkv, &positions, &inv_freq, layout);
            let y = attention::spec::forward(&qkv, &[n], layout, cfg.layer_window(l)).0;
            let o =
                linear(&y, self.p(&p("self_attn.o_proj.weight")), opt(p("self_attn.o_proj.bias")), layout.q_width(), c);
            x = add(&x, &o);
            let h = rmsnorm::spec::forward(&x, self.p(&p("post_attention_layernorm.weight")), n, c, eps).0;
            let gate_up = linear(&h, self.p(&p("mlp.gate_up_proj.weight")), opt(p("mlp.gate_up_proj.bias")), c, 2 * f);
            let act = swiglu::spec::forward(&gate_up, n, f);
            x = add(&x, &linear(&act, self.p(&p("mlp.down_proj.weight")), opt(p("mlp.down_proj.bias")), f, c));
        }
        let h = rmsnorm::spec::forward(&x, self.p("norm.weight"), n, c, eps).0;
        let head = opt("lm_head.weight".into()).unwrap_or(self.p("embed_tokens.weight"));
        matmul::spec::forward(&h, head, None, n, c, v, WeightLayout::OutIn)
    }

    /// The logits of all sequences one after the other `[Σ T, v]`, and each sequence's log-prob:
    /// `Σ_j log softmax(logits[p − 1 + j])[response[j]]` for a prompt of length `p`.
    pub fn forward(&self, seqs: &[Seq]) -> (Vec<f64>, Vec<f64>) {
        let v = self.config.vocab_size;
        let mut all_logits = Vec::new();
        let mut seq_logps = Vec::with_capacity(seqs.len());
        for seq in seqs {
            assert!(!seq.prompt.is_empty(), "a sequence starts with at least one prompt token");
            let logits = self.sequence_logits(&seq.tokens());
            let mut logp = 0.0;
            for (j, &target) in seq.response.iter().enumerate() {
                let row = &logits[(seq.prompt.len() - 1 + j) * v..][..v];
                let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = max + row.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
                logp += row[target as usize] - lse;
            }
            all_logits.extend(logits);
            seq_logps.push(logp);
        }
        (all_logits, seq_logps)
    }

    /// Central differences of `loss(seq logps)` w.r.t. `tensor` at `idx`.
    pub fn fd_grad(&mut self, tensor: &str, idx: &[usize], seqs: &[Seq], loss: &dyn Fn(&[f64]) -> f64) -> Vec<f64> {
        let h = 1e-5;
        idx.iter()
            .map(|&i| {
                let orig = self.w[tensor][i];
                self.w.get_mut(tensor).unwrap()[i] = orig + h;
                let up = loss(&self.forward(seqs).1);
                self.w.get_mut(tensor).unwrap()[i] = orig - h;
                let down = loss(&self.forward(seqs).1);
                self.w.get_mut(tensor).unwrap()[i] = orig;
                (up - down) / (2.0 * h)
            })
            .collect()
    }
}

// ---- helpers -----------------------------------------------------------------------------------

pub fn download_grads(model: &Decoder<CpuBackend>) -> Vec<Vec<f32>> {
    model.grads().unwrap().into_iter().cloned().collect()
}

/// Compares every parameter gradient of `model` with central differences of `loss` through the
/// reference at `samples` random entries plus the entry of largest model gradient (so a wrong
/// large value cannot hide), with tolerance relative to the largest finite difference.
pub fn check_all_gradients(
    model: &Decoder<CpuBackend>,
    reference: &mut Reference,
    seqs: &[Seq],
    loss: &dyn Fn(&[f64]) -> f64,
    samples: usize,
    seed: u64,
    what: &str,
) {
    let mut r = rng(seed);
    let grads = download_grads(model);
    let shapes = model.config().parameter_shapes();
    assert_eq!(grads.len(), shapes.len());
    for ((name, shape), grad) in shapes.iter().zip(&grads) {
        let len: usize = shape.iter().product();
        assert_eq!(grad.len(), len, "{name}");
        let mut idx = sample_indices(&mut r, len, samples);
        let argmax = (0..len).max_by(|&a, &b| grad[a].abs().total_cmp(&grad[b].abs())).unwrap();
        if !idx.contains(&argmax) {
            idx.push(argmax);
        }
        let fd = reference.fd_grad(name, &idx, seqs, loss);
        let got: Vec<f32> = idx.iter().map(|&i| grad[i]).collect();
        let scale = fd.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(scale > 0.0, "{what}: {name}: every sampled finite difference is 0; the test has no signal");
        assert_close(&format!("{what}: d/d {name}"), &got, &fd, 2e-3, 2e-3 * scale);
    }
}

/// The CPU model's gradient of `Σ w·logp` (random weights `w` per sequence, over `LENS`) against
/// central differences of the f64 reference, for every parameter at `samples` entries.
pub fn gradients_match_finite_differences(config: &DecoderConfig, seed: u64, samples: usize, what: &str) {
    let host = test_weights(config, seed);
    let backend = cpu();
    let mut model = Decoder::from_host(backend.clone(), &host).unwrap();
    let seqs = sequences(seed + 1, &LENS, config.vocab_size);
    let dev = safedpo::model::DeviceBatch::upload(&*backend, &pack(&seqs)).unwrap();
    let weights: Vec<f64> = uniform(&mut rng(seed + 2), seqs.len(), -1.0, 1.0).into_iter().map(f64::from).collect();
    model.forward(&dev).unwrap();
    let dseq = backend.upload(&weights.iter().map(|&w| w as f32).collect::<Vec<_>>()).unwrap();
    model.zero_grad().unwrap();
    model.backward(&dev, &dseq).unwrap();
    let loss = |seq: &[f64]| weighted_sum(&weights, seq);
    check_all_gradients(&model, &mut Reference::new(&host), &seqs, &loss, samples, seed + 3, what);
}

/// One forward and backward: the log-probs and every gradient, downloaded.
pub fn model_step<B: safedpo::backend::Backend>(
    backend: std::sync::Arc<B>,
    host: &HostWeights,
    batch: &safedpo::data::PackedBatch,
    dseq: &[f32],
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut model = Decoder::from_host(backend.clone(), host).unwrap();
    let dev = safedpo::model::DeviceBatch::upload(&*backend, batch).unwrap();
    let logp = backend.download(model.forward(&dev).unwrap()).unwrap();
    model.backward(&dev, &backend.upload(dseq).unwrap()).unwrap();
    let grads = model.grads().unwrap().into_iter().map(|g| backend.download(g).unwrap()).collect();
    (logp, grads)
}
