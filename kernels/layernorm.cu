// kernels/layernorm.cu — LayerNorm over the channels of each row, forward and backward.
//
//     forward:  mean = Σx/c,  rstd = 1/√(Σ(x − mean)²/c + eps),  x̂ = (x − mean)·rstd,  out = x̂·w + b
//     backward: dinp += rstd·(dy·w − mean(dy·w) − x̂·mean(dy·w·x̂))     (accumulates)
//               dweight += Σ_rows dy·x̂,  dbias += Σ_rows dy                 (accumulate)
//
//     fused:    residual = a + b, then the forward of residual (the residual add before ln_2, ln_1
//               of the next block and ln_f; its backward is the LayerNorm backward accumulating into
//               the residual stream's gradient)
//
// CPU twin: src/backend/cpu/layernorm.rs (`layernorm_forward`, `residual_layernorm_forward`,
// `layernorm_backward`). Host side: src/backend/cuda/ops/layernorm.rs.
// mean and rstd are kept in f32 whatever the storage type of the activations.
//
// Memory access: 128-bit packs (common.cuh, `load_vec`) when c is a multiple of the pack width and
// every pointer is 16-byte aligned (then every row is); otherwise the same code one element at a
// time. Lane l of a row's warp owns the packs l, l + 32, ... (elements l, l + 32, ... on the scalar
// path), so the per-lane partial sums, and the results' bits, differ between the two paths.
//
// Launch shapes:
// - layernorm_forward_<T>, residual_layernorm_forward_<T>: one warp per row, LN_WARPS_PER_BLOCK = 4
//   warps (128 threads) per block, grid ceil(n / 4). Two passes for the variance (mean first, then the
//   centred sum), as the CPU does: no cancellation.
// - layernorm_backward_<T>: the whole backward in one launch (llm.c's layernorm_backward_kernel10,
//   made deterministic). Block b takes rows [b·R, (b + 1)·R) (R rows_per_block, the grid ceil(n / R),
//   NORM_BWD_* in common.cuh: both depend only on n); its warps take one row at a time each, write dinp
//   and add dy·x̂ and dy into partial sums of their own in shared memory (f32, [warps, 2, c]: the
//   lanes own disjoint channels, so no atomics). The block sums its warps' partials in warp order into
//   its row of `scratch [grid, 2, c]`, and the last block to finish (a global counter,
//   `publish_block_partials`) sums the rows in block order and adds them to dweight and dbias. The
//   parameter gradients are the same bits whatever order the blocks run in (llm.c adds into shared
//   memory with float atomics instead, which is not bit-reproducible). Threads: 32 × warps, warps from
//   c (the host halves NORM_BWD_MAX_WARPS until the partials fit NORM_BWD_SHARED_TARGET); dynamic
//   shared memory warps·2·c floats; `counter` zero before the launch, and zero again after it
//   (the last block resets it: the backend keeps one counter for every launch, no memset).
// - layernorm_backward_bf16_f32: the same on bf16 activations into f32 dweight and dbias (gradients
//   kept in f32 storage, `train.grad_dtype`): the partials are f32 either way, only the final add
//   and its rounding differ.
#include "common.cuh"

/// Rows per block of the LayerNorm forward kernels: one warp per row.
#define LN_WARPS_PER_BLOCK 4  // @rust

/// The part of a LayerNorm row shared by `layernorm_forward` and `residual_layernorm_forward`: given
/// this lane's share of the row sum (its packs of W elements), the mean, then the centred variance from
/// a second read of `x`, then `out`; lane 0 stores the statistics. The whole warp calls it (warp
/// reductions inside).
template <int W, typename T>
__device__ __forceinline__ void layernorm_row_from_sum(T* o, float* mean, float* rstd, const T* x, const T* weight,
                                                       const T* bias, int row, int c, float eps, float lane_sum) {
    const int lane = threadIdx.x % 32;
    const float m = warp_reduce_sum(lane_sum) / c;
    float sq = 0.0f;
    for (int j = lane * W; j < c; j += 32 * W) {
        float v[W];
        load_vec<W>(x + j, v);
#pragma unroll
        for (int k = 0; k < W; ++k) sq += (v[k] - m) * (v[k] - m);
    }
    const float r = 1.0f / sqrtf(warp_reduce_sum(sq) / c + eps);
    for (int j = lane * W; j < c; j += 32 * W) {
        float v[W], w[W], b[W], y[W];
        load_vec<W>(x + j, v);
        load_vec<W>(weight + j, w);
        load_vec<W>(bias + j, b);
#pragma unroll
        for (int k = 0; k < W; ++k) y[k] = (v[k] - m) * r * w[k] + b[k];
        store_vec<W>(o + j, y);
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

template <typename T>
__device__ void layernorm_forward(T* out, float* mean, float* rstd, const T* inp, const T* weight, const T* bias,
                                  int n, int c, float eps) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * LN_WARPS_PER_BLOCK + threadIdx.x / 32;
    if (row >= n) return;  // the whole warp leaves together; there is no block-wide barrier below
    const T* x = inp + (long long)row * c;
    const bool vector = c % vec_width<T> == 0 && all_aligned16(out, inp, weight, bias);
    with_width<T>(vector, [&](auto width) {
        constexpr int W = decltype(width)::value;
        float sum = 0.0f;
        for (int j = lane * W; j < c; j += 32 * W) {
            float v[W];
            load_vec<W>(x + j, v);
#pragma unroll
            for (int k = 0; k < W; ++k) sum += v[k];
        }
        layernorm_row_from_sum<W>(out + (long long)row * c, mean, rstd, x, weight, bias, row, c, eps, sum);
    });
}

/// `residual = a + b` and the LayerNorm of `residual`, one warp per row: the first pass writes the
/// residual and sums it, so the sum costs no extra read. The sum is taken over the values as stored
/// (rounded to T), and the later passes re-read the stored row (each lane reads back only what it
/// wrote, so no barrier is needed): the statistics are those of the residual the backward will read,
/// exactly as with `residual_forward` followed by `layernorm_forward`. a and b are read once
/// (streaming loads).
template <typename T>
__device__ void residual_layernorm_forward(T* residual, T* out, float* mean, float* rstd, const T* a, const T* b,
                                           const T* weight, const T* bias, int n, int c, float eps) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * LN_WARPS_PER_BLOCK + threadIdx.x / 32;
    if (row >= n) return;  // the whole warp leaves together; there is no block-wide barrier below
    const long long base = (long long)row * c;
    T* x = residual + base;
    const bool vector = c % vec_width<T> == 0 && all_aligned16(residual, out, a, b, weight, bias);
    with_width<T>(vector, [&](auto width) {
        constexpr int W = decltype(width)::value;
        const float sum = residual_add_row<W, false>(x, a + base, b + base, c, lane);
        layernorm_row_from_sum<W>(out + base, mean, rstd, x, weight, bias, row, c, eps, sum);
    });
}

/// The fused backward (see the header): dinp of this block's rows, their parameter-gradient partials,
/// and in the last block to finish, the ordered sum of every block's partials into dweight and dbias.
template <typename T, typename G>
__device__ void layernorm_backward(T* dinp, G* dweight, G* dbias, float* scratch, unsigned int* counter,
                                   const T* dout, const T* inp, const T* weight, const float* mean,
                                   const float* rstd, int n, int c, int rows_per_block) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    float* const partials = dynamic_smem<float>();  // [warps, 2, c]: dweight's, then dbias's
    float* const warp_dw = partials + 2LL * warp * c;
    float* const warp_db = warp_dw + c;
    const long long row_begin = (long long)blockIdx.x * rows_per_block;
    const long long row_end = min((long long)n, row_begin + rows_per_block);
    const bool vector = c % vec_width<T> == 0 && all_aligned16(dinp, dout, inp, weight);
    with_width<T>(vector, [&](auto width) {
        constexpr int W = decltype(width)::value;
        // Each lane zeroes, adds to and (before the barrier) touches only its own channels.
        for (int j = lane * W; j < c; j += 32 * W) {
#pragma unroll
            for (int k = 0; k < W; ++k) warp_dw[j + k] = warp_db[j + k] = 0.0f;
        }
        for (long long row = row_begin + warp; row < row_end; row += warps) {
            const long long base = row * c;
            const float m = mean[row], r = rstd[row];
            float dnorm_sum = 0.0f, dnorm_norm_sum = 0.0f;
            for (int j = lane * W; j < c; j += 32 * W) {
                float x[W], dy[W], w[W];
                load_vec<W>(inp + base + j, x);
                load_vec<W>(dout + base + j, dy);
                load_vec<W>(weight + j, w);
#pragma unroll
                for (int k = 0; k < W; ++k) {
                    const float dnorm = w[k] * dy[k];
                    dnorm_sum += dnorm;
                    dnorm_norm_sum += dnorm * ((x[k] - m) * r);
                }
            }
            const float dnorm_mean = warp_reduce_sum(dnorm_sum) / c;
            const float dnorm_norm_mean = warp_reduce_sum(dnorm_norm_sum) / c;
            for (int j = lane * W; j < c; j += 32 * W) {
                float x[W], dy[W], w[W], dx[W];
                load_vec<W, CacheHint::Streaming>(inp + base + j, x);  // the rows' last reads
                load_vec<W, CacheHint::Streaming>(dout + base + j, dy);
                load_vec<W>(weight + j, w);
                load_vec<W>(dinp + base + j, dx);
#pragma unroll
                for (int k = 0; k < W; ++k) {
                    const float norm = (x[k] - m) * r;
                    dx[k] += (w[k] * dy[k] - dnorm_mean - norm * dnorm_norm_mean) * r;
                    warp_dw[j + k] += dy[k] * norm;
                    warp_db[j + k] += dy[k];
                }
                store_vec<W>(dinp + base + j, dx);
            }
        }
    });
    __syncthreads();  // every warp's partials, before the block sums them
    const bool last = publish_block_partials(scratch, counter, 2 * c, [&](int i) {
        float sum = 0.0f;
        for (int w = 0; w < warps; ++w) sum += partials[2LL * w * c + i];
        return sum;
    });
    if (!last) return;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        dweight[j] = from_float<G>(to_float(dweight[j]) + sum_block_partials(scratch, 2 * c, j));
        dbias[j] = from_float<G>(to_float(dbias[j]) + sum_block_partials(scratch, 2 * c, c + j));
    }
}

#define LAYERNORM_KERNELS(T, suffix)                                                                          \
    extern "C" __global__ void layernorm_forward_##suffix(T* out, float* mean, float* rstd, const T* inp,    \
                                                          const T* weight, const T* bias, int n, int c,      \
                                                          float eps) {                                       \
        layernorm_forward<T>(out, mean, rstd, inp, weight, bias, n, c, eps);                                 \
    }                                                                                                         \
    EMU_REGISTER(layernorm_forward_##suffix)                                                                  \
    extern "C" __global__ void residual_layernorm_forward_##suffix(T* residual, T* out, float* mean,         \
                                                                   float* rstd, const T* a, const T* b,      \
                                                                   const T* weight, const T* bias, int n,    \
                                                                   int c, float eps) {                       \
        residual_layernorm_forward<T>(residual, out, mean, rstd, a, b, weight, bias, n, c, eps);             \
    }                                                                                                         \
    EMU_REGISTER(residual_layernorm_forward_##suffix)                                                         \
    LAYERNORM_BACKWARD(T, T, suffix)

/// The backward with activations of type T and parameter gradients (dweight, dbias) of type G.
#define LAYERNORM_BACKWARD(T, G, suffix)                                                                      \
    extern "C" __global__ void layernorm_backward_##suffix(                                                  \
        T* dinp, G* dweight, G* dbias, float* scratch, unsigned int* counter, const T* dout, const T* inp,   \
        const T* weight, const float* mean, const float* rstd, int n, int c, int rows_per_block) {           \
        layernorm_backward<T, G>(dinp, dweight, dbias, scratch, counter, dout, inp, weight, mean, rstd, n, c, \
                                 rows_per_block);                                                             \
    }                                                                                                         \
    EMU_REGISTER(layernorm_backward_##suffix)

LAYERNORM_KERNELS(float, f32)
LAYERNORM_KERNELS(bf16, bf16)
LAYERNORM_BACKWARD(bf16, float, bf16_f32)
