// kernels/selftest_races.cu — deliberately racy kernels that the emulated device's shared-memory race
// detector (kernels/emu/racecheck.cpp) must report, each beside a correct twin that it must pass
// (tests/emu.rs). Not used by training. `fixed` selects the twin: the same code with the
// barrier or warp synchronisation that the racy version leaves out.
#include "common.cuh"

/// Tree reduction of one block's `blockDim.x` (a power of two, at most 256) values in shared memory:
/// out[blockIdx.x] = Σ x. Racy: no `__syncthreads` between the levels of the tree, so a thread adds
/// a partial sum that another warp has not finished (or overwrites one that another thread still
/// reads).
extern "C" __global__ void selftest_race_reduction(float* out, const float* x, int fixed) {
    __shared__ float partial[256];
    const int tid = threadIdx.x;
    partial[tid] = x[blockIdx.x * blockDim.x + tid];
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (tid < stride) partial[tid] += partial[tid + stride];
        if (fixed) __syncthreads();
    }
    if (tid == 0) out[blockIdx.x] = partial[0];
}
EMU_REGISTER(selftest_race_reduction)

/// For each of `tiles` tiles of blockDim.x values: stage the tile into shared memory, wait, then
/// out[t] += the value of the next thread. Racy: no barrier after the reads, so the next tile's
/// staging overwrites values that slower threads have not read yet.
extern "C" __global__ void selftest_race_tile_reuse(float* out, const float* x, int tiles, int fixed) {
    __shared__ float tile[256];
    const int tid = threadIdx.x, n = blockDim.x;
    float acc = 0.0f;
    for (int t = 0; t < tiles; ++t) {
        tile[tid] = x[t * n + tid];
        __syncthreads();
        acc += tile[(tid + 1) % n];
        if (fixed) __syncthreads();
    }
    out[tid] = acc;
}
EMU_REGISTER(selftest_race_tile_reuse)

/// One warp swaps values between neighbouring lanes through shared memory: out[l] = x[l ^ 1]. Racy:
/// no `__syncwarp` between the write and the read (lanes of a warp are not in lockstep since Volta).
extern "C" __global__ void selftest_race_warp_exchange(float* out, const float* x, int fixed) {
    __shared__ float lanes[32];
    const int lane = threadIdx.x % 32;
    lanes[lane] = x[lane];
    if (fixed) __syncwarp();
    out[lane] = lanes[lane ^ 1];
}
EMU_REGISTER(selftest_race_warp_exchange)

/// The warp exchange with a shuffle as the synchronisation (`fixed`): a warp collective orders the
/// shared-memory accesses of the lanes it takes, as `__syncwarp` does. out[l] = x[l ^ 1] + 0.
extern "C" __global__ void selftest_race_warp_collective(float* out, const float* x, int fixed) {
    __shared__ float lanes[32];
    const int lane = threadIdx.x % 32;
    lanes[lane] = x[lane];
    const float zero = fixed ? __shfl_xor_sync(FULL_MASK, 0.0f, 1) : 0.0f;
    out[lane] = lanes[lane ^ 1] + zero;
}
EMU_REGISTER(selftest_race_warp_collective)

/// Dynamic shared memory (`blockDim.x` floats): out[t] = x[(t + 1) mod n] through the buffer. Racy:
/// no barrier between the writes and the reads.
extern "C" __global__ void selftest_race_dynamic(float* out, const float* x, int fixed) {
    float* buf = dynamic_smem<float>();
    const int tid = threadIdx.x, n = blockDim.x;
    buf[tid] = x[tid];
    if (fixed) __syncthreads();
    out[tid] = buf[(tid + 1) % n];
}
EMU_REGISTER(selftest_race_dynamic)

/// Not a race: neighbouring threads write the two bf16 halves of one 4-byte word in the same phase,
/// then (after a barrier) each reads its neighbour's half. out[t] = x[t ^ 1]. `fixed` is ignored.
extern "C" __global__ void selftest_race_bf16_halves(float* out, const float* x, int fixed) {
    (void)fixed;
    __shared__ bf16 halves[256];
    const int tid = threadIdx.x;
    halves[tid] = __float2bfloat16(x[tid]);
    __syncthreads();
    out[tid] = __bfloat162float(halves[tid ^ 1]);
}
EMU_REGISTER(selftest_race_bf16_halves)

/// The order the emulator ran the threads in: ticket[block · blockDim.x + tid] = how many threads of
/// the launch ran this line before (a global atomic counter, `counter[0]` starting at 0).
extern "C" __global__ void selftest_schedule_order(int* ticket, int* counter) {
    ticket[blockIdx.x * blockDim.x + threadIdx.x] = atomicAdd(counter, 1);
}
EMU_REGISTER(selftest_schedule_order)
