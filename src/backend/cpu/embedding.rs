//! Token and position embeddings (contract: `backend/ops/embedding.rs`, kernels:
//! `kernels/embedding.cu`): `out[t] = wte[tokens[t]] (+ wpe[positions[t]])`, and its backward, a
//! deterministic scatter-add into the tables.

use anyhow::Result;
use rayon::prelude::*;

use super::CpuBackend;
use crate::backend::{checks, EmbeddingOps};

/// The specification, in f64: plain loops that the fast version below and the CUDA kernels are
/// held to. The backward is specified by finite differences of the forward.
pub mod spec {
    /// `out[t, j] = wte[tokens[t], j] + wpe[positions[t], j]` (no second term without `wpe`),
    /// `[tokens.len(), c]`.
    pub fn forward(tokens: &[i32], positions: &[i32], wte: &[f64], wpe: Option<&[f64]>, c: usize) -> Vec<f64> {
        let mut out = vec![0.0; tokens.len() * c];
        for t in 0..tokens.len() {
            for j in 0..c {
                let pe = wpe.map_or(0.0, |wpe| wpe[positions[t] as usize * c + j]);
                out[t * c + j] = wte[tokens[t] as usize * c + j] + pe;
            }
        }
        out
    }
}

impl EmbeddingOps for CpuBackend {
    fn embedding_forward(
        &self,
        out: &mut Vec<f32>,
        tokens: &Vec<i32>,
        positions: &Vec<i32>,
        wte: &Vec<f32>,
        wpe: Option<&Vec<f32>>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::embedding_forward(out.len(), tokens, positions, wte.len(), wpe.map(Vec::len), n, c)?;
        out.par_chunks_mut(c).with_min_len(64).zip(tokens.par_iter().zip(positions.par_iter())).for_each(
            |(row, (&tok, &pos))| {
                let te = &wte[tok as usize * c..][..c];
                match wpe {
                    Some(wpe) => {
                        let pe = &wpe[pos as usize * c..][..c];
                        for ((o, &a), &b) in row.iter_mut().zip(te).zip(pe) {
                            *o = a + b;
                        }
                    }
                    None => row.copy_from_slice(te),
                }
            },
        );
        Ok(())
    }

    fn embedding_backward(
        &self,
        dwte: &mut Vec<f32>,
        dwpe: Option<&mut Vec<f32>>,
        dout: &Vec<f32>,
        tokens: &Vec<i32>,
        positions: &Vec<i32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::embedding_backward(dwte.len(), dwpe.as_ref().map(|d| d.len()), dout.len(), tokens, positions, n, c)?;
        match dwpe {
            Some(dwpe) => {
                rayon::join(|| scatter_add_rows(dwte, dout, tokens, c), || scatter_add_rows(dwpe, dout, positions, c));
            }
            None => scatter_add_rows(dwte, dout, tokens, c),
        }
        Ok(())
    }
}

/// `dtable[ids[t]] += dout[t]` for every row t, deterministically: tokens are bucketed by id
/// (a counting sort that keeps token order), then each table row is owned by one task that adds
/// its tokens in order.
fn scatter_add_rows(dtable: &mut [f32], dout: &[f32], ids: &[i32], c: usize) {
    let rows = dtable.len() / c;
    let mut bucket_start = vec![0u32; rows + 1];
    for &id in ids {
        bucket_start[id as usize + 1] += 1;
    }
    for r in 0..rows {
        bucket_start[r + 1] += bucket_start[r];
    }
    let mut fill = bucket_start.clone();
    let mut order = vec![0u32; ids.len()];
    for (t, &id) in ids.iter().enumerate() {
        order[fill[id as usize] as usize] = t as u32;
        fill[id as usize] += 1;
    }
    dtable.par_chunks_mut(c).enumerate().with_min_len(64).for_each(|(r, drow)| {
        for &t in &order[bucket_start[r] as usize..bucket_start[r + 1] as usize] {
            let src = &dout[t as usize * c..][..c];
            drow.iter_mut().zip(src).for_each(|(d, &s)| *d += s);
        }
    });
}
