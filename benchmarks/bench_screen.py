"""``ltc screen`` against ``ltc predict``: structures/s and peak memory on the same real structures and the same
15-model ensemble, in one run; then the screen's peak memory as the input grows.

    python benchmarks/bench_screen.py [--n 2000] [--sizes 2000 20000 100000] [--checkpoints CELL]

Candidates: the first ``--n`` of AFLOW's CIFs (``agl``, read from ``$LTC_DATA_HOME``), written as CIF files into a
folder, as a user's candidates would be. Ensemble: ``--checkpoints`` (a K-fold cell of a sweep, e.g. the
quickstart's ``best/finetune/<cell>/``), else 15 CGCNN models of the quickstart's size trained here for one epoch
each on L96 (the weights do not change the cost). Each command runs as a user runs it (``ltc predict …``,
``ltc screen …``, a process each, on a local Ray for the screen) and is timed from start to exit; its memory is the
peak of the summed PSS of it and every process it starts (Ray's workers included), sampled every 0.5 s.

The scaling runs repeat the real structures under new ids in a Parquet table (CIF text), 2k, 20k and 100k rows,
through ``ltc screen`` (the peak memory must stay flat as the input grows) and, up to ``--predict-up-to`` rows,
through ``ltc predict`` (which holds every graph in memory) for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil

from ltc import datasets

LTC = [sys.executable, "-m", "ltc.cli"]


def tree_pss(pid: int) -> int:
    """Bytes: the proportional set size of ``pid`` and all its descendants now (PSS: a page that several of them
    map, torch's libraries in every Ray worker, counts once in all, not once in each, as summed RSS would)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_full_info().pss
    return total


def run(cmd: list[str], log: Path) -> tuple[float, int, int]:
    """(seconds, peak bytes of the process tree (PSS), exit code) of ``cmd``."""
    peak = [0]
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

        def sample() -> None:
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_pss(proc.pid))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        sampler.join()
    return time.perf_counter() - t0, peak[0], rc


def ensemble(folder: Path) -> Path:
    """15 CGCNN models of the quickstart's size (5 folds x 3 repeats), one epoch each: cost, not skill."""
    from ltc.train import RunConfig, TrainConfig, train_run

    cell = folder / "cell"
    for r in range(3):
        for f in range(5):
            stage = RunConfig(datasets=("l96",), model="cgcnn", seed=5 * r + f,
                              train=TrainConfig(epochs=1, batch_size=8, seed=5 * r + f))  # fmt: skip
            train_run(stage, cell / f"r{r}f{f}")
    return cell


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="candidates of the predict / screen comparison")
    ap.add_argument("--sizes", type=int, nargs="*", default=[2000, 20000, 100000], help="inputs of the memory runs")
    ap.add_argument("--checkpoints", type=Path, help="a fold ensemble (default: 15 models trained here)")
    ap.add_argument("--predict-up-to", type=int, default=20000, help="largest input ltc predict gets in the scaling")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ltc-bench-screen-"))
    cell = args.checkpoints or ensemble(tmp)
    n_models = len(list(Path(cell).rglob("checkpoint.pt")))
    records = datasets.read("agl").records
    folder = tmp / "cifs"
    folder.mkdir()
    for r in records[: args.n]:
        (folder / f"{r.id}.cif").write_text(r.payload)
    print(f"{args.n} AFLOW CIFs, an ensemble of {n_models} models ({cell}); {os.cpu_count()} CPUs; work in {tmp}")

    t_p, m_p, rc_p = run([*LTC, "predict", "--checkpoint", str(cell), str(folder), "--out", str(tmp / "p.parquet")],
                         tmp / "predict.log")  # fmt: skip
    t_s, m_s, rc_s = run([*LTC, "screen", str(cell), str(folder), "--out", str(tmp / "screen"), "-q"],
                         tmp / "screen.log")  # fmt: skip
    assert rc_p == 0 and rc_s == 0, (tmp / "predict.log").read_text()[-2000:] + (tmp / "screen.log").read_text()[-2000:]
    print(f"\n{'':22s} {'seconds':>8s} {'structures/s':>13s} {'peak memory':>12s}")
    print(f"{'ltc predict (today)':22s} {t_p:8.1f} {args.n / t_p:13.1f} {m_p / 2**20:9.0f} MiB")
    print(f"{'ltc screen':22s} {t_s:8.1f} {args.n / t_s:13.1f} {m_s / 2**20:9.0f} MiB")
    print(f"screen / predict: {t_p / t_s:.2f}x the structures/s, {m_s / max(m_p, 1):.2f}x the peak memory")

    # where the screen's time goes: the same run in this process, with Ray Data's figures per stage
    from ltc.screen import screen

    result = screen([cell], folder, tmp / "screen-profile", progress=False)
    print(f"\nin-process screen: {result.seconds:.1f} s = input {result.seconds_input:.1f} s + Ray and pipeline "
          f"{result.seconds_pipeline:.1f} s + the rest (loading the ensemble, ranking)")  # fmt: skip
    for line in result.stats.splitlines():
        if line.startswith(("Operator", "* Remote wall time", "* Remote cpu time")):
            print("  " + line)
    import ray

    ray.shutdown()

    print(f"\nltc screen as the input grows ({records[0].id} … repeated under new ids, CIF text in a Parquet table):")
    print(f"{'command':8s} {'candidates':>10s} {'seconds':>8s} {'structures/s':>13s} {'peak memory':>12s}")
    cifs = [r.payload for r in records]
    for size in args.sizes:
        table = tmp / f"cands-{size}.parquet"
        ids = [f"c{i}" for i in range(size)]
        pd.DataFrame({"id": ids, "cif": [cifs[i % len(cifs)] for i in range(size)]}).to_parquet(table)
        commands = {"screen": [*LTC, "screen", str(cell), str(table), "--out", str(tmp / f"screen-{size}"), "-q"]}
        if size <= args.predict_up_to:
            commands["predict"] = [*LTC, "predict", "--checkpoint", str(cell), str(table), "--out",
                                   str(tmp / f"predict-{size}.parquet")]  # fmt: skip
        for name, cmd in commands.items():
            t, m, rc = run(cmd, tmp / f"{name}-{size}.log")
            assert rc == 0, (tmp / f"{name}-{size}.log").read_text()[-2000:]
            print(f"{name:8s} {size:10,d} {t:8.1f} {size / t:13.1f} {m / 2**20:9.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
