"""Does the sweep driver hold at scale? Planning, the searcher, Tune's per-trial overhead, slot efficiency.

    python benchmarks/bench_driver.py [--parts plan search noop sleep] [--noop 100 1000 10000]
                                      [--sleep-trials 1000] [--cpus 2]

- ``plan``: ``ltc sweep sweeps/devi_ft_size.yaml --dry-run`` (1,232 settings, 3,682 trials) as a user runs
  it (a new process; best of 3), and ``plan()`` alone in this process. Aim: at most 5 s.
- ``search``: ltc's searcher (``SettingSearch``, studies in a journal file) with 100, 1,000 and 10,000
  settings of 3 trials: the cost of one suggestion plus the report of its result, over all of them and
  over the last 1,000, and the size and time of the searcher's snapshot (Tune saves it with every
  experiment snapshot).
  Aim: flat per suggestion (ratio to 100 settings near 1).
- ``noop``: a stage of N settings × 1 trial whose trials return at once, through the sweep's own Tuner
  (``driver.make_tuner``: searcher, scheduler, progress bar) on a local Ray: wall time per trial and the
  driver's memory (RSS) after the run, for each N. Trial configs carry a 1.5 kB payload, about what an ltc
  trial config weighs.
- ``sleep``: 1,000 trials that each sleep 1 s, 1 CPU each, on a local Ray with ``--cpus`` slots: slot
  efficiency = trial-seconds / (slots × wall). Aim: >= 85 % (Ray's own benchmark: 10,000 1-s trials on
  16 CPUs at 87 %).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench_plan() -> None:
    from ltc.sweep import load_sweep, plan

    spec = load_sweep(REPO / "sweeps/devi_ft_size.yaml")
    t0 = time.perf_counter()
    settings = plan(spec)
    planned = time.perf_counter() - t0
    n = sum(len(v) for v in settings.values())
    ltc = str(Path(sys.executable).with_name("ltc"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([ltc, "sweep", str(REPO / "sweeps/devi_ft_size.yaml"), "--dry-run"], check=True,
                       capture_output=True)  # fmt: skip
        times.append(time.perf_counter() - t0)
    each = ", ".join(f"{t:.2f}" for t in times)
    print(f"plan: devi_ft_size, {n} settings: plan() {1e3 * planned:.0f} ms in-process; "
          f"`ltc sweep --dry-run` {min(times):.2f} s (best of 3: {each}; aim <= 5 s)")  # fmt: skip


def _configs(n: int) -> dict[str, dict]:
    # about an ltc trial config's size (inputs paths, train settings, graph); distinct, as real configs are
    return {f"s{i:05d}": {"setting": f"s{i:05d}", "strategy": "all", "stage": "ft", "payload": f"{i:05d}" * 300}
            for i in range(n)}  # fmt: skip


def bench_search(sizes: list[int], trials: int = 3) -> None:
    """Every trial of N settings suggested and told, as a stage does (each setting's first suggestion opens
    its study): the mean per trial over all of them, and over the last 1,000 (the journal at its largest)."""
    from ltc.sweep import studies
    from ltc.sweep.adapters import SettingSearch
    from ltc.sweep.spec import Range, SearchSpec

    base = 0.0
    spec = SearchSpec(trials=trials, lr=Range(1e-4, 1e-2))
    for run, n in enumerate([sizes[0], *sizes]):  # the first run warms up (imports, Optuna's first study)
        with tempfile.TemporaryDirectory() as tmp:
            configs = _configs(n)
            ref = studies.register_storage(str(Path(tmp) / "optuna.log"))
            s = SettingSearch(configs, dict.fromkeys(configs, spec), max_blocks=3, storage=ref, prefix="b/ft")
            times = []
            for i in range(n * trials):
                t0 = time.perf_counter()
                c = s.suggest(f"t{i}")
                s.on_trial_complete(f"t{i}", {"val_score": c["lr"], "ltc_completed": True})
                times.append(time.perf_counter() - t0)
            assert s.suggest("end") == s.FINISHED
            t0 = time.perf_counter()
            s.save(str(Path(tmp) / "searcher.pkl"))
            saved = time.perf_counter() - t0
            size = os.path.getsize(Path(tmp) / "searcher.pkl")
        per, last = sum(times) / len(times), sum(times[-1000:]) / len(times[-1000:])
        if run == 0:
            continue
        base = base or per
        print(f"search: {n:>6} settings x {trials} trials: {1e3 * per:5.2f} ms per suggestion + result "
              f"({1e3 * last:5.2f} over the last 1,000); ratio to {sizes[0]} settings: {per / base:.2f}; "
              f"searcher snapshot {size / 1e6:.1f} MB, {1e3 * saved:.0f} ms")  # fmt: skip


def _noop(config: dict) -> None:
    from ray import tune

    tune.report({"val_score": config["lr"], "ltc_completed": True, "epoch_count": 1})


def _sleep(config: dict) -> None:
    from ray import tune

    time.sleep(1.0)
    tune.report({"val_score": config["lr"], "ltc_completed": True, "epoch_count": 1})


def _run(trainable, n: int, storage: str) -> float:
    from ray import tune

    from ltc.sweep import studies
    from ltc.sweep.driver import make_tuner
    from ltc.sweep.spec import Range, SearchSpec

    configs = _configs(n)
    spec = SearchSpec(trials=1, lr=Range(1e-4, 1e-2))
    tuner = make_tuner(
        tune.with_resources(trainable, {"cpu": 1}), configs, dict.fromkeys(configs, spec), name=f"bench{n}",
        storage_path=storage, optuna_storage=studies.register_storage(str(Path(storage) / f"optuna{n}.log")),
        study_prefix=f"b{n}/ft", max_blocks=3, asha=None, epochs=1, max_failures=0,
    )  # fmt: skip
    t0 = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    assert len(grid) == n and not grid.errors, (len(grid), grid.errors)
    return wall


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e6


def bench_noop(sizes: list[int]) -> None:
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            before = _rss_mb()
            wall = _run(_noop, n, tmp)
            print(f"noop:   {n:>6} trials: {1e3 * wall / n:6.1f} ms per trial ({wall:.0f} s); "
                  f"driver RSS {_rss_mb():.0f} MB (+{_rss_mb() - before:.0f} MB over this run)")  # fmt: skip


def bench_sleep(n: int, cpus: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wall = _run(_sleep, n, tmp)
    eff = n * 1.0 / (cpus * wall)
    print(
        f"sleep:  {n} trials of 1 s on {cpus} slots: {wall:.0f} s (ideal {n / cpus:.0f} s); "
        f"slot efficiency {100 * eff:.1f} % (aim >= 85 %)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["plan", "search", "noop", "sleep"])
    ap.add_argument("--search", type=int, nargs="+", default=[100, 1000, 10000], help="settings for `search`")
    ap.add_argument("--noop", type=int, nargs="+", default=[100, 1000, 10000], help="trials for `noop`")
    ap.add_argument("--sleep-trials", type=int, default=1000)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs (slots) of the local Ray")
    args = ap.parse_args()
    if "plan" in args.parts:
        bench_plan()
    if "search" in args.parts:
        bench_search(args.search)
    if {"noop", "sleep"} & set(args.parts):
        from ltc.sweep.driver import init_ray

        init_ray(None, num_cpus=args.cpus)  # as a sweep starts its local Ray, with --cpus slots
        if "noop" in args.parts:
            bench_noop(args.noop)
        if "sleep" in args.parts:
            bench_sleep(args.sleep_trials, args.cpus)


if __name__ == "__main__":
    main()
