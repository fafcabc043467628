#!/usr/bin/env bash
# Create (or update) the project's virtual environment with the pinned dependencies.
#
#   scripts/install.sh [VENV]        default VENV=.venv
#
# The one install path: `make train`, `make test` and the Dockerfile all use it, and the
# versions come from pyproject.toml only. torch is installed first, at its exact pin, so that
# no resolver ever chooses a torch build itself: on a machine without CUDA the CPU wheel that
# the package index (or a local wheel cache) offers for that version; with CUDA, the CUDA one.
# deepspeed is built from source against that torch, hence --no-build-isolation.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
STAMP="$VENV/.installed"
# Reinstall only when the pins or this script changed.
FINGERPRINT=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$FINGERPRINT" ]]; then
  exit 0
fi

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"mone-train needs Python >= 3.11, found {sys.version.split()[0]}")
PY

echo "[install] creating $VENV with $("$PYTHON" --version)"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel

TORCH_PIN=$(sed -n 's/^ *"\(torch==[^"]*\)".*/\1/p' pyproject.toml)
[[ -n "$TORCH_PIN" ]] || { echo "[install] no torch pin found in pyproject.toml" >&2; exit 1; }
echo "[install] $TORCH_PIN"
"${PIP[@]}" install "$TORCH_PIN"

echo "[install] mone-train and its pinned dependencies (deepspeed builds against torch)"
"${PIP[@]}" install --no-build-isolation -e ".[dev,deepspeed,slurm]"

# The C++ CPU operators, built once here rather than by the first training process (a process
# killed while building must not leave anything that stops the next one; see
# mone_kernels/cpu_build.py). Without a compiler training still works, on the PyTorch reference.
"$VENV/bin/python" -m mone_kernels.cpu_build \
  || echo "[install] the CPU operators could not be built; MoNE falls back to the PyTorch reference"

echo "$FINGERPRINT" > "$STAMP"
echo "[install] done: $VENV"
