#!/usr/bin/env bash
# The paper's four claims at CPU scale, with seeds (docs/results.md reads what this writes).
#
#   benchmarks/paper_study.sh OUT            # everything; run it again to go on after a stop
#
# The regime: the `tiny` model shape (2 layers, hidden 64, 4 experts, top-2, F = 128 neurons per
# expert) trained for STEPS steps of 16 x 256 bytes (6.6 M bytes at the default 1600), where
# halving the experts' width costs clearly more than seed noise (the first check below).
# Validation always reads the same held-out bytes (data.eval_seed), whatever the run's seed.
#
#   1. regime check: MoE at F and at F/2, SEEDS each; prints the gap in seed standard deviations;
#   2. the study, SEEDS each: MoE sized to MoNE rho = 0.5's activated parameters
#      (F' = F (1 + 2 rho) / 3, as +experiment=moe_matched_active), MoNE rho = 0.25, 0.5, 0.75
#      with NG-LBL, MoNE rho = 0.5 without NG-LBL (moe.ng_lbl_coeff=0);
#   3. mone-report over all runs (seeds grouped: mean +- std);
#   4. on the first seed of every setting that saved a checkpoint: mone-analyze sparsify (claim 3; for MoNE models the
#      train-rho vs inference-rho table) and mone-analyze activations (claim 4).
#
# Runs go two at a time with one thread each (JOBS, on 2 cores that beats one run on both);
# a run directory holding FINISHED.json is skipped, an interrupted one resumes or restarts (the
# trainer's restart rules). Logs in OUT/logs/, runs in OUT/runs/<setting>/seed<N>/.
#
# Environment: STEPS (1600), LR (1e-3), SEEDS (1 2 3), JOBS (2), BIN (.venv/bin).
set -euo pipefail
# One compound command: bash reads it whole, so editing this file cannot upset a running study.
{
cd "$(dirname "$0")/.."

OUT=${1:?usage: benchmarks/paper_study.sh OUT}
STEPS=${STEPS:-1600}
LR=${LR:-1e-3}
SEEDS=${SEEDS:-1 2 3}
JOBS=${JOBS:-2}
BIN=${BIN:-.venv/bin}
F=128
if (( STEPS < 4 )); then
  echo "paper_study: STEPS=$STEPS must be at least 4 (four evaluations per run)" >&2
  exit 2
fi
mkdir -p "$OUT/runs" "$OUT/logs"
COMMON=(model=tiny trainer.steps="$STEPS" trainer.micro_batch_size=16 trainer.global_batch_size=16
        trainer.seq_length=256 trainer.eval_interval=$((STEPS / 4)) trainer.eval_iters=32
        trainer.log_interval=100 trainer.save_interval="$STEPS" trainer.num_threads=1
        optim.lr="$LR" data.eval_seed=1234 logging.wandb_mode=disabled)

declare -A SETTING=(
  [moe-F$F]="moe=moe"
  [moe-F$((F / 2))]="moe=moe model.moe_ffn_hidden_size=$((F / 2))"
  [moe-matched]="moe=moe model.moe_ffn_hidden_size=$(( (F * 2 + 1) / 3 ))"
  [mone-0.25]="moe=mone moe.neuron_keep_ratio=0.25"
  [mone-0.5]="moe=mone moe.neuron_keep_ratio=0.5"
  [mone-0.75]="moe=mone moe.neuron_keep_ratio=0.75"
  [mone-0.5-nolbl]="moe=mone moe.neuron_keep_ratio=0.5 moe.ng_lbl_coeff=0"
)
REGIME=("moe-F$F" "moe-F$((F / 2))")
STUDY=(moe-matched mone-0.25 mone-0.5 mone-0.75 mone-0.5-nolbl)

train_one() {  # setting seed
  local name=$1 seed=$2 dir="$OUT/runs/$1/seed$2"
  if [[ -f "$dir/FINISHED.json" ]]; then
    echo "paper_study: $name seed $seed already finished"
    return 0
  fi
  local start=$SECONDS
  # shellcheck disable=SC2086  # the setting's overrides are words
  if OMP_NUM_THREADS=1 "$BIN/mone-train" ${SETTING[$name]} "${COMMON[@]}" trainer.seed="$seed" \
      trainer.run_dir="$dir" >"$OUT/logs/$name-seed$seed.log" 2>&1; then
    echo "paper_study: $name seed $seed done in $((SECONDS - start)) s:" \
      "$(grep -o 'final validation loss [0-9.]*' "$OUT/logs/$name-seed$seed.log")"
  else
    echo "paper_study: $name seed $seed FAILED (see $OUT/logs/$name-seed$seed.log)" >&2
    return 1
  fi
}

train_all() {  # settings...: every seed of each, JOBS at a time
  local failed=0 name seed
  for name in "$@"; do
    for seed in $SEEDS; do
      while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || failed=1; done
      train_one "$name" "$seed" &
    done
  done
  while (( $(jobs -rp | wc -l) > 0 )); do wait -n || failed=1; done
  return $failed
}

echo "paper_study: 1/4 regime check (${REGIME[*]}), seeds $SEEDS, $STEPS steps"
train_all "${REGIME[@]}"
"$BIN/python" benchmarks/paper_study_summary.py regime "$OUT" "${REGIME[@]}"

echo "paper_study: 2/4 the study (${STUDY[*]})"
train_all "${STUDY[@]}"

echo "paper_study: 3/4 mone-report"
"$BIN/mone-report" "$OUT/runs" --out "$OUT/report"

echo "paper_study: 4/4 sparsification and activations on the first seed of each setting"
VALID=$("$BIN/python" -c "
from mone_train.data.corpus import prepare_stdlib_corpus
from mone_train.preflight import compose_config
cfg = compose_config([])
print(prepare_stdlib_corpus(cfg.data.cache_dir, cfg.data.valid_every).valid_prefix)")
for name in "${REGIME[@]}" "${STUDY[@]}"; do
  # the first seed that left a checkpoint (runs trained elsewhere may have saved none)
  model=""
  for seed in $SEEDS; do
    if [[ -d "$OUT/runs/$name/seed$seed/checkpoints" ]]; then model="$OUT/runs/$name/seed$seed"; break; fi
  done
  if [[ -z "$model" ]]; then echo "paper_study: $name has no checkpoint to analyse" >&2; exit 1; fi
  for study in sparsify activations; do
    if [[ -f "$OUT/$study/$name/$study.json" ]]; then continue; fi
    tokens=$([[ $study == sparsify ]] && echo 131072 || echo 32768)
    OMP_NUM_THREADS=2 "$BIN/mone-analyze" "$study" --model "$model" --data "$VALID" \
      --max-tokens "$tokens" --out "$OUT/$study/$name" --overwrite --no-progress \
      >"$OUT/logs/$study-$name.log" 2>&1
    echo "paper_study: $study $name ($(basename "$model")) done"
  done
done
"$BIN/python" benchmarks/paper_study_summary.py summary "$OUT"
echo "paper_study: done, results in $OUT"
exit 0
}
