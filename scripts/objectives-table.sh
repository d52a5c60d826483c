#!/usr/bin/env bash
# Every objective with and without its safety twin on the demo's data: held-out safe-preferred and
# reward accuracy after the demo's preference stage, as a markdown table (docs/OBJECTIVES.md).
#
#   bash scripts/objectives-table.sh                 # all objectives; writes docs/OBJECTIVES.md
#   OUT=/tmp/objectives bash scripts/objectives-table.sh dpo ipo   # some objectives; runs under $OUT
#   TABLE=/tmp/t.md bash scripts/objectives-table.sh # the table somewhere else
#
# 1. `safedpo demo` once: the synthetic safety data (train.jsonl, eval.jsonl on held-out prompts)
#    and the helpfulness-only SFT model that is every run's initial policy and reference.
# 2. For each objective, the demo's SafeDPO run (its config.toml: same data through T(D), same
#    optimizer, 40 steps, lr 3e-4, seed) with `--objective.name X`, once as published (safety margin
#    0; `safedpo`: delta 0, i.e. `dpo`) and once as its safety twin (safety margin 10, SafeDPO's Δ).
# 3. The final held-out evaluation of each run: `eval/safe_preferred_accuracy` (pairs with exactly
#    one unsafe response: the safe one's implicit reward higher) and `eval/rewards/accuracies`.
#
# Every run uses the CPU backend (f32) and the same settings, tuned for SafeDPO: an objective whose
# loss has another scale (the squared ones, the reference-free ones on mean log-probs) may want
# another learning rate. The table records the machine's CPU model and flags.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/objectives}
TABLE=${TABLE:-docs/OBJECTIVES.md}
BIN=${BIN:-target/release/safedpo}
MARGIN=${MARGIN:-10}
[ -x "$BIN" ] || cargo build --release --bin safedpo

# Objectives: the arguments, else every one (`safedpo train --help` lists them) and four combinations.
if [ $# -gt 0 ]; then
    objectives=("$@")
else
    objectives=(dpo ipo robust cdpo hinge rpo simpo npo exo_pair nca_pair sppo_hard aot aot_unpaired apo_zero
        apo_down discopop sigmoid_norm bco_pair sft orpo cpo cpo_hinge cpo_ipo cpo_simpo
        "0.8*sigmoid+0.2*bco_pair+sft" "sigmoid:rpo_alpha=1" "sigmoid:f_divergence_type=js_divergence"
        "bco_pair:bco_running_mean=true")
fi

mkdir -p "$OUT"
if [ ! -f "$OUT/demo/sft/final/model.safetensors" ]; then
    "$BIN" demo --out-dir "$OUT/demo" --device cpu >"$OUT/demo.log" 2>&1
fi
# The demo's preference run without its [objective] table: each run names its own.
awk '/^\[objective\]/ {skip = 1; next} /^\[/ {skip = 0} !skip' "$OUT/demo/safedpo/config.toml" >"$OUT/base.toml"

# The final eval record's value of key $2 in run directory $1.
final_eval() {
    python3 -c 'import json, sys
records = [json.loads(l) for l in open(sys.argv[1]) if "eval/loss" in l]
print("%.3f" % records[-1][sys.argv[2]])' "$1/metrics.jsonl" "$2"
}

# Runs objective $1 with extra flags $3… into $OUT/$2; prints "safe-preferred reward-accuracy".
run() {
    local text=$1 dir=$OUT/$2
    shift 2
    local name=${text%%:*} settings=""
    [[ $text == *:* ]] && settings=${text#*:}
    local flags=(--objective.name "$name")
    if [ -n "$settings" ]; then
        IFS=, read -ra pairs <<<"$settings"
        for pair in "${pairs[@]}"; do flags+=("--objective.${pair%%=*}" "${pair#*=}"); done
    fi
    if ! "$BIN" train --config "$OUT/base.toml" --out-dir "$dir" --overwrite --no-progress "${flags[@]}" "$@" >"$dir.log" 2>&1; then
        echo "safedpo train ${flags[*]} $* failed; see $dir.log" >&2
        exit 1
    fi
    echo "$(final_eval "$dir" eval/safe_preferred_accuracy) $(final_eval "$dir" eval/rewards/accuracies)"
}

rows=()
for objective in "${objectives[@]}"; do
    slug=$(echo "$objective" | tr -c 'a-zA-Z0-9_\n' '-')
    if [ "$objective" = safedpo ]; then
        plain=$(run safedpo "$slug-plain" --objective.delta 0)
        twin=$(run safedpo "$slug-twin" --objective.delta "$MARGIN")
    else
        plain=$(run "$objective" "$slug-plain")
        # sft has no safety margin: no twin.
        if [ "${objective%%:*}" = sft ]; then twin="– –"; else twin=$(run "$objective" "$slug-twin" --objective.safety_margin "$MARGIN"); fi
    fi
    read -r plain_safe plain_reward <<<"$plain"
    read -r twin_safe twin_reward <<<"$twin"
    rows+=("| \`$objective\` | $plain_safe | $twin_safe | $plain_reward | $twin_reward |")
    echo "$objective: $plain / $twin" >&2
done

read -r before_safe before_reward <<<"$(python3 -c 'import json, sys
r = [json.loads(l) for l in open(sys.argv[1]) if "eval/loss" in l][0]
print("%.3f %.3f" % (r["eval/safe_preferred_accuracy"], r["eval/rewards/accuracies"]))' "$OUT/demo/safedpo/metrics.jsonl")"
cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2- | tr ' ' '\n' | grep -E '^(avx|avx2|avx512f|avx512bw|avx512vl|fma|f16c|sse4_2)$' | tr '\n' ' ')
# Notes below the table (from the `<!-- notes -->` line on) survive a rerun.
notes=""
if [ -f "$TABLE" ] && grep -q '^<!-- notes -->' "$TABLE"; then
    notes=$(sed -n '/^<!-- notes -->/,$p' "$TABLE")
fi
{
    cat <<EOF
# Objectives on the demo data, with and without their safety twin

Made by \`bash scripts/objectives-table.sh\` (commit $(git rev-parse --short HEAD), $(date -u +%Y-%m-%d)) on
$cpu_model, $(nproc) cores (flags: $cpu_flags), the CPU backend (f32).

The data and the reference are \`safedpo demo\`'s: synthetic safety pairs through T(D), whole prompts
held out, a helpfulness-only SFT model (compliant answers to harmful requests included) as the initial
policy and the reference. Each objective then runs the demo's SafeDPO stage (40 steps, lr 3e-4, β and
the other parameters at the objective's defaults), once as published (safety margin Δ = 0) and once as
its SafeDAA twin (Δ = $MARGIN: the SafeDPO shift \`(u_r − u_c)Δ\` in its loss; for \`safedpo\` the
rows are \`delta = 0\`, i.e. \`dpo\`, and \`delta = 10\`). \`sft\` has no rejected response and no twin.

Held-out metrics after the last step (pairs on prompts never trained on):

- **safe-preferred**: over the pairs with exactly one unsafe response, how often the safe one has the
  higher implicit reward (a tie ½);
- **reward acc.**: how often the chosen response (after T(D): the safe one when only one is) has the
  higher implicit reward.

Implicit rewards are each objective's logged ones: \`β(π − π_ref)\`, and for the reference-free
objectives \`β π\` (\`cpo\`, \`cpo_hinge\`) or \`β π/|y|\` (\`simpo\`, \`orpo\`, \`cpo_ipo\`, \`cpo_simpo\`).
Before training (policy = reference) every reference-based reward is 0: safe-preferred
$before_safe (chance), reward accuracy $before_reward (a tie is not a win). Every run uses SafeDPO's learning rate; an objective whose loss has
another scale may want another one, so a row is a comparison at equal settings, not each objective's best.

| objective | safe-preferred, Δ = 0 | safe-preferred, Δ = $MARGIN | reward acc., Δ = 0 | reward acc., Δ = $MARGIN |
|---|---|---|---|---|
EOF
    printf '%s\n' "${rows[@]}"
    if [ -n "$notes" ]; then printf '\n%s\n' "$notes"; fi
} >"$TABLE.tmp"
mv "$TABLE.tmp" "$TABLE"
echo "wrote $TABLE" >&2
