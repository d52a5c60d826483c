//! Compiles `kernels/*.cu` twice, each behind its Cargo feature (off: that compilation is skipped):
//!
//! 1. with nvcc into one fatbin per file (sm_80 and sm_90 cubins plus compute_80 PTX), embedded in the
//!    library as one constant per file (`src/backend/cuda/kernels.rs` includes the generated list;
//!    feature `cuda`);
//! 2. with the C++ compiler (cc crate, C++17) through `kernels/emu/emu.h` into the emulated device, a
//!    static library with the runtime in `kernels/emu/runtime.cpp` (feature `emu`).
//!
//! nvcc is looked up in `$NVCC`, `PATH`, `$CUDA_HOME`/`$CUDA_PATH`, the project's `.toolchain/cuda`
//! (`scripts/install-cuda-toolchain.sh`) and `/usr/local/cuda`; the first of release 13.0 wins (the GPU
//! machines' driver is 13.0 and rejects newer PTX), else the first found, with a warning. Without nvcc
//! the build still succeeds with a warning: the CUDA backend then reports at run time that it was
//! built without kernels, and the CPU backend and the emulated device work as usual.
//!
//! It also writes `$OUT_DIR/kernel_constants.rs` (included by `src/backend/cuda/kernels.rs`): every
//! constant of `kernels/*.cu` and `kernels/*.cuh` whose line ends in `// @rust` (launch shapes,
//! objective codes, ...), so that the kernel file is their only definition. A marked line must read
//! `constexpr int NAME = <integer>;` (or `float`, `long long`, `unsigned`) or `#define NAME <number>`,
//! else the build fails naming the line. This step reads the sources only: it runs without nvcc.
//!
//! Every compilation is cached in OUT_DIR under a hash of its inputs (sources, headers, flags and
//! compiler), and the compilations run in parallel (NUM_JOBS). Environment:
//! - `SAFEDPO_PTXAS_VERBOSE=1`: ptxas register and spill report for every kernel, as cargo warnings;
//! - `SAFEDPO_NO_NVCC=1`: skip nvcc even when it is installed;
//! - `SAFEDPO_EMU_UCONTEXT=1`: the emulator switches fibers with swapcontext instead of its x86-64
//!   assembly (the portable path other architectures take).

use std::collections::hash_map::DefaultHasher;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// The CUDA release whose PTX the GPU machines' driver accepts.
const WANT_NVCC_RELEASE: &str = "13.0";
/// Targets of every fatbin: native code for A100 (sm_80) and H100 (sm_90), and PTX that newer GPUs JIT.
const NVCC_GENCODE: &[&str] = &[
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_80,code=compute_80",
];
const NVCC_FLAGS: &[&str] =
    &["--fatbin", "-std=c++17", "-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xcudafe", "--display_error_number"];
/// The emulated device runs kernels at this optimisation level whatever the cargo profile: the
/// emulator is what CI runs, and -O2 is several times faster than -O0 on fiber-heavy code.
/// `-fwrapv`: a signed `int` that overflows wraps, as a GPU's 32-bit integer arithmetic does, rather
/// than being undefined behaviour that GCC may quietly evaluate in 64 bits (a loop's `row * c` turned
/// into a 64-bit induction variable), which would hide a 32-bit index product past 2^31 here.
const EMU_FLAGS: &[&str] = &["-fno-strict-aliasing", "-fno-math-errno", "-fwrapv", "-Wno-unknown-pragmas"];
/// Both copies of each kernel file: each static in a section of its own (see `fix_emu_object`).
const EMU_UNIT_FLAGS: &[&str] = &["-fdata-sections"];
/// The race-checked copy of each kernel file: ThreadSanitizer's compile-time instrumentation, a call
/// before every load and store, which kernels/emu/racecheck.cpp answers (no sanitizer runtime is
/// linked; nvcc never sees it). A copy of its own: the calls make kernels 3-5x slower.
const EMU_RACECHECK_FLAGS: &[&str] = &["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"];

struct Nvcc {
    path: PathBuf,
    /// The `release X.Y` number, e.g. "13.0".
    release: String,
    /// The full version line, e.g. "Cuda compilation tools, release 13.0, V13.0.88".
    version_line: String,
}

/// One compilation: a command that writes `output`, skipped when `key_file` holds `key`.
struct Job {
    what: String,
    command: Command,
    output: PathBuf,
    key: u64,
    key_file: PathBuf,
    /// Print the compiler's stderr as warnings even when it succeeds (ptxas -v).
    verbose: bool,
    /// An emulator kernel object to fix up after compiling (see `fix_emu_object`): its unit identifier.
    emu_unit: Option<String>,
}

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernels_dir = manifest_dir.join("kernels");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "SAFEDPO_PTXAS_VERBOSE", "SAFEDPO_NO_NVCC", "SAFEDPO_EMU_UCONTEXT"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let sources = kernel_sources(&kernels_dir);
    write_kernel_constants(&kernels_dir, &out_dir);
    // Every header a kernel may include: their contents are part of each compilation's cache key.
    let mut device_headers = Vec::new();
    let mut emu_headers = Vec::new();
    collect_headers(&kernels_dir, &kernels_dir.join("emu"), &mut device_headers, &mut emu_headers);
    let device_headers_hash = hash_files(&device_headers);
    let emu_headers_hash = hash_files(&emu_headers);

    // The Cargo features: `cuda` (the GPU: nvcc's fatbins) and `emu` (the emulated device).
    let want_gpu = env::var_os("CARGO_FEATURE_CUDA").is_some();
    let want_emu = env::var_os("CARGO_FEATURE_EMU").is_some();
    let skip_nvcc = env_flag("SAFEDPO_NO_NVCC");
    let nvcc = if skip_nvcc || !want_gpu { None } else { find_nvcc(&manifest_dir) };
    let ptxas_verbose = env_flag("SAFEDPO_PTXAS_VERBOSE");
    let mut jobs = Vec::new();
    match &nvcc {
        Some(nvcc) => {
            println!("cargo:rerun-if-changed={}", nvcc.path.display());
            if nvcc.release != WANT_NVCC_RELEASE {
                println!(
                    "cargo:warning=using nvcc {} at {}: the GPU machines' CUDA {WANT_NVCC_RELEASE} driver cannot \
                     load its PTX (cubins for sm_80/sm_90 still work); `bash scripts/install-cuda-toolchain.sh` \
                     installs nvcc {WANT_NVCC_RELEASE}",
                    nvcc.release,
                    nvcc.path.display()
                );
            }
            for (stem, source) in &sources {
                jobs.push(nvcc_job(nvcc, &kernels_dir, &out_dir, stem, source, device_headers_hash, ptxas_verbose));
            }
        }
        None if !want_gpu => {}
        None if skip_nvcc => {
            println!("cargo:warning=SAFEDPO_NO_NVCC is set: building without GPU kernels (emulated device only)")
        }
        None => println!(
            "cargo:warning=nvcc not found ($NVCC, PATH, $CUDA_HOME, .toolchain/cuda, /usr/local/cuda): building \
             without GPU kernels (the CPU backend and the emulated device work). Install it with `bash \
             scripts/install-cuda-toolchain.sh`."
        ),
    }

    let mut emu_objects = Vec::new();
    if want_emu {
        let emu_dir = out_dir.join("emu");
        fs::create_dir_all(&emu_dir).unwrap();
        let compiler = emu_compiler(&kernels_dir, &[]);
        let compiler_hash = hash_of(&format!("{:?}", compiler.to_command()));
        // Each kernel file twice: plain, and calling the race detector's hooks before every load and store
        // (kernels/emu/racecheck.h), which the runtime launches while the detector is on.
        let plain_compiler = emu_compiler(&kernels_dir, EMU_UNIT_FLAGS);
        let plain_compiler_hash = hash_of(&format!("{:?}", plain_compiler.to_command()));
        let checked_flags: Vec<&str> = EMU_UNIT_FLAGS.iter().chain(EMU_RACECHECK_FLAGS).copied().collect();
        let checked_compiler = emu_compiler(&kernels_dir, &checked_flags);
        let checked_compiler_hash = hash_of(&format!("{:?}", checked_compiler.to_command()));
        let mut units =
            String::from("// Generated by build.rs: references every kernel unit of the emulated device.\n");
        let mut unit_calls = String::new();
        for (stem, source) in &sources {
            for checked in [false, true] {
                let ident = if checked { format!("{}_racecheck", c_identifier(stem)) } else { c_identifier(stem) };
                let wrapper = emu_dir.join(format!("{ident}.cpp"));
                write_if_changed(
                    &wrapper,
                    &format!(
                        "// Generated by build.rs: kernels/{stem}.cu for the emulated device (see kernels/emu/emu.h).\n\
                         #define EMU_UNIT_NAME \"{stem}\"\n\
                         #define EMU_SHARED_SECTION \"emu_shared_{ident}\"\n\
                         #include \"emu/emu.h\"\n\
                         // the linker defines these for the section that holds this file's __shared__ variables\n\
                         extern \"C\" char __start_emu_shared_{ident}[] __attribute__((weak, visibility(\"hidden\")));\n\
                         extern \"C\" char __stop_emu_shared_{ident}[] __attribute__((weak, visibility(\"hidden\")));\n\
                         namespace {{\n\
                         void emu_unit_shared_bounds(char** begin, char** end) {{\n\
                         \x20   *begin = __start_emu_shared_{ident};\n\
                         \x20   *end = __stop_emu_shared_{ident};\n\
                         }}\n\
                         #include \"{source}\"\n\
                         }}\n\
                         extern \"C\" void emu_unit_{ident}(void) {{}}\n",
                        source = source.display()
                    ),
                );
                let (tool, tool_hash) = if checked {
                    (&checked_compiler, checked_compiler_hash)
                } else {
                    (&plain_compiler, plain_compiler_hash)
                };
                let key = hash_of(&(
                    tool_hash,
                    emu_headers_hash,
                    fs::read(source).unwrap(),
                    fs::read(&wrapper).unwrap(),
                    checked,
                ));
                let what = format!("{stem}.cu (emu{})", if checked { ", racecheck" } else { "" });
                let mut job = cxx_job(tool, &wrapper, &emu_dir.join(format!("{ident}.o")), key, &what);
                job.emu_unit = Some(ident.clone());
                jobs.push(job);
                emu_objects.push(emu_dir.join(format!("{ident}.o")));
                writeln!(units, "extern \"C\" void emu_unit_{ident}(void);").unwrap();
                writeln!(unit_calls, "    emu_unit_{ident}();").unwrap();
            }
        }
        let units_file = emu_dir.join("emu_units.cpp");
        write_if_changed(&units_file, &format!("{units}extern \"C\" void emu_link_units(void) {{\n{unit_calls}}}\n"));
        let runtime = kernels_dir.join("emu").join("runtime.cpp");
        let key = hash_of(&(compiler_hash, emu_headers_hash, fs::read(&runtime).unwrap()));
        jobs.push(cxx_job(&compiler, &runtime, &emu_dir.join("runtime.o"), key, "emu/runtime.cpp"));
        emu_objects.push(emu_dir.join("runtime.o"));
        for part in ["racecheck", "memory", "block_window"] {
            let source = kernels_dir.join("emu").join(format!("{part}.cpp"));
            let key = hash_of(&(compiler_hash, emu_headers_hash, fs::read(&source).unwrap()));
            let object = emu_dir.join(format!("{part}.o"));
            jobs.push(cxx_job(&compiler, &source, &object, key, &format!("emu/{part}.cpp")));
            emu_objects.push(object);
        }
        let key = hash_of(&(compiler_hash, fs::read(&units_file).unwrap()));
        jobs.push(cxx_job(&compiler, &units_file, &emu_dir.join("emu_units.o"), key, "emu_units.cpp"));
        emu_objects.push(emu_dir.join("emu_units.o"));
    }

    run_jobs(jobs);

    // The emulated device: archive the objects (cc links the C++ standard library too).
    if want_emu {
        let mut archive = cc::Build::new();
        archive.cpp(true).cargo_warnings(false);
        for object in &emu_objects {
            archive.object(object);
        }
        archive.compile("safedpo_emu");
    }

    write_kernel_list(&out_dir, &sources, nvcc.as_ref());
}

/// `kernels/*.cu`, sorted, as (file stem, path).
fn kernel_sources(kernels_dir: &Path) -> Vec<(String, PathBuf)> {
    files_with_extensions(kernels_dir, &["cu"])
}

/// The files of `dir` (not its subfolders) with one of `extensions`, sorted, as (file stem, path).
fn files_with_extensions(dir: &Path, extensions: &[&str]) -> Vec<(String, PathBuf)> {
    let mut files: Vec<(String, PathBuf)> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file() && path.extension().is_some_and(|ext| extensions.iter().any(|e| ext == *e)))
        .map(|path| (path.file_stem().unwrap().to_string_lossy().into_owned(), path))
        .collect();
    files.sort();
    files
}

/// Headers under `dir`: those under `emu_dir` matter to the emulator only, the others to both builds.
fn collect_headers(dir: &Path, emu_dir: &Path, device: &mut Vec<PathBuf>, emu: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir).unwrap().map(|entry| entry.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_headers(&path, emu_dir, device, emu);
        } else if path.extension().is_some_and(|ext| ext == "cuh" || ext == "h" || ext == "hpp") {
            if !path.starts_with(emu_dir) {
                device.push(path.clone());
            }
            emu.push(path);
        }
    }
}

fn env_flag(name: &str) -> bool {
    env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn hash_of<T: Hash>(value: &T) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

fn hash_files(paths: &[PathBuf]) -> u64 {
    let mut hasher = DefaultHasher::new();
    for path in paths {
        path.hash(&mut hasher);
        fs::read(path).unwrap().hash(&mut hasher);
    }
    hasher.finish()
}

fn c_identifier(stem: &str) -> String {
    stem.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

/// Writes `contents` unless the file already holds exactly that (keeps mtimes stable).
fn write_if_changed(path: &Path, contents: &str) {
    if fs::read_to_string(path).ok().as_deref() != Some(contents) {
        fs::write(path, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}

// ---- nvcc ------------------------------------------------------------------------------------------

fn find_nvcc(manifest_dir: &Path) -> Option<Nvcc> {
    if let Some(explicit) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(explicit);
        return match probe_nvcc(&path) {
            Some(nvcc) => Some(nvcc),
            None => panic!("$NVCC={} does not run (`{} --version` failed)", path.display(), path.display()),
        };
    }
    let mut candidates = Vec::new();
    if let Some(path_var) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path_var).map(|dir| dir.join("nvcc")));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var).filter(|v| !v.is_empty()) {
            candidates.push(PathBuf::from(home).join("bin").join("nvcc"));
        }
    }
    candidates.push(manifest_dir.join(".toolchain").join("cuda").join("bin").join("nvcc"));
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    let found: Vec<Nvcc> =
        candidates.iter().filter(|path| path.is_file()).filter_map(|path| probe_nvcc(path)).collect();
    let preferred = found.iter().position(|nvcc| nvcc.release == WANT_NVCC_RELEASE).unwrap_or(0);
    found.into_iter().nth(preferred)
}

fn probe_nvcc(path: &Path) -> Option<Nvcc> {
    let output = Command::new(path).arg("--version").output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let version_line = text.lines().find(|line| line.contains("release"))?.trim().to_string();
    let release = version_line.split("release ").nth(1)?.split(',').next()?.trim().to_string();
    Some(Nvcc { path: path.to_path_buf(), release, version_line })
}

fn nvcc_job(
    nvcc: &Nvcc,
    kernels_dir: &Path,
    out_dir: &Path,
    stem: &str,
    source: &Path,
    headers_hash: u64,
    ptxas_verbose: bool,
) -> Job {
    let output = out_dir.join(format!("{stem}.fatbin"));
    let mut command = Command::new(&nvcc.path);
    command.args(NVCC_FLAGS).args(NVCC_GENCODE).arg("-I").arg(kernels_dir);
    if ptxas_verbose {
        command.args(["-Xptxas", "-v"]);
    }
    command.arg("-o").arg(&output).arg(source);
    let key = hash_of(&(
        &nvcc.path,
        &nvcc.version_line,
        NVCC_FLAGS,
        NVCC_GENCODE,
        ptxas_verbose,
        headers_hash,
        fs::read(source).unwrap(),
    ));
    Job {
        what: format!("{stem}.cu (nvcc)"),
        command,
        key_file: out_dir.join(format!("{stem}.fatbin.key")),
        output,
        key,
        verbose: ptxas_verbose,
        emu_unit: None,
    }
}

// ---- the emulated device -----------------------------------------------------------------------------

/// The C++ compiler as the cc crate configures it (CXX, target flags, -fPIC), plus our flags.
fn emu_compiler(kernels_dir: &Path, extra_flags: &[&str]) -> cc::Tool {
    let mut build = cc::Build::new();
    build.cpp(true).std("c++17").opt_level(2).warnings(true).include(kernels_dir).cargo_warnings(false);
    for flag in EMU_FLAGS.iter().chain(extra_flags) {
        build.flag(flag);
    }
    if env_flag("SAFEDPO_EMU_UCONTEXT") {
        build.define("EMU_USE_UCONTEXT", None);
    }
    build.get_compiler()
}

fn cxx_job(compiler: &cc::Tool, source: &Path, output: &Path, key: u64, what: &str) -> Job {
    let mut command = compiler.to_command();
    command.arg("-c").arg(source).arg("-o").arg(output);
    let key_file = output.with_extension("o.key");
    Job { what: what.to_string(), command, output: output.to_path_buf(), key, key_file, verbose: false, emu_unit: None }
}

/// Fixes up the object of kernel unit `ident` with binutils' objdump and objcopy:
/// - GCC ignores the section attribute on static locals of function templates (the `__shared__`
///   tiles of a templated kernel), so the units are compiled with -fdata-sections and every
///   function-scope static of the unit's anonymous namespace (`.bss._ZZN12_GLOBAL__N_1…`: kernels
///   have no other statics) moves into the unit's shared section `emu_shared_<ident>`;
/// - the race-checked copy of a kernel file (`…_racecheck`) defines the same `extern "C"` kernels as
///   the plain one: they become local (the runtime reaches both through their registrars), all but
///   the unit's `emu_unit_<ident>`.
fn fix_emu_object(object: &Path, ident: &str) -> Result<(), String> {
    let run = |command: &mut Command| -> Result<String, String> {
        let output = command.output().map_err(|e| format!("cannot run {command:?}: {e}"))?;
        if !output.status.success() {
            return Err(format!("{command:?} failed: {}", String::from_utf8_lossy(&output.stderr)));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    };
    let mut objcopy = Command::new("objcopy");
    for line in run(Command::new("objdump").arg("-h").arg("-w").arg(object))?.lines() {
        if let Some(section) = line.split_whitespace().nth(1).filter(|s| s.starts_with(".bss._ZZN12_GLOBAL__N_1")) {
            objcopy.arg(format!("--rename-section={section}=emu_shared_{ident}"));
        }
    }
    if ident.ends_with("_racecheck") {
        let symbols = run(Command::new("nm").args(["--defined-only", "--extern-only", "--format=posix"]).arg(object))?;
        for line in symbols.lines() {
            let mut fields = line.split_whitespace();
            if let (Some(name), Some("T")) = (fields.next(), fields.next()) {
                if name != format!("emu_unit_{ident}") {
                    objcopy.arg(format!("--localize-symbol={name}"));
                }
            }
        }
    }
    run(objcopy.arg(object)).map(|_| ())
}

/// Runs the jobs whose outputs are stale, NUM_JOBS at a time; panics with the compiler's output if one
/// fails, and prints warnings (and ptxas reports) as cargo warnings.
fn run_jobs(jobs: Vec<Job>) {
    let stale: Vec<Mutex<Job>> = jobs
        .into_iter()
        .filter(|job| !(job.output.is_file() && fs::read_to_string(&job.key_file).ok() == Some(job.key.to_string())))
        .map(Mutex::new)
        .collect();
    let parallelism = env::var("NUM_JOBS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, stale.len().max(1));
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let messages = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..parallelism {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = stale.get(index) else { break };
                let mut job = job.lock().unwrap();
                let _ = fs::remove_file(&job.key_file);
                let started = std::time::Instant::now();
                let result = job.command.output();
                let seconds = started.elapsed().as_secs_f64();
                match result {
                    Ok(output) if output.status.success() => {
                        if let Some(ident) = &job.emu_unit {
                            if let Err(e) = fix_emu_object(&job.output, ident) {
                                failures.lock().unwrap().push(format!("{}: {e}", job.what));
                                continue;
                            }
                        }
                        fs::write(&job.key_file, job.key.to_string()).unwrap();
                        let stderr = String::from_utf8_lossy(&output.stderr);
                        let mut lines = Vec::new();
                        if job.verbose || stderr.contains("warning") {
                            lines.extend(stderr.lines().map(|line| format!("{}: {line}", job.what)));
                        }
                        lines.push(format!("compiled {} in {seconds:.1} s", job.what));
                        messages.lock().unwrap().push((job.verbose || stderr.contains("warning"), lines));
                    }
                    Ok(output) => failures.lock().unwrap().push(format!(
                        "{} failed ({:?}):\n{}{}",
                        job.what,
                        job.command,
                        String::from_utf8_lossy(&output.stdout),
                        String::from_utf8_lossy(&output.stderr)
                    )),
                    Err(e) => failures.lock().unwrap().push(format!("{}: cannot run {:?}: {e}", job.what, job.command)),
                }
            });
        }
    });
    for (as_warning, lines) in messages.into_inner().unwrap() {
        for line in lines {
            if as_warning {
                println!("cargo:warning={line}");
            } else {
                // visible with `cargo build -vv`: how long each kernel file takes
                eprintln!("{line}");
            }
        }
    }
    let failures = failures.into_inner().unwrap();
    if !failures.is_empty() {
        panic!("kernel compilation failed:\n{}", failures.join("\n\n"));
    }
}

/// OUT_DIR/kernels.rs: one constant per kernel file (its fatbin, or empty without nvcc), the list of
/// modules, and how they were built.
fn write_kernel_list(out_dir: &Path, sources: &[(String, PathBuf)], nvcc: Option<&Nvcc>) {
    let mut code = String::from("// Generated by build.rs.\n\n");
    writeln!(code, "/// Whether the kernels were compiled with nvcc (false: no GPU code is embedded).").unwrap();
    writeln!(code, "pub const BUILT_WITH_NVCC: bool = {};", nvcc.is_some()).unwrap();
    writeln!(code, "/// The nvcc that compiled the kernels (`nvcc --version`), or empty.").unwrap();
    writeln!(code, "pub const NVCC_VERSION: &str = {:?};", nvcc.map_or("", |n| n.version_line.as_str())).unwrap();
    writeln!(code, "/// The targets every fatbin holds.").unwrap();
    writeln!(code, "pub const NVCC_TARGETS: &str = \"sm_80, sm_90 (cubin), compute_80 (PTX)\";\n").unwrap();
    let mut modules = String::new();
    for (stem, _) in sources {
        let constant = c_identifier(stem).to_uppercase();
        writeln!(code, "/// `kernels/{stem}.cu` compiled to a fatbin (empty when built without nvcc).").unwrap();
        if nvcc.is_some() {
            writeln!(
                code,
                "pub const {constant}: &[u8] = include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{stem}.fatbin\"));"
            )
            .unwrap();
        } else {
            writeln!(code, "pub const {constant}: &[u8] = &[];").unwrap();
        }
        writeln!(modules, "    (\"{stem}\", {constant}),").unwrap();
    }
    writeln!(
        code,
        "\n/// Every kernel file as (file stem, fatbin).\npub const MODULES: &[(&str, &[u8])] = &[\n{modules}];"
    )
    .unwrap();
    write_if_changed(&out_dir.join("kernels.rs"), &code);
}

// ---- constants shared with Rust ------------------------------------------------------------------------

/// The end of a kernel-file line that exports its constant to Rust.
const EXPORT_MARKER: &str = "// @rust";

/// One exported constant: its Rust type and value, and the `///` lines above it in the kernel file.
struct ExportedConstant {
    name: String,
    rust_type: &'static str,
    value: String,
    doc: Vec<String>,
}

/// OUT_DIR/kernel_constants.rs: one module per kernel file (`kernels/<stem>.cu` or `.cuh`) that marks
/// constants, holding them with their doc comments. Panics, naming the line, on a marked line it
/// cannot read.
fn write_kernel_constants(kernels_dir: &Path, out_dir: &Path) {
    let mut code = format!(
        "// Generated by build.rs from the lines of kernels/*.cu and kernels/*.cuh that end in `{EXPORT_MARKER}`.\n"
    );
    let mut modules = std::collections::BTreeMap::new();
    for (stem, path) in files_with_extensions(kernels_dir, &["cu", "cuh"]) {
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let constants = exported_constants(&format!("kernels/{}", path.file_name().unwrap().to_string_lossy()), &text);
        if constants.is_empty() {
            continue;
        }
        let module = c_identifier(&stem);
        if let Some(other) = modules.insert(module.clone(), path.clone()) {
            panic!("{} and {} both export constants as module `{module}`", other.display(), path.display());
        }
        writeln!(code, "\n/// The constants of `kernels/{}`.", path.file_name().unwrap().to_string_lossy()).unwrap();
        writeln!(code, "pub mod {module} {{").unwrap();
        for constant in constants {
            for line in &constant.doc {
                writeln!(code, "    ///{line}").unwrap();
            }
            writeln!(code, "    pub const {}: {} = {};", constant.name, constant.rust_type, constant.value).unwrap();
        }
        code.push_str("}\n");
    }
    write_if_changed(&out_dir.join("kernel_constants.rs"), &code);
}

/// The constants of one kernel file's marked lines (`file` names it in errors).
fn exported_constants(file: &str, text: &str) -> Vec<ExportedConstant> {
    let mut constants: Vec<ExportedConstant> = Vec::new();
    let mut doc = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if let Some(code) = trimmed.trim_end().strip_suffix(EXPORT_MARKER) {
            let constant = parse_exported_constant(code.trim(), std::mem::take(&mut doc)).unwrap_or_else(|why| {
                panic!(
                    "{file}:{}: cannot export `{trimmed}` to Rust: {why}. A line ending in `{EXPORT_MARKER}` must \
                     read `constexpr int NAME = <integer>;` (int, unsigned, long long or float) or `#define NAME \
                     <number>`",
                    index + 1
                )
            });
            if constants.iter().any(|c| c.name == constant.name) {
                panic!("{file}:{}: `{}` is exported twice", index + 1, constant.name);
            }
            constants.push(constant);
        } else if let Some(comment) = trimmed.strip_prefix("///") {
            doc.push(comment.to_string());
        } else {
            doc.clear();
        }
    }
    constants
}

/// `#define NAME VALUE` or `constexpr TYPE NAME = VALUE;` (the marker removed) as a Rust constant.
fn parse_exported_constant(code: &str, doc: Vec<String>) -> Result<ExportedConstant, String> {
    let (c_type, name, value) = if let Some(rest) = code.strip_prefix("#define") {
        let words: Vec<&str> = rest.split_whitespace().collect();
        let [name, value] = words[..] else { return Err("expected `#define NAME VALUE`".into()) };
        let c_type = if value.contains(['.', 'e', 'E']) && !value.starts_with("0x") { "float" } else { "int" };
        (c_type.to_string(), name, value)
    } else if let Some(rest) = code.strip_prefix("constexpr ") {
        let rest = rest.strip_suffix(';').ok_or("expected `;` at the end")?;
        let (declaration, value) = rest.split_once('=').ok_or("expected `= VALUE`")?;
        let words: Vec<&str> = declaration.split_whitespace().collect();
        let (name, c_type) = words.split_last().ok_or("expected a type and a name")?;
        (c_type.join(" "), *name, value.trim())
    } else {
        return Err("not a `#define` or a `constexpr` declaration".into());
    };
    if name.is_empty()
        || name.starts_with(|c: char| c.is_ascii_digit())
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(format!("`{name}` is not a C identifier"));
    }
    let (rust_type, value) = match c_type.as_str() {
        "int" => ("i32", parse_integer::<i32>(value)?),
        "unsigned" | "unsigned int" => ("u32", parse_integer::<u32>(value)?),
        "long long" => ("i64", parse_integer::<i64>(value)?),
        "float" => {
            let digits = value.strip_suffix(['f', 'F']).unwrap_or(value);
            let parsed: f32 = digits.parse().map_err(|_| format!("`{value}` is not a float literal"))?;
            if !parsed.is_finite() {
                return Err(format!("`{value}` is not a finite float"));
            }
            // Debug prints the shortest text that reads back as the same f32.
            ("f32", format!("{parsed:?}"))
        }
        other => return Err(format!("type `{other}` is not supported")),
    };
    Ok(ExportedConstant { name: name.to_string(), rust_type, value, doc })
}

/// A decimal or hexadecimal integer literal, optionally negative, without C suffixes.
fn parse_integer<T: TryFrom<i128> + ToString>(literal: &str) -> Result<String, String> {
    let (negative, digits) = match literal.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, literal),
    };
    let magnitude = match digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        Some(hex) => i128::from_str_radix(hex, 16),
        None => digits.parse::<i128>(),
    }
    .map_err(|_| format!("`{literal}` is not an integer literal (no suffixes or expressions)"))?;
    let value = if negative { -magnitude } else { magnitude };
    T::try_from(value).map(|v| v.to_string()).map_err(|_| format!("{literal} does not fit the declared type"))
}
