// kernels/attention_mma.cu — the attention family on tensor cores: causal self-attention over a packed
// batch, multi-head or grouped-query, forward and backward, bf16 storage at head dims 64 and 128, in the
// manner of FlashAttention-2, on the warp-level mma.m16n8k16 and ldmatrix of mma.cuh. The math, the
// qkv layout, the saved log-sum-exp and the launch grids are those of kernels/attention.cu (read its
// header first); the host (src/backend/cuda/ops/attention.rs) picks these kernels for bf16 at head dim
// 64 or 128 and the portable ones otherwise (f32, other head dims).
//
// CPU twin: src/backend/cpu/attention.rs.
//
// Tiling. A block has 4 warps (ATTN_MMA_THREADS = 128) and owns ATTN_MMA_ROWS = 64 rows, 16 per warp
// (the m of mma.m16n8k16): query rows in the forward and dq, key rows in dkdv. The other side is
// streamed through shared memory in tiles of STREAM rows (AttnMmaTile): keys (and values) in the
// forward and dq, queries (and dout, lse, D) in dkdv. Shared tiles are bf16 rows of HD + 8 elements
// (the 16-byte pad puts the eight rows an ldmatrix reads in different banks). Every product is an
// mma with f32 accumulators; each warp keeps its 16 rows' accumulators in registers, in the C
// fragment layout: a lane holds rows g and g+8 (g = lane/4) and columns 2t, 2t+1 (t = lane%4) of
// every 8-column slice.
//   - attention_mma_forward: S = Q·Kᵀ (Q fragments loaded once), an online softmax on the S
//     fragments (the row max over the four lanes of a row by two shuffles; the row sum kept per lane
//     and summed at the end), P rounded to bf16 and reused in place as the A operand of O += P·V.
//     Writes out = O / l and lse = m·scale + log l.
//   - attention_mma_backward_dq: D_t = dout_t·out_t (f32, from out as stored; written to `delta`),
//     then per key tile S = Q·Kᵀ, P = exp(scale·S − lse), dP = dout·Vᵀ, dS = P∘(dP − D),
//     dQ += dS·K; dq = scale·dQ.
//   - attention_mma_backward_dkdv: per key/value head and key tile, for each query head of the group
//     in order and each query tile at or after the key tile: Sᵀ = K·Qᵀ, Pᵀ, dV += Pᵀ·dout,
//     dPᵀ = V·doutᵀ, dSᵀ = Pᵀ∘(dPᵀ − D), dK += dSᵀ·Q; dk = scale·dK. Runs after dq (reads `delta`).
// P and dS are rounded to bf16 as the A operand of the next product (as FlashAttention-2 does); the
// softmax sums, the row statistics and every accumulator stay f32. Causal: only the streamed tiles
// that hold an unmasked pair run (key tiles up to the query tile; query tiles from the key tile on;
// under a sliding window, key tiles from the first one the tile's first query sees, query tiles up
// to the last query that sees the tile's last key); inside the partial tiles the masked scores are
// −∞ (probabilities 0). Rows past a sequence's end are
// zeros in shared memory, masked, and never stored. Every element of out, lse, delta and dqkv is
// written by one thread, no atomics: the results do not depend on the schedule.
//
// Shared memory (static): forward and dq Q (64 rows) + K + V (STREAM rows) — 27 KiB at hd64, 34 KiB
// at hd128; dkdv K + V (64 rows) + Q + dout (STREAM rows) + lse, D — 36.5 KiB at hd64, 42.6 KiB at
// hd128. Registers per lane at hd128: O 64 floats, S 16, Q 32 (forward); dQ 64, S and dP 32, Q and
// dout 64 (dq); dK and dV 128, Sᵀ and dPᵀ 16 (dkdv, K and V re-read from shared memory).
//
// Verified on the emulated device (tests/ops/attention.rs against the CPU backend; tests/mma_fragments.rs
// for the fragment layouts); it compiles with nvcc for sm_80/sm_90 but has not yet been run or timed on
// a real GPU.
#include "attention.cuh"
#include "mma.cuh"

/// Threads per block of every tensor-core attention kernel: four warps.
#define ATTN_MMA_THREADS 128  // @rust
/// Rows a block owns: queries (forward, dq) or keys (dkdv), 16 per warp.
#define ATTN_MMA_ROWS 64  // @rust

/// The tile geometry of head dim HD (64 or 128).
template <int HD>
struct AttnMmaTile {
    static_assert(HD == 64 || HD == 128, "the tensor-core attention takes head dims 64 and 128");
    /// bf16 elements per shared row: HD plus a 16-byte pad.
    static constexpr int STRIDE = HD + 8;
    /// Key rows per streamed tile of the forward and dq.
    static constexpr int KEYS = HD == 64 ? 64 : 32;
    /// Query rows per streamed tile of dkdv (so that its shared memory stays under 48 KiB).
    static constexpr int QUERIES = HD == 64 ? 64 : 16;
    /// 8-column slices of a head (n-tiles of an accumulator over channels), and 16-channel k-steps.
    static constexpr int D_SLICES = HD / 8, D_STEPS = HD / 16;
};


constexpr float MMA_LOG2E = 1.4426950408889634f;

/// Copies `rows` global rows (stride `stride` elements, HD channels) into a shared tile of `TILE_ROWS`
/// rows of STRIDE elements, zeros past `rows`; 16 bytes (8 channels) per thread and step. No barrier.
template <int HD, int TILE_ROWS>
__device__ __forceinline__ void mma_stage(bf16* tile, const bf16* src, long long stride, int rows) {
    constexpr int CHUNKS = HD / 8;  // 16-byte pieces of a row
    for (int e = threadIdx.x; e < TILE_ROWS * CHUNKS; e += ATTN_MMA_THREADS) {
        const int r = e / CHUNKS, c = 8 * (e % CHUNKS);
        uint4 piece = {0u, 0u, 0u, 0u};
        if (r < rows) piece = *reinterpret_cast<const uint4*>(src + r * stride + c);
        *reinterpret_cast<uint4*>(tile + r * AttnMmaTile<HD>::STRIDE + c) = piece;
    }
}

/// The A fragments (16 rows from `row0`, every k-step over the HD channels) of a shared tile.
template <int HD>
__device__ __forceinline__ void load_a_rows(MmaA (&frag)[AttnMmaTile<HD>::D_STEPS], const bf16* tile, int row0) {
    const int lane = threadIdx.x % 32;
    // Matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
    const bf16* row = tile + (row0 + lane % 16) * AttnMmaTile<HD>::STRIDE + 8 * (lane / 16);
#pragma unroll
    for (int kk = 0; kk < AttnMmaTile<HD>::D_STEPS; ++kk) ldmatrix_x4(frag[kk].r, row + 16 * kk);
}

/// The A fragment of k-step kk of 16 rows from `row0` of a shared tile.
template <int HD>
__device__ __forceinline__ MmaA load_a(const bf16* tile, int row0, int kk) {
    const int lane = threadIdx.x % 32;
    MmaA frag;
    ldmatrix_x4(frag.r, tile + (row0 + lane % 16) * AttnMmaTile<HD>::STRIDE + 16 * kk + 8 * (lane / 16));
    return frag;
}

/// B fragments of Xᵀ for n-slices j and j+1 (rows 8j..8j+15 of a row-major shared tile X, the
/// product's n) at k-step kk (channels 16kk..16kk+15): the K of Q·Kᵀ.
template <int HD>
__device__ __forceinline__ void load_b_of_rows(MmaB& first, MmaB& second, const bf16* tile, int j, int kk) {
    const int lane = threadIdx.x % 32;
    uint32_t r[4];
    // Matrices (rows 8j.., k lo), (rows 8j.., k hi), (rows 8j+8.., k lo), (rows 8j+8.., k hi).
    ldmatrix_x4(r, tile + (8 * j + lane % 8 + 8 * (lane / 16)) * AttnMmaTile<HD>::STRIDE + 16 * kk +
                       8 * ((lane / 8) % 2));
    first.r[0] = r[0], first.r[1] = r[1], second.r[0] = r[2], second.r[1] = r[3];
}

/// B fragments of a row-major shared tile X itself for channel slices j and j+1, at k-step kk
/// (rows 16kk..16kk+15 of X, the product's k): the V of P·V.
template <int HD>
__device__ __forceinline__ void load_b_of_cols(MmaB& first, MmaB& second, const bf16* tile, int kk, int j) {
    const int lane = threadIdx.x % 32;
    uint32_t r[4];
    // Transposed matrices (rows 16kk+0..7, ch 8j..), (rows 16kk+8..15, ch 8j..), then ch 8j+8...
    ldmatrix_x4_trans(r, tile + (16 * kk + lane % 16) * AttnMmaTile<HD>::STRIDE + 8 * j + 8 * (lane / 16));
    first.r[0] = r[0], first.r[1] = r[1], second.r[0] = r[2], second.r[1] = r[3];
}

/// acc[N][4] (16 rows × 8N columns) = A-rows (all k-steps) · Xᵀ, X the first 8N rows of a shared tile.
template <int HD, int N>
__device__ __forceinline__ void mma_rows_by_rows(float (&acc)[N][4], const MmaA (&a)[AttnMmaTile<HD>::D_STEPS],
                                                 const bf16* tile) {
#pragma unroll
    for (int j = 0; j < N; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < AttnMmaTile<HD>::D_STEPS; ++kk) {
#pragma unroll
        for (int j = 0; j < N; j += 2) {
            MmaB b0, b1;
            load_b_of_rows<HD>(b0, b1, tile, j, kk);
            mma_m16n8k16_bf16(acc[j], a[kk], b0);
            mma_m16n8k16_bf16(acc[j + 1], a[kk], b1);
        }
    }
}

/// As mma_rows_by_rows with the A fragments read from a shared tile (16 rows from row0) step by step.
template <int HD, int N>
__device__ __forceinline__ void mma_shared_rows_by_rows(float (&acc)[N][4], const bf16* a_tile, int row0,
                                                        const bf16* tile) {
#pragma unroll
    for (int j = 0; j < N; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < AttnMmaTile<HD>::D_STEPS; ++kk) {
        const MmaA a = load_a<HD>(a_tile, row0, kk);
#pragma unroll
        for (int j = 0; j < N; j += 2) {
            MmaB b0, b1;
            load_b_of_rows<HD>(b0, b1, tile, j, kk);
            mma_m16n8k16_bf16(acc[j], a, b0);
            mma_m16n8k16_bf16(acc[j + 1], a, b1);
        }
    }
}

/// out[D_SLICES][4] += W · X, W (16 × 8N) in C-fragment registers (rounded to bf16 here, reused as the
/// A operand: C slices 2kk and 2kk+1 are A k-step kk), X the first 8N rows of a row-major shared tile.
template <int HD, int N>
__device__ __forceinline__ void mma_weights_by_tile(float (&out)[AttnMmaTile<HD>::D_SLICES][4],
                                                    const float (&w)[N][4], const bf16* tile) {
#pragma unroll
    for (int kk = 0; kk < N / 2; ++kk) {
        MmaA a;
        a.r[0] = pack_bf16x2(w[2 * kk][0], w[2 * kk][1]);          // row g, k 2t..2t+1
        a.r[1] = pack_bf16x2(w[2 * kk][2], w[2 * kk][3]);          // row g+8
        a.r[2] = pack_bf16x2(w[2 * kk + 1][0], w[2 * kk + 1][1]);  // row g, k 2t+8..2t+9
        a.r[3] = pack_bf16x2(w[2 * kk + 1][2], w[2 * kk + 1][3]);  // row g+8
#pragma unroll
        for (int j = 0; j < AttnMmaTile<HD>::D_SLICES; j += 2) {
            MmaB b0, b1;
            load_b_of_cols<HD>(b0, b1, tile, kk, j);
            mma_m16n8k16_bf16(out[j], a, b0);
            mma_m16n8k16_bf16(out[j + 1], a, b1);
        }
    }
}

/// Stores a lane's part of a 16 × HD accumulator (rows row0 + g, row0 + g + 8), times `mul`, as bf16
/// into rows of a global tensor; rows at or past `rows` are skipped.
template <int HD>
__device__ __forceinline__ void store_rows(bf16* dst, long long stride, const float (&acc)[AttnMmaTile<HD>::D_SLICES][4],
                                           int row0, int rows, const float (&mul)[2]) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = row0 + g + 8 * half;
        if (r >= rows) continue;
#pragma unroll
        for (int j = 0; j < AttnMmaTile<HD>::D_SLICES; ++j) {
            __nv_bfloat162 pair;
            pair.x = __float2bfloat16(mul[half] * acc[j][2 * half]);
            pair.y = __float2bfloat16(mul[half] * acc[j][2 * half + 1]);
            *reinterpret_cast<__nv_bfloat162*>(dst + r * stride + 8 * j + 2 * t) = pair;
        }
    }
}

template <int HD>
__device__ void attention_mma_forward(bf16* out, float* lse, const bf16* qkv, const int* cu_seqlens,
                                      QkvColumns cols, int window) {
    using Tile = AttnMmaTile<HD>;
    constexpr int KEYS = Tile::KEYS, S_SLICES = KEYS / 8;
    __shared__ __align__(16) bf16 q_s[ATTN_MMA_ROWS * Tile::STRIDE];
    __shared__ __align__(16) bf16 k_s[KEYS * Tile::STRIDE];
    __shared__ __align__(16) bf16 v_s[KEYS * Tile::STRIDE];

    const int h = blockIdx.x, s = blockIdx.y, tile = gridDim.z - 1 - blockIdx.z;  // long rows first
    const int start = cu_seqlens[s], len = cu_seqlens[s + 1] - start;
    const int q0 = tile * ATTN_MMA_ROWS;
    if (q0 >= len) return;  // the whole block, before any barrier
    const int kv = cols.kv_head_of(h);
    const float scale = 1.0f / sqrtf((float)HD), scale_log2 = scale * MMA_LOG2E;
    const long long width = cols.width();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int row0 = 16 * warp;                                // the warp's first row in the tile
    const int rows_q[2] = {q0 + row0 + g, q0 + row0 + g + 8};  // the lane's queries, in the sequence

    mma_stage<HD, ATTN_MMA_ROWS>(q_s, qkv + (long long)(start + q0) * width + cols.q(h), width,
                                 min(ATTN_MMA_ROWS, len - q0));
    __syncthreads();
    MmaA q[Tile::D_STEPS];
    load_a_rows<HD>(q, q_s, row0);

    float o[Tile::D_SLICES][4];
#pragma unroll
    for (int j = 0; j < Tile::D_SLICES; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // running max (of q·k) and the lane's sum

    const int key_end = min(len, q0 + ATTN_MMA_ROWS);  // causal: no key past the tile's last query
    for (int k0 = window_first_key(q0, window) / KEYS * KEYS; k0 < key_end; k0 += KEYS) {
        __syncthreads();  // the previous tile's readers are done
        const bf16* key_rows = qkv + (long long)(start + k0) * width;
        mma_stage<HD, KEYS>(k_s, key_rows + cols.k(kv), width, min(KEYS, len - k0));
        mma_stage<HD, KEYS>(v_s, key_rows + cols.v(kv), width, min(KEYS, len - k0));
        __syncthreads();

        float sc[S_SLICES][4];
        mma_rows_by_rows<HD, S_SLICES>(sc, q, k_s);
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < S_SLICES; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = k0 + 8 * j + 2 * t + e % 2;
                if (!window_sees(rows_q[e / 2], key, window) || key >= len) sc[j][e] = -INFINITY;
                tile_max[e / 2] = fmaxf(tile_max[e / 2], sc[j][e]);
            }
        }
        float alpha[2], m_ref[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            // The four lanes of a row (t = 0..3) hold its columns.
            float mx = tile_max[half];
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
            const float m_new = fmaxf(m[half], mx);
            // Without a window every row has an unmasked key in every tile it visits (key k0 ≤ its
            // query, k0 < len), so m_new is finite; alpha is 0 on the first tile (m = −∞). Under a
            // window a row may see no key of its first tiles (m_new = −∞): the exps are then taken
            // against 0, and give 0.
            m_ref[half] = m_new == -INFINITY ? 0.0f : m_new;
            alpha[half] = exp2f((m[half] - m_ref[half]) * scale_log2);
            m[half] = m_new;
            l[half] *= alpha[half];
        }
#pragma unroll
        for (int j = 0; j < Tile::D_SLICES; ++j) {
            o[j][0] *= alpha[0], o[j][1] *= alpha[0], o[j][2] *= alpha[1], o[j][3] *= alpha[1];
        }
#pragma unroll
        for (int j = 0; j < S_SLICES; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = exp2f((sc[j][e] - m_ref[e / 2]) * scale_log2);
                sc[j][e] = p;
                l[e / 2] += p;
            }
        }
        mma_weights_by_tile<HD, S_SLICES>(o, sc, v_s);
    }

    float inv_l[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        l[half] += __shfl_xor_sync(FULL_MASK, l[half], 1);
        l[half] += __shfl_xor_sync(FULL_MASK, l[half], 2);
        inv_l[half] = 1.0f / l[half];
    }
    store_rows<HD>(out + (long long)start * cols.q_width() + cols.q(h), cols.q_width(), o, q0 + row0, len, inv_l);
    if (t == 0) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            if (rows_q[half] < len) lse[(long long)(start + rows_q[half]) * cols.n_head + h] = m[half] * scale + logf(l[half]);
        }
    }
}

template <int HD>
__device__ void attention_mma_backward_dq(bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv, const bf16* out,
                                          const float* lse, const int* cu_seqlens, QkvColumns cols, int window) {
    using Tile = AttnMmaTile<HD>;
    constexpr int KEYS = Tile::KEYS, S_SLICES = KEYS / 8;
    __shared__ __align__(16) bf16 q_s[ATTN_MMA_ROWS * Tile::STRIDE];  // Q, then dout
    __shared__ __align__(16) bf16 k_s[KEYS * Tile::STRIDE];
    __shared__ __align__(16) bf16 v_s[KEYS * Tile::STRIDE];
    __shared__ float delta_s[ATTN_MMA_ROWS];

    const int h = blockIdx.x, s = blockIdx.y, tile = gridDim.z - 1 - blockIdx.z;
    const int start = cu_seqlens[s], len = cu_seqlens[s + 1] - start;
    const int q0 = tile * ATTN_MMA_ROWS;
    if (q0 >= len) return;
    const int kv = cols.kv_head_of(h), n_head = cols.n_head, rows = min(ATTN_MMA_ROWS, len - q0);
    const float scale = 1.0f / sqrtf((float)HD), scale_log2 = scale * MMA_LOG2E;
    const long long width = cols.width(), q_width = cols.q_width();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int row0 = 16 * warp;
    const int rows_q[2] = {q0 + row0 + g, q0 + row0 + g + 8};

    // D_t = dout_t·out_t: two threads per row (128 threads, 64 rows), each half of the channels.
    {
        const int r = threadIdx.x / 2, part = threadIdx.x % 2;
        float dot = 0.0f;
        if (r < rows) {
            const long long at = (long long)(start + q0 + r) * q_width + cols.q(h) + part * (HD / 2);
            for (int d = 0; d < HD / 2; ++d) dot += __bfloat162float(dout[at + d]) * __bfloat162float(out[at + d]);
        }
        dot += __shfl_xor_sync(FULL_MASK, dot, 1);
        if (part == 0) {
            delta_s[r] = dot;
            if (r < rows) delta[(long long)(start + q0 + r) * n_head + h] = dot;
        }
    }
    mma_stage<HD, ATTN_MMA_ROWS>(q_s, qkv + (long long)(start + q0) * width + cols.q(h), width, rows);
    __syncthreads();
    MmaA q[Tile::D_STEPS], dy[Tile::D_STEPS];
    load_a_rows<HD>(q, q_s, row0);
    // The lane's rows' D and lse (rows past the sequence: lse = +∞, so that P = 0 there).
    float d_row[2], lse_log2[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        d_row[half] = delta_s[row0 + g + 8 * half];
        const long long at = (long long)(start + rows_q[half]) * n_head + h;
        lse_log2[half] = rows_q[half] < len ? lse[at] * MMA_LOG2E : INFINITY;
    }
    __syncthreads();  // every warp holds its Q before dout replaces it
    mma_stage<HD, ATTN_MMA_ROWS>(q_s, dout + (long long)(start + q0) * q_width + cols.q(h), q_width, rows);
    __syncthreads();
    load_a_rows<HD>(dy, q_s, row0);

    float dq[Tile::D_SLICES][4];
#pragma unroll
    for (int j = 0; j < Tile::D_SLICES; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.0f;

    const int key_end = min(len, q0 + ATTN_MMA_ROWS);
    for (int k0 = window_first_key(q0, window) / KEYS * KEYS; k0 < key_end; k0 += KEYS) {
        __syncthreads();
        const bf16* key_rows = qkv + (long long)(start + k0) * width;
        mma_stage<HD, KEYS>(k_s, key_rows + cols.k(kv), width, min(KEYS, len - k0));
        mma_stage<HD, KEYS>(v_s, key_rows + cols.v(kv), width, min(KEYS, len - k0));
        __syncthreads();

        float ds[S_SLICES][4], dp[S_SLICES][4];
        mma_rows_by_rows<HD, S_SLICES>(ds, q, k_s);  // S, then P, then dS in place
        mma_rows_by_rows<HD, S_SLICES>(dp, dy, v_s);
#pragma unroll
        for (int j = 0; j < S_SLICES; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = k0 + 8 * j + 2 * t + e % 2;
                const float p = !window_sees(rows_q[e / 2], key, window) || key >= len
                                    ? 0.0f
                                    : exp2f(ds[j][e] * scale_log2 - lse_log2[e / 2]);
                ds[j][e] = p * (dp[j][e] - d_row[e / 2]);
            }
        }
        mma_weights_by_tile<HD, S_SLICES>(dq, ds, k_s);
    }
    const float mul[2] = {scale, scale};
    store_rows<HD>(dqkv + (long long)start * width + cols.q(h), width, dq, q0 + row0, len, mul);
}

template <int HD>
__device__ void attention_mma_backward_dkdv(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse,
                                            const float* delta, const int* cu_seqlens, QkvColumns cols, int window) {
    using Tile = AttnMmaTile<HD>;
    constexpr int QUERIES = Tile::QUERIES, S_SLICES = QUERIES / 8;
    __shared__ __align__(16) bf16 k_s[ATTN_MMA_ROWS * Tile::STRIDE];
    __shared__ __align__(16) bf16 v_s[ATTN_MMA_ROWS * Tile::STRIDE];
    __shared__ __align__(16) bf16 q_s[QUERIES * Tile::STRIDE];
    __shared__ __align__(16) bf16 dy_s[QUERIES * Tile::STRIDE];
    __shared__ float lse_s[QUERIES];  // log2 units; +∞ past the sequence
    __shared__ float delta_s[QUERIES];

    const int kv = blockIdx.x, s = blockIdx.y, tile = blockIdx.z;  // small key tiles see the most queries
    const int start = cu_seqlens[s], len = cu_seqlens[s + 1] - start;
    const int k0 = tile * ATTN_MMA_ROWS;
    if (k0 >= len) return;
    const int n_head = cols.n_head, group = n_head / cols.n_kv_head;
    const float scale = 1.0f / sqrtf((float)HD), scale_log2 = scale * MMA_LOG2E;
    const long long width = cols.width(), q_width = cols.q_width();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int row0 = 16 * warp;
    const int rows_k[2] = {k0 + row0 + g, k0 + row0 + g + 8};  // the lane's keys, in the sequence

    const bf16* key_rows = qkv + (long long)(start + k0) * width;
    mma_stage<HD, ATTN_MMA_ROWS>(k_s, key_rows + cols.k(kv), width, min(ATTN_MMA_ROWS, len - k0));
    mma_stage<HD, ATTN_MMA_ROWS>(v_s, key_rows + cols.v(kv), width, min(ATTN_MMA_ROWS, len - k0));

    float dk[Tile::D_SLICES][4], dv[Tile::D_SLICES][4];
#pragma unroll
    for (int j = 0; j < Tile::D_SLICES; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[j][e] = dv[j][e] = 0.0f;
    }

    // Causal: no query before the key tile; windowed: none past the last that sees its last key.
    const int query_end = window_query_end(min(k0 + ATTN_MMA_ROWS, len) - 1, window, len);
    // The group's query heads one after another: their sum over h has the same order every run.
    for (int h = kv * group; h < (kv + 1) * group; ++h) {
        for (int qt0 = k0; qt0 < query_end; qt0 += QUERIES) {
            const int rows = min(QUERIES, len - qt0);
            __syncthreads();  // the previous tile's readers are done (and K, V staged, the first time)
            mma_stage<HD, QUERIES>(q_s, qkv + (long long)(start + qt0) * width + cols.q(h), width, rows);
            mma_stage<HD, QUERIES>(dy_s, dout + (long long)(start + qt0) * q_width + cols.q(h), q_width, rows);
            if (threadIdx.x < QUERIES) {
                const bool in = (int)threadIdx.x < rows;
                const long long at = (long long)(start + qt0 + threadIdx.x) * n_head + h;
                lse_s[threadIdx.x] = in ? lse[at] * MMA_LOG2E : INFINITY;
                delta_s[threadIdx.x] = in ? delta[at] : 0.0f;
            }
            __syncthreads();

            float ds[S_SLICES][4], dp[S_SLICES][4];
            mma_shared_rows_by_rows<HD, S_SLICES>(ds, k_s, row0, q_s);   // Sᵀ, then Pᵀ, then dSᵀ
            mma_shared_rows_by_rows<HD, S_SLICES>(dp, v_s, row0, dy_s);  // dPᵀ = V·doutᵀ
#pragma unroll
            for (int j = 0; j < S_SLICES; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = 8 * j + 2 * t + e % 2, query = qt0 + col;
                    const float p =
                        !window_sees(query, rows_k[e / 2], window) ? 0.0f : exp2f(ds[j][e] * scale_log2 - lse_s[col]);
                    ds[j][e] = p * (dp[j][e] - delta_s[col]);
                    dp[j][e] = p;  // Pᵀ, for dV
                }
            }
            mma_weights_by_tile<HD, S_SLICES>(dv, dp, dy_s);
            mma_weights_by_tile<HD, S_SLICES>(dk, ds, q_s);
        }
    }
    const float dk_mul[2] = {scale, scale}, dv_mul[2] = {1.0f, 1.0f};
    store_rows<HD>(dqkv + (long long)start * width + cols.k(kv), width, dk, k0 + row0, len, dk_mul);
    store_rows<HD>(dqkv + (long long)start * width + cols.v(kv), width, dv, k0 + row0, len, dv_mul);
}

#define ATTENTION_MMA_KERNELS(HD)                                                                              \
    extern "C" __global__ void __launch_bounds__(ATTN_MMA_THREADS)                                             \
        attention_mma_forward_hd##HD##_bf16(bf16* out, float* lse, const bf16* qkv, const int* cu_seqlens,     \
                                            int n_head, int n_kv_head, int head_dim, int window) {             \
        attention_mma_forward<HD>(out, lse, qkv, cu_seqlens, QkvColumns{n_head, n_kv_head, head_dim}, window); \
    }                                                                                                          \
    EMU_REGISTER(attention_mma_forward_hd##HD##_bf16)                                                          \
    extern "C" __global__ void __launch_bounds__(ATTN_MMA_THREADS)                                             \
        attention_mma_backward_dq_hd##HD##_bf16(bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv,   \
                                                const bf16* out, const float* lse, const int* cu_seqlens,      \
                                                int n_head, int n_kv_head, int head_dim, int window) {         \
        attention_mma_backward_dq<HD>(dqkv, delta, dout, qkv, out, lse, cu_seqlens,                            \
                                      QkvColumns{n_head, n_kv_head, head_dim}, window);                     \
    }                                                                                                          \
    EMU_REGISTER(attention_mma_backward_dq_hd##HD##_bf16)                                                      \
    extern "C" __global__ void __launch_bounds__(ATTN_MMA_THREADS)                                             \
        attention_mma_backward_dkdv_hd##HD##_bf16(bf16* dqkv, const bf16* dout, const bf16* qkv,              \
                                                  const float* lse, const float* delta, const int* cu_seqlens,  \
                                                  int n_head, int n_kv_head, int head_dim, int window) {       \
        attention_mma_backward_dkdv<HD>(dqkv, dout, qkv, lse, delta, cu_seqlens,                               \
                                        QkvColumns{n_head, n_kv_head, head_dim}, window);                   \
    }                                                                                                          \
    EMU_REGISTER(attention_mma_backward_dkdv_hd##HD##_bf16)

ATTENTION_MMA_KERNELS(64)
ATTENTION_MMA_KERNELS(128)
