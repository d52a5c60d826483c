// kernels/rmsnorm.cu — RMSNorm over the channels of each row (HF `LlamaRMSNorm`), forward and backward.
//
//     forward:  rstd = 1/√(Σx²/c + eps),  x̂ = x·rstd,  out = x̂·w
//     backward: dinp += rstd·(dy·w − x̂·mean(dy·w·x̂))     (accumulates)
//               dweight += Σ_rows dy·x̂                     (accumulates)
//
//     fused:    residual = a + b, then the forward of residual (the residual add before each block's
//               norms and the final norm; its backward is the RMSNorm backward accumulating into the
//               residual stream's gradient)
//
// CPU twin: src/backend/cpu/rmsnorm.rs (`rmsnorm_forward`, `residual_rmsnorm_forward`,
// `rmsnorm_backward`). Host side: src/backend/cuda/ops/rmsnorm.rs.
// rstd is kept in f32 whatever the storage type of the activations; all math is f32, one rounding per
// store (HF rounds x̂ to the activation type before the weight multiplies it: a second rounding we skip).
//
// Memory access and launch shapes as the LayerNorm's (kernels/layernorm.cu): 128-bit packs when c is a
// multiple of the pack width and every pointer is 16-byte aligned, else one element at a time;
// - rmsnorm_forward_<T>, residual_rmsnorm_forward_<T>: one warp per row, RMS_WARPS_PER_BLOCK = 4 warps
//   (128 threads) per block, grid ceil(n / 4).
// - rmsnorm_backward_<T>: the whole backward in one launch: block b takes rows [b·R, (b + 1)·R), its
//   warps one row at a time each, writing dinp and adding dy·x̂ into a per-warp partial dweight in
//   shared memory (f32, [warps, c]); the block sums its warps' partials in warp order into its row of
//   `scratch [grid, c]`, and the last block to finish sums the rows in block order into dweight
//   (`publish_block_partials`, common.cuh): the same bits whatever order the blocks run in. Dynamic
//   shared memory warps·c floats; `counter` zero before the launch, and zero again after it
//   (the last block resets it: the backend keeps one counter for every launch, no memset).
// - rmsnorm_backward_bf16_f32: the same on bf16 activations into an f32 dweight (`train.grad_dtype`).
#include "common.cuh"

/// Rows per block of the RMSNorm forward kernels: one warp per row.
#define RMS_WARPS_PER_BLOCK 4  // @rust

/// The part of an RMSNorm row shared by `rmsnorm_forward` and `residual_rmsnorm_forward`: given this
/// lane's share of the row's sum of squares (its packs of W elements), rstd, then `out` from a second
/// read of `x`; lane 0 stores rstd. The whole warp calls it (a warp reduction inside).
template <int W, typename T>
__device__ __forceinline__ void rmsnorm_row_from_sum_squares(T* o, float* rstd, const T* x, const T* weight, int row,
                                                             int c, float eps, float lane_sum_squares) {
    const int lane = threadIdx.x % 32;
    const float r = 1.0f / sqrtf(warp_reduce_sum(lane_sum_squares) / c + eps);
    for (int j = lane * W; j < c; j += 32 * W) {
        float v[W], w[W], y[W];
        load_vec<W>(x + j, v);
        load_vec<W>(weight + j, w);
#pragma unroll
        for (int k = 0; k < W; ++k) y[k] = v[k] * r * w[k];
        store_vec<W>(o + j, y);
    }
    if (lane == 0) rstd[row] = r;
}

template <typename T>
__device__ void rmsnorm_forward(T* out, float* rstd, const T* inp, const T* weight, int n, int c, float eps) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * RMS_WARPS_PER_BLOCK + threadIdx.x / 32;
    if (row >= n) return;  // the whole warp leaves together; there is no block-wide barrier below
    const T* x = inp + (long long)row * c;
    const bool vector = c % vec_width<T> == 0 && all_aligned16(out, inp, weight);
    with_width<T>(vector, [&](auto width) {
        constexpr int W = decltype(width)::value;
        float sq = 0.0f;
        for (int j = lane * W; j < c; j += 32 * W) {
            float v[W];
            load_vec<W>(x + j, v);
#pragma unroll
            for (int k = 0; k < W; ++k) sq += v[k] * v[k];
        }
        rmsnorm_row_from_sum_squares<W>(out + (long long)row * c, rstd, x, weight, row, c, eps, sq);
    });
}

/// `residual = a + b` and the RMSNorm of `residual`, one warp per row: the first pass writes the
/// residual and sums its squares. The squares are those of the values as stored (rounded to T), and the
/// second pass re-reads the stored row (each lane reads back only what it wrote, so no barrier is
/// needed): rstd is that of the residual the backward will read, exactly as with `residual_forward`
/// followed by `rmsnorm_forward`. a and b are read once (streaming loads).
template <typename T>
__device__ void residual_rmsnorm_forward(T* residual, T* out, float* rstd, const T* a, const T* b, const T* weight,
                                         int n, int c, float eps) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * RMS_WARPS_PER_BLOCK + threadIdx.x / 32;
    if (row >= n) return;  // the whole warp leaves together; there is no block-wide barrier below
    const long long base = (long long)row * c;
    T* x = residual + base;
    const bool vector = c % vec_width<T> == 0 && all_aligned16(residual, out, a, b, weight);
    with_width<T>(vector, [&](auto width) {
        constexpr int W = decltype(width)::value;
        const float sq = residual_add_row<W, true>(x, a + base, b + base, c, lane);
        rmsnorm_row_from_sum_squares<W>(out + base, rstd, x, weight, row, c, eps, sq);
    });
}

/// The fused backward (see the header): dinp of this block's rows, their weight-gradient partials, and
/// in the last block to finish, the ordered sum of every block's partials into dweight.
template <typename T, typename G>
__device__ void rmsnorm_backward(T* dinp, G* dweight, float* scratch, unsigned int* counter, const T* dout,
                                 const T* inp, const T* weight, const float* rstd, int n, int c, int rows_per_block) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    float* const partials = dynamic_smem<float>();  // [warps, c]
    float* const warp_dw = partials + (long long)warp * c;
    const long long row_begin = (long long)blockIdx.x * rows_per_block;
    const long long row_end = min((long long)n, row_begin + rows_per_block);
    const bool vector = c % vec_width<T> == 0 && all_aligned16(dinp, dout, inp, weight);
    with_width<T>(vector, [&](auto width) {
        constexpr int W = decltype(width)::value;
        // Each lane zeroes, adds to and (before the barrier) touches only its own channels.
        for (int j = lane * W; j < c; j += 32 * W) {
#pragma unroll
            for (int k = 0; k < W; ++k) warp_dw[j + k] = 0.0f;
        }
        for (long long row = row_begin + warp; row < row_end; row += warps) {
            const long long base = row * c;
            const float r = rstd[row];
            float dnorm_norm_sum = 0.0f;
            for (int j = lane * W; j < c; j += 32 * W) {
                float x[W], dy[W], w[W];
                load_vec<W>(inp + base + j, x);
                load_vec<W>(dout + base + j, dy);
                load_vec<W>(weight + j, w);
#pragma unroll
                for (int k = 0; k < W; ++k) dnorm_norm_sum += w[k] * dy[k] * (x[k] * r);
            }
            const float dnorm_norm_mean = warp_reduce_sum(dnorm_norm_sum) / c;
            for (int j = lane * W; j < c; j += 32 * W) {
                float x[W], dy[W], w[W], dx[W];
                load_vec<W, CacheHint::Streaming>(inp + base + j, x);  // the rows' last reads
                load_vec<W, CacheHint::Streaming>(dout + base + j, dy);
                load_vec<W>(weight + j, w);
                load_vec<W>(dinp + base + j, dx);
#pragma unroll
                for (int k = 0; k < W; ++k) {
                    const float norm = x[k] * r;
                    dx[k] += (w[k] * dy[k] - norm * dnorm_norm_mean) * r;
                    warp_dw[j + k] += norm * dy[k];
                }
                store_vec<W>(dinp + base + j, dx);
            }
        }
    });
    __syncthreads();  // every warp's partials, before the block sums them
    const bool last = publish_block_partials(scratch, counter, c, [&](int j) {
        float sum = 0.0f;
        for (int w = 0; w < warps; ++w) sum += partials[(long long)w * c + j];
        return sum;
    });
    if (!last) return;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        dweight[j] = from_float<G>(to_float(dweight[j]) + sum_block_partials(scratch, c, j));
    }
}

#define RMSNORM_KERNELS(T, suffix)                                                                             \
    extern "C" __global__ void rmsnorm_forward_##suffix(T* out, float* rstd, const T* inp, const T* weight,   \
                                                        int n, int c, float eps) {                             \
        rmsnorm_forward<T>(out, rstd, inp, weight, n, c, eps);                                                 \
    }                                                                                                          \
    EMU_REGISTER(rmsnorm_forward_##suffix)                                                                     \
    extern "C" __global__ void residual_rmsnorm_forward_##suffix(T* residual, T* out, float* rstd, const T* a, \
                                                                 const T* b, const T* weight, int n, int c,   \
                                                                 float eps) {                                 \
        residual_rmsnorm_forward<T>(residual, out, rstd, a, b, weight, n, c, eps);                             \
    }                                                                                                          \
    EMU_REGISTER(residual_rmsnorm_forward_##suffix)                                                            \
    RMSNORM_BACKWARD(T, T, suffix)

/// The backward with activations of type T and the weight gradient of type G.
#define RMSNORM_BACKWARD(T, G, suffix)                                                                         \
    extern "C" __global__ void rmsnorm_backward_##suffix(T* dinp, G* dweight, float* scratch,                  \
                                                         unsigned int* counter, const T* dout, const T* inp,   \
                                                         const T* weight, const float* rstd, int n, int c,     \
                                                         int rows_per_block) {                                 \
        rmsnorm_backward<T, G>(dinp, dweight, scratch, counter, dout, inp, weight, rstd, n, c, rows_per_block); \
    }                                                                                                          \
    EMU_REGISTER(rmsnorm_backward_##suffix)

RMSNORM_KERNELS(float, f32)
RMSNORM_KERNELS(bf16, bf16)
RMSNORM_BACKWARD(bf16, float, bf16_f32)
