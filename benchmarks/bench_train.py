"""Training throughput per model, and the share of each step spent outside the model.

    python benchmarks/bench_train.py [--models cgcnn megnet alignn] [--batch-size 64] [--batches 18]
                                     [--device auto] [--threads N]

On the phonons shards (training split), for each model it runs optimisation steps two ways in this
process, with the same model and batches of the same graphs:

- ``ltc``: ``ShardSet.batch`` gathers each batch from the memory-mapped shards;
- ``pyg``: the usual PyG path, a ``DataLoader`` over in-memory ``Data`` objects (``Batch.from_data_list``).

It prints graphs/s and the share of wall time spent building batches and moving them to the device
(aim: under 10 % for ltc). ALIGNN runs at the paper's size (hidden 256, 4+4 layers) on fewer batches.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch_geometric.loader import DataLoader

from ltc.models import build_model
from ltc.shards import ShardSet
from ltc.splits import make_split
from ltc.train import resolve_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(model, batches, y_of, device, opt) -> tuple[float, float, int]:
    """(total seconds, data seconds, graphs) over an iterator of CPU batches."""
    model.train()
    total = data = 0.0
    graphs = 0
    t_prev = time.perf_counter()
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        batch = batch.to(device, non_blocking=True)
        target = y_of(batch).to(device)
        sync(device)
        t1 = time.perf_counter()
        data += t1 - t0
        loss = torch.nn.functional.mse_loss(model(batch)[:, 0], target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        graphs += batch.num_graphs
    total = time.perf_counter() - t_prev
    return total, data, graphs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["cgcnn", "megnet", "alignn"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=18, help="batches per timing (18 = one epoch of the split)")
    ap.add_argument("--alignn-batches", type=int, default=4, help="batches for paper-size ALIGNN")
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs per path; the fastest is kept")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    shards = ShardSet.open("ph")
    train = make_split(shards, size=None, seed=0).train
    y = torch.from_numpy(((shards.y - shards.y.mean()) / shards.y.std()).astype(np.float32))
    print(f"ph training split: {len(train)} graphs; batch {args.batch_size}; device {device}; "
          f"{torch.get_num_threads()} CPU threads")  # fmt: skip
    print(f"{'model':8s} {'params':>10s} {'path':5s} {'graphs/s':>10s} {'outside model':>14s}")
    for name in args.models:
        n_batches = args.alignn_batches if name == "alignn" else args.batches
        idx = np.random.default_rng(0).permutation(train)[: n_batches * args.batch_size]
        chunks = [idx[i : i + args.batch_size] for i in range(0, len(idx), args.batch_size)]
        torch.manual_seed(0)
        model = build_model(name).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        # warm-up step (allocator, lazy init) outside the timings
        run(model, [shards.batch(chunks[0])], lambda b: y[b.idx], device, opt)

        data_list = [shards.get(int(i)) for i in idx]
        loader = DataLoader(data_list, batch_size=args.batch_size, shuffle=False)
        # alternate the two paths and keep each one's best run: this machine's load varies
        runs: dict[str, list[tuple[float, float, int]]] = {"ltc": [], "pyg": []}
        for _ in range(args.repeat):
            runs["ltc"].append(run(model, (shards.batch(c) for c in chunks), lambda b: y[b.idx], device, opt))
            runs["pyg"].append(run(model, loader, lambda b: y[b.idx], device, opt))
        ltc, pyg = (min(runs[k], key=lambda r: r[0]) for k in ("ltc", "pyg"))
        for label, (total, data, graphs) in (("ltc", ltc), ("pyg", pyg)):
            rate, share = graphs / total, 100 * data / total
            print(f"{name:8s} {model.num_parameters():>10,} {label:5s} {rate:10,.1f} {share:13.1f}%")
        print(f"{'':8s} {'':>10s} ltc batches built {pyg[1] / max(ltc[1], 1e-12):.1f}x faster than PyG's collate")


if __name__ == "__main__":
    main()
