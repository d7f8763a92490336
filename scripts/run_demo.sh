#!/usr/bin/env bash
# `make demo`: with a display, open napari with the osmFISH sample slide and the plugin's dock widget;
# without one, render the slide with napari on a private virtual X server into demo_output/tissue.png
# (cells coloured by cell type) with demo_output/summary.json.
#   DEMO_ARGS  extra arguments, e.g. DEMO_ARGS="--sample starmap" or "--headless"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# shellcheck disable=SC2086
exec "$PY" -m napari_spatialssl.cli demo --out "${DEMO_OUT:-demo_output}" ${DEMO_ARGS:-}
