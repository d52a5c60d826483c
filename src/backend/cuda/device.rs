//! One device interface over a real GPU and the emulated device: allocate, free (drop), copy in and
//! out, fill, launch a kernel by name, GEMM, synchronize, time.
//!
//! Semantics are the GPU's, and the emulated device holds to them: operations are ordered as on one
//! CUDA stream; a kernel is named by its `extern "C"` name in `kernels/*.cu` and takes its arguments
//! in the order of its C++ signature ([`KernelArg`]: device pointers, 32/64-bit integers, floats);
//! copies out of the device wait for the work before them. On the emulated device every operation
//! runs to completion before the call returns, fresh buffers hold NaN bytes (0xFF) instead of zeros,
//! launches check each argument against the kernel's signature and each pointer against the live
//! buffers, and writes past the end of a buffer are reported by the launch that made them.

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

use super::{emu, gpu, kernels};
use crate::backend::MemoryStats;

// ---- choosing a device ---------------------------------------------------------------------------

/// The compute device a run asks for (`--device auto|cpu|cuda|emu`, `device = "…"` in a run config).
///
/// The one device enum of the crate: the CLI parses it with clap (`ValueEnum`), run configs with serde
/// (lowercase names), and [`FromStr`] also takes the aliases `gpu` and `emulated`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// A GPU when one is built and present, else the CPU.
    #[default]
    Auto,
    /// The f32 CPU reference backend.
    Cpu,
    /// The CUDA backend on GPU 0; an error when there is none.
    Cuda,
    /// The CUDA backend on the emulated device: the CUDA sources run on the CPU (slow; for tests and
    /// debugging).
    Emu,
}

impl FromStr for DeviceKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            "emu" | "emulated" => Ok(Self::Emu),
            other => bail!("unknown device `{other}`: expected one of auto, cpu, cuda, emu"),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Emu => "emu",
        })
    }
}

/// What [`select_device`] chose.
pub enum Selection {
    /// The CPU backend; `reason` says why no GPU was taken when `auto` fell back.
    Cpu { reason: Option<String> },
    /// A CUDA device (GPU or emulated) for the CUDA backend.
    Device(Device),
}

/// Why the GPU path cannot run here, or `None` when a GPU is usable. Never panics: a missing driver
/// library, no device, or a build without nvcc each give a reason.
pub fn gpu_unavailable_reason() -> Option<String> {
    if !kernels::BUILT_WITH_NVCC {
        return Some(
            "this build has no GPU kernels (nvcc was not found at build time; run `bash \
             scripts/install-cuda-toolchain.sh` and rebuild)"
                .into(),
        );
    }
    gpu::probe().err()
}

/// Resolves `--device`: `cpu` and `emu` always succeed; `cuda` fails with the reason when no GPU is
/// usable; `auto` takes GPU 0 when usable and otherwise the CPU, with the reason.
pub fn select_device(kind: DeviceKind) -> Result<Selection> {
    match kind {
        DeviceKind::Cpu => Ok(Selection::Cpu { reason: None }),
        DeviceKind::Emu => Ok(Selection::Device(Device::emulated()?)),
        DeviceKind::Cuda => match gpu_unavailable_reason() {
            Some(reason) => bail!("--device cuda: {reason}"),
            None => Ok(Selection::Device(Device::gpu(0)?)),
        },
        DeviceKind::Auto => match gpu_unavailable_reason() {
            Some(reason) => Ok(Selection::Cpu { reason: Some(reason) }),
            None => match Device::gpu(0) {
                Ok(device) => Ok(Selection::Device(device)),
                Err(e) => Ok(Selection::Cpu { reason: Some(format!("GPU 0 failed to initialise: {e:#}")) }),
            },
        },
    }
}

// ---- element types -------------------------------------------------------------------------------

/// Element types of device buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
    I32,
    U32,
    I64,
    U64,
    U8,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::Bf16 | Dtype::F16 => 2,
            Dtype::F32 | Dtype::I32 | Dtype::U32 => 4,
            Dtype::I64 | Dtype::U64 => 8,
        }
    }
}

/// A plain-data element type that device buffers hold.
pub trait DeviceScalar: bytemuck::Pod + Send + Sync + 'static {
    const DTYPE: Dtype;
}
impl DeviceScalar for f32 {
    const DTYPE: Dtype = Dtype::F32;
}
impl DeviceScalar for half::bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
}
impl DeviceScalar for half::f16 {
    const DTYPE: Dtype = Dtype::F16;
}
impl DeviceScalar for i32 {
    const DTYPE: Dtype = Dtype::I32;
}
impl DeviceScalar for u32 {
    const DTYPE: Dtype = Dtype::U32;
}
impl DeviceScalar for i64 {
    const DTYPE: Dtype = Dtype::I64;
}
impl DeviceScalar for u64 {
    const DTYPE: Dtype = Dtype::U64;
}
impl DeviceScalar for u8 {
    const DTYPE: Dtype = Dtype::U8;
}

// ---- buffers and views ---------------------------------------------------------------------------

/// Device memory owned by a buffer; freed (stream-ordered on a GPU) when dropped.
pub(crate) enum Memory {
    /// Zero-length buffers own nothing; their pointer is null.
    Empty,
    Gpu(gpu::GpuMemory),
    Emu(emu::EmuMemory),
}

impl Memory {
    fn ptr(&self) -> u64 {
        match self {
            Memory::Empty => 0,
            Memory::Gpu(m) => m.ptr(),
            Memory::Emu(m) => m.ptr(),
        }
    }
}

/// `len` elements of `T` in device memory.
pub struct DeviceBuffer<T: DeviceScalar> {
    memory: Memory,
    /// This buffer's bytes in its device's count; given back after `memory` is freed.
    _lease: Option<MemoryLease>,
    len: usize,
    _element: PhantomData<T>,
}

impl<T: DeviceScalar> DeviceBuffer<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn num_bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
    /// The device address of the first element (null for an empty buffer).
    pub fn device_ptr(&self) -> u64 {
        self.memory.ptr()
    }
    pub fn view(&self) -> View<'_, T> {
        View { ptr: self.device_ptr(), len: self.len, _borrow: PhantomData }
    }
    pub fn view_mut(&mut self) -> ViewMut<'_, T> {
        ViewMut { ptr: self.device_ptr(), len: self.len, _borrow: PhantomData }
    }
    /// Elements `range`; panics when out of bounds, like slice indexing.
    pub fn slice(&self, range: impl RangeBounds<usize>) -> View<'_, T> {
        self.view().slice(range)
    }
    /// Elements `range`, mutably; panics when out of bounds.
    pub fn slice_mut(&mut self, range: impl RangeBounds<usize>) -> ViewMut<'_, T> {
        self.view_mut().slice_mut(range)
    }
}

impl<T: DeviceScalar> fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceBuffer<{:?}>[{}] @ {:#x}", T::DTYPE, self.len, self.device_ptr())
    }
}

fn resolve_range(range: impl RangeBounds<usize>, len: usize) -> (usize, usize) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e + 1,
        Bound::Excluded(&e) => e,
        Bound::Unbounded => len,
    };
    assert!(start <= end && end <= len, "device range {start}..{end} out of bounds for length {len}");
    (start, end)
}

/// A borrowed, read-only range of a device buffer.
pub struct View<'a, T> {
    ptr: u64,
    len: usize,
    _borrow: PhantomData<&'a T>,
}

impl<T> Clone for View<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for View<'_, T> {}

impl<'a, T: DeviceScalar> View<'a, T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
    pub fn slice(self, range: impl RangeBounds<usize>) -> View<'a, T> {
        let (start, end) = resolve_range(range, self.len);
        View { ptr: offset_ptr::<T>(self.ptr, start), len: end - start, _borrow: PhantomData }
    }
}

/// A borrowed, writable range of a device buffer.
pub struct ViewMut<'a, T> {
    ptr: u64,
    len: usize,
    _borrow: PhantomData<&'a mut T>,
}

impl<'a, T: DeviceScalar> ViewMut<'a, T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
    /// A shorter-lived copy of this view, leaving `self` usable afterwards.
    pub fn reborrow(&mut self) -> ViewMut<'_, T> {
        ViewMut { ptr: self.ptr, len: self.len, _borrow: PhantomData }
    }
    pub fn as_view(&self) -> View<'_, T> {
        View { ptr: self.ptr, len: self.len, _borrow: PhantomData }
    }
    pub fn slice_mut(self, range: impl RangeBounds<usize>) -> ViewMut<'a, T> {
        let (start, end) = resolve_range(range, self.len);
        ViewMut { ptr: offset_ptr::<T>(self.ptr, start), len: end - start, _borrow: PhantomData }
    }
    /// Two disjoint halves: `[0, mid)` and `[mid, len)`.
    pub fn split_at_mut(self, mid: usize) -> (ViewMut<'a, T>, ViewMut<'a, T>) {
        assert!(mid <= self.len, "split point {mid} out of bounds for length {}", self.len);
        let tail = ViewMut { ptr: offset_ptr::<T>(self.ptr, mid), len: self.len - mid, _borrow: PhantomData };
        (ViewMut { ptr: self.ptr, len: mid, _borrow: PhantomData }, tail)
    }
}

fn offset_ptr<T>(ptr: u64, elements: usize) -> u64 {
    if ptr == 0 {
        0
    } else {
        ptr + (elements * std::mem::size_of::<T>()) as u64
    }
}

impl<'a, T: DeviceScalar> From<&'a DeviceBuffer<T>> for View<'a, T> {
    fn from(buffer: &'a DeviceBuffer<T>) -> Self {
        buffer.view()
    }
}
impl<'a, T: DeviceScalar> From<&'a mut DeviceBuffer<T>> for View<'a, T> {
    fn from(buffer: &'a mut DeviceBuffer<T>) -> Self {
        buffer.view()
    }
}
impl<'a, T: DeviceScalar> From<&'a mut DeviceBuffer<T>> for ViewMut<'a, T> {
    fn from(buffer: &'a mut DeviceBuffer<T>) -> Self {
        buffer.view_mut()
    }
}
impl<'a, T: DeviceScalar> From<ViewMut<'a, T>> for View<'a, T> {
    fn from(view: ViewMut<'a, T>) -> Self {
        View { ptr: view.ptr, len: view.len, _borrow: PhantomData }
    }
}

// ---- kernel launches -----------------------------------------------------------------------------

/// One kernel argument, passed by value as the kernel's C++ parameter of the same type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    /// A device pointer (`T*`), from a buffer or view.
    Ptr(u64),
    I32(i32),
    U32(u32),
    I64(i64),
    U64(u64),
    F32(f32),
    F64(f64),
}

impl KernelArg {
    /// The null pointer (for optional pointer parameters).
    pub const NULL: KernelArg = KernelArg::Ptr(0);

    /// The code the emulated device's kernel signatures use for this argument's C++ type.
    pub(crate) fn code(&self) -> char {
        match self {
            KernelArg::Ptr(_) => 'p',
            KernelArg::I32(_) => 'i',
            KernelArg::U32(_) => 'u',
            KernelArg::I64(_) => 'l',
            KernelArg::U64(_) => 'L',
            KernelArg::F32(_) => 'f',
            KernelArg::F64(_) => 'd',
        }
    }

    /// The C++ type a signature code stands for.
    pub(crate) fn type_name(code: char) -> &'static str {
        match code {
            'p' => "a pointer",
            'i' => "int (i32)",
            'u' => "unsigned int (u32)",
            'l' => "long long (i64)",
            'L' => "unsigned long long (u64)",
            'f' => "float (f32)",
            'd' => "double (f64)",
            _ => "an unsupported type",
        }
    }

    /// The value's bytes, little-endian in the low bytes of a u64 (how launches pass it).
    pub(crate) fn bits(&self) -> u64 {
        match *self {
            KernelArg::Ptr(p) => p,
            KernelArg::I32(v) => v as u32 as u64,
            KernelArg::U32(v) => v as u64,
            KernelArg::I64(v) => v as u64,
            KernelArg::U64(v) => v,
            KernelArg::F32(v) => v.to_bits() as u64,
            KernelArg::F64(v) => v.to_bits(),
        }
    }
}

macro_rules! kernel_arg_from {
    ($($t:ty => $variant:ident),*) => {
        $(impl From<$t> for KernelArg {
            fn from(v: $t) -> Self {
                KernelArg::$variant(v)
            }
        })*
    };
}
kernel_arg_from!(i32 => I32, u32 => U32, i64 => I64, u64 => U64, f32 => F32, f64 => F64);

impl<T: DeviceScalar> From<&DeviceBuffer<T>> for KernelArg {
    fn from(buffer: &DeviceBuffer<T>) -> Self {
        KernelArg::Ptr(buffer.device_ptr())
    }
}
impl<T: DeviceScalar> From<&mut DeviceBuffer<T>> for KernelArg {
    fn from(buffer: &mut DeviceBuffer<T>) -> Self {
        KernelArg::Ptr(buffer.device_ptr())
    }
}
impl<T: DeviceScalar> From<View<'_, T>> for KernelArg {
    fn from(view: View<'_, T>) -> Self {
        KernelArg::Ptr(view.ptr)
    }
}
impl<T: DeviceScalar> From<ViewMut<'_, T>> for KernelArg {
    fn from(view: ViewMut<'_, T>) -> Self {
        KernelArg::Ptr(view.ptr)
    }
}
impl<T: DeviceScalar> From<&mut ViewMut<'_, T>> for KernelArg {
    fn from(view: &mut ViewMut<'_, T>) -> Self {
        KernelArg::Ptr(view.ptr)
    }
}

/// Builds a `[KernelArg; N]` from buffers, views and scalars:
/// `device.launch("adamw_f32", cfg, &kernel_args![&mut param, &grad, n as i64, lr])`.
#[macro_export]
macro_rules! kernel_args {
    ($($arg:expr),* $(,)?) => {
        [$($crate::backend::cuda::KernelArg::from($arg)),*]
    };
}

/// Grid and block shape of a launch, and its dynamic shared memory in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl LaunchConfig {
    /// A 1-D grid of `blocks` blocks of `threads` threads.
    pub fn grid_1d(blocks: u32, threads: u32) -> Self {
        Self { grid: (blocks, 1, 1), block: (threads, 1, 1), shared_bytes: 0 }
    }
    /// Enough blocks of `threads` threads for one thread per element (at least one block).
    pub fn for_elements(n: usize, threads: u32) -> Self {
        let blocks = n.div_ceil(threads as usize).clamp(1, i32::MAX as usize) as u32;
        Self::grid_1d(blocks, threads)
    }
    pub fn with_shared_bytes(mut self, bytes: u32) -> Self {
        self.shared_bytes = bytes;
        self
    }
}

// ---- memory accounting ---------------------------------------------------------------------------

/// Bytes held by one device's live buffers, now and at the peak; shared by the clones of a
/// [`Device`]. Counts what buffers asked for (a GPU's allocator may round up; the emulated device
/// pads to 256 bytes), the same on both devices.
#[derive(Default)]
struct MemoryCounter {
    current: AtomicU64,
    peak: AtomicU64,
}

impl MemoryCounter {
    fn lease(self: &Arc<Self>, bytes: usize) -> MemoryLease {
        let bytes = bytes as u64;
        let now = self.current.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
        MemoryLease { bytes, counter: self.clone() }
    }

    fn stats(&self) -> MemoryStats {
        // The peak is read second so that it is never below the current value read first.
        let current_bytes = self.current.load(Ordering::Relaxed);
        let peak_bytes = self.peak.load(Ordering::Relaxed).max(current_bytes);
        MemoryStats { current_bytes, peak_bytes }
    }

    fn reset_peak(&self) {
        self.peak.store(self.current.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// A live buffer's bytes in its device's [`MemoryCounter`], subtracted when the buffer is dropped.
struct MemoryLease {
    bytes: u64,
    counter: Arc<MemoryCounter>,
}

impl Drop for MemoryLease {
    fn drop(&mut self) {
        self.counter.current.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

// ---- GEMM ----------------------------------------------------------------------------------------

/// A matrix product, row-major:
/// `D[m, n] = alpha · op(A) · op(B) + beta · D + bias[n]` (bias broadcast over rows, optional),
/// where A is stored `[m, k]` (`[k, m]` when `trans_a`) and B `[k, n]` (`[n, k]` when `trans_b`).
/// Inputs are f32 or bf16; products accumulate in f32 (no TF32); D (f32 or bf16, and the bias of the
/// same type) is rounded once, to nearest even. Supported (A/B, D) types: (f32, f32), (bf16, bf16),
/// (bf16, f32). D must not overlap A or B.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
}

impl Gemm {
    /// `D = A · B` for `A [m, k]`, `B [k, n]`.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Self { m, n, k, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 }
    }
    pub fn trans_a(mut self, trans: bool) -> Self {
        self.trans_a = trans;
        self
    }
    pub fn trans_b(mut self, trans: bool) -> Self {
        self.trans_b = trans;
        self
    }
    pub fn alpha(mut self, alpha: f32) -> Self {
        self.alpha = alpha;
        self
    }
    pub fn beta(mut self, beta: f32) -> Self {
        self.beta = beta;
        self
    }

    /// Checks types and operand lengths (exact: a size mismatch is a bug in the caller).
    pub(crate) fn check(
        &self,
        ab: Dtype,
        c: Dtype,
        a_len: usize,
        b_len: usize,
        c_len: usize,
        bias_len: Option<usize>,
    ) -> Result<()> {
        ensure!(
            matches!((ab, c), (Dtype::F32, Dtype::F32) | (Dtype::Bf16, Dtype::Bf16) | (Dtype::Bf16, Dtype::F32)),
            "gemm: unsupported types A/B {ab:?}, D {c:?} (supported: f32/f32, bf16/bf16, bf16/f32)"
        );
        let (m, n, k) = (self.m, self.n, self.k);
        ensure!(a_len == m * k, "gemm {self:?}: A has {a_len} elements, expected m·k = {}", m * k);
        ensure!(b_len == k * n, "gemm {self:?}: B has {b_len} elements, expected k·n = {}", k * n);
        ensure!(c_len == m * n, "gemm {self:?}: D has {c_len} elements, expected m·n = {}", m * n);
        if let Some(bias_len) = bias_len {
            ensure!(bias_len == n, "gemm {self:?}: bias has {bias_len} elements, expected n = {n}");
        }
        Ok(())
    }
}

// ---- the device ----------------------------------------------------------------------------------

#[derive(Clone)]
enum Imp {
    Gpu(Arc<gpu::Gpu>),
    Emu(Arc<emu::Emu>),
}

/// A CUDA device: a GPU or the emulated device. Cloning shares the device (and its memory count).
#[derive(Clone)]
pub struct Device {
    imp: Imp,
    memory: Arc<MemoryCounter>,
}

/// A point in a device's stream of work, for timing ([`Device::elapsed_ms`]).
pub struct Event(EventImp);

enum EventImp {
    Gpu(gpu::GpuEvent),
    Emu(std::time::Instant),
}

impl Device {
    /// GPU `ordinal`, with the embedded kernels loaded.
    pub fn gpu(ordinal: usize) -> Result<Self> {
        Ok(Self { imp: Imp::Gpu(gpu::Gpu::new(ordinal)?), memory: Arc::default() })
    }

    /// The emulated device.
    pub fn emulated() -> Result<Self> {
        Ok(Self { imp: Imp::Emu(emu::Emu::new()), memory: Arc::default() })
    }

    pub fn is_emulated(&self) -> bool {
        matches!(self.imp, Imp::Emu(_))
    }

    pub fn kind(&self) -> DeviceKind {
        match self.imp {
            Imp::Gpu(_) => DeviceKind::Cuda,
            Imp::Emu(_) => DeviceKind::Emu,
        }
    }

    /// E.g. "cuda:0 NVIDIA H100 80GB HBM3 (sm_90)" or "emu (CUDA kernels on the CPU)".
    pub fn name(&self) -> String {
        match &self.imp {
            Imp::Gpu(g) => g.name(),
            Imp::Emu(_) => "emu (CUDA kernels on the CPU)".into(),
        }
    }

    /// A buffer of `len` elements with unspecified contents (NaN bytes on the emulated device).
    pub fn alloc<T: DeviceScalar>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| anyhow::anyhow!("allocation of {len} elements overflows"))?;
        let (memory, lease) = if bytes == 0 {
            (Memory::Empty, None)
        } else {
            let memory = match &self.imp {
                Imp::Gpu(g) => Memory::Gpu(gpu::Gpu::alloc(g, bytes)?),
                Imp::Emu(e) => Memory::Emu(emu::Emu::alloc(e, bytes)?),
            };
            (memory, Some(self.memory.lease(bytes)))
        };
        Ok(DeviceBuffer { memory, _lease: lease, len, _element: PhantomData })
    }

    /// Bytes held by the live buffers of this device (all its clones), now and at the peak since it
    /// was created or [`Device::reset_peak_memory`] was called.
    pub fn memory_stats(&self) -> MemoryStats {
        self.memory.stats()
    }

    /// Restarts the peak of [`Device::memory_stats`] from the bytes allocated now.
    pub fn reset_peak_memory(&self) {
        self.memory.reset_peak();
    }

    /// A buffer of `len` zeros.
    pub fn alloc_zeros<T: DeviceScalar>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        let mut buffer = self.alloc(len)?;
        self.zero(&mut buffer)?;
        Ok(buffer)
    }

    /// A new buffer holding `data`.
    pub fn upload<T: DeviceScalar>(&self, data: &[T]) -> Result<DeviceBuffer<T>> {
        let mut buffer = self.alloc(data.len())?;
        self.copy_in(&mut buffer, data)?;
        Ok(buffer)
    }

    /// Host → device; lengths must match.
    pub fn copy_in<'a, T: DeviceScalar>(&self, dst: impl Into<ViewMut<'a, T>>, src: &[T]) -> Result<()> {
        let dst = dst.into();
        ensure!(dst.len == src.len(), "copy_in: device range has {} elements, host slice {}", dst.len, src.len());
        if src.is_empty() {
            return Ok(());
        }
        let bytes: &[u8] = bytemuck::cast_slice(src);
        match &self.imp {
            Imp::Gpu(g) => g.copy_in(dst.ptr, bytes),
            Imp::Emu(e) => e.copy_in(dst.ptr, bytes),
        }
    }

    /// Device → host, after the work queued before it; lengths must match.
    pub fn copy_out<'a, T: DeviceScalar>(&self, src: impl Into<View<'a, T>>, dst: &mut [T]) -> Result<()> {
        let src = src.into();
        ensure!(src.len == dst.len(), "copy_out: device range has {} elements, host slice {}", src.len, dst.len());
        if dst.is_empty() {
            return Ok(());
        }
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(dst);
        match &self.imp {
            Imp::Gpu(g) => g.copy_out(src.ptr, bytes),
            Imp::Emu(e) => e.copy_out(src.ptr, bytes),
        }
    }

    /// Device → a new host vector.
    pub fn download<'a, T: DeviceScalar>(&self, src: impl Into<View<'a, T>>) -> Result<Vec<T>> {
        let src = src.into();
        let mut out = vec![T::zeroed(); src.len];
        self.copy_out(src, &mut out)?;
        Ok(out)
    }

    /// Device → device; lengths must match.
    pub fn copy<'a, 'b, T: DeviceScalar>(
        &self,
        dst: impl Into<ViewMut<'a, T>>,
        src: impl Into<View<'b, T>>,
    ) -> Result<()> {
        let (dst, src) = (dst.into(), src.into());
        ensure!(dst.len == src.len, "copy: destination has {} elements, source {}", dst.len, src.len);
        let bytes = src.len * std::mem::size_of::<T>();
        if bytes == 0 {
            return Ok(());
        }
        match &self.imp {
            Imp::Gpu(g) => g.copy(dst.ptr, src.ptr, bytes),
            Imp::Emu(e) => e.copy(dst.ptr, src.ptr, bytes),
        }
    }

    /// Sets every element to `value` (element types of 1, 2 or 4 bytes).
    pub fn fill<'a, T: DeviceScalar>(&self, dst: impl Into<ViewMut<'a, T>>, value: T) -> Result<()> {
        let dst = dst.into();
        if dst.len == 0 {
            return Ok(());
        }
        let bits: &[u8] = bytemuck::bytes_of(&value);
        let pattern = match bits.len() {
            1 => FillPattern::U8(bits[0]),
            2 => FillPattern::U16(u16::from_le_bytes([bits[0], bits[1]])),
            4 => FillPattern::U32(u32::from_le_bytes([bits[0], bits[1], bits[2], bits[3]])),
            n => bail!("fill: {n}-byte elements ({:?}) are not supported; use a kernel", T::DTYPE),
        };
        match &self.imp {
            Imp::Gpu(g) => g.fill(dst.ptr, pattern, dst.len),
            Imp::Emu(e) => e.fill(dst.ptr, pattern, dst.len),
        }
    }

    /// Sets every byte to zero.
    pub fn zero<'a, T: DeviceScalar>(&self, dst: impl Into<ViewMut<'a, T>>) -> Result<()> {
        let dst = dst.into();
        let bytes = dst.len * std::mem::size_of::<T>();
        if bytes == 0 {
            return Ok(());
        }
        match &self.imp {
            Imp::Gpu(g) => g.fill(dst.ptr, FillPattern::U8(0), bytes),
            Imp::Emu(e) => e.fill(dst.ptr, FillPattern::U8(0), bytes),
        }
    }

    /// Launches kernel `name` (its `extern "C"` name in `kernels/*.cu`) with `args` in the order of
    /// its parameters. Asynchronous on a GPU; on the emulated device it runs before returning, and
    /// argument types, pointers and out-of-bounds writes are checked.
    pub fn launch(&self, name: &str, config: LaunchConfig, args: &[KernelArg]) -> Result<()> {
        match &self.imp {
            Imp::Gpu(g) => g.launch(name, &config, args),
            Imp::Emu(e) => e.launch(name, &config, args),
        }
    }

    /// Whether a kernel of that name exists on this device.
    pub fn has_kernel(&self, name: &str) -> bool {
        match &self.imp {
            Imp::Gpu(g) => g.has_kernel(name),
            Imp::Emu(_) => emu::kernel_signature(name).is_ok(),
        }
    }

    /// `D = alpha · op(A) · op(B) + beta · D (+ bias)`, see [`Gemm`].
    pub fn gemm<'a, 'b, 'd, TA: DeviceScalar, TC: DeviceScalar>(
        &self,
        spec: &Gemm,
        a: impl Into<View<'a, TA>>,
        b: impl Into<View<'b, TA>>,
        d: impl Into<ViewMut<'d, TC>>,
        bias: Option<View<'_, TC>>,
    ) -> Result<()> {
        let (a, b, d) = (a.into(), b.into(), d.into());
        spec.check(TA::DTYPE, TC::DTYPE, a.len, b.len, d.len, bias.map(|v| v.len))?;
        if spec.m == 0 || spec.n == 0 {
            return Ok(());
        }
        let operands = GemmOperands {
            ab: TA::DTYPE,
            c: TC::DTYPE,
            a: a.ptr,
            b: b.ptr,
            d: d.ptr,
            bias: bias.map(|v| v.ptr),
            gelu_aux: None,
        };
        let done = match &self.imp {
            Imp::Gpu(g) => g.gemm(spec, &operands)?,
            Imp::Emu(e) => e.gemm(spec, &operands)?,
        };
        ensure!(done, "gemm {spec:?}: the device declined a product without an epilogue");
        Ok(())
    }

    /// The product with a GELU epilogue (cuBLASLt's `GELU_AUX_BIAS`): `pre = alpha·op(A)·op(B) + bias`
    /// and `out = gelu(pre)` (tanh form, HF `gelu_new`), the GELU taken of the f32 value before `pre`
    /// is rounded to its storage type. `beta` must be 0; `pre` and `out` must not overlap each other
    /// or the inputs.
    ///
    /// Returns `Ok(false)`, having written nothing, when this device cannot fuse this product — a GPU
    /// needs `n` to be a multiple of 8 (the leading dimension of `pre` as cuBLASLt sees it), `pre`
    /// 16-byte aligned, and a cuBLASLt algorithm for the epilogue at these shapes and alignments —
    /// so that the caller runs [`Device::gemm`] and the GELU kernel instead. The emulated device
    /// always fuses.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bias_gelu<'a, 'b, 'p, 'o, TA: DeviceScalar, TC: DeviceScalar>(
        &self,
        spec: &Gemm,
        a: impl Into<View<'a, TA>>,
        b: impl Into<View<'b, TA>>,
        pre: impl Into<ViewMut<'p, TC>>,
        out: impl Into<ViewMut<'o, TC>>,
        bias: View<'_, TC>,
    ) -> Result<bool> {
        let (a, b, pre, out) = (a.into(), b.into(), pre.into(), out.into());
        spec.check(TA::DTYPE, TC::DTYPE, a.len, b.len, out.len, Some(bias.len))?;
        ensure!(pre.len == out.len, "gemm_bias_gelu {spec:?}: pre has {} elements, out {}", pre.len, out.len);
        ensure!(spec.beta == 0.0, "gemm_bias_gelu {spec:?}: beta must be 0 (the epilogue does not accumulate)");
        let bytes = |len: usize, size: usize| (len * size) as u64;
        let overlap = |p: u64, p_bytes: u64, q: u64, q_bytes: u64| p < q + q_bytes && q < p + p_bytes;
        let (c_size, ab_size) = (TC::DTYPE.size(), TA::DTYPE.size());
        let (pre_bytes, out_bytes) = (bytes(pre.len, c_size), bytes(out.len, c_size));
        ensure!(
            !overlap(pre.ptr, pre_bytes, out.ptr, out_bytes)
                && !overlap(pre.ptr, pre_bytes, a.ptr, bytes(a.len, ab_size))
                && !overlap(pre.ptr, pre_bytes, b.ptr, bytes(b.len, ab_size)),
            "gemm_bias_gelu {spec:?}: pre overlaps out or an input"
        );
        if spec.m == 0 || spec.n == 0 {
            return Ok(true);
        }
        let operands = GemmOperands {
            ab: TA::DTYPE,
            c: TC::DTYPE,
            a: a.ptr,
            b: b.ptr,
            d: out.ptr,
            bias: Some(bias.ptr),
            gelu_aux: Some(pre.ptr),
        };
        match &self.imp {
            Imp::Gpu(g) => g.gemm(spec, &operands),
            Imp::Emu(e) => e.gemm(spec, &operands),
        }
    }

    /// Waits until all queued work has finished.
    pub fn synchronize(&self) -> Result<()> {
        match &self.imp {
            Imp::Gpu(g) => g.synchronize(),
            Imp::Emu(_) => Ok(()),
        }
    }

    /// Marks the current point of the work queue.
    pub fn record_event(&self) -> Result<Event> {
        Ok(Event(match &self.imp {
            Imp::Gpu(g) => EventImp::Gpu(gpu::Gpu::record_event(g)?),
            Imp::Emu(_) => EventImp::Emu(std::time::Instant::now()),
        }))
    }

    /// Milliseconds of device time between two events of this device (waits for `end`).
    pub fn elapsed_ms(&self, start: &Event, end: &Event) -> Result<f32> {
        match (&start.0, &end.0) {
            (EventImp::Gpu(s), EventImp::Gpu(e)) => gpu::GpuEvent::elapsed_ms(s, e),
            (EventImp::Emu(s), EventImp::Emu(e)) => Ok(e.saturating_duration_since(*s).as_secs_f32() * 1000.0),
            _ => bail!("elapsed_ms: events from different kinds of device"),
        }
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// A fill value's bit pattern, repeated over the range.
#[derive(Clone, Copy, Debug)]
pub(crate) enum FillPattern {
    U8(u8),
    U16(u16),
    U32(u32),
}

/// Device addresses and types of a checked GEMM.
pub(crate) struct GemmOperands {
    pub ab: Dtype,
    pub c: Dtype,
    pub a: u64,
    pub b: u64,
    pub d: u64,
    pub bias: Option<u64>,
    /// With the GELU epilogue ([`Device::gemm_bias_gelu`]; `bias` is then set): where the
    /// pre-activation goes, `[m, n]` of D's type; D receives the GELU of it.
    pub gelu_aux: Option<u64>,
}
