//! The fused log-softmax-gather on the CUDA backend (kernels/logsoftmax_gather.cu): one block per
//! row of logits (or per sequence for the sums); token log-probs, log-sum-exps, the softmax's log
//! squared mass and sequence sums in f32. The forward reads the logits in their storage type (the LM
//! head's are f32 in either precision); the backward writes the gradient in the activation type, so
//! a bf16 backend's f32 logits become bf16 dlogits in new storage that replaces theirs.

use anyhow::Result;

use crate::backend::cuda::backend::{check_device_cu_seqlens, CudaBackend, CudaBuf, CudaIds};
use crate::backend::cuda::launch::{grid_dim, i32_arg, row_threads, suffix};
use crate::backend::cuda::{Dtype, LaunchConfig};
use crate::backend::{checks, LogSoftmaxGatherOps, Packing};

impl LogSoftmaxGatherOps for CudaBackend {
    fn logsoftmax_gather_forward(
        &self,
        token_logp: &mut CudaBuf,
        lse: &mut CudaBuf,
        logits: &CudaBuf,
        targets: &CudaIds,
        n: usize,
        v: usize,
    ) -> Result<()> {
        checks::logsoftmax_gather_forward(token_logp.len(), lse.len(), logits.len(), &targets.host, n, v)?;
        if n == 0 {
            return Ok(());
        }
        // The logits as stored: f32 (the LM head's, in either precision) or bf16.
        let dt = logits.dtype();
        let logits = self.input(logits, dt)?;
        let token_logp = self.output(token_logp, Dtype::F32, false)?.arg();
        let lse = self.output(lse, Dtype::F32, false)?.arg();
        self.launch(
            &format!("logsoftmax_gather_forward_{}", suffix(dt)),
            LaunchConfig::grid_1d(grid_dim(n, "rows")?, row_threads(v)),
            &[token_logp, lse, logits.arg(), targets.arg(), i32_arg(v, "v")?],
        )
    }

    fn logsoftmax_gather_forward_sq(
        &self,
        token_logp: &mut CudaBuf,
        lse: &mut CudaBuf,
        log_sum_sq: &mut CudaBuf,
        logits: &CudaBuf,
        targets: &CudaIds,
        n: usize,
        v: usize,
    ) -> Result<()> {
        let (lengths, ids) = ([token_logp.len(), lse.len(), log_sum_sq.len(), logits.len()], &targets.host);
        checks::logsoftmax_gather_forward_sq(lengths[0], lengths[1], lengths[2], lengths[3], ids, n, v)?;
        if n == 0 {
            return Ok(());
        }
        let dt = logits.dtype();
        let logits = self.input(logits, dt)?;
        let token_logp = self.output(token_logp, Dtype::F32, false)?.arg();
        let lse = self.output(lse, Dtype::F32, false)?.arg();
        let log_sum_sq = self.output(log_sum_sq, Dtype::F32, false)?.arg();
        self.launch(
            &format!("logsoftmax_gather_forward_sq_{}", suffix(dt)),
            LaunchConfig::grid_1d(grid_dim(n, "rows")?, row_threads(v)),
            &[token_logp, lse, log_sum_sq, logits.arg(), targets.arg(), i32_arg(v, "v")?],
        )
    }

    fn sequence_logp_sum(&self, seq_logp: &mut CudaBuf, token_logp: &CudaBuf, packing: &Packing<Self>) -> Result<()> {
        checks::sequence_logp_sum(seq_logp.len(), token_logp.len(), &packing.host_cu_seqlens)?;
        check_device_cu_seqlens("sequence_logp_sum", packing)?;
        let seqs = packing.num_seqs();
        if seqs == 0 {
            return Ok(());
        }
        let token_logp = self.input(token_logp, Dtype::F32)?;
        let seq_logp = self.output(seq_logp, Dtype::F32, false)?;
        self.launch(
            "sequence_logp_sum_f32",
            LaunchConfig::grid_1d(grid_dim(seqs, "sequences")?, row_threads(packing.max_seqlen)),
            &[seq_logp.arg(), token_logp.arg(), packing.cu_seqlens.arg()],
        )
    }

    fn logsoftmax_gather_backward(
        &self,
        logits: &mut CudaBuf,
        lse: &CudaBuf,
        targets: &CudaIds,
        dseq: &CudaBuf,
        packing: &Packing<Self>,
        n: usize,
        v: usize,
    ) -> Result<()> {
        let cu = &packing.host_cu_seqlens;
        checks::logsoftmax_gather_backward(logits.len(), lse.len(), &targets.host, dseq.len(), cu, n, v)?;
        check_device_cu_seqlens("logsoftmax_gather_backward", packing)?;
        if n == 0 {
            return Ok(());
        }
        let (lse, dseq) = (self.input(lse, Dtype::F32)?, self.input(dseq, Dtype::F32)?);
        let config = LaunchConfig::grid_1d(grid_dim(n, "rows")?, row_threads(v));
        let rest = [
            lse.arg(),
            targets.arg(),
            dseq.arg(),
            packing.cu_seqlens.arg(),
            i32_arg(packing.num_seqs(), "sequences")?,
            i32_arg(v, "v")?,
        ];
        // The gradient is stored in the activation type, as the head's backward products read it.
        let dt = self.act();
        if (logits.dtype(), dt) == (Dtype::F32, Dtype::Bf16) {
            // A bf16 model's f32 logits: bf16 dlogits (one rounding of the gradient, as PyTorch's
            // bf16 autocast), into new storage that then replaces the logits' (the f32 storage is
            // freed before the head's backward products run).
            let dlogits = self.alloc(Dtype::Bf16, logits.len())?;
            let args = [[dlogits.arg(), logits.storage.arg()].as_slice(), &rest].concat();
            self.launch("logsoftmax_gather_backward_f32_to_bf16", config, &args)?;
            (logits.storage, logits.master) = (dlogits, None);
            return Ok(());
        }
        let logits = self.output(logits, dt, true)?;
        let args = [[logits.arg()].as_slice(), &rest].concat();
        self.launch(&format!("logsoftmax_gather_backward_{}", suffix(dt)), config, &args)
    }
}
