//! The op families of the `Backend` trait, one module per family, named as its kernel file
//! (`kernels/<op>.cu`), its CPU twin (`backend/cpu/<op>.rs`) and its launch code
//! (`backend/cuda/ops/<op>.rs`).

pub mod attention;
pub mod decode_attention;
pub mod embedding;
pub mod grad_norm;
pub mod layernorm;
pub mod logsoftmax_gather;
pub mod matmul;
pub mod optimizer;
pub mod pointwise;
pub mod preference_loss;
pub mod rmsnorm;
pub mod rope;
pub mod rows;
pub mod swiglu;

pub use attention::{window_start, AttentionOps, QkvLayout, Window};
pub use decode_attention::{windowed_span, DecodeAttentionOps, DecodeSpans};
pub use embedding::EmbeddingOps;
pub use grad_norm::GradNormOps;
pub use layernorm::LayerNormOps;
pub use logsoftmax_gather::LogSoftmaxGatherOps;
pub use matmul::MatmulOps;
pub use optimizer::{AdamWTensor, OptimizerOps, SgdTensor};
pub use pointwise::PointwiseOps;
pub use preference_loss::{ExampleParts, LogpParts, PreferenceLossInputs, PreferenceLossOps};
pub use rmsnorm::RmsNormOps;
pub use rope::{rope_inverse_frequencies, RopeOps, RopeScaling};
pub use rows::RowOps;
pub use swiglu::SwiGluOps;
