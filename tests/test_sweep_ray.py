"""Sweeps end to end on a real local Ray (2 CPUs) with real Optuna: the quickstart and every paper sweep."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import REPO, assert_studies_match
from ray_cluster import listening

from ltc.sweep import AshaSpec, load_sweep, run_sweep, smoke, summary
from ltc.sweep.driver import LOOPBACK_ONLY

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}

# `ltc sweep` up to the moment its local Ray has started, then the addresses it listens on; a SystemExit ends the
# sweep there (ray.shutdown at exit). It imports nothing of the tests' but ray_cluster: conftest would set
# LOOPBACK_ONLY itself, and the test would pass whatever ltc does.
PROBE = r"""
import json, os, sys
import ltc.sweep.driver as driver
from ltc.cli import main
from ray_cluster import listening

start = driver.init_ray
def probe(*args, **kwargs):
    start(*args, **kwargs)
    print("LISTEN " + json.dumps(sorted(listening(os.getpid()))), flush=True)
    raise SystemExit(0)
driver.init_ray = probe
sys.exit(main(sys.argv[1:]))
"""

pytestmark = pytest.mark.slow


def test_the_local_ray_of_ltc_sweep_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (LOOPBACK_ONLY[0], "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", PROBE, "sweep", str(REPO / "sweeps/cluster_check.yaml"), "--results", str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith("LISTEN ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    addresses = set(json.loads(lines[0].removeprefix("LISTEN ")))
    assert addresses and addresses <= LOOPBACK  # GCS, raylet, workers, agents: never the machine's address


def test_the_tests_local_ray_listens_on_loopback_only(local_ray):
    addresses = listening(os.getpid())
    assert addresses and addresses <= LOOPBACK


def tiny_quickstart():
    """The quickstart at tiny sizes, with ASHA and strategy blocks switched on so both stay covered end to end."""
    spec = load_sweep(REPO / "sweeps/quickstart.yaml")
    pt, ft = spec.stages
    assert ft.split is not None and ft.split.kfold  # the demo's protocol; here 3 folds x 1 repeat
    return dataclasses.replace(
        spec,
        asha=AshaSpec(grace_epochs=2, reduction_factor=3),
        search=dataclasses.replace(spec.search, trials=2, n_unfrozen="search"),
        stages=[
            dataclasses.replace(pt, max_sizes=[150], epochs=3, transform="standardize"),  # a stage's own transform
            dataclasses.replace(
                ft,
                epochs=4,
                strategies=["blocks"],
                split=dataclasses.replace(ft.split, folds=3, repeats=1),
                report_seconds=0,  # every epoch reported: the pruner sees each rung
            ),
        ],
    )


def test_quickstart_end_to_end(local_ray, tmp_path):
    spec = tiny_quickstart()
    trials = run_sweep(spec, results=tmp_path)
    saved = pd.read_parquet(tmp_path / "quickstart" / "trials.parquet")
    assert len(saved) == len(trials) == 2 + (3 * 2) * 2  # PT 2; FT (3 folds x start and scratch) x 2 trials
    assert set(saved.kind) == {"pretrain", "finetune", "scratch"}
    assert saved.groupby(["setting", "trial_index"]).size().max() == 1
    assert set(saved.status) <= {"completed", "pruned"} and (saved.status == "completed").sum() >= 5

    # Optuna proposed the learning rate (and n_unfrozen for strategy blocks) within each setting
    for _, g in saved.groupby("setting"):
        assert g.lr.nunique() == len(g)
        assert ((g.lr >= 3e-4) & (g.lr <= 1e-2)).all() or g.kind.iloc[0] == "pretrain"
    ft = saved[saved.kind == "finetune"]
    assert ft.n_unfrozen.between(0, 3).all() and ft.n_unfrozen.nunique() >= 2
    assert saved[saved.kind != "finetune"].n_unfrozen.isna().all()

    # FT rows name the PT checkpoint they started from: the best completed PT trial
    pt = saved[(saved.kind == "pretrain") & (saved.status == "completed")]
    best_pt = pt.loc[pt.val_score.idxmin()]
    assert set(ft.init) == {best_pt.checkpoint} and set(ft.pt_dataset) == {"agl"}
    assert set(saved[saved.kind == "scratch"].init.dropna()) == set()
    ckpt = torch.load(best_pt.checkpoint, weights_only=True)
    assert ckpt["targets"][0]["dataset"] == "agl" and ckpt["targets"][0]["scaler"]["kind"] == "standardize"
    # the stage's transform for PT, the dataset's default (log for kappa) for FT, in the table
    completed = saved[saved.status == "completed"]
    assert set(completed[completed.kind == "pretrain"]["transform"]) == {"standardize"}
    assert set(completed[completed.kind != "pretrain"]["transform"]) == {"log10p1+standardize"}

    done = saved[saved.status == "completed"]
    assert done.test_mae.notna().all() and done.test_mae_log10.notna().all() and done.checkpoint.notna().all()
    assert saved[saved.status == "pruned"].test_mae.isna().all()
    # which trials are stopped depends on which reaches a rung first (timing), so there may be none
    assert saved[saved.status == "pruned"].epochs_run.between(2, 3).all()  # stopped at a rung, before the end
    fine = done[done.kind == "finetune"].iloc[0]
    assert torch.load(fine.checkpoint, weights_only=True)["history"][0]["datasets"] == ["agl"]
    assert fine.n_train + fine.n_val in (63, 64) and fine.n_test in (31, 32) and fine.epochs_run == 4  # of 95

    # one Optuna study per setting in the sweep's journal: its trials are the setting's rows, state for status
    assert_studies_match(tmp_path / "quickstart", saved)

    best = pd.read_parquet(tmp_path / "quickstart" / "best" / "finetune" / "best.parquet")
    cells = sorted((tmp_path / "quickstart" / "best" / "finetune").glob("*/"))
    assert len(best) == 6 and len(cells) == 2  # one folder per cell, holding its 3 fold models
    assert sorted(p.parent.name for p in cells[0].glob("*/checkpoint.pt")) == ["r0f0", "r0f1", "r0f2"]
    text = summary(saved)
    assert "scratch" in text and "l96" in text and "±" in text
    assert "judged by MAE log10 kappa" in text and "agl:max150 [blocks] vs scratch:" in text
    assert "(A better on " in text and " of 3 folds)" in text

    # the report of a K-fold sweep: every figure it can draw is drawn (none fails), pooled metrics and pairs
    from ltc.results import write_report

    report = write_report(tmp_path / "quickstart")
    assert not any(why.startswith("failed") for why in report.skipped.values()), report.skipped
    assert "Parity plot of the best model per FT dataset (test set)" in report.figures
    text = report.path.read_text()
    assert "| scratch | scratch | 3 folds, 1 full repeat |" in text and "| agl:max150 [blocks] | scratch |" in text

    # the fold models of a cell are the ensemble `ltc predict` uses: mean ± std over 3 models
    from ltc.cli import main

    assert main(["predict", "--checkpoint", str(cells[0]), "l96", "--out", str(tmp_path / "p.parquet")]) == 0
    preds = pd.read_parquet(tmp_path / "p.parquet")
    assert (preds.n_models == 3).all() and len(preds) == 95 and (preds.pred_std > 0).all()

    # the same results folder again: refuses without --resume, does nothing with it
    with pytest.raises(FileExistsError, match="pass --resume"):
        run_sweep(spec, results=tmp_path)
    again = run_sweep(spec, results=tmp_path, resume=True)
    assert len(again) == len(saved)


@pytest.mark.parametrize(
    "name", ["devi_pairwise", "devi_ft_size", "devi_pt_size", "devi_strategies", "devi_mpt", "paraisite_ltc"]
)
def test_paper_sweep_scaled_down(local_ray, tmp_path, name):
    spec = smoke(load_sweep(REPO / "sweeps" / f"{name}.yaml"))
    trials = run_sweep(spec, results=tmp_path)
    assert (trials.status == "completed").all(), trials[["setting", "status", "error"]]
    assert list(dict.fromkeys(trials.stage)) == [s.name for s in spec.stages]
    for stage in spec.stages:
        rows = trials[trials.stage == stage.name]
        if stage.sources:
            source = trials[trials.stage.isin([src.stage for src in stage.sources])]
            assert set(rows[rows.kind == "finetune"].init) <= set(source.checkpoint)
        single = rows[~rows.dataset.str.contains(r"\+")]
        assert single.test_mae.notna().all() and single.test_r2.notna().all()
    multi = trials[trials.dataset.str.contains(r"\+")]
    for _, row in multi.iterrows():  # multi-property PT: metrics per property
        assert set(pd.read_json(pd.io.common.StringIO(row.task_metrics)).columns) == set(row.dataset.split("+"))


@pytest.mark.parametrize("name", ["paraisite_laptop", "devi_laptop", "chgnet_l96"])
def test_reproductions_scaled_down_with_their_paper_tables(local_ray, tmp_path, name):
    # what `make reproduce` runs, smoke-sized: the sweep, its report, and the table beside the paper's numbers
    import subprocess
    import sys

    from ltc.results import write_report

    spec = smoke(load_sweep(REPO / "sweeps" / f"{name}.yaml"))
    trials = run_sweep(spec, results=tmp_path)
    assert (trials.status == "completed").all(), trials[["setting", "status", "error"]]
    folder = tmp_path / spec.name
    write_report(folder)
    out = tmp_path / "reference" / name
    script = REPO / "reproduce" / "paper_tables.py"
    done = subprocess.run([sys.executable, str(script), name, str(folder), str(out), "--wall-seconds", "90"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert {"report.md", "papers.md", "trials.parquet"} <= {p.name for p in out.iterdir()}
    text = (out / "papers.md").read_text()
    assert "in 1.5 minutes" in text and ("## What differs from the paper" in text or "## What was run" in text)
    ft = trials[trials.kind != "pretrain"]
    if name == "paraisite_laptop":
        # steps I, II, III of the one smoke dataset, each beside the paper's MAPE, and three paired rows
        assert "| l96 | I (scratch) | scratch | 54 |" in text and "| l96 | III (fe → agl) |" in text
        assert text.count("| l96 | step ") == 3
        assert set(ft.start) == {"scratch", "fe:max64", "fe:max64>agl:max64[all]"}
    elif name == "chgnet_l96":
        # five cells, each start against its own architecture's scratch, the two scratch baselines against each other
        for cell in ("scratch[cgcnn]", "scratch[chgnet]", "chgnet-0.3.0", "agl:max64"):
            assert f"| {cell} |" in text
        assert "| chgnet-0.3.0 [all] | scratch[chgnet] |" in text and "| agl:max64 [all] | scratch[cgcnn] |" in text
        assert "| chgnet-0.3.0 [all] | scratch[cgcnn] |" not in text
    else:
        # smoke size 64 is not one of the paper's sizes: its R² is "–", and one subset cannot be judged
        # (the smoke keeps dc, the first target pz's model may fine-tune on)
        assert "| dc | 64 | scratch | – |" in text and "| dc | 64 | pz | – |" in text
        assert "cannot be judged (1 pairs)" in text


def test_a_sweep_mixing_cgcnn_and_pretrained_chgnet(local_ray, tmp_path):
    # one FT stage from CHGNet 0.3.0 (pretrained, real size) and from a tiny CGCNN, with a scratch baseline of each
    from ltc.config import from_dict
    from ltc.results import write_report
    from ltc.sweep import SweepSpec

    spec = from_dict(SweepSpec, {
        "name": "mixed", "model_config": {"hidden": 16, "n_blocks": 2, "fc_dim": 16}, "asha": None,
        "search": {"trials": 1, "lr": 1e-3},
        "stages": [
            {"name": "pt", "datasets": ["hh143"], "max_sizes": [60], "epochs": 1, "checkpoint_every": 1},
            {"name": "ft", "datasets": ["l96"], "scratch": True, "epochs": 1, "batch_size": 16, "report_seconds": 0,
             "start_from": [{"pretrained": "chgnet-0.3.0"}, {"stage": "pt"}],
             "split": {"test": "kfold", "folds": 3, "repeats": 1, "val_fraction": 0.2}},
        ],
    })  # fmt: skip
    trials = run_sweep(spec, results=tmp_path)
    assert (trials.status == "completed").all(), trials[["setting", "status", "error"]]
    ft = trials[trials.stage == "ft"]
    assert len(ft) == 3 * 4  # 3 folds x (2 starts + 2 baselines)
    assert set(ft.start) == {"chgnet-0.3.0", "hh143:max60", "scratch[chgnet]", "scratch[cgcnn]"}
    assert dict(zip(ft.start, ft.arch, strict=True)) == {
        "chgnet-0.3.0": "chgnet", "scratch[chgnet]": "chgnet", "hh143:max60": "cgcnn", "scratch[cgcnn]": "cgcnn"
    }  # fmt: skip
    # the chgnet FT trials started from the pretrained weights, the scratch ones from none
    for _, row in ft[ft.start == "chgnet-0.3.0"].iterrows():
        history = torch.load(row.checkpoint, weights_only=True)["history"]
        assert history[0]["pretrained"] == "chgnet-0.3.0" and history[1]["init"] == "chgnet-0.3.0"
    assert ft[ft.kind == "scratch"].init.isna().all()
    scratch_chgnet = ft[ft.start == "scratch[chgnet]"].iloc[0]
    assert torch.load(scratch_chgnet.checkpoint, weights_only=True)["model"]["name"] == "chgnet"
    # the same test structures in every fold, whatever the architecture
    tested: dict[tuple[str, int], frozenset[str]] = {}
    for _, row in ft.iterrows():
        preds = pd.read_parquet(row.checkpoint.replace("checkpoint.pt", "predictions.parquet"))
        tested[(row.start, int(row.fold))] = frozenset(preds[preds.split == "test"].id)
    for fold in range(3):
        assert len({tested[(start, fold)] for start in set(ft.start)}) == 1, fold
    # the report pairs each start with its own architecture's scratch, and every cell on the same units
    text = write_report(tmp_path / "mixed").path.read_text()
    assert "| chgnet-0.3.0 [all] | scratch[chgnet] |" in text and "| hh143:max60 [all] | scratch[cgcnn] |" in text
    assert "| chgnet-0.3.0 [all] | scratch[cgcnn] |" not in text
    assert "| hh143:max60 [all] | scratch[chgnet] |" not in text

    def paired(a: str, b: str) -> bool:  # either order
        return f"| {a} | {b} |" in text or f"| {b} | {a} |" in text

    assert paired("chgnet-0.3.0 [all]", "hh143:max60 [all]") and paired("scratch[chgnet]", "scratch[cgcnn]")
