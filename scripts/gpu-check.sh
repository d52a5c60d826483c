#!/usr/bin/env bash
# The GPU check: everything this project can only check on a real GPU, in one command of about
# eight minutes, from prebuilt binaries (the GPU machine has no cargo and no network).
#
#   bash scripts/gpu-bundle.sh                  # where cargo is: builds .gpu-bundle/ (< 60 MiB)
#   bash .gpu-bundle/gpu-check.sh LOGDIR        # on the GPU machine (the device tool: carry
#                                               # [".gpu-bundle"], LOGDIR under $OUT)
#   bash scripts/gpu-check.sh LOGDIR            # from a checkout: builds the bundle if cargo is
#                                               # there, then runs the bundle's copy
#
# Stages, each with its own time limit; a failure is recorded and the check goes on:
#   1. device: nvidia-smi, compute-sanitizer, torch versions, the bundle's MANIFEST.
#   2. correctness, run side by side (no timing is taken here): every bundled test executable with
#      `--ignored` (its `needs a GPU` tests, i.e. the GPU twins of the emulated-device tests), and
#      compute-sanitizer memcheck and racecheck over the kernel tests (GPU tests only, minus the
#      determinism reruns and the host-side error checks).
#   3. training: 50 SafeDPO steps of a GPT-2 124M-shaped model (random init, 12 layers, d = 768,
#      12 heads, vocab 50257) on the demo's synthetic PKU-SafeRLHF data, --device cuda; loss at the
#      first and last step, time, tokens/s.
#   4. step benchmark at the issue's GPU shape (GPT-2 124M, 16 pairs of 512 tokens, SafeDPO):
#      `safedpo bench --device cuda --json`, then torch_dpo.py eager and torch.compile at the same
#      shape; device memory sampled with nvidia-smi during each.
#   5. kernel benchmarks (bench/kernels_cuda, short criterion settings; in bf16 the attention group
#      twice, tensor-core and portable kernels), then PyTorch SDPA at the same shapes
#      (torch_attention.py), if time is left.
#   6. the summary: LOGDIR/summary.txt (also printed) and LOGDIR/summary.json.
#
# Only figures from a real GPU count. SAFEDPO_GPU_CHECK_DEVICE=emu is a dry run of the plumbing
# here without a GPU: the emulated device with tiny shapes, the emulated test twins instead of the
# GPU ones, no sanitizers, PyTorch on the CPU; its numbers mean nothing.
#
# Environment: SAFEDPO_GPU_CHECK_DEVICE (cuda | emu; default cuda), SAFEDPO_GPU_CHECK_BUDGET_S
# (default 480: later stages are cut short or skipped past it), SAFEDPO_GPU_CHECK_PEAK_FLOPS (for
# MFU; default from the GPU's name, e.g. 989e12 for an H100 SXM), SAFEDPO_GPU_CHECK_SCRATCH (where
# the training run's checkpoints go; default a temporary directory, removed at the end),
# SAFEDPO_CUBLASLT (path of libcublasLt.so.13; default: found in the usual places, see stage 1).
set -uo pipefail # no -e: every stage's failure is recorded and the check goes on

here=$(cd "$(dirname "$0")" && pwd)

# ---- from a checkout: build the bundle when cargo is here, then run the bundle's copy ----------------
if [[ ! -x "$here/bin/safedpo" ]]; then
    repo=$(cd "$here/.." && pwd)
    if command -v cargo >/dev/null; then
        bash "$repo/scripts/gpu-bundle.sh" >&2 || { echo "gpu-check: building the bundle failed" >&2; exit 1; }
    fi
    if [[ ! -x "$repo/.gpu-bundle/gpu-check.sh" ]]; then
        echo "gpu-check: no bundle at $repo/.gpu-bundle and no cargo to build one (run scripts/gpu-bundle.sh" \
            "where cargo is, and carry .gpu-bundle)" >&2
        exit 2
    fi
    exec bash "$repo/.gpu-bundle/gpu-check.sh" "$@"
fi

if [[ $# -ne 1 || "$1" == -* ]]; then
    sed -n '2,34p' "$0" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
logdir=$(cd "$1" && pwd)
device=${SAFEDPO_GPU_CHECK_DEVICE:-cuda}
if [[ "$device" != cuda && "$device" != emu ]]; then
    echo "gpu-check: SAFEDPO_GPU_CHECK_DEVICE=$device: expected cuda or emu" >&2
    exit 2
fi
budget=${SAFEDPO_GPU_CHECK_BUDGET_S:-480}
deadline=$((SECONDS + budget))
scratch=${SAFEDPO_GPU_CHECK_SCRATCH:-}
own_scratch=0
if [[ -z "$scratch" ]]; then
    scratch=$(mktemp -d -t gpu-check.XXXXXX)
    own_scratch=1
fi
safedpo="$here/bin/safedpo"
stages="$logdir/stages.tsv"
mkdir -p "$logdir"/{tests,sanitizer,train,bench,kernels}
rm -f "$stages" "$logdir"/tests/*.log "$logdir"/sanitizer/*.log "$logdir"/bench/* "$logdir"/train/* "$logdir"/kernels/*
printf 'stage\tstatus\trc\tseconds\tlog\tnote\n' >"$stages"

have() { command -v "$1" >/dev/null 2>&1; }
now() { date +%s.%N; }
left() { echo $((deadline - SECONDS)); }
say() { echo "[gpu-check $(date +%H:%M:%S) +${SECONDS}s] $*" >&2; }

# record STAGE STATUS RC SECONDS LOG NOTE
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5#"$logdir"/}" "${6:-}" >>"$stages"; }

# The time limit of a stage: its own, cut to what is left of the budget; prints 0 when too little.
limit() {
    local want=$1 rest
    rest=$(left)
    ((rest < want)) && want=$rest
    ((want < 10)) && want=0
    echo "$want"
}

# run_stage STAGE LIMIT LOG STDOUT -- COMMAND...: runs COMMAND under `timeout`, stderr (and stdout
# when STDOUT is empty) into LOG, and records the outcome. Returns the command's exit code.
run_stage() {
    local stage=$1 lim=$2 log=$3 out=$4
    shift 5
    if ((lim == 0)); then
        record "$stage" skipped "" 0 "" "out of time (budget ${budget}s)"
        say "$stage: skipped, out of time"
        return 125
    fi
    local start rc secs status
    start=$(now)
    say "$stage (limit ${lim}s)"
    if [[ -n "$out" ]]; then
        timeout --kill-after=10 "$lim" "$@" >"$out" 2>"$log"
    else
        timeout --kill-after=10 "$lim" "$@" >"$log" 2>&1
    fi
    rc=$?
    secs=$(awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
    if ((rc == 0)); then
        status=ok
    elif ((rc == 124 || rc == 137)); then
        status=timeout
    else
        status=fail
    fi
    record "$stage" "$status" "$rc" "$secs" "$log" "limit ${lim}s"
    say "$stage: $status (rc $rc, ${secs}s)"
    return "$rc"
}

# GPU memory in use (MiB), sampled every 100 ms into a file while a stage runs (real GPU only).
sampler_pid=""
sampler_start() {
    if [[ "$device" == cuda ]] && have nvidia-smi; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 >"$1.base" 2>/dev/null
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 100 >"$1" 2>/dev/null &
        sampler_pid=$!
    fi
}
sampler_stop() {
    if [[ -n "$sampler_pid" ]]; then
        kill "$sampler_pid" 2>/dev/null
        wait "$sampler_pid" 2>/dev/null
        sampler_pid=""
    fi
}

cleanup() {
    sampler_stop
    ((own_scratch)) && rm -rf "$scratch"
}
trap cleanup EXIT

# ---- shapes ----------------------------------------------------------------------------------------
if [[ "$device" == cuda ]]; then
    torch_device=cuda
    model_flags=(--model.n_layer 12 --model.n_embd 768 --model.n_head 12 --model.vocab_size 50257
        --model.n_positions 1024)
    batch_flags=(--pairs 16 --seq-len 512 --objective.name safedpo --warmup 3 --steps 10)
    train_rows=1500
    train_flags=(--model.n_layer 12 --model.n_embd 768 --model.n_head 12 --model.n_positions 1024
        --model.vocab_size 50257 --data.max_len 256 --optimizer.total_steps 50 --optimizer.warmup_steps 5
        --optimizer.lr 1e-4 --batching.tokens_per_micro_batch 16384 --data.eval_fraction 0.02)
    limit_test=90 limit_sanitizer=150 limit_train=100 limit_bench=75 limit_eager=45 limit_compile=100
    limit_kernels=120
else
    torch_device=cpu
    model_flags=(--model.n_layer 1 --model.n_embd 32 --model.n_head 2 --model.vocab_size 300
        --model.n_positions 64)
    batch_flags=(--pairs 2 --seq-len 32 --objective.name safedpo --warmup 1 --steps 2)
    train_rows=100
    train_flags=(--model.n_layer 1 --model.n_embd 32 --model.n_head 2 --model.n_positions 160
        --model.vocab_size 300 --data.max_len 160 --optimizer.total_steps 3 --optimizer.warmup_steps 1
        --optimizer.lr 1e-3 --batching.tokens_per_micro_batch 1024 --data.eval_fraction 0.1)
    limit_test=60 limit_sanitizer=60 limit_train=120 limit_bench=60 limit_eager=60 limit_compile=150
    limit_kernels=30
fi

# ---- 1. device -------------------------------------------------------------------------------------
say "device $device, logs in $logdir, budget ${budget}s"
cp "$here/MANIFEST.txt" "$logdir/MANIFEST.txt" 2>/dev/null
sanitizer=""
for c in compute-sanitizer "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer \
    /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if have "$c"; then
        sanitizer=$(command -v "$c")
        break
    fi
done
# The matrix products need CUDA 13's libcublasLt.so.13. safedpo finds it on the loader's path, under
# $CUDA_HOME, $CUDA_PATH, next to nvcc and in /usr/local/cuda; where CUDA came as pip wheels (torch's
# nvidia-* packages) it is elsewhere: point SAFEDPO_CUBLASLT at the first one found.
cublaslt_candidates() {
    echo "${CUDA_HOME:-/usr/local/cuda}/lib64/libcublasLt.so.13"
    echo /usr/local/cuda/lib64/libcublasLt.so.13
    echo /usr/local/cuda/targets/x86_64-linux/lib/libcublasLt.so.13
    ldconfig -p 2>/dev/null | awk '/libcublasLt[.]so[.]13 /{ print $NF }'
    python3 - 2>/dev/null <<'PY'
import glob, site
for d in site.getsitepackages() + [site.getusersitepackages()]:
    for path in sorted(glob.glob(d + "/nvidia/*/lib/libcublasLt.so.13")):
        print(path)
PY
}
if [[ "$device" == cuda && -z "${SAFEDPO_CUBLASLT:-}" ]]; then
    while read -r c; do
        if [[ -f "$c" ]]; then
            export SAFEDPO_CUBLASLT=$c
            break
        fi
    done < <(cublaslt_candidates)
fi
{
    echo "== host: $(uname -n), $(nproc) cores, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "== check device: $device"
    if have nvidia-smi; then
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    echo "== compute-sanitizer: ${sanitizer:-not found}"
    echo "== libcublasLt.so.13: ${SAFEDPO_CUBLASLT:-not found here (safedpo then asks the dynamic loader)}"
    [[ -n "$sanitizer" ]] && "$sanitizer" --version | tail -n 2
    echo "== nvcc: $(nvcc --version 2>/dev/null | tail -n 1 || echo 'not found')"
    echo "== python: $(python3 -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tail -n 1)"
    echo "== bundle"
    cat "$here/MANIFEST.txt" 2>/dev/null
} >"$logdir/device.txt" 2>&1
gpu_name=""
if have nvidia-smi; then
    gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null | head -n 1)
fi
peak=${SAFEDPO_GPU_CHECK_PEAK_FLOPS:-}
if [[ -z "$peak" && "$device" == cuda ]]; then
    # Dense bf16 tensor-core peaks (NVIDIA data sheets).
    case "$gpu_name" in
        *H100*PCIe*) peak=756e12 ;;
        *H100*NVL*) peak=835e12 ;;
        *H100* | *H200* | *GH200*) peak=989e12 ;;
        *A100*) peak=312e12 ;;
    esac
fi
peak_flags=()
[[ -n "$peak" ]] && peak_flags=(--peak-flops "$peak")
record device ok 0 0 "$logdir/device.txt" "${gpu_name:-no GPU (${device})}"
# The binaries were built elsewhere: say at once if this machine's libraries cannot run them.
if ! "$safedpo" --version >"$logdir/bundle.log" 2>&1; then
    record bundle fail 1 0 "$logdir/bundle.log" "bin/safedpo does not run here (see MANIFEST.txt: needs)"
fi

# ---- 2. correctness: GPU tests and sanitizers, side by side ---------------------------------------
# The tests that run for one test executable: its GPU twins (`--ignored`); on the emulated device,
# its emulated twins (named by each file's test macro).
test_args() {
    if [[ "$device" == cuda ]]; then
        echo "--ignored"
        return
    fi
    case "$1" in
        gpu_device) echo "on_emu::" ;;
        ops | cuda_step) echo "emu::" ;;
        frozen) echo "close_to_trainable_on_the_emulated_device" ;;
        *) echo "" ;;
    esac
}

jobs_started=()
start_job() { # STAGE LIMIT LOG -- COMMAND...
    run_stage "$1" "$2" "$3" "" "${@:4}" &
    jobs_started+=($!)
}

lim=$(limit "$limit_sanitizer")
for exe in "$here"/tests/*; do
    [[ -x "$exe" ]] || continue
    name=$(basename "$exe")
    args=$(test_args "$name")
    if [[ -z "$args" ]]; then
        record "test:$name" skipped "" 0 "" "no emulated twins known for this executable"
        continue
    fi
    # shellcheck disable=SC2086 # args is one or two words
    start_job "test:$name" "$(limit "$limit_test")" "$logdir/tests/$name.log" -- "$exe" $args
done

# (tool, test executable, filter): the kernel families, the device self-tests, one whole step.
sanitizer_runs=(
    "memcheck ops gpu:: --skip determinism --skip errors"
    "memcheck gpu_device on_gpu::"
    "memcheck cuda_step gpu::step_matches_cpu"
    "racecheck ops gpu:: --skip determinism --skip errors"
    "racecheck gpu_device on_gpu::"
)
for run in "${sanitizer_runs[@]}"; do
    read -r tool target filter <<<"$run"
    stage="$tool:$target"
    if [[ "$device" != cuda ]]; then
        record "$stage" skipped "" 0 "" "dry run: no sanitizer on the emulated device"
    elif [[ -z "$sanitizer" ]]; then
        record "$stage" skipped "" 0 "" "compute-sanitizer not found"
    elif [[ ! -x "$here/tests/$target" ]]; then
        record "$stage" skipped "" 0 "" "no test executable $target in the bundle"
    else
        # shellcheck disable=SC2086 # filter is several words
        start_job "$stage" "$lim" "$logdir/sanitizer/$tool-$target.log" -- \
            "$sanitizer" --tool "$tool" --print-limit 200 "$here/tests/$target" --ignored $filter
    fi
done
for pid in "${jobs_started[@]}"; do
    wait "$pid"
done

# ---- 3. training --------------------------------------------------------------------------------
data_dir="$scratch/data"
run_dir="$scratch/train"
rm -rf "$run_dir"
if run_stage train-data "$(limit 60)" "$logdir/train/data.log" "" -- \
    "$safedpo" demo --data-only --rows "$train_rows" --seed 42 --out-dir "$data_dir"; then
    run_stage train "$(limit "$limit_train")" "$logdir/train/train.log" "$logdir/train/summary.json" -- \
        "$safedpo" train --device "$device" --data.path "$data_dir/data.jsonl" --data.format pku-saferlhf \
        --data.template "USER: {prompt} ASSISTANT:" --objective.name safedpo --out_dir "$run_dir" \
        --intervals.eval_every 0 --intervals.checkpoint_every 0 --no-progress "${train_flags[@]}"
    cp "$run_dir/metrics.jsonl" "$run_dir/config.toml" "$logdir/train/" 2>/dev/null
else
    record train skipped "" 0 "" "no data"
fi
rm -rf "$run_dir"

# ---- 4. step benchmark: ours, then PyTorch eager and torch.compile -------------------------------
sampler_start "$logdir/bench/safedpo.mem"
run_stage bench:safedpo "$(limit "$limit_bench")" "$logdir/bench/safedpo.log" "$logdir/bench/safedpo.json" -- \
    "$safedpo" bench --device "$device" --json "${model_flags[@]}" "${batch_flags[@]}" "${peak_flags[@]}"
sampler_stop
if have python3; then
    for mode in eager compile; do
        lim_var="limit_$mode"
        sampler_start "$logdir/bench/torch-$mode.mem"
        run_stage "bench:torch-$mode" "$(limit "${!lim_var}")" "$logdir/bench/torch-$mode.log" \
            "$logdir/bench/torch-$mode.json" -- python3 "$here/torch_dpo.py" --mode "$mode" --json \
            --device "$torch_device" --threads "$(nproc)" "${model_flags[@]}" "${batch_flags[@]}" "${peak_flags[@]}"
        sampler_stop
    done
else
    record bench:torch-eager skipped "" 0 "" "python3 not found"
    record bench:torch-compile skipped "" 0 "" "python3 not found"
fi

# ---- 5. kernel benchmarks, with what is left of the budget ---------------------------------------
if [[ -x "$here/bench/kernels_cuda" ]]; then
    lim=$(limit "$limit_kernels")
    if [[ "$device" == cuda ]] && ((lim < 60)); then
        lim=0 # too little left for figures worth having
    fi
    CRITERION_HOME="$scratch/criterion" run_stage bench:kernels "$lim" "$logdir/kernels/kernels_cuda.log" "" -- \
        "$here/bench/kernels_cuda" --bench --warm-up-time 0.2 --measurement-time 1 --sample-size 10
else
    record bench:kernels skipped "" 0 "" "bench/kernels_cuda not in the bundle"
fi
# PyTorch's SDPA at the attention group's shapes (beside the tensor-core and portable kernels above).
if have python3 && [[ -f "$here/torch_attention.py" ]]; then
    run_stage bench:torch-attention "$(limit 60)" "$logdir/kernels/torch-attention.log" \
        "$logdir/kernels/torch-attention.json" -- python3 "$here/torch_attention.py" --json --device "$torch_device"
else
    record bench:torch-attention skipped "" 0 "" "python3 or torch_attention.py not found"
fi

# ---- 6. summary ------------------------------------------------------------------------------------
if ! have python3; then
    column -t -s $'\t' "$stages" | tee "$logdir/summary.txt"
    exit 0
fi
python3 - "$logdir" "$device" "$SECONDS" "${gpu_name:-}" <<'PY' | tee "$logdir/summary.txt"
import glob, json, os, re, sys

logdir, device, elapsed, gpu_name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
dry = device != "cuda"
out = {"device": device, "gpu": gpu_name or None, "dry_run": dry, "elapsed_s": elapsed}


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def load_json(path):
    text = read(path).strip()
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None


stages = {}
for line in read(f"{logdir}/stages.tsv").splitlines()[1:]:
    f = line.split("\t")
    if len(f) >= 6:
        stages[f[0]] = {"status": f[1], "rc": f[2], "seconds": f[3], "log": f[4], "note": f[5]}
out["stages"] = stages


def libtest(text):
    """(passed, failed, names of failed tests, whether a summary line was seen) of a libtest log."""
    failed_names = re.findall(r"^test (\S+) \.\.\. FAILED", text, re.M)
    summaries = re.findall(r"test result: \w+\. (\d+) passed; (\d+) failed", text)
    if summaries:
        return sum(int(p) for p, _ in summaries), sum(int(f) for _, f in summaries), failed_names, True
    passed = len(re.findall(r"^test \S+ \.\.\. ok", text, re.M))
    return passed, len(failed_names), failed_names, False


def sanitizer(text, tool):
    """Errors (memcheck) or hazards (racecheck) from compute-sanitizer's summary lines; None if absent."""
    api = len(re.findall(r"Program hit \w+ \(error \d+\)|Program hit CUDA_ERROR", text))
    if tool == "racecheck":
        m = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
        if m:
            return {"errors": sum(int(e) for _, e, _ in m), "warnings": sum(int(w) for _, _, w in m), "api": api}
    m = re.findall(r"ERROR SUMMARY: (\d+) errors?", text)
    if m:
        return {"errors": sum(int(x) for x in m), "warnings": 0, "api": api}
    return None


def fmt_s(stage):
    s = stages.get(stage)
    return f"{s['status']} ({s['seconds']} s)" if s else "not run"


lines = []
p = lines.append
title = f"safedpo GPU check on {gpu_name or 'no GPU'} ({device})"
p(title)
p("=" * len(title))
if dry:
    p("DRY RUN on the emulated device with tiny shapes: this exercises the plumbing only; no figure below")
    p("counts (timings, memory and ratios only mean something from a real GPU).")
manifest = read(f"{logdir}/MANIFEST.txt")
m = re.search(r"^commit: (.*)$", manifest, re.M)
if m:
    p(f"bundle commit {m.group(1)}")
p("")

# Tests.
p("GPU tests" + (" (dry run: the emulated twins)" if dry else " (--ignored: the `needs a GPU` twins)"))
tests = {}
for log in sorted(glob.glob(f"{logdir}/tests/*.log")):
    name = os.path.basename(log)[:-4]
    passed, failed, names, complete = libtest(read(log))
    st = stages.get(f"test:{name}", {})
    tests[name] = {"passed": passed, "failed": failed, "failed_tests": names, "status": st.get("status")}
    extra = "" if complete else f"  [no summary line: {st.get('status', '?')} rc {st.get('rc', '?')}]"
    p(f"  {name:<16}{passed:>4} passed {failed:>4} failed  {st.get('seconds', '?'):>6} s{extra}")
    for n in names:
        p(f"      FAILED {n}")
for stage, st in stages.items():
    if stage.startswith("test:") and st["status"] == "skipped":
        p(f"  {stage[5:]:<16}skipped: {st['note']}")
out["tests"] = tests
total_p = sum(t["passed"] for t in tests.values())
total_f = sum(t["failed"] for t in tests.values())
p(f"  {'total':<16}{total_p:>4} passed {total_f:>4} failed")
p("")

# Sanitizers.
p("compute-sanitizer (GPU tests of the kernels)")
san = {}
for stage, st in stages.items():
    if not (stage.startswith("memcheck:") or stage.startswith("racecheck:")):
        continue
    tool, target = stage.split(":", 1)
    if st["status"] == "skipped":
        p(f"  {tool:<10}{target:<14}skipped: {st['note']}")
        san[stage] = {"status": "skipped"}
        continue
    text = read(f"{logdir}/{st['log']}")
    r = sanitizer(text, tool)
    passed, failed, _, _ = libtest(text)
    entry = {"status": st["status"], "tests_passed": passed, "tests_failed": failed}
    if r is None:
        p(f"  {tool:<10}{target:<14}no sanitizer summary ({st['status']}, rc {st['rc']}, {st['seconds']} s)")
    else:
        entry.update(r)
        what = "hazards" if tool == "racecheck" else "errors"
        detail = f"{r['errors']} {what}"
        if r["warnings"]:
            detail += f", {r['warnings']} warnings"
        if r["api"]:
            detail += f" (of which {r['api']} CUDA API errors)"
        p(f"  {tool:<10}{target:<14}{detail:<34} tests {passed} ok / {failed} failed, {st['seconds']} s")
    san[stage] = entry
out["sanitizer"] = san
p("")

# Training.
p("training: 50 SafeDPO steps, GPT-2 124M shape (random init), synthetic PKU-SafeRLHF" if not dry
  else "training (dry run: 3 steps of a tiny model on the emulated device)")
metrics = [json.loads(l) for l in read(f"{logdir}/train/metrics.jsonl").splitlines() if l.strip().startswith("{")]
steps = [r for r in metrics if "loss" in r and "eval/loss" not in r]
evals = [r for r in metrics if "eval/loss" in r]
summary = load_json(f"{logdir}/train/summary.json")
train = {"status": stages.get("train", {}).get("status")}
if steps:
    train.update(first_loss=steps[0]["loss"], last_loss=steps[-1]["loss"], steps=steps[-1]["step"])
    p(f"  loss (train, per step)   {steps[0]['loss']:.4f} (step {steps[0]['step']}) -> {steps[-1]['loss']:.4f} "
      f"(step {steps[-1]['step']})")
if len(evals) >= 2:
    a, b = evals[0], evals[-1]
    train.update(eval_loss_before=a["eval/loss"], eval_loss_after=b["eval/loss"])
    acc = lambda r: r.get("eval/safe_preferred_accuracy")
    p(f"  held-out loss            {a['eval/loss']:.4f} -> {b['eval/loss']:.4f}; safe-preferred accuracy "
      f"{acc(a)} -> {acc(b)}")
if summary:
    train.update(seconds=summary.get("train_seconds"), tokens_per_s=summary.get("tokens_per_second"))
    p(f"  time                     {summary.get('train_seconds', float('nan')):.1f} s training, "
      f"{summary.get('tokens_per_second', float('nan')):,.0f} tokens/s; stage {fmt_s('train')}")
elif not steps:
    p(f"  no result: {fmt_s('train')} (see train/train.log)")
out["train"] = train
p("")

# Step benchmark.
def mem_peak(path):
    """Peak GPU memory in use during a stage minus the use before it, MiB (nvidia-smi samples)."""
    try:
        samples = [float(x) for x in read(path).split()]
        base = float(read(path + ".base").split()[0])
    except (ValueError, IndexError):
        return None
    return max(samples) - base if samples else None


runs = []
for engine in ["safedpo", "torch-eager", "torch-compile"]:
    r = load_json(f"{logdir}/bench/{engine}.json")
    st = stages.get(f"bench:{engine}", {})
    runs.append((engine, r, st, mem_peak(f"{logdir}/bench/{engine}.mem")))
ours = runs[0][1]
cfg = next((r["config"] for _, r, _, _ in runs if r), None)
if cfg:
    p(f"step benchmark: {cfg['objective']['name']}, L={cfg['n_layer']} d={cfg['n_embd']} heads={cfg['n_head']} "
      f"vocab={cfg['vocab_size']}, {cfg['pairs']} pairs x 2 x {cfg['seq_len']} tokens, "
      f"{cfg['warmup_steps']} warm-up + {cfg['steps']} timed steps")
else:
    p("step benchmark: no result")
hdr = f"  {'engine':<15}{'tokens/s':>11}{'ours/this':>10}{'step ms':>9}{'MFU':>7}{'GPU MiB':>9}{'engine MiB':>11}  status"
p(hdr)
bench = {}
for engine, r, st, mem in runs:
    status = f"{st.get('status', 'not run')} ({st.get('seconds', '?')} s)"
    if not r:
        p(f"  {engine:<15}{'-':>11}{'-':>10}{'-':>9}{'-':>7}{'-':>9}{'-':>11}  {status}")
        bench[engine] = {"status": st.get("status")}
        continue
    ratio = ours["tokens_per_s"] / r["tokens_per_s"] if ours and r["tokens_per_s"] else None
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
    eng_mem = r.get("peak_memory_bytes")
    eng_mem_s = f"{eng_mem / 2**20:,.0f}" if eng_mem else "n/a"
    mem_s = f"{mem:,.0f}" if mem is not None else "n/a"
    ratio_s = f"{ratio:.2f}x" if ratio else "n/a"
    p(f"  {engine:<15}{r['tokens_per_s']:>11,.0f}{ratio_s:>10}{r['step_ms']['median']:>9.1f}{mfu:>7}{mem_s:>9}"
      f"{eng_mem_s:>11}  {status}")
    bench[engine] = {
        "status": st.get("status"), "tokens_per_s": r["tokens_per_s"], "step_ms": r["step_ms"]["median"],
        "mfu": r.get("mfu"), "ours_over_this": ratio, "gpu_mem_mib_sampled": mem,
        "engine_peak_bytes": eng_mem, "engine_memory_source": r.get("memory_source"),
        "final_loss": r.get("final_loss"), "device": r.get("device"),
    }
p("  GPU MiB: peak nvidia-smi memory.used during the run minus before it (100 ms samples);")
p("  engine MiB: each engine's own peak of its device buffers (safedpo: its allocator's count; torch:")
p("  max_memory_allocated), or the host VmHWM where an engine counts none (memory_source in its JSON).")
out["bench"] = bench
if ours:
    ph = ours["phases_ms"]
    p("  safedpo phases (median ms): " + ", ".join(
        f"{k} {v:.1f}" for k, v in ph.items() if v is not None))
p("")

# Kernel benchmarks: the throughput line of each criterion benchmark.
klog = read(f"{logdir}/kernels/kernels_cuda.log")
kernels = []
current = None
for line in klog.splitlines():
    m = re.match(r"^(\S.*?)\s+time:\s+\[", line)
    if m:
        current = m.group(1).strip()
        continue
    if line and not line[0].isspace() and not line.startswith(("Benchmarking", "Found", "Warning", "kernels_cuda")):
        current = line.strip()
        continue
    m = re.search(r"thrpt:\s+\[\S+ \S+ (\S+ \S+) \S+ \S+\]", line)
    if m and current:
        kernels.append((current, m.group(1)))
        current = None
st = stages.get("bench:kernels")
p(f"kernel benchmarks (bench/kernels_cuda): {fmt_s('bench:kernels')}")
for name, thr in kernels:
    p(f"  {name:<72}{thr:>14}")
if not kernels:
    first = next((l for l in klog.splitlines() if l.startswith("kernels_cuda")), "")
    p(f"  {first or 'no figures'}")
out["kernels"] = [{"bench": n, "throughput": t} for n, t in kernels]
p("")
try:
    sdpa = json.loads(read(f"{logdir}/kernels/torch-attention.json") or "null")
except ValueError:
    sdpa = None
p(f"PyTorch SDPA at the attention group's shapes: {fmt_s('bench:torch-attention')}")
for r in (sdpa or {}).get("rows", []):
    p(f"  {r['layout']:<16} {r['shape']} {r['dtype']}: fwd {r['fwd_gflops']:.0f} GFLOP/s, bwd {r['bwd_gflops']:.0f} GFLOP/s")
out["torch_attention"] = sdpa
p("")

def why(st):
    """The line of a failed stage's log that most likely says why: the last error or panic, else the last line."""
    text = [l.strip() for l in read(f"{logdir}/{st['log']}").splitlines() if l.strip()] if st["log"] else []
    hits = [i for i, l in enumerate(text) if re.search(r"error:|Error|panicked at", l) and not l.startswith("=")]
    if hits:
        i = hits[-1]
        # A Rust panic says where on its line and what on the next.
        line = text[i] + (" " + text[i + 1] if "panicked at" in text[i] and i + 1 < len(text) else "")
        line = re.sub(r"^thread '([^']*)' \(\d+\) ", r"\1 ", line)
    else:
        line = text[-1] if text else ""
    return line if len(line) <= 160 else line[:157] + "..."


p("stages")
for stage, st in stages.items():
    note = f"  {st['note']}" if st["note"] else ""
    p(f"  {stage:<24}{st['status']:<9}{st['seconds']:>7} s{note}")
    if st["status"] in ("fail", "timeout"):
        reason = why(st)
        st["why"] = reason
        if reason:
            p(f"      -> {reason}")
p(f"total {elapsed} s; logs in {logdir}")
print("\n".join(lines))
with open(f"{logdir}/summary.json", "w") as f:
    json.dump(out, f, indent=1)
PY
