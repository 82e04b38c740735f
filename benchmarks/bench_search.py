"""Does ltc's search select better models than random search, at the budgets ltc's sweeps use?

    python benchmarks/bench_search.py [--repeats 5] [--budgets 3 6 12] [--workers 2] [--families l96 ph]

Two real fine-tuning settings, both from one CGCNN pre-trained on 800 AGL kappa values (15 epochs;
L96 and PH test formulas held out):

- ``l96``: L96 kappa under 5-fold CV (one repeat), strategy ``all``, lr searched in [1e-4, 1e-2],
  40 epochs, batch 8 (the quickstart's FT stage). Units: the 5 folds.
- ``ph``: phonon peak frequency, 400 train+val structures, seeded 10 % test split, strategy ``blocks``
  with n_unfrozen searched too, 20 epochs, batch 16 (devi_strategies-like). Units: split seeds 0, 1, 2.

For every unit and repeat r (a sampler seed) it runs ltc's searcher (``SettingSearch``, the class the
sweeps use) with the ``budget`` sampler at each budget, and with the ``random`` sampler (one run of the
largest budget; its first b trials are random search at budget b, since random proposals do not
depend on results). Trials run as in a sweep with 2 slots: the searcher is asked whenever a slot is
free, so its limits on proposals in flight act as they would. Each search selects its trial with the
lowest inner validation score (the sweep's rule); the benchmark prints the selected trial's test metric
(MAE of log10 kappa for L96, R² for PH) for both samplers, paired per (unit, repeat), with the
corrected resampled t interval of ``ltc.stats`` (``no significant difference`` when it spans 0).
It also prints the regret: the gap to the best test metric among all trials the search ran.

Budgets: 3 (devi_ft_size, devi_pt_size, devi_mpt; the others ship 2 or 4) and 2× and 4× that. At 3
the budget sampler is the hypercube alone; at 6 and 12 TPE proposes 2 and 6 of the trials. Costs
units × repeats × (sum of budgets + largest budget) trainings: (5 + 3) × 5 × 33 = 1,320 at the
defaults, about 30 minutes on 2 free cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SLOTS = 2


@dataclass(frozen=True)
class Family:
    name: str
    dataset: str
    strategy: str
    epochs: int
    batch_size: int
    size: int | None
    units: tuple[int, ...]  # folds (kfold) or split seeds
    kfold: bool
    metric: str  # test metric of the selected trial
    higher_is_better: bool


FAMILIES = {
    "l96": Family("l96", "l96", "all", 40, 8, None, (0, 1, 2, 3, 4), True, "test_mae_log10", False),
    "ph": Family("ph", "ph", "blocks", 20, 16, 400, (0, 1, 2), False, "test_r2", True),
}
LR = (1e-4, 1e-2)


def _split(f: Family):
    from ltc.splits import SplitConfig

    return SplitConfig(test="kfold", folds=5, repeats=1, val_fraction=0.2) if f.kfold else SplitConfig()


def pretrain(work: Path) -> str:
    """The shared PT checkpoint (kept in ``work`` so a second run reuses it)."""
    from ltc.inputs import resolve_inputs
    from ltc.splits import SplitConfig
    from ltc.train import DEFAULT_GRAPHS, RunConfig, TrainConfig, train_run

    out = work / "pt"
    if (out / "checkpoint.pt").is_file():
        return str(out / "checkpoint.pt")
    stage = RunConfig(datasets=("agl",), model="cgcnn", max_size=800, holdout=("l96", "ph"),
                      train=TrainConfig(epochs=15, batch_size=32, lr=3e-3))  # fmt: skip
    inputs = resolve_inputs(
        ["agl"], holdout={"l96": _split(FAMILIES["l96"]), "ph": SplitConfig()}, graph=DEFAULT_GRAPHS["cgcnn"],
        split=SplitConfig(),
    )  # fmt: skip
    metrics = train_run(stage, out, inputs=inputs)
    print(f"pre-trained on AGL: val MAE log10 {metrics['val_mae_log10']:.3f} ({metrics['train_seconds']:.0f} s)")
    return str(out / "checkpoint.pt")


def _train(f: Family, unit: int, init: str, inputs, lr: float, n_unfrozen: int | None, out: Path) -> dict[str, float]:
    from ltc.train import RunConfig, TrainConfig, train_run

    stage = RunConfig(
        datasets=(f.dataset,), size=f.size, seed=0 if f.kfold else unit, split=_split(f),
        fold=unit if f.kfold else None, repeat=0 if f.kfold else None, init=init, strategy=f.strategy,
        n_unfrozen=n_unfrozen, train=TrainConfig(epochs=f.epochs, batch_size=f.batch_size, lr=lr, seed=0),
    )  # fmt: skip
    m = train_run(stage, out, inputs=inputs)
    return {"val_score": m["val_score"], "test": m[f.metric], "epochs": m["epochs_run"]}


def _blocks() -> int:
    from ltc.models import build_model

    return build_model("cgcnn", {}).n_blocks  # the pre-trained model's (default CGCNN)


def search(f: Family, unit: int, repeat: int, sampler: str, budget: int, init: str, inputs, tmp: Path) -> list[dict]:
    """One search with ltc's searcher, trials run 2 at a time; the trials in the order they were asked for."""
    from ltc.sweep import studies
    from ltc.sweep.adapters import SettingSearch
    from ltc.sweep.spec import Range, SearchSpec

    spec = SearchSpec(trials=budget, lr=Range(*LR), sampler=sampler, sampler_seed=1000 * repeat + unit)
    base = {"setting": "s", "strategy": f.strategy}
    journal = tmp / f"{f.name}-{unit}-{repeat}-{sampler}-{budget}.log"
    ref = studies.register_storage(str(journal))
    s = SettingSearch({"s": base}, {"s": spec}, max_blocks=_blocks(), storage=ref, prefix="bench")
    running: deque[tuple[str, dict]] = deque()
    done: list[dict] = []
    asked = 0
    while True:
        while len(running) < SLOTS and (c := s.suggest(f"t{asked}")) not in (None, s.FINISHED):
            running.append((f"t{asked}", c))
            asked += 1
        if not running:
            return sorted(done, key=lambda r: r["trial_index"])
        tid, c = running.popleft()  # the oldest trial ends first
        r = _train(f, unit, init, inputs, c["lr"], c["n_unfrozen"], tmp / tid)
        s.on_trial_complete(tid, {"val_score": r["val_score"], "ltc_completed": True})
        done.append({**r, "trial_index": c["trial_index"], "lr": c["lr"], "n_unfrozen": c["n_unfrozen"]})


def job(args: tuple[str, int, int, tuple[int, ...], str, str]) -> list[dict[str, Any]]:
    """All searches of one (family, unit, repeat): ltc at every budget, random once at the largest."""
    import torch

    from ltc.inputs import RunInputs

    torch.set_num_threads(1)
    name, unit, repeat, budgets, init, inputs_json = args
    f = FAMILIES[name]
    inputs = RunInputs.from_dict(json.loads(inputs_json))
    rows = []
    with tempfile.TemporaryDirectory(prefix="ltc-bench-search-") as tmp:
        for budget in budgets:
            trials = search(f, unit, repeat, "budget", budget, init, inputs, Path(tmp))
            rows.append(_selected(f, unit, repeat, "budget", budget, trials))
        trials = search(f, unit, repeat, "random", max(budgets), init, inputs, Path(tmp))
        for budget in budgets:
            rows.append(_selected(f, unit, repeat, "random", budget, trials[:budget]))
    return rows


def _selected(f: Family, unit: int, repeat: int, sampler: str, budget: int, trials: list[dict]) -> dict[str, Any]:
    ok = [t for t in trials if t["val_score"] is not None and math.isfinite(t["val_score"])]
    pick = min(ok, key=lambda t: t["val_score"])
    best = (max if f.higher_is_better else min)(t["test"] for t in ok)
    return {"family": f.name, "unit": unit, "repeat": repeat, "sampler": sampler, "budget": budget,
            "test": pick["test"], "regret": abs(best - pick["test"]), "lr": pick["lr"],
            "epochs": sum(t["epochs"] for t in trials)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budgets", type=int, nargs="+", default=[3, 6, 12])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ltc-bench-search",
                    help="keeps the pre-trained checkpoint between runs")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="write every selected trial here (CSV)")
    args = ap.parse_args()
    import pandas as pd
    import torch

    from ltc.inputs import resolve_inputs
    from ltc.stats import kfold_test_train_ratio, paired_compare
    from ltc.train import DEFAULT_GRAPHS

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    init = pretrain(args.work)
    jobs = []
    for name in args.families:
        f = FAMILIES[name]
        # resolved once per family, as the driver does per stage
        inputs = resolve_inputs([f.dataset], graph=DEFAULT_GRAPHS["cgcnn"], split=_split(f))
        text = json.dumps(inputs.to_dict())
        jobs += [(name, u, r, tuple(args.budgets), init, text) for r in range(args.repeats) for u in f.units]
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(args.workers) as pool:
        for i, got in enumerate(pool.map(job, jobs), 1):
            rows += got
            print(f"\r{i}/{len(jobs)} searches done ({time.perf_counter() - t0:.0f} s)", end="", flush=True)
    print()
    df = pd.DataFrame(rows)
    if args.out:
        df.to_csv(args.out, index=False)
    for name in args.families:
        f = FAMILIES[name]
        ratio = kfold_test_train_ratio(5) if f.kfold else 0.1 / 0.9
        label = f"{f.metric} ({'higher' if f.higher_is_better else 'lower'} is better)"
        print(f"\n{name}: selected trial's {label}, {len(f.units)} units x {args.repeats} repeats, paired")
        print(f"{'budget':>6}  {'ltc (budget)':>13}  {'random':>8}  {'ltc - random [95% CI]':<28} "
              f"{'ltc better':>10}  {'regret ltc / random':>19}")  # fmt: skip
        for b in args.budgets:
            a = df[(df.family == name) & (df.budget == b) & (df.sampler == "budget")].sort_values(["unit", "repeat"])
            r = df[(df.family == name) & (df.budget == b) & (df.sampler == "random")].sort_values(["unit", "repeat"])
            res = paired_compare(a.test.to_numpy(), r.test.to_numpy(), higher_is_better=f.higher_is_better,
                                 test_train_ratio=ratio)  # fmt: skip
            verdict = "significant" if res.significant else "no significant difference"
            print(f"{b:>6}  {a.test.mean():>13.3f}  {r.test.mean():>8.3f}  "
                  f"{res.mean_diff:+.3f} [{res.ci_low:+.3f}, {res.ci_high:+.3f}] {verdict:<27} "
                  f"{res.wins:>3}/{res.n_pairs:<6} "
                  f"{a.regret.mean():.3f} / {r.regret.mean():.3f}")  # fmt: skip
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
