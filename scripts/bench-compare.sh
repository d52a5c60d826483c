#!/usr/bin/env bash
# Runs the training-step benchmark on safedpo and on the PyTorch baseline (eager, then
# torch.compile) with the same shape and objective, and prints them side by side with the ratio.
#
#   scripts/bench-compare.sh [--device cpu|cuda] [--objective.name dpo|safedpo] [--steps N] [--warmup N]
#                            [--threads N] [--peak-flops F] [--no-compile] [--out DIR] [-- SHAPE FLAGS]
#
# SHAPE FLAGS go to both sides unchanged: safedpo bench's settings --model.arch --model.n_layer
# --model.n_embd --model.n_head --model.n_kv_head --model.intermediate_size --model.tie_word_embeddings
# --model.vocab_size --model.n_positions --objective.beta --objective.delta
# --optimizer.lr --optimizer.grad_clip --seed (or --set KEY=VALUE), and --pairs --seq-len --prompt-len.
# Needs python3 with torch and transformers.
# Each run's JSON is kept in --out (default: a temporary directory, printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."

device=cpu objective=dpo steps=10 warmup=3 threads="$(nproc)" peak="" compile=1 out=""
shape=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --objective.name) objective="$2"; shift 2 ;;
        --steps) steps="$2"; shift 2 ;;
        --warmup) warmup="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        --peak-flops) peak="$2"; shift 2 ;;
        --no-compile) compile=0; shift ;;
        --out) out="$2"; shift 2 ;;
        --) shift; shape=("$@"); break ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "bench-compare: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
out="${out:-$(mktemp -d -t bench-compare.XXXXXX)}"
mkdir -p "$out"

common=(--device "$device" --objective.name "$objective" --steps "$steps" --warmup "$warmup" --threads "$threads")
[[ -n "$peak" ]] && common+=(--peak-flops "$peak")

# Ours: the CLI's bench subcommand.
cargo build --release --quiet --bin safedpo
ours=(./target/release/safedpo bench)
echo "safedpo:       ${ours[*]} --json ${common[*]} ${shape[*]}" >&2
RAYON_NUM_THREADS="$threads" "${ours[@]}" --json "${common[@]}" "${shape[@]}" >"$out/safedpo.json"

modes=(eager)
[[ $compile == 1 ]] && modes+=(compile)
for mode in "${modes[@]}"; do
    echo "torch-$mode: python3 benches/baselines/torch_dpo.py --mode $mode --json ${common[*]} ${shape[*]}" >&2
    python3 benches/baselines/torch_dpo.py --mode "$mode" --json "${common[@]}" "${shape[@]}" \
        2> >(grep -v "^\[transformers\]" >&2) >"$out/torch-$mode.json"
done

python3 - "$out" "${modes[@]}" <<'PY'
import json, sys
out, modes = sys.argv[1], sys.argv[2:]
runs = [json.load(open(f"{out}/safedpo.json"))] + [json.load(open(f"{out}/torch-{m}.json")) for m in modes]
ours = runs[0]
c = ours["config"]
print(f"\nDPO step, {c['objective']['name']}: L={c['n_layer']} d={c['n_embd']} heads={c['n_head']} "
      f"vocab={c['vocab_size']}, {c['pairs']} pairs x 2 x {c['seq_len']} tokens ({c['prompt_len']} prompt), "
      f"{c['warmup_steps']} warm-up + {c['steps']} timed steps")
def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)
cols = [
    ("engine", lambda r: r["engine"], "<15"),
    ("threads", lambda r: str(r["threads"]), ">7"),
    ("tokens/s", lambda r: fmt(r["tokens_per_s"], ",.0f"), ">10"),
    ("best tok/s", lambda r: fmt(r["tokens_per_s_best"], ",.0f"), ">10"),
    ("ours/this", lambda r: fmt(ours["tokens_per_s"] / r["tokens_per_s"], ".2f") + "x", ">9"),
    ("step ms", lambda r: fmt(r["step_ms"]["median"], ".1f"), ">8"),
    ("min ms", lambda r: fmt(r["step_ms"]["min"], ".1f"), ">8"),
    ("GFLOP/s", lambda r: fmt(r["flops_per_s"] / 1e9, ".2f"), ">8"),
    ("MFU", lambda r: fmt(r["mfu"] and 100 * r["mfu"], ".1f") + ("%" if r["mfu"] else ""), ">6"),
    ("peak MiB", lambda r: fmt(r["peak_memory_bytes"] and r["peak_memory_bytes"] / 2**20, ".0f"), ">8"),
    ("RSS MiB", lambda r: fmt(r.get("peak_host_rss_bytes") and r["peak_host_rss_bytes"] / 2**20, ".0f"), ">8"),
    ("loss", lambda r: fmt(r["final_loss"], ".4f"), ">7"),
]
print("  ".join(format(h, s) for h, _, s in cols))
for r in runs:
    print("  ".join(format(f(r), s) for _, f, s in cols))
print("\nmedian phase times, ms (log-probs folded into the forward unless shown)")
phases = ["reference_forward", "policy_forward", "log_probs", "loss", "backward", "optimizer"]
print(f"{'phase':<18}" + "".join(f"{r['engine']:>15}" for r in runs))
for p in phases:
    print(f"{p:<18}" + "".join(f"{fmt(r['phases_ms'].get(p), '.2f'):>15}" for r in runs))
print(f"\ndevices: " + "; ".join(f"{r['engine']}: {r['device']}" for r in runs))
print("peak memory: " + "; ".join(f"{r['engine']}: {r['memory_source']}" for r in runs))
print(f"JSON: {out}")
PY
