#!/usr/bin/env bash
# The GPU check, in one go (budget: 8 minutes on one H100/H200-class GPU, BUDGET_S to change):
#   0. the carried wheels installed offline (WHEELS, default ./wheels: scripts/gpu_wheels.sh)
#   1. the gpu test tier (tests/test_gpu.py) and the kernel tests, compiled, on the GPU
#   2. grouped-GEMM efficiency at 8, 16 and 32 local experts of the published runs' expert
#      sizes (benchmarks/gpu_grouped_gemm.py)
#   3. the kernel against a device-to-device copy (benchmarks/kernel_bench.py)
#   4. bf16 step time of MoE vs MoNE on a one-GPU slice of model=1b: tokens/s, MFU, peak memory
#      (benchmarks/step_time.py)
#   5. both settings of each GPU default (moe.grouped_gemm, trainer.compile, moe.kernel_impl),
#      which is faster, and the slice against mone-plan's prediction (benchmarks/gpu_defaults.py)
#   6. checkpoint save time on the slice, synchronous and asynchronous
#      (benchmarks/checkpoint_overhead.py)
#   7. the kernels' registers, spills and occupancy as compiled for sm_80/sm_90 (no GPU needed)
# Every table and JSON goes to OUT (first argument, else $OUT, else benchmarks/results/gpu-<date>),
# with steps.md / steps.json saying what ran, what failed and what was skipped, and why. A step
# that cannot run (no GPU, no megatron-core, budget spent) is skipped and said so; the others go
# on. Nothing needs the network. STEPS="gpu_tier step_time ..." runs the named steps alone.
# PACK=1 also packs OUT into OUT/gpu_check.tar.gz.
# DRY_RUN=1 runs every step at toy size on a CPU (kernels under Triton's interpreter, fp32).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-benchmarks/results/gpu-$(date +%Y-%m-%d)}}
WHEELS=${WHEELS:-wheels}
DRY=${DRY_RUN:-0}
BUDGET_S=${BUDGET_S:-$([[ $DRY == 1 ]] && echo 3600 || echo 480)}
SLOW=$([[ $DRY == 1 ]] && echo 4 || echo 1)  # a CPU's toy sizes still take longer
PY=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$OUT"
: >"$OUT/steps.tsv"
START=$SECONDS
log() { echo "[gpu_check] $*" | tee -a "$OUT/gpu_check.log"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$OUT/steps.tsv"; log "$1: $2 ($3 s) $4"; }

# step NAME CAP_S NEEDS COMMAND...: run COMMAND (output to OUT/NAME.txt) within CAP_S seconds
# and what is left of the budget; NEEDS: gpu | megatron | gpu+megatron | none.
step() {
  local name=$1 cap=$(($2 * SLOW)) needs=$3
  shift 3
  local left=$((BUDGET_S - (SECONDS - START)))
  if [[ -n ${STEPS:-} && " $STEPS " != *" $name "* ]]; then
    record "$name" skipped 0 "not in STEPS"; return
  fi
  if [[ $needs == *gpu* && $HAVE_GPU != 1 && $DRY != 1 ]]; then
    record "$name" skipped 0 "no CUDA device"; return
  fi
  if [[ $needs == *megatron* && $HAVE_MEGATRON != 1 ]]; then
    record "$name" skipped 0 "megatron-core/hydra missing (no wheels in $WHEELS)"; return
  fi
  if ((left < 20)); then
    record "$name" skipped 0 "budget of ${BUDGET_S} s spent"; return
  fi
  local began=$SECONDS rc
  log "$name: $* (up to $((cap < left ? cap : left)) s)"
  timeout --kill-after=10 $((cap < left ? cap : left)) "$@" >"$OUT/$name.txt" 2>&1
  rc=$?
  tail -n 12 "$OUT/$name.txt"
  if ((rc == 0)); then
    record "$name" ok $((SECONDS - began)) ""
  elif ((rc == 124 || rc == 137)); then
    record "$name" timeout $((SECONDS - began)) "stopped at its time limit: see $name.txt"
  else
    record "$name" failed $((SECONDS - began)) "exit $rc: see $name.txt"
  fi
}

# --- 0. environment: the carried wheels, this checkout, what this machine has -----------------
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE=${SITE:-/tmp/gpu_check_site}
  log "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE (offline)"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
      "$WHEELS"/*.whl >"$OUT/wheels.txt" 2>&1; then
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  else
    log "wheel install failed (see wheels.txt): going on with what is installed"
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export WANDB_MODE=disabled WANDB_SILENT=true
"$PY" - >"$OUT/device.txt" 2>&1 <<'PY'
import platform, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "missing"
print(f"{name} | python {platform.python_version()} | torch {torch.__version__} | triton {tv}")
PY
cat "$OUT/device.txt"
HAVE_GPU=0; HAVE_MEGATRON=0
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && HAVE_GPU=1
"$PY" -c "import megatron.core, hydra, omegaconf" 2>/dev/null && HAVE_MEGATRON=1
log "GPU: $HAVE_GPU, megatron-core + hydra: $HAVE_MEGATRON, dry run: $DRY, budget ${BUDGET_S} s"
if [[ $HAVE_GPU != 1 ]]; then
  export TRITON_INTERPRET=1  # kernels under the interpreter (set before triton is imported)
fi

# --- the steps, full size or (DRY_RUN=1) toy size -----------------------------------------------
TIER=(-m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_triton_kernel.py)
KERNEL_ONLY=(-m "not slow" -k "kernel or ng_lbl or weights or sparse_decode")  # no megatron
GROUPED=(); BENCH=(); STATIC=()
STEP=(--model 1b --layers 4 --seq 4096 --micro-batch 2 --steps 20 --precision bf16
      --overrides moe.grouped_gemm=true)
DEFAULTS=(--model 1b --layers 4 --seq 4096 --micro-batch 2 --steps 12)
CKPT=(--steps 5 --warmup 2 --overrides model=1b model.num_layers=4 trainer.precision=bf16
      trainer.seq_length=4096 trainer.micro_batch_size=2 trainer.global_batch_size=2
      moe.grouped_gemm=true logging.wandb_mode=disabled)
if [[ $DRY == 1 ]]; then
  log "DRY_RUN=1: toy sizes"
  export MONE_TEST_GPU_TIER=cpu
  # the tier's quick tests (the whole tier on a CPU: MONE_TEST_GPU_TIER=cpu pytest -m gpu)
  TIER=(-m pytest -q -p no:cacheprovider -m "gpu and not slow" tests/test_gpu.py)
  GROUPED=(--dry-run --repeats 1)
  BENCH=(--rows 256 --neurons 128 --ratios 0.5 --hidden 64 --repeats 1)
  STEP=(--dry-run)
  DEFAULTS=(--dry-run)
  CKPT=(--steps 2 --warmup 1 --overrides model=tiny trainer=smoke trainer.seq_length=32
        logging.wandb_mode=disabled)
  STATIC=(--archs 90 --neurons 1024 --kernels backward)
fi
if [[ $HAVE_MEGATRON == 1 ]]; then
  step gpu_tier 240 gpu "$PY" "${TIER[@]}" --junitxml="$OUT/gpu_tier.xml"
else
  step gpu_tier 120 gpu "$PY" "${TIER[@]}" "${KERNEL_ONLY[@]}" --junitxml="$OUT/gpu_tier.xml"
fi
step grouped_gemm 60 gpu "$PY" benchmarks/gpu_grouped_gemm.py --out "$OUT" "${GROUPED[@]}"
step kernel_bench 60 gpu "$PY" benchmarks/kernel_bench.py --out "$OUT" "${BENCH[@]}"
step step_time 150 gpu+megatron "$PY" benchmarks/step_time.py --out "$OUT" "${STEP[@]}"
step gpu_defaults 240 gpu+megatron "$PY" benchmarks/gpu_defaults.py --out "$OUT" "${DEFAULTS[@]}"
step checkpoint_save 120 gpu+megatron "$PY" benchmarks/checkpoint_overhead.py --out "$OUT" "${CKPT[@]}"
step kernel_static 120 none "$PY" benchmarks/kernel_static.py --out "$OUT" --check "${STATIC[@]}"

# --- what ran ----------------------------------------------------------------------------------
"$PY" - "$OUT" "$(cat "$OUT/device.txt")" "$DRY" "$((SECONDS - START))" <<'PY'
import json, sys, time
from pathlib import Path
out, device, dry, seconds = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
steps = [dict(zip(("step", "status", "seconds", "note"), line.split("\t")))
         for line in (out / "steps.tsv").read_text().splitlines() if line]
lines = [f"# GPU check, {time.strftime('%Y-%m-%d')}{' (DRY_RUN: toy sizes)' if dry else ''}",
         "", device, "", "| step | status | seconds | note |", "|---|---|---|---|"]
lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['note']} |" for s in steps]
lines += ["", f"total {seconds} s"]
(out / "steps.md").write_text("\n".join(lines) + "\n")
(out / "steps.json").write_text(json.dumps(
    {"date": time.strftime("%Y-%m-%d"), "device": device, "dry_run": dry, "seconds": seconds,
     "steps": steps}, indent=2) + "\n")
print("\n".join(lines))
PY
if [[ ${PACK:-0} == 1 ]]; then
  tar czf /tmp/gpu_check.tar.gz -C "$OUT" . && mv /tmp/gpu_check.tar.gz "$OUT/gpu_check.tar.gz"
fi
log "tables in $OUT"
! grep -qP '\t(failed|timeout)\t' "$OUT/steps.tsv"
