#!/usr/bin/env bash
# Create (or update) the project's virtual environment: torch first, pinned, then the package with all
# its extras constrained to that torch, so that no dependency can pull a different (multi-GB CUDA) torch.
#   VENV         folder of the environment (default .venv)
#   PYTHON       interpreter used to create it (default python3, >= 3.10)
#   TORCH        torch requirement (default torch==2.13.0)
#   TORCH_INDEX  extra package index for torch (default the CPU-only PyTorch index; used when reachable,
#                e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu126 for CUDA 12.6)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "install_env: $PYTHON is $("$PYTHON" -V 2>&1); napari-spatialssl needs Python >= 3.10 (make PYTHON=python3.11)"; exit 1; }
  "$PYTHON" -m venv "$VENV" \
    || { echo "install_env: could not create $VENV; on Debian/Ubuntu install python3-venv (sudo apt-get install python3-venv)"; exit 1; }
  "$PY" -m pip install -q --upgrade pip
fi

# torch: skip when the installed one already satisfies the requirement (keeps `make` idempotent and offline).
if ! "$PY" - "$TORCH" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
req = Requirement(sys.argv[1])
sys.exit(0 if req.specifier.contains(version("torch"), prereleases=True) else 1)
PYEOF
then
  extra=()
  if [ -n "$TORCH_INDEX" ] && command -v curl >/dev/null 2>&1 \
      && curl -fsS --max-time 10 -o /dev/null "${TORCH_INDEX%/}/torch/" 2>/dev/null; then
    extra=(--extra-index-url "$TORCH_INDEX")
  fi
  echo "install_env: installing $TORCH ${extra[*]:-}"
  "$PY" -m pip install -q "$TORCH" "${extra[@]}"
fi
"$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$VENV/constraints.txt"
echo "install_env: $(cat "$VENV/constraints.txt") (constraint for everything else)"
"$PY" -m pip install -q -c "$VENV/constraints.txt" -e ".[all]"
# a final guard: the constraint must have held
"$PY" -c "import torch, sys; want=open('$VENV/constraints.txt').read().strip().split('==')[1]; \
sys.exit(0 if torch.__version__.split('+')[0] == want else 'torch changed during install: ' + torch.__version__)"
