#!/usr/bin/env bash
# Run the whole suite. Viewer tests need an X display with OpenGL (Mesa): when there is none, start a
# virtual one (xvfb-run, or Xvfb directly). Without any, Qt runs "offscreen" and the tests that take
# screenshots skip themselves with a reason. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
SCREEN="1400x1000x24"
if [ -z "${DISPLAY:-}" ]; then
  if command -v xvfb-run >/dev/null 2>&1; then
    exec xvfb-run -a -s "-screen 0 $SCREEN" "$PY" -m pytest "$@"
  elif command -v Xvfb >/dev/null 2>&1; then
    Xvfb :87 -screen 0 "$SCREEN" -nolisten tcp >/dev/null 2>&1 &
    xpid=$!
    trap 'kill $xpid 2>/dev/null' EXIT
    sleep 2
    DISPLAY=:87 "$PY" -m pytest "$@"
    exit $?
  else
    echo "run_tests: no display and no Xvfb (install xvfb: bash scripts/system_deps.sh); screenshot tests will skip"
    export QT_QPA_PLATFORM=offscreen
  fi
fi
exec "$PY" -m pytest "$@"
