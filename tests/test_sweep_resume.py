"""Crashes: the driver killed mid-sweep and resumed; a worker killed mid-trial and retried (subprocesses)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, assert_studies_match

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


def _own_processes(proc: subprocess.Popen) -> set[int]:
    """Pids of the processes ``proc`` started, read from Linux's /proc; never ``proc`` itself, nor anyone else's.

    Two ways in, since the sweep's driver (started by ``_start`` in a session of its own) starts a local Ray
    whose gcs and raylet start the trial workers: the processes in that session, caught even once orphaned (the
    kernel does not hand out a pid again while it names a session), and, while the driver has not been reaped
    (its pid is still its own), its descendants, walked through parent links.
    """
    parent, session = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):  # a process that ended in the meantime
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session
            parent[int(stat.parent.name)], session[int(stat.parent.name)] = int(fields[1]), int(fields[3])
    own = {pid for pid, sid in session.items() if sid == proc.pid}
    if proc.poll() is None:
        tree, frontier = set(), {proc.pid}
        while frontier:
            frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - tree
            tree |= frontier
        own |= tree
    own.discard(proc.pid)
    return own


def _kill_own(proc: subprocess.Popen, name: str) -> list[int]:
    """SIGKILL the processes ``proc`` started whose command line contains ``name``; returns their pids."""
    killed = []
    for pid in sorted(_own_processes(proc)):
        with contextlib.suppress(OSError):  # ended in the meantime
            if name in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def _cleanup(proc: subprocess.Popen) -> None:
    """SIGKILL whatever ``proc`` started that still runs: its process group, then anything of its that left it."""
    leftovers = _own_processes(proc)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.kill()  # a no-op once it has been reaped
    proc.wait()


def _results(folder: Path) -> dict[str, list[dict]]:
    """result.json lines of every trial folder under a Tune experiment folder."""
    out = {}
    for f in folder.glob("*/result.json"):
        out[f.parent.name] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def _finished(folder: Path) -> dict[str, dict]:
    """Trial id → final metrics, for every trial under a Tune experiment folder that saved its final checkpoint."""
    out = {}
    for f in folder.glob("*/checkpoint_*/metrics.json"):
        try:
            metrics = json.loads(f.read_text())
        except (json.JSONDecodeError, OSError):
            continue  # Tune is still copying this checkpoint into storage (not atomic): read it next time
        out[f.parts[-3]] = {"test_mae": metrics["test_mae"], "epochs_run": metrics["epochs_run"]}
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
             "strategies": ["blocks"], "scratch": True, "epochs": 150, "batch_size": 4, "report_seconds": 0},
        ],
    }  # fmt: skip
    path = _write(tmp_path, spec)
    results = tmp_path / "results"
    ft_dir = results / "crash" / "ray" / "ft"
    log1, log2 = tmp_path / "first.log", tmp_path / "second.log"
    first = _start([str(path), "--results", str(results)], log1)
    try:
        # kill the driver once the FT stage has finished some trials (12 trials of 150 short epochs on 2
        # slots: others are running then). A finished trial is seen by its final checkpoint (metrics.json):
        # Tune buffers result.json, whose last lines a killed driver never writes.
        def midway() -> bool:
            return len(_finished(ft_dir)) >= 2

        _wait(midway, 600, "two finished FT trials", first, log1)
        first.send_signal(signal.SIGKILL)
        first.wait()
        before = _finished(ft_dir)
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
    # trials finished before the kill were not trained again: same final checkpoint, same metrics
    assert before and _finished(ft_dir).items() >= before.items()
    for tid, metrics in before.items():
        row = trials[trials.trial_id == tid].iloc[0]
        assert row.test_mae == pytest.approx(metrics["test_mae"])
        assert row.resumed_from_epoch == 0 and row.epochs_run == metrics["epochs_run"]
    # the Optuna studies went on where they were: each row's trial told once, none left running
    assert_studies_match(results / "crash", trials)


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
        # only this sweep's trial workers: those among the processes its driver started
        workers = _kill_own(proc, "ray::ImplicitFunc")
        assert workers, "no trial worker process found"
        proc.wait(timeout=900)
        assert proc.returncode == 0, _tail(log)
    finally:
        _cleanup(proc)
    trials = pd.read_parquet(results / "workerdeath" / "trials.parquet")
    assert len(trials) == 1
    row = trials.iloc[0]
    assert row.status == "completed" and row.epochs_run == 40
    assert row.resumed_from_epoch >= 6  # picked up from a checkpoint, not from epoch 0


# --- interrupts: Ctrl-C (SIGINT), SIGTERM and a kill while best checkpoints are copied ---------------------

# Fixed lr, one trial per setting, no ASHA: every trial's numbers are determined by its seed, so an
# interrupted-then-resumed sweep must give those of an uninterrupted one.
INTERRUPTED = {
    "name": "intr",
    "model_config": TINY,
    "asha": None,
    "search": {"trials": 1, "lr": 3e-3},
    "stages": [
        {"name": "pt", "datasets": ["dc"], "max_sizes": [300], "seeds": [0, 1], "epochs": 16, "batch_size": 8,
         "checkpoint_every": 2, "checkpoint_seconds": 0, "report_seconds": 0},
        {"name": "ft", "datasets": ["hh143"], "start_from": {"stage": "pt"}, "sizes": [100], "seeds": [0, 1],
         "scratch": True, "epochs": 24, "batch_size": 4, "checkpoint_every": 2, "checkpoint_seconds": 0,
         "report_seconds": 0},
    ],
}  # fmt: skip
PLANNED = 2 + 2 * 2  # PT: 2 seeds; FT: 2 seeds x (start, scratch); one trial each


def _resume(path: Path, results: Path, log: Path) -> str:
    """``ltc sweep PATH --results RESULTS --resume`` to its end, which must be a success; its output."""
    proc = _start([str(path), "--results", str(results), "--resume"], log)
    try:
        assert proc.wait(timeout=900) == 0, _tail(log)
    finally:
        _cleanup(proc)
    return log.read_text()


def _assert_quiet(out: str) -> None:
    """What an interrupt leaves (pending trials with no results yet, placeholders Tune made) is expected: no line
    each of it (Ray's other warnings would still show)."""
    assert "Failed to fetch metrics" not in out and "without a configuration" not in out, out[-3000:]


def _checkpointed(folder: Path) -> bool:
    """Some trial under this Tune experiment folder has saved two intermediate training states.

    Two, not one: a checkpoint is on disk before the driver has registered it, and a trial whose only
    checkpoint was not registered yet restarts from epoch 0 on resume (correct, but not what is tested).
    """
    return any(len(list(trial.glob("checkpoint_*/train_state.pt"))) >= 2 for trial in folder.glob("*/"))


def _by_setting(trials: pd.DataFrame) -> dict[str, tuple[float, float]]:
    return {r.setting: (r.test_mae, r.val_loss) for r in trials.itertuples()}


def _assert_same_numbers(trials: pd.DataFrame, uninterrupted: pd.DataFrame) -> None:
    """Every setting's test MAE and validation loss equal those of the uninterrupted run."""
    got, want = _by_setting(trials), _by_setting(uninterrupted)
    assert got.keys() == want.keys()
    for key, (mae, val) in want.items():
        assert got[key] == pytest.approx((mae, val), rel=1e-5), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> pd.DataFrame:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    path, results, log = _write(tmp, INTERRUPTED), tmp / "results", tmp / "run.log"
    proc = _start([str(path), "--results", str(results)], log)
    try:
        assert proc.wait(timeout=900) == 0, _tail(log)
    finally:
        _cleanup(proc)
    return pd.read_parquet(results / "intr" / "trials.parquet")


# Each signal once and each stage once (SIGINT and SIGTERM take one handler; the stage decides what is left to
# resume), and a second Ctrl-C: 3 runs of ~65 s, where all 5 combinations cost CI 2 minutes more.
@pytest.mark.parametrize(("signals", "stage"), [(["SIGINT"], "pt"), (["SIGTERM"], "ft"), (["SIGINT", "SIGINT"], "ft")])
def test_an_interrupt_loses_nothing_and_resume_finishes_exactly(tmp_path, uninterrupted, signals, stage):
    path, results = _write(tmp_path, INTERRUPTED), tmp_path / "results"
    log1, log2 = tmp_path / "first.log", tmp_path / "second.log"
    first = _start([str(path), "--results", str(results)], log1)
    try:
        exp = results / "intr" / "ray" / stage
        _wait(lambda: _checkpointed(exp), 600, f"a checkpoint in stage {stage}", first, log1)
        for name in signals:  # a second Ctrl-C right after the first: exit at once
            first.send_signal(getattr(signal, name))
            time.sleep(0.3)
        rc = first.wait(timeout=120)
        out = log1.read_text()
        assert rc == 130, _tail(log1)
        assert f"ltc sweep: interrupted in stage {stage}" in out and "Resume with: " in out and " --resume" in out
        assert "Traceback" not in out
        _assert_quiet(out)
        stages = results / "intr" / "stages"
        assert not (stages / f"{stage}.parquet").exists()  # the interrupted stage is not marked done …
        assert not (stages / "ft.parquet").exists()  # … and nothing after it ran
        if stage == "pt":
            assert not (results / "intr" / "ray" / "ft").exists()
    finally:
        _cleanup(first)
    again = _resume(path, results, log2)
    _assert_quiet(again)
    # each stage's bar ends at its total, the resumed one too (it counts what finished before the interrupt)
    bars = dict(re.findall(r"stage (pt|ft): +\d+%\|[^|]*\| *(\d+/\d+)", again))
    assert bars.get("ft") == "4/4" and bars.get("pt", "2/2") == "2/2", again[-3000:]

    trials = pd.read_parquet(results / "intr" / "trials.parquet")
    assert len(trials) == PLANNED and trials.trial_id.is_unique  # every planned trial, exactly once
    assert trials.groupby(["setting", "trial_index"]).size().max() == 1
    assert (trials.status == "completed").all(), trials[["setting", "status"]]
    epochs = {"pt": 16, "ft": 24}
    for name, n in epochs.items():
        assert (trials[trials.stage == name].epochs_run == n).all()  # the interrupted trials ended whole
    if len(signals) == 1:  # … from where they were (after a second Ctrl-C, from the last snapshot: maybe epoch 0)
        assert trials[trials.stage == stage].resumed_from_epoch.max() > 0
    # the same numbers as without the interrupt (seeded, deterministic on CPU)
    _assert_same_numbers(trials, uninterrupted)
    assert_studies_match(results / "intr", trials)


def test_a_driver_killed_while_copying_best_checkpoints_leaves_the_stage_unfinished(tmp_path, uninterrupted):
    path, results = _write(tmp_path, INTERRUPTED), tmp_path / "results"
    log1, log2 = tmp_path / "first.log", tmp_path / "second.log"
    marker = tmp_path / "paused"
    os.environ.update(LTC_TEST_PAUSE_AT="copy_best", LTC_TEST_PAUSE_FILE=str(marker))
    try:
        first = _start([str(path), "--results", str(results)], log1)
    finally:
        for key in ("LTC_TEST_PAUSE_AT", "LTC_TEST_PAUSE_FILE"):
            os.environ.pop(key)
    try:
        _wait(marker.exists, 600, "the driver to pause while copying the PT stage's best checkpoints", first, log1)
        assert list((results / "intr" / "best" / "pt").glob("*/checkpoint.pt"))  # part of the copy is there
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert not (results / "intr" / "stages" / "pt.parquet").exists()  # not done: its copy did not finish
    finally:
        _cleanup(first)
    _resume(path, results, log2)
    assert "stage pt: resuming" in log2.read_text()
    trials = pd.read_parquet(results / "intr" / "trials.parquet")
    assert len(trials) == PLANNED and trials.trial_id.is_unique and (trials.status == "completed").all()
    best = pd.read_parquet(results / "intr" / "best" / "pt" / "best.parquet")
    assert len(best) == 2 and all(Path(p).is_file() for p in best.best_checkpoint)
    _assert_same_numbers(trials, uninterrupted)
