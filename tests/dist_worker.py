"""One rank of the 2-process equality test (tests/test_distributed.py), also used by
benchmarks/distributed.py: trains each method for a few steps on a small synthetic slide and
writes the loss history, the weights and the wall time (rank 0), or only the step count (others).

python tests/dist_worker.py OUT_DIR METHOD[,METHOD...] [--size quick|bench]
(RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the environment; WORLD_SIZE=1 = alone)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_spatialssl import distributed
from napari_spatialssl.data.synthetic import synthetic_slide
from napari_spatialssl.pipeline import dataset_from_config, make_config
from napari_spatialssl.models.base import get_method_class
from napari_spatialssl.training import Trainer, seed_everything

# Dropout draws are each rank's own (as in any data-parallel training), so the equality runs use none.
SETTINGS = {
    "quick": {
        "slide": dict(n_cells=1200, n_genes=40, n_sections=2, n_cell_types=6, n_domains=4),
        "gnn-mask": {"epochs": 2, "hidden_dims": [32, 16], "decoder_hidden": 32, "dropout": 0.0, "radius": 40.0,
                     "graph_mode": "egonet", "batch_size": 200},
        "gnn-mask-whole": {"epochs": 3, "hidden_dims": [32, 16], "decoder_hidden": 32, "dropout": 0.0,
                           "radius": 40.0, "graph_mode": "whole", "sections_per_step": 2},
        "spotscape": {"epochs": 3, "hidden_dims": [32, 8], "recon_spots": 128, "proto_start_epoch": 2,
                      "eval.n_domains": 4, "data.preprocess.n_top_genes": None, "data.section_key": "section"},
        "patch-mae": {"epochs": 2, "patch_size": 8, "n_channels": 12, "patches_per_epoch": 64, "batch_size": 32,
                      "dim": 16, "decoder_dim": 16, "depth": 1, "data.section_key": "section"},
        # rank 0 asks to stop after its second step (tests: every rank stops after the same step)
        "gnn-mask-stop": {"epochs": 3, "hidden_dims": [16], "decoder_hidden": 16, "radius": 40.0,
                          "graph_mode": "egonet", "batch_size": 100},
    },
    # benchmarks/distributed.py: larger steps, so that the compute is worth splitting
    "bench": {
        "slide": dict(n_cells=60000, n_genes=200, n_sections=4, n_cell_types=10, n_domains=6),
        "gnn-mask": {"epochs": 1, "dropout": 0.0, "radius": 25.0, "graph_mode": "egonet", "batch_size": 4096},
        "gnn-mask-whole": {"epochs": 2, "dropout": 0.0, "radius": 25.0, "graph_mode": "whole",
                           "sections_per_step": 4},
        "spotscape": {"epochs": 3, "proto_start_epoch": 2, "eval.n_domains": 6, "data.preprocess.n_top_genes": None,
                      "data.section_key": "section"},
        "patch-mae": {"epochs": 1, "patches_per_epoch": 256, "batch_size": 64, "data.section_key": "section"},
    },
}


def run(out: Path, methods: list[str], size: str, ctx) -> None:
    rank = ctx.rank if ctx is not None else 0
    adata = synthetic_slide(**SETTINGS[size]["slide"], seed=3)
    record = {}
    for name in methods:
        method_id = "gnn-mask" if name.startswith("gnn-mask") else name
        cfg = make_config(method_id, {**SETTINGS[size][name], "device": "cpu", "seed": 5, "patience": 0})
        data = dataset_from_config(adata, cfg)
        seed_everything(cfg.seed)
        method = get_method_class(method_id)(cfg)
        method.prepare(data)
        trainer = Trainer(cfg, dist=ctx)
        if name.endswith("-stop") and rank == 0:
            trainer.listener = lambda e, t=trainer: t.stop() if e.kind == "step" and e.step == 2 else None
        if ctx is not None:
            ctx.barrier()
        t0 = time.perf_counter()
        result = trainer.fit(method)
        seconds = time.perf_counter() - t0
        steps = sum(h["steps"] for h in result.history)
        record[name] = {"seconds": seconds, "steps": steps, "history": result.history,
                        "stopped": result.stopped_by_user}
        if name == "spotscape":
            # What the trained model computes, with batch statistics (as in training): batch norm then
            # cancels the weight directions whose gradient is zero (see tests/test_distributed.py).
            from napari_spatialssl.models.spotscape import GraphTensors, _to_device_matrix

            dev = torch.device("cpu")
            with torch.no_grad():
                method.model.train()
                z = method.model.encode(_to_device_matrix(data.X, dev), GraphTensors(method.graph, dev).normalised())
            record[name]["embedding"] = z.tolist()
        if rank == 0:
            torch.save({k: v.detach().cpu() for k, v in method.model.state_dict().items()}, out / f"{name}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def main(argv: list[str]) -> int:
    out, methods = Path(argv[0]), argv[1].split(",")
    size = argv[3] if len(argv) > 3 and argv[2] == "--size" else "quick"
    out.mkdir(parents=True, exist_ok=True)
    ctx = distributed.context_from_env()
    if ctx is None:
        torch.set_num_threads(int(__import__("os").environ.get("SPATIALSSL_THREADS", "1")))
    try:
        run(out, methods, size, ctx)
    finally:
        distributed.shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
