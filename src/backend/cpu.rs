//! The CPU f32 reference backend: the oracle every other backend is checked against, and the
//! default where there is no GPU. Parallel across rows and heads (rayon); matrix products through
//! the `gemm` crate.
