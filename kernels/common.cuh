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

// ---- 128-bit loads and stores --------------------------------------------------------------------
// Memory-bound kernels move their data in 16-byte accesses (LDG.128 / STG.128), as llm.c's Packed128:
// a pack of `vec_width<T>` elements (4 f32, 8 bf16) converted to f32 in registers. The vector path needs
// every pointer it touches 16-byte aligned and the row length (or element count) split into whole
// packs; a kernel tests that (`aligned16`) and takes the same code at width 1 otherwise, one scalar
// access per element, so odd widths and misaligned views stay correct. The body is written once, as a
// template over the width W (`Width<W>` tags let a generic lambda know it).
// Cache hints: `Streaming` (`__ldcs` / `__stcs`, evict-first) for data a kernel reads or writes for the
// last time, so it does not push reused data (weights, the next op's input) out of L2.

/// Elements of T in one 128-bit access.
template <typename T>
constexpr int vec_width = 16 / (int)sizeof(T);

/// A compile-time width, for generic lambdas (`decltype(w)::value`).
template <int N>
struct Width {
    static constexpr int value = N;
};

enum class CacheHint { Default, Streaming };

/// Whether the address is a multiple of 16 bytes (a null pointer is: it is never accessed).
__device__ __forceinline__ bool aligned16(const void* p) { return ((uintptr_t)p & 15) == 0; }
template <typename... P>
__device__ __forceinline__ bool all_aligned16(const P*... p) {
    return (aligned16(p) && ...);
}

/// 16 bytes at p (16-byte aligned). The emulated device checks the alignment, which the CPU would not
/// enforce: a kernel that takes its packed path on a misaligned pointer fails there as on a GPU.
template <CacheHint H>
__device__ __forceinline__ int4 load_int4(const void* p) {
#ifdef EMU_DEVICE
    assert(aligned16(p));
#endif
    const int4* q = reinterpret_cast<const int4*>(p);
    if constexpr (H == CacheHint::Streaming) return __ldcs(q);
    else return *q;
}
template <CacheHint H>
__device__ __forceinline__ void store_int4(void* p, int4 v) {
#ifdef EMU_DEVICE
    assert(aligned16(p));
#endif
    int4* q = reinterpret_cast<int4*>(p);
    if constexpr (H == CacheHint::Streaming) __stcs(q, v);
    else *q = v;
}

/// out[0..W) = p[0..W) as f32. W·sizeof(T) a multiple of 16 (and p aligned): 128-bit loads; W = 1: one
/// scalar load.
template <int W, CacheHint H = CacheHint::Default, typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[W]) {
    if constexpr (W * sizeof(T) % 16 == 0) {
        constexpr int per = vec_width<T>;
#pragma unroll
        for (int q = 0; q < W / per; ++q) {
            struct alignas(16) Raw { T e[per]; } raw;
            const int4 bits = load_int4<H>(p + q * per);
            memcpy(&raw, &bits, 16);
#pragma unroll
            for (int k = 0; k < per; ++k) out[q * per + k] = to_float(raw.e[k]);
        }
    } else {
        static_assert(W == 1, "load_vec: a width that is neither scalar nor whole 128-bit accesses");
        if constexpr (H == CacheHint::Streaming) out[0] = to_float(__ldcs(p));
        else out[0] = to_float(*p);
    }
}

/// p[0..W) = v[0..W) rounded to T, one rounding each; the accesses as `load_vec`'s.
template <int W, CacheHint H = CacheHint::Default, typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[W]) {
    if constexpr (W * sizeof(T) % 16 == 0) {
        constexpr int per = vec_width<T>;
#pragma unroll
        for (int q = 0; q < W / per; ++q) {
            struct alignas(16) Raw { T e[per]; } raw;
#pragma unroll
            for (int k = 0; k < per; ++k) raw.e[k] = from_float<T>(v[q * per + k]);
            int4 bits;
            memcpy(&bits, &raw, 16);
            store_int4<H>(p + q * per, bits);
        }
    } else {
        static_assert(W == 1, "store_vec: a width that is neither scalar nor whole 128-bit accesses");
        if constexpr (H == CacheHint::Streaming) __stcs(p, from_float<T>(v[0]));
        else *p = from_float<T>(v[0]);
    }
}

/// The fused residual norms' first pass over one row: `x = a + b` (rounded to T as stored), this
/// lane's W elements at a time, returning the lane's Σ x, or Σ x² when `Squares` (RMSNorm).
template <int W, bool Squares, typename T>
__device__ __forceinline__ float residual_add_row(T* x, const T* a, const T* b, int c, int lane) {
    float sum = 0.0f;
    for (int j = lane * W; j < c; j += 32 * W) {
        float va[W], vb[W], stored[W];
        load_vec<W, CacheHint::Streaming>(a + j, va);
        load_vec<W, CacheHint::Streaming>(b + j, vb);
#pragma unroll
        for (int k = 0; k < W; ++k) stored[k] = to_float(from_float<T>(va[k] + vb[k]));
        store_vec<W>(x + j, stored);
#pragma unroll
        for (int k = 0; k < W; ++k) sum += Squares ? stored[k] * stored[k] : stored[k];
    }
    return sum;
}

/// dst[0..W) = src[0..W), the bits unchanged (no conversion); the accesses as `load_vec`'s.
template <int W, CacheHint H = CacheHint::Default, typename T>
__device__ __forceinline__ void copy_vec(T* dst, const T* src) {
    if constexpr (W * sizeof(T) % 16 == 0) {
        constexpr int per = vec_width<T>;
#pragma unroll
        for (int q = 0; q < W / per; ++q) store_int4<CacheHint::Default>(dst + q * per, load_int4<H>(src + q * per));
    } else {
        static_assert(W == 1, "copy_vec: a width that is neither scalar nor whole 128-bit accesses");
        *dst = *src;
    }
}

/// `body(Width<vec_width<T>>{})` when `vector`, else `body(Width<1>{})`: one kernel body, instantiated
/// for packs and for single elements.
template <typename T, typename Body>
__device__ __forceinline__ void with_width(bool vector, Body body) {
    if (vector) body(Width<vec_width<T>>{});
    else body(Width<1>{});
}

/// A row of `len` elements of T split for 128-bit access whatever its alignment: `head` elements up to
/// the first 16-byte boundary, `packs` whole packs of vec_width<T>, then `tail` elements. (A pointer not
/// even aligned to its element size, which no tensor is, gets everything in the head.)
struct RowSplit {
    int head, packs, tail;
};
template <typename T>
__device__ __forceinline__ RowSplit split_row(const T* p, int len) {
    const uintptr_t address = (uintptr_t)p;
    int head = address % sizeof(T) != 0 ? len : (int)((16 - address % 16) % 16 / sizeof(T));
    head = min(head, len);
    const int packs = (len - head) / vec_width<T>;
    return {head, packs, len - head - packs * vec_width<T>};
}

/// The elementwise loop of a grid-stride kernel over n elements, packed: `body(Width<W>{}, i)` handles
/// elements i .. i+W. With `vector` (every pointer 16-byte aligned; the caller tests) the first
/// n − n % W elements go in packs of W = vec_width<T> and the rest one by one; without, all one by
/// one. The host launches threads for ceil(n / vec_width<T>) packs (`packed_grid_stride_config`).
template <typename T, typename Body>
__device__ __forceinline__ void grid_stride_packed(long long n, bool vector, Body body) {
    constexpr int W = vec_width<T>;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long packs = vector ? n / W : 0;
    for (long long k = first; k < packs; k += stride) body(Width<W>{}, k * W);
    for (long long i = packs * W + first; i < n; i += stride) body(Width<1>{}, i);
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

// ---- deterministic reduce over the blocks of a grid -----------------------------------------------
// The second level of a two-level sum without float atomics (the norms' parameter gradients): every
// block writes its partial sums to a scratch row of its own, then counts itself done on a global
// counter; the last block to arrive adds the rows up in block order 0, 1, 2, ... The result is the same
// bits whatever order the blocks ran in. The counter starts at zero and the last block puts it back,
// so one counter serves call after call.

/// The fused backward of a norm (kernels/layernorm.cu, rmsnorm.cu): the most blocks; each takes a
/// contiguous range of rows, at least NORM_BWD_MIN_ROWS_PER_BLOCK, more when n needs more blocks than
/// this. The count depends only on n, so the order of the parameter-gradient sum does too.
constexpr int NORM_BWD_MAX_BLOCKS = 256;  // @rust
/// The fewest rows per block of a norm's fused backward.
constexpr int NORM_BWD_MIN_ROWS_PER_BLOCK = 32;  // @rust
/// Most warps (one row at a time each) per block of a norm's fused backward.
constexpr int NORM_BWD_MAX_WARPS = 8;  // @rust
/// Shared memory a norm's fused backward aims for per block (each warp keeps its own f32 partial
/// sums of the parameter gradients, c floats per gradient): warps are halved until they fit.
constexpr int NORM_BWD_SHARED_TARGET = 49152;  // @rust
/// The most shared memory a norm's fused backward may ask for (one warp on very wide rows; under the
/// sm_80 opt-in maximum, which the emulated device shares).
constexpr int NORM_BWD_SHARED_MAX = 163840;  // @rust

/// Publishes this block's `count` partial sums (`partial(i)`, i in 0..count) to
/// `scratch[blockIdx.x·count + i]` and returns whether this block is the grid's last to finish (every
/// other block's row then visible to it). Contains barriers: every thread of the block calls it.
template <typename Partial>
__device__ __forceinline__ bool publish_block_partials(float* scratch, unsigned int* counter, int count,
                                                       Partial partial) {
    __shared__ unsigned int arrived;
    float* row = scratch + (long long)blockIdx.x * count;
    for (int i = threadIdx.x; i < count; i += blockDim.x) row[i] = partial(i);
    __threadfence();  // the row reaches global memory before this block is counted
    __syncthreads();
    if (threadIdx.x == 0) arrived = atomicAdd(counter, 1u);
    __syncthreads();
    const bool last = arrived == gridDim.x - 1;
    if (last && threadIdx.x == 0) *counter = 0;  // ready for the next launch (none reads it in this one)
    return last;
}

/// Σ_b scratch[b·count + i] over the grid's blocks in index order (for the last block, after
/// `publish_block_partials`). `__ldcg`: the rows were written by other SMs, so read them from L2.
__device__ __forceinline__ float sum_block_partials(const float* scratch, int count, int i) {
    float acc = 0.0f;
    for (unsigned int b = 0; b < gridDim.x; ++b) acc += __ldcg(scratch + (long long)b * count + i);
    return acc;
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
