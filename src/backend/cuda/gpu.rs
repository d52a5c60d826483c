//! A real GPU through the CUDA driver API (cudarc, libraries loaded at run time): kernels from the
//! fatbins build.rs embedded ([`super::kernels`]), one stream, stream-ordered allocations, GEMM
//! through cuBLASLt with f32 accumulation.
//!
//! Modules are loaded once when the device is created; functions are looked up by name on first use
//! and cached. A launch that asks for more than 48 KiB of dynamic shared memory raises the function's
//! limit first (as `cudaFuncSetAttribute` would). Argument counts and sizes are checked against the
//! kernel's parameter list (`cuFuncGetParamInfo`) the first time a kernel is launched.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::env;
use std::ffi::{c_char, c_int, c_void, CString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublaslt::{result as lt_result, sys as lt};
use cudarc::driver::{result, sys, CudaContext, CudaStream};

use super::device::{Dtype, FillPattern, Gemm, GemmOperands, KernelArg, LaunchConfig};
use super::kernels;

/// cuBLASLt workspace (NVIDIA's recommendation for Hopper; more than enough for Ampere).
const GEMM_WORKSPACE_BYTES: usize = 32 << 20;
/// Above this much dynamic shared memory a function needs its limit raised.
const DEFAULT_MAX_DYNAMIC_SMEM: u32 = 48 * 1024;

/// Ok when a GPU is usable: the driver library loads, a device exists, cuBLASLt loads.
pub fn probe() -> Result<(), String> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA driver (libcuda.so could not be loaded)".into());
    }
    match CudaContext::device_count() {
        Ok(0) => return Err("the CUDA driver reports no device".into()),
        Ok(_) => {}
        Err(e) => return Err(format!("the CUDA driver failed to initialise: {e}")),
    }
    // SAFETY: only tries to dlopen the library (again after loading it by path).
    let cublaslt = unsafe { lt::is_culib_present() } || (preload_cublaslt() && unsafe { lt::is_culib_present() });
    if !cublaslt {
        return Err("libcublasLt.so.13 could not be loaded (needed for matrix products): put its folder on \
                    LD_LIBRARY_PATH, or set SAFEDPO_CUBLASLT=/path/to/libcublasLt.so.13"
            .into());
    }
    Ok(())
}

/// Loads libcublasLt.so.13 by full path from where CUDA installs usually keep it ($SAFEDPO_CUBLASLT,
/// $CUDA_HOME, $CUDA_PATH, next to the nvcc on PATH, /usr/local/cuda). Once loaded, cudarc's lookup
/// by name finds it (the dynamic loader matches already-loaded libraries by soname). Returns whether
/// one was loaded.
fn preload_cublaslt() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        extern "C" {
            fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
        }
        const RTLD_NOW: c_int = 2;
        const RTLD_GLOBAL: c_int = 0x100;
        const NAME: &str = "libcublasLt.so.13";
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(path) = env::var_os("SAFEDPO_CUBLASLT") {
            candidates.push(path.into());
        }
        let mut roots: Vec<PathBuf> =
            ["CUDA_HOME", "CUDA_PATH"].iter().filter_map(env::var_os).map(PathBuf::from).collect();
        if let Some(path) = env::var_os("PATH") {
            roots.extend(
                env::split_paths(&path)
                    .filter(|dir| dir.join("nvcc").is_file())
                    .filter_map(|dir| dir.parent().map(PathBuf::from)),
            );
        }
        roots.push(PathBuf::from("/usr/local/cuda"));
        for root in roots {
            for lib in ["lib64", "lib", "targets/x86_64-linux/lib"] {
                candidates.push(root.join(lib).join(NAME));
            }
        }
        candidates.iter().filter(|path| path.is_file()).any(|path| {
            let Ok(c_path) = CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
            // SAFETY: loads a shared library by path; it stays loaded for the life of the process.
            !unsafe { dlopen(c_path.as_ptr(), RTLD_NOW | RTLD_GLOBAL) }.is_null()
        })
    })
}

struct Module {
    stem: &'static str,
    handle: sys::CUmodule,
}

#[derive(Clone)]
struct Function {
    handle: sys::CUfunction,
    /// Dynamic shared memory the function is currently allowed.
    max_dynamic_smem: u32,
    /// Parameter sizes in bytes, when the driver can tell (`cuFuncGetParamInfo`).
    param_sizes: Option<Vec<usize>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct GemmKey {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    ab: Dtype,
    c: Dtype,
    bias: bool,
    /// Byte alignment of our A, B and D pointers (at most 256): cuBLASLt picks algorithms that need no
    /// more than this, so views at any element offset work.
    align: [u32; 3],
}

/// The largest power of two (at most 256) that divides a device address.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        1u32 << ptr.trailing_zeros().min(8)
    }
}

/// cuBLASLt descriptors and the chosen algorithm for one GEMM shape (the bias pointer is set per call).
struct GemmPlan {
    desc: MatmulDesc,
    layouts: [MatrixLayout; 3],
    algo: lt::cublasLtMatmulAlgo_t,
}

/// Owns a cuBLASLt matmul descriptor.
struct MatmulDesc(lt::cublasLtMatmulDesc_t);
impl Drop for MatmulDesc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc, destroyed once.
        let _ = unsafe { lt_result::destroy_matmul_desc(self.0) };
    }
}

/// Owns a cuBLASLt matrix layout.
struct MatrixLayout(lt::cublasLtMatrixLayout_t);
impl Drop for MatrixLayout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout, destroyed once.
        let _ = unsafe { lt_result::destroy_matrix_layout(self.0) };
    }
}

/// Owns a cuBLASLt matmul preference.
struct MatmulPref(lt::cublasLtMatmulPreference_t);
impl Drop for MatmulPref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref, destroyed once.
        let _ = unsafe { lt_result::destroy_matmul_pref(self.0) };
    }
}

/// A GPU with the embedded kernels loaded.
pub(crate) struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    async_alloc: bool,
    modules: Vec<Module>,
    functions: Mutex<HashMap<String, Function>>,
    blas: lt::cublasLtHandle_t,
    workspace: sys::CUdeviceptr,
    plans: Mutex<HashMap<GemmKey, GemmPlan>>,
}

// SAFETY: the raw CUDA handles are used with the context bound to the calling thread, and the maps
// that hand them out are behind mutexes; CUDA handles may be used from any thread.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

fn driver_err(e: result::DriverError) -> anyhow::Error {
    anyhow!("{e}")
}

fn lt_err(e: lt_result::CublasError) -> anyhow::Error {
    anyhow!("cuBLASLt: {e:?}")
}

impl Gpu {
    pub(crate) fn new(ordinal: usize) -> Result<Arc<Self>> {
        ensure!(kernels::BUILT_WITH_NVCC, "this build has no GPU kernels (built without nvcc)");
        probe().map_err(|reason| anyhow!(reason))?;
        let ctx =
            CudaContext::new(ordinal).map_err(driver_err).with_context(|| format!("opening CUDA device {ordinal}"))?;
        let stream = ctx.new_stream().map_err(driver_err)?;
        let (major, minor) = ctx.compute_capability().map_err(driver_err)?;
        let name = format!("cuda:{ordinal} {} (sm_{major}{minor})", ctx.name().unwrap_or_else(|_| "GPU".into()));
        let async_alloc = ctx.has_async_alloc();

        let mut modules = Vec::new();
        for &(stem, fatbin) in kernels::MODULES {
            // The driver reads the fatbin through aligned loads; the embedded bytes have no alignment.
            let mut aligned = vec![0u64; fatbin.len().div_ceil(8)];
            bytemuck::cast_slice_mut::<u64, u8>(&mut aligned)[..fatbin.len()].copy_from_slice(fatbin);
            // SAFETY: a fatbin produced by nvcc; the driver copies what it needs.
            let handle = unsafe { result::module::load_data(aligned.as_ptr() as *const c_void) }
                .map_err(driver_err)
                .with_context(|| {
                    format!(
                        "loading kernels/{stem}.cu on {name}: the fatbin holds {} ({}); a driver older than that \
                         nvcc rejects its PTX",
                        kernels::NVCC_TARGETS,
                        kernels::NVCC_VERSION
                    )
                })?;
            modules.push(Module { stem, handle });
        }

        let blas = lt_result::create_handle().map_err(lt_err)?;
        // SAFETY: a fresh allocation on our stream, freed in Drop.
        let workspace = unsafe { result::malloc_sync(GEMM_WORKSPACE_BYTES) }.map_err(driver_err)?;
        Ok(Arc::new(Self {
            ctx,
            stream,
            name,
            async_alloc,
            modules,
            functions: Mutex::new(HashMap::new()),
            blas,
            workspace,
            plans: Mutex::new(HashMap::new()),
        }))
    }

    pub(crate) fn name(&self) -> String {
        self.name.clone()
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(driver_err)
    }

    fn cu_stream(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }

    pub(crate) fn alloc(gpu: &Arc<Self>, bytes: usize) -> Result<GpuMemory> {
        gpu.bind()?;
        // SAFETY: plain allocations; freed in GpuMemory's Drop on the same stream.
        let ptr = unsafe {
            if gpu.async_alloc {
                result::malloc_async(gpu.cu_stream(), bytes)
            } else {
                result::malloc_sync(bytes)
            }
        }
        .map_err(driver_err)
        .with_context(|| format!("allocating {bytes} bytes on {}", gpu.name))?;
        Ok(GpuMemory { ptr, gpu: gpu.clone() })
    }

    pub(crate) fn copy_in(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: `dst` is a device range of src.len() bytes (checked by Device); pageable host
        // memory is staged before the call returns.
        unsafe { result::memcpy_htod_async(dst, src, self.cu_stream()) }.map_err(driver_err)
    }

    pub(crate) fn copy_out(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: `src` is a device range of dst.len() bytes; we wait for the copy before returning.
        unsafe { result::memcpy_dtoh_async(dst, src, self.cu_stream()) }.map_err(driver_err)?;
        self.synchronize()
    }

    pub(crate) fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: both are device ranges of `bytes` bytes.
        unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, bytes, self.cu_stream()).result() }.map_err(driver_err)
    }

    pub(crate) fn fill(&self, dst: u64, pattern: FillPattern, count: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: `dst` holds `count` elements of the pattern's size.
        unsafe {
            match pattern {
                FillPattern::U8(v) => sys::cuMemsetD8Async(dst, v, count, self.cu_stream()),
                FillPattern::U16(v) => sys::cuMemsetD16Async(dst, v, count, self.cu_stream()),
                FillPattern::U32(v) => sys::cuMemsetD32Async(dst, v, count, self.cu_stream()),
            }
            .result()
        }
        .map_err(driver_err)
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: our own stream.
        unsafe { result::stream::synchronize(self.cu_stream()) }.map_err(driver_err)
    }

    pub(crate) fn has_kernel(&self, name: &str) -> bool {
        self.function(name, 0).is_ok()
    }

    /// The function `name`, allowed at least `dynamic_smem` bytes of dynamic shared memory.
    fn function(&self, name: &str, dynamic_smem: u32) -> Result<Function> {
        let mut functions = self.functions.lock().unwrap();
        if !functions.contains_key(name) {
            self.bind()?;
            let c_name = CString::new(name).map_err(|_| anyhow!("kernel name {name:?} contains a NUL byte"))?;
            let handle = self
                .modules
                .iter()
                // SAFETY: loaded modules, unloaded only in Drop.
                .find_map(|m| unsafe { result::module::get_function(m.handle, c_name.clone()) }.ok())
                .ok_or_else(|| {
                    let stems: Vec<&str> = self.modules.iter().map(|m| m.stem).collect();
                    anyhow!("no kernel named `{name}` in the embedded fatbins (kernels/{{{}}}.cu)", stems.join(","))
                })?;
            let function =
                Function { handle, max_dynamic_smem: DEFAULT_MAX_DYNAMIC_SMEM, param_sizes: param_sizes(handle) };
            functions.insert(name.to_string(), function);
        }
        let function = functions.get_mut(name).unwrap();
        if dynamic_smem > function.max_dynamic_smem {
            self.bind()?;
            // SAFETY: a valid function handle.
            unsafe {
                sys::cuFuncSetAttribute(
                    function.handle,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    dynamic_smem as i32,
                )
                .result()
            }
            .map_err(driver_err)
            .with_context(|| format!("kernel `{name}`: allowing {dynamic_smem} bytes of dynamic shared memory"))?;
            function.max_dynamic_smem = dynamic_smem;
        }
        Ok(function.clone())
    }

    pub(crate) fn launch(&self, name: &str, config: &LaunchConfig, args: &[KernelArg]) -> Result<()> {
        let function = self.function(name, config.shared_bytes)?;
        if let Some(sizes) = &function.param_sizes {
            ensure!(
                sizes.len() == args.len(),
                "kernel `{name}` takes {} arguments, the launch passed {}",
                sizes.len(),
                args.len()
            );
            for (i, (arg, &size)) in args.iter().zip(sizes).enumerate() {
                let passed = match arg.code() {
                    'i' | 'u' | 'f' => 4,
                    _ => 8,
                };
                ensure!(passed == size, "kernel `{name}` argument {i}: the parameter has {size} bytes, passed {arg:?}");
            }
        }
        self.bind()?;
        let mut values: Vec<u64> = args.iter().map(KernelArg::bits).collect();
        let mut params: Vec<*mut c_void> = values.iter_mut().map(|v| v as *mut u64 as *mut c_void).collect();
        // SAFETY: `params` points at one value per kernel parameter (count and sizes checked when the
        // driver reports them); the driver copies them before returning.
        unsafe {
            result::launch_kernel(
                function.handle,
                config.grid,
                config.block,
                config.shared_bytes,
                self.cu_stream(),
                &mut params,
            )
        }
        .map_err(driver_err)
        .with_context(|| format!("launching kernel `{name}` with {config:?}"))
    }

    pub(crate) fn gemm(&self, spec: &Gemm, ops: &GemmOperands) -> Result<()> {
        self.bind()?;
        let key = GemmKey {
            m: spec.m,
            n: spec.n,
            k: spec.k,
            trans_a: spec.trans_a,
            trans_b: spec.trans_b,
            ab: ops.ab,
            c: ops.c,
            bias: ops.bias.is_some(),
            align: [alignment(ops.a), alignment(ops.b), alignment(ops.d)],
        };
        let mut plans = self.plans.lock().unwrap();
        let plan = match plans.entry(key) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(
                self.plan_gemm(&key).with_context(|| format!("planning gemm {spec:?} ({:?} → {:?})", ops.ab, ops.c))?,
            ),
        };
        // SAFETY (all calls): descriptors owned by the plan; device pointers checked by Device::gemm.
        unsafe {
            if let Some(bias) = ops.bias {
                lt_result::set_matmul_desc_attribute(
                    plan.desc.0,
                    lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &bias as *const u64 as *const c_void,
                    std::mem::size_of::<u64>(),
                )
                .map_err(lt_err)?;
            }
            lt_result::matmul(
                self.blas,
                plan.desc.0,
                &spec.alpha as *const f32 as *const c_void,
                &spec.beta as *const f32 as *const c_void,
                ops.b as *const c_void,
                plan.layouts[0].0,
                ops.a as *const c_void,
                plan.layouts[1].0,
                ops.d as *const c_void,
                plan.layouts[2].0,
                ops.d as *mut c_void,
                plan.layouts[2].0,
                &plan.algo,
                self.workspace as *mut c_void,
                GEMM_WORKSPACE_BYTES,
                self.cu_stream() as lt::cudaStream_t,
            )
            .map_err(lt_err)
            .with_context(|| format!("gemm {spec:?}"))
        }
    }

    /// Row-major `D[m, n] = op(A)·op(B)` is column-major `Dᵀ[n, m] = op(B)ᵀ·op(A)ᵀ`: cuBLASLt's first
    /// operand is our B, its second our A, and its bias (one value per row of the column-major D) runs
    /// along our n.
    fn plan_gemm(&self, key: &GemmKey) -> Result<GemmPlan> {
        let cuda_type = |dtype: Dtype| match dtype {
            Dtype::F32 => lt::cudaDataType::CUDA_R_32F,
            _ => lt::cudaDataType::CUDA_R_16BF,
        };
        let (m, n, k) = (key.m as u64, key.n as u64, key.k as u64);
        // (rows, cols, leading dimension) of the column-major matrices as stored
        let first = if key.trans_b { (k, n, k) } else { (n, k, n) };
        let second = if key.trans_a { (m, k, m) } else { (k, m, k) };
        let output = (n, m, n);
        let layout = |dtype: Dtype, (rows, cols, ld): (u64, u64, u64)| {
            lt_result::create_matrix_layout(cuda_type(dtype), rows, cols, ld as i64).map(MatrixLayout).map_err(lt_err)
        };
        let layouts = [layout(key.ab, first)?, layout(key.ab, second)?, layout(key.c, output)?];
        let desc = MatmulDesc(
            lt_result::create_matmul_desc(lt::cublasComputeType_t::CUBLAS_COMPUTE_32F, lt::cudaDataType::CUDA_R_32F)
                .map_err(lt_err)?,
        );
        let set = |attr: lt::cublasLtMatmulDescAttributes_t, value: u32| {
            // SAFETY: a 4-byte attribute on a live descriptor.
            unsafe {
                lt_result::set_matmul_desc_attribute(desc.0, attr, &value as *const u32 as *const c_void, 4)
                    .map_err(lt_err)
            }
        };
        // cublasOperation_t: 0 = N, 1 = T
        set(lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, key.trans_b as u32)?;
        set(lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, key.trans_a as u32)?;
        if key.bias {
            set(
                lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as u32,
            )?;
            set(lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, cuda_type(key.c) as u32)?;
        }
        let pref = MatmulPref(lt_result::create_matmul_pref().map_err(lt_err)?);
        let set_pref = |attr: lt::cublasLtMatmulPreferenceAttributes_t, value: &[u8]| {
            // SAFETY: an attribute of the documented size on a live preference.
            unsafe {
                lt_result::set_matmul_pref_attribute(pref.0, attr, value.as_ptr() as *const c_void, value.len())
                    .map_err(lt_err)
            }
        };
        set_pref(
            lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &(GEMM_WORKSPACE_BYTES as u64).to_ne_bytes(),
        )?;
        // cuBLASLt's A is our B, its B our A, its C and D our D
        let [align_a, align_b, align_d] = key.align;
        for (attr, align) in [
            (lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_b),
            (lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_a),
            (lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_d),
            (lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d),
        ] {
            set_pref(attr, &align.to_ne_bytes())?;
        }
        // SAFETY: live descriptors and preference.
        let heuristic = unsafe {
            lt_result::get_matmul_algo_heuristic(
                self.blas,
                desc.0,
                layouts[0].0,
                layouts[1].0,
                layouts[2].0,
                layouts[2].0,
                pref.0,
            )
        }
        .map_err(lt_err)
        .context("no cuBLASLt algorithm for this shape and types")?;
        Ok(GemmPlan { desc, layouts, algo: heuristic.algo })
    }

    pub(crate) fn record_event(gpu: &Arc<Self>) -> Result<GpuEvent> {
        gpu.bind()?;
        let event = result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(driver_err)?;
        let event = GpuEvent { event, gpu: gpu.clone() };
        // SAFETY: a live event on our stream.
        unsafe { result::event::record(event.event, gpu.cu_stream()) }.map_err(driver_err)?;
        Ok(event)
    }
}

/// Parameter sizes of a kernel, or None when the driver cannot say (older than CUDA 12.4).
fn param_sizes(function: sys::CUfunction) -> Option<Vec<usize>> {
    let mut version = 0;
    // SAFETY: writes one int.
    unsafe { sys::cuDriverGetVersion(&mut version).result() }.ok()?;
    if version < 12040 {
        return None;
    }
    let mut sizes = Vec::new();
    loop {
        let (mut offset, mut size) = (0usize, 0usize);
        // SAFETY: queries parameter `sizes.len()` of a valid function; past the last one the driver
        // answers CUDA_ERROR_INVALID_VALUE.
        match unsafe { sys::cuFuncGetParamInfo(function, sizes.len(), &mut offset, &mut size) } {
            sys::CUresult::CUDA_SUCCESS => sizes.push(size),
            sys::CUresult::CUDA_ERROR_INVALID_VALUE => return Some(sizes),
            _ => return None,
        }
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let _ = self.synchronize();
        self.plans.get_mut().unwrap().clear();
        // SAFETY: nothing uses these handles any more (every buffer and event holds an Arc to us).
        unsafe {
            let _ = lt_result::destroy_handle(self.blas);
            let _ = result::free_sync(self.workspace);
            for module in &self.modules {
                let _ = result::module::unload(module.handle);
            }
        }
    }
}

/// A buffer's memory on a GPU, freed stream-ordered when dropped.
pub(crate) struct GpuMemory {
    ptr: sys::CUdeviceptr,
    gpu: Arc<Gpu>,
}

impl GpuMemory {
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for GpuMemory {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: allocated by Gpu::alloc; later work on the stream cannot use it (the buffer is gone).
            let _ = unsafe {
                if self.gpu.async_alloc {
                    result::free_async(self.ptr, self.gpu.cu_stream())
                } else {
                    result::free_sync(self.ptr)
                }
            };
        }
    }
}

/// A recorded point on a GPU's stream.
pub(crate) struct GpuEvent {
    event: sys::CUevent,
    gpu: Arc<Gpu>,
}

impl GpuEvent {
    pub(crate) fn elapsed_ms(start: &GpuEvent, end: &GpuEvent) -> Result<f32> {
        if !Arc::ptr_eq(&start.gpu, &end.gpu) {
            bail!("elapsed_ms: events from different GPUs");
        }
        end.gpu.bind()?;
        // SAFETY: live events recorded on our stream.
        unsafe {
            result::event::synchronize(end.event).map_err(driver_err)?;
            result::event::elapsed(start.event, end.event).map_err(driver_err)
        }
    }
}

impl Drop for GpuEvent {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: created by record_event, used by nothing else.
            let _ = unsafe { result::event::destroy(self.event) };
        }
    }
}
