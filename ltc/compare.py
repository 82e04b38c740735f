"""Fine-tuning results as answers: each starting point against scratch (and against each other), paired.

A *cell* is what a user compares: FT dataset and size × start (a PT source, or scratch) × strategy. A
cell's *units* are the evaluations every cell of that (dataset, size) shares: the (repeat, fold) pairs of
a K-fold stage, or the seeds of a fixed-test-split stage. Each unit is represented by its best trial
(lowest validation loss: selection never sees the test set or fold).

- ``cell_table``: per cell, the dataset's headline metric (kappa: MAE and R² of log10 kappa, MAPE;
  other properties: R², MAE) as mean ± std over repeats of pooled out-of-fold predictions (K-fold), or
  over seeds.
- ``paired_table``: every start against scratch and starts against each other, on the units both have:
  mean paired difference of the headline metric with a 95 % interval (Nadeau–Bengio corrected resampled t,
  ``ltc.stats``; the units share training data, so the plain paired t is too narrow), win count, and
  whether the interval excludes zero. Fewer than 3 pairs: "cannot be judged".
- ``selection_gaps``: how much worse on test the validation-picked trial of each unit is than the best
  test result among that unit's trials (optimistic bias made visible; 0 = the pick was the test-best).
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any

import numpy as np
import pandas as pd

from ltc import datasets
from ltc.stats import MIN_PAIRS, PairedResult, format_diff, paired_compare
from ltc.targets import HEADLINE, KAPPA_METRICS, Headline, regression_metrics

log = logging.getLogger(__name__)

MISSING = "–"  # what a table shows for a value the sweep did not (yet) produce: never zero
CELL = ["start", "strategy"]  # within one (stage, ft_dataset, ft_size)
SCRATCH = "scratch"  # a stage of one architecture; beside several, scratch[<model>] each


def is_scratch(start: Any) -> bool:
    """Whether a ``start`` names a scratch baseline (``scratch``, or ``scratch[<model>]``)."""
    return isinstance(start, str) and (start == SCRATCH or start.startswith(f"{SCRATCH}["))


def cell_arch(rows: pd.DataFrame, cell: tuple[str, str]) -> str | None:
    """The architecture (model) a cell trained, when the rows record it (results since schema 3)."""
    if "arch" not in rows.columns:
        return None
    archs = rows[(rows.start == cell[0]) & (rows.strategy == cell[1])].arch.dropna()
    return str(archs.iloc[0]) if not archs.empty else None


def scratch_for(rows: pd.DataFrame, cell: tuple[str, str], scratch: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The scratch cells ``cell`` is judged against: those of its own architecture (all, when not recorded)."""
    arch = cell_arch(rows, cell)
    same = [s for s in scratch if arch is not None and cell_arch(rows, s) == arch]
    return same if same else (scratch if arch is None or len(scratch) == 1 else [])


def is_kappa(name: str) -> bool:
    found = datasets.described(name)
    return found is not None and found.kappa


def headline(name: str) -> Headline:
    """The metric dataset ``name`` is judged by (``ltc.targets.HEADLINE``)."""
    return HEADLINE[is_kappa(name)]


def shown_metrics(name: str) -> tuple[str, ...]:
    """Metrics a table shows for ``name``, headline first (raw-unit R² of kappa is in trials.parquet only)."""
    return KAPPA_METRICS if is_kappa(name) else ("r2", "mae")


def is_kfold(rows: pd.DataFrame) -> bool:
    return "fold" in rows.columns and rows.fold.notna().any()


def unit_columns(rows: pd.DataFrame) -> list[str]:
    return ["repeat", "fold"] if is_kfold(rows) else ["seed"]


def test_train_ratio(rows: pd.DataFrame) -> float:
    """``n_test / n_train`` of the units (training = training + validation structures), for the correction.

    Taken from the trials' own counts, so a subset per fold or held-out formulas (less training data than
    (K − 1)/K of the set) widen the interval as they should; ``1/(K − 1)`` only when counts are missing.
    """
    n_train = (rows.n_train.astype(float) + rows.n_val.astype(float)).mean()
    n_test = rows.n_test.astype(float).mean()
    if n_train and not math.isnan(n_train) and not math.isnan(n_test):
        return float(n_test / n_train)
    k = rows.n_folds.dropna() if "n_folds" in rows.columns else pd.Series(dtype=float)
    return 1.0 / (float(k.iloc[0]) - 1.0) if not k.empty else 0.0


def ft_rows(best: pd.DataFrame, dataset: str, size: Any) -> pd.DataFrame:
    """Best-per-setting rows of FT dataset ``dataset`` at FT size ``size`` (NaN: all), scratch included."""
    rows = best[(best.ft_dataset == dataset) & (best.kind != "pretrain")]
    return rows[rows.ft_size.isna()] if pd.isna(size) else rows[rows.ft_size == size]


def _unit_metric(rows: pd.DataFrame, metric: str) -> pd.Series:
    col = f"test_{metric}"
    return rows[col].astype(float) if col in rows.columns else pd.Series(np.nan, index=rows.index)


def pooled_by_repeat(rows: pd.DataFrame, read_predictions) -> pd.DataFrame:
    """K-fold cell rows (one per (repeat, fold)) → one row per repeat: metrics of its pooled test predictions.

    ``read_predictions(checkpoint)`` returns the trial's ``predictions.parquet`` (or None). A repeat whose
    folds are not all there is left out (a partial sweep), never pooled from fewer folds.
    """
    dataset = rows.ft_dataset.iloc[0]
    kappa = is_kappa(dataset)
    k = int(rows.n_folds.dropna().iloc[0])
    out = []
    for repeat, g in rows.groupby("repeat", sort=True):
        if g.fold.nunique() < k:
            continue
        parts = []
        for ckpt in g.checkpoint:
            p = read_predictions(ckpt) if isinstance(ckpt, str) else None
            if p is None:
                break
            parts.append(p[p.split == "test"])
        else:
            pooled = pd.concat(parts, ignore_index=True)
            m = regression_metrics(pooled.y_true.to_numpy(), pooled.y_pred.to_numpy(), kappa=kappa)
            out.append({"repeat": int(repeat), "n": len(pooled), **m})
    return pd.DataFrame(out)


def mean_std(values: pd.Series | list[float], digits: int = 3) -> str:
    """``mean ± std`` (ddof 0) of the finite values; one value alone; ``–`` for none (missing, never zero)."""
    v = pd.Series(values, dtype=float).dropna()
    if v.empty:
        return MISSING
    if len(v) == 1:
        return f"{v.iloc[0]:.{digits}g}"
    return f"{v.mean():.{digits}g} ± {v.std(ddof=0):.2g}"


def cell_table(rows: pd.DataFrame, read_predictions) -> pd.DataFrame:
    """One row per cell of one (dataset, size): units, headline and other metrics (mean ± std), lr, n_unfrozen."""
    if rows.empty:
        return pd.DataFrame()
    dataset = rows.ft_dataset.iloc[0]
    kfold = is_kfold(rows)
    out = []
    for (start, strategy), g in rows.groupby(CELL, sort=False, dropna=False):
        row: dict[str, Any] = {"start": start, "strategy": strategy}
        if kfold:
            pooled = pooled_by_repeat(g, read_predictions)
            row["units"] = f"{len(g)} folds, {len(pooled)} full repeat{'s' if len(pooled) != 1 else ''}"
            for metric in shown_metrics(dataset):
                row[metric] = mean_std(pooled[metric]) if metric in pooled.columns else MISSING
        else:
            row["units"] = f"{len(g)} seeds"
            for metric in shown_metrics(dataset):
                row[metric] = mean_std(_unit_metric(g, metric))
        row["lr (median)"] = f"{g.lr.median():.2g}"
        nu = g.n_unfrozen.dropna()
        row["n_unfrozen"] = ",".join(str(int(v)) for v in nu.value_counts().sort_index().index) if len(nu) else MISSING
        row["val_loss"] = float(g.val_loss.astype(float).mean())
        out.append(row)
    table = pd.DataFrame(out)
    return table.sort_values("start", key=lambda s: ~s.map(is_scratch), kind="stable").reset_index(drop=True)


def compare_cells(
    rows: pd.DataFrame, a: tuple[str, str], b: tuple[str, str], metric: Headline | None = None
) -> PairedResult:
    """Cell ``a`` against cell ``b`` (each (start, strategy)) on the units both have, by ``metric`` (default:
    the dataset's headline; e.g. ``Headline("mape", False, "MAPE")`` to judge kappa as ParAIsite did)."""
    h = metric or headline(rows.ft_dataset.iloc[0])
    units = unit_columns(rows)
    col = f"test_{h.metric}"

    def per_unit(cell: tuple[str, str]) -> pd.Series:
        g = rows[(rows.start == cell[0]) & (rows.strategy == cell[1])]
        return g.set_index(units)[col].astype(float)

    left, right = per_unit(a), per_unit(b)
    for cell, series in ((a, left), (b, right)):
        if series.index.duplicated().any():  # two rows for one unit: not a pairing of identical data
            raise ValueError(f"cell {cell} has several rows per unit {units}; compare within one stage")
    both = left.index.intersection(right.index)
    return paired_compare(
        left.loc[both].to_numpy(), right.loc[both].to_numpy(), higher_is_better=h.higher_is_better,
        test_train_ratio=test_train_ratio(rows),
    )  # fmt: skip


def cells_of(rows: pd.DataFrame) -> list[tuple[str, str]]:
    """The (start, strategy) cells of one FT dataset and size, in order of appearance (scratch's strategy is
    ``scratch``)."""
    return list(dict.fromkeys(zip(rows.start, rows.strategy, strict=True)))


def paired_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Each start against the scratch of its architecture, then starts against each other (and, beside several
    architectures, the scratch baselines against each other); one row per comparison, all on the same units."""
    if rows.empty:
        return pd.DataFrame()
    cells = cells_of(rows)
    scratch = [c for c in cells if is_scratch(c[0])]
    tuned = [c for c in cells if not is_scratch(c[0])]
    against = {c: scratch_for(rows, c, scratch) for c in tuned}
    pairs = [(c, s) for s in scratch for c in tuned if s in against[c]]
    pairs += list(itertools.combinations(tuned, 2)) + list(itertools.combinations(scratch, 2))
    h = headline(rows.ft_dataset.iloc[0])
    out = []
    for a, b in pairs:
        r = compare_cells(rows, a, b)
        out.append(
            {
                "A": _cell_name(a),
                "B": _cell_name(b),
                "metric": h.label,
                "pairs": r.n_pairs,
                "A - B": format_diff(r.mean_diff),
                "95% interval": MISSING if r.ci_low is None else f"[{format_diff(r.ci_low)}, {format_diff(r.ci_high)}]",
                "A better on": f"{r.wins} of {r.n_pairs}",
                "verdict": _verdict(r, a, b),
                "significant": r.significant,
                "mean_diff": r.mean_diff,
            }
        )
    return pd.DataFrame(out)


def _cell_name(cell: tuple[str, str]) -> str:
    start, strategy = cell
    return start if is_scratch(start) else f"{start} [{strategy}]"


def _verdict(r: PairedResult, a: tuple[str, str], b: tuple[str, str]) -> str:
    if r.significant is None:
        return f"cannot be judged ({r.n_pairs} pair{'s' if r.n_pairs != 1 else ''}; need {MIN_PAIRS})"
    if not r.significant:
        return "no significant difference"
    return f"{_cell_name(a) if r.better == 'a' else _cell_name(b)} is better"


def selection_gaps(
    trials: pd.DataFrame, best: pd.DataFrame, rows: pd.DataFrame, dataset: str | None = None
) -> pd.DataFrame:
    """Per cell: mean over units of (test headline of the validation-picked trial) − (best test headline among
    that unit's completed trials), signed so that positive = the pick is worse on test; and how often the
    pick was the test-best. ``dataset``: whose headline (default: the rows' FT dataset; PT rows pass theirs,
    since a later stage starts from the PT trial picked by validation loss)."""
    if rows.empty:
        return pd.DataFrame()
    h = headline(dataset if dataset is not None else rows.ft_dataset.iloc[0])
    col = f"test_{h.metric}"
    done = trials[(trials.status == "completed") & trials.setting.isin(rows.setting)]
    out = []
    for (start, strategy), g in rows.groupby(CELL, sort=False, dropna=False):
        gaps = []
        for _, picked in g.iterrows():
            alts = done[done.setting == picked.setting][col].astype(float).dropna()
            if alts.empty or pd.isna(picked[col]):
                continue
            test_best = alts.max() if h.higher_is_better else alts.min()
            gap = (test_best - float(picked[col])) if h.higher_is_better else (float(picked[col]) - test_best)
            gaps.append((gap, len(alts)))
        if not gaps:
            continue
        values = np.array([x for x, _ in gaps])
        out.append(
            {
                "cell": _cell_name((start, strategy)),
                "units": len(gaps),
                "trials per unit": f"{np.mean([n for _, n in gaps]):.3g}",
                f"test {h.label}: picked worse than test-best by (mean)": f"{values.mean():.3g}",
                "pick was test-best": f"{int((values <= 1e-12).sum())} of {len(values)}",
            }
        )
    return pd.DataFrame(out)


def heatmap_cells(best: pd.DataFrame) -> dict[tuple[str, str], tuple[float, bool | None, str, tuple]]:
    """(start, FT dataset) → (mean paired difference vs scratch of the headline metric, significant, label,
    its 95 % interval)
    at each FT dataset's largest size; the start's strategy is the one with the lowest validation loss.

    Only rows of one stage are ever paired (stages differ in their held-out data); a dataset fine-tuned in
    several stages is labelled ``<stage>:<dataset>``.
    """
    cells: dict[tuple[str, str], tuple[float, bool | None, str, tuple]] = {}
    ft = best[best.kind != "pretrain"]
    shared = {d for d, g in ft.groupby("ft_dataset") if g.stage.nunique() > 1}
    for (stage, dataset), all_rows in ft.groupby(["stage", "ft_dataset"]):
        column = f"{stage}:{dataset}" if dataset in shared else dataset
        sizes = all_rows.ft_size.dropna()
        rows = all_rows[all_rows.ft_size == sizes.max()] if not sizes.empty else all_rows
        scratch = rows[rows.start.map(is_scratch)]
        if scratch.empty:
            continue
        s_cells = list(dict.fromkeys(zip(scratch.start, scratch.strategy, strict=True)))
        for start, g in rows[rows.kind == "finetune"].groupby("start"):
            strategy = g.groupby("strategy").val_loss.mean().idxmin()
            own = scratch_for(rows, (start, strategy), s_cells)  # the scratch of its own architecture
            if not own:
                continue
            r = compare_cells(rows, (start, strategy), own[0])
            cells[(start, column)] = (
                r.mean_diff if r.mean_diff is not None else float("nan"),
                r.significant,
                headline(dataset).label,
                (r.ci_low, r.ci_high),
            )
    return cells
