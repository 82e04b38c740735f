"""Faults that outlast a trial (subprocesses, a real local Ray): a stage whose trials failed for good is not marked
done, the sweep says why in a line per cause and exits non-zero, and ``--resume`` runs them again once the cause
is fixed, every planned trial exactly once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO
from test_sweep_resume import _cleanup, _tail, _wait

pytestmark = pytest.mark.slow

TINY = {"hidden": 16, "n_blocks": 2, "fc_dim": 16}


def _spec(name: str) -> dict:
    return {
        "name": name,
        "model_config": TINY,
        "asha": None,
        "max_failures": 1,
        "search": {"trials": 2, "lr": {"low": 1e-3, "high": 1e-2}},
        "stages": [
            {"name": "pt", "datasets": ["l96"], "max_sizes": [60], "epochs": 2, "batch_size": 8},
            {"name": "ft", "datasets": ["hh143"], "start_from": {"stage": "pt"}, "sizes": [40], "seeds": [0, 1],
             "scratch": True, "epochs": 4, "batch_size": 4},
        ],
    }  # fmt: skip


def _sweep(args: list[str], log: Path, env: dict[str, str], within: list[str] = ()) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([*within, sys.executable, "-m", "ltc.cli", "sweep", *args], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip


def _finish(args: list[str], log: Path, env: dict[str, str], within: list[str] = ()) -> tuple[int, str]:
    proc = _sweep(args, log, env, within)
    try:
        return proc.wait(timeout=900), log.read_text()
    finally:
        _cleanup(proc)


def _exactly_once(results: Path, name: str) -> pd.DataFrame:
    trials = pd.read_parquet(results / name / "trials.parquet")
    assert (trials.status == "completed").all(), trials[["setting", "status", "error"]]
    assert trials.groupby("setting").size().eq(2).all() and len(trials) == 2 + 4 * 2  # PT 1 x 2; FT 4 x 2
    return trials


def test_a_stage_whose_trials_lost_their_shards_is_not_done_and_resumes(tmp_path):
    path = tmp_path / "gone.yaml"
    path.write_text(yaml.safe_dump(_spec("gone")))
    results, cache = tmp_path / "results", tmp_path / "cache"
    env = {**os.environ, "LTC_CACHE": str(cache), "LTC_TEST_PAUSE_AT": "stage ft",
           "LTC_TEST_PAUSE_FILE": str(tmp_path / "paused"), "LTC_TEST_PAUSE_SECONDS": "2"}  # fmt: skip
    args = [str(path), "--results", str(results)]
    first = _sweep(args, tmp_path / "first.log", env)
    try:
        _wait(lambda: (tmp_path / "paused").exists(), 600, "the FT stage", first, tmp_path / "first.log")
        shutil.rmtree(cache)  # every shard folder and split file the FT trials were resolved to
        assert first.wait(timeout=600) == 1, _tail(tmp_path / "first.log")
    finally:
        _cleanup(first)
    out = (tmp_path / "first.log").read_text()
    assert "ltc sweep: stage ft: " in out and "trial(s) failed, the stage is not marked done:" in out
    assert "does not exist on this node" in out and "Fix the cause, then resume with:" in out
    assert (results / "gone" / "stages" / "pt.parquet").is_file()
    assert not (results / "gone" / "stages" / "ft.parquet").exists()
    failed = pd.read_parquet(results / "gone" / "trials.parquet")
    assert (failed[failed.stage == "ft"].status == "error").any()

    env.pop("LTC_TEST_PAUSE_AT")
    rc, out = _finish([*args, "--resume"], tmp_path / "second.log", env)  # the driver builds the shards again
    assert rc == 0, out[-3000:]
    assert "stage pt: finished earlier" in out and "stage ft: resuming" in out
    _exactly_once(results, "gone")


def test_a_truncated_start_checkpoint_fails_its_stage_in_a_line_and_resumes_once_restored(tmp_path, capsys):
    path = tmp_path / "cut.yaml"
    path.write_text(yaml.safe_dump(_spec("cut")))
    results = tmp_path / "results"
    env = {**os.environ, "LTC_TEST_PAUSE_AT": "stage ft", "LTC_TEST_PAUSE_FILE": str(tmp_path / "paused"),
           "LTC_TEST_PAUSE_SECONDS": "2"}  # fmt: skip
    args = [str(path), "--results", str(results)]
    first = _sweep(args, tmp_path / "first.log", env)
    kept = tmp_path / "kept"
    try:
        _wait(lambda: (tmp_path / "paused").exists(), 600, "the FT stage", first, tmp_path / "first.log")
        for ckpt in (results / "cut" / "ray" / "pt").rglob("checkpoint.pt"):  # the PT checkpoints FT starts from
            backup = kept / ckpt.relative_to(results)
            backup.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ckpt, backup)
            ckpt.write_bytes(ckpt.read_bytes()[:500])
        assert first.wait(timeout=600) == 1, _tail(tmp_path / "first.log")
    finally:
        _cleanup(first)
    out = (tmp_path / "first.log").read_text()
    assert "stage ft: 4 trial(s) failed" in out and "damaged or not a checkpoint" in out  # the 2 scratch ones ran
    assert not (results / "cut" / "stages" / "ft.parquet").exists()

    for backup in kept.rglob("checkpoint.pt"):
        shutil.copy(backup, results / backup.relative_to(kept))
    env.pop("LTC_TEST_PAUSE_AT")
    rc, out = _finish([*args, "--resume"], tmp_path / "second.log", env)
    assert rc == 0, out[-3000:]
    _exactly_once(results, "cut")

    # a damaged file of a finished sweep is one line naming it: the stage table (on resume), trials.parquet (report)
    from ltc.cli import main

    done = results / "cut" / "stages" / "ft.parquet"
    done.write_bytes(done.read_bytes()[:-100])
    rc, out = _finish([*args, "--resume"], tmp_path / "third.log", env)
    assert rc == 2 and out.strip().splitlines()[-1].startswith(f"ltc sweep: error: {done} is damaged"), out[-3000:]
    trials = results / "cut" / "trials.parquet"
    trials.write_bytes(trials.read_bytes()[:200])
    capsys.readouterr()
    assert main(["report", str(results / "cut")]) == 2
    assert capsys.readouterr().err.startswith(f"ltc report: error: {trials} is damaged")


def test_a_full_disk_is_one_line_naming_the_folder_and_resume_finishes_every_trial_once(tmp_path):
    """Results on a 64 MB tmpfs (mounted in a private user and mount namespace, entered with nsenter), filled up
    once FT has saved a few checkpoints; then a read-only one for sweep, report and predict."""
    from ray_cluster import can_isolate

    if not can_isolate():
        pytest.skip("needs unprivileged user and mount namespaces (unshare)")
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(_spec("full")))
    results = tmp_path / "results"
    results.mkdir()
    holder = subprocess.Popen(["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private", "sh",
                               "-c", f"mount -t tmpfs -o size=64m tmpfs {results} && exec sleep 3600"],
                              start_new_session=True)  # fmt: skip
    within = ["nsenter", f"--target={holder.pid}", "--user", "--mount", "--preserve-credentials", f"--wd={REPO}"]

    def inside(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([*within, *cmd], capture_output=True, text=True, timeout=600)

    try:
        deadline = time.monotonic() + 30
        while "tmpfs" not in inside("df", "--output=fstype", str(results)).stdout:
            assert holder.poll() is None and time.monotonic() < deadline, "could not mount a tmpfs"
            time.sleep(0.1)
        env = {**os.environ, "LTC_TEST_PAUSE_AT": "stage ft", "LTC_TEST_PAUSE_FILE": str(tmp_path / "paused"),
               "LTC_TEST_PAUSE_SECONDS": "2"}  # fmt: skip
        args = [str(path), "--results", str(results)]
        first = _sweep(args, tmp_path / "first.log", env, within)
        try:

            def saved() -> int:  # FT checkpoints on the tmpfs, seen from inside
                found = inside("find", str(results / "full" / "ray" / "ft"), "-name", "checkpoint.pt").stdout
                return len(found.split())

            _wait(lambda: saved() >= 3, 600, "three FT checkpoints", first, tmp_path / "first.log")
            inside("sh", "-c", f"cat /dev/zero > {results}/filler")  # ends on ENOSPC: the disk is full
            assert first.wait(timeout=600) == 2, _tail(tmp_path / "first.log")
        finally:
            _cleanup(first)
        last = (tmp_path / "first.log").read_text().strip().splitlines()[-1]
        # the option that led there, then what and where: "--results R: No space left on device: R/full (… free)"
        assert last.startswith(f"ltc sweep: error: --results {results}: No space left on device"), last
        assert str(results / "full") in last
        assert "free some space there" in last and "--resume" in last
        assert inside("test", "-e", str(results / "full" / "stages" / "ft.parquet")).returncode == 1  # not done

        inside("rm", f"{results}/filler")
        env.pop("LTC_TEST_PAUSE_AT")
        rc, out = _finish([*args, "--resume"], tmp_path / "second.log", env, within)
        assert rc == 0, out[-3000:]
        assert "stage pt: finished earlier" in out and "stage ft: resuming" in out
        inside("cp", "-r", str(results / "full"), str(tmp_path / "done"))  # out of the namespace, to read here
        _exactly_once(tmp_path, "done")

        # read-only: each command a line naming the file it could not write, nothing written
        assert inside("mount", "-o", "remount,ro", str(results)).returncode == 0
        ltc = [sys.executable, "-m", "ltc.cli"]
        best = next(p for p in (tmp_path / "done" / "best" / "ft").iterdir() if "scratch" in p.name)
        for cmd in (["sweep", str(path), "--results", str(results / "again")], ["report", str(results / "full")],
                    ["predict", "hh143", "--checkpoint", str(best), "--out", str(results / "p.parquet")]):  # fmt: skip
            done = inside(*ltc, *cmd)
            assert done.returncode == 2, done.stdout + done.stderr
            line = done.stderr.strip().splitlines()[-1]
            assert line.startswith(f"ltc {cmd[0]}: error: ") and f"Read-only file system: {results}" in line, line
    finally:
        _cleanup(holder)


# --------------------------------------------------------------------------------------------------
# Damaged resume state, piece by piece (no Ray run needed).


@pytest.mark.parametrize("tail", [b"", b'{"op_code": 5, "worker_id": "x", "stu'])
def test_a_torn_last_journal_record_is_dropped_and_a_damaged_one_before_it_named(tmp_path, tail, caplog):
    from ltc.errors import DataError
    from ltc.sweep.studies import repair_journal

    journal = tmp_path / "optuna.log"
    whole = b'{"op_code": 0, "worker_id": "a"}\n{"op_code": 1, "worker_id": "a"}\n'
    journal.write_bytes(whole + tail)
    assert repair_journal(journal) == len(tail)
    assert journal.read_bytes() == whole
    if tail:
        assert "dropped its torn last record" in caplog.text
    journal.write_bytes(b'{"op_code": 0}\n{"op_code": 1, "wor{"op_code": 2}\n{"op_code": 3}\n')  # a glued record
    with pytest.raises(DataError, match=r"optuna\.log line 2: not an Optuna journal record"):
        repair_journal(journal)


def test_damaged_tune_and_searcher_state_is_replaced_by_the_last_good_copy(tmp_path):
    import pickle

    from ltc.errors import DataError
    from ltc.sweep.adapters import BACKUP, LAST_GOOD, check_resume_state, keep_last_good

    experiment = tmp_path / "ft"
    experiment.mkdir()
    state = experiment / "experiment_state-2026.json"
    one_trial = '{"runner_data": {}, "trial_data": [["t1", "{}"]]}'
    state.write_text(one_trial)
    searcher = experiment / "searcher-state-2026.pkl"
    searcher.write_text('{"issued": {"a": 1}, "ended": {}}')
    gen = experiment / "search_gen_state-2026.json"  # Tune's: a pickle, checked opcode by opcode, never loaded
    gen_bytes = pickle.dumps({"name:ConcurrencyLimiter": {"live_trials": set()}, "counter": 3})
    gen.write_bytes(gen_bytes)
    keep_last_good(str(experiment), {})  # the three, as one snapshot
    for path in (state, searcher, gen):
        assert (experiment / LAST_GOOD / path.name).read_bytes() == path.read_bytes()
    # files whole but of two saves (Tune uploads them one by one): not kept, the earlier snapshot stays
    state.write_text('{"runner_data": {}, "trial_data": [["t1", "{}"], ["t2", "{}"]]}')
    keep_last_good(str(experiment), {})
    assert (experiment / LAST_GOOD / state.name).read_text() == one_trial

    # a searcher state damaged alone (here: a planted pickle, never unpickled): its backup, if of the state's save
    state.write_text(one_trial)
    searcher.write_bytes(pickle.dumps({"planted": "a pickle that would run code"}))
    (experiment / BACKUP).write_text('{"issued": {"a": 1}, "ended": {"a": 1}}')
    assert check_resume_state(str(experiment)) == [
        f"{searcher}: damaged, replaced by the last good copy ({experiment / BACKUP})"
    ]
    assert searcher.read_text() == '{"issued": {"a": 1}, "ended": {"a": 1}}'
    # a backup of another save (2 issued, 1 trial): the kept snapshot instead
    searcher.write_bytes(b"")
    (experiment / BACKUP).write_text('{"issued": {"a": 2}, "ended": {}}')
    assert check_resume_state(str(experiment)) == [
        f"{searcher}: damaged, replaced by the last good copy ({experiment / LAST_GOOD / searcher.name})"
    ]
    assert searcher.read_text() == '{"issued": {"a": 1}, "ended": {}}'
    # the experiment state or the search generator's damaged (what a full disk leaves), or whole files of two
    # saves: the kept snapshot, each file that differs from it
    for damaged, torn in ((state, b""), (gen, gen_bytes[: len(gen_bytes) // 2]), (searcher, b'{"issued": {"a": 3}}')):
        damaged.write_bytes(torn)
        assert check_resume_state(str(experiment)) == [
            f"{damaged}: damaged, replaced by the last good copy ({experiment / LAST_GOOD / damaged.name})"
        ]
        assert state.read_text() == one_trial and gen.read_bytes() == gen_bytes
        assert searcher.read_text() == '{"issued": {"a": 1}, "ended": {}}'
        assert check_resume_state(str(experiment)) == []  # whole now
    (experiment / LAST_GOOD / state.name).unlink()
    state.write_text('{"runner_da')
    with pytest.raises(DataError, match=r"is damaged or of another save .* and no whole copy of this stage's state"):
        check_resume_state(str(experiment))
    state.write_text(one_trial)  # a stage begun by an older ltc: its searcher state a pickle, no backup
    searcher.write_bytes(pickle.dumps({"issued": {"a": 1}}))
    (experiment / BACKUP).unlink()
    with pytest.raises(DataError, match=r"is damaged \(a pickle: an older ltc's, or not ltc's\)"):
        check_resume_state(str(experiment))


def test_a_tuner_pkl_is_put_back_from_its_copy_and_one_torn_as_the_tuner_was_made_starts_the_stage_over(tmp_path):
    from ltc.sweep.adapters import LAST_GOOD, TUNER_STATE, check_resume_state, keep_tuner_state, stage_began

    experiment = tmp_path / "ft"
    experiment.mkdir()
    tuner = experiment / TUNER_STATE
    assert not stage_began(str(experiment))  # no Tuner made
    tuner.write_bytes(b"")  # torn by a full disk as the Tuner was made: no copy, no experiment state
    assert not stage_began(str(experiment))  # the driver makes a new Tuner: no trial had run
    (experiment / "experiment_state-2026.json").write_text("{}")
    assert stage_began(str(experiment))  # a stage begun before ltc kept the copy: resumed as Tune has it
    (experiment / "experiment_state-2026.json").unlink()
    tuner.write_bytes(b"\x80\x05the tuner")
    keep_tuner_state(str(experiment))
    assert (experiment / LAST_GOOD / TUNER_STATE).read_bytes() == tuner.read_bytes() and stage_began(str(experiment))
    tuner.write_bytes(b"\x80\x05the tu")
    assert check_resume_state(str(experiment)) == [
        f"{tuner}: damaged, replaced by the last good copy ({experiment / LAST_GOOD / TUNER_STATE})"
    ]
    assert tuner.read_bytes() == b"\x80\x05the tuner"


def test_damaged_tune_searcher_and_journal_files_are_named_and_the_resume_finishes_exactly_once(tmp_path):
    """An interrupted sweep's state damaged as a full disk or a kill leaves it: Tune's experiment state emptied,
    the searcher's truncated, 57 bytes cut off the Optuna journal. The resume names each and finishes."""
    import signal

    from test_sweep_resume import _finished

    spec = _spec("torn")
    spec["stages"][1].update(epochs=40, report_seconds=0, checkpoint_every=1, checkpoint_seconds=0)
    path = tmp_path / "torn.yaml"
    path.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    args, env = [str(path), "--results", str(results)], dict(os.environ)
    ft = results / "torn" / "ray" / "ft"
    first = _sweep(args, tmp_path / "first.log", env)
    try:
        _wait(lambda: len(_finished(ft)) >= 2, 600, "two finished FT trials", first, tmp_path / "first.log")
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=300) == 130, _tail(tmp_path / "first.log")
    finally:
        _cleanup(first)
    # Tune's tuner.pkl damaged, with no copy of ltc's (a stage begun by an older ltc): one line, nothing changed
    tuner = ft / "tuner.pkl"
    whole = tuner.read_bytes()
    from ltc.sweep.adapters import LAST_GOOD

    (ft / LAST_GOOD / "tuner.pkl").unlink()
    tuner.write_bytes(whole[: len(whole) // 2])
    before = {p: p.stat().st_mtime_ns for p in ft.rglob("*")}
    rc, out = _finish([*args, "--resume"], tmp_path / "refused.log", env)
    assert rc == 2 and out.strip().splitlines()[-1].startswith(f"ltc sweep: error: {tuner} is damaged"), out[-3000:]
    assert {p: p.stat().st_mtime_ns for p in ft.rglob("*")} == before  # refused before anything was written
    tuner.write_bytes(whole)

    state = next(ft.glob("experiment_state-*.json"))
    searcher = next(ft.glob("searcher-state-*.pkl"))
    gen = next(ft.glob("search_gen_state-*.json"))
    journal = results / "torn" / "optuna.log"
    state.write_bytes(b"")
    gen.write_bytes(b"")
    searcher.write_bytes(searcher.read_bytes()[: searcher.stat().st_size // 2])
    journal.write_bytes(journal.read_bytes()[:-57])

    rc, out = _finish([*args, "--resume"], tmp_path / "second.log", env)
    assert rc == 0, out[-3000:]
    assert f"{state}: damaged, replaced by the last good copy" in out
    assert f"{searcher}: damaged, replaced by the last good copy" in out
    assert f"{gen}: damaged, replaced by the last good copy" in out
    assert f"{journal}: dropped its torn last record" in out and "Failed to restore the run state" not in out
    _exactly_once(results, "torn")
