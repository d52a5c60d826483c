//! The op families on the CUDA backend, one module per family, named as its kernel file
//! (`kernels/<op>.cu`) and its contract (`backend/ops/<op>.rs`): the launch plan of each op and its
//! `impl <Op>Ops for CudaBackend`.

mod attention;
mod decode_attention;
mod embedding;
mod grad_norm;
mod layernorm;
mod logsoftmax_gather;
mod matmul;
mod optimizer;
mod pointwise;
mod preference_loss;
mod rmsnorm;
mod rope;
mod rows;
mod swiglu;
