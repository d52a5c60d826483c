//! TR-DPO's reference sync (Gorbatovski et al. 2024, arXiv 2404.09656; TRL `sync_ref_model`,
//! `SyncRefModelCallback`): after every `ref_model_sync_steps`-th optimizer step, the reference
//! becomes `α · policy + (1 − α) · reference` (`ref_model_mixup_alpha`; α = 1 is the hard update,
//! a copy of the policy).
//!
//! The mix runs on the host in f32 on the reference's exact f32 weights, which are kept here (a
//! frozen model on a bf16 device holds rounded ones) and saved in every checkpoint
//! (`reference/`, an HF model directory), so that a resumed run continues from the same reference,
//! bit for bit. Then the frozen reference model is uploaded anew, and the held-out pairs' reference
//! log-probs are recomputed (TRL's evaluation reads the current reference). The cached reference
//! log-probs (`precompute_ref`) assume a fixed reference: the configuration refuses the two together,
//! as TRL does.

use std::path::Path;

use anyhow::{ensure, Context, Result};

use super::refcache::sequence_logp_parts;
use super::step::Reference;
use super::Trainer;
use crate::backend::Backend;
use crate::model::{checkpoint, Decoder, HostWeights};

/// The directory of a checkpoint that holds the synced reference.
pub const REFERENCE_DIR: &str = "reference";

/// The reference's weights and when to mix the policy into them.
pub(super) struct RefSync {
    /// α, the policy's share.
    pub alpha: f64,
    /// τ, steps between syncs.
    pub every: usize,
    /// The reference's exact weights.
    pub weights: HostWeights,
}

/// `reference ← α · policy + (1 − α) · reference`, tensor by tensor, in f32 as TRL's
/// `target.mul_(1 − α).add_(policy, alpha=α)` computes it: `r · (1 − α) + α · p`, with `1 − α` and
/// `α` rounded to f32 (each product rounded, then the sum; no fused multiply-add).
pub fn mix_weights(reference: &mut HostWeights, policy: &HostWeights, alpha: f64) -> Result<()> {
    ensure!(
        reference.config.same_architecture(&policy.config),
        "the reference ({}) and the policy ({}) differ",
        reference.config.summary(),
        policy.config.summary()
    );
    let (keep, take) = ((1.0 - alpha) as f32, alpha as f32);
    for (name, (shape, values)) in reference.tensors.iter_mut() {
        let (policy_shape, policy_values) =
            policy.tensors.get(name).with_context(|| format!("the policy has no tensor `{name}`"))?;
        ensure!(shape == policy_shape, "`{name}`: reference {shape:?}, policy {policy_shape:?}");
        for (r, &p) in values.iter_mut().zip(policy_values) {
            *r = *r * keep + take * p;
        }
    }
    Ok(())
}

impl RefSync {
    /// Whether a sync follows optimizer step `step` (1-based; TRL: `global_step % τ == 0`).
    pub fn due(&self, step: usize) -> bool {
        step.is_multiple_of(self.every)
    }

    /// Writes the reference's weights into the checkpoint directory `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        checkpoint::save_dir(&self.weights, &dir.join(REFERENCE_DIR))
    }

    /// The synced reference a checkpoint holds.
    pub fn load(dir: &Path) -> Result<HostWeights> {
        let path = dir.join(REFERENCE_DIR);
        checkpoint::load_dir(&path).with_context(|| {
            format!("reading the synced reference of {} (sync_ref_model) from {}", dir.display(), path.display())
        })
    }
}

impl<B: Backend> Trainer<B> {
    /// After step `self.step`: mixes the policy into the reference when a sync is due, uploads the
    /// new reference and recomputes the held-out pairs' reference log-probs.
    pub(super) fn sync_reference(&mut self) -> Result<()> {
        if !self.ref_sync.as_ref().is_some_and(|s| s.due(self.step)) {
            return Ok(());
        }
        let policy = self.policy_weights()?;
        let Some(sync) = self.ref_sync.as_mut() else { return Ok(()) };
        mix_weights(&mut sync.weights, &policy, sync.alpha)?;
        let mut model = Decoder::from_host_frozen(self.backend.clone(), &sync.weights)?;
        if let Some(rows) = self.cfg.batching.head_chunk_rows {
            model.set_head_chunk_rows(rows)?;
        }
        // Only the rank that evaluates (rank 0, or a run alone) reads the held-out pairs' log-probs.
        if !self.data.eval.is_empty() && self.is_lead() {
            let budget = self.cfg.batching.tokens_per_micro_batch;
            self.eval_reference = sequence_logp_parts(&mut model, &self.data.eval, budget)?;
        }
        self.learner.reference = Reference::Model(Box::new(model));
        Ok(())
    }
}
