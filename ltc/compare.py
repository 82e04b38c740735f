"""Fine-tuning results as answers: each starting point against scratch (and against each other), paired.

A *cell* is what a user compares: FT dataset and size × start (a PT source, or scratch) × strategy. A
cell's *units* are the evaluations every cell of that (dataset, size) shares: the (repeat, fold) pairs of
a K-fold stage, or the seeds of a fixed-test-split stage. Each unit is represented by its best trial
(lowest validation score: selection never sees the test set or fold).

- ``cell_table``: per cell, the dataset's headline metric (kappa: MAE and R² of log10 kappa, MAPE;
  other properties: R², MAE) as mean ± std over repeats of pooled out-of-fold predictions (K-fold), or
  over seeds (``spread_note`` says which, in words); numbers for people by ``fmt_num`` / ``fmt_pm``.
- ``lowest_val_score``: the cell with the lowest mean validation score, scratch included: the report's
  "lowest validation score" line, the parity plot's model and the heatmap's strategy per start all use it.
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
from dataclasses import dataclass
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


def pooled_predictions(rows: pd.DataFrame, read_predictions) -> dict[int, pd.DataFrame]:
    """K-fold cell rows (one per (repeat, fold)) → repeat → the test predictions of all its folds, pooled.

    ``read_predictions(checkpoint)`` returns the trial's ``predictions.parquet`` (or None). A repeat whose
    folds are not all there (a partial sweep) or whose predictions cannot be read is left out, never pooled
    from fewer folds.
    """
    k = int(rows.n_folds.dropna().iloc[0])
    out: dict[int, pd.DataFrame] = {}
    for repeat, g in rows.groupby("repeat", sort=True):
        if g.fold.nunique() < k:
            continue
        parts = []
        for fold, ckpt in zip(g.fold, g.checkpoint, strict=True):
            p = read_predictions(ckpt) if isinstance(ckpt, str) else None
            if p is None:
                break
            parts.append(p[p.split == "test"].assign(repeat=int(repeat), fold=int(fold)))
        else:
            out[int(repeat)] = pd.concat(parts, ignore_index=True)
    return out


def pooled_by_repeat(rows: pd.DataFrame, read_predictions) -> pd.DataFrame:
    """K-fold cell rows → one row per full repeat: the metrics of its pooled test predictions
    (``pooled_predictions``)."""
    kappa = is_kappa(rows.ft_dataset.iloc[0])
    out = []
    for repeat, pooled in pooled_predictions(rows, read_predictions).items():
        m = regression_metrics(pooled.y_true.to_numpy(), pooled.y_pred.to_numpy(), kappa=kappa)
        out.append({"repeat": repeat, "n": len(pooled), **m})
    return pd.DataFrame(out)


def fmt_num(value: float | None, sig: int = 3) -> str:
    """``value`` for people: ``sig`` significant digits, positional (``122``, ``0.296``, ``1230000``, never
    ``1.1e+02``); ``–`` for None or NaN (missing, never zero)."""
    if value is None or not math.isfinite(float(value)):
        return MISSING
    text = np.format_float_positional(float(value), precision=sig, unique=False, fractional=False, trim="-")
    return "0" if float(text) == 0.0 else text  # never "-0"


def fmt_pm(mean: float | None, spread: float | None) -> str:
    """``mean ± spread`` for people: the mean to 3 significant digits, the spread to 2 (``122 ± 110``,
    ``0.296 ± 0.021``); the mean alone without a finite spread. What the spread is, the caller says."""
    if spread is None or not math.isfinite(float(spread)) or mean is None or not math.isfinite(float(mean)):
        return fmt_num(mean)
    return f"{fmt_num(mean)} ± {fmt_num(spread, 2)}"


def mean_std(values: pd.Series | list[float]) -> str:
    """``mean ± std`` (ddof 0) of the finite values (``fmt_pm``); one value alone; ``–`` for none."""
    v = pd.Series(values, dtype=float).dropna()
    if v.empty:
        return MISSING
    return fmt_num(v.iloc[0]) if len(v) == 1 else fmt_pm(v.mean(), v.std(ddof=0))


def spread_note(rows: pd.DataFrame) -> str:
    """What the ± of ``cell_table``'s metrics is, for the caption of a table of ``rows``' cells."""
    if is_kfold(rows):
        return (
            "mean ± std (ddof 0) over full repeats, each repeat's metrics computed from its pooled out-of-fold "
            "test predictions (all K folds); counts in `units`, one value where one repeat"
        )
    return "mean ± std (ddof 0) over the seeds counted in `units` (each seed's best trial on the test set)"


MATBENCH_COLUMN = "MAE per fold (Matbench)"  # mean ± std (ddof 0) over the official folds, as the leaderboard


def cell_metrics(g: pd.DataFrame, read_predictions) -> dict[str, str]:
    """One cell's rows → its ``units`` and each shown metric as text (``mean_std``): what ``cell_table``
    prints, and the number the parity plot of a K-fold cell prints."""
    dataset = g.ft_dataset.iloc[0]
    if is_kfold(g):
        pooled = pooled_by_repeat(g, read_predictions)
        out = {"units": f"{len(g)} folds, {len(pooled)} full repeat{'s' if len(pooled) != 1 else ''}"}
        for metric in shown_metrics(dataset):
            out[metric] = mean_std(pooled[metric]) if metric in pooled.columns else MISSING
        if "split" in g.columns and (g.split == "matbench").all():
            # the leaderboard's form: each fold's own MAE, mean and np.std over the folds
            out[MATBENCH_COLUMN] = fmt_pm(g.test_mae.astype(float).mean(), g.test_mae.astype(float).std(ddof=0))
        return out
    out = {"units": f"{len(g)} seed{'s' if len(g) != 1 else ''}"}
    for metric in shown_metrics(dataset):
        out[metric] = mean_std(_unit_metric(g, metric))
    return out


def val_score_by_cell(rows: pd.DataFrame) -> pd.Series:
    """Mean validation score of each (start, strategy) cell over its units' best trials, lowest first (scratch
    included). The aggregate ``cell_table`` keeps as ``val_score`` and every "best cell" choice uses."""
    loss = rows.assign(val_score=rows.val_score.astype(float)).groupby(CELL, sort=False, dropna=False).val_score.mean()
    return loss.dropna().sort_values(kind="stable")


def lowest_val_score(rows: pd.DataFrame) -> tuple[tuple[str, str], float] | None:
    """The cell of one (stage, FT dataset, size) with the lowest mean validation score, over every start and
    scratch, with that mean; None when no cell has one."""
    loss = val_score_by_cell(rows)
    if loss.empty:
        return None
    start, strategy = loss.index[0]
    return (start, strategy), float(loss.iloc[0])


def cell_table(rows: pd.DataFrame, read_predictions) -> pd.DataFrame:
    """One row per cell of one (dataset, size): units, headline and other metrics (``cell_metrics``; the ±
    is said by ``spread_note``), lr, n_unfrozen, and the mean validation score (``val_score_by_cell``)."""
    if rows.empty:
        return pd.DataFrame()
    loss = val_score_by_cell(rows)
    out = []
    for (start, strategy), g in rows.groupby(CELL, sort=False, dropna=False):
        row: dict[str, Any] = {"start": start, "strategy": strategy, **cell_metrics(g, read_predictions)}
        row["lr (median)"] = fmt_num(g.lr.astype(float).median(), 2)
        nu = g.n_unfrozen.dropna()
        row["n_unfrozen"] = ",".join(str(int(v)) for v in nu.value_counts().sort_index().index) if len(nu) else MISSING
        row["val_score"] = float(loss.get((start, strategy), float("nan")))
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


def paired_results(rows: pd.DataFrame) -> list[tuple[tuple[str, str], tuple[str, str], PairedResult]]:
    """Each start against the scratch of its architecture, then starts against each other (and, beside several
    architectures, the scratch baselines against each other): ``(a, b, compare_cells(rows, a, b))`` each."""
    if rows.empty:
        return []
    cells = cells_of(rows)
    scratch = [c for c in cells if is_scratch(c[0])]
    tuned = [c for c in cells if not is_scratch(c[0])]
    against = {c: scratch_for(rows, c, scratch) for c in tuned}
    pairs = [(c, s) for s in scratch for c in tuned if s in against[c]]
    pairs += list(itertools.combinations(tuned, 2)) + list(itertools.combinations(scratch, 2))
    return [(a, b, compare_cells(rows, a, b)) for a, b in pairs]


def paired_table(rows: pd.DataFrame) -> pd.DataFrame:
    """``paired_results`` as a table: one row per comparison, all on the same units."""
    if rows.empty:
        return pd.DataFrame()
    h = headline(rows.ft_dataset.iloc[0])
    out = []
    for a, b, r in paired_results(rows):
        out.append(
            {
                "A": cell_name(a),
                "B": cell_name(b),
                "metric": h.label,
                "pairs": r.n_pairs,
                "A - B": format_diff(r.mean_diff),
                "95% interval": MISSING if r.ci_low is None else f"[{format_diff(r.ci_low)}, {format_diff(r.ci_high)}]",
                "A better on": f"{r.wins} of {r.n_pairs}",
                "verdict": verdict(r, a, b),
                "significant": r.significant,
                "mean_diff": r.mean_diff,
            }
        )
    return pd.DataFrame(out)


def cell_name(cell: tuple[str, str]) -> str:
    """How tables name a cell: ``start [strategy]``, or the scratch baseline's own name."""
    start, strategy = cell
    return start if is_scratch(start) else f"{start} [{strategy}]"


def diff_pm(r: PairedResult) -> str:
    """``A − B = +0.025 ± 0.031, 95 % interval`` (the corrected t interval is symmetric about the mean, so this
    is ``paired_table``'s interval, written as one ±); without an interval, the number of pairs instead."""
    if r.ci_low is None or r.ci_high is None:
        return f"A − B = {format_diff(r.mean_diff)}, no interval ({r.n_pairs} pair{'s' if r.n_pairs != 1 else ''})"
    half = format_diff((r.ci_high - r.ci_low) / 2).lstrip("+")
    return f"A − B = {format_diff(r.mean_diff)} ± {half}, {r.confidence:.0%} interval".replace("%", " %")


def verdict(r: PairedResult, a: tuple[str, str], b: tuple[str, str]) -> str:
    """Cell ``a`` against cell ``b`` in words: which is better, no significant difference, or cannot be judged."""
    if r.significant is None:
        return f"cannot be judged ({r.n_pairs} pair{'s' if r.n_pairs != 1 else ''}; need {MIN_PAIRS})"
    if not r.significant:
        return "no significant difference"
    return f"{cell_name(a) if r.better == 'a' else cell_name(b)} is better"


def selection_gaps(
    trials: pd.DataFrame, best: pd.DataFrame, rows: pd.DataFrame, dataset: str | None = None
) -> pd.DataFrame:
    """Per cell: mean over units of (test headline of the validation-picked trial) − (best test headline among
    that unit's completed trials), signed so that positive = the pick is worse on test; and how often the
    pick was the test-best. ``dataset``: whose headline (default: the rows' FT dataset; PT rows pass theirs,
    since a later stage starts from the PT trial picked by validation score)."""
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
                "cell": cell_name((start, strategy)),
                "units": len(gaps),
                "trials per unit": fmt_num(np.mean([n for _, n in gaps])),
                f"test {h.label}: picked worse than test-best by (mean)": fmt_num(values.mean()),
                "pick was test-best": f"{int((values <= 1e-12).sum())} of {len(values)}",
            }
        )
    return pd.DataFrame(out)


@dataclass(frozen=True)
class HeatCell:
    """One heatmap cell: start ``a`` (its lowest-validation-score strategy) against scratch ``b``, paired.

    ``result.mean_diff`` is ``A − B`` with ``paired_table``'s sign; ``judged``: enough pairs for an interval.
    """

    a: tuple[str, str]
    b: tuple[str, str]
    headline: Headline
    result: PairedResult

    @property
    def judged(self) -> bool:
        return self.result.significant is not None


def heatmap_cells(best: pd.DataFrame) -> dict[tuple[str, str], HeatCell]:
    """(start, FT dataset) → that start against the scratch of its architecture at the FT dataset's largest
    size; the start's strategy is its cell with the lowest mean validation score (``val_score_by_cell``).

    Only rows of one stage are ever paired (stages differ in their held-out data); a dataset fine-tuned in
    several stages is labelled ``<stage>:<dataset>``.
    """
    cells: dict[tuple[str, str], HeatCell] = {}
    ft = best[best.kind != "pretrain"]
    shared = {d for d, g in ft.groupby("ft_dataset") if g.stage.nunique() > 1}
    for (stage, dataset), all_rows in ft.groupby(["stage", "ft_dataset"]):
        column = f"{stage}:{dataset}" if dataset in shared else dataset
        sizes = all_rows.ft_size.dropna()
        rows = all_rows[all_rows.ft_size == sizes.max()] if not sizes.empty else all_rows
        scratch = rows[rows.start.map(is_scratch)]
        if scratch.empty:
            continue
        s_cells = cells_of(scratch)
        for start, g in rows[rows.kind == "finetune"].groupby("start"):
            found = lowest_val_score(g)
            if found is None:
                continue
            a = found[0]
            own = scratch_for(rows, a, s_cells)  # the scratch of its own architecture
            if own:
                cells[(start, column)] = HeatCell(a, own[0], headline(dataset), compare_cells(rows, a, own[0]))
    return cells
