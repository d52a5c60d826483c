#!/usr/bin/env bash
# The CPU-only build (`--no-default-features`: no `cuda`, no `emu`): it needs neither nvcc nor
# cudarc, its CLI trains on the CPU, and `--device cuda` / `emu` fail naming the missing feature.
# `avx512` is kept on so that the gemm crate's build is the main one's. The default CLI is relinked
# at the end (no compilation), so that target/release/safedpo is the full one again.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}

if cargo tree --no-default-features -e normal --prefix none | grep -q '^cudarc '; then
    echo "cpu-only-check: cudarc is still a dependency without the cuda feature" >&2
    exit 1
fi
SAFEDPO_NO_NVCC=1 cargo build --release --no-default-features --features avx512 --bin safedpo
cli="$target/cpu-only-safedpo"
cp "$target/release/safedpo" "$cli"

fails_naming() {  # fails_naming FEATURE ARGS...: the command fails and names the feature
    local feature=$1 out
    shift
    if out=$("$cli" "$@" 2>&1); then
        echo "cpu-only-check: \`safedpo $*\` succeeded without the $feature feature" >&2
        exit 1
    fi
    grep -q "\`$feature\` Cargo feature is off" <<<"$out" || { echo "cpu-only-check: unexpected error: $out" >&2; exit 1; }
}
bench=(bench --model.n_layer 1 --model.n_embd 32 --model.n_head 2 --model.vocab_size 512 --pairs 2 --seq-len 32 --steps 2 --warmup 1 --json)
fails_naming cuda "${bench[@]}" --device cuda
fails_naming emu "${bench[@]}" --device emu
"$cli" "${bench[@]}" --device cpu >/dev/null
"$cli" "${bench[@]}" --device auto >/dev/null
rm -f "$cli"
cargo build --release --bin safedpo
echo "cpu-only-check: passed"
