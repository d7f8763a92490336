#!/usr/bin/env bash
# Run the whole suite; viewer tests need a display, so start a virtual X server when there is none.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONUNBUFFERED=1
if [ -z "${DISPLAY:-}" ] && command -v xvfb-run >/dev/null 2>&1; then
  exec xvfb-run -a -s "-screen 0 1400x1000x24" "$PY" -m pytest "$@"
fi
exec "$PY" -m pytest "$@"
