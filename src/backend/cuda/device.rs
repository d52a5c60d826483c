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

//!
//! The plain types it passes around (element types, kernel arguments, launch shapes, GEMMs) live in
//! [`super::types`], which the implementations share.

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, ensure, Result};

use super::types::{DeviceScalar, FillPattern, Gemm, GemmOperands, KernelArg, LaunchConfig};
use super::{emu, gpu};
use crate::backend::MemoryStats;

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

// ---- kernel arguments from buffers and views ----------------------------------------------------------

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

    /// The emulated device (an error in a build without the `emu` feature).
    pub fn emulated() -> Result<Self> {
        #[cfg(feature = "emu")]
        let emu = emu::Emu::new();
        #[cfg(not(feature = "emu"))]
        let emu = emu::Emu::open()?;
        Ok(Self { imp: Imp::Emu(emu), memory: Arc::default() })
    }

    pub fn is_emulated(&self) -> bool {
        matches!(self.imp, Imp::Emu(_))
    }

    /// The GPU under this device, `None` on the emulated device (NCCL's collectives need it).
    #[cfg(feature = "cuda")]
    pub(crate) fn as_gpu(&self) -> Option<&Arc<gpu::Gpu>> {
        match &self.imp {
            Imp::Gpu(gpu) => Some(gpu),
            Imp::Emu(_) => None,
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
