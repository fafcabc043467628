#!/usr/bin/env bash
# The project's main experiment at CPU scale, end to end with the shipped tools:
#
#   1. the keep-ratio sweep (+experiment=sweep_rho, here over RHOS), the MoE baseline at the
#      same total parameters (+experiment=moe_baseline) and the MoE sized to MoNE's activated
#      parameters at rho = 0.5 (+experiment=moe_matched_active), all on the default corpus;
#   2. mone-report over them (table + plots);
#   3. mone-analyze sparsify on the trained MoE baseline and on MoNE at rho = 0.5 (held-out
#      default-corpus data), and mone-analyze activations on the MoE baseline.
#
#   benchmarks/rho_study.sh OUT [STEPS] [RHOS]     defaults: 600 steps, 0.25,0.5,1.0
#
# Everything lands under OUT (runs/, report/, sparsify-*/, activations-moe/). On the 2-core CPU
# machine 600 steps take about 5.5 min per run.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:?usage: benchmarks/rho_study.sh OUT [STEPS] [RHOS]}
STEPS=${2:-600}
RHOS=${3:-0.25,0.5,1.0}
BIN=${BIN:-.venv/bin}
if [[ ",$RHOS," != *",0.5,"* ]]; then
  echo "rho_study: RHOS=$RHOS must include 0.5 (the sparsified MoNE model and the matched MoE)" >&2
  exit 2
fi
if (( STEPS < 4 )); then
  echo "rho_study: STEPS=$STEPS must be at least 4 (four evaluations per run)" >&2
  exit 2
fi
if [[ -e "$OUT/runs" ]]; then
  echo "rho_study: $OUT/runs exists; choose a new OUT" >&2
  exit 2
fi
mkdir -p "$OUT"
COMMON=(trainer.steps="$STEPS" trainer.eval_interval=$((STEPS / 4)) trainer.save_interval="$STEPS"
        logging.wandb_mode=disabled)

"$BIN/mone-train" +experiment=sweep_rho moe.neuron_keep_ratio="$RHOS" "${COMMON[@]}" \
  hydra.sweep.dir="$OUT/runs/rho"
"$BIN/mone-train" +experiment=moe_baseline "${COMMON[@]}" hydra.sweep.dir="$OUT/runs/moe-baseline"
"$BIN/mone-train" +experiment=moe_matched_active "${COMMON[@]}" \
  hydra.sweep.dir="$OUT/runs/moe-matched-active"

"$BIN/mone-report" "$OUT/runs" --out "$OUT/report"

VALID=$("$BIN/python" -c "
from mone_train.data.corpus import prepare_stdlib_corpus
from mone_train.preflight import compose_config
cfg = compose_config([])
print(prepare_stdlib_corpus(cfg.data.cache_dir, cfg.data.valid_every).valid_prefix)")
"$BIN/mone-analyze" sparsify --model "$OUT/runs/moe-baseline/0" --data "$VALID" \
  --max-tokens 131072 --out "$OUT/sparsify-moe" --no-progress
MONE_HALF=$(grep -l "neuron_keep_ratio: 0.5$" "$OUT"/runs/rho/*/config.yaml | head -1 | xargs dirname)
"$BIN/mone-analyze" sparsify --model "$MONE_HALF" --data "$VALID" \
  --max-tokens 131072 --out "$OUT/sparsify-mone-0.5" --no-progress
"$BIN/mone-analyze" activations --model "$OUT/runs/moe-baseline/0" --data "$VALID" \
  --max-tokens 32768 --out "$OUT/activations-moe" --no-progress
echo "rho_study: done, results in $OUT"
