"""Our three methods beside the published peers (STAGATE, GraphST, BANKSY, CellCharter, Novae) on
the same slides, spots, labels and K, each clustered by both protocols (k-means, and the mclust
protocol: a tied-covariance Gaussian mixture on the leading principal components).

The peers are run from their PyPI packages, in their documented way, each in an environment of its
own that this script creates (``$PEERS_ENV`` or ``benchmarks/.peers_env/<peer>``; torch==2.13.0 is
installed first where a peer needs torch, and pinned). Nothing of theirs is re-implemented here;
our package's install does not grow. Each run is a subprocess in the peer's environment; it writes
the peer's embedding (and the peer's own domain labels where its documented pipeline makes some)
and its wall time; scoring happens afterwards in our environment with
``napari_spatialssl.evaluation.clustering.domain_scores``.

    python benchmarks/peers.py setup [--peers stagate,graphst,banksy,cellcharter,novae]
    python benchmarks/peers.py run --methods stagate,spotscape --cases 151673 --seeds 0 1 2
    python benchmarks/peers.py score           # both protocols (+ R's mclust where R is installed)
    python benchmarks/peers.py report          # markdown tables for benchmarks/peers.md

Records: ``benchmarks/results/peers/runs.jsonl`` (one line per run: wall time, settings, versions,
or the exact error) and ``benchmarks/results/peers/scores.jsonl`` (ARI / NMI per protocol).
Embeddings stay beside the environments (``<env root>/embeddings``), not in git.

This file is also the worker that runs inside each peer's environment (``peers.py worker ...``),
so its top level imports only the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SPATIALSSL_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results" / "peers"
ENV_ROOT = Path(os.environ.get("PEERS_ENV", REPO / "benchmarks" / ".peers_env"))
CASE_DIR = ENV_ROOT / "cases"
EMB_DIR = ENV_ROOT / "embeddings"
TORCH = "torch==2.13.0"

# -- the peers' environments ------------------------------------------------------------------------

# packages: what `pip install` gets, in order of preference (the first that installs is used; an
# earlier one that fails is recorded with its error). torch: install torch==2.13.0 first and pin it.
PEERS = {
    "stagate": {"packages": [["stagate-modern", "scanpy", "scikit-misc"]], "torch": True,
                "import": "STAGATE_pyG"},
    # GraphST's own clustering calls R's mclust through rpy2. Its `r-clustering` extra asks for
    # rpy2 3.6, which with R 4.2 builds and then fails to load (`undefined symbol: R_getVar`, an
    # R 4.5 API); with an R older than 4.5, rpy2 3.5 is installed beside it instead (checked: rpy2
    # 3.5.17 runs Mclust on R 4.2.2). Without R, rpy2 cannot build and GraphST installs without it.
    "graphst": {"packages": [["graphst-modern[r-clustering]"], ["graphst-modern", "rpy2>=3.5,<3.6"],
                             ["graphst-modern"]], "torch": True, "r_packages": True,
                "import": "GraphST"},
    # banksy-py 0.0.7 (its newest) pins numpy==1.22.4, pandas==1.5.2, anndata==0.8.0, scanpy==1.9.1 ...;
    # a bare `pip install banksy-py` backtracks to 0.0.1, an early snapshot. The authors publish BANKSY
    # as `pybanksy` now (v1.3.x, same `banksy` import), which is what runs here when 0.0.7 will not.
    "banksy": {"packages": [["banksy-py==0.0.7"], ["pybanksy", "scikit-misc"]], "torch": False, "import": "banksy"},
    "cellcharter": {"packages": [["cellcharter", "scvi-tools"]], "torch": True, "import": "cellcharter"},
    "novae": {"packages": [["novae"]], "torch": True, "import": "novae"},
}
OURS = ("spotscape", "patch-mae", "gnn-mask", "pca")

# -- the cases: same file, spots, labels and K for everyone ------------------------------------------

CASES = {
    "151673": {"file": "dlpfc_151673.h5ad", "label": "layer", "k": 7},
    "151674": {"file": "dlpfc_151674.h5ad", "label": "layer", "k": 7},
    "151675": {"file": "dlpfc_151675.h5ad", "label": "layer", "k": 7},
    "151676": {"file": "dlpfc_151676.h5ad", "label": "layer", "k": 7},
    "dlpfc_joint": {"file": "dlpfc_151673-151676.h5ad", "label": "layer", "k": 7, "section": "sample_id"},
    "starmap": {"file": "starmap_mpfc_3slices.h5ad", "label": "layer", "k": 4, "section": "sample_id"},
    "osmfish": {"file": "osmfish_cortex.h5ad", "label": "region", "k": 11},
}
UNLABELLED = {"", "nan", "Excluded", "Ambiguous"}


def env_dir(peer: str) -> Path:
    return ENV_ROOT / peer


def env_python(peer: str) -> Path:
    return env_dir(peer) / "bin" / "python"


def _pip(py: Path, args: list[str], log) -> subprocess.CompletedProcess:
    cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", *args]
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)


def _last_error(log_path: Path, n: int = 12) -> str:
    lines = [ln.rstrip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower()]
    return "\n".join((errs or lines)[-n:])


def r_version() -> tuple | None:
    """(major, minor) of the R on PATH, or None without R."""
    rscript = shutil.which("Rscript")
    if rscript is None:
        return None
    p = subprocess.run([rscript, "-e", 'cat(R.version$major, R.version$minor, sep=" ")'],
                       capture_output=True, text=True)
    try:
        major, minor = p.stdout.split()
        return int(major), int(minor.split(".")[0])
    except ValueError:
        return None


def _package_sets(spec: dict) -> list[list[str]]:
    """The peer's package sets in order of preference, without those that cannot work with the R
    here (for a peer that calls R through rpy2: none builds without R; rpy2 3.6 needs R >= 4.5)."""
    sets = spec["packages"]
    if not spec.get("r_packages"):
        return sets
    r = r_version()
    if r is None:
        return [s for s in sets if not any("rpy2" in p or "r-clustering" in p for p in s)]
    if r < (4, 5):
        return [s for s in sets if not any("r-clustering" in p for p in s)]
    return sets


def _better_set_possible(record: dict, spec: dict) -> bool:
    """Whether a finished environment's record misses a package set that is preferred to the one it
    installed, can work here now, and was never tried (a set that failed to install stays failed)."""
    sets = _package_sets(spec)
    installed = record.get("installed")
    tried = [a["packages"] for a in record.get("attempts", [])]
    preferred = sets[:sets.index(installed)] if installed in sets else sets
    return any(s not in tried for s in preferred)


def setup_env(peer: str) -> dict:
    """Create the peer's environment (idempotent: a finished one has `.installed.json`)."""
    spec = PEERS[peer]
    d = env_dir(peer)
    done = d / ".installed.json"
    if done.exists():
        record = json.loads(done.read_text())
        if not _better_set_possible(record, spec):
            return record
        # a set it prefers can work now (R was installed since, say): build the environment afresh, as
        # packages left from the older set can break the newer one (rpy2 3.6's split packages break 3.5)
        shutil.rmtree(d)
    d.parent.mkdir(parents=True, exist_ok=True)
    log_path = ENV_ROOT / f"{peer}_install.log"
    record = {"peer": peer, "attempts": []}
    with log_path.open("w") as log:
        if not env_python(peer).exists():
            subprocess.run([sys.executable, "-m", "venv", str(d)], check=True, stdout=log, stderr=subprocess.STDOUT)
        py = env_python(peer)
        constraints = d / "constraints.txt"
        constraints.write_text(TORCH + "\n")
        if spec["torch"]:
            r = _pip(py, [TORCH], log)
            if r.returncode:
                record["error"] = f"pip install {TORCH} failed:\n{_last_error(log_path)}"
                return record
        for pkgs in _package_sets(spec):
            start = log_path.stat().st_size
            r = _pip(py, ["-c", str(constraints), *pkgs], log)
            log.flush()
            if r.returncode == 0:
                record["attempts"].append({"packages": pkgs, "ok": True})
                record["installed"] = pkgs
                break
            with log_path.open() as fh:
                fh.seek(start)
                tail = [ln.rstrip() for ln in fh.read().splitlines() if ln.strip()]
            errs = [ln for ln in tail if "error" in ln.lower() or " depends on " in ln] or tail
            record["attempts"].append({"packages": pkgs, "ok": False, "error": "\n".join(errs[-12:])})
    if "installed" not in record:
        record["error"] = "no package set installed; see attempts"
        return record
    freeze = subprocess.run([str(env_python(peer)), "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    record["versions"] = {ln.split("==")[0].lower(): ln.split("==")[1] for ln in freeze.splitlines() if "==" in ln}
    done.write_text(json.dumps(record, indent=1))
    return record


def cmd_setup(args) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    rc = 0
    for peer in args.peers.split(","):
        t0 = time.perf_counter()
        rec = setup_env(peer)
        rec["setup_seconds"] = round(time.perf_counter() - t0, 1)
        ok = "error" not in rec
        rc |= not ok
        print(json.dumps({"peer": peer, "ok": ok, "installed": rec.get("installed"),
                          "failed": [a for a in rec["attempts"] if not a["ok"]], "error": rec.get("error")}))
        with (RESULTS / "install.jsonl").open("a") as fh:
            fh.write(json.dumps({k: v for k, v in rec.items() if k != "versions"}
                                | {"key_versions": {p: rec.get("versions", {}).get(p) for p in (
                                    "torch", "stagate-modern", "graphst-modern", "pybanksy", "banksy-py",
                                    "cellcharter", "scvi-tools", "novae", "scanpy", "anndata", "rpy2",
                                    "torch-geometric", "squidpy", "lightning")}}) + "\n")
    return rc


# -- the cases, prepared once in our environment ------------------------------------------------------

def case_path(case: str) -> Path:
    return CASE_DIR / f"{case}.h5ad"


def prepare_case(case: str) -> Path:
    """One AnnData per case that every method reads: raw counts, one `section` column, the reference
    labels as `truth` (NaN = unlabelled), and coordinates laid out so that slices never overlap.

    - DLPFC: full-resolution image pixels (`pxl_x`, `pxl_y`; the 28/29 NaN rows filled by the exact
      linear map from obsm['spatial'], as ../shared/data/README.md prescribes), the unit in which
      STAGATE's documented radius (150) and GraphST's refinement are set.
    - Several slices: each slice is shifted along x past the previous one (a gap of 20 median
      neighbour distances), so every method's own graph builder makes per-slice graphs.
    - uns: k (number of domains), microns_per_unit (Visium: 100 um spot pitch / median spot distance;
      single-cell slides: 10 um / median nearest-cell distance, an assumption stated in peers.md),
      radius6 (the radius giving ~6 neighbours: STAGATE's Visium radius, used for STAGATE's and
      gnn-mask's graphs on the other slides).
    """
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    out = case_path(case)
    if out.exists():
        return out
    spec = CASES[case]
    src = ad.read_h5ad(DATA / spec["file"])
    X = sp.csr_matrix(src.X, dtype=np.float32)
    xy = np.asarray(src.obsm["spatial"], np.float64)
    visium = "pxl_x" in src.obs
    if visium:
        px = src.obs[["pxl_x", "pxl_y"]].to_numpy(np.float64)
        ok = np.isfinite(px).all(1)
        A = np.column_stack([xy[ok], np.ones(ok.sum())])
        coef, *_ = np.linalg.lstsq(A, px[ok], rcond=None)
        px[~ok] = np.column_stack([xy[~ok], np.ones((~ok).sum())]) @ coef
        xy = px
    section = (src.obs[spec["section"]].astype(str).to_numpy() if spec.get("section")
               else np.full(src.n_obs, case, dtype=object))
    truth = src.obs[spec["label"]].astype(object).to_numpy()
    truth = np.array([None if (t is None or (isinstance(t, float) and np.isnan(t)) or str(t) in UNLABELLED)
                      else str(t) for t in truth], dtype=object)
    names = list(dict.fromkeys(section))
    nn = []
    for s in names:
        p = xy[section == s]
        nn.append(cKDTree(p).query(p, 2)[0][:, 1])
    med = float(np.median(np.concatenate(nn)))
    shift = 0.0
    for s in names:
        m = section == s
        xy[m, 0] += shift - xy[m, 0].min()
        xy[m, 1] -= xy[m, 1].min()
        shift = xy[m, 0].max() + 20 * med
    if visium:
        radius6 = 150.0  # STAGATE's DLPFC tutorial: rad_cutoff=150 (pixels), ~6 neighbours per spot
    else:
        # the radius at which the mean number of neighbours within the slice is ~6
        d6 = np.concatenate([cKDTree(xy[section == s]).query(xy[section == s], 7)[0][:, 6] for s in names])
        radius6 = float(np.median(d6))
    obs = pd.DataFrame({"section": pd.Categorical(section, categories=names),
                        "truth": pd.Categorical(truth)}, index=src.obs_names.astype(str))
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=src.var_names.astype(str)))
    a.obsm["spatial"] = xy.astype(np.float64)
    a.uns.update(case=case, k=int(spec["k"]), label_key=spec["label"], source=spec["file"], visium=bool(visium),
                 median_nn=med, microns_per_unit=float((100.0 if visium else 10.0) / med), radius6=radius6)
    a.var_names_make_unique()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.h5ad")
    a.write_h5ad(tmp)
    tmp.replace(out)
    return out


# -- the workers: one run of one method on one case, in the method's own environment -------------------

def _read_case(case: str):
    import anndata as ad

    return ad.read_h5ad(case_path(case))


def _threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", "2") or 2)


def _torch_setup(seed: int):
    import random

    import numpy as np
    import torch

    torch.set_num_threads(_threads())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch


def worker_stagate(a, seed: int) -> dict:
    """STAGATE's DLPFC tutorial: 3,000 HVGs (seurat_v3), normalise to 1e4 + log1p, radius graph
    (150 px on Visium), train_STAGATE with its defaults (hidden [512, 30], 1,000 epochs, lr 1e-3)."""
    import scanpy as sc
    import STAGATE_pyG as S

    _torch_setup(seed)
    if a.n_vars > 3000:
        sc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=3000)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    S.Cal_Spatial_Net(a, rad_cutoff=float(a.uns["radius6"]), verbose=False)
    degree = len(a.uns["Spatial_Net"]) / a.n_obs
    a = S.train_STAGATE(a, random_seed=seed, device="cpu", verbose=False)
    return {"embeddings": {"stagate": a.obsm["STAGATE"]}, "own": {},
            "settings": {"hvg": min(3000, a.n_vars), "rad_cutoff": float(a.uns["radius6"]),
                         "mean_neighbours": degree, "hidden_dims": [512, 30], "n_epochs": 1000, "lr": 1e-3,
                         "own_clustering": "R mclust EEE on the 30-d embedding (STAGATE's mclust_R), in `score`"}}


def worker_graphst(a, seed: int) -> dict:
    """GraphST's DLPFC tutorial: GraphST(adata, device) with its defaults (its own preprocessing:
    3,000 HVGs, normalise, log1p, scale; 3-NN graph; 600 epochs, lr 1e-3), then its own clustering:
    PCA 20 + R mclust EEE, refinement radius 50 (`GraphST.utils.clustering`)."""
    import numpy as np
    from GraphST.GraphST import GraphST

    torch = _torch_setup(seed)
    k = int(a.uns["k"])
    model = GraphST(a, device=torch.device("cpu"), random_seed=seed)
    t0 = time.perf_counter()
    out = model.train()
    train_s = time.perf_counter() - t0
    res = {"embeddings": {"graphst": np.asarray(out.obsm["emb"])}, "own": {},
           "settings": {"epochs": model.epochs, "lr": model.learning_rate, "datatype": model.datatype,
                        "dim_output": model.dim_output, "train_seconds": train_s,
                        "seconds_per_epoch": train_s / model.epochs}}
    try:
        from GraphST.utils import clustering

        clustering(out, k, radius=50, method="mclust", refinement=False)
        res["own"]["graphst_mclust"] = np.asarray(out.obs["domain"]).astype(str)
        clustering(out, k, radius=50, method="mclust", refinement=True)
        res["own"]["graphst_mclust_refined"] = np.asarray(out.obs["domain"]).astype(str)
    except Exception as e:  # R / rpy2 missing: scored in `score` with R's mclust directly
        res["own_error"] = f"{type(e).__name__}: {e}"
    return res


def worker_banksy(a, seed: int) -> dict:
    """BANKSY (pybanksy) as in its DLPFC notebook: normalise total (banksy_utils.filter_utils), 2,000
    HVGs (the notebook reads R-derived HVGs; here scanpy's seurat_v3 on counts), k_geom 6 on Visium
    (15, its default, on single-cell slides), scaled-Gaussian weights, max_m 0 on Visium (1, the
    recommended default, elsewhere), PCA 20; lambda 0.2 (the notebook's, 'cell-typing') and 0.8 (the
    paper's domain-segmentation setting); its own clustering: Leiden (num_nn 50) at the resolution of
    a documented-style sweep whose cluster count matches K."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    import scanpy as sc
    from banksy.cluster_methods import run_Leiden_partition
    from banksy.embed_banksy import generate_banksy_matrix
    from banksy.initialize_banksy import initialize_banksy
    from banksy_utils import filter_utils
    from banksy_utils.umap_pca import pca_umap

    np.random.seed(seed)
    k = int(a.uns["k"])
    visium = bool(a.uns["visium"])
    multi = a.obs["section"].nunique() > 1
    if a.n_vars > 2000:
        sc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=2000, batch_key="section" if multi else None)
        a = a[:, a.var["highly_variable"]].copy()
    a = filter_utils.normalize_total(a)
    xy = np.asarray(a.obsm["spatial"])
    a.obs["x"], a.obs["y"] = xy[:, 0], xy[:, 1]
    a.obsm["coord_xy"] = xy
    k_geom, max_m, lambdas = (6 if visium else 15), (0 if visium else 1), [0.2, 0.8]
    bd = initialize_banksy(a, ("x", "y", "coord_xy"), k_geom, nbr_weight_decay="scaled_gaussian", max_m=max_m,
                           plt_edge_hist=False, plt_nbr_weights=False, plt_agf_angles=False, plt_theta=False)
    bd, _ = generate_banksy_matrix(a, bd, lambdas, max_m)
    pca_umap(bd, pca_dims=[20], plt_remaining_var=False, add_umap=False)
    res = {"embeddings": {}, "own": {}, "settings": {"hvg": int(a.n_vars), "k_geom": k_geom, "max_m": max_m,
                                                      "pca_dims": 20, "nbr_weight_decay": "scaled_gaussian"}}
    for lam in lambdas:
        res["embeddings"][f"banksy-{lam}"] = np.asarray(bd["scaled_gaussian"][lam]["adata"].obsm["reduced_pc_20"])
    resolutions = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2, 1.5]
    try:
        df, _ = run_Leiden_partition(bd, resolutions, num_nn=50, num_iterations=-1, partition_seed=1234 + seed,
                                     match_labels=False)
        chosen = {}
        for lam in lambdas:
            rows = df[np.isclose(df["lambda_param"].astype(float), lam)]
            best = min(rows.index, key=lambda r: (abs(int(rows.loc[r, "num_labels"]) - k),
                                                   abs(float(rows.loc[r, "resolution"]) - 0.6)))
            lab = rows.loc[best, "labels"]
            res["own"][f"banksy-{lam}_leiden"] = np.asarray(getattr(lab, "dense", lab)).astype(str)
            chosen[str(lam)] = {"resolution": float(rows.loc[best, "resolution"]),
                                "n_clusters": int(rows.loc[best, "num_labels"])}
        res["settings"]["leiden"] = chosen
    except Exception as e:
        res["own_error"] = f"{type(e).__name__}: {e}"
    return res


def worker_cellcharter(a, seed: int) -> dict:
    """CellCharter for spatial transcriptomics as documented: scVI (scvi-tools defaults, counts,
    batch = slice when several) for the cell embedding, squidpy's spatial graph (Visium: grid with 6
    neighbours; single-cell slides: Delaunay + cc.gr.remove_long_links), cc.gr.aggregate_neighbors
    with n_layers=3, then cc.tl.Cluster (its GMM) with K components."""
    import numpy as np

    _torch_setup(seed)
    import cellcharter as cc
    import scvi
    import squidpy as sq

    k = int(a.uns["k"])
    multi = a.obs["section"].nunique() > 1
    scvi.settings.seed = seed
    a.layers["counts"] = a.X.copy()
    scvi.model.SCVI.setup_anndata(a, layer="counts", batch_key="section" if multi else None)
    model = scvi.model.SCVI(a)
    t0 = time.perf_counter()
    model.train(early_stopping=True, enable_progress_bar=False, accelerator="cpu")
    scvi_s = time.perf_counter() - t0
    a.obsm["X_scVI"] = model.get_latent_representation(a).astype(np.float32)
    if bool(a.uns["visium"]):
        sq.gr.spatial_neighbors(a, library_key="section", coord_type="grid", n_neighs=6, spatial_key="spatial")
        graph = "squidpy grid, 6 neighbours"
    else:
        sq.gr.spatial_neighbors(a, library_key="section", coord_type="generic", delaunay=True, spatial_key="spatial")
        cc.gr.remove_long_links(a)
        graph = "squidpy Delaunay + remove_long_links"
    a.obs["section"] = a.obs["section"].astype("category")
    cc.gr.aggregate_neighbors(a, n_layers=3, use_rep="X_scVI", out_key="X_cellcharter", sample_key="section")
    gmm = cc.tl.Cluster(n_clusters=k, random_state=seed, trainer_params={"accelerator": "cpu",
                                                                         "enable_progress_bar": False})
    gmm.fit(a, use_rep="X_cellcharter")
    labels = np.asarray(gmm.predict(a, use_rep="X_cellcharter")).astype(str)
    return {"embeddings": {"cellcharter": np.asarray(a.obsm["X_cellcharter"])},
            "own": {"cellcharter_gmm": labels},
            "settings": {"scvi_epochs": int(len(model.history["elbo_train"])), "scvi_seconds": scvi_s,
                         "n_latent": int(model.module.n_latent), "graph": graph, "n_layers": 3,
                         "genes": int(a.n_vars)}}


def worker_novae(a, seed: int) -> dict:
    """Novae trained from scratch (no hub weights are reachable): novae.spatial_neighbors per slice
    (technology="visium": its 6-neighbour grid; single-cell slides: Delaunay pruned at 80 um, the
    radius of its H&E tutorial), novae.Novae(adata) with its defaults (n_hops_local/view = 1 on
    Visium, as its advice page says; its own normalise + log1p of counts), model.fit with its
    defaults (max_epochs 20, lr 5e-4, early stopping), compute_representations,
    assign_domains(level=K)."""
    import numpy as np

    _torch_setup(seed)
    import lightning
    import novae

    lightning.seed_everything(seed)
    k = int(a.uns["k"])
    visium = bool(a.uns["visium"])
    novae.settings.scale_to_microns = float(a.uns["microns_per_unit"])
    a.obsm["spatial"] = np.asarray(a.obsm["spatial"])
    if visium:
        novae.spatial_neighbors(a, slide_key="section", technology="visium")
    else:
        novae.spatial_neighbors(a, slide_key="section", radius=80.0 / float(a.uns["microns_per_unit"]))
    kwargs = {"n_hops_local": 1, "n_hops_view": 1} if visium else {}
    model = novae.Novae(a, **kwargs)
    t0 = time.perf_counter()
    model.fit(a, accelerator="cpu")
    fit_s = time.perf_counter() - t0
    model.compute_representations(a, accelerator="cpu")
    key = model.assign_domains(a, level=k)
    key = key if isinstance(key, str) else f"novae_domains_{k}"
    return {"embeddings": {"novae": np.asarray(a.obsm["novae_latent"])},
            "own": {"novae_domains": np.asarray(a.obs[key]).astype(str)},
            "settings": {"fit_seconds": fit_s, "scale_to_microns": float(a.uns["microns_per_unit"]), **kwargs}}


def worker_ours(a, method: str, seed: int) -> dict:
    """Our methods through napari_spatialssl.fit, defaults, K given (its k-means labels are `own`)."""
    import numpy as np

    from napari_spatialssl.pipeline import fit

    _torch_setup(seed)
    k = int(a.uns["k"])
    if method == "pca":
        return _pca_baseline(a, seed)
    a.obs["truth"] = a.obs["truth"].astype("category")
    overrides = {"data.section_key": "section", "eval.domain_key": "truth", "eval.n_domains": str(k),
                 "seed": str(seed), "eval.reconstruction": "none", "device": "cpu"}
    if method == "gnn-mask":
        overrides["radius"] = str(float(a.uns["radius6"]))  # the default (30) is in um of MERFISH
    if method == "patch-mae":
        overrides["reconstruction_layer"] = "false"
    out = fit(a, method, overrides=overrides)
    emb = np.asarray(out.adata.obsm[f"X_{method}"])
    settings = {"overrides": overrides, "epochs": out.metrics.get("epochs"),
                "train_seconds": out.metrics.get("train_seconds")}
    if method == "spotscape":
        from napari_spatialssl.models.spotscape import postprocess_embedding

        emb = postprocess_embedding(emb, out.method.config.embedding_postprocess, seed=seed)
        settings["embedding"] = f"X_spotscape, {out.method.config.embedding_postprocess} (what spotscape clusters)"
    own = {}
    col = f"{method}_domain"
    if col in out.adata.obs:
        own[f"{method}_kmeans"] = np.asarray(out.adata.obs[col]).astype(str)
    return {"embeddings": {method: emb}, "own": own, "settings": settings}


def _pca_baseline(a, seed: int) -> dict:
    """PCA + clustering: normalise 1e4 + log1p, 3,000 HVGs (seurat_v3 on counts), 50 components."""
    import numpy as np
    import scanpy as sc

    if a.n_vars > 3000:
        sc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=3000)
        a = a[:, a.var["highly_variable"]].copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    n = min(50, a.n_vars - 1)
    sc.pp.pca(a, n_comps=n, random_state=seed)
    return {"embeddings": {"pca": np.asarray(a.obsm["X_pca"])}, "own": {},
            "settings": {"hvg": int(a.n_vars), "n_comps": n}}


WORKERS = {"stagate": worker_stagate, "graphst": worker_graphst, "banksy": worker_banksy,
           "cellcharter": worker_cellcharter, "novae": worker_novae}


def cmd_worker(args) -> int:
    """Inside the method's environment: run, then write <out>.npz (embeddings, own labels) and <out>.json."""
    import numpy as np

    os.environ.setdefault("MPLBACKEND", "Agg")
    a = _read_case(args.case)
    t0 = time.perf_counter()
    res = WORKERS[args.method](a, args.seed) if args.method in WORKERS else worker_ours(a, args.method, args.seed)
    wall = time.perf_counter() - t0
    out = Path(args.out)
    arrays = {f"emb::{k}": np.asarray(v, np.float32) for k, v in res["embeddings"].items()}
    arrays.update({f"own::{k}": np.asarray(v).astype(str) for k, v in res["own"].items()})
    np.savez_compressed(out.with_suffix(".npz"), obs_names=np.asarray(a.obs_names).astype(str), **arrays)
    meta = {"method_wall_seconds": wall, "settings": res["settings"], "own_error": res.get("own_error"),
            "embedding_dims": {k: list(np.shape(v)) for k, v in res["embeddings"].items()}}
    out.with_suffix(".json").write_text(json.dumps(meta, default=float))
    return 0


# -- running: every (method, case, seed) in a subprocess, resumable -----------------------------------

def _records(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def _python_for(method: str) -> Path:
    return env_python(method) if method in PEERS else Path(sys.executable)


def run_one(method: str, case: str, seed: int, timeout: float) -> dict:
    """One run in its own process (a peer's environment, or ours), timed from the outside."""
    EMB_DIR.mkdir(parents=True, exist_ok=True)
    # one file per run (the start time in its name): a rerun (`--again`) never overwrites the embedding
    # an earlier record points at, so `score` scores it and `report` shows the latest run only
    stamp, n = time.strftime("%Y%m%dT%H%M%S"), 0
    out = EMB_DIR / case / f"{method}_seed{seed}_{stamp}"
    while out.with_suffix(".npz").exists():
        n += 1
        out = EMB_DIR / case / f"{method}_seed{seed}_{stamp}-{n}"
    out.parent.mkdir(parents=True, exist_ok=True)
    py = _python_for(method)
    rec = {"method": method, "case": case, "seed": seed, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "load_average_start": os.getloadavg()[0], "threads": _threads()}
    if method in PEERS:
        inst = env_dir(method) / ".installed.json"
        if not inst.exists():
            rec.update(status="not installed", error=(json.loads(inst.read_text()) if inst.exists() else
                                                      "run `peers.py setup` first"))
            return rec
        info = json.loads(inst.read_text())
        rec["package"] = info.get("installed")
        rec["versions"] = {p: info["versions"].get(p) for p in ("torch", "stagate-modern", "graphst-modern",
                                                                 "pybanksy", "cellcharter", "scvi-tools", "novae")
                           if info["versions"].get(p)}
    env = dict(os.environ, OMP_NUM_THREADS=str(_threads()), MKL_NUM_THREADS=str(_threads()), MPLBACKEND="Agg",
               PYTHONWARNINGS="ignore", NUMBA_NUM_THREADS=str(_threads()))
    if method not in PEERS:
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    log = out.with_suffix(".log")
    cmd = [str(py), str(Path(__file__).resolve()), "worker", "--method", method, "--case", case,
           "--seed", str(seed), "--out", str(out)]
    t0 = time.perf_counter()
    with log.open("w") as fh:
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    rec["wall_seconds"] = round(time.perf_counter() - t0, 1)
    rec["load_average_end"] = os.getloadavg()[0]
    if rc is None:
        rec.update(status="timeout", error=f"stopped after {timeout:.0f} s")
    elif rc != 0:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        exc = [ln for ln in tail if ("Error" in ln or "error" in ln) and not ln.startswith(" ")]
        rec.update(status="error", returncode=rc, error=(exc[-1] if exc else "") + "\n" + "\n".join(tail[-6:]))
    else:
        meta = json.loads(out.with_suffix(".json").read_text())
        rec.update(status="ok", embedding=str(out.with_suffix(".npz").relative_to(ENV_ROOT)), **meta)
    return rec


def cmd_run(args) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = RESULTS / "runs.jsonl"
    for case in args.cases.split(","):
        prepare_case(case)
    for case in args.cases.split(","):
        for seed in args.seeds:
            for method in args.methods.split(","):
                done = [r for r in _records(runs) if (r["method"], r["case"], r["seed"]) == (method, case, seed)
                        and r["status"] == "ok"]
                if done and not args.again:
                    continue
                rec = run_one(method, case, seed, args.timeout)
                with runs.open("a") as fh:
                    fh.write(json.dumps(rec, default=float) + "\n")
                print(json.dumps({k: rec.get(k) for k in ("method", "case", "seed", "status", "wall_seconds",
                                                          "error")}), flush=True)
    return 0


# -- scoring in our environment: both protocols, the peers' own labels, and R's mclust as a check --------

def r_mclust(Z, k: int, seed: int = 2020, timeout: float = 900) -> tuple:
    """R's Mclust(Z, G=k, modelNames="EEE") with set.seed(seed), as STAGATE/GraphST call it through
    rpy2; here through Rscript so that our environment needs no rpy2. Returns (labels or None, note)."""
    import tempfile

    import numpy as np

    rscript = shutil.which("Rscript")
    if rscript is None:
        return None, "Rscript not found (apt-get install r-base-core r-cran-mclust)"
    with tempfile.TemporaryDirectory() as tmp:
        fin, fout = Path(tmp) / "z.txt", Path(tmp) / "labels.txt"
        np.savetxt(fin, Z, fmt="%.8g")
        prog = (f'suppressMessages(library(mclust)); X <- as.matrix(read.table("{fin}")); set.seed({seed}); '
                f'res <- Mclust(X, G={k}, modelNames="EEE", verbose=FALSE); '
                f'if (is.null(res)) quit(status=3); write(res$classification, "{fout}", ncolumns=1)')
        try:
            p = subprocess.run([rscript, "-e", prog], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"R mclust timed out after {timeout:.0f} s"
        if p.returncode != 0 or not fout.exists():
            return None, f"R mclust failed (rc {p.returncode}): {p.stderr.strip()[-300:]}"
        return np.loadtxt(fout).astype(np.int64), "ok"


def _truth_codes(a):
    import numpy as np

    return np.asarray(a.obs["truth"].cat.codes, np.int64)  # -1 = unlabelled


def _scores(labels, truth, section) -> dict:
    import numpy as np

    from napari_spatialssl.evaluation.clustering import domain_scores

    labels = np.unique(np.asarray(labels).astype(str), return_inverse=True)[1]
    out = domain_scores(labels, truth)
    out["n_clusters"] = int(len(np.unique(labels)))
    names = list(dict.fromkeys(section))
    if len(names) > 1:
        per = {s: domain_scores(labels[section == s], truth[section == s]) for s in names}
        out["per_section"] = {s: {"ari": v["ari"], "nmi": v["nmi"]} for s, v in per.items()}
        out["mean_section_ari"] = float(np.mean([v["ari"] for v in per.values()]))
    return out


def score_record(rec: dict, r_check_max_cells: int) -> list[dict]:
    import numpy as np

    from napari_spatialssl.evaluation.clustering import kmeans
    from napari_spatialssl.evaluation.mclust import gmm_domains

    a = _read_case(rec["case"])
    truth, section = _truth_codes(a), a.obs["section"].astype(str).to_numpy()
    k, seed = int(a.uns["k"]), int(rec["seed"])
    z = np.load(ENV_ROOT / rec["embedding"], allow_pickle=False)
    assert (z["obs_names"] == np.asarray(a.obs_names).astype(str)).all(), "spots differ from the case file"
    rows = []
    for key in [f for f in z.files if f.startswith("emb::")]:
        name = key.split("::", 1)[1]
        emb = z[key].astype(np.float64)
        row = {"method": name, "run_method": rec["method"], "case": rec["case"], "seed": seed, "k": k,
               "n_cells": int(len(emb)), "dims": int(emb.shape[1]), "wall_seconds": rec["wall_seconds"]}
        t0 = time.perf_counter()
        row["kmeans"] = _scores(kmeans(emb, k, seed=seed), truth, section)
        row["gmm"] = _scores(gmm_domains(emb, k, seed=seed), truth, section)
        row["score_seconds"] = time.perf_counter() - t0
        if len(emb) <= r_check_max_cells:
            row["r_mclust"] = _r_check(emb, k, seed, truth, section)
        own = {f.split("::", 1)[1]: z[f] for f in z.files if f.startswith("own::")
               and f.split("::", 1)[1].startswith(name)}
        row["own"] = {o: _scores(v, truth, section) for o, v in own.items()}
        if name == "stagate" and len(emb) <= r_check_max_cells:
            _stagate_own(row, emb, k, truth, section)
        rows.append(row)
    return rows


def _r_check(emb, k: int, seed: int, truth, section) -> dict:
    """R's Mclust EEE on the same 20 leading components our GMM protocol uses, and its agreement with ours."""
    from sklearn.metrics import adjusted_rand_score

    from napari_spatialssl.evaluation.mclust import gmm_domains, leading_components

    lab, note = r_mclust(leading_components(emb, 20, seed=seed), k)
    if lab is None:
        return {"error": note}
    out = _scores(lab, truth, section)
    out["ari_vs_python_gmm"] = float(adjusted_rand_score(lab, gmm_domains(emb, k, seed=seed)))
    return out


def _stagate_own(row: dict, emb, k: int, truth, section) -> None:
    lab, note = r_mclust(emb, k)  # STAGATE's own protocol: mclust EEE on the raw 30-d embedding
    if lab is None:
        row["own_error"] = note
    else:
        row["own"]["stagate_mclust"] = _scores(lab, truth, section)
        row.pop("own_error", None)


def fill_r_checks(scores: Path, r_check_max_cells: int) -> int:
    """Add R's mclust check (and STAGATE's own R-mclust labels) to score rows made where R was
    missing; the file is rewritten whole (temporary file, then rename). Returns the rows filled."""
    import numpy as np

    if shutil.which("Rscript") is None:
        return 0
    rows, filled, cases = _records(scores), 0, {}
    for row in rows:
        missing = "error" in row.get("r_mclust", {"error": "absent"})
        missing_own = row["method"] == "stagate" and "stagate_mclust" not in row["own"]
        if (not (missing or missing_own) or row["n_cells"] > r_check_max_cells
                or not (ENV_ROOT / row["embedding"]).exists()):  # embeddings live outside git
            continue
        if row["case"] not in cases:  # each case file read once
            prepare_case(row["case"])
            a = _read_case(row["case"])
            cases[row["case"]] = _truth_codes(a), a.obs["section"].astype(str).to_numpy()
        truth, section = cases[row["case"]]
        emb = np.load(ENV_ROOT / row["embedding"], allow_pickle=False)[f"emb::{row['method']}"].astype(np.float64)
        if missing:
            row["r_mclust"] = _r_check(emb, row["k"], row["seed"], truth, section)
        if missing_own:
            _stagate_own(row, emb, row["k"], truth, section)
        filled += 1
        print(json.dumps({k: row[k] for k in ("method", "case", "seed")}
                         | {"r_mclust": round(row["r_mclust"].get("ari", float("nan")), 3)}), flush=True)
    if not filled:
        return 0
    tmp = scores.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in rows))
    tmp.replace(scores)
    return filled


def cmd_score(args) -> int:
    scores = RESULTS / "scores.jsonl"
    have = {(r["run_method"], r["case"], r["seed"], r.get("embedding")) for r in _records(scores)}
    for rec in _records(RESULTS / "runs.jsonl"):
        if rec["status"] != "ok" or (rec["method"], rec["case"], rec["seed"], rec["embedding"]) in have:
            continue
        for row in score_record(rec, args.r_check_max_cells):
            row["embedding"] = rec["embedding"]
            with scores.open("a") as fh:
                fh.write(json.dumps(row, default=float) + "\n")
            print(json.dumps({k: row[k] for k in ("method", "case", "seed")}
                             | {"kmeans": round(row["kmeans"]["ari"], 3), "gmm": round(row["gmm"]["ari"], 3),
                                "r_mclust": round(row.get("r_mclust", {}).get("ari", float("nan")), 3),
                                "own": {o: round(v["ari"], 3) for o, v in row["own"].items()}}), flush=True)
        have.add((rec["method"], rec["case"], rec["seed"], rec["embedding"]))
    if args.fill_r:
        fill_r_checks(scores, args.r_check_max_cells)
    return 0


# -- the write-up's tables -----------------------------------------------------------------------------

ORDER = ["spotscape", "patch-mae", "gnn-mask", "stagate", "graphst", "banksy-0.2", "banksy-0.8", "cellcharter",
         "novae", "pca"]


def _ms(values, fmt="{:.3f}") -> str:
    import numpy as np

    v = np.asarray([x for x in values if x is not None and x == x], float)
    if v.size == 0:
        return "-"
    if v.size == 1:
        return fmt.format(v[0])
    return f"{fmt.format(v.mean())} ± {fmt.format(v.std())}"


def latest_scores(rows: list[dict], runs: list[dict]) -> list[dict]:
    """The score rows of the latest ok run of each (method, case, seed): a rerun (for instance after
    a method's defaults changed) supersedes the earlier run, whose records stay in the files."""
    latest = {}
    for r in runs:  # runs.jsonl is appended in time order
        if r["status"] == "ok":
            latest[(r["method"], r["case"], r["seed"])] = r["embedding"]
    return [r for r in rows if latest.get((r["run_method"], r["case"], r["seed"])) == r.get("embedding")]


def cmd_report(args) -> int:
    runs = _records(RESULTS / "runs.jsonl")
    rows = latest_scores(_records(RESULTS / "scores.jsonl"), runs)
    for case in CASES:
        rs = [r for r in rows if r["case"] == case]
        ok = {(r["method"], r["seed"]) for r in runs if r["case"] == case and r["status"] == "ok"}
        bad = [r for r in runs if r["case"] == case and r["status"] != "ok"  # failures not since rerun
               and (r["method"], r["seed"]) not in ok]
        if not rs and not bad:
            continue
        multi = any("mean_section_ari" in r["kmeans"] for r in rs)
        print(f"\n### {case} (K = {rs[0]['k'] if rs else CASES[case]['k']}, {rs[0]['n_cells'] if rs else '?'} spots)\n")
        head = ["method", "seeds", "ARI k-means", "ARI GMM (mclust protocol)"]
        if multi:
            head += ["per-slice ARI, k-means / GMM (mean of slices, joint labels)"]
        head += ["R mclust EEE (same PCs)", "ARI of the method's own labels", "NMI k-means / GMM",
                 "wall time per run (s)"]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        names = sorted({r["method"] for r in rs}, key=lambda m: ORDER.index(m) if m in ORDER else 99)
        for m in names:
            g = sorted([r for r in rs if r["method"] == m], key=lambda r: r["seed"])
            cells = [m, ",".join(str(r["seed"]) for r in g), _ms(r["kmeans"]["ari"] for r in g),
                     _ms(r["gmm"]["ari"] for r in g)]
            if multi:
                cells.append(f"{_ms(r['kmeans'].get('mean_section_ari') for r in g)} / "
                             f"{_ms(r['gmm'].get('mean_section_ari') for r in g)}")
            rm = [r.get("r_mclust", {}) for r in g]
            cells.append(_ms(x.get("ari") for x in rm) + (f" (agrees with ours: ARI {_ms(x.get('ari_vs_python_gmm') for x in rm)})"
                                                          if any("ari_vs_python_gmm" in x for x in rm) else ""))
            owns = sorted({o for r in g for o in r["own"]})
            cells.append("; ".join(f"{o}: {_ms(r['own'][o]['ari'] for r in g if o in r['own'])}"
                                   f" ({_ms((r['own'][o]['n_clusters'] for r in g if o in r['own']), '{:.0f}')} clusters)"
                                   for o in owns) or "-")
            cells.append(f"{_ms(r['kmeans']['nmi'] for r in g)} / {_ms(r['gmm']['nmi'] for r in g)}")
            cells.append(", ".join(f"{r['wall_seconds']:.0f}" for r in g))
            print("| " + " | ".join(cells) + " |")
        for r in bad:
            print(f"\n- **{r['method']} seed {r['seed']}: {r['status']}** after {r.get('wall_seconds')} s: "
                  f"`{(r.get('error') or '').strip().splitlines()[0] if r.get('error') else ''}`")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("--peers", default=",".join(PEERS))
    r = sub.add_parser("run")
    r.add_argument("--methods", default=",".join([*OURS, *PEERS]))
    r.add_argument("--cases", default="151673")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--timeout", type=float, default=5400.0, help="seconds per run")
    r.add_argument("--again", action="store_true",
                   help="rerun even when an ok record exists; the new run supersedes it in `report`")
    w = sub.add_parser("worker")
    w.add_argument("--method", required=True)
    w.add_argument("--case", required=True)
    w.add_argument("--seed", type=int, required=True)
    w.add_argument("--out", required=True)
    c = sub.add_parser("score")
    c.add_argument("--r-check-max-cells", type=int, default=8000,
                   help="run R's mclust as a check on cases up to this many spots (its hierarchical start is O(n^2))")
    c.add_argument("--fill-r", action="store_true",
                   help="also add R's mclust check to rows scored earlier where R was not installed")
    sub.add_parser("report")
    args = p.parse_args(argv)
    return {"setup": cmd_setup, "run": cmd_run, "worker": cmd_worker, "score": cmd_score,
            "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
