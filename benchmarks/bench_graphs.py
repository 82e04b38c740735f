"""Graph building and shard reading throughput, against baselines run in the same process.

    python benchmarks/bench_graphs.py [--dataset ph] [--cutoff 8] [--max-neighbors 12] [--repeat 3]

On the same parsed structures (default: the 1,265 matbench phonons) it times

- ``ltc``: ``ltc.graphs.structure_to_graph`` (neighbour list, nearest-k, vectors);
- ``cgcnn-ref``: CGCNN's reference featurisation (``get_all_neighbors`` per structure, then Python
  sorting and loops over each atom's neighbours, as ``cgcnn/data.py``);
- ``bare``: pymatgen's ``Structure.get_neighbor_list`` alone, the floor for any approach built on it;

then the whole ``prepare`` (read, parse, build, write, one process) and reading the shards into PyG
batches of 64 on one thread. Aims: ltc >= 20x cgcnn-ref, ltc <= 2x bare, reading >= 20,000 graphs/s.

Then the cost of each graph construction (``ltc.graphs.CONSTRUCTIONS``: "knn", and "jarvis", ALIGNN's
reference graphs) as a ratio against "knn" in the same process: graphs/s, ``prepare`` structures/s, shard
reading graphs/s, edges per atom, and line-graph edges (bond pairs, ALIGNN's angles) per atom, with the
line graph each construction is trained with ("jarvis" keeps the pairs a→b→a).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from ltc import datasets
from ltc.graphs import CONSTRUCTIONS, GraphConfig, structure_to_graph
from ltc.models.alignn import line_graph
from ltc.shards import ShardSet, collate_graphs, prepare


def cgcnn_reference(structure, radius: float, max_num_nbr: int) -> tuple[list, list]:
    """CGCNN's ``CIFData.__getitem__`` neighbour featurisation (txie-93/cgcnn, data.py)."""
    all_nbrs = structure.get_all_neighbors(radius, include_index=True)
    all_nbrs = [sorted(nbrs, key=lambda x: x[1]) for nbrs in all_nbrs]
    nbr_fea_idx, nbr_fea = [], []
    for nbr in all_nbrs:
        if len(nbr) < max_num_nbr:
            nbr_fea_idx.append(list(map(lambda x: x[2], nbr)) + [0] * (max_num_nbr - len(nbr)))
            nbr_fea.append(list(map(lambda x: x[1], nbr)) + [radius + 1.0] * (max_num_nbr - len(nbr)))
        else:
            nbr_fea_idx.append(list(map(lambda x: x[2], nbr[:max_num_nbr])))
            nbr_fea.append(list(map(lambda x: x[1], nbr[:max_num_nbr])))
    return nbr_fea_idx, nbr_fea


def best_of(fn, repeat: int) -> float:
    """Fastest of ``repeat`` runs, in seconds."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def line_graph_edges(graphs: list, backtracking: bool, chunk: int = 256) -> int:
    """Line-graph edges (bond pairs) of ``graphs``, as ALIGNN builds them per batch."""
    total = 0
    for i in range(0, len(graphs), chunk):
        b = collate_graphs(graphs[i : i + chunk])
        total += int(line_graph(b.edge_index, b.edge_vec, b.num_nodes, backtracking=backtracking)[0].shape[1])
    return total


def prepare_and_read(name: str, config: GraphConfig, batch_size: int, repeat: int) -> tuple[float, float, float]:
    """(prepare seconds, one process; shard set open seconds; reading graphs/s), in a fresh cache."""
    with tempfile.TemporaryDirectory() as cache:
        res = prepare(name, graph=config, cache=cache, workers=1)
        t = time.perf_counter()
        shards = ShardSet(res.path)
        open_s = time.perf_counter() - t
        epochs = 5

        def read_all() -> int:
            k = 0
            for e in range(epochs):
                for b in shards.iter_batches(batch_size, shuffle=True, seed=e):
                    k += b.num_graphs
            return k

        read_all()  # warm the page cache
        read_s = best_of(read_all, repeat)
        return res.seconds, open_s, epochs * len(shards) / read_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ph")
    ap.add_argument("--cutoff", type=float, default=8.0)
    ap.add_argument("--max-neighbors", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=3, help="runs per timing; the fastest is kept")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    configs = {
        name: GraphConfig(cutoff=args.cutoff, max_neighbors=args.max_neighbors, construction=name)
        for name in CONSTRUCTIONS
    }
    config = configs["knn"]

    raw = datasets.read(args.dataset)
    t = time.perf_counter()
    structures = [datasets.parse_structure(r.fmt, r.payload) for r in raw.records]
    parse_s = time.perf_counter() - t
    n = len(structures)
    n_atoms = sum(len(s) for s in structures)
    print(f"{args.dataset}: {n} structures, {n_atoms / n:.1f} atoms on average, {config}")

    bare = best_of(lambda: [s.get_neighbor_list(config.cutoff) for s in structures], args.repeat)
    ours = best_of(lambda: [structure_to_graph(s, config=config) for s in structures], args.repeat)
    ref = best_of(lambda: [cgcnn_reference(s, config.cutoff, config.max_neighbors) for s in structures], 1)
    full, open_s, read_rate = prepare_and_read(args.dataset, config, args.batch_size, args.repeat)

    rows = [
        ("parse (pymatgen Structure)", n / parse_s, ""),
        ("bare get_neighbor_list", n / bare, ""),
        ("cgcnn-ref featurisation", n / ref, ""),
        ("ltc structure_to_graph", n / ours, ""),
        ("ltc prepare, end to end, 1 process", n / full, "read+parse+graph+write"),
    ]
    print(f"\n{'step':40s} {'structures/s':>14s}")
    for name, rate, note in rows:
        print(f"{name:40s} {rate:14,.0f}  {note}")
    print(f"\nltc vs cgcnn-ref: {ref / ours:6.1f}x faster   (aim >= 20x)")
    print(f"ltc vs bare call: {ours / bare:6.2f}x the time (aim <= 2x)")
    print(f"\nopen shard set: {open_s * 1e3:.1f} ms")
    print(f"read shards into PyG batches of {args.batch_size}, 1 thread: {read_rate:,.0f} graphs/s (aim >= 20,000)")

    # Each construction, against "knn" run here.
    costs = {}
    for name, cfg in configs.items():
        seconds = best_of(lambda cfg=cfg: [structure_to_graph(s, config=cfg) for s in structures], args.repeat)
        graphs = [structure_to_graph(s, config=cfg) for s in structures]
        edges = sum(g.num_edges for g in graphs)
        pairs = line_graph_edges(graphs, backtracking=cfg.line_graph_backtracking)
        prep, _, read = prepare_and_read(args.dataset, cfg, args.batch_size, args.repeat)
        costs[name] = {
            "graphs/s": n / seconds,
            "prepare structures/s": n / prep,
            "read graphs/s": read,
            "edges/atom": edges / n_atoms,
            "line-graph edges/atom": pairs / n_atoms,
        }
    print(f"\ngraph constructions ({args.cutoff:g} Å, {args.max_neighbors} neighbours), ratio to knn in brackets:")
    print(f"{'':24s}" + "".join(f"{name:>20s}" for name in costs))
    for key in costs["knn"]:
        cells = [f"{c[key]:,.1f} ({c[key] / costs['knn'][key]:.2f}x)" for c in costs.values()]
        print(f"{key:24s}" + "".join(f"{cell:>20s}" for cell in cells))


if __name__ == "__main__":
    main()
