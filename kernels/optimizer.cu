// kernels/optimizer.cu — parameter updates: one AdamW step, one SGD step, over one tensor or over
// every tensor of a table in one launch (multi-tensor).
//
// AdamW:
//     g  = grad_scale · grad                      (grad-norm clipping folded into grad_scale)
//     m  = β1·m + (1 − β1)·g
//     v  = β2·v + (1 − β2)·g²
//     p ← p − lr · ( (m / bc1) / (sqrt(v / bc2) + eps) + weight_decay · p )
//
// with bias corrections bc1 = 1 − β1^step and bc2 = 1 − β2^step computed on the host in f64.
// Decoupled weight decay uses the parameter before the update (PyTorch's AdamW).
//
// SGD:
//     p ← p − step · grad,  step = lr · grad_scale (folded on the host)
//
// CPU twin: src/backend/cpu/optimizer.rs (`adamw`, `sgd`). Host side: src/backend/cuda/ops/optimizer.rs.
//
// Instantiations:
// - adamw_f32, sgd_f32: f32 parameters, f32 gradients;
// - adamw_bf16, sgd_bf16: bf16 parameters and gradients with an fp32 master copy: the update is computed
//   on the master weight, which is stored back, and the bf16 parameter is written from it (round to
//   nearest even), so bf16 rounding never accumulates across steps (sgd_f32 is passed a null master);
// - adamw_bf16_f32, sgd_bf16_f32: the same with f32 gradients (the gradients accumulated in f32
//   storage, `train.grad_dtype`), read as they are: no conversion pass.
// AdamW's m and v are always fp32. Launch shape: 1-D grid of GRID_STRIDE_THREADS-thread blocks
// (common.cuh), one thread per element, grid-stride loop; every element is independent, so the result
// does not depend on the launch shape.
//
// Multi-tensor forms (adamw_multi_<dtype>, sgd_multi_<dtype>, and the _bf16_f32 forms as above): one
// launch over a device-side table of `MultiTensorSlot`s (the host builds it once and keeps it while
// the tensors stay where they are). Each tensor is cut into MULTI_TENSOR_CHUNK-element chunks,
// numbered across the table in order (slot.first_chunk is the prefix sum of the chunk counts before
// it); block b finds the slot holding chunk b by binary search and updates that chunk, four elements
// per thread with one access per array (128 bits of f32, 64 of bf16) when every pointer of the chunk
// is aligned for it, one at a time otherwise and for the last (length mod 4) elements. The
// per-element arithmetic is the one function the per-tensor kernels call (`adamw_element`,
// `sgd_element`), so both paths give the same bits. Weight decay is per slot: a slot without it is
// updated with weight_decay = 0, the same expression the per-tensor kernel evaluates when passed 0.
#include "common.cuh"

/// Elements of one chunk of a multi-tensor launch (one block each); a multiple of 4 · MULTI_TENSOR_THREADS.
#define MULTI_TENSOR_CHUNK 16384  // @rust
/// Threads per block of a multi-tensor launch.
#define MULTI_TENSOR_THREADS 256  // @rust
/// 64-bit words of one `MultiTensorSlot` (the host writes the table as words).
#define MULTI_TENSOR_SLOT_WORDS 8  // @rust

/// One tensor of a multi-tensor table, as the host writes it (eight 64-bit words, in this order).
/// Tensors with no elements are left out of the table.
struct MultiTensorSlot {
    void* param;       // P*: the stored parameter
    float* master;     // its fp32 master copy (bf16 parameters), else null
    const void* grad;  // const G* (the gradient's storage type: P, or f32 beside a bf16 P)
    float* m;          // AdamW's first moment (null for SGD)
    float* v;          // AdamW's second moment (null for SGD)
    long long n;       // elements (> 0)
    long long first_chunk;  // chunks of the slots before this one
    long long decay;   // nonzero: weight decay applies (AdamW)
};

/// AdamW's per-step constants.
struct AdamWHyper {
    float lr, beta1, beta2, eps, bias_correction1, bias_correction2, grad_scale;
};

/// One element's AdamW update: updates m and v, returns the new parameter. Both the per-tensor and
/// the multi-tensor kernels call this, so their results are the same bits.
__device__ __forceinline__ float adamw_element(float p, float grad, float& m, float& v, const AdamWHyper& h,
                                               float weight_decay) {
    const float g = grad * h.grad_scale;
    const float mi = h.beta1 * m + (1.0f - h.beta1) * g;
    const float vi = h.beta2 * v + (1.0f - h.beta2) * g * g;
    m = mi;
    v = vi;
    const float m_hat = mi / h.bias_correction1;
    const float v_hat = vi / h.bias_correction2;
    p -= h.lr * (m_hat / (sqrtf(v_hat) + h.eps) + weight_decay * p);
    return p;
}

/// One element's SGD update.
__device__ __forceinline__ float sgd_element(float p, float grad, float step) { return p - step * grad; }

template <typename P, typename G>
__device__ __forceinline__ void adamw_update(P* param, float* master, const G* grad, float* m, float* v, long long n,
                                             const AdamWHyper& h, float weight_decay) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float p = master != nullptr ? master[i] : to_float(param[i]);
        p = adamw_element(p, to_float(grad[i]), m[i], v[i], h, weight_decay);
        if (master != nullptr) master[i] = p;
        param[i] = from_float<P>(p);
    }
}

extern "C" __global__ void adamw_f32(float* param, const float* grad, float* m, float* v, long long n, float lr,
                                     float beta1, float beta2, float eps, float weight_decay, float bias_correction1,
                                     float bias_correction2, float grad_scale) {
    const AdamWHyper h = {lr, beta1, beta2, eps, bias_correction1, bias_correction2, grad_scale};
    adamw_update<float, float>(param, nullptr, grad, m, v, n, h, weight_decay);
}
EMU_REGISTER(adamw_f32)

extern "C" __global__ void adamw_bf16(bf16* param, float* master, const bf16* grad, float* m, float* v, long long n,
                                      float lr, float beta1, float beta2, float eps, float weight_decay,
                                      float bias_correction1, float bias_correction2, float grad_scale) {
    const AdamWHyper h = {lr, beta1, beta2, eps, bias_correction1, bias_correction2, grad_scale};
    adamw_update<bf16, bf16>(param, master, grad, m, v, n, h, weight_decay);
}
EMU_REGISTER(adamw_bf16)

extern "C" __global__ void adamw_bf16_f32(bf16* param, float* master, const float* grad, float* m, float* v,
                                          long long n, float lr, float beta1, float beta2, float eps,
                                          float weight_decay, float bias_correction1, float bias_correction2,
                                          float grad_scale) {
    const AdamWHyper h = {lr, beta1, beta2, eps, bias_correction1, bias_correction2, grad_scale};
    adamw_update<bf16, float>(param, master, grad, m, v, n, h, weight_decay);
}
EMU_REGISTER(adamw_bf16_f32)

// ---- SGD ------------------------------------------------------------------------------------------------
/// param −= step · grad, with step = lr · grad_scale. With an fp32 master copy (`master` non-null) the
/// update is made on the master, and the parameter is written from it (bf16 rounding never accumulates).
template <typename T, typename G>
__device__ void sgd(T* param, float* master, const G* grad, long long n, float step) {
    GRID_STRIDE_LOOP(i, n) {
        float p = master != nullptr ? master[i] : to_float(param[i]);
        p = sgd_element(p, to_float(grad[i]), step);
        if (master != nullptr) master[i] = p;
        param[i] = from_float<T>(p);
    }
}

extern "C" __global__ void sgd_f32(float* param, float* master, const float* grad, long long n, float step) {
    sgd<float, float>(param, master, grad, n, step);
}
EMU_REGISTER(sgd_f32)

extern "C" __global__ void sgd_bf16(bf16* param, float* master, const bf16* grad, long long n, float step) {
    sgd<bf16, bf16>(param, master, grad, n, step);
}
EMU_REGISTER(sgd_bf16)

extern "C" __global__ void sgd_bf16_f32(bf16* param, float* master, const float* grad, long long n, float step) {
    sgd<bf16, float>(param, master, grad, n, step);
}
EMU_REGISTER(sgd_bf16_f32)

// ---- multi-tensor ---------------------------------------------------------------------------------------
/// Four consecutive elements, loaded or stored as one access (128 bits of f32, 64 of bf16).
template <typename T>
struct alignas(4 * sizeof(T)) Quad {
    T x[4];
};

template <typename T>
__device__ __forceinline__ bool quad_aligned(const T* p) {
    return ((unsigned long long)p & (4 * sizeof(T) - 1)) == 0;
}

/// The slot holding chunk `chunk`: the last slot whose first_chunk ≤ chunk (every slot has ≥ 1 chunk).
__device__ __forceinline__ int slot_of_chunk(const MultiTensorSlot* slots, int count, long long chunk) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (slots[mid].first_chunk <= chunk) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/// One chunk of one slot: `begin` (its first element in the tensor) and its length.
struct Chunk {
    MultiTensorSlot slot;
    long long begin;
    int len;
};

__device__ __forceinline__ Chunk this_block_chunk(const MultiTensorSlot* slots, int count) {
    Chunk c;
    c.slot = slots[slot_of_chunk(slots, count, blockIdx.x)];
    c.begin = ((long long)blockIdx.x - c.slot.first_chunk) * MULTI_TENSOR_CHUNK;
    const long long left = c.slot.n - c.begin;
    c.len = left < MULTI_TENSOR_CHUNK ? (int)left : MULTI_TENSOR_CHUNK;
    return c;
}

/// Updates every element of this block's chunk: p ← update(p, grad, m, v), where p is the master (or
/// the stored parameter), written back to both, and m, v the moments (AdamW; SGD's slots have none
/// and its update ignores them). Four elements per thread with one access per array where every
/// array of the chunk is aligned for it, then one at a time.
template <typename P, typename G, typename Update>
__device__ __forceinline__ void update_chunk(const Chunk& c, Update update) {
    P* param = static_cast<P*>(c.slot.param) + c.begin;
    const G* grad = static_cast<const G*>(c.slot.grad) + c.begin;
    float* master = c.slot.master != nullptr ? c.slot.master + c.begin : nullptr;
    float* m = c.slot.m != nullptr ? c.slot.m + c.begin : nullptr;
    float* v = c.slot.v != nullptr ? c.slot.v + c.begin : nullptr;
    const bool quads = quad_aligned(param) && quad_aligned(grad) && (master == nullptr || quad_aligned(master)) &&
                       (m == nullptr || quad_aligned(m)) && (v == nullptr || quad_aligned(v));
    const int quad_end = quads ? c.len / 4 * 4 : 0;
    for (int i = 4 * (int)threadIdx.x; i < quad_end; i += 4 * (int)blockDim.x) {
        Quad<P> pq = *reinterpret_cast<const Quad<P>*>(param + i);
        const Quad<G> gq = *reinterpret_cast<const Quad<G>*>(grad + i);
        Quad<float> wq = {}, mq = {}, vq = {};
        if (master != nullptr) wq = *reinterpret_cast<const Quad<float>*>(master + i);
        if (m != nullptr) mq = *reinterpret_cast<const Quad<float>*>(m + i);
        if (v != nullptr) vq = *reinterpret_cast<const Quad<float>*>(v + i);
        for (int k = 0; k < 4; ++k) {
            wq.x[k] = update(master != nullptr ? wq.x[k] : to_float(pq.x[k]), to_float(gq.x[k]), mq.x[k], vq.x[k]);
            pq.x[k] = from_float<P>(wq.x[k]);
        }
        if (master != nullptr) *reinterpret_cast<Quad<float>*>(master + i) = wq;
        if (m != nullptr) *reinterpret_cast<Quad<float>*>(m + i) = mq;
        if (v != nullptr) *reinterpret_cast<Quad<float>*>(v + i) = vq;
        *reinterpret_cast<Quad<P>*>(param + i) = pq;
    }
    for (int i = quad_end + (int)threadIdx.x; i < c.len; i += (int)blockDim.x) {
        float mi = m != nullptr ? m[i] : 0.0f, vi = v != nullptr ? v[i] : 0.0f;
        const float p = update(master != nullptr ? master[i] : to_float(param[i]), to_float(grad[i]), mi, vi);
        if (master != nullptr) master[i] = p;
        if (m != nullptr) m[i] = mi;
        if (v != nullptr) v[i] = vi;
        param[i] = from_float<P>(p);
    }
}

template <typename P, typename G>
__device__ void adamw_multi(const MultiTensorSlot* slots, int count, const AdamWHyper& h, float weight_decay) {
    const Chunk c = this_block_chunk(slots, count);
    const float decay = c.slot.decay != 0 ? weight_decay : 0.0f;
    update_chunk<P, G>(c, [&](float p, float g, float& m, float& v) { return adamw_element(p, g, m, v, h, decay); });
}

extern "C" __global__ void adamw_multi_f32(const MultiTensorSlot* slots, int count, float lr, float beta1,
                                           float beta2, float eps, float weight_decay, float bias_correction1,
                                           float bias_correction2, float grad_scale) {
    const AdamWHyper h = {lr, beta1, beta2, eps, bias_correction1, bias_correction2, grad_scale};
    adamw_multi<float, float>(slots, count, h, weight_decay);
}
EMU_REGISTER(adamw_multi_f32)

extern "C" __global__ void adamw_multi_bf16(const MultiTensorSlot* slots, int count, float lr, float beta1,
                                            float beta2, float eps, float weight_decay, float bias_correction1,
                                            float bias_correction2, float grad_scale) {
    const AdamWHyper h = {lr, beta1, beta2, eps, bias_correction1, bias_correction2, grad_scale};
    adamw_multi<bf16, bf16>(slots, count, h, weight_decay);
}
EMU_REGISTER(adamw_multi_bf16)

extern "C" __global__ void adamw_multi_bf16_f32(const MultiTensorSlot* slots, int count, float lr, float beta1,
                                                float beta2, float eps, float weight_decay, float bias_correction1,
                                                float bias_correction2, float grad_scale) {
    const AdamWHyper h = {lr, beta1, beta2, eps, bias_correction1, bias_correction2, grad_scale};
    adamw_multi<bf16, float>(slots, count, h, weight_decay);
}
EMU_REGISTER(adamw_multi_bf16_f32)

template <typename P, typename G>
__device__ void sgd_multi(const MultiTensorSlot* slots, int count, float step) {
    const Chunk c = this_block_chunk(slots, count);
    update_chunk<P, G>(c, [&](float p, float g, float&, float&) { return sgd_element(p, g, step); });
}

extern "C" __global__ void sgd_multi_f32(const MultiTensorSlot* slots, int count, float step) {
    sgd_multi<float, float>(slots, count, step);
}
EMU_REGISTER(sgd_multi_f32)

extern "C" __global__ void sgd_multi_bf16(const MultiTensorSlot* slots, int count, float step) {
    sgd_multi<bf16, bf16>(slots, count, step);
}
EMU_REGISTER(sgd_multi_bf16)

extern "C" __global__ void sgd_multi_bf16_f32(const MultiTensorSlot* slots, int count, float step) {
    sgd_multi<bf16, float>(slots, count, step);
}
EMU_REGISTER(sgd_multi_bf16_f32)
