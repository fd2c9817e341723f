#!/usr/bin/env bash
# Wheels the GPU machine lacks, for benchmarks/gpu_check.sh: DeepSpeed (pure Python, built here with
# DS_BUILD_OPS=0; it JIT-builds its CUDA ops there) and its needs that the machine's image does not hold
# (/work/.library/device/KINDS.md lists the image's packages). Run once, here, in the checkout that travels:
#
#     bash benchmarks/gpu_wheels.sh        # -> .whl/ (ignored via .git/info/exclude); then run with carry [".whl"]
#
# gpu_check.sh installs .whl/*.whl into a temporary directory before its steps. Python 3.12 x86-64 wheels
# (the machine's python3); versions as this project's CI runs them.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
cd "$ROOT"
mkdir -p .whl
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >>"$EXCLUDE"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==${DEEPSPEED_VERSION:-0.19.8}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
ls -l .whl
