//! GELU against the spec and its derivative; the adds and the scale exact; the CUDA backend against
//! the CPU.

use safedpo::backend::cpu::pointwise::spec;
use safedpo::backend::cuda::{Device, Precision};
use safedpo::backend::prelude::*;

use crate::common::*;
use crate::device::{Fixture, BF16_NOISE_FLOOR};
use crate::{backend, FD_STEP};

#[test]
fn gelu_matches_twin_and_its_derivative() {
    let be = backend();
    let mut r = rng(10);
    let mut inp = uniform(&mut r, 3001, -6.0, 6.0);
    inp.extend_from_slice(&[0.0, -20.0, 20.0, 1e-3, -1e-3]);
    let mut out = poison(inp.len());
    be.gelu_forward(&mut out, &inp).unwrap();
    let want: Vec<f64> = inp.iter().map(|&x| spec::gelu(x as f64)).collect();
    assert_close("gelu out", &out, &want, 1e-5, 1e-7);

    let dout = randn(&mut r, inp.len(), 1.0);
    let mut dinp = poison(inp.len());
    be.gelu_backward(&mut dinp, &inp, &dout).unwrap();
    // Pointwise: d/dx_i of Σ w gelu(x) is w_i gelu'(x_i), one central difference per element.
    let want_d: Vec<f64> = inp
        .iter()
        .zip(&dout)
        .map(|(&x, &w)| {
            let x = x as f64;
            w as f64 * (spec::gelu(x + FD_STEP) - spec::gelu(x - FD_STEP)) / (2.0 * FD_STEP)
        })
        .collect();
    assert_close("gelu dinp", &dinp, &want_d, 1e-4, 1e-6);
}

#[test]
fn residual_add_and_scale_are_exact() {
    let be = backend();
    let mut r = rng(11);
    let len = 40_000; // several pointwise chunks
    let (a, b) = (randn(&mut r, len, 1.0), randn(&mut r, len, 1.0));
    let mut out = poison(len);
    be.residual_forward(&mut out, &a, &b).unwrap();
    let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_bitwise_eq("residual", &out, &sum);

    let mut acc = a.clone();
    be.add_inplace(&mut acc, &b).unwrap();
    assert_bitwise_eq("add_inplace", &acc, &sum);

    be.scale(&mut acc, -0.375).unwrap();
    let scaled: Vec<f32> = sum.iter().map(|x| x * -0.375).collect();
    assert_bitwise_eq("scale", &acc, &scaled);

    let err = be.residual_forward(&mut poison(3), &vec![0.0; 3], &vec![0.0; 4]).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("residual_forward") && msg.contains("`b`") && msg.contains('4') && msg.contains('3'), "{msg}");
}

// ---- the CUDA backend against the CPU (see `device`) -----------------------------------------------------

fn pointwise(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 4);
    let n = 1003;
    let (a, b) = (f.randn(n, 2.0), f.randn(n, 1.0));
    let ((ca, ga), (cb, gb)) = (f.both(&a), f.both(&b));

    let (mut want, mut got) = f.poisoned(n);
    f.cpu.gelu_forward(&mut want, &ca).unwrap();
    f.cuda.gelu_forward(&mut got, &ga).unwrap();
    f.check("gelu_forward", &got, &want);

    let (mut want, mut got) = f.poisoned(n);
    f.cpu.gelu_backward(&mut want, &ca, &cb).unwrap();
    f.cuda.gelu_backward(&mut got, &ga, &gb).unwrap();
    f.check("gelu_backward", &got, &want);

    let (mut want, mut got) = f.poisoned(n);
    f.cpu.residual_forward(&mut want, &ca, &cb).unwrap();
    f.cuda.residual_forward(&mut got, &ga, &gb).unwrap();
    f.check("residual_forward", &got, &want);

    let (mut want, mut got) = f.both(&a);
    f.cpu.add_inplace(&mut want, &cb).unwrap();
    f.cuda.add_inplace(&mut got, &gb).unwrap();
    f.check("add_inplace", &got, &want);

    f.cpu.scale(&mut want, -0.37).unwrap();
    f.cuda.scale(&mut got, -0.37).unwrap();
    // The sum above, rounded, then scaled and rounded again.
    f.check_rounded("scale", &got, &want, 2.0, BF16_NOISE_FLOOR);

    let (mut want, mut got) = f.poisoned(n);
    f.cpu.copy(&mut want, &ca).unwrap();
    f.cuda.copy(&mut got, &ga).unwrap();
    f.check("copy", &got, &want);

    f.cpu.fill(&mut want, 0.25).unwrap();
    f.cuda.fill(&mut got, 0.25).unwrap();
    f.check("fill", &got, &want);

    // zeros, and empty tensors, go through without launching anything
    assert!(f.cuda.download(&f.cuda.zeros(n).unwrap()).unwrap().iter().all(|&x| x == 0.0));
    let (mut empty, none) = (f.cuda.zeros(0).unwrap(), f.cuda.zeros(0).unwrap());
    f.cuda.gelu_forward(&mut empty, &none).unwrap();
    f.cuda.scale(&mut empty, 2.0).unwrap();
}

device_tests!(pointwise);
