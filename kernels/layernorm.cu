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
// Launch shapes:
// - layernorm_forward_<T>, residual_layernorm_forward_<T>, layernorm_backward_dinp_<T>: one warp per
//   row, LN_WARPS_PER_BLOCK = 4 warps (128 threads) per block, grid ceil(n / 4). Two passes for the
//   variance (mean first, then the centred sum), as the CPU does: no cancellation.
// - layernorm_backward_params_partial_<T>: grid (ceil(c / threads), num_chunks), threads = c rounded up
//   to a multiple of 32, at most ROW_MAX_THREADS (common.cuh); each thread owns one channel of one chunk
//   of `rows_per_chunk` rows (LN_MIN_ROWS_PER_CHUNK, more only where the grid's y limit needs it; the
//   count depends only on n) and writes that chunk's partial dweight and dbias to
//   `partial [num_chunks, 2, c]` (f32).
// - layernorm_backward_params_reduce_<T>: grid ceil(c / threads), the same threads; each thread sums its
//   channel's partials in chunk order and adds the sums to dweight and dbias.
// The parameter gradients are thus reduced over rows without float atomics, in a fixed order: the
// result does not depend on scheduling (llm.c reduces into shared memory with atomics instead; that
// is faster but not bit-reproducible). A later version can fuse the three backward kernels.
#include "common.cuh"

/// Rows per block of the LayerNorm row kernels: one warp per row.
#define LN_WARPS_PER_BLOCK 4  // @rust
/// The fewest rows per partial sum of the LayerNorm parameter gradients.
#define LN_MIN_ROWS_PER_CHUNK 32  // @rust

/// The part of a LayerNorm row shared by `layernorm_forward` and `residual_layernorm_forward`: given
/// this lane's share of the row sum (elements lane, lane + 32, ...), the mean, then the centred
/// variance from a second read of `x`, then `out`; lane 0 stores the statistics. The whole warp calls
/// it (warp reductions inside).
template <typename T>
__device__ __forceinline__ void layernorm_row_from_sum(T* o, float* mean, float* rstd, const T* x, const T* weight,
                                                       const T* bias, int row, int c, float eps, float lane_sum) {
    const int lane = threadIdx.x % 32;
    const float m = warp_reduce_sum(lane_sum) / c;
    float sq = 0.0f;
    for (int j = lane; j < c; j += 32) {
        const float d = to_float(x[j]) - m;
        sq += d * d;
    }
    const float r = 1.0f / sqrtf(warp_reduce_sum(sq) / c + eps);
    for (int j = lane; j < c; j += 32) {
        o[j] = from_float<T>((to_float(x[j]) - m) * r * to_float(weight[j]) + to_float(bias[j]));
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
    float sum = 0.0f;
    for (int j = lane; j < c; j += 32) sum += to_float(x[j]);
    layernorm_row_from_sum(out + (long long)row * c, mean, rstd, x, weight, bias, row, c, eps, sum);
}

/// `residual = a + b` and the LayerNorm of `residual`, one warp per row: the first pass writes the
/// residual and sums it, so the sum costs no extra read. The sum is taken over the values as stored
/// (rounded to T), and the later passes re-read the stored row (each lane reads back only what it
/// wrote, so no barrier is needed): the statistics are those of the residual the backward will read,
/// exactly as with `residual_forward` followed by `layernorm_forward`.
template <typename T>
__device__ void residual_layernorm_forward(T* residual, T* out, float* mean, float* rstd, const T* a, const T* b,
                                           const T* weight, const T* bias, int n, int c, float eps) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * LN_WARPS_PER_BLOCK + threadIdx.x / 32;
    if (row >= n) return;  // the whole warp leaves together; there is no block-wide barrier below
    const long long base = (long long)row * c;
    T* x = residual + base;
    float sum = 0.0f;
    for (int j = lane; j < c; j += 32) {
        const T stored = from_float<T>(to_float(a[base + j]) + to_float(b[base + j]));
        x[j] = stored;
        sum += to_float(stored);
    }
    layernorm_row_from_sum(out + base, mean, rstd, x, weight, bias, row, c, eps, sum);
}

template <typename T>
__device__ void layernorm_backward_dinp(T* dinp, const T* dout, const T* inp, const T* weight, const float* mean,
                                        const float* rstd, int n, int c) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * LN_WARPS_PER_BLOCK + threadIdx.x / 32;
    if (row >= n) return;
    const long long base = (long long)row * c;
    const float m = mean[row], r = rstd[row];
    float dnorm_sum = 0.0f, dnorm_norm_sum = 0.0f;
    for (int j = lane; j < c; j += 32) {
        const float norm = (to_float(inp[base + j]) - m) * r;
        const float dnorm = to_float(weight[j]) * to_float(dout[base + j]);
        dnorm_sum += dnorm;
        dnorm_norm_sum += dnorm * norm;
    }
    const float dnorm_mean = warp_reduce_sum(dnorm_sum) / c;
    const float dnorm_norm_mean = warp_reduce_sum(dnorm_norm_sum) / c;
    for (int j = lane; j < c; j += 32) {
        const float norm = (to_float(inp[base + j]) - m) * r;
        const float dnorm = to_float(weight[j]) * to_float(dout[base + j]);
        const float dx = (dnorm - dnorm_mean - norm * dnorm_norm_mean) * r;
        dinp[base + j] = from_float<T>(to_float(dinp[base + j]) + dx);
    }
}

template <typename T>
__device__ void layernorm_backward_params_partial(float* partial, const T* dout, const T* inp, const float* mean,
                                                  const float* rstd, int n, int c, int rows_per_chunk) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    const int chunk = blockIdx.y;
    const int row_end = min(n, (chunk + 1) * rows_per_chunk);
    float dw = 0.0f, db = 0.0f;
    for (int row = chunk * rows_per_chunk; row < row_end; ++row) {
        const long long i = (long long)row * c + j;
        const float dy = to_float(dout[i]);
        dw += (to_float(inp[i]) - mean[row]) * rstd[row] * dy;
        db += dy;
    }
    partial[(2LL * chunk) * c + j] = dw;
    partial[(2LL * chunk + 1) * c + j] = db;
}

template <typename T>
__device__ void layernorm_backward_params_reduce(T* dweight, T* dbias, const float* partial, int num_chunks, int c) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float dw = 0.0f, db = 0.0f;
    for (int chunk = 0; chunk < num_chunks; ++chunk) {
        dw += partial[(2LL * chunk) * c + j];
        db += partial[(2LL * chunk + 1) * c + j];
    }
    dweight[j] = from_float<T>(to_float(dweight[j]) + dw);
    dbias[j] = from_float<T>(to_float(dbias[j]) + db);
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
    extern "C" __global__ void layernorm_backward_dinp_##suffix(T* dinp, const T* dout, const T* inp,        \
                                                                const T* weight, const float* mean,          \
                                                                const float* rstd, int n, int c) {           \
        layernorm_backward_dinp<T>(dinp, dout, inp, weight, mean, rstd, n, c);                               \
    }                                                                                                         \
    EMU_REGISTER(layernorm_backward_dinp_##suffix)                                                            \
    extern "C" __global__ void layernorm_backward_params_partial_##suffix(                                   \
        float* partial, const T* dout, const T* inp, const float* mean, const float* rstd, int n, int c,     \
        int rows_per_chunk) {                                                                                 \
        layernorm_backward_params_partial<T>(partial, dout, inp, mean, rstd, n, c, rows_per_chunk);          \
    }                                                                                                         \
    EMU_REGISTER(layernorm_backward_params_partial_##suffix)                                                  \
    extern "C" __global__ void layernorm_backward_params_reduce_##suffix(T* dweight, T* dbias,               \
                                                                         const float* partial,               \
                                                                         int num_chunks, int c) {            \
        layernorm_backward_params_reduce<T>(dweight, dbias, partial, num_chunks, c);                         \
    }                                                                                                         \
    EMU_REGISTER(layernorm_backward_params_reduce_##suffix)

LAYERNORM_KERNELS(float, f32)
LAYERNORM_KERNELS(bf16, bf16)
