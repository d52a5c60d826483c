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
// Launch shapes:
// - rmsnorm_forward_<T>, residual_rmsnorm_forward_<T>, rmsnorm_backward_dinp_<T>: one warp per row,
//   RMS_WARPS_PER_BLOCK = 4 warps (128 threads) per block, grid ceil(n / 4).
// - rmsnorm_backward_dweight_partial_<T>: grid (ceil(c / threads), num_chunks), threads = c rounded up to a
//   multiple of 32, at most ROW_MAX_THREADS (common.cuh); each thread owns one channel of one chunk of
//   `rows_per_chunk` rows (RMS_MIN_ROWS_PER_CHUNK, more only where the grid's y limit needs it; the count
//   depends only on n) and writes that chunk's partial dweight to `partial [num_chunks, c]` (f32).
// - rmsnorm_backward_dweight_reduce_<T>: grid ceil(c / threads), the same threads; each thread sums its
//   channel's partials in chunk order and adds the sum to dweight.
// dweight is thus reduced over rows without float atomics, in a fixed order (as the LayerNorm's
// parameter gradients, kernels/layernorm.cu): the result does not depend on scheduling.
#include "common.cuh"

/// Rows per block of the RMSNorm row kernels: one warp per row.
#define RMS_WARPS_PER_BLOCK 4  // @rust
/// The fewest rows per partial sum of the RMSNorm weight gradient.
#define RMS_MIN_ROWS_PER_CHUNK 32  // @rust

/// The part of an RMSNorm row shared by `rmsnorm_forward` and `residual_rmsnorm_forward`: given this
/// lane's share of the row's sum of squares (elements lane, lane + 32, ...), rstd, then `out` from a
/// second read of `x`; lane 0 stores rstd. The whole warp calls it (a warp reduction inside).
template <typename T>
__device__ __forceinline__ void rmsnorm_row_from_sum_squares(T* o, float* rstd, const T* x, const T* weight, int row,
                                                             int c, float eps, float lane_sum_squares) {
    const int lane = threadIdx.x % 32;
    const float r = 1.0f / sqrtf(warp_reduce_sum(lane_sum_squares) / c + eps);
    for (int j = lane; j < c; j += 32) o[j] = from_float<T>(to_float(x[j]) * r * to_float(weight[j]));
    if (lane == 0) rstd[row] = r;
}

template <typename T>
__device__ void rmsnorm_forward(T* out, float* rstd, const T* inp, const T* weight, int n, int c, float eps) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * RMS_WARPS_PER_BLOCK + threadIdx.x / 32;
    if (row >= n) return;  // the whole warp leaves together; there is no block-wide barrier below
    const T* x = inp + (long long)row * c;
    float sq = 0.0f;
    for (int j = lane; j < c; j += 32) {
        const float v = to_float(x[j]);
        sq += v * v;
    }
    rmsnorm_row_from_sum_squares(out + (long long)row * c, rstd, x, weight, row, c, eps, sq);
}

/// `residual = a + b` and the RMSNorm of `residual`, one warp per row: the first pass writes the
/// residual and sums its squares. The squares are those of the values as stored (rounded to T), and the
/// second pass re-reads the stored row (each lane reads back only what it wrote, so no barrier is
/// needed): rstd is that of the residual the backward will read, exactly as with `residual_forward`
/// followed by `rmsnorm_forward`.
template <typename T>
__device__ void residual_rmsnorm_forward(T* residual, T* out, float* rstd, const T* a, const T* b, const T* weight,
                                         int n, int c, float eps) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * RMS_WARPS_PER_BLOCK + threadIdx.x / 32;
    if (row >= n) return;  // the whole warp leaves together; there is no block-wide barrier below
    const long long base = (long long)row * c;
    T* x = residual + base;
    float sq = 0.0f;
    for (int j = lane; j < c; j += 32) {
        const T stored = from_float<T>(to_float(a[base + j]) + to_float(b[base + j]));
        x[j] = stored;
        const float v = to_float(stored);
        sq += v * v;
    }
    rmsnorm_row_from_sum_squares(out + base, rstd, x, weight, row, c, eps, sq);
}

template <typename T>
__device__ void rmsnorm_backward_dinp(T* dinp, const T* dout, const T* inp, const T* weight, const float* rstd, int n,
                                      int c) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * RMS_WARPS_PER_BLOCK + threadIdx.x / 32;
    if (row >= n) return;
    const long long base = (long long)row * c;
    const float r = rstd[row];
    float dnorm_norm_sum = 0.0f;
    for (int j = lane; j < c; j += 32) {
        dnorm_norm_sum += to_float(weight[j]) * to_float(dout[base + j]) * (to_float(inp[base + j]) * r);
    }
    const float dnorm_norm_mean = warp_reduce_sum(dnorm_norm_sum) / c;
    for (int j = lane; j < c; j += 32) {
        const float norm = to_float(inp[base + j]) * r;
        const float dx = (to_float(weight[j]) * to_float(dout[base + j]) - norm * dnorm_norm_mean) * r;
        dinp[base + j] = from_float<T>(to_float(dinp[base + j]) + dx);
    }
}

template <typename T>
__device__ void rmsnorm_backward_dweight_partial(float* partial, const T* dout, const T* inp, const float* rstd, int n,
                                                 int c, int rows_per_chunk) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    const int chunk = blockIdx.y;
    const int row_end = min(n, (chunk + 1) * rows_per_chunk);
    float dw = 0.0f;
    for (int row = chunk * rows_per_chunk; row < row_end; ++row) {
        const long long i = (long long)row * c + j;
        dw += to_float(inp[i]) * rstd[row] * to_float(dout[i]);
    }
    partial[(long long)chunk * c + j] = dw;
}

template <typename T>
__device__ void rmsnorm_backward_dweight_reduce(T* dweight, const float* partial, int num_chunks, int c) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float dw = 0.0f;
    for (int chunk = 0; chunk < num_chunks; ++chunk) dw += partial[(long long)chunk * c + j];
    dweight[j] = from_float<T>(to_float(dweight[j]) + dw);
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
    extern "C" __global__ void rmsnorm_backward_dinp_##suffix(T* dinp, const T* dout, const T* inp,            \
                                                              const T* weight, const float* rstd, int n,       \
                                                              int c) {                                         \
        rmsnorm_backward_dinp<T>(dinp, dout, inp, weight, rstd, n, c);                                         \
    }                                                                                                          \
    EMU_REGISTER(rmsnorm_backward_dinp_##suffix)                                                               \
    extern "C" __global__ void rmsnorm_backward_dweight_partial_##suffix(                                      \
        float* partial, const T* dout, const T* inp, const float* rstd, int n, int c, int rows_per_chunk) {    \
        rmsnorm_backward_dweight_partial<T>(partial, dout, inp, rstd, n, c, rows_per_chunk);                   \
    }                                                                                                          \
    EMU_REGISTER(rmsnorm_backward_dweight_partial_##suffix)                                                    \
    extern "C" __global__ void rmsnorm_backward_dweight_reduce_##suffix(T* dweight, const float* partial,      \
                                                                        int num_chunks, int c) {               \
        rmsnorm_backward_dweight_reduce<T>(dweight, partial, num_chunks, c);                                   \
    }                                                                                                          \
    EMU_REGISTER(rmsnorm_backward_dweight_reduce_##suffix)

RMSNORM_KERNELS(float, f32)
RMSNORM_KERNELS(bf16, bf16)
