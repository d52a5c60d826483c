//! `CudaBackend`: the `Backend` trait on a CUDA device (a GPU, or the emulated device that runs the
//! same kernels on the CPU). Every op is one or a few launches of the kernels in `kernels/*.cu` (named
//! `<op>_<dtype>`); matrix products go through [`Device::gemm`] (cuBLASLt on a GPU).
//!
//! This module holds the backend, its buffers, the storage conversions and the `Buffers` impl; each
//! op family's launch plan and `impl <Op>Ops for CudaBackend` is in `ops/<op>.rs`, named as its kernel
//! file.
//!
//! ## Precision
//! - [`Precision::F32`]: every tensor is f32. The emulated device is held to the CPU backend at
//!   f32 tolerances in this mode.
//! - [`Precision::Bf16`]: parameters, activations and gradients are stored in bf16 (all math in f32,
//!   one rounding per store); the LM head's logits (`matmul_forward_f32_out`), LayerNorm statistics,
//!   attention log-sum-exps, token and sequence log-probs, the preference loss, its metrics and
//!   gradients are f32; the optimizer keeps fp32 master weights and fp32 moments.
//!
//! ## Buffers
//! A [`CudaBuf`] holds its values in one storage type (f32 or bf16) and, optionally, an fp32 master
//! copy. The trait's buffers carry no role, so the storage type follows the ops that write them:
//! `zeros` allocates the precision's activation type; an op whose output is f32 by design (a
//! log-prob, a LayerNorm statistic, an optimizer moment) switches that buffer to f32 storage the
//! first time it writes it (converting the values when the op accumulates); an input stored in
//! another type than a kernel wants is converted into a temporary. In F32 mode nothing ever converts.
//!
//! The master copy: in Bf16 mode `upload` keeps the exact f32 data beside the rounded bf16 values, so
//! a checkpoint uploaded and downloaded again is unchanged and the optimizer starts from exact
//! weights; `adamw` and `sgd` update the master and write the bf16 parameter from it (creating it
//! from the bf16 values if absent, as llm.c does). `download` returns the master when there is one.
//! `fill`, `scale` and `copy` keep it consistent; any other op that writes a buffer drops its master
//! (the values would be stale). Optimizer moments uploaded from a checkpoint become f32 storage
//! from their exact master copy, so a resume loses nothing. `upload_frozen` (a frozen model's
//! weights, never updated) keeps no master: the bf16 values alone.
//!
//! A buffer's length is the first `len` elements of its storage: `resize` to a shorter length keeps
//! the storage (and its type) for the next batch, as the CPU backend keeps a `Vec`'s capacity.
//!
//! Gradients: in Bf16 mode a trainer may keep its parameter gradients in f32 storage
//! (`store_in_f32`, `train.grad_dtype`). The ops that write parameter gradients (the matrix
//! products' dweight and dbias, the norms' and the embedding's backward) write a gradient in its own
//! storage type when it is f32 (`launch::grad_dtype`: kernels `<op>_bf16_f32`, GEMMs of bf16
//! operands into an f32 D), so every micro-batch's contribution is added in f32 and rounded to f32;
//! the optimizer and the grad norm read them as stored. No extra pass: the accumulator is the
//! gradient itself (2 more bytes per parameter than bf16 gradients).
//!
//! ## Determinism
//! No kernel uses float atomics; every reduction has a fixed order that depends only on the shapes
//! (see each kernel file's header). Two runs give bit-identical results.

use std::fmt;
use std::ops::Deref;
use std::str::FromStr;
use std::sync::Mutex;

use anyhow::{bail, ensure, Context, Result};
use half::bf16;

use super::launch::grid_stride_config;
use super::tensor_table::TensorTables;
use super::{Device, DeviceBuffer, DeviceScalar, Dtype, KernelArg, LaunchConfig};
use crate::backend::{checks, Buffers, MemoryStats, Packing};

/// Storage precision of a [`CudaBackend`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Everything f32: the mode the emulated device is checked in against the CPU backend.
    F32,
    /// bf16 parameters, activations and gradients; f32 logits; fp32 master weights, optimizer state,
    /// statistics, log-probs and loss.
    Bf16,
}

impl Precision {
    /// The storage type of parameters and activations.
    pub fn activation_dtype(self) -> Dtype {
        match self {
            Precision::F32 => Dtype::F32,
            Precision::Bf16 => Dtype::Bf16,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => bail!("unknown precision `{other}`: expected f32 or bf16"),
        }
    }
}

// ---- buffers -----------------------------------------------------------------------------------------

/// Device values in one of the two float storage types.
pub(super) enum Storage {
    F32(DeviceBuffer<f32>),
    Bf16(DeviceBuffer<bf16>),
}

impl Storage {
    pub(super) fn dtype(&self) -> Dtype {
        match self {
            Storage::F32(_) => Dtype::F32,
            Storage::Bf16(_) => Dtype::Bf16,
        }
    }
    /// Elements allocated (at least the owning buffer's length, see `Backend::resize`).
    pub(super) fn capacity(&self) -> usize {
        match self {
            Storage::F32(b) => b.len(),
            Storage::Bf16(b) => b.len(),
        }
    }
    pub(super) fn ptr(&self) -> u64 {
        match self {
            Storage::F32(b) => b.device_ptr(),
            Storage::Bf16(b) => b.device_ptr(),
        }
    }
    pub(super) fn arg(&self) -> KernelArg {
        KernelArg::Ptr(self.ptr())
    }
}

/// A float tensor of the CUDA backend: its values in f32 or bf16 storage, and optionally an fp32
/// master copy (see the module documentation).
pub struct CudaBuf {
    /// Number of elements: the first `len` of `storage` (and of `master`), whose capacity may be
    /// larger after a `resize` to a shorter length.
    pub(super) len: usize,
    pub(super) storage: Storage,
    pub(super) master: Option<DeviceBuffer<f32>>,
}

impl CudaBuf {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The storage type of the values (`Dtype::F32` or `Dtype::Bf16`).
    pub fn dtype(&self) -> Dtype {
        self.storage.dtype()
    }
    /// Whether the buffer carries an fp32 master copy.
    pub fn has_master(&self) -> bool {
        self.master.is_some()
    }
}

impl fmt::Debug for CudaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CudaBuf[{} × {:?}{}]",
            self.len(),
            self.dtype(),
            if self.has_master() { " + f32 master" } else { "" }
        )
    }
}

/// An i32 tensor on the device, with the host copy it was uploaded from (ids are never written by
/// kernels), so that launch planning (embedding buckets, id checks) needs no read-back.
pub struct CudaIds {
    pub(super) device: DeviceBuffer<i32>,
    pub(super) host: Vec<i32>,
}

impl CudaIds {
    /// The values, as uploaded.
    pub fn host(&self) -> &[i32] {
        &self.host
    }
    pub(super) fn arg(&self) -> KernelArg {
        KernelArg::Ptr(self.device.device_ptr())
    }
}

/// A borrowed or temporary device buffer.
pub(super) enum Held<'a, T: DeviceScalar> {
    Borrowed(&'a DeviceBuffer<T>),
    Owned(DeviceBuffer<T>),
}

impl<T: DeviceScalar> Deref for Held<'_, T> {
    type Target = DeviceBuffer<T>;
    fn deref(&self) -> &DeviceBuffer<T> {
        match self {
            Held::Borrowed(b) => b,
            Held::Owned(b) => b,
        }
    }
}

/// A tensor as a kernel reads it: in the storage type the kernel wants, borrowed when the tensor
/// already has it, else converted into a temporary that lives as long as the operand.
pub(super) enum Operand<'a> {
    F32(Held<'a, f32>),
    Bf16(Held<'a, bf16>),
}

impl Operand<'_> {
    pub(super) fn ptr(&self) -> u64 {
        match self {
            Operand::F32(b) => b.device_ptr(),
            Operand::Bf16(b) => b.device_ptr(),
        }
    }
    pub(super) fn arg(&self) -> KernelArg {
        KernelArg::Ptr(self.ptr())
    }
}

// ---- the backend ---------------------------------------------------------------------------------------

/// The CUDA backend: a device and a precision mode.
pub struct CudaBackend {
    pub(super) device: Device,
    precision: Precision,
    /// Vectors of ones (f32 and bf16), grown on demand: the bias gradient is `ones[1, n] · dout`
    /// (`ops/matmul.rs`).
    pub(super) ones_f32: Mutex<Option<DeviceBuffer<f32>>>,
    pub(super) ones_bf16: Mutex<Option<DeviceBuffer<bf16>>>,
    /// Which attention kernels bf16 at head dims 64 and 128 may run (see [`AttentionKernels`]).
    attention_kernels: AttentionKernels,
    /// The multi-tensor launches' descriptor tables (optimizer, grad norm), kept while unchanged.
    pub(super) tensor_tables: TensorTables,
    /// The grid-arrival counter of the norms' fused backward (`publish_block_partials`,
    /// kernels/common.cuh), zeroed once when made: each launch's last block sets it back to zero,
    /// so that no launch needs a memset before it ([`CudaBackend::with_block_counter`]).
    block_counter: Mutex<Option<DeviceBuffer<u32>>>,
}

/// The attention kernels a [`CudaBackend`] picks from. `Auto` (the default) runs bf16 at head dims
/// 64 and 128 on tensor cores (kernels/attention_mma.cu) and everything else on the portable
/// kernels (kernels/attention.cu); `Portable` runs the portable kernels always, to compare the two
/// in one process (benchmarks, tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionKernels {
    #[default]
    Auto,
    Portable,
}

/// Checks that the device copy of `cu_seqlens` matches the host copy (the op's shared checks in
/// [`checks`] validated the host copy).
pub(super) fn check_device_cu_seqlens(op: &str, packing: &Packing<CudaBackend>) -> Result<()> {
    checks::check_len(op, "cu_seqlens (device)", packing.cu_seqlens.device.len(), packing.host_cu_seqlens.len())
}

impl CudaBackend {
    /// A backend on `device` (a GPU or the emulated device) storing tensors as `precision` says.
    pub fn new(device: Device, precision: Precision) -> Self {
        Self {
            device,
            precision,
            ones_f32: Mutex::new(None),
            ones_bf16: Mutex::new(None),
            attention_kernels: AttentionKernels::Auto,
            tensor_tables: TensorTables::default(),
            block_counter: Mutex::new(None),
        }
    }

    /// Runs `launch` with the norms' block counter (zero before every launch: see the field), held
    /// until the launch is queued; the launches of one device run in stream order, so one counter
    /// serves them all. A launch that fails may have left it mid-count: it is made again.
    pub(super) fn with_block_counter<R>(&self, launch: impl FnOnce(KernelArg) -> Result<R>) -> Result<R> {
        let mut slot = self.block_counter.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if slot.is_none() {
            *slot = Some(self.device.alloc_zeros::<u32>(1)?);
        }
        let counter = slot.as_ref().expect("made above").device_ptr();
        let result = launch(KernelArg::Ptr(counter));
        if result.is_err() {
            *slot = None;
        }
        result
    }

    /// The norms' block counter's address and value, once made (tests: it stays in place and at
    /// zero between launches).
    #[doc(hidden)]
    pub fn block_counter_state(&self) -> Result<Option<(u64, u32)>> {
        let slot = self.block_counter.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match slot.as_ref() {
            Some(counter) => Ok(Some((counter.device_ptr(), self.device.download(counter)?[0]))),
            None => Ok(None),
        }
    }

    /// This backend with the attention kernels `kernels` (default [`AttentionKernels::Auto`]).
    pub fn with_attention_kernels(mut self, kernels: AttentionKernels) -> Self {
        self.attention_kernels = kernels;
        self
    }

    /// Which attention kernels this backend may pick from.
    pub fn attention_kernels(&self) -> AttentionKernels {
        self.attention_kernels
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Writes `data` into elements `offset..offset + data.len()` of `buf`, rounded to its storage
    /// type (and exactly into its master copy, where it has one): part of a buffer too large to
    /// copy whole (tests of offsets past 2^31 elements).
    pub fn write_range(&self, buf: &mut CudaBuf, offset: usize, data: &[f32]) -> Result<()> {
        let end = offset.checked_add(data.len()).filter(|&end| end <= buf.len);
        ensure!(end.is_some(), "write_range: {}+{} outside a buffer of {}", offset, data.len(), buf.len);
        let range = offset..offset + data.len();
        if let Some(master) = &mut buf.master {
            self.device.copy_in(master.slice_mut(range.clone()), data)?;
        }
        match &mut buf.storage {
            Storage::F32(b) => self.device.copy_in(b.slice_mut(range), data),
            Storage::Bf16(b) => {
                let rounded: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                self.device.copy_in(b.slice_mut(range), &rounded)
            }
        }
    }

    /// Elements `range` of `buf` as the kernels read them (its storage, not its master copy).
    pub fn read_range(&self, buf: &CudaBuf, range: std::ops::Range<usize>) -> Result<Vec<f32>> {
        ensure!(
            range.start <= range.end && range.end <= buf.len,
            "read_range: {range:?} outside a buffer of {}",
            buf.len
        );
        match &buf.storage {
            Storage::F32(b) => self.device.download(b.slice(range)),
            Storage::Bf16(b) => Ok(self.device.download(b.slice(range))?.into_iter().map(f32::from).collect()),
        }
    }

    /// The storage type of parameters and activations in this backend's precision.
    pub(super) fn act(&self) -> Dtype {
        self.precision.activation_dtype()
    }

    pub(super) fn launch(&self, name: &str, config: LaunchConfig, args: &[KernelArg]) -> Result<()> {
        self.device.launch(name, config, args).with_context(|| format!("kernel `{name}`"))
    }

    /// New storage of `len` elements of `dtype`, contents unspecified.
    pub(super) fn alloc(&self, dtype: Dtype, len: usize) -> Result<Storage> {
        Ok(match dtype {
            Dtype::F32 => Storage::F32(self.device.alloc(len)?),
            Dtype::Bf16 => Storage::Bf16(self.device.alloc(len)?),
            other => bail!("the CUDA backend stores floats as f32 or bf16, not {other:?}"),
        })
    }

    /// The first `n` elements of `src` converted to `dtype`, in new storage of `n` elements.
    pub(super) fn convert(&self, src: &Storage, n: usize, dtype: Dtype) -> Result<Storage> {
        let mut dst = self.alloc(dtype, n)?;
        match (src, &mut dst) {
            (Storage::F32(s), Storage::F32(d)) => self.device.copy(d, s.slice(..n))?,
            (Storage::Bf16(s), Storage::Bf16(d)) => self.device.copy(d, s.slice(..n))?,
            (Storage::F32(s), Storage::Bf16(d)) if n > 0 => self.launch(
                "convert_f32_to_bf16",
                grid_stride_config(n),
                &[KernelArg::Ptr(d.device_ptr()), KernelArg::Ptr(s.device_ptr()), KernelArg::I64(n as i64)],
            )?,
            (Storage::Bf16(s), Storage::F32(d)) if n > 0 => self.launch(
                "convert_bf16_to_f32",
                grid_stride_config(n),
                &[KernelArg::Ptr(d.device_ptr()), KernelArg::Ptr(s.device_ptr()), KernelArg::I64(n as i64)],
            )?,
            _ => {}
        }
        Ok(dst)
    }

    /// `buf` as a kernel reading `dtype` sees it: its own storage, its master (f32, exact), or a
    /// converted temporary.
    pub(super) fn input<'a>(&self, buf: &'a CudaBuf, dtype: Dtype) -> Result<Operand<'a>> {
        Ok(match (&buf.storage, dtype) {
            (Storage::F32(b), Dtype::F32) => Operand::F32(Held::Borrowed(b)),
            (Storage::Bf16(b), Dtype::Bf16) => Operand::Bf16(Held::Borrowed(b)),
            (Storage::Bf16(_), Dtype::F32) if buf.master.is_some() => {
                Operand::F32(Held::Borrowed(buf.master.as_ref().unwrap()))
            }
            (storage, _) => match self.convert(storage, buf.len, dtype)? {
                Storage::F32(b) => Operand::F32(Held::Owned(b)),
                Storage::Bf16(b) => Operand::Bf16(Held::Owned(b)),
            },
        })
    }

    /// Prepares `buf` to be written by a kernel writing `dtype`: drops its master copy (the values
    /// change) and switches its storage to `dtype` if needed, converting the current values when
    /// `keep` (accumulating ops; an f32 master is taken over as is) and leaving them unspecified
    /// otherwise (the old storage then freed before the new is made: `reallocate`).
    pub(super) fn output<'a>(&self, buf: &'a mut CudaBuf, dtype: Dtype, keep: bool) -> Result<&'a mut Storage> {
        let master = buf.master.take();
        if buf.storage.dtype() != dtype {
            match master {
                Some(master) if keep && dtype == Dtype::F32 => buf.storage = Storage::F32(master),
                // The conversion reads the old values: both storages live while it runs.
                master if keep => {
                    drop(master);
                    buf.storage = self.convert(&buf.storage, buf.len, dtype)?;
                }
                master => {
                    drop(master);
                    let len = buf.len;
                    self.reallocate(buf, dtype, len)?;
                }
            }
        }
        Ok(&mut buf.storage)
    }

    /// New storage of `dtype` for `len` elements in place of `buf`'s, whose values are not wanted:
    /// the old storage is freed before the new one is made (device memory is what runs out, and a
    /// peak holding both could be the one that does not fit). Should the allocation fail, `buf` is
    /// left empty (length 0), so that no kernel is handed the freed storage.
    fn reallocate(&self, buf: &mut CudaBuf, dtype: Dtype, len: usize) -> Result<()> {
        buf.len = 0;
        buf.storage = self.alloc(dtype, 0)?;
        buf.storage = self.alloc(dtype, len)?;
        buf.len = len;
        Ok(())
    }
}

impl Buffers for CudaBackend {
    type Buf = CudaBuf;
    type Ids = CudaIds;

    fn name(&self) -> String {
        format!("{} ({})", self.device.name(), self.precision)
    }

    // ---- memory ------------------------------------------------------------------------------
    fn zeros(&self, len: usize) -> Result<CudaBuf> {
        let storage = match self.act() {
            Dtype::Bf16 => Storage::Bf16(self.device.alloc_zeros(len)?),
            _ => Storage::F32(self.device.alloc_zeros(len)?),
        };
        Ok(CudaBuf { len, storage, master: None })
    }

    fn upload(&self, data: &[f32]) -> Result<CudaBuf> {
        // The storage-precision values, plus in Bf16 mode the exact f32 data as the master copy.
        let mut buf = self.upload_frozen(data)?;
        if self.precision == Precision::Bf16 {
            buf.master = Some(self.device.upload(data)?);
        }
        Ok(buf)
    }

    /// In Bf16 mode only the rounded bf16 values: no optimizer will update the tensor, and every
    /// kernel reads parameters in the activation type, so the fp32 master would be dead weight (4
    /// bytes per element beside the 2 used). In F32 mode the same as `upload`.
    fn upload_frozen(&self, data: &[f32]) -> Result<CudaBuf> {
        Ok(match self.precision {
            Precision::F32 => {
                CudaBuf { len: data.len(), storage: Storage::F32(self.device.upload(data)?), master: None }
            }
            Precision::Bf16 => {
                let rounded: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                CudaBuf { len: data.len(), storage: Storage::Bf16(self.device.upload(&rounded)?), master: None }
            }
        })
    }

    fn download(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        let n = buf.len;
        if let Some(master) = &buf.master {
            return self.device.download(master.slice(..n));
        }
        match &buf.storage {
            Storage::F32(b) => self.device.download(b.slice(..n)),
            Storage::Bf16(b) => Ok(self.device.download(b.slice(..n))?.into_iter().map(f32::from).collect()),
        }
    }

    fn upload_ids(&self, ids: &[i32]) -> Result<CudaIds> {
        Ok(CudaIds { device: self.device.upload(ids)?, host: ids.to_vec() })
    }

    fn download_ids(&self, ids: &CudaIds) -> Result<Vec<i32>> {
        self.device.download(&ids.device)
    }

    fn buf_len(&self, buf: &CudaBuf) -> usize {
        buf.len()
    }

    fn has_master(&self, buf: &CudaBuf) -> bool {
        buf.has_master()
    }

    fn drop_master(&self, buf: &mut CudaBuf) {
        buf.master = None;
    }

    fn store_in_f32(&self, buf: &mut CudaBuf) -> Result<()> {
        self.output(buf, Dtype::F32, true).map(|_| ())
    }

    fn replace(&self, buf: &mut CudaBuf, data: &[f32]) -> Result<()> {
        // The old values are not wanted: free them before the upload allocates.
        let dtype = buf.dtype();
        buf.master = None;
        self.reallocate(buf, dtype, 0)?;
        *buf = match dtype {
            Dtype::F32 => CudaBuf { len: data.len(), storage: Storage::F32(self.device.upload(data)?), master: None },
            _ => self.upload(data)?,
        };
        Ok(())
    }

    fn fill(&self, buf: &mut CudaBuf, value: f32) -> Result<()> {
        let n = buf.len;
        match &mut buf.storage {
            Storage::F32(b) => self.device.fill(b.slice_mut(..n), value)?,
            Storage::Bf16(b) => self.device.fill(b.slice_mut(..n), bf16::from_f32(value))?,
        }
        if let Some(master) = &mut buf.master {
            self.device.fill(master.slice_mut(..n), value)?;
        }
        Ok(())
    }

    /// Keeps the storage (and its type) when it has room for `len`, else allocates new storage of
    /// the same type; the master copy is dropped (contents are unspecified after a resize).
    fn resize(&self, buf: &mut CudaBuf, len: usize) -> Result<()> {
        buf.master = None;
        if buf.storage.capacity() < len {
            let dtype = buf.storage.dtype();
            return self.reallocate(buf, dtype, len);
        }
        buf.len = len;
        Ok(())
    }

    fn copy(&self, dst: &mut CudaBuf, src: &CudaBuf) -> Result<()> {
        checks::copy(dst.len(), src.len())?;
        let n = src.len;
        // dst becomes an exact copy: same storage type, same master. Its old values are not wanted,
        // so what must be made anew is freed first.
        if src.master.is_none() || dst.master.as_ref().is_some_and(|own| own.len() < n) {
            dst.master = None;
        }
        if dst.storage.dtype() != src.storage.dtype() || dst.storage.capacity() < n {
            self.reallocate(dst, src.storage.dtype(), n)?;
        }
        match (&mut dst.storage, &src.storage) {
            (Storage::F32(d), Storage::F32(s)) => self.device.copy(d.slice_mut(..n), s.slice(..n))?,
            (Storage::Bf16(d), Storage::Bf16(s)) => self.device.copy(d.slice_mut(..n), s.slice(..n))?,
            _ => unreachable!("storage types were made equal above"),
        }
        dst.master = match &src.master {
            Some(master) => {
                let mut copy = match dst.master.take() {
                    Some(own) => own,
                    None => self.device.alloc(n)?,
                };
                self.device.copy(copy.slice_mut(..n), master.slice(..n))?;
                Some(copy)
            }
            None => None,
        };
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        self.device.synchronize()
    }

    /// Every live buffer of the device (this backend's, and those of other backends sharing the
    /// device), as the device counts them.
    fn memory_stats(&self) -> Option<MemoryStats> {
        Some(self.device.memory_stats())
    }

    fn reset_peak_memory(&self) {
        self.device.reset_peak_memory();
    }
}
