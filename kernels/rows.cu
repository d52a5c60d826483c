// kernels/rows.cu — row selection: copy chosen rows of a [n, c] tensor into a compact [m, c] one, and back.
// The model runs its LM head only on the rows that carry a target (response tokens): it gathers those rows
// of the final LayerNorm's output before the head and scatters their gradient back after it.
//
//     gather:  out[i, :] = inp[rows[i], :]                                  out [m, c], inp [n, c]
//     scatter: dinp[t, :] = dout[i, :] where rows[i] = t, else 0             dinp [n, c], dout [m, c]
//
// `rows` are distinct and increasing, in 0..n (checked on the host). Both are exact copies: the value is
// moved in its storage type, never converted.
//
// CPU twin: src/backend/cpu/rows.rs (`gather_rows`, `scatter_rows`). Host side: src/backend/cuda/ops/rows.rs.
//
// Launch shapes: one block per output row (grid m for gather, n for scatter), threads striding over the
// row's 128-bit packs (ceil(c / pack width) rounded up to a multiple of 32, at most ROW_MAX_THREADS,
// common.cuh); one element at a time instead when c is not a multiple of the pack width or a pointer
// is not 16-byte aligned. The source rows are read once (streaming loads). The scatter's block
// finds its source row by binary search over `rows` (no barrier needed), so it writes every element of
// dinp exactly once, zeros included: one pass, no memset, no atomics.
#include "common.cuh"

/// dst[0..c) = src[0..c), the block's threads striding over packs of W.
template <int W, typename T>
__device__ __forceinline__ void copy_row(T* dst, const T* src, int c) {
    for (int j = threadIdx.x * W; j < c; j += (int)blockDim.x * W) copy_vec<W, CacheHint::Streaming>(dst + j, src + j);
}

template <typename T>
__device__ void gather_rows(T* out, const T* inp, const int* rows, int c) {
    const long long i = blockIdx.x;
    const T* src = inp + (long long)rows[i] * c;
    T* dst = out + i * c;
    with_width<T>(c % vec_width<T> == 0 && all_aligned16(out, inp), [&](auto width) {
        copy_row<decltype(width)::value>(dst, src, c);
    });
}

template <typename T>
__device__ void scatter_rows(T* dinp, const T* dout, const int* rows, int m, int c) {
    const int t = blockIdx.x;
    // The first i with rows[i] >= t.
    int lo = 0, hi = m;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (rows[mid] < t) lo = mid + 1; else hi = mid;
    }
    T* dst = dinp + (long long)t * c;
    with_width<T>(c % vec_width<T> == 0 && all_aligned16(dinp, dout), [&](auto width) {
        constexpr int W = decltype(width)::value;
        if (lo < m && rows[lo] == t) {
            copy_row<W>(dst, dout + (long long)lo * c, c);
        } else {
            float zeros[W];
#pragma unroll
            for (int k = 0; k < W; ++k) zeros[k] = 0.0f;
            for (int j = threadIdx.x * W; j < c; j += (int)blockDim.x * W) store_vec<W>(dst + j, zeros);
        }
    });
}

#define ROWS_KERNELS(T, suffix)                                                                               \
    extern "C" __global__ void gather_rows_##suffix(T* out, const T* inp, const int* rows, int c) {           \
        gather_rows<T>(out, inp, rows, c);                                                                    \
    }                                                                                                         \
    EMU_REGISTER(gather_rows_##suffix)                                                                        \
    extern "C" __global__ void scatter_rows_##suffix(T* dinp, const T* dout, const int* rows, int m, int c) { \
        scatter_rows<T>(dinp, dout, rows, m, c);                                                              \
    }                                                                                                         \
    EMU_REGISTER(scatter_rows_##suffix)

ROWS_KERNELS(float, f32)
ROWS_KERNELS(bf16, bf16)
