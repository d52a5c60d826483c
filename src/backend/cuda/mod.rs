//! The CUDA backend: bf16 activations and parameters with fp32 master weights, hand-written kernels
//! from `kernels/`, cuBLASLt for matrix products. Runs on a GPU (cudarc) or on the emulated device.
