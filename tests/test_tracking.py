"""Trackers (``ltc/tracking.py``, ``ltc sweep --tracking``): a tiny sweep on a real local Ray logs each trial to a
real MLflow file store and to offline W&B runs, one run per trial tagged with its setting."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from ltc.cli import main
from ltc.errors import ConfigError
from ltc.tracking import Tracker, callbacks, parse_tracking, setting_tags

TINY = {"hidden": 16, "n_blocks": 2, "fc_dim": 16}
# one stage, one setting, two trials of two epochs: seconds
SWEEP = {
    "name": "tracked",
    "model_config": TINY,
    "asha": None,
    "search": {"trials": 2, "lr": {"low": 1e-3, "high": 1e-2}},
    # report_seconds 0: every epoch reported, so a run's metrics have a history
    "stages": [
        {"name": "pt", "datasets": ["l96"], "max_sizes": [60], "epochs": 2, "batch_size": 8, "report_seconds": 0}
    ],
}


@pytest.mark.slow
def test_each_trial_is_one_tagged_run_in_mlflow_and_offline_wandb(local_ray, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    # the file store: MLflow 3 asks for this opt-in (else `callbacks` refuses it in one line, tested below)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)  # W&B's default here: offline, nothing sent
    sweep = tmp_path / "tracked.yaml"
    sweep.write_text(yaml.safe_dump(SWEEP))
    store = (tmp_path / "mlruns").as_uri()
    argv = ["sweep", str(sweep), "--results", str(tmp_path), "--tracking", f"mlflow:{store}", "--tracking", "wandb"]
    assert main(argv) == 0

    trials = pd.read_parquet(tmp_path / "tracked" / "trials.parquet")
    assert len(trials) == 2 and set(trials.status) == {"completed"}
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("tracked")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    by_trial = {r.data.tags["trial_id"]: r for r in runs}
    assert len(runs) == 2 and sorted(by_trial) == sorted(trials.trial_id)  # one run per trial
    for row in trials.itertuples():
        run = by_trial[row.trial_id]
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        # the setting, as the trials table's columns say it
        assert tags["sweep"] == "tracked" and tags["stage"] == "pt" and tags["setting"] == row.setting
        assert (tags["kind"], tags["dataset"], tags["size"], tags["seed"]) == ("pretrain", "l96", "60", str(row.seed))
        assert tags["strategy"] == row.strategy == "pretrain" and tags["arch"] == row.arch
        assert float(run.data.params["lr"]) == pytest.approx(row.lr)  # Optuna's proposal, from the trial config
        assert run.data.metrics["val_loss"] == pytest.approx(row.val_loss)  # the trial's last report
        assert run.data.metrics["test_mae"] == pytest.approx(row.test_mae)
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history] == [1, 2]  # each report, at Tune's iteration

    # W&B offline: one run per trial in the results folder (for `wandb sync`), complete once the sweep has returned
    runs = tmp_path / "tracked" / "wandb"
    for trial_id in trials.trial_id:
        assert list((tmp_path / "tracked" / "ray" / "pt" / trial_id).glob("events.out.tfevents.*"))  # TensorBoard's
        offline = list(runs.glob(f"offline-run-*-{trial_id}"))
        assert len(offline) == 1, sorted(runs.rglob("*"))
        # W&B's own record file of the run (read as bytes: its reader is not public): tags and metrics are in it
        records = (offline[0] / f"run-{trial_id}.wandb").read_bytes()
        assert f"trial_id={trial_id}".encode() in records and b"setting=pt|l96:max60|seed0" in records
        assert b"val_loss" in records
    assert len(list(runs.glob("*run-*"))) == 2  # no online run beside them


def test_a_resume_hint_keeps_the_trackers():
    from ltc.cli import _resume_argv, build_parser

    args = build_parser().parse_args(
        ["sweep", "s.yaml", "--tracking", "mlflow:http://127.0.0.1:5000", "--tracking", "wandb"]
    )
    hint = _resume_argv(args)
    assert hint[-4:] == ["--tracking", "mlflow:http://127.0.0.1:5000", "--tracking", "wandb"] and "--resume" in hint


def test_setting_tags_are_the_trials_setting():
    pt = {
        "setting": "pt|agl+bg:max150|seed0", "stage": "pt", "kind": "pretrain", "datasets": ["agl", "bg"],
        "size": None, "max_size": 150, "seed": 0, "strategy": "all", "fold": None, "lr": 1e-3,
        "inputs": {"shards": {"agl": "/cache/shards/agl-1"}}, "init": None,
    }  # fmt: skip
    assert setting_tags(pt, sweep="s") == {
        "sweep": "s", "setting": "pt|agl+bg:max150|seed0", "stage": "pt", "kind": "pretrain", "dataset": "agl+bg",
        "size": "150", "seed": "0", "strategy": "pretrain",
    }  # fmt: skip
    ft = {**pt, "kind": "finetune", "datasets": ["l96"], "size": 40, "strategy": "blocks", "fold": 2, "repeat": 0}
    tags = setting_tags(ft, sweep="s")
    assert (tags["dataset"], tags["size"], tags["strategy"], tags["fold"], tags["repeat"]) == (
        "l96",
        "40",
        "blocks",
        "2",
        "0",
    )


def test_tracking_values_are_parsed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert parse_tracking(None) == []
    assert parse_tracking(["mlflow:http://127.0.0.1:5000", "wandb"]) == [
        Tracker("mlflow", "http://127.0.0.1:5000"),
        Tracker("wandb"),
    ]
    # a folder: an absolute file URI, whatever the driver's working directory becomes
    monkeypatch.chdir(tmp_path)
    assert parse_tracking(["mlflow:mlruns"]) == [Tracker("mlflow", (tmp_path / "mlruns").as_uri())]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////x/mlflow.db")
    assert parse_tracking(["mlflow"]) == [Tracker("mlflow", "sqlite:////x/mlflow.db")]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("foo", "--tracking foo: unknown tracker 'foo'; use mlflow:URI or wandb"),
        ("tensorboard:x", "--tracking tensorboard:x: unknown tracker 'tensorboard'"),
        ("mlflow:", "--tracking mlflow:: give MLflow's tracking URI"),
        ("wandb:proj", "--tracking wandb:proj: wandb takes no value"),
        ("mlflow:http://me:s3cret@127.0.0.1:5000", "a password in the URI; set MLFLOW_TRACKING_USERNAME"),
    ],
)
def test_a_bad_tracking_value_is_one_line_naming_it(capsys, tmp_path, value, message):
    sweep = tmp_path / "tracked.yaml"
    sweep.write_text(yaml.safe_dump(SWEEP))
    assert main(["sweep", str(sweep), "--dry-run", "--tracking", value]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "s3cret" not in err


@pytest.mark.parametrize("kind", ["mlflow", "wandb"])
def test_a_missing_tracker_package_is_one_line_even_in_a_dry_run(capsys, tmp_path, monkeypatch, kind):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == kind else real(name, *a))
    sweep = tmp_path / "tracked.yaml"
    sweep.write_text(yaml.safe_dump(SWEEP))
    value = "mlflow:http://127.0.0.1:5000" if kind == "mlflow" else "wandb"
    assert main(["sweep", str(sweep), "--dry-run", "--tracking", value]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"ltc sweep: error: --tracking {kind} needs {kind}: pip install 'ltc[tracking]'"


def test_a_store_mlflow_refuses_is_one_line_before_the_sweep_starts(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # MLflow 3 refuses file stores without it
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    sweep = tmp_path / "tracked.yaml"
    sweep.write_text(yaml.safe_dump(SWEEP))
    store = (tmp_path / "mlruns").as_uri()
    assert main(["sweep", str(sweep), "--results", str(tmp_path), "--tracking", f"mlflow:{store}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ltc sweep: error: --tracking mlflow:{store}: ") and "MLFLOW_ALLOW_FILE_STORE" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "tracked").exists()  # the results folder is not claimed: the same command runs once fixed
    with pytest.raises(ConfigError, match=f"^--tracking mlflow:{store}: "):  # run_sweep's own check, per stage
        callbacks([Tracker("mlflow", store)], sweep="s", stage="pt", root=tmp_path)
