// kernels/attention.cu — causal self-attention over a packed batch, multi-head or grouped-query, forward
// and backward, tiled in the manner of FlashAttention-2 (portable CUDA: no tensor-core instructions, no
// inline PTX).
//
// qkv [n, width] holds per token [q: n_head·hd | k: n_kv_head·hd | v: n_kv_head·hd] (QkvLayout in
// src/backend/ops/attention.rs; GPT-2's `c_attn` output [n, 3c] when n_kv_head = n_head). Query head h
// attends through key/value head g = h / (n_head / n_kv_head) (HF `repeat_kv`). Token t of sequence s
// (cu_seqlens[s] ≤ t < cu_seqlens[s+1]) attends to the tokens of its own sequence up to itself, the last
// `window` of them under a sliding window (window_sees, attention.cuh; INT_MAX: no window), per query head
// h (q_t of head h, k_j and v_j of head g):
//
//     S_tj = scale · q_t·k_j   (j in s, j ≤ t, t − j < window, scale = 1/√hd)     lse_t = log Σ_j exp S_tj
//     P_tj = exp(S_tj − lse_t)                                   out_t = Σ_j P_tj v_j
//
// out is [n, n_head·hd]. The forward saves only lse [n, n_head] (f32), as flash attention does; the
// backward recomputes P:
//
//     D_t = dout_t·out_t          dS_tj = P_tj·(dout_t·v_j − D_t)
//     dq_t = scale Σ_j dS_tj k_j   dk_j = scale Σ_h Σ_t dS_tj q_t   dv_j = Σ_h Σ_t P_tj dout_t
//
// (the sums over h: the query heads of key/value head g, in order).
//
// CPU twin: src/backend/cpu/attention.rs (`attention_forward`, `attention_backward`; the CPU keeps P
// instead of lse). Host side: src/backend/cuda/ops/attention.rs (`AttentionPlan`), which runs these kernels
// for f32 and for head dims other than 64 and 128, and the tensor-core ones of kernels/attention_mma.cu
// (same arguments, same saved lse and delta) for bf16 at head dims 64 and 128.
//
// Tiling. Each kernel is instantiated per storage type T (f32, bf16; all math in f32) and per head-dim
// bound HD_MAX ∈ {ATTN_HD_MAX_SMALL, ATTN_HD_MAX_LARGE} = {64, 128} (kernel names
// `attention_<op>_hd<HD_MAX>_<T>`; the host picks the smallest HD_MAX ≥ hd). A block has ATTN_THREADS = 256
// threads; a "row" (one query or one key of the tile) is owned by a group of G = HD_MAX/16 consecutive
// lanes, each lane holding ATTN_DIMS_PER_LANE = 16 of the row's channels in registers (channels
// 4·(g + G·i) .. +3 for i < 4, lane g of the group), so a tile has TILE = 256/G rows: 64 for HD_MAX = 64,
// 32 for HD_MAX = 128. Channels hd ≤ d < HD_MAX are zeros (registers and shared
// tiles), so the dot products need no bounds tests. A dot product is 16 FMAs per lane and a butterfly
// shuffle over the group's G lanes (every lane of the group gets the bit-identical sum). Tiles are
// aligned to the start of their sequence; query tile i and key tile j of a sequence interact only for
// j ≤ i (causal) and, under a window, when some query of tile i sees some key of tile j (the other tiles
// are skipped); on the diagonal a warp skips the keys (queries) past (before) all of its rows.
//
// Launch shape: grid (heads, num_seqs, ceil(max_seqlen / TILE)), block 256, heads = n_head for the forward
// and dq, n_kv_head for dkdv. Block (h, s, z) handles tile z of sequence s (reversed, z' = gridDim.z−1−z,
// in the forward and dq, so that the long rows start first) and returns at once when the sequence is
// shorter; no tile table is needed.
//   - attention_forward: one query tile; loops over key tiles 0..tile, staging K and V (f32) in shared
//     memory, with an online softmax in f32 over chunks of 16 keys (running max m, sum l, output o in
//     registers); writes out = o/l and lse = m + log l.
//   - attention_backward_dq: one query tile; D_t = dout_t·out_t (written to `delta`), then loops over key
//     tiles 0..tile (K and V in shared memory) accumulating dq in registers.
//   - attention_backward_dkdv: one key tile of one key/value head; for each query head of its group in
//     order, loops over query tiles tile..last, staging q, dout (f32), lse and D in shared memory,
//     accumulating dk and dv in registers (so a group's sum has a fixed order, and with n_kv_head =
//     n_head it is the multi-head kernel, bit for bit; with groups of G query heads it has G times fewer
//     blocks, each G times longer). Runs after dq (it reads `delta`).
// Every element of out, lse, delta and dqkv is written by exactly one thread, no atomics: deterministic.
// Any head dim up to ATTN_HD_MAX_LARGE works (the host refuses larger ones).
//
// Static shared memory: forward and dq two [TILE][HD_MAX] f32 tiles = 32 KiB for both HD_MAX; dkdv the
// same plus 2·TILE floats (≤ 32.5 KiB). All under the 48 KiB static limit; no dynamic shared memory.
//
// Registers: each lane keeps 16 channels per row vector — forward q, o and 16 chunk scores; dq q, dout,
// dq; dkdv k, v, dk, dv. `__launch_bounds__(256, 2)` caps them at 128 so that two blocks (16 warps) fit
// an SM. ptxas (CUDA 13.0, -v): forward 118/126 registers (sm_80/sm_90), dq 117/122, dkdv 128/128; no
// spills except dkdv on sm_90 at hd128 (4 bytes).
//
// Verified only on the emulated device (tests/ops/attention.rs against the CPU backend, both precisions,
// both HD_MAX, multi-head and grouped-query); it compiles with nvcc for sm_80/sm_90 but has not yet been
// run or timed on a real GPU.
#include "attention.cuh"

/// Threads per block of every attention kernel.
#define ATTN_THREADS 256  // @rust
/// Channels of a row held by one lane (four float4).
#define ATTN_DIMS_PER_LANE 16  // @rust
/// The smaller head-dim bound HD_MAX the kernels are instantiated for.
#define ATTN_HD_MAX_SMALL 64  // @rust
/// The larger head-dim bound HD_MAX the kernels are instantiated for: the largest head dim they take.
#define ATTN_HD_MAX_LARGE 128  // @rust
/// Keys per step of the forward's online softmax.
#define ATTN_CHUNK 16

/// The tile geometry of head-dim bound HD_MAX (a multiple of 16, at most 16·32).
template <int HD_MAX>
struct AttnTile {
    static constexpr int G = HD_MAX / ATTN_DIMS_PER_LANE;  // lanes per row
    static constexpr int ROWS = ATTN_THREADS / G;           // rows per tile
    static constexpr int ROWS_PER_WARP = 32 / G;
    static_assert(HD_MAX % ATTN_DIMS_PER_LANE == 0 && 32 % G == 0, "HD_MAX must be 16·2^k, at most 512");
    static_assert(ROWS % ATTN_CHUNK == 0, "tile rows must be a multiple of the softmax chunk");
};


__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

/// The channel of register slot r (0..15) of lane g in a group of G lanes.
template <int G>
__device__ __forceinline__ int lane_dim(int g, int r) {
    return 4 * (g + G * (r / 4)) + r % 4;
}

/// Sum over the G lanes of a row group (aligned groups of consecutive lanes); every lane of the
/// group gets the same bits. The whole warp must call it.
template <int G>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int offset = 1; offset < G; offset <<= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

/// The lane's part of a·row: a holds the lane's 16 channels, row is a shared-memory row of HD_MAX floats.
template <int G>
__device__ __forceinline__ float lane_dot(const float (&a)[ATTN_DIMS_PER_LANE], const float* row, int g) {
    float acc = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float4 b = *reinterpret_cast<const float4*>(row + 4 * (g + G * i));
        acc += a[4 * i] * b.x + a[4 * i + 1] * b.y + a[4 * i + 2] * b.z + a[4 * i + 3] * b.w;
    }
    return acc;
}

/// acc += w · row over the lane's 16 channels (row in shared memory).
template <int G>
__device__ __forceinline__ void lane_axpy(float (&acc)[ATTN_DIMS_PER_LANE], float w, const float* row, int g) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float4 b = *reinterpret_cast<const float4*>(row + 4 * (g + G * i));
        acc[4 * i] += w * b.x;
        acc[4 * i + 1] += w * b.y;
        acc[4 * i + 2] += w * b.z;
        acc[4 * i + 3] += w * b.w;
    }
}

/// Loads the lane's 16 channels of a global row (zeros past hd), times `mul`.
template <typename T, int G>
__device__ __forceinline__ void load_row(float (&dst)[ATTN_DIMS_PER_LANE], const T* row, int hd, int g, float mul) {
#pragma unroll
    for (int r = 0; r < ATTN_DIMS_PER_LANE; ++r) {
        const int d = lane_dim<G>(g, r);
        dst[r] = d < hd ? mul * to_float(row[d]) : 0.0f;
    }
}

/// Stores the lane's channels below hd of a row, times `mul`.
template <typename T, int G>
__device__ __forceinline__ void store_row(T* row, const float (&src)[ATTN_DIMS_PER_LANE], int hd, int g, float mul) {
#pragma unroll
    for (int r = 0; r < ATTN_DIMS_PER_LANE; ++r) {
        const int d = lane_dim<G>(g, r);
        if (d < hd) row[d] = from_float<T>(mul * src[r]);
    }
}

/// Stages `rows` consecutive global rows (stride `stride`, hd channels each) into a [ROWS][HD_MAX] f32
/// shared tile, zero past hd and past `rows`. Coalesced: consecutive threads read consecutive channels.
/// No barrier inside; every thread runs the same trip count.
template <typename T, int HD_MAX>
__device__ __forceinline__ void stage_tile(float* tile, const T* src, long long stride, int rows, int hd) {
    constexpr int ROWS = AttnTile<HD_MAX>::ROWS;
    for (int e = threadIdx.x; e < ROWS * HD_MAX; e += ATTN_THREADS) {
        const int r = e / HD_MAX, d = e % HD_MAX;
        tile[e] = (r < rows && d < hd) ? to_float(src[r * stride + d]) : 0.0f;
    }
}

template <typename T, int HD_MAX>
__device__ void attention_forward(T* out, float* lse, const T* qkv, const int* cu_seqlens, QkvColumns cols,
                                  int window) {
    constexpr int G = AttnTile<HD_MAX>::G, ROWS = AttnTile<HD_MAX>::ROWS;
    __shared__ __align__(16) float k_tile[ROWS * HD_MAX];
    __shared__ __align__(16) float v_tile[ROWS * HD_MAX];

    const int h = blockIdx.x, s = blockIdx.y, tile = gridDim.z - 1 - blockIdx.z;
    const int start = cu_seqlens[s], len = cu_seqlens[s + 1] - start;
    if (tile * ROWS >= len) return;  // the whole block: before any barrier
    const int hd = cols.hd, kv = cols.kv_head_of(h);
    const float scale = 1.0f / sqrtf((float)hd);
    const long long width = cols.width();
    const int g = threadIdx.x % G, row = threadIdx.x / G;
    const int i = tile * ROWS + row;  // the query, relative to the sequence start
    // Rows past the sequence compute on the last row's query (finite values) and store nothing.
    const int q_row = imin(i, len - 1);
    // The warp's last query: keys past it are masked for every row of the warp.
    const int warp_last = tile * ROWS + (threadIdx.x / 32 + 1) * AttnTile<HD_MAX>::ROWS_PER_WARP - 1;

    float q[ATTN_DIMS_PER_LANE], o[ATTN_DIMS_PER_LANE];
    load_row<T, G>(q, qkv + (start + q_row) * width + cols.q(h), hd, g, scale);  // q pre-scaled: S = q·k
#pragma unroll
    for (int r = 0; r < ATTN_DIMS_PER_LANE; ++r) o[r] = 0.0f;
    float m = -INFINITY, l = 0.0f;  // running max and sum of exp(S − m)

    for (int kt = window_first_key(tile * ROWS, window) / ROWS; kt <= tile; ++kt) {
        const int key0 = kt * ROWS;
        __syncthreads();  // the previous tile's readers are done
        const T* key_row = qkv + (start + key0) * width;
        stage_tile<T, HD_MAX>(k_tile, key_row + cols.k(kv), width, imin(ROWS, len - key0), hd);
        stage_tile<T, HD_MAX>(v_tile, key_row + cols.v(kv), width, imin(ROWS, len - key0), hd);
        __syncthreads();
        const int keys = kt == tile ? warp_last - key0 + 1 : ROWS;  // warp-uniform, ≤ ROWS
        for (int j0 = 0; j0 < keys; j0 += ATTN_CHUNK) {
            float sc[ATTN_CHUNK];
            float chunk_max = -INFINITY;
#pragma unroll
            for (int kk = 0; kk < ATTN_CHUNK; ++kk) {
                float v = group_sum<G>(lane_dot<G>(q, k_tile + (j0 + kk) * HD_MAX, g));
                if (!window_sees(i, key0 + j0 + kk, window)) v = -INFINITY;
                sc[kk] = v;
                chunk_max = fmaxf(chunk_max, v);
            }
            // Without a window key 0 is never masked and comes first, so m_new is finite from the first
            // chunk on; under a window a row's first chunks may be wholly masked (m_new = −∞, every
            // exp then taken against 0 gives 0).
            const float m_new = fmaxf(m, chunk_max);
            const float m_ref = m_new == -INFINITY ? 0.0f : m_new;
            const float alpha = expf(m - m_ref);  // 0 on the first live chunk (m = −∞)
            l *= alpha;
#pragma unroll
            for (int r = 0; r < ATTN_DIMS_PER_LANE; ++r) o[r] *= alpha;
#pragma unroll
            for (int kk = 0; kk < ATTN_CHUNK; ++kk) {
                const float p = expf(sc[kk] - m_ref);
                l += p;
                lane_axpy<G>(o, p, v_tile + (j0 + kk) * HD_MAX, g);
            }
            m = m_new;
        }
    }
    if (i < len) {
        const long long t = start + i;
        store_row<T, G>(out + t * cols.q_width() + cols.q(h), o, hd, g, 1.0f / l);
        if (g == 0) lse[t * cols.n_head + h] = m + logf(l);
    }
}

template <typename T, int HD_MAX>
__device__ void attention_backward_dq(T* dqkv, float* delta, const T* dout, const T* qkv, const T* out,
                                      const float* lse, const int* cu_seqlens, QkvColumns cols, int window) {
    constexpr int G = AttnTile<HD_MAX>::G, ROWS = AttnTile<HD_MAX>::ROWS;
    __shared__ __align__(16) float k_tile[ROWS * HD_MAX];
    __shared__ __align__(16) float v_tile[ROWS * HD_MAX];

    const int h = blockIdx.x, s = blockIdx.y, tile = gridDim.z - 1 - blockIdx.z;
    const int start = cu_seqlens[s], len = cu_seqlens[s + 1] - start;
    if (tile * ROWS >= len) return;
    const int hd = cols.hd, kv = cols.kv_head_of(h), n_head = cols.n_head;
    const float scale = 1.0f / sqrtf((float)hd);
    const long long width = cols.width(), q_width = cols.q_width();
    const int g = threadIdx.x % G, row = threadIdx.x / G;
    const int i = tile * ROWS + row;
    const long long t = start + imin(i, len - 1);  // rows past the sequence: finite values, no stores
    const int warp_last = tile * ROWS + (threadIdx.x / 32 + 1) * AttnTile<HD_MAX>::ROWS_PER_WARP - 1;

    float q[ATTN_DIMS_PER_LANE], dy[ATTN_DIMS_PER_LANE], dq[ATTN_DIMS_PER_LANE];
    load_row<T, G>(q, qkv + t * width + cols.q(h), hd, g, scale);
    load_row<T, G>(dy, dout + t * q_width + cols.q(h), hd, g, 1.0f);
    float dot = 0.0f;
#pragma unroll
    for (int r = 0; r < ATTN_DIMS_PER_LANE; ++r) {
        const int d = lane_dim<G>(g, r);
        if (d < hd) dot += dy[r] * to_float(out[t * q_width + cols.q(h) + d]);
        dq[r] = 0.0f;
    }
    const float dt = group_sum<G>(dot);  // D_t = dout_t·out_t = Σ_j P_tj (dout_t·v_j)
    const float l = lse[t * n_head + h];

    for (int kt = window_first_key(tile * ROWS, window) / ROWS; kt <= tile; ++kt) {
        const int key0 = kt * ROWS;
        __syncthreads();
        const T* key_row = qkv + (start + key0) * width;
        stage_tile<T, HD_MAX>(k_tile, key_row + cols.k(kv), width, imin(ROWS, len - key0), hd);
        stage_tile<T, HD_MAX>(v_tile, key_row + cols.v(kv), width, imin(ROWS, len - key0), hd);
        __syncthreads();
        const int keys = kt == tile ? warp_last - key0 + 1 : ROWS;
#pragma unroll 2
        for (int j = 0; j < keys; ++j) {
            const float sc = group_sum<G>(lane_dot<G>(q, k_tile + j * HD_MAX, g));
            const float dp = group_sum<G>(lane_dot<G>(dy, v_tile + j * HD_MAX, g));
            const float p = window_sees(i, key0 + j, window) ? expf(sc - l) : 0.0f;
            lane_axpy<G>(dq, p * (dp - dt), k_tile + j * HD_MAX, g);
        }
    }
    if (i < len) {
        store_row<T, G>(dqkv + t * width + cols.q(h), dq, hd, g, scale);
        if (g == 0) delta[t * n_head + h] = dt;
    }
}

template <typename T, int HD_MAX>
__device__ void attention_backward_dkdv(T* dqkv, const T* dout, const T* qkv, const float* lse, const float* delta,
                                        const int* cu_seqlens, QkvColumns cols, int window) {
    constexpr int G = AttnTile<HD_MAX>::G, ROWS = AttnTile<HD_MAX>::ROWS;
    __shared__ __align__(16) float q_tile[ROWS * HD_MAX];
    __shared__ __align__(16) float dy_tile[ROWS * HD_MAX];
    __shared__ float lse_tile[ROWS];
    __shared__ float delta_tile[ROWS];

    const int kv = blockIdx.x, s = blockIdx.y, tile = blockIdx.z;  // small key tiles see the most queries
    const int start = cu_seqlens[s], len = cu_seqlens[s + 1] - start;
    if (tile * ROWS >= len) return;
    const int hd = cols.hd, n_head = cols.n_head, group = n_head / cols.n_kv_head;
    const float scale = 1.0f / sqrtf((float)hd);
    const long long width = cols.width(), q_width = cols.q_width();
    const int g = threadIdx.x % G, row = threadIdx.x / G;
    const int j = tile * ROWS + row;  // the key, relative to the sequence start
    const long long t = start + imin(j, len - 1);
    // The warp's first key: queries before it are masked for every row of the warp.
    const int warp_first = tile * ROWS + (threadIdx.x / 32) * AttnTile<HD_MAX>::ROWS_PER_WARP;

    float k[ATTN_DIMS_PER_LANE], v[ATTN_DIMS_PER_LANE], dk[ATTN_DIMS_PER_LANE], dv[ATTN_DIMS_PER_LANE];
    load_row<T, G>(k, qkv + t * width + cols.k(kv), hd, g, scale);  // k pre-scaled: S = q·k
    load_row<T, G>(v, qkv + t * width + cols.v(kv), hd, g, 1.0f);
#pragma unroll
    for (int r = 0; r < ATTN_DIMS_PER_LANE; ++r) dk[r] = dv[r] = 0.0f;

    // The query tiles up to the last query that sees the tile's last key.
    const int tiles = (int)ceil_div(window_query_end(imin(tile * ROWS + ROWS, len) - 1, window, len), ROWS);
    // The group's query heads one after another: their sum over h has the same order every run.
    for (int h = kv * group; h < (kv + 1) * group; ++h) {
        for (int qt = tile; qt < tiles; ++qt) {
            const int q0 = qt * ROWS, rows = imin(ROWS, len - q0);
            __syncthreads();
            stage_tile<T, HD_MAX>(q_tile, qkv + (start + q0) * width + cols.q(h), width, rows, hd);
            stage_tile<T, HD_MAX>(dy_tile, dout + (start + q0) * q_width + cols.q(h), q_width, rows, hd);
            if (threadIdx.x < ROWS) {
                const bool in = (int)threadIdx.x < rows;
                const long long at = (long long)(start + q0 + threadIdx.x) * n_head + h;
                lse_tile[threadIdx.x] = in ? lse[at] : 0.0f;
                delta_tile[threadIdx.x] = in ? delta[at] : 0.0f;
            }
            __syncthreads();
            const int first = qt == tile ? warp_first - q0 : 0;  // warp-uniform
#pragma unroll 1
            for (int r = first; r < rows; ++r) {
                const float sc = group_sum<G>(lane_dot<G>(k, q_tile + r * HD_MAX, g));
                const float dp = group_sum<G>(lane_dot<G>(v, dy_tile + r * HD_MAX, g));
                const float p = window_sees(q0 + r, j, window) ? expf(sc - lse_tile[r]) : 0.0f;
                lane_axpy<G>(dv, p, dy_tile + r * HD_MAX, g);
                lane_axpy<G>(dk, p * (dp - delta_tile[r]), q_tile + r * HD_MAX, g);
            }
        }
    }
    if (j < len) {
        store_row<T, G>(dqkv + t * width + cols.k(kv), dk, hd, g, scale);
        store_row<T, G>(dqkv + t * width + cols.v(kv), dv, hd, g, 1.0f);
    }
}

// HD is expanded (ATTN_HD_MAX_SMALL → 64) before ATTENTION_KERNELS_ pastes it into the kernel names.
#define ATTENTION_KERNELS(T, HD, suffix) ATTENTION_KERNELS_(T, HD, suffix)
#define ATTENTION_KERNELS_(T, HD, suffix)                                                                     \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS, 2)                                               \
        attention_forward_hd##HD##_##suffix(T* out, float* lse, const T* qkv, const int* cu_seqlens,         \
                                            int n_head, int n_kv_head, int head_dim, int window) {            \
        attention_forward<T, HD>(out, lse, qkv, cu_seqlens, QkvColumns{n_head, n_kv_head, head_dim}, window); \
    }                                                                                                         \
    EMU_REGISTER(attention_forward_hd##HD##_##suffix)                                                         \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS, 2)                                               \
        attention_backward_dq_hd##HD##_##suffix(T* dqkv, float* delta, const T* dout, const T* qkv,          \
                                                const T* out, const float* lse, const int* cu_seqlens,        \
                                                int n_head, int n_kv_head, int head_dim, int window) {        \
        attention_backward_dq<T, HD>(dqkv, delta, dout, qkv, out, lse, cu_seqlens,                            \
                                     QkvColumns{n_head, n_kv_head, head_dim}, window);                        \
    }                                                                                                         \
    EMU_REGISTER(attention_backward_dq_hd##HD##_##suffix)                                                     \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS, 2)                                               \
        attention_backward_dkdv_hd##HD##_##suffix(T* dqkv, const T* dout, const T* qkv, const float* lse,    \
                                                  const float* delta, const int* cu_seqlens, int n_head,      \
                                                  int n_kv_head, int head_dim, int window) {                  \
        attention_backward_dkdv<T, HD>(dqkv, dout, qkv, lse, delta, cu_seqlens,                               \
                                       QkvColumns{n_head, n_kv_head, head_dim}, window);                      \
    }                                                                                                         \
    EMU_REGISTER(attention_backward_dkdv_hd##HD##_##suffix)

ATTENTION_KERNELS(float, ATTN_HD_MAX_SMALL, f32)
ATTENTION_KERNELS(bf16, ATTN_HD_MAX_SMALL, bf16)
ATTENTION_KERNELS(float, ATTN_HD_MAX_LARGE, f32)
ATTENTION_KERNELS(bf16, ATTN_HD_MAX_LARGE, bf16)
