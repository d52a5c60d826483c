#!/usr/bin/env python3
"""Mutation testing of the CUDA kernels: apply one classic kernel bug at a time, run the op's tests
on the emulated device, and count the mutants the tests kill.

Each mutant is one textual change at one place of a `kernels/*.cu` file (or `kernels/common.cuh`):

  sync     a `__syncthreads();` removed
  wide     a 64-bit widening cast removed (`(long long)i * n` -> `i * n`)
  compare  a comparison in an `if`/`for`/`while`/`?:` condition moved by one (`<` -> `<=`, ...)
  shuffle  a warp-shuffle offset changed (`offset >>= 1` -> `offset >>= 2`, xor -> down)
  convert  a rounding conversion truncated (`_rn(` -> `_rz(`), an `rintf` -> `truncf`
  math     a math function swapped for a neighbour (`expf` -> `exp2f`, `fmaxf` -> `fminf`, ...)
  offby1   an index `+ 1` / `- 1` dropped

Lines that only the GPU compiles (inside `#ifndef EMU_DEVICE`) are skipped: no test here can reach
them. A mutant is `killed` when the tests fail, `timeout` when they exceed the limit (a hang is a
detected bug too), `survived` when they pass, `unbuildable` when the mutated file does not compile
(not counted). The file is restored after every mutant, also on Ctrl-C.

Usage:
  scripts/kernel-mutants.py [--files kernels/rope.cu ...] [--ops sync,wide] [--budget-min 60]
                            [--max N] [--seed S] [--list] [--out target/mutation-results/kernels.tsv]

The tests of `kernels/<op>.cu` are `cargo test --test ops -- <op>:: wide_offsets::` (the op's CPU tests, its
emulated-device tests in the emulator's test mode: race detector on, random warp order); a shared
header (`common.cuh`, `mma.cuh`) is checked by every op's emulated-device tests, tests/emu.rs and
tests/mma_fragments.rs. Builds use the `mutants` profile (release code, incremental) with nvcc
skipped (`SAFEDPO_NO_NVCC=1`; scripts/mutants.sh shares that build): a mutant recompiles the
mutated file for the emulator (build.rs caches the others) and relinks.
"""

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"

CONDITION = re.compile(r"\b(if|for|while)\s*\(|\?")
OPERATORS = {
    "sync": [(re.compile(r"__syncthreads\(\);"), ";")],
    "wide": [(re.compile(r"\((?:long long|int64_t|size_t|unsigned long long)\)\s*"), "")],
    "compare": [
        (re.compile(r"(?<![<>=!])<(?![<=])"), "<="),
        (re.compile(r"(?<![<>=-])>(?![>=])"), ">="),
        (re.compile(r"(?<![<>])<="), "<"),
        (re.compile(r"(?<![<>])>="), ">"),
    ],
    "shuffle": [
        (re.compile(r">>= 1\b"), ">>= 2"),
        (re.compile(r"<<= 1\b"), "<<= 2"),
        (re.compile(r"__shfl_xor_sync\("), "__shfl_down_sync("),
    ],
    "convert": [(re.compile(r"_rn\("), "_rz("), (re.compile(r"\brintf\("), "truncf(")],
    "math": [
        (re.compile(r"\bexpf\("), "exp2f("),
        (re.compile(r"\b__expf\("), "exp2f("),
        (re.compile(r"\blogf\("), "log2f("),
        (re.compile(r"\blog1pf\("), "logf("),
        (re.compile(r"\bfmaxf\("), "fminf("),
        (re.compile(r"\bfminf\("), "fmaxf("),
        (re.compile(r"\brsqrtf\("), "sqrtf("),
    ],
    "offby1": [(re.compile(r" \+ 1\b(?!\.)"), ""), (re.compile(r" - 1\b(?!\.)"), "")],
}


def gpu_only_lines(lines):
    """Indices of lines only the GPU compiles: the `#ifndef EMU_DEVICE` branch, or the `#else` of an
    `#ifdef EMU_DEVICE`, tracking nesting."""
    skipped, stack = set(), []  # per open #if: (tests EMU_DEVICE: +1 GPU first / -1 emulator first / 0, in GPU branch)
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith("#if"):
            if s.startswith(("#ifndef EMU_DEVICE", "#if !defined(EMU_DEVICE)")):
                stack.append((1, True))
            elif s.startswith(("#ifdef EMU_DEVICE", "#if defined(EMU_DEVICE)")):
                stack.append((-1, False))
            else:
                stack.append((0, False))
        elif s.startswith("#else") and stack:
            kind, _ = stack[-1]
            stack[-1] = (kind, kind == -1)
        elif s.startswith("#endif") and stack:
            stack.pop()
        elif any(gpu for _, gpu in stack):
            skipped.add(i)
    return skipped


def code_part(line):
    """The line without its `//` comment (mutating comments proves nothing)."""
    cut = line.find("//")
    return line if cut < 0 else line[:cut]


def mutants_of(path, ops):
    lines = path.read_text().splitlines(keepends=True)
    skip = gpu_only_lines(lines)
    found = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if i in skip or stripped.startswith(("#", "//", "*", "/*")):
            continue
        code = code_part(line)
        for op in ops:
            if op == "compare" and not CONDITION.search(code):
                continue
            if op == "compare" and ("template" in code or "#include" in code or "->" in code):
                continue
            for pattern, replacement in OPERATORS[op]:
                for m in pattern.finditer(code):
                    new = line[: m.start()] + replacement + line[m.end():]
                    if new != line:
                        found.append((path, i, op, line, new))
    return found


# Kernel files whose op's tests live under another name in tests/ops/ (the tensor-core attention is
# one backend of the attention op, tested by `attention::`).
TEST_MODULE = {"attention_mma": "attention"}


def tests_for(path):
    """The test runs of a file: an op's own tests and every op's offsets past 2^31 (`wide_offsets`),
    or for a shared header every emulated-device test."""
    if path.suffix == ".cuh":
        return [["--test", "ops", "--", "emu::", "wide_offsets::"], ["--test", "emu"], ["--test", "mma_fragments"]]
    module = TEST_MODULE.get(path.stem, path.stem)
    if not (ROOT / "tests" / "ops" / f"{module}.rs").is_file():
        # A filter that matches no test would let every mutant of the file survive unseen.
        sys.exit(f"{path.name}: no tests/ops/{module}.rs holds its tests; name them in TEST_MODULE")
    return [["--test", "ops", "--", f"{module}::", "wide_offsets::"]]


def run_tests(path, timeout):
    env = dict(os.environ, SAFEDPO_NO_NVCC="1")
    start = time.time()
    for args in tests_for(path):
        cmd = ["cargo", "test", "--profile", "mutants", *args]
        left = timeout - (time.time() - start)
        # Its own process group, so that a timeout ends cargo's rustc and test children too: left
        # running, they would keep building the mutated tree into target/ after it is restored.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=max(left, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return "timeout", time.time() - start
        out = stdout + stderr
        if proc.returncode != 0:
            if "error: could not compile" in out or "failed to run custom build command" in out:
                # A build-script failure is the emulator compile of the mutated kernel.
                return "unbuildable", time.time() - start
            return "killed", time.time() - start
    return "survived", time.time() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", nargs="*", help="kernel files (default: every kernels/*.cu but the selftests, and common.cuh)")
    ap.add_argument("--ops", default=",".join(OPERATORS), help="mutation operators, comma-separated")
    ap.add_argument("--budget-min", type=float, default=60.0, help="stop starting mutants after this many minutes")
    ap.add_argument("--max", type=int, default=0, help="at most this many mutants (a seeded random sample)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant's build + tests")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--out", default=str(ROOT / "target" / "mutation-results" / "kernels.tsv"))
    args = ap.parse_args()

    ops = [o for o in args.ops.split(",") if o]
    unknown = [o for o in ops if o not in OPERATORS]
    if unknown:
        sys.exit(f"unknown mutation operator(s) {unknown}; known: {', '.join(OPERATORS)}")
    files = [ROOT / f for f in args.files] if args.files else sorted(
        p for p in KERNELS.glob("*.cu") if not p.name.startswith("selftest")) + [KERNELS / "common.cuh"]
    for f in files:
        if not f.is_file():
            sys.exit(f"{f}: no such kernel file")
        tests_for(f)  # every file's tests exist, before anything is listed or run

    mutants = [m for f in files for m in mutants_of(f, ops)]
    if args.max and len(mutants) > args.max:
        mutants = sorted(random.Random(args.seed).sample(mutants, args.max), key=lambda m: (str(m[0]), m[1]))
    if args.list:
        for path, i, op, old, new in mutants:
            print(f"{path.relative_to(ROOT)}:{i + 1}\t{op}\t{old.strip()}  ->  {new.strip()}")
        print(f"{len(mutants)} mutants")
        return

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget_min * 60
    originals = {}

    def restore(*_):
        for path, text in originals.items():
            path.write_text(text)
        originals.clear()

    signal.signal(signal.SIGINT, lambda *a: (restore(), sys.exit(130)))
    signal.signal(signal.SIGTERM, lambda *a: (restore(), sys.exit(143)))

    tally = {}
    with out.open("a") as log:
        for n, (path, i, op, old, new) in enumerate(mutants, 1):
            if time.time() > deadline:
                print(f"budget spent: {n - 1} of {len(mutants)} mutants run")
                break
            text = path.read_text()
            originals[path] = text
            lines = text.splitlines(keepends=True)
            assert lines[i] == old, f"{path}:{i + 1} changed under the mutator"
            lines[i] = new
            try:
                path.write_text("".join(lines))
                verdict, secs = run_tests(path, args.timeout)
            finally:
                restore()
            rel = path.relative_to(ROOT)
            tally.setdefault(str(rel), {}).setdefault(verdict, 0)
            tally[str(rel)][verdict] += 1
            line = f"{rel}:{i + 1}\t{op}\t{verdict}\t{secs:.0f}s\t{old.strip()}  ->  {new.strip()}"
            print(f"[{n}/{len(mutants)}] {line}", flush=True)
            log.write(line + "\n")
            log.flush()

    print("\n| file | killed | timeout | survived | unbuildable | score |\n|---|---|---|---|---|---|")
    for rel, t in sorted(tally.items()):
        detected = t.get("killed", 0) + t.get("timeout", 0)
        counted = detected + t.get("survived", 0)
        score = f"{100 * detected / counted:.0f}%" if counted else "-"
        print(f"| `{rel}` | {t.get('killed', 0)} | {t.get('timeout', 0)} | {t.get('survived', 0)} | {t.get('unbuildable', 0)} | {score} |")


if __name__ == "__main__":
    main()
