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
// - sum_squares_partial_multi: the same partial sums for every tensor of a table in one launch. The
//   table (`SumSquaresSlot`, built by the host and kept while the tensors stay where they are) lists
//   each tensor with its storage type, its block count (as above) and the number of blocks before it;
//   block b finds its tensor by binary search and runs that tensor's block b − first_block of a grid
//   of `blocks` blocks, so every partial, and its slot, is the one the per-tensor launches write;
// - sum_squares_final: one block of SUM_SQUARES_THREADS threads sums all the partials in f64 (strided,
//   then a fixed tree) and writes the f64 total to out[0].
// The partition depends only on the tensors' lengths, so the result is bit-identical across runs, and
// the one-launch path gives the same bits as a launch per tensor. (The loads stay one element per
// thread, coalesced: four consecutive elements per thread would change each thread's order of
// summation, and with it the bits of the norm that earlier runs and checkpoints were made with.)
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

/// Partial sum of block `block` of a `blocks`-block grid over x[0..n) into `*partial`.
template <typename T>
__device__ void sum_squares_partial(float* partial, const T* x, long long n, long long block, long long blocks) {
    float acc = 0.0f;
    // Every thread of the block runs the same number of iterations (see the note above).
    for (long long base = block * blockDim.x; base < n; base += blocks * blockDim.x) {
        const long long i = base + threadIdx.x;
        if (i < n) {
            const float v = to_float(x[i]);
            acc += v * v;
        }
    }
    acc = block_reduce_sum(acc);
    if (threadIdx.x == 0) *partial = acc;
}

extern "C" __global__ void sum_squares_partial_f32(float* partials, const float* x, long long n) {
    sum_squares_partial<float>(partials + blockIdx.x, x, n, blockIdx.x, gridDim.x);
}
EMU_REGISTER(sum_squares_partial_f32)

extern "C" __global__ void sum_squares_partial_bf16(float* partials, const bf16* x, long long n) {
    sum_squares_partial<bf16>(partials + blockIdx.x, x, n, blockIdx.x, gridDim.x);
}
EMU_REGISTER(sum_squares_partial_bf16)

/// Storage type codes of `SumSquaresSlot::dtype`.
#define SUM_SQUARES_F32 0  // @rust
#define SUM_SQUARES_BF16 1  // @rust
/// 64-bit words of one `SumSquaresSlot` (the host writes the table as words).
#define SUM_SQUARES_SLOT_WORDS 4  // @rust

/// One tensor of a sum-of-squares table, as the host writes it (four 64-bit words, in this order).
/// Tensors with no elements are left out.
struct SumSquaresSlot {
    const void* x;           // const float* or const bf16*, as `dtype` says
    long long n;             // elements (> 0)
    long long first_block;   // partial-sum blocks of the slots before this one (its first partial)
    long long dtype;         // SUM_SQUARES_F32 or SUM_SQUARES_BF16
};

/// The partial sums of every slot's blocks: grid = the blocks of all slots; the blocks of slot s
/// are first_block[s] .. first_block[s + 1] (the last slot's end is the grid's).
extern "C" __global__ void sum_squares_partial_multi(float* partials, const SumSquaresSlot* slots, int count) {
    const long long b = blockIdx.x;
    int lo = 0, hi = count - 1;  // the last slot whose first block is ≤ b
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (slots[mid].first_block <= b) lo = mid;
        else hi = mid - 1;
    }
    const SumSquaresSlot s = slots[lo];
    const long long end = lo + 1 < count ? slots[lo + 1].first_block : (long long)gridDim.x;
    if (s.dtype == SUM_SQUARES_BF16) {
        sum_squares_partial<bf16>(partials + b, static_cast<const bf16*>(s.x), s.n, b - s.first_block, end - s.first_block);
    } else {
        sum_squares_partial<float>(partials + b, static_cast<const float*>(s.x), s.n, b - s.first_block, end - s.first_block);
    }
}
EMU_REGISTER(sum_squares_partial_multi)

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
