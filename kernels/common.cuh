// kernels/common.cuh — what every kernel file includes: the storage types (f32, bf16), conversions,
// warp and block reductions, dynamic shared memory, the sequence lookup of a packed batch, and the
// registration macro. The only place for helpers shared between kernel files, with mma.cuh (the
// tensor-core operations, for the files that use them).
//
// Conventions (candle's): kernels are `extern "C" __global__` functions named `<op>_<dtype>`
// (`adamw_f32`, `adamw_bf16`), instantiated from one template per op by a macro in the op's file. Each
// instantiation is followed by `EMU_REGISTER(name)`: empty under nvcc; on the emulated device it
// registers a trampoline so that Rust launches the kernel by name with the GPU's argument list.
// Kernel parameters are pointers, float, double, or 32/64-bit integers (checked on the emulator).
//
// The same source is compiled twice: by nvcc into the embedded fatbin, and by g++ through emu/emu.h
// into the emulated device. Rules that keep both working:
// - dynamic shared memory through `dynamic_smem<T>()`, never `extern __shared__`;
// - system headers only through this file (under the emulator the kernel file sits in a namespace);
// - GPU-only code (inline PTX, tensor-core instructions) behind `#ifndef EMU_DEVICE`, with a portable
//   path beside it, noted in the kernel's header comment.
//
// Each kernel file `kernels/<op>.cu` holds one op family: its header names the CPU twin
// (`src/backend/cpu/<op>.rs`) and the host side that plans its launches (`src/backend/cuda/ops/<op>.rs`).
// A constant the host needs too (a launch shape, an objective code) is defined here or in its kernel file
// only, on a line ending in `// @rust` (`constexpr int NAME = <integer>;` or `#define NAME <number>`):
// build.rs copies it, with the `///` lines above it, into `backend::cuda::kernels::constants::<file>`.
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <assert.h>
#include <cuda_fp16.h>
#include <stdint.h>
#define EMU_REGISTER(name)
#else
#include "emu/emu.h"
#endif

typedef __nv_bfloat16 bf16;

/// Full-warp participation mask.
#define FULL_MASK 0xffffffffu

__host__ __device__ __forceinline__ unsigned int ceil_div(unsigned int a, unsigned int b) { return (a + b - 1) / b; }

// ---- launch shapes shared by several kernel files ---------------------------------------------------
/// Threads per block of an elementwise (grid-stride) launch: one thread per element, GRID_STRIDE_LOOP.
constexpr int GRID_STRIDE_THREADS = 256;  // @rust
/// Most blocks of an elementwise launch; larger tensors are covered by the grid-stride loop.
constexpr int GRID_STRIDE_MAX_BLOCKS = 4096;  // @rust
/// Most threads per block of a row kernel (a block whose threads stride over one row's elements): the
/// host launches the row's width rounded up to a multiple of 32, at most this.
constexpr int ROW_MAX_THREADS = 256;  // @rust

/// for i in this thread's elements of 0..n (a 1-D grid of any shape covers all of them).
#define GRID_STRIDE_LOOP(i, n)                                                                \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)gridDim.x * blockDim.x)

// ---- storage types: every kernel computes in f32 and converts at loads and stores ---------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
    return x;
}
/// Round to nearest even, as the GPU's `__float2bfloat16`.
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float x) {
    return __float2bfloat16(x);
}

// ---- reductions -----------------------------------------------------------------------------------
/// Sum over the 32 lanes of a full warp; every lane gets the result (butterfly order, so every lane
/// adds the same values in the same order and the result is bit-identical across lanes).
__device__ __forceinline__ float warp_reduce_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

/// Maximum over the 32 lanes of a full warp; every lane gets the result.
__device__ __forceinline__ float warp_reduce_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    return v;
}

/// Sum over all threads of a block whose size is a multiple of 32 (at most 1024); every thread gets
/// the result. Contains `__syncthreads`, so every thread of the block must call it. Deterministic:
/// a fixed tree over warps.
__device__ __forceinline__ float block_reduce_sum(float v) {
    __shared__ float warp_sums[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, num_warps = blockDim.x / 32;
    v = warp_reduce_sum(v);
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    v = lane < num_warps ? warp_sums[lane] : 0.0f;
    v = warp_reduce_sum(v);
    __syncthreads();  // warp_sums may be reused by the next call
    return v;
}

/// Maximum over all threads of a block whose size is a multiple of 32 (at most 1024); every thread
/// gets the result. Contains `__syncthreads`, so every thread of the block must call it.
__device__ __forceinline__ float block_reduce_max(float v) {
    __shared__ float warp_maxes[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, num_warps = blockDim.x / 32;
    v = warp_reduce_max(v);
    if (lane == 0) warp_maxes[warp] = v;
    __syncthreads();
    v = lane < num_warps ? warp_maxes[lane] : -INFINITY;
    v = warp_reduce_max(v);
    __syncthreads();  // warp_maxes may be reused by the next call
    return v;
}

// ---- dynamic shared memory ------------------------------------------------------------------------
/// The block's dynamic shared memory (the `shared bytes` of the launch) as an array of T. On the
/// emulated device it is filled with NaN bytes at the start of every block.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#ifdef __CUDACC__
    extern __shared__ __align__(16) unsigned char safedpo_dynamic_smem[];
    return reinterpret_cast<T*>(safedpo_dynamic_smem);
#else
    return static_cast<T*>(emu_dynamic_smem());
#endif
}

// ---- packed batches -------------------------------------------------------------------------------
/// The sequence holding token t: the last s with cu_seqlens[s] ≤ t (empty sequences are skipped).
/// Binary search over the `num_seqs + 1` offsets; no barrier, so any thread may call it alone.
__device__ __forceinline__ int sequence_of(const int* cu_seqlens, int num_seqs, int t) {
    int lo = 0, hi = num_seqs;  // invariant: cu_seqlens[lo] ≤ t < cu_seqlens[hi]
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (cu_seqlens[mid] <= t) lo = mid; else hi = mid;
    }
    return lo;
}
