#!/usr/bin/env bash
# Builds everything the GPU check needs into .gpu-bundle/, so that a GPU machine without cargo or
# network runs it from prebuilt binaries:
#
#   bash scripts/gpu-bundle.sh            # here, with cargo and the pinned nvcc (.toolchain/)
#   bash .gpu-bundle/gpu-check.sh LOGDIR  # there (see scripts/gpu-check.sh)
#
# The bundle: bin/safedpo; tests/<name> for every test executable with `needs a GPU` tests (found by
# grepping the sources, matched to cargo's JSON build messages); bench/kernels_cuda (criterion) when
# it builds; torch_dpo.py and torch_attention.py (the PyTorch baselines); gpu-check.sh; MANIFEST.txt (commit, nvcc, files).
# Binaries are stripped; the bundle must stay under 60 MiB (the device tool carries at most 64 MiB).
# The build requires the kernels to be really compiled: SAFEDPO_REQUIRE_NVCC=1, and the fatbin test
# of tests/gpu_device.rs is run to prove they are embedded.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out="$root/.gpu-bundle"
max_bytes=$((60 * 1024 * 1024))
export SAFEDPO_REQUIRE_NVCC=1

die() { echo "gpu-bundle: $*" >&2; exit 1; }
command -v cargo >/dev/null || die "cargo not found (the bundle is built where cargo is, then carried)"
command -v python3 >/dev/null || die "python3 not found (needed to read cargo's JSON messages)"

echo "gpu-bundle: cargo build --release (SAFEDPO_REQUIRE_NVCC=1)" >&2
build_log=$(mktemp -t gpu-bundle-build.XXXXXX)
json=$(mktemp -t gpu-bundle-json.XXXXXX)
trap 'rm -f "$build_log" "$json"' EXIT
cargo build --release --bin safedpo 2>&1 | tee "$build_log" >&2
if grep -q "nvcc not found\|SAFEDPO_NO_NVCC is set" "$build_log"; then
    die "the build has no GPU kernels (see the warning above); run scripts/install-cuda-toolchain.sh"
fi

echo "gpu-bundle: cargo test --release --no-run" >&2
cargo test --release --no-run --message-format=json >"$json"
echo "gpu-bundle: cargo bench --no-run --bench kernels_cuda" >&2
if ! cargo bench --no-run --bench kernels_cuda --message-format=json >>"$json"; then
    echo "gpu-bundle: warning: the kernels_cuda bench did not build; the bundle goes without it" >&2
fi

# Test targets whose sources hold GPU tests: tests/<name>.rs, tests/<name>/main.rs with its modules,
# and the library's unit tests if src/ has any.
gpu_targets=()
for f in tests/*.rs; do
    grep -q 'needs a GPU' "$f" && gpu_targets+=("test:$(basename "$f" .rs)")
done
for d in tests/*/; do
    [[ -f "$d/main.rs" ]] && grep -rq 'needs a GPU' "$d" && gpu_targets+=("test:$(basename "$d")")
done
if grep -rq 'needs a GPU' src/; then
    gpu_targets+=("lib:safedpo")
fi
[[ ${#gpu_targets[@]} -gt 0 ]] || die "no test source contains \`needs a GPU\`"

# kind:name → executable, from cargo's compiler-artifact messages.
mapfile -t executables < <(python3 - "$json" "${gpu_targets[@]}" <<'PY'
import json, sys
path, wanted = sys.argv[1], sys.argv[2:]
found = {}
for line in open(path):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    for kind in t["kind"]:
        key = f"{kind}:{t['name']}"
        if kind == "lib" and not m["profile"]["test"]:
            continue
        found[key] = m["executable"]
for w in wanted + ["bench:kernels_cuda"]:
    print(f"{w}\t{found.get(w, '')}")
PY
)

rm -rf "$out"
mkdir -p "$out/bin" "$out/tests" "$out/bench"
strip -o "$out/bin/safedpo" target/release/safedpo
missing=()
for line in "${executables[@]}"; do
    key=${line%%$'\t'*}
    exe=${line#*$'\t'}
    name=${key#*:}
    case "$key" in
        bench:*)
            [[ -n "$exe" ]] && strip -o "$out/bench/$name" "$exe"
            ;;
        lib:*)
            [[ -n "$exe" ]] || { missing+=("$key"); continue; }
            strip -o "$out/tests/lib_$name" "$exe"
            ;;
        *)
            [[ -n "$exe" ]] || { missing+=("$key"); continue; }
            strip -o "$out/tests/$name" "$exe"
            ;;
    esac
done
[[ ${#missing[@]} -eq 0 ]] || die "no test executable built for: ${missing[*]}"
cp benches/baselines/torch_dpo.py "$out/torch_dpo.py"
cp benches/baselines/torch_attention.py "$out/torch_attention.py"
cp scripts/gpu-check.sh "$out/gpu-check.sh"
chmod +x "$out/gpu-check.sh" "$out/bin/safedpo" "$out"/tests/* "$out"/bench/* 2>/dev/null || true

# Proof that the kernels were compiled by nvcc and embedded (fails when built without them).
if [[ -x "$out/tests/gpu_device" ]]; then
    "$out/tests/gpu_device" --exact embedded_fatbins_hold_sm80_sm90_and_ptx --quiet >&2 ||
        die "the fatbin check failed: this build does not carry the compiled kernels"
fi

nvcc_version=""
for nvcc in "${NVCC:-}" "$(command -v nvcc || true)" "$root/.toolchain/cuda/bin/nvcc"; do
    if [[ -n "$nvcc" && -x "$nvcc" ]]; then
        nvcc_version="$("$nvcc" --version | tail -n 2 | tr '\n' ' ') ($nvcc)"
        break
    fi
done
{
    echo "safedpo GPU check bundle"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n)"
    echo "nvcc: ${nvcc_version:-unknown}"
    echo "rustc: $(rustc --version 2>/dev/null || echo unknown)"
    if command -v objdump >/dev/null; then
        # The newest symbol versions the binaries need from the target machine's C and C++ libraries.
        needs=$(find "$out" -type f -perm -u+x ! -name '*.sh' ! -name '*.py' -exec objdump -T {} + 2>/dev/null |
            grep -o 'GLIBC_[0-9.]*\|GLIBCXX_[0-9.]*' | sort -u | sort -V |
            awk -F_ '{ last[$1] = $0 } END { for (k in last) printf "%s ", last[k] }')
        echo "needs: ${needs:-unknown}(glibc / libstdc++ symbol versions)"
    fi
    echo "files:"
    (cd "$out" && find . -type f ! -name MANIFEST.txt -printf '  %P %s\n' | sort)
} >"$out/MANIFEST.txt"

total=$(du -sb "$out" | cut -f1)
cat "$out/MANIFEST.txt" >&2
echo "gpu-bundle: $out: $((total / 1024 / 1024)) MiB" >&2
((total < max_bytes)) || die "the bundle is $total bytes, over the 60 MiB limit"
echo "$out"
