#!/usr/bin/env bash
# Launch moe_dist training with mpirun (Open MPI or MPICH): one process per rank, no torchrun.
#
#   launch/mpirun.sh -np 4 [--hostfile FILE] [--dry-run] -- --config configs/tiny.yaml key=value ...
#
# Each process learns its rank, world size and local rank from MPI (mpi4py), and rank 0's host
# and a free port are broadcast for torch.distributed's rendezvous (moe_dist/parallel/env.py).
set -euo pipefail

PYTHON=${PYTHON:-python3}
NP=1
HOSTFILE=()
DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -np|-n) NP=$2; shift 2 ;;
    --hostfile) HOSTFILE=(--hostfile "$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    *) echo "launch/mpirun.sh: unknown option '$1'; training arguments go after --" >&2; exit 2 ;;
  esac
done

EXTRA=()
if mpirun --version 2>/dev/null | grep -q "Open MPI"; then
  # Open MPI refuses root without this; containers usually run as root
  [[ "$(id -u)" -eq 0 ]] && EXTRA+=(--allow-run-as-root)
  # one rank per core slot is Open MPI's default; oversubscribe so 4 ranks run on a 2-core box
  EXTRA+=(--oversubscribe --bind-to none -x PATH)
  [[ -n "${PYTHONPATH:-}" ]] && EXTRA+=(-x PYTHONPATH)
fi

CMD=(mpirun -np "$NP" "${HOSTFILE[@]}" "${EXTRA[@]}" "$PYTHON" -m moe_dist.train "$@")
if [[ "$DRY_RUN" -eq 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
