// kernels/embedding.cu — the encoder: token plus position embeddings, forward and backward.
//
//     forward:  out[t, :] = wte[tokens[t], :] + wpe[positions[t], :]               out [n, c]
//               (wpe == nullptr, the Llama family's RoPE models: out[t, :] = wte[tokens[t], :])
//     backward: dtable[r, :] += Σ_{t : ids[t] = r} dout[t, :]                      (once for wte, once for wpe)
//
// CPU twin: src/backend/cpu/embedding.rs (`embedding_forward`, `embedding_backward`). Host side:
// src/backend/cuda/ops/embedding.rs (`bucket_by_id`).
//
// Forward launch: 1-D grid-stride loop over the n·c outputs, GRID_STRIDE_THREADS-thread blocks (common.cuh).
//
// Backward without float atomics (deterministic), as llm.c buckets its encoder backward: the host sorts
// the token indices by id, stably (the ids are on the host already, so no device sort is needed), and
// hands the kernel three arrays: `order` (token indices grouped by id, each group in token order),
// `bucket_starts` (group g is order[bucket_starts[g] .. bucket_starts[g+1]]) and `bucket_rows` (the
// table row of group g). Launch: grid (num_buckets, ceil(c / blockDim.x)), blockDim.x = c rounded up to a
// multiple of 32, at most ROW_MAX_THREADS (common.cuh); each thread owns one channel of
// one table row, sums that row's tokens in order in f32, and adds the sum to the row once. Every output
// element is written by exactly one thread, in a fixed order, so the result is bit-identical across runs.
#include "common.cuh"

template <typename T>
__device__ void embedding_forward(T* out, const int* tokens, const int* positions, const T* wte, const T* wpe, int n,
                                  int c) {
    const long long total = (long long)n * c;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long t = i / c, j = i % c;
        const T te = wte[(long long)tokens[t] * c + j];
        out[i] = wpe == nullptr ? te : from_float<T>(to_float(te) + to_float(wpe[(long long)positions[t] * c + j]));
    }
}

template <typename T>
__device__ void embedding_backward(T* dtable, const T* dout, const int* order, const int* bucket_starts,
                                   const int* bucket_rows, int c) {
    const int bucket = blockIdx.x;
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float acc = 0.0f;
    for (int k = bucket_starts[bucket]; k < bucket_starts[bucket + 1]; ++k) {
        acc += to_float(dout[(long long)order[k] * c + j]);
    }
    T* row = dtable + (long long)bucket_rows[bucket] * c;
    row[j] = from_float<T>(to_float(row[j]) + acc);
}

#define EMBEDDING_KERNELS(T, suffix)                                                                         \
    extern "C" __global__ void embedding_forward_##suffix(T* out, const int* tokens, const int* positions,   \
                                                          const T* wte, const T* wpe, int n, int c) {        \
        embedding_forward<T>(out, tokens, positions, wte, wpe, n, c);                                        \
    }                                                                                                        \
    EMU_REGISTER(embedding_forward_##suffix)                                                                 \
    extern "C" __global__ void embedding_backward_##suffix(T* dtable, const T* dout, const int* order,       \
                                                           const int* bucket_starts, const int* bucket_rows, \
                                                           int c) {                                          \
        embedding_backward<T>(dtable, dout, order, bucket_starts, bucket_rows, c);                           \
    }                                                                                                        \
    EMU_REGISTER(embedding_backward_##suffix)

EMBEDDING_KERNELS(float, f32)
EMBEDDING_KERNELS(bf16, bf16)
