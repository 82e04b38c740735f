"""The plan: stages → settings → trials, as pure functions of the sweep file (no Ray, no training).

A *setting* is what trials share but for Optuna's proposals (lr, n_unfrozen): a dataset (or a
multi-property set) × size × seed × strategy × starting point, or a scratch baseline. A *start* is one
source of weights for FT settings: the settings of an earlier stage that share a source key (dataset
and size, behind their own start and strategy), or one seed of them with ``select: every``. Each is a
typed record; nothing is parsed back out of a string key.

``validate`` checks, before anything runs (``--dry-run`` and the sweep's start), what a trial would
otherwise reject: ``n_unfrozen`` outside the model's blocks, a strategy the model lacks, sizes larger
than a dataset can give after its test split. ``check_sizes`` repeats the size check exactly (holdout
formulas included) once the driver has resolved a stage's shards.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ltc import datasets
from ltc.archs import ARCHS
from ltc.errors import ConfigError, LtcError
from ltc.graphs import GraphConfig
from ltc.inputs import RunInputs
from ltc.splits import SplitConfig
from ltc.sweep.spec import Arch, Range, StageSpec, SweepSpec, arch_config
from ltc.sweep.studies import JOURNAL_NAME

Kind = Literal["pretrain", "finetune", "scratch"]


@dataclass(frozen=True)
class Start:
    """Starting weights for FT settings: the best checkpoint of one source of an earlier stage, or a pretrained
    model by name.

    ``source_key``: the source settings' key (``agl:max800``; ``fe:all>agl:all[all]`` for one fine-tuned
    from fe with strategy all), or the pretrained name (``chgnet-0.3.0``); ``seed``: the source seed with
    ``select: every``, else None.
    """

    source_key: str
    datasets: tuple[str, ...]
    size: int | None
    seed: int | None = None
    checkpoint: str | None = None  # known once the source stage has run; a pretrained start: its name
    stage: str = ""  # the source stage (a stage may start from several); "" for a pretrained or given start
    arch: Arch | None = None  # the model and graphs the start's weights belong to (what FT from it trains)
    pretrained: bool = False  # source_key is a name in ltc.models.PRETRAINED, resolved by ltc.transfer.load_init
    given: bool = False  # a checkpoint the sweep file gives (``start_from: {checkpoint: …}``), not a stage's

    @property
    def fixed(self) -> bool:
        """Its checkpoint is known before the sweep runs (a pretrained name, a given file), not chosen from a stage."""
        return self.pretrained or self.given

    @property
    def label(self) -> str:
        """What results call this start (the ``lineage`` column)."""
        return self.source_key if self.seed is None else f"{self.source_key}:seed{self.seed}"


@dataclass(frozen=True)
class Setting:
    """Trials that differ only in what Optuna proposes (lr, n_unfrozen)."""

    key: str
    stage: str
    kind: Kind
    datasets: tuple[str, ...]
    size: int | None
    max_size: int | None
    seed: int
    strategy: str
    start: Start | None = None
    fold: int | None = None  # kfold stages: the test fold …
    repeat: int | None = None  # … of this repeat (seed = the stage's seed + repeat)
    arch: Arch | None = None  # what the setting trains: the stage's (PT), its start's (FT), its own (scratch)
    start_name: str | None = None  # results' ``start``: the start's label, ``scratch`` or ``scratch[<arch>]``

    @property
    def source_key(self) -> str:
        """What later stages select starting checkpoints by: dataset(s) and size, behind this setting's own
        start and strategy when it was fine-tuned (so two starts or strategies are never one source)."""
        base = _data_label(self.datasets, self.size, self.max_size)
        return base if self.start is None else f"{self.start.label}>{base}[{self.strategy}]"


def _size_label(size: int | None, max_size: int | None) -> str:
    return str(size) if size is not None else (f"max{max_size}" if max_size is not None else "all")


def _data_label(datasets_: tuple[str, ...], size: int | None, max_size: int | None) -> str:
    return f"{'+'.join(datasets_)}:{_size_label(size, max_size)}"


def later_datasets(spec: SweepSpec, stage: StageSpec) -> list[str]:
    """Datasets of the stages after ``stage``, whose test-set formulas ``holdout: auto`` keeps out of it.

    Pre-training on bg must not see the test compounds of fe when fe is fine-tuned later. A dataset the
    stage trains on itself is not in the list: its own split keeps its test set out (``holdout_splits``).
    """
    i = spec.stages.index(stage)
    out: list[str] = []
    for st in spec.stages[i + 1 :]:
        for g in st.dataset_sets:
            out.extend(d for d in g if d not in out)
    return out


def resolve_holdout(spec: SweepSpec, stage: StageSpec) -> list[str]:
    """The datasets whose test-set formulas ``stage`` keeps out of its training."""
    if stage.holdout == "auto":
        return later_datasets(spec, stage)
    if stage.holdout == "none":
        return []
    return list(stage.holdout)


def holdout_splits(spec: SweepSpec, stage: StageSpec) -> dict[str, SplitConfig]:
    """Each held-out dataset with the split its test set comes from: that of the first stage after ``stage``
    that trains on it (kfold there: every formula is a test formula), else the sweep's."""
    out = {}
    i = spec.stages.index(stage)
    own = {d for g in stage.dataset_sets for d in g}
    for name in resolve_holdout(spec, stage):
        if name in own:
            continue  # its own split keeps its test set (or fold) out; holding out its formulas would empty it
        later = [st for st in spec.stages[i + 1 :] if any(name in g for g in st.dataset_sets)]
        out[name] = spec.split_for(later[0]) if later else spec.split
    return out


def plan_starts(stage: StageSpec, settings: dict[str, list[Setting]]) -> list[Start]:
    """The starts of ``stage``: per source stage in ``start_from``, one per source key of that stage, or per
    (source key, seed) with ``select: every``. ``settings``: the earlier stages' settings by stage name."""
    from ltc.sweep.spec import given_checkpoints, pretrained_arch

    starts: dict[tuple[str, str, int | None], Start] = {}
    for src in stage.sources:
        if src.pretrained is not None:  # no source stage: its label and checkpoint are the name itself
            name = src.pretrained
            starts[("", name, None)] = Start(name, (), None, None, name, "", pretrained_arch(name), pretrained=True)
            continue
        if src.checkpoint is not None:  # a file (or each of a folder's): its label, its own architecture
            for g in given_checkpoints(src):
                starts[(f"checkpoint {len(starts)}", g.label, None)] = Start(
                    g.label, g.datasets, g.size, None, g.path, "", g.arch, given=True
                )
            continue
        assert src.stage is not None
        for s in settings[src.stage]:
            if s.kind == "scratch":
                continue  # baselines are not sources
            seed = s.seed if src.select == "every" else None
            twin = next(
                (
                    t
                    for (t, k, sd), st in starts.items()
                    if (k, sd) == (s.source_key, seed) and t != src.stage and st.stage
                ),
                None,
            )
            if twin is not None:  # one label (the setting keys' from=…) would name two different checkpoints
                raise ConfigError(
                    f"stage {stage.name!r}: start_from stages {twin!r} and {src.stage!r} both produce source "
                    f"{s.source_key!r}; start from one of them"
                )
            starts.setdefault(
                (src.stage, s.source_key, seed),
                Start(s.source_key, s.datasets, s.size or s.max_size, seed, stage=src.stage, arch=s.arch),
            )
    labels = [st.label for st in starts.values()]
    twice = next((label for label in labels if labels.count(label) > 1), None)
    if twice is not None:  # results and setting keys would mix two starts
        raise ConfigError(
            f"stage {stage.name!r}: two of its starts are called {twice!r}; give a checkpoint start a label"
        )
    return list(starts.values())


def units(spec: SweepSpec, stage: StageSpec) -> list[tuple[int, int | None, int | None]]:
    """(seed, fold, repeat) of each evaluation unit: the stage's seeds, or with kfold every (repeat, fold)."""
    split = spec.split_for(stage)
    if not split.kfold:
        return [(seed, None, None) for seed in stage.seeds]
    base = stage.seeds[0]
    return [(base + r, f, r) for r in range(split.repeats) for f in range(split.folds)]


def _unit_label(seed: int, fold: int | None, repeat: int | None) -> str:
    return f"seed{seed}" if fold is None else f"r{repeat}f{fold}"


def plan_stage(spec: SweepSpec, stage: StageSpec, starts: list[Start] | None) -> list[Setting]:
    """Settings of one stage; ``starts`` are its starting points (None for a stage from scratch)."""
    out: list[Setting] = []
    for group, (size, max_size), (seed, fold, repeat) in itertools.product(
        stage.dataset_sets, stage.size_options(), units(spec, stage)
    ):
        label, unit = _data_label(group, size, max_size), _unit_label(seed, fold, repeat)
        common = {"fold": fold, "repeat": repeat}
        if stage.start_from is None:
            key = f"{stage.name}|{label}|{unit}"
            arch = spec.arch_for(stage)
            out.append(Setting(key, stage.name, "pretrain", group, size, max_size, seed, "all", **common, arch=arch))
            continue
        for start, strategy in itertools.product(starts or [], stage.strategies):
            if not start.fixed and stage.source(start.stage).skip_seen and set(group) & set(start.datasets):
                continue
            key = f"{stage.name}|from={start.label}|{label}|{strategy}|{unit}"
            out.append(Setting(key, stage.name, "finetune", group, size, max_size, seed, strategy, start, **common,
                               arch=start.arch, start_name=start.label))  # fmt: skip
        if stage.scratch:
            for name, arch in scratch_names(spec, stage).items():
                key = f"{stage.name}|{name}|{label}|{unit}"
                out.append(Setting(key, stage.name, "scratch", group, size, max_size, seed, "all", **common,
                                   arch=arch, start_name=name))  # fmt: skip
    return out


def scratch_names(spec: SweepSpec, stage: StageSpec) -> dict[str, Arch]:
    """The scratch baselines of an FT stage: one per architecture among its starts, by name. One architecture:
    ``scratch`` (as every sweep before several architectures); several: ``scratch[<model>]`` each, so each start
    is compared with the scratch of its own architecture."""
    archs = spec.archs(stage)
    if len(archs) == 1:
        return {"scratch": archs[0]}
    labels = [a.label for a in archs]
    twice = [label for label in dict.fromkeys(labels) if labels.count(label) > 1]
    if twice:
        raise ConfigError(
            f"stage {stage.name!r}: its starts have two different {twice[0]} architectures (model_config or "
            "graph), so their scratch baselines would share a name; fine-tune them in separate stages"
        )
    return {f"scratch[{a.label}]": a for a in archs}


def plan(spec: SweepSpec) -> dict[str, list[Setting]]:
    """Every stage's settings, with placeholder starts (no checkpoints yet): what ``--dry-run`` shows."""
    settings: dict[str, list[Setting]] = {}
    for stage in spec.stages:
        starts = plan_starts(stage, settings) if stage.sources else None
        settings[stage.name] = plan_stage(spec, stage, starts)
    return settings


def n_blocks(spec: SweepSpec, arch: Arch | None = None) -> int:
    """Blocks of ``arch``'s model (default: the sweep's model)."""
    arch = arch or spec.arch_for(None)
    return ARCHS[arch.model].n_blocks(arch_config(arch.model, arch.config_json))


def graphs_of(spec: SweepSpec, stage: StageSpec) -> list[GraphConfig]:
    """The distinct graph configs ``stage`` trains on (one per architecture kind of graphs), in order."""
    return list(dict.fromkeys(a.graph for a in spec.archs(stage)))


def trial_config(
    spec: SweepSpec, stage: StageSpec, s: Setting, inputs: RunInputs | dict[GraphConfig, RunInputs]
) -> dict[str, Any]:
    """The config of every trial of setting ``s`` (before Optuna's values): names, numbers and paths only.

    ``inputs``: the stage's resolved inputs, per graph config when its architectures read several."""
    res = spec.resources_for(stage)
    arch = s.arch or spec.arch_for(stage if stage.start_from is None else None)
    if isinstance(inputs, dict):
        inputs = inputs[arch.graph]
    size = s.size or s.max_size
    batch = stage.batch_size_by_size.get(size, stage.batch_size) if size is not None else stage.batch_size
    return {
        "setting": s.key,
        "source_key": s.source_key,
        "stage": s.stage,
        "kind": s.kind,
        "datasets": list(s.datasets),
        "size": s.size,
        "max_size": s.max_size,
        "seed": s.seed,
        "strategy": s.strategy,
        "init": s.start.checkpoint if s.start else None,
        # a pretrained start was trained on its own data (CHGNet: MPtrj): its name stands for it
        "pt_datasets": (list(s.start.datasets) or [s.start.source_key]) if s.start else None,
        "pt_size": s.start.size if s.start else None,
        "lineage": s.start.label if s.start else None,
        "model": arch.model if s.kind != "finetune" else None,  # FT: the checkpoint's model
        "model_config": arch.model_config if s.kind != "finetune" else {},
        "graph": arch.graph.to_dict(),
        "arch": arch.label,
        "start": s.start_name,
        "n_blocks": n_blocks(spec, arch),  # Optuna's n_unfrozen range for strategy blocks
        "split": dataclasses.asdict(spec.split_for(stage)),
        "fold": s.fold,
        "repeat": s.repeat,
        "holdout": resolve_holdout(spec, stage),
        "transform": stage.transform,
        "inputs": inputs.subset(s.datasets).to_dict(),
        "train": {
            "epochs": stage.epochs,
            "batch_size": batch,
            "loss": stage.loss,
            "schedule": stage.schedule,
            "weight_decay": stage.weight_decay,
            "patience": stage.patience,
            "select_by": stage.select_by,
        },
        "checkpoint_every": stage.checkpoint_every,
        "checkpoint_seconds": stage.checkpoint_seconds,
        "report_seconds": stage.report_seconds,
        "threads": max(1, int(res.cpu)),
    }


def select_starts(planned: list[Start], tables: dict[str, Any]) -> list[Start]:
    """Attach to each planned start the checkpoint of its source's best completed trial (lowest ``val_score``,
    what picks trials: ``ltc.train.selection``; tables written before it have ``val_loss`` alone).

    ``tables``: the source stages' trials (``ltc.results`` columns) by stage name. A start without a
    completed trial is dropped, with a warning.
    """
    import logging

    out = []
    for start in planned:
        if start.fixed:  # a pretrained name (resolved inside the trial by ltc.transfer.load_init) or a given file
            out.append(start)
            continue
        table = tables[start.stage]
        key_col = "source_key" if "source_key" in table.columns else "group"  # results written before 0.2
        done = table[(table.status == "completed") & table.checkpoint.notna() & (table.kind != "scratch")]
        rows = done[done[key_col] == start.source_key]
        if start.seed is not None:
            rows = rows[rows.seed == start.seed]
        if rows.empty:
            logging.getLogger(__name__).warning(
                "no completed trial for source %s: settings starting from it are dropped", start.label
            )
            continue
        # rows written before val_score (a sweep resumed since) were picked by the loss
        score = rows.val_score.fillna(rows.val_loss) if "val_score" in rows else rows.val_loss
        best = rows.loc[score.astype(float).idxmin()]
        out.append(dataclasses.replace(start, checkpoint=best.checkpoint))
    return out


# --------------------------------------------------------------------------------------------------
# Checks before anything runs.


@dataclass(frozen=True)
class DatasetCount:
    """How many structures a dataset offers: rows, graphs (if its shards exist), and Devi et al.'s test size."""

    name: str
    n_rows: int
    n_graphs: int | None  # None: shards not built yet (rows - rejected is unknown)
    n_paper_test: int | None  # the size of Devi et al.'s test file, when the split uses it

    def available(self, split: SplitConfig) -> tuple[int, int]:
        """(an upper bound on what training subsets can draw from under ``split``, its test size)."""
        n = self.n_graphs if self.n_graphs is not None else self.n_rows
        if split.kfold:  # folds are dealt over graphs: the largest fold is the test set
            n_test = math.ceil(n / split.folds)
        elif self.n_paper_test is not None:
            n_test = self.n_paper_test
        else:  # the seeded test set is drawn over every input row
            n_test = max(1, math.ceil(split.test_fraction * self.n_rows))
        return n - n_test, n_test


def count_rows(file: datasets.DatasetFile, cache: Path) -> int:
    """The rows of a located data file, read once per content (parsing a large JSON file takes seconds) and
    remembered under ``cache/counts/``: a file that cannot be read is its one-line error, here."""
    return int(_table_facts(file, cache)["n_rows"])


def lowest_target(file: datasets.DatasetFile, cache: Path) -> float:
    """The smallest target of a located data file's good rows (raw units), remembered as ``count_rows``."""
    return float(_table_facts(file, cache)["y_min"])


def _table_facts(file: datasets.DatasetFile, cache: Path) -> dict[str, Any]:
    from ltc.io import write_json_atomic

    counted = cache / "counts" / f"{file.spec.name}-{file.fingerprint[:16]}.json"
    if counted.is_file():
        facts = json.loads(counted.read_text())
        if "y_min" in facts:  # a file counted before y_min was kept is read once more, below
            return facts
    raw = datasets.read(file)
    facts = {"dataset": file.spec.name, "fingerprint": file.fingerprint, "n_rows": raw.n_rows,
             "y_min": min((r.target for r in raw.records), default=math.inf)}  # fmt: skip
    write_json_atomic(counted, facts)
    return facts


def check_transform(i: int, stage: StageSpec, *, home: str | None, cache: str | None) -> None:
    """A log transform (log10(1 + y)) on a stage whose data holds a target <= -1 fails in every trial: refuse it
    now, naming the key, the dataset and its lowest target. Data not local yet is checked when its trials start."""
    from ltc.paths import cache_root, data_home
    from ltc.targets import LOG_NEEDS_ABOVE, takes_log

    if stage.transform is None or not takes_log(stage.transform):
        return
    home_path = data_home(home)
    for group in stage.dataset_sets:
        for name in group:
            try:
                file = datasets.locate(name, data_home=home_path, download=False)
            except datasets.DatasetNotFoundError:
                continue
            low = lowest_target(file, cache_root(cache, home=home_path))
            if low <= LOG_NEEDS_ABOVE:
                raise ConfigError(
                    f"stages[{i}].transform={stage.transform!r}: {name} has targets down to {low:g}, and log10(1 + y) "
                    f"needs y > {LOG_NEEDS_ABOVE:g}; use standardize or minmax"
                )


def dataset_count(
    name: str,
    spec: SweepSpec,
    split: SplitConfig,
    *,
    home: str | None = None,
    cache: str | None = None,
    graph: GraphConfig | None = None,
) -> DatasetCount:
    """Row counts from the shard manifest of ``graph`` (default: the sweep's graphs) when those shards exist, else
    from the data file (never builds)."""
    from ltc.paths import cache_root, data_home
    from ltc.shards import read_manifest, shard_key
    from ltc.splits import resolve_split_ids

    home_path = data_home(home)
    file = datasets.locate(name, data_home=home_path, download=False)
    key = shard_key(name, file.fingerprint, graph or spec.graph_config)
    folder = cache_root(cache, home=home_path) / "shards" / f"{name}-{key}"
    n_graphs = None
    try:
        manifest = read_manifest(folder)
        n_rows, n_graphs = int(manifest["n_input"]), int(manifest["n_graphs"])
    except LtcError:
        n_rows = count_rows(file, cache_root(cache, home=home_path))  # no shards yet
    ids = resolve_split_ids(name, split, home=home_path)
    return DatasetCount(name, n_rows, n_graphs, len(ids.paper_test) if ids.paper_test is not None else None)


def _search_key(spec: SweepSpec, i: int, field: str) -> str:
    stage = spec.stages[i]
    if stage.search is not None and getattr(stage.search, field) is not None:
        return f"stages[{i}].search.{field}"
    return f"search.{field}"


def validate(
    spec: SweepSpec, *, home: str | None = None, cache: str | None = None, counts: bool = True, local: bool = False
) -> None:  # fmt: skip
    """Raise ``ConfigError`` naming the key path and value of anything a trial would reject.

    (Strategies the model lacks and a bad ``model_config`` already fail when the file is loaded.)
    ``counts``: check sizes against row counts (reads manifests, or data files when shards are not built);
    a dataset with no local file yet (matminer downloads it when the stage is prepared) is checked exactly
    by ``check_sizes`` then. ``local``: the sweep runs on a Ray of this machine alone, so a trial's resources
    must fit it (on a cluster, nodes an autoscaler adds may have them).
    """
    with datasets.declare(spec.declared_datasets()):
        _validate(spec, home=home, cache=cache, counts=counts)
    if local and (beyond := beyond_this_machine(spec)):
        raise ConfigError(f"{beyond[0]}: its trials would never start; give --address to run on a cluster")


def beyond_this_machine(spec: SweepSpec) -> list[str]:
    """The stages whose CPUs or GPUs per trial this machine does not have, each as a line naming its key: on a
    Ray of this machine alone, their trials would wait forever."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    gpus = 0
    if any(spec.resources_for(stage).gpu > 0 for stage in spec.stages):
        import torch  # only to count GPUs: a CPU sweep's --dry-run never imports torch

        gpus = torch.cuda.device_count()
    out = []
    for i, stage in enumerate(spec.stages):
        res = spec.resources_for(stage)
        if res.cpu > cpus or res.gpu > gpus:
            key = f"stages[{i}].resources" if stage.resources else "resources"
            out.append(
                f"{key}: cpu={res.cpu:g}, gpu={res.gpu:g} per trial, and this machine has {cpus} CPUs, {gpus} GPUs"
            )
    return out


def _validate(spec: SweepSpec, *, home: str | None, cache: str | None, counts: bool) -> None:
    from ltc.paths import cache_root, data_home

    for name in spec.declared_datasets() if counts else ():  # each read once now: a missing path or column fails
        try:
            count_rows(datasets.locate(name, download=False), cache_root(cache, home=data_home(home)))
        except (datasets.DatasetError, ConfigError) as err:
            raise ConfigError(f"datasets.{name}: {err}") from None
    for i, stage in enumerate(spec.stages):
        search = spec.search_for(stage)
        fixed = search.n_unfrozen if isinstance(search.n_unfrozen, int) else None
        for arch in spec.archs(stage):  # each start's model
            blocks = n_blocks(spec, arch)
            if "blocks" in stage.strategies and fixed is not None and not 0 <= fixed <= blocks:
                raise ConfigError(
                    f"{_search_key(spec, i, 'n_unfrozen')}={fixed}: {arch.model} has {blocks} "
                    f"blocks, so n_unfrozen must be between 0 and {blocks}"
                )
        if stage.scratch:
            scratch_names(spec, stage)  # two archs of one model name cannot be told apart
        if counts:
            check_transform(i, stage, home=home, cache=cache)
    if not counts:
        return
    found: dict[tuple[str, SplitConfig, GraphConfig], DatasetCount | None] = {}
    for i, stage in enumerate(spec.stages):
        if stage.sizes is None:
            continue
        split = spec.split_for(stage)
        for group in stage.dataset_sets:
            for name in group:
                counts_ = []
                for graph in graphs_of(spec, stage):  # every graph kind of the stage: the tightest bound
                    if (name, split, graph) not in found:
                        try:
                            found[(name, split, graph)] = dataset_count(
                                name, spec, split, home=home, cache=cache, graph=graph
                            )
                        except datasets.DatasetNotFoundError:
                            found[(name, split, graph)] = None  # not local yet (a download at prepare time)
                    counts_.append(found[(name, split, graph)])
                if any(c is None for c in counts_):
                    continue
                c = min(counts_, key=lambda c: c.available(split)[0])  # type: ignore[union-attr]
                available, n_test = c.available(split)
                where = f"a test fold of {split.folds}" if split.kfold else "its test set"
                for k, size in enumerate(stage.sizes):
                    if size is not None and size > available:
                        raise ConfigError(
                            f"stages[{i}].sizes[{k}]={size}: {name} has at most {available} structures outside "
                            f"{where} ({c.n_rows} rows, {n_test} test)"
                        )


def check_sizes(
    spec: SweepSpec, stage: StageSpec, settings: list[Setting], inputs: RunInputs | dict[GraphConfig, RunInputs]
) -> None:
    """Exactly what ``validate`` bounds: every setting's size fits its dataset's pool (holdout included), for
    each graph kind's inputs."""
    if isinstance(inputs, dict):
        for one in inputs.values():
            check_sizes(spec, stage, settings, one)
        return
    from ltc.splits import DEVI_SIZES, training_pool

    i = spec.stages.index(stage)
    exclude = inputs.holdout_formulas()
    largest: dict[str, int] = {}
    for s in settings:
        if s.size is None:
            continue
        paper = spec.split_for(stage).test.startswith("paper") and s.size in DEVI_SIZES and 1 <= s.seed <= 5
        for name in s.datasets:
            if not paper:  # Devi et al.'s own subsets take what fits (and say so)
                largest[name] = max(largest.get(name, 0), s.size)
    split: SplitConfig = spec.split_for(stage)
    for name, size in largest.items():
        shards, ids = inputs.open_shards(name), inputs.split_ids(name)
        if split.kfold:  # the smallest training pool over the folds of every repeat
            pools = [
                training_pool(shards, split, exclude_formulas=exclude, ids=ids, fold=f, repeat=r)
                for r in range(split.repeats)
                for f in range(split.folds)
            ]
            pool = min(pools, key=len)
        else:
            pool = training_pool(shards, split, exclude_formulas=exclude, ids=ids)
        if size > len(pool):
            k = stage.sizes.index(size) if stage.sizes and size in stage.sizes else 0
            held = f" and the held-out formulas of {', '.join(inputs.holdout_datasets)}" if exclude else ""
            raise ConfigError(
                f"stages[{i}].sizes[{k}]={size}: {name} has only {len(pool)} structures outside its test set{held}"
            )


def _arch_text(spec: SweepSpec, arch: Arch) -> str:
    g = arch.graph
    overrides = f" {arch.config_json}" if arch.model_config else ""
    neighbours = "every neighbour" if g.construction == "chgnet" else f"{g.max_neighbors} neighbours"
    blocks = n_blocks(spec, arch)
    return f"{arch.model} ({blocks} blocks){overrides}; graphs {g.construction} {g.cutoff:g} Å, {neighbours}"


def describe(spec: SweepSpec) -> str:
    """The expanded plan, for ``--dry-run``."""
    settings = plan(spec)
    lines = [f"sweep {spec.name}: {spec.description}".rstrip(": ")]
    lines.append(f"model {_arch_text(spec, spec.arch_for(None))}; test split {spec.split.test}")
    total = 0
    for stage in spec.stages:
        search = spec.search_for(stage)
        res = spec.resources_for(stage)
        ss = settings[stage.name]
        n_trials = len(ss) * search.trials
        total += n_trials
        kinds = Counter(s.kind for s in ss)
        origin = (
            "from "
            + ", ".join(f"{src.stage} ({src.select})" if src.stage else f"pretrained {src.pretrained}"
                        if src.pretrained else f"checkpoint {src.name}" for src in stage.sources)
            if stage.sources
            else "from scratch"
        )  # fmt: skip
        lines.append("")
        lines.append(
            f"stage {stage.name} [{origin}]: {len(ss)} settings ({', '.join(f'{v} {k}' for k, v in kinds.items())}) "
            f"x {search.trials} trials = {n_trials} trials; {res.cpu:g} CPU + {res.gpu:g} GPU per trial"
        )
        sizes = ", ".join(_size_label(*o) for o in stage.size_options())
        split = spec.split_for(stage)
        if split.kfold:
            folds = f"Matbench v0.1's {split.folds} official" if split.test == "matbench" else f"{split.folds}-fold"
            lines.append(
                f"  test: {folds} cross-validation x {split.repeats} repeats (every structure tested once "
                f"per repeat; selection on an inner {split.val_fraction:.0%} of the training folds, at least "
                f"{split.val_min} up to a fifth)"
            )
        lines.append(
            f"  datasets {', '.join('+'.join(grp) for grp in stage.dataset_sets)}; sizes {sizes}; seeds {stage.seeds}; "
            f"strategies {stage.strategies}{' + scratch' if stage.scratch else ''}"
        )
        lr = f"{search.lr.low:g}..{search.lr.high:g} (log)" if isinstance(search.lr, Range) else f"{search.lr:g}"
        nu = "searched" if search.n_unfrozen == "search" else str(search.n_unfrozen)
        archs = spec.archs(stage)
        if archs != [spec.arch_for(None)]:
            lines.append(f"  model{'s' if len(archs) > 1 else ''} " + "; ".join(_arch_text(spec, a) for a in archs))
        blocks = "/".join(str(n_blocks(spec, a)) for a in archs)
        several = any(len(group) > 1 for group in stage.dataset_sets)  # ltc.train.selection's default
        kept = stage.select_by or ("the loss (several datasets)" if several else "the judging metric")
        lines.append(
            f"  epochs {stage.epochs}, batch {stage.batch_size}"
            + (f" {stage.batch_size_by_size}" if stage.batch_size_by_size else "")
            + f", loss {stage.loss}, kept by {kept}, targets {stage.transform or 'by dataset default'}"
            + f"; Optuna lr {lr}"
            + (f", n_unfrozen {nu} (0..{blocks})" if "blocks" in stage.strategies else "")
        )
        if stage.sources:
            starts = sorted({s.start.label for s in ss if s.start})
            lines.append(
                f"  starting checkpoints: {len(starts)} ({', '.join(starts[:6])}{', …' if len(starts) > 6 else ''})"
            )
        held = holdout_splits(spec, stage)
        if held:
            tested = [n for n, sp in held.items() if not sp.kfold]
            folded = [n for n, sp in held.items() if sp.kfold]
            parts = ([f"test-set formulas of {', '.join(tested)}"] if tested else []) + (
                [f"every formula of {', '.join(folded)} (k-folded later)"] if folded else []
            )
            lines.append(f"  held out of training: {'; '.join(parts)}")
        for s in ss[:4]:
            lines.append(f"    {s.key}")
        if len(ss) > 4:
            lines.append(f"    … {len(ss) - 4} more")
    lines.append("")
    lines.append(f"total: {sum(len(v) for v in settings.values())} settings, {total} trials")
    sampler = "random search" if spec.search.sampler == "random" else "hypercube start, then TPE above 4 trials"
    lines.append(f"Optuna per setting ({sampler}); studies in <results>/{spec.name}/{JOURNAL_NAME}")
    if spec.asha:
        lines.append(
            f"early stopping per setting (successive halving): grace {spec.asha.grace_epochs} epochs, "
            f"reduction factor {spec.asha.reduction_factor}"
        )
    return "\n".join(lines)
