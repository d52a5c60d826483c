//! `CudaBackend`: the `Backend` trait on a CUDA device (a GPU, or the emulated device that runs the
//! same kernels on the CPU). Every method is one or a few launches of the kernels in `kernels/*.cu`
//! (named `<op>_<dtype>`); matrix products go through [`Device::gemm`] (cuBLASLt on a GPU).
//!
//! ## Precision
//! - [`Precision::F32`]: every tensor is f32. The emulated device is held to the CPU backend at
//!   f32 tolerances in this mode.
//! - [`Precision::Bf16`]: parameters, activations, gradients and logits are stored in bf16 (all math in
//!   f32, one rounding per store); LayerNorm statistics, attention log-sum-exps, token and sequence
//!   log-probs, the preference loss, its metrics and gradients are f32; the optimizer keeps fp32 master
//!   weights and fp32 moments.
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
//! ## Determinism
//! No kernel uses float atomics; every reduction has a fixed order that depends only on the shapes
//! (see each kernel file's header). Two runs give bit-identical results.

use std::fmt;
use std::ops::Deref;
use std::str::FromStr;
use std::sync::Mutex;

use anyhow::{bail, ensure, Context, Result};
use half::bf16;

use super::{Device, DeviceBuffer, DeviceScalar, Dtype, Gemm, KernelArg, LaunchConfig};
use crate::backend::prelude::*;
use crate::backend::{checks, AdamWParams, MemoryStats, Packing, WeightLayout};
use crate::loss::Objective;

// ---- launch shapes (each kernel file's header comment explains its own) ------------------------------

/// Threads per block of the elementwise kernels.
const POINTWISE_THREADS: u32 = 256;
/// Most blocks of an elementwise launch; larger tensors are covered by the grid-stride loop.
const POINTWISE_MAX_BLOCKS: usize = 4096;
/// Rows (warps) per block of the LayerNorm row kernels; `LN_WARPS_PER_BLOCK` in layernorm.cu.
const LN_ROWS_PER_BLOCK: usize = 4;
/// Rows per partial sum of the LayerNorm parameter gradients (at least; see `layernorm_backward`).
const LN_ROWS_PER_CHUNK: usize = 32;
/// Most threads per block of the row kernels (log-softmax-gather, sequence sums, channel loops).
const ROW_THREADS: usize = 256;
/// Threads per block of the preference loss (one per pair).
const PAIR_THREADS: u32 = 128;
/// Threads per block, and the fewest elements per block, of the grad-norm partial sums.
const NORM_THREADS: u32 = 256;
const NORM_ELEMENTS_PER_BLOCK: usize = 256 * 16;
/// Most partial-sum blocks per tensor in the grad norm.
const NORM_MAX_BLOCKS: usize = 1024;
/// CUDA's limit on the y and z dimensions of a grid.
const MAX_GRID_Y: usize = 65535;

/// Storage precision of a [`CudaBackend`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Everything f32: the mode the emulated device is checked in against the CPU backend.
    F32,
    /// bf16 parameters, activations, gradients and logits; fp32 master weights, optimizer state,
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

/// The kernel-name suffix of a storage type (`<op>_f32`, `<op>_bf16`).
fn suffix(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Bf16 => "bf16",
        _ => "f32",
    }
}

// ---- buffers -----------------------------------------------------------------------------------------

/// Device values in one of the two float storage types.
enum Storage {
    F32(DeviceBuffer<f32>),
    Bf16(DeviceBuffer<bf16>),
}

impl Storage {
    fn dtype(&self) -> Dtype {
        match self {
            Storage::F32(_) => Dtype::F32,
            Storage::Bf16(_) => Dtype::Bf16,
        }
    }
    /// Elements allocated (at least the owning buffer's length, see `Backend::resize`).
    fn capacity(&self) -> usize {
        match self {
            Storage::F32(b) => b.len(),
            Storage::Bf16(b) => b.len(),
        }
    }
    fn ptr(&self) -> u64 {
        match self {
            Storage::F32(b) => b.device_ptr(),
            Storage::Bf16(b) => b.device_ptr(),
        }
    }
    fn arg(&self) -> KernelArg {
        KernelArg::Ptr(self.ptr())
    }
}

/// A float tensor of the CUDA backend: its values in f32 or bf16 storage, and optionally an fp32
/// master copy (see the module documentation).
pub struct CudaBuf {
    /// Number of elements: the first `len` of `storage` (and of `master`), whose capacity may be
    /// larger after a `resize` to a shorter length.
    len: usize,
    storage: Storage,
    master: Option<DeviceBuffer<f32>>,
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
    device: DeviceBuffer<i32>,
    host: Vec<i32>,
}

impl CudaIds {
    /// The values, as uploaded.
    pub fn host(&self) -> &[i32] {
        &self.host
    }
    fn arg(&self) -> KernelArg {
        KernelArg::Ptr(self.device.device_ptr())
    }
}

/// A borrowed or temporary device buffer.
enum Held<'a, T: DeviceScalar> {
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
enum Operand<'a> {
    F32(Held<'a, f32>),
    Bf16(Held<'a, bf16>),
}

impl Operand<'_> {
    fn ptr(&self) -> u64 {
        match self {
            Operand::F32(b) => b.device_ptr(),
            Operand::Bf16(b) => b.device_ptr(),
        }
    }
    fn arg(&self) -> KernelArg {
        KernelArg::Ptr(self.ptr())
    }
}

// ---- the backend ---------------------------------------------------------------------------------------

/// The CUDA backend: a device and a precision mode.
pub struct CudaBackend {
    device: Device,
    precision: Precision,
    /// Vectors of ones (f32 and bf16), grown on demand: the bias gradient is `ones[1, n] · dout`.
    ones_f32: Mutex<Option<DeviceBuffer<f32>>>,
    ones_bf16: Mutex<Option<DeviceBuffer<bf16>>>,
}

/// Checks that the device copy of `cu_seqlens` matches the host copy (the op's shared checks in
/// [`checks`] validated the host copy).
fn check_device_cu_seqlens(op: &str, packing: &Packing<CudaBackend>) -> Result<()> {
    checks::check_len(op, "cu_seqlens (device)", packing.cu_seqlens.device.len(), packing.host_cu_seqlens.len())
}

/// A grid-stride launch over `n` elements.
fn pointwise_config(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(POINTWISE_THREADS as usize).clamp(1, POINTWISE_MAX_BLOCKS) as u32;
    LaunchConfig::grid_1d(blocks, POINTWISE_THREADS)
}

/// Threads for a block that loops over `width` items: a multiple of 32, at most `ROW_THREADS`.
fn row_threads(width: usize) -> u32 {
    width.next_multiple_of(32).clamp(32, ROW_THREADS) as u32
}

fn grid_dim(value: usize, what: &str) -> Result<u32> {
    u32::try_from(value)
        .ok()
        .filter(|&v| v <= i32::MAX as u32)
        .with_context(|| format!("{what} = {value} is too large for one launch"))
}

fn i32_arg(value: usize, what: &str) -> Result<KernelArg> {
    Ok(KernelArg::I32(i32::try_from(value).with_context(|| format!("{what} = {value} does not fit a 32-bit int"))?))
}

/// Threads per block of the attention kernels (`ATTN_THREADS` in kernels/attention.cu).
const ATTENTION_THREADS: u32 = 256;
/// The head-dim bounds the attention kernels are instantiated for (`attention_<op>_hd<bound>_<dtype>`).
const ATTENTION_HEAD_DIM_BOUNDS: [usize; 2] = [64, 128];

/// Launch plan of the tiled attention kernels (see kernels/attention.cu): the smallest head-dim
/// bound that holds `hd`, its tile (256 threads, 16 channels per lane, so `256·16 / bound` rows), and
/// the grid (n_head, sequences, tiles of the longest sequence).
struct AttentionPlan {
    head_dim_bound: usize,
    grid: (u32, u32, u32),
}

impl AttentionPlan {
    fn new(op: &str, packing: &Packing<CudaBackend>, n_head: usize, c: usize) -> Result<Self> {
        let hd = c / n_head;
        let head_dim_bound = ATTENTION_HEAD_DIM_BOUNDS.into_iter().find(|&b| hd <= b).with_context(|| {
            format!("{op}: head dim {hd} (c = {c}, n_head = {n_head}) exceeds the kernels' maximum 128")
        })?;
        let tile = ATTENTION_THREADS as usize * 16 / head_dim_bound;
        let tiles = packing.max_seqlen.div_ceil(tile);
        let (seqs, max_y) = (packing.num_seqs(), MAX_GRID_Y);
        ensure!(seqs <= max_y, "{op}: {seqs} sequences exceed the grid limit {max_y}");
        ensure!(tiles <= max_y, "{op}: {tiles} tiles of {tile} tokens exceed the grid limit {max_y}");
        Ok(Self { head_dim_bound, grid: (grid_dim(n_head, "n_head")?, seqs as u32, tiles as u32) })
    }

    fn kernel(&self, op: &str, dtype: Dtype) -> String {
        format!("attention_{op}_hd{}_{}", self.head_dim_bound, suffix(dtype))
    }

    fn config(&self) -> LaunchConfig {
        LaunchConfig { grid: self.grid, block: (ATTENTION_THREADS, 1, 1), shared_bytes: 0 }
    }
}

/// The preference-loss kernel's objective code and (β, second parameter); the codes are the
/// `OBJ_*` constants of kernels/preference_loss.cu.
fn objective_code(objective: &Objective) -> (i32, f32, f32) {
    match *objective {
        Objective::Dpo { beta } => (0, beta as f32, 0.0),
        Objective::SafeDpo { beta, delta } => (1, beta as f32, delta as f32),
        Objective::Ipo { beta } => (2, beta as f32, 0.0),
        Objective::Robust { beta, eps } => (3, beta as f32, eps as f32),
        Objective::Cdpo { beta, eps } => (4, beta as f32, eps as f32),
        Objective::Hinge { beta } => (5, beta as f32, 0.0),
        Objective::Rpo { beta, alpha } => (6, beta as f32, alpha as f32),
        Objective::Simpo { beta, gamma } => (7, beta as f32, gamma as f32),
        Objective::Npo { beta } => (8, beta as f32, 0.0),
    }
}

/// Token indices grouped by id for the embedding backward: `order` (grouped, token order inside a
/// group), `starts` (group g is `order[starts[g]..starts[g+1]]`) and `rows` (the id of group g).
fn bucket_by_id(ids: &[i32]) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let mut order: Vec<i32> = (0..ids.len() as i32).collect();
    order.sort_by_key(|&t| ids[t as usize]); // stable: token order inside each group
    let (mut starts, mut rows) = (Vec::new(), Vec::new());
    for (k, &t) in order.iter().enumerate() {
        let id = ids[t as usize];
        if rows.last() != Some(&id) {
            starts.push(k as i32);
            rows.push(id);
        }
    }
    starts.push(order.len() as i32);
    (order, starts, rows)
}

impl CudaBackend {
    /// A backend on `device` (a GPU or the emulated device) storing tensors as `precision` says.
    pub fn new(device: Device, precision: Precision) -> Self {
        Self { device, precision, ones_f32: Mutex::new(None), ones_bf16: Mutex::new(None) }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The storage type of parameters and activations in this backend's precision.
    fn act(&self) -> Dtype {
        self.precision.activation_dtype()
    }

    fn launch(&self, name: &str, config: LaunchConfig, args: &[KernelArg]) -> Result<()> {
        self.device.launch(name, config, args).with_context(|| format!("kernel `{name}`"))
    }

    /// New storage of `len` elements of `dtype`, contents unspecified.
    fn alloc(&self, dtype: Dtype, len: usize) -> Result<Storage> {
        Ok(match dtype {
            Dtype::F32 => Storage::F32(self.device.alloc(len)?),
            Dtype::Bf16 => Storage::Bf16(self.device.alloc(len)?),
            other => bail!("the CUDA backend stores floats as f32 or bf16, not {other:?}"),
        })
    }

    /// The first `n` elements of `src` converted to `dtype`, in new storage of `n` elements.
    fn convert(&self, src: &Storage, n: usize, dtype: Dtype) -> Result<Storage> {
        let mut dst = self.alloc(dtype, n)?;
        match (src, &mut dst) {
            (Storage::F32(s), Storage::F32(d)) => self.device.copy(d, s.slice(..n))?,
            (Storage::Bf16(s), Storage::Bf16(d)) => self.device.copy(d, s.slice(..n))?,
            (Storage::F32(s), Storage::Bf16(d)) if n > 0 => self.launch(
                "convert_f32_to_bf16",
                pointwise_config(n),
                &[KernelArg::Ptr(d.device_ptr()), KernelArg::Ptr(s.device_ptr()), KernelArg::I64(n as i64)],
            )?,
            (Storage::Bf16(s), Storage::F32(d)) if n > 0 => self.launch(
                "convert_bf16_to_f32",
                pointwise_config(n),
                &[KernelArg::Ptr(d.device_ptr()), KernelArg::Ptr(s.device_ptr()), KernelArg::I64(n as i64)],
            )?,
            _ => {}
        }
        Ok(dst)
    }

    /// `buf` as a kernel reading `dtype` sees it: its own storage, its master (f32, exact), or a
    /// converted temporary.
    fn input<'a>(&self, buf: &'a CudaBuf, dtype: Dtype) -> Result<Operand<'a>> {
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
    /// otherwise.
    fn output<'a>(&self, buf: &'a mut CudaBuf, dtype: Dtype, keep: bool) -> Result<&'a mut Storage> {
        let master = buf.master.take();
        if buf.storage.dtype() != dtype {
            buf.storage = match master {
                Some(master) if keep && dtype == Dtype::F32 => Storage::F32(master),
                _ if keep => self.convert(&buf.storage, buf.len, dtype)?,
                _ => self.alloc(dtype, buf.len)?,
            };
        }
        Ok(&mut buf.storage)
    }

    /// A vector of at least `n` ones of `dtype`, for the bias-gradient products.
    fn with_ones<R>(&self, dtype: Dtype, n: usize, f: impl FnOnce(Operand<'_>) -> Result<R>) -> Result<R> {
        fn grown<T: DeviceScalar>(device: &Device, slot: &mut Option<DeviceBuffer<T>>, n: usize, one: T) -> Result<()> {
            if slot.as_ref().is_none_or(|b| b.len() < n) {
                let mut ones = device.alloc::<T>(n.next_power_of_two())?;
                device.fill(&mut ones, one)?;
                *slot = Some(ones);
            }
            Ok(())
        }
        match dtype {
            Dtype::Bf16 => {
                let mut slot = self.ones_bf16.lock().unwrap();
                grown(&self.device, &mut slot, n, bf16::ONE)?;
                f(Operand::Bf16(Held::Borrowed(slot.as_ref().unwrap())))
            }
            _ => {
                let mut slot = self.ones_f32.lock().unwrap();
                grown(&self.device, &mut slot, n, 1.0f32)?;
                f(Operand::F32(Held::Borrowed(slot.as_ref().unwrap())))
            }
        }
    }

    /// `D = alpha·op(A)·op(B) + beta·D (+ bias)` on operands of one type, `a` and `b` the first
    /// `a_len` / `b_len` elements of their buffers.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        spec: &Gemm,
        a: &Operand<'_>,
        a_len: usize,
        b: &Operand<'_>,
        d: &mut Storage,
        bias: Option<&Operand<'_>>,
    ) -> Result<()> {
        let b_len = spec.k * spec.n;
        match (a, b, d) {
            (Operand::F32(a), Operand::F32(b), Storage::F32(d)) => {
                let bias = match bias {
                    Some(Operand::F32(x)) => Some(x.slice(..spec.n)),
                    None => None,
                    _ => bail!("gemm: bias type differs from the output's"),
                };
                self.device.gemm(spec, a.slice(..a_len), b.slice(..b_len), d.slice_mut(..spec.m * spec.n), bias)
            }
            (Operand::Bf16(a), Operand::Bf16(b), Storage::Bf16(d)) => {
                let bias = match bias {
                    Some(Operand::Bf16(x)) => Some(x.slice(..spec.n)),
                    None => None,
                    _ => bail!("gemm: bias type differs from the output's"),
                };
                self.device.gemm(spec, a.slice(..a_len), b.slice(..b_len), d.slice_mut(..spec.m * spec.n), bias)
            }
            _ => bail!("gemm: operands of mixed storage types"),
        }
    }

    /// Launches elementwise kernel `<op>_<dtype>` over `n` elements with `args` followed by `n`.
    fn pointwise(&self, op: &str, dtype: Dtype, n: usize, args: &[KernelArg]) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let mut all = args.to_vec();
        all.push(KernelArg::I64(n as i64));
        self.launch(&format!("{op}_{}", suffix(dtype)), pointwise_config(n), &all)
    }

    /// Adds `dout` summed over tokens by id into the rows of `dtable` (see kernels/embedding.cu).
    fn embedding_scatter(&self, dtable: &Storage, dout: &Operand<'_>, ids: &[i32], c: usize) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let (order, starts, rows) = bucket_by_id(ids);
        let buckets = rows.len();
        let mut plan = order;
        plan.extend_from_slice(&starts);
        plan.extend_from_slice(&rows);
        let plan = self.device.upload(&plan)?;
        let n = ids.len();
        let threads = row_threads(c);
        let config = LaunchConfig {
            grid: (grid_dim(buckets, "embedding buckets")?, c.div_ceil(threads as usize) as u32, 1),
            block: (threads, 1, 1),
            shared_bytes: 0,
        };
        ensure!(config.grid.1 as usize <= MAX_GRID_Y, "embedding_backward: c = {c} is too wide");
        self.launch(
            &format!("embedding_backward_{}", suffix(dtable.dtype())),
            config,
            &[
                dtable.arg(),
                dout.arg(),
                KernelArg::Ptr(plan.slice(..n).device_ptr()),
                KernelArg::Ptr(plan.slice(n..n + buckets + 1).device_ptr()),
                KernelArg::Ptr(plan.slice(n + buckets + 1..).device_ptr()),
                i32_arg(c, "c")?,
            ],
        )
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
            // Free first: device memory is what runs out.
            let dtype = buf.storage.dtype();
            buf.storage = self.alloc(dtype, 0)?;
            buf.storage = self.alloc(dtype, len)?;
        }
        buf.len = len;
        Ok(())
    }

    fn copy(&self, dst: &mut CudaBuf, src: &CudaBuf) -> Result<()> {
        checks::copy(dst.len(), src.len())?;
        let n = src.len;
        // dst becomes an exact copy: same storage type, same master.
        if dst.storage.dtype() != src.storage.dtype() || dst.storage.capacity() < n {
            dst.storage = self.alloc(src.storage.dtype(), n)?;
        }
        match (&mut dst.storage, &src.storage) {
            (Storage::F32(d), Storage::F32(s)) => self.device.copy(d.slice_mut(..n), s.slice(..n))?,
            (Storage::Bf16(d), Storage::Bf16(s)) => self.device.copy(d.slice_mut(..n), s.slice(..n))?,
            _ => unreachable!("storage types were made equal above"),
        }
        dst.master = match &src.master {
            Some(master) => {
                let mut copy = match dst.master.take() {
                    Some(own) if own.len() >= n => own,
                    _ => self.device.alloc(n)?,
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

impl EmbeddingOps for CudaBackend {
    fn embedding_forward(
        &self,
        out: &mut CudaBuf,
        tokens: &CudaIds,
        positions: &CudaIds,
        wte: &CudaBuf,
        wpe: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::embedding_forward(out.len(), &tokens.host, &positions.host, wte.len(), wpe.len(), n, c)?;
        if n == 0 {
            return Ok(());
        }
        let dt = self.act();
        let (wte, wpe) = (self.input(wte, dt)?, self.input(wpe, dt)?);
        let out = self.output(out, dt, false)?;
        self.launch(
            &format!("embedding_forward_{}", suffix(dt)),
            pointwise_config(n * c),
            &[out.arg(), tokens.arg(), positions.arg(), wte.arg(), wpe.arg(), i32_arg(n, "n")?, i32_arg(c, "c")?],
        )
    }

    fn embedding_backward(
        &self,
        dwte: &mut CudaBuf,
        dwpe: &mut CudaBuf,
        dout: &CudaBuf,
        tokens: &CudaIds,
        positions: &CudaIds,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::embedding_backward(dwte.len(), dwpe.len(), dout.len(), &tokens.host, &positions.host, n, c)?;
        let dt = self.act();
        let dout = self.input(dout, dt)?;
        let dwte = self.output(dwte, dt, true)?;
        self.embedding_scatter(dwte, &dout, &tokens.host, c)?;
        let dwpe = self.output(dwpe, dt, true)?;
        self.embedding_scatter(dwpe, &dout, &positions.host, c)
    }
}

impl LayerNormOps for CudaBackend {
    fn layernorm_forward(
        &self,
        out: &mut CudaBuf,
        mean: &mut CudaBuf,
        rstd: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: &CudaBuf,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        checks::layernorm_forward(out.len(), mean.len(), rstd.len(), inp.len(), weight.len(), bias.len(), n, c)?;
        if n == 0 {
            return Ok(());
        }
        let dt = self.act();
        let (inp, weight, bias) = (self.input(inp, dt)?, self.input(weight, dt)?, self.input(bias, dt)?);
        let mean = self.output(mean, Dtype::F32, false)?.arg();
        let rstd = self.output(rstd, Dtype::F32, false)?.arg();
        let out = self.output(out, dt, false)?;
        let blocks = grid_dim(n.div_ceil(LN_ROWS_PER_BLOCK), "layernorm blocks")?;
        self.launch(
            &format!("layernorm_forward_{}", suffix(dt)),
            LaunchConfig::grid_1d(blocks, 32 * LN_ROWS_PER_BLOCK as u32),
            &[
                out.arg(),
                mean,
                rstd,
                inp.arg(),
                weight.arg(),
                bias.arg(),
                i32_arg(n, "n")?,
                i32_arg(c, "c")?,
                KernelArg::F32(eps),
            ],
        )
    }

    fn residual_layernorm_forward(
        &self,
        residual: &mut CudaBuf,
        out: &mut CudaBuf,
        mean: &mut CudaBuf,
        rstd: &mut CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        weight: &CudaBuf,
        bias: &CudaBuf,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        checks::residual_layernorm_forward(
            residual.len(),
            out.len(),
            mean.len(),
            rstd.len(),
            a.len(),
            b.len(),
            weight.len(),
            bias.len(),
            n,
            c,
        )?;
        if n == 0 {
            return Ok(());
        }
        let dt = self.act();
        let (a, b) = (self.input(a, dt)?, self.input(b, dt)?);
        let (weight, bias) = (self.input(weight, dt)?, self.input(bias, dt)?);
        let mean = self.output(mean, Dtype::F32, false)?.arg();
        let rstd = self.output(rstd, Dtype::F32, false)?.arg();
        let residual = self.output(residual, dt, false)?.arg();
        let out = self.output(out, dt, false)?;
        let blocks = grid_dim(n.div_ceil(LN_ROWS_PER_BLOCK), "layernorm blocks")?;
        self.launch(
            &format!("residual_layernorm_forward_{}", suffix(dt)),
            LaunchConfig::grid_1d(blocks, 32 * LN_ROWS_PER_BLOCK as u32),
            &[
                residual,
                out.arg(),
                mean,
                rstd,
                a.arg(),
                b.arg(),
                weight.arg(),
                bias.arg(),
                i32_arg(n, "n")?,
                i32_arg(c, "c")?,
                KernelArg::F32(eps),
            ],
        )
    }

    fn layernorm_backward(
        &self,
        dinp: &mut CudaBuf,
        dweight: &mut CudaBuf,
        dbias: &mut CudaBuf,
        dout: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::layernorm_backward(
            dinp.len(),
            dweight.len(),
            dbias.len(),
            dout.len(),
            inp.len(),
            weight.len(),
            mean.len(),
            rstd.len(),
            n,
            c,
        )?;
        if n == 0 {
            return Ok(());
        }
        let dt = self.act();
        let (dout, inp, weight) = (self.input(dout, dt)?, self.input(inp, dt)?, self.input(weight, dt)?);
        let (mean, rstd) = (self.input(mean, Dtype::F32)?, self.input(rstd, Dtype::F32)?);
        let (n_arg, c_arg) = (i32_arg(n, "n")?, i32_arg(c, "c")?);

        let dinp = self.output(dinp, dt, true)?;
        let blocks = grid_dim(n.div_ceil(LN_ROWS_PER_BLOCK), "layernorm blocks")?;
        self.launch(
            &format!("layernorm_backward_dinp_{}", suffix(dt)),
            LaunchConfig::grid_1d(blocks, 32 * LN_ROWS_PER_BLOCK as u32),
            &[dinp.arg(), dout.arg(), inp.arg(), weight.arg(), mean.arg(), rstd.arg(), n_arg, c_arg],
        )?;

        // Parameter gradients: per-chunk partials, then one ordered sum per channel. The chunk size
        // depends only on n (more rows per chunk only when the grid would exceed its y limit).
        let rows_per_chunk = LN_ROWS_PER_CHUNK.max(n.div_ceil(MAX_GRID_Y));
        let chunks = n.div_ceil(rows_per_chunk);
        let partial = self.device.alloc::<f32>(chunks * 2 * c)?;
        let threads = row_threads(c);
        let channel_blocks = grid_dim(c.div_ceil(threads as usize), "layernorm channel blocks")?;
        self.launch(
            &format!("layernorm_backward_params_partial_{}", suffix(dt)),
            LaunchConfig { grid: (channel_blocks, chunks as u32, 1), block: (threads, 1, 1), shared_bytes: 0 },
            &[
                KernelArg::Ptr(partial.device_ptr()),
                dout.arg(),
                inp.arg(),
                mean.arg(),
                rstd.arg(),
                n_arg,
                c_arg,
                i32_arg(rows_per_chunk, "rows per chunk")?,
            ],
        )?;
        let dweight = self.output(dweight, dt, true)?.arg();
        let dbias = self.output(dbias, dt, true)?.arg();
        self.launch(
            &format!("layernorm_backward_params_reduce_{}", suffix(dt)),
            LaunchConfig::grid_1d(channel_blocks, threads),
            &[dweight, dbias, KernelArg::Ptr(partial.device_ptr()), i32_arg(chunks, "chunks")?, c_arg],
        )
    }
}

impl MatmulOps for CudaBackend {
    fn matmul_forward(
        &self,
        out: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: Option<&CudaBuf>,
        n: usize,
        ic: usize,
        oc: usize,
        layout: WeightLayout,
    ) -> Result<()> {
        checks::matmul_forward(out.len(), inp.len(), weight.len(), bias.map(CudaBuf::len), n, ic, oc)?;
        if n == 0 || oc == 0 {
            return Ok(());
        }
        ensure!(ic > 0, "matmul_forward: an inner dimension of 0 is not supported on the CUDA backend");
        let dt = self.act();
        let (inp, weight) = (self.input(inp, dt)?, self.input(weight, dt)?);
        let bias = bias.map(|b| self.input(b, dt)).transpose()?;
        let out = self.output(out, dt, false)?;
        // out[n, oc] = inp[n, ic] · W; W stored [ic, oc] (InOut) or [oc, ic] (OutIn, transposed).
        let spec = Gemm::new(n, oc, ic).trans_b(layout == WeightLayout::OutIn);
        self.gemm(&spec, &inp, n * ic, &weight, out, bias.as_ref())
    }

    /// One cuBLASLt product with the `GELU_AUX_BIAS` epilogue where the device can fuse it (the
    /// emulated device always; a GPU in Bf16 mode when cuBLASLt has an algorithm, see
    /// [`Device::gemm_bias_gelu`]), else `matmul_forward` then `gelu_forward`. A GPU in F32 mode does
    /// not fuse: that mode is held to the CPU at 1e-5, and cuBLASLt does not document the precision
    /// of its GELU.
    fn matmul_bias_gelu_forward(
        &self,
        pre: &mut CudaBuf,
        out: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: &CudaBuf,
        n: usize,
        ic: usize,
        oc: usize,
    ) -> Result<()> {
        const OP: &str = "matmul_bias_gelu_forward";
        checks::check_len(OP, "pre", pre.len(), n * oc)?;
        checks::check_len(OP, "out", out.len(), n * oc)?;
        checks::check_len(OP, "inp", inp.len(), n * ic)?;
        checks::check_len(OP, "weight", weight.len(), ic * oc)?;
        checks::check_len(OP, "bias", bias.len(), oc)?;
        if n == 0 || oc == 0 {
            return Ok(());
        }
        ensure!(ic > 0, "{OP}: an inner dimension of 0 is not supported on the CUDA backend");
        let dt = self.act();
        if self.device.is_emulated() || dt == Dtype::Bf16 {
            let (a, w, b) = (self.input(inp, dt)?, self.input(weight, dt)?, self.input(bias, dt)?);
            let (pre_storage, out_storage) = (self.output(pre, dt, false)?, self.output(out, dt, false)?);
            // out[n, oc] = gelu(inp[n, ic] · W[ic, oc] + bias)
            let spec = Gemm::new(n, oc, ic);
            let fused = match (&a, &w, &b, pre_storage, out_storage) {
                (Operand::F32(a), Operand::F32(w), Operand::F32(b), Storage::F32(p), Storage::F32(o)) => {
                    self.device.gemm_bias_gelu(
                        &spec,
                        a.slice(..n * ic),
                        w.slice(..ic * oc),
                        p.slice_mut(..n * oc),
                        o.slice_mut(..n * oc),
                        b.slice(..oc),
                    )
                }
                (Operand::Bf16(a), Operand::Bf16(w), Operand::Bf16(b), Storage::Bf16(p), Storage::Bf16(o)) => {
                    self.device.gemm_bias_gelu(
                        &spec,
                        a.slice(..n * ic),
                        w.slice(..ic * oc),
                        p.slice_mut(..n * oc),
                        o.slice_mut(..n * oc),
                        b.slice(..oc),
                    )
                }
                _ => bail!("{OP}: operands of mixed storage types"),
            }
            .with_context(|| format!("{OP}: n = {n}, ic = {ic}, oc = {oc}"))?;
            if fused {
                return Ok(());
            }
        }
        self.matmul_forward(pre, inp, weight, Some(bias), n, ic, oc, WeightLayout::InOut)?;
        self.gelu_forward(out, pre)
    }

    fn matmul_backward(
        &self,
        dinp: &mut CudaBuf,
        dweight: &mut CudaBuf,
        dbias: Option<&mut CudaBuf>,
        dout: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        n: usize,
        ic: usize,
        oc: usize,
        layout: WeightLayout,
    ) -> Result<()> {
        let dbias_len = dbias.as_ref().map(|db| db.len());
        checks::matmul_backward(dinp.len(), dweight.len(), dbias_len, dout.len(), inp.len(), weight.len(), n, ic, oc)?;
        let dt = self.act();
        if n == 0 {
            return Ok(());
        }
        let (dout, inp, weight) = (self.input(dout, dt)?, self.input(inp, dt)?, self.input(weight, dt)?);
        if ic > 0 {
            let dinp = self.output(dinp, dt, false)?;
            if oc == 0 {
                match dinp {
                    Storage::F32(b) => self.device.zero(b.slice_mut(..n * ic))?,
                    Storage::Bf16(b) => self.device.zero(b.slice_mut(..n * ic))?,
                }
            } else {
                // dinp[n, ic] = dout[n, oc] · Wᵀ
                let spec = Gemm::new(n, ic, oc).trans_b(layout == WeightLayout::InOut);
                self.gemm(&spec, &dout, n * oc, &weight, dinp, None)?;
            }
        }
        if ic > 0 && oc > 0 {
            let dweight = self.output(dweight, dt, true)?;
            match layout {
                // dW[ic, oc] += inpᵀ · dout
                WeightLayout::InOut => {
                    self.gemm(&Gemm::new(ic, oc, n).trans_a(true).beta(1.0), &inp, n * ic, &dout, dweight, None)?
                }
                // dW[oc, ic] += doutᵀ · inp
                WeightLayout::OutIn => {
                    self.gemm(&Gemm::new(oc, ic, n).trans_a(true).beta(1.0), &dout, n * oc, &inp, dweight, None)?
                }
            }
        }
        if let Some(dbias) = dbias {
            if oc > 0 {
                // dbias[oc] += ones[1, n] · dout[n, oc]: a product keeps the sum's order fixed.
                let dbias = self.output(dbias, dt, true)?;
                self.with_ones(dt, n, |ones| self.gemm(&Gemm::new(1, oc, n).beta(1.0), &ones, n, &dout, dbias, None))?;
            }
        }
        Ok(())
    }
}

impl AttentionOps for CudaBackend {
    /// The forward keeps the log-sum-exp of every (token, head) row of scores: `n_head · n` f32.
    fn attention_saved_len(&self, packing: &Packing<Self>, n_head: usize) -> usize {
        n_head * packing.num_tokens()
    }

    fn attention_forward(
        &self,
        out: &mut CudaBuf,
        saved: &mut CudaBuf,
        qkv: &CudaBuf,
        packing: &Packing<Self>,
        n_head: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "attention_forward";
        let saved_len = self.attention_saved_len(packing, n_head);
        let cu = &packing.host_cu_seqlens;
        checks::attention_forward(out.len(), saved.len(), qkv.len(), cu, n_head, c, saved_len)?;
        check_device_cu_seqlens(OP, packing)?;
        if packing.num_tokens() == 0 {
            return Ok(());
        }
        let plan = AttentionPlan::new(OP, packing, n_head, c)?;
        let dt = self.act();
        let qkv = self.input(qkv, dt)?;
        let lse = self.output(saved, Dtype::F32, false)?.arg();
        let out = self.output(out, dt, false)?;
        self.launch(
            &plan.kernel("forward", dt),
            plan.config(),
            &[out.arg(), lse, qkv.arg(), packing.cu_seqlens.arg(), i32_arg(n_head, "n_head")?, i32_arg(c, "c")?],
        )
    }

    fn attention_backward(
        &self,
        dqkv: &mut CudaBuf,
        dout: &CudaBuf,
        qkv: &CudaBuf,
        out: &CudaBuf,
        saved: &CudaBuf,
        packing: &Packing<Self>,
        n_head: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "attention_backward";
        let saved_len = self.attention_saved_len(packing, n_head);
        let cu = &packing.host_cu_seqlens;
        checks::attention_backward(
            dqkv.len(),
            dout.len(),
            qkv.len(),
            out.len(),
            saved.len(),
            cu,
            n_head,
            c,
            saved_len,
        )?;
        check_device_cu_seqlens(OP, packing)?;
        let n = packing.num_tokens();
        if n == 0 {
            return Ok(());
        }
        let plan = AttentionPlan::new(OP, packing, n_head, c)?;
        let dt = self.act();
        let (dout, qkv, out) = (self.input(dout, dt)?, self.input(qkv, dt)?, self.input(out, dt)?);
        let lse = self.input(saved, Dtype::F32)?;
        // D_t = dout_t·out_t per (token, head): written by the dq kernel, read by the dk/dv kernel.
        let delta = self.device.alloc::<f32>(n * n_head)?;
        let dqkv = self.output(dqkv, dt, false)?;
        let tail = [packing.cu_seqlens.arg(), i32_arg(n_head, "n_head")?, i32_arg(c, "c")?];
        let mut args =
            vec![dqkv.arg(), KernelArg::Ptr(delta.device_ptr()), dout.arg(), qkv.arg(), out.arg(), lse.arg()];
        args.extend(tail);
        self.launch(&plan.kernel("backward_dq", dt), plan.config(), &args)?;
        let mut args = vec![dqkv.arg(), dout.arg(), qkv.arg(), lse.arg(), KernelArg::Ptr(delta.device_ptr())];
        args.extend(tail);
        self.launch(&plan.kernel("backward_dkdv", dt), plan.config(), &args)
    }
}

impl PointwiseOps for CudaBackend {
    // Elementwise ops compute in their output's storage type (the activation type unless an op
    // made it f32), so that they never round an f32 tensor to bf16.
    fn gelu_forward(&self, out: &mut CudaBuf, inp: &CudaBuf) -> Result<()> {
        checks::gelu_forward(out.len(), inp.len())?;
        let (dt, n) = (out.dtype(), out.len());
        let inp = self.input(inp, dt)?;
        let out = self.output(out, dt, false)?;
        self.pointwise("gelu_forward", dt, n, &[out.arg(), inp.arg()])
    }

    fn gelu_backward(&self, dinp: &mut CudaBuf, inp: &CudaBuf, dout: &CudaBuf) -> Result<()> {
        checks::gelu_backward(dinp.len(), inp.len(), dout.len())?;
        let (dt, n) = (dinp.dtype(), dinp.len());
        let (inp, dout) = (self.input(inp, dt)?, self.input(dout, dt)?);
        let dinp = self.output(dinp, dt, false)?;
        self.pointwise("gelu_backward", dt, n, &[dinp.arg(), inp.arg(), dout.arg()])
    }

    fn residual_forward(&self, out: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf) -> Result<()> {
        checks::residual_forward(out.len(), a.len(), b.len())?;
        let (dt, n) = (out.dtype(), out.len());
        let (a, b) = (self.input(a, dt)?, self.input(b, dt)?);
        let out = self.output(out, dt, false)?;
        self.pointwise("residual_forward", dt, n, &[out.arg(), a.arg(), b.arg()])
    }

    fn add_inplace(&self, dst: &mut CudaBuf, src: &CudaBuf) -> Result<()> {
        checks::add_inplace(dst.len(), src.len())?;
        let (dt, n) = (dst.dtype(), dst.len());
        let src = self.input(src, dt)?;
        let dst = self.output(dst, dt, true)?;
        self.pointwise("add_inplace", dt, n, &[dst.arg(), src.arg()])
    }

    fn scale(&self, buf: &mut CudaBuf, s: f32) -> Result<()> {
        let n = buf.len();
        self.pointwise("scale", buf.dtype(), n, &[buf.storage.arg(), KernelArg::F32(s)])?;
        if let Some(master) = &buf.master {
            self.pointwise("scale", Dtype::F32, n, &[KernelArg::Ptr(master.device_ptr()), KernelArg::F32(s)])?;
        }
        Ok(())
    }
}

impl RowOps for CudaBackend {
    // Exact copies: the output takes the input's storage type (see kernels/rows.cu).
    fn gather_rows(
        &self,
        out: &mut CudaBuf,
        inp: &CudaBuf,
        rows: &CudaIds,
        m: usize,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::gather_rows(out.len(), inp.len(), &rows.host, m, n, c)?;
        if m == 0 {
            return Ok(());
        }
        let dt = inp.dtype();
        let inp = self.input(inp, dt)?;
        let out = self.output(out, dt, false)?;
        self.launch(
            &format!("gather_rows_{}", suffix(dt)),
            LaunchConfig::grid_1d(grid_dim(m, "rows")?, row_threads(c)),
            &[out.arg(), inp.arg(), rows.arg(), i32_arg(c, "c")?],
        )
    }

    fn scatter_rows(
        &self,
        dinp: &mut CudaBuf,
        dout: &CudaBuf,
        rows: &CudaIds,
        m: usize,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::scatter_rows(dinp.len(), dout.len(), &rows.host, m, n, c)?;
        if n == 0 {
            return Ok(());
        }
        let dt = dout.dtype();
        let dout = self.input(dout, dt)?;
        let dinp = self.output(dinp, dt, false)?;
        self.launch(
            &format!("scatter_rows_{}", suffix(dt)),
            LaunchConfig::grid_1d(grid_dim(n, "rows")?, row_threads(c)),
            &[dinp.arg(), dout.arg(), rows.arg(), i32_arg(m, "m")?, i32_arg(c, "c")?],
        )
    }
}

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
        let dt = self.act();
        let logits = self.input(logits, dt)?;
        let token_logp = self.output(token_logp, Dtype::F32, false)?.arg();
        let lse = self.output(lse, Dtype::F32, false)?.arg();
        self.launch(
            &format!("logsoftmax_gather_forward_{}", suffix(dt)),
            LaunchConfig::grid_1d(grid_dim(n, "rows")?, row_threads(v)),
            &[token_logp, lse, logits.arg(), targets.arg(), i32_arg(v, "v")?],
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
        let dt = self.act();
        let (lse, dseq) = (self.input(lse, Dtype::F32)?, self.input(dseq, Dtype::F32)?);
        let logits = self.output(logits, dt, true)?;
        self.launch(
            &format!("logsoftmax_gather_backward_{}", suffix(dt)),
            LaunchConfig::grid_1d(grid_dim(n, "rows")?, row_threads(v)),
            &[
                logits.arg(),
                lse.arg(),
                targets.arg(),
                dseq.arg(),
                packing.cu_seqlens.arg(),
                i32_arg(packing.num_seqs(), "sequences")?,
                i32_arg(v, "v")?,
            ],
        )
    }
}

impl PreferenceLossOps for CudaBackend {
    fn preference_loss(
        &self,
        metrics: &mut CudaBuf,
        dpolicy: &mut CudaBuf,
        policy: &CudaBuf,
        reference: &CudaBuf,
        unsafe_flags: &CudaIds,
        lengths: &CudaIds,
        objective: &Objective,
        grad_scale: f32,
    ) -> Result<()> {
        let uses_reference = objective.uses_reference();
        let pairs = checks::preference_loss(
            metrics.len(),
            dpolicy.len(),
            policy.len(),
            reference.len(),
            &unsafe_flags.host,
            &lengths.host,
            uses_reference,
        )?;
        if pairs == 0 {
            return Ok(());
        }
        let (code, beta, param) = objective_code(objective);
        let policy = self.input(policy, Dtype::F32)?;
        let reference = if uses_reference { Some(self.input(reference, Dtype::F32)?) } else { None };
        let metrics = self.output(metrics, Dtype::F32, false)?.arg();
        let dpolicy = self.output(dpolicy, Dtype::F32, false)?.arg();
        self.launch(
            "preference_loss_f32",
            LaunchConfig::for_elements(pairs, PAIR_THREADS),
            &[
                metrics,
                dpolicy,
                policy.arg(),
                reference.as_ref().map_or(KernelArg::NULL, Operand::arg),
                unsafe_flags.arg(),
                lengths.arg(),
                i32_arg(pairs, "pairs")?,
                KernelArg::I32(code),
                KernelArg::F32(beta),
                KernelArg::F32(param),
                KernelArg::F32(grad_scale),
            ],
        )
    }
}

impl OptimizerOps for CudaBackend {
    fn adamw(
        &self,
        param: &mut CudaBuf,
        grad: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        p: &AdamWParams,
    ) -> Result<()> {
        let n = param.len();
        checks::adamw(n, grad.len(), m.len(), v.len(), p.step)?;
        if n == 0 {
            return Ok(());
        }
        // Bias corrections in f64 (as PyTorch computes them in Python floats).
        let bc1 = (1.0 - (p.beta1 as f64).powi(p.step as i32)) as f32;
        let bc2 = (1.0 - (p.beta2 as f64).powi(p.step as i32)) as f32;
        let m = self.output(m, Dtype::F32, true)?.arg();
        let v = self.output(v, Dtype::F32, true)?.arg();
        let hyper = [
            KernelArg::I64(n as i64),
            KernelArg::F32(p.lr),
            KernelArg::F32(p.beta1),
            KernelArg::F32(p.beta2),
            KernelArg::F32(p.eps),
            KernelArg::F32(p.weight_decay),
            KernelArg::F32(bc1),
            KernelArg::F32(bc2),
            KernelArg::F32(p.grad_scale),
        ];
        let dt = param.dtype();
        let grad = self.input(grad, dt)?;
        let mut args = vec![param.storage.arg()];
        match dt {
            Dtype::Bf16 => {
                let master = self.ensure_master(param)?;
                args.push(KernelArg::Ptr(master));
            }
            _ => param.master = None,
        }
        args.extend([grad.arg(), m, v]);
        args.extend(hyper);
        self.launch(&format!("adamw_{}", suffix(dt)), pointwise_config(n), &args)
    }

    fn sgd(&self, param: &mut CudaBuf, grad: &CudaBuf, lr: f32, grad_scale: f32) -> Result<()> {
        checks::sgd(param.len(), grad.len())?;
        let dt = param.dtype();
        let grad = self.input(grad, dt)?;
        let master = match dt {
            Dtype::Bf16 => KernelArg::Ptr(self.ensure_master(param)?),
            _ => {
                param.master = None;
                KernelArg::NULL
            }
        };
        let n = param.len();
        if n == 0 {
            return Ok(());
        }
        self.launch(
            &format!("sgd_{}", suffix(dt)),
            pointwise_config(n),
            &[param.storage.arg(), master, grad.arg(), KernelArg::I64(n as i64), KernelArg::F32(lr * grad_scale)],
        )
    }

    fn sum_squares(&self, bufs: &[&CudaBuf]) -> Result<f64> {
        let blocks: Vec<usize> = bufs
            .iter()
            .map(|b| if b.is_empty() { 0 } else { b.len().div_ceil(NORM_ELEMENTS_PER_BLOCK).min(NORM_MAX_BLOCKS) })
            .collect();
        let total: usize = blocks.iter().sum();
        if total == 0 {
            return Ok(0.0);
        }
        let mut partials = self.device.alloc::<f32>(total)?;
        let mut offset = 0;
        for (buf, &count) in bufs.iter().zip(&blocks) {
            if count == 0 {
                continue;
            }
            let slot = partials.slice_mut(offset..offset + count).device_ptr();
            self.launch(
                &format!("sum_squares_partial_{}", suffix(buf.dtype())),
                LaunchConfig::grid_1d(count as u32, NORM_THREADS),
                &[KernelArg::Ptr(slot), buf.storage.arg(), KernelArg::I64(buf.len() as i64)],
            )?;
            offset += count;
        }
        // The f64 total comes back as its bit pattern (device buffers hold no f64 type).
        let out = self.device.alloc::<u64>(1)?;
        self.launch(
            "sum_squares_final",
            LaunchConfig::grid_1d(1, NORM_THREADS),
            &[KernelArg::Ptr(out.device_ptr()), KernelArg::Ptr(partials.device_ptr()), i32_arg(total, "partials")?],
        )?;
        Ok(f64::from_bits(self.device.download(&out)?[0]))
    }
}

impl CudaBackend {
    /// The fp32 master copy of a bf16 parameter, created from its values when absent.
    fn ensure_master(&self, param: &mut CudaBuf) -> Result<u64> {
        if param.master.is_none() {
            let Storage::F32(master) = self.convert(&param.storage, param.len, Dtype::F32)? else {
                unreachable!("convert to f32 gives f32 storage")
            };
            param.master = Some(master);
        }
        Ok(param.master.as_ref().unwrap().device_ptr())
    }
}
