//! Row selection: `gather_rows` copies chosen rows of a tensor out, `scatter_rows` puts their
//! gradient back and zeroes the rest (contract: `backend/ops/rows.rs`, kernels: `kernels/rows.cu`).

use anyhow::Result;
use rayon::prelude::*;

use super::CpuBackend;
use crate::backend::{checks, RowOps};

/// The specification that the fast version below and the CUDA kernels are held to. Both ops are
/// exact copies, so the spec works in f32 and is matched bit for bit.
pub mod spec {
    /// `out[i] = inp[rows[i]]`, `[rows.len(), c]`.
    pub fn gather_rows(inp: &[f32], rows: &[i32], c: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(rows.len() * c);
        for &r in rows {
            out.extend_from_slice(&inp[r as usize * c..][..c]);
        }
        out
    }

    /// `dinp[rows[i]] = dout[i]`, every other row of `dinp` `[n, c]` zero.
    pub fn scatter_rows(dout: &[f32], rows: &[i32], n: usize, c: usize) -> Vec<f32> {
        let mut dinp = vec![0.0; n * c];
        for (i, &r) in rows.iter().enumerate() {
            dinp[r as usize * c..][..c].copy_from_slice(&dout[i * c..][..c]);
        }
        dinp
    }
}

impl RowOps for CpuBackend {
    fn gather_rows(
        &self,
        out: &mut Vec<f32>,
        inp: &Vec<f32>,
        rows: &Vec<i32>,
        m: usize,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::gather_rows(out.len(), inp.len(), rows, m, n, c)?;
        out.par_chunks_mut(c).zip(rows.par_iter()).with_min_len(64).for_each(|(dst, &r)| {
            dst.copy_from_slice(&inp[r as usize * c..][..c]);
        });
        Ok(())
    }

    fn scatter_rows(
        &self,
        dinp: &mut Vec<f32>,
        dout: &Vec<f32>,
        rows: &Vec<i32>,
        m: usize,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::scatter_rows(dinp.len(), dout.len(), rows, m, n, c)?;
        // Each output row finds its source by binary search (rows are increasing): one pass that
        // writes every element once.
        dinp.par_chunks_mut(c).enumerate().with_min_len(64).for_each(|(t, dst)| {
            match rows.binary_search(&(t as i32)) {
                Ok(i) => dst.copy_from_slice(&dout[i * c..][..c]),
                Err(_) => dst.fill(0.0),
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::simd::testing::{assert_same_bits, values};

    /// `gather_rows` copies the chosen rows exactly; `scatter_rows` puts them back and zeroes the
    /// rest, and is its adjoint: `<gather(x), y> = <x, scatter(y)>` (the backward of a linear map).
    #[test]
    fn gather_and_scatter_rows_are_exact_adjoint_copies() {
        let cpu = CpuBackend::new();
        let (n, c) = (23, 5);
        let x = values(n * c, 7, 1.0);
        let some: Vec<i32> = (0..n as i32).filter(|t| t % 3 != 1).collect();
        for rows in [some, vec![], (0..n as i32).collect(), vec![n as i32 - 1]] {
            let m = rows.len();
            let mut gathered = vec![f32::NAN; m * c];
            cpu.gather_rows(&mut gathered, &x, &rows, m, n, c).unwrap();
            for (i, &r) in rows.iter().enumerate() {
                assert_same_bits("gathered row", &gathered[i * c..][..c], &x[r as usize * c..][..c]);
            }
            let y = values(m * c, 8, 1.0);
            let mut scattered = vec![f32::NAN; n * c];
            cpu.scatter_rows(&mut scattered, &y, &rows, m, n, c).unwrap();
            for t in 0..n {
                let want = match rows.iter().position(|&r| r as usize == t) {
                    Some(i) => y[i * c..][..c].to_vec(),
                    None => vec![0.0; c],
                };
                assert_same_bits("scattered row", &scattered[t * c..][..c], &want);
            }
            assert_same_bits("gathered vs spec", &gathered, &spec::gather_rows(&x, &rows, c));
            assert_same_bits("scattered vs spec", &scattered, &spec::scatter_rows(&y, &rows, n, c));
            let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(&p, &q)| p as f64 * q as f64).sum::<f64>();
            let (lhs, rhs) = (dot(&gathered, &y), dot(&x, &scattered));
            assert!((lhs - rhs).abs() <= 1e-12 * (1.0 + lhs.abs()), "adjoint: {lhs} vs {rhs}");
        }
        let mut out = vec![0.0; 2 * c];
        let err = cpu.gather_rows(&mut out, &x, &vec![3, 3], 2, n, c).unwrap_err().to_string();
        assert!(err.contains("strictly increasing"), "{err}");
        let err = cpu.gather_rows(&mut out, &x, &vec![3, n as i32], 2, n, c).unwrap_err().to_string();
        assert!(err.contains("rows[1]"), "{err}");
        let err = cpu.scatter_rows(&mut out, &x[..2 * c].to_vec(), &vec![0, 1], 2, n, c).unwrap_err().to_string();
        assert!(err.contains("scatter_rows") && err.contains("dinp"), "{err}");
    }
}
