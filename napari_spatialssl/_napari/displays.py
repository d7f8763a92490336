"""What a person sees of a result, as layer specifications (numpy and pandas only: no Qt, no napari).

The Session computes these off the main thread; ``layer_updates`` only assigns them to layers.
Conventions that keep results readable at overview zoom:

- explicit RGBA per point with the border the same colour as the face (napari's default dim grey
  border would otherwise cover points that are a pixel or two wide);
- one palette (``layers.stable_palette``: no grey, grey means "unlabelled"), honouring
  ``uns['<key>_colors']``, legends in natural order (1, 2, 10; not 1, 10, 2);
- domains coloured like the reference classes they match best (Hungarian matching) when the slide
  has reference labels, so that the same region has the same colour in both;
- continuous values with robust contrast limits and a colour bar description;
- side-by-side panels (measured beside reconstructed, several methods) shifted along the columns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..data.io import SpatialDataError

UNKNOWN_RGBA = np.array([0.45, 0.45, 0.45, 1.0], np.float32)
MISSING_RGBA = np.array([0.25, 0.25, 0.25, 1.0], np.float32)
PANEL_GAP = 0.08
RING = np.array([0.95, 0.95, 0.95, 0.9], np.float32)  # masked / hidden cells' outline
RING_WIDTH = 0.12  # relative to the point size: visible when zoomed in, not a white blanket at overview


@dataclass
class LayerSpec:
    """One layer to write: identity `key`, napari kind, full name, data, style keyword arguments."""

    key: str
    kind: str  # "points" | "vectors" | "shapes" | "image"
    name: str
    data: Any
    style: dict = field(default_factory=dict)
    features: pd.DataFrame | None = None
    metadata: dict = field(default_factory=dict)
    role: str = "result"  # "result" | "compare" | "region" | "preview" | "selection"


@dataclass
class Display:
    """Layers to write, the one to put on top, and what the dock shows beside them."""

    specs: list[LayerSpec]
    top: str | None = None
    hide_roles: tuple[str, ...] = ("result", "compare", "region", "preview")
    legend: tuple[str, list] | None = None  # (title, [(label, rgba, count)])
    colorbar: tuple[str, float, float, str] | None = None  # (colormap, lo, hi, label)
    text: str = ""
    slide: str = "show"  # the slide layer: "show", "dim" (previews stand out on it) or "hide" (a panel covers it)


def natural_key(text) -> list:
    """Sort key that orders '2' before '10' and 'L2/3' before 'L10'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(text))]


def _hex_rgba(colors) -> np.ndarray:
    from matplotlib.colors import to_rgba

    return np.array([to_rgba(c) for c in colors], np.float32).reshape(-1, 4)


def categorical_colors(values, named: dict | None = None) -> tuple[np.ndarray, list]:
    """(per-cell RGBA, legend [(label, rgba, count)] in natural order) of categorical `values`;
    `named` {label: colour} first, then the palette; unknown labels ("Excluded", NaN...) grey."""
    from .layers import is_unknown_label, stable_palette

    s = pd.Series(values).astype(object)
    missing = s.isna().to_numpy()
    text = s.astype(str).to_numpy()
    labels = sorted(map(str, pd.unique(text[~missing])), key=natural_key)  # per distinct label, not per cell
    known = [lab for lab in labels if not is_unknown_label(lab)]
    named = {str(k): v for k, v in (named or {}).items()}
    free = iter(stable_palette(len(known) + len(named) + 1))
    used = {named[k].lower() if isinstance(named.get(k), str) else None for k in named}
    table = {}
    for lab in known:
        if lab in named:
            table[lab] = _hex_rgba([named[lab]])[0]
            continue
        c = next(free)
        while c.lower() in used:
            c = next(free)
        table[lab] = _hex_rgba([c])[0]
    for lab in labels:
        table.setdefault(lab, UNKNOWN_RGBA)
    lut = np.stack([table[lab] for lab in labels]) if labels else np.zeros((0, 4), np.float32)
    codes = pd.Categorical(text, categories=labels).codes
    rgba = np.where(((codes >= 0) & ~missing)[:, None], lut[np.maximum(codes, 0)] if len(lut) else UNKNOWN_RGBA,
                    UNKNOWN_RGBA).astype(np.float32)
    counts = pd.Series(text[~missing]).value_counts()
    legend = [(lab, table[lab], int(counts.get(lab, 0))) for lab in labels]
    return rgba, legend


def matched_names(pred, reference, reference_names: dict | None = None) -> dict[str, str]:
    """{predicted domain: reference class} by the best one-to-one matching of their overlap
    (Hungarian); unlabelled reference cells are ignored."""
    from scipy.optimize import linear_sum_assignment

    from .layers import is_unknown_label

    p = pd.Series(pred).astype(str).to_numpy()
    r = pd.Series(reference).astype(object)
    text = r.astype(str).to_numpy()
    names, inverse = np.unique(text, return_inverse=True)  # each distinct label checked once
    unknown = np.array([is_unknown_label(v) for v in names], bool)
    ok = ~r.isna().to_numpy() & ~unknown[inverse.ravel()]
    if not ok.any():
        return {}
    table = pd.crosstab(p[ok], text[ok])
    rows, cols = linear_sum_assignment(-table.to_numpy())
    return {str(table.index[i]): str(table.columns[j]) for i, j in zip(rows, cols)}


def domain_colors(result, reference_key: str | None) -> dict[str, str] | None:
    """Colours of a result's domains matched to the reference classes' colours, when there are any."""
    from .layers import category_colors

    adata = result.adata
    if not reference_key or reference_key not in adata.obs.columns:
        return None
    ref_colors = category_colors(adata, reference_key)
    pairs = matched_names(result.categories("domains"), adata.obs[reference_key])
    return {dom: ref_colors[ref] for dom, ref in pairs.items() if ref in ref_colors}


def robust_limits(values: np.ndarray) -> tuple[float, float]:
    from .layers import robust_limits as _limits

    return _limits(values)


def continuous_colors(values: np.ndarray, cmap: str, limits: tuple[float, float] | None = None):
    """(RGBA per value, (lo, hi)); NaN (no value) dark grey."""
    from matplotlib import colormaps

    v = np.asarray(values, np.float64)
    lo, hi = limits or robust_limits(v)
    rgba = colormaps[cmap](np.clip((np.nan_to_num(v, nan=lo) - lo) / max(hi - lo, 1e-12), 0, 1)).astype(np.float32)
    rgba[~np.isfinite(v)] = MISSING_RGBA
    return rgba, (lo, hi)


def points_spec(key: str, name: str, positions: np.ndarray, rgba: np.ndarray, size: float, rows: np.ndarray, *,
                role: str = "result", method: str | None = None, extra: dict | None = None,
                border: np.ndarray | None = None, border_width: np.ndarray | float = 0.0,
                translate: tuple[float, float] = (0.0, 0.0)) -> LayerSpec:
    """A Points layer over cells `rows` (their indices in the slide) with explicit colours."""
    feats = pd.DataFrame({"cell_index": np.asarray(rows, np.int64), **(extra or {})})
    style = {"face_color": rgba, "border_color": rgba if border is None else border, "border_width": border_width,
             "border_width_is_relative": True, "size": float(size), "translate": translate, "opacity": 1.0}
    meta = {"spatialssl_role": role, "spatialssl_result": method}
    return LayerSpec(key, "points", name, np.asarray(positions, np.float64), style, feats, meta, role)


def result_layer(slide, result, what: str, gene: str | None = None, *, reference_key: str | None = None) -> Display:
    """The one result layer of a method, showing `what`: 'domains', 'cell types', 'embedding',
    'error' or 'reconstruction' (of `gene`)."""
    from .overlays import pca_rgb, per_cell_error

    rows = slide.shown
    pos = slide.positions[rows]
    m = result.method
    legend = colorbar = None
    border, bw = None, 0.0
    extra: dict = {}
    if what in ("domains", "cell types"):
        values = result.categories(what).to_numpy()
        named = None
        if what == "domains":
            named = domain_colors(result, reference_key)
        elif reference_key and reference_key in result.adata.obs.columns:
            from .layers import category_colors

            named = category_colors(result.adata, reference_key)
        rgba, legend_items = categorical_colors(values[rows], named)
        n = len([1 for _, _, c in legend_items if c])
        title = f"{m} {what}" + (f" (coloured as the matching '{reference_key}' class)" if named and what == "domains"
                                 else "")
        legend = (title, legend_items)
        label = f"{m} {'domains' if what == 'domains' else 'cell types'} ({n})"
        extra[what] = pd.Categorical(values[rows].astype(str))
    elif what == "embedding":
        rgba = pca_rgb(result.embedding())[rows]
        label = f"{m} embedding (PCs 1-3 as RGB)"
    elif what == "error":
        data = getattr(result.trained, "data", None)
        if data is None or not result.has("reconstruction"):
            raise SpatialDataError(f"{m}: per-cell error needs the model's input, which only a run of this session "
                                   "holds; train the method (or load its model) first.")
        cols = data.gene_index if data.gene_index is not None else None
        err = per_cell_error(result.adata.layers[f"{m}_reconstruction"], data.X, cols)
        kept = result.kept_reconstruction()
        if kept is not None:
            err[~kept] = np.nan
        rgba, lim = continuous_colors(err[rows], "viridis")
        colorbar = ("viridis", *lim, "reconstruction MSE per cell (model space)")
        label = f"{m} error per cell"
        extra["reconstruction MSE"] = err[rows]
    elif what == "reconstruction":
        if not gene:
            raise SpatialDataError("choose a gene to show its reconstruction.")
        values = result.reconstruction(gene)
        rgba, lim = continuous_colors(values[rows], "magma")
        colorbar = ("magma", *lim, f"{gene} reconstructed (model space)")
        label = f"{m} {gene} reconstructed"
        masked = result.masked()
        if masked is not None and masked.any():
            border = np.where(masked[rows, None], RING, rgba)
            bw = np.where(masked[rows], RING_WIDTH, 0.0)
            label += f" ({int(masked.sum()):,} masked ringed)"
        extra[f"{gene} reconstructed"] = values[rows]
    else:
        raise SpatialDataError(f"unknown result view {what!r}.")
    spec = points_spec(f"result:{m}", label, pos, rgba, slide.point_size, rows, method=m, extra=extra,
                       border=border, border_width=bw)
    return Display([spec], top=spec.key, legend=legend, colorbar=colorbar, text=label)


def panel_offsets(positions: np.ndarray, n: int) -> list[tuple[float, float]]:
    """Translations that put `n` copies of the tissue side by side along the columns."""
    width = float(np.ptp(positions[:, 1])) if len(positions) else 1.0
    return [(0.0, i * width * (1.0 + PANEL_GAP)) for i in range(n)]


def label_spec(key: str, texts: list[str], anchors: np.ndarray, role: str) -> LayerSpec:
    """Panel titles: invisible points carrying text, above each panel."""
    feats = pd.DataFrame({"title": texts})
    style = {"size": 0.0, "text": {"string": "{title}", "color": "white", "size": 11, "anchor": "lower_left"},
             "face_color": np.zeros((len(texts), 4), np.float32), "border_width": 0.0}
    return LayerSpec(key, "points", f"{role} titles", np.asarray(anchors, np.float64), style, feats,
                     {"spatialssl_role": role}, role)


def _panels_spec(key: str, name: str, parts: list, size: float, role: str, method: str | None) -> LayerSpec:
    """One Points layer holding several panels: parts = [(positions, rgba, rows, border, border_width, panel)]."""
    pos = np.concatenate([p[0] for p in parts])
    rgba = np.concatenate([p[1] for p in parts])
    rows = np.concatenate([p[2] for p in parts])
    border = np.concatenate([p[3] for p in parts])
    width = np.concatenate([np.broadcast_to(np.asarray(p[4], np.float32), (len(p[0]),)) for p in parts])
    panel = np.concatenate([np.full(len(p[0]), p[5], dtype=object) for p in parts])
    return points_spec(key, name, pos, rgba, size, rows, role=role, method=method,
                       extra={"panel": pd.Categorical(panel)}, border=border, border_width=width)


def compare_layers(slide, results: list, gene: str, measured: np.ndarray) -> Display:
    """The measured expression of `gene` beside each method's reconstruction of it, on one colour
    scale, in one layer: masked cells ringed (gnn-mask), masked genes / regions said in the titles."""
    rows = slide.shown
    pos = slide.positions[rows]
    panels = [("measured", measured)] + [(r.method, r.reconstruction(gene)) for r in results]
    finite = np.concatenate([np.asarray(v)[rows][np.isfinite(np.asarray(v)[rows])] for _, v in panels])
    lim = robust_limits(finite)
    offsets = panel_offsets(pos, len(panels))
    parts, titles = [], []
    for i, ((what, values), off) in enumerate(zip(panels, offsets)):
        rgba, _ = continuous_colors(np.asarray(values)[rows], "magma", lim)
        border, bw, note = rgba, np.zeros(len(rows), np.float32), ""
        res = results[i - 1] if i else None
        if res is not None:
            masked = res.masked()
            if masked is not None and masked.any():
                border = np.where(masked[rows, None], RING, rgba)
                bw, note = np.where(masked[rows], RING_WIDTH, 0.0).astype(np.float32), ", masked ringed"
            elif res.method == "spotscape":
                hidden = res.eval_masked_genes()
                note = (", a masked gene" if gene in hidden else ", not masked") if hidden else ""
            elif res.method == "patch-mae":
                note = ", from neighbours only"
        titles.append(f"{gene} measured" if not i else f"{what}{note}")
        parts.append((pos + np.array(off), rgba, rows, border, bw, titles[-1]))
    spec = _panels_spec("compare:panels", f"{gene}: measured | " + " | ".join(r.method for r in results), parts,
                        slide.point_size, "compare", None)
    top_left = np.array([pos[:, 0].min(), pos[:, 1].min()])
    anchors = np.array([top_left + np.array(off) for off in offsets]) - [0.02 * np.ptp(pos[:, 0]), 0]
    return Display([spec, label_spec("compare:titles", titles, anchors, "compare")], top="compare:panels", slide="hide",
                   colorbar=("magma", *lim, f"{gene} (model space)"),
                   text=f"{gene}: measured, then each method's reconstruction, side by side on one colour scale.")


def region_layers(slide, report, gene: str, polygon: np.ndarray, measured_all: np.ndarray) -> Display:
    """Measured, model and baselines for `gene` in a hidden region: four enlarged panels of the region's
    surroundings beside the tissue (outside: measured; inside: each prediction; hidden cells outlined),
    one colour scale, in one layer; the region outlined on the tissue."""
    values = report.gene(gene)
    cells = report.cells
    pos_all = slide.positions
    lo, hi = pos_all[cells].min(0), pos_all[cells].max(0)
    pad = 0.6 * np.maximum(hi - lo, 1e-9)
    near = np.flatnonzero(((pos_all >= lo - pad) & (pos_all <= hi + pad)).all(1))
    inside = np.zeros(len(pos_all), bool)
    inside[cells] = True
    order = ["measured", "model", "neighbour mean", "interpolation"]
    lim = robust_limits(np.concatenate([values[k] for k in order] + [np.asarray(measured_all)[near]]))
    box_lo, box = pos_all[near].min(0), np.ptp(pos_all[near], axis=0)
    tissue_lo, tissue = pos_all.min(0), np.ptp(pos_all, axis=0)
    scale = 0.45 * tissue[0] / max(float(box.max()), 1e-9)  # each panel about half the tissue's height
    step = box * scale * np.array([1.3, 1 + PANEL_GAP])  # rows leave room for the titles
    origin = np.array([tissue_lo[0], tissue_lo[1] + tissue[1] * (1 + PANEL_GAP)])
    row = report.per_gene.set_index("gene").loc[gene]
    parts, titles, anchors = [], [], []
    for i, what in enumerate(order):
        v = np.asarray(measured_all, np.float32).copy()
        v[cells] = values[what]
        rgba, _ = continuous_colors(v[near], "magma", lim)
        corner = origin + np.array([(i // 2) * step[0], (i % 2) * step[1]])
        pos = (pos_all[near] - box_lo) * scale + corner
        border = np.where(inside[near, None], RING, rgba)
        bw = np.where(inside[near], RING_WIDTH, 0.0).astype(np.float32)
        titles.append(what if what == "measured" else f"{what}\nMSE {row[f'{what} mse']:.3g}, r {row[f'{what} r']:.2f}")
        parts.append((pos, rgba, near, border, bw, what))
        anchors.append(corner - [0.05 * tissue[0], 0])
    spec = _panels_spec("region:panels", f"region: {gene} measured | model | baselines", parts,
                        slide.point_size * scale, "region", report.method)
    outline = LayerSpec("region:outline", "shapes", "region hidden from the model", [np.asarray(polygon)],
                        {"shape_type": "polygon", "edge_color": "white", "face_color": "transparent",
                         "edge_width": max(float(slide.point_size) * 0.3, 1e-6)}, None,
                        {"spatialssl_role": "region"}, "region")
    s = report.summary()
    text = (f"{report.method}: {s['cells']:,} cells hidden; MSE model {s['model']['mse']:.3g}, neighbour mean "
            f"{s['neighbour mean']['mse']:.3g}, interpolation {s['interpolation']['mse']:.3g} (all genes, model space).")
    return Display([spec, label_spec("region:titles", titles, np.array(anchors), "region"), outline],
                   top="region:panels", hide_roles=("compare", "region"), colorbar=("magma", *lim, gene), text=text)
