// kernels/decode_attention.cu — decode attention: one new query row per sequence against that sequence's
// cached keys and values (a decoding step with a KV cache), multi-head or grouped-query, forward only.
//
// qkv [M, width] holds the M new tokens' rows (only their q heads are read); cache [R, width] holds qkv rows
// (QkvColumns, attention.cuh). Query i attends to the cache rows starts[i] .. starts[i] + lens[i] (its own
// row the last), per query head h through key/value head g = h / (n_head / n_kv_head):
//
//     S_j = scale · q_i,h·k_j,g   (scale = 1/√hd)      out_i,h = Σ_j exp(S_j − m) v_j,g / Σ_j exp(S_j − m)
//
// and zeros for an empty span. Under a sliding window (`window`; INT_MAX: none) only the span's last
// `window` rows count: the split kernel skips the older ones (windowed_span in
// src/backend/ops/decode_attention.rs).
//
// CPU twin: src/backend/cpu/decode_attention.rs (`decode_attention_forward`). Host side:
// src/backend/cuda/ops/decode_attention.rs.
//
// Flash-decoding: the span is cut into splits of DECODE_SPLIT_KEYS keys, fixed by this constant and not by
// the device, so the result has the same bits on any GPU and launch.
//   - decode_attention_split: grid (splits, n_head, M), block DECODE_SPLIT_KEYS threads. Block (k, h, i)
//     handles keys k·DECODE_SPLIT_KEYS.. of query i: thread j scores key j (q staged in shared memory,
//     pre-scaled), block max m_k and sum l_k of exp(S − m_k), then thread d sums p_j v_j[d] over the split's
//     keys in order. Writes part_o [M, n_head, splits, hd] and part_ml [M, n_head, splits, 2] = (m_k, l_k)
//     (f32); an empty split writes m = −∞, l = 0 and zeros.
//   - decode_attention_combine: grid (n_head, M), block DECODE_COMBINE_THREADS threads. Every thread
//     forms M = max_k m_k and L = Σ_k exp(m_k − M) l_k over the splits in order, then thread d writes
//     out[d] = Σ_k exp(m_k − M) part_o_k[d] / L (in split order: a fixed combine, no atomics).
// Every output element is written by exactly one thread: deterministic. Head dims up to DECODE_HD_MAX.
// Static shared memory: hd + DECODE_SPLIT_KEYS floats plus the block reductions' 64.
#include "attention.cuh"

/// Keys per split, and threads per block of the split kernel (a multiple of 32).
#define DECODE_SPLIT_KEYS 128  // @rust
/// Threads per block of the combine kernel (a multiple of 32).
#define DECODE_COMBINE_THREADS 128  // @rust
/// The largest head dim the kernels take.
#define DECODE_HD_MAX 256  // @rust

template <typename T>
__device__ void decode_attention_split(float* part_o, float* part_ml, const T* qkv, const T* cache, const int* starts,
                                       const int* lens, int n_head, int n_kv_head, int hd, int splits, int window) {
    __shared__ float q_s[DECODE_HD_MAX];
    __shared__ float p_s[DECODE_SPLIT_KEYS];
    const QkvColumns cols{n_head, n_kv_head, hd};
    const int split = blockIdx.x, h = blockIdx.y, i = blockIdx.z, g = cols.kv_head_of(h);
    const int read = min(lens[i], window), skipped = lens[i] - read;  // the window's rows of the span
    const long long width = cols.width(), start = (long long)starts[i] + skipped;
    const int first = split * DECODE_SPLIT_KEYS;
    const int keys = min(DECODE_SPLIT_KEYS, read - first);
    const long long part = ((long long)i * n_head + h) * splits + split;
    float* o = part_o + part * hd;
    if (keys <= 0) {  // the same for the whole block
        for (int d = threadIdx.x; d < hd; d += blockDim.x) o[d] = 0.0f;
        if (threadIdx.x == 0) {
            part_ml[2 * part] = -INFINITY;
            part_ml[2 * part + 1] = 0.0f;
        }
        return;
    }
    const float scale = rsqrtf((float)hd);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) q_s[d] = to_float(qkv[i * width + cols.q(h) + d]);
    __syncthreads();
    float s = -INFINITY;
    const int j = threadIdx.x;
    if (j < keys) {
        const T* k = cache + (start + first + j) * width + cols.k(g);
        float dot = 0.0f;
        for (int d = 0; d < hd; ++d) dot = fmaf(q_s[d], to_float(k[d]), dot);
        s = scale * dot;
    }
    const float m = block_reduce_max(s);
    const float p = j < keys ? expf(s - m) : 0.0f;
    p_s[j] = p;
    const float l = block_reduce_sum(p);  // its barriers publish p_s
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        const T* v = cache + (start + first) * width + cols.v(g) + d;
        float acc = 0.0f;
        for (int jj = 0; jj < keys; ++jj) acc = fmaf(p_s[jj], to_float(v[jj * width]), acc);
        o[d] = acc;
    }
    if (threadIdx.x == 0) {
        part_ml[2 * part] = m;
        part_ml[2 * part + 1] = l;
    }
}

template <typename T>
__device__ void decode_attention_combine(T* out, const float* part_o, const float* part_ml, int n_head, int hd,
                                         int splits) {
    const int h = blockIdx.x, i = blockIdx.y;
    const long long base = ((long long)i * n_head + h) * splits;
    float m = -INFINITY;
    for (int k = 0; k < splits; ++k) m = fmaxf(m, part_ml[2 * (base + k)]);
    float l = 0.0f;
    for (int k = 0; k < splits; ++k) {
        const float mk = part_ml[2 * (base + k)];
        if (mk > -INFINITY) l += expf(mk - m) * part_ml[2 * (base + k) + 1];
    }
    T* o = out + ((long long)i * n_head + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < splits; ++k) {
            const float mk = part_ml[2 * (base + k)];
            if (mk > -INFINITY) acc += expf(mk - m) * part_o[(base + k) * hd + d];
        }
        o[d] = from_float<T>(l > 0.0f ? acc / l : 0.0f);
    }
}

#define DECODE_ATTENTION_KERNELS(T, suffix)                                                                    \
    extern "C" __global__ void decode_attention_split_##suffix(float* part_o, float* part_ml, const T* qkv,    \
                                                               const T* cache, const int* starts,              \
                                                               const int* lens, int n_head, int n_kv_head,     \
                                                               int hd, int splits, int window) {               \
        decode_attention_split<T>(part_o, part_ml, qkv, cache, starts, lens, n_head, n_kv_head, hd, splits,    \
                                  window);                                                                     \
    }                                                                                                          \
    EMU_REGISTER(decode_attention_split_##suffix)                                                              \
    extern "C" __global__ void decode_attention_combine_##suffix(T* out, const float* part_o,                  \
                                                                 const float* part_ml, int n_head, int hd,     \
                                                                 int splits) {                                 \
        decode_attention_combine<T>(out, part_o, part_ml, n_head, hd, splits);                                 \
    }                                                                                                          \
    EMU_REGISTER(decode_attention_combine_##suffix)

DECODE_ATTENTION_KERNELS(float, f32)
DECODE_ATTENTION_KERNELS(bf16, bf16)
