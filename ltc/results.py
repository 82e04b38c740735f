"""Sweep results → tables, figures and ``report.md`` (``ltc report RESULTS_DIR``).

Everything starts from ``trials.parquet``. Each setting is represented by its best trial (lowest
validation loss) among the completed ones; settings are then aggregated over seeds (mean ± std).
What is "best" (strategy, lr, n_unfrozen) is chosen on validation loss, never on the test set. A
sweep that stopped half way reports what it has: a missing cell is drawn and printed as missing,
never as zero.
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
    return trials


def with_start(trials: pd.DataFrame) -> pd.DataFrame:
    """``trials`` with ``start``: where each trial started from (source lineage, with its PT size), or its kind;
    a stage that mixes architectures names its baselines ``scratch[<model>]`` (the trials' own ``start``)."""
    start = trials.lineage.where(trials.lineage.notna(), trials.kind)
    if "start" in trials.columns:  # written since schema 3
        start = trials.start.where(trials.start.notna(), start)
    return trials.assign(start=start)


def best_per_setting(trials: pd.DataFrame) -> pd.DataFrame:
    """The completed trial with the lowest validation loss of each setting."""
    done = trials[(trials.status == "completed") & trials.val_loss.notna()]
    if done.empty:
        return done
    return done.loc[done.groupby("setting").val_loss.idxmin()].reset_index(drop=True)


def _units(name: str) -> str:
    found = datasets.described(name)
    return found.units if found is not None else ""


def markdown_table(table: pd.DataFrame) -> str:
    """``table`` as a Markdown table (``val_loss`` left out; a missing float shows as ``MISSING``)."""
    cols = [c for c in table.columns if c != "val_loss"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        lines.append(
            "| "
            + " | ".join(MISSING if (isinstance(r[c], float) and math.isnan(r[c])) else str(r[c]) for c in cols)
            + " |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Figures. Each returns the PNG path, or None with the reason it was not drawn.


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


def fig_heatmap(best: pd.DataFrame, out: Path) -> tuple[Path | None, str]:
    """PT source × FT dataset: the paired improvement over scratch in each FT dataset's headline metric, at its
    largest FT size; ``*`` marks cells whose 95 % interval excludes zero, ``?`` cells that cannot be judged."""
    if best[best.kind == "finetune"].empty:
        return None, "no fine-tuning trials"
    raw = compare.heatmap_cells(best)
    if not raw:
        return None, "no fine-tuning dataset has a scratch baseline to compare with"
    pts = sorted({k[0] for k in raw})
    fts = sorted({k[1] for k in raw})
    matrix = np.full((len(pts), len(fts)), np.nan)
    marks: dict[tuple[int, int], str] = {}
    bounds = [0.0]
    for (pt, ft_name), (diff, significant, _label, (low, high)) in raw.items():
        sign = 1.0 if compare.headline(ft_name.split(":")[-1]).higher_is_better else -1.0
        i, j = pts.index(pt), fts.index(ft_name)
        matrix[i, j] = sign * diff  # improvement: positive = the start beats scratch
        marks[(i, j)] = "*" if significant else ("?" if significant is None else "")
        if low is not None:
            lo, hi = sorted((sign * low, sign * high))
            marks[(i, j)] += f"\n[{lo:+.3f}, {hi:+.3f}]"
            bounds += [abs(lo), abs(hi)]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(1.3 * len(fts) + 3.0, 5.0), 0.8 * len(pts) + 2.4))
    finite = matrix[np.isfinite(matrix)]
    # the colour scale spans the intervals too: a difference well inside its interval stays pale
    lim = max(abs(finite).max() if finite.size else 0.0, *bounds, 1e-3)
    # missing cells: grey and labelled n/a, never a colour that reads as zero
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=-lim, vmax=lim)
    for i in range(len(pts)):
        for j in range(len(fts)):
            v = matrix[i, j]
            text = "n/a" if np.isnan(v) else f"{v:+.3f}{marks.get((i, j), '')}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(fts)), [f"{f}\n({compare.headline(f.split(':')[-1]).label})" for f in fts], fontsize=7)
    ax.set_yticks(range(len(pts)), pts)
    ax.set_xlabel("fine-tuned on")
    ax.set_ylabel("pre-trained on")
    ax.set_title("paired improvement over scratch\n(* 95% interval excludes 0; ? fewer than 3 pairs)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
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


def best_models(trials: pd.DataFrame) -> pd.DataFrame:
    """Per FT dataset, at its largest FT size: the (start, strategy) with the lowest mean validation loss
    over seeds, and its best trial. Validation losses are only compared at one size (same scaling,
    comparable validation sets)."""
    best = best_per_setting(trials)
    best = best[best.kind != "pretrain"]
    out = []
    for _, rows in best.groupby("ft_dataset"):
        size = _largest_size(rows)
        at = rows[rows.ft_size == size] if not pd.isna(size) else rows
        mean = at.groupby(["start", "strategy"]).val_loss.mean()
        start, strategy = mean.idxmin()
        group = at[(at.start == start) & (at.strategy == strategy)]
        out.append(group.loc[group.val_loss.idxmin()])
    return pd.DataFrame(out)


def fig_parity(trials: pd.DataFrame, out: Path) -> tuple[Path | None, str]:
    best = best_models(trials)
    panels = []
    for _, row in best.iterrows():
        preds = read_predictions(row.checkpoint) if isinstance(row.checkpoint, str) else None
        if preds is not None:
            panels.append((row, preds[preds.split == "test"]))
    if not panels:
        return None, "no predictions of a completed fine-tuning trial were found"
    fig, axes = _grid(len(panels), 3.6, 3.4)
    for ax, (row, p) in zip(axes, panels, strict=True):
        kappa = compare.is_kappa(row.ft_dataset)
        ax.scatter(p.y_true, p.y_pred, s=10, alpha=0.7)
        lo, hi = np.nanmin([p.y_true.min(), p.y_pred.min()]), np.nanmax([p.y_true.max(), p.y_pred.max()])
        if kappa:
            lo = max(lo, 1e-2)
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        unit = _units(row.ft_dataset)
        ax.set_xlabel(f"true ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
        h = compare.headline(row.ft_dataset)
        ax.set_title(
            f"{row.ft_dataset}: {row.start}, {row.strategy}\n{h.label} {row[f'test_{h.metric}']:.3g}"
            + (f" (fold {int(row['fold'])} of repeat {int(row['repeat'])})" if pd.notna(row.get("fold")) else ""),
            fontsize=9,
        )
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
    rows = trials[trials.n_unfrozen.notna() & trials.val_loss.notna() & trials.lr.notna()]
    if rows.empty:
        return None, "no trial searched n_unfrozen (strategy blocks)"
    from matplotlib.colors import LogNorm

    groups = list(rows.groupby("ft_dataset"))
    fig, axes = _grid(len(groups))
    rng = np.random.default_rng(0)
    for ax, (dataset, g) in zip(axes, groups, strict=True):
        positive = g.val_loss.clip(lower=1e-12)
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
            fig.colorbar(sc, ax=ax, label="validation loss")
    return _save(fig, out / "optuna_lr_n_unfrozen.png"), ""


# --------------------------------------------------------------------------------------------------


@dataclass
class Report:
    path: Path
    figures: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


FIGURES = {
    "PT × FT heatmap of the paired improvement over scratch": fig_heatmap,
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
        "would be too narrow), and how often A was better. Fewer than 3 pairs cannot be judged.",
        "",
    ]
    for (stage, dataset, size), _ in ft.groupby(["stage", "ft_dataset", "ft_size"], dropna=False, sort=False):
        rows = compare.ft_rows(best[best.stage == stage], dataset, size)
        h = compare.headline(dataset)
        size_label = "all" if pd.isna(size) else int(size)
        how = "lower" if not h.higher_is_better else "higher"
        lines += [f"### {stage}: {dataset}, FT size {size_label} ({_units(dataset)}; {h.label}, {how} is better)", ""]
        cells = compare.cell_table(rows, read_predictions)
        lines += [markdown_table(cells), ""]
        paired = compare.paired_table(rows)
        if not paired.empty:
            shown = paired.drop(columns=["significant", "mean_diff"])
            lines += [markdown_table(shown), ""]
        gaps = compare.selection_gaps(trials, best, rows)
        if not gaps.empty:
            lines += [
                "Selection honesty: each unit's model was picked by validation loss among its trials; how much "
                "worse on test it was than the best test result among the same trials (0: the pick was the "
                "test-best; a positive gap is the optimism a test-set pick would have hidden).",
                "",
                markdown_table(gaps),
                "",
            ]
        tuned = cells[~cells.start.map(compare.is_scratch)] if not cells.empty else cells
        if not tuned.empty:
            top = tuned.loc[tuned.val_loss.idxmin()]
            lines += [f"Lowest validation loss: start `{top.start}`, strategy `{top.strategy}`.", ""]
    return lines


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
        "validation loss). Test metrics are in the target's raw units (log10 for kappa's headline), on test "
        f"sets or folds no stage trained on. `{MISSING}` marks what the sweep did not (yet) produce.",
        "",
    ]
    pt = best[best.kind == "pretrain"]
    if not pt.empty:
        lines += [
            "## Pre-training",
            "",
            "| stage | dataset | size | seeds | headline | test | test MAE | units |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for (stage, dataset, size), g in pt.groupby(["stage", "dataset", "size"], dropna=False, sort=False):
            size_label = MISSING if pd.isna(size) else int(size)
            units = _units(dataset) if "+" not in dataset else "per property"
            h = compare.headline(dataset) if "+" not in dataset else compare.headline("")
            value, mae = compare.mean_std(g[f"test_{h.metric}"]), compare.mean_std(g.test_mae)
            lines.append(f"| {stage} | {dataset} | {size_label} | {len(g)} | {h.label} | {value} | {mae} | {units} |")
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
                "Later stages start from the PT trial with the lowest validation loss; how much worse on test it "
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

RESULTS_SCHEMA_VERSION = 3  # 2: ``group`` became ``source_key``; fold, repeat, n_folds, test_r2_log10 added
# 3: arch (the model trained) and start (the start's label, or scratch[<model>] beside several architectures)

COLUMNS = [
    "stage", "kind", "setting", "source_key", "trial_index", "status", "pt_dataset", "pt_size", "lineage", "arch",
    "start", "ft_dataset", "ft_size", "dataset", "size", "strategy", "n_unfrozen", "lr", "seed", "fold", "repeat",
    "n_folds",
    "val_loss", "val_mae", "val_r2", "test_mae", "test_rmse", "test_r2", "test_mape", "test_mae_log10",
    "test_r2_log10", "n_train", "n_val", "n_test", "epochs_run", "best_epoch", "resumed_from_epoch", "train_seconds",
    "wall_seconds", "params_trainable", "params_total", "checkpoint", "init", "task_metrics",
    "trial_id", "node_id", "gpu_ids", "started", "finished", "error",
]  # fmt: skip


_FLOAT = ("pt_size", "ft_size", "size", "n_unfrozen", "lr", "fold", "repeat", "n_folds", "val_loss", "val_mae",
          "val_r2", "test_mae", "test_rmse", "test_r2", "test_mape", "test_mae_log10", "test_r2_log10", "n_train",
          "n_val", "n_test", "epochs_run", "best_epoch", "resumed_from_epoch", "wall_seconds", "train_seconds",
          "params_trainable", "params_total", "started", "finished")  # fmt: skip
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
            log.info("stage %s: skipping a trial without a configuration (%s)", stage, result.path)
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
            row["val_loss"] = m.get("val_loss")
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
    """What a sweep found, for the console: each setting's units (mean ± std), then for each FT dataset and
    size the pooled K-fold metrics and the paired comparisons (each start against scratch, starts against
    each other) with their 95 % intervals and verdicts."""
    trials = upgrade(trials)
    best = with_start(best_per_setting(trials))
    if best.empty:
        return "no completed trials"
    keys = ["stage", "dataset", "size", "start", "strategy"]
    rows = []
    for key, g in best.groupby(keys, dropna=False, sort=False):
        row = dict(zip(keys, key, strict=True))
        name = str(row["dataset"])
        kappa = compare.is_kappa(name)
        h = compare.headline(name)
        row["size"] = "all" if pd.isna(row["size"]) else int(row["size"])
        row["units"] = f"{len(g)} {'folds' if compare.is_kfold(g) else 'seeds' if len(g) > 1 else 'seed'}"
        mae = g.test_mae.astype(float)
        row["test_mae"] = f"{mae.mean():.4g} ± {mae.std(ddof=0):.2g}" if mae.notna().any() else "-"
        if kappa:  # raw-unit R² of kappa is in trials.parquet, never a headline
            v = g[f"test_{h.metric}"].astype(float)
            row["test_mae_log10"] = f"{v.mean():.3f} ± {v.std(ddof=0):.3f}" if v.notna().any() else "-"
        else:
            r2 = g.test_r2.astype(float)
            row["test_r2"] = f"{r2.mean():.3f} ± {r2.std(ddof=0):.3f}" if r2.notna().any() else "-"
        row["lr"] = f"{g.lr.median():.2g}"
        row["n_unfrozen"] = "-" if g.n_unfrozen.isna().all() else ",".join(str(int(v)) for v in g.n_unfrozen.dropna())
        rows.append(row)
    table = pd.DataFrame(rows).fillna("")
    counts = trials.status.value_counts().to_dict()
    lines = [f"{len(trials)} trials: " + ", ".join(f"{v} {k}" for k, v in counts.items()), table.to_string(index=False)]
    ft = best[best.kind != "pretrain"]
    if "ft_dataset" not in ft.columns:
        return "\n".join(lines)
    for (stage, dataset, size), _ in ft.groupby(["stage", "ft_dataset", "ft_size"], dropna=False, sort=False):
        cell_rows = compare.ft_rows(best[best.stage == stage], dataset, size)
        size_label = "all" if pd.isna(size) else int(size)
        h = compare.headline(dataset)
        lines += ["", f"{stage}: {dataset}, FT size {size_label}; judged by {h.label} "
                  f"({'lower' if not h.higher_is_better else 'higher'} is better)"]  # fmt: skip
        if compare.is_kfold(cell_rows):
            cells = compare.cell_table(cell_rows, read_predictions).drop(columns=["val_loss"])
            lines += ["pooled out-of-fold test predictions per repeat, mean ± std over repeats:"]
            lines += [cells.to_string(index=False)]
        paired = compare.paired_table(cell_rows)
        for _, r in paired.iterrows():
            lines.append(
                f"  {r.A} vs {r.B}: {r['A - B']} {r['95% interval']} (A better on {r['A better on']} "
                f"{'folds' if compare.is_kfold(cell_rows) else 'seeds'}): {r.verdict}"
            )
    return "\n".join(lines)
