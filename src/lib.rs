//! safedpo: SafeDPO and the DPO family on a small, fast transformer engine.
//!
//! Start with [`Engine`]: a policy and a reference on a device (`auto|cpu|cuda|emu`), per-pair
//! log-probs, the loss of any [`Objective`], training steps and checkpoints, all as plain host
//! values (the module [`engine`] has a complete program). The C ABI is `capi` (header
//! `include/safedpo.h`); `examples/` has runnable programs.
//!
//! The building blocks, in the order a training step uses them:
//! - [`data`]: preference pairs, the SafeDPO transform T(D), templates, tokenizers, packing;
//! - [`model`]: the GPT-2 family, forward and backward, written once over [`backend::Backend`];
//! - [`backend`]: the CPU f32 reference and the CUDA backend (a GPU or the emulated device);
//! - [`loss`]: the preference objectives;
//! - [`dist`]: data-parallel ranks and their collectives (threads, processes, NCCL);
//! - [`optim`]: AdamW, SGD, grad-norm clipping, the learning-rate schedule;
//! - [`train`]: the loop, reference log-probs, eval, checkpoints, metrics;
//! - [`judge`]: reward and cost models, their training, judged evaluation.
//!
//! Cargo features (all default): `cuda`, the GPU (cudarc; the kernels compiled by nvcc when it is
//! installed); `emu`, the emulated device (the kernels compiled for the CPU); `avx512`, the CPU
//! matrix products' AVX-512 kernels. `--no-default-features` builds the CPU backend, the engine and
//! the CLI with neither nvcc nor cudarc; `--device cuda` / `emu` then fail, naming the feature.
//! The Python module is `python/` (`pip install ./python`: `safedpo.Engine`, `safedpo.train`).

pub mod backend;
// The CLI's `bench` and `plot` commands: public for the `safedpo` binary and the tests, not an API.
#[doc(hidden)]
pub mod bench;
pub mod capi;
pub mod config;
pub mod data;
pub mod dist;
pub mod engine;
pub mod judge;
pub mod loss;
pub mod model;
pub mod optim;
#[doc(hidden)]
pub mod plot;
pub mod train;
#[doc(hidden)]
pub mod util;

pub use backend::cuda::Precision;
pub use backend::{Backend, DeviceKind};
pub use data::{PreferencePair, TokenizedExample, TokenizedPair, UnpairedExample};
pub use engine::{
    Engine, ExampleMetrics, Logps, LossReport, PairLogps, PairMetrics, StepReport, UnpairedLossReport,
    UnpairedStepReport,
};
pub use loss::Objective;
pub use model::DecoderConfig;
pub use optim::AdamWConfig;
