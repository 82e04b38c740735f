"""Sweeps: a YAML file → stages of PT / FT trials → one Ray Tune ``Tuner`` per stage → trials.parquet.

Design (see README "Sweeps"): a stage expands into *settings* (datasets × sizes × seeds × strategies ×
starting checkpoints, plus scratch baselines). Inside each setting, Optuna (TPE, one study per setting)
proposes ``lr`` and, for strategy ``blocks``, ``n_unfrozen``: ``SettingSearch`` is a Ray Tune
``Searcher`` that hands out each setting's trials round-robin, so all settings progress in parallel in
one Tuner. ASHA stops weak trials early, comparing a trial only with trials of its own setting
(``PerSettingASHA``): validation losses of different datasets are not comparable.

Stages run in order. A finished stage leaves ``stages/<stage>.parquet``; FT stages start from the
best (or every) checkpoint of an earlier stage. ``--resume`` skips finished stages and restores the
running one with ``Tuner.restore`` (finished trials are kept, unfinished ones continue from their
last checkpoint).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import pickle
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import Searcher

from ltc import datasets
from ltc.config import load_yaml
from ltc.graphs import GraphConfig
from ltc.splits import SplitConfig
from ltc.trial import COMPLETED

log = logging.getLogger(__name__)

METRIC, MODE = "val_loss", "min"
STRATEGY_NAMES = ("all", "blocks", "last_layer", "new_head", "two_body", "three_body")


# --------------------------------------------------------------------------------------------------
# The sweep file.


@dataclass(frozen=True)
class Range:
    """A log-uniform range."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high:
            raise ValueError(f"range low={self.low}, high={self.high}: need 0 < low < high")


@dataclass(frozen=True)
class SearchSpec:
    """What Optuna searches inside each setting."""

    trials: int = 4  # Optuna trials per setting
    lr: float | Range = Range(1e-4, 1e-2)  # a number fixes it
    n_unfrozen: int | Literal["search"] = "search"  # strategy ``blocks``: 0 … n_blocks, or fixed
    sampler_seed: int = 0

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"trials={self.trials} must be >= 1")
        if isinstance(self.lr, float) and not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")


def _override(base, changes):
    """``base`` with the fields of ``changes`` that are not None (shallow: nested values kept as they are)."""
    given = {f.name: getattr(changes, f.name) for f in dataclasses.fields(changes)}
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True)
class SearchOverride:
    """A stage's changes to the sweep's ``search``: only the keys given (the rest is inherited)."""

    trials: int | None = None
    lr: float | Range | None = None
    n_unfrozen: int | Literal["search"] | None = None
    sampler_seed: int | None = None

    def over(self, base: SearchSpec) -> SearchSpec:
        return _override(base, self)


@dataclass(frozen=True)
class AshaSpec:
    grace_epochs: int = 5  # no trial is stopped before this many epochs
    reduction_factor: float = 3.0

    def __post_init__(self) -> None:
        if self.grace_epochs < 1 or self.reduction_factor <= 1:
            raise ValueError("asha needs grace_epochs >= 1 and reduction_factor > 1")


@dataclass(frozen=True)
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0  # a fraction (0.25, 0.5) packs several trials on one GPU

    def __post_init__(self) -> None:
        if self.cpu <= 0 or self.gpu < 0:
            raise ValueError(f"resources cpu={self.cpu}, gpu={self.gpu}: need cpu > 0 and gpu >= 0")
        if self.gpu > 1 and self.gpu != int(self.gpu):
            raise ValueError(f"gpu={self.gpu}: above 1 it must be a whole number")


@dataclass(frozen=True)
class ResourcesOverride:
    """A stage's changes to the sweep's ``resources`` (keys not given are inherited)."""

    cpu: float | None = None
    gpu: float | None = None

    def over(self, base: Resources) -> Resources:
        return _override(base, self)


@dataclass(frozen=True)
class Source:
    """Where a stage's starting weights come from: checkpoints of an earlier stage."""

    stage: str
    select: Literal["best", "every"] = "best"  # best per source dataset+size, or best per source setting (seed)
    skip_seen: bool = False  # no FT on a dataset the source trained on (Devi's 7×6 pairs, MPT leave-one-out)


@dataclass(frozen=True)
class StageSpec:
    name: str
    datasets: list[str | list[str]]  # an inner list is one multi-property group (one head each)
    start_from: Source | None = None  # None: from scratch (pre-training)
    sizes: list[int | None] | None = None  # exact train+val sizes (FT); null = all
    max_sizes: list[int] | None = None  # caps (PT size scans)
    seeds: list[int] = field(default_factory=lambda: [0])
    strategies: list[str] = field(default_factory=lambda: ["all"])
    scratch: bool = False  # add a from-scratch baseline per (dataset, size, seed)
    epochs: int = 100
    batch_size: int = 64
    batch_size_by_size: dict[int, int] = field(default_factory=dict)  # Devi: {100: 2, 10: 1}
    loss: Literal["mse", "l1"] = "mse"
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    weight_decay: float = 1e-5
    patience: int | None = None
    holdout: Literal["auto", "none"] | list[str] = "auto"  # auto: test sets of later stages' datasets
    search: SearchOverride | None = None  # keys given here override the sweep's search
    resources: ResourcesOverride | None = None  # keys given here override the sweep's resources
    checkpoint_every: int = 5  # epochs between trial checkpoints (resume after a worker dies) …
    checkpoint_seconds: float = 300.0  # … and at least this long between them
    report_seconds: float = 2.0  # at least this long between epoch reports to Tune (ASHA, Optuna)

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError(f"stage {self.name!r} has no datasets")
        for group in self.groups:
            for name in group:
                datasets.spec(name)
        if self.sizes is not None and self.max_sizes is not None:
            raise ValueError(f"stage {self.name!r}: give sizes or max_sizes, not both")
        for s in self.strategies:
            if s not in STRATEGY_NAMES:
                raise ValueError(f"stage {self.name!r}: strategy {s!r} must be one of {STRATEGY_NAMES}")
        if self.start_from is None and self.strategies != ["all"]:
            raise ValueError(f"stage {self.name!r}: strategies need start_from (a stage to fine-tune from)")
        if self.start_from is None and self.scratch:
            raise ValueError(f"stage {self.name!r}: scratch baselines belong to fine-tuning stages (start_from)")
        if self.epochs < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError(f"stage {self.name!r}: epochs, batch_size and checkpoint_every must be >= 1")
        if not self.seeds:
            raise ValueError(f"stage {self.name!r} has no seeds")

    @property
    def groups(self) -> list[tuple[str, ...]]:
        return [tuple(g) if isinstance(g, list) else (g,) for g in self.datasets]

    def size_options(self) -> list[tuple[int | None, int | None]]:
        """(size, max_size) pairs to expand over."""
        if self.sizes is not None:
            return [(s, None) for s in self.sizes]
        if self.max_sizes is not None:
            return [(None, m) for m in self.max_sizes]
        return [(None, None)]


@dataclass(frozen=True)
class SweepSpec:
    name: str
    stages: list[StageSpec]
    description: str = ""
    model: Literal["cgcnn", "megnet", "alignn"] = "cgcnn"
    model_config: dict[str, Any] = field(default_factory=dict)
    graph: GraphConfig | None = None  # default: the model's usual graphs
    split: SplitConfig = SplitConfig()
    search: SearchSpec = SearchSpec()
    asha: AshaSpec | None = AshaSpec()  # null: no early stopping
    resources: Resources = Resources()
    storage: str | None = None  # Ray storage (checkpoints): a folder, s3://… or gs://…; default results/<name>/ray
    max_failures: int = 2  # retries of a trial whose worker died, from its last checkpoint

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        if not self.stages:
            raise ValueError("a sweep needs at least one stage")
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique: {names}")
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ValueError(f"name={self.name!r} must be non-empty, without spaces or slashes")
        for i, st in enumerate(self.stages):
            if st.start_from is not None and st.start_from.stage not in names[:i]:
                raise ValueError(
                    f"stage {st.name!r} starts from {st.start_from.stage!r}, which is not an earlier stage"
                )
            if "three_body" in st.strategies and self.model != "alignn":
                raise ValueError(
                    f"stage {st.name!r}: three_body needs model alignn (no bond-angle updates in {self.model})"
                )
        from ltc.models import build_model

        build_model(self.model, self.model_config)  # a bad model_config fails here, not in a trial

    def search_for(self, stage: StageSpec) -> SearchSpec:
        """The stage's search: the sweep's, with the stage's overrides."""
        return stage.search.over(self.search) if stage.search else self.search

    def resources_for(self, stage: StageSpec) -> Resources:
        return stage.resources.over(self.resources) if stage.resources else self.resources

    @property
    def graph_config(self) -> GraphConfig:
        from ltc.train import DEFAULT_GRAPHS

        return self.graph or DEFAULT_GRAPHS[self.model]


def load_sweep(path: str | os.PathLike[str]) -> SweepSpec:
    """Read and check a sweep file (unknown keys, wrong types and bad references are errors)."""
    return load_yaml(SweepSpec, path)


# --------------------------------------------------------------------------------------------------
# The plan: stages → settings.


@dataclass(frozen=True)
class Start:
    """A starting checkpoint for FT settings: one source group of an earlier stage.

    ``group`` is the source's whole chain: ``agl:max800`` for a PT source, ``fe:all>agl:all[all]`` for
    one fine-tuned from fe with strategy all, with ``:seed1`` appended when every seed is a source.
    """

    group: str
    datasets: tuple[str, ...]
    size: int | None
    checkpoint: str | None = None  # known once the source stage has run

    @property
    def lineage(self) -> str:
        return self.group


@dataclass(frozen=True)
class Setting:
    """Trials that differ only in what Optuna proposes (lr, n_unfrozen)."""

    key: str
    stage: str
    kind: str  # pretrain | finetune | scratch
    datasets: tuple[str, ...]
    size: int | None
    max_size: int | None
    seed: int
    strategy: str
    start: Start | None = None


def _size_label(size: int | None, max_size: int | None) -> str:
    return str(size) if size is not None else (f"max{max_size}" if max_size is not None else "all")


def _group_label(datasets_: tuple[str, ...], size: int | None, max_size: int | None) -> str:
    return f"{'+'.join(datasets_)}:{_size_label(size, max_size)}"


def source_key(s: Setting) -> str:
    """What later stages select starting checkpoints by: dataset(s) and size, behind the setting's own
    start and strategy when it was fine-tuned (so two starts or strategies are never one source)."""
    base = _group_label(s.datasets, s.size, s.max_size)
    return base if s.start is None else f"{s.start.lineage}>{base}[{s.strategy}]"


def later_datasets(spec: SweepSpec, stage: StageSpec) -> list[str]:
    """Datasets of the stages after ``stage``, whose test-set formulas ``holdout: auto`` keeps out of it.

    A stage's own datasets count too: pre-training on bg must not see fe's test compounds when fe is
    fine-tuned later, and bg's own test set is out of its training anyway (holding its formulas out as
    well only drops same-formula polymorphs).
    """
    i = spec.stages.index(stage)
    out: list[str] = []
    for st in spec.stages[i + 1 :]:
        for g in st.groups:
            out.extend(d for d in g if d not in out)
    return out


def plan_starts(spec: SweepSpec, stage: StageSpec, source_settings: list[Setting]) -> list[Start]:
    """The source groups of ``stage``: one per (datasets, size) of the source stage, or per seed too."""
    assert stage.start_from is not None
    starts: dict[str, Start] = {}
    for s in source_settings:
        if s.kind == "scratch":
            continue  # baselines are not sources
        group = source_key(s) + (f":seed{s.seed}" if stage.start_from.select == "every" else "")
        starts.setdefault(group, Start(group, s.datasets, s.size or s.max_size))
    return list(starts.values())


def plan_stage(spec: SweepSpec, stage: StageSpec, starts: list[Start] | None) -> list[Setting]:
    """Settings of one stage; ``starts`` are its source groups (None for a stage from scratch)."""
    out: list[Setting] = []
    for group, (size, max_size), seed in itertools.product(stage.groups, stage.size_options(), stage.seeds):
        label = _group_label(group, size, max_size)
        if stage.start_from is None:
            out.append(
                Setting(f"{stage.name}|{label}|seed{seed}", stage.name, "pretrain", group, size, max_size, seed, "all")
            )
            continue
        for start, strategy in itertools.product(starts or [], stage.strategies):
            if stage.start_from.skip_seen and set(group) & set(start.datasets):
                continue
            key = f"{stage.name}|from={start.group}|{label}|{strategy}|seed{seed}"
            out.append(Setting(key, stage.name, "finetune", group, size, max_size, seed, strategy, start))
        if stage.scratch:
            key = f"{stage.name}|scratch|{label}|seed{seed}"
            out.append(Setting(key, stage.name, "scratch", group, size, max_size, seed, "all"))
    return out


def plan(spec: SweepSpec) -> dict[str, list[Setting]]:
    """Every stage's settings, with placeholder starts (no checkpoints yet): what ``--dry-run`` shows."""
    settings: dict[str, list[Setting]] = {}
    for stage in spec.stages:
        starts = plan_starts(spec, stage, settings[stage.start_from.stage]) if stage.start_from else None
        settings[stage.name] = plan_stage(spec, stage, starts)
    return settings


def n_blocks(spec: SweepSpec) -> int:
    return _n_blocks(spec.model, json.dumps(spec.model_config, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _n_blocks(model: str, config_json: str) -> int:
    from ltc.models import build_model

    return build_model(model, json.loads(config_json)).n_blocks


def describe(spec: SweepSpec) -> str:
    """The expanded plan, for ``--dry-run``."""
    settings = plan(spec)
    lines = [f"sweep {spec.name}: {spec.description}".rstrip(": ")]
    g = spec.graph_config
    overrides = f" {json.dumps(spec.model_config)}" if spec.model_config else ""
    lines.append(
        f"model {spec.model} ({n_blocks(spec)} blocks){overrides}; "
        f"graphs {g.cutoff:g} Å, {g.max_neighbors} neighbours; test split {spec.split.test}"
    )
    total = 0
    for stage in spec.stages:
        search = spec.search_for(stage)
        res = spec.resources_for(stage)
        ss = settings[stage.name]
        n_trials = len(ss) * search.trials
        total += n_trials
        kinds = Counter(s.kind for s in ss)
        origin = f"from {stage.start_from.stage} ({stage.start_from.select})" if stage.start_from else "from scratch"
        lines.append("")
        lines.append(
            f"stage {stage.name} [{origin}]: {len(ss)} settings ({', '.join(f'{v} {k}' for k, v in kinds.items())}) "
            f"x {search.trials} trials = {n_trials} trials; {res.cpu:g} CPU + {res.gpu:g} GPU per trial"
        )
        sizes = ", ".join(_size_label(*o) for o in stage.size_options())
        lines.append(
            f"  datasets {', '.join('+'.join(grp) for grp in stage.groups)}; sizes {sizes}; seeds {stage.seeds}; "
            f"strategies {stage.strategies}{' + scratch' if stage.scratch else ''}"
        )
        lr = f"{search.lr.low:g}..{search.lr.high:g} (log)" if isinstance(search.lr, Range) else f"{search.lr:g}"
        nu = "searched" if search.n_unfrozen == "search" else str(search.n_unfrozen)
        lines.append(
            f"  epochs {stage.epochs}, batch {stage.batch_size}"
            + (f" {stage.batch_size_by_size}" if stage.batch_size_by_size else "")
            + f", loss {stage.loss}; Optuna lr {lr}"
            + (f", n_unfrozen {nu} (0..{n_blocks(spec)})" if "blocks" in stage.strategies else "")
        )
        if stage.start_from:
            starts = sorted({s.start.lineage for s in ss if s.start})
            lines.append(
                f"  starting checkpoints: {len(starts)} ({', '.join(starts[:6])}{', …' if len(starts) > 6 else ''})"
            )
        holdout = resolve_holdout(spec, stage)
        if holdout:
            lines.append(f"  held out of training: test-set formulas of {', '.join(holdout)}")
        for s in ss[:4]:
            lines.append(f"    {s.key}")
        if len(ss) > 4:
            lines.append(f"    … {len(ss) - 4} more")
    lines.append("")
    lines.append(f"total: {sum(len(v) for v in settings.values())} settings, {total} trials")
    if spec.asha:
        lines.append(
            f"ASHA per setting: grace {spec.asha.grace_epochs} epochs, reduction factor {spec.asha.reduction_factor:g}"
        )
    return "\n".join(lines)


SMOKE_MODELS: dict[str, dict[str, Any]] = {
    "cgcnn": {"hidden": 16, "n_blocks": 2, "fc_dim": 16},
    "megnet": {"n_blocks": 2, "dense": [32, 16], "conv": [32, 16], "output": [16, 8]},
    "alignn": {"hidden": 16, "embedding": 8, "alignn_layers": 1, "gcn_layers": 1},
}
SMOKE_SIZE = 64


def smoke(spec: SweepSpec) -> SweepSpec:
    """A scaled-down copy of ``spec`` that checks it end to end in minutes on a CPU.

    Per stage: the first dataset group that has a starting checkpoint, the first size (at most 64
    structures), seed and strategy (scratch baselines kept); 1 trial, 2 epochs, no ASHA; a small model.
    """
    kept: dict[str, set[str]] = {}
    stages = []
    for st in spec.stages:
        groups = st.groups
        if st.start_from is not None and st.start_from.skip_seen:
            seen = kept[st.start_from.stage]
            groups = [g for g in groups if not set(g) & seen] or groups
        group = groups[0]
        kept[st.name] = set(group)
        size, max_size = st.size_options()[0]
        if st.sizes is not None:  # exact sizes stay exact (null, all, becomes the smoke size)
            sizes, max_sizes = [min(size or SMOKE_SIZE, SMOKE_SIZE)], None
        else:
            sizes, max_sizes = None, [min(max_size or SMOKE_SIZE, SMOKE_SIZE)]
        stages.append(
            dataclasses.replace(
                st,
                datasets=[list(group) if len(group) > 1 else group[0]],
                sizes=sizes,
                max_sizes=max_sizes,
                seeds=st.seeds[:1],
                strategies=st.strategies[:1],
                epochs=2,
                batch_size=min(st.batch_size, 16),
                batch_size_by_size={},
                patience=None,
                checkpoint_every=1,
                checkpoint_seconds=0.0,
                report_seconds=0.0,
                search=dataclasses.replace(st.search or SearchOverride(), trials=1),
                resources=None,
            )
        )
    head_keys = {"head_hidden", "head_activation"}
    model_config = {**SMOKE_MODELS[spec.model], **{k: v for k, v in spec.model_config.items() if k in head_keys}}
    return dataclasses.replace(
        spec,
        name=f"{spec.name}-smoke",
        stages=stages,
        model_config=model_config,
        search=dataclasses.replace(spec.search, trials=1),
        asha=None,
        resources=Resources(cpu=1.0, gpu=0.0),
        storage=None,
    )


def resolve_holdout(spec: SweepSpec, stage: StageSpec) -> list[str]:
    if stage.holdout == "auto":
        return later_datasets(spec, stage)
    if stage.holdout == "none":
        return []
    return list(stage.holdout)


# --------------------------------------------------------------------------------------------------
# Optuna inside each setting, as one Ray Tune searcher.


class SettingSearch(Searcher):
    """One Optuna TPE study per setting; ``suggest`` serves the setting with the fewest trials so far.

    Each suggestion is ``base_config[setting] | {"lr": …, "n_unfrozen": …, "trial_index": i}``.
    Intermediate validation losses go to the Optuna trial (``report``); a trial stopped by ASHA is
    told as pruned, a finished one with its best validation loss.
    """

    def __init__(
        self,
        configs: dict[str, dict[str, Any]],
        search: dict[str, SearchSpec],
        max_blocks: int,
        metric: str = METRIC,
        mode: str = MODE,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.configs = configs  # setting key → trial config without the searched values
        self.search = search  # setting key → its SearchSpec
        self.max_blocks = max_blocks
        self.studies = {
            key: optuna.create_study(
                study_name=key,
                direction="minimize" if mode == "min" else "maximize",
                sampler=optuna.samplers.TPESampler(seed=search[key].sampler_seed + i, n_startup_trials=3),
            )
            for i, key in enumerate(configs)
        }
        self.issued: Counter[str] = Counter()
        self.live: dict[str, tuple[str, Any]] = {}  # Tune trial id → (setting, Optuna trial)

    @property
    def total(self) -> int:
        return sum(self.search[k].trials for k in self.configs)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        open_ = [k for k in self.configs if self.issued[k] < self.search[k].trials]
        if not open_:
            return self.FINISHED
        key = min(open_, key=lambda k: (self.issued[k], list(self.configs).index(k)))
        spec = self.search[key]
        base = self.configs[key]
        trial = self.studies[key].ask()
        lr = trial.suggest_float("lr", spec.lr.low, spec.lr.high, log=True) if isinstance(spec.lr, Range) else spec.lr
        n_unfrozen = None
        if base["strategy"] == "blocks":
            if spec.n_unfrozen == "search":
                n_unfrozen = trial.suggest_int("n_unfrozen", 0, self.max_blocks)
            else:
                n_unfrozen = int(spec.n_unfrozen)
        self.live[trial_id] = (key, trial)
        index = self.issued[key]
        self.issued[key] += 1
        return {**base, "lr": lr, "n_unfrozen": n_unfrozen, "trial_index": index}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id in self.live and self.metric in result and "epoch" in result:
            value = result[self.metric]
            if value is not None and math.isfinite(value):
                self.live[trial_id][1].report(value, int(result["epoch"]))

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        import optuna

        if trial_id not in self.live:
            return
        key, trial = self.live.pop(trial_id)
        study = self.studies[key]
        value = (result or {}).get(self.metric)
        if error or value is None or not math.isfinite(value):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        elif (result or {}).get(COMPLETED):
            study.tell(trial, value)
        else:  # stopped early by ASHA
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.__dict__, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.__dict__.update(pickle.load(fh))


class PerSettingASHA(FIFOScheduler):
    """ASHA (asynchronous successive halving) run separately for each setting (``config["setting"]``)."""

    def __init__(self, *, grace_period: int, reduction_factor: float, max_t: int) -> None:
        super().__init__()
        self.kwargs = {"grace_period": grace_period, "reduction_factor": reduction_factor, "max_t": max_t}
        self.children: dict[str, Any] = {}
        self._metric, self._mode = METRIC, MODE

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    def _child(self, tune_controller, trial):
        key = trial.config.get("setting", "")
        if key not in self.children:
            self.children[key] = ASHAScheduler(
                time_attr="epoch_count", metric=self._metric, mode=self._mode, stop_last_trials=False, **self.kwargs
            )
        child = self.children[key]
        if trial.trial_id not in child._trial_info:  # e.g. a trial restored after the driver restarted
            child.on_trial_add(tune_controller, trial)
        return child

    def on_trial_add(self, tune_controller, trial) -> None:
        self._child(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        return self._child(tune_controller, trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        self._child(tune_controller, trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        child = self.children.get(trial.config.get("setting", ""))
        if child is not None and trial.trial_id in child._trial_info:
            child.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        stopped = sum(c._num_stopped for c in self.children.values())
        return f"ASHA per setting: {len(self.children)} settings, {stopped} trials stopped early"


# --------------------------------------------------------------------------------------------------
# Running.


class Progress(Callback):
    """One bar per stage: finished trials, with running / pruned / failed counts.

    Tune pickles its callbacks into the experiment (for ``--resume``); the bar is made on first use and
    left out of the pickle.
    """

    def __init__(self, stage: str, total: int) -> None:
        self.stage, self.total = stage, total
        self.bar = None
        self.counts: Counter[str] = Counter()
        self.running: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "bar": None, "running": set()}

    def _update(self, finished: int = 0) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            done_before = sum(self.counts.values())
            self.bar = tqdm(total=self.total, initial=done_before, desc=f"stage {self.stage}", unit="trial",
                            dynamic_ncols=True)  # fmt: skip
        self.bar.update(finished)
        self.bar.set_postfix(
            running=len(self.running), done=self.counts["done"], pruned=self.counts["pruned"],
            failed=self.counts["failed"], refresh=True,
        )  # fmt: skip

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._update()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.counts["done" if trial.last_result.get(COMPLETED) else "pruned"] += 1
        self._update(1)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.counts["failed"] += 1
        self._update(1)

    def on_experiment_end(self, trials, **info):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclass
class SweepPaths:
    root: Path  # <results>/<sweep name>
    storage: str  # Ray storage path (local folder or URI)

    @property
    def trials(self) -> Path:
        return self.root / "trials.parquet"

    def stage_table(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.parquet"


def _storage_exists(storage: str, name: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(storage if "://" in storage else str(Path(storage).resolve()))
    info = fs.get_file_info(f"{path.rstrip('/')}/{name}")
    return info.type != pafs.FileType.NotFound


def _init_ray(address: str | None) -> None:
    import ray

    # A trial's checkpoint can force a snapshot of the experiment (needed for --resume); Tune warns about
    # each one, which would bury the progress bar.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # With a custom searcher Tune keeps a single trial pending, so trials would start one by one. Settings
    # are independent (each has its own Optuna study), so queue as many as Tune does for random search:
    # enough to fill every slot and to show the autoscaler the demand.
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", "200")
    # Tune's newer console output prints a configuration box and hints per Tuner even at verbose=0; the
    # classic reporter is silent there, which leaves the stage's progress bar alone on screen.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Worker logs stay in Ray's session folder: the driver shows a progress bar, not a wall of logs.
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": True, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # a local cluster, dashboard off, bound to this machine only
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)


def run_sweep(
    spec: SweepSpec,
    *,
    results: str | os.PathLike[str] = "results",
    storage: str | None = None,
    resume: bool = False,
    address: str | None = None,
    spec_text: str | None = None,
    data_home: str | None = None,
    cache: str | None = None,
) -> Any:
    """Run every stage of ``spec``; returns the trials table (pandas). See the module docstring."""
    import pandas as pd

    from ltc.paths import cache_root
    from ltc.paths import data_home as _data_home
    from ltc.shards import prepare

    root = Path(results).resolve() / spec.name
    storage = storage or spec.storage or str(root / "ray")
    paths = SweepPaths(root, storage)
    _claim_results(paths, spec, spec_text, resume)
    home = str(_data_home(data_home).resolve())
    cache_dir = str(cache_root(cache, home=Path(home)).resolve())
    graph = spec.graph_config
    _init_ray(address)

    tables: dict[str, pd.DataFrame] = {}
    settings_by_stage: dict[str, list[Setting]] = {}
    for stage in spec.stages:
        starts = None
        if stage.start_from is not None:
            planned = plan_starts(spec, stage, settings_by_stage[stage.start_from.stage])
            starts = select_starts(planned, tables[stage.start_from.stage], stage.start_from.select)
        settings = plan_stage(spec, stage, starts)
        settings_by_stage[stage.name] = settings
        done_table = paths.stage_table(stage.name)
        if done_table.is_file():
            tables[stage.name] = pd.read_parquet(done_table)
            print(f"stage {stage.name}: finished earlier ({len(tables[stage.name])} trials)")
            continue
        if not settings:
            raise RuntimeError(
                f"stage {stage.name}: nothing to run (no starting checkpoints survived {stage.start_from})"
            )
        # shards are built once, here, before any trial needs them (held-out sets too: their test formulas)
        for name in dict.fromkeys([*(d for g in stage.groups for d in g), *resolve_holdout(spec, stage)]):
            prepare(name, graph=graph, home=home, cache=cache_dir, progress=True)
        table = _run_stage(spec, stage, settings, paths, resume=resume, home=home, cache=cache_dir)
        _write_parquet(table, done_table)
        tables[stage.name] = table
        all_rows = pd.concat(list(tables.values()), ignore_index=True)
        _write_parquet(all_rows, paths.trials)
        _copy_best(table, paths.root / "best" / stage.name)
    trials = pd.concat(list(tables.values()), ignore_index=True)
    _write_parquet(trials, paths.trials)
    return trials


def _claim_results(paths: SweepPaths, spec: SweepSpec, spec_text: str | None, resume: bool) -> None:
    """Make the results folder ours: a fresh one, or (``resume``) one started by the same sweep file."""
    stored = paths.root / "sweep.json"
    current = json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str)
    if stored.is_file():
        if not resume:
            raise FileExistsError(
                f"{paths.root} holds results of sweep {spec.name!r} already: pass --resume to complete it, "
                "or --results another folder"
            )
        if json.loads(stored.read_text())["spec"] != current:
            raise ValueError(f"{paths.root} was started with a different version of sweep {spec.name!r}; not resuming")
        return
    if resume:
        log.info("nothing to resume in %s: starting the sweep", paths.root)
    paths.root.mkdir(parents=True, exist_ok=True)
    (paths.root / "sweep.json").write_text(json.dumps({"spec": current, "started": time.time()}))
    if spec_text is not None:
        (paths.root / "sweep.yaml").write_text(spec_text)


def _trial_base_config(spec: SweepSpec, stage: StageSpec, s: Setting, home: str, cache: str) -> dict[str, Any]:
    res = spec.resources_for(stage)
    size = s.size or s.max_size
    batch = stage.batch_size_by_size.get(size, stage.batch_size) if size is not None else stage.batch_size
    return {
        "setting": s.key,
        "group": source_key(s),
        "stage": s.stage,
        "kind": s.kind,
        "datasets": list(s.datasets),
        "size": s.size,
        "max_size": s.max_size,
        "seed": s.seed,
        "strategy": s.strategy,
        "init": s.start.checkpoint if s.start else None,
        "pt_datasets": list(s.start.datasets) if s.start else None,
        "pt_size": s.start.size if s.start else None,
        "lineage": s.start.lineage if s.start else None,
        "model": spec.model if s.kind != "finetune" else None,
        "model_config": spec.model_config if s.kind != "finetune" else {},
        "graph": spec.graph_config.to_dict(),
        "split": dataclasses.asdict(spec.split),
        "holdout": resolve_holdout(spec, stage),
        "train": {
            "epochs": stage.epochs,
            "batch_size": batch,
            "loss": stage.loss,
            "schedule": stage.schedule,
            "weight_decay": stage.weight_decay,
            "patience": stage.patience,
        },
        "checkpoint_every": stage.checkpoint_every,
        "checkpoint_seconds": stage.checkpoint_seconds,
        "report_seconds": stage.report_seconds,
        "threads": max(1, int(res.cpu)),
        "data_home": home,
        "cache": cache,
    }


def _run_stage(spec, stage, settings, paths: SweepPaths, *, resume: bool, home: str, cache: str):
    from ray import tune

    from ltc.trial import ltc_trial

    res = spec.resources_for(stage)
    search = spec.search_for(stage)
    trainable = tune.with_resources(ltc_trial, {"cpu": res.cpu, "gpu": res.gpu})
    exp_name = stage.name
    if resume and _storage_exists(paths.storage, f"{exp_name}/tuner.pkl"):
        print(f"stage {stage.name}: resuming")
        tuner = tune.Tuner.restore(
            f"{paths.storage.rstrip('/')}/{exp_name}", trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        configs = {s.key: _trial_base_config(spec, stage, s, home, cache) for s in settings}
        searcher = SettingSearch(configs, {k: search for k in configs}, max_blocks=n_blocks(spec))
        scheduler = (
            PerSettingASHA(
                grace_period=min(spec.asha.grace_epochs, stage.epochs),
                reduction_factor=spec.asha.reduction_factor,
                max_t=stage.epochs + 1,  # never stop a trial at its last epoch, before its test metrics
            )
            if spec.asha
            else None
        )
        total = searcher.total
        tuner = tune.Tuner(
            trainable,
            param_space={},
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=total,
                reuse_actors=True,
                trial_dirname_creator=lambda t: t.trial_id,
            ),
            run_config=tune.RunConfig(
                name=exp_name,
                storage_path=paths.storage,
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                # 2, not 1: Tune snapshots the experiment whenever a trial has saved num_to_keep checkpoints
                # since the last snapshot; with 1, every finished trial would force one
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[Progress(stage.name, total)],
            ),
        )
        print(f"stage {stage.name}: {len(settings)} settings, {total} trials")
    grid = tuner.fit()
    return _results_table(grid, stage.name)


# --------------------------------------------------------------------------------------------------
# Results.

COLUMNS = [
    "stage", "kind", "setting", "group", "trial_index", "status", "pt_dataset", "pt_size", "lineage", "ft_dataset",
    "ft_size", "dataset", "size", "strategy", "n_unfrozen", "lr", "seed", "val_loss", "val_mae", "val_r2",
    "test_mae", "test_rmse", "test_r2", "test_mape", "test_mae_log10", "n_train", "n_val", "n_test",
    "epochs_run", "best_epoch", "resumed_from_epoch", "train_seconds", "wall_seconds", "params_trainable",
    "params_total",
    "checkpoint", "init", "task_metrics",
    "trial_id", "node_id", "gpu_ids", "started", "finished", "error",
]  # fmt: skip


_FLOAT = ("pt_size", "ft_size", "size", "n_unfrozen", "lr", "val_loss", "val_mae", "val_r2", "test_mae", "test_rmse",
          "test_r2", "test_mape", "test_mae_log10", "n_train", "n_val", "n_test", "epochs_run", "best_epoch",
          "resumed_from_epoch", "wall_seconds",
          "train_seconds", "params_trainable", "params_total", "started", "finished")  # fmt: skip
# Fixed column types: a stage without kappa rows (all-null test_mae_log10) concatenates cleanly with one with.
DTYPES = {c: ("float64" if c in _FLOAT else "int64" if c in ("trial_index", "seed") else "object") for c in COLUMNS}


def _checkpoint_uri(checkpoint) -> str | None:
    if checkpoint is None:
        return None
    fs = checkpoint.filesystem
    kind = getattr(fs, "type_name", "local")
    base = checkpoint.path if kind == "local" else f"{'gs' if kind == 'gcs' else kind}://{checkpoint.path}"
    return f"{base.rstrip('/')}/checkpoint.pt"


def _results_table(grid, stage: str):
    """One flat row per trial of a stage's ResultGrid."""
    import pandas as pd

    rows = []
    for result in grid:
        cfg = result.config or {}
        m = result.metrics or {}
        done = bool(m.get(COMPLETED))
        status = "completed" if done else ("error" if result.error else "pruned")
        datasets_ = "+".join(cfg.get("datasets", []))
        kind = cfg.get("kind")
        size = cfg.get("size") if cfg.get("size") is not None else cfg.get("max_size")
        row = {
            "stage": stage,
            "kind": kind,
            "setting": cfg.get("setting"),
            "group": cfg.get("group"),
            "trial_index": cfg.get("trial_index"),
            "status": status,
            "pt_dataset": datasets_
            if kind == "pretrain"
            else ("+".join(cfg["pt_datasets"]) if cfg.get("pt_datasets") else None),
            "pt_size": size if kind == "pretrain" else cfg.get("pt_size"),
            "lineage": cfg.get("lineage"),
            "ft_dataset": None if kind == "pretrain" else datasets_,
            "ft_size": None if kind == "pretrain" else size,
            "dataset": datasets_,
            "size": size,
            "strategy": "scratch" if kind == "scratch" else ("pretrain" if kind == "pretrain" else cfg.get("strategy")),
            "n_unfrozen": cfg.get("n_unfrozen"),
            "lr": cfg.get("lr"),
            "seed": cfg.get("seed"),
            "checkpoint": _checkpoint_uri(result.checkpoint) if done else None,
            "init": cfg.get("init"),
            "trial_id": m.get("trial_id") or Path(str(result.path)).name,
            "error": str(result.error)[:2000] if result.error else None,
        }
        for key in COLUMNS:
            if key not in row:
                row[key] = m.get(key)
        tasks: dict[str, dict[str, Any]] = {}
        for key, value in m.items():  # multi-property trials: "<dataset>/test_mae" …
            if isinstance(key, str) and "/" in key and key.split("/", 1)[0] in datasets.REGISTRY:
                tasks.setdefault(key.split("/", 1)[0], {})[key.split("/", 1)[1]] = value
        row["task_metrics"] = json.dumps(tasks) if tasks else None
        if not done:
            for key in COLUMNS:
                if key.startswith("test_"):
                    row[key] = None  # a stopped or failed trial has no test metrics
            row["val_loss"] = m.get("val_loss")
        rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS).astype({c: t for c, t in DTYPES.items()})
    return df.sort_values(["setting", "trial_index"], kind="stable").reset_index(drop=True)


def select_starts(planned: list[Start], table, select: str) -> list[Start]:
    """Attach to each planned source group the checkpoint of its best completed trial (lowest val_loss)."""
    done = table[(table.status == "completed") & table.checkpoint.notna() & (table.kind != "scratch")]
    out = []
    for start in planned:
        if select == "every":
            group, seed = start.group.rsplit(":seed", 1)
            rows = done[(done.group == group) & (done.seed == int(seed))]
        else:
            rows = done[done.group == start.group]
        if rows.empty:
            log.warning("no completed trial for source %s: settings starting from it are dropped", start.group)
            continue
        best = rows.loc[rows.val_loss.astype(float).idxmin()]
        out.append(dataclasses.replace(start, checkpoint=best.checkpoint))
    return out


def _write_parquet(df, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _copy_best(table, folder: Path) -> None:
    """The best completed trial of each setting: its checkpoint into ``folder`` and a ``best.parquet``."""
    import pyarrow.fs as pafs

    from ltc.results import best_per_setting

    best = best_per_setting(table)
    best = best[best.checkpoint.notna()]
    if best.empty:
        return
    folder.mkdir(parents=True, exist_ok=True)
    local = []
    for _, row in best.iterrows():
        slug = row.setting.replace("|", "__").replace("/", "_").replace(":", "-")
        dest = folder / slug / "checkpoint.pt"
        dest.parent.mkdir(exist_ok=True)
        src = row.checkpoint
        if "://" in src:
            fs, path = pafs.FileSystem.from_uri(src)
            with fs.open_input_stream(path) as fin, open(dest, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            shutil.copyfile(src, dest)
        local.append(str(dest))
    best = best.assign(best_checkpoint=local)
    _write_parquet(best, folder / "best.parquet")


def summary(trials) -> str:
    """Per (stage, dataset, size, start, strategy): test metrics of each seed's best trial, mean ± std."""
    import pandas as pd

    from ltc.results import best_per_setting, with_start

    best = with_start(best_per_setting(trials))
    if best.empty:
        return "no completed trials"
    keys = ["stage", "dataset", "size", "start", "strategy"]
    rows = []
    for key, g in best.groupby(keys, dropna=False, sort=False):
        r2, mae = g.test_r2.astype(float), g.test_mae.astype(float)
        row = dict(zip(keys, key, strict=True))
        row["size"] = "all" if pd.isna(row["size"]) else int(row["size"])
        row.update(
            seeds=len(g),
            test_mae=f"{mae.mean():.4g} ± {mae.std(ddof=0):.2g}" if mae.notna().any() else "-",
            test_r2=f"{r2.mean():.3f} ± {r2.std(ddof=0):.3f}" if r2.notna().any() else "-",
            lr=f"{g.lr.median():.2g}",
            n_unfrozen="-" if g.n_unfrozen.isna().all() else ",".join(str(int(v)) for v in g.n_unfrozen.dropna()),
        )
        rows.append(row)
    table = pd.DataFrame(rows)
    counts = trials.status.value_counts().to_dict()
    head = f"{len(trials)} trials: " + ", ".join(f"{v} {k}" for k, v in counts.items())
    return head + "\n" + table.to_string(index=False)
