"""Leiden iterations on a large embedding graph: is "until the partition stops changing" worth it?

Runs igraph's Leiden one iteration at a time (each from the previous partition) at the given
resolutions on the 15-NN graph (pynndescent) of an embedding, printing per iteration: seconds,
communities, modularity at that resolution, cells whose community id changed (igraph renumbers
communities, so this is not a count of moves) and the ARI against reference labels. Behind
`clustering.leiden_iterations` (2 iterations above 150k cells).

    python benchmarks/leiden_iterations.py EMBEDDING.npy LABELS.npy 0.3 1.0

(e.g. the gnn-mask embedding and planted domains of a 400k-cell synthetic slide, saved with
np.save; recorded in results/scale/leiden_iterations_400k.txt)
"""
import sys, time, numpy as np, random
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from napari_spatialssl.evaluation import clustering as C
import igraph as ig
from sklearn.metrics import adjusted_rand_score as ari
E = np.load(sys.argv[1]); dom = np.load(sys.argv[2])
t = time.perf_counter(); edges = C._knn_edges(E, 15, 0, "approximate"); print("knn", round(time.perf_counter()-t,1), flush=True)
g = C._edges_igraph(len(E), edges)
for r in map(float, sys.argv[3:]):
    random.seed(0); ig.set_random_number_generator(random)
    memb = None; t0 = time.perf_counter()
    for it in range(1, 31):
        t = time.perf_counter()
        p = g.community_leiden(objective_function="modularity", resolution=r, n_iterations=1, initial_membership=memb)
        new = np.asarray(p.membership)
        changed = None if memb is None else int((new != np.asarray(memb)).sum())
        print(f"res {r} iter {it} {time.perf_counter()-t:.1f}s k {new.max()+1} Q {g.modularity(new.tolist(), resolution=r):.4f} changed {changed} ari_planted {ari(dom, new):.3f}", flush=True)
        if changed == 0: break
        memb = new.tolist()
    print("total", round(time.perf_counter()-t0,1), flush=True)
