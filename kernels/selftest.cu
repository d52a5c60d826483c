// kernels/selftest.cu — small kernels that check the execution model itself (tests/emu.rs on the
// emulated device, tests/gpu_device.rs on a GPU): barriers, shuffles, ballots, block reductions, shared
// memory poisoning, atomics, bf16/fp16 rounding, launch geometry, and deliberate misuse that the
// emulator must reject. Not used by training.
#include "common.cuh"

/// Launch geometry: out[linear thread id] = (block linear id, thread linear id, dims checksum).
extern "C" __global__ void selftest_indices(int* out) {
    const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int threads = blockDim.x * blockDim.y * blockDim.z;
    const int i = block * threads + thread;
    out[3 * i + 0] = block;
    out[3 * i + 1] = thread;
    out[3 * i + 2] = (int)(gridDim.x * 1000000 + gridDim.y * 10000 + gridDim.z * 100 + blockDim.z);
}
EMU_REGISTER(selftest_indices)

/// Barrier ordering over `rounds` phases: in round r every thread writes tid·(r+1) to shared memory,
/// waits, and reads the slot of thread (tid + r + 1) mod n, which another warp wrote. Without the
/// barriers the reads would see other rounds' values (or NaN-poison).
extern "C" __global__ void selftest_barrier_rounds(float* out, int rounds) {
    __shared__ float slots[1024];
    const int n = blockDim.x, tid = threadIdx.x;
    for (int r = 0; r < rounds; ++r) {
        slots[tid] = (float)(tid * (r + 1));
        __syncthreads();
        out[(blockIdx.x * rounds + r) * n + tid] = slots[(tid + r + 1) % n];
        __syncthreads();
    }
}
EMU_REGISTER(selftest_barrier_rounds)

/// A value read, a barrier, the same value read again after another thread changed it: a compiler
/// must not keep shared memory in registers across `__syncthreads` (out[2·tid], out[2·tid+1]).
extern "C" __global__ void selftest_shared_reload(float* out) {
    __shared__ float value;
    if (threadIdx.x == 0) value = 1.0f;
    __syncthreads();
    const float first = value;
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) value = 2.0f;
    __syncthreads();
    out[2 * threadIdx.x] = first;
    out[2 * threadIdx.x + 1] = value;
}
EMU_REGISTER(selftest_shared_reload)

/// The same through global memory behind `__restrict__` pointers: data[0] is read, changed by
/// another thread between two barriers, and read again (out[2·tid], out[2·tid+1]).
extern "C" __global__ void selftest_global_reload(float* __restrict__ data, float* __restrict__ out) {
    const float first = data[0];
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) data[0] = first + 1.0f;
    __syncthreads();
    out[2 * threadIdx.x] = first;
    out[2 * threadIdx.x + 1] = data[0];
}
EMU_REGISTER(selftest_global_reload)

/// Every shuffle flavour on `in` (one value per thread): out[k·n + tid] for k = idx, up, down, xor.
extern "C" __global__ void selftest_shuffles(const float* in, float* out, int src_lane, unsigned delta, int lane_mask,
                                             int width) {
    const int n = blockDim.x, tid = threadIdx.x;
    const float v = in[blockIdx.x * n + tid];
    float* o = out + blockIdx.x * 4 * n;
    o[0 * n + tid] = __shfl_sync(FULL_MASK, v, src_lane, width);
    o[1 * n + tid] = __shfl_up_sync(FULL_MASK, v, delta, width);
    o[2 * n + tid] = __shfl_down_sync(FULL_MASK, v, delta, width);
    o[3 * n + tid] = __shfl_xor_sync(FULL_MASK, v, lane_mask, width);
}
EMU_REGISTER(selftest_shuffles)

/// Shuffles of 64-bit and bf16 values (out64 = lane-rotated in64, out16 = xor-1 partner of in16).
extern "C" __global__ void selftest_shuffle_types(const long long* in64, long long* out64, const bf16* in16,
                                                  bf16* out16) {
    const int tid = threadIdx.x, lane = tid % 32;
    out64[tid] = __shfl_sync(FULL_MASK, in64[tid], (lane + 1) % 32);
    out16[tid] = __shfl_xor_sync(FULL_MASK, in16[tid], 1);
}
EMU_REGISTER(selftest_shuffle_types)

/// Ballot, any, all and a half-warp shuffle with a partial mask: per thread out[4·tid + k].
extern "C" __global__ void selftest_votes(const int* pred, unsigned* out) {
    const int tid = threadIdx.x, lane = tid % 32;
    const int p = pred[tid];
    out[4 * tid + 0] = __ballot_sync(FULL_MASK, p);
    out[4 * tid + 1] = (unsigned)__any_sync(FULL_MASK, p);
    out[4 * tid + 2] = (unsigned)__all_sync(FULL_MASK, p);
    // lanes 0..15 and 16..31 reduce separately, each with its own mask
    const unsigned half_mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
    unsigned s = (unsigned)p;
    for (int offset = 8; offset > 0; offset >>= 1) s += __shfl_xor_sync(half_mask, s, offset);
    out[4 * tid + 3] = s;
}
EMU_REGISTER(selftest_votes)

/// Row sums: one block per row of `in [rows, n]`; every thread writes the block's sum to
/// out[row·blockDim + tid] (all must agree).
extern "C" __global__ void selftest_block_sum(const float* in, float* out, int n) {
    const float* row = in + (long long)blockIdx.x * n;
    float v = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) v += row[i];
    out[blockIdx.x * blockDim.x + threadIdx.x] = block_reduce_sum(v);
}
EMU_REGISTER(selftest_block_sum)

/// Back-to-back block reductions, as a kernel may call them: max, max again, sum, sum again. Each
/// helper must leave its shared scratch free for the next call (its trailing barrier), or the race
/// detector sees the second call's writes race the first call's reads. out[tid] = the four results
/// of the block's values v and -v, in that order, at out[4·tid..4·tid+4].
extern "C" __global__ void selftest_block_reduce_twice(const float* in, float* out) {
    const float v = in[threadIdx.x];
    const float max_v = block_reduce_max(v);
    const float max_neg = block_reduce_max(-v);
    const float sum_v = block_reduce_sum(v);
    const float sum_neg = block_reduce_sum(-v);
    out[4 * threadIdx.x + 0] = max_v;
    out[4 * threadIdx.x + 1] = max_neg;
    out[4 * threadIdx.x + 2] = sum_v;
    out[4 * threadIdx.x + 3] = sum_neg;
}
EMU_REGISTER(selftest_block_reduce_twice)

/// Planted read-before-write: only the first `written` threads store to the shared array (static and
/// dynamic) before everyone reads its own slot. Block 0 writes every slot first in a separate phase,
/// so a later block sees NaN only if shared memory is poisoned again at every block start.
extern "C" __global__ void selftest_uninit_shared(float* out_static, float* out_dynamic, int written) {
    __shared__ float buf[256];
    float* dyn = dynamic_smem<float>();
    const int tid = threadIdx.x;
    if (blockIdx.x == 0) {
        buf[tid] = -1.0f;
        dyn[tid] = -1.0f;
        __syncthreads();
    }
    if (tid < written) {
        buf[tid] = (float)tid;
        dyn[tid] = (float)tid;
    }
    __syncthreads();
    out_static[blockIdx.x * blockDim.x + tid] = buf[tid];
    out_dynamic[blockIdx.x * blockDim.x + tid] = dyn[tid];
}
EMU_REGISTER(selftest_uninit_shared)

/// Atomics under contention: every thread of every block adds into the same few words.
extern "C" __global__ void selftest_atomics(const int* values, int n, float* fsum, int* isum, int* imax,
                                            unsigned* umax, unsigned* counter) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const int v = values[i];
        atomicAdd(fsum, 1.0f);
        atomicAdd(isum, v);
        atomicMax(imax, v);
        atomicMax(umax, (unsigned)v * 2654435761u);
        atomicAdd(counter, 1u);
    }
}
EMU_REGISTER(selftest_atomics)

/// f32 → bf16 and f32 → fp16 with round to nearest even, and back.
extern "C" __global__ void selftest_convert(const float* in, bf16* out_bf16, float* back_bf16, __half* out_f16,
                                            float* back_f16, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const bf16 b = __float2bfloat16(in[i]);
        out_bf16[i] = b;
        back_bf16[i] = __bfloat162float(b);
        const __half h = __float2half(in[i]);
        out_f16[i] = h;
        back_f16[i] = __half2float(h);
    }
}
EMU_REGISTER(selftest_convert)

/// The cost of a barrier: `rounds` × (__syncthreads + a shared-memory exchange).
extern "C" __global__ void selftest_sync_loop(float* out, int rounds) {
    __shared__ float slots[1024];
    float acc = 0.0f;
    for (int r = 0; r < rounds; ++r) {
        slots[threadIdx.x] = (float)(threadIdx.x + r);
        __syncthreads();
        acc += slots[(threadIdx.x + 1) % blockDim.x];
        __syncthreads();
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}
EMU_REGISTER(selftest_sync_loop)

/// The cost of a warp shuffle: `rounds` warp sums.
extern "C" __global__ void selftest_shuffle_loop(float* out, int rounds) {
    float acc = 0.0f;
    for (int r = 0; r < rounds; ++r) acc += warp_reduce_sum((float)(threadIdx.x + r));
    out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}
EMU_REGISTER(selftest_shuffle_loop)

// ---- misuse the emulator must reject (never launched on a GPU: they hang or are undefined there) ----

/// Threads below `exit_below` return before a `__syncthreads` that the others wait at.
extern "C" __global__ void selftest_bad_barrier_exit(float* out, int exit_below) {
    if ((int)threadIdx.x < exit_below) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}
EMU_REGISTER(selftest_bad_barrier_exit)

/// Even and odd warps wait at different `__syncthreads` call sites.
extern "C" __global__ void selftest_bad_barrier_sites(float* out) {
    if ((threadIdx.x / 32) % 2 == 0) {
        __syncthreads();
        out[threadIdx.x] = 1.0f;
    } else {
        __syncthreads();
        out[threadIdx.x] = 2.0f;
    }
}
EMU_REGISTER(selftest_bad_barrier_sites)

/// A shuffle whose mask leaves out the calling lane.
extern "C" __global__ void selftest_bad_mask(float* out) {
    out[threadIdx.x] = __shfl_xor_sync(0xfffffffeu, 1.0f, 1);
}
EMU_REGISTER(selftest_bad_mask)

/// Lane 0 of every warp exits before a full-mask shuffle, which CUDA allows (exited lanes take no
/// part); lane 1 then reads its exited partner: undefined on a GPU, NaN on the emulator.
extern "C" __global__ void selftest_warp_exit(float* out) {
    const int lane = threadIdx.x % 32;
    if (lane == 0) return;
    out[threadIdx.x] = __shfl_xor_sync(FULL_MASK, (float)lane, 1);
}
EMU_REGISTER(selftest_warp_exit)

/// Lane 0 waits at `__syncthreads` while the rest of its warp waits for it in a shuffle: a deadlock.
extern "C" __global__ void selftest_bad_warp_deadlock(float* out) {
    if (threadIdx.x % 32 == 0) {
        __syncthreads();
    } else {
        out[threadIdx.x] = __shfl_xor_sync(FULL_MASK, 1.0f, 1);
        __syncthreads();
    }
}
EMU_REGISTER(selftest_bad_warp_deadlock)

/// A failing device-side assert.
extern "C" __global__ void selftest_bad_assert(const int* values) {
    assert(values[threadIdx.x] >= 0);
}
EMU_REGISTER(selftest_bad_assert)
