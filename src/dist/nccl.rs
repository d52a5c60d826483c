//! [`Collective`] on NCCL: one process per GPU, the collectives queued on the backend's stream and
//! run on the buffers' device memory in place (no host copy).
//!
//! The communicator is made from NCCL's unique id, which rank 0 creates and sends to the others
//! through the group's TCP connections; the same connections carry the host values
//! (`all_reduce_host`, `barrier`: exact, in rank order) and, before every buffer collective, each
//! rank's list of buffer lengths and types, so that ranks whose models differ fail with an error
//! naming the rank instead of NCCL reducing unrelated memory (or waiting forever).
//!
//! What is reduced: a buffer with an fp32 master copy (a bf16 parameter) is summed in its master and
//! its bf16 values are rewritten from the sum; any other buffer in its own storage type (f32, or
//! bf16 as gradients are stored in bf16 mode, summed by NCCL in bf16). A broadcast copies both the
//! values and the master. NCCL's sum order is its own (ring or tree), fixed for a world size and a
//! topology, and every rank of an all-reduce gets the same bits; it is not the rank order of
//! [`Staged`](super::Staged). Many buffers in one call go to NCCL as one group (`ncclGroupStart` …
//! `ncclGroupEnd`), which it runs as one fused launch: the buckets are the caller's lists.

use std::ffi::CStr;
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::nccl::{result as nccl, sys};

use super::tcp::TcpTransport;
use super::{Collective, HostTransport, Staged};
use crate::backend::cuda::collective::RawParts;
use crate::backend::cuda::gpu::Gpu;
use crate::backend::cuda::{CudaBackend, CudaBuf, Dtype};
use crate::backend::Buffers;

/// NCCL has a limit on the operations of one group; a list longer than this goes as several groups.
const MAX_OPS_PER_GROUP: usize = 512;

/// One rank of a group of processes, each with its own GPU, on NCCL.
pub struct NcclGroup {
    comm: sys::ncclComm_t,
    gpu: Arc<Gpu>,
    /// The TCP connections of the rendezvous: host values and the buffer-layout check.
    host: Staged<TcpTransport>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as the calls on it do not
// overlap; `Collective` is called by one thread per rank, in the same order on every rank.
unsafe impl Send for NcclGroup {}
unsafe impl Sync for NcclGroup {}

/// Whether libnccl can be loaded (NCCL is loaded at run time, like the CUDA libraries).
pub fn nccl_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { sys::is_culib_present() }
}

/// The number of GPUs the driver sees.
pub fn gpu_count() -> Result<usize> {
    cudarc::driver::CudaContext::device_count().map(|n| n as usize).map_err(|e| anyhow!("counting the GPUs: {e}"))
}

fn nccl_error(comm: Option<sys::ncclComm_t>, error: nccl::NcclError) -> anyhow::Error {
    // SAFETY: both return static or communicator-owned C strings (or null).
    let text = |ptr: *const std::ffi::c_char| {
        (!ptr.is_null()).then(|| unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into_owned())
    };
    let what = text(unsafe { sys::ncclGetErrorString(error.0) }).unwrap_or_else(|| format!("{:?}", error.0));
    let last = text(unsafe { sys::ncclGetLastError(comm.unwrap_or(std::ptr::null_mut())) }).unwrap_or_default();
    if last.is_empty() {
        anyhow!("NCCL: {what}")
    } else {
        anyhow!("NCCL: {what} ({last})")
    }
}

fn nccl_type(dtype: Dtype) -> Result<sys::ncclDataType_t> {
    Ok(match dtype {
        Dtype::F32 => sys::ncclDataType_t::ncclFloat32,
        Dtype::Bf16 => sys::ncclDataType_t::ncclBfloat16,
        other => bail!("NCCL collectives on {other:?} buffers are not supported"),
    })
}

impl NcclGroup {
    /// The communicator of `transport`'s group on `backend`'s GPU (every rank calls it; rank 0's
    /// unique id goes to the others over `transport`).
    pub fn new(backend: &CudaBackend, transport: TcpTransport) -> Result<Self> {
        let rank = transport.rank();
        let world_size = transport.world_size();
        let gpu =
            backend.gpu().context("NCCL runs on GPUs; the emulated device's ranks use the TCP transport")?.clone();
        let ready = if nccl_available() {
            String::new()
        } else {
            format!("rank {rank}: libnccl.so.2 could not be loaded: install NCCL or put its folder on LD_LIBRARY_PATH")
        };
        // Every rank says whether it can go on, so that none waits in NCCL for a rank that cannot.
        let states = transport.all_gather(ready.as_bytes())?;
        if let Some(why) = states.iter().find(|s| !s.is_empty()) {
            bail!("{}", String::from_utf8_lossy(why));
        }
        let id = if rank == 0 {
            let id = nccl::get_uniqueid().map_err(|e| nccl_error(None, e))?;
            id.internal.iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let ids = transport.all_gather(&id).context("sending NCCL's unique id")?;
        ensure!(ids[0].len() == 128, "rank 0 sent an NCCL unique id of {} bytes, not 128", ids[0].len());
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (to, &from) in id.internal.iter_mut().zip(&ids[0]) {
            *to = from as std::ffi::c_char;
        }
        gpu.bind()?;
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: comm is written by NCCL on success; the context of this rank's GPU is current.
        let comm = unsafe {
            nccl::comm_init_rank(comm.as_mut_ptr(), world_size as i32, id, rank as i32)
                .map_err(|e| nccl_error(None, e))
                .with_context(|| format!("rank {rank}: creating the NCCL communicator on GPU {}", gpu.ordinal()))?;
            comm.assume_init()
        };
        Ok(Self { comm, gpu, host: Staged(transport) })
    }

    /// Checks that every rank passes buffers of the same lengths, types and master copies, naming the
    /// first rank that differs from this one.
    fn check_layout(&self, what: &str, parts: &[RawParts]) -> Result<()> {
        let mut layout = Vec::with_capacity(parts.len() * 10);
        for part in parts {
            layout.extend((part.len as u64).to_le_bytes());
            layout.push(part.dtype as u8);
            layout.push(u8::from(part.master.is_some()));
        }
        let all = self.host.0.all_gather(&layout).with_context(|| format!("{what}: the buffer check"))?;
        let me = self.host.0.rank();
        if let Some(other) = all.iter().position(|theirs| *theirs != layout) {
            bail!("{what}: rank {other}'s buffers differ from rank {me}'s in length, type or master copy (the ranks' models or batches differ)");
        }
        Ok(())
    }

    /// Runs `op` on each (pointer, length, type) in NCCL groups, on the backend's stream.
    fn grouped(
        &self,
        targets: &[(u64, usize, Dtype)],
        mut op: impl FnMut(u64, usize, sys::ncclDataType_t, sys::cudaStream_t) -> Result<(), nccl::NcclError>,
    ) -> Result<()> {
        self.gpu.bind()?;
        let stream = self.gpu.cu_stream() as sys::cudaStream_t;
        for chunk in targets.chunks(MAX_OPS_PER_GROUP) {
            nccl::group_start().map_err(|e| nccl_error(Some(self.comm), e))?;
            let mut result = Ok(());
            for &(ptr, len, dtype) in chunk.iter().filter(|t| t.1 > 0) {
                result =
                    nccl_type(dtype).and_then(|t| op(ptr, len, t, stream).map_err(|e| nccl_error(Some(self.comm), e)));
                if result.is_err() {
                    break;
                }
            }
            let ended = nccl::group_end().map_err(|e| nccl_error(Some(self.comm), e));
            result?;
            ended?;
        }
        Ok(())
    }

    /// What a sum works on: a buffer's master when it has one, else its values.
    fn sum_targets(parts: &[RawParts]) -> Vec<(u64, usize, Dtype)> {
        parts
            .iter()
            .map(|p| match p.master {
                Some(master) => (master, p.len, Dtype::F32),
                None => (p.storage, p.len, p.dtype),
            })
            .collect()
    }

    fn refresh_from_masters(backend: &CudaBackend, bufs: &mut [&mut CudaBuf]) -> Result<()> {
        for buf in bufs.iter_mut().filter(|b| b.has_master()) {
            backend.storage_from_master(buf)?;
        }
        Ok(())
    }

    fn check_root(&self, what: &str, root: usize) -> Result<()> {
        ensure!(root < self.host.0.world_size(), "{what}: root {root} outside a group of {}", self.host.0.world_size());
        Ok(())
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        // SAFETY: our communicator, destroyed once; abort (not destroy) does not wait for peers that
        // may be gone.
        unsafe {
            let _ = nccl::comm_abort(self.comm);
        }
    }
}

impl Collective<CudaBackend> for NcclGroup {
    fn rank(&self) -> usize {
        self.host.0.rank()
    }

    fn world_size(&self) -> usize {
        self.host.0.world_size()
    }

    fn all_reduce_sum(&self, backend: &CudaBackend, bufs: &mut [&mut CudaBuf]) -> Result<()> {
        let parts: Vec<RawParts> = bufs.iter().map(|b| b.raw_parts()).collect();
        self.check_layout("all_reduce_sum", &parts)?;
        let comm = self.comm;
        self.grouped(&Self::sum_targets(&parts), |ptr, len, dtype, stream| {
            // SAFETY: live device memory of `len` elements of `dtype` on this rank's GPU, reduced in place.
            unsafe {
                nccl::all_reduce(ptr as _, ptr as _, len, dtype, sys::ncclRedOp_t::ncclSum, comm, stream).map(|_| ())
            }
        })
        .context("all_reduce_sum")?;
        Self::refresh_from_masters(backend, bufs)
    }

    fn reduce_sum(&self, backend: &CudaBackend, bufs: &mut [&mut CudaBuf], root: usize) -> Result<()> {
        self.check_root("reduce_sum", root)?;
        let parts: Vec<RawParts> = bufs.iter().map(|b| b.raw_parts()).collect();
        self.check_layout("reduce_sum", &parts)?;
        let comm = self.comm;
        self.grouped(&Self::sum_targets(&parts), |ptr, len, dtype, stream| {
            // SAFETY: as in all_reduce_sum; off the root NCCL only reads the buffer.
            unsafe {
                nccl::reduce(ptr as _, ptr as _, len, dtype, sys::ncclRedOp_t::ncclSum, root as i32, comm, stream)
                    .map(|_| ())
            }
        })
        .context("reduce_sum")?;
        if self.rank() == root {
            Self::refresh_from_masters(backend, bufs)?;
        }
        Ok(())
    }

    fn broadcast(&self, _: &CudaBackend, bufs: &mut [&mut CudaBuf], root: usize) -> Result<()> {
        self.check_root("broadcast", root)?;
        let parts: Vec<RawParts> = bufs.iter().map(|b| b.raw_parts()).collect();
        self.check_layout("broadcast", &parts)?;
        let mut targets: Vec<(u64, usize, Dtype)> = parts.iter().map(|p| (p.storage, p.len, p.dtype)).collect();
        targets.extend(parts.iter().filter_map(|p| p.master.map(|m| (m, p.len, Dtype::F32))));
        let comm = self.comm;
        self.grouped(&targets, |ptr, len, dtype, stream| {
            // SAFETY: as in all_reduce_sum; the root's buffer is read, the others' written.
            unsafe { nccl::broadcast(ptr as _, ptr as _, len, dtype, root as i32, comm, stream).map(|_| ()) }
        })
        .context("broadcast")
    }

    fn broadcast_values(&self, backend: &CudaBackend, bufs: &mut [&mut CudaBuf], root: usize) -> Result<()> {
        self.check_root("broadcast_values", root)?;
        let parts: Vec<RawParts> = bufs.iter().map(|b| b.raw_parts()).collect();
        // The storage alone: masters may differ (the root keeps one, the others none).
        let unmastered: Vec<RawParts> = parts.iter().map(|p| RawParts { master: None, ..*p }).collect();
        self.check_layout("broadcast_values", &unmastered)?;
        let targets: Vec<(u64, usize, Dtype)> = parts.iter().map(|p| (p.storage, p.len, p.dtype)).collect();
        let comm = self.comm;
        self.grouped(&targets, |ptr, len, dtype, stream| {
            // SAFETY: as in all_reduce_sum; the root's buffer is read, the others' written.
            unsafe { nccl::broadcast(ptr as _, ptr as _, len, dtype, root as i32, comm, stream).map(|_| ()) }
        })
        .context("broadcast_values")?;
        if self.rank() != root {
            for buf in bufs.iter_mut() {
                backend.drop_master(buf);
            }
        }
        Ok(())
    }

    fn all_reduce_host(&self, values: &mut [f64]) -> Result<()> {
        Collective::<CudaBackend>::all_reduce_host(&self.host, values)
    }

    fn barrier(&self) -> Result<()> {
        Collective::<CudaBackend>::barrier(&self.host)
    }
}

#[cfg(test)]
mod tests {
    //! Ranks on GPUs 0, 1, … as threads of this process over loopback TCP. Run with
    //! `cargo test --release --lib nccl -- --ignored` on a machine with NCCL (two GPUs for the
    //! two-rank tests).

    use std::net::TcpListener;
    use std::time::Duration;

    use super::*;
    use crate::backend::cuda::{Device, Precision};
    use crate::backend::Buffers;
    use crate::dist::rendezvous::Rendezvous;

    fn ranks<T: Send>(world_size: usize, body: impl Fn(&CudaBackend, &NcclGroup) -> T + Sync) -> Vec<T> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let listener = std::sync::Mutex::new(Some(listener));
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..world_size)
                .map(|rank| {
                    let (body, listener) = (&body, &listener);
                    s.spawn(move || {
                        let rendezvous = Rendezvous {
                            rank,
                            world_size,
                            master_addr: "127.0.0.1".into(),
                            master_port: port,
                            run_id: "nccl-test".into(),
                            timeout: Duration::from_secs(30),
                            collective_timeout: Duration::from_secs(60),
                        };
                        let transport = if rank == 0 {
                            rendezvous.join_as_root(listener.lock().unwrap().take().unwrap()).unwrap()
                        } else {
                            rendezvous.join().unwrap()
                        };
                        let backend = CudaBackend::new(Device::gpu(rank).unwrap(), Precision::Bf16);
                        let group = NcclGroup::new(&backend, transport).unwrap();
                        body(&backend, &group)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    #[ignore = "needs two GPUs and NCCL"]
    fn all_reduce_broadcast_and_reduce_on_two_gpus() {
        let results = ranks(2, |b, group| {
            let r = group.rank() as f32;
            // A parameter (bf16 + f32 master) and bf16 buffers without one.
            let mut param = b.upload(&[1.0 + r, 0.1 * r, 3.0]).unwrap();
            let mut plain = b.zeros(2).unwrap();
            b.fill(&mut plain, 2.0 + r).unwrap();
            let mut grad = b.zeros(4).unwrap();
            b.fill(&mut grad, 0.5 * (r + 1.0)).unwrap();
            group.all_reduce_sum(b, &mut [&mut param, &mut grad]).unwrap();
            let summed = (b.download(&param).unwrap(), b.download(&grad).unwrap());
            let mut values = [r as f64 + 0.25];
            group.all_reduce_host(&mut values).unwrap();
            group.broadcast(b, &mut [&mut plain, &mut param], 1).unwrap();
            let broadcast = b.download(&plain).unwrap();
            let mut to_root = b.upload(&[r + 1.0]).unwrap();
            group.reduce_sum(b, &mut [&mut to_root], 0).unwrap();
            group.barrier().unwrap();
            (summed, values[0], broadcast, b.download(&to_root).unwrap())
        });
        for (rank, ((param, grad), host, broadcast, reduced)) in results.into_iter().enumerate() {
            assert_eq!(param, vec![3.0, 0.1, 6.0], "rank {rank}: the masters' sum");
            assert_eq!(grad, vec![1.5; 4], "rank {rank}");
            assert_eq!(host, 1.5, "rank {rank}");
            assert_eq!(broadcast, vec![3.0; 2], "rank {rank}: rank 1's values");
            assert_eq!(reduced, if rank == 0 { vec![3.0] } else { vec![2.0] }, "rank {rank}");
        }
    }

    #[test]
    #[ignore = "needs two GPUs and NCCL"]
    fn ranks_whose_buffers_differ_fail_by_name() {
        let errors = ranks(2, |b, group| {
            let mut buf = b.zeros(3 + group.rank()).unwrap();
            format!("{:#}", group.all_reduce_sum(b, &mut [&mut buf]).unwrap_err())
        });
        assert!(errors[0].contains("rank 1's buffers differ"), "{}", errors[0]);
        assert!(errors[1].contains("rank 0's buffers differ"), "{}", errors[1]);
    }

    #[test]
    #[ignore = "needs a GPU and NCCL"]
    fn a_group_of_one_on_one_gpu() {
        let results = ranks(1, |b, group| {
            let mut param = b.upload(&[1.0, 0.1, 3.0]).unwrap();
            let mut loss = b.upload(&[0.5]).unwrap();
            group.all_reduce_sum(b, &mut [&mut param, &mut loss]).unwrap();
            group.broadcast(b, &mut [&mut param], 0).unwrap();
            group.reduce_sum(b, &mut [&mut loss], 0).unwrap();
            (b.download(&param).unwrap(), b.download(&loss).unwrap())
        });
        assert_eq!(results, vec![(vec![1.0, 0.1, 3.0], vec![0.5])]);
    }
}
