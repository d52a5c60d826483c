// kernels/emu/emu.h — the CUDA C++ that kernels/*.cu see when they are built for the emulated device
// (g++ on the CPU) instead of nvcc. Kernels never include this file: common.cuh does.
//
// How a kernel file becomes emulated code (build.rs generates one wrapper per .cu):
//
//     #define EMU_UNIT_NAME "optimizer"
//     #define EMU_SHARED_SECTION "emu_shared_optimizer"
//     #include "emu/emu.h"                    // everything outside the anonymous namespace
//     namespace {                             // per-file linkage, like nvcc without -rdc
//     void emu_unit_shared_bounds(char** begin, char** end) { /* the unit's section */ }
//     #include "kernels/optimizer.cu"
//     }
//     extern "C" void emu_unit_optimizer(void) {} // pulls the object out of the archive
//
// - The threads of a block are fibers (runtime.cpp); `__syncthreads` and the warp intrinsics switch.
// - `__shared__` variables become function-local statics placed in the unit's linker section
//   (`emu_shared_<file>`); blocks run one after another (launches hold a global lock) and the runtime
//   fills the launched kernel's section with 0xFF bytes (NaN for every float type, -1 for integers)
//   before each block, so a read of shared memory that no thread of the block wrote shows up as NaN.
//   The anonymous namespace keeps every such static out of COMDAT groups, which GCC will not mix with
//   plain statics in one section.
// - Dynamic shared memory: `dynamic_smem<T>()` from common.cuh (never `extern __shared__`).
// - Shared-memory races: each kernel file is built a second time with `-fsanitize=thread`, so that
//   every load and store calls a hook of the race detector (racecheck.h, racecheck.cpp); while the
//   detector is on, launches run that copy, and an access to a shared-memory word that another thread
//   of the block wrote (or read, for a write) with no barrier between (inside one warp: no
//   `__syncwarp` or warp collective) fails the launch. Kernels need no annotation.
// - The test mode (runtime.cpp, `emu_set_schedule`) runs blocks, warps and lanes in a seeded random
//   order instead of index order.
// - System headers must come from here: the kernel file is included inside a namespace.
#ifndef SAFEDPO_EMU_H
#define SAFEDPO_EMU_H

#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

/// Defined when the kernels are compiled for the emulated device; guard GPU-only code (inline PTX,
/// tensor-core instructions) with `#ifndef EMU_DEVICE` and keep a portable path beside it.
#define EMU_DEVICE 1

// ---- keywords ------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ __inline__ __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#ifndef EMU_SHARED_SECTION  // build.rs defines it per kernel file
#define EMU_SHARED_SECTION "emu_shared"
#endif
#define __shared__ __attribute__((section(EMU_SHARED_SECTION))) static

// ---- the runtime (kernels/emu/runtime.cpp) -------------------------------------------------------
extern "C" {
/// `__syncthreads` and its counting variants. kind: 0 plain, 1 count, 2 and, 3 or.
/// `file`/`line` name the call site in the source: a barrier is identified by where it stands in the
/// kernel source, not by its machine address, since the compiler may duplicate one call (tail copies).
int emu_syncthreads(int kind, int predicate, const char* file, int line);
/// One warp-synchronous operation (see EmuWarpOp); the lanes of `mask` meet here.
uint64_t emu_warp_op(int kind, unsigned mask, uint64_t value, int param, int width);
/// Mask of the lanes of the caller's warp that have not exited.
unsigned emu_active_mask(void);
/// The block's dynamic shared memory (NaN-filled at block start), or null when the launch gave none.
void* emu_dynamic_smem(void);
/// Stops the launch with an error that names the kernel, block and thread.
[[noreturn]] void emu_fail(const char* what);
[[noreturn]] void emu_assert_fail(const char* expr, const char* file, int line);
/// A monotonic nanosecond counter standing in for the SM clock.
long long emu_clock64(void);
}

enum EmuWarpOp {
    EMU_SHFL_IDX,
    EMU_SHFL_UP,
    EMU_SHFL_DOWN,
    EMU_SHFL_XOR,
    EMU_BALLOT,
    EMU_ANY,
    EMU_ALL,
    EMU_SYNCWARP,
    EMU_REDUCE_ADD,
    EMU_REDUCE_MIN_U32,
    EMU_REDUCE_MAX_U32,
    EMU_REDUCE_MIN_I32,
    EMU_REDUCE_MAX_I32,
    EMU_REDUCE_AND,
    EMU_REDUCE_OR,
    EMU_REDUCE_XOR,
};

#undef assert
#define assert(e) ((e) ? (void)0 : emu_assert_fail(#e, __FILE__, __LINE__))

// ---- built-in variables and vector types ---------------------------------------------------------
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
/// Set by the runtime before each thread (fiber) resumes; blocks run one at a time.
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

#define EMU_VEC2(T, N, A)                                                                                  \
    struct __attribute__((aligned(A))) N##2 {                                                              \
        T x, y;                                                                                            \
    };                                                                                                     \
    inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }
#define EMU_VEC3(T, N)                                                                                     \
    struct N##3 {                                                                                          \
        T x, y, z;                                                                                         \
    };                                                                                                     \
    inline N##3 make_##N##3(T x, T y, T z) { return N##3{x, y, z}; }
#define EMU_VEC4(T, N, A)                                                                                  \
    struct __attribute__((aligned(A))) N##4 {                                                              \
        T x, y, z, w;                                                                                      \
    };                                                                                                     \
    inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }
EMU_VEC2(float, float, 8)
EMU_VEC3(float, float)
EMU_VEC4(float, float, 16)
EMU_VEC2(int, int, 8)
EMU_VEC3(int, int)
EMU_VEC4(int, int, 16)
EMU_VEC2(unsigned int, uint, 8)
EMU_VEC4(unsigned int, uint, 16)
EMU_VEC2(double, double, 16)
EMU_VEC2(long long, longlong, 16)
EMU_VEC2(unsigned long long, ulonglong, 16)
EMU_VEC2(short, short, 4)
EMU_VEC4(short, short, 8)
EMU_VEC2(unsigned short, ushort, 4)
EMU_VEC4(unsigned short, ushort, 8)
EMU_VEC4(signed char, char, 4)
EMU_VEC4(unsigned char, uchar, 4)
inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return uint3{x, y, z}; }
#undef EMU_VEC2
#undef EMU_VEC3
#undef EMU_VEC4

// ---- bit casts and integer intrinsics ------------------------------------------------------------
template <typename To, typename From>
inline To emu_bit_cast(From v) {
    static_assert(sizeof(To) == sizeof(From), "emu_bit_cast: sizes differ");
    To out;
    std::memcpy(&out, &v, sizeof(To));
    return out;
}
inline int __float_as_int(float x) { return emu_bit_cast<int>(x); }
inline unsigned int __float_as_uint(float x) { return emu_bit_cast<unsigned int>(x); }
inline float __int_as_float(int x) { return emu_bit_cast<float>(x); }
inline float __uint_as_float(unsigned int x) { return emu_bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return emu_bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return emu_bit_cast<double>(x); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    return __builtin_bswap32(x);
}
inline unsigned int __umulhi(unsigned int a, unsigned int b) { return (unsigned int)(((uint64_t)a * b) >> 32); }
inline int __mulhi(int a, int b) { return (int)(((int64_t)a * b) >> 32); }

// ---- min / max: CUDA's overloads in the global namespace (fminf/fmaxf semantics for floats) -----
template <typename A, typename B>
inline typename std::common_type<A, B>::type min(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    if constexpr (std::is_floating_point<C>::value) {
        return std::fmin((C)a, (C)b);
    } else {
        return (C)a < (C)b ? (C)a : (C)b;
    }
}
template <typename A, typename B>
inline typename std::common_type<A, B>::type max(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    if constexpr (std::is_floating_point<C>::value) {
        return std::fmax((C)a, (C)b);
    } else {
        return (C)a < (C)b ? (C)b : (C)a;
    }
}

// ---- float math: libm for the accurate functions; the fast intrinsics follow the GPU's formulas --
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;
inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
inline double normcdf(double x) { return 0.5 * erfc(-x * 0.70710678118654752); }
inline float fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float __expf(float x) { return exp2f(x * 1.4426950408889634f); }
inline float __exp10f(float x) { return exp2f(x * 3.3219280948873622f); }
inline float __logf(float x) { return log2f(x) * 0.6931471805599453f; }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log2f(x) * 0.30102999566398120f; }
inline float __powf(float x, float y) { return exp2f(y * log2f(x)); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) {
    *s = sinf(x);
    *c = cosf(x);
}
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }
inline int __float2int_rn(float x) { return (int)rintf(x); }
inline int __float2int_rz(float x) { return (int)truncf(x); }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline unsigned int __float2uint_rn(float x) { return (unsigned int)rintf(x); }
inline long long __float2ll_rn(float x) { return (long long)rintf(x); }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned int x) { return (float)x; }

// ---- memory access hints: plain loads and stores on the CPU --------------------------------------
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline T __ldca(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldlu(const T* p) { return *p; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stwb(T* p, T v) { *p = v; }
template <typename T> inline void __stwt(T* p, T v) { *p = v; }
// Blocks run one at a time on one OS thread (fibers), so a compiler barrier is the whole fence (and
// ThreadSanitizer, which builds the race-checked copies, rejects atomic_thread_fence).
inline void __threadfence(void) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block(void) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system(void) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __trap(void) { emu_fail("__trap() called"); }
inline void __nanosleep(unsigned int) {}
inline long long clock64(void) { return emu_clock64(); }

// ---- bf16 and fp16: storage types with round-to-nearest-even conversions --------------------------
inline unsigned short emu_f32_to_bf16_rn(float f) {
    uint32_t u = emu_bit_cast<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;  // NaN: CUDA's canonical bf16 NaN
    u += 0x7fffu + ((u >> 16) & 1u);                      // ties to even; overflow rounds to inf
    return (unsigned short)(u >> 16);
}
inline unsigned short emu_f32_to_bf16_rz(float f) {
    uint32_t u = emu_bit_cast<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    return (unsigned short)(u >> 16);
}
inline float emu_bf16_to_f32(unsigned short h) { return emu_bit_cast<float>((uint32_t)h << 16); }
/// double → float rounding to odd, so that a second rounding to bf16/fp16 is correctly rounded.
inline float emu_f64_to_f32_round_odd(double d) {
    float f = (float)d;  // round to nearest
    if (std::isfinite(d) && (double)f != d) {
        uint32_t u = emu_bit_cast<uint32_t>(f);
        // step back toward zero when rounding went away from zero, then force the lowest bit on
        if (std::fabs((double)f) > std::fabs(d)) u -= 1;
        u |= 1u;
        f = emu_bit_cast<float>(u);
    }
    return f;
}
inline unsigned short emu_f32_to_f16_rn(float f) {
    uint32_t x = emu_bit_cast<uint32_t>(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return 0x7fff;                    // NaN: CUDA's canonical fp16 NaN
    if (x >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520 rounds to inf
    if (x < 0x38800000u) {                                  // below 2^-14: fp16 subnormal or zero
        if (x <= 0x33000000u) return (unsigned short)sign;  // <= 2^-25 rounds (ties to even) to 0
        uint32_t e = x >> 23, mant = (x & 0x7fffffu) | 0x800000u, shift = 126 - e;
        uint32_t r = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return (unsigned short)(sign | r);
    }
    uint32_t r = x - 0x38000000u, h = r >> 13, rem = r & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return (unsigned short)(sign | h);
}
inline float emu_f16_to_f32(unsigned short h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return emu_bit_cast<float>(sign | 0x7f800000u | (m << 13));
    if (e == 0) return (m == 0 ? emu_bit_cast<float>(sign) : (sign ? -1.0f : 1.0f) * ldexpf((float)m, -24));
    return emu_bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));
}

struct __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(emu_f32_to_bf16_rn(f)) {}
    __nv_bfloat16(double d) : __x(emu_f32_to_bf16_rn(emu_f64_to_f32_round_odd(d))) {}
    __nv_bfloat16(int v) : __x(emu_f32_to_bf16_rn(emu_f64_to_f32_round_odd((double)v))) {}
    __nv_bfloat16(unsigned int v) : __x(emu_f32_to_bf16_rn(emu_f64_to_f32_round_odd((double)v))) {}
    __nv_bfloat16(long long v) : __x(emu_f32_to_bf16_rn(emu_f64_to_f32_round_odd((double)v))) {}
    __nv_bfloat16(unsigned long long v) : __x(emu_f32_to_bf16_rn(emu_f64_to_f32_round_odd((double)v))) {}
    operator float() const { return emu_bf16_to_f32(__x); }
};
typedef __nv_bfloat16 nv_bfloat16;
struct __attribute__((aligned(4))) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
typedef __nv_bfloat162 nv_bfloat162;

struct __half {
    unsigned short __x;
    __half() = default;
    __half(float f) : __x(emu_f32_to_f16_rn(f)) {}
    __half(double d) : __x(emu_f32_to_f16_rn(emu_f64_to_f32_round_odd(d))) {}
    __half(int v) : __x(emu_f32_to_f16_rn(emu_f64_to_f32_round_odd((double)v))) {}
    operator float() const { return emu_f16_to_f32(__x); }
};
typedef __half half;
struct __attribute__((aligned(4))) __half2 {
    __half x, y;
};
typedef __half2 half2;

inline __nv_bfloat16 emu_bf16_from_bits(unsigned short b) {
    __nv_bfloat16 h;
    h.__x = b;
    return h;
}
inline __half emu_f16_from_bits(unsigned short b) {
    __half h;
    h.__x = b;
    return h;
}
inline __nv_bfloat16 __float2bfloat16(float f) { return emu_bf16_from_bits(emu_f32_to_bf16_rn(f)); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return emu_bf16_from_bits(emu_f32_to_bf16_rn(f)); }
inline __nv_bfloat16 __float2bfloat16_rz(float f) { return emu_bf16_from_bits(emu_f32_to_bf16_rz(f)); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __nv_bfloat16(d); }
inline float __bfloat162float(__nv_bfloat16 h) { return emu_bf16_to_f32(h.__x); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return emu_bf16_from_bits(b); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16(a), __float2bfloat16(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return {__float2bfloat16(v.x), __float2bfloat16(v.y)}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return {a, a}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {__bfloat162float(v.x), __bfloat162float(v.y)}; }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }

inline __half __float2half(float f) { return emu_f16_from_bits(emu_f32_to_f16_rn(f)); }
inline __half __float2half_rn(float f) { return emu_f16_from_bits(emu_f32_to_f16_rn(f)); }
inline float __half2float(__half h) { return emu_f16_to_f32(h.__x); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short b) { return emu_f16_from_bits(b); }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half(a), __float2half(b)}; }
inline __half2 __float22half2_rn(float2 v) { return {__float2half(v.x), __float2half(v.y)}; }
inline float2 __half22float2(__half2 v) { return {__half2float(v.x), __half2float(v.y)}; }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }

// Arithmetic as in cuda_bf16.hpp / cuda_fp16.hpp: computed in float, rounded once to the type.
// Mixed expressions (bf16 * float) are ambiguous there too; convert explicitly.
#define EMU_HALF_OPS(H, FROM)                                                                              \
    inline H operator+(H a, H b) { return FROM((float)a + (float)b); }                                     \
    inline H operator-(H a, H b) { return FROM((float)a - (float)b); }                                     \
    inline H operator*(H a, H b) { return FROM((float)a * (float)b); }                                     \
    inline H operator/(H a, H b) { return FROM((float)a / (float)b); }                                     \
    inline H& operator+=(H& a, H b) { return a = a + b; }                                                  \
    inline H& operator-=(H& a, H b) { return a = a - b; }                                                  \
    inline H& operator*=(H& a, H b) { return a = a * b; }                                                  \
    inline H& operator/=(H& a, H b) { return a = a / b; }                                                  \
    inline H operator-(H a) {                                                                              \
        a.__x ^= 0x8000u;                                                                                  \
        return a;                                                                                          \
    }                                                                                                      \
    inline H operator+(H a) { return a; }                                                                  \
    inline bool operator==(H a, H b) { return (float)a == (float)b; }                                      \
    inline bool operator!=(H a, H b) { return (float)a != (float)b; }                                      \
    inline bool operator<(H a, H b) { return (float)a < (float)b; }                                        \
    inline bool operator<=(H a, H b) { return (float)a <= (float)b; }                                      \
    inline bool operator>(H a, H b) { return (float)a > (float)b; }                                        \
    inline bool operator>=(H a, H b) { return (float)a >= (float)b; }                                      \
    inline H __hadd(H a, H b) { return a + b; }                                                            \
    inline H __hsub(H a, H b) { return a - b; }                                                            \
    inline H __hmul(H a, H b) { return a * b; }                                                            \
    inline H __hdiv(H a, H b) { return a / b; }                                                            \
    inline H __hneg(H a) { return -a; }                                                                    \
    inline H __habs(H a) {                                                                                 \
        a.__x &= 0x7fffu;                                                                                  \
        return a;                                                                                          \
    }                                                                                                      \
    inline H __hfma(H a, H b, H c) { return FROM(fmaf((float)a, (float)b, (float)c)); }                    \
    inline H __hmax(H a, H b) { return FROM(fmaxf((float)a, (float)b)); }                                  \
    inline H __hmin(H a, H b) { return FROM(fminf((float)a, (float)b)); }
EMU_HALF_OPS(__nv_bfloat16, __float2bfloat16)
EMU_HALF_OPS(__half, __float2half)
#undef EMU_HALF_OPS

// ---- atomics: real atomics (blocks run one at a time today, but the semantics hold regardless) ---
#define EMU_INT_ATOMICS(T)                                                                                 \
    inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }                   \
    inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }                   \
    inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }                 \
    inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }                   \
    inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }                     \
    inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }                   \
    inline T atomicCAS(T* p, T expected, T desired) {                                                      \
        __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);     \
        return expected;                                                                                   \
    }                                                                                                      \
    inline T atomicMax(T* p, T v) {                                                                        \
        T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                                      \
        while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) \
            ;                                                                                              \
        return old;                                                                                        \
    }                                                                                                      \
    inline T atomicMin(T* p, T v) {                                                                        \
        T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                                      \
        while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) \
            ;                                                                                              \
        return old;                                                                                        \
    }
EMU_INT_ATOMICS(int)
EMU_INT_ATOMICS(unsigned int)
EMU_INT_ATOMICS(long long)
EMU_INT_ATOMICS(unsigned long long)
#undef EMU_INT_ATOMICS
inline unsigned short atomicCAS(unsigned short* p, unsigned short expected, unsigned short desired) {
    __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return expected;
}
/// `((old >= limit) ? 0 : old + 1)`, as on the GPU.
inline unsigned int atomicInc(unsigned int* p, unsigned int limit) {
    unsigned int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(p, &old, old >= limit ? 0u : old + 1u, true, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED))
        ;
    return old;
}
/// `(old == 0 || old > limit) ? limit : old - 1`, as on the GPU.
inline unsigned int atomicDec(unsigned int* p, unsigned int limit) {
    unsigned int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(p, &old, (old == 0u || old > limit) ? limit : old - 1u, true,
                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
    return old;
}
/// Floating-point atomics: a compare-and-swap loop on the bits; `op` gives the new value.
template <typename F, typename Bits, typename Op>
inline F emu_atomic_float(F* p, Op op) {
    Bits* bp = reinterpret_cast<Bits*>(p);
    Bits old = __atomic_load_n(bp, __ATOMIC_RELAXED);
    for (;;) {
        Bits desired = emu_bit_cast<Bits>(op(emu_bit_cast<F>(old)));
        if (__atomic_compare_exchange_n(bp, &old, desired, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return emu_bit_cast<F>(old);
    }
}
inline float atomicAdd(float* p, float v) {
    return emu_atomic_float<float, uint32_t>(p, [v](float x) { return x + v; });
}
inline double atomicAdd(double* p, double v) {
    return emu_atomic_float<double, uint64_t>(p, [v](double x) { return x + v; });
}
inline float atomicExch(float* p, float v) {
    return emu_bit_cast<float>(__atomic_exchange_n(reinterpret_cast<uint32_t*>(p), emu_bit_cast<uint32_t>(v),
                                                   __ATOMIC_RELAXED));
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* p, __nv_bfloat16 v) {
    return emu_atomic_float<__nv_bfloat16, unsigned short>(p, [v](__nv_bfloat16 x) { return x + v; });
}
inline __half atomicAdd(__half* p, __half v) {
    return emu_atomic_float<__half, unsigned short>(p, [v](__half x) { return x + v; });
}
#define EMU_ATOMIC_ALIASES(name)                                                                           \
    template <typename T, typename... R>                                                                   \
    inline auto name##_block(T* p, R... r) { return name(p, r...); }                                       \
    template <typename T, typename... R>                                                                   \
    inline auto name##_system(T* p, R... r) { return name(p, r...); }
EMU_ATOMIC_ALIASES(atomicAdd)
EMU_ATOMIC_ALIASES(atomicSub)
EMU_ATOMIC_ALIASES(atomicExch)
EMU_ATOMIC_ALIASES(atomicMax)
EMU_ATOMIC_ALIASES(atomicMin)
EMU_ATOMIC_ALIASES(atomicCAS)
#undef EMU_ATOMIC_ALIASES

// ---- barriers and warp intrinsics ----------------------------------------------------------------
__attribute__((always_inline)) inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    emu_syncthreads(0, 0, file, line);
}
__attribute__((always_inline)) inline int __syncthreads_count(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return emu_syncthreads(1, p, file, line);
}
__attribute__((always_inline)) inline int __syncthreads_and(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return emu_syncthreads(2, p, file, line);
}
__attribute__((always_inline)) inline int __syncthreads_or(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return emu_syncthreads(3, p, file, line);
}
__attribute__((always_inline)) inline void __syncwarp(unsigned mask = 0xffffffffu) {
    emu_warp_op(EMU_SYNCWARP, mask, 0, 0, 32);
}
inline unsigned __activemask(void) { return emu_active_mask(); }

template <typename T>
__attribute__((always_inline)) inline T emu_shuffle(int kind, unsigned mask, T var, int param, int width) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                  "warp shuffles move at most 8 bytes of a trivially copyable type");
    uint64_t bits = 0;
    std::memcpy(&bits, &var, sizeof(T));
    bits = emu_warp_op(kind, mask, bits, param, width);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}
template <typename T>
__attribute__((always_inline)) inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
    return emu_shuffle(EMU_SHFL_IDX, mask, var, src_lane, width);
}
template <typename T>
__attribute__((always_inline)) inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return emu_shuffle(EMU_SHFL_UP, mask, var, (int)delta, width);
}
template <typename T>
__attribute__((always_inline)) inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return emu_shuffle(EMU_SHFL_DOWN, mask, var, (int)delta, width);
}
template <typename T>
__attribute__((always_inline)) inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
    return emu_shuffle(EMU_SHFL_XOR, mask, var, lane_mask, width);
}
__attribute__((always_inline)) inline unsigned __ballot_sync(unsigned mask, int pred) {
    return (unsigned)emu_warp_op(EMU_BALLOT, mask, pred != 0, 0, 32);
}
__attribute__((always_inline)) inline int __any_sync(unsigned mask, int pred) {
    return (int)emu_warp_op(EMU_ANY, mask, pred != 0, 0, 32);
}
__attribute__((always_inline)) inline int __all_sync(unsigned mask, int pred) {
    return (int)emu_warp_op(EMU_ALL, mask, pred != 0, 0, 32);
}
__attribute__((always_inline)) inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
    return (unsigned)emu_warp_op(EMU_REDUCE_ADD, mask, v, 0, 32);
}
__attribute__((always_inline)) inline int __reduce_add_sync(unsigned mask, int v) {
    return (int)(unsigned)emu_warp_op(EMU_REDUCE_ADD, mask, (unsigned)v, 0, 32);
}
__attribute__((always_inline)) inline unsigned __reduce_min_sync(unsigned mask, unsigned v) {
    return (unsigned)emu_warp_op(EMU_REDUCE_MIN_U32, mask, v, 0, 32);
}
__attribute__((always_inline)) inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
    return (unsigned)emu_warp_op(EMU_REDUCE_MAX_U32, mask, v, 0, 32);
}
__attribute__((always_inline)) inline int __reduce_min_sync(unsigned mask, int v) {
    return (int)(unsigned)emu_warp_op(EMU_REDUCE_MIN_I32, mask, (unsigned)v, 0, 32);
}
__attribute__((always_inline)) inline int __reduce_max_sync(unsigned mask, int v) {
    return (int)(unsigned)emu_warp_op(EMU_REDUCE_MAX_I32, mask, (unsigned)v, 0, 32);
}
__attribute__((always_inline)) inline unsigned __reduce_and_sync(unsigned mask, unsigned v) {
    return (unsigned)emu_warp_op(EMU_REDUCE_AND, mask, v, 0, 32);
}
__attribute__((always_inline)) inline unsigned __reduce_or_sync(unsigned mask, unsigned v) {
    return (unsigned)emu_warp_op(EMU_REDUCE_OR, mask, v, 0, 32);
}
__attribute__((always_inline)) inline unsigned __reduce_xor_sync(unsigned mask, unsigned v) {
    return (unsigned)emu_warp_op(EMU_REDUCE_XOR, mask, v, 0, 32);
}

// ---- kernel registration: name → trampoline(void** args), with a signature for argument checks ---
namespace emu {
typedef void (*Invoke)(void* fn, void** args);
/// Gives the bounds of a kernel file's `__shared__` section.
typedef void (*SharedBounds)(char** begin, char** end);
/// `checked`: the race-checked copy of the kernel (its file built with -fsanitize=thread).
void register_kernel(const char* name, void* fn, Invoke invoke, const char* signature, const char* unit,
                     SharedBounds shared, bool checked);

/// One character per kernel parameter; the Rust side checks every launch against it:
/// p pointer, f float, d double, i int32, u uint32, l int64, L uint64.
template <typename T>
constexpr char arg_code() {
    typedef typename std::remove_cv<T>::type U;
    static_assert(std::is_pointer<U>::value || std::is_same<U, float>::value || std::is_same<U, double>::value ||
                      ((std::is_integral<U>::value && !std::is_same<U, bool>::value) &&
                       (sizeof(U) == 4 || sizeof(U) == 8)),
                  "kernel parameters must be pointers, float, double, or 32/64-bit integers");
    return std::is_pointer<U>::value          ? 'p'
           : std::is_same<U, float>::value    ? 'f'
           : std::is_same<U, double>::value   ? 'd'
           : sizeof(U) == 4                   ? (std::is_signed<U>::value ? 'i' : 'u')
                                              : (std::is_signed<U>::value ? 'l' : 'L');
}
template <typename... A>
struct Signature {
    static constexpr char value[sizeof...(A) + 1] = {arg_code<A>()..., '\0'};
};
template <typename... A, size_t... I>
inline void call_with(void (*f)(A...), void** args, std::index_sequence<I...>) {
    (void)args;
    f(*static_cast<typename std::remove_cv<A>::type*>(args[I])...);
}
template <typename... A>
void invoke(void* fn, void** args) {
    call_with(reinterpret_cast<void (*)(A...)>(fn), args, std::index_sequence_for<A...>{});
}
struct Registrar {
    template <typename... A>
    Registrar(const char* name, void (*f)(A...), const char* unit, SharedBounds shared) {
#ifdef __SANITIZE_THREAD__
        constexpr bool checked = true;
#else
        constexpr bool checked = false;
#endif
        register_kernel(name, reinterpret_cast<void*>(f), &invoke<A...>, Signature<A...>::value, unit, shared, checked);
    }
};
}  // namespace emu

#ifndef EMU_UNIT_NAME  // build.rs defines it (the .cu file's stem) before including this header
#define EMU_UNIT_NAME "?"
#endif
/// Makes kernel `name` launchable by name on the emulated device (empty under nvcc).
#define EMU_REGISTER(name)                                                                                 \
    static ::emu::Registrar emu_registrar_##name(#name, &name, EMU_UNIT_NAME, &emu_unit_shared_bounds);

#endif  // SAFEDPO_EMU_H
