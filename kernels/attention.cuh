// kernels/attention.cuh — what both attention kernel files (attention.cu: CUDA cores, f32 and bf16;
// attention_mma.cu: tensor cores, bf16) read the same way: the column layout of a packed qkv row.
#pragma once
#include "common.cuh"

/// The columns of a qkv row (QkvLayout in src/backend/ops/attention.rs).
struct QkvColumns {
    int n_head, n_kv_head, hd;
    /// Elements per row of qkv (and dqkv).
    __device__ long long width() const { return (long long)(n_head + 2 * n_kv_head) * hd; }
    /// Elements per row of out (and dout): the query heads.
    __device__ long long q_width() const { return (long long)n_head * hd; }
    /// The key/value head of query head h.
    __device__ int kv_head_of(int h) const { return h / (n_head / n_kv_head); }
    __device__ int q(int h) const { return h * hd; }
    __device__ int k(int g) const { return (n_head + g) * hd; }
    __device__ int v(int g) const { return (n_head + n_kv_head + g) * hd; }
};

// The sliding window (`window` of every attention kernel; Window in src/backend/ops/attention.rs):
// query i sees key j of its sequence when 0 ≤ i − j < window; INT_MAX is full causal attention.
// Written with differences only, so INT_MAX never overflows.

/// Whether query i sees key j.
__device__ __forceinline__ bool window_sees(int i, int j, int window) { return j <= i && i - j < window; }

/// The first key query i sees.
__device__ __forceinline__ int window_first_key(int i, int window) { return i - window + 1 > 0 ? i - window + 1 : 0; }

/// One past the last query of a sequence of `len` tokens that sees key j.
__device__ __forceinline__ int window_query_end(int j, int window, int len) {
    return window >= len - j ? len : j + window;
}
