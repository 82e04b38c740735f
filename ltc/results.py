"""Sweep results → tables, figures and ``report.md`` (``ltc report RESULTS_DIR``).

Everything starts from ``trials.parquet``. Each setting is represented by its best trial (lowest
validation loss) among the completed ones; settings are then aggregated over seeds (mean ± std).
What is "best" (strategy, lr, n_unfrozen) is chosen on validation loss, never on the test set. A
sweep that stopped half way reports what it has: a missing cell is drawn and printed as missing,
never as zero.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ltc import datasets

log = logging.getLogger(__name__)

MISSING = "–"


def load_trials(results_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """``RESULTS_DIR/trials.parquet`` with a ``start`` column (the trial's source lineage, or its kind)."""
    path = Path(results_dir) / "trials.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; point at a sweep's results folder (results/<sweep name>)")
    return with_start(pd.read_parquet(path))


def with_start(trials: pd.DataFrame) -> pd.DataFrame:
    """``trials`` with ``start``: where each trial started from (source lineage, with its PT size), or its kind."""
    return trials.assign(start=trials.lineage.where(trials.lineage.notna(), trials.kind))


def best_per_setting(trials: pd.DataFrame) -> pd.DataFrame:
    """The completed trial with the lowest validation loss of each setting."""
    done = trials[(trials.status == "completed") & trials.val_loss.notna()]
    if done.empty:
        return done
    return done.loc[done.groupby("setting").val_loss.idxmin()].reset_index(drop=True)


def _mean_std(values: pd.Series, digits: int = 3) -> str:
    v = values.dropna().astype(float)
    if v.empty:
        return MISSING
    if len(v) == 1:
        return f"{v.iloc[0]:.{digits}g}"
    return f"{v.mean():.{digits}g} ± {v.std(ddof=0):.2g}"


def _units(name: str) -> str:
    try:
        return datasets.spec(name).units
    except (KeyError, ValueError):
        return ""


def _is_kappa(name: str) -> bool:
    try:
        return datasets.spec(name).kappa
    except (KeyError, ValueError):
        return False


def ft_table(best: pd.DataFrame, dataset: str, size) -> pd.DataFrame:
    """Scratch against each start for one FT dataset and size: metrics over seeds and gain over scratch."""
    rows = best[(best.ft_dataset == dataset) & (best.kind != "pretrain")]
    rows = rows[rows.ft_size.isna()] if pd.isna(size) else rows[rows.ft_size == size]
    scratch = rows[rows.kind == "scratch"]
    s_mae, s_r2 = scratch.test_mae.mean(), scratch.test_r2.mean()
    out = []
    for (start, strategy), g in rows.groupby(["start", "strategy"], sort=False, dropna=False):
        mae, r2 = g.test_mae.astype(float).mean(), g.test_r2.astype(float).mean()
        row = {
            "start": start,
            "strategy": strategy,
            "seeds": len(g),
            "val_loss": g.val_loss.mean(),
            "test R2": _mean_std(g.test_r2),
            "test MAE": _mean_std(g.test_mae),
            "MAE gain": f"{100 * (s_mae - mae) / s_mae:+.1f}%" if s_mae > 0 and not math.isnan(mae) else MISSING,
            "R2 gain": f"{r2 - s_r2:+.3f}" if not (math.isnan(r2) or math.isnan(s_r2)) else MISSING,
            "lr": f"{g.lr.median():.2g}",
            "n_unfrozen": ",".join(str(int(v)) for v in g.n_unfrozen.dropna()) or MISSING,
        }
        if _is_kappa(dataset):
            row["test MAPE %"] = _mean_std(g.test_mape)
            row["MAE log10"] = _mean_std(g.test_mae_log10)
        if start == "scratch":
            row["MAE gain"] = row["R2 gain"] = MISSING
        out.append(row)
    table = pd.DataFrame(out)
    if not table.empty:
        table = table.sort_values(["start"], key=lambda s: s != "scratch", kind="stable")
    return table


def _markdown(table: pd.DataFrame) -> str:
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
    """PT source × FT dataset: mean test R² gain over scratch at each FT dataset's largest FT size."""
    ft = best[best.kind == "finetune"]
    if ft.empty:
        return None, "no fine-tuning trials"
    cells: dict[tuple[str, str], float] = {}
    for dataset, rows in best[best.kind != "pretrain"].groupby("ft_dataset"):
        size = _largest_size(rows)
        at = rows[rows.ft_size == size] if not pd.isna(size) else rows
        scratch = at[at.kind == "scratch"].test_r2.astype(float)
        for pt, g in at[at.kind == "finetune"].groupby("start"):  # source dataset and PT size (lineage)
            # the source's best strategy by validation loss
            by_strategy = g.groupby("strategy")
            strategy = by_strategy.val_loss.mean().idxmin()
            r2 = by_strategy.get_group(strategy).test_r2.astype(float).mean()
            cells[(pt, dataset)] = r2 - scratch.mean() if not scratch.empty else float("nan")
    pts = sorted({k[0] for k in cells})
    fts = sorted({k[1] for k in cells})
    matrix = np.full((len(pts), len(fts)), np.nan)
    for (pt, ft_name), v in cells.items():
        matrix[pts.index(pt), fts.index(ft_name)] = v
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.1 * len(fts) + 2.5, 0.8 * len(pts) + 2))
    finite = matrix[np.isfinite(matrix)]
    lim = max(abs(finite).max(), 1e-3) if finite.size else 1.0
    # missing cells: grey and labelled n/a, never a colour that reads as zero
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=-lim, vmax=lim)
    for i in range(len(pts)):
        for j in range(len(fts)):
            v = matrix[i, j]
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v:+.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(fts)), fts)
    ax.set_yticks(range(len(pts)), pts)
    ax.set_xlabel("fine-tuned on")
    ax.set_ylabel("pre-trained on")
    ax.set_title("test R² gain over scratch")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, out / "heatmap_r2_gain.png"), ""


def _curves(best: pd.DataFrame, out: Path, x: str, name: str, label: str) -> tuple[Path | None, str]:
    rows = best[best.kind != "pretrain"].dropna(subset=[x])
    wanted = [d for d, g in rows.groupby("ft_dataset") if g[x].nunique() >= 2]
    if not wanted:
        return None, f"no fine-tuning dataset was run at two or more {label}s"
    fig, axes = _grid(len(wanted))
    for ax, dataset in zip(axes, wanted, strict=True):
        g = rows[rows.ft_dataset == dataset]
        series = g.pt_dataset.fillna("scratch") if x == "pt_size" else g.start
        for key, h in g.groupby(series):
            stats = h.groupby(x).test_r2.agg(["mean", "std", "count"]).sort_index()
            ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, label=str(key))
        ax.set_xscale("log")
        ticks = sorted(g[x].unique())
        ax.set_xticks(ticks, [f"{int(t):,}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(label)
        ax.set_ylabel("test R²")
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
        stats = g.groupby("strategy").test_r2.agg(["mean", "std"])
        ax.bar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), capsize=3,
               color=["#999999" if s == "scratch" else "#4477aa" for s in stats.index])  # fmt: skip
        ax.set_ylabel("test R²")
        ax.set_title(dataset)
        ax.tick_params(axis="x", rotation=45)
    return _save(fig, out / "strategies.png"), ""


def read_predictions(checkpoint: str) -> pd.DataFrame | None:
    """The ``predictions.parquet`` saved beside a trial's ``checkpoint.pt`` (local path or URI)."""
    folder = checkpoint.rsplit("/", 1)[0]
    path = f"{folder}/predictions.parquet"
    try:
        if "://" in path:
            import pyarrow.fs as pafs
            import pyarrow.parquet as pq

            fs, p = pafs.FileSystem.from_uri(path)
            return pq.read_table(p, filesystem=fs).to_pandas()
        return pd.read_parquet(path) if Path(path).is_file() else None
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
        kappa = _is_kappa(row.ft_dataset)
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
        ax.set_title(
            f"{row.ft_dataset}: {row.start}, {row.strategy}\nMAE {row.test_mae:.3g}, R² {row.test_r2:.3f}", fontsize=9
        )
    return _save(fig, out / "parity.png"), ""


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
        ax.set_xscale("log")
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
    "PT × FT heatmap of the R² gain over scratch": fig_heatmap,
    "Metrics against FT size": fig_ft_size,
    "Metrics against PT size": fig_pt_size,
    "Strategy comparison": fig_strategies,
}


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
        "Each setting is represented by its best completed trial (lowest validation loss); settings are "
        "aggregated over seeds as mean ± std. Test metrics are in the target's raw units, on test sets no "
        f"stage trained on. `{MISSING}` marks what the sweep did not (yet) produce.",
        "",
    ]
    pt = best[best.kind == "pretrain"]
    if not pt.empty:
        lines += [
            "## Pre-training",
            "",
            "| stage | dataset | size | seeds | test R2 | test MAE | units |",
            "|---|---|---|---|---|---|---|",
        ]
        for (stage, dataset, size), g in pt.groupby(["stage", "dataset", "size"], dropna=False, sort=False):
            size_label = MISSING if pd.isna(size) else int(size)
            units = _units(dataset) if "+" not in dataset else "per property"
            r2, mae = _mean_std(g.test_r2), _mean_std(g.test_mae)
            lines.append(f"| {stage} | {dataset} | {size_label} | {len(g)} | {r2} | {mae} | {units} |")
        lines.append("")

    ft_rows = best[best.kind != "pretrain"]
    if not ft_rows.empty:
        lines += ["## Fine-tuning: scratch against each starting point", ""]
    for dataset, rows in ft_rows.groupby("ft_dataset", sort=False):
        for size in sorted(rows.ft_size.unique(), key=lambda v: -1 if pd.isna(v) else v):
            table = ft_table(best, dataset, size)
            if table.empty:
                continue
            size_label = "all" if pd.isna(size) else int(size)
            lines += [f"### {dataset}, FT size {size_label} ({_units(dataset)})", "", _markdown(table), ""]
            tuned = table[table.start != "scratch"]
            if not tuned.empty:
                top = tuned.loc[tuned.val_loss.idxmin()]
                lines.append(
                    f"Best by validation loss: start `{top.start}`, strategy `{top.strategy}`, lr {top.lr}, "
                    f"n_unfrozen {top.n_unfrozen}; test R² {top['test R2']} (gain {top['R2 gain']})."
                )
                lines.append("")

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
    tmp = report.path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, report.path)
    return report
