// kernels/swiglu.cu — SwiGLU, the gated activation of the Llama MLP, forward and backward.
//
// inp [n, 2f] holds per token [gate (f) | up (f)], the output of one product with the concatenated weight
// [gate_proj; up_proj]; out [n, f]; dinp has inp's layout (what that product's backward takes).
//
//     σ(g) = 1/(1 + e⁻ᵍ),  silu(g) = g·σ(g)
//     forward:  out  = silu(g)·u
//     backward: dg = dout·u·σ(g)·(1 + g·(1 − σ(g))),  du = dout·silu(g)      (overwrite dinp)
//
// CPU twin: src/backend/cpu/swiglu.rs (`swiglu_forward`, `swiglu_backward`). Host side:
// src/backend/cuda/ops/swiglu.rs.
//
// Launch shape: 1-D grid of GRID_STRIDE_THREADS-thread blocks (common.cuh), one thread per 128-bit pack of
// output elements (t, j .. j + W) with a grid-stride loop over n·f (`grid_stride_packed`; the host caps
// the grid at GRID_STRIDE_MAX_BLOCKS); it reads gate and up at (t, j) and (t, f + j). Packs need f a
// multiple of the pack width (so that none straddles a row) and every pointer 16-byte aligned; otherwise
// one element at a time. Every element is independent: results do not depend on the launch shape or the
// path. All math is f32 (accurate expf), one rounding per store; inputs read once use streaming loads.
#include "common.cuh"

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

template <typename T>
__device__ void swiglu_forward(T* out, const T* inp, long long n, int f) {
    const bool vector = f % vec_width<T> == 0 && all_aligned16(out, inp);
    grid_stride_packed<T>(n * f, vector, [&](auto width, long long k) {
        constexpr int W = decltype(width)::value;
        const long long t = k / f, j = k % f;
        float g[W], u[W], y[W];
        load_vec<W, CacheHint::Streaming>(inp + 2 * f * t + j, g);
        load_vec<W, CacheHint::Streaming>(inp + 2 * f * t + f + j, u);
#pragma unroll
        for (int e = 0; e < W; ++e) y[e] = g[e] * sigmoid(g[e]) * u[e];
        store_vec<W>(out + k, y);
    });
}

template <typename T>
__device__ void swiglu_backward(T* dinp, const T* inp, const T* dout, long long n, int f) {
    const bool vector = f % vec_width<T> == 0 && all_aligned16(dinp, inp, dout);
    grid_stride_packed<T>(n * f, vector, [&](auto width, long long k) {
        constexpr int W = decltype(width)::value;
        const long long t = k / f, j = k % f;
        const long long gate = 2 * f * t + j, up = gate + f;
        float g[W], u[W], dy[W], dg[W], du[W];
        load_vec<W, CacheHint::Streaming>(inp + gate, g);
        load_vec<W, CacheHint::Streaming>(inp + up, u);
        load_vec<W, CacheHint::Streaming>(dout + k, dy);
#pragma unroll
        for (int e = 0; e < W; ++e) {
            const float s = sigmoid(g[e]);
            dg[e] = dy[e] * u[e] * s * (1.0f + g[e] * (1.0f - s));
            du[e] = dy[e] * (g[e] * s);
        }
        store_vec<W>(dinp + gate, dg);
        store_vec<W>(dinp + up, du);
    });
}

#define SWIGLU_KERNELS(T, suffix)                                                                              \
    extern "C" __global__ void swiglu_forward_##suffix(T* out, const T* inp, long long n, int f) {             \
        swiglu_forward<T>(out, inp, n, f);                                                                     \
    }                                                                                                          \
    EMU_REGISTER(swiglu_forward_##suffix)                                                                      \
    extern "C" __global__ void swiglu_backward_##suffix(T* dinp, const T* inp, const T* dout, long long n,     \
                                                        int f) {                                               \
        swiglu_backward<T>(dinp, inp, dout, n, f);                                                             \
    }                                                                                                          \
    EMU_REGISTER(swiglu_backward_##suffix)

SWIGLU_KERNELS(float, f32)
SWIGLU_KERNELS(bf16, bf16)
