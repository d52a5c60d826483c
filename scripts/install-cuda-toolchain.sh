#!/usr/bin/env bash
# Installs the CUDA compiler this project builds its kernels with: nvcc 13.0, pinned, from NVIDIA's
# PyPI wheels, into .toolchain/ (git-ignored). build.rs finds it there (.toolchain/cuda is a usable
# CUDA_HOME: bin/nvcc, include/, nvvm/, lib/).
#
# Why pinned: the GPU machines' driver runs CUDA 13.0, and the driver JIT-compiles the embedded PTX
# only if it is no newer than itself (nvcc 13.5 emits PTX ISA 9.5, which a 13.0 driver rejects).
#
# Idempotent: does nothing when a system nvcc 13.0 is present ($NVCC, PATH, $CUDA_HOME,
# /usr/local/cuda) or when the pinned wheels are already installed and nvcc passes its smoke test.
# Set SAFEDPO_FORCE_TOOLCHAIN=1 to install into .toolchain/ even when a system nvcc 13.0 exists.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLCHAIN="$ROOT/.toolchain"
WHEELS="$ROOT/.whl"
CUDA_DIR="$TOOLCHAIN/cuda"
STAMP="$TOOLCHAIN/installed.txt"
WANT_RELEASE="13.0"
# Exact versions (all of CUDA 13.0 update 2; the runtime and cccl wheels are numbered separately).
PINS=(
    "nvidia-cuda-nvcc==13.0.88"
    "nvidia-cuda-crt==13.0.88"
    "nvidia-nvvm==13.0.88"
    "nvidia-cuda-runtime==13.0.96"
    "nvidia-cuda-cccl==13.0.85"
    # The SASS tools for scripts/kernel-report.py's instruction mix: no 13.0 wheel of cuobjdump exists;
    # 13.2's disassembles nvcc 13.0's cubins. Both add one file each to bin/.
    "nvidia-cuda-cuobjdump==13.2.86"
    "nvidia-cuda-nvdisasm==13.2.86"
)

log() { echo "install-cuda-toolchain: $*" >&2; }

# Prints "13.0" for an nvcc of release 13.0, nothing if the binary does not run.
nvcc_release() {
    "$1" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p' | head -n 1
}

# Compiles a small kernel for every target build.rs uses, and a host object (which exercises the
# host compiler, g++), so that a broken install is found here and not in the middle of a build.
smoke_test() {
    local nvcc="$1" dir
    dir="$(mktemp -d)"
    cat >"$dir/smoke.cu" <<'CU'
#include <cuda_bf16.h>
extern "C" __global__ void smoke(float* out, const __nv_bfloat16* in) {
    float v = __bfloat162float(in[threadIdx.x]);
    out[threadIdx.x] = v + __shfl_xor_sync(0xffffffffu, v, 1);
}
CU
    local ok=0
    if "$nvcc" --fatbin -std=c++17 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
        -gencode arch=compute_80,code=compute_80 -o "$dir/smoke.fatbin" "$dir/smoke.cu" >"$dir/log" 2>&1 &&
        "$nvcc" -c -std=c++17 -gencode arch=compute_80,code=sm_80 -o "$dir/smoke.o" "$dir/smoke.cu" >>"$dir/log" 2>&1; then
        ok=1
    else
        log "nvcc smoke test failed ($nvcc):"
        cat "$dir/log" >&2
    fi
    rm -rf "$dir"
    [ "$ok" = 1 ]
}

# 1. A system nvcc 13.0 wins (unless forced).
if [ "${SAFEDPO_FORCE_TOOLCHAIN:-0}" != 1 ]; then
    for cand in "${NVCC:-}" "$(command -v nvcc 2>/dev/null || true)" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" \
        /usr/local/cuda/bin/nvcc; do
        if [ -n "$cand" ] && [ -x "$cand" ] && [ "$(nvcc_release "$cand")" = "$WANT_RELEASE" ]; then
            log "using the system nvcc $WANT_RELEASE at $cand"
            exit 0
        fi
    done
fi

# 2. Already installed with these pins?
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "${PINS[*]}" ] && [ -x "$CUDA_DIR/bin/nvcc" ] &&
    [ "$(nvcc_release "$CUDA_DIR/bin/nvcc")" = "$WANT_RELEASE" ]; then
    log "nvcc $WANT_RELEASE already installed at $CUDA_DIR/bin/nvcc"
    exit 0
fi

# 3. Download the wheels (kept in .whl/ so a reinstall needs no network), then unpack them into a
# fresh folder and switch .toolchain/cuda over to it only once nvcc has passed the smoke test.
PY="${PYTHON:-python3}"
export PIP_ROOT_USER_ACTION=ignore
command -v "$PY" >/dev/null || { log "needs python3 with pip to install nvcc from PyPI wheels"; exit 1; }
mkdir -p "$TOOLCHAIN" "$WHEELS"
log "downloading ${PINS[*]}"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$WHEELS" "${PINS[@]}"
SITE="$TOOLCHAIN/site-13.0"
rm -rf "$SITE.tmp"
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-index --find-links "$WHEELS" \
    --target "$SITE.tmp" "${PINS[@]}"

# All the wheels unpack into nvidia/cu13/, which already has the layout of a CUDA install:
# bin/{nvcc,ptxas,fatbinary,cudafe++,cuobjdump,nvdisasm}, nvvm/{bin/cicc,libdevice}, include/ (+
# include/cccl), lib/.
CU="$SITE.tmp/nvidia/cu13"
for need in bin/nvcc bin/ptxas bin/fatbinary bin/cuobjdump bin/nvdisasm nvvm/bin/cicc nvvm/libdevice include/cuda_bf16.h include/cccl lib; do
    [ -e "$CU/$need" ] || { log "unexpected wheel layout: $CU/$need is missing"; exit 1; }
done
ln -sfn lib "$CU/lib64"
smoke_test "$CU/bin/nvcc" || exit 1

rm -rf "$SITE"
mv "$SITE.tmp" "$SITE"
ln -sfn "site-13.0/nvidia/cu13" "$CUDA_DIR"
printf '%s' "${PINS[*]}" >"$STAMP"
# cargo reruns build.rs only when something it watches changes: make it look for nvcc again.
touch "$ROOT/build.rs"
log "installed nvcc ($("$CUDA_DIR/bin/nvcc" --version | grep release)) at $CUDA_DIR (CUDA_HOME)"
