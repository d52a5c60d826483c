// kernels/attention.cu — causal multi-head self-attention over a packed batch, forward and backward.
//
// qkv [n, 3c] holds q, k, v side by side (HF `c_attn` output); head h of token t uses the hd = c/n_head
// columns starting at h·hd of each third. Token t of sequence s (cu_seqlens[s] ≤ t < cu_seqlens[s+1])
// attends to the tokens of its own sequence up to itself:
//
//     S_tj = scale · q_t·k_j   (j in s, j ≤ t, scale = 1/√hd)     lse_t = log Σ_j exp S_tj
//     P_tj = exp(S_tj − lse_t)                                   out_t = Σ_j P_tj v_j
//
// The forward saves only lse [n, n_head] (f32), as flash attention does; the backward recomputes P:
//
//     D_t = dout_t·out_t          dS_tj = P_tj·(dout_t·v_j − D_t)
//     dq_t = scale Σ_j dS_tj k_j   dk_j = scale Σ_t dS_tj q_t   dv_j = Σ_t P_tj dout_t
//
// CPU twins (src/backend/cpu.rs): `attention_forward`, `attention_backward` (the CPU keeps P instead of lse).
//
// Launch shape (all three kernels): grid (n, n_head), one warp (32 threads) per (token, head); lanes split
// the keys (or queries) when forming scores, then the hd channels when forming outputs; the scores of the
// row live in dynamic shared memory (f32). The backward is two kernels so that no output needs atomics:
// attention_backward_dq_<T> (one query row per warp; also writes D_t to `delta`) and
// attention_backward_dkdv_<T> (one key row per warp, looping over the queries that see it), which reads
// `delta`. Every element of dqkv is written by exactly one thread: deterministic.
//
// First version, the simplest correct design: O(T²·hd) work per head like the CPU, but no tiling and
// uncoalesced key loads. Tiled tensor-core kernels (or cuBLASLt batched products) come later.
//
// Dynamic shared memory: forward (hd + max_seqlen) floats, dq (2·hd + max_seqlen), dkdv (2·hd + 2·max_seqlen).
//
// Loops that precede a barrier run the same number of iterations on every lane (`base` steps, with the
// lane's index tested inside), rather than `for (j = lane; j < count; j += 32)`: a lane-dependent trip
// count lets the host compiler duplicate the barrier call into both exits, and the emulated device
// tells barriers apart by call site. Same cost on the GPU.
#include "common.cuh"

/// Σ_d a[d]·b[d] over one head (hd values), a in shared memory, b a row of the storage type.
template <typename T>
__device__ __forceinline__ float head_dot(const float* a, const T* b, int hd) {
    float acc = 0.0f;
    for (int d = 0; d < hd; ++d) acc += a[d] * to_float(b[d]);
    return acc;
}

template <typename T>
__device__ void attention_forward(T* out, float* lse, const T* qkv, const int* cu_seqlens, int num_seqs, int n_head,
                                  int c) {
    const int t = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
    const int hd = c / n_head;
    const int start = cu_seqlens[sequence_of(cu_seqlens, num_seqs, t)];
    const int keys = t - start + 1;  // keys start..t
    const float scale = 1.0f / sqrtf((float)hd);
    const long long row3 = 3LL * c;

    float* q = dynamic_smem<float>();  // [hd]
    float* p = q + hd;                 // [max_seqlen] scores, then probabilities
    const T* q_row = qkv + t * row3 + h * hd;
    for (int base = 0; base < hd; base += 32) {
        const int d = base + lane;
        if (d < hd) q[d] = to_float(q_row[d]);
    }
    __syncthreads();

    float m = -INFINITY;
    for (int base = 0; base < keys; base += 32) {
        const int j = base + lane;
        if (j < keys) {
            const float s = scale * head_dot(q, qkv + (start + j) * row3 + c + h * hd, hd);
            p[j] = s;
            m = fmaxf(m, s);
        }
    }
    m = warp_reduce_max(m);
    float sum = 0.0f;
    for (int base = 0; base < keys; base += 32) {
        const int j = base + lane;
        if (j < keys) {
            const float e = expf(p[j] - m);
            p[j] = e;
            sum += e;
        }
    }
    sum = warp_reduce_sum(sum);
    const float inv_sum = 1.0f / sum;
    __syncthreads();  // every lane's probabilities are in p before any lane reads them all

    T* o = out + (long long)t * c + h * hd;
    for (int d = lane; d < hd; d += 32) {
        const T* v = qkv + start * row3 + 2 * c + h * hd + d;
        float acc = 0.0f;
        for (int j = 0; j < keys; ++j) acc += p[j] * to_float(v[j * row3]);
        o[d] = from_float<T>(acc * inv_sum);
    }
    if (lane == 0) lse[(long long)t * n_head + h] = m + logf(sum);
}

template <typename T>
__device__ void attention_backward_dq(T* dqkv, float* delta, const T* dout, const T* qkv, const T* out,
                                      const float* lse, const int* cu_seqlens, int num_seqs, int n_head, int c) {
    const int t = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
    const int hd = c / n_head;
    const int start = cu_seqlens[sequence_of(cu_seqlens, num_seqs, t)];
    const int keys = t - start + 1;
    const float scale = 1.0f / sqrtf((float)hd);
    const long long row3 = 3LL * c;

    float* q = dynamic_smem<float>();  // [hd]
    float* dy = q + hd;                // [hd]
    float* ds = dy + hd;               // [max_seqlen]
    const T* q_row = qkv + t * row3 + h * hd;
    const T* dy_row = dout + (long long)t * c + h * hd;
    const T* y_row = out + (long long)t * c + h * hd;
    float dot = 0.0f;
    for (int base = 0; base < hd; base += 32) {
        const int d = base + lane;
        if (d < hd) {
            q[d] = to_float(q_row[d]);
            dy[d] = to_float(dy_row[d]);
            dot += dy[d] * to_float(y_row[d]);
        }
    }
    const float dt = warp_reduce_sum(dot);  // D_t = dout_t·out_t = Σ_j P_tj (dout_t·v_j)
    const float l = lse[(long long)t * n_head + h];
    __syncthreads();

    for (int base = 0; base < keys; base += 32) {
        const int j = base + lane;
        if (j < keys) {
            const long long key_row = (start + j) * row3 + h * hd;
            const float pj = expf(scale * head_dot(q, qkv + key_row + c, hd) - l);
            const float dp = head_dot(dy, qkv + key_row + 2 * c, hd);
            ds[j] = pj * (dp - dt);
        }
    }
    __syncthreads();

    T* dq = dqkv + t * row3 + h * hd;
    for (int d = lane; d < hd; d += 32) {
        const T* k = qkv + start * row3 + c + h * hd + d;
        float acc = 0.0f;
        for (int j = 0; j < keys; ++j) acc += ds[j] * to_float(k[j * row3]);
        dq[d] = from_float<T>(scale * acc);
    }
    if (lane == 0) delta[(long long)t * n_head + h] = dt;
}

template <typename T>
__device__ void attention_backward_dkdv(T* dqkv, const T* dout, const T* qkv, const float* lse, const float* delta,
                                        const int* cu_seqlens, int num_seqs, int n_head, int c) {
    const int j = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;  // j: the key row
    const int hd = c / n_head;
    const int s = sequence_of(cu_seqlens, num_seqs, j);
    const int queries = cu_seqlens[s + 1] - j;  // queries j..end see key j
    const float scale = 1.0f / sqrtf((float)hd);
    const long long row3 = 3LL * c;

    float* k = dynamic_smem<float>();  // [hd]
    float* v = k + hd;                 // [hd]
    float* p = v + hd;                 // [max_seqlen]
    float* ds = p + queries;           // [max_seqlen]
    const T* k_row = qkv + j * row3 + c + h * hd;
    for (int base = 0; base < hd; base += 32) {
        const int d = base + lane;
        if (d < hd) {
            k[d] = to_float(k_row[d]);
            v[d] = to_float(k_row[c + d]);
        }
    }
    __syncthreads();

    for (int base = 0; base < queries; base += 32) {
        const int i = base + lane;
        if (i < queries) {
            const long long t = j + i;
            const float pt = expf(scale * head_dot(k, qkv + t * row3 + h * hd, hd) - lse[t * n_head + h]);
            const float dp = head_dot(v, dout + t * c + h * hd, hd);
            p[i] = pt;
            ds[i] = pt * (dp - delta[t * n_head + h]);
        }
    }
    __syncthreads();

    T* dk = dqkv + j * row3 + c + h * hd;
    T* dv = dk + c;
    for (int d = lane; d < hd; d += 32) {
        const T* q = qkv + j * row3 + h * hd + d;
        const T* dy = dout + (long long)j * c + h * hd + d;
        float acc_k = 0.0f, acc_v = 0.0f;
        for (int i = 0; i < queries; ++i) {
            acc_k += ds[i] * to_float(q[i * row3]);
            acc_v += p[i] * to_float(dy[(long long)i * c]);
        }
        dk[d] = from_float<T>(scale * acc_k);
        dv[d] = from_float<T>(acc_v);
    }
}

#define ATTENTION_KERNELS(T, suffix)                                                                          \
    extern "C" __global__ void attention_forward_##suffix(T* out, float* lse, const T* qkv,                  \
                                                          const int* cu_seqlens, int num_seqs, int n_head,   \
                                                          int c) {                                           \
        attention_forward<T>(out, lse, qkv, cu_seqlens, num_seqs, n_head, c);                                \
    }                                                                                                         \
    EMU_REGISTER(attention_forward_##suffix)                                                                  \
    extern "C" __global__ void attention_backward_dq_##suffix(T* dqkv, float* delta, const T* dout,          \
                                                              const T* qkv, const T* out, const float* lse,  \
                                                              const int* cu_seqlens, int num_seqs,           \
                                                              int n_head, int c) {                           \
        attention_backward_dq<T>(dqkv, delta, dout, qkv, out, lse, cu_seqlens, num_seqs, n_head, c);         \
    }                                                                                                         \
    EMU_REGISTER(attention_backward_dq_##suffix)                                                              \
    extern "C" __global__ void attention_backward_dkdv_##suffix(T* dqkv, const T* dout, const T* qkv,        \
                                                                const float* lse, const float* delta,        \
                                                                const int* cu_seqlens, int num_seqs,         \
                                                                int n_head, int c) {                         \
        attention_backward_dkdv<T>(dqkv, dout, qkv, lse, delta, cu_seqlens, num_seqs, n_head, c);            \
    }                                                                                                         \
    EMU_REGISTER(attention_backward_dkdv_##suffix)

ATTENTION_KERNELS(float, f32)
ATTENTION_KERNELS(bf16, bf16)
