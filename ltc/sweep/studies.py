"""The Optuna side of a sweep: one study per setting, in storage beside the results. No Ray here.

**Storage.** A sweep's studies live in ``results/<name>/optuna.log`` (Optuna's ``JournalFileBackend``,
safe on shared file systems) or in a database given by URL (``sqlite:///…``, ``postgresql://…``).
``optuna-dashboard results/<name>/optuna.log`` opens them. A study is named ``<sweep>/<stage>/<setting key>``
and carries the setting (datasets, size, seed, fold, strategy, start) as user attributes; each of its
trials carries its Ray trial id and its index within the setting.

**Sampler** (``budget``, the default). A setting with ``n`` trials starts with ``k = startup_trials(n)``
space-filling points: a Latin hypercube over (log lr, n_unfrozen), so ``k`` trials cover each range in
``k`` equal strata instead of clustering as random draws do. These are fixed in advance, so all ``k``
may run at once. Only when all ``k`` have ended does multivariate TPE (with ``constant_liar``) propose
the remaining ``n - k``, at most ``MAX_MODEL_IN_FLIGHT`` of one setting at a time, so each proposal
sees nearly every result before it. (A start-up trial that failed does not count for TPE, which then
draws at random until k trials have completed or been pruned.) At ``n <= 4`` (every shipped sweep) the
search is the hypercube alone: a model fitted on 1–3 points has nothing to offer. ``random`` draws every
trial independently (the baseline ``benchmarks/bench_search.py`` compares against).

**Secrets.** A database URL can hold a password. What ltc keeps (Tune's state, ``sweep.json``, the resume
hint it prints) holds the URL with the password masked; the full URL lives only in this process
(``register_storage``), so a resumed sweep must be given ``--optuna-storage`` again. A password on the
command line is still visible to ``ps`` (and Ray records the driver's command line): prefer a URL without
one and the database's own mechanism (``PGPASSWORD``, ``~/.pgpass``).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from ltc.errors import ConfigError

Sampler = Literal["budget", "random"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)
MAX_MODEL_IN_FLIGHT = 2  # TPE proposals of one setting running at once (constant_liar covers the other)
JOURNAL_NAME = "optuna.log"  # in results/<sweep name>/

_FULL_URLS: dict[str, str] = {}  # masked URL → the URL given (with its password): this process only
MASK = "***"
_SECRET_QUERY_KEYS = ("pass", "secret", "token", "key")  # ?password=, ?passwd=, ?sslkey=… are masked too


def startup_trials(n: int) -> int:
    """Space-filling trials before TPE, for a setting of ``n`` trials: all of them up to 4, then half."""
    return n if n <= 4 else max(4, n // 2)


def is_url(storage: str) -> bool:
    """A database URL (``scheme://…``), as opposed to a journal file path."""
    return "://" in storage


def register_storage(storage: str) -> str:
    """The reference kept for ``storage``: a journal path as it is, a database URL with its password (and
    any secret-looking query value) masked. The full URL is kept in this process only."""
    if not is_url(storage):
        return storage
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(storage)
    except ArgumentError as err:
        raise ConfigError(f"--optuna-storage {storage.split('://')[0]}://…: not a database URL ({err})") from None
    if url.password == MASK or MASK in url.query.values():
        raise ConfigError(f"--optuna-storage {url.render_as_string()}: the password is masked; give the real one")
    secret = {k: MASK for k in url.query if any(word in k.lower() for word in _SECRET_QUERY_KEYS)}
    masked = url.set(query={**url.query, **secret}).render_as_string(hide_password=True)
    _FULL_URLS[masked] = storage
    return masked


@functools.lru_cache(maxsize=8)
def _open(storage: str) -> Any:
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if is_url(storage):
        return optuna.storages.RDBStorage(storage)
    return JournalStorage(JournalFileBackend(storage))


def repair_journal(path: str | Path) -> int:
    """Check a journal file before a sweep opens it; drop a torn last record (a write cut short by a kill or a full
    disk leaves one without its newline, and Optuna would glue the next record to it), naming it in a warning.
    Returns the bytes dropped. A damaged record before the last is a ``DataError`` naming its line: dropping it
    would lose what came after. Optuna's journal is append-only, one JSON record a line, so a prefix of whole
    lines is a consistent earlier state of the studies."""
    import json
    import logging

    from ltc.errors import DataError

    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    data = path.read_bytes()
    keep = data if data.endswith(b"\n") else data[: data.rfind(b"\n") + 1]
    for number, line in enumerate(keep.splitlines(), 1):
        try:
            json.loads(line)
        except (ValueError, UnicodeDecodeError) as err:
            raise DataError(
                f"{path} line {number}: not an Optuna journal record ({type(err).__name__}: {str(err)[:80]}); the "
                "studies after it cannot be read: restore the file, or start the sweep anew elsewhere"
            ) from None
    dropped = len(data) - len(keep)
    if dropped:
        with open(path, "r+b") as fh:
            fh.truncate(len(keep))
        logging.getLogger(__name__).warning(
            "%s: dropped its torn last record (%d bytes without a line end, a write cut short)", path, dropped
        )
    return dropped


def open_storage(ref: str) -> Any:
    """The Optuna storage behind ``ref`` (one object per storage and process)."""
    if is_url(ref) and (MASK in ref or "%2A%2A%2A" in ref) and ref not in _FULL_URLS:
        raise ConfigError(f"the Optuna studies are in {ref}: pass --optuna-storage with its password again")
    return _open(_FULL_URLS.get(ref, ref))


def study_name(prefix: str, setting: str) -> str:
    """``<sweep>/<stage>/<setting key>``: ``prefix`` is ``<sweep>/<stage>``."""
    return f"{prefix}/{setting}"


def trial_id(storage: Any, name: str, number: int) -> int:
    """Optuna's storage id of trial ``number`` of study ``name``. Optuna's storage methods, not its user-facing
    API (Optuna has none for reopening a trial by number): kept working by the Optuna pin and the tests."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(name), number)


def make_sampler(sampler: Sampler, n: int, seed: int) -> Any:
    """The Optuna sampler of one setting of ``n`` trials (see the module docstring)."""
    import optuna

    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # the first k trials are enqueued hypercube points; TPE sees them as its start-up trials
    return optuna.samplers.TPESampler(
        n_startup_trials=startup_trials(n), multivariate=True, constant_liar=True, seed=seed
    )


def startup_points(
    k: int, *, lr: tuple[float, float] | None, n_unfrozen: int | None, seed: int
) -> list[dict[str, float | int]]:
    """``k`` Latin-hypercube points over the searched values: ``lr`` log-uniform in (low, high), ``n_unfrozen``
    an integer in 0 … ``n_unfrozen``; a value not searched is left out (``{}`` when none is)."""
    return [dict(p) for p in _points(k, lr, n_unfrozen, seed)]


@functools.lru_cache(maxsize=1024)  # the searcher asks once per trial for the same k points
def _points(
    k: int, lr: tuple[float, float] | None, n_unfrozen: int | None, seed: int
) -> tuple[tuple[tuple[str, float | int], ...], ...]:
    from scipy.stats import qmc

    dims = int(lr is not None) + int(n_unfrozen is not None)
    if dims == 0:
        return tuple(() for _ in range(k))
    # random-cd spreads the points in the plane as well as along each axis (it needs 2 dimensions)
    u = qmc.LatinHypercube(d=dims, seed=seed, optimization="random-cd" if dims > 1 else None).random(k)
    points: list[dict[str, float | int]] = [{} for _ in range(k)]
    col = 0
    if lr is not None:
        lo, hi = math.log(lr[0]), math.log(lr[1])
        for p, x in zip(points, u[:, col], strict=True):
            p["lr"] = float(np.exp(lo + x * (hi - lo)))
        col += 1
    if n_unfrozen is not None:
        for p, x in zip(points, u[:, col], strict=True):
            p["n_unfrozen"] = min(int(x * (n_unfrozen + 1)), n_unfrozen)
    return tuple(tuple(p.items()) for p in points)


def study_attrs(config: dict[str, Any]) -> dict[str, Any]:
    """What a setting's study carries (from its trial config): the setting, for the dashboard and notebooks."""
    keys = ("setting", "stage", "kind", "datasets", "size", "max_size", "seed", "fold", "repeat", "strategy",
            "source_key", "lineage")  # fmt: skip
    return {k: config[k] for k in keys if config.get(k) is not None}
