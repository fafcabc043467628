#!/usr/bin/env bash
# The GPU check, in one go (budget: under 8 minutes on one H100/H200-class GPU):
#   1. kernel tests compiled (fp32, and bf16/fp16 storage) against the PyTorch reference, and
#      the compiler's register / spill / occupancy report for sm_80 and sm_90
#   2. the kernel benchmark (memory floor, fused vs reference vs dense, full-expert ratio)
#   3. bf16 step time of MoE vs MoNE on a one-GPU slice of model=1b (4 of its 16 layers, all 16
#      experts, sequences of 4096, grouped experts): tokens/s, MFU, peak memory, MoNE/MoE ratio
#      (benchmarks/step_time.py), when megatron-core is installable
# Every table goes to OUT (first argument, else $OUT, else benchmarks/results/gpu-<date>).
# DRY_RUN=1 runs every step at toy size (seconds on a CPU; the tests do this).
#
# The GPU machine is expected to have torch and triton. The rest (megatron-core, hydra-core,
# omegaconf, wandb, ...) can come as wheels in WHEELS (default: ./wheels), made beforehand on
# any machine with network:
#   pip download -d wheels --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 --no-deps megatron-core==0.16.1 hydra-core==1.3.8 \
#       omegaconf==2.3.1 wandb==0.31.0 tqdm psutil PyYAML ...   (see pyproject.toml)
# Without them steps 1 and 2 still run; step 3 is skipped and says so.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-benchmarks/results/gpu-$(date +%Y-%m-%d)}}
WHEELS=${WHEELS:-wheels}
mkdir -p "$OUT"
PY=${PYTHON:-python}
log() { echo "[gpu_check] $*" | tee -a "$OUT/gpu_check.log"; }

"$PY" - <<'PY' | tee "$OUT/device.txt"
import torch, triton
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"{name} | torch {torch.__version__} | triton {triton.__version__}")
PY
[[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "[gpu_check] $PY cannot import torch and triton" >&2; exit 1; }
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  # Without a GPU: kernel tests under Triton's interpreter, reference-path benchmark only.
  log "no CUDA device: kernel tests run under the Triton interpreter, benchmarks time the reference path only"
  export TRITON_INTERPRET=1
fi

if [[ -d "$WHEELS" ]]; then
  log "installing wheels from $WHEELS"
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps "$WHEELS"/*.whl 2>&1 | tail -3
fi
"$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

DRY=${DRY_RUN:-0}
STATIC=(); BENCH=(); STEP=(--model 1b --layers 4 --seq 4096 --micro-batch 2 --steps 30
                          --precision bf16 --overrides moe.grouped_gemm=true)
if [[ "$DRY" == "1" ]]; then
  log "DRY_RUN=1: toy sizes"
  STATIC=(--archs 90 --neurons 1024 --kernels backward)
  BENCH=(--rows 256 --neurons 128 --ratios 0.5 --hidden 64 --repeats 1)
  STEP=(--dry-run)
fi

log "1/3 kernel tests (compiled Triton)"
if [[ "$DRY" == "1" ]]; then
  log "DRY_RUN=1: kernel tests skipped (make test runs them under the interpreter)"
else
  timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py tests/test_mone_reference.py \
    2>&1 | tee "$OUT/kernel_tests.txt" | tail -3
fi

log "1b/3 kernel registers, spills and occupancy as compiled for sm_80/sm_90 (no GPU needed)"
timeout 300 "$PY" benchmarks/kernel_static.py --out "$OUT" --check "${STATIC[@]}" 2>&1 \
  | tee "$OUT/kernel_static.txt" | tail -3

log "2/3 kernel benchmark"
timeout 180 "$PY" benchmarks/kernel_bench.py --out "$OUT" "${BENCH[@]}" 2>&1 | tee "$OUT/kernel_bench.txt" | tail -5

log "3/3 training step time, MoE vs MoNE (bf16, one-GPU slice of model=1b)"
if [[ "${TRITON_INTERPRET:-0}" == "1" && "$DRY" != "1" ]]; then
  log "no CUDA device: step-time comparison skipped (on CPU see benchmarks/trainer_throughput.py)"
elif "$PY" -c "import megatron.core, hydra" 2>/dev/null; then
  timeout 200 "$PY" benchmarks/step_time.py --out "$OUT" "${STEP[@]}" 2>&1 \
    | tee "$OUT/step_time.txt" | tail -7
else
  log "megatron-core or hydra missing (no wheels supplied): step-time comparison skipped"
fi
log "tables in $OUT"
