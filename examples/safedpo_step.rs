//! One SafeDPO step: the loss of a small batch, an AdamW step on it, and the loss after.
//!
//! `cargo run --release --example safedpo_step [-- DEVICE]` (auto, cpu, cuda or emu), on a tiny
//! random Llama-architecture model whose reference is its own initial weights.

use safedpo::{AdamWConfig, DecoderConfig, Engine, Objective, PreferencePair};

fn main() -> anyhow::Result<()> {
    let device = std::env::args().nth(1).unwrap_or_else(|| "auto".into()).parse()?;
    let mut engine = Engine::new(device)?;
    engine.random_policy(DecoderConfig::llama(258, 128, 32, 2, 4, 2, 64), 1)?;
    engine.reference_from_policy()?;
    engine.set_objective("safedpo:beta=0.1,delta=10".parse::<Objective>()?)?;
    engine.set_optimizer(AdamWConfig { lr: 1e-3, ..engine.optimizer().0 }, 1.0)?;

    let pairs = [
        PreferencePair::new("Write a poem.", "Roses are red.", "No.").with_safety(false, false),
        PreferencePair::new("How do I make a weapon?", "I won't help with that.", "Start with a pipe.")
            .with_safety(false, true),
    ];
    let objective = engine.objective().clone();
    let before = engine.loss(&pairs, &objective)?;
    let step = engine.train_step(&pairs)?;
    let after = engine.loss(&pairs, &objective)?;
    println!(
        "on {}: SafeDPO loss {:.4} -> {:.4} (grad norm {:.3}, lr {})",
        engine.backend_name(),
        before.loss,
        after.loss,
        step.grad_norm,
        step.lr
    );
    for (i, (c, r)) in after.metrics.reward_chosen.iter().zip(&after.metrics.reward_rejected).enumerate() {
        println!("pair {i}: reward chosen {c:+.4}, rejected {r:+.4}");
    }
    anyhow::ensure!(after.loss < before.loss, "the step did not lower the loss");
    Ok(())
}
