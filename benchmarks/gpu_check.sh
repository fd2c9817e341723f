#!/usr/bin/env bash
# The GPU pass of issue 21, one command for a short GPU slot (one H100/H200, under 8 minutes):
#
#     bash benchmarks/gpu_check.sh OUT_DIR
#
# Each step runs benchmarks/gpu_check.py under its own time limit (and all of them under GPU_CHECK_BUDGET_S,
# default 460 s, so a hang cannot eat the slot), prints one line as it ends and goes on after a failure:
#   env          device, versions, the 8192^3 bf16 matmul (the device's ceiling)
#   train        bf16 training at Mixtral-8x7B layer shapes, as many layers as fit: tok/s, model TFLOP/s, MFU, memory
#   layer        the MoE layer against transformers' grouped_mm block and the dense bf16 matmuls (moe_layer.py)
#   syncs        host syncs per training step and per MoE layer (torch.cuda.set_sync_debug_mode)
#   zero-plain   a few steps of a medium model in one process ...
#   zero-fsdp2   ... the same under torchrun --nproc-per-node 1 with zero_stage=3 (FSDP2) ...
#   zero-ds      ... and with DeepSpeed ZeRO-1 (JIT-builds DeepSpeed's FusedAdam on first use)
#   tests        pytest tests/gpu (the CUDA tests)
#   summary      OUT_DIR/summary.json and summary.md (the table for benchmarks/RESULTS.md), targets met or not
# Logs: OUT_DIR/<step>.log; figures: OUT_DIR/<step>.json. Without CUDA the CPU-capable steps run at a toy
# size and the rest print `SKIP (no CUDA): ...` (about 1.5 minutes on 2 cores).
# Python: $PYTHON, else .venv/bin/python, else python3. Wheels in .whl/ (benchmarks/gpu_wheels.sh) are
# installed into a temporary directory first: the GPU machine cannot reach a package registry.
set -u
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  SITE=${TMPDIR:-/tmp}/gpu_check_site
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$ROOT"/.whl/*.whl >"$OUT/wheels.log" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$SITE"  # after the checkout, before the image's packages (.whl holds what it lacks)
    echo "[gpu_check] installed $(ls "$ROOT"/.whl/*.whl | wc -l) wheels from .whl/ into $SITE"
  else
    echo "[gpu_check] installing .whl/ failed (see $OUT/wheels.log); going on without them"
  fi
fi
command -v nvidia-smi >/dev/null && nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
: >"$OUT/steps.jsonl"

TOTAL=${GPU_CHECK_BUDGET_S:-460}
START=$(date +%s)
CHECK=(benchmarks/gpu_check.py)
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node 1)

step() {  # step NAME BUDGET_S COMMAND...
  local name=$1 budget=$2 t0 rc status left secs
  shift 2
  left=$((TOTAL - ($(date +%s) - START)))
  [ "$left" -lt "$budget" ] && budget=$left
  if [ "$budget" -lt 15 ]; then
    echo "[gpu_check] $name: SKIP (out of time: ${TOTAL} s spent)"
    printf '{"step": "%s", "status": "skip", "rc": null, "seconds": 0, "budget_s": %d, "log": null}\n' \
      "$name" "$budget" >>"$OUT/steps.jsonl"
    return
  fi
  echo "[gpu_check] $name (up to $budget s) ..."
  t0=$(date +%s)
  (cd "$ROOT" && timeout --kill-after=10 "$budget" "$@") >"$OUT/$name.log" 2>&1
  rc=$?
  secs=$(($(date +%s) - t0))
  case $rc in
    0) status=ok ;;
    75) status=skip ;;
    124|137) status=timeout ;;
    *) status=fail ;;
  esac
  grep -E '^(SKIP \(|FAIL|note)' "$OUT/$name.log" | sed "s/^/[gpu_check]   /"
  case $status in
    ok) echo "[gpu_check]   ok ($secs s): $(grep -vE '^(SKIP \(|note|\s*$)' "$OUT/$name.log" | tail -n 1 | cut -c1-300)" ;;
    skip) echo "[gpu_check]   skipped ($secs s)" ;;
    timeout) echo "[gpu_check]   TIMEOUT after $secs s (limit $budget s); see $OUT/$name.log" ;;
    fail) echo "[gpu_check]   FAILED (exit $rc, $secs s): $(tail -n 1 "$OUT/$name.log" | cut -c1-300); see $OUT/$name.log" ;;
  esac
  printf '{"step": "%s", "status": "%s", "rc": %d, "seconds": %d, "budget_s": %d, "log": "%s.log"}\n' \
    "$name" "$status" "$rc" "$secs" "$budget" "$name" >>"$OUT/steps.jsonl"
}

step env 45 "$PY" "${CHECK[@]}" env --out "$OUT"
step train 150 "$PY" "${CHECK[@]}" train --out "$OUT"
step layer 80 "$PY" "${CHECK[@]}" layer --out "$OUT"
step syncs 45 "$PY" "${CHECK[@]}" syncs --out "$OUT"
step zero-plain 40 "$PY" "${CHECK[@]}" zero --mode plain --out "$OUT"
step zero-fsdp2 45 "${TORCHRUN[@]}" "${CHECK[@]}" zero --mode fsdp2 --out "$OUT"
step zero-ds 120 "${TORCHRUN[@]}" "${CHECK[@]}" zero --mode ds --out "$OUT"  # pays DeepSpeed's FusedAdam build
step tests 100 "$PY" "${CHECK[@]}" tests --out "$OUT"  # after zero-ds: its DeepSpeed test reuses that build
TOTAL=$((TOTAL + 30)) step summary 30 "$PY" "${CHECK[@]}" summary --out "$OUT"
echo "[gpu_check] done in $(($(date +%s) - START)) s: $OUT/summary.md, $OUT/summary.json"
