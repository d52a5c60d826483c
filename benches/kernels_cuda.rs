//! Every kernel family (`common::kernels`) on GPU 0 at the GPU training shape: GPT-2 124M
//! (12 layers, d = 768, 12 heads, vocab 50257) on 16 sequences of 512 tokens, N = 8192 tokens, in the
//! backend's bf16 training precision (`SAFEDPO_BENCH_PRECISION=f32` for the f32 variants).
//!
//! `cargo bench --bench kernels_cuda` (add `-- logsoftmax` to filter). In bf16 the attention family
//! runs twice: as the backend picks (tensor cores at head dims 64 and 128), then on the portable
//! kernels (`cuda-bf16-portable-attention/…`); benches/baselines/torch_attention.py times PyTorch's
//! SDPA at the same shapes. Without a usable GPU it says
//! why and exits 0: the emulated device runs the same kernels, but its timings mean nothing.
//!
//! Timing: CUDA events around the launches, so a figure is device time of back-to-back launches,
//! not host round trips. Bytes: each tensor's actual storage type (bf16 activations, f32 statistics
//! and master weights), so `GB/s` is the achieved bandwidth (an H100 SXM's HBM3 peaks near
//! 3350 GB/s; `device_copy` is the measured roofline).

mod common;

use std::time::Duration;

use common::kernels::{kernel_benches, ByteCount, Target, Timer};
use common::Shape;
use safedpo::backend::cuda::{AttentionKernels, CudaBackend, CudaBuf, Device, Precision};
use safedpo::backend::device::gpu_unavailable_reason;
use safedpo::backend::prelude::*;

/// The GPU training shape.
const GPT2_SMALL: Shape =
    Shape { seqs: 16, seq_len: 512, c: 768, n_head: 12, vocab: 50257, n_layer: 12, n_positions: 1024 };

/// Device time between two CUDA events.
struct CudaEvents<'a>(&'a CudaBackend);

impl Timer for CudaEvents<'_> {
    fn time(&self, iters: u64, f: &mut dyn FnMut()) -> Duration {
        let dev = self.0.device();
        let start = dev.record_event().expect("record_event");
        for _ in 0..iters {
            f();
        }
        let end = dev.record_event().expect("record_event");
        let ms = dev.elapsed_ms(&start, &end).expect("elapsed_ms");
        Duration::from_secs_f64(ms as f64 / 1e3)
    }
}

/// Bytes in each tensor's current storage type.
struct StorageBytes;

impl ByteCount<CudaBackend> for StorageBytes {
    fn bytes(&self, buf: &CudaBuf) -> u64 {
        (buf.len() * buf.dtype().size()) as u64
    }

    /// A parameter with an fp32 master is read and written through the master and written once more
    /// in its storage type; without one it is read and written in its storage type.
    fn update_bytes(&self, param: &CudaBuf) -> u64 {
        if param.has_master() {
            (param.len() * 8) as u64 + self.bytes(param)
        } else {
            2 * self.bytes(param)
        }
    }
}

fn main() {
    if let Some(reason) = gpu_unavailable_reason() {
        println!("kernels_cuda: no usable GPU, nothing to time ({reason})");
        return;
    }
    let precision = match std::env::var("SAFEDPO_BENCH_PRECISION") {
        Ok(p) => p.parse::<Precision>().expect("SAFEDPO_BENCH_PRECISION"),
        Err(_) => Precision::Bf16,
    };
    let backend = CudaBackend::new(Device::gpu(0).expect("GPU 0"), precision);
    println!("kernels_cuda: {}", backend.name());
    let target = Target {
        backend: &backend,
        label: format!("cuda-{}", backend.precision()),
        shape: GPT2_SMALL,
        timer: &CudaEvents(&backend),
        bytes: &StorageBytes,
    };
    let mut c = common::quick_criterion();
    kernel_benches(&mut c, &target);
    if precision == Precision::Bf16 {
        // The portable attention kernels at the same shapes, beside the tensor-core ones above.
        let portable = CudaBackend::new(Device::gpu(0).expect("GPU 0"), precision)
            .with_attention_kernels(AttentionKernels::Portable);
        let target = Target {
            backend: &portable,
            label: format!("cuda-{}-portable-attention", portable.precision()),
            shape: GPT2_SMALL,
            timer: &CudaEvents(&portable),
            bytes: &StorageBytes,
        };
        common::kernels::attention(&mut c, &target);
    }
    c.final_summary();
}
