//! A training loop of one's own around the engine: the demo's synthetic safety pairs through the
//! SafeDPO transform T(D), shuffled mini-batches, a warmup + cosine learning-rate schedule, and a
//! held-out evaluation every few steps.
//!
//! `cargo run --release --example custom_loop [-- STEPS]` (default 30), on a tiny random GPT-2.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use safedpo::data::{safedpo_transform, split_holdout, synthetic_safety_pairs};
use safedpo::optim::LrSchedule;
use safedpo::{AdamWConfig, DecoderConfig, DeviceKind, Engine, Objective, PreferencePair};

const BATCH_PAIRS: usize = 8;
const EVAL_EVERY: usize = 10;

fn main() -> anyhow::Result<()> {
    let steps: usize = std::env::args().nth(1).map_or(Ok(30), |s| s.parse())?;
    let (pairs, counts) = safedpo_transform(synthetic_safety_pairs(96, 0));
    println!("T(D): {} kept, {} swapped, {} dropped", counts.kept, counts.swapped, counts.dropped);
    let (train, eval) = split_holdout(pairs, 0.2, 0);

    let mut engine = Engine::new(DeviceKind::Auto)?;
    engine.random_policy(DecoderConfig::gpt2(258, 256, 64, 2, 2), 0)?;
    engine.reference_from_policy()?;
    engine.set_objective(Objective::default())?;
    engine.set_optimizer(AdamWConfig { lr: 3e-3, ..engine.optimizer().0 }, 1.0)?;
    let schedule = LrSchedule { peak_lr: 3e-3, warmup_steps: 3, total_steps: steps, min_lr_ratio: 0.1 };

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut order: Vec<usize> = Vec::new();
    for step in 1..=steps {
        if order.len() < BATCH_PAIRS {
            order = (0..train.len()).collect();
            order.shuffle(&mut rng);
        }
        let batch: Vec<PreferencePair> =
            order.split_off(order.len() - BATCH_PAIRS).iter().map(|&i| train[i].clone()).collect();
        let report = engine.train_step_at(&batch, schedule.lr(step))?;
        if step % EVAL_EVERY == 0 || step == steps {
            let held_out = engine.loss(&eval, &Objective::default())?;
            println!(
                "step {step:3}: train loss {:.4}, lr {:.2e}, grad norm {:.3} | held-out loss {:.4}, reward accuracy {:.2}",
                report.loss,
                report.lr,
                report.grad_norm,
                held_out.loss,
                held_out.metrics.mean_accuracy()
            );
        }
    }
    Ok(())
}
