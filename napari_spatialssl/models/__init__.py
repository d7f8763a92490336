"""Method families. Each module registers one method class by its id."""

from __future__ import annotations

import importlib

_BUILTIN = {
    "gnn-mask": "napari_spatialssl.models.gnn_mask",
    "spotscape": "napari_spatialssl.models.spotscape",
    "patch-mae": "napari_spatialssl.models.patch_mae",
}


def _load_all() -> None:
    """Import every built-in method module that exists (each registers itself)."""
    for module in _BUILTIN.values():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
