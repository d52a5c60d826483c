//! The decoder's initialisation ([`random_weights`]): what `transformers` gives each family.

use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::params::{Init, Params};
use super::{DecoderConfig, HostWeights};

/// The initialisation `transformers` gives each family: N(0, 0.02) weights, zero biases, unit norm
/// gains; GPT-2 also scales its residual projections (the attention's and the MLP's output) by
/// 1/√(2L). Deterministic in `seed`, one random stream per tensor. On the host, so that the same
/// weights can become a trainable policy and a frozen reference.
pub fn random_weights(config: DecoderConfig, seed: u64) -> Result<HostWeights> {
    config.validate()?;
    let residual_std = 0.02 / (2.0 * config.n_layer as f64).sqrt();
    let gpt2 = config.family.is_gpt2();
    let init = Params::schema(&config).initialisation();
    let mut tensors = std::collections::BTreeMap::new();
    for (index, ((name, shape), init)) in config.parameter_shapes().into_iter().zip(init).enumerate() {
        let len: usize = shape.iter().product();
        let data = match init {
            Init::One => vec![1.0; len],
            Init::Zero => vec![0.0; len],
            Init::Normal { residual } => {
                // One ChaCha stream per tensor: a tensor's values do not depend on the others' sizes.
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(index as u64);
                let std = if residual && gpt2 { residual_std } else { 0.02 };
                normal_samples(&mut rng, len, std)
            }
        };
        tensors.insert(name, (shape, data));
    }
    Ok(HostWeights { config, tensors })
}

/// `len` samples of N(0, std²) by Box–Muller, in f64 then rounded to f32.
pub(super) fn normal_samples(rng: &mut ChaCha8Rng, len: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(len + 1);
    while out.len() < len {
        // u1 in (0, 1] keeps the log finite.
        let u1 = 1.0 - rng.random::<f64>();
        let u2 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let theta = std::f64::consts::TAU * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(len);
    out
}
