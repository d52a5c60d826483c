//! `safedpo bench` as a stand-alone program, with the same flags (`safedpo::bench::BenchArgs`):
//! `cargo run --release --example bench -- --json`. Kept for scripts/bench-compare.sh where the CLI
//! has no `bench` subcommand.

use clap::Parser;

/// The DPO/SafeDPO training-step benchmark on synthetic data.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: safedpo::bench::BenchArgs,
}

fn main() -> anyhow::Result<()> {
    safedpo::bench::run_cli(&Cli::parse().args).map(|_| ())
}
