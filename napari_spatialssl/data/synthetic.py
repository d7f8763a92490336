"""Synthetic slides with the shape of the whole mouse brain MERFISH atlas, for scale tests and benchmarks.

The atlas (4.3 million cells, 550 genes, 59 coronal sections) cannot be downloaded here, so this
module draws slides of the same shape:

- **Sections**: each is an ellipse of tissue (coordinates in micrometres, centred on 0) whose
  size swells towards the middle sections, as coronal brain sections do; cells are spread over
  it at ``density`` cells per mm^2 (default 3000, a bit denser than the MERFISH hypothalamus
  slides in ../shared/data, ~1,700 / mm^2), modulated by domain (x0.6 to x1.4) so that a 20 um
  radius gives a few neighbours (about 3-5 on average) as in real MERFISH tissue.
- **Domains**: spatially coherent regions (a warped Voronoi partition of the section whose seeds
  drift smoothly from one section to the next, like anatomy through adjacent slices).
- **Cell types**: each domain has its own mixture over cell types (a sparse Dirichlet draw), so
  types are spatially coherent and domain-specific.
- **Expression**: counts ~ Poisson(library size x type profile x domain effect), with marker
  genes per type. Expression is generated lazily, in row chunks seeded by (seed, chunk), as CSR:
  the 4.3M x 550 atlas never needs a dense matrix (~10 GB). The radius-graph benchmark needs only
  :func:`synthetic_coords`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .io import SpatialDataError

ATLAS_N_CELLS = 4_300_000
ATLAS_N_GENES = 550
ATLAS_N_SECTIONS = 59
DEFAULT_DENSITY = 3000.0  # cells per mm^2
_CHUNK = 4096  # rows per expression chunk (also the unit of the chunk seeds)


def _section_sizes(n_cells: int, n_sections: int, density: float, seed: int):
    """Cells per section and each section's semi-axes (a, b) in micrometres."""
    s = np.arange(n_sections)
    swell = 0.6 + 0.4 * np.sin(np.pi * (s + 0.5) / n_sections)  # bigger sections in the middle
    share = swell**2 / (swell**2).sum()
    counts = np.floor(share * n_cells).astype(np.int64)
    counts[np.argsort(-(share * n_cells - counts))[: n_cells - counts.sum()]] += 1
    # Ellipse area = n / density (mm^2) with aspect 1.4 (width / height).
    area_um2 = counts / density * 1e6
    b = np.sqrt(area_um2 / (np.pi * 1.4))
    return counts, np.stack([1.4 * b, b], axis=1)


def _domain_field(xy: np.ndarray, axes: np.ndarray, section_frac: float, n_domains: int, seed: int):
    """Domain code of points `xy` (n, 2) of one section: warped Voronoi of drifting seeds."""
    rng = np.random.default_rng([seed, 7919])
    base = rng.uniform(-0.85, 0.85, size=(n_domains, 2))
    drift = rng.normal(0, 0.25, size=(n_domains, 2))
    seeds = (base + drift * (section_frac - 0.5)) * axes
    phase = rng.uniform(0, 2 * np.pi, size=2)
    wavelength = axes.mean() / 1.5
    warped = np.empty_like(xy)
    warped[:, 0] = xy[:, 0] + 0.12 * axes[0] * np.sin(xy[:, 1] / wavelength + phase[0])
    warped[:, 1] = xy[:, 1] + 0.12 * axes[1] * np.sin(xy[:, 0] / wavelength + phase[1])
    d2 = ((warped[:, None, :] - seeds[None, :, :]) ** 2).sum(-1)
    return d2.argmin(1).astype(np.int32)


def _domain_density(n_domains: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 104729]).uniform(0.6, 1.4, size=n_domains)


def _section_points(n: int, axes: np.ndarray, rng, accept_domain, max_density: float):
    """n points in the ellipse, thinned by the domain's relative density (rejection, vectorised)."""
    out = []
    got = 0
    while got < n:
        m = int((n - got) * 1.5 / 0.785 * max_density) + 64
        p = rng.uniform(-1, 1, size=(m, 2))
        p = p[(p**2).sum(1) <= 1.0] * axes
        keep = rng.random(len(p)) * max_density <= accept_domain(p)
        p = p[keep][: n - got]
        out.append(p)
        got += len(p)
    return np.concatenate(out)


def synthetic_coords(n_cells: int = ATLAS_N_CELLS, n_sections: int = ATLAS_N_SECTIONS, *,
                     density: float = DEFAULT_DENSITY, n_domains: int = 12, seed: int = 0,
                     return_domains: bool = False):
    """Coordinates (n_cells, 2) float64 in micrometres and section codes (n_cells,) int32.

    Cells are grouped by section (section 0 first). With ``return_domains`` also returns the
    (n_cells,) int32 spatial domain of each cell.
    """
    if n_cells < 1 or n_sections < 1 or n_cells < n_sections:
        raise SpatialDataError(
            f"need n_cells >= n_sections >= 1, got n_cells={n_cells}, n_sections={n_sections}."
        )
    if not density > 0:
        raise SpatialDataError(f"density (cells per mm^2) must be positive, got {density}.")
    counts, axes = _section_sizes(n_cells, n_sections, density, seed)
    rel = _domain_density(n_domains, seed)
    coords = np.empty((n_cells, 2), dtype=np.float64)
    domains = np.empty(n_cells, dtype=np.int32)
    section = np.repeat(np.arange(n_sections, dtype=np.int32), counts)
    start = 0
    for s in range(n_sections):
        rng = np.random.default_rng([seed, s])
        frac = s / max(n_sections - 1, 1)
        # Area density is renormalised so the section's mean density stays `density`.
        field = lambda p, a=axes[s], f=frac: rel[_domain_field(p, a, f, n_domains, seed)]  # noqa: E731
        pts = _section_points(int(counts[s]), axes[s], rng, field, rel.max())
        coords[start:start + len(pts)] = pts
        domains[start:start + len(pts)] = _domain_field(pts, axes[s], frac, n_domains, seed)
        start += len(pts)
    if return_domains:
        return coords, section, domains
    return coords, section


@dataclass
class SyntheticAtlas:
    """A synthetic slide: geometry, domains and cell types in memory; expression made on demand.

    coords (n, 2) float64 micrometres; section (n,) int32; domain (n,) int32; cell_type (n,) int32;
    ``expression(start, stop)`` gives rows [start, stop) of the counts as CSR float32, identical
    on every call (chunks seeded by (seed, chunk index)).
    """

    coords: np.ndarray
    section: np.ndarray
    domain: np.ndarray
    cell_type: np.ndarray
    n_genes: int
    type_profiles: np.ndarray  # (n_cell_types, n_genes) relative expression (rows sum to 1)
    domain_effect: np.ndarray  # (n_domains, n_genes) multiplicative effect
    library_size: float
    seed: int

    @property
    def n_cells(self) -> int:
        return int(self.coords.shape[0])

    def _chunk(self, c: int) -> sp.csr_matrix:
        lo, hi = c * _CHUNK, min((c + 1) * _CHUNK, self.n_cells)
        rng = np.random.default_rng([self.seed, 31337, c])
        rate = self.type_profiles[self.cell_type[lo:hi]] * self.domain_effect[self.domain[lo:hi]]
        rate /= rate.sum(1, keepdims=True)
        lib = self.library_size * rng.lognormal(0.0, 0.35, size=(hi - lo, 1))
        counts = rng.poisson(rate * lib).astype(np.float32)
        return sp.csr_matrix(counts)

    def expression(self, start: int = 0, stop: int | None = None) -> sp.csr_matrix:
        """Counts of cells [start, stop) as a (stop - start, n_genes) CSR float32 matrix."""
        stop = self.n_cells if stop is None else min(int(stop), self.n_cells)
        start = int(start)
        if start < 0 or start > stop:
            raise SpatialDataError(f"expression rows must satisfy 0 <= start <= stop, got {start}, {stop}.")
        if start == stop:
            return sp.csr_matrix((0, self.n_genes), dtype=np.float32)
        blocks = [self._chunk(c) for c in range(start // _CHUNK, (stop - 1) // _CHUNK + 1)]
        X = sp.vstack(blocks, format="csr") if len(blocks) > 1 else blocks[0]
        off = start - (start // _CHUNK) * _CHUNK
        return X[off:off + (stop - start)]

    def to_anndata(self, *, n_cell_types: int | None = None):
        """AnnData with X = CSR counts, obsm['spatial'] (x, y um), obs section / domain / cell_type."""
        import anndata as ad
        import pandas as pd

        X = self.expression()
        n_types = n_cell_types or self.type_profiles.shape[0]
        obs = pd.DataFrame(
            {
                "section": pd.Categorical([f"section_{s:02d}" for s in self.section]),
                "domain": pd.Categorical([f"domain_{d}" for d in self.domain]),
                "cell_type": pd.Categorical(
                    [f"type_{t}" for t in self.cell_type], categories=[f"type_{t}" for t in range(n_types)]
                ),
            },
            index=[f"cell_{i}" for i in range(self.n_cells)],
        )
        adata = ad.AnnData(X=X, obs=obs)
        adata.var_names = [f"gene_{g:03d}" for g in range(self.n_genes)]
        adata.obsm["spatial"] = self.coords.astype(np.float64)
        adata.uns["synthetic"] = {"seed": int(self.seed), "library_size": float(self.library_size)}
        return adata


def synthetic_atlas(n_cells: int = ATLAS_N_CELLS, n_genes: int = ATLAS_N_GENES,
                    n_sections: int = ATLAS_N_SECTIONS, n_cell_types: int = 30, *, n_domains: int = 12,
                    density: float = DEFAULT_DENSITY, library_size: float = 300.0,
                    seed: int = 0) -> SyntheticAtlas:
    """A :class:`SyntheticAtlas` of the given shape (defaults: the whole-brain MERFISH atlas).

    Memory is O(n_cells) (coordinates and codes); expression is drawn lazily per row chunk.
    """
    if n_genes < 1 or n_cell_types < 1 or n_domains < 1:
        raise SpatialDataError(
            f"n_genes, n_cell_types and n_domains must be >= 1, got {n_genes}, {n_cell_types}, {n_domains}."
        )
    coords, section, domain = synthetic_coords(n_cells, n_sections, density=density, n_domains=n_domains,
                                               seed=seed, return_domains=True)
    rng = np.random.default_rng([seed, 271828])
    # Each domain favours a few cell types: sparse Dirichlet mixtures.
    mix = rng.dirichlet(np.full(n_cell_types, 0.25), size=n_domains)
    u = rng.random(n_cells)
    cdf = np.cumsum(mix, axis=1)
    cdf[:, -1] = 1.0
    cell_type = (u[:, None] > cdf[domain]).sum(1).astype(np.int32)
    del u, cdf
    # Type profiles: a shared background plus marker genes boosted per type.
    background = rng.gamma(0.6, 1.0, size=n_genes) + 1e-3
    profiles = np.tile(background, (n_cell_types, 1)) * rng.lognormal(0.0, 0.5, size=(n_cell_types, n_genes))
    n_markers = max(1, min(n_genes, 2 * n_genes // max(n_cell_types, 1)))
    for t in range(n_cell_types):  # loop over types (tens), not cells
        markers = rng.choice(n_genes, size=n_markers, replace=False)
        profiles[t, markers] *= rng.uniform(5, 15, size=n_markers)
    profiles /= profiles.sum(1, keepdims=True)
    domain_effect = rng.lognormal(0.0, 0.3, size=(n_domains, n_genes))
    return SyntheticAtlas(coords, section, domain, cell_type, int(n_genes), profiles, domain_effect,
                          float(library_size), int(seed))


def synthetic_slide(n_cells: int = 20000, n_genes: int = 550, n_sections: int = 2, n_cell_types: int = 12, *,
                    n_domains: int = 6, density: float = DEFAULT_DENSITY, library_size: float = 300.0,
                    seed: int = 0):
    """A small synthetic slide as AnnData (X = CSR raw counts, obsm['spatial'] in micrometres,
    obs 'section', 'domain', 'cell_type' categoricals). For sizes that fit in memory as CSR."""
    atlas = synthetic_atlas(n_cells, n_genes, n_sections, n_cell_types, n_domains=n_domains, density=density,
                            library_size=library_size, seed=seed)
    return atlas.to_anndata()
