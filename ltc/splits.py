"""Train / validation / test splits over a shard set.

- Test: a fixed set per dataset, never seen in PT or FT. ``seeded``: the ``test_fraction`` of the
  dataset's input rows that rank first by a hash of (``split_seed``, dataset, id), so it depends neither
  on row order nor on graph settings; ``paper``: Devi et al.'s own test file.
- Training subsets: ``size`` structures drawn per ``seed`` from what is left (or, with ``paper``, Devi
  et al.'s trial file for trial = seed and that size), then split into train and validation: ``val_fraction``
  of them validate, but at least ``val_min`` where that stays within a fifth (``val_count``).
- ``exclude_formulas`` keeps structures of other datasets' test sets out of training (leakage through
  the same compound in a PT set).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ltc import datasets
from ltc.errors import ConfigError
from ltc.shards import ShardSet

log = logging.getLogger(__name__)

DEVI_SIZES = (10, 100, 200, 500, 800)
# K-fold bounds, checked before anything loops over them: a sweep makes folds x repeats settings per stage
MAX_FOLDS = 100
MAX_REPEATS = 100
SPLIT_TESTS = ("seeded", "paper", "paper_or_seeded", "kfold", "matbench")  # how the test set is chosen
# A split stored before val_min existed (a sweep's sweep.json, a trial's config) validated on val_fraction alone,
# which is what val_min 1 gives: read back with this, an older sweep resumes on the protocol it began with.
LEGACY_VAL_MIN = 1
MATBENCH_FOLDS = 5  # Matbench v0.1: 5-fold KFold, shuffled, random_state 18012019, one repeat
_told_seeded: set[str] = set()  # datasets already reported as falling back to a seeded test set


@dataclass(frozen=True)
class SplitConfig:
    """How a dataset is split into test, training and (inner) validation structures.

    ``test``: ``seeded`` (a fixed ``test_fraction``), ``paper`` / ``paper_or_seeded`` (Devi et al.'s test
    file), or ``kfold``: each of ``repeats`` repeats partitions the dataset into ``folds`` folds and every
    structure is tested once per repeat; the run of (repeat, fold) tests that fold and trains on the rest.
    ``matbench``: K-fold on the official Matbench v0.1 folds of a Matbench task (5 folds, 1 repeat), so that a
    result compares directly with the public leaderboard (``datasets.matbench_folds``).
    ``val_fraction`` of the training structures is the validation split, the only data that selects
    (best epoch, Optuna, early stopping): never the test set or fold. ``val_min`` raises it to that many
    structures on small sets, up to a fifth of them (``val_count`` says why).
    """

    test: str = "seeded"  # one of SPLIT_TESTS; paper_or_seeded: paper where Devi's file exists
    test_fraction: float = 0.1
    split_seed: int = 0  # fixes the seeded test set (and the folds); trials vary ``seed``, not this
    val_fraction: float = 0.1
    val_min: int = 20  # validation structures at least, where that is at most a fifth of them (val_count)
    folds: int = 5  # kfold only
    repeats: int = 1  # kfold only

    def __post_init__(self) -> None:
        if self.test not in SPLIT_TESTS:
            raise ConfigError(f"test={self.test!r} must be one of {SPLIT_TESTS}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction={self.test_fraction!r} must be between 0 and 1")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction!r} must be between 0 and 1")
        if isinstance(self.val_min, bool) or not isinstance(self.val_min, int) or self.val_min < 1:
            raise ConfigError(f"val_min={self.val_min!r} must be an integer >= 1")
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or not 2 <= self.folds <= MAX_FOLDS:
            raise ConfigError(f"folds={self.folds!r} must be an integer between 2 and {MAX_FOLDS}")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or not 1 <= self.repeats <= MAX_REPEATS:
            raise ConfigError(f"repeats={self.repeats!r} must be an integer between 1 and {MAX_REPEATS}")
        if self.test == "matbench" and (self.folds, self.repeats) != (MATBENCH_FOLDS, 1):
            raise ConfigError(
                f"test 'matbench' is Matbench v0.1's {MATBENCH_FOLDS} official folds, one repeat: got folds="
                f"{self.folds}, repeats={self.repeats}"
            )

    @classmethod
    def from_stored(cls, d: dict[str, Any]) -> SplitConfig:
        """A split stored as a dict (``asdict``); one stored before ``val_min`` keeps its protocol (LEGACY_VAL_MIN)."""
        return cls(**{"val_min": LEGACY_VAL_MIN, **d})

    @property
    def kfold(self) -> bool:
        """Every structure tested once per repeat, fold by fold (``kfold``, or Matbench's official folds)."""
        return self.test in ("kfold", "matbench")


@dataclass(frozen=True)
class Split:
    """Indices into one ``ShardSet``; the three are disjoint."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"n_train": len(self.train), "n_val": len(self.val), "n_test": len(self.test)}


def _hash_rank(ids: list[str], *keys: int | str) -> np.ndarray:
    """Order of ``ids`` by a stable hash of (keys, id): a random order that depends on each id alone,
    so adding or dropping other ids never reshuffles the rest."""
    salt = ":".join(str(k) for k in keys).encode()
    h = np.fromiter(
        (int.from_bytes(hashlib.blake2b(salt + b"|" + i.encode(), digest_size=8).digest(), "little") for i in ids),
        dtype=np.uint64,
        count=len(ids),
    )
    return np.argsort(h, kind="stable")


def _devi_names() -> set[str]:
    return {n for n, spec in datasets.REGISTRY.items() if spec.devi_prop}


@dataclass(frozen=True)
class SplitIds:
    """What a split of one dataset needs from outside its shards, resolved once (``resolve_split_ids``).

    ``paper_test``: Devi et al.'s test ids (None: the seeded test set, computed from the shards);
    ``paper_subsets``: their trial subsets, ``"<trial>:<size>"`` → ids (only with their test set);
    ``universe``: the only ids the split may use (None: every graph of the shards). Several graph kinds of one
    dataset in one sweep stage (e.g. cgcnn's and chgnet's, which reject different structures) get the ids they
    all have, so their folds, test sets and training subsets are the same structures (paired comparisons).
    A trial reads this from a small JSON file; it never opens the raw data files itself.
    """

    dataset: str
    paper_test: tuple[str, ...] | None = None
    paper_subsets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    universe: tuple[str, ...] | None = None
    matbench_folds: tuple[tuple[str, ...], ...] | None = None  # the official test ids of each fold (``matbench``)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": self.dataset,
            "paper_test": list(self.paper_test) if self.paper_test is not None else None,
            "paper_subsets": {k: list(v) for k, v in sorted(self.paper_subsets.items())},
        }
        if self.universe is not None:  # absent otherwise: split files of one graph kind stay what they were
            out["universe"] = sorted(self.universe)
        if self.matbench_folds is not None:
            out["matbench_folds"] = [list(f) for f in self.matbench_folds]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitIds:
        test = d.get("paper_test")
        universe = d.get("universe")
        folds = d.get("matbench_folds")
        return cls(
            d["dataset"],
            tuple(test) if test is not None else None,
            {k: tuple(v) for k, v in (d.get("paper_subsets") or {}).items()},
            tuple(universe) if universe is not None else None,
            tuple(tuple(f) for f in folds) if folds is not None else None,
        )


def _in_universe(shards: ShardSet, ids: SplitIds | None) -> np.ndarray | None:
    """[n] bool: which graphs the split may use (None: all of them)."""
    if ids is None or ids.universe is None:
        return None
    inside = np.zeros(len(shards), dtype=bool)
    inside[shards.indices_of(ids.universe, missing="skip")] = True
    return inside


def fold_of(shards: ShardSet, config: SplitConfig, repeat: int, ids: SplitIds | None = None) -> np.ndarray:
    """[n] the fold (0 … folds-1) of each graph in repeat ``repeat``: a seeded, balanced partition.

    Ranked by a stable hash of (split_seed, dataset, repeat, id), then dealt round-robin, so fold sizes
    differ by at most one and a structure's fold depends on the ids dealt alone (not on row order or graphs).
    With ``ids.universe`` only those ids are dealt (the same folds for every graph kind that has them all);
    the other graphs get -1 (in no fold, never trained on).
    """
    inside = _in_universe(shards, ids)
    if config.test == "matbench":
        return _matbench_fold_of(shards, ids, inside)
    members = np.arange(len(shards)) if inside is None else np.flatnonzero(inside)
    all_ids = shards.ids
    order = _hash_rank([all_ids[i] for i in members], config.split_seed, shards.name, "kfold", repeat)
    folds = np.full(len(shards), -1, dtype=np.int64)
    folds[members[order]] = np.arange(len(members)) % config.folds
    return folds


def _matbench_fold_of(shards: ShardSet, ids: SplitIds | None, inside: np.ndarray | None) -> np.ndarray:
    """[n] the official Matbench fold of each graph (-1: outside the universe). Every id of the task must be in
    the dataset (a graph or a rejected row): a partial local copy would not be the leaderboard's folds."""
    if ids is None or ids.matbench_folds is None:
        raise ConfigError(f"{shards.name}: a matbench split needs the official folds (resolve_split_ids)")
    have = set(shards.ids) | set(shards.rejected_ids)
    wanted = [i for f in ids.matbench_folds for i in f]
    missing = len(wanted) - len(have.intersection(wanted))
    if missing:
        raise ConfigError(
            f"{shards.name}: {missing:,} of the {len(wanted):,} structures of its Matbench task are not in the local "
            "data, so its folds would not be the leaderboard's; use test: kfold"
        )
    folds = np.full(len(shards), -1, dtype=np.int64)
    for k, members in enumerate(ids.matbench_folds):
        folds[shards.indices_of(list(members), missing="skip")] = k  # rejected rows have no graph to place
    if inside is not None:
        folds[~inside] = -1
    return folds


def resolve_split_ids(
    name: str, config: SplitConfig = SplitConfig(), *, home: str | os.PathLike[str] | None = None
) -> SplitIds:
    """Read what ``config`` needs of Devi et al.'s or Matbench's files for dataset ``name`` (nothing for seeded
    and kfold splits)."""
    if config.test == "matbench":
        return SplitIds(name, matbench_folds=tuple(tuple(f) for f in datasets.matbench_folds(name, data_home=home)))
    if config.test not in ("paper", "paper_or_seeded"):
        return SplitIds(name)  # seeded and kfold test sets come from the shards' ids
    try:
        test = datasets.devi_test_ids(name, data_home=home)
    except datasets.DatasetError:
        if config.test == "paper":
            raise
        if name not in _told_seeded:
            _told_seeded.add(name)
            log.info("%s: no Devi et al. test file; using the seeded test set", name)
        return SplitIds(name)
    subsets: dict[str, tuple[str, ...]] = {}
    if name in _devi_names():
        for trial in range(1, 6):
            for size in DEVI_SIZES:
                try:
                    subsets[f"{trial}:{size}"] = tuple(
                        datasets.devi_trial_ids(name, trial=trial, size=size, data_home=home)
                    )
                except datasets.DatasetNotFoundError:
                    continue
    return SplitIds(name, tuple(test), subsets)


def test_ids(shards: ShardSet, config: SplitConfig = SplitConfig(), ids: SplitIds | None = None) -> list[str]:
    """Ids of the fixed test set of ``shards``' dataset, some possibly without a graph (rejected rows)."""
    ids = ids if ids is not None else resolve_split_ids(shards.name, config)
    if ids.paper_test is not None:
        return list(ids.paper_test)
    # Drawn over every input row, graphs and rejected rows alike: the same test set for any graph settings.
    universe = shards.ids + shards.rejected_ids
    n_test = max(1, math.ceil(config.test_fraction * len(universe)))
    order = _hash_rank(universe, config.split_seed, shards.name, "test")
    return [universe[i] for i in order[:n_test]]


def test_indices(
    shards: ShardSet,
    config: SplitConfig = SplitConfig(),
    ids: SplitIds | None = None,
    *,
    fold: int | None = None,
    repeat: int | None = None,
) -> np.ndarray:
    """Positions in ``shards`` of the test set (ids without a graph are skipped); kfold: of (repeat, fold)."""
    if config.kfold:
        if fold is None or repeat is None:
            raise ConfigError("a kfold split needs fold and repeat")
        _check_fold(config, fold, repeat)
        return np.flatnonzero(fold_of(shards, config, repeat, ids) == fold)
    if fold is not None or repeat is not None:
        raise ConfigError(f"fold={fold}, repeat={repeat} given, but the split is {config.test!r}, not kfold")
    wanted = test_ids(shards, config, ids)
    idx = shards.indices_of(wanted, missing="skip")
    if len(idx) < len(wanted):
        log.info(
            "%s: %d of %d test ids have no graph (rejected rows)", shards.name, len(wanted) - len(idx), len(wanted)
        )
    inside = _in_universe(shards, ids)
    if inside is not None:  # ids another graph kind of the stage rejected are tested by none
        idx = idx[inside[idx]]
    return np.sort(idx)


def _check_fold(config: SplitConfig, fold: int, repeat: int) -> None:
    if not 0 <= fold < config.folds:
        raise ConfigError(f"fold={fold} must be between 0 and {config.folds - 1} (folds={config.folds})")
    if not 0 <= repeat < config.repeats:
        raise ConfigError(f"repeat={repeat} must be between 0 and {config.repeats - 1} (repeats={config.repeats})")


def training_pool(
    shards: ShardSet,
    config: SplitConfig = SplitConfig(),
    *,
    exclude_formulas: frozenset[str] | set[str] = frozenset(),
    ids: SplitIds | None = None,
    fold: int | None = None,
    repeat: int | None = None,
) -> np.ndarray:
    """Positions that training subsets are drawn from: outside the test set (fold) and the held-out formulas."""
    test = test_indices(shards, config, ids, fold=fold, repeat=repeat)
    in_test = np.zeros(len(shards), dtype=bool)
    in_test[test] = True
    pool = np.flatnonzero(~in_test)
    inside = _in_universe(shards, ids)
    if inside is not None:
        pool = pool[inside[pool]]
    if exclude_formulas:
        formulas = shards.formulas
        keep = np.asarray([formulas[i] not in exclude_formulas for i in pool], dtype=bool)
        pool = pool[keep]
    return pool


def make_split(
    shards: ShardSet,
    *,
    size: int | None,
    seed: int,
    config: SplitConfig = SplitConfig(),
    exclude_formulas: frozenset[str] | set[str] = frozenset(),
    ids: SplitIds | None = None,
    fold: int | None = None,
    repeat: int | None = None,
) -> Split:
    """Draw ``size`` training+validation structures (all if None) for ``seed``, outside the test set.

    ``ids``: the dataset's resolved split ids (trials pass them); None reads Devi et al.'s files here.
    ``fold``, ``repeat``: which fold is the test set, with a ``kfold`` split (required there).
    """
    ids_ = ids if ids is not None else resolve_split_ids(shards.name, config)
    test = test_indices(shards, config, ids_, fold=fold, repeat=repeat)
    pool = training_pool(shards, config, exclude_formulas=exclude_formulas, ids=ids_, fold=fold, repeat=repeat)
    if exclude_formulas:
        log.info("%s: %d structures left out of training (formula in a held-out test set)",
                 shards.name, len(shards) - len(test) - len(pool))  # fmt: skip

    ids = shards.ids
    paper_ids = _paper_subset(shards, size=size, seed=seed, config=config, ids=ids_)
    if paper_ids is not None:
        chosen = shards.indices_of(paper_ids, missing="skip")
        chosen = chosen[np.isin(chosen, pool)]
        if len(chosen) < len(paper_ids):
            log.warning(
                "%s: %d of Devi et al.'s %d-structure subset (trial %d) are out (no graph, or a held-out formula)",
                shards.name, len(paper_ids) - len(chosen), len(paper_ids), seed,
            )  # fmt: skip
        chosen = chosen[_hash_rank([ids[i] for i in chosen], seed, shards.name, "val")]
    else:
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 2):
            raise ConfigError(f"size={size!r} must be an integer >= 2 (training + validation)")
        if size is not None and size > len(pool):
            raise ConfigError(
                f"size={size} but {shards.name} has only {len(pool)} structures outside its test set"
                + (" and held-out formulas" if exclude_formulas else "")
            )
        drawn = pool[_hash_rank([ids[i] for i in pool], seed, shards.name, "subset")]
        chosen = drawn if size is None else drawn[:size]
    n_val = val_count(len(chosen), config)
    return Split(train=np.sort(chosen[n_val:]), val=np.sort(chosen[:n_val]), test=test)


def val_count(n: int, config: SplitConfig = SplitConfig()) -> int:
    """How many of ``n`` training + validation structures validate: ``val_fraction`` of them, raised to
    ``val_min`` where that stays within a fifth; at least 1, and at least 1 left to train (0 below 2 structures).

    Why a floor: the validation split picks the epoch (and Optuna's trial) by a mean over its structures, whose
    relative standard error is about 0.76/sqrt(n_val) for MAE of roughly normal errors: 24 % at 10 structures
    (10 % of an FT size of 100), 17 % at 20, 8.5 % at 80 (10 % of 800). At 10, epochs whose true errors
    differ by less than a quarter are ordered by chance, and R² over 10 values swings with a single outlier.
    Why a ceiling: every validation structure is one fewer to train on; a fifth is the share K-fold sweeps
    on 100-structure sets already use (quickstart: val_fraction 0.2), so small sets lose no more than that.
    """
    if n < 2:
        return 0
    share = round(config.val_fraction * n)
    return min(n - 1, max(1, share, min(config.val_min, n // 5)))


def _paper_subset(
    shards: ShardSet, *, size: int | None, seed: int, config: SplitConfig, ids: SplitIds
) -> tuple[str, ...] | None:
    """Devi et al.'s trial subset for (seed, size), when the split is theirs; else None (a seeded draw).

    Only with their test set: their subsets were drawn outside it, not outside a seeded one. A missing
    trial file is an error with ``paper`` and a seeded draw with ``paper_or_seeded`` (jarvis2d, for one,
    has no trial files).
    """
    if size not in DEVI_SIZES or not 1 <= seed <= 5 or shards.name not in _devi_names():
        return None
    if ids.paper_test is None:
        return None
    found = ids.paper_subsets.get(f"{seed}:{size}")
    if found is None:
        if config.test == "paper":
            prop = datasets.spec(shards.name).devi_prop
            raise datasets.DatasetNotFoundError(f"no Devi subset '{prop}_trial{seed}_{size}.json' for {shards.name!r}")
        log.info("%s: no Devi et al. subset for trial %d, size %d; a seeded draw instead", shards.name, seed, size)
    return found


def test_formulas(shards: ShardSet, config: SplitConfig = SplitConfig(), ids: SplitIds | None = None) -> set[str]:
    """Reduced formulas of ``shards``' test set (what ``holdout`` keeps out of other stages' training).

    With ``kfold`` every structure is tested (once per repeat): every formula of the dataset.
    """
    formulas = shards.formulas
    if config.kfold:
        return set(formulas)
    return {formulas[i] for i in test_indices(shards, config, ids)}
