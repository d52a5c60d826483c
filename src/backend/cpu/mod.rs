//! The CPU f32 reference backend: the oracle every other backend is checked against, and the
//! default where there is no GPU. Parallel across rows and (sequence, head) pairs (rayon); matrix
//! products through the `gemm` crate.
//!
//! Determinism: no result depends on how rayon schedules work. Reductions across rows (parameter
//! gradients of LayerNorm, RMSNorm and biases, `sum_squares`) use partial sums over fixed-size row chunks,
//! added in chunk order; the embedding backward buckets tokens by id so that each gradient row is
//! owned by one task that adds its tokens in order; `gemm` never splits the inner dimension
//! across threads, and where we split it ourselves (weight gradients, over tokens) the parts are
//! fixed by the shape and added in part order.
//!
//! The attention forward saves the softmax probabilities for the backward
//! (`attention_saved_len = n_head · Σ T_s²`): sequence by sequence, head by head, one row-major
//! `[T_s, T_s]` block `P[i, j]` (query i, key j, zeros above the diagonal) at offset
//! `n_head · Σ_{s'<s} T_{s'}² + h · T_s²`.
//!
//! Row kernels (softmaxes, GELU, LayerNorm rows, AdamW) are compiled three times, portable, with
//! AVX2 and with AVX-512, the widest the CPU has chosen at run time (`simd_kernel!`, in `simd`);
//! all give bit-identical results. Exponentials use a vectorisable Cephes-style `expf` (≈1 ulp).
//!
//! Layout: one module per op family, named as its contract (`backend/ops/<op>.rs`) and its kernel
//! file (`kernels/<op>.cu`). Each holds the op's public `spec` (plain, unoptimised loops, in f64
//! wherever rounding matters: the specification that the fast CPU version here and the CUDA
//! kernels are tested against), the fast row kernels, and the family's
//! `impl <Family>Ops for CpuBackend`. A backward is specified by finite differences of its
//! forward's spec, so most specs are forwards only. `simd` and `gemm` are the shared plumbing:
//! vector kernels and lane sums, matrix products.

mod gemm;
mod simd;

pub use simd::{cpu_flags, isa_paths, row_kernel_level, SimdLevel, CPU_ISA_ENV};

pub mod attention;
pub mod decode_attention;
pub mod embedding;
pub mod grad_norm;
pub mod layernorm;
pub mod logsoftmax_gather;
pub mod matmul;
pub mod optimizer;
pub mod pointwise;
pub mod preference_loss;
pub mod rmsnorm;
pub mod rope;
pub mod rows;
pub mod swiglu;

use anyhow::Result;

use super::{checks, Buffers};

/// The CPU backend. Stateless: buffers are plain `Vec`s, work runs on rayon's global pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

/// Elements per task for pointwise ops (large enough to amortise rayon's scheduling).
const POINTWISE_CHUNK: usize = 1 << 14;
/// Rows per partial sum in row reductions. A constant, so results do not depend on thread count.
const REDUCE_ROWS: usize = 32;

impl Buffers for CpuBackend {
    type Buf = Vec<f32>;
    type Ids = Vec<i32>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    // ---- memory ------------------------------------------------------------------------------
    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }
    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }
    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
    fn upload_ids(&self, ids: &[i32]) -> Result<Vec<i32>> {
        Ok(ids.to_vec())
    }
    fn download_ids(&self, ids: &Vec<i32>) -> Result<Vec<i32>> {
        Ok(ids.clone())
    }
    fn buf_len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn resize(&self, buf: &mut Vec<f32>, len: usize) -> Result<()> {
        // Vec keeps its capacity when shrinking, so a batch that fits reuses the storage. Growing
        // reserves exactly: `resize` alone may double the capacity, and a [rows, V] logits buffer
        // would then hold up to twice what the largest batch needs.
        if len > buf.capacity() {
            buf.reserve_exact(len - buf.len());
        }
        buf.resize(len, 0.0);
        Ok(())
    }

    fn fill(&self, buf: &mut Vec<f32>, value: f32) -> Result<()> {
        buf.fill(value);
        Ok(())
    }
    fn copy(&self, dst: &mut Vec<f32>, src: &Vec<f32>) -> Result<()> {
        checks::copy(dst.len(), src.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_grows_to_exactly_the_length_asked_and_keeps_storage_when_shrinking() {
        let b = CpuBackend::new();
        let mut buf = b.zeros(1000).unwrap();
        for len in [1001, 1500, 2500, 4097] {
            b.resize(&mut buf, len).unwrap();
            assert_eq!((buf.len(), buf.capacity()), (len, len), "growing to {len}");
        }
        b.resize(&mut buf, 10).unwrap();
        b.resize(&mut buf, 4000).unwrap();
        assert_eq!((buf.len(), buf.capacity()), (4000, 4097), "a smaller batch reuses the storage");
    }
}
