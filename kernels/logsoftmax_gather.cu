// kernels/logsoftmax_gather.cu — the fused log-softmax-gather: from logits to per-token and per-sequence
// log-probs of the targets, and its backward written over the logits in place (llm.c's fused classifier).
//
//     forward:  lse[t] = log Σ_v exp(logits[t, v]);  token_logp[t] = logits[t, target_t] − lse[t]  (0 where
//               target_t = −1)
//     _sq:      the forward, and log_sum_sq[t] = log Σ_v p_{t,v}², p = exp(logits[t, :] − lse[t])  (TRL's
//               log_sum_sq_probs, WPO's normaliser; every row; no backward)
//     seq sum:  seq_logp[s] = Σ_{t in s} token_logp[t]
//     backward: dlogits[t, :] = dseq[s(t)]·(onehot(target_t) − exp(logits[t, :] − lse[t]))  (zeros where
//               target_t = −1); in place over the logits, or (a bf16 model's f32 logits) into bf16 dlogits
//
// CPU twin: src/backend/cpu/logsoftmax_gather.rs (`logsoftmax_gather_forward`, `logsoftmax_gather_forward_sq`,
// `sequence_logp_sum`, `logsoftmax_gather_backward`). Host side: src/backend/cuda/ops/logsoftmax_gather.rs.
//
// Launch shapes (threads: the row's width rounded up to a multiple of 32, at most ROW_MAX_THREADS = 256,
// common.cuh):
// - logsoftmax_gather_forward_<T>: one block per row (grid n; 256 threads for any real vocabulary). Each
//   thread keeps an online (max, Σ exp(x − max)) over its strided elements, so the row is read exactly
//   once; the block then combines the pairs (block max, then the rescaled sums). The target's logit is
//   one extra load. The log-prob is formed as (x − max) − log Σ, without rounding lse first (large
//   logits keep precision). token_logp and lse are f32 whatever the logits' storage type.
// - logsoftmax_gather_forward_sq_<T>: the same kernel with a second online sum, Σ exp(2(x − max)), rescaled
//   with the first (by its factor squared) and reduced after it; log Σ p² = log Σ₂ − 2·log Σ. The max, the
//   sum and what is formed from them are the forward's, so token_logp and lse are its bits.
// - sequence_logp_sum_f32: one block per sequence (grid S, threads from the longest sequence): strided
//   partial sums, then a fixed-tree block reduction. Deterministic; no float atomics.
// - logsoftmax_gather_backward_<T>: one block per row (grid n, as the forward); each thread finds the row's
//   sequence by binary search over cu_seqlens (no barrier needed) and overwrites its strided elements.
//   Probabilities are never stored: the gradient replaces the logits.
// - logsoftmax_gather_backward_f32_to_bf16: the same from f32 logits into a separate bf16 tensor (the LM
//   head of a bf16 model keeps f32 logits; its backward products read bf16). One rounding per element.
//
// The forward reads f32 or bf16 logits (`_f32` serves a bf16 model's f32 logits too) in 128-bit packs
// when v is a multiple of the pack width and the logits are 16-byte aligned, else one element at a time:
// its per-thread sums must not depend on a row's address (see `for_my_row_elements`). The backward, elementwise, packs whatever the alignment: `split_row`
// (common.cuh) gives a scalar head up to the first 16-byte boundary of the output row, the packs, and a
// scalar tail; the f32 input of `_f32_to_bf16` is read in packs where it is aligned at the same elements.
// Logits are read with streaming loads (the forward's read is the only one before the backward's last).
//
// Loops before a block reduction run the same number of iterations on every thread (the element index
// tested inside): with a thread-dependent trip count the host compiler may duplicate the barrier call,
// and the emulated device tells barriers apart by call site.
#include "common.cuh"

/// `visit(j, x)` for this thread's elements j of the row (x = row[j] as f32): packs t, t + blockDim.x, ...
/// when `vector`, else elements t, t + blockDim.x, ... Which thread sums which element must not depend
/// on where the row sits in memory (the frozen model's chunked LM head hands the same rows at other
/// offsets and must get the same bits), so the forward packs only when every row is aligned (v a
/// multiple of the pack width), never by a per-row head. Every thread runs the loop the same number of
/// times.
template <typename T, typename Visit>
__device__ __forceinline__ void for_my_row_elements(const T* row, int v, bool vector, Visit visit) {
    with_width<T>(vector, [&](auto width) {
        constexpr int W = decltype(width)::value;
        const int packs = v / W;
        for (int base = 0; base < packs; base += blockDim.x) {  // same trip count on every thread
            const int k = base + threadIdx.x;
            if (k < packs) {
                float x[W];
                load_vec<W, CacheHint::Streaming>(row + k * W, x);
#pragma unroll
                for (int e = 0; e < W; ++e) visit(k * W + e, x[e]);
            }
        }
    });
}

/// `SQUARES`: also log_sum_sq[t] = log Σ p² (see the header); without, `log_sum_sq` is not read.
template <typename T, bool SQUARES>
__device__ void logsoftmax_gather_forward(float* token_logp, float* lse, float* log_sum_sq, const T* logits,
                                          const int* targets, int v) {
    const int t = blockIdx.x;
    const T* row = logits + (long long)t * v;
    // Online max and sum of exponentials over this thread's elements: the sum is rescaled only when
    // the maximum rises (the sum of squares by the same factor, squared).
    float m = -INFINITY, s = 0.0f, s2 = 0.0f;
    const bool vector = v % vec_width<T> == 0 && aligned16(logits);
    for_my_row_elements(row, v, vector, [&](int, float x) {
        if (x > m) {
            const float rescale = expf(m - x);
            s = s * rescale + 1.0f;
            if (SQUARES) s2 = s2 * (rescale * rescale) + 1.0f;
            m = x;
        } else {
            const float e = expf(x - m);
            s += e;
            if (SQUARES) s2 += e * e;
        }
    });
    const float row_max = block_reduce_max(m);
    // Threads that saw no element have s = 0 and m = −inf: their share is 0·exp(−inf) = 0.
    const float sum = block_reduce_sum(m == -INFINITY ? 0.0f : s * expf(m - row_max));
    float sum_sq = 0.0f;
    if (SQUARES) {
        const float rescale = m == -INFINITY ? 0.0f : expf(m - row_max);
        sum_sq = block_reduce_sum(s2 * (rescale * rescale));
    }
    if (threadIdx.x == 0) {
        const float log_sum = logf(sum);
        const int target = targets[t];
        lse[t] = row_max + log_sum;
        token_logp[t] = target >= 0 ? (to_float(row[target]) - row_max) - log_sum : 0.0f;
        if (SQUARES) log_sum_sq[t] = logf(sum_sq) - 2.0f * log_sum;
    }
}

/// The backward of one row (block t): `dlogits` row t from `logits` row t, in place when they are the
/// same tensor (In = Out), or from f32 logits into bf16 dlogits (a bf16 model's f32 logits: one
/// rounding of the gradient, at its store). Packs follow the output row's alignment (`split_row`);
/// the input is read in packs where it is aligned at the same elements (always, in place), else one
/// element at a time.
template <typename In, typename Out>
__device__ void logsoftmax_gather_backward(Out* dlogits, const In* logits, const float* lse, const int* targets,
                                           const float* dseq, const int* cu_seqlens, int num_seqs, int v) {
    constexpr int W = vec_width<Out>;
    static_assert(W * sizeof(In) % 16 == 0, "an output pack is whole input packs");
    const int t = blockIdx.x;
    const In* in = logits + (long long)t * v;
    Out* out = dlogits + (long long)t * v;
    const int target = targets[t];
    const RowSplit split = split_row(out, v);
    const bool in_vector = aligned16(in + split.head);
    const int tid = threadIdx.x;
    const float g = target < 0 ? 0.0f : dseq[sequence_of(cu_seqlens, num_seqs, t)];
    const float l = target < 0 ? 0.0f : lse[t];
    // The gradient of element j from its logit x (zero on rows without a target).
    auto grad = [&](int j, float x) {
        if (target < 0) return 0.0f;
        float d = -g * expf(x - l);
        if (j == target) d += g;
        return d;
    };
    // Rows without a target are only written (zeros), never read.
    if (tid < split.head) out[tid] = from_float<Out>(grad(tid, target < 0 ? 0.0f : to_float(in[tid])));
    for (int k = tid; k < split.packs; k += blockDim.x) {
        const int j = split.head + k * W;
        float x[W] = {};
        if (target >= 0 && in_vector) {
            load_vec<W, CacheHint::Streaming>(in + j, x);
        } else if (target >= 0) {
#pragma unroll
            for (int e = 0; e < W; ++e) x[e] = to_float(__ldcs(in + j + e));
        }
#pragma unroll
        for (int e = 0; e < W; ++e) x[e] = grad(j + e, x[e]);
        store_vec<W>(out + j, x);
    }
    if (tid < split.tail) {
        const int j = v - split.tail + tid;
        out[j] = from_float<Out>(grad(j, target < 0 ? 0.0f : to_float(in[j])));
    }
}

/// seq_logp[s] = Σ token_logp[cu_seqlens[s] .. cu_seqlens[s+1]]
extern "C" __global__ void sequence_logp_sum_f32(float* seq_logp, const float* token_logp, const int* cu_seqlens) {
    const int s = blockIdx.x;
    const int start = cu_seqlens[s], end = cu_seqlens[s + 1];
    float acc = 0.0f;
    for (int base = start; base < end; base += blockDim.x) {
        if (base + (int)threadIdx.x < end) acc += token_logp[base + threadIdx.x];
    }
    acc = block_reduce_sum(acc);
    if (threadIdx.x == 0) seq_logp[s] = acc;
}
EMU_REGISTER(sequence_logp_sum_f32)

#define LOGSOFTMAX_GATHER_KERNELS(T, suffix)                                                                  \
    extern "C" __global__ void logsoftmax_gather_forward_##suffix(float* token_logp, float* lse,             \
                                                                  const T* logits, const int* targets,       \
                                                                  int v) {                                   \
        logsoftmax_gather_forward<T, false>(token_logp, lse, nullptr, logits, targets, v);                    \
    }                                                                                                         \
    EMU_REGISTER(logsoftmax_gather_forward_##suffix)                                                          \
    extern "C" __global__ void logsoftmax_gather_forward_sq_##suffix(float* token_logp, float* lse,          \
                                                                     float* log_sum_sq, const T* logits,     \
                                                                     const int* targets, int v) {            \
        logsoftmax_gather_forward<T, true>(token_logp, lse, log_sum_sq, logits, targets, v);                  \
    }                                                                                                         \
    EMU_REGISTER(logsoftmax_gather_forward_sq_##suffix)                                                       \
    extern "C" __global__ void logsoftmax_gather_backward_##suffix(T* logits, const float* lse,              \
                                                                   const int* targets, const float* dseq,    \
                                                                   const int* cu_seqlens, int num_seqs,      \
                                                                   int v) {                                  \
        logsoftmax_gather_backward<T, T>(logits, logits, lse, targets, dseq, cu_seqlens, num_seqs, v);       \
    }                                                                                                         \
    EMU_REGISTER(logsoftmax_gather_backward_##suffix)

LOGSOFTMAX_GATHER_KERNELS(float, f32)
LOGSOFTMAX_GATHER_KERNELS(bf16, bf16)

/// The backward from a bf16 model's f32 logits into its bf16 dlogits (a separate tensor).
extern "C" __global__ void logsoftmax_gather_backward_f32_to_bf16(bf16* dlogits, const float* logits,
                                                                  const float* lse, const int* targets,
                                                                  const float* dseq, const int* cu_seqlens,
                                                                  int num_seqs, int v) {
    logsoftmax_gather_backward<float, bf16>(dlogits, logits, lse, targets, dseq, cu_seqlens, num_seqs, v);
}
EMU_REGISTER(logsoftmax_gather_backward_f32_to_bf16)
