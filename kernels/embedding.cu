// kernels/embedding.cu — the encoder: token plus position embeddings, forward and backward.
//
//     forward:  out[t, :] = wte[tokens[t], :] + wpe[positions[t], :]               out [n, c]
//               (wpe == nullptr, the Llama family's RoPE models: out[t, :] = wte[tokens[t], :])
//     backward: dtable[r, :] += Σ_{t : ids[t] = r} dout[t, :]                      (once for wte, once for wpe)
//
// CPU twin: src/backend/cpu/embedding.rs (`embedding_forward`, `embedding_backward`). Host side:
// src/backend/cuda/ops/embedding.rs (`bucket_by_id`).
//
// Forward launch: 1-D grid-stride loop over the n·c outputs in 128-bit packs (`grid_stride_packed`),
// GRID_STRIDE_THREADS-thread blocks (common.cuh); one element at a time when c is not a multiple of the
// pack width or a pointer is not 16-byte aligned.
//
// Backward without float atomics (deterministic), as llm.c buckets its encoder backward: the host sorts
// the token indices by id, stably (the ids are on the host already, so no device sort is needed), and
// hands the kernel three arrays: `order` (token indices grouped by id, each group in token order),
// `bucket_starts` (group g is order[bucket_starts[g] .. bucket_starts[g+1]]) and `bucket_rows` (the
// table row of group g). Each thread owns one group of vec_width<T> channels (one 128-bit pack) of one
// table row, sums that row's tokens in order in f32, and adds the sums to the row once. Launch: grid
// (num_buckets, ceil(groups / blockDim.x)), groups = ceil(c / vec_width<T>), blockDim.x = groups rounded
// up to a multiple of 32, at most ROW_MAX_THREADS (common.cuh). Every output element is written by
// exactly one thread, in a fixed order, so the result is bit-identical across runs (and across the
// packed and the one-at-a-time paths). embedding_backward_bf16_f32 adds bf16 `dout` into an f32 table
// gradient (`train.grad_dtype`): a thread's group is one pack of `dout` (8 channels), two of the table.
#include "common.cuh"

template <typename T>
__device__ void embedding_forward(T* out, const int* tokens, const int* positions, const T* wte, const T* wpe, int n,
                                  int c) {
    const bool vector = c % vec_width<T> == 0 && all_aligned16(out, wte, wpe);
    grid_stride_packed<T>((long long)n * c, vector, [&](auto width, long long i) {
        constexpr int W = decltype(width)::value;
        const long long t = i / c, j = i % c;
        float e[W];
        load_vec<W>(wte + (long long)tokens[t] * c + j, e);
        if (wpe != nullptr) {
            float p[W];
            load_vec<W>(wpe + (long long)positions[t] * c + j, p);
#pragma unroll
            for (int k = 0; k < W; ++k) e[k] += p[k];
        }
        store_vec<W>(out + i, e);
    });
}

template <typename T, typename G>
__device__ void embedding_backward(G* dtable, const T* dout, const int* order, const int* bucket_starts,
                                   const int* bucket_rows, int c) {
    const int bucket = blockIdx.x;
    const int first = (blockIdx.y * blockDim.x + threadIdx.x) * vec_width<T>;  // this thread's channel group
    if (first >= c) return;
    const int end = min(c, first + vec_width<T>);
    G* row = dtable + (long long)bucket_rows[bucket] * c;
    with_width<T>(c % vec_width<T> == 0 && all_aligned16(dtable, dout), [&](auto width) {
        constexpr int W = decltype(width)::value;
        for (int j = first; j < end; j += W) {
            float acc[W];
#pragma unroll
            for (int k = 0; k < W; ++k) acc[k] = 0.0f;
            for (int b = bucket_starts[bucket]; b < bucket_starts[bucket + 1]; ++b) {
                float dy[W];
                load_vec<W>(dout + (long long)order[b] * c + j, dy);
#pragma unroll
                for (int k = 0; k < W; ++k) acc[k] += dy[k];
            }
            float sum[W];
            load_vec<W>(row + j, sum);
#pragma unroll
            for (int k = 0; k < W; ++k) sum[k] += acc[k];
            store_vec<W>(row + j, sum);
        }
    });
}

#define EMBEDDING_KERNELS(T, suffix)                                                                         \
    extern "C" __global__ void embedding_forward_##suffix(T* out, const int* tokens, const int* positions,   \
                                                          const T* wte, const T* wpe, int n, int c) {        \
        embedding_forward<T>(out, tokens, positions, wte, wpe, n, c);                                        \
    }                                                                                                        \
    EMU_REGISTER(embedding_forward_##suffix)                                                                 \
    EMBEDDING_BACKWARD(T, T, suffix)

/// The backward with `dout` of type T into a table gradient of type G.
#define EMBEDDING_BACKWARD(T, G, suffix)                                                                     \
    extern "C" __global__ void embedding_backward_##suffix(G* dtable, const T* dout, const int* order,       \
                                                           const int* bucket_starts, const int* bucket_rows, \
                                                           int c) {                                          \
        embedding_backward<T, G>(dtable, dout, order, bucket_starts, bucket_rows, c);                        \
    }                                                                                                        \
    EMU_REGISTER(embedding_backward_##suffix)

EMBEDDING_KERNELS(float, f32)
EMBEDDING_KERNELS(bf16, bf16)
EMBEDDING_BACKWARD(bf16, float, bf16_f32)
