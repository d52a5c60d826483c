//! A decoder with LoRA adapters (`lora.rs`, `adapters.rs`): the base uploaded frozen (on a bf16
//! device without an fp32 master copy), the adapters trainable, and a switch that turns them off,
//! which makes the same model the base, bit for bit: the reference of a LoRA run is its policy with
//! the adapters off, one copy of the base weights serving both.

use std::sync::Arc;

use anyhow::{ensure, Result};

use super::adapters::Lora;
use super::lora::{HostAdapters, LoraSpec};
use super::{Decoder, HostWeights};
use crate::backend::Backend;

impl<B: Backend> Decoder<B> {
    /// The frozen base `base` with `adapters` (trainable, with gradients and optimizer state for
    /// them only), which must fit it.
    pub fn with_lora(backend: Arc<B>, base: &HostWeights, adapters: HostAdapters) -> Result<Self> {
        Self::with_adapters(backend, base, adapters, true)
    }

    /// The frozen base with frozen adapters: inference only (evaluation, log-probs, generation).
    pub fn with_lora_frozen(backend: Arc<B>, base: &HostWeights, adapters: HostAdapters) -> Result<Self> {
        Self::with_adapters(backend, base, adapters, false)
    }

    fn with_adapters(backend: Arc<B>, base: &HostWeights, adapters: HostAdapters, trainable: bool) -> Result<Self> {
        let mut model = Self::from_host_frozen(backend.clone(), base)?;
        // The adapters checked against this base (their names and shapes).
        let adapters = HostAdapters::from_tensors(&model.config, adapters.spec, adapters.tensors)?;
        model.lora = Some(Lora::upload(&*backend, &model.config, adapters, trainable)?);
        if trainable {
            model.head_chunk_rows = usize::MAX;
        }
        Ok(model)
    }

    /// Whether the model has LoRA adapters.
    pub fn has_adapters(&self) -> bool {
        self.lora.is_some()
    }

    /// The adapters' spec, with them.
    pub fn lora_spec(&self) -> Option<&LoraSpec> {
        self.lora.as_ref().map(Lora::spec)
    }

    /// Turns the adapters on or off (on when made). Off, the model is its base bit for bit; a
    /// backward needs them on. An error on a model without adapters.
    pub fn set_adapters_enabled(&mut self, on: bool) -> Result<()> {
        let lora = self.lora.as_mut();
        ensure!(lora.is_some(), "set_adapters_enabled: this model has no LoRA adapters");
        let lora = lora.expect("checked");
        if lora.enabled != on {
            lora.enabled = on;
            self.pending_backward = None;
        }
        Ok(())
    }

    /// The adapters as they are now, on the host (`None` without).
    pub fn adapters_to_host(&self) -> Result<Option<HostAdapters>> {
        self.lora.as_ref().map(|lora| lora.to_host(&*self.backend)).transpose()
    }

    /// The base merged with the adapters (PEFT's `merge_and_unload`), on the host; the base itself
    /// without adapters. The base as the model holds it: on a bf16 device, frozen weights are bf16
    /// (the trainer merges into the base read again from its source instead).
    pub fn merged_to_host(&self) -> Result<HostWeights> {
        let base = self.to_host()?;
        match self.adapters_to_host()? {
            Some(adapters) => adapters.merge_into(&base),
            None => Ok(base),
        }
    }
}
