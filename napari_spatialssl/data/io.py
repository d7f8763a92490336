"""Reading slides from `.h5ad` files and validating what a slide must hold.

Every problem with an input is raised as :class:`SpatialDataError`, whose message names the
input, says what was wrong and what to do. The napari reader turns these into a notification
instead of a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

# Obs columns that usually hold a section / slice id, most specific first.
SECTION_KEY_CANDIDATES = (
    "section",
    "section_id",
    "sample_id",
    "slice",
    "slice_id",
    "sample",
    "batch",
    "library_id",
    "brain_section_label",
)

H5AD_SUFFIXES = (".h5ad",)


class SpatialDataError(ValueError):
    """A slide (file, AnnData or layer) cannot be used as given; the message says how to fix it."""


def read_h5ad(path: str | os.PathLike, *, backed: bool = False):
    """Read an AnnData `.h5ad` file, with clear errors for missing, empty or non-h5ad files."""
    import anndata as ad

    p = Path(path)
    if not p.exists():
        raise SpatialDataError(f"{p}: file not found; check the path.")
    if p.is_dir():
        raise SpatialDataError(f"{p}: is a folder, not an .h5ad file; pass the file inside it.")
    if p.suffix.lower() not in H5AD_SUFFIXES:
        raise SpatialDataError(
            f"{p}: not an .h5ad file (suffix {p.suffix or 'none'!r}); convert it to AnnData "
            "(e.g. scanpy.read_csv(...).write_h5ad('slide.h5ad'))."
        )
    if p.stat().st_size == 0:
        raise SpatialDataError(f"{p}: the file is empty (0 bytes); re-export the slide.")
    with open(p, "rb") as fh:
        magic = fh.read(8)
    if magic != b"\x89HDF\r\n\x1a\n":
        raise SpatialDataError(
            f"{p}: not an HDF5 file, so not a valid .h5ad; re-export it with AnnData.write_h5ad."
        )
    try:
        adata = ad.read_h5ad(p, backed="r" if backed else None)
    except Exception as exc:  # anndata raises many types for corrupt files
        raise SpatialDataError(f"{p}: could not be read as AnnData ({exc}); re-export the slide.") from exc
    if adata.n_obs == 0:
        raise SpatialDataError(f"{p}: holds no cells (n_obs = 0).")
    return adata


def get_coordinates(adata, *, spatial_key: str = "spatial", coord_columns: Sequence[str] | None = None,
                    name: str = "AnnData") -> np.ndarray:
    """Return validated (n_cells, 2) float64 coordinates in (x, y) order.

    From ``obsm[spatial_key]`` (first two columns) or, when ``coord_columns`` is given, from those
    two obs columns.
    """
    if coord_columns is not None:
        cols = list(coord_columns)
        if len(cols) != 2:
            raise SpatialDataError(f"{name}: coord_columns must name two obs columns (x, y), got {cols}.")
        missing = [c for c in cols if c not in adata.obs.columns]
        if missing:
            raise SpatialDataError(
                f"{name}: obs column(s) {missing} not found; available: {list(adata.obs.columns)[:20]}."
            )
        raw = adata.obs[cols]
        try:
            coords = raw.to_numpy(dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise SpatialDataError(f"{name}: obs columns {cols} are not numeric ({exc}).") from exc
        source = f"obs{cols}"
    else:
        if spatial_key not in adata.obsm:
            raise SpatialDataError(
                f"{name}: obsm[{spatial_key!r}] missing (obsm has {list(adata.obsm.keys())}); "
                "pass coord_columns=('x', 'y') (CLI: --coords x,y) to use obs columns."
            )
        raw = adata.obsm[spatial_key]
        raw = raw.to_numpy() if isinstance(raw, pd.DataFrame) else np.asarray(raw)
        if raw.ndim != 2 or raw.shape[1] < 2:
            raise SpatialDataError(
                f"{name}: obsm[{spatial_key!r}] has shape {raw.shape}; expected (n_cells, 2) x, y coordinates."
            )
        try:
            coords = np.asarray(raw[:, :2], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise SpatialDataError(
                f"{name}: obsm[{spatial_key!r}] is not numeric (dtype {raw.dtype}); store x, y as numbers."
            ) from exc
        source = f"obsm[{spatial_key!r}]"
    if coords.shape[0] != adata.n_obs:
        raise SpatialDataError(
            f"{name}: {source} has {coords.shape[0]} rows but the expression has {adata.n_obs} cells; "
            "coordinates and expression must describe the same cells."
        )
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        idx = np.flatnonzero(bad)[:5].tolist()
        raise SpatialDataError(
            f"{name}: {bad.sum()} cell(s) have NaN or infinite coordinates in {source} (first rows {idx}); "
            "drop them first, e.g. adata = adata[np.isfinite(adata.obsm['spatial']).all(1)]."
        )
    return coords


def detect_section_key(obs: pd.DataFrame) -> str | None:
    """The first obs column named like a section id (see SECTION_KEY_CANDIDATES) with 2+ values."""
    lower = {c.lower(): c for c in obs.columns}
    for cand in SECTION_KEY_CANDIDATES:
        col = lower.get(cand)
        if col is not None and obs[col].nunique(dropna=True) >= 1:
            return col
    return None


def resolve_section_key(adata, section_key: str | None = "auto", name: str = "AnnData") -> str | None:
    """'auto' -> detected column or None; None -> None; a name -> checked to exist."""
    if section_key is None or section_key == "":
        return None
    if section_key == "auto":
        return detect_section_key(adata.obs)
    if section_key not in adata.obs.columns:
        raise SpatialDataError(
            f"{name}: section key {section_key!r} is not an obs column; available: "
            f"{list(adata.obs.columns)[:30]}. Pass one of them, or 'auto'."
        )
    return section_key


def check_obs_key(adata, key: str, what: str = "label key", name: str = "AnnData") -> None:
    if key not in adata.obs.columns:
        raise SpatialDataError(
            f"{name}: {what} {key!r} is not an obs column; available: {list(adata.obs.columns)[:30]}."
        )


def section_codes(adata, section_key: str | None, name: str = "AnnData") -> tuple[np.ndarray, list[str]]:
    """Integer section code per cell and the section names (in order of first appearance sorted)."""
    if section_key is None:
        return np.zeros(adata.n_obs, dtype=np.int32), ["all"]
    values = adata.obs[section_key]
    if values.isna().any():
        raise SpatialDataError(
            f"{name}: section key {section_key!r} has {int(values.isna().sum())} missing values; fill or drop them."
        )
    cat = pd.Categorical(values.astype(str))
    return cat.codes.astype(np.int32), [str(c) for c in cat.categories]


# Label values that mean "no label" in every part of the package (compared case-insensitively):
# empty and NaN-like values, and the placeholders the sample data and common atlases use.
UNKNOWN_LABELS = ("", "nan", "none", "na", "n/a", "unknown", "excluded", "ambiguous", "unassigned", "unlabeled",
                  "unlabelled")


def is_unknown_label(value, ignore=()) -> bool:
    """True for NaN / None and for values meaning "unlabelled" (UNKNOWN_LABELS, or in `ignore`)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return True
    text = str(value).strip()
    return text.lower() in UNKNOWN_LABELS or text in {str(v) for v in ignore}


def label_codes(adata, label_key: str, ignore: Sequence[str] = (), name: str = "AnnData",
                what: str = "label key") -> tuple[np.ndarray, list[str]]:
    """Integer label per cell (-1 = unknown: NaN, empty, or a value in ``ignore``) and class names."""
    check_obs_key(adata, label_key, what=what, name=name)
    values = adata.obs[label_key]
    as_str = values.astype(str).where(~values.isna(), "")
    unknown = (as_str.str.strip().str.lower().isin(UNKNOWN_LABELS) | as_str.isin({str(v) for v in ignore})).to_numpy()
    known_values = as_str[~unknown]
    classes = sorted(pd.unique(known_values))
    lookup = {c: i for i, c in enumerate(classes)}
    codes = np.full(adata.n_obs, -1, dtype=np.int64)
    codes[~unknown] = known_values.map(lookup).to_numpy()
    return codes, [str(c) for c in classes]


def atomic_write(path: str | os.PathLike, write: "Callable[[Path], None]", *, overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)`` then rename onto `path`: readers never see a half-written file.

    Refuses to replace an existing file unless ``overwrite`` is True. The temporary file is
    ``.<name>.tmp-<pid>-<random><suffix>`` beside `path`; temporary files of the same name left by
    processes that no longer run (killed mid-write) are removed first. A full disk or a
    permission problem is a :class:`SpatialDataError` naming the file.
    """
    import tempfile

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temp_files(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=path.suffix)
    except OSError as exc:
        raise SpatialDataError(f"{path}: cannot write here ({describe_os_error(exc)}).") from exc
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the result the usual permissions
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    except OSError as exc:
        raise SpatialDataError(f"{path}: could not be written ({describe_os_error(exc)}).") from exc
    except RuntimeError as exc:  # torch / h5py wrap a failed write (e.g. a full disk) in RuntimeError
        if "enforce fail" in str(exc) or "write" in str(exc).lower():
            raise SpatialDataError(f"{path}: could not be written ({describe_os_error(exc)}).") from exc
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def remove_dead_temp_files(path: Path) -> None:
    """Remove ``.<name>.tmp-<pid>-*`` files beside `path` whose writing process is gone."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(tmp.name[len(path.name) + 6:].split("-", 1)[0])
        except ValueError:
            continue
        if not _process_alive(pid):
            tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_os_error(exc: BaseException) -> str:
    """'no space left on device', 'permission denied', ... for an OSError (or a wrapped one)."""
    import errno

    err = getattr(exc, "errno", None)
    text = str(exc)
    if err == errno.ENOSPC or "No space left" in text or "enforce fail" in text and "write" in text.lower():
        return "no space left on device; free some space or choose another place"
    if err in (errno.EACCES, errno.EPERM):
        return "permission denied; choose a place you can write to"
    if err == errno.EROFS:
        return "read-only file system; choose another place"
    if err == errno.EDQUOT:
        return "disk quota exceeded; free some space or choose another place"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    return atomic_write(path, lambda p: p.write_text(text), overwrite=overwrite)


def atomic_write_h5ad(adata, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    return atomic_write(path, lambda p: adata.write_h5ad(p), overwrite=overwrite)
