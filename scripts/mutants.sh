#!/usr/bin/env bash
# Mutation testing of the Rust code with cargo-mutants, on the files a change touches, within a time
# budget. Each mutant (a function body replaced, an operator flipped, ...) is built and run against
# the tests that cover its module; a mutant the tests let through is a hole to fill or to explain in
# docs/TESTING.md. The kernels have their own mutator: scripts/kernel-mutants.py.
#
#   scripts/mutants.sh [--budget MIN] [--base REV] [--tests "loss objectives"] [--shard K/N] [--list] [FILE...]
#
#   FILE...      the files to mutate (default: the .rs files under src/ changed since --base)
#   --base REV   the change to test: files under src/ that differ from REV (default: HEAD, i.e. the
#                uncommitted ones)
#   --budget MIN stop after MIN minutes (default 60); cargo-mutants is interrupted cleanly and what
#                it finished is reported
#   --tests      the test targets to run for every mutant, `lib` for the library's unit tests (default:
#                `lib` and the integration tests picked per file from the table below)
#   --shard K/N  run one slice of the mutants (parallel machines, or several sittings)
#   --list       list the mutants and exit
#
# cargo-mutants is installed (pinned) into .tools/ on first use, from crates.io. It mutates the
# working tree in place, so the build reuses target/ (a copy would rebuild the crate from scratch, ~10
# minutes on two cores) and restores each file after its mutants; this script keeps its own copy of
# every file it mutates and puts it back if anything is left changed. Results: target/mutation-results/
# (mutants.out/caught.txt, missed.txt, timeout.txt, unviable.txt, outcomes.json) and a score per file
# printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VERSION=27.1.0
TOOLS=$ROOT/.tools/cargo-mutants-$VERSION

budget=60 base=HEAD tests="" shard="" list=0 files=()
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) budget=$2; shift 2 ;;
        --base) base=$2; shift 2 ;;
        --tests) tests=$2; shift 2 ;;
        --shard) shard=$2; shift 2 ;;
        --list) list=1; shift ;;
        -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "mutants.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) files+=("$1"); shift ;;
    esac
done
if [ ${#files[@]} -eq 0 ]; then
    mapfile -t files < <(git diff --name-only "$base" -- 'src/*.rs' 'src/**/*.rs' | sort -u)
    [ ${#files[@]} -gt 0 ] || { echo "mutants.sh: no changed .rs files under src/ since $base; name the files" >&2; exit 2; }
fi
for f in "${files[@]}"; do
    [ -f "$f" ] || { echo "mutants.sh: $f: no such file" >&2; exit 2; }
done

# The integration tests that cover each part of the crate.
tests_for() {
    case "$1" in
        src/loss/*|src/loss.rs) echo "loss objectives kto logp_modifiers" ;;
        src/data/*) echo "data fuzz trl_options settings_travel" ;;
        src/train/step.rs|src/train/mod.rs|src/train/refcache.rs) echo "train trdpo kto run_safety" ;;
        src/train/rundir.rs|src/train/checkpoint.rs) echo "run_safety checkpoint train" ;;
        src/train/*) echo "train cli" ;;
        src/model/*) echo "model llama golden frozen checkpointing logp_modifiers" ;;
        src/backend/cpu/*|src/backend/ops/*|src/backend/checks.rs) echo "ops" ;;
        src/backend/cuda/*) echo "ops emu cuda_step" ;;
        src/optim.rs) echo "optim train" ;;
        src/config/*) echo "cli cli_flags settings_travel trl_options" ;;
        src/engine/*|src/capi.rs) echo "capi examples" ;;
        *) echo "cli train" ;;
    esac
}
if [ -z "$tests" ]; then
    tests="lib $(for f in "${files[@]}"; do tests_for "$f"; done | tr ' ' '\n' | sort -u | tr '\n' ' ')"
fi
test_args=()
for t in $tests; do
    if [ "$t" = lib ]; then test_args+=(--lib); continue; fi
    [ -f "tests/$t.rs" ] || [ -f "tests/$t/main.rs" ] || { echo "mutants.sh: no test target '$t'" >&2; exit 2; }
    test_args+=("--test=$t")
done

if [ ! -x "$TOOLS/bin/cargo-mutants" ]; then
    echo "installing cargo-mutants $VERSION into .tools/ (once, a few minutes)"
    cargo install --locked --quiet --root "$TOOLS" cargo-mutants --version "$VERSION"
fi
export PATH="$TOOLS/bin:$PATH"
# The GPU build is not needed to run mutants (GPU tests are ignored here); both mutators skip it,
# so they share one build of the `mutants` profile.
export SAFEDPO_NO_NVCC=1

mut_args=(--in-place --profile mutants --baseline skip --no-shuffle --output target/mutation-results)
# The targets go to every cargo command, the build's `cargo test --no-run` too: given only to the
# test run, each mutant would rebuild every test target of the crate (~50), not the few it runs.
for a in "${test_args[@]}"; do mut_args+=("--cargo-arg=$a"); done
for f in "${files[@]}"; do mut_args+=(--file "$f"); done
# Round-robin, so that one shard is a sample spread over every file rather than its first mutants.
[ -n "$shard" ] && mut_args+=(--shard "$shard" --sharding round-robin)
if [ $list -eq 1 ]; then
    exec cargo mutants "${mut_args[@]}" --list
fi

echo "mutating: ${files[*]}"
echo "tests:    ${test_args[*]}"
echo "budget:   $budget min"
# A copy of every file, put back if an interruption leaves a mutant in place.
backup=$(mktemp -d)
for f in "${files[@]}"; do mkdir -p "$backup/$(dirname "$f")"; cp -p "$f" "$backup/$f"; done
restore() {
    for f in "${files[@]}"; do
        if ! cmp -s "$f" "$backup/$f"; then
            echo "mutants.sh: restoring $f" >&2
            cp -p "$backup/$f" "$f"
        fi
    done
    rm -rf "$backup"
}
trap restore EXIT
mkdir -p target/mutation-results
status=0
timeout -s INT -k 120 "$((budget * 60))" cargo mutants "${mut_args[@]}" || status=$?
case $status in
    0|2|3) ;;   # all caught / some missed / some timed out: the report says which
    124) echo "budget of $budget min spent: the counts below are of the mutants finished" ;;
    *) echo "cargo mutants exited with $status" >&2 ;;
esac

out=target/mutation-results/mutants.out
python3 - "$out" <<'EOF'
import collections, sys, pathlib
out = pathlib.Path(sys.argv[1])
counts = collections.defaultdict(collections.Counter)
for kind in ("caught", "missed", "timeout", "unviable"):
    p = out / f"{kind}.txt"
    if p.exists():
        for line in p.read_text().splitlines():
            if line.strip():
                counts[line.split(":")[0]][kind] += 1
print("\n| file | caught | timeout | missed | unviable | score |\n|---|---|---|---|---|---|")
for f, c in sorted(counts.items()):
    detected = c["caught"] + c["timeout"]
    counted = detected + c["missed"]
    score = f"{100 * detected / counted:.0f}%" if counted else "-"
    print(f"| `{f}` | {c['caught']} | {c['timeout']} | {c['missed']} | {c['unviable']} | {score} |")
missed = out / "missed.txt"
if missed.exists() and missed.read_text().strip():
    print("\nmissed (each needs a test or a reason in docs/TESTING.md):")
    print(missed.read_text().rstrip())
EOF
