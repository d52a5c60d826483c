//! Where a trainer's parameter gradients accumulate: `train.grad_dtype`.
//!
//! On a backend that stores parameters in bf16, every backward op adds its contribution into the
//! parameter gradients (GEMMs with beta = 1, the norms' and the embedding's backward, the tied
//! embedding's two contributions), and so do the `grad_accum` micro-batches of a step. In bf16
//! storage each of those adds rounds to 8 bits of mantissa, and a contribution below half a unit of
//! the running sum's last place is lost. `f32` keeps the gradients themselves in f32 storage
//! (`Buffers::store_in_f32`): the kernels that write a parameter gradient write it in f32 (the
//! `<op>_bf16_f32` kernels, GEMMs of bf16 operands into an f32 D) and the optimizer and the grad
//! norm read it as stored, so there is no extra pass; it costs 2 more bytes per parameter.
//!
//! `auto` (the default) is f32 when a step accumulates several micro-batches (`grad_accum > 1`),
//! where the rounding compounds, and bf16 otherwise, so runs of one micro-batch per step keep their
//! bf16 numbers and memory. On an f32 backend (the CPU, `Precision::F32`) gradients are f32 whatever
//! the setting.
//!
//! Every trainer honours it: the training run (`train.grad_dtype`, its `batching.grad_accum`),
//! `Engine` (`Engine::set_grad_dtype`; a step's micro-batches are its `grad_accum`, and once a step
//! has stored the gradients in f32 they stay so) and the judge trainer (`safedpo rm`, whose steps
//! are one batch each, so that `auto` is bf16 there).

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::model::Decoder;

/// The storage type of a trainer's parameter gradients on a bf16 backend (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GradDtype {
    /// f32 when `grad_accum > 1`, else bf16.
    #[default]
    Auto,
    /// f32 gradients always.
    F32,
    /// Gradients in the parameters' storage type (bf16).
    Bf16,
}

impl GradDtype {
    /// Every value, as the setting spells it.
    pub const NAMES: [&'static str; 3] = ["auto", "f32", "bf16"];

    /// Whether gradients accumulate in f32 storage for a step of `grad_accum` micro-batches.
    pub fn accumulates_in_f32(self, grad_accum: usize) -> bool {
        match self {
            GradDtype::Auto => grad_accum > 1,
            GradDtype::F32 => true,
            GradDtype::Bf16 => false,
        }
    }
}

impl fmt::Display for GradDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GradDtype::Auto => "auto",
            GradDtype::F32 => "f32",
            GradDtype::Bf16 => "bf16",
        })
    }
}

impl FromStr for GradDtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(GradDtype::Auto),
            "f32" => Ok(GradDtype::F32),
            "bf16" => Ok(GradDtype::Bf16),
            other => bail!("train.grad_dtype: unknown value `{other}`: expected {}", GradDtype::NAMES.join(", ")),
        }
    }
}

/// Stores every gradient of `model` in f32 when `grad_dtype` says so for `grad_accum` micro-batches
/// per step (nothing otherwise, and nothing on an f32 backend). Call it once the model's trainable
/// tensors are final (LoRA adapters attached): the gradients keep their storage type from then on.
pub fn set_grad_dtype<B: Backend>(model: &mut Decoder<B>, grad_dtype: GradDtype, grad_accum: usize) -> Result<()> {
    if !grad_dtype.accumulates_in_f32(grad_accum) {
        return Ok(());
    }
    let backend = model.backend().clone();
    store_grads_in_f32(&*backend, model.grads_mut()?)
}

/// Stores each of `grads` in f32 from now on (a model's gradients beside other trainable tensors:
/// a reward model's trunk and score head). Converting a gradient stored in f32 already is free.
pub fn store_grads_in_f32<B: Backend>(backend: &B, grads: Vec<&mut B::Buf>) -> Result<()> {
    for grad in grads {
        backend.store_in_f32(grad)?;
    }
    Ok(())
}
