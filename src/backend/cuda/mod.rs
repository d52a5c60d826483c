//! The CUDA backend: bf16 activations and parameters with fp32 master weights, hand-written kernels
//! from `kernels/`, cuBLASLt for matrix products. Runs on a GPU (cudarc) or on the emulated device.
//!
//! - [`backend`]: [`CudaBackend`], its buffers, the storage conversions and the `Buffers` impl;
//! - `ops/<op>.rs`: each op family's launch plan and `impl <Op>Ops for CudaBackend`, named as its
//!   kernel file `kernels/<op>.cu`; `launch.rs`: the launch helpers several families share;
//! - [`device`]: [`Device`] allocates, copies, launches kernels by name, runs GEMMs and keeps time, on
//!   either implementation —
//!   - `gpu`: a real GPU through the CUDA driver API (cudarc), kernels from the embedded fatbins
//!     ([`kernels`]), GEMM through cuBLASLt;
//!   - `emu`: the emulated device, which runs the same kernel sources compiled for the CPU
//!     (`kernels/emu`), with a CPU reference GEMM of the same semantics;
//! - [`types`]: the plain types the device interface passes around (element types, kernel arguments,
//!   launch shapes, GEMMs), shared by the dispatcher and both implementations;
//! - [`kernels`]: the embedded fatbins and the constants the kernel files share with the host.
//!
//! The GPU is behind the Cargo feature `cuda` and the emulated device behind `emu` (both default);
//! a build without one has a stand-in (`absent.rs`) whose opening fails, naming the feature.
//!
//! Which device a run uses, and in which precision, is decided in `backend::device`, above this module.

#[cfg(not(all(feature = "cuda", feature = "emu")))]
mod absent;
pub mod backend;
// What NCCL (`dist::nccl`) reads of the backend's buffers and device.
#[cfg(feature = "cuda")]
pub(crate) mod collective;
pub mod device;
// The emulator's own controls (schedules, race checks, counters) are for the tests.
#[cfg(feature = "emu")]
#[doc(hidden)]
pub mod emu;
#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(not(feature = "emu"))]
pub use absent::emu;
#[cfg(not(feature = "cuda"))]
pub use absent::gpu;
pub mod kernels;
mod launch;
mod ops;
mod tensor_table;
// What the device implementations read of these types goes unread when the build has neither.
#[cfg_attr(not(any(feature = "cuda", feature = "emu")), allow(dead_code))]
pub mod types;

pub use backend::{AttentionKernels, CudaBackend, CudaBuf, CudaIds, Precision};
pub use device::{Device, DeviceBuffer, Event, View, ViewMut};
pub use types::{DeviceScalar, Dtype, Gemm, KernelArg, LaunchConfig};
