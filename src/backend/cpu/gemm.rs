//! Matrix products for the CPU backend, through the `gemm` crate: strided views ([`Mat`]), one
//! call shape for every product ([`gemm_f32`]), and weight gradients split over their token
//! dimension ([`accumulate_weight_grad`]) in parts fixed by the shape, so that their bits never
//! depend on the thread count.

use ::gemm::Parallelism;
use rayon::prelude::*;

/// Products with at least this many multiply-adds run multi-threaded inside `gemm`.
const GEMM_PARALLEL_FLOPS: usize = 1 << 18;
/// Tokens per part when a weight gradient's token dimension is split (see [`weight_grad_parts`]).
const WGRAD_PART_TOKENS: usize = 512;
/// Most parts a weight gradient is split into.
const WGRAD_MAX_PARTS: usize = 8;
/// Bound on the scratch partial gradients of a split weight gradient, in elements (16 MiB).
const WGRAD_SCRATCH_ELEMS: usize = 1 << 22;

/// A raw pointer that may cross threads. Used only where parallel tasks write provably disjoint
/// strided regions of one buffer (attention heads), which safe slices cannot express.
#[derive(Clone, Copy)]
pub(super) struct SyncPtr(pub(super) *mut f32);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer. (A method, so that closures capture the whole `SyncPtr`, not its field.)
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// A strided matrix view for [`gemm_f32`]: `ptr[r * rs + c * cs]` is element `(r, c)`.
#[derive(Clone, Copy)]
pub(super) struct Mat {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}
// A `Mat` is only ever read through, so tasks on several threads may share one.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

impl Mat {
    pub(super) fn new(ptr: *const f32, rs: usize, cs: usize) -> Self {
        Mat { ptr, rs: rs as isize, cs: cs as isize }
    }

    /// The view whose element `(0, 0)` is this one's `(r, c)`.
    pub(super) fn from(self, r: usize, c: usize) -> Self {
        Mat { ptr: self.ptr.wrapping_offset(r as isize * self.rs + c as isize * self.cs), ..self }
    }
}

/// `dst[m, n] = (accumulate ? dst : 0) + scale · lhs[m, k] · rhs[k, n]`.
///
/// # Safety
/// Every view must address valid memory for its shape; `dst` must not alias `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    parallel: bool,
) {
    let parallelism =
        if parallel && m * n * k >= GEMM_PARALLEL_FLOPS { Parallelism::Rayon(0) } else { Parallelism::None };
    ::gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        1.0,
        scale,
        false,
        false,
        false,
        parallelism,
    );
}

/// How many parts of the token dimension a weight gradient `[m, n]` summed over `k` tokens is split
/// into: about [`WGRAD_PART_TOKENS`] tokens each, at most [`WGRAD_MAX_PARTS`], and only as many as
/// [`WGRAD_SCRATCH_ELEMS`] of scratch allows. A function of the shape alone, never of the thread
/// count, so the gradient's bits are the same on any machine.
fn weight_grad_parts(m: usize, n: usize, k: usize) -> usize {
    let by_scratch = 1 + WGRAD_SCRATCH_ELEMS / (m * n).max(1);
    (k / WGRAD_PART_TOKENS).min(WGRAD_MAX_PARTS).min(by_scratch).max(1)
}

/// `dst[m, n] += lhs[m, k] · rhs[k, n]` for a weight gradient, whose inner dimension `k` (tokens)
/// is long and whose output is small.
///
/// Why split: `gemm` parallelises over the output only, and for a small output with a long `k`
/// (the QKV weight gradient: 128 × 384 over 2,048 tokens) each thread repacks the whole of one
/// operand for a narrow slice of columns, and meets at two barriers per 512-token block; it ran no
/// faster on two threads than on one. Here each part of [`weight_grad_parts`] runs `gemm` over its
/// own tokens (single-threaded when there are at least as many parts as threads), part 0 straight
/// into `dst`, the others into scratch, added after in part order: `dst = ((dst + P₀) + P₁) + …`.
///
/// # Safety
/// As [`gemm_f32`]: the views address valid memory for their shapes, `dst` aliases neither.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn accumulate_weight_grad(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: Mat,
    rhs: Mat,
) {
    let parts = weight_grad_parts(m, n, k);
    if parts == 1 {
        gemm_f32(m, n, k, dst, dst_rs, true, lhs, rhs, 1.0, true);
        return;
    }
    // Only the speed depends on this: `gemm`'s results do not depend on its threading.
    let inner_parallel = parts < rayon::current_num_threads();
    let tokens = k.div_ceil(parts);
    let part_views = |p: usize| {
        let t0 = p * tokens;
        let len = tokens.min(k.saturating_sub(t0));
        (len, lhs.from(0, t0), rhs.from(t0, 0))
    };
    let dst = SyncPtr(dst);
    let mut scratch = vec![0.0f32; (parts - 1) * m * n];
    rayon::join(
        || {
            let (len, lhs_0, rhs_0) = part_views(0);
            // SAFETY: part 0 of the caller's views; `dst` is written by this task only.
            unsafe { gemm_f32(m, n, len, dst.get(), dst_rs, true, lhs_0, rhs_0, 1.0, inner_parallel) }
        },
        || {
            scratch.par_chunks_mut(m * n).enumerate().for_each(|(i, partial)| {
                let (len, lhs_p, rhs_p) = part_views(i + 1);
                // SAFETY: a part of the caller's views; `partial` is this task's own [m, n] matrix.
                unsafe { gemm_f32(m, n, len, partial.as_mut_ptr(), n, false, lhs_p, rhs_p, 1.0, inner_parallel) }
            });
        },
    );
    // dst += P₁ + … in part order, in parallel over rows of dst.
    (0..m).into_par_iter().with_min_len(16).for_each(|r| {
        // SAFETY: row r of dst (n elements at stride 1 from r · dst_rs) is touched by this task only.
        let row = unsafe { std::slice::from_raw_parts_mut(dst.get().add(r * dst_rs), n) };
        for partial in scratch.chunks_exact(m * n) {
            row.iter_mut().zip(&partial[r * n..(r + 1) * n]).for_each(|(d, &p)| *d += p);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_gradients_split_by_shape_within_the_scratch_bound() {
        assert_eq!(weight_grad_parts(128, 384, 2048), 4, "the step's QKV weight gradient");
        assert_eq!(weight_grad_parts(128, 384, 1023), 1, "under two parts' worth of tokens");
        assert_eq!(weight_grad_parts(64, 64, 1 << 20), WGRAD_MAX_PARTS);
        // GPT-2 small's MLP weight: 2.4 M elements, so one scratch partial at most.
        assert_eq!(weight_grad_parts(768, 3072, 8192), 2);
        assert_eq!(weight_grad_parts(4096, 4096, 8192), 1);
    }
}
