//! A process joins the group its environment describes ([`RankEnv`]): the TCP rendezvous, then this
//! rank's backend (GPU `LOCAL_RANK` on `cuda`), then the collectives: NCCL on a GPU, the TCP
//! transport staged through host memory ([`Staged`]) on the CPU and the emulated device.
//!
//! Every rank reports whether its backend opened before any collective starts, so a rank that cannot
//! (a missing GPU, more ranks on a node than GPUs) ends every rank with its reason, instead of the
//! others waiting for it.

use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};

use super::env::RankEnv;
use super::rendezvous::Rendezvous;
use super::tcp::TcpTransport;
use super::{Collective, GroupBroken, HostTransport, Staged};
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaBackend, Device};
use crate::backend::device::{gpu_unavailable_reason, precision_for, select_backend, AnyBackend};
use crate::backend::DeviceKind;

/// This rank's backend and its group.
pub enum RankGroup {
    Cpu(Arc<CpuBackend>, Arc<dyn Collective<CpuBackend>>),
    Cuda(Arc<CudaBackend>, Arc<dyn Collective<CudaBackend>>),
}

impl RankGroup {
    pub fn rank(&self) -> usize {
        match self {
            RankGroup::Cpu(_, group) => group.rank(),
            RankGroup::Cuda(_, group) => group.rank(),
        }
    }

    pub fn world_size(&self) -> usize {
        match self {
            RankGroup::Cpu(_, group) => group.world_size(),
            RankGroup::Cuda(_, group) => group.world_size(),
        }
    }

    /// The backend's name and how the ranks talk, e.g. "cpu (f32), TCP".
    pub fn describe(&self) -> String {
        use crate::backend::Buffers;
        match self {
            RankGroup::Cpu(backend, _) => format!("{}, TCP", backend.name()),
            RankGroup::Cuda(backend, _) if backend.device().is_emulated() => format!("{}, TCP", backend.name()),
            RankGroup::Cuda(backend, _) => format!("{}, NCCL", backend.name()),
        }
    }
}

/// Joins the group of `env` with a backend of kind `device` (`auto`: the GPUs when usable, else the
/// CPU, alike on every rank of a node).
pub fn join_group(device: DeviceKind, env: &RankEnv) -> Result<RankGroup> {
    let transport = Rendezvous::from_env(env)?.join()?;
    let opened = open_backend(device, env);
    let status = match &opened {
        Ok(_) => String::new(),
        Err(e) => format!("rank {}: {e:#}", env.rank),
    };
    let all = transport.all_gather(status.as_bytes()).context("reporting the backends")?;
    let opened = opened?;
    if let Some(why) = all.iter().find(|s| !s.is_empty()) {
        return Err(GroupBroken(String::from_utf8_lossy(why).into_owned()).into());
    }
    Ok(match opened {
        AnyBackend::Cpu(backend) => RankGroup::Cpu(backend, Arc::new(Staged(transport))),
        AnyBackend::Cuda(backend) if backend.device().is_emulated() => {
            RankGroup::Cuda(backend, Arc::new(Staged(transport)))
        }
        AnyBackend::Cuda(backend) => {
            let group = nccl_group(&backend, transport)?;
            RankGroup::Cuda(backend, group)
        }
    })
}

/// The backend of this rank: `cpu` and `emu` as for one process; on `cuda` GPU `LOCAL_RANK`, once
/// the node is known to have a GPU for each of its ranks.
fn open_backend(device: DeviceKind, env: &RankEnv) -> Result<AnyBackend> {
    if matches!(device, DeviceKind::Cpu | DeviceKind::Emu) {
        return select_backend(device);
    }
    if let Some(reason) = gpu_unavailable_reason() {
        ensure!(device != DeviceKind::Cuda, "--device cuda: {reason}");
        if env.rank == 0 {
            eprintln!("device auto: the ranks run on the CPU ({reason})");
        }
        return Ok(AnyBackend::Cpu(Arc::new(CpuBackend::new())));
    }
    let count = gpu_count()?;
    ensure!(
        env.local_world_size <= count,
        "{} ranks on this node (LOCAL_WORLD_SIZE, or --gpus) but {count} GPU(s) visible: one GPU per rank",
        env.local_world_size
    );
    let device = Device::gpu(env.local_rank).with_context(|| format!("opening GPU {} (LOCAL_RANK)", env.local_rank))?;
    let precision = precision_for(&device);
    Ok(AnyBackend::Cuda(Arc::new(CudaBackend::new(device, precision))))
}

/// The GPUs this process sees (`CUDA_VISIBLE_DEVICES` applies).
#[cfg(feature = "cuda")]
pub(crate) fn gpu_count() -> Result<usize> {
    super::nccl::gpu_count()
}

#[cfg(feature = "cuda")]
fn nccl_group(backend: &CudaBackend, transport: TcpTransport) -> Result<Arc<dyn Collective<CudaBackend>>> {
    Ok(Arc::new(super::nccl::NcclGroup::new(backend, transport)?))
}

// Without the `cuda` feature there is no GPU to count or to run NCCL on (`gpu_unavailable_reason`
// stops `open_backend` before either is needed).
#[cfg(not(feature = "cuda"))]
pub(crate) fn gpu_count() -> Result<usize> {
    Ok(0)
}

#[cfg(not(feature = "cuda"))]
fn nccl_group(_: &CudaBackend, _: TcpTransport) -> Result<Arc<dyn Collective<CudaBackend>>> {
    bail!("{}", crate::backend::cuda::gpu::NOT_BUILT)
}

/// `safedpo dist-check`: joins the group the environment describes, sums values over it (host values,
/// and a buffer on the backend: NCCL on a GPU) and prints one line per rank. `fail_rank` exits that
/// rank with an error once it joined (to see how a job ends).
pub fn dist_check(device: DeviceKind, fail_rank: Option<usize>) -> Result<()> {
    let env = RankEnv::from_env()?.context(
        "no group in the environment (WORLD_SIZE or SLURM_NTASKS): run it under `safedpo launch`, torchrun or srun",
    )?;
    let group = join_group(device, &env)?;
    if fail_rank == Some(env.rank) {
        bail!("rank {}: failing as asked (--fail-rank)", env.rank);
    }
    match &group {
        RankGroup::Cpu(backend, collective) => check_sums(backend.as_ref(), collective.as_ref())?,
        RankGroup::Cuda(backend, collective) => check_sums(backend.as_ref(), collective.as_ref())?,
    }
    println!("{env}: {}; the sums over the ranks are right", group.describe());
    Ok(())
}

fn check_sums<B: crate::backend::Buffers>(backend: &B, group: &dyn Collective<B>) -> Result<()> {
    let (rank, n) = (group.rank() as f64, group.world_size() as f64);
    let expected = [n, n * (n - 1.0) / 2.0];
    let mut host = [1.0, rank];
    group.all_reduce_host(&mut host)?;
    ensure!(host == expected, "the host sum over the ranks is {host:?}, not {expected:?}");
    let mut buf = backend.upload(&[1.0, rank as f32])?;
    group.all_reduce_sum(backend, &mut [&mut buf])?;
    let summed = backend.download(&buf)?;
    ensure!(summed == [n as f32, expected[1] as f32], "the buffer sum over the ranks is {summed:?}, not {expected:?}");
    group.barrier()
}
