"""ltc report and the analysis notebook, on the output of a real small sweep (local Ray, 2 CPUs)."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from ltc import compare
from ltc.cli import main
from ltc.config import from_dict
from ltc.results import FIGURES, load_trials, write_report
from ltc.sweep import SweepSpec, run_sweep
from ltc.targets import regression_metrics

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


# K-fold: L96 in 3 folds x 2 repeats, a PT start against scratch on the same 6 (repeat, fold) units
KFOLD = {
    "name": "kfold",
    "model_config": {"hidden": 16, "n_blocks": 2, "fc_dim": 16},
    "asha": None,
    "search": {"trials": 1, "lr": 3e-3},
    "stages": [
        {"name": "pretrain", "datasets": ["agl"], "max_sizes": [120], "epochs": 2, "batch_size": 32},
        {"name": "finetune", "datasets": ["l96"], "start_from": {"stage": "pretrain"}, "scratch": True,
         "split": {"test": "kfold", "folds": 3, "repeats": 2, "val_fraction": 0.2}, "epochs": 3, "batch_size": 16},
    ],
}  # fmt: skip


def _run(spec: dict, root):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        run_sweep(from_dict(SweepSpec, spec), results=root)
    finally:
        ray.shutdown()
    return root / spec["name"]


@pytest.fixture(scope="module")
def mini_results(tmp_path_factory):
    return _run(MINI, tmp_path_factory.mktemp("sweeps"))


@pytest.fixture(scope="module")
def kfold_results(tmp_path_factory):
    return _run(KFOLD, tmp_path_factory.mktemp("kfold"))


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
    assert text.count("Lowest validation score (mean over each cell's seeds): `") == 2
    assert "| start | strategy | units | mae_log10 | r2_log10 | mape |" in text  # kappa: log10 metrics first
    # 2 seeds are 2 pairs: the report says so instead of a verdict
    assert "| pz:max200 [all] | scratch | MAE log10 kappa | 2 |" in text
    assert "cannot be judged (2 pairs; need 3)" in text and "] is better" not in text
    assert "Selection honesty" in text

    # the numbers in the table are the seeds' best trials, recomputed here from trials.parquet
    trials = load_trials(mini_results)
    done = trials[trials.status == "completed"]
    best = done.loc[done.groupby("setting").val_score.idxmin()]
    g = best[(best.start == "pz:max200") & (best.strategy == "all") & (best.ft_size == 60)]
    expected = compare.fmt_pm(g.test_mae_log10.mean(), g.test_mae_log10.std(ddof=0))
    assert f"| pz:max200 | all | 2 seeds | {expected} |" in text
    assert "Metrics: mean ± std (ddof 0) over the seeds counted in `units`" in text  # what the ± is over


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
            rows.append({"ft_dataset": dataset, "lr": lr, "n_unfrozen": float(i % 4), "val_score": 0.1 + i / 10,
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


# --------------------------------------------------------------------------------------------------
# The report, the console summary and the figures agree with each other and with trials.parquet: each
# figure's numbers are rebuilt here from the trials table (and the predictions beside its checkpoints).


def _best(results) -> pd.DataFrame:
    """Each setting's best completed trial, by hand (the rule the report states)."""
    trials = load_trials(results)
    done = trials[trials.status == "completed"]
    return done.loc[done.groupby("setting").val_score.idxmin()]


def _largest(best: pd.DataFrame, dataset: str) -> pd.DataFrame:
    rows = best[(best.ft_dataset == dataset) & (best.kind != "pretrain")]
    return rows[rows.ft_size == rows.ft_size.max()] if rows.ft_size.notna().any() else rows


def _argmin_cell(rows: pd.DataFrame) -> tuple[str, str]:
    """The (start, strategy) with the lowest mean validation score, every start and scratch alike."""
    return rows.groupby(["start", "strategy"]).val_score.mean().idxmin()


def _name(cell: tuple[str, str]) -> str:
    return cell[0] if cell[0] == "scratch" else f"{cell[0]} [{cell[1]}]"


def _predictions(checkpoint: str) -> pd.DataFrame:
    from pathlib import Path

    p = pd.read_parquet(Path(checkpoint).with_name("predictions.parquet"))
    return p[p.split == "test"]


@pytest.mark.parametrize(
    ("mean", "spread", "text"),
    [(122.3, 110.4, "122 ± 110"), (0.2961, 0.02134, "0.296 ± 0.021"), (0.515, 0.005, "0.515 ± 0.005"),
     (-0.601, 0.98, "-0.601 ± 0.98"), (285.2, 101.3, "285 ± 100"), (1234567.0, 45678.0, "1230000 ± 46000"),
     (0.00003, 0.000012, "0.00003 ± 0.000012"), (2.5, float("nan"), "2.5"), (float("nan"), 1.0, "–")],
)  # fmt: skip
def test_fmt_pm_writes_numbers_for_people(mean, spread, text):
    assert compare.fmt_pm(mean, spread) == text


def test_fmt_num_never_writes_exponents():
    rng = np.random.default_rng(0)
    for value in rng.uniform(-1, 1, 200) * 10.0 ** rng.integers(-7, 8, 200):
        text = compare.fmt_num(value)
        assert "e" not in text.lower(), text
        assert float(text) == pytest.approx(value, rel=5e-3), (value, text)
    assert compare.fmt_num(-1e-9, 2) == "-0.000000001" and compare.fmt_num(-0.0) == "0"


def _check_heatmap(results, monkeypatch, *, judged: bool) -> None:
    """Each heatmap cell is paired_table's A − B of the start (its lowest-val-loss strategy) against scratch,
    the same number as the mean of the per-unit differences in trials.parquet; the colour scale is symmetric,
    from judged cells only, and unjudged cells carry no colour."""
    from ltc import results as res

    best = _best(results)
    panels = res.heatmap_data(best)
    assert len(panels) == 1  # L96 only: one headline
    (panel,) = panels
    h = compare.headline("l96")
    assert panel.headline == h and not h.higher_is_better
    rows = _largest(best, "l96")
    units = ["repeat", "fold"] if rows.fold.notna().any() else ["seed"]
    paired = compare.paired_table(rows).set_index(["A", "B"])
    bounds = [0.0]
    assert set(panel.starts) == set(rows[rows.kind == "finetune"].start)
    for i, start in enumerate(panel.starts):
        strategy = rows[rows.start == start].groupby("strategy").val_score.mean().idxmin()
        a = rows[(rows.start == start) & (rows.strategy == strategy)].set_index(units)[f"test_{h.metric}"]
        b = rows[rows.start == "scratch"].set_index(units)[f"test_{h.metric}"]
        by_hand = (a - b.reindex(a.index)).mean()  # A − B: start minus scratch, per unit
        assert panel.diff[i, 0] == pytest.approx(by_hand, abs=1e-12)
        row = paired.loc[(f"{start} [{strategy}]", "scratch")]
        assert panel.text[i][0].startswith(row["A - B"])  # the table's number and sign
        assert bool(panel.judged[i, 0]) == (row["95% interval"] != compare.MISSING) == judged
        if judged:
            low, high = (float(x) for x in row["95% interval"].strip("[]").split(", "))
            bounds += [abs(by_hand), abs(low), abs(high)]
            assert row["95% interval"] in panel.text[i][0]
        else:
            assert f"{row['pairs']} pairs: not judged" in panel.text[i][0]
    assert panel.limit == pytest.approx(max(bounds), abs=1e-3)  # 0 when nothing is judged

    drawn = []
    save = res._save
    monkeypatch.setattr(res, "_save", lambda fig, path: (drawn.append(fig), save(fig, path))[1])
    path, why = res.fig_heatmap(best, results)
    assert path is not None, why
    _png_has_content(path)
    ax = drawn[0].axes[0]
    (image,) = ax.get_images()
    lim = panel.limit if panel.limit > 0 else 1e-3
    assert image.get_clim() == pytest.approx((-lim, lim))  # symmetric about 0
    assert (np.ma.getmaskarray(image.get_array()) == ~panel.judged).all()  # unjudged and missing: no colour
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert len(hatched) == int((np.isfinite(panel.diff) & ~panel.judged).sum())
    assert "lower is better" in ax.get_title() and "A − B = start − scratch" in ax.get_title()
    assert len(drawn[0].axes) == (2 if judged else 1)  # a colourbar only for a scale some cell uses


def test_heatmap_of_unjudged_pairs_is_hatched_not_coloured(mini_results, monkeypatch):
    _check_heatmap(mini_results, monkeypatch, judged=False)  # 2 seeds: 2 pairs each


def test_heatmap_is_the_paired_tables_a_minus_b(kfold_results, monkeypatch):
    _check_heatmap(kfold_results, monkeypatch, judged=True)  # 6 (repeat, fold) pairs


def test_parity_plot_is_the_pooled_out_of_fold_headline(kfold_results):
    """K-fold: the parity plot draws every full repeat's pooled out-of-fold test predictions of the cell with
    the lowest validation score, and prints the report's headline for that cell."""
    from ltc.results import parity_panels

    best = _best(kfold_results)
    rows = _largest(best, "l96")
    cell = _argmin_cell(rows)
    (panel,) = parity_panels(load_trials(kfold_results))
    assert panel.cell == cell
    g = rows[(rows.start == cell[0]) & (rows.strategy == cell[1])]
    assert len(g) == 6
    parts = {r: pd.concat([_predictions(c) for c in u.checkpoint]) for r, u in g.groupby("repeat")}
    every = pd.concat(parts.values())
    assert len(panel.points) == len(every) == 2 * 95  # each L96 structure once per repeat
    assert sorted(zip(panel.points.id, panel.points.y_pred, strict=True)) == sorted(
        zip(every.id, every.y_pred, strict=True)
    )
    per_repeat = [regression_metrics(p.y_true.to_numpy(), p.y_pred.to_numpy(), kappa=True)["mae_log10"]
                  for p in parts.values()]  # fmt: skip
    assert panel.value == compare.fmt_pm(np.mean(per_repeat), np.std(per_repeat))
    # the MAE of the points drawn is that headline too (repeats of equal size)
    pooled = regression_metrics(panel.points.y_true.to_numpy(), panel.points.y_pred.to_numpy(), kappa=True)
    assert pooled["mae_log10"] == pytest.approx(np.mean(per_repeat), rel=1e-9)
    assert "2 × 3 (repeats × folds)" in panel.what and panel.spread == "mean ± std over 2 repeats"

    text = write_report(kfold_results).path.read_text()
    assert f"| {cell[0]} | {cell[1]} | 6 folds, 2 full repeats | {panel.value} |" in text
    assert f"Lowest validation score (mean over each cell's folds): `{_name(cell)}`, " in text


def test_lowest_validation_loss_counts_scratch(mini_results, tmp_path):
    """The report's line, the parity plot and best_models name the argmin over every start and scratch; a
    scratch with the lowest validation score is named (it was left out)."""
    from ltc.results import best_models, parity_panels

    trials = pd.read_parquet(mini_results / "trials.parquet")
    scratch = trials.kind == "scratch"
    for factor, name in ((1e-3, "scratch_best"), (1e3, "scratch_worst")):  # whichever won in the run itself
        changed = trials.copy()
        changed.loc[scratch, "val_score"] = changed.loc[scratch, "val_score"] * factor
        (tmp_path / name).mkdir()
        changed.to_parquet(tmp_path / name / "trials.parquet")
    for folder, expect_scratch in ((tmp_path / "scratch_worst", False), (tmp_path / "scratch_best", True)):
        text = write_report(folder).path.read_text()
        best = _best(folder)
        for size in (30, 60):
            rows = best[(best.ft_dataset == "l96") & (best.ft_size == size)]
            cell = _argmin_cell(rows)
            assert (cell[0] == "scratch") == expect_scratch
            section = text.split(f"### finetune: l96, FT size {size} ")[1].split("###")[0]
            assert f"Lowest validation score (mean over each cell's seeds): `{_name(cell)}`, " in section
            if size == 60:  # the parity plot and best_models: the largest FT size
                (panel,) = parity_panels(load_trials(folder))
                g = rows[(rows.start == cell[0]) & (rows.strategy == cell[1])]
                assert panel.cell == cell and f"of {len(g)} seeds" in panel.what
                unit = g.sort_values("val_score").iloc[0]
                assert panel.value == compare.fmt_num(unit.test_mae_log10)
                assert len(panel.points) == len(_predictions(unit.checkpoint))
                (model,) = [r for _, r in best_models(load_trials(folder)).iterrows()]
                assert (model.start, model.strategy, model.setting) == (*cell, unit.setting)


def test_summary_gives_one_plus_minus_per_number(kfold_results):
    """The console summary: the report's pooled K-fold numbers, said per what, not the per-fold spread too."""
    from ltc.results import summary

    trials = pd.read_parquet(kfold_results / "trials.parquet")
    text = summary(trials)
    report = write_report(kfold_results).path.read_text()
    best = _best(kfold_results)
    rows = _largest(best, "l96")
    cells = compare.cell_table(rows, lambda c: pd.read_parquet(c.rsplit("/", 1)[0] + "/predictions.parquet"))
    for _, cell in cells.iterrows():
        assert cell.mae_log10 in text and f"| {cell.units} | {cell.mae_log10} |" in report
        g = rows[rows.start == cell.start]
        per_fold = compare.fmt_pm(g.test_mae_log10.mean(), g.test_mae_log10.std(ddof=0))
        if per_fold != cell.mae_log10:
            assert per_fold not in text  # the per-fold ± of the same MAE is not printed beside it
    assert "metrics: mean ± std (ddof 0) over full repeats" in text
    assert "e+0" not in text and "e-0" not in text
    pair = compare.paired_table(rows).iloc[0]
    low, high = (float(x) for x in pair["95% interval"].strip("[]").split(", "))
    assert f"A − B = {pair['A - B']} ± {(high - low) / 2:.3f}, 95 % interval (A better on " in text
    assert f"`{_name(_argmin_cell(rows))}`" in text


def test_rows_written_before_val_score_read_as_picked_by_the_loss():
    """A sweep resumed across the upgrade holds rows of both kinds: the old ones were picked by their loss."""
    from ltc.results import upgrade

    table = pd.DataFrame({"setting": ["a", "a", "b"], "val_loss": [0.2, 0.3, 0.5], "val_score": [np.nan, 0.1, np.nan],
                          "select_by": [None, "mae_log10", None], "n_folds": np.nan})  # fmt: skip
    got = upgrade(table)
    assert got.val_score.tolist() == [0.2, 0.1, 0.5] and got.select_by.tolist() == ["loss", "mae_log10", "loss"]
    assert "transform" in upgrade(table).columns and upgrade(table)["transform"].isna().all()  # schema 4: not recorded
    older = upgrade(table.drop(columns=["val_score", "select_by"]))  # schema 3: no such columns at all
    assert older.val_score.tolist() == [0.2, 0.3, 0.5] and (older.select_by == "loss").all()
