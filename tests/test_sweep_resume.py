"""Crashes: the driver killed mid-sweep and resumed; a worker killed mid-trial and retried (subprocesses)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO

pytestmark = pytest.mark.slow

TINY = {"hidden": 16, "n_blocks": 2, "fc_dim": 16}


def _write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _start(args: list[str], log: Path) -> subprocess.Popen:
    # its own process group, so that whatever Ray leaves behind can be cleaned up after the test; output to
    # a file, whose tail goes into any failure message
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ltc.cli", "sweep", *args],
            cwd=REPO, env=dict(os.environ), stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip


def _tail(log: Path) -> str:
    return log.read_text()[-3000:] if log.is_file() else "(no output)"


def _cleanup(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _results(folder: Path) -> dict[str, list[dict]]:
    """result.json lines of every trial folder under a Tune experiment folder."""
    out = {}
    for f in folder.glob("*/result.json"):
        out[f.parent.name] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended (rc={proc.returncode}) before {what}:\n{_tail(log)}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{_tail(log)}")


def test_driver_killed_mid_sweep_resume_runs_every_trial_exactly_once(tmp_path):
    spec = {
        "name": "crash",
        "model_config": TINY,
        "asha": None,
        "search": {"trials": 3, "lr": {"low": 1e-3, "high": 1e-2}},
        "stages": [
            {"name": "pt", "datasets": ["l96"], "max_sizes": [60], "epochs": 3, "batch_size": 8,
             "search": {"trials": 2, "lr": {"low": 1e-3, "high": 1e-2}}},
            # every epoch reported, so that running trials show up in their result.json files
            {"name": "ft", "datasets": ["hh143"], "start_from": {"stage": "pt"}, "sizes": [40], "seeds": [0, 1],
             "strategies": ["blocks"], "scratch": True, "epochs": 30, "batch_size": 4, "report_seconds": 0},
        ],
    }  # fmt: skip
    path = _write(tmp_path, spec)
    results = tmp_path / "results"
    ft_dir = results / "crash" / "ray" / "ft"
    log1, log2 = tmp_path / "first.log", tmp_path / "second.log"
    first = _start([str(path), "--results", str(results)], log1)
    try:
        # kill the driver once the FT stage has finished some trials (12 trials of ~30 epochs on 2 slots:
        # others are running then)
        def midway() -> bool:
            runs = _results(ft_dir)
            return sum(any(r.get("ltc_completed") for r in rows) for rows in runs.values()) >= 2

        _wait(midway, 600, "two finished FT trials", first, log1)
        first.send_signal(signal.SIGKILL)
        first.wait()
        before = {tid: rows for tid, rows in _results(ft_dir).items() if any(r.get("ltc_completed") for r in rows)}
        assert not (results / "crash" / "stages" / "ft.parquet").exists()

        second = _start([str(path), "--results", str(results), "--resume"], log2)
        second.wait(timeout=900)
        out = log2.read_text()
        assert second.returncode == 0, _tail(log2)
        assert "stage pt: finished earlier" in out and "stage ft: resuming" in out
    finally:
        _cleanup(first)
        if "second" in locals():
            _cleanup(second)

    trials = pd.read_parquet(results / "crash" / "trials.parquet")
    assert len(trials) == 2 + 4 * 3  # every planned trial …
    assert trials.groupby(["setting", "trial_index"]).size().max() == 1  # … exactly once
    assert trials.trial_id.is_unique
    assert (trials.status == "completed").all() and trials.test_mae.notna().all() and trials.checkpoint.notna().all()
    # trials finished before the kill were not trained again: same metrics, at most one more report
    after = _results(ft_dir)
    for tid, rows in before.items():
        final = next(r for r in rows if r.get("ltc_completed"))
        assert len(after[tid]) <= len(rows) + 1
        row = trials[trials.trial_id == tid].iloc[0]
        assert row.test_mae == pytest.approx(final["test_mae"])


def test_worker_killed_mid_trial_continues_from_its_checkpoint(tmp_path):
    spec = {
        "name": "workerdeath",
        "model_config": TINY,
        "asha": None,
        "max_failures": 2,
        "search": {"trials": 1, "lr": 3e-3},
        "stages": [{"name": "pt", "datasets": ["dc"], "max_sizes": [400], "epochs": 40, "batch_size": 8,
                    "checkpoint_every": 2, "checkpoint_seconds": 0}],
    }  # fmt: skip
    path = _write(tmp_path, spec)
    results = tmp_path / "results"
    exp = results / "workerdeath" / "ray" / "pt"
    log = tmp_path / "sweep.log"
    proc = _start([str(path), "--results", str(results)], log)
    try:

        def some_epochs() -> bool:
            return any(max((r.get("epoch_count", 0) for r in rows), default=0) >= 7 for rows in _results(exp).values())

        _wait(some_epochs, 600, "a few checkpointed epochs", proc, log)
        workers = subprocess.run(["pgrep", "-f", "ray::ImplicitFunc"], capture_output=True, text=True).stdout.split()
        assert workers, "no trial worker process found"
        for pid in workers:
            os.kill(int(pid), signal.SIGKILL)
        proc.wait(timeout=900)
        assert proc.returncode == 0, _tail(log)
    finally:
        _cleanup(proc)
    trials = pd.read_parquet(results / "workerdeath" / "trials.parquet")
    assert len(trials) == 1
    row = trials.iloc[0]
    assert row.status == "completed" and row.epochs_run == 40
    assert row.resumed_from_epoch >= 6  # picked up from a checkpoint, not from epoch 0
