"""Which target transform each built-in dataset should default to, measured on its training data only.

    python benchmarks/bench_targets.py [--datasets pz dc ph ...] [--max-size 400] [--folds 5] [--epochs 30]
                                       [--out results/bench_targets.json]

For every dataset: the pool a run trains from (``splits.training_pool`` with ``paper_or_seeded``: Devi et al.'s
test file where one exists, else ltc's seeded 10 % test set, is left out, so no test structure is ever seen),
a seeded subsample of at most ``--max-size`` structures (the FT sizes ltc's sweeps use: 100 to 800), then K-fold
inside it. Each fold is held out once; the rest trains CGCNN (its default config and graphs, a fixed budget of
``--epochs`` epochs, lr 1e-3, batch 64, one-cycle) with a run's validation share of it (``splits.val_count``)
keeping the epoch. Every candidate transform trains on the same folds with the same seed, so the folds pair them.

Candidates: ``minmax`` (Devi et al.'s, to [-1, 1]) and ``standardize`` for every set; for positive heavy-tailed
targets (all >= 0 and sample skewness > ``SKEW``) also ``log10p1+standardize`` (log10(1 + y), then standardised,
ParAIsite's for kappa).

Judged on the held-out folds by the dataset's headline metric (R², or MAE of log10 kappa), in raw units. The rule,
fixed before any run: the candidate with the best mean headline becomes the dataset's default only if its paired
interval against the current default (95 %, corrected resampled t over the folds) lies wholly on the better side;
otherwise the current default stays ("no significant difference" keeps the incumbent).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from scipy import stats as sps

from ltc.choices import DEFAULT_GRAPHS, RunConfig, TrainConfig
from ltc.datasets import REGISTRY
from ltc.inputs import resolve_inputs
from ltc.splits import Split, SplitConfig, training_pool, val_count
from ltc.stats import kfold_test_train_ratio, paired_compare
from ltc.targets import HEADLINE, TargetScaler, regression_metrics
from ltc.train import Task, _fresh_model, fit, predict, start_heads_at_mean

MODEL = "cgcnn"
SKEW = 1.0  # |skewness| > 1 is the usual "highly skewed"; only then is a log transform a candidate
LOG = "log10p1+standardize"


def candidates(y: np.ndarray, incumbent: str) -> tuple[list[str], float]:
    """The transforms worth trying on targets ``y`` (training pool), the current default always among them, and
    their sample skewness."""
    skew = float(sps.skew(y))
    out = ["minmax", "standardize"]
    if y.min() >= 0 and skew > SKEW:
        out.append(LOG)
    return (out if incumbent in out else [*out, incumbent]), skew


def folds_of(n: int, k: int, seed: int) -> np.ndarray:
    """(n,) fold number of each of n positions, balanced, seeded."""
    return np.random.default_rng(seed).permutation(np.arange(n) % k)


def run_dataset(name: str, args: argparse.Namespace) -> dict:
    graph = DEFAULT_GRAPHS[MODEL]
    split = SplitConfig(test="paper_or_seeded")
    inputs = resolve_inputs([name], graph=graph, split=split, progress=True)
    shards = inputs.open_shards(name)
    pool = training_pool(shards, split, ids=inputs.split_ids(name))
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(pool, size=min(args.max_size, len(pool)), replace=False))
    kappa = shards.target.kappa
    headline = HEADLINE[kappa]
    incumbent = REGISTRY[name].transform
    names, skew = candidates(shards.y[pool], incumbent)
    fold = folds_of(len(chosen), args.folds, args.seed)
    scores: dict[str, list[float]] = {t: [] for t in names}
    maes: dict[str, list[float]] = {t: [] for t in names}
    t0 = time.perf_counter()
    for k in range(args.folds):
        held = chosen[fold == k]
        rest = rng.permutation(chosen[fold != k])
        n_val = val_count(len(rest), split)  # as a run splits its training part
        parts = Split(train=np.sort(rest[n_val:]), val=np.sort(rest[:n_val]), test=np.sort(held))
        for t in names:
            task = Task(name, shards, parts, TargetScaler.fit(t, shards.y[parts.train]), kappa=kappa)
            train = TrainConfig(epochs=args.epochs, batch_size=64, lr=1e-3, seed=args.seed + k)
            # the fresh model a run builds (same seed per fold for every transform): the pairing is the transform
            model = _fresh_model(RunConfig((name,), model=MODEL, train=train), graph)
            start_heads_at_mean(model, [task])
            fit(model, [task], train)
            m = regression_metrics(shards.y[held], predict(model, task, held, head=0), kappa=kappa)
            scores[t].append(float("nan") if m[headline.metric] is None else float(m[headline.metric]))
            maes[t].append(float(m["mae"]))
        print(f"  {name} fold {k + 1}/{args.folds}: {time.perf_counter() - t0:.0f} s", flush=True)
    ratio = kfold_test_train_ratio(args.folds)
    versus = {
        t: asdict(
            paired_compare(
                scores[t], scores[incumbent], higher_is_better=headline.higher_is_better, test_train_ratio=ratio
            )
        )
        for t in names
        if t != incumbent
    }
    sign = 1 if headline.higher_is_better else -1
    best = max(names, key=lambda t: sign * np.nanmean(scores[t]))
    beats = best != incumbent and bool(versus[best]["significant"]) and sign * versus[best]["mean_diff"] > 0
    return {
        "dataset": name,
        "n": len(chosen),
        "pool": len(pool),
        "skew": skew,
        "metric": headline.metric,
        "incumbent": incumbent,
        "scores": scores,
        "mae": maes,
        "versus_incumbent": versus,
        "best_mean": best,
        "winner": best if beats else incumbent,
        "seconds": time.perf_counter() - t0,
    }


def _pm(x: list[float]) -> str:
    a = np.asarray(x, dtype=float)
    return f"{np.nanmean(a):.3f} ± {np.nanstd(a, ddof=1):.3f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| dataset | n | skew | metric | transform | held-out folds (mean ± sd) | MAE (raw units) "
        "| minus current default [95 %] (mae_log10: + is worse), better on | default |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for t, s in r["scores"].items():
            v = r["versus_incumbent"].get(t)
            diff = "(current default)" if v is None else (
                "not judged" if v["ci_low"] is None else
                f"{v['mean_diff']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}], {v['wins']} of {v['n_pairs']}"
            )  # fmt: skip
            mark = "**winner**" if t == r["winner"] else ""
            lines.append(
                f"| {r['dataset']} | {r['n']} | {r['skew']:.1f} | {r['metric']} | {t} | {_pm(s)} | {_pm(r['mae'][t])} "
                f"| {diff} | {mark} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(REGISTRY))
    p.add_argument("--max-size", type=int, default=400)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/bench_targets.json"))
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for name in args.datasets:
        rows.append(run_dataset(name, args))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
