#!/usr/bin/env bash
# Launch mone-train with the deepspeed launcher.
#
#   single node:  launch/deepspeed.sh NUM_GPUS [hydra overrides ...]
#   multi node:   HOSTFILE=launch/hostfile.example NUM_NODES=2 launch/deepspeed.sh 8 ...
#                 (the launcher reaches the other hosts over ssh, as its docs describe)
#
# The launcher sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process.
# --no_local_rank: Hydra parses the command line, so no --local_rank argument is appended.
# On a machine without GPUs, deepspeed picks its CPU accelerator and NUM_GPUS processes run on
# CPU with gloo.
set -euo pipefail
NUM_GPUS=${1:?usage: launch/deepspeed.sh NUM_GPUS [hydra overrides ...]}
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEEPSPEED=${DEEPSPEED:-$ROOT/.venv/bin/deepspeed}
args=(--num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" --no_local_rank)
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
[[ -n "${NUM_NODES:-}" ]] && args+=(--num_nodes "$NUM_NODES")
# a bad override or a layout that does not fit the processes: one line, before any starts
"${PYTHON:-$ROOT/.venv/bin/python}" -m mone_train.preflight \
  --world-size "$((${NUM_NODES:-1} * NUM_GPUS))" "$@"
exec "$DEEPSPEED" "${args[@]}" --module mone_train.train "$@"
