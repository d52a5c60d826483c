// kernels/mma.cuh — warp-level tensor-core operations on bf16: the matrix product mma.m16n8k16 (bf16
// inputs, f32 accumulator) and the shared-memory fragment loads ldmatrix (.x2, .x4, and their .trans
// forms). Included by the kernel files that use tensor cores (attention_mma.cu, selftest_mma.cu).
//
// Under nvcc each operation is its PTX instruction (sm_80 and later). On the emulated device each one is
// written from the per-lane fragment layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with
// floating point type", "Warp-level matrix load instruction: ldmatrix"); the lanes exchange their
// registers with warp shuffles, as the hardware exchanges them, so a fragment held by the wrong lane
// gives a wrong product there too. With lane = threadIdx.x % 32, groupID g = lane >> 2 and
// threadID_in_group t = lane % 4, a lane holds (each 32-bit register two bf16, the lower-indexed
// element in the low half):
//
//     A (16×16, row-major)  a0,a1: (g,   2t..2t+1)   a2,a3: (g+8, 2t..2t+1)
//                           a4,a5: (g, 2t+8..2t+9)   a6,a7: (g+8, 2t+8..2t+9)        → MmaA.r[0..3]
//     B (16×8, "col")       b0,b1: (k = 2t..2t+1, n = g)   b2,b3: (k = 2t+8..2t+9, n = g) → MmaB.r[0..1]
//     C, D (16×8, f32)      c0,c1: (g, 2t..2t+1)   c2,c3: (g+8, 2t..2t+1)               → float[4]
//
// ldmatrix .x1/.x2/.x4 loads one, two or four 8×8 b16 matrices: lanes 8i..8i+7 give the addresses of the
// eight 16-byte rows of matrix i (for .x2, lanes 0..15; the others' addresses are ignored), and each lane
// receives, in register i, the elements (row g, columns 2t, 2t+1) of matrix i; with .trans, those of
// the transposed matrix: (rows 2t, 2t+1, column g). So an 8×8 block of a row-major A or of a B stored
// one column per row (K in Q·Kᵀ) loads without .trans, and a B stored row-major (V in P·V) with .trans.
//
// The emulated product computes each bf16·bf16 product exactly in f32 (8+8 significant bits) and sums
// them onto the accumulator in f32 in the order of k; the hardware's internal order and rounding of the
// sum differ, so results agree with a GPU to f32 rounding, not bit for bit.
#pragma once

#include "common.cuh"

/// An A operand of mma.m16n8k16 (16×16 bf16, row-major): four registers of two bf16.
struct MmaA {
    uint32_t r[4];
};
/// A B operand of mma.m16n8k16 (16×8 bf16, "col": stored one column n per row): two registers.
struct MmaB {
    uint32_t r[2];
};

/// Two floats rounded to bf16 and packed into one register (x in the low half), as an A or B register.
__device__ __forceinline__ uint32_t pack_bf16x2(float x, float y) {
    const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16(x));
    const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16(y));
    return lo | (hi << 16);
}

#ifdef EMU_DEVICE

/// The lane of the calling thread in its warp (1-D blocks).
__device__ __forceinline__ int mma_lane() { return threadIdx.x % 32; }

/// The low and high bf16 of a register, as floats.
__device__ __forceinline__ float mma_lo(uint32_t r) { return __bfloat162float(__ushort_as_bfloat16(r & 0xffffu)); }
__device__ __forceinline__ float mma_hi(uint32_t r) { return __bfloat162float(__ushort_as_bfloat16(r >> 16)); }

__device__ __forceinline__ uint64_t mma_pair(uint32_t lo, uint32_t hi) { return lo | ((uint64_t)hi << 32); }

/// acc (16×8 f32 fragment) += A·B. Lane (g, t) gathers rows g and g+8 of A from lanes 4g..4g+3 and
/// columns 2t and 2t+1 of B from lanes 8t..8t+3 and 8t+4..8t+7, then forms its four sums.
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&acc)[4], const MmaA& a, const MmaB& b) {
    const int lane = mma_lane(), g = lane >> 2, t = lane & 3;
    float a_row[2][16], b_col[2][16];  // rows g, g+8 of A; columns 2t, 2t+1 of B; by k
#pragma unroll
    for (int src = 0; src < 4; ++src) {  // threadID_in_group of the lane sending
        const uint64_t row_lo = __shfl_sync(FULL_MASK, mma_pair(a.r[0], a.r[2]), 4 * g + src);
        const uint64_t row_hi = __shfl_sync(FULL_MASK, mma_pair(a.r[1], a.r[3]), 4 * g + src);
        const uint64_t col_0 = __shfl_sync(FULL_MASK, mma_pair(b.r[0], b.r[1]), 4 * (2 * t) + src);
        const uint64_t col_1 = __shfl_sync(FULL_MASK, mma_pair(b.r[0], b.r[1]), 4 * (2 * t + 1) + src);
        const uint64_t words[4] = {row_lo, row_hi, col_0, col_1};
        float* dst[4] = {a_row[0], a_row[1], b_col[0], b_col[1]};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            const uint32_t k_lo = (uint32_t)words[w], k_hi = (uint32_t)(words[w] >> 32);
            dst[w][2 * src] = mma_lo(k_lo);  // k = 2·src, 2·src + 1
            dst[w][2 * src + 1] = mma_hi(k_lo);
            dst[w][2 * src + 8] = mma_lo(k_hi);  // k = 2·src + 8, 2·src + 9
            dst[w][2 * src + 9] = mma_hi(k_hi);
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float* row = a_row[i / 2];
        const float* col = b_col[i % 2];
        float sum = acc[i];
#pragma unroll
        for (int k = 0; k < 16; ++k) sum += row[k] * col[k];  // each product exact in f32
        acc[i] = sum;
    }
}

/// The 32-bit word (two b16) at column pair `t` of a shared-memory row.
__device__ __forceinline__ uint32_t mma_row_word(const bf16* row, int t) {
    return (uint32_t)__bfloat16_as_ushort(row[2 * t]) | ((uint32_t)__bfloat16_as_ushort(row[2 * t + 1]) << 16);
}

/// Register i of ldmatrix (matrix i): the row addresses come from lanes 8i..8i+7.
template <int N, bool TRANS>
__device__ __forceinline__ void ldmatrix_emulated(uint32_t (&r)[N], const bf16* row) {
    const int lane = mma_lane(), g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        if (!TRANS) {
            const bf16* mine = __shfl_sync(FULL_MASK, row, 8 * i + g);  // row g of matrix i
            r[i] = mma_row_word(mine, t);
        } else {
            const bf16* row0 = __shfl_sync(FULL_MASK, row, 8 * i + 2 * t);  // rows 2t, 2t+1, column g
            const bf16* row1 = __shfl_sync(FULL_MASK, row, 8 * i + 2 * t + 1);
            r[i] = (uint32_t)__bfloat16_as_ushort(row0[g]) | ((uint32_t)__bfloat16_as_ushort(row1[g]) << 16);
        }
    }
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* row) { ldmatrix_emulated<4, false>(r, row); }
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const bf16* row) { ldmatrix_emulated<2, false>(r, row); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* row) {
    ldmatrix_emulated<4, true>(r, row);
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const bf16* row) {
    ldmatrix_emulated<2, true>(r, row);
}

#else  // nvcc: the PTX instructions

/// acc (16×8 f32 fragment) += A·B on the tensor cores.
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&acc)[4], const MmaA& a, const MmaB& b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
}

__device__ __forceinline__ unsigned mma_smem_addr(const bf16* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(mma_smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const bf16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(mma_smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(mma_smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const bf16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(mma_smem_addr(row)));
}

#endif
