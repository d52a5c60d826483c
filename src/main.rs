//! The `safedpo` command line.

fn main() -> anyhow::Result<()> {
    println!("safedpo {}", env!("CARGO_PKG_VERSION"));
    Ok(())
}
