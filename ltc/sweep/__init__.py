"""Sweeps: a YAML file → stages of PT / FT trials → one Ray Tune ``Tuner`` per stage → trials.parquet.

Five parts, each importable alone:

- ``ltc.sweep.spec``: the sweep-file schema (frozen dataclasses, strict loader); no Ray.
- ``ltc.sweep.plan``: pure functions, stages → settings → trial configs, and the load-time checks; no Ray.
- ``ltc.sweep.studies``: the Optuna side: storage, the budget sampler, study names; no Ray.
- ``ltc.sweep.adapters``: the Tune searcher (a study per setting), per-setting early stopping, the progress bar.
- ``ltc.sweep.driver``: stages in order, inputs resolved once per stage, resume.

The names below are re-exported; those of the Ray parts import Ray only when first used, so
``ltc sweep --dry-run`` (spec + plan) never imports it. The results table lives in ``ltc.results``.
"""

from __future__ import annotations

from typing import Any

from ltc.sweep.plan import Setting, Start, describe, plan, resolve_holdout, validate
from ltc.sweep.spec import (
    AshaSpec,
    Range,
    Resources,
    SearchSpec,
    Source,
    StageSpec,
    SweepSpec,
    load_sweep,
    smoke,
)

_LAZY = {
    "run_sweep": "ltc.sweep.driver",
    "SettingSearch": "ltc.sweep.adapters",
    "StudyPruning": "ltc.sweep.adapters",
    "Progress": "ltc.sweep.adapters",
    "summary": "ltc.results",
}

__all__ = [
    "AshaSpec",
    "Progress",
    "Range",
    "Resources",
    "SearchSpec",
    "Setting",
    "SettingSearch",
    "Source",
    "StageSpec",
    "Start",
    "StudyPruning",
    "SweepSpec",
    "describe",
    "load_sweep",
    "plan",
    "resolve_holdout",
    "run_sweep",
    "smoke",
    "summary",
    "validate",
]


def __getattr__(name: str) -> Any:  # PEP 562: Ray is imported only when a Ray part is asked for
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ltc.sweep' has no attribute {name!r}")
