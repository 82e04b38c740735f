"""What early stopping (successive halving per setting) saves at ltc's budgets, and what it costs.

    python benchmarks/bench_early_stop.py [--trials 4 8] [--grace 10] [--rf 3] [--epochs 40]

The same sweep is run twice on a local Ray with 2 slots, once with ``asha: null`` and once with
``asha: {grace_epochs: G, reduction_factor: RF}``: CGCNN pre-trained on 800 AGL kappa values, then
fine-tuned on L96 under 5-fold CV (one repeat) with scratch baselines: 10 settings of T trials of 40
epochs, every epoch reported (``report_seconds: 0``, so the pruner sees each rung). For each T it prints
the fine-tuning stage's trial-epochs and wall time with and without early stopping, how many trials
were stopped, in how many settings the selected trial (lowest validation score) changed, and the paired
difference of the selected trials' test MAE (log10 kappa) with its interval. With T <= 4 the budget
sampler proposes the same hypercube points in both runs, so the selected trials are directly comparable.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from ltc.config import from_dict
from ltc.stats import kfold_test_train_ratio, paired_compare
from ltc.sweep import SweepSpec, run_sweep
from ltc.sweep.driver import init_ray


def sweep(trials: int, epochs: int, asha: dict | None) -> SweepSpec:
    return from_dict(SweepSpec, {
        "name": "early",
        "model": "cgcnn",
        "asha": asha,
        "search": {"trials": trials, "lr": {"low": 1e-4, "high": 1e-2}},
        "stages": [
            {"name": "pt", "datasets": ["agl"], "max_sizes": [800], "epochs": 15, "batch_size": 32,
             "search": {"trials": 1, "lr": 3e-3}},
            {"name": "ft", "datasets": ["l96"], "start_from": {"stage": "pt"}, "scratch": True, "epochs": epochs,
             "batch_size": 8, "split": {"test": "kfold", "folds": 5, "repeats": 1, "val_fraction": 0.2},
             "report_seconds": 0},
        ],
    })  # fmt: skip


def run(spec: SweepSpec):
    with tempfile.TemporaryDirectory(prefix="ltc-bench-es-") as tmp:
        trials = run_sweep(spec, results=tmp)
    ft = trials[trials.stage == "ft"]
    return ft, ft.finished.max() - ft.started.min()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--grace", type=int, default=10)
    ap.add_argument("--rf", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=40)
    args = ap.parse_args()
    init_ray(None, num_cpus=2)
    ratio = kfold_test_train_ratio(5)
    for t in args.trials:
        t0 = time.perf_counter()
        off, wall_off = run(sweep(t, args.epochs, None))
        on, wall_on = run(sweep(t, args.epochs, {"grace_epochs": args.grace, "reduction_factor": args.rf}))
        # epochs_run: a stopped trial's epochs at its last report; a finished one's (patience may end it early)
        ep_off, ep_on = off.epochs_run.sum(), on.epochs_run.sum()
        pick_off = off.loc[off.groupby("setting").val_score.idxmin()].set_index("setting")
        done_on = on[on.status == "completed"]
        pick_on = done_on.loc[done_on.groupby("setting").val_score.idxmin()].set_index("setting")
        pick_on = pick_on.reindex(pick_off.index)
        changed = int((pick_on.trial_index != pick_off.trial_index).sum())
        res = paired_compare(pick_on.test_mae_log10.to_numpy(), pick_off.test_mae_log10.to_numpy(),
                             higher_is_better=False, test_train_ratio=ratio)  # fmt: skip
        verdict = "significant" if res.significant else "no significant difference"
        print(f"\n{t} trials per setting, {len(pick_off)} settings, {args.epochs} epochs; "
              f"asha grace {args.grace}, reduction factor {args.rf} ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
        print(f"  trial-epochs:   {ep_off:.0f} without, {ep_on:.0f} with ({100 * (1 - ep_on / ep_off):.0f} % saved); "
              f"{int((on.status == 'pruned').sum())} of {len(on)} trials stopped")  # fmt: skip
        print(f"  FT stage wall:  {wall_off:.0f} s without, {wall_on:.0f} s with "
              f"({100 * (1 - wall_on / wall_off):.0f} % saved)")  # fmt: skip
        print(f"  selected trial changed in {changed} of {len(pick_off)} settings; its test MAE log10, with - without: "
              f"{res.mean_diff:+.3f} [{res.ci_low:+.3f}, {res.ci_high:+.3f}] ({verdict})")  # fmt: skip


if __name__ == "__main__":
    main()
