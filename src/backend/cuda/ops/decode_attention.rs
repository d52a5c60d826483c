//! Decode attention on the CUDA backend (kernels/decode_attention.cu): the split launch over
//! `(splits, n_head, M)` into f32 partials, then the ordered combine over `(n_head, M)`.

use anyhow::{ensure, Result};

use super::attention::window_arg;
use crate::backend::cuda::backend::{CudaBackend, CudaBuf};
use crate::backend::cuda::kernels::constants::decode_attention::{
    DECODE_COMBINE_THREADS, DECODE_HD_MAX, DECODE_SPLIT_KEYS,
};
use crate::backend::cuda::launch::{grid_dim, i32_arg, suffix, MAX_GRID_Y};
use crate::backend::cuda::{KernelArg, LaunchConfig};
use crate::backend::{checks, windowed_span, DecodeAttentionOps, DecodeSpans, QkvLayout, Window};

impl DecodeAttentionOps for CudaBackend {
    fn decode_attention_forward(
        &self,
        out: &mut CudaBuf,
        qkv: &CudaBuf,
        cache: &CudaBuf,
        spans: &DecodeSpans<Self>,
        layout: QkvLayout,
        window: Window,
    ) -> Result<()> {
        const OP: &str = "decode_attention_forward";
        let (starts, lens) = (&spans.host_starts, &spans.host_lens);
        checks::decode_attention_forward(out.len(), qkv.len(), cache.len(), starts, lens, layout, window)?;
        let (hd, nh, m) = (layout.head_dim, layout.n_head, spans.num_queries());
        ensure!(hd <= DECODE_HD_MAX as usize, "{OP}: head_dim = {hd} exceeds the kernels' maximum {DECODE_HD_MAX}");
        ensure!(
            spans.starts.host() == &starts[..] && spans.lens.host() == &lens[..],
            "{OP}: the spans' device copies differ from their host copies"
        );
        ensure!(
            m <= MAX_GRID_Y && nh <= MAX_GRID_Y,
            "{OP}: {m} queries of {nh} heads exceed the grid limit {MAX_GRID_Y}"
        );
        if m == 0 {
            return Ok(());
        }
        // The splits cover the longest span's window (the kernel skips the rows before it).
        let splits = windowed_span(spans.max_len, window).1.div_ceil(DECODE_SPLIT_KEYS as usize).max(1);
        let dt = self.act();
        let (qkv, cache) = (self.input(qkv, dt)?, self.input(cache, dt)?);
        // The partials live until both launches are queued (the device orders them).
        let partial_outputs = self.device.alloc::<f32>(m * nh * splits * hd)?;
        let partial_stats = self.device.alloc::<f32>(m * nh * splits * 2)?;
        let part_o = KernelArg::Ptr(partial_outputs.device_ptr());
        let part_ml = KernelArg::Ptr(partial_stats.device_ptr());
        let (n_head, n_kv_head) = (i32_arg(nh, "n_head")?, i32_arg(layout.n_kv_head, "n_kv_head")?);
        let (head_dim, split_count) = (i32_arg(hd, "head_dim")?, i32_arg(splits, "splits")?);
        let split = LaunchConfig {
            grid: (grid_dim(splits, "splits")?, nh as u32, m as u32),
            block: (DECODE_SPLIT_KEYS as u32, 1, 1),
            shared_bytes: 0,
        };
        let args = [
            part_o,
            part_ml,
            qkv.arg(),
            cache.arg(),
            spans.starts.arg(),
            spans.lens.arg(),
            n_head,
            n_kv_head,
            head_dim,
            split_count,
            window_arg(window),
        ];
        self.launch(&format!("decode_attention_split_{}", suffix(dt)), split, &args)?;
        let out = self.output(out, dt, false)?;
        let combine = LaunchConfig {
            grid: (nh as u32, m as u32, 1),
            block: (DECODE_COMBINE_THREADS as u32, 1, 1),
            shared_bytes: 0,
        };
        let args = [out.arg(), part_o, part_ml, n_head, head_dim, split_count];
        self.launch(&format!("decode_attention_combine_{}", suffix(dt)), combine, &args)
    }
}
