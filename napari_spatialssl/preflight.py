"""Checks of a method's view of a slide before any training, shared by the CLI, the pipeline and the widget.

:func:`geometry_dataset` reads only what a view needs (coordinates, sections, labels; no
expression), so the checks are cheap at atlas scale. :func:`check_view` describes the view in
words and numbers and finds what would make training pointless or impossible:

- graph views: the radius and how it was chosen, in the slide's units beside its typical spacing;
  the mean degree and the share of isolated cells, estimated on a sample of cells (exact for
  slides up to the sample size); a warning above ``ISOLATED_WARNING`` (30 %) isolated cells, an
  error when every sampled cell is isolated; the hops one output depends on;
- patch views: the bin side, each section's size in bins, and an error when the patch is larger
  than every section.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .data.dataset import SpatialDataset
from .data.io import SpatialDataError, get_coordinates, label_codes, resolve_section_key, section_codes

ISOLATED_WARNING = 0.30
SAMPLE_CELLS = 20_000


@dataclass
class ViewReport:
    """What a method's view of a slide looks like, and what is wrong with it."""

    method: str
    kind: str  # "graph" | "patches"
    facts: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def raise_errors(self) -> None:
        if self.errors:
            raise SpatialDataError(self.errors[0])

    def summary(self) -> str:
        """One or two sentences for a person (the widget's View panel, the CLI)."""
        f = self.facts
        if self.kind == "graph" and f.get("graph") == "given":
            text = (f"the slide's own squidpy graph: {f['mean_degree']:.1f} neighbours per cell, "
                    f"{100 * f['isolated_fraction']:.0f}% isolated; one cell's output depends on its "
                    f"{f['hops']}-hop ego-net.")
        elif self.kind == "graph":
            text = (f"{f['graph']} graph, radius {f['radius']:.3g} slide units ({f['radius_rule']}; cells are "
                    f"{f['spacing']:.3g} apart at the median): about {f['mean_degree']:.1f} neighbours per cell, "
                    f"{100 * f['isolated_fraction']:.0f}% isolated; one cell's output depends on its "
                    f"{f['hops']}-hop ego-net.")
        else:
            text = (f"patches of {f['patch'][0]} x {f['patch'][1]} bins of {f['bin_size']:.3g} slide units (cells are "
                    f"{f['spacing']:.3g} apart at the median); sections of {f['section_bins']} bins.")
        return text


def geometry_dataset(adata, config, name: str = "AnnData") -> SpatialDataset:
    """A SpatialDataset with the slide's coordinates, sections and labels and no expression (a
    zero-column matrix): enough for views, masks and these checks, at any scale."""
    from .models.base import data_config_of

    dc = data_config_of(config)
    coords = get_coordinates(adata, spatial_key=dc.spatial_key, coord_columns=dc.coord_columns, name=name)
    skey = resolve_section_key(adata, dc.section_key, name=name)
    section, names = section_codes(adata, skey, name=name)
    labels = label_names = None
    if dc.label_key:
        labels, label_names = label_codes(adata, dc.label_key, dc.ignore_labels, name=name)
    return SpatialDataset(coords=coords, X=sp.csr_matrix((len(coords), 0), dtype=np.float32),
                          gene_names=np.zeros(0, str), section=section, section_names=names, labels=labels,
                          label_names=label_names, section_key=skey, label_key=dc.label_key,
                          obs_names=np.asarray(adata.obs_names).astype(str))


def sampled_degrees(coords: np.ndarray, section: np.ndarray, radius: float, k_max: int | None = None,
                    n_sample: int = SAMPLE_CELLS, seed: int = 0) -> np.ndarray:
    """Degrees (neighbours within `radius` in the same section, at most `k_max`) of up to
    `n_sample` random cells per section: an unbiased sample of the graph's degree distribution."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    out = []
    for s in np.unique(section):
        idx = np.flatnonzero(section == s)
        if len(idx) < 2:
            out.append(np.zeros(len(idx), np.int64))
            continue
        probe = idx if len(idx) <= n_sample else idx[rng.choice(len(idx), n_sample, replace=False)]
        tree = cKDTree(coords[idx])
        deg = np.asarray(tree.query_ball_point(coords[probe], r=radius, return_length=True), np.int64) - 1
        out.append(np.minimum(deg, k_max) if k_max is not None else deg)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def check_view(method_name: str, config, geometry: SpatialDataset) -> ViewReport:
    """The view `method_name` with `config` would build on the slide, checked (see the module docstring)."""
    from .graphs.spacing import neighbour_distance
    from .models.base import get_method_class

    method = get_method_class(method_name)(config)
    spacing = neighbour_distance(geometry.coords, geometry.section, k=1)
    report = ViewReport(method_name, method.view_kind, {"spacing": spacing})
    if method.view_kind == "graph" and getattr(geometry, "spatial_graph", None) is not None:
        g = geometry.spatial_graph.summary()  # the user's own graph: exact figures
        report.facts.update(graph="given", radius=float("nan"), radius_rule="the slide's squidpy graph",
                            mean_degree=g["mean_degree"], isolated_fraction=g["isolated_fraction"],
                            hops=method.view_hops(), sampled_cells=g["n_cells"])
        if g["isolated_fraction"] > ISOLATED_WARNING:
            report.warnings.append(f"{method_name}: {100 * g['isolated_fraction']:.0f}% of cells have no neighbour in "
                                   "the slide's squidpy graph; rebuild it, or --set data.graph=build.")
    elif method.view_kind == "graph":
        radius, rule = method.graph_radius(geometry)
        k_max = getattr(config, "k_neighbors", None)
        deg = sampled_degrees(geometry.coords, geometry.section, radius, k_max, seed=config.seed)
        iso = float((deg == 0).mean()) if deg.size else 1.0
        report.facts.update(graph="nearest-neighbour" if k_max else "radius", radius=float(radius), radius_rule=rule,
                            mean_degree=float(deg.mean()) if deg.size else 0.0, isolated_fraction=iso,
                            hops=method.view_hops(), sampled_cells=int(deg.size))
        advice = (f"use a radius of about {2.5 * spacing:.3g} or more (--set radius=...), or leave radius empty "
                  "for the spacing rule")
        if iso >= 1.0:
            report.errors.append(f"{method_name}: radius {radius:.3g} isolates every cell (cells are {spacing:.3g} "
                                 f"apart at the median in this slide's units): {advice}.")
        elif iso > ISOLATED_WARNING:
            report.warnings.append(
                f"{method_name}: {100 * iso:.0f}% of cells have no neighbour within radius {radius:.3g} (slide units; "
                f"cells are {spacing:.3g} apart at the median), so the model sees no context for them: {advice}.")
        if getattr(config, "graph_mode", None) == "egonet" and getattr(config, "num_hops", None) is not None \
                and int(config.num_hops) < len(getattr(config, "hidden_dims", [])):
            report.warnings.append(f"{method_name}: ego-nets of {config.num_hops} hop(s) for a {len(config.hidden_dims)}"
                                   "-layer network: outputs differ from whole-graph ones (set num_hops empty for exact).")
    else:
        bin_size = method.bin_size_for(geometry)
        h, w = method.patch_shape()
        sizes = []
        for s in range(geometry.n_sections):
            xy = geometry.coords[geometry.section == s]
            if len(xy):
                ext = (xy.max(0) - xy.min(0)) / float(bin_size) + 1
                sizes.append((int(ext[1]), int(ext[0])))  # rows (y), cols (x)
        report.facts.update(bin_size=float(bin_size), patch=(h, w),
                            section_bins=", ".join(f"{r} x {c}" for r, c in sizes[:6]) + (" ..." if len(sizes) > 6 else ""))
        small = [geometry.section_names[i] for i, (r, c) in enumerate(sizes) if r < h or c < w]
        if sizes and len(small) == len(sizes):
            big = max(sizes, key=lambda t: t[0] * t[1])
            report.errors.append(f"{method_name}: a patch of {h} x {w} bins is larger than every section (the largest "
                                 f"is {big[0]} x {big[1]} bins of {bin_size:.3g} units); lower patch_size or bin_size.")
        elif small:
            report.warnings.append(f"{method_name}: sections {small[:5]} are smaller than one {h} x {w} patch and "
                                   "cannot be embedded; lower patch_size or bin_size to include them.")
    return report
