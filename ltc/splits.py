"""Train / validation / test splits over a shard set.

- Test: a fixed set per dataset, never seen in PT or FT. ``seeded``: the ``test_fraction`` of the
  dataset's input rows that rank first by a hash of (``split_seed``, dataset, id), so it depends neither
  on row order nor on graph settings; ``paper``: Devi et al.'s own test file.
- Training subsets: ``size`` structures drawn per ``seed`` from what is left (or, with ``paper``, Devi
  et al.'s trial file for trial = seed and that size), then split 90/10 into train and validation.
- ``exclude_formulas`` keeps structures of other datasets' test sets out of training (leakage through
  the same compound in a PT set).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import numpy as np

from ltc import datasets
from ltc.shards import ShardSet

log = logging.getLogger(__name__)

DEVI_SIZES = (10, 100, 200, 500, 800)
_told_seeded: set[str] = set()  # datasets already reported as falling back to a seeded test set


@dataclass(frozen=True)
class SplitConfig:
    test: str = "seeded"  # seeded | paper | paper_or_seeded (paper where Devi's file exists)
    test_fraction: float = 0.1
    split_seed: int = 0  # fixes the seeded test set; trials vary ``seed``, not this
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.test not in ("seeded", "paper", "paper_or_seeded"):
            raise ValueError(f"test={self.test!r} must be 'seeded', 'paper' or 'paper_or_seeded'")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction={self.test_fraction!r} must be between 0 and 1")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction!r} must be between 0 and 1")


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


def uses_paper_test(shards: ShardSet, config: SplitConfig) -> bool:
    """Whether ``shards``' test set is Devi et al.'s file (``paper``; ``paper_or_seeded`` where it exists)."""
    if config.test == "seeded":
        return False
    try:
        datasets.devi_test_ids(shards.name)
    except datasets.DatasetError:
        if config.test == "paper":
            raise
        if shards.name not in _told_seeded:
            _told_seeded.add(shards.name)
            log.info("%s: no Devi et al. test file; using the seeded test set", shards.name)
        return False
    return True


def test_ids(shards: ShardSet, config: SplitConfig = SplitConfig()) -> list[str]:
    """Ids of the fixed test set of ``shards``' dataset, some possibly without a graph (rejected rows)."""
    if uses_paper_test(shards, config):
        return datasets.devi_test_ids(shards.name)
    # Drawn over every input row, graphs and rejected rows alike: the same test set for any graph settings.
    universe = shards.ids + shards.rejected_ids
    n_test = max(1, math.ceil(config.test_fraction * len(universe)))
    order = _hash_rank(universe, config.split_seed, shards.name, "test")
    return [universe[i] for i in order[:n_test]]


def test_indices(shards: ShardSet, config: SplitConfig = SplitConfig()) -> np.ndarray:
    """Positions in ``shards`` of the fixed test set (ids without a graph are skipped)."""
    wanted = test_ids(shards, config)
    idx = shards.indices_of(wanted, missing="skip")
    if len(idx) < len(wanted):
        log.info(
            "%s: %d of %d test ids have no graph (rejected rows)", shards.name, len(wanted) - len(idx), len(wanted)
        )
    return np.sort(idx)


def make_split(
    shards: ShardSet,
    *,
    size: int | None,
    seed: int,
    config: SplitConfig = SplitConfig(),
    exclude_formulas: frozenset[str] | set[str] = frozenset(),
) -> Split:
    """Draw ``size`` training+validation structures (all if None) for ``seed``, outside the test set."""
    test = test_indices(shards, config)
    in_test = np.zeros(len(shards), dtype=bool)
    in_test[test] = True
    pool = np.flatnonzero(~in_test)
    if exclude_formulas:
        formulas = shards.formulas
        keep = np.asarray([formulas[i] not in exclude_formulas for i in pool], dtype=bool)
        if (~keep).any():
            log.info(
                "%s: %d structures left out of training (formula in a held-out test set)",
                shards.name,
                int((~keep).sum()),
            )
        pool = pool[keep]

    ids = shards.ids
    paper_ids = _paper_subset(shards, size=size, seed=seed, config=config)
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
            raise ValueError(f"size={size!r} must be an integer >= 2 (training + validation)")
        if size is not None and size > len(pool):
            raise ValueError(
                f"size={size} but {shards.name} has only {len(pool)} structures outside its test set"
                + (" and held-out formulas" if exclude_formulas else "")
            )
        drawn = pool[_hash_rank([ids[i] for i in pool], seed, shards.name, "subset")]
        chosen = drawn if size is None else drawn[:size]
    n_val = max(1, round(config.val_fraction * len(chosen))) if len(chosen) >= 2 else 0
    return Split(train=np.sort(chosen[n_val:]), val=np.sort(chosen[:n_val]), test=test)


def _paper_subset(shards: ShardSet, *, size: int | None, seed: int, config: SplitConfig) -> list[str] | None:
    """Devi et al.'s trial subset for (seed, size), when the split is theirs; else None (a seeded draw).

    Only with their test set: their subsets were drawn outside it, not outside a seeded one. A missing
    trial file is an error with ``paper`` and a seeded draw with ``paper_or_seeded`` (jarvis2d, for one,
    has no trial files).
    """
    if size not in DEVI_SIZES or not 1 <= seed <= 5 or shards.name not in _devi_names():
        return None
    if not uses_paper_test(shards, config):
        return None
    try:
        return datasets.devi_trial_ids(shards.name, trial=seed, size=size)
    except datasets.DatasetNotFoundError:
        if config.test == "paper":
            raise
        log.info("%s: no Devi et al. subset for trial %d, size %d; a seeded draw instead", shards.name, seed, size)
        return None


def holdout_formulas(
    names: list[str] | tuple[str, ...], config: SplitConfig = SplitConfig(), **open_kwargs
) -> frozenset[str]:
    """Reduced formulas in the test sets of datasets ``names`` (to keep them out of other stages' training)."""
    out: set[str] = set()
    for name in names:
        shards = ShardSet.open(name, **open_kwargs)
        formulas = shards.formulas
        out.update(formulas[i] for i in test_indices(shards, config))
    return frozenset(out)
