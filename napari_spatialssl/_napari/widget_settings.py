"""Persisted widget settings: the last used parameters, as one JSON file.

The file lives in napari-spatialssl's user config folder (``platformdirs``); the environment
variable ``NAPARI_SPATIALSSL_SETTINGS`` overrides its path so that tests never touch a user's
real settings. A missing, unreadable or corrupt file means "no saved settings", never an error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..data.io import atomic_write_text

ENV_VAR = "NAPARI_SPATIALSSL_SETTINGS"
FILE_NAME = "widget_settings.json"


def settings_path() -> Path:
    """Where the widget keeps its settings (``$NAPARI_SPATIALSSL_SETTINGS`` when set)."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_config_dir("napari-spatialssl", appauthor=False)) / FILE_NAME


def load_settings() -> dict:
    """The saved settings, or {} when there are none or the file cannot be read."""
    path = settings_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_settings(settings: dict) -> Path | None:
    """Write the settings atomically; None (and nothing raised) when the folder is not writable."""
    path = settings_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, json.dumps(settings, indent=1, sort_keys=True, default=str))
    except OSError:
        return None
