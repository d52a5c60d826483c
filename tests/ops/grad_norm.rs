//! The sum of squares behind the gradient norm: the CUDA backend against the CPU, and its one launch
//! over all tensors against a launch per tensor, bit for bit. (The CPU's against its spec is in
//! `optimizer`.)

use safedpo::backend::cuda::kernels::constants::grad_norm::{
    SUM_SQUARES_ELEMENTS_PER_THREAD, SUM_SQUARES_MAX_BLOCKS, SUM_SQUARES_THREADS,
};
use safedpo::backend::cuda::{CudaBuf, Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::backend::{AdamWParams, AdamWTensor};

use crate::device::Fixture;

// ---- the CUDA backend against the CPU (see `device`) -----------------------------------------------------

fn sum_squares(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 7);
    let tensors: Vec<Vec<f32>> = [0usize, 1, 5000, 300, 70_001].iter().map(|&len| f.randn(len, 1.5)).collect();
    let cpu: Vec<Vec<f32>> = tensors.clone();
    let cuda: Vec<CudaBuf> = tensors.iter().map(|t| f.cuda.upload(t).unwrap()).collect();
    let want = f.cpu.sum_squares(&cpu.iter().collect::<Vec<_>>()).unwrap();
    let got = f.cuda.sum_squares(&cuda.iter().collect::<Vec<_>>()).unwrap();
    assert!((got - want).abs() <= 1e-5 * want, "sum_squares ({precision}): {got} vs {want}");
    let again = f.cuda.sum_squares(&cuda.iter().collect::<Vec<_>>()).unwrap();
    assert_eq!(got.to_bits(), again.to_bits(), "sum_squares ({precision}) differs between runs");
    assert_eq!(f.cuda.sum_squares(&[]).unwrap(), 0.0);
}

/// The one-launch sum against the launch per tensor it replaced: the same bits, over many tensors
/// of ragged sizes (one past the most blocks a tensor gets, so that its blocks stride), and in Bf16
/// mode with f32 tensors among the bf16 ones; two runs (two random schedules) agree too.
fn one_launch_matches_per_tensor(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 11);
    let per_block = (SUM_SQUARES_THREADS * SUM_SQUARES_ELEMENTS_PER_THREAD) as usize;
    let widest = per_block * SUM_SQUARES_MAX_BLOCKS as usize + 3 * per_block / 2;
    // 4224 elements fill their buffers' last 256-byte unit exactly in both storage types (the emulated
    // device's guard page follows) while not a multiple of a block's 256: a read one past the end faults.
    let lens = [0usize, 1, 7, 4097, per_block - 1, per_block, per_block + 1, 3, widest, 0, 130_001, 4224];
    let mut bufs: Vec<CudaBuf> = lens.iter().map(|&n| f.fresh(n, 1.5).1).collect();
    // A moment of AdamW is f32 in both modes: a list of mixed storage types.
    let (mut param, grad) = (f.fresh(5000, 1.0).1, f.fresh(5000, 1.0).1);
    let (mut m, mut v) = (f.cuda.zeros(5000).unwrap(), f.cuda.zeros(5000).unwrap());
    let p = AdamWParams { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0, step: 1, grad_scale: 1.0 };
    let mut tensor = [AdamWTensor { param: &mut param, grad: &grad, m: &mut m, v: &mut v, decay: false }];
    f.cuda.adamw_tensors(&mut tensor, &p).unwrap();
    bufs.insert(4, m);
    let list: Vec<&CudaBuf> = bufs.iter().collect();
    let want = f.cuda.sum_squares_per_tensor(&list).unwrap();
    let got = f.cuda.sum_squares(&list).unwrap();
    assert_eq!(got.to_bits(), want.to_bits(), "sum_squares ({precision}): one launch {got} vs per tensor {want}");
    let uploads = f.cuda.tensor_table_uploads();
    let again = f.cuda.sum_squares(&list).unwrap();
    assert_eq!(got.to_bits(), again.to_bits(), "sum_squares ({precision}) differs between runs");
    assert_eq!(f.cuda.tensor_table_uploads(), uploads, "the same tensors again: the kept table");
    let fewer = f.cuda.sum_squares(&list[2..]).unwrap();
    assert_eq!(fewer.to_bits(), f.cuda.sum_squares_per_tensor(&list[2..]).unwrap().to_bits());
    assert_eq!(f.cuda.tensor_table_uploads(), uploads + 1, "another list: one more table");
}

device_tests!(sum_squares, one_launch_matches_per_tensor);
