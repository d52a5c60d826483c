//! The sum of squares behind the gradient norm: the CUDA backend against the CPU. (The CPU's against
//! its spec is in `optimizer`.)

use safedpo::backend::cuda::{CudaBuf, Device, Precision};
use safedpo::backend::prelude::*;

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

device_tests!(sum_squares);
