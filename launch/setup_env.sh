#!/usr/bin/env bash
# Create (or reuse) .venv in the repository and install moe_dist into it, editable, with dev tools.
#
#   bash launch/setup_env.sh            # then: .venv/bin/moe-dist train --config configs/tiny.yaml
#   bash launch/setup_env.sh --dev      # also the peers the tests run beside us: DeepSpeed (ZeRO),
#                                       # mpi4py (when an MPI such as Debian's openmpi-bin is installed)
#
# torch: a torch already importable in .venv, or in the system Python (a GPU container's CUDA
# build: the venv then sees system site-packages), is used as it is. Otherwise torch==2.13.0 is
# installed with pip (where pip's find-links or index offer the CPU build, that is the one taken).
# Environment: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=.venv

if [[ ! -x "$VENV/bin/python" ]]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup_env: using the system torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup_env: torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') already installed; keeping it"
else
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
fi
# torch>=2.5 in setup.py is met by the torch above, so this never replaces it.
"$VENV/bin/python" -m pip install -q -e ".[dev]"
if [[ "${1:-}" == "--dev" ]]; then
  # DeepSpeed's CUDA/C++ ops are built lazily (DS_BUILD_OPS=0); no build isolation, or pip would build
  # it against a freshly downloaded torch
  "$VENV/bin/python" -c "import deepspeed" 2>/dev/null \
    || DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q --no-build-isolation deepspeed
  if command -v mpicc >/dev/null 2>&1; then
    "$VENV/bin/python" -c "import mpi4py" 2>/dev/null || "$VENV/bin/python" -m pip install -q mpi4py
  else
    echo "setup_env: no MPI compiler (mpicc); the mpirun test will be skipped (apt-get install openmpi-bin libopenmpi-dev)"
  fi
fi
"$VENV/bin/python" -c "import torch, moe_dist; print(f'setup_env: moe_dist {moe_dist.__version__} with torch {torch.__version__} in $VENV')"
