"""Sweep throughput on the local Ray: many short FT trials, and how much of the workers' time is training.

    python benchmarks/bench_sweep.py [--trials 200] [--epochs 12] [--cpus N] [--gpu 0.25]

Runs a sweep whose FT stage has ``--trials`` short trials (CGCNN, ~1 s of training each, on HH143
from an L96 model), then the same trainings one after another in this process without Ray (the
baseline). Prints trials/s for both and, for the sweep, the share of worker slot-time spent inside
training (``fit``) and inside the whole stage run (``train_run``: load, split, train, evaluate, save).
Aim: >= 85 % inside training. With ``--gpu`` the trials take that GPU fraction each (several per GPU).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from ltc.config import from_dict
from ltc.inputs import resolve_inputs
from ltc.splits import SplitConfig
from ltc.sweep import SweepSpec, run_sweep
from ltc.train import train_run
from ltc.trial import run_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    ap.add_argument("--gpu", type=float, default=0.0, help="GPU fraction per trial")
    ap.add_argument("--baseline", type=int, default=20, help="trials run in-process for the baseline")
    args = ap.parse_args()
    import ray

    ray.init(
        address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1"
    )
    seeds = list(range(args.trials // 4))
    spec = from_dict(SweepSpec, {
        "name": "bench",
        "model_config": {"hidden": 32, "n_blocks": 3, "fc_dim": 32},
        "asha": None,
        "resources": {"cpu": 1, "gpu": args.gpu},
        "search": {"trials": 4, "lr": {"low": 1e-3, "high": 1e-2}},
        "stages": [
            {"name": "pt", "datasets": ["l96"], "epochs": 5, "batch_size": 16, "search": {"trials": 1, "lr": 3e-3}},
            {"name": "ft", "datasets": ["hh143"], "start_from": {"stage": "pt"}, "sizes": [100], "seeds": seeds,
             "strategies": ["blocks"], "epochs": args.epochs, "batch_size": 16},
        ],
    })  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trials = run_sweep(spec, results=tmp)
        total_wall = time.perf_counter() - t0
        ft = trials[trials.stage == "ft"]
        window = ft.finished.max() - ft.started.min()
        slots = args.cpus if args.gpu == 0 else min(args.cpus, int(ray.cluster_resources().get("GPU", 0) / args.gpu))
        n = len(ft)
        mean_train = ft.train_seconds.mean()
        print(f"\n{n} FT trials, {args.epochs} epochs each, {slots} slots; training {mean_train:.2f} s/trial")
        print(f"sweep:    {n / window:6.2f} trials/s over the FT stage ({window:.1f} s; whole run {total_wall:.1f} s)")
        train_share = ft.train_seconds.sum() / (slots * window)
        stage_share = ft.wall_seconds.sum() / (slots * window)
        print(f"          worker slot-time inside training: {100 * train_share:.1f} %  (aim >= 85 %)")
        print(f"          worker slot-time inside train_run: {100 * stage_share:.1f} %")
        if args.gpu:
            print(
                f"          trials per GPU at a time: {1 / args.gpu:g}; GPUs: {ray.cluster_resources().get('GPU', 0):g}"
            )

        # baseline: the same kind of trials, one after another in this process, no Ray
        rows = ft.head(args.baseline)
        # resolved once, as the driver does per stage (shards verified, split ids written)
        inputs = resolve_inputs(["hh143"], graph=spec.graph_config, split=SplitConfig())
        t0 = time.perf_counter()
        for i, (_, row) in enumerate(rows.iterrows()):
            config = {
                "datasets": ["hh143"], "kind": "finetune", "strategy": "blocks", "n_unfrozen": int(row.n_unfrozen),
                "lr": float(row.lr), "seed": int(row.seed), "size": 100, "max_size": None, "init": row.init,
                "graph": spec.graph_config.to_dict(), "split": {"test": "seeded", "test_fraction": 0.1},
                "holdout": [], "train": {"epochs": args.epochs, "batch_size": 16},
            }  # fmt: skip
            train_run(run_config(config), Path(tmp) / f"base{i}", inputs=inputs)
        base = (time.perf_counter() - t0) / len(rows)
        print(f"baseline: {1 / base:6.2f} trials/s sequentially in one process ({base:.2f} s/trial)")
        print(f"sweep / baseline: {n / window * base:.2f}x")


if __name__ == "__main__":
    main()
