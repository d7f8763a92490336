"""npe2 sample data contributions: the osmFISH cortex and STARmap mPFC slides shipped with the package.

The files live in ``sample_data/`` at the top of the repository; ``napari_spatialssl/sample_data`` links
to it, so the files are found in a checkout, an editable install and a built wheel alike.
"""

from __future__ import annotations

from pathlib import Path

from .layers import LayerData

SAMPLES = {
    "osmfish": ("osmfish_cortex.h5ad", "osmFISH mouse somatosensory cortex (Codeluppi et al. 2018)"),
    "starmap": ("starmap_mpfc_3slices.h5ad", "STARmap mouse mPFC, 3 slices (Wang et al. 2018)"),
}


def sample_path(sample: str) -> Path:
    """Path of a shipped sample slide ('osmfish' or 'starmap', or its file name)."""
    key = sample.lower()
    for k, (fname, _) in SAMPLES.items():
        if key in (k, fname, fname[:-5]):
            break
    else:
        raise KeyError(f"unknown sample {sample!r}; choose one of {sorted(SAMPLES)}.")
    package_dir = Path(__file__).resolve().parents[1]
    for folder in (package_dir / "sample_data", package_dir.parent / "sample_data"):
        if (folder / fname).is_file():
            return folder / fname
    raise FileNotFoundError(
        f"sample file {fname} not found next to the package ({package_dir / 'sample_data'}); reinstall "
        "napari-spatialssl (the wheel ships it)."
    )


def _load(sample: str) -> list[LayerData]:
    from .reader import read_slide

    return [read_slide(sample_path(sample), name=Path(SAMPLES[sample][0]).stem)]


def osmfish_cortex() -> list[LayerData]:
    """osmFISH mouse somatosensory cortex: 6,471 cells x 33 genes, coloured by cell type."""
    return _load("osmfish")


def starmap_mpfc() -> list[LayerData]:
    """STARmap mouse medial prefrontal cortex: 3 slices, 3,190 cells x 166 genes, tiled, by cell type."""
    return _load("starmap")
