"""A trial opens what the driver resolved for it, by path, and nothing else (real Ray Tune, real data)."""

from __future__ import annotations

import shutil

import pytest
from conftest import DATA_HOME

from ltc.config import from_dict
from ltc.errors import MissingFileError
from ltc.inputs import RunInputs, resolve_inputs
from ltc.sweep import SweepSpec
from ltc.sweep.plan import plan, resolve_holdout, trial_config

pytestmark = pytest.mark.slow

SPEC = {
    "name": "addr",
    "model_config": {"hidden": 16, "n_blocks": 2, "fc_dim": 16},
    "stages": [{"name": "pt", "datasets": ["l96"], "max_sizes": [50], "epochs": 2, "batch_size": 8,
                "holdout": ["hh143"], "checkpoint_every": 1, "checkpoint_seconds": 0, "report_seconds": 0}],
}  # fmt: skip


def test_a_trial_runs_with_its_raw_data_gone(tmp_path, monkeypatch):
    """The raw files are deleted after the driver's resolution: the trial still trains, so it never read them."""
    import ray
    from ray import tune

    from ltc.trial import COMPLETED, ltc_trial

    home = tmp_path / "data"
    shutil.copytree(DATA_HOME / "ltc_paraisite", home / "ltc_paraisite")
    (home / "SOURCES.md").write_text("a copy for this test\n")
    cache = tmp_path / "cache"
    spec = from_dict(SweepSpec, SPEC)
    stage = spec.stages[0]
    inputs = resolve_inputs(
        ["l96"], holdout=resolve_holdout(spec, stage), graph=spec.graph_config, split=spec.split, home=home, cache=cache
    )
    config = trial_config(spec, stage, plan(spec)["pt"][0], inputs) | {"lr": 1e-3, "n_unfrozen": None, "trial_index": 0}
    shutil.rmtree(home)  # every raw file: a trial that read, hashed or featurised one would fail
    monkeypatch.setenv("LTC_DATA_HOME", str(home))
    monkeypatch.setenv("LTC_CACHE", str(tmp_path / "elsewhere"))  # nor may it fall back to another cache

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        grid = tune.Tuner(
            tune.with_resources(ltc_trial, {"cpu": 1}),
            param_space=config,
            run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="t", verbose=0),
        ).fit()
    finally:
        ray.shutdown()
    result = grid[0]
    assert result.error is None, result.error
    assert result.metrics[COMPLETED] and result.metrics["epochs_run"] == 2
    assert result.metrics["n_train"] + result.metrics["n_val"] <= 50
    assert not (tmp_path / "elsewhere").exists()


def test_a_missing_shard_folder_is_named(tmp_path):
    inputs = RunInputs({"l96": str(tmp_path / "gone")}, {"l96": str(tmp_path / "ids.json")})
    with pytest.raises(MissingFileError, match=f"shard folder {tmp_path / 'gone'} \\(dataset l96\\) does not exist"):
        inputs.open_shards("l96")
    with pytest.raises(MissingFileError, match=r"ids\.json does not exist"):
        inputs.split_ids("l96")
