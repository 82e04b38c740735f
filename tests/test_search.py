"""The search inside each setting: real Optuna studies in a real journal file (or SQLite), the budget
sampler, the searcher's turns and limits, its state across a restart, and per-setting early stopping."""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from ltc.errors import ConfigError
from ltc.sweep import studies
from ltc.sweep.adapters import OPTUNA_TRIAL, SettingSearch, StudyPruning
from ltc.sweep.spec import AshaSpec, Range, SearchSpec

PREFIX = "sw/ft"


def _searcher(tmp_path, trials=3, sampler="budget", storage=None, settings=("a", "b")):
    configs = {k: {"setting": k, "strategy": "blocks" if k == "a" else "all", "stage": "ft"} for k in settings}
    search = {k: SearchSpec(trials=trials, lr=Range(1e-4, 1e-2), sampler=sampler) for k in configs}
    ref = studies.register_storage(storage or str(tmp_path / "optuna.log"))
    return SettingSearch(configs, search, max_blocks=3, storage=ref, prefix=PREFIX)


def _study(tmp_path, key, storage=None):
    ref = storage or str(tmp_path / "optuna.log")
    return optuna.load_study(study_name=f"{PREFIX}/{key}", storage=studies.open_storage(ref))


def _drain(s, prefix="t"):
    out = []
    while (c := s.suggest(f"{prefix}{len(out)}")) not in (None, s.FINISHED):
        out.append(c)
    return out


@pytest.mark.parametrize(("n", "k"), [(1, 1), (2, 2), (4, 4), (5, 4), (8, 4), (16, 8)])
def test_startup_trials_fit_the_budget(n, k):
    assert studies.startup_trials(n) == k


def test_startup_points_cover_each_range_in_strata():
    points = studies.startup_points(8, lr=(1e-4, 1e-2), n_unfrozen=3, seed=5)
    u = (np.log([p["lr"] for p in points]) - math.log(1e-4)) / (math.log(1e-2) - math.log(1e-4))
    assert sorted(np.floor(u * 8).astype(int).tolist()) == list(range(8))  # one lr in each eighth of the range
    assert sorted(p["n_unfrozen"] for p in points) == [0, 0, 1, 1, 2, 2, 3, 3]  # each block count twice
    assert points == studies.startup_points(8, lr=(1e-4, 1e-2), n_unfrozen=3, seed=5)
    assert points != studies.startup_points(8, lr=(1e-4, 1e-2), n_unfrozen=3, seed=6)
    assert studies.startup_points(2, lr=None, n_unfrozen=None, seed=0) == [{}, {}]


def test_searcher_takes_settings_in_turn_and_writes_its_studies(tmp_path):
    s = _searcher(tmp_path)
    got = _drain(s)
    assert s.suggest("late") == s.FINISHED
    assert [c["setting"] for c in got] == ["a", "b", "a", "b", "a", "b"]
    assert [c["trial_index"] for c in got] == [0, 0, 1, 1, 2, 2]
    # 3 trials are all start-up trials: the hypercube points, proposed as planned
    points = studies.startup_points(3, lr=(1e-4, 1e-2), n_unfrozen=3, seed=0)  # setting a: seed 0 + index 0
    assert [(c["lr"], c["n_unfrozen"]) for c in got if c["setting"] == "a"] == [
        (p["lr"], p["n_unfrozen"]) for p in points
    ]
    assert all(c["n_unfrozen"] is None for c in got if c["setting"] == "b")
    # the journal holds a study per setting, with the setting and each trial's Ray id
    assert sorted(optuna.get_all_study_names(studies.open_storage(str(tmp_path / "optuna.log")))) == [
        "sw/ft/a", "sw/ft/b",
    ]  # fmt: skip
    a = _study(tmp_path, "a")
    assert a.user_attrs["setting"] == "a" and a.user_attrs["strategy"] == "blocks"
    assert [t.user_attrs["ray_trial_id"] for t in a.trials] == ["t0", "t2", "t4"]
    assert [t.number for t in a.trials] == [c[OPTUNA_TRIAL] for c in got if c["setting"] == "a"]

    # outcomes reach the right study: completed with its value, stopped early as pruned, errors as failed
    s.on_trial_complete("t0", {"val_score": 0.4, "ltc_completed": True})
    s.on_trial_complete("t2", {"val_score": 0.9, "done": True})  # Tune marks a scheduler's stop done=True
    s.on_trial_complete("t4", error=True)
    s.on_trial_complete("t1", {"val_score": 0.7})  # stopped by an interrupt: told when it ends after --resume
    assert [t.state.name for t in _study(tmp_path, "a").trials] == ["COMPLETE", "PRUNED", "FAIL"]
    assert _study(tmp_path, "a").best_value == 0.4
    assert "t1" in s.live and _study(tmp_path, "b").trials[0].state.name == "RUNNING"


def test_model_proposals_wait_for_the_start_up_results(tmp_path):
    s = _searcher(tmp_path, trials=7, settings=("a",))  # k = 4 hypercube trials, then 3 from TPE
    first = _drain(s)
    assert len(first) == 4  # the fixed points run at once; TPE waits for their results
    assert s.suggest("x") is None
    for i, c in enumerate(first[:3]):
        s.on_trial_complete(f"t{i}", {"val_score": 1.0 + c["lr"], "ltc_completed": True})
    assert s.suggest("x") is None  # one start-up trial still running
    s.on_trial_complete("t3", {"val_score": 1.5, "ltc_completed": True})
    second = _drain(s, "u")
    assert len(second) == studies.MAX_MODEL_IN_FLIGHT
    s.on_trial_complete("u0", {"val_score": 1.2, "ltc_completed": True})
    third = _drain(s, "v")
    assert len(third) == 1 and s.suggest("w") == s.FINISHED
    trials = _study(tmp_path, "a").trials
    assert len(trials) == 7 and len({t.params["lr"] for t in trials}) == 7


def test_random_sampler_has_no_limit(tmp_path):
    s = _searcher(tmp_path, trials=6, sampler="random", settings=("a",))
    assert len(_drain(s)) == 6


def test_searcher_state_survives_a_restart_and_fails_orphans(tmp_path):
    s = _searcher(tmp_path, trials=4)
    first = [s.suggest(f"t{i}") for i in range(3)]
    s.on_trial_complete("t0", {"val_score": 0.3, "ltc_completed": True})
    s.save(str(tmp_path / "searcher.pkl"))
    s.suggest("lost")  # asked after Tune's last snapshot, then the driver died
    restored = _searcher(tmp_path, trials=4)
    restored.restore(str(tmp_path / "searcher.pkl"))
    rest = _drain(restored, "u")
    assert len(first) + len(rest) == 8  # every planned trial exactly once
    assert len({(c["setting"], c["trial_index"]) for c in first + rest}) == 8
    restored.on_trial_complete("t1", {"val_score": 0.2, "ltc_completed": True})  # issued before the save
    b = _study(tmp_path, "b")
    assert b.best_value == 0.2
    orphan = [t for t in b.trials if t.user_attrs.get("ray_trial_id") == "lost"]
    assert len(orphan) == 1 and orphan[0].state.name == "FAIL"
    assert pickle.loads(pickle.dumps(restored))._studies == {}  # open studies never go into Tune's pickles


def test_database_storage_and_masked_password(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    s = _searcher(tmp_path, trials=2, storage=url)
    assert len(_drain(s)) == 4
    assert len(_study(tmp_path, "a", storage=url).trials) == 2
    masked = studies.register_storage("postgresql://ltc:hunter2@127.0.0.1:5432/sweeps")
    assert "hunter2" not in masked and masked.startswith("postgresql://ltc:***@")
    with pytest.raises(ConfigError, match=r"pass --optuna-storage with its password again"):
        studies.open_storage("postgresql://other:***@127.0.0.1/db")


def _tune_trial(setting: str, number: int) -> Trial:
    return Trial("ltc_trial", config={"setting": setting, OPTUNA_TRIAL: number}, stub=True)


def test_early_stopping_judges_each_setting_by_its_own_trials(tmp_path):
    """Setting b's losses are all ten times setting a's: with one shared pruner every b trial would be cut."""
    s = _searcher(tmp_path, trials=3, settings=("a", "b"))
    configs = _drain(s)
    pruning = StudyPruning(storage=str(tmp_path / "optuna.log"), prefix=PREFIX, asha=AshaSpec(2, 2), max_epochs=20)
    trials = {i: _tune_trial(c["setting"], c[OPTUNA_TRIAL]) for i, c in enumerate(configs)}
    level = {"a": 1.0, "b": 10.0}
    decisions = {}
    # trial order: a0, b0, a1, b1, a2, b2; within a setting the later trials are worse (1.0, 1.5, 2.0 ×)
    for i, c in enumerate(configs):
        loss = level[c["setting"]] * (1 + 0.5 * c["trial_index"])
        for epoch in (1, 2):
            decisions[i] = pruning.on_trial_result(None, trials[i], {"val_score": loss, "epoch_count": epoch})
    by = {(c["setting"], c["trial_index"]): decisions[i] for i, c in enumerate(configs)}
    # the first trial of each setting reaches the rung first and goes on: b's is never judged against a's
    assert by[("a", 0)] == by[("b", 0)] == TrialScheduler.CONTINUE
    assert by[("a", 1)] == by[("b", 1)] == TrialScheduler.STOP  # worse than its own setting's first
    stored = _study(tmp_path, "b").trials[0]
    assert stored.intermediate_values == {1: 10.0, 2: 10.0}
    # a repeated step (a trial resumed from its checkpoint) is not stored twice, the final report not at all
    pruning2 = StudyPruning(storage=str(tmp_path / "optuna.log"), prefix=PREFIX, asha=None, max_epochs=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns when a step is reported twice: it must not be asked to
        again = pruning2.on_trial_result(None, trials[0], {"val_score": 5.0, "epoch_count": 2})
    assert again == TrialScheduler.CONTINUE
    final = {"val_score": 0.1, "epoch_count": 20, "ltc_completed": True}
    assert pruning2.on_trial_result(None, trials[0], final) == TrialScheduler.CONTINUE
    assert _study(tmp_path, "a").trials[0].intermediate_values == {1: 1.0, 2: 1.0}


def test_optuna_dashboard_opens_the_journal(tmp_path):
    """What the README tells users: `optuna-dashboard results/<name>/optuna.log` lists the sweep's studies."""
    s = _searcher(tmp_path, trials=2)
    c = s.suggest("t0")
    s.on_trial_complete("t0", {"val_score": 0.25, "ltc_completed": True})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = Path(sys.executable).with_name("optuna-dashboard")
    argv = [str(exe), str(tmp_path / "optuna.log"), "--host", "127.0.0.1", "--port", str(port), "--quiet"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    listed = json.load(r)["study_summaries"]
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "optuna-dashboard did not start"
                time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # only the server this test started
        proc.wait(timeout=30)
    by_name = {st["study_name"]: st for st in listed}
    assert set(by_name) == {"sw/ft/a"}  # studies open when their setting gets its first trial
    attrs = {a["key"]: a["value"] for a in by_name[f"sw/ft/{c['setting']}"]["user_attrs"]}
    assert attrs["setting"] == c["setting"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"search": {"sampler": "tpe"}}, r"search\.sampler: expected one of 'budget', 'random', got 'tpe'"),
        ({"asha": {"grace_epochs": 5, "reduction_factor": 1}}, r"reduction_factor=1: need .* reduction_factor >= 2"),
        ({"asha": {"grace_epochs": 5, "reduction_factor": 2.5}}, r"asha\.reduction_factor"),
    ],
)
def test_search_and_early_stopping_keys_are_checked_at_load(changes, message):
    from ltc.config import from_dict
    from ltc.sweep import SweepSpec

    spec = {"name": "x", "stages": [{"name": "pt", "datasets": ["l96"]}], **changes}
    with pytest.raises(ConfigError, match=message):
        from_dict(SweepSpec, spec)


def test_a_trial_that_ended_in_its_study_is_never_reported_into_again(tmp_path):
    """After a restart Tune may run on a trial whose Optuna trial ended: errored for good (Tune resumes errored
    trials) or pruned just before the driver died. Its reports are not written; a pruned one stops again, and
    an errored one that then finishes is added to its study, so the study agrees with the trials table."""
    s = _searcher(tmp_path, trials=2, settings=("a",))
    first, second = _drain(s)
    s.on_trial_complete("t0", error=True)
    pruning = StudyPruning(storage=str(tmp_path / "optuna.log"), prefix=PREFIX, asha=AshaSpec(2, 2), max_epochs=20)
    errored = _tune_trial("a", first[OPTUNA_TRIAL])
    assert pruning.on_trial_result(None, errored, {"val_score": 1.0, "epoch_count": 3}) == TrialScheduler.CONTINUE
    study = _study(tmp_path, "a")
    study.tell(second[OPTUNA_TRIAL], state=optuna.trial.TrialState.PRUNED)
    pruned = _tune_trial("a", second[OPTUNA_TRIAL])
    assert pruning.on_trial_result(None, pruned, {"val_score": 1.0, "epoch_count": 3}) == TrialScheduler.STOP
    s.on_trial_complete("t0", {"val_score": 0.5, "ltc_completed": True})  # the errored trial, resumed, finished
    trials = _study(tmp_path, "a").trials
    assert [t.state.name for t in trials] == ["FAIL", "PRUNED", "COMPLETE"]
    assert trials[0].intermediate_values == {} and trials[2].value == 0.5
    assert trials[2].params == trials[0].params and trials[2].user_attrs["ray_trial_id"] == "t0"


def test_open_trials_of_a_crashed_run_are_failed_when_their_study_is_opened_again(tmp_path):
    """A driver killed between Optuna's enqueue and ask, or after asking but before Tune's snapshot, leaves
    trials open. A searcher opening the study again (Tune restarted the stage, or restored an older
    snapshot) fails them; restore itself does no I/O (Tune would swallow its errors)."""
    s = _searcher(tmp_path, trials=3, settings=("a",))
    s.suggest("t0")
    s.save(str(tmp_path / "searcher.pkl"))
    s.suggest("lost")
    _study(tmp_path, "a").enqueue_trial({"lr": 1e-3}, user_attrs={"ray_trial_id": "never asked"})
    restored = _searcher(tmp_path, trials=3, settings=("a",))
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored._studies == {}  # nothing opened yet
    # the first thing after the restart: a live trial ends (it opens the study; it is no orphan)
    restored.on_trial_complete("t0", {"val_score": 0.3, "ltc_completed": True})
    rest = _drain(restored, "u")
    assert [c["trial_index"] for c in rest] == [1, 2]
    by_id = {t.user_attrs["ray_trial_id"]: t.state.name for t in _study(tmp_path, "a").trials}
    assert by_id == {"t0": "COMPLETE", "lost": "FAIL", "never asked": "FAIL", "u0": "RUNNING", "u1": "RUNNING"}


def test_a_database_password_is_kept_out_of_what_ltc_writes(tmp_path):
    from ltc.cli import _resume_argv

    url = "postgresql://ltc:hunter2@127.0.0.1:5432/sweeps?sslmode=require&sslpassword=opensesame"
    s = _searcher(tmp_path, storage=url)  # never opened: nothing to connect to here
    s.save(str(tmp_path / "searcher.pkl"))
    written = pickle.dumps(s) + (tmp_path / "searcher.pkl").read_bytes()
    pruning = pickle.dumps(StudyPruning(storage=s.storage, prefix=PREFIX, asha=None, max_epochs=3))
    args = argparse.Namespace(file="sweep.yaml", results="results", storage=None, address=None, cache=None,
                              data_home=None, optuna_storage=url, smoke=False)  # fmt: skip
    hint = " ".join(_resume_argv(args))
    for secret in ("hunter2", "opensesame"):
        assert secret.encode() not in written + pruning and secret not in hint
    assert "postgresql://ltc:PASSWORD@127.0.0.1:5432/sweeps" in hint
    with pytest.raises(ConfigError, match="the password is masked; give the real one"):
        studies.register_storage("postgresql://ltc:***@127.0.0.1:5432/sweeps")
