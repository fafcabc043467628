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
#
# In-place restarts: MAX_RESTARTS=N (default 0) lets torchrun restart all workers up to N times
# after a worker fails: a crash, or the hang watchdog's exit (code 76, mone_train/components/watchdog.py:
# a rank without progress dumps its stacks to <run_dir>/hangs/ and exits). The restarted
# workers run the same command, which resumes from the run's newest checkpoint.
#
# Preemption: SIGUSR1 or SIGTERM sent to this script (what SLURM's --signal and its time limit
# send to a job step's tasks) is passed to every worker as SIGUSR1, not to torchrun: torchrun
# would kill its workers after a short grace period, and it does not forward SIGUSR1. The
# workers save a checkpoint together and exit; this script then exits with 75 (EX_TEMPFAIL,
# the trainer's "saved, requeue me" code), and the same command resumes.
set -euo pipefail
NPROC=${1:?usage: launch/torchrun.sh NPROC_PER_NODE [hydra overrides ...]}
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TORCHRUN=${TORCHRUN:-$ROOT/.venv/bin/torchrun}
NNODES=${NNODES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-0}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
# EXIT_PREEMPTED, EXIT_HANG, ...: one source, mone_train/errors.py
eval "$("$PYTHON" -m mone_train.errors)"

if [[ "$NNODES" == 1 ]]; then
  cmd=("$TORCHRUN" --standalone --nnodes 1 --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS")
else
  : "${MASTER_ADDR:?multi-node runs need MASTER_ADDR (the rendezvous host)}"
  cmd=("$TORCHRUN" --nnodes "$NNODES" --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS"
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}"
    --rdzv-id "${RDZV_ID:-mone-train}")
fi

# A bad override or a layout that does not fit NNODES x NPROC processes: one line, before any
# worker starts.
"$PYTHON" -m mone_train.preflight --world-size "$((NNODES * NPROC))" "$@"

# torchrun exits 1 whatever its workers' codes were: a worker that ends on a hang notes its code
# here (mone_train/components/watchdog.py), so that this script can exit with it (SLURM requeues on it).
export MONE_EXIT_CODE_FILE=${MONE_EXIT_CODE_FILE:-$(mktemp -t mone-exit.XXXXXX)}
"${cmd[@]}" -m mone_train.train "$@" &
launcher=$!
preempted=0
forward() {
  preempted=1
  echo "launch/torchrun.sh: $1 received, asking the workers to save and exit" >&2
  pkill -USR1 -P "$launcher" || true
}
trap 'forward SIGUSR1' USR1
trap 'forward SIGTERM' TERM

status=0
while true; do
  wait "$launcher" && status=0 || status=$?
  kill -0 "$launcher" 2>/dev/null || break # wait returned for a trapped signal: keep waiting
done
if ((preempted)) && ((status != 0)); then
  exit "$EXIT_PREEMPTED"
fi
if ((status != 0)) && grep -qx "$EXIT_HANG" "$MONE_EXIT_CODE_FILE" 2>/dev/null; then
  echo "launch/torchrun.sh: a worker hung (stacks in the run directory's hangs/)" >&2
  exit "$EXIT_HANG"
fi
exit "$status"
