"""Load-time checks: whatever a trial would reject fails ``ltc sweep --dry-run`` (and the sweep's start), naming
the key and the value; ``--dry-run`` never imports Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from ltc.cli import main
from ltc.config import from_dict
from ltc.errors import ConfigError
from ltc.sweep import SweepSpec, validate

TINY = {"hidden": 16, "n_blocks": 2, "fc_dim": 16}


def _sweep(**changes) -> dict:
    base = {
        "name": "checks",
        "model_config": TINY,
        "search": {"trials": 1},
        "stages": [
            {"name": "pt", "datasets": ["hh143"], "max_sizes": [60], "epochs": 1},
            {"name": "ft", "datasets": ["l96"], "start_from": {"stage": "pt"}, "sizes": [40],
             "strategies": ["blocks"], "epochs": 1},
        ],
    }  # fmt: skip
    return {**base, **changes}


def _stage(i: int, **changes) -> list[dict]:
    stages = _sweep()["stages"]
    stages[i] = {**stages[i], **changes}
    return stages


def _dry_run(tmp_path, data: dict, capsys) -> tuple[int, str]:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    rc = main(["sweep", str(path), "--dry-run"])
    captured = capsys.readouterr()
    return rc, captured.err + captured.out


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # n_unfrozen outside the model's blocks (TINY cgcnn has 2), sweep-wide and per stage
        (_sweep(search={"trials": 1, "n_unfrozen": 9}), "search.n_unfrozen=9: cgcnn has 2 blocks"),
        (_sweep(stages=_stage(1, search={"n_unfrozen": 3})), "stages[1].search.n_unfrozen=3: cgcnn has 2 blocks"),
        # unknown dataset and holdout names
        (_sweep(stages=_stage(0, datasets=["kappa"])), "stage 'pt': datasets: unknown dataset 'kappa'"),
        (_sweep(stages=_stage(0, holdout=["nope"])), "stage 'pt': holdout: unknown dataset 'nope'"),
        # a strategy the model lacks
        (_sweep(stages=_stage(1, strategies=["all", "three_body"])), "stages[1].strategies[1]='three_body'"),
        # more structures than l96 has outside its 10 % test set (95 rows, 10 test)
        (_sweep(stages=_stage(1, sizes=[40, 90])), "stages[1].sizes[1]=90: l96 has at most 85 structures"),
        # a bad model_config
        (_sweep(model_config={"hidden": 16, "n_layers": 2}), "model_config {'hidden': 16, 'n_layers': 2}: unknown"),
        (_sweep(model_config={"hidden": -4}), "hidden=-4 must be an integer >= 1"),
        # values a trial would take and fail on, or never end with (issue 25)
        (_sweep(model_config={"hidden": 1000000}), "parameters need ~"),
        (_sweep(search={"trials": 1, "lr": float("inf")}), "search: lr=inf must be a finite number > 0"),
        (_sweep(search={"trials": 1, "lr": {"low": 1e-3, "high": float("inf")}}), "need 0 < low < high, both finite"),
        (_sweep(search={"trials": 1, "sampler_seed": -5}), "sampler_seed=-5 must be between 0 and 4294967295"),
        (_sweep(stages=_stage(1, sizes=[0])), "stage 'ft': sizes[0]=0 must be >= 1"),
        (_sweep(stages=_stage(0, max_sizes=[-5])), "stage 'pt': max_sizes[0]=-5 must be >= 1"),
        (_sweep(stages=_stage(0, weight_decay=float("nan"))), "stage 'pt': weight_decay=nan must be finite and >= 0"),
        (_sweep(stages=_stage(0, seeds=[-1])), "seeds[0]=-1 must be between 0 and"),
        (_sweep(stages=_stage(1, transform="log")), "stage 'ft': transform='log' must be one of"),
        # a log transform of targets at or below -1 (jarvis2d's are scaled to [-1, 1]) fails every trial
        (
            _sweep(stages=_stage(0, datasets=["jarvis2d"], transform="log10p1")),
            "stages[0].transform='log10p1': jarvis2d has targets down to -1, and log10(1 + y) needs y > -1",
        ),
        (_sweep(max_failures=-1), "max_failures=-1 must be between 0 and 100"),
        (_sweep(resources={"cpu": float("inf")}), "need cpu > 0 and gpu >= 0, both finite"),
        (_sweep(split={"test": "kfold", "repeats": 1000000}), "repeats=1000000 must be an integer between 1 and 100"),
        # names that would leave the results folder
        (_sweep(name=".."), "name='..' must be a plain name"),
        (_sweep(stages=_stage(0, name="../../tmp/x/PWNED_stage")), "stage name='../../tmp/x/PWNED_stage' must be a"),
    ],
)
def test_dry_run_rejects_what_a_trial_would(tmp_path, capsys, data, message):
    rc, out = _dry_run(tmp_path, data, capsys)
    assert rc == 2, out
    assert message in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1  # one line


def test_a_good_sweep_passes_and_validate_is_what_the_driver_calls(tmp_path, capsys):
    rc, out = _dry_run(tmp_path, _sweep(), capsys)
    assert rc == 0 and "total: 2 settings, 2 trials" in out
    spec = from_dict(SweepSpec, _sweep(stages=_stage(1, sizes=[86])))
    with pytest.raises(ConfigError, match=r"stages\[1\].sizes\[0\]=86"):
        validate(spec)  # run_sweep calls this before it starts Ray


def test_the_exact_size_check_counts_held_out_formulas():
    """``check_sizes`` (the driver's, once a stage is resolved) is exact: mix's test formulas leave l96's pool."""
    import dataclasses

    from ltc.inputs import resolve_inputs
    from ltc.splits import training_pool
    from ltc.sweep.plan import check_sizes, plan

    ft = {**_stage(1)[1], "start_from": None, "strategies": ["all"], "holdout": ["mix"]}
    spec = from_dict(SweepSpec, _sweep(stages=[ft]))
    stage = spec.stages[0]
    inputs = resolve_inputs(["l96"], holdout=["mix"], graph=spec.graph_config, split=spec.split)
    shards = inputs.open_shards("l96")
    pool = len(
        training_pool(shards, spec.split, exclude_formulas=inputs.holdout_formulas(), ids=inputs.split_ids("l96"))
    )
    assert pool < 85  # some of l96's compounds are in mix's test set
    settings = plan(spec)["ft"]
    check_sizes(spec, stage, [dataclasses.replace(s, size=pool) for s in settings], inputs)
    with pytest.raises(ConfigError, match=rf"l96 has only {pool} structures outside its test set and the held-out"):
        check_sizes(spec, stage, [dataclasses.replace(s, size=pool + 1) for s in settings], inputs)


def test_dry_run_never_imports_ray():
    code = (
        "import sys; from ltc.cli import main; rc = main(['sweep', 'sweeps/devi_ft_size.yaml', '--dry-run']); "
        "assert rc == 0, rc; bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]; "
        "assert not bad, bad[:5]; print('no ray')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("no ray") and "total: 1232 settings, 3682 trials" in out.stdout


def test_binary_yaml_and_yaml_mistakes_are_one_line(tmp_path, capsys):
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    assert main(["sweep", str(tmp_path / "bin.yaml"), "--dry-run"]) == 2
    assert "bin.yaml: not a text file (undecodable byte at 128); a sweep file is YAML" in capsys.readouterr().err
    (tmp_path / "tab.yaml").write_text("name: x\nstages:\n\t- name: pt\n")
    assert main(["sweep", str(tmp_path / "tab.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "tab.yaml: not valid YAML at line 3, column 1" in err and len(err.strip().splitlines()) == 1


def test_resources_beyond_this_machine(tmp_path, capsys):
    """A dry-run says so (the file may be meant for a cluster); a sweep on this machine's Ray refuses to start."""
    from ltc.sweep.plan import beyond_this_machine

    data = _sweep(resources={"cpu": 1000, "gpu": 0})
    rc, out = _dry_run(tmp_path, data, capsys)
    assert rc == 0 and "note: resources: cpu=1000, gpu=0 per trial, and this machine has" in out
    spec = from_dict(SweepSpec, data)
    assert beyond_this_machine(spec)
    with pytest.raises(ConfigError, match="its trials would never start; give --address"):
        validate(spec, local=True)


def test_a_stage_transform_reaches_its_trials_run_config():
    from ltc.inputs import RunInputs
    from ltc.sweep import plan
    from ltc.sweep.plan import trial_config
    from ltc.trial import run_config

    spec = from_dict(SweepSpec, _sweep(stages=_stage(1, transform="minmax")))
    inputs = RunInputs({"hh143": "/s/hh143", "l96": "/s/l96"}, {"hh143": "/i.json", "l96": "/i.json"})
    p = plan(spec)
    pt = trial_config(spec, spec.stages[0], p["pt"][0], inputs)
    ft = trial_config(spec, spec.stages[1], p["ft"][0], inputs)
    assert run_config({**pt, "lr": 1e-3}).transform is None  # each dataset's default
    assert run_config({**ft, "lr": 1e-3, "n_unfrozen": 1, "init": "pt.pt"}).transform == "minmax"
