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
// Launch shape: 1-D grid of GRID_STRIDE_THREADS-thread blocks (common.cuh), one thread per output element
// (t, j) with a grid-stride loop over n·f (the host caps the grid at GRID_STRIDE_MAX_BLOCKS); it reads
// gate and up at (t, j) and (t, f + j). Every element is independent: results do not depend on the launch
// shape. All math is f32 (accurate expf), one rounding per store.
#include "common.cuh"

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

template <typename T>
__device__ void swiglu_forward(T* out, const T* inp, long long n, int f) {
    GRID_STRIDE_LOOP(k, n * f) {
        const long long t = k / f, j = k % f;
        const float g = to_float(inp[2 * f * t + j]), u = to_float(inp[2 * f * t + f + j]);
        out[k] = from_float<T>(g * sigmoid(g) * u);
    }
}

template <typename T>
__device__ void swiglu_backward(T* dinp, const T* inp, const T* dout, long long n, int f) {
    GRID_STRIDE_LOOP(k, n * f) {
        const long long t = k / f, j = k % f;
        const long long gate = 2 * f * t + j, up = gate + f;
        const float g = to_float(inp[gate]), u = to_float(inp[up]), dy = to_float(dout[k]);
        const float s = sigmoid(g);
        dinp[gate] = from_float<T>(dy * u * s * (1.0f + g * (1.0f - s)));
        dinp[up] = from_float<T>(dy * (g * s));
    }
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
