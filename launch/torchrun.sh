#!/usr/bin/env bash
# Launch mone-train with torchrun.
#
#   single node:  launch/torchrun.sh NPROC_PER_NODE [hydra overrides ...]
#   multi node:   on every node, with the same MASTER_ADDR/MASTER_PORT (the rendezvous host)
#                 NNODES=4 MASTER_ADDR=node0 MASTER_PORT=29500 RDZV_ID=myjob \
#                   launch/torchrun.sh 8 trainer.expert_parallel_size=8
#
# torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every worker; the
# trainer reads them. If any worker fails, torchrun stops the others and exits non-zero.
set -euo pipefail
NPROC=${1:?usage: launch/torchrun.sh NPROC_PER_NODE [hydra overrides ...]}
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TORCHRUN=${TORCHRUN:-$ROOT/.venv/bin/torchrun}
NNODES=${NNODES:-1}

if [[ "$NNODES" == 1 ]]; then
  exec "$TORCHRUN" --standalone --nnodes 1 --nproc-per-node "$NPROC" -m mone_train.train "$@"
fi
: "${MASTER_ADDR:?multi-node runs need MASTER_ADDR (the rendezvous host)}"
exec "$TORCHRUN" --nnodes "$NNODES" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" \
  --rdzv-id "${RDZV_ID:-mone-train}" -m mone_train.train "$@"
