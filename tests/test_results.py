"""ltc report and the analysis notebook, on the output of a real small sweep (local Ray, 2 CPUs)."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from ltc.cli import main
from ltc.config import from_dict
from ltc.results import FIGURES, load_trials, write_report
from ltc.sweep import SweepSpec, run_sweep

pytestmark = pytest.mark.slow

MINI = {
    "name": "mini",
    "model_config": {"hidden": 16, "n_blocks": 2, "fc_dim": 16},
    "asha": None,
    "search": {"trials": 1, "lr": {"low": 1e-3, "high": 1e-2}},
    "stages": [
        {"name": "pretrain", "datasets": ["pz", "dc"], "max_sizes": [100, 200], "epochs": 3, "batch_size": 16},
        {"name": "finetune", "datasets": ["l96"], "start_from": {"stage": "pretrain"}, "sizes": [30, 60],
         "seeds": [0, 1], "strategies": ["all", "blocks"], "scratch": True, "epochs": 4, "batch_size": 8,
         "search": {"trials": 2}},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def mini_results(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("sweeps")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        run_sweep(from_dict(SweepSpec, MINI), results=root)
    finally:
        ray.shutdown()
    return root / "mini"


def _png_has_content(path) -> None:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 150 and img.shape[1] > 150, path
    assert img[..., :3].std() > 0.05, f"{path} is blank"


def test_report_writes_every_table_and_figure(mini_results, capsys):
    assert main(["report", str(mini_results)]) == 0
    printed = capsys.readouterr().out
    text = (mini_results / "report.md").read_text()
    assert "not drawn" not in printed
    for title in [*FIGURES, "Parity plot of the best model per FT dataset (test set)",
                  "Optuna trials in the lr × n_unfrozen plane"]:  # fmt: skip
        assert f"### {title}" in text
    pngs = sorted(mini_results.glob("*.png"))
    assert {p.name for p in pngs} == {
        "heatmap_gain.png", "ft_size.png", "pt_size.png", "strategies.png", "parity.png", "optuna_lr_n_unfrozen.png",
    }  # fmt: skip
    for p in pngs:
        _png_has_content(p)
        assert f"]({p.name})" in text
    # the tables: PT, and for each FT size every start and scratch, by kappa's headline metric, then paired
    assert "## Pre-training" in text and "| pretrain | pz | 100 |" in text
    heading = "### finetune: l96, FT size {} (W/(m K); MAE log10 kappa, lower is better)"
    assert heading.format(30) in text and heading.format(60) in text
    for start in ("pz:max100", "pz:max200", "dc:max100", "dc:max200"):
        assert f"| {start} | all |" in text and f"| {start} | blocks |" in text
    assert "| scratch | scratch | 2 seeds |" in text
    assert text.count("Lowest validation loss: start `") == 2
    assert "| start | strategy | units | mae_log10 | r2_log10 | mape |" in text  # kappa: log10 metrics first
    # 2 seeds are 2 pairs: the report says so instead of a verdict
    assert "| pz:max200 [all] | scratch | MAE log10 kappa | 2 |" in text
    assert "cannot be judged (2 pairs; need 3)" in text and "] is better" not in text
    assert "Selection honesty" in text

    # the numbers in the table are the seeds' best trials, recomputed here from trials.parquet
    trials = load_trials(mini_results)
    done = trials[trials.status == "completed"]
    best = done.loc[done.groupby("setting").val_loss.idxmin()]
    g = best[(best.start == "pz:max200") & (best.strategy == "all") & (best.ft_size == 60)]
    expected = f"{g.test_mae_log10.mean():.3g} ± {g.test_mae_log10.std(ddof=0):.2g}"
    assert f"| pz:max200 | all | 2 seeds | {expected} |" in text


def test_best_model_is_chosen_like_for_like(mini_results):
    from ltc.results import best_models

    best = best_models(load_trials(mini_results))
    assert list(best.ft_dataset) == ["l96"] and list(best.ft_size) == [60]  # the largest FT size only


def test_report_on_a_partial_sweep_shows_missing_not_zero(mini_results, tmp_path):
    trials = pd.read_parquet(mini_results / "trials.parquet")
    # as if the sweep had died: no scratch at size 60, one source never finished, one trial errored
    keep = ~((trials.kind == "scratch") & (trials.ft_size == 60))
    keep &= ~((trials.lineage == "dc:max200") & (trials.ft_size == 60))
    partial = trials[keep].copy()
    partial.loc[partial.index[-1], ["status", "test_mae", "test_r2"]] = ["error", np.nan, np.nan]
    partial.to_parquet(tmp_path / "trials.parquet")
    report = write_report(tmp_path)
    text = report.path.read_text()
    section = text.split("### finetune: l96, FT size 60")[1].split("###")[0]
    assert "scratch" not in section  # nothing invented: no scratch row, no comparison against it
    rows = [line for line in section.splitlines() if line.startswith("| pz:") or line.startswith("| dc:")]
    assert rows and "dc:max200" not in section
    # the heatmap compares at the largest FT size, where scratch is missing: not drawn (never a zero cell)
    assert "Not drawn: no fine-tuning dataset has a scratch baseline to compare with." in text
    assert "+0.0%" not in text

    for p in report.figures.values():
        _png_has_content(p)

    # only the PT stage finished: a report all the same, figures explain why they are missing
    only_pt = trials[trials.stage == "pretrain"]
    folder = tmp_path / "pt_only"
    folder.mkdir()
    only_pt.to_parquet(folder / "trials.parquet")
    report = write_report(folder)
    assert not report.figures and len(report.skipped) == 6
    assert "Not drawn: no fine-tuning trials." in report.path.read_text()


def test_results_of_an_older_ltc_still_report(mini_results, tmp_path):
    """A trials table of results schema 1 (``group``, no fold columns) still gives the whole report."""
    trials = pd.read_parquet(mini_results / "trials.parquet")
    old = trials.rename(columns={"source_key": "group"}).drop(columns=["fold", "repeat", "n_folds", "test_r2_log10"])
    old.to_parquet(tmp_path / "trials.parquet")
    assert main(["report", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "### finetune: l96, FT size 60 (W/(m K); MAE log10 kappa, lower is better)" in text
    assert "| pz:max200 [all] | scratch | MAE log10 kappa | 2 |" in text
    assert load_trials(tmp_path).source_key.notna().all()


def test_report_errors_clearly_without_results(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "trials.parquet does not exist" in capsys.readouterr().err


def test_optuna_figure_lr_tick_labels_do_not_overlap(tmp_path, monkeypatch):
    from ltc import results

    drawn = []  # the figure fig_optuna draws, kept for measuring once it is saved (and laid out)
    save = results._save
    monkeypatch.setattr(results, "_save", lambda fig, path: (drawn.append(fig), save(fig, path))[1])
    # lr searched in [1e-4, 1e-2] and [3e-4, 1e-2] (sampled inside, as Optuna does: with plain log ticks, both
    # panels labelled their minor ticks on top of each other), plus a narrow and a wide range
    spans = {"l96": (1e-4, 1e-2), "hh143": (3e-4, 1e-2), "narrow": (2e-3, 6e-3), "wide": (1e-6, 1e-1)}
    rows = []
    for dataset, (lo, hi) in spans.items():
        for i, lr in enumerate(np.geomspace(lo * 1.3, hi / 1.3, 12)):
            status = ("completed", "pruned", "error")[i % 3]
            rows.append({"ft_dataset": dataset, "lr": lr, "n_unfrozen": float(i % 4), "val_loss": 0.1 + i / 10,
                         "status": status})  # fmt: skip
    path, why = results.fig_optuna(pd.DataFrame(rows), tmp_path)
    assert path is not None, why
    _png_has_content(path)

    (fig,) = drawn
    fig.canvas.draw()
    lr_axes = [ax for ax in fig.axes if ax.get_xlabel() == "learning rate"]
    assert len(lr_axes) == len(spans)
    for ax in lr_axes:
        lo, hi = ax.get_xlim()
        labels = [t for t in ax.get_xticklabels(which="both")
                  if t.get_visible() and t.get_text() and lo <= t.get_position()[0] <= hi]  # fmt: skip
        assert len(labels) >= 2, [t.get_text() for t in labels]
        boxes = [t.get_window_extent() for t in labels]
        for i, j in itertools.combinations(range(len(labels)), 2):
            assert not boxes[i].overlaps(boxes[j]), (ax.get_title(), labels[i].get_text(), labels[j].get_text())


def test_notebook_runs_on_a_real_sweep(mini_results, monkeypatch):
    import nbclient
    import nbformat

    monkeypatch.setenv("LTC_RESULTS", str(mini_results))
    nb = nbformat.read(REPO / "notebooks" / "sweep_analysis.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()  # fmt: skip
    code = [c for c in nb.cells if c.cell_type == "code"]
    images = [c for c in code if any("image/png" in o.get("data", {}) for o in c.outputs)]
    assert len(images) == 2

    def shown(cell) -> str:  # the cell's displayed headings and tables
        return "\n".join(o.get("data", {}).get(k, "") for o in cell.outputs for k in ("text/markdown", "text/plain"))

    table = shown(next(c for c in code if "compare.cell_table" in c.source))
    assert "l96" in table and "scratch" in table and "pz:max200" in table
    assert "MAE log10 kappa" in table and "mae_log10" in table  # l96 is judged by its headline metric
    paired = shown(next(c for c in code if "compare.paired_table" in c.source))
    assert "pz:max200" in paired and "scratch" in paired and "verdict" in paired
    assert os.environ["LTC_RESULTS"] == str(mini_results)
