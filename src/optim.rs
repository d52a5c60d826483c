//! Optimizers (AdamW with fp32 state, plain SGD), global grad-norm clipping, and the learning-rate
//! schedule (linear warmup, then cosine decay).
