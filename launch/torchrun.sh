#!/usr/bin/env bash
# Launch moe_dist training with torchrun, on one node or many.
#
#   launch/torchrun.sh [--nproc-per-node P] [--nnodes N] [--node-rank R] [--rdzv-endpoint HOST:PORT]
#                      [--max-restarts K] [--dry-run] -- --config configs/tiny.yaml key=value ...
#
# Everything after `--` goes to `python -m moe_dist.train`. Defaults come from the environment:
# NPROC_PER_NODE (else the GPU count, else 1), NNODES (1), NODE_RANK (0), MASTER_ADDR/MASTER_PORT
# or RDZV_ENDPOINT (c10d rendezvous on the first node), RUN_ID, MAX_RESTARTS (0), PYTHON.
set -euo pipefail

PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MAX_RESTARTS=${MAX_RESTARTS:-0}
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
exec "${CMD[@]}"
