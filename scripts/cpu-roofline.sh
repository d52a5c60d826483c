#!/usr/bin/env bash
# Where a CPU training step stands against the machine's limit, in CPU time (so it can be measured
# on a busy machine, where wall-clock timings are noise):
#
# 1. the core's FMA peak: a C probe with 12 independent FMA chains on 256-bit and on 512-bit
#    vectors, timed with the thread's CPU clock (GFLOP/s per core);
# 2. the per-step CPU time of one thread of `safedpo bench` and of the PyTorch baseline, as the
#    difference between a run of LONG and a run of SHORT timed steps (user + sys seconds) divided by
#    the step difference, so set-up, model build and Python start-up cancel. Each side on its
#    AVX2 path (safedpo: the binary given with --avx2-bin, built with --no-default-features, and
#    SAFEDPO_CPU_ISA=avx2; PyTorch: ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2,
#    ONEDNN_MAX_CPU_ISA=AVX2) and on its default path.
#
#   scripts/cpu-roofline.sh [--avx2-bin PATH] [--python PY] [--objective.name dpo] [--short 5]
#                           [--long 25] [--reps 2] [-- SHAPE FLAGS]
#
# SHAPE FLAGS go to both sides (as for scripts/bench-compare.sh). The default shape is the bench's
# (GPT-2 family, L=4, d=128, V=512, 8 pairs × 128 tokens), whose FLOPs `safedpo bench` prints.
# Needs gcc (the probe), python3 with torch + transformers (the baseline); a missing piece is skipped
# with a note.
set -euo pipefail
cd "$(dirname "$0")/.."

avx2_bin="" python="${PYTHON:-python3}" objective=dpo short=5 long=25 reps=2
shape=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --avx2-bin) avx2_bin="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        --objective.name) objective="$2"; shift 2 ;;
        --short) short="$2"; shift 2 ;;
        --long) long="$2"; shift 2 ;;
        --reps) reps="$2"; shift 2 ;;
        --) shift; shape=("$@"); break ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "cpu-roofline: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
((long > short)) || { echo "cpu-roofline: --long must exceed --short" >&2; exit 2; }

echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores"
echo "flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'avx2|fma|avx512f|avx512bw|avx512vl|avx512_bf16|amx_tile' | xargs)"

probe_dir="$(mktemp -d -t cpu-roofline.XXXXXX)"
trap 'rm -rf "$probe_dir"' EXIT
cat >"$probe_dir/peak.c" <<'C'
#include <immintrin.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
static double cpu_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
#define CHAINS 12
#define ITERS 100000000L
__attribute__((target("avx2,fma"))) static double ymm(float *sink) {
    __m256 acc[CHAINS], b = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(1e-3f);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_set1_ps((float)i);
    double t0 = cpu_seconds();
    for (long it = 0; it < ITERS; it++)
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_fmadd_ps(acc[i], b, c);
    double t = cpu_seconds() - t0;
    for (int i = 0; i < CHAINS; i++) { float x[8]; _mm256_storeu_ps(x, acc[i]); *sink += x[0]; }
    return ITERS * CHAINS * 8 * 2 / t / 1e9;
}
__attribute__((target("avx512f"))) static double zmm(float *sink) {
    __m512 acc[CHAINS], b = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(1e-3f);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
    double t0 = cpu_seconds();
    for (long it = 0; it < ITERS; it++)
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_fmadd_ps(acc[i], b, c);
    double t = cpu_seconds() - t0;
    for (int i = 0; i < CHAINS; i++) *sink += _mm512_reduce_add_ps(acc[i]);
    return ITERS * CHAINS * 16 * 2 / t / 1e9;
}
int main(int argc, char **argv) {
    float sink = 0;
    printf("fma peak, 256-bit: %.1f GFLOP/s per core\n", ymm(&sink));
    if (argc > 1 && strcmp(argv[1], "avx512") == 0) printf("fma peak, 512-bit: %.1f GFLOP/s per core\n", zmm(&sink));
    return sink == 12345.0f;
}
C
if command -v gcc >/dev/null && gcc -O2 -funroll-loops "$probe_dir/peak.c" -o "$probe_dir/peak" 2>/dev/null; then
    if grep -qw avx512f /proc/cpuinfo; then "$probe_dir/peak" avx512; else "$probe_dir/peak"; fi
else
    echo "fma peak: skipped (no gcc)"
fi

cargo build --release --quiet --bin safedpo
default_bin=./target/release/safedpo
common=(--device cpu --objective.name "$objective" --warmup 2 --threads 1)

# user + sys CPU seconds of a command (its output discarded).
cpu_seconds() {
    /usr/bin/time -o "$probe_dir/time" -f '%U %S' "$@" >/dev/null 2>&1
    awk '{print $1 + $2}' "$probe_dir/time"
}

# per_step NAME ENV... -- COMMAND...: the per-step CPU time of COMMAND --steps N, N = long and short.
per_step() {
    local name="$1"; shift
    local envs=()
    while [[ "$1" != "--" ]]; do envs+=("$1"); shift; done
    shift
    for ((rep = 1; rep <= reps; rep++)); do
        local a b
        a="$(cpu_seconds env "${envs[@]}" "$@" --steps "$short")"
        b="$(cpu_seconds env "${envs[@]}" "$@" --steps "$long")"
        awk -v n="$name" -v a="$a" -v b="$b" -v s="$short" -v l="$long" -v r="$rep" \
            'BEGIN { printf "%-16s run %d: %7.1f ms CPU per step (one thread)\n", n, r, (b - a) / (l - s) * 1000 }'
    done
}

echo "per-step CPU time, $objective, ${shape[*]:-default shape}:"
if [[ -n "$avx2_bin" ]]; then
    per_step safedpo-avx2 SAFEDPO_CPU_ISA=avx2 RAYON_NUM_THREADS=1 -- "$avx2_bin" bench "${common[@]}" "${shape[@]}"
fi
per_step safedpo RAYON_NUM_THREADS=1 -- "$default_bin" bench "${common[@]}" "${shape[@]}"
if "$python" -c "import torch, transformers" 2>/dev/null; then
    torch=("$python" benches/baselines/torch_dpo.py --mode eager "${common[@]}" "${shape[@]}")
    per_step torch-avx2 OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        ONEDNN_MAX_CPU_ISA=AVX2 -- "${torch[@]}"
    per_step torch OMP_NUM_THREADS=1 -- "${torch[@]}"
else
    echo "torch: skipped ($python has no torch + transformers)"
fi
