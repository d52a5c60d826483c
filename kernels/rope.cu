// kernels/rope.cu — rotary position embeddings (RoPE, HF's `rotate_half` convention), in place on the q and
// k heads of the packed qkv tensor, forward and backward.
//
// qkv [n, width] holds per token [q: n_head·hd | k: n_kv_head·hd | v: n_kv_head·hd] (QkvLayout in
// src/backend/ops/attention.rs), so the heads to rotate are the first `rotated_heads = n_head + n_kv_head` heads
// of each row. For token t at position p = positions[t], in each of those heads x, half = hd/2, i < half:
//
//     θ = fl32(p · inv_freq[i])                       (HF forms the angle in f32 too)
//     forward:  x[i] ← x[i]·cos θ − x[i+half]·sin θ,   x[i+half] ← x[i+half]·cos θ + x[i]·sin θ
//     backward: the same with −θ (the rotation is orthogonal: its gradient is its inverse), on dqkv
//
// inv_freq [half] (f32) is the host's frequency table (`rope_inverse_frequencies`: default, linear or llama3
// rules), so no scaling rule reaches the kernel. All math is f32 (accurate sincosf, no fast intrinsics),
// one rounding per store; v (and dv) are not touched.
//
// CPU twin: src/backend/cpu/rope.rs (`rope_forward`, `rope_backward`). Host side: src/backend/cuda/ops/rope.rs.
//
// Launch shape: 1-D grid of GRID_STRIDE_THREADS-thread blocks (common.cuh), one thread per (token, pair i)
// with a grid-stride loop over n·half (the host caps the grid at GRID_STRIDE_MAX_BLOCKS). A thread computes
// its cos and sin once and rotates pair i of every q and k head of its token: consecutive threads touch
// consecutive channels of a head (coalesced), and sincosf runs once per (token, i) instead of once per head.
// Every element is written by one thread: deterministic, and independent of the launch shape.
// ptxas (CUDA 13.0, sm_90): 26-32 registers, no spills; the 32-byte stack frame is sincosf's slow path
// (Payne-Hanek reduction, taken only for |θ| > 105615).
#include "common.cuh"

template <typename T, bool INVERSE>
__device__ void rope_rotate(T* qkv, const int* positions, const float* inv_freq, long long n, int rotated_heads,
                            int head_dim, int width) {
    const int half = head_dim / 2;
    GRID_STRIDE_LOOP(k, n * half) {
        const long long t = k / half;
        const int i = (int)(k % half);
        float sin_theta, cos_theta;
        sincosf((float)positions[t] * inv_freq[i], &sin_theta, &cos_theta);
        if (INVERSE) sin_theta = -sin_theta;
        T* x = qkv + t * width + i;
        for (int h = 0; h < rotated_heads; ++h, x += head_dim) {
            const float x1 = to_float(x[0]), x2 = to_float(x[half]);
            x[0] = from_float<T>(x1 * cos_theta - x2 * sin_theta);
            x[half] = from_float<T>(x2 * cos_theta + x1 * sin_theta);
        }
    }
}

#define ROPE_KERNELS(T, suffix)                                                                                 \
    extern "C" __global__ void rope_forward_##suffix(T* qkv, const int* positions, const float* inv_freq,      \
                                                     long long n, int rotated_heads, int head_dim, int width) { \
        rope_rotate<T, false>(qkv, positions, inv_freq, n, rotated_heads, head_dim, width);                     \
    }                                                                                                           \
    EMU_REGISTER(rope_forward_##suffix)                                                                         \
    extern "C" __global__ void rope_backward_##suffix(T* dqkv, const int* positions, const float* inv_freq,    \
                                                      long long n, int rotated_heads, int head_dim,             \
                                                      int width) {                                              \
        rope_rotate<T, true>(dqkv, positions, inv_freq, n, rotated_heads, head_dim, width);                     \
    }                                                                                                           \
    EMU_REGISTER(rope_backward_##suffix)

ROPE_KERNELS(float, f32)
ROPE_KERNELS(bf16, bf16)
