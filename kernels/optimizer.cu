// kernels/optimizer.cu — parameter updates over one tensor: one AdamW step, one SGD step.
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
//   nearest even), so bf16 rounding never accumulates across steps (sgd_f32 is passed a null master).
// AdamW's m and v are always fp32. Launch shape: 1-D grid of GRID_STRIDE_THREADS-thread blocks
// (common.cuh), one thread per element, grid-stride loop; every element is independent, so the result
// does not depend on the launch shape.
#include "common.cuh"

template <typename P>
__device__ __forceinline__ void adamw_update(P* param, float* master, const P* grad, float* m, float* v, long long n,
                                             float lr, float beta1, float beta2, float eps, float weight_decay,
                                             float bias_correction1, float bias_correction2, float grad_scale) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = to_float(grad[i]) * grad_scale;
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        const float m_hat = mi / bias_correction1;
        const float v_hat = vi / bias_correction2;
        float p = master != nullptr ? master[i] : to_float(param[i]);
        p -= lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * p);
        if (master != nullptr) master[i] = p;
        param[i] = from_float<P>(p);
    }
}

extern "C" __global__ void adamw_f32(float* param, const float* grad, float* m, float* v, long long n, float lr,
                                     float beta1, float beta2, float eps, float weight_decay, float bias_correction1,
                                     float bias_correction2, float grad_scale) {
    adamw_update<float>(param, nullptr, grad, m, v, n, lr, beta1, beta2, eps, weight_decay, bias_correction1,
                        bias_correction2, grad_scale);
}
EMU_REGISTER(adamw_f32)

extern "C" __global__ void adamw_bf16(bf16* param, float* master, const bf16* grad, float* m, float* v, long long n,
                                      float lr, float beta1, float beta2, float eps, float weight_decay,
                                      float bias_correction1, float bias_correction2, float grad_scale) {
    adamw_update<bf16>(param, master, grad, m, v, n, lr, beta1, beta2, eps, weight_decay, bias_correction1,
                       bias_correction2, grad_scale);
}
EMU_REGISTER(adamw_bf16)

// ---- SGD ------------------------------------------------------------------------------------------------
/// param −= step · grad, with step = lr · grad_scale. With an fp32 master copy (`master` non-null) the
/// update is made on the master, and the parameter is written from it (bf16 rounding never accumulates).
template <typename T>
__device__ void sgd(T* param, float* master, const T* grad, long long n, float step) {
    GRID_STRIDE_LOOP(i, n) {
        float p = master != nullptr ? master[i] : to_float(param[i]);
        p -= step * to_float(grad[i]);
        if (master != nullptr) master[i] = p;
        param[i] = from_float<T>(p);
    }
}

extern "C" __global__ void sgd_f32(float* param, float* master, const float* grad, long long n, float step) {
    sgd<float>(param, master, grad, n, step);
}
EMU_REGISTER(sgd_f32)

extern "C" __global__ void sgd_bf16(bf16* param, float* master, const bf16* grad, long long n, float step) {
    sgd<bf16>(param, master, grad, n, step);
}
EMU_REGISTER(sgd_bf16)
