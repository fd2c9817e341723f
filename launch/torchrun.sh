#!/usr/bin/env bash
# Launch moe_dist training with torchrun, on one node or many.
#
#   launch/torchrun.sh [--nproc-per-node P] [--nnodes N] [--node-rank R] [--rdzv-endpoint HOST:PORT]
#                      [--max-restarts K] [--stop-grace S] [--dry-run] -- --config configs/tiny.yaml key=value ...
#
# Everything after `--` goes to `python -m moe_dist.train`. Defaults come from the environment:
# NPROC_PER_NODE (else the GPU count, else 1), NNODES (1), NODE_RANK (0), MASTER_ADDR/MASTER_PORT
# or RDZV_ENDPOINT (c10d rendezvous on the first node), RUN_ID, MAX_RESTARTS (0), STOP_GRACE_S (300), PYTHON.
#
# Stopping: SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 to this script is passed to the workers as one SIGTERM;
# each saves a checkpoint at the next step boundary and exits 0, so torchrun, and this script, exit 0.
# (torchrun signalled itself stops its workers after 30 s and exits 1.) torchrun runs in a process
# group of its own, so a Ctrl-C in the terminal or Slurm's signal to the task reaches this script
# only. After STOP_GRACE_S seconds without the workers done, the job is killed (exit 1); a second
# Ctrl-C kills it at once (exit 130). The previous complete checkpoint survives either way.
set -euo pipefail

PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MAX_RESTARTS=${MAX_RESTARTS:-0}
STOP_GRACE_S=${STOP_GRACE_S:-300}
RUN_ID=${RUN_ID:-moe_dist}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-}
DRY_RUN=0
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ "$NPROC_PER_NODE" -gt 0 ]] || NPROC_PER_NODE=1
fi

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc-per-node) NPROC_PER_NODE=$2; shift 2 ;;
    --nnodes) NNODES=$2; shift 2 ;;
    --node-rank) NODE_RANK=$2; shift 2 ;;
    --rdzv-endpoint) RDZV_ENDPOINT=$2; shift 2 ;;
    --max-restarts) MAX_RESTARTS=$2; shift 2 ;;
    --stop-grace) STOP_GRACE_S=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    *) echo "launch/torchrun.sh: unknown option '$1'; training arguments go after --" >&2; exit 2 ;;
  esac
done

if [[ "$NNODES" -eq 1 && -z "$RDZV_ENDPOINT" && -z "${MASTER_ADDR:-}" ]]; then
  # one node: a private rendezvous on a free local port
  RDZV=(--standalone)
else
  if [[ -z "$RDZV_ENDPOINT" ]]; then
    if [[ -z "${MASTER_ADDR:-}" ]]; then
      echo "launch/torchrun.sh: multi-node needs MASTER_ADDR (first node's host) or --rdzv-endpoint HOST:PORT" >&2
      exit 2
    fi
    RDZV_ENDPOINT="${MASTER_ADDR}:${MASTER_PORT:-29500}"
  fi
  RDZV=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RUN_ID")
fi

CMD=("$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc-per-node "$NPROC_PER_NODE"
     --max-restarts "$MAX_RESTARTS" -m moe_dist.train "$@")
if [[ "$DRY_RUN" -eq 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi

# torchrun signalled directly (not through this script) also gives its workers the grace
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-$STOP_GRACE_S}
set -m  # the next background job gets a process group of its own
"${CMD[@]}" &
AGENT=$!
set +m

workers() {  # torchrun's children: the trainers (each in a session of its own)
  cat /proc/"$AGENT"/task/*/children 2>/dev/null || pgrep -P "$AGENT" || true
}
STOPPING=0
DEADLINE=0
on_signal() {
  if [[ "$STOPPING" -eq 1 ]]; then
    [[ "$1" == INT ]] || return 0
    echo "launch/torchrun.sh: second interrupt: killing the job" >&2
    kill -KILL $(workers) "$AGENT" 2>/dev/null || true
    exit 130
  fi
  STOPPING=1
  DEADLINE=$((SECONDS + STOP_GRACE_S))
  echo "launch/torchrun.sh: SIG$1: the workers save a checkpoint and exit (grace ${STOP_GRACE_S}s)" >&2
  kill -TERM $(workers) 2>/dev/null || true
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal USR1' USR1

set +e
while kill -0 "$AGENT" 2>/dev/null; do
  if [[ "$STOPPING" -eq 1 && "$SECONDS" -ge "$DEADLINE" ]]; then
    echo "launch/torchrun.sh: the workers did not finish within STOP_GRACE_S=${STOP_GRACE_S}s; killing the job" >&2
    kill -KILL $(workers) "$AGENT" 2>/dev/null
    wait "$AGENT"
    exit 1
  fi
  sleep 1 &
  wait $!  # a trapped signal ends the wait at once
done
wait "$AGENT"
exit $?
