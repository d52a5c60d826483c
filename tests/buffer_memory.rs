//! The CUDA backend's buffers that take new storage (an op's output written in another storage
//! type, `copy` into a buffer of another type, `replace`, `resize` past the capacity) free the old
//! storage before they make the new one when the old values are not wanted: on the emulated device
//! (bf16 mode, where storage types change) the peak of such a call is the larger of the bytes held
//! before and after it, never both storages at once.

use safedpo::backend::cuda::{CudaBackend, CudaBuf, Device, Dtype, Precision};
use safedpo::backend::prelude::*;

/// Elements of the buffers that change storage: large beside anything else the calls allocate.
const N: usize = 1 << 14;

fn bf16_backend() -> CudaBackend {
    safedpo::backend::cuda::emu::use_test_mode();
    CudaBackend::new(Device::emulated().unwrap(), Precision::Bf16)
}

/// Runs `call` and checks that its peak is the larger of the bytes held before and after it.
fn assert_no_overlap(be: &CudaBackend, what: &str, call: impl FnOnce()) {
    let before = be.memory_stats().unwrap().current_bytes;
    be.reset_peak_memory();
    call();
    let stats = be.memory_stats().unwrap();
    let (after, peak) = (stats.current_bytes, stats.peak_bytes);
    assert_eq!(
        peak,
        before.max(after),
        "{what}: held {before} B before, {after} B after, peak {peak} B (old and new storage at once)"
    );
}

fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect()
}

/// LayerNorm's forward writes its mean and rstd in f32: given bf16 buffers, each gets f32 storage
/// in place of its bf16 storage (`CudaBackend::output`, values not kept).
#[test]
fn an_output_in_another_storage_type_frees_the_old_first() {
    let be = bf16_backend();
    let (n, c) = (N, 4);
    let inp = be.upload(&values(n * c, 0.1)).unwrap();
    let (weight, bias) = (be.upload(&values(c, 0.2)).unwrap(), be.upload(&values(c, 0.3)).unwrap());
    let mut out = be.zeros(n * c).unwrap();
    let (mut mean, mut rstd): (CudaBuf, CudaBuf) = (be.zeros(n).unwrap(), be.zeros(n).unwrap());
    assert_eq!((mean.dtype(), rstd.dtype()), (Dtype::Bf16, Dtype::Bf16));
    assert_no_overlap(&be, "layernorm_forward's mean and rstd", || {
        be.layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &weight, &bias, n, c, 1e-5).unwrap();
    });
    assert_eq!((mean.dtype(), rstd.dtype()), (Dtype::F32, Dtype::F32));
    // The values are the op's: the same as on a backend whose buffers were f32 already.
    let (mut mean_f32, mut rstd_f32) = (be.zeros(n).unwrap(), be.zeros(n).unwrap());
    be.store_in_f32(&mut mean_f32).unwrap();
    be.store_in_f32(&mut rstd_f32).unwrap();
    be.layernorm_forward(&mut out, &mut mean_f32, &mut rstd_f32, &inp, &weight, &bias, n, c, 1e-5).unwrap();
    assert!(be.download(&mean).unwrap() == be.download(&mean_f32).unwrap());
    assert!(be.download(&rstd).unwrap() == be.download(&rstd_f32).unwrap());
}

/// `copy` into a bf16 buffer with a master copy from an f32-stored one: the destination's master
/// and storage go before its f32 storage is made; the copy is exact.
#[test]
fn copy_into_another_storage_type_frees_the_old_first() {
    let be = bf16_backend();
    let mut dst = be.upload(&values(N, 0.4)).unwrap();
    assert!(dst.has_master());
    let mut src = be.upload(&values(N, 0.5)).unwrap();
    be.store_in_f32(&mut src).unwrap();
    assert_no_overlap(&be, "copy", || be.copy(&mut dst, &src).unwrap());
    assert_eq!(dst.dtype(), Dtype::F32);
    assert!(!dst.has_master());
    assert!(be.download(&dst).unwrap() == be.download(&src).unwrap());
}

/// `replace` (a collective's sum written back) and `resize` past the capacity.
#[test]
fn replace_and_resize_free_the_old_first() {
    let be = bf16_backend();
    let mut buf = be.upload(&values(N, 0.6)).unwrap();
    let data = values(N, 0.7);
    assert_no_overlap(&be, "replace", || be.replace(&mut buf, &data).unwrap());
    assert!(buf.has_master() && be.download(&buf).unwrap() == data);
    let mut grad = be.zeros(N).unwrap();
    be.store_in_f32(&mut grad).unwrap();
    assert_no_overlap(&be, "replace (f32 storage)", || be.replace(&mut grad, &data).unwrap());
    assert_eq!(grad.dtype(), Dtype::F32, "a buffer stored in f32 stays so");
    assert!(be.download(&grad).unwrap() == data);
    assert_no_overlap(&be, "resize", || be.resize(&mut buf, 4 * N).unwrap());
    assert_eq!(be.buf_len(&buf), 4 * N);
}
