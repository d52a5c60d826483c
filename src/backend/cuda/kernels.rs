//! The kernels compiled by build.rs: one fatbin per `kernels/*.cu` (sm_80 and sm_90 cubins plus
//! compute_80 PTX), embedded in the library. Empty when the crate was built without nvcc; the emulated
//! device is built from the same sources in every build.
//!
//! [`constants`] holds the constants the kernel files share with the host (launch shapes, objective
//! codes): build.rs copies every line of `kernels/*.cu` and `kernels/*.cuh` that ends in `// @rust`, so
//! the kernel file is their one definition.

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The constants of the kernel files marked `// @rust`, one module per file (`constants::layernorm`
/// holds those of `kernels/layernorm.cu`, `constants::common` those of `kernels/common.cuh`), with the
/// C types mapped to Rust (`int` → `i32`, `float` → `f32`).
pub mod constants {
    include!(concat!(env!("OUT_DIR"), "/kernel_constants.rs"));
}
