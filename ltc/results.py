"""Sweep results → tables, figures and ``report.md`` (``ltc report RESULTS_DIR``; ``ltc.choices.REPORT_HELP``).

Everything starts from ``trials.parquet``. Each unit (a seed, or a fold of a repeat) of a setting is
represented by its best trial (lowest validation score) among the completed ones; a cell's metrics are then
mean ± std over seeds, or over repeats of pooled out-of-fold predictions (K-fold), and every ± says over
what. What is "best" (strategy, lr, n_unfrozen, the parity plot's model) is chosen on the validation score, never
on the test set, by one aggregate (``compare.val_score_by_cell``). A sweep that stopped half way reports what
it has: a missing cell is drawn and printed as missing, never as zero.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ltc import compare, datasets
from ltc.errors import MissingFileError
from ltc.io import filesystem, read_parquet_checked, write_text_atomic
from ltc.stats import format_diff
from ltc.targets import Headline

log = logging.getLogger(__name__)

MISSING = compare.MISSING


def load_trials(results_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """``RESULTS_DIR/trials.parquet`` with a ``start`` column (the trial's source lineage, or its kind).

    Tables of older ltc versions are brought to the current columns (``group`` → ``source_key``). The folder's own
    datasets (its sweep's ``datasets:``) are remembered, so that their names mean what they meant in the sweep
    (kappa: judged on log10; units) in the tables and figures made from it (``datasets.described``).
    """
    path = Path(results_dir) / "trials.parquet"
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist; point at a sweep's results folder (results/<sweep name>)")
    datasets.remember(declared_in(results_dir).values())
    table = read_parquet_checked(path, "`ltc sweep FILE --resume` writes it again from the stages' tables")
    return with_start(upgrade(table))


def upgrade(trials: pd.DataFrame) -> pd.DataFrame:
    """A trials table of any ltc version with the current columns (schema 1: ``group``, no folds)."""
    if "source_key" not in trials.columns and "group" in trials.columns:
        trials = trials.rename(columns={"group": "source_key"})
    for col in ("fold", "repeat", "n_folds", "test_r2_log10"):
        if col not in trials.columns:
            trials = trials.assign(**{col: np.nan})
    # schema 3 and older, or their rows in a sweep resumed since: epochs and trials were picked by the loss
    if "val_score" not in trials.columns:
        trials = trials.assign(val_score=np.nan, select_by=None)
    old = trials.val_score.isna() & trials.select_by.isna() & trials.val_loss.notna()
    if old.any():
        trials = trials.assign(val_score=trials.val_score.where(~old, trials.val_loss),
                               select_by=trials.select_by.where(~old, "loss"))  # fmt: skip
    if "transform" not in trials.columns:  # schema 4 and older: not recorded (each dataset's default then)
        trials = trials.assign(transform=None)
    if "split" not in trials.columns:  # schema 3 and older: K-fold stages were the only folded ones
        trials = trials.assign(split=np.where(trials.n_folds.notna(), "kfold", None))
    return trials


def with_start(trials: pd.DataFrame) -> pd.DataFrame:
    """``trials`` with ``start``: where each trial started from (source lineage, with its PT size), or its kind;
    a stage that mixes architectures names its baselines ``scratch[<model>]`` (the trials' own ``start``)."""
    start = trials.lineage.where(trials.lineage.notna(), trials.kind)
    if "start" in trials.columns:  # written since schema 3
        start = trials.start.where(trials.start.notna(), start)
    return trials.assign(start=start)


def best_per_setting(trials: pd.DataFrame) -> pd.DataFrame:
    """The completed trial with the lowest validation score (``val_score``: what picks epochs and trials,
    ``ltc.train.selection``) of each setting."""
    done = trials[(trials.status == "completed") & trials.val_score.notna()]
    if done.empty:
        return done
    return done.loc[done.groupby("setting").val_score.idxmin()].reset_index(drop=True)


def _units(name: str) -> str:
    found = datasets.described(name)
    return found.units if found is not None else ""


def markdown_table(table: pd.DataFrame) -> str:
    """``table`` as a Markdown table (``val_score`` left out; a missing float shows as ``MISSING``)."""
    cols = [c for c in table.columns if c != "val_score"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        lines.append(
            "| "
            + " | ".join(MISSING if (isinstance(r[c], float) and math.isnan(r[c])) else str(r[c]) for c in cols)
            + " |"
        )
    return "\n".join(lines)


def settings_table(best: pd.DataFrame) -> pd.DataFrame:
    """Per (stage, dataset, size, start, strategy) of ``best`` (best-per-setting rows of pre-training, or of a
    table without FT columns): seeds, the dataset's headline and MAE on the test set, each mean ± std (ddof 0)
    over the seeds (``compare.mean_std``), and the MAE's units. FT cells are ``compare.cell_table``'s."""
    out = []
    keys = ["stage", "dataset", "size", "start", "strategy"]
    for (stage, dataset, size, start, strategy), g in best.groupby(keys, dropna=False, sort=False):
        multi = "+" in str(dataset)  # several properties: each in its own units
        h = compare.headline("" if multi else str(dataset))
        out.append({"stage": stage, "dataset": dataset, "size": MISSING if pd.isna(size) else int(size),
                    "start": compare.cell_name((start, strategy)), "seeds": len(g), "headline": h.label,
                    "test": compare.mean_std(g[f"test_{h.metric}"]), "test MAE": compare.mean_std(g.test_mae),
                    "units": "per property" if multi else _units(str(dataset))})  # fmt: skip
    table = pd.DataFrame(out)
    # pre-training starts from nothing: no start column for it alone
    return table.drop(columns="start") if (best.kind == "pretrain").all() else table


# what the ± of ``settings_table`` is over: one wording for the report and the console
SETTINGS_NOTE = "test metrics of each seed's best trial, mean ± std (ddof 0) over the seeds counted in `seeds`"


# --------------------------------------------------------------------------------------------------
# Figures. Each returns the PNG path, or None with the reason it was not drawn. The heatmap and parity
# plot draw what ``heatmap_data`` and ``parity_panels`` return, so the numbers can be checked without images.


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters and CI
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, width: float = 4.0, height: float = 3.2):
    plt = _plt()
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _largest_size(rows: pd.DataFrame):
    sizes = rows.ft_size.dropna()
    return sizes.max() if not sizes.empty else float("nan")


@dataclass(frozen=True)
class HeatmapPanel:
    """The numbers one panel of the heatmap draws (one headline metric): per (start, FT column), A − B of the
    start (its lowest-validation-score strategy) against scratch, as ``compare.paired_table``'s ``A - B``."""

    headline: Headline
    starts: list[str]  # rows: PT starts
    columns: list[str]  # FT datasets (``<stage>:<dataset>`` where several stages fine-tune one)
    diff: np.ndarray  # A − B in the headline's units; NaN: no comparison
    judged: np.ndarray  # enough pairs for an interval: only these are coloured
    text: list[list[str]]  # what each cell says
    limit: float  # colour scale ±limit: largest |A − B| or interval bound of a judged cell; 0 if none is judged


def heatmap_data(best: pd.DataFrame) -> list[HeatmapPanel]:
    """``compare.heatmap_cells`` as matrices, one panel per headline metric (R² and MAE of log10 kappa are not
    on one scale, and their "better" points in opposite directions)."""
    cells = compare.heatmap_cells(best)
    panels = []
    for label in sorted({c.headline.label for c in cells.values()}):
        mine = {k: c for k, c in cells.items() if c.headline.label == label}
        starts, columns = sorted({k[0] for k in mine}), sorted({k[1] for k in mine})
        diff = np.full((len(starts), len(columns)), np.nan)
        judged = np.zeros(diff.shape, dtype=bool)
        text = [["n/a"] * len(columns) for _ in starts]
        bounds = [0.0]
        for (start, column), cell in mine.items():
            i, j, r = starts.index(start), columns.index(column), cell.result
            diff[i, j] = r.mean_diff if r.mean_diff is not None else np.nan
            judged[i, j] = cell.judged
            if cell.judged:
                # the colour scale spans the intervals too: a difference well inside its interval stays pale
                bounds += [abs(r.mean_diff), abs(r.ci_low), abs(r.ci_high)]
                mark = "*" if r.significant else ""
                text[i][j] = f"{format_diff(r.mean_diff)}{mark}\n[{format_diff(r.ci_low)}, {format_diff(r.ci_high)}]"
            elif r.mean_diff is not None:
                text[i][j] = f"{format_diff(r.mean_diff)}\n{r.n_pairs} pair{'s' if r.n_pairs != 1 else ''}: not judged"
        head = next(iter(mine.values())).headline
        panels.append(HeatmapPanel(head, starts, columns, diff, judged, text, max(bounds)))
    return panels


def fig_heatmap(best: pd.DataFrame, out: Path) -> tuple[Path | None, str]:
    """PT start × FT dataset: A − B (start minus scratch) of each FT dataset's headline metric at its largest FT
    size, with the paired table's sign; ``*``: the 95 % interval excludes zero; hatched, not coloured: fewer
    pairs than an interval needs (the number is still written)."""
    if best[best.kind == "finetune"].empty:
        return None, "no fine-tuning trials"
    panels = heatmap_data(best)
    if not panels:
        return None, "no fine-tuning dataset has a scratch baseline to compare with"
    from matplotlib.patches import Rectangle

    plt = _plt()
    widths = [max(1.6 * len(p.columns) + 3.2, 6.5) for p in panels]
    height = max(0.9 * len(p.starts) for p in panels) + 2.8
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths), height), squeeze=False,
                             gridspec_kw={"width_ratios": widths})  # fmt: skip
    for ax, p in zip(axes.flat, panels, strict=True):
        how = "higher" if p.headline.higher_is_better else "lower"
        # blue = the start is better, whichever way the metric points
        cmap = plt.get_cmap("RdBu" if p.headline.higher_is_better else "RdBu_r").with_extremes(bad="#dddddd")
        lim = p.limit if p.limit > 0 else 1e-3
        # only judged cells carry a colour; missing ones are grey (n/a), unjudged ones hatched on white
        im = ax.imshow(np.ma.masked_array(p.diff, mask=~p.judged), cmap=cmap, vmin=-lim, vmax=lim)
        for i in range(len(p.starts)):
            for j in range(len(p.columns)):
                unjudged = np.isfinite(p.diff[i, j]) and not p.judged[i, j]
                if unjudged:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="white", edgecolor="#999999",
                                           hatch="///", linewidth=0))  # fmt: skip
                box = {"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.5} if unjudged else None
                ax.text(j, i, p.text[i][j], ha="center", va="center", fontsize=8, bbox=box)
        ax.set_xticks(range(len(p.columns)), p.columns, fontsize=8)
        ax.set_yticks(range(len(p.starts)), p.starts)
        ax.set_xlabel("fine-tuned on (largest FT size)")
        ax.set_ylabel("start (A)")
        ax.set_title(
            f"A − B = start − scratch, {p.headline.label} ({how} is better), paired\n"
            "* 95 % interval excludes 0; hatched: fewer than 3 pairs, not judged",
            fontsize=9,
        )
        if p.judged.any():
            fig.colorbar(im, ax=ax, shrink=0.8, label=f"A − B, {p.headline.label} (blue: A better)")
    return _save(fig, out / "heatmap_gain.png"), ""


def _curves(best: pd.DataFrame, out: Path, x: str, name: str, label: str) -> tuple[Path | None, str]:
    rows = best[best.kind != "pretrain"].dropna(subset=[x])
    wanted = [d for d, g in rows.groupby("ft_dataset") if g[x].nunique() >= 2]
    if not wanted:
        return None, f"no fine-tuning dataset was run at two or more {label}s"
    fig, axes = _grid(len(wanted))
    for ax, dataset in zip(axes, wanted, strict=True):
        g = rows[rows.ft_dataset == dataset]
        metric = compare.headline(dataset)
        series = g.pt_dataset.fillna("scratch") if x == "pt_size" else g.start
        for key, h in g.groupby(series):
            stats = h.groupby(x)[f"test_{metric.metric}"].agg(["mean", "std", "count"]).sort_index()
            ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, label=str(key))
        ax.set_xscale("log")
        ticks = sorted(g[x].unique())
        ax.set_xticks(ticks, [f"{int(t):,}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(label)
        ax.set_ylabel(f"test {metric.label}")
        ax.set_title(dataset)
        ax.legend(fontsize=7)
    return _save(fig, out / name), ""


def fig_ft_size(best: pd.DataFrame, out: Path) -> tuple[Path | None, str]:
    return _curves(best, out, "ft_size", "ft_size.png", "FT size")


def fig_pt_size(best: pd.DataFrame, out: Path) -> tuple[Path | None, str]:
    ft = best[best.kind == "finetune"]
    return _curves(ft, out, "pt_size", "pt_size.png", "PT size")


def fig_strategies(best: pd.DataFrame, out: Path) -> tuple[Path | None, str]:
    rows = best[best.kind != "pretrain"]
    wanted = [d for d, g in rows.groupby("ft_dataset") if g[g.kind == "finetune"].strategy.nunique() >= 2]
    if not wanted:
        return None, "no fine-tuning dataset was run with two or more strategies"
    fig, axes = _grid(len(wanted))
    for ax, dataset in zip(axes, wanted, strict=True):
        g = rows[rows.ft_dataset == dataset]
        g = g[g.ft_size == _largest_size(g)] if g.ft_size.notna().any() else g
        metric = compare.headline(dataset)
        stats = g.groupby("strategy")[f"test_{metric.metric}"].agg(["mean", "std"])
        ax.bar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), capsize=3,
               color=["#999999" if compare.is_scratch(s) else "#4477aa" for s in stats.index])  # fmt: skip
        ax.set_ylabel(f"test {metric.label}")
        ax.set_title(dataset)
        ax.tick_params(axis="x", rotation=45)
    return _save(fig, out / "strategies.png"), ""


def read_predictions(checkpoint: str) -> pd.DataFrame | None:
    """The ``predictions.parquet`` saved beside a trial's ``checkpoint.pt`` (local path or URI)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    path = f"{checkpoint.rsplit('/', 1)[0]}/predictions.parquet"
    try:
        fs, inside = filesystem(path)
        if fs.get_file_info(inside).type == pafs.FileType.NotFound:
            return None
        return pq.read_table(inside, filesystem=fs).to_pandas()
    except OSError as err:
        log.warning("cannot read %s: %s", path, err)
        return None


def best_cells(best: pd.DataFrame) -> list[tuple[pd.DataFrame, tuple[str, str]]]:
    """Per (stage, FT dataset), at its largest FT size: its rows and the cell with the lowest mean validation
    loss over every start and scratch (``compare.lowest_val_score``: the report's line for that size). Validation
    scores are only compared within one stage and size (same scaling, comparable validation sets)."""
    ft = best[best.kind != "pretrain"]
    out = []
    for _, rows in ft.groupby(["stage", "ft_dataset"], sort=False):
        size = _largest_size(rows)
        at = rows[rows.ft_size == size] if not pd.isna(size) else rows
        found = compare.lowest_val_score(at)
        if found is not None:
            out.append((at, found[0]))
    return out


def _cell_rows(rows: pd.DataFrame, cell: tuple[str, str]) -> pd.DataFrame:
    return rows[(rows.start == cell[0]) & (rows.strategy == cell[1])]


def best_models(trials: pd.DataFrame) -> pd.DataFrame:
    """Per (stage, FT dataset), at its largest FT size: the best trial (lowest validation score) of its
    ``best_cells`` cell, one row each."""
    out = []
    for rows, cell in best_cells(best_per_setting(trials)):
        g = _cell_rows(rows, cell)
        out.append(g.loc[g.val_score.astype(float).idxmin()])
    return pd.DataFrame(out)


@dataclass(frozen=True)
class ParityPanel:
    """The numbers one parity panel draws: the ``best_cells`` cell of one (stage, FT dataset)."""

    stage: str
    dataset: str
    cell: tuple[str, str]
    points: pd.DataFrame  # y_true, y_pred (raw units) of the test predictions drawn
    headline: Headline
    value: str  # the headline metric as printed, e.g. "0.296 ± 0.021"
    what: str  # which predictions are drawn
    spread: str  # what the value is over (what its ± is)


def parity_panels(trials: pd.DataFrame, read=None) -> list[ParityPanel]:
    """``best_cells``' predictions. K-fold: the pooled out-of-fold test predictions of every full repeat
    (each structure once per repeat), with the cell's headline exactly as ``compare.cell_table`` prints it (the
    metric of each repeat's pooled predictions, mean ± std over repeats). Seeds: the test predictions of the
    seed with the cell's lowest validation score, with that seed's headline (the table's is over all seeds).
    ``read``: ``read_predictions`` (tests pass their own)."""
    read = read or read_predictions
    panels = []
    for rows, cell in best_cells(best_per_setting(trials)):
        g = _cell_rows(rows, cell)
        stage, dataset = str(g.stage.iloc[0]), str(g.ft_dataset.iloc[0])
        h = compare.headline(dataset)
        if compare.is_kfold(g):
            pooled = compare.pooled_predictions(g, read)
            if not pooled:
                continue
            k, n = int(g.n_folds.dropna().iloc[0]), len(pooled)
            points = pd.concat(pooled.values(), ignore_index=True)
            what = f"pooled out-of-fold test predictions, {'all ' if n > 1 else ''}{n} × {k} (repeats × folds)"
            spread = f"mean ± std over {n} repeats" if n > 1 else "1 repeat"
            value = compare.cell_metrics(g, read)[h.metric]
            panels.append(ParityPanel(stage, dataset, cell, points, h, value, what, spread))
            continue
        unit = g.loc[g.val_score.astype(float).idxmin()]
        preds = read(unit.checkpoint) if isinstance(unit.checkpoint, str) else None
        if preds is None:
            continue
        seed = "" if pd.isna(unit.get("seed")) else f"seed {int(unit['seed'])}: "
        what = f"test set, {seed}the cell's lowest validation score of {len(g)} seeds"
        value = compare.fmt_num(unit[f"test_{h.metric}"])
        spread = f"this seed; the table: {compare.cell_metrics(g, read)[h.metric]} over {len(g)}"
        panels.append(ParityPanel(stage, dataset, cell, preds[preds.split == "test"], h, value, what, spread))
    return panels


def fig_parity(trials: pd.DataFrame, out: Path) -> tuple[Path | None, str]:
    """Predicted against true of ``parity_panels``: per (stage, FT dataset), the cell the report names as its
    lowest validation score at the largest FT size."""
    panels = parity_panels(trials)
    if not panels:
        return None, "no predictions of a completed fine-tuning trial were found"
    stages = {(p.dataset, p.stage) for p in panels}
    fig, axes = _grid(len(panels), 4.4, 4.0)
    for ax, p in zip(axes, panels, strict=True):
        y_true, y_pred = p.points.y_true.astype(float), p.points.y_pred.astype(float)
        ax.scatter(y_true, y_pred, s=10, alpha=0.5)
        both = pd.concat([y_true, y_pred])
        lo, hi = both.min(), both.max()
        if compare.is_kappa(p.dataset):
            lo = both[both > 0].min()  # a log axis: the diagonal from the smallest positive value
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        unit = _units(p.dataset)
        ax.set_xlabel(f"true ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
        name = f"{p.stage}:{p.dataset}" if sum(d == p.dataset for d, _ in stages) > 1 else p.dataset
        ax.set_title(f"{name}: {compare.cell_name(p.cell)} (lowest validation score)\n{p.what}\n"
                     f"{p.headline.label} {p.value} ({p.spread})", fontsize=8)  # fmt: skip
    return _save(fig, out / "parity.png"), ""


def _short_sci(x: float, _pos=None) -> str:
    """A compact tick label: ``3e-4``, ``2.5e-3``, ``1e-2``."""
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def _lr_axis(ax, most: int = 5) -> None:
    """Make ``ax``'s x axis a log axis of learning rates whose tick labels never crowd each other.

    Labelled ticks only at 1×, else 1× and 3×, else 1×, 2× and 5×, else 1×, 2×, 3× and 5× powers of ten: the
    coarsest of these to give three ticks inside the view, else two (at most ``most``, every n-th one kept beyond
    that), else a few evenly spaced ones for a view narrower than that; short labels (``3e-4``); minor ticks
    unlabelled. Call it once the data is drawn: it reads the view limits.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    options = [[m * 10.0**e for e in decades for m in subs if lo <= m * 10.0**e <= hi]
               for subs in ((1,), (1, 3), (1, 2, 5), (1, 2, 3, 5))]  # fmt: skip
    ticks = next((t for t in options if len(t) >= 3), None) or next((t for t in options if len(t) >= 2), None)
    if ticks is None:
        ticks = [t for t in MaxNLocator(nbins=3).tick_values(lo, hi) if lo <= t <= hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks[:: math.ceil(len(ticks) / most)] if ticks else []))
    ax.xaxis.set_major_formatter(FuncFormatter(_short_sci))
    ax.xaxis.set_minor_formatter(NullFormatter())


def fig_optuna(trials: pd.DataFrame, out: Path) -> tuple[Path | None, str]:
    rows = trials[trials.n_unfrozen.notna() & trials.val_score.notna() & trials.lr.notna()]
    if rows.empty:
        return None, "no trial searched n_unfrozen (strategy blocks)"
    from matplotlib.colors import LogNorm

    groups = list(rows.groupby("ft_dataset"))
    fig, axes = _grid(len(groups))
    rng = np.random.default_rng(0)
    for ax, (dataset, g) in zip(axes, groups, strict=True):
        positive = g.val_score.clip(lower=1e-12)
        norm = LogNorm(vmin=positive.min(), vmax=max(positive.max(), positive.min() * 1.0001))
        jitter = rng.uniform(-0.15, 0.15, len(g))
        sc = None
        for status, marker in (("completed", "o"), ("pruned", "x"), ("error", "s")):
            m = (g.status == status).to_numpy()
            if m.any():
                sc = ax.scatter(g.lr[m], g.n_unfrozen[m] + jitter[m], c=positive[m], norm=norm, cmap="viridis_r",
                                marker=marker, label=status)  # fmt: skip
        _lr_axis(ax)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("n_unfrozen")
        ax.set_title(f"{dataset}: Optuna trials")
        ax.legend(fontsize=7, loc="best", framealpha=0.6)
        if sc is not None:
            fig.colorbar(sc, ax=ax, label="validation score (Optuna's objective)")
    return _save(fig, out / "optuna_lr_n_unfrozen.png"), ""


# --------------------------------------------------------------------------------------------------


@dataclass
class Report:
    path: Path
    figures: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


FIGURES = {
    "PT × FT heatmap of the paired difference A − B (start minus scratch)": fig_heatmap,
    "Metrics against FT size": fig_ft_size,
    "Metrics against PT size": fig_pt_size,
    "Strategy comparison": fig_strategies,
}


def _ft_sections(trials: pd.DataFrame, best: pd.DataFrame) -> list[str]:
    """Per FT dataset and size: the cells (pooled K-fold metrics or seeds), the paired comparisons, and the
    selection gaps."""
    ft = best[best.kind != "pretrain"]
    if ft.empty:
        return []
    lines = [
        "## Fine-tuning: each starting point against scratch, paired",
        "",
        "Kappa is judged by the MAE of log10 kappa (R² of log10 kappa and MAPE beside it; raw-unit R² is in "
        "trials.parquet only), other properties by R². K-fold cells: metrics of each repeat's pooled "
        "out-of-fold predictions, mean ± std over repeats. Comparisons pair the two cells on the units both "
        "have ((repeat, fold), or seed), by each unit's test metric: mean difference A − B with a 95 % interval "
        "from the Nadeau–Bengio corrected resampled t-test (units share training data, so a plain paired t "
        "would be too narrow), and how often A was better. Fewer than 3 pairs cannot be judged. The lowest "
        "validation score is the mean over a cell's units, every start and scratch alike; at the largest FT size "
        "its cell is the parity plot's.",
        "",
    ]
    for (stage, dataset, size), _ in ft.groupby(["stage", "ft_dataset", "ft_size"], dropna=False, sort=False):
        rows = compare.ft_rows(best[best.stage == stage], dataset, size)
        h = compare.headline(dataset)
        size_label = "all" if pd.isna(size) else int(size)
        how = "lower" if not h.higher_is_better else "higher"
        lines += [f"### {stage}: {dataset}, FT size {size_label} ({_units(dataset)}; {h.label}, {how} is better)", ""]
        cells = compare.cell_table(rows, read_predictions)
        lines += [f"Metrics: {compare.spread_note(rows)}.", "", markdown_table(cells), ""]
        paired = compare.paired_table(rows)
        if not paired.empty:
            shown = paired.drop(columns=["significant", "mean_diff"])
            lines += [markdown_table(shown), ""]
        gaps = compare.selection_gaps(trials, best, rows)
        if not gaps.empty:
            lines += [
                "Selection honesty: each unit's model was picked by validation score among its trials; how much "
                "worse on test it was than the best test result among the same trials (0: the pick was the "
                "test-best; a positive gap is the optimism a test-set pick would have hidden).",
                "",
                markdown_table(gaps),
                "",
            ]
        line = lowest_val_score_line(rows)
        if line:
            lines += [line, ""]
    return lines


# What each select_by makes val_score (ltc.choices.SELECT_BY), for the report's words
SCORE_NAMES = {"loss": "training loss, scaled", "mae": "MAE", "mae_log10": "MAE log10", "r2": "1 − R²"}


def lowest_val_score_line(rows: pd.DataFrame) -> str:
    """The cell of one (stage, FT dataset, size) with the lowest mean validation score, every start and scratch
    considered (``compare.val_score_by_cell``), and the runner-up; "" when no cell has a validation score."""
    loss = compare.val_score_by_cell(rows)
    if loss.empty:
        return ""
    units = "folds" if compare.is_kfold(rows) else "seeds"
    text = f"Lowest validation score (mean over each cell's {units}): `{compare.cell_name(loss.index[0])}`, "
    text += compare.fmt_num(loss.iloc[0])
    if len(loss) > 1:
        text += f"; next `{compare.cell_name(loss.index[1])}`, {compare.fmt_num(loss.iloc[1])}"
    picked_by = sorted(rows.select_by.dropna().astype(str).unique()) if "select_by" in rows else []
    if picked_by:  # what the score is: 1 - R² reads otherwise as a loss
        text += f" (score: {', '.join(SCORE_NAMES.get(x, x) for x in picked_by)}; lower is better)"
    return text + "."


def declared_in(results_dir: str | os.PathLike[str]) -> dict[str, datasets.DatasetSpec]:
    """The user datasets a sweep's results folder declared (from its ``sweep.json``), as what their names mean in
    its tables (units, kappa: ``datasets.remember``). Their files need not exist any more; a folder without a
    readable ``sweep.json`` declares nothing (a warning says why)."""
    from ltc.config import from_dict

    stored = Path(results_dir) / "sweep.json"
    if not stored.is_file():
        return {}
    try:
        spec = json.loads(json.loads(stored.read_text())["spec"])
        return {
            name: datasets.declared_metadata(name, from_dict(datasets.UserDataset, decl, f"datasets.{name}"))
            for name, decl in (spec.get("datasets") or {}).items()
        }
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s: its declared datasets are unknown (%s: %s)", stored, type(err).__name__, err)
        return {}


def write_report(results_dir: str | os.PathLike[str]) -> Report:
    """Write ``RESULTS_DIR/report.md`` and its PNG figures beside it."""
    folder = Path(results_dir)
    trials = load_trials(folder)
    best = best_per_setting(trials)
    report = Report(folder / "report.md")
    name = folder.name
    counts = trials.status.value_counts().to_dict()
    lines = [
        f"# Sweep report: {name}",
        "",
        f"{len(trials)} trials: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".",
        "Each setting (one seed, or one fold of one repeat) is represented by its best completed trial (lowest "
        "validation score). Test metrics are in the target's raw units (log10 for kappa's headline), on test "
        f"sets or folds no stage trained on. `{MISSING}` marks what the sweep did not (yet) produce.",
        "",
    ]
    pt = best[best.kind == "pretrain"]
    if not pt.empty:
        lines += ["## Pre-training", "", f"{SETTINGS_NOTE[0].upper()}{SETTINGS_NOTE[1:]}.", "",
                  markdown_table(settings_table(pt))]  # fmt: skip
        lines.append("")
        gaps = [
            gap.assign(cell=f"{stage}: {dataset}, size {MISSING if pd.isna(size) else int(size)}")
            for (stage, dataset, size), g in pt.groupby(["stage", "dataset", "size"], dropna=False, sort=False)
            if "+" not in dataset
            for gap in [compare.selection_gaps(trials, best, g, dataset)]
            if not gap.empty
        ]
        if gaps:
            lines += [
                "Later stages start from the PT trial with the lowest validation score; how much worse on test it "
                "was than the test-best PT trial of its setting:",
                "",
                markdown_table(pd.concat(gaps, ignore_index=True)),
                "",
            ]

    lines += _ft_sections(trials, best)

    lines += ["## Figures", ""]
    makers = {**{k: (lambda f=f: f(best, folder)) for k, f in FIGURES.items()},
              "Parity plot of the best model per FT dataset (test set)": lambda: fig_parity(trials, folder),
              "Optuna trials in the lr × n_unfrozen plane": lambda: fig_optuna(trials, folder)}  # fmt: skip
    for title, make in makers.items():
        try:
            path, why = make()
        except Exception as err:  # one broken figure must not lose the report
            log.exception("figure %r failed", title)
            path, why = None, f"failed: {type(err).__name__}: {err}"
        if path is None:
            report.skipped[title] = why
            lines += [f"### {title}", "", f"Not drawn: {why}.", ""]
        else:
            report.figures[title] = path
            lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    write_text_atomic(report.path, "\n".join(lines) + "\n")
    return report


# --------------------------------------------------------------------------------------------------
# The trials table: one flat row per trial (``results/README.md``), built from a stage's ResultGrid.

RESULTS_SCHEMA_VERSION = 5  # 2: ``group`` became ``source_key``; fold, repeat, n_folds, test_r2_log10 added
# 3: arch (the model trained) and start (the start's label, or scratch[<model>] beside several architectures)
# 4: split (how the test set was chosen: seeded, paper, kfold, matbench); val_score and select_by (what picked
# the epoch and the trial: ltc.train.selection); 5: transform (each dataset's target transform, '+'-joined)

COLUMNS = [
    "stage", "kind", "setting", "source_key", "trial_index", "status", "pt_dataset", "pt_size", "lineage", "arch",
    "start", "ft_dataset", "ft_size", "dataset", "size", "strategy", "n_unfrozen", "lr", "seed", "fold", "repeat",
    "n_folds", "split", "transform", "val_loss", "val_score", "select_by", "val_mae", "val_r2", "test_mae",
    "test_rmse", "test_r2", "test_mape", "test_mae_log10", "test_r2_log10", "n_train", "n_val", "n_test",
    "epochs_run", "best_epoch", "resumed_from_epoch", "train_seconds", "wall_seconds", "params_trainable",
    "params_total", "checkpoint", "init", "task_metrics", "trial_id", "node_id", "gpu_ids", "started", "finished",
    "error",
]  # fmt: skip


_FLOAT = ("pt_size", "ft_size", "size", "n_unfrozen", "lr", "fold", "repeat", "n_folds", "val_loss", "val_score",
          "val_mae", "val_r2", "test_mae", "test_rmse", "test_r2", "test_mape", "test_mae_log10", "test_r2_log10",
          "n_train", "n_val", "n_test", "epochs_run", "best_epoch", "resumed_from_epoch", "wall_seconds",
          "train_seconds", "params_trainable", "params_total", "started", "finished")  # fmt: skip
# Fixed column types: a stage without kappa rows (all-null test_mae_log10) concatenates cleanly with one with.
DTYPES = {c: ("float64" if c in _FLOAT else "int64" if c in ("trial_index", "seed") else "object") for c in COLUMNS}


def error_cause(error: str) -> str:
    """The line of a trial's error that says what went wrong (``MissingFileError: shard folder … does not
    exist``): the last one of its traceback that is not a frame."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if not line.startswith(("File ", "Traceback", "^", "~"))]
    return (causes or lines or [""])[-1][:300]


def _checkpoint_uri(checkpoint: Any) -> str | None:
    """A Tune checkpoint's ``checkpoint.pt`` as a local path or URI. Tune's ``Checkpoint.path`` lies inside its
    filesystem (``bucket/prefix/…`` for S3, ltc's endpoint filesystem included): the scheme is the filesystem's
    ``type_name``, and ``ltc.io.filesystem`` reads the URI back (FT starts, ``copy_best``, ``ltc predict``)."""
    if checkpoint is None:
        return None
    fs = checkpoint.filesystem
    kind = getattr(fs, "type_name", "local")
    base = checkpoint.path if kind == "local" else f"{'gs' if kind == 'gcs' else kind}://{checkpoint.path}"
    return f"{base.rstrip('/')}/checkpoint.pt"


def results_table(grid: Any, stage: str) -> pd.DataFrame:
    """One flat row per trial of a stage's ResultGrid."""
    from ltc.trial import COMPLETED

    rows = []
    for result in grid:
        cfg = result.config or {}
        if "setting" not in cfg:
            # a placeholder Tune made for a suggestion an interrupt cut short: it never ran and is not a trial
            log.debug("stage %s: skipping a trial without a configuration (%s)", stage, result.path)
            continue
        m = result.metrics or {}
        done = bool(m.get(COMPLETED))
        # Tune marks a trial its scheduler stopped with done=True; a trial stopped by an interrupt is unfinished
        status = "completed" if done else "error" if result.error else "pruned" if m.get("done") else "unfinished"
        datasets_ = "+".join(cfg.get("datasets", []))
        kind = cfg.get("kind")
        size = cfg.get("size") if cfg.get("size") is not None else cfg.get("max_size")
        row = {
            "stage": stage,
            "kind": kind,
            "setting": cfg.get("setting"),
            "source_key": cfg.get("source_key"),
            "trial_index": cfg.get("trial_index"),
            "status": status,
            "pt_dataset": datasets_
            if kind == "pretrain"
            else ("+".join(cfg["pt_datasets"]) if cfg.get("pt_datasets") else None),
            "pt_size": size if kind == "pretrain" else cfg.get("pt_size"),
            "lineage": cfg.get("lineage"),
            "arch": cfg.get("arch"),
            "start": cfg.get("start"),
            "ft_dataset": None if kind == "pretrain" else datasets_,
            "ft_size": None if kind == "pretrain" else size,
            "dataset": datasets_,
            "size": size,
            "strategy": "scratch" if kind == "scratch" else ("pretrain" if kind == "pretrain" else cfg.get("strategy")),
            "n_unfrozen": cfg.get("n_unfrozen"),
            "lr": cfg.get("lr"),
            "seed": cfg.get("seed"),
            "fold": cfg.get("fold"),
            "repeat": cfg.get("repeat"),
            "n_folds": (cfg.get("split") or {}).get("folds") if cfg.get("fold") is not None else None,
            "split": (cfg.get("split") or {}).get("test"),
            "checkpoint": _checkpoint_uri(result.checkpoint) if done else None,
            "init": cfg.get("init"),
            "trial_id": m.get("trial_id") or Path(str(result.path)).name,
            "error": str(result.error)[-2000:] if result.error else None,  # the tail: where the cause is
        }
        for key in COLUMNS:
            if key not in row:
                row[key] = m.get(key)
        tasks: dict[str, dict[str, Any]] = {}
        trained = set(cfg.get("datasets") or [])
        for key, value in m.items():  # multi-property trials: "<dataset>/test_mae" …
            if isinstance(key, str) and "/" in key and key.split("/", 1)[0] in trained:
                tasks.setdefault(key.split("/", 1)[0], {})[key.split("/", 1)[1]] = value
        row["task_metrics"] = json.dumps(tasks) if tasks else None
        if not done:
            for key in COLUMNS:
                if key.startswith("test_"):
                    row[key] = None  # a stopped or failed trial has no test metrics
            row["val_loss"], row["val_score"] = m.get("val_loss"), m.get("val_score")
            row["epochs_run"] = m.get("epoch_count")  # epochs trained before it stopped (its last report)
        rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS).astype({c: t for c, t in DTYPES.items()})
    return df.sort_values(["setting", "trial_index"], kind="stable").reset_index(drop=True)


def copy_best(table: pd.DataFrame, folder: Path, *, pause=None) -> None:
    """The best completed trial of each setting: its checkpoint into ``folder`` and a ``best.parquet``.

    K-fold settings go one folder deeper, ``<cell>/r<repeat>f<fold>/checkpoint.pt``, so that ``<cell>/`` holds
    the K × R fold models of one cell: the ensemble ``ltc predict --checkpoint <cell>/`` uses.
    """
    from ltc import io

    def slug(text: str) -> str:
        return text.replace("|", "__").replace("/", "_").replace(":", "-")

    best = best_per_setting(table)
    best = best[best.checkpoint.notna()]
    if best.empty:
        return
    folder.mkdir(parents=True, exist_ok=True)
    local = []
    for _, row in best.iterrows():
        if "fold" in row and pd.notna(row["fold"]):
            cell, unit = row.setting.rsplit("|", 1)
            dest = folder / slug(cell) / unit / "checkpoint.pt"
        else:
            dest = folder / slug(row.setting) / "checkpoint.pt"
        io.copy_file(row.checkpoint, io.inside(folder, dest))
        local.append(str(dest))
        if pause is not None and len(local) == 1:
            pause()  # tests: a driver killed here, mid-copy, must leave its stage unfinished
    best = best.assign(best_checkpoint=local)
    io.write_parquet_atomic(folder / "best.parquet", best)


def summary(trials: pd.DataFrame) -> str:
    """What a sweep found, for the console, in the report's numbers and words: pre-training settings
    (``settings_table``), then per FT dataset and size its cells (``compare.cell_table``), the paired
    comparisons (A − B ± the 95 % interval's half-width) with their verdicts, and the lowest validation score."""
    trials = upgrade(trials)
    best = with_start(best_per_setting(trials))
    if best.empty:
        return "no completed trials"
    counts = trials.status.value_counts().to_dict()
    lines = [f"{len(trials)} trials: " + ", ".join(f"{v} {k}" for k, v in counts.items())]
    # rows of a table without FT columns have no cells to compare: shown per setting, like pre-training
    per_setting = best[best.kind == "pretrain"] if "ft_dataset" in best.columns else best
    if not per_setting.empty:
        lines += ["", f"{SETTINGS_NOTE}:", settings_table(per_setting).to_string(index=False)]
    if "ft_dataset" not in best.columns:
        return "\n".join(lines)
    ft = best[best.kind != "pretrain"]
    for (stage, dataset, size), _ in ft.groupby(["stage", "ft_dataset", "ft_size"], dropna=False, sort=False):
        rows = compare.ft_rows(best[best.stage == stage], dataset, size)
        size_label = "all" if pd.isna(size) else int(size)
        h = compare.headline(dataset)
        lines += ["", f"{stage}: {dataset}, FT size {size_label}; judged by {h.label} "
                  f"({'lower' if not h.higher_is_better else 'higher'} is better)"]  # fmt: skip
        lines += [f"metrics: {compare.spread_note(rows)}"]
        lines += [compare.cell_table(rows, read_predictions).drop(columns=["val_score"]).to_string(index=False)]
        units = "folds" if compare.is_kfold(rows) else "seeds"
        for a, b, r in compare.paired_results(rows):
            lines.append(f"  {compare.cell_name(a)} vs {compare.cell_name(b)}: {compare.diff_pm(r)} "
                         f"(A better on {r.wins} of {r.n_pairs} {units}): {compare.verdict(r, a, b)}")  # fmt: skip
        line = lowest_val_score_line(rows)
        if line:
            lines.append(line)
    return "\n".join(lines)
