//! The CUDA backend: bf16 activations and parameters with fp32 master weights, hand-written kernels
//! from `kernels/`, cuBLASLt for matrix products. Runs on a GPU (cudarc) or on the emulated device.
//!
//! - [`backend`]: [`CudaBackend`], its buffers and the storage conversions; [`ops`](self) `ops/<op>.rs`:
//!   each op family's launches, named as its kernel file;
//! - [`device`]: [`Device`] allocates, copies, launches kernels by name, runs GEMMs and keeps time, on
//!   either implementation —
//!   - [`gpu`]: a real GPU through the CUDA driver API (cudarc), kernels from the embedded fatbins
//!     ([`kernels`]), GEMM through cuBLASLt;
//!   - [`emu`]: the emulated device, which runs the same kernel sources compiled for the CPU
//!     (`kernels/emu`), with a CPU reference GEMM of the same semantics;
//! - [`types`]: the plain types the device interface passes around (element types, kernel arguments,
//!   launch shapes, GEMMs), shared by the dispatcher and both implementations.
//!
//! Which device a run uses, and in which precision, is decided in [`crate::backend::device`].

pub mod backend;
pub mod device;
pub mod emu;
pub mod gpu;
pub mod kernels;
mod launch;
mod ops;
pub mod types;

pub use backend::{CudaBackend, CudaBuf, CudaIds, Precision};
pub use device::{Device, DeviceBuffer, Event, View, ViewMut};
pub use types::{DeviceScalar, Dtype, Gemm, KernelArg, LaunchConfig};
