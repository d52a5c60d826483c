//! The fused log-softmax-gather: each target token's log-prob without materialising the softmax (and,
//! on request, the log of the softmax's squared mass, WPO's normaliser), the segmented sum per
//! sequence, and the backward written in place over the logits (kernels/logsoftmax_gather.cu, CPU
//! twin in cpu/logsoftmax_gather.rs).
//!
//! The trait is the contract every backend implements; `check` holds the argument checks every
//! backend runs first, so that the same mistake gives the same error everywhere.

use anyhow::Result;

use crate::backend::Buffers;
use crate::backend::Packing;

pub trait LogSoftmaxGatherOps: Buffers {
    /// For each row t of `logits [n, v]`: `lse[t] = log Σ exp(logits[t])`, and
    /// `token_logp[t] = logits[t, targets[t]] − lse[t]`, or 0 where `targets[t] == -1`. Reads each
    /// row once (online max and sum-exp).
    #[allow(clippy::too_many_arguments)]
    fn logsoftmax_gather_forward(
        &self,
        token_logp: &mut Self::Buf,
        lse: &mut Self::Buf,
        logits: &Self::Buf,
        targets: &Self::Ids,
        n: usize,
        v: usize,
    ) -> Result<()>;
    /// `logsoftmax_gather_forward`, and per row also `log_sum_sq[t] = log Σ_j p_{t,j}²`, the log of
    /// the squared mass of the row's softmax `p` (TRL's `log_sum_sq_probs`, the normaliser of WPO's
    /// weights), from a second online sum in the same pass; written for every row, with a target or
    /// not. `token_logp` and `lse` are `logsoftmax_gather_forward`'s, bit for bit. It has no backward:
    /// WPO's weights are constants of the loss (TRL computes them under `torch.no_grad()`).
    #[allow(clippy::too_many_arguments)]
    fn logsoftmax_gather_forward_sq(
        &self,
        token_logp: &mut Self::Buf,
        lse: &mut Self::Buf,
        log_sum_sq: &mut Self::Buf,
        logits: &Self::Buf,
        targets: &Self::Ids,
        n: usize,
        v: usize,
    ) -> Result<()>;
    /// `seq_logp[s] = Σ_{t in seq s} token_logp[t]`, a deterministic segmented sum (fixed order).
    fn sequence_logp_sum(
        &self,
        seq_logp: &mut Self::Buf,
        token_logp: &Self::Buf,
        packing: &Packing<Self>,
    ) -> Result<()>;
    /// In place over `logits`: row t of sequence s becomes
    /// `dseq[s] · (onehot(targets[t]) − exp(logits[t] − lse[t]))`, or zeros where `targets[t] == -1`.
    /// The gradient is stored as the backend stores activations: on a bf16 CUDA backend, f32 logits
    /// (the LM head's) become bf16 dlogits.
    #[allow(clippy::too_many_arguments)]
    fn logsoftmax_gather_backward(
        &self,
        logits: &mut Self::Buf,
        lse: &Self::Buf,
        targets: &Self::Ids,
        dseq: &Self::Buf,
        packing: &Packing<Self>,
        n: usize,
        v: usize,
    ) -> Result<()>;
}

/// Argument checks, one per method, with its name and argument order (see `crate::backend::checks`).
pub(crate) mod check {
    #[allow(unused_imports)]
    use anyhow::{bail, ensure, Result};

    #[allow(unused_imports)]
    use crate::backend::checks::{check_ids, check_len, sequences, Sequences};

    pub(crate) fn logsoftmax_gather_forward(
        token_logp: usize,
        lse: usize,
        logits: usize,
        targets: &[i32],
        n: usize,
        v: usize,
    ) -> Result<()> {
        const OP: &str = "logsoftmax_gather_forward";
        ensure!(v > 0, "{OP}: vocabulary size must be positive");
        check_len(OP, "logits", logits, n * v)?;
        check_len(OP, "targets", targets.len(), n)?;
        check_len(OP, "token_logp", token_logp, n)?;
        check_len(OP, "lse", lse, n)?;
        check_ids(OP, "targets", targets, v, true)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn logsoftmax_gather_forward_sq(
        token_logp: usize,
        lse: usize,
        log_sum_sq: usize,
        logits: usize,
        targets: &[i32],
        n: usize,
        v: usize,
    ) -> Result<()> {
        logsoftmax_gather_forward(token_logp, lse, logits, targets, n, v)?;
        check_len("logsoftmax_gather_forward_sq", "log_sum_sq", log_sum_sq, n)
    }

    pub(crate) fn sequence_logp_sum(seq_logp: usize, token_logp: usize, cu_seqlens: &[i32]) -> Result<Sequences> {
        const OP: &str = "sequence_logp_sum";
        let seqs = sequences(OP, cu_seqlens, token_logp)?;
        check_len(OP, "seq_logp", seq_logp, seqs.len())?;
        Ok(seqs)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn logsoftmax_gather_backward(
        logits: usize,
        lse: usize,
        targets: &[i32],
        dseq: usize,
        cu_seqlens: &[i32],
        n: usize,
        v: usize,
    ) -> Result<Sequences> {
        const OP: &str = "logsoftmax_gather_backward";
        ensure!(v > 0, "{OP}: vocabulary size must be positive");
        let seqs = sequences(OP, cu_seqlens, n)?;
        check_len(OP, "logits", logits, n * v)?;
        check_len(OP, "lse", lse, n)?;
        check_len(OP, "targets", targets.len(), n)?;
        check_len(OP, "dseq", dseq, seqs.len())?;
        check_ids(OP, "targets", targets, v, true)?;
        Ok(seqs)
    }
}
