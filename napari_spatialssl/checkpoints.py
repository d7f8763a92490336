"""Model files that can be passed between labs: weights in safetensors, everything else in JSON.

Reading a model never executes anything from disk: a safetensors file holds only a JSON header and
raw tensor bytes, and ``model.json`` holds only data (the method, its config, versions, the training
history and the method's extra state: gene names, label names, numbers). ``model.json`` records the
SHA-256 of the weights it was written with, so weights and metadata of different runs are never
mixed silently.

A ``model.pt`` written before this format (a torch pickle) is read with
``torch.load(weights_only=True)``, torch's restricted unpickler that refuses every global except
tensors and plain containers, so a crafted pickle is refused before any of it runs;
``napari-spatialssl convert-model OLD NEW`` rewrites such a folder in the current format.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .data.io import SpatialDataError, atomic_write

FORMAT = "napari-spatialssl/2"
LEGACY_FORMAT = "napari-spatialssl/1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
LEGACY_FILE = "model.pt"


class ModelFileError(SpatialDataError):
    """A model file is missing, damaged, unsafe or inconsistent; the message says which and what to do."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def to_jsonable(obj):
    """Plain JSON types only (numpy scalars/arrays become numbers/lists; NaN/inf become None)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # a torch tensor
        return to_jsonable(obj.detach().cpu().tolist())
    return obj


def _tensors_for_file(state: dict) -> dict:
    """Contiguous CPU tensors that own their memory (safetensors refuses shared storage)."""
    out = {}
    seen: set[int] = set()
    for key, value in state.items():
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    """Tensors to a safetensors file, atomically (never half-written under `path`)."""
    from safetensors.torch import save_file

    clean = _tensors_for_file(tensors)
    return atomic_write(path, lambda p: save_file(clean, str(p), metadata=metadata), overwrite=True)


def load_tensors(path: str | os.PathLike, what: str = "weights") -> dict:
    """Tensors from a safetensors file (CPU); a damaged file is one clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{p}: {what} file missing; pass a folder written by 'fit' (it holds {WEIGHTS_FILE}).")
    if p.stat().st_size == 0:
        raise ModelFileError(f"{p}: the {what} file is empty (0 bytes); copy it again from where it was written.")
    try:
        return load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{p}: the {what} file is damaged or not a safetensors file ({_first_line(exc)}); "
                             "copy it again from where it was written.") from exc


def write_model(folder: str | os.PathLike, *, method: str, config: dict, state_dict: dict, extra: dict,
                history: list[dict] | None = None, versions: dict | None = None) -> dict[str, Path]:
    """``model.safetensors`` (the weights) then ``model.json`` (everything else, with the weights' hash)."""
    folder = Path(folder)
    weights = save_tensors(folder / WEIGHTS_FILE, state_dict, metadata={"format": FORMAT, "method": method})
    meta = {
        "format": FORMAT,
        "method": method,
        "config": to_jsonable(config),
        "versions": to_jsonable(versions or {}),
        "history": to_jsonable(history or []),
        "extra": to_jsonable(extra or {}),
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(weights),
                    "tensors": {k: list(v.shape) for k, v in state_dict.items()}},
    }
    meta_path = atomic_write(folder / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=1)),
                             overwrite=True)
    return {"model": weights, "model_meta": meta_path}


def read_model(path: str | os.PathLike) -> dict:
    """The model in a folder (or a ``model.json`` / ``model.safetensors`` / legacy ``model.pt``) as a dict
    with keys format, method, config, state_dict, versions, history, extra (and legacy=True for a
    model.pt). Nothing read is executed; every problem is a :class:`ModelFileError`."""
    p = Path(path)
    if p.is_dir():
        if (p / META_FILE).exists() or (p / WEIGHTS_FILE).exists():
            return _read_current(p / META_FILE, p / WEIGHTS_FILE)
        if (p / LEGACY_FILE).exists():
            return read_legacy(p / LEGACY_FILE)
        raise ModelFileError(f"{p}: no model here ({META_FILE} and {WEIGHTS_FILE} missing); pass the folder "
                             "written by 'fit' or by the widget's Save model.")
    if p.name == LEGACY_FILE or p.suffix == ".pt":
        return read_legacy(p)
    if p.suffix == ".json":
        return _read_current(p, p.with_name(WEIGHTS_FILE))
    if p.suffix == ".safetensors":
        return _read_current(p.with_name(META_FILE), p)
    if not p.exists():
        raise ModelFileError(f"{p}: not found; pass the folder written by 'fit' (or its {META_FILE}).")
    raise ModelFileError(f"{p}: not a napari-spatialssl model file; pass the folder written by 'fit'.")


def _read_current(meta_path: Path, weights_path: Path) -> dict:
    if not meta_path.is_file():
        raise ModelFileError(f"{meta_path}: missing beside {weights_path.name}; the model folder is incomplete. "
                             "Copy the whole folder written by 'fit'.")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{meta_path}: damaged (not valid JSON: {_first_line(exc)}); copy it again.") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ModelFileError(f"{meta_path}: not a napari-spatialssl model (format {got!r}, expected {FORMAT!r}).")
    for key in ("method", "config", "weights"):
        if key not in meta:
            raise ModelFileError(f"{meta_path}: has no {key!r} entry; the file is damaged or from another tool.")
    if not weights_path.is_file():
        raise ModelFileError(f"{weights_path}: missing beside {meta_path.name}; copy the whole folder written by 'fit'.")
    want = meta["weights"].get("sha256")
    if want and sha256_file(weights_path) != want:
        raise ModelFileError(
            f"{weights_path}: does not match {meta_path.name} (SHA-256 differs): the weights were changed, truncated "
            "or come from another run; copy both files of the same run together.")
    state = load_tensors(weights_path)
    return {"format": FORMAT, "method": meta["method"], "config": meta["config"], "state_dict": state,
            "versions": meta.get("versions", {}), "history": meta.get("history", []),
            "extra": meta.get("extra", {}), "legacy": False}


def read_legacy(path: str | os.PathLike) -> dict:
    """A ``model.pt`` of format napari-spatialssl/1, read without executing anything (weights_only)."""
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{p}: not found; pass the folder written by 'fit'.")
    if p.stat().st_size == 0:
        raise ModelFileError(f"{p}: the model file is empty (0 bytes); copy it again from where it was written.")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            payload = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelFileError(
            f"{p}: refused: the file asks to run code or build objects other than tensors and plain data "
            f"({_first_line(exc)}); nothing from it was executed. Only load model files from people you trust, "
            "and ask for a folder written by napari-spatialssl >= 0.2 (model.safetensors + model.json).") from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as exc:
        raise ModelFileError(f"{p}: damaged or not a model file ({_first_line(exc)}); copy it again.") from exc
    if not isinstance(payload, dict) or payload.get("format") != LEGACY_FORMAT:
        raise ModelFileError(f"{p}: not a napari-spatialssl checkpoint.")
    if not isinstance(payload.get("state_dict"), dict):
        raise ModelFileError(f"{p}: holds no weights (state_dict); the file is damaged.")
    return {"format": LEGACY_FORMAT, "method": payload.get("method"), "config": payload.get("config", {}),
            "state_dict": payload["state_dict"], "versions": payload.get("versions", {}),
            "history": payload.get("history", []), "extra": to_jsonable(payload.get("extra", {})),
            "legacy": True}


def _numpy_scalar_globals() -> list:
    """numpy scalars (e.g. a float64 bin size) in legacy checkpoints: safe reconstructors of numbers."""
    out: list[Any] = [np.dtype]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = __import__(mod, fromlist=["scalar"])
            out.append(module.scalar)
            break
        except (ImportError, AttributeError):
            continue
    out += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return out


def check_weights_match(model, state_dict: dict, source: str) -> None:
    """Refuse weights whose names or shapes differ from the model the config builds (one line)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in own.items()
             if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or wrong):
        return
    if wrong:
        k, got, want = wrong[0]
        detail = f"{k} is {list(got)} in the weights but {list(want)} for the config"
    elif missing:
        detail = f"{len(missing)} tensor(s) the config needs are absent (e.g. {missing[0]})"
    else:
        detail = f"{len(unexpected)} tensor(s) the config does not use (e.g. {unexpected[0]})"
    raise ModelFileError(f"{source}: the weights do not match the saved config ({detail}); the files come from "
                         "different runs or were edited. Use the folder of one run as 'fit' wrote it.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
