//! Data-parallel training's communication: a group of ranks, each with its own backend and its own
//! copy of the model, that exchange gradients, parameters and metrics.
//!
//! [`Collective`] is what the trainer calls. It works on a backend's buffers, so that a GPU
//! implementation (NCCL) can reduce device memory in place. Every other implementation moves host
//! vectors through a [`HostTransport`] (threads in one process, or sockets between processes) and is
//! made a `Collective` of any backend by [`Staged`], which downloads, exchanges, sums and uploads.
//!
//! Processes find each other from the environment torch jobs are launched with ([`env`]: torchrun,
//! Slurm, or `safedpo launch`, [`launch`]), meet at a TCP rendezvous on `MASTER_ADDR:MASTER_PORT`
//! ([`rendezvous`]), and keep those connections as a [`HostTransport`] ([`tcp`]); [`group`] makes a
//! rank's backend and its group from them: NCCL on GPUs (`nccl`, feature `cuda`), the TCP
//! transport under [`Staged`] on the CPU and the emulated device.
//!
//! Sums are taken in rank order (`((r0 + r1) + r2) + …`, in f32 for buffers and f64 for host
//! values) on every rank, so every rank holds the same bits and a run is reproducible for a fixed
//! world size. NCCL sums in an order of its own (fixed for a world size and a topology, the same bits
//! on every rank of an all-reduce).

pub mod env;
pub mod group;
pub mod in_process;
pub mod launch;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod rendezvous;
pub mod tcp;

use anyhow::{ensure, Context, Result};

use crate::backend::Buffers;

pub use env::RankEnv;
pub use group::{join_group, RankGroup};

/// The error of a rank whose collective failed because of another rank (it left, crashed, did not
/// arrive in time, or its backend did not open): the message names that rank. `safedpo` exits with
/// [`launch::FOLLOWER_EXIT_CODE`] on it, so that `safedpo launch` names the rank that failed first.
#[derive(Debug)]
pub struct GroupBroken(pub String);

impl std::fmt::Display for GroupBroken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GroupBroken {}

/// Whether `error` is (or wraps) a [`GroupBroken`].
pub fn is_group_broken(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| cause.is::<GroupBroken>())
}

/// A group of `world_size` ranks; every rank calls the same collectives in the same order with
/// buffers of the same lengths (a mismatch is an error on every rank, never a wrong sum).
pub trait Collective<B: Buffers>: Send + Sync {
    /// This rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world_size(&self) -> usize;
    /// Every rank's `bufs` replaced by their element-wise sum over the ranks.
    fn all_reduce_sum(&self, backend: &B, bufs: &mut [&mut B::Buf]) -> Result<()>;
    /// The element-wise sum over the ranks written into `root`'s `bufs`; other ranks' `bufs` keep
    /// their contents.
    fn reduce_sum(&self, backend: &B, bufs: &mut [&mut B::Buf], root: usize) -> Result<()>;
    /// `root`'s `bufs` copied into every rank's.
    fn broadcast(&self, backend: &B, bufs: &mut [&mut B::Buf], root: usize) -> Result<()>;
    /// `root`'s values as the kernels read them (its storage, not its master copies) written into the
    /// other ranks' `bufs`, which keep no master copy. How ZeRO-1 shares updated parameters: the
    /// fp32 master stays on the owner.
    fn broadcast_values(&self, backend: &B, bufs: &mut [&mut B::Buf], root: usize) -> Result<()>;
    /// Host values (losses, counts, metric sums) replaced by their sum over the ranks.
    fn all_reduce_host(&self, values: &mut [f64]) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// Moves small host messages between the ranks of a group; [`Staged`] builds the collectives on it.
pub trait HostTransport: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Every rank's `data`, in rank order (this rank's included). An error on every rank when a rank
    /// has left the group or does not arrive in time.
    fn all_gather(&self, data: &[u8]) -> Result<Vec<Vec<u8>>>;
}

/// A [`HostTransport`] as a [`Collective`] of any backend: buffers staged through host memory.
pub struct Staged<T: HostTransport>(pub T);

impl<T: HostTransport> Staged<T> {
    /// Every rank's concatenated `bufs` (as f32), in rank order; checks that every rank sent as many
    /// values and buffers of the same kind (with or without a master copy, as NCCL requires).
    fn gather_bufs<B: Buffers>(&self, backend: &B, bufs: &[&mut B::Buf], what: &str) -> Result<Vec<Vec<f32>>> {
        self.gather(backend, bufs, what, true)
    }

    /// [`Self::gather_bufs`], checking the master flags only when `same_masters`.
    fn gather<B: Buffers>(
        &self,
        backend: &B,
        bufs: &[&mut B::Buf],
        what: &str,
        same_masters: bool,
    ) -> Result<Vec<Vec<f32>>> {
        // The message: one master flag per buffer (all zero when they may differ), then the values.
        let flags: Vec<u8> = bufs.iter().map(|buf| u8::from(same_masters && backend.has_master(buf))).collect();
        let mut message = flags.clone();
        for buf in bufs {
            message.extend(bytemuck::cast_slice::<f32, u8>(&backend.download(buf)?));
        }
        let gathered = self.0.all_gather(&message)?;
        let me = self.0.rank();
        gathered
            .iter()
            .enumerate()
            .map(|(rank, bytes)| {
                ensure!(
                    bytes.len() == message.len(),
                    "{what}: rank {rank} sent {} values, rank {me} {} (the ranks' models or batches differ)",
                    bytes.len().saturating_sub(flags.len()) / 4,
                    (message.len() - flags.len()) / 4
                );
                ensure!(
                    bytes[..flags.len()] == flags[..],
                    "{what}: rank {rank}'s buffers differ from rank {me}'s in their master copies"
                );
                let values = &bytes[flags.len()..];
                Ok(values.chunks_exact(4).map(|c| f32::from_ne_bytes(c.try_into().expect("4 bytes"))).collect())
            })
            .collect()
    }
}

/// Sums `parts` element-wise in their order.
fn sum_in_order(parts: &[Vec<f32>]) -> Vec<f32> {
    let mut sum = parts[0].clone();
    for part in &parts[1..] {
        for (s, x) in sum.iter_mut().zip(part) {
            *s += x;
        }
    }
    sum
}

/// Uploads consecutive pieces of `flat` into `bufs` (f32 gradients stay f32: `Buffers::replace`).
fn scatter_into<B: Buffers>(backend: &B, bufs: &mut [&mut B::Buf], flat: &[f32]) -> Result<()> {
    let mut offset = 0;
    for buf in bufs.iter_mut() {
        let len = backend.buf_len(buf);
        backend.replace(buf, &flat[offset..offset + len])?;
        offset += len;
    }
    Ok(())
}

impl<B: Buffers, T: HostTransport> Collective<B> for Staged<T> {
    fn rank(&self) -> usize {
        self.0.rank()
    }

    fn world_size(&self) -> usize {
        self.0.world_size()
    }

    fn all_reduce_sum(&self, backend: &B, bufs: &mut [&mut B::Buf]) -> Result<()> {
        let parts = self.gather_bufs(backend, bufs, "all_reduce_sum")?;
        scatter_into(backend, bufs, &sum_in_order(&parts))
    }

    fn reduce_sum(&self, backend: &B, bufs: &mut [&mut B::Buf], root: usize) -> Result<()> {
        ensure!(root < self.0.world_size(), "reduce_sum: root {root} outside a group of {}", self.0.world_size());
        let parts = self.gather_bufs(backend, bufs, "reduce_sum")?;
        if self.0.rank() == root {
            scatter_into(backend, bufs, &sum_in_order(&parts))?;
        }
        Ok(())
    }

    fn broadcast(&self, backend: &B, bufs: &mut [&mut B::Buf], root: usize) -> Result<()> {
        ensure!(root < self.0.world_size(), "broadcast: root {root} outside a group of {}", self.0.world_size());
        let parts = self.gather_bufs(backend, bufs, "broadcast")?;
        if self.0.rank() != root {
            scatter_into(backend, bufs, &parts[root])?;
        }
        Ok(())
    }

    fn broadcast_values(&self, backend: &B, bufs: &mut [&mut B::Buf], root: usize) -> Result<()> {
        ensure!(root < self.0.world_size(), "broadcast_values: root {root} outside a group of {}", self.0.world_size());
        // The root's master copy rounds to exactly its storage (the optimizer writes the storage
        // from it), so `upload_frozen` of it gives the others the root's storage bits.
        let parts = self.gather(backend, bufs, "broadcast_values", false)?;
        if self.0.rank() != root {
            let mut offset = 0;
            for buf in bufs.iter_mut() {
                let len = backend.buf_len(buf);
                **buf = backend.upload_frozen(&parts[root][offset..offset + len])?;
                offset += len;
            }
        }
        Ok(())
    }

    fn all_reduce_host(&self, values: &mut [f64]) -> Result<()> {
        let gathered = self.0.all_gather(bytemuck::cast_slice(values)).context("all_reduce_host")?;
        let mut sum = vec![0.0f64; values.len()];
        for (rank, bytes) in gathered.iter().enumerate() {
            ensure!(
                bytes.len() == values.len() * 8,
                "all_reduce_host: rank {rank} sent {} values, rank {} {}",
                bytes.len() / 8,
                self.0.rank(),
                values.len()
            );
            let theirs = bytes.chunks_exact(8).map(|c| f64::from_ne_bytes(c.try_into().expect("8 bytes")));
            for (s, x) in sum.iter_mut().zip(theirs) {
                *s += x;
            }
        }
        values.copy_from_slice(&sum);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.0.all_gather(&[]).map(|_| ())
    }
}

/// The group of one: every collective is the identity. What a run without data parallelism uses.
pub struct SingleRank;

impl<B: Buffers> Collective<B> for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &B, _: &mut [&mut B::Buf]) -> Result<()> {
        Ok(())
    }
    fn reduce_sum(&self, _: &B, _: &mut [&mut B::Buf], root: usize) -> Result<()> {
        ensure!(root == 0, "reduce_sum: root {root} outside a group of 1");
        Ok(())
    }
    fn broadcast(&self, _: &B, _: &mut [&mut B::Buf], root: usize) -> Result<()> {
        ensure!(root == 0, "broadcast: root {root} outside a group of 1");
        Ok(())
    }
    fn broadcast_values(&self, _: &B, _: &mut [&mut B::Buf], root: usize) -> Result<()> {
        ensure!(root == 0, "broadcast_values: root {root} outside a group of 1");
        Ok(())
    }
    fn all_reduce_host(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}
