"""Target transforms (fit on the training split only) and metrics in the target's raw units."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ltc.errors import ConfigError

TRANSFORMS = ("minmax", "standardize", "log10p1", "log10p1+standardize", "none")
LOG_NEEDS_ABOVE = -1.0  # log10(1 + y) is defined for y above this


def takes_log(kind: str) -> bool:
    """Whether transform ``kind`` takes log10(1 + y) (so needs targets above ``LOG_NEEDS_ABOVE``)."""
    return kind.startswith("log10p1")


@dataclass(frozen=True)
class TargetScaler:
    """``scaled = (f(y) - shift) / scale`` with ``f`` = identity or ``log10(1 + y)``.

    - ``minmax``: to [-1, 1] over the training split (Devi et al.);
    - ``standardize``: zero mean, unit variance;
    - ``log10p1+standardize``: log10(kappa + 1), then standardised (ParAIsite);
    - ``log10p1``: log10(1 + y) only; ``none``: identity.
    """

    kind: str
    shift: float = 0.0
    scale: float = 1.0

    @classmethod
    def fit(cls, kind: str, y: np.ndarray) -> TargetScaler:
        if kind not in TRANSFORMS:
            raise ConfigError(f"target transform {kind!r} is not one of {TRANSFORMS}")
        y = np.asarray(y, dtype=np.float64)
        if y.size == 0:
            raise ConfigError("cannot fit a target transform on an empty training split")
        if takes_log(kind) and y.min() <= LOG_NEEDS_ABOVE:
            raise ConfigError(f"{kind} needs targets > {LOG_NEEDS_ABOVE:g}; the training split has min {y.min():g}")
        f = np.log10(1.0 + y) if takes_log(kind) else y
        if kind == "minmax":
            lo, hi = float(f.min()), float(f.max())
            shift, scale = (hi + lo) / 2, (hi - lo) / 2
        elif kind.endswith("standardize"):
            shift, scale = float(f.mean()), float(f.std())
        else:
            shift, scale = 0.0, 1.0
        # a constant training target (tiny FT sets) would divide by zero: keep its offset, unit scale
        return cls(kind, shift, scale if scale > 0 and math.isfinite(scale) else 1.0)

    def transform(self, y):
        f = np.log10(1.0 + y) if takes_log(self.kind) else y
        return (f - self.shift) / self.scale

    def inverse(self, s):
        """Scaled → raw units (numpy arrays or torch tensors)."""
        f = s * self.scale + self.shift
        return 10.0**f - 1.0 if takes_log(self.kind) else f

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetScaler:
        return cls(str(d["kind"]), float(d["shift"]), float(d["scale"]))


# Below this |y| a relative error is meaningless (band gaps of 0 eV); MAPE skips such rows.
MAPE_FLOOR = 1e-8
# Predicted kappa below this (W/(m K)) is clipped before log10, so a non-physical prediction is a large
# but finite log error.
KAPPA_FLOOR = 1e-3


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray, *, kappa: bool = False) -> dict[str, float | None]:
    """MAE, RMSE, R², MAPE (%) in raw units; for kappa also MAE and R² of log10(kappa). None where undefined.

    Kappa spans four decades and one compound at 1,769 W/(m K) decides a raw-unit R²: the log10 metrics
    and MAPE are kappa's headline metrics (``HEADLINE``), raw-unit ones are kept for reference.
    """
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if t.shape != p.shape:
        raise ValueError(f"shapes differ: y_true {t.shape}, y_pred {p.shape}")
    if t.size == 0:
        out: dict[str, float | None] = {"mae": None, "rmse": None, "r2": None, "mape": None}
        if kappa:
            out["mae_log10"] = out["r2_log10"] = None
        return out
    err = p - t
    ss_tot = float(((t - t.mean()) ** 2).sum())
    nz = np.abs(t) > MAPE_FLOOR
    out = {
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "r2": float(1.0 - (err**2).sum() / ss_tot) if ss_tot > 0 else None,
        "mape": float(100.0 * np.mean(np.abs(err[nz] / t[nz]))) if nz.any() else None,
    }
    if kappa:
        pos = t > 0
        lt, lp = np.log10(t[pos]), np.log10(np.maximum(p[pos], KAPPA_FLOOR))
        out["mae_log10"] = float(np.abs(lp - lt).mean()) if pos.any() else None
        ss_log = float(((lt - lt.mean()) ** 2).sum()) if pos.any() else 0.0
        out["r2_log10"] = float(1.0 - ((lp - lt) ** 2).sum() / ss_log) if ss_log > 0 else None
    return out


@dataclass(frozen=True)
class Headline:
    """The metric a dataset is judged by: its key in ``regression_metrics`` and whether higher is better."""

    metric: str  # e.g. "mae_log10"; the trials table has it as ``test_<metric>``
    higher_is_better: bool
    label: str


# kappa: MAE of log10 kappa (a decade-scale error that no single compound dominates); other properties:
# R², as both papers report. The other metrics are written too; these headline tables and comparisons.
HEADLINE = {True: Headline("mae_log10", False, "MAE log10 kappa"), False: Headline("r2", True, "R²")}
KAPPA_METRICS = ("mae_log10", "r2_log10", "mape")  # what a kappa table shows, headline first
