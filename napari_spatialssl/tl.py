"""scanpy-style verbs over AnnData: ``napari_spatialssl.tl.gnn_mask / spotscape / patch_mae``.

Each trains and evaluates one method with :func:`napari_spatialssl.pipeline.fit` and puts the results on
the AnnData the way scanpy's ``tl`` functions do::

    import napari_spatialssl as ssl
    ssl.tl.spotscape(adata, n_domains=7, epochs=50)          # in place, returns None
    res = ssl.tl.gnn_mask(adata, key_added="run1", copy=True)  # a new AnnData

Keys (``<key>`` = ``key_added``, default the method id ``gnn-mask`` / ``spotscape`` / ``patch-mae``):
``obsm['X_<key>']``, ``layers['<key>_reconstruction']``, ``obs['<key>_domain']``, ``obs['<key>_cell_type']``,
``obs['<key>_masked']`` (whatever the method produces), ``uns['spatialssl'][<key>]`` (config, metrics,
versions, genes), and the run's spatial graph under squidpy's keys (``obsp['spatial_connectivities']``,
``obsp['spatial_distances']``, ``uns['spatial_neighbors']``; with ``key_added`` squidpy's own rule:
``obsp['<key>_connectivities']``...). A squidpy graph already under those keys is kept, not replaced.

Settings: any field of the method's config by name (``lr=1e-3``, ``radius=50``, ``hidden_dims=[64, 32]``);
the data and evaluation fields by their short names (``section_key``, ``label_key``, ``spatial_key``,
``coord_columns``, ``ignore_labels``, ``domain_key``, ``train_sections``, ``test_sections``,
``reconstruction``); nested ones through ``overrides={'mask.ratio': 0.3}`` (the CLI's ``--set``).
"""

from __future__ import annotations

import dataclasses

from .data.io import SpatialDataError

UNS_KEY = "spatialssl"
_SECTIONS = ("data", "eval")


def _config_fields(method: str, fields: dict) -> dict:
    """Keyword settings as make_config fields: top-level names as they are, others looked up in the
    config's ``data`` / ``eval`` sections (``section_key`` -> ``data.section_key``)."""
    from .pipeline import make_config

    cfg = make_config(method)
    top = {f.name for f in dataclasses.fields(cfg)}
    out = {}
    for name, value in fields.items():
        if name in top or "." in name:
            out[name] = value
            continue
        for section in _SECTIONS:
            sub = getattr(cfg, section, None)
            if sub is not None and name in {f.name for f in dataclasses.fields(sub)}:
                out[f"{section}.{name}"] = value
                break
        else:
            known = sorted(top | {f.name for s in _SECTIONS if getattr(cfg, s, None) is not None
                                  for f in dataclasses.fields(getattr(cfg, s))})
            raise SpatialDataError(f"{method}: unknown setting {name!r}; known: {known}.")
    return out


def _result_keys(result, method: str) -> dict[str, list[str]]:
    """The keys the pipeline writes for `method` (see module docstring)."""
    prefix = f"{method}_"
    return {
        "obsm": [k for k in result.obsm if k == f"X_{method}" or k.startswith(f"X_{prefix}")],
        "layers": [k for k in result.layers if k.startswith(prefix)],
        "obs": [c for c in result.obs.columns if str(c).startswith(prefix)],
    }


def _renamed(key: str, method: str, new: str) -> str:
    if key.startswith(f"X_{method}"):
        return f"X_{new}{key[len(method) + 2:]}"
    return f"{new}{key[len(method):]}"


def _put_results(result, target, method: str, key: str) -> None:
    """Write `result`'s keys for `method` into `target` under `key` (target may be `result` itself)."""
    keys = _result_keys(result, method)
    obsm = {_renamed(k, method, key): result.obsm[k] for k in keys["obsm"]}
    layers = {_renamed(k, method, key): result.layers[k] for k in keys["layers"]}
    obs = {_renamed(c, method, key): result.obs[c].values for c in keys["obs"]}
    entry = (result.uns.get(UNS_KEY) or {}).get(method)
    if target is result and key != method:  # renaming within the result: drop the old names
        for k in keys["obsm"]:
            del result.obsm[k]
        for k in keys["layers"]:
            del result.layers[k]
        result.obs.drop(columns=keys["obs"], inplace=True)
        uns = dict(result.uns.get(UNS_KEY) or {})
        uns.pop(method, None)
        result.uns[UNS_KEY] = uns
    for k, v in obsm.items():
        target.obsm[k] = v
    for k, v in layers.items():
        target.layers[k] = v
    for c, v in obs.items():
        target.obs[c] = v
    if entry is not None:
        uns = dict(target.uns.get(UNS_KEY) or {})
        uns[key] = entry
        target.uns[UNS_KEY] = uns


def _run(method: str, adata, *, key_added: str | None, copy: bool, n_domains: int | None, epochs: int | None,
         overrides, out_dir, overwrite: bool, progress: bool, fields: dict):
    import copy as copy_module

    from .graphs.squidpy_graph import SQUIDPY_KEY, has_squidpy_graph, squidpy_keys, write_run_graph
    from .pipeline import fit, make_config

    if not copy and adata.is_view:
        raise SpatialDataError(f"{method}: adata is a view (a subset of another AnnData); pass adata.copy() or "
                               "copy=True.")
    if key_added is not None and (not isinstance(key_added, str) or not key_added):
        raise SpatialDataError(f"{method}: key_added must be a non-empty string, got {key_added!r}.")
    key = key_added or method
    graph_key = key_added or SQUIDPY_KEY
    cfg_fields = _config_fields(method, fields)
    if n_domains is not None:
        cfg_fields["eval.n_domains"] = n_domains
    if epochs is not None:
        cfg_fields["epochs"] = epochs
    cfg = make_config(method, overrides, **cfg_fields)
    nones = {k: None for k, v in cfg_fields.items() if v is None}  # make_config skips None (section_key=None)
    if nones:
        from .config import apply_overrides

        apply_overrides(cfg, nones)
        apply_overrides(cfg, overrides)  # explicit overrides still win
    out = fit(adata, method, out_dir, overwrite=overwrite, progress=progress, config=cfg)
    result = out.adata
    keep_graph = has_squidpy_graph(adata, graph_key)  # the user's own graph stays
    if copy:
        target = result.copy()
        _put_results(target, target, method, key)
    else:
        target = adata
        _put_results(result, target, method, key)
    if copy and graph_key != SQUIDPY_KEY and not has_squidpy_graph(adata, SQUIDPY_KEY):
        for k in squidpy_keys(SQUIDPY_KEY)[:2]:  # the pipeline wrote the run's graph under the default key
            target.obsp.pop(k, None)
        target.uns.pop(squidpy_keys(SQUIDPY_KEY)[2], None)
    if not keep_graph:
        write_run_graph(target, out.method, out.method.data, key_added=graph_key)
    elif copy:  # the result may hold the run's graph there; the user's stays
        conn_key, dist_key, uns_key = squidpy_keys(graph_key)
        for key in (conn_key, dist_key):
            if key in adata.obsp:
                target.obsp[key] = adata.obsp[key].copy()
        if uns_key in adata.uns:
            target.uns[uns_key] = copy_module.deepcopy(adata.uns[uns_key])
    return target if copy else None


def gnn_mask(adata, *, key_added: str | None = None, copy: bool = False, n_domains: int | None = None,
             epochs: int | None = None, overrides: list[str] | dict | None = None, out_dir=None,
             overwrite: bool = False, progress: bool = False, **config_fields):
    """Masked-expression pretraining of a GCN/GAT on each section's radius graph (SpatialSSL).

    adata: cells with ``obsm['spatial']`` (x, y) or ``coord_columns``; epochs: pretraining epochs (default:
    the config's); n_domains: K for domain clustering where the method clusters; out_dir: also save the
    run folder (model.pt, metrics.json, ...) for ``predict``; config_fields: see the module docstring.
    Returns None (``copy=False``, results written into `adata`) or a new AnnData (``copy=True``).
    """
    return _run("gnn-mask", adata, key_added=key_added, copy=copy, n_domains=n_domains, epochs=epochs,
                overrides=overrides, out_dir=out_dir, overwrite=overwrite, progress=progress, fields=config_fields)


def spotscape(adata, *, key_added: str | None = None, copy: bool = False, n_domains: int | None = None,
              epochs: int | None = None, overrides: list[str] | dict | None = None, out_dir=None,
              overwrite: bool = False, progress: bool = False, **config_fields):
    """Spotscape: two-view GCN autoencoder with the similarity telescope on each slice's SNN graph;
    spatial domains in ``obs['<key>_domain']`` (k-means with `n_domains`, else Leiden). See :func:`gnn_mask`
    for the arguments."""
    return _run("spotscape", adata, key_added=key_added, copy=copy, n_domains=n_domains, epochs=epochs,
                overrides=overrides, out_dir=out_dir, overwrite=overwrite, progress=progress, fields=config_fields)


def patch_mae(adata, *, key_added: str | None = None, copy: bool = False, n_domains: int | None = None,
              epochs: int | None = None, overrides: list[str] | dict | None = None, out_dir=None,
              overwrite: bool = False, progress: bool = False, **config_fields):
    """Masked autoencoder (ViT) on the slide rasterised to a lattice of gene channels. It has no cell graph;
    the graph written for squidpy is squidpy's default (6 nearest cells per section). See :func:`gnn_mask`
    for the arguments."""
    return _run("patch-mae", adata, key_added=key_added, copy=copy, n_domains=n_domains, epochs=epochs,
                overrides=overrides, out_dir=out_dir, overwrite=overwrite, progress=progress, fields=config_fields)


__all__ = ["gnn_mask", "spotscape", "patch_mae"]
