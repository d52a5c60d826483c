// kernels/selftest_mma.cu — the tensor-core wrappers of mma.cuh on known matrices (tests/mma_fragments.rs,
// on the emulated device and on a GPU): every lane's registers after each ldmatrix form and the product
// of mma.m16n8k16, which the test compares with the PTX ISA's fragment tables written out on its own.
// Not used by training.
#include "mma.cuh"

/// One warp. Inputs (global): A [16][16] row-major and its transpose Aᵀ [16][16]; B [16][8] (k, n) as
/// Bᵀ [8][16] (one column n per row) and as B [16][8] row-major; C [16][8] f32 row-major. Writes per
/// lane `regs[lane][0..12]` = A by ldmatrix.x4 (4 registers), A by ldmatrix.x4.trans of Aᵀ (4), B by
/// ldmatrix.x2 of Bᵀ (2), B by ldmatrix.x2.trans of B (2); and `d[lane][0..8]` = the accumulator
/// C + A·B with the first B (4 floats), then with the second (4).
extern "C" __global__ void selftest_mma_fragments(uint32_t* regs, float* d, const bf16* a, const bf16* a_t,
                                                  const bf16* b_t, const bf16* b, const float* c) {
    __shared__ __align__(16) bf16 a_s[16 * 16];
    __shared__ __align__(16) bf16 a_t_s[16 * 16];
    __shared__ __align__(16) bf16 b_t_s[8 * 16];
    __shared__ __align__(16) bf16 b_s[16 * 8];
    const int lane = threadIdx.x;
    for (int e = lane; e < 256; e += 32) {
        a_s[e] = a[e];
        a_t_s[e] = a_t[e];
    }
    for (int e = lane; e < 128; e += 32) {
        b_t_s[e] = b_t[e];
        b_s[e] = b[e];
    }
    __syncwarp();

    // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
    MmaA frag_a, frag_a_t;
    ldmatrix_x4(frag_a.r, a_s + (lane % 16) * 16 + 8 * (lane / 16));
    // The same blocks from Aᵀ, transposed: block (rows m, k) of A is block (rows k, columns m) of Aᵀ.
    ldmatrix_x4_trans(frag_a_t.r, a_t_s + ((lane % 8) + 8 * (lane / 16)) * 16 + 8 * ((lane / 8) % 2));
    // B: matrices (n 0-7, k 0-7), (n 0-7, k 8-15) of Bᵀ; lanes 16-31 repeat lanes 0-15 (ignored).
    MmaB frag_b, frag_b_t;
    ldmatrix_x2(frag_b.r, b_t_s + (lane % 8) * 16 + 8 * ((lane / 8) % 2));
    // From row-major B, transposed: matrices (k 0-7, n 0-7), (k 8-15, n 0-7).
    ldmatrix_x2_trans(frag_b_t.r, b_s + (lane % 16) * 8);

    uint32_t* mine = regs + lane * 12;
    for (int i = 0; i < 4; ++i) {
        mine[i] = frag_a.r[i];
        mine[4 + i] = frag_a_t.r[i];
    }
    for (int i = 0; i < 2; ++i) {
        mine[8 + i] = frag_b.r[i];
        mine[10 + i] = frag_b_t.r[i];
    }

    // C in the accumulator layout: c0,c1 at (g, 2t..2t+1), c2,c3 at (g+8, 2t..2t+1).
    const int g = lane / 4, t = lane % 4;
    float acc[4], acc_t[4];
    for (int i = 0; i < 4; ++i) acc[i] = acc_t[i] = c[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
    mma_m16n8k16_bf16(acc, frag_a, frag_b);
    mma_m16n8k16_bf16(acc_t, frag_a_t, frag_b_t);
    for (int i = 0; i < 4; ++i) {
        d[lane * 8 + i] = acc[i];
        d[lane * 8 + 4 + i] = acc_t[i];
    }
}
EMU_REGISTER(selftest_mma_fragments)
