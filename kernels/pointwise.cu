// kernels/pointwise.cu — elementwise ops: GELU forward and backward (tanh form, HF `gelu_new`), the
// residual add, in-place add, scale, and the f32 <-> bf16 conversions the CUDA backend uses when a
// tensor is stored in another type than an op wants.
//
//     gelu(x)  = ½·x·(1 + tanh u),  u = √(2/π)·(x + 0.044715·x³)
//     gelu'(x) = ½·(1 + tanh u) + ½·x·(1 − tanh² u)·√(2/π)·(1 + 3·0.044715·x²)
//
// CPU twin: src/backend/cpu/pointwise.rs (`gelu_forward`, `gelu_backward`, `residual_forward`,
// `add_inplace`, `scale`; fill is a memset on the device, `Device::fill`). Host side:
// src/backend/cuda/ops/pointwise.rs (the conversions: src/backend/cuda/backend.rs).
//
// Launch shape: 1-D grid of GRID_STRIDE_THREADS-thread blocks (common.cuh), one thread per 128-bit pack
// of elements (4 f32, 8 bf16; `grid_stride_packed`) with a grid-stride loop (the host caps the grid at
// GRID_STRIDE_MAX_BLOCKS); the elements past the last whole pack, and every element when a pointer is
// not 16-byte aligned, one at a time. Every element is independent, so results do not depend on the
// launch shape or the path. Each op has an f32 and a bf16 instantiation (`<op>_f32`, `<op>_bf16`):
// loads convert to f32, the math is f32, stores round once. Inputs read once use streaming loads.
#include "common.cuh"

/// √(2/π), the GELU tanh approximation's scale.
#define GELU_SCALE 0.7978845608028654f  // @rust
/// The cubic coefficient of the GELU tanh approximation.
#define GELU_CUBIC 0.044715f  // @rust

__device__ __forceinline__ float gelu(float x) {
    const float u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
}

__device__ __forceinline__ float gelu_grad(float x) {
    const float u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
    const float th = tanhf(u);
    const float du = GELU_SCALE * (1.0f + 3.0f * GELU_CUBIC * x * x);
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du;
}

// ---- GELU ---------------------------------------------------------------------------------------------
/// out = gelu(inp)
template <typename T>
__device__ void gelu_forward(T* out, const T* inp, long long n) {
    grid_stride_packed<T>(n, all_aligned16(out, inp), [&](auto width, long long i) {
        constexpr int W = decltype(width)::value;
        float x[W], y[W];
        load_vec<W, CacheHint::Streaming>(inp + i, x);
#pragma unroll
        for (int k = 0; k < W; ++k) y[k] = gelu(x[k]);
        store_vec<W>(out + i, y);
    });
}

/// dinp = dout · gelu'(inp)  (overwrites dinp)
template <typename T>
__device__ void gelu_backward(T* dinp, const T* inp, const T* dout, long long n) {
    grid_stride_packed<T>(n, all_aligned16(dinp, inp, dout), [&](auto width, long long i) {
        constexpr int W = decltype(width)::value;
        float x[W], dy[W], dx[W];
        load_vec<W, CacheHint::Streaming>(inp + i, x);
        load_vec<W, CacheHint::Streaming>(dout + i, dy);
#pragma unroll
        for (int k = 0; k < W; ++k) dx[k] = dy[k] * gelu_grad(x[k]);
        store_vec<W>(dinp + i, dx);
    });
}

// ---- residual and in-place add --------------------------------------------------------------------------
/// out = a + b
template <typename T>
__device__ void residual_forward(T* out, const T* a, const T* b, long long n) {
    grid_stride_packed<T>(n, all_aligned16(out, a, b), [&](auto width, long long i) {
        constexpr int W = decltype(width)::value;
        float x[W], y[W];
        load_vec<W, CacheHint::Streaming>(a + i, x);
        load_vec<W, CacheHint::Streaming>(b + i, y);
#pragma unroll
        for (int k = 0; k < W; ++k) x[k] += y[k];
        store_vec<W>(out + i, x);
    });
}

/// dst += src
template <typename T>
__device__ void add_inplace(T* dst, const T* src, long long n) {
    grid_stride_packed<T>(n, all_aligned16(dst, src), [&](auto width, long long i) {
        constexpr int W = decltype(width)::value;
        float x[W], y[W];
        load_vec<W>(dst + i, x);
        load_vec<W, CacheHint::Streaming>(src + i, y);
#pragma unroll
        for (int k = 0; k < W; ++k) x[k] += y[k];
        store_vec<W>(dst + i, x);
    });
}

/// buf *= s
template <typename T>
__device__ void scale(T* buf, float s, long long n) {
    grid_stride_packed<T>(n, aligned16(buf), [&](auto width, long long i) {
        constexpr int W = decltype(width)::value;
        float x[W];
        load_vec<W>(buf + i, x);
#pragma unroll
        for (int k = 0; k < W; ++k) x[k] *= s;
        store_vec<W>(buf + i, x);
    });
}

// ---- instantiations -------------------------------------------------------------------------------------
#define POINTWISE_KERNELS(T, suffix)                                                                         \
    extern "C" __global__ void gelu_forward_##suffix(T* out, const T* inp, long long n) {                    \
        gelu_forward<T>(out, inp, n);                                                                        \
    }                                                                                                        \
    EMU_REGISTER(gelu_forward_##suffix)                                                                      \
    extern "C" __global__ void gelu_backward_##suffix(T* dinp, const T* inp, const T* dout, long long n) {   \
        gelu_backward<T>(dinp, inp, dout, n);                                                                \
    }                                                                                                        \
    EMU_REGISTER(gelu_backward_##suffix)                                                                     \
    extern "C" __global__ void residual_forward_##suffix(T* out, const T* a, const T* b, long long n) {      \
        residual_forward<T>(out, a, b, n);                                                                   \
    }                                                                                                        \
    EMU_REGISTER(residual_forward_##suffix)                                                                  \
    extern "C" __global__ void add_inplace_##suffix(T* dst, const T* src, long long n) {                     \
        add_inplace<T>(dst, src, n);                                                                         \
    }                                                                                                        \
    EMU_REGISTER(add_inplace_##suffix)                                                                       \
    extern "C" __global__ void scale_##suffix(T* buf, float s, long long n) { scale<T>(buf, s, n); }         \
    EMU_REGISTER(scale_##suffix)

POINTWISE_KERNELS(float, f32)
POINTWISE_KERNELS(bf16, bf16)

// ---- storage conversions ----------------------------------------------------------------------------------
// Packs of 8 (one 128-bit bf16 access, two f32 ones); the host's grid (backend.rs) has a thread per
// element, more than the packs need: the spare threads find no pack and leave.
/// out = bf16(in), round to nearest even.
extern "C" __global__ void convert_f32_to_bf16(bf16* out, const float* in, long long n) {
    grid_stride_packed<bf16>(n, all_aligned16(out, in), [&](auto width, long long i) {
        constexpr int W = decltype(width)::value;
        float x[W];
        load_vec<W, CacheHint::Streaming>(in + i, x);
        store_vec<W>(out + i, x);
    });
}
EMU_REGISTER(convert_f32_to_bf16)

/// out = f32(in), exact.
extern "C" __global__ void convert_bf16_to_f32(float* out, const bf16* in, long long n) {
    grid_stride_packed<bf16>(n, all_aligned16(out, in), [&](auto width, long long i) {
        constexpr int W = decltype(width)::value;
        float x[W];
        load_vec<W, CacheHint::Streaming>(in + i, x);
        store_vec<W>(out + i, x);
    });
}
EMU_REGISTER(convert_bf16_to_f32)
