#!/usr/bin/env bash
# The GPU path, run (issue 16): each method trained with CUDA + mixed precision on a sample slide
# and on the synthetic 4.3M-cell atlas, printing units per second, peak GPU memory and the CPU
# figure for the same steps, one JSON line each (benchmarks/gpu_check.py documents the fields).
#
#   bash benchmarks/gpu_check.sh                # on a CUDA machine: ~10 minutes on one H200
#   bash benchmarks/gpu_check.sh --dry-run      # CPU only, tiny sizes (run by tests/test_gpu_check.py)
#   bash benchmarks/gpu_check.sh --only spotscape --steps 20 --atlas-cells 1000000
#
# Results: append the printed lines to benchmarks/results/gpu_check.jsonl and the table in
# benchmarks/README.md ("The GPU path").
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python="python3"; fi
fi
if [[ " $* " != *" --dry-run "* ]]; then
    "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
        echo "gpu_check.sh: torch sees no CUDA device here; run with --dry-run for the CPU check." >&2; exit 2; }
    "$python" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'# {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, bf16 {torch.cuda.is_bf16_supported()}')" >&2
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
fi
exec "$python" "$here/gpu_check.py" "$@"
