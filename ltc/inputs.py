"""What one training run reads, resolved once: shard folders, split ids and held-out formulas, by path.

``resolve_inputs`` is the only place where a run's datasets meet the data home: it locates and
fingerprints the raw files, builds or verifies the shards (checksums, once), reads Devi et al.'s split
files and computes the formulas a stage must keep out of training. It writes the small pieces into the
shard cache, content-addressed (``<cache>/splits/``, ``<cache>/holdout/``), and returns ``RunInputs``:
paths only, small enough for a Ray Tune trial config. A trial opens ``RunInputs`` and nothing else; a
path that does not exist is an error that names it. The sweep driver resolves once per stage, and
``ltc train`` once before it trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ltc.errors import ConfigError, MissingFileError
from ltc.graphs import GraphConfig
from ltc.io import write_json_atomic
from ltc.paths import cache_root, data_home
from ltc.shards import ShardSet, prepare
from ltc.splits import SplitConfig, SplitIds, resolve_split_ids, test_formulas


@dataclass(frozen=True)
class RunInputs:
    """Paths a run opens: per dataset its shard folder and split-ids file; the held-out formula list."""

    shards: dict[str, str]
    splits: dict[str, str]
    holdout: str | None = None  # JSON list of reduced formulas; None: nothing held out
    holdout_datasets: tuple[str, ...] = field(default=())  # whose test formulas those are (for messages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shards": dict(self.shards),
            "splits": dict(self.splits),
            "holdout": self.holdout,
            "holdout_datasets": list(self.holdout_datasets),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunInputs:
        return cls(dict(d["shards"]), dict(d["splits"]), d.get("holdout"), tuple(d.get("holdout_datasets") or ()))

    def subset(self, names: tuple[str, ...] | list[str]) -> RunInputs:
        """The inputs of datasets ``names`` only (the holdout list is kept)."""
        missing = [n for n in names if n not in self.shards]
        if missing:
            raise ConfigError(f"no resolved inputs for dataset(s) {missing}")
        return RunInputs(
            {n: self.shards[n] for n in names}, {n: self.splits[n] for n in names}, self.holdout, self.holdout_datasets
        )

    def open_shards(self, name: str) -> ShardSet:
        path = self.shards.get(name)
        if path is None:
            raise ConfigError(f"no shard folder resolved for dataset {name!r}")
        if not Path(path).is_dir():
            raise MissingFileError(f"shard folder {path} (dataset {name}) does not exist on this node")
        return ShardSet(path)

    def split_ids(self, name: str) -> SplitIds:
        return SplitIds.from_dict(_read_json(self.splits[name], f"split ids of {name}"))

    def holdout_formulas(self) -> frozenset[str]:
        if self.holdout is None:
            return frozenset()
        return frozenset(_read_json(self.holdout, "held-out formulas"))


def _read_json(path: str, what: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"{what}: {path} does not exist on this node")
    return json.loads(p.read_text())


def _store(root: Path, kind: str, stem: str, obj: Any) -> str:
    """``obj`` as JSON at ``root/kind/<stem>-<content hash>.json`` (written once; same content, same file)."""
    blob = json.dumps(obj, sort_keys=True)
    path = root / kind / f"{stem}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"
    if not path.is_file():
        write_json_atomic(path, obj)
    return str(path)


def resolve_inputs(
    names: list[str] | tuple[str, ...],
    *,
    holdout: list[str] | tuple[str, ...] | dict[str, SplitConfig] = (),
    graph: GraphConfig,
    split: SplitConfig,
    home: str | os.PathLike[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    verify: bool = True,
    progress: bool = False,
    workers: int | None = None,
) -> RunInputs:
    """Build or verify the shards of ``names`` and ``holdout`` and write what a run needs (module docstring).

    ``holdout``: datasets whose test-set formulas are kept out of training, or a mapping of each to the
    split its test set comes from (default ``split``; kfold: all its formulas).
    """
    held_splits = dict(holdout) if isinstance(holdout, dict) else dict.fromkeys(holdout, split)
    home_path = data_home(home).resolve()
    root = cache_root(cache, home=home_path).resolve()
    shards: dict[str, str] = {}
    splits: dict[str, str] = {}
    opened: dict[str, ShardSet] = {}
    ids: dict[str, SplitIds] = {}
    for name in dict.fromkeys([*names, *held_splits]):
        res = prepare(name, graph=graph, home=home_path, cache=root, progress=progress, workers=workers, verify=verify)
        opened[name] = ShardSet(res.path)
        ids[name] = resolve_split_ids(name, split if name in names else held_splits[name], home=home_path)
        shards[name] = str(res.path)
        splits[name] = _store(root, "splits", name, ids[name].to_dict())
    held = None
    if held_splits:
        formulas: set[str] = set()
        for name, held_split in held_splits.items():
            formulas |= test_formulas(opened[name], held_split, ids[name])
        held = _store(root, "holdout", "-".join(sorted(held_splits))[:60], sorted(formulas))
    return RunInputs(shards, splits, held, tuple(held_splits)).subset(list(dict.fromkeys([*names])))


def resolve_inputs_by_graph(
    names: list[str] | tuple[str, ...],
    *,
    graphs: Sequence[GraphConfig],
    holdout: list[str] | tuple[str, ...] | dict[str, SplitConfig] = (),
    split: SplitConfig,
    home: str | os.PathLike[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    verify: bool = True,
    progress: bool = False,
) -> dict[GraphConfig, RunInputs]:
    """``resolve_inputs`` once per graph config of a stage that trains several architectures, kept paired.

    Two graph kinds of one dataset can reject different structures (chgnet's: an atom alone within 6 Å, Z > 94),
    and folds and test sets are dealt over a shard set's own graphs. So with several graph kinds each dataset's
    split ids get the ids every kind has (``SplitIds.universe``): folds, seeded test sets and training subsets
    are then the same structures for every kind, and a structure one kind rejected is used by none. The
    held-out formulas are the union over the kinds. With one graph config this is ``resolve_inputs``.
    """
    graphs = list(dict.fromkeys(graphs))
    home_path = data_home(home).resolve()
    root = cache_root(cache, home=home_path).resolve()
    common = {"holdout": holdout, "split": split, "home": home_path, "cache": root, "verify": verify}
    out = {g: resolve_inputs(names, graph=g, progress=progress, **common) for g in graphs}  # type: ignore[arg-type]
    if len(out) < 2:
        return out
    universe = {
        name: sorted(set.intersection(*(set(inputs.open_shards(name).ids) for inputs in out.values())))
        for name in names
    }
    held = None
    first = next(iter(out.values()))
    if first.holdout is not None:
        formulas = set().union(*(inputs.holdout_formulas() for inputs in out.values()))
        held = _store(root, "holdout", "-".join(sorted(first.holdout_datasets))[:60], sorted(formulas))
    aligned = {}
    for graph, inputs in out.items():
        splits = {}
        for name in names:
            ids = dataclasses.replace(inputs.split_ids(name), universe=tuple(universe[name]))
            splits[name] = _store(root, "splits", name, ids.to_dict())
        aligned[graph] = RunInputs(dict(inputs.shards), splits, held, inputs.holdout_datasets)
    return aligned
