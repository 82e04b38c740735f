"""Paired comparisons of two settings evaluated on identical data: "does A beat B?".

A *unit* is one evaluation both settings share: a (repeat, fold) of repeated K-fold cross-validation on a
small set, or a seed of a fixed-test-split run on a large set (both settings of one seed train on the same
subset). Each unit gives one test metric per setting, and the difference ``a − b`` per unit is what is
tested.

Units share training data with each other (K-fold training folds overlap; seeds draw from one pool), so
their differences are positively correlated and a plain paired t-test is anti-conservative: its interval
is too narrow. We use the corrected resampled t-test (Nadeau & Bengio 2003, "Inference for the
generalization error", Machine Learning 52; for repeated K-fold, Bouckaert & Frank 2004, "Evaluating the
replicability of significance tests for comparing learning algorithms", PAKDD). With ``J`` differences of
mean ``d̄`` and sample variance ``s²`` (ddof 1)::

    var = (1/J + n_test/n_train) · s²        t = d̄ / sqrt(var),  J − 1 degrees of freedom
    95 % interval: d̄ ± t_{0.975, J−1} · sqrt(var)

For K-fold, ``n_test/n_train = 1/(K − 1)`` (:func:`kfold_test_train_ratio`); for a fixed test split, pass
the actual test and training sizes' ratio. ``n_test/n_train = 0`` is the plain paired t-test.

Fewer than :data:`MIN_PAIRS` pairs is "cannot be judged" (no interval, ``significant=None``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats as sps

from ltc.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

MIN_PAIRS = 3  # fewer paired units than this: "cannot be judged"
DEFAULT_CONFIDENCE = 0.95


def kfold_test_train_ratio(n_folds: int) -> float:
    """``n_test / n_train`` of one K-fold split: ``1 / (K − 1)`` (each fold tests 1/K, trains on (K−1)/K)."""
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
        raise ConfigError(f"n_folds={n_folds!r} must be an integer >= 2")
    return 1.0 / (n_folds - 1)


def format_diff(value: float | None, digits: int = 3) -> str:
    """``value`` with an explicit sign (``+0.031``, ``-0.010``, ``+0.000``); ``"n/a"`` for None or NaN.

    The minus is the ASCII hyphen-minus, so the text reads back with ``float()``. A value that rounds to
    zero is written ``+0.000`` (never ``-0.000``).
    """
    if value is None or math.isnan(value):
        return "n/a"
    text = f"{value:+.{digits}f}"
    if float(text) == 0.0:
        text = f"{0.0:+.{digits}f}"
    return text


def _check_ratio(test_train_ratio: float) -> float:
    try:
        ratio = float(test_train_ratio)
    except (TypeError, ValueError):
        raise ConfigError(f"test_train_ratio={test_train_ratio!r} must be a number >= 0") from None
    if not math.isfinite(ratio) or ratio < 0:
        raise ConfigError(f"test_train_ratio={test_train_ratio!r} must be a finite number >= 0 (n_test / n_train)")
    return ratio


def _check_confidence(confidence: float) -> float:
    try:
        level = float(confidence)
    except (TypeError, ValueError):
        raise ConfigError(f"confidence={confidence!r} must be a number between 0 and 1") from None
    if not 0 < level < 1:
        raise ConfigError(f"confidence={confidence!r} must be between 0 and 1 (exclusive), e.g. 0.95")
    return level


def corrected_resampled_t(
    diffs: Sequence[float] | np.ndarray,
    *,
    test_train_ratio: float,
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[float, float, float, float]:
    """Corrected resampled t-test of paired differences: ``(mean, low, high, p_value)``.

    ``diffs`` are per-unit differences ``a − b`` in the metric's own units (at least 2: the sample variance
    needs them; :func:`paired_compare` asks for :data:`MIN_PAIRS`). ``test_train_ratio`` is
    ``n_test / n_train`` of one unit (``1/(K−1)`` for K-fold; 0 gives the plain paired t-test). ``low`` and
    ``high`` bound the two-sided ``confidence`` interval of the mean difference; ``p_value`` is two-sided,
    for "mean difference = 0".

    Zero variance (all differences equal) leaves t undefined (0/0 or x/0). We take the limit: the interval
    collapses to the mean, and the p-value is 0 if the mean is non-zero (infinitely many standard errors
    away) and 1 if it is zero (no evidence of any difference).

    Raises ConfigError for non-finite differences, fewer than 2 of them, a negative or non-finite ratio, or
    a confidence outside (0, 1).
    """
    ratio = _check_ratio(test_train_ratio)
    level = _check_confidence(confidence)
    d = np.asarray(diffs, dtype=float).ravel()
    bad = np.flatnonzero(~np.isfinite(d))
    if bad.size:
        raise ConfigError(
            f"diffs[{bad[0]}]={float(d[bad[0]])!r} is not finite; every paired difference must be a number"
        )
    n = d.size
    if n < 2:
        raise ConfigError(f"{n} paired difference(s) given; the corrected t-test needs at least 2")
    if np.all(d == d[0]):
        mean = float(d[0])  # exact, where np.mean of equal values may round
        return mean, mean, mean, (0.0 if mean != 0 else 1.0)
    mean = float(np.mean(d))
    var = (1.0 / n + ratio) * float(np.var(d, ddof=1))
    se = math.sqrt(var)
    dof = n - 1
    half = float(sps.t.ppf(0.5 + level / 2, dof)) * se
    p_value = float(2 * sps.t.sf(abs(mean / se), dof))
    return mean, mean - half, mean + half, p_value


@dataclass(frozen=True)
class PairedResult:
    """Setting ``a`` against setting ``b`` over paired units (see the module docstring).

    ``mean_diff``, ``ci_low`` and ``ci_high`` are in the metric's units and always ``a − b`` (so for an
    error like MAE a negative difference favours ``a``); ``wins`` / ``losses`` / ``ties`` count units where
    ``a`` is better / worse / exactly equal, taking ``higher_is_better`` into account. ``significant``: the
    ``confidence`` interval excludes 0; None (with no interval or p-value) below :data:`MIN_PAIRS` pairs.
    ``n_dropped`` counts units left out because a metric was missing (NaN).
    """

    n_pairs: int
    mean_diff: float | None
    ci_low: float | None
    ci_high: float | None
    wins: int
    losses: int
    ties: int
    p_value: float | None
    significant: bool | None
    method: str
    higher_is_better: bool
    confidence: float = DEFAULT_CONFIDENCE
    n_dropped: int = 0

    @property
    def better(self) -> str | None:
        """``'a'`` or ``'b'`` when the difference is significant, else None (no difference, or not judged)."""
        if not self.significant or self.mean_diff is None:
            return None
        a_ahead = self.mean_diff > 0 if self.higher_is_better else self.mean_diff < 0
        return "a" if a_ahead else "b"

    @property
    def verdict(self) -> str:
        """One line for people, from ``a``'s side, e.g. ``better on 8 of 10; +0.031 [+0.004, +0.058], significant``."""
        if self.significant is None:
            pairs = "pair" if self.n_pairs == 1 else "pairs"
            return f"cannot be judged ({self.n_pairs} {pairs}; need {MIN_PAIRS})"
        interval = f"{format_diff(self.mean_diff)} [{format_diff(self.ci_low)}, {format_diff(self.ci_high)}]"
        if not math.isclose(self.confidence, DEFAULT_CONFIDENCE):
            interval += f" ({self.confidence:.0%} interval)"
        tied = f", {self.ties} tied" if self.ties else ""
        if self.better == "a":
            return f"better on {self.wins} of {self.n_pairs}{tied}; {interval}, significant"
        if self.better == "b":
            return f"worse on {self.losses} of {self.n_pairs}{tied}; {interval}, significant"
        return f"no significant difference (better on {self.wins} of {self.n_pairs}{tied}; {interval})"


def _method(ratio: float, confidence: float) -> str:
    if ratio == 0:
        return f"paired t-test, {confidence:.0%} interval"
    return f"corrected resampled t-test (Nadeau & Bengio 2003), n_test/n_train={ratio:.4g}, {confidence:.0%} interval"


def paired_compare(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    higher_is_better: bool,
    test_train_ratio: float,
    confidence: float = DEFAULT_CONFIDENCE,
) -> PairedResult:
    """Compare per-unit metrics ``a`` and ``b`` (same order = same unit) with the corrected resampled t-test.

    A unit where either metric is NaN (a run that failed or is missing) is dropped and counted in
    ``n_dropped``; the rest are compared. An infinite metric is not "missing" and raises ConfigError, as do
    sequences of different lengths. ``higher_is_better``: True for R², False for MAE / MAPE.
    """
    ratio = _check_ratio(test_train_ratio)
    level = _check_confidence(confidence)
    if not isinstance(higher_is_better, (bool, np.bool_)):
        raise ConfigError(f"higher_is_better={higher_is_better!r} must be True or False")
    try:
        xa = np.asarray(a, dtype=float).ravel()
        xb = np.asarray(b, dtype=float).ravel()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"metrics must be numbers: {exc}") from None
    if xa.shape != xb.shape:
        raise ConfigError(f"a has {xa.size} values and b has {xb.size}; they must pair up unit by unit")
    keep = ~(np.isnan(xa) | np.isnan(xb))
    xa, xb = xa[keep], xb[keep]
    for name, x in (("a", xa), ("b", xb)):
        bad = np.flatnonzero(~np.isfinite(x))
        if bad.size:
            raise ConfigError(f"{name} has value {float(x[bad[0]])!r} (after dropping NaN pairs, position {bad[0]})")
    n = int(xa.size)
    a_better = xa > xb if higher_is_better else xa < xb
    wins = int(np.count_nonzero(a_better))
    ties = int(np.count_nonzero(xa == xb))
    common = {
        "n_pairs": n,
        "wins": wins,
        "losses": n - wins - ties,
        "ties": ties,
        "method": _method(ratio, level),
        "higher_is_better": bool(higher_is_better),
        "confidence": level,
        "n_dropped": int(keep.size - n),
    }
    if n < MIN_PAIRS:
        mean = float(np.mean(xa - xb)) if n else None
        return PairedResult(mean_diff=mean, ci_low=None, ci_high=None, p_value=None, significant=None, **common)
    mean, low, high, p_value = corrected_resampled_t(xa - xb, test_train_ratio=ratio, confidence=level)
    return PairedResult(
        mean_diff=mean,
        ci_low=low,
        ci_high=high,
        p_value=p_value,
        significant=bool(low > 0 or high < 0),
        **common,
    )


def compare_table(
    df: pd.DataFrame,
    *,
    unit_cols: str | Sequence[str],
    setting_col: str,
    metric_col: str,
    a: Hashable,
    b: Hashable,
    higher_is_better: bool,
    test_train_ratio: float,
    confidence: float = DEFAULT_CONFIDENCE,
) -> PairedResult:
    """:func:`paired_compare` over a long table: one row per (unit, setting) with its metric.

    ``unit_cols`` name a unit (e.g. ``["repeat", "fold"]`` or ``"seed"``); ``a`` and ``b`` are values of
    ``setting_col``. Units are paired by their ``unit_cols`` values; only units where both settings have a
    finite ``metric_col`` are kept (an inner join: units present for one setting only, or with a NaN or
    infinite metric, are left out and counted in ``n_dropped``). Raises ConfigError for missing columns,
    ``a == b``, a setting absent from the table, a non-numeric metric, or two rows for one (unit, setting).
    """
    units = [unit_cols] if isinstance(unit_cols, str) else list(unit_cols)
    if not units:
        raise ConfigError("unit_cols is empty; name the column(s) that identify a paired unit")
    missing = [c for c in [*units, setting_col, metric_col] if c not in df.columns]
    if missing:
        raise ConfigError(f"column(s) {missing} not in the table (it has {list(df.columns)})")
    if a == b:
        raise ConfigError(f"a={a!r} and b={b!r} are the same setting")
    present = set(df[setting_col].unique())
    for name, setting in (("a", a), ("b", b)):
        if setting not in present:
            raise ConfigError(
                f"{name}={setting!r} is not a value of column {setting_col!r} (it has {sorted(map(str, present))})"
            )
    rows = df.loc[df[setting_col].isin([a, b]), [*units, setting_col, metric_col]]
    dup = rows.duplicated([*units, setting_col], keep=False)
    if dup.any():
        first = rows.loc[dup].iloc[0]
        key = {c: first[c] for c in [*units, setting_col]}
        raise ConfigError(f"two or more rows for unit {key}; each (unit, setting) needs one metric")
    try:
        metric = rows[metric_col].astype(float)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"column {metric_col!r} must hold numbers: {exc}") from None
    rows = rows.assign(**{metric_col: metric})
    wide = rows.pivot(index=units, columns=setting_col, values=metric_col)
    n_units = len(wide)
    wide = wide[np.isfinite(wide[a]) & np.isfinite(wide[b])]
    result = paired_compare(
        wide[a].to_numpy(),
        wide[b].to_numpy(),
        higher_is_better=higher_is_better,
        test_train_ratio=test_train_ratio,
        confidence=confidence,
    )
    return replace(result, n_dropped=n_units - len(wide))
