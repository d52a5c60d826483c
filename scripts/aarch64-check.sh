#!/usr/bin/env bash
# Type-checks the CPU-only build (library, CLI, Python extension) for 64-bit Arm Linux: the CPU
# backend's SIMD paths are x86-only behind `cfg(target_arch)`, and this catches an x86 intrinsic or
# a `std::arch` path that escaped its guard. A check, not a run (no Arm machine here); it needs the
# aarch64 standard library, which rustup downloads once. Not part of .ci/run for that reason.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target"
fi
cargo check --release --target "$target" --no-default-features --workspace --lib --bins \
    --target-dir target/aarch64-check
echo "aarch64-check: the CPU-only build type-checks for $target"
