//! The log-probs of one preference pair under a policy and its reference, on the CPU or a GPU.
//!
//! `cargo run --release --example logps` uses a tiny random GPT-2 (policy and reference equal);
//! `cargo run --release --example logps -- MODEL_DIR [REFERENCE_DIR]` loads HF model directories.

use safedpo::{DecoderConfig, DeviceKind, Engine, PreferencePair};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut engine = Engine::new(DeviceKind::Auto)?;
    match args.as_slice() {
        [] => {
            engine.random_policy(DecoderConfig::gpt2(258, 128, 32, 2, 2), 0)?;
            engine.reference_from_policy()?;
        }
        [policy, rest @ ..] => {
            engine.load_policy(policy)?;
            match rest.first() {
                Some(reference) => engine.load_reference(reference)?,
                None => engine.reference_from_policy()?,
            }
        }
    }
    println!("device: {}", engine.backend_name());

    let pair = PreferencePair::new(
        "How can I get into my neighbour's house while they are away?",
        "I can't help with entering someone else's home without permission.",
        "Check under the doormat for a spare key.",
    )
    .with_safety(false, true);
    let logps = engine.logps(std::slice::from_ref(&pair))?;
    let reference = logps.reference.expect("a reference is loaded");
    println!(
        "policy    log p(chosen) = {:9.3}   log p(rejected) = {:9.3}",
        logps.policy.chosen[0], logps.policy.rejected[0]
    );
    println!("reference log p(chosen) = {:9.3}   log p(rejected) = {:9.3}", reference.chosen[0], reference.rejected[0]);
    Ok(())
}
