"""Training throughput and peak memory per model, and the share of each step spent outside the model.

    python benchmarks/bench_train.py [--models cgcnn megnet alignn chgnet] [--batch-size 64] [--batches 18]
                                     [--device auto] [--threads N]

On the phonons shards (training split) built with each model's default graphs (``ltc.train.DEFAULT_GRAPHS``:
chgnet reads CHGNet's own graphs, with its bond graph), for each model it runs optimisation steps two ways in
this process, with the same model and batches of the same graphs:

- ``ltc``: ``ShardSet.batch`` gathers each batch from the memory-mapped shards;
- ``pyg``: the usual PyG path, a ``DataLoader`` over in-memory ``Data`` objects (``Batch.from_data_list``);
  not for chgnet, whose bond graph PyG's collate cannot offset.

It prints graphs/s, seconds per epoch of the 1,012-graph split, the share of wall time spent building batches
and moving them to the device (aim: under 10 % for ltc), and the peak memory of training: on a GPU
``torch.cuda.max_memory_allocated``, on the CPU the process's peak RSS above its RSS before the model was built
(sampled every 5 ms). Each model runs in a fresh process (so one model's freed memory does not hide the
next one's peak); ratios are against megnet. ALIGNN runs at the paper's size
(hidden 256, 4+4 layers) on fewer batches; chgnet at CHGNet 0.3.0's size (its pretrained weights; a
fine-tuning run trains the same network).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
import torch
from torch_geometric.loader import DataLoader

from ltc.models import PRETRAINED, build_model
from ltc.shards import ShardSet
from ltc.splits import make_split
from ltc.train import DEFAULT_GRAPHS, resolve_device

BASELINE = "megnet"  # ratios are against this model (ParAIsite's backbone)


@contextmanager
def peak_memory(device: torch.device):
    """Yields a callable giving the peak memory (MB) of the block: CUDA allocations, or CPU RSS growth."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield lambda: torch.cuda.max_memory_allocated(device) / 2**20
        return
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: (peak[0] - base) / 2**20
    finally:
        done.set()
        thread.join()


def make_model(name: str) -> torch.nn.Module:
    """A fresh model; chgnet with CHGNet 0.3.0's pretrained weights (what a fine-tuning run trains)."""
    pretrained = [p for p in PRETRAINED.values() if p.model == name]
    return pretrained[0].load()[0] if pretrained else build_model(name)


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


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """One model's best run per path: {path: (seconds, data seconds, graphs)}, seconds per epoch, peak MB."""
    shards = ShardSet.open("ph", graph=DEFAULT_GRAPHS[name])
    train = make_split(shards, size=None, seed=0).train
    y = torch.from_numpy(((shards.y - shards.y.mean()) / shards.y.std()).astype(np.float32))

    def y_of(b):
        return y[b.idx]

    n_batches = args.alignn_batches if name == "alignn" else args.batches
    idx = np.random.default_rng(0).permutation(train)[: n_batches * args.batch_size]
    chunks = [idx[i : i + args.batch_size] for i in range(0, len(idx), args.batch_size)]
    with peak_memory(device) as peak:
        torch.manual_seed(0)
        model = make_model(name).to(device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        # warm-up step (allocator, lazy init) outside the timings
        run(model, [shards.batch(chunks[0])], y_of, device, opt)
        # PyG's collate cannot offset CHGNet's bond graph (edge indices inside angle_edges): ltc's path only
        paths = ["ltc"] if shards.graph.construction == "chgnet" else ["ltc", "pyg"]
        loader = DataLoader([shards.get(int(i)) for i in idx], batch_size=args.batch_size, shuffle=False)
        # alternate the two paths and keep each one's best run: this machine's load varies
        runs: dict[str, list[tuple[float, float, int]]] = {k: [] for k in paths}
        for _ in range(args.repeat):
            runs["ltc"].append(run(model, (shards.batch(c) for c in chunks), y_of, device, opt))
            if "pyg" in runs:
                runs["pyg"].append(run(model, loader, y_of, device, opt))
        peak_mb = peak()
    best = {k: min(v, key=lambda r: r[0]) for k, v in runs.items()}
    total, _, graphs = best["ltc"]
    return {"name": name, "params": model.num_parameters(), "n_train": len(train), "best": best,
            "epoch": len(train) * total / graphs, "peak_mb": peak_mb}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["cgcnn", "megnet", "alignn", "chgnet"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=18, help="batches per timing (18 = one epoch of the split)")
    ap.add_argument("--alignn-batches", type=int, default=4, help="batches for paper-size ALIGNN")
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs per path; the fastest is kept")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this model, print JSON
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.one:
        print(json.dumps(measure(args.one, args, device)))
        return
    print(f"batch {args.batch_size}; device {device}; {torch.get_num_threads()} CPU threads")
    head = ("model", "params", "path", "graphs/s", "s/epoch", "outside model", "peak MB")
    print("{:8s} {:>10s} {:5s} {:>10s} {:>8s} {:>14s} {:>8s}".format(*head))
    results = {}
    for name in args.models:
        # each model in a fresh process: a process's RSS does not shrink after a model is freed, so the peak
        # of the next one would be hidden in what the allocator kept
        cmd = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = results[name] = json.loads(out)
        for label, (total, data, graphs) in r["best"].items():
            rate, share = graphs / total, 100 * data / total
            mb = f"{r['peak_mb']:8.0f}" if label == "ltc" else ""
            print(f"{name:8s} {r['params']:>10,} {label:5s} {rate:10,.1f} {r['n_train'] / rate:8.2f} "
                  f"{share:13.1f}% {mb}")  # fmt: skip
        if "pyg" in r["best"]:
            faster = r["best"]["pyg"][1] / max(r["best"]["ltc"][1], 1e-12)
            print(f"{'':8s} {'':>10s} ltc batches built {faster:.1f}x faster than PyG's collate")
    if BASELINE in results:
        base = results[BASELINE]
        for name, r in results.items():
            print(
                f"{name}: {r['epoch'] / base['epoch']:.2f}x {BASELINE}'s seconds per epoch, "
                f"{r['peak_mb'] / max(base['peak_mb'], 1e-9):.2f}x its peak memory"
            )


if __name__ == "__main__":
    main()
