"""napari-spatialssl: self-supervised learning on spatial transcriptomics slides.

The core (everything outside ``_napari``) imports no Qt and no napari.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "SpatialDataset", "fit", "predict", "SpatialDataError"]


def __getattr__(name):
    # Lazy: `import napari_spatialssl` stays cheap (napari imports it to read the manifest).
    if name == "SpatialDataset":
        from .data.dataset import SpatialDataset

        return SpatialDataset
    if name == "SpatialDataError":
        from .data.io import SpatialDataError

        return SpatialDataError
    if name in ("fit", "predict"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "tl": return __import__("importlib").import_module(f"{__name__}.tl")  # noqa: E701  scanpy-style verbs
    raise AttributeError(name)
