//! The emulated device: the CUDA kernels of `kernels/*.cu`, compiled for the CPU through
//! `kernels/emu` (build.rs), launched by name through the same interface as a GPU.
//!
//! Device memory is host memory laid out to catch mistakes: every buffer ends at a guard page (a
//! kernel that runs off the end faults), the bytes between the buffer's end and its 256-byte-rounded
//! capacity hold a canary that every launch checks afterwards (small overruns become an error naming
//! the kernel), and fresh buffers hold 0xFF bytes (NaN) so that reading unwritten memory shows. Each
//! launch also checks its arguments against the kernel's C++ signature and every pointer argument
//! against the live buffers of this device.
//!
//! The test mode ([`use_test_mode`]) checks shared memory too: a race detector ([`set_racecheck`])
//! reports any access to a shared-memory word that another thread of the block wrote (or read, for
//! a write) with no barrier between, and blocks, warps and lanes run in a seeded random order
//! (docs/TESTING.md, "Shared-memory races").
//!
//! Tests of offsets past 2^31 elements ([`set_lazy_alloc`], [`BlockWindow`]) map buffers larger than
//! the machine's memory and run only the far end of a launch's grid (docs/TESTING.md, "Offsets past
//! 2^31 elements").
//!
//! GEMM is a CPU reference with the GPU path's semantics ([`Gemm`]): f32 products (the `gemm` crate),
//! then `alpha·P + beta·D + bias` in f32, rounded once to D's type; with the GELU epilogue, that value
//! rounded to the pre-activation buffer and its GELU (f32) rounded to D.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, ensure, Context, Result};
use half::bf16;

use super::kernels::constants::pointwise::{GELU_CUBIC, GELU_SCALE};
use super::types::{Dtype, FillPattern, Gemm, GemmOperands, KernelArg, LaunchConfig};

mod ffi {
    use std::ffi::{c_char, c_int, c_void};
    // kernels/emu/runtime.cpp, linked from the static library build.rs makes.
    extern "C" {
        pub fn emu_launch(
            name: *const c_char,
            grid: *const u32,
            block: *const u32,
            dyn_smem_bytes: usize,
            args: *mut *mut c_void,
            nargs: usize,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn emu_kernel_info(
            name: *const c_char,
            signature: *mut *const c_char,
            unit: *mut *const c_char,
            duplicate_unit: *mut *const c_char,
        ) -> c_int;
        pub fn emu_kernel_count() -> usize;
        pub fn emu_kernel_name(i: usize) -> *const c_char;
        pub fn emu_counters(out: *mut u64);
        pub fn emu_context_switch_kind() -> *const c_char;
        pub fn emu_mem_alloc(capacity: usize) -> *mut c_void;
        pub fn emu_mem_free(ptr: *mut c_void, capacity: usize);
        pub fn emu_set_schedule(random: c_int, seed: u64);
        pub fn emu_set_racecheck(on: c_int);
        pub fn emu_racecheck_enabled() -> c_int;
        pub fn emu_mem_zero(ptr: *mut c_void, bytes: usize);
        pub fn emu_set_lazy_alloc(on: c_int);
        pub fn emu_add_block_window(prefix: *const c_char, lo: *const i64, hi: *const i64);
        pub fn emu_clear_block_windows();
        pub fn emu_block_window_record(out: *mut u64);
    }
}

/// Fills the bytes between a buffer's end and its capacity; a launch that changes them wrote past
/// the end of the buffer.
const CANARY: u8 = 0xA5;
const ALIGN: usize = 256;

/// A kernel as the emulated device knows it.
#[derive(Clone, Debug)]
pub struct KernelInfo {
    /// One code per parameter: p pointer, f float, d double, i int32, u uint32, l int64, L uint64.
    pub signature: String,
    /// The kernel file (`kernels/<unit>.cu`).
    pub unit: String,
}

/// Looks up a kernel of the emulated device.
pub fn kernel_signature(name: &str) -> Result<KernelInfo> {
    let c_name = CString::new(name).map_err(|_| anyhow!("kernel name {name:?} contains a NUL byte"))?;
    let (mut signature, mut unit, mut duplicate) = (std::ptr::null(), std::ptr::null(), std::ptr::null());
    // SAFETY: the runtime writes static strings into the three out-pointers.
    let status = unsafe { ffi::emu_kernel_info(c_name.as_ptr(), &mut signature, &mut unit, &mut duplicate) };
    let text = |p: *const c_char| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    match status {
        0 => Ok(KernelInfo { signature: text(signature), unit: text(unit) }),
        2 => bail!("kernel `{name}` is defined in both kernels/{}.cu and kernels/{}.cu", text(unit), text(duplicate)),
        _ => bail!("no kernel named `{name}` in kernels/*.cu (emulated device)"),
    }
}

/// Every kernel the emulated device has, sorted.
pub fn kernel_names() -> Vec<String> {
    // SAFETY: the runtime returns static NUL-terminated names for indices below the count.
    unsafe {
        (0..ffi::emu_kernel_count())
            .map(|i| CStr::from_ptr(ffi::emu_kernel_name(i)).to_string_lossy().into_owned())
            .collect()
    }
}

/// Work done by the emulated device since the process started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub launches: u64,
    pub blocks: u64,
    /// Fiber resumes; each is a switch into a thread and one back out.
    pub resumes: u64,
    /// CPU time the launches took, in nanoseconds (thread CPU time: unaffected by other load).
    pub cpu_ns: u64,
}

pub fn counters() -> Counters {
    let mut out = [0u64; 4];
    // SAFETY: writes four u64.
    unsafe { ffi::emu_counters(out.as_mut_ptr()) };
    Counters { launches: out[0], blocks: out[1], resumes: out[2], cpu_ns: out[3] }
}

/// "x86-64 assembly" or "ucontext".
pub fn context_switch_kind() -> &'static str {
    // SAFETY: a static string.
    unsafe { CStr::from_ptr(ffi::emu_context_switch_kind()) }.to_str().unwrap_or("?")
}

/// The order in which the emulated device runs the blocks of a launch, the warps of a block between
/// two barriers and the lanes of a warp between two warp operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Blocks, warps and lanes in index order (the default): fast and reproducible.
    InOrder,
    /// The test mode: an order drawn from `seed`, mixed with the launch's number (each launch gets
    /// another order; a failing launch's error names its own seed). `SAFEDPO_EMU_SCHEDULE=random:SEED`
    /// starts a process in this mode.
    Random { seed: u64 },
}

/// Sets the schedule of every later launch on the emulated device (process-wide).
pub fn set_schedule(schedule: Schedule) {
    let (random, seed) = match schedule {
        Schedule::InOrder => (0, 0),
        Schedule::Random { seed } => (1, seed),
    };
    // SAFETY: plain values; the runtime takes its launch lock.
    unsafe { ffi::emu_set_schedule(random, seed) };
}

/// The test mode the test suites run the emulated device in: the race detector on and a random
/// schedule (seed from `SAFEDPO_EMU_SEED`, decimal or 0x-hex, else a fixed one). Process-wide. What
/// the environment sets wins: `SAFEDPO_EMU_RACECHECK=0`, `SAFEDPO_EMU_SCHEDULE=in-order` (or
/// `random:SEED`).
pub fn use_test_mode() {
    if std::env::var_os("SAFEDPO_EMU_RACECHECK").is_none() {
        set_racecheck(true);
    }
    if std::env::var_os("SAFEDPO_EMU_SCHEDULE").is_none() {
        let seed = std::env::var("SAFEDPO_EMU_SEED").ok().and_then(|s| parse_seed(&s)).unwrap_or(0x05af_ed90);
        set_schedule(Schedule::Random { seed });
    }
}

fn parse_seed(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// Turns the shared-memory race detector (`kernels/emu/racecheck.cpp`) on or off for later launches
/// (process-wide; off unless the environment says `SAFEDPO_EMU_RACECHECK=1`, on in the test mode).
/// While it is on, launches run the kernels' race-checked copies (3-5x slower): an access to a
/// shared-memory word by one thread after another thread of the block wrote it (or read it, for a
/// write) with no `__syncthreads` between (nor, inside one warp, a `__syncwarp` or warp collective
/// taking both lanes) fails the launch with an error naming the kernel, the word and both threads.
pub fn set_racecheck(on: bool) {
    // SAFETY: a plain value; the runtime takes its launch lock.
    unsafe { ffi::emu_set_racecheck(on as std::ffi::c_int) };
}

/// Whether the race detector checks the next launch.
pub fn racecheck_enabled() -> bool {
    // SAFETY: no arguments.
    unsafe { ffi::emu_racecheck_enabled() != 0 }
}

/// Fresh buffers of later allocations hold NaN bytes (`false`, the default) or zero pages that take
/// memory only where written (`true`): for tests that address more memory than the machine has
/// (offsets past 2^31 elements). Process-wide.
pub fn set_lazy_alloc(on: bool) {
    // SAFETY: a plain value; the runtime takes its launch lock.
    unsafe { ffi::emu_set_lazy_alloc(on as std::ffi::c_int) };
}

/// Blocks of a launch that a [`BlockWindow`] lets run: `[lo, hi)` in each dimension of the grid, a
/// negative bound counting from the grid's end (`-2..i64::MAX` = the last two blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRange {
    pub x: (i64, i64),
    pub y: (i64, i64),
    pub z: (i64, i64),
}

impl BlockRange {
    /// Every block.
    pub const ALL: (i64, i64) = (0, i64::MAX);
    /// The last `n` blocks along x, every block along y and z.
    pub fn last_x(n: i64) -> Self {
        Self { x: (-n, i64::MAX), y: Self::ALL, z: Self::ALL }
    }
    /// The last `n` blocks along y, every block along x and z.
    pub fn last_y(n: i64) -> Self {
        Self { x: Self::ALL, y: (-n, i64::MAX), z: Self::ALL }
    }
}

/// What the launches under a [`BlockWindow`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowRecord {
    /// Launches the window applied to, and the blocks they ran.
    pub launches: u64,
    pub blocks: u64,
    /// Grid and block dimensions of the last such launch.
    pub grid: [u32; 3],
    pub block: [u32; 3],
}

/// While it lives, launches of a kernel whose name starts with one of its prefixes run only the
/// blocks of that prefix's range (the first prefix that matches; other kernels run whole).
/// Process-wide, one at a time. The far end of a grid too large to run whole: tests of 64-bit
/// offsets run the blocks that address past 2^31 elements and check them.
pub struct BlockWindow {
    _private: (),
}

impl BlockWindow {
    pub fn new(windows: &[(&str, BlockRange)]) -> Self {
        // SAFETY: no arguments.
        unsafe { ffi::emu_clear_block_windows() };
        for (prefix, range) in windows {
            let c_prefix = CString::new(*prefix).expect("a kernel name prefix without NUL bytes");
            let (lo, hi) = ([range.x.0, range.y.0, range.z.0], [range.x.1, range.y.1, range.z.1]);
            // SAFETY: the runtime copies the prefix and the six bounds under its launch lock.
            unsafe { ffi::emu_add_block_window(c_prefix.as_ptr(), lo.as_ptr(), hi.as_ptr()) };
        }
        Self { _private: () }
    }

    /// The launches so far under this window.
    pub fn record(&self) -> WindowRecord {
        let mut out = [0u64; 8];
        // SAFETY: writes eight u64.
        unsafe { ffi::emu_block_window_record(out.as_mut_ptr()) };
        let dims = |o: &[u64]| [o[0] as u32, o[1] as u32, o[2] as u32];
        WindowRecord { launches: out[0], blocks: out[1], grid: dims(&out[2..5]), block: dims(&out[5..8]) }
    }
}

impl Drop for BlockWindow {
    fn drop(&mut self) {
        // SAFETY: no arguments.
        unsafe { ffi::emu_clear_block_windows() };
    }
}

/// A live buffer: `bytes` used, `capacity` allocated (canary in between).
#[derive(Clone, Copy)]
struct Allocation {
    bytes: usize,
    capacity: usize,
}

/// The emulated device. Operations are serialized (one stream), and run before they return.
pub(crate) struct Emu {
    /// Live buffers by start address.
    live: Mutex<BTreeMap<u64, Allocation>>,
    /// Held by every operation: the device executes one thing at a time, like a stream.
    stream: Mutex<()>,
}

/// A buffer's memory on the emulated device.
pub(crate) struct EmuMemory {
    ptr: u64,
    capacity: usize,
    device: Arc<Emu>,
}

impl EmuMemory {
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for EmuMemory {
    fn drop(&mut self) {
        self.device.live.lock().unwrap().remove(&self.ptr);
        // SAFETY: allocated by emu_mem_alloc(capacity) and no longer referenced by the registry.
        unsafe { ffi::emu_mem_free(self.ptr as *mut c_void, self.capacity) };
    }
}

impl Emu {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self { live: Mutex::new(BTreeMap::new()), stream: Mutex::new(()) })
    }

    pub(crate) fn alloc(device: &Arc<Self>, bytes: usize) -> Result<EmuMemory> {
        let capacity = bytes.div_ceil(ALIGN).max(1) * ALIGN;
        // SAFETY: returns null or `capacity` writable bytes.
        let ptr = unsafe { ffi::emu_mem_alloc(capacity) } as *mut u8;
        ensure!(!ptr.is_null(), "emulated device: out of memory allocating {bytes} bytes");
        // SAFETY: [bytes, capacity) lies inside the allocation.
        unsafe { std::ptr::write_bytes(ptr.add(bytes), CANARY, capacity - bytes) };
        device.live.lock().unwrap().insert(ptr as u64, Allocation { bytes, capacity });
        Ok(EmuMemory { ptr: ptr as u64, capacity, device: device.clone() })
    }

    /// Checks that `[ptr, ptr + bytes)` lies inside one live buffer.
    fn check_range(&self, ptr: u64, bytes: usize, what: &str) -> Result<()> {
        let live = self.live.lock().unwrap();
        match live.range(..=ptr).next_back() {
            Some((&start, a)) if ptr + bytes as u64 <= start + a.bytes as u64 => Ok(()),
            _ => bail!("{what}: device range {ptr:#x}+{bytes} bytes is not inside a live buffer of this device"),
        }
    }

    pub(crate) fn copy_in(&self, dst: u64, src: &[u8]) -> Result<()> {
        let _stream = self.stream.lock().unwrap();
        self.check_range(dst, src.len(), "copy_in")?;
        // SAFETY: the destination range was checked against the live buffers.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    pub(crate) fn copy_out(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        let _stream = self.stream.lock().unwrap();
        self.check_range(src, dst.len(), "copy_out")?;
        // SAFETY: the source range was checked against the live buffers.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    pub(crate) fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        let _stream = self.stream.lock().unwrap();
        self.check_range(dst, bytes, "copy (destination)")?;
        self.check_range(src, bytes, "copy (source)")?;
        // SAFETY: both ranges were checked; `copy` allows overlap.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    /// Writes `count` copies of the pattern starting at `dst`.
    pub(crate) fn fill(&self, dst: u64, pattern: FillPattern, count: usize) -> Result<()> {
        let _stream = self.stream.lock().unwrap();
        let unit = match pattern {
            FillPattern::U8(_) => 1,
            FillPattern::U16(_) => 2,
            FillPattern::U32(_) => 4,
        };
        self.check_range(dst, count * unit, "fill")?;
        if matches!(pattern, FillPattern::U8(0) | FillPattern::U16(0) | FillPattern::U32(0)) {
            // SAFETY: the range was checked; large ranges are zeroed page-wise (see emu_mem_zero).
            unsafe { ffi::emu_mem_zero(dst as *mut c_void, count * unit) };
            return Ok(());
        }
        // SAFETY: the range was checked; device buffers are 256-byte aligned and views are offsets by
        // whole elements, so `dst` is aligned for the pattern's type.
        unsafe {
            match pattern {
                FillPattern::U8(v) => std::ptr::write_bytes(dst as *mut u8, v, count),
                FillPattern::U16(v) => std::slice::from_raw_parts_mut(dst as *mut u16, count).fill(v),
                FillPattern::U32(v) => std::slice::from_raw_parts_mut(dst as *mut u32, count).fill(v),
            }
        }
        Ok(())
    }

    pub(crate) fn launch(&self, name: &str, config: &LaunchConfig, args: &[KernelArg]) -> Result<()> {
        let _stream = self.stream.lock().unwrap();
        let info = kernel_signature(name)?;
        let expected: Vec<char> = info.signature.chars().collect();
        ensure!(
            expected.len() == args.len(),
            "kernel `{name}` (kernels/{}.cu) takes {} arguments, the launch passed {}",
            info.unit,
            expected.len(),
            args.len()
        );
        for (i, (arg, &code)) in args.iter().zip(&expected).enumerate() {
            ensure!(
                arg.code() == code,
                "kernel `{name}` (kernels/{}.cu) argument {i}: expected {}, got {} ({arg:?})",
                info.unit,
                KernelArg::type_name(code),
                KernelArg::type_name(arg.code())
            );
            if let KernelArg::Ptr(ptr) = *arg {
                if ptr != 0 {
                    self.check_range(ptr, 0, &format!("kernel `{name}` argument {i}"))?;
                }
            }
        }
        let mut values: Vec<u64> = args.iter().map(KernelArg::bits).collect();
        let mut pointers: Vec<*mut c_void> = values.iter_mut().map(|v| v as *mut u64 as *mut c_void).collect();
        let c_name = CString::new(name).unwrap();
        let grid = [config.grid.0, config.grid.1, config.grid.2];
        let block = [config.block.0, config.block.1, config.block.2];
        let mut err = vec![0u8; 4096];
        // SAFETY: every pointer argument lies inside a live buffer of this device (checked above) and
        // `pointers` points at `values`, which outlive the synchronous launch.
        let status = unsafe {
            ffi::emu_launch(
                c_name.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                config.shared_bytes as usize,
                pointers.as_mut_ptr(),
                pointers.len(),
                err.as_mut_ptr() as *mut c_char,
                err.len(),
            )
        };
        if status != 0 {
            let message =
                CStr::from_bytes_until_nul(&err).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            bail!("emulated device: {message}");
        }
        self.check_canaries().with_context(|| format!("after kernel `{name}` (kernels/{}.cu)", info.unit))
    }

    /// Fails if a launch wrote into the slack after any live buffer (and restores the canary, so that
    /// the next launch does not report the same overrun again).
    fn check_canaries(&self) -> Result<()> {
        let live = self.live.lock().unwrap();
        for (&start, a) in live.iter() {
            // SAFETY: [bytes, capacity) of a live allocation.
            let slack =
                unsafe { std::slice::from_raw_parts_mut((start + a.bytes as u64) as *mut u8, a.capacity - a.bytes) };
            if let Some(offset) = slack.iter().position(|&b| b != CANARY) {
                slack.fill(CANARY);
                bail!(
                    "a kernel wrote past the end of the buffer at {start:#x} ({} bytes): byte {} beyond its end \
                     changed",
                    a.bytes,
                    offset
                );
            }
        }
        Ok(())
    }

    /// Runs the product (always: the emulated device fuses every epilogue, so the result is `true`).
    pub(crate) fn gemm(&self, spec: &Gemm, ops: &GemmOperands) -> Result<bool> {
        let _stream = self.stream.lock().unwrap();
        let (m, n, k) = (spec.m, spec.n, spec.k);
        let (ab_size, c_size) = (ops.ab.size(), ops.c.size());
        self.check_range(ops.a, m * k * ab_size, "gemm A")?;
        self.check_range(ops.b, k * n * ab_size, "gemm B")?;
        self.check_range(ops.d, m * n * c_size, "gemm D")?;
        if let Some(bias) = ops.bias {
            self.check_range(bias, n * c_size, "gemm bias")?;
        }
        let overlaps = |p: u64, bytes: usize| p < ops.d + (m * n * c_size) as u64 && ops.d < p + bytes as u64;
        ensure!(
            !overlaps(ops.a, m * k * ab_size) && !overlaps(ops.b, k * n * ab_size),
            "gemm {spec:?}: the output D overlaps an input"
        );
        if let Some(aux) = ops.gelu_aux {
            ensure!(ops.bias.is_some() && spec.beta == 0.0, "gemm {spec:?}: the GELU epilogue needs a bias, beta 0");
            self.check_range(aux, m * n * c_size, "gemm GELU pre-activation")?;
            ensure!(!overlaps(aux, m * n * c_size), "gemm {spec:?}: the pre-activation overlaps D");
        }
        // SAFETY (all raw slices below): ranges checked against live buffers of this device above,
        // D disjoint from A and B; buffers are 256-byte aligned and views whole-element offsets.
        let read_f32 = |ptr: u64, len: usize, dtype: Dtype| -> Vec<f32> {
            match dtype {
                Dtype::F32 => unsafe { std::slice::from_raw_parts(ptr as *const f32, len) }.to_vec(),
                _ => {
                    unsafe { std::slice::from_raw_parts(ptr as *const bf16, len) }.iter().map(|x| x.to_f32()).collect()
                }
            }
        };
        let a = read_f32(ops.a, m * k, ops.ab);
        let b = read_f32(ops.b, k * n, ops.ab);
        // op(A)[i, p] and op(B)[p, j] as (row stride, column stride) over the stored matrices
        let (a_rs, a_cs) = if spec.trans_a { (1, m as isize) } else { (k as isize, 1) };
        let (b_rs, b_cs) = if spec.trans_b { (1, k as isize) } else { (n as isize, 1) };
        let mut product = vec![0f32; m * n];
        if k > 0 {
            // SAFETY: the strides describe `a` ([m, k] or [k, m]), `b` and `product` exactly.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    product.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    a_cs,
                    a_rs,
                    b.as_ptr(),
                    b_cs,
                    b_rs,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                )
            };
        }
        let bias = ops.bias.map(|p| read_f32(p, n, ops.c));
        let old = if spec.beta != 0.0 { Some(read_f32(ops.d, m * n, ops.c)) } else { None };
        let value = |idx: usize| -> f32 {
            let mut v = spec.alpha * product[idx];
            if let Some(old) = &old {
                v += spec.beta * old[idx];
            }
            if let Some(bias) = &bias {
                v += bias[idx % n];
            }
            v
        };
        // With the GELU epilogue the pre-activation goes to the aux buffer and D gets its GELU, both
        // taken from the f32 value (one rounding each), as cuBLASLt's GELU_AUX_BIAS does.
        let (d_value, aux): (&dyn Fn(usize) -> f32, _) = match ops.gelu_aux {
            Some(aux) => (&|i| gelu(value(i)), Some(aux)),
            None => (&value, None),
        };
        match ops.c {
            Dtype::F32 => {
                let d = unsafe { std::slice::from_raw_parts_mut(ops.d as *mut f32, m * n) };
                d.iter_mut().enumerate().for_each(|(i, out)| *out = d_value(i));
                if let Some(aux) = aux {
                    let pre = unsafe { std::slice::from_raw_parts_mut(aux as *mut f32, m * n) };
                    pre.iter_mut().enumerate().for_each(|(i, out)| *out = value(i));
                }
            }
            _ => {
                let d = unsafe { std::slice::from_raw_parts_mut(ops.d as *mut bf16, m * n) };
                d.iter_mut().enumerate().for_each(|(i, out)| *out = bf16::from_f32(d_value(i)));
                if let Some(aux) = aux {
                    let pre = unsafe { std::slice::from_raw_parts_mut(aux as *mut bf16, m * n) };
                    pre.iter_mut().enumerate().for_each(|(i, out)| *out = bf16::from_f32(value(i)));
                }
            }
        }
        Ok(true)
    }
}

/// GELU, tanh form (HF `gelu_new`), in f32 as kernels/pointwise.cu computes it (with its constants).
fn gelu(x: f32) -> f32 {
    let u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
    0.5 * x * (1.0 + u.tanh())
}
