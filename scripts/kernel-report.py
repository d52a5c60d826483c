#!/usr/bin/env python3
"""Static report of every CUDA kernel: registers, spills, stack, static shared memory (ptxas -v).

For each kernels/*.cu, compiles a cubin for one architecture (sm_90 by default) with the flags build.rs
gives nvcc, and prints per kernel: registers, barriers, static shared memory, stack frame, spill
stores and loads, and the occupancy its registers allow (resident warps per SM out of 64 on
sm_80/sm_90, from 64K registers per SM allocated per warp in units of 256; the launch's block size
and shared memory may lower it further). With cuobjdump on PATH or next to nvcc it adds the SASS
instruction mix (tensor-core HMMA, local-memory LDL/STL, FFMA, shuffles); scripts/install-cuda-toolchain.sh
installs cuobjdump and nvdisasm beside nvcc. Without them the mix is left out with a note.

Exit status: 0 when no kernel spills (or every spill is listed in ALLOWED_SPILLS with its reason)
and, with the SASS mix, none touches local memory (LDL/STL) unless ALLOWED_LOCAL says why; 1 when
one does; 2 when nvcc is missing. `--json` prints the rows as JSON instead of a table.

    python3 scripts/kernel-report.py [--arch sm_90] [--json] [kernels/attention.cu ...]
"""

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The flags build.rs passes nvcc (NVCC_FLAGS there), less --fatbin and -lineinfo.
NVCC_FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr"]
# kernel name -> why it may spill; every other kernel must not.
ALLOWED_SPILLS = {
    name: "4 bytes (one register) at the 128-register cap that __launch_bounds__(256, 2) sets; bf16 at "
          "head dim 128 runs the tensor-core kernel (attention_mma.cu) instead, this one only f32 and "
          "head dims 65-127"
    for name in ("attention_backward_dkdv_hd128_f32", "attention_backward_dkdv_hd128_bf16")
}

# kernel prefix -> why it may touch local memory (LDL/STL) without spilling; every other kernel must not.
ALLOWED_LOCAL = {
    "rope_": "sincosf's slow path (Payne-Hanek argument reduction for |θ| > 105615) keeps a 32-byte array "
             "on the stack; taken only at such angles",
}

REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
REGISTER_UNIT = 256  # registers are allocated per warp in units of this many


def find_nvcc():
    """The nvcc build.rs would use: $NVCC, PATH, $CUDA_HOME/$CUDA_PATH, .toolchain/cuda, /usr/local/cuda."""
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    candidates = [shutil.which("nvcc")]
    candidates += [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates += [str(ROOT / ".toolchain" / "cuda" / "bin" / "nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


def find_cuobjdump(nvcc):
    beside = Path(nvcc).parent / "cuobjdump"
    return str(beside) if beside.is_file() else shutil.which("cuobjdump")


def register_occupancy(registers):
    """Resident warps per SM that `registers` per thread allow (sm_80/sm_90)."""
    per_warp = -(-max(registers, 1) * 32 // REGISTER_UNIT) * REGISTER_UNIT
    return min(MAX_WARPS_PER_SM, REGISTERS_PER_SM // per_warp)


FUNCTION = re.compile(r"Function properties for (\S+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?")
SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text, source):
    """Rows from `ptxas -v` output: one per kernel (device functions without an entry are skipped)."""
    rows, current = {}, None
    for line in text.splitlines():
        if m := FUNCTION.search(line):
            current = rows.setdefault(m.group(1), {"kernel": m.group(1), "file": source})
        elif current and (m := FRAME.search(line)):
            current.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif current and (m := USED.search(line)):
            regs = int(m[1])
            smem = SMEM.search(line)
            current.update(registers=regs, barriers=int(m[2] or 0), smem=int(smem[1]) if smem else 0,
                           warps_per_sm=register_occupancy(regs))
            current = None
    return [r for r in rows.values() if "registers" in r]


SASS_CLASSES = {
    "HMMA": r"^HMMA",
    "LDL/STL": r"^(LDL|STL)",
    "FFMA": r"^FFMA",
    "SHFL": r"^SHFL",
    "LDS/STS": r"^(LDS|STS)",
    "LDG/STG": r"^(LDG|STG)",
    "BAR": r"^BAR",
}


def sass_mix(cuobjdump, cubin):
    """kernel -> {instruction class: count} from `cuobjdump -sass` (which runs the nvdisasm beside it)."""
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(cuobjdump).parent), os.environ.get("PATH", "")]))
    out = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True, env=env).stdout
    mix, kernel = {}, None
    for line in out.splitlines():
        if m := re.match(r"\s*Function : (\S+)", line):
            kernel = m.group(1)
            mix[kernel] = {k: 0 for k in SASS_CLASSES}
        elif kernel and (m := re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)):
            for name, pattern in SASS_CLASSES.items():
                if re.match(pattern, m.group(1)):
                    mix[kernel][name] += 1
    return mix


def report_file(nvcc, cuobjdump, arch, source, tmp):
    cubin = os.path.join(tmp, source.stem + ".cubin")
    cmd = [nvcc, "-cubin", f"-arch={arch}", *NVCC_FLAGS, "-Xptxas", "-v", "-I", str(ROOT / "kernels"),
           "-o", cubin, str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{source.name}: nvcc failed:\n{done.stderr}")
    rows = parse_ptxas(done.stderr, source.name)
    if cuobjdump:
        mix = sass_mix(cuobjdump, cubin)
        for row in rows:
            row["sass"] = mix.get(row["kernel"], {})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("sources", nargs="*", type=Path)
    args = parser.parse_args()
    nvcc = find_nvcc()
    if not nvcc:
        print("kernel-report: no nvcc (bash scripts/install-cuda-toolchain.sh installs it)", file=sys.stderr)
        return 2
    cuobjdump = find_cuobjdump(nvcc)
    sources = args.sources or sorted((ROOT / "kernels").glob("*.cu"))
    jobs = int(os.environ.get("NUM_JOBS", os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        results = pool.map(lambda s: report_file(nvcc, cuobjdump, args.arch, s, tmp), sources)
        rows = [row for file_rows in results for row in file_rows]
    rows.sort(key=lambda r: (r["file"], r["kernel"]))
    spills = [r for r in rows if (r["spill_stores"] or r["spill_loads"]) and r["kernel"] not in ALLOWED_SPILLS]
    # Local memory without a spill (a dynamically indexed array, a stack frame): listed with a reason, or an error.
    local = [r for r in rows if r.get("sass", {}).get("LDL/STL") and r["kernel"] not in ALLOWED_SPILLS
             and not any(r["kernel"].startswith(prefix) for prefix in ALLOWED_LOCAL)]
    if args.json:
        print(json.dumps({"arch": args.arch, "nvcc": nvcc, "sass": bool(cuobjdump), "kernels": rows}, indent=1))
    else:
        print(f"{'kernel':<48} {'file':<24} {'regs':>4} {'warps/SM':>8} {'smem':>6} {'stack':>5} "
              f"{'spill st/ld':>11} {'bar':>3}")
        for r in rows:
            print(f"{r['kernel']:<48} {r['file']:<24} {r['registers']:>4} {r['warps_per_sm']:>5}/64 "
                  f"{r['smem']:>6} {r['stack']:>5} {r['spill_stores']:>5}/{r['spill_loads']:<5} {r['barriers']:>3}")
            if "sass" in r:
                print("    SASS: " + ", ".join(f"{k} {v}" for k, v in r["sass"].items()))
        if not cuobjdump:
            print(f"\n(no SASS instruction mix: no cuobjdump beside {nvcc} or on PATH)")
        print(f"\n{len(rows)} kernels for {args.arch}; warps/SM: the occupancy their registers allow", flush=True)
    for r in rows:
        if r["kernel"] in ALLOWED_SPILLS and (r["spill_stores"] or r["spill_loads"]):
            print(f"kernel-report: {r['kernel']} spills (allowed: {ALLOWED_SPILLS[r['kernel']]})", file=sys.stderr)
    for r in spills:
        print(f"kernel-report: {r['kernel']} ({r['file']}) spills {r['spill_stores']} bytes stored, "
              f"{r['spill_loads']} loaded", file=sys.stderr)
    for r in local:
        print(f"kernel-report: {r['kernel']} ({r['file']}) uses local memory ({r['sass']['LDL/STL']} LDL/STL, "
              f"{r['stack']}-byte stack frame) and is not in ALLOWED_LOCAL", file=sys.stderr)
    return 1 if spills or local else 0


if __name__ == "__main__":
    sys.exit(main())
