"""Screenshots of the dock widget for the README (docs/images/widget_*.png).

Not part of the default run: set ``SPATIALSSL_SCREENSHOTS=docs/images`` (a folder) to write them:
``SPATIALSSL_SCREENSHOTS=docs/images xvfb-run -a -s "-screen 0 1700x1100x24" .venv/bin/pytest
tests/test_widget_screenshots.py``. It trains gnn-mask on the osmFISH sample with its default settings (a few
minutes on 2 cores) and checks what it draws (the layers asked for on top, images written and not blank).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from napari_spatialssl._napari.layer_updates import REGION_LAYER  # noqa: E402
from napari_spatialssl._napari.reader import read_slides  # noqa: E402
from napari_spatialssl._napari.widget import SpatialSSLWidget  # noqa: E402
from napari_spatialssl._napari.widget_settings import ENV_VAR  # noqa: E402
from napari_spatialssl._napari.workers import SYNC_ENV  # noqa: E402

OUT = os.environ.get("SPATIALSSL_SCREENSHOTS")
pytestmark = [pytest.mark.viewer,
              pytest.mark.skipif(not OUT, reason="set SPATIALSSL_SCREENSHOTS=<folder> to write the README screenshots")]


def _shot(viewer, name: str) -> Path:
    from imageio.v3 import imread

    path = Path(OUT) / f"widget_{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    img = imread(path)
    assert img.shape[0] > 400 and img[..., :3].std() > 10, f"{path} looks blank"
    return path


def test_readme_screenshots(make_napari_viewer, osmfish_path, tmp_path, monkeypatch, qtbot):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "settings.json"))
    monkeypatch.setenv(SYNC_ENV, "1")
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    for data, kwargs, _ in read_slides(str(osmfish_path)):
        viewer.add_points(data, **kwargs)
    w = SpatialSSLWidget(viewer)
    viewer.window.add_dock_widget(w, name="Self-supervised learning", area="right")
    qtbot.wait(200)
    s = w.session
    s.set_keys(domain_key="region")
    s.set_setting("eval.n_domains", 11)
    s.set_setting("finetune.epochs", 60)

    # View: the radius graph and the ego-net of one cell
    s.preview_view(cell=3000)
    w.tabs.setCurrentIndex(1)
    viewer.camera.center = tuple(s.slide.positions[3000])
    viewer.camera.zoom = 0.6
    qtbot.wait(200)
    assert viewer.layers[-1].metadata["spatialssl_key"] == "preview:ego-net"
    _shot(viewer, "view_egonet")

    # Train with the defaults, then the domains are on top
    w.tabs.setCurrentIndex(3)
    s.train()
    viewer.reset_view()
    w.tabs.setCurrentIndex(4)
    qtbot.wait(500)
    assert viewer.layers[-1].metadata["spatialssl_key"] == "result:gnn-mask"
    _shot(viewer, "results_domains")

    # A gene measured beside its reconstruction
    s.compare("Rorb")
    viewer.reset_view()
    qtbot.wait(300)
    _shot(viewer, "reconstruction")

    # A region hidden from the model
    s.request_region_layer()
    xy = s.slide.positions
    lo, hi = np.percentile(xy, 45, axis=0), np.percentile(xy, 62, axis=0)
    viewer.layers[REGION_LAYER].add_rectangles(np.array([[lo[0], lo[1]], [hi[0], hi[1]]]))
    s.inspect_region("gnn-mask", gene="Rorb")
    w.tabs.setCurrentIndex(5)
    viewer.reset_view()
    qtbot.wait(300)
    assert viewer.layers[-1].metadata.get("spatialssl_key", "").startswith("region") or \
        any(lay.metadata.get("spatialssl_key") == "region:panels" for lay in viewer.layers)
    _shot(viewer, "region")
