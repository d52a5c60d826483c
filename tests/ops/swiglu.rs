//! SwiGLU over the gate and up activations side by side: against the spec and its finite
//! differences; the CUDA backend against the CPU.

use safedpo::backend::cpu::swiglu::spec;
use safedpo::backend::cuda::{Device, Precision};
use safedpo::backend::prelude::*;

use crate::common::*;
use crate::device::Fixture;
use crate::{backend, FD_STEP, GRAD_RTOL};

/// `[n, 2f]` inputs: gates across SiLU's whole range (saturated both ways, near zero) and ups.
fn gate_and_up(r: &mut impl rand::Rng, n: usize, f: usize) -> Vec<f32> {
    let mut inp = Vec::with_capacity(n * 2 * f);
    for t in 0..n {
        let mut gate = uniform(r, f, -8.0, 8.0);
        if t == 0 {
            for (g, extreme) in gate.iter_mut().zip([-100.0, 100.0, 0.0, 1e-4, -1e-4, -20.0]) {
                *g = extreme;
            }
        }
        inp.extend(gate);
        inp.extend(randn(r, f, 1.0));
    }
    inp
}

#[test]
fn swiglu_forward_matches_spec() {
    let be = backend();
    let mut r = rng(111);
    for (n, f) in [(7, 37), (1, 1), (3, 1000)] {
        let inp = gate_and_up(&mut r, n, f);
        let mut out = poison(n * f);
        be.swiglu_forward(&mut out, &inp, n, f).unwrap();
        assert_close(&format!("swiglu out [{n}, {f}]"), &out, &spec::forward(&to_f64(&inp), n, f), 1e-5, 1e-7);
    }
}

#[test]
fn swiglu_backward_matches_finite_differences() {
    let be = backend();
    let mut r = rng(112);
    let (n, f) = (5, 9);
    let inp = gate_and_up(&mut r, n, f);
    let dout = randn(&mut r, n * f, 1.0);
    let dy = to_f64(&dout);
    let want = fd_grad(|x| weighted_sum(&dy, &spec::forward(x, n, f)), &to_f64(&inp), FD_STEP);
    let mut dinp = poison(n * 2 * f);
    be.swiglu_backward(&mut dinp, &inp, &dout, n, f).unwrap();
    assert_close_scaled("swiglu dinp", &dinp, &want, GRAD_RTOL);
    // element by element too: the saturated gates have tiny gradients that the scaled check hides
    assert_close("swiglu dinp (elementwise)", &dinp, &want, 1e-4, 1e-6);

    let err = be.swiglu_backward(&mut dinp, &inp, &vec![0.0; n * f + 1], n, f).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("swiglu_backward") && msg.contains("`dout`") && msg.contains("46"), "{msg}");
    let err = be.swiglu_forward(&mut poison(n * f), &dout, n, f).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("swiglu_forward") && msg.contains("`inp`") && msg.contains("90"), "{msg}");
}

// ---- the CUDA backend against the CPU (see `device`) -----------------------------------------------------

fn swiglu(device: &Device, precision: Precision) {
    for (seed, (n, f)) in [(1, 1), (3, 37), (17, 256), (5, 1000), (0, 8)].into_iter().enumerate() {
        let mut fx = Fixture::new(device, precision, 120 + seed as u64);
        let inp = gate_and_up(&mut fx.rng, n, f);
        let inp = fx.stored(inp);
        let dout = fx.randn(n * f, 1.0);
        let ((ci, gi), (cd, gd)) = (fx.both(&inp), fx.both(&dout));
        let shape = format!("[{n}, {f}]");

        let (mut want, mut got) = fx.poisoned(n * f);
        fx.cpu.swiglu_forward(&mut want, &ci, n, f).unwrap();
        fx.cuda.swiglu_forward(&mut got, &gi, n, f).unwrap();
        fx.check(&format!("swiglu_forward {shape}"), &got, &want);

        let (mut want, mut got) = fx.poisoned(n * 2 * f);
        fx.cpu.swiglu_backward(&mut want, &ci, &cd, n, f).unwrap();
        fx.cuda.swiglu_backward(&mut got, &gi, &gd, n, f).unwrap();
        fx.check(&format!("swiglu_backward {shape}"), &got, &want);
    }
}

device_tests!(swiglu);
