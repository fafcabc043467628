#!/usr/bin/env bash
# The wheels a GPU machine without the package index needs to run mone-train, made on a machine
# with the index (docs/testing.md, "The GPU tier and the GPU check"):
#
#   scripts/gpu_wheels.sh [DIR]        default DIR=wheels; then carry DIR along and run
#                                      WHEELS=DIR benchmarks/gpu_check.sh there
#
# The GPU machine is expected to bring Python (PY_VERSION, default 3.12), torch with CUDA and
# triton, and the common scientific stack; what mone-train pins beyond that comes from
# pyproject.toml: megatron-core (a compiled wheel per Python version: its dataset helpers),
# hydra-core, omegaconf, wandb, transformers, tokenizers, sentencepiece, and every dependency of
# theirs, as pip's resolver picks them for that Python on manylinux x86-64. Packages the GPU
# machine already has in a suitable version are left out (SKIP, a regular expression over
# normalised names; the default leaves out torch, triton, CUDA's libraries and the heavy common
# packages). OMIT drops pins with all they alone need: OMIT=wandb saves about 25 of the 56 MB,
# and the GPU check runs with wandb disabled (imported only when it logs). Binary wheels only: the GPU machine builds nothing; the few pure-Python packages
# published as source only (PURE_SDISTS: hydra's antlr4 runtime) are built into wheels here. gpu_check.sh installs DIR with
# `pip install --no-index --no-deps --target`, ahead of the machine's own packages.
set -euo pipefail

cd "$(dirname "$0")/.."
DIR=${1:-wheels}
PY=${PYTHON:-$(command -v python3)}
PY_VERSION=${PY_VERSION:-3.12}
SKIP=${SKIP:-'^(torch|triton|nvidia-.*|cuda-.*|numpy|setuptools|pip|wheel|sympy|mpmath|networkx|jinja2|markupsafe|fsspec|filelock|typing-extensions|matplotlib|contourpy|cycler|fonttools|kiwisolver|pillow|pyparsing|python-dateutil|six)$'}
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64 linux_x86_64)
OMIT=${OMIT:-}
PURE_SDISTS=${PURE_SDISTS:-antlr4-python3-runtime==4.9.3}
TARGET=(--python-version "$PY_VERSION" --implementation cp --only-binary=:all: --find-links "$DIR")
for platform in "${PLATFORMS[@]}"; do TARGET+=(--platform "$platform"); done

# The pins, read from pyproject.toml (one place for versions), torch and triton aside.
mapfile -t PINS < <("$PY" - "$OMIT" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for dep in deps:
    name = re.split(r"[<>=!~; ]", dep, maxsplit=1)[0].lower()
    if name not in ("torch", "triton", *sys.argv[1].replace(",", " ").split()):
        print(dep)
PY
)
mkdir -p "$DIR"
for sdist in $PURE_SDISTS; do
  echo "[gpu_wheels] building $sdist (pure Python, source only on the index)"
  "$PY" -m pip wheel --quiet --no-deps --no-binary=:all: -w "$DIR" "$sdist"
done
echo "[gpu_wheels] resolving ${PINS[*]} for Python $PY_VERSION"
REPORT=$(mktemp -d)/report.json
"$PY" -m pip install --quiet --dry-run --ignore-installed --report "$REPORT" \
  --target "$(mktemp -d)" "${TARGET[@]}" "${PINS[@]}"

# name==version of every package the resolver chose, less what the GPU machine brings.
mapfile -t WANTED < <("$PY" - "$REPORT" "$SKIP" <<'PY'
import json, re, sys
report, skip = json.load(open(sys.argv[1])), re.compile(sys.argv[2])
for item in report["install"]:
    meta = item["metadata"]
    name = re.sub(r"[-_.]+", "-", meta["name"]).lower()
    if not skip.match(name):
        print(f"{name}=={meta['version']}")
PY
)
echo "[gpu_wheels] downloading ${#WANTED[@]} wheels into $DIR"
"$PY" -m pip download --quiet --no-deps "${TARGET[@]}" -d "$DIR" "${WANTED[@]}"
ls "$DIR"/*.whl | wc -l | xargs echo "[gpu_wheels] wheels:"
du -sh "$DIR" | cut -f1 | xargs echo "[gpu_wheels] size:"
