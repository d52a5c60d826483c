//! The device implementations a build leaves out: the GPU without the `cuda` feature (no cudarc, no
//! nvcc), the emulated device without `emu` (no kernels compiled for the CPU). Each stands in for
//! its module with the same names, as types that have no values: opening one is an error that names
//! the feature, and nothing else can be reached, so `device.rs` dispatches as it always does.

/// The GPU's stand-in (feature `cuda` off).
#[cfg(not(feature = "cuda"))]
pub mod gpu {
    use std::sync::Arc;

    use anyhow::{bail, Result};

    use crate::backend::cuda::types::{FillPattern, Gemm, GemmOperands, KernelArg, LaunchConfig};

    /// Why there is no GPU: this build left it out.
    pub const NOT_BUILT: &str = "this build has no GPU support (the `cuda` Cargo feature is off)";

    /// Never Ok: the build has no GPU.
    pub fn probe() -> Result<(), String> {
        Err(NOT_BUILT.into())
    }

    pub(crate) enum Gpu {}
    pub(crate) enum GpuMemory {}
    pub(crate) enum GpuEvent {}

    impl Gpu {
        pub(crate) fn new(ordinal: usize) -> Result<Arc<Self>> {
            bail!("GPU {ordinal}: {NOT_BUILT}")
        }
        pub(crate) fn name(&self) -> String {
            match *self {}
        }
        pub(crate) fn alloc(gpu: &Arc<Self>, _bytes: usize) -> Result<GpuMemory> {
            match **gpu {}
        }
        pub(crate) fn copy_in(&self, _dst: u64, _src: &[u8]) -> Result<()> {
            match *self {}
        }
        pub(crate) fn copy_out(&self, _src: u64, _dst: &mut [u8]) -> Result<()> {
            match *self {}
        }
        pub(crate) fn copy(&self, _dst: u64, _src: u64, _bytes: usize) -> Result<()> {
            match *self {}
        }
        pub(crate) fn fill(&self, _dst: u64, _pattern: FillPattern, _count: usize) -> Result<()> {
            match *self {}
        }
        pub(crate) fn synchronize(&self) -> Result<()> {
            match *self {}
        }
        pub(crate) fn has_kernel(&self, _name: &str) -> bool {
            match *self {}
        }
        pub(crate) fn launch(&self, _name: &str, _config: &LaunchConfig, _args: &[KernelArg]) -> Result<()> {
            match *self {}
        }
        pub(crate) fn gemm(&self, _spec: &Gemm, _ops: &GemmOperands) -> Result<bool> {
            match *self {}
        }
        pub(crate) fn record_event(gpu: &Arc<Self>) -> Result<GpuEvent> {
            match **gpu {}
        }
    }

    impl GpuMemory {
        pub(crate) fn ptr(&self) -> u64 {
            match *self {}
        }
    }

    impl GpuEvent {
        pub(crate) fn elapsed_ms(start: &GpuEvent, _end: &GpuEvent) -> Result<f32> {
            match *start {}
        }
    }
}

/// The emulated device's stand-in (feature `emu` off).
#[cfg(not(feature = "emu"))]
pub mod emu {
    use std::sync::Arc;

    use anyhow::{bail, Result};

    use crate::backend::cuda::types::{FillPattern, Gemm, GemmOperands, KernelArg, LaunchConfig};

    /// Why there is no emulated device: this build left it out.
    pub const NOT_BUILT: &str = "this build has no emulated device (the `emu` Cargo feature is off)";

    pub(crate) enum Emu {}
    pub(crate) enum EmuMemory {}

    /// Never Ok: the build has no emulated kernels.
    pub fn kernel_signature(name: &str) -> Result<()> {
        bail!("kernel {name}: {NOT_BUILT}")
    }

    impl Emu {
        /// Never Ok (the real one cannot fail).
        pub(crate) fn open() -> Result<Arc<Self>> {
            bail!(NOT_BUILT)
        }
        pub(crate) fn alloc(device: &Arc<Self>, _bytes: usize) -> Result<EmuMemory> {
            match **device {}
        }
        pub(crate) fn copy_in(&self, _dst: u64, _src: &[u8]) -> Result<()> {
            match *self {}
        }
        pub(crate) fn copy_out(&self, _src: u64, _dst: &mut [u8]) -> Result<()> {
            match *self {}
        }
        pub(crate) fn copy(&self, _dst: u64, _src: u64, _bytes: usize) -> Result<()> {
            match *self {}
        }
        pub(crate) fn fill(&self, _dst: u64, _pattern: FillPattern, _count: usize) -> Result<()> {
            match *self {}
        }
        pub(crate) fn launch(&self, _name: &str, _config: &LaunchConfig, _args: &[KernelArg]) -> Result<()> {
            match *self {}
        }
        pub(crate) fn gemm(&self, _spec: &Gemm, _ops: &GemmOperands) -> Result<bool> {
            match *self {}
        }
    }

    impl EmuMemory {
        pub(crate) fn ptr(&self) -> u64 {
            match *self {}
        }
    }
}
