#!/usr/bin/env bash
# The CPU-only build (`--no-default-features`: no `cuda`, no `emu`): it needs neither nvcc nor
# cudarc, builds without a warning, its CLI trains on the CPU, and `--device cuda` / `emu` fail
# naming the missing feature. Built over the whole workspace, as .ci/run's main build, so that the
# dependencies' features are those already compiled (only the crate itself is compiled again);
# `avx512` is kept on for the same reason. The default CLI is put back at the end, outside CI.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
cpu_only=(--workspace --no-default-features --features safedpo/avx512)

tree=$(cargo tree "${cpu_only[@]}" -e normal --prefix none)
if grep -q '^cudarc ' <<<"$tree"; then
    echo "cpu-only-check: cudarc is still a dependency without the cuda feature" >&2
    exit 1
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo build --release "${cpu_only[@]}" --bin safedpo 2>&1 | tee "$log"
if grep -q '^warning' "$log"; then
    echo "cpu-only-check: the CPU-only build has warnings" >&2
    exit 1
fi
cli="$target/cpu-only-safedpo"
cp "$target/release/safedpo" "$cli"

fails_naming() {  # fails_naming FEATURE ARGS...: the command fails, and its error names the feature
    local feature=$1 out
    shift
    if out=$("$cli" "$@" 2>&1); then
        echo "cpu-only-check: \`safedpo $*\` succeeded without the $feature feature" >&2
        exit 1
    fi
    if ! grep -q "\`$feature\` Cargo feature is off" <<<"$out"; then
        echo "cpu-only-check: \`safedpo $*\`: unexpected error: $out" >&2
        exit 1
    fi
}
bench=(bench --model.n_layer 1 --model.n_embd 32 --model.n_head 2 --model.vocab_size 512 --pairs 2 --seq-len 32
    --steps 2 --warmup 1 --json)
fails_naming cuda "${bench[@]}" --device cuda
fails_naming emu "${bench[@]}" --device emu
"$cli" "${bench[@]}" --device cpu >/dev/null
"$cli" "${bench[@]}" --device auto >/dev/null 2>&1
rm -f "$cli"
# Put the default CLI back for the next local run (CI stops here: nothing runs it after).
if [[ -z ${CI:-} ]]; then
    cargo build --release --workspace --bin safedpo
fi
echo "cpu-only-check: passed"
