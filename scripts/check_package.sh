#!/usr/bin/env bash
# Packaging check: the napari manifest (napari.yaml) and the sample slides must be found by napari both
# in the editable install and in a built wheel. Builds the wheel, installs it into a temporary folder
# (no network, no other packages) and runs `npe2 validate napari-spatialssl` against each copy.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BIN=$(cd "$(dirname "$PY")" && pwd)  # absolute, without resolving the venv's python symlink
PY="$BIN/$(basename "$PY")"
NPE2="$BIN/npe2"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "== editable install"
"$NPE2" validate napari-spatialssl --imports

echo "== built wheel"
"$PY" -m pip wheel --no-deps --no-build-isolation -q -w "$tmp/dist" .
"$PY" -m pip install --no-deps -q --target "$tmp/site" "$tmp"/dist/napari_spatialssl-*.whl
cd "$tmp"
# PYTHONPATH puts the wheel's copy first, so npe2 (and importlib.metadata) see it, not the checkout.
PYTHONPATH="$tmp/site" "$NPE2" validate napari-spatialssl
PYTHONPATH="$tmp/site" "$PY" - "$tmp/site" <<'PYEOF'
import sys
from importlib import metadata
from pathlib import Path

site = Path(sys.argv[1]).resolve()
dist = metadata.distribution("napari-spatialssl")
assert Path(dist.locate_file("")).resolve() == site, dist.locate_file("")
from npe2 import PluginManifest

mf = PluginManifest.from_distribution("napari-spatialssl")
assert Path(dist.locate_file("napari_spatialssl/napari.yaml")).is_file()
import napari_spatialssl
from napari_spatialssl._napari.sample_data import osmfish_cortex, starmap_mpfc, sample_path

assert Path(napari_spatialssl.__file__).resolve().is_relative_to(site), napari_spatialssl.__file__
for load, n in ((osmfish_cortex, 6471), (starmap_mpfc, 3190)):
    (data, kwargs, kind), = load()
    assert kind == "points" and len(data) == n, (kind, len(data))
print(f"wheel OK: manifest {mf.name!r} ({len(mf.contributions.commands)} commands), samples load from "
      f"{sample_path('osmfish').parent}")
PYEOF
