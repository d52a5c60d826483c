// kernels/grad_norm.cu — the squared global gradient norm Σ x² over many tensors, deterministically.
//
// CPU twin: src/backend/cpu/grad_norm.rs (`sum_squares`). Host side: src/backend/cuda/ops/grad_norm.rs.
//
// Two passes, no float atomics (llm.c's global_norm writes per-block partials the same way):
// - sum_squares_partial_<T>: for each tensor, a 1-D grid of SUM_SQUARES_THREADS-thread blocks (the host
//   picks the block count from the tensor's length only: one block per SUM_SQUARES_THREADS ·
//   SUM_SQUARES_ELEMENTS_PER_THREAD elements, at most SUM_SQUARES_MAX_BLOCKS) runs a grid-stride loop of
//   f32 x² sums; each block reduces its threads with a fixed tree and writes one f32 partial into its
//   slot of `partials`;
// - sum_squares_final: one block of SUM_SQUARES_THREADS threads sums all the partials in f64 (strided,
//   then a fixed tree) and writes the f64 total to out[0].
// The partition depends only on the tensors' lengths, so the result is bit-identical across runs.
//
// Loops before a block reduction run the same number of iterations on every thread of a block (the
// element index tested inside): with a thread-dependent trip count the host compiler may duplicate the
// barrier call, and the emulated device tells barriers apart by call site.
#include "common.cuh"

/// Threads per block of both passes (any multiple of 32 works; the partition depends on it).
#define SUM_SQUARES_THREADS 256  // @rust
/// The fewest elements per thread of a partial-sum block: fewer, larger blocks for small tensors.
#define SUM_SQUARES_ELEMENTS_PER_THREAD 16  // @rust
/// Most partial-sum blocks per tensor.
#define SUM_SQUARES_MAX_BLOCKS 1024  // @rust

template <typename T>
__device__ void sum_squares_partial(float* partials, const T* x, long long n) {
    float acc = 0.0f;
    // Every thread of the block runs the same number of iterations (see the note above).
    for (long long base = (long long)blockIdx.x * blockDim.x; base < n; base += (long long)gridDim.x * blockDim.x) {
        const long long i = base + threadIdx.x;
        if (i < n) {
            const float v = to_float(x[i]);
            acc += v * v;
        }
    }
    acc = block_reduce_sum(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

extern "C" __global__ void sum_squares_partial_f32(float* partials, const float* x, long long n) {
    sum_squares_partial<float>(partials, x, n);
}
EMU_REGISTER(sum_squares_partial_f32)

extern "C" __global__ void sum_squares_partial_bf16(float* partials, const bf16* x, long long n) {
    sum_squares_partial<bf16>(partials, x, n);
}
EMU_REGISTER(sum_squares_partial_bf16)

/// out[0] = Σ partials, in f64. One block whose size is a multiple of 32.
extern "C" __global__ void sum_squares_final(double* out, const float* partials, int count) {
    __shared__ double warp_sums[32];
    double acc = 0.0;
    for (int base = 0; base < count; base += blockDim.x) {
        if (base + (int)threadIdx.x < count) acc += (double)partials[base + threadIdx.x];
    }
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, num_warps = blockDim.x / 32;
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(FULL_MASK, acc, offset);
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        acc = lane < num_warps ? warp_sums[lane] : 0.0;
        for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(FULL_MASK, acc, offset);
        if (lane == 0) out[0] = acc;
    }
}
EMU_REGISTER(sum_squares_final)
