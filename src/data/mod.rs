//! Preference data: reading datasets, pair selection and the SafeDPO transform T(D), prompt
//! templates, tokenizers, and packing into padding-free batches.

pub mod pack;

pub use pack::{PackedBatch, PreferenceBatch};
