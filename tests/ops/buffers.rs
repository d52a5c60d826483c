//! Buffers: `resize` on the CUDA backend against the CPU (storage reused, storage type kept).

use safedpo::backend::cuda::{Device, Precision};
use safedpo::backend::prelude::*;

use crate::device::Fixture;

// ---- the CUDA backend against the CPU (see `device`) -----------------------------------------------------

/// `resize` to a shorter length reuses the storage (and its type), to a longer one reallocates; ops
/// then see the new length only.
fn resize(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 11);
    let (long, short) = (1100, 333);
    let (a, b) = (f.randn(short, 1.0), f.randn(short, 1.0));
    let ((ca, ga), (cb, gb)) = (f.both(&a), f.both(&b));
    let (mut want, mut got) = f.poisoned(long);
    f.cpu.resize(&mut want, short).unwrap();
    f.cuda.resize(&mut got, short).unwrap();
    assert_eq!(f.cuda.buf_len(&got), short);
    f.cpu.residual_forward(&mut want, &ca, &cb).unwrap();
    f.cuda.residual_forward(&mut got, &ga, &gb).unwrap();
    f.check("residual_forward after shrinking", &got, &want);
    let (mut want_filled, mut got_filled) = f.both(&a);
    f.cuda.resize(&mut got_filled, 10).unwrap();
    f.cuda.fill(&mut got_filled, 2.0).unwrap();
    f.cuda.scale(&mut got_filled, 0.5).unwrap();
    f.cpu.resize(&mut want_filled, 10).unwrap();
    f.cpu.fill(&mut want_filled, 1.0).unwrap();
    f.check("fill and scale after shrinking", &got_filled, &want_filled);
    // An f32-stored tensor (a log-prob buffer in Bf16 mode) keeps its type through a resize.
    let logits = f.randn(short * 3, 1.0);
    let (cl, gl) = f.both(&logits);
    let targets = vec![1i32; short];
    let (ct, gt) = (f.cpu.upload_ids(&targets).unwrap(), f.cuda.upload_ids(&targets).unwrap());
    let (mut want_logp, mut got_logp) = f.poisoned(short);
    let (mut want_lse, mut got_lse) = f.poisoned(short);
    f.cuda.logsoftmax_gather_forward(&mut got_logp, &mut got_lse, &gl, &gt, short, 3).unwrap();
    let dtype = got_logp.dtype();
    f.cuda.resize(&mut got_logp, long).unwrap();
    f.cuda.resize(&mut got_logp, short).unwrap();
    f.cuda.resize(&mut got_lse, 7).unwrap();
    f.cuda.resize(&mut got_lse, short).unwrap();
    assert_eq!(got_logp.dtype(), dtype);
    f.cpu.logsoftmax_gather_forward(&mut want_logp, &mut want_lse, &cl, &ct, short, 3).unwrap();
    f.cuda.logsoftmax_gather_forward(&mut got_logp, &mut got_lse, &gl, &gt, short, 3).unwrap();
    f.check_at("token_logp after resizing", &got_logp, &want_logp, 1e-5);
    // copy into a longer-capacity buffer, and from a resized one
    let (mut want_copy, mut got_copy) = f.poisoned(long);
    f.cuda.resize(&mut got_copy, short).unwrap();
    f.cpu.resize(&mut want_copy, short).unwrap();
    f.cpu.copy(&mut want_copy, &want).unwrap();
    f.cuda.copy(&mut got_copy, &got).unwrap();
    f.check("copy of a resized buffer", &got_copy, &want_copy);
}

device_tests!(resize);
