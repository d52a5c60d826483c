//! Decode attention: one new query row per sequence against that sequence's cached keys and values,
//! multi-head or grouped-query (kernels/decode_attention.cu, CPU twin in cpu/decode_attention.rs).
//! What a decoding step with a KV cache runs in place of the packed causal attention: O(T) per new
//! token instead of the whole cache again.
//!
//! The trait is the contract every backend implements; `check` holds the argument checks every
//! backend runs first, so that the same mistake gives the same error everywhere.

use anyhow::Result;

use crate::backend::{Buffers, QkvLayout, Window};

/// Where each query's keys and values are in the cache: query `i` attends to the cache rows
/// `starts[i] .. starts[i] + lens[i]` (its own token's row included, as the last). Made once per
/// decoding step and read by every layer.
pub struct DecodeSpans<B: Buffers + ?Sized> {
    /// `[M]` first cache row of each query's sequence, device copy.
    pub starts: B::Ids,
    /// `[M]` cache rows each query attends to, device copy.
    pub lens: B::Ids,
    /// The same on the host (checks, launch planning, CPU loops).
    pub host_starts: Vec<i32>,
    pub host_lens: Vec<i32>,
    /// The longest span.
    pub max_len: usize,
}

/// The part of a span of `len` rows a query reads under `window`: `(rows skipped at the start,
/// rows read)`.
pub fn windowed_span(len: usize, window: Window) -> (usize, usize) {
    let read = window.map_or(len, |w| len.min(w));
    (len - read, read)
}

impl<B: Buffers + ?Sized> DecodeSpans<B> {
    pub fn new(backend: &B, starts: &[i32], lens: &[i32]) -> Result<Self> {
        anyhow::ensure!(starts.len() == lens.len(), "decode spans: {} starts for {} lengths", starts.len(), lens.len());
        let max_len = lens.iter().map(|&l| l.max(0) as usize).max().unwrap_or(0);
        Ok(Self {
            starts: backend.upload_ids(starts)?,
            lens: backend.upload_ids(lens)?,
            host_starts: starts.to_vec(),
            host_lens: lens.to_vec(),
            max_len,
        })
    }

    /// Number of queries.
    pub fn num_queries(&self) -> usize {
        self.host_lens.len()
    }
}

pub trait DecodeAttentionOps: Buffers {
    /// For each query `i` (row `i` of `qkv [M, layout.width()]`, of which only the q heads are read)
    /// and query head `h`, with `g = layout.kv_head_of(h)`, `scale = 1 / √head_dim` and the rows
    /// `r_j = starts[i] + j` of `cache [R, layout.width()]` (qkv rows, [`QkvLayout`]):
    ///
    /// ```text
    /// P_j = softmax_j(scale · q_i,h · k_{r_j},g)   (j < lens[i])      out_i,h = Σ_j P_j v_{r_j},g
    /// ```
    ///
    /// A query with `lens[i] = 0` gets zeros. With a sliding `window` only the span's last
    /// `window` rows count (`j ≥ lens[i] − window`: the rows of the keys at most `window − 1`
    /// positions before the query, the span's last row being the query's own); the older ones stay
    /// in the cache, unread. Overwrites `out [M, layout.q_width()]`.
    fn decode_attention_forward(
        &self,
        out: &mut Self::Buf,
        qkv: &Self::Buf,
        cache: &Self::Buf,
        spans: &DecodeSpans<Self>,
        layout: QkvLayout,
        window: Window,
    ) -> Result<()>;
}

/// Argument checks, one per method, with its name and argument order (see `crate::backend::checks`).
pub(crate) mod check {
    use anyhow::{ensure, Result};

    use crate::backend::checks::check_len;
    use crate::backend::ops::attention::check::{qkv_layout, window as check_window};
    use crate::backend::{QkvLayout, Window};

    /// Lengths match the layout and the `M` spans, every span lies inside the cache, and a window
    /// holds a key.
    pub(crate) fn decode_attention_forward(
        out: usize,
        qkv: usize,
        cache: usize,
        starts: &[i32],
        lens: &[i32],
        layout: QkvLayout,
        window: Window,
    ) -> Result<()> {
        const OP: &str = "decode_attention_forward";
        qkv_layout(OP, layout)?;
        check_window(OP, window)?;
        let (m, width) = (lens.len(), layout.width());
        ensure!(starts.len() == m, "{OP}: {} span starts for {m} span lengths", starts.len());
        check_len(OP, "out", out, m * layout.q_width())?;
        check_len(OP, "qkv", qkv, m * width)?;
        ensure!(cache.is_multiple_of(width), "{OP}: `cache` has {cache} elements, not rows of {width}");
        let rows = cache / width;
        for (i, (&start, &len)) in starts.iter().zip(lens).enumerate() {
            ensure!(
                start >= 0 && len >= 0 && (start as usize + len as usize) <= rows,
                "{OP}: query {i}'s span (start {start}, length {len}) is outside the cache's {rows} rows"
            );
        }
        Ok(())
    }
}
