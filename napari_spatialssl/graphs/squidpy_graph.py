"""A run's spatial graph under squidpy's keys, and a squidpy graph read back as a :class:`CellGraph`.

squidpy (``squidpy.gr.spatial_neighbors`` and its ``*_knn`` / ``*_radius`` / ``*_delaunay`` variants)
keeps a spatial graph in three places, named after its ``key_added`` (default ``"spatial"``):

- ``obsp['spatial_connectivities']``: (n_cells, n_cells) CSR adjacency, 1.0 per edge;
- ``obsp['spatial_distances']``: (n_cells, n_cells) CSR of the edge lengths, in the coordinates' units;
- ``uns['spatial_neighbors']``: ``{'connectivities_key': 'spatial_connectivities',
  'distances_key': 'spatial_distances', 'params': {'coord_type': 'generic', 'n_neighbors': k | 'radius': r,
  'transform': None}}``.

squidpy's graph functions (``nhood_enrichment``, ``co_occurrence`` via coordinates, ``spatial_autocorr``,
``centrality_scores``, ``interaction_matrix``, ...) read ``obsp[connectivity_key + '_connectivities']``.
Writing our graph there lets them run on our results; reading theirs lets a method train on the graph a
user already built. Our graphs stay symmetric, per section and without self loops (see
:mod:`.neighbors`), so a graph read back is made so: squidpy's k-NN graphs are directed (row i lists i's
k neighbours) and may hold the diagonal, and a graph built without ``library_key`` may cross sections.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..data.io import SpatialDataError
from .neighbors import CellGraph, knn_graph

SQUIDPY_KEY = "spatial"
# squidpy's default k for generic coordinates; used when a method has no cell graph of its own (patch-mae).
SQUIDPY_DEFAULT_K = 6
WRITTEN_BY = "spatialssl"  # uns['spatial_neighbors'][WRITTEN_BY]: the graph's kind and parameters


def squidpy_keys(key_added: str = SQUIDPY_KEY) -> tuple[str, str, str]:
    """(connectivities obsp key, distances obsp key, uns key) for squidpy's ``key_added``."""
    if not key_added:
        raise SpatialDataError("key_added must be a non-empty string (squidpy's default is 'spatial').")

    def suffixed(suffix: str) -> str:
        return key_added if key_added.endswith(f"_{suffix}") else f"{key_added}_{suffix}"

    return suffixed("connectivities"), suffixed("distances"), f"{key_added}_neighbors"


def squidpy_params(graph: CellGraph) -> dict:
    """``uns[...]['params']`` as squidpy writes it for a graph of this kind."""
    params: dict = {"coord_type": "generic", "transform": None}
    p = graph.params
    if graph.kind == "radius" and "radius" in p:
        params["radius"] = float(p["radius"])
    if "k" in p:
        params["n_neighbors"] = int(p["k"])
    if "max_distance" in p:  # an SNN / k-NN graph cut at a distance: both apply
        params["radius"] = float(p["max_distance"])
    if graph.kind == "squidpy":  # read back from squidpy: keep what it said
        for key in ("n_neighbors", "radius", "coord_type", "transform"):
            if key in p:
                params[key] = p[key]
    return params


def _csr(graph: CellGraph, data: np.ndarray) -> sp.csr_matrix:
    n = graph.n_nodes
    index_dtype = np.int32 if graph.n_edges < np.iinfo(np.int32).max and n < np.iinfo(np.int32).max else np.int64
    A = sp.csr_matrix((data, graph.indices.astype(index_dtype, copy=True), graph.indptr.astype(index_dtype)),
                      shape=(n, n))
    A.has_sorted_indices = True
    return A


def write_squidpy_graph(adata, graph: CellGraph, *, key_added: str = SQUIDPY_KEY) -> dict:
    """Store `graph` in `adata` (in place) under squidpy's keys; returns the ``uns`` entry written.

    The connectivities are 1.0 per edge (float32), the distances the edge lengths (float32, coordinates'
    units). Each matrix gets its own index arrays, so editing one never changes the other or `graph`.
    """
    if not isinstance(graph, CellGraph):
        raise TypeError(f"graph must be a CellGraph, got {type(graph).__name__}")
    if graph.n_nodes != adata.n_obs:
        raise SpatialDataError(
            f"the graph has {graph.n_nodes} cells but the AnnData has {adata.n_obs}; write the graph of this slide."
        )
    conn_key, dist_key, uns_key = squidpy_keys(key_added)
    adata.obsp[conn_key] = _csr(graph, np.ones(graph.n_edges, dtype=np.float32))
    adata.obsp[dist_key] = _csr(graph, np.asarray(graph.distances, dtype=np.float32).copy())
    entry = {"connectivities_key": conn_key, "distances_key": dist_key, "params": squidpy_params(graph),
             # ours, beside squidpy's keys (squidpy reads only the two keys above): which graph this is, so that
             # a later run can tell a graph a user built from one a previous run wrote
             WRITTEN_BY: {"kind": graph.kind, **{k: _plain(v) for k, v in graph.params.items()
                                                 if isinstance(_plain(v), (str, int, float, bool))}}}
    adata.uns[uns_key] = entry
    return entry


def is_spatialssl_graph(adata, key_added: str = SQUIDPY_KEY) -> bool:
    """Whether the squidpy graph under ``key_added`` was written by :func:`write_squidpy_graph` (a previous
    run's graph) rather than built by the user (squidpy or otherwise)."""
    entry = adata.uns.get(squidpy_keys(key_added)[2])
    return has_squidpy_graph(adata, key_added) and isinstance(entry, dict) and WRITTEN_BY in entry


def has_squidpy_graph(adata, key_added: str = SQUIDPY_KEY) -> bool:
    """Whether `adata` holds a squidpy connectivities matrix for ``key_added``."""
    return _connectivities_key(adata, key_added) in adata.obsp


def _connectivities_key(adata, key_added: str) -> str:
    conn_key, _, uns_key = squidpy_keys(key_added)
    entry = adata.uns.get(uns_key)
    if isinstance(entry, dict) and entry.get("connectivities_key"):
        return str(entry["connectivities_key"])
    return conn_key


def _distances_key(adata, key_added: str) -> str:
    _, dist_key, uns_key = squidpy_keys(key_added)
    entry = adata.uns.get(uns_key)
    if isinstance(entry, dict) and entry.get("distances_key"):
        return str(entry["distances_key"])
    return dist_key


def _lookup(keys: np.ndarray, matrix: sp.spmatrix, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Values of `matrix` at the int64 keys row * n + col: (values, found mask); explicit zeros count."""
    M = sp.csr_matrix(matrix)
    M.sum_duplicates()
    M.sort_indices()
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(M.indptr))
    mkeys = rows * n + M.indices.astype(np.int64)
    pos = np.searchsorted(mkeys, keys)
    pos_c = np.minimum(pos, max(len(mkeys) - 1, 0))
    found = (pos < len(mkeys)) & (mkeys[pos_c] == keys) if len(mkeys) else np.zeros(len(keys), bool)
    values = np.where(found, M.data[pos_c] if len(mkeys) else 0.0, np.nan)
    return values, found


def read_squidpy_graph(adata, coords: np.ndarray | None = None, section: np.ndarray | None = None, *,
                       key_added: str = SQUIDPY_KEY, spatial_key: str = "spatial",
                       symmetrize: bool = True) -> CellGraph | None:
    """The squidpy graph of `adata` as a :class:`CellGraph`, or None when there is none.

    Edges are the non-zero entries of the connectivities (``uns[key_added + '_neighbors']`` names the
    matrix; default ``obsp['spatial_connectivities']``), without self loops; with ``symmetrize`` an edge
    either way becomes both ways (squidpy's k-NN graphs are directed). With `section` (one code per cell),
    edges between sections are dropped: our views never cross sections. Edge lengths come from `coords`
    ((n_cells, 2) x, y; default ``obsm[spatial_key]``), else from the squidpy distances matrix.
    ``params`` records where the graph came from and what was dropped.
    """
    conn_key = _connectivities_key(adata, key_added)
    if conn_key not in adata.obsp:
        return None
    n = adata.n_obs
    A = adata.obsp[conn_key]
    if not sp.issparse(A):
        A = sp.csr_matrix(np.asarray(A))
    A = sp.csr_matrix(A)
    if A.shape != (n, n):
        raise SpatialDataError(f"obsp[{conn_key!r}] has shape {A.shape}; expected ({n}, {n}) for {n} cells.")
    A.sum_duplicates()
    nz = A.data != 0
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(A.indptr))[nz]
    cols = A.indices.astype(np.int64)[nz]
    loops = rows == cols
    n_loops = int(loops.sum())
    rows, cols = rows[~loops], cols[~loops]
    n_cross = 0
    if section is not None:
        section = np.asarray(section)
        if section.shape != (n,):
            raise SpatialDataError(f"section must have one entry per cell ({n}), got shape {section.shape}.")
        cross = section[rows] != section[cols]
        n_cross = int(cross.sum())
        rows, cols = rows[~cross], cols[~cross]
    directed_in = len(rows)
    if symmetrize:
        rows, cols = np.concatenate([rows, cols]), np.concatenate([cols, rows])
    keys = np.unique(rows * n + cols)
    rows, cols = keys // n, keys - (keys // n) * n

    if coords is None and spatial_key in adata.obsm:
        coords = adata.obsm[spatial_key]
    if coords is not None:
        xy = np.asarray(coords, dtype=np.float64)[:, :2]
        if xy.shape[0] != n:
            raise SpatialDataError(f"coords have {xy.shape[0]} rows for {n} cells.")
        diff = xy[rows] - xy[cols]
        dist = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    else:
        dist_key = _distances_key(adata, key_added)
        if dist_key not in adata.obsp:
            raise SpatialDataError(
                f"obsp[{conn_key!r}] has no coordinates (obsm[{spatial_key!r}]) nor obsp[{dist_key!r}] to give "
                "its edge lengths; add the coordinates or rebuild the graph with squidpy.gr.spatial_neighbors."
            )
        D = sp.csr_matrix(adata.obsp[dist_key])
        dist, found = _lookup(keys, D, n)
        if not found.all():  # an edge listed only the other way (directed k-NN): its length is the same
            back, found_back = _lookup(cols * n + rows, D, n)
            dist = np.where(found, dist, back)
            found |= found_back
        if not found.all():
            raise SpatialDataError(
                f"obsp[{dist_key!r}] lacks the length of {int((~found).sum())} edge(s) of obsp[{conn_key!r}]; "
                "rebuild the graph with squidpy.gr.spatial_neighbors."
            )

    deg = np.bincount(rows, minlength=n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(deg, out=indptr[1:])
    index_dtype = np.int32 if n < np.iinfo(np.int32).max else np.int64
    entry = adata.uns.get(squidpy_keys(key_added)[2])
    squidpy_p = dict(entry.get("params", {})) if isinstance(entry, dict) else {}
    params = {
        "source": f"obsp[{conn_key!r}]",
        **{k: _plain(v) for k, v in squidpy_p.items() if k in ("n_neighbors", "radius", "coord_type", "transform")},
        "symmetrized": bool(symmetrize),
        "directed_edges_read": int(directed_in),
        "self_loops_dropped": n_loops,
        "cross_section_edges_dropped": n_cross,
    }
    return CellGraph(indptr, cols.astype(index_dtype), dist.astype(np.float32), "squidpy", params)


def _plain(value):
    """JSON-friendly scalars (graph params end up in metrics.json)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def graph_of_run(method, data) -> CellGraph:
    """The cell graph a trained method used on `data` (a SpatialDataset).

    A method's own graph (``method.graph``, or ``method.view.graph`` for gnn-mask) when it covers `data`;
    else the method's ``build_graph(data)`` (spotscape after predict); else, for a method without a cell
    graph (patch-mae works on a lattice), squidpy's default: the 6 nearest cells, per section, symmetrised.
    """
    for g in (getattr(method, "graph", None), getattr(getattr(method, "view", None), "graph", None)):
        if isinstance(g, CellGraph) and g.n_nodes == data.n_cells:
            return g
    build = getattr(method, "build_graph", None)
    if callable(build):
        g = build(data)
        if isinstance(g, CellGraph) and g.n_nodes == data.n_cells:
            return g
    return knn_graph(data.coords, SQUIDPY_DEFAULT_K, data.section)


def write_run_graph(adata, method, data, *, key_added: str = SQUIDPY_KEY) -> dict:
    """:func:`write_squidpy_graph` of :func:`graph_of_run` (the one call the pipeline makes per result)."""
    return write_squidpy_graph(adata, graph_of_run(method, data), key_added=key_added)
