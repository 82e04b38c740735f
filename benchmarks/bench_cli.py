"""How long a user waits for the CLI before it does anything: `ltc --help`, each command's --help, `ltc --version`
and the quickstart's `--dry-run`, each a new process as a user runs it (best of 3), against a baseline measured
in this run: a bare interpreter that imports torch and torch_geometric (what every command paid before the CLI's
choices moved to torch-free modules). Aim: --help under 1 s, the dry run under 2 s on an idle 2-core machine.

    python benchmarks/bench_cli.py [--repeats 3]
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
COMMANDS = ("datasets", "prepare", "train", "sweep", "report", "predict", "screen")


def best_of(argv: list[str], repeats: int) -> float:
    """Wall seconds of the fastest of ``repeats`` runs of ``argv`` (a new process each); it must succeed."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(argv, cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("LTC_DATA_HOME", str(REPO.parent / "shared" / "data"))
    py = sys.executable
    base = best_of([py, "-c", "import torch, torch_geometric"], args.repeats)
    print(f"baseline: python -c 'import torch, torch_geometric': {base:.2f} s")
    runs = {"ltc --help": ["--help"], "ltc --version": ["--version"]}
    runs |= {f"ltc {c} --help": [c, "--help"] for c in COMMANDS}
    with tempfile.TemporaryDirectory() as tmp:
        dry = ["sweep", "sweeps/quickstart.yaml", "--dry-run", "--results", tmp]
        runs["ltc sweep sweeps/quickstart.yaml --dry-run"] = dry
        print(f"{'command':48s} {'seconds':>8s} {'/ baseline':>10s}")
        for name, argv in runs.items():
            t = best_of([py, "-m", "ltc.cli", *argv], args.repeats)
            print(f"{name:48s} {t:8.2f} {t / base:10.2f}")


if __name__ == "__main__":
    main()
