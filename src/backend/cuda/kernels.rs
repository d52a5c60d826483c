//! The kernels compiled by build.rs: one fatbin per `kernels/*.cu` (sm_80 and sm_90 cubins plus
//! compute_80 PTX), embedded in the library. Empty when the crate was built without nvcc; the emulated
//! device is built from the same sources in every build.

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
