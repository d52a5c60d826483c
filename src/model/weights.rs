//! A model's weights on a backend: uploaded from host weights (trainable, or frozen for inference),
//! downloaded, read from and written to HF model directories, and what the optimizer sees of them:
//! each parameter with its gradient, in the order of [`DecoderConfig::parameter_shapes`].

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};

use super::adapters::Lora;
use super::batch::FROZEN_HEAD_CHUNK_ROWS;
use super::decoder::{random_weights, Decoder};
use super::params::Params;
use super::{checkpoint, DecoderConfig, HostWeights};
use crate::backend::{rope_inverse_frequencies, Backend, Buffers};

/// One parameter's HF name, the parameter (mutable, for the optimizer) and its gradient.
pub type ParamAndGrad<'a, B> = (&'a str, &'a mut <B as Buffers>::Buf, &'a <B as Buffers>::Buf);

impl<B: Backend> Decoder<B> {
    /// A trainable model with its family's initialisation (see [`random_weights`]).
    pub fn random(backend: Arc<B>, config: DecoderConfig, seed: u64) -> Result<Self> {
        Self::from_host(backend, &random_weights(config, seed)?)
    }

    /// Uploads host weights as a trainable model; their names and shapes must be exactly those of
    /// their config.
    pub fn from_host(backend: Arc<B>, weights: &HostWeights) -> Result<Self> {
        Self::upload(backend, weights, false)
    }

    /// Uploads host weights as a frozen, inference-only model (see [`Decoder`]).
    pub fn from_host_frozen(backend: Arc<B>, weights: &HostWeights) -> Result<Self> {
        Self::upload(backend, weights, true)
    }

    fn upload(backend: Arc<B>, weights: &HostWeights, frozen: bool) -> Result<Self> {
        weights.validate()?;
        let config = weights.config.clone();
        let (names, shapes): (Vec<String>, Vec<Vec<usize>>) = config.parameter_shapes().into_iter().unzip();
        let mut params = Vec::with_capacity(names.len());
        let mut grads = Vec::with_capacity(if frozen { 0 } else { names.len() });
        for (name, shape) in names.iter().zip(&shapes) {
            let data = &weights.tensors[name].1;
            let param = if frozen { backend.upload_frozen(data) } else { backend.upload(data) };
            params.push(param.with_context(|| format!("uploading `{name}`"))?);
            if !frozen {
                grads.push(
                    backend
                        .zeros(shape.iter().product())
                        .with_context(|| format!("allocating the gradient of `{name}`"))?,
                );
            }
        }
        let seq_logp = backend.zeros(0)?;
        // RoPE's frequencies in f32 (`upload`: a bf16 backend keeps the exact f32 copy).
        let rope_freqs = match config.rope {
            Some(rope) => {
                Some(backend.upload(&rope_inverse_frequencies(config.head_dim, rope.theta, rope.scaling)?)?)
            }
            None => None,
        };
        Ok(Self {
            params: Params::from_ordered(params, &config),
            grads: (!frozen).then(|| Params::from_ordered(grads, &config)),
            rope_freqs,
            backend,
            config,
            names,
            shapes,
            acts: None,
            scratch: None,
            seq_logp,
            parts: None,
            pending_backward: None,
            head_chunked: false,
            head_chunk_rows: if frozen { FROZEN_HEAD_CHUNK_ROWS } else { usize::MAX },
            gradient_checkpointing: false,
            lora: None,
        })
    }

    /// Downloads the parameters.
    pub fn to_host(&self) -> Result<HostWeights> {
        let mut tensors = std::collections::BTreeMap::new();
        for ((name, shape), buf) in self.names.iter().zip(&self.shapes).zip(self.params.ordered()) {
            let mut data = self.backend.download(buf).with_context(|| format!("downloading `{name}`"))?;
            data.truncate(shape.iter().product());
            tensors.insert(name.clone(), (shape.clone(), data));
        }
        Ok(HostWeights { config: self.config.clone(), tensors })
    }

    /// Reads a HF model directory as a trainable model.
    pub fn load(backend: Arc<B>, dir: &Path) -> Result<Self> {
        let weights = checkpoint::load_dir(dir)?;
        Self::from_host(backend, &weights)
    }

    /// Reads a HF model directory as a frozen, inference-only model.
    pub fn load_frozen(backend: Arc<B>, dir: &Path) -> Result<Self> {
        let weights = checkpoint::load_dir(dir)?;
        Self::from_host_frozen(backend, &weights)
    }

    /// Writes a HF model directory, atomically file by file.
    pub fn save(&self, dir: &Path) -> Result<()> {
        checkpoint::save_dir(&self.to_host()?, dir)
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    pub fn num_params(&self) -> usize {
        self.shapes.iter().map(|s| s.iter().product::<usize>()).sum()
    }

    /// HF name and shape of every parameter, in the order of `params_and_grads_mut` and `grads`.
    pub fn parameter_shapes(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.names.iter().map(String::as_str).zip(self.shapes.iter().map(Vec::as_slice))
    }

    /// Every buffer the model holds now: parameters, gradients, activations, backward scratch and
    /// the sequence log-probs. For measuring what a model costs (sum `Backend::buf_len`, or bytes
    /// on a backend that says how it stores a buffer).
    pub fn held_buffers(&self) -> Vec<&B::Buf> {
        let mut bufs = self.params.ordered();
        if let Some(grads) = &self.grads {
            bufs.extend(grads.ordered());
        }
        if let Some(acts) = &self.acts {
            bufs.extend(acts.buffers());
        }
        if let Some(scratch) = &self.scratch {
            bufs.extend(scratch.buffers());
        }
        if let Some(lora) = &self.lora {
            bufs.extend(lora.buffers());
        }
        bufs.push(&self.seq_logp);
        bufs
    }

    /// Each parameter tensor with its gradient, in a fixed order, named as in [`DecoderConfig::parameter_shapes`] (`h.0.attn.c_attn.weight`).
    /// An error on a frozen model. With LoRA: the adapters, under PEFT's names (the base is frozen).
    pub fn params_and_grads_mut(&mut self) -> Result<Vec<ParamAndGrad<'_, B>>> {
        self.ensure_trainable("params_and_grads_mut")?;
        if let Some(lora) = &mut self.lora {
            let names: &[String] = &lora.names;
            let grads = lora.grads.as_ref().expect("ensure_trainable checked");
            let grads = grads.iter().flat_map(|g| g.by_slot.iter().flatten().flat_map(|a| [&a.a, &a.b]));
            let params =
                lora.blocks.iter_mut().flat_map(|g| g.by_slot.iter_mut().flatten().flat_map(|a| [&mut a.a, &mut a.b]));
            return Ok(names.iter().map(String::as_str).zip(params).zip(grads).map(|((n, p), g)| (n, p, g)).collect());
        }
        let grads = self.grads.as_ref().expect("ensure_trainable checked");
        Ok(self
            .names
            .iter()
            .map(String::as_str)
            .zip(self.params.ordered_mut())
            .zip(grads.ordered())
            .map(|((name, param), grad)| (name, param, grad))
            .collect())
    }

    /// Every parameter tensor, in the order of `params_and_grads_mut`.
    pub fn params(&self) -> Vec<&B::Buf> {
        if let Some(lora) = &self.lora {
            if lora.grads.is_some() {
                return lora.tensors();
            }
        }
        self.params.ordered()
    }

    /// Every gradient tensor, in the order of `params_and_grads_mut`. An error on a frozen model.
    pub fn grads(&self) -> Result<Vec<&B::Buf>> {
        self.ensure_trainable("grads")?;
        if let Some(grads) = self.lora.as_ref().and_then(Lora::grad_tensors) {
            return Ok(grads);
        }
        Ok(self.grads.as_ref().expect("ensure_trainable checked").ordered())
    }

    /// Sets every gradient to zero. An error on a frozen model.
    pub fn zero_grad(&mut self) -> Result<()> {
        let backend = self.backend.clone();
        for g in self.grads_mut()? {
            backend.fill(g, 0.0)?;
        }
        Ok(())
    }

    /// Every gradient tensor, mutably, in the order of `params_and_grads_mut` (a data-parallel
    /// group sums them in place). An error on a frozen model.
    pub fn grads_mut(&mut self) -> Result<Vec<&mut B::Buf>> {
        self.ensure_trainable("grads_mut")?;
        if self.lora.as_ref().is_some_and(|lora| lora.grads.is_some()) {
            return Ok(self.lora.as_mut().and_then(Lora::grad_tensors_mut).expect("checked"));
        }
        Ok(self.grads.as_mut().expect("ensure_trainable checked").ordered_mut())
    }
}
