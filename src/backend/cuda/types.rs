//! The plain types of the device interface: element types, kernel arguments, launch shapes and
//! GEMM descriptions. The dispatcher ([`super::device`]) and both implementations ([`super::gpu`],
//! [`super::emu`]) use them; this module uses none of those, so the dependencies go one way.

use anyhow::{ensure, Result};

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

// ---- what the dispatcher hands an implementation -----------------------------------------------------

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
