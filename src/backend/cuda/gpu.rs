//! A real GPU through the CUDA driver API (cudarc, libraries loaded at run time): kernels from the
//! fatbins build.rs embedded ([`super::kernels`]), one stream, stream-ordered allocations (the pool
//! keeps freed memory), GEMM through cuBLASLt with f32 accumulation and its bias and GELU epilogues.
//!
//! Modules are loaded once when the device is created; functions are looked up by name on first use
//! and cached. A launch that asks for more dynamic shared memory than the function allows (by default
//! 48 KiB less its static shared memory) raises the function's limit first (`cuFuncSetAttribute`). Argument counts and sizes are checked against the
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

use super::kernels;
use super::types::{Dtype, FillPattern, Gemm, GemmOperands, KernelArg, LaunchConfig};

/// cuBLASLt workspace (NVIDIA's recommendation for Hopper; more than enough for Ampere).
const GEMM_WORKSPACE_BYTES: usize = 32 << 20;
/// Most cached GEMM plans: packed batches change the token count every step, so shapes keep coming;
/// past this many the cache starts over (a plan costs one heuristic query, some microseconds).
const MAX_GEMM_PLANS: usize = 4096;
/// The leading dimension of the GELU epilogue's aux matrix must be a multiple of this (cublasLt.h,
/// CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD), and its pointer at least this many bytes aligned (16: what
/// the vectorised epilogue stores need; cuBLASLt checks the pointer it is given in the heuristic).
const GELU_AUX_LD_MULTIPLE: usize = 8;
const GELU_AUX_MIN_ALIGN: u32 = 16;

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
    // Load CUDA 13's library by path first: cudarc then finds it by its soname, even where the
    // loader's path holds no libcublasLt or an older one under a name cudarc tries before `.so.13`.
    preload_cublaslt();
    // SAFETY: only tries to dlopen the library.
    if !unsafe { lt::is_culib_present() } {
        return Err("libcublasLt.so.13 could not be loaded (needed for matrix products): put its folder on \
                    LD_LIBRARY_PATH, or set SAFEDPO_CUBLASLT=/path/to/libcublasLt.so.13"
            .into());
    }
    // The bindings are CUDA 13's (cudarc feature cuda-13000): another major version of the library
    // would be called with the wrong enums and struct layouts.
    // SAFETY: a plain query of the library cudarc loads (present, checked above).
    let version = unsafe { lt::cublasLtGetVersion() };
    if version / 10000 != 13 {
        return Err(format!(
            "the libcublasLt found is version {}.{}.{}, but this build needs CUDA 13's libcublasLt.so.13: put \
             its folder first on LD_LIBRARY_PATH, or set SAFEDPO_CUBLASLT=/path/to/libcublasLt.so.13",
            version / 10000,
            version / 100 % 100,
            version % 100
        ));
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

/// What a product does after the multiply-add (cuBLASLt's epilogue).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Epilogue {
    None,
    /// `D += bias`, broadcast over our rows.
    Bias,
    /// Bias, then GELU into D, the pre-GELU value into the aux matrix.
    GeluAuxBias,
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
    epilogue: Epilogue,
    /// Byte alignment (at most 256) of our A, B, D, bias and aux pointers (256 when absent): cuBLASLt
    /// picks algorithms that need no more than the alignment it is shown — the preferences' minimum
    /// alignments for A/B/C/D, the pointers themselves for bias and aux — so views at any element
    /// offset work, and a plan is only reused for pointers aligned as well as those it was made for.
    align: [u32; 5],
}

/// The largest power of two (at most 256) that divides a device address.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        1u32 << ptr.trailing_zeros().min(8)
    }
}

/// cuBLASLt descriptors and the chosen algorithm for one GEMM shape (the bias and aux pointers are
/// set again on every call).
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
    /// Plans by shape, types and alignment; `None` where cuBLASLt has no algorithm for a fusable
    /// epilogue (the caller falls back to unfused ops).
    plans: Mutex<HashMap<GemmKey, Option<GemmPlan>>>,
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
        if async_alloc {
            // The default pool gives its memory back to the driver at every synchronisation (release
            // threshold 0), so each step would re-map its activations; keep what it has instead, as
            // PyTorch's caching allocator does.
            let mut keep_all = u64::MAX;
            // SAFETY: the device of our context; the attribute is a u64.
            unsafe {
                let pool = result::device::get_default_mem_pool(ctx.cu_device()).map_err(driver_err)?;
                result::mem_pool::set_attribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut keep_all as *mut u64 as *mut c_void,
                )
                .map_err(driver_err)
                .context("keeping freed memory in the CUDA memory pool")?;
            }
        }

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

    /// Makes this GPU's context current on the calling thread (also what NCCL calls need).
    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(driver_err)
    }

    pub(crate) fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The one stream every operation runs on (NCCL's collectives are queued on it too).
    pub(crate) fn cu_stream(&self) -> sys::CUstream {
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
            // What the function allows before any attribute is set: 48 KiB less its static shared
            // memory (not 48 KiB: a kernel with static shared memory needs its limit raised sooner).
            let mut allowed: c_int = 0;
            // SAFETY: a valid function handle; writes one int.
            let max_dynamic_smem = unsafe {
                sys::cuFuncGetAttribute(
                    &mut allowed,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    handle,
                )
                .result()
            }
            .map_or(0, |()| allowed.max(0) as u32);
            let function = Function { handle, max_dynamic_smem, param_sizes: param_sizes(handle) };
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

    /// Runs the product; `Ok(false)` (nothing queued) when it asks for the GELU epilogue and cuBLASLt
    /// cannot fuse it here (see `Device::gemm_bias_gelu`).
    pub(crate) fn gemm(&self, spec: &Gemm, ops: &GemmOperands) -> Result<bool> {
        ensure!(
            spec.k > 0,
            "gemm {spec:?}: an inner dimension of 0 is not supported on a GPU (cuBLASLt rejects empty operands)"
        );
        let epilogue = match (ops.bias, ops.gelu_aux) {
            (None, None) => Epilogue::None,
            (Some(_), None) => Epilogue::Bias,
            (Some(_), Some(aux)) => {
                // cuBLASLt's aux matrix is column-major [n, m] with leading dimension n (our row length).
                if !spec.n.is_multiple_of(GELU_AUX_LD_MULTIPLE)
                    || alignment(aux) < GELU_AUX_MIN_ALIGN
                    || spec.beta != 0.0
                {
                    return Ok(false);
                }
                Epilogue::GeluAuxBias
            }
            (None, Some(_)) => bail!("gemm {spec:?}: the GELU epilogue needs a bias"),
        };
        let pointer_align = |p: Option<u64>| p.map_or(256, alignment);
        let key = GemmKey {
            m: spec.m,
            n: spec.n,
            k: spec.k,
            trans_a: spec.trans_a,
            trans_b: spec.trans_b,
            ab: ops.ab,
            c: ops.c,
            epilogue,
            align: [
                alignment(ops.a),
                alignment(ops.b),
                alignment(ops.d),
                pointer_align(ops.bias),
                pointer_align(ops.gelu_aux),
            ],
        };
        self.bind()?;
        let mut plans = self.plans.lock().unwrap();
        if plans.len() >= MAX_GEMM_PLANS && !plans.contains_key(&key) {
            plans.clear();
        }
        let plan = match plans.entry(key) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(
                self.plan_gemm(&key, ops)
                    .with_context(|| format!("planning gemm {spec:?} ({:?} → {:?}, {epilogue:?})", ops.ab, ops.c))?,
            ),
        };
        let Some(plan) = plan else {
            return Ok(false); // no algorithm fuses this epilogue here
        };
        // SAFETY (all calls): descriptors owned by the plan; device pointers checked by Device.
        unsafe {
            set_desc_pointers(plan.desc.0, ops)?;
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
            .with_context(|| format!("gemm {spec:?} ({:?} → {:?}, {epilogue:?})", ops.ab, ops.c))?;
        }
        Ok(true)
    }

    /// Row-major `D[m, n] = op(A)·op(B)` is column-major `Dᵀ[n, m] = op(B)ᵀ·op(A)ᵀ`: cuBLASLt's first
    /// operand is our B, its second our A, and its bias (one value per row of the column-major D) runs
    /// along our n; the GELU aux matrix is laid out as D (column-major `[n, m]`, leading dimension n).
    ///
    /// `None` when cuBLASLt has no algorithm for the GELU epilogue (the caller falls back); an error
    /// for a plain product or a bias epilogue, which every supported type combination has.
    fn plan_gemm(&self, key: &GemmKey, ops: &GemmOperands) -> Result<Option<GemmPlan>> {
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
        let set = |attr: lt::cublasLtMatmulDescAttributes_t, value: &[u8]| {
            // SAFETY: an attribute of its documented size (4-byte enums, 8-byte lds) on a live descriptor.
            unsafe {
                lt_result::set_matmul_desc_attribute(desc.0, attr, value.as_ptr() as *const c_void, value.len())
                    .map_err(lt_err)
            }
        };
        use lt::cublasLtMatmulDescAttributes_t as Attr;
        // cublasOperation_t (int32): 0 = N, 1 = T
        set(Attr::CUBLASLT_MATMUL_DESC_TRANSA, &(key.trans_b as i32).to_ne_bytes())?;
        set(Attr::CUBLASLT_MATMUL_DESC_TRANSB, &(key.trans_a as i32).to_ne_bytes())?;
        let epilogue = match key.epilogue {
            Epilogue::None => lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
            Epilogue::Bias => lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            Epilogue::GeluAuxBias => lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
        };
        if key.epilogue != Epilogue::None {
            set(Attr::CUBLASLT_MATMUL_DESC_EPILOGUE, &(epilogue as u32).to_ne_bytes())?;
            // The bias is of D's type (the default, said explicitly); so is the aux matrix (default).
            set(Attr::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &(cuda_type(key.c) as i32).to_ne_bytes())?;
        }
        if key.epilogue == Epilogue::GeluAuxBias {
            set(Attr::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &(n as i64).to_ne_bytes())?;
        }
        // The heuristic reads the bias and aux pointers' alignment from the descriptor: set them now.
        // SAFETY: a live descriptor.
        unsafe { set_desc_pointers(desc.0, ops)? };

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
        let [align_a, align_b, align_d, _, _] = key.align;
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
        };
        match heuristic {
            Ok(heuristic) => Ok(Some(GemmPlan { desc, layouts, algo: heuristic.algo })),
            // No algorithm, or one the library rejects for these operands: fall back to unfused ops.
            Err(e)
                if key.epilogue == Epilogue::GeluAuxBias
                    && matches!(
                        e.0,
                        lt::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED
                            | lt::cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE
                    ) =>
            {
                Ok(None)
            }
            Err(e) => Err(lt_err(e)).context("no cuBLASLt algorithm for this shape and types"),
        }
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

/// Sets the bias and GELU aux pointers of `ops` on a matmul descriptor (those it uses).
///
/// # Safety
/// `desc` must be a live matmul descriptor.
unsafe fn set_desc_pointers(desc: lt::cublasLtMatmulDesc_t, ops: &GemmOperands) -> Result<()> {
    use lt::cublasLtMatmulDescAttributes_t as Attr;
    for (attr, pointer) in [
        (Attr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, ops.bias),
        (Attr::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, ops.gelu_aux),
    ] {
        if let Some(pointer) = pointer {
            // SAFETY: a pointer-sized attribute (a device address) on a live descriptor.
            unsafe {
                lt_result::set_matmul_desc_attribute(
                    desc,
                    attr,
                    &pointer as *const u64 as *const c_void,
                    std::mem::size_of::<u64>(),
                )
            }
            .map_err(lt_err)?;
        }
    }
    Ok(())
}

/// Parameter sizes of a kernel, or None when the driver cannot say (older than CUDA 12.4, or an
/// answer of no parameters at all, which none of our kernels has: then nothing is checked rather
/// than every launch refused).
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
            sys::CUresult::CUDA_ERROR_INVALID_VALUE if !sizes.is_empty() => return Some(sizes),
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
