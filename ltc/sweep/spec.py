"""The sweep file: frozen dataclasses read by the strict YAML loader (``ltc.config``). No Ray here.

A sweep file names the model, graph settings, test split, resources, the Optuna search, early stopping,
the user's own datasets (``datasets:``) and the stages in order (see README "Sweeps"). Each dataclass checks
its own values; what needs the data or the model (sizes against row counts, ``n_unfrozen`` against the
model's blocks) is checked by ``ltc.sweep.plan.validate``, still before anything runs. Paths in a sweep file
(a dataset's ``path``, a start's ``checkpoint``) resolve against the file's folder (``load_sweep``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from ltc import datasets
from ltc.archs import ARCHS, MODEL_NAMES, ModelConfig, model_config
from ltc.choices import (
    DEFAULT_GRAPHS,
    LOSSES,
    PRETRAINED,
    SCHEDULES,
    SELECT_BY,
    STRATEGIES,
    TrainConfig,
    check_select_by,
    check_strategy,
)
from ltc.config import from_dict, read_yaml
from ltc.datasets import UserDataset
from ltc.errors import ConfigError, LtcError
from ltc.graphs import GraphConfig
from ltc.splits import SplitConfig
from ltc.sweep.studies import SAMPLERS, Sampler
from ltc.targets import TRANSFORMS

_TRAIN = TrainConfig()  # the defaults a stage inherits (one source of truth: TrainConfig)


@dataclass(frozen=True)
class Range:
    """A log-uniform range."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not (0 < self.low < self.high and math.isfinite(self.high)):
            raise ConfigError(f"range low={self.low}, high={self.high}: need 0 < low < high, both finite")


SEED_MAX = 2**32 - 1  # numpy's and Optuna's seeds: 0 … 2**32 - 1
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]{0,99}")  # a sweep's and a stage's name: one safe path component


def _check_seed(key: str, value: int | None) -> None:
    if value is not None and not 0 <= value <= SEED_MAX:
        raise ConfigError(f"{key}={value} must be between 0 and {SEED_MAX} (a seed)")


MAX_FAILURES = 100  # Tune's -1 (retry forever) is refused: a trial that always fails would never end


def _check_name(what: str, name: str) -> None:
    """A name that becomes a folder or file name of the results: one path component, never '..' or a slash."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{what}={name!r} must be a plain name (letters, digits and _.=+-, starting with a letter or digit): "
            "it names folders of the results"
        )


@dataclass(frozen=True)
class SearchSpec:
    """What Optuna searches inside each setting."""

    trials: int = 4  # Optuna trials per setting
    lr: float | Range = Range(1e-4, 1e-2)  # a number fixes it
    n_unfrozen: int | Literal["search"] = "search"  # strategy ``blocks``: 0 … n_blocks, or fixed
    sampler_seed: int = 0
    sampler: Sampler = "budget"  # ltc.sweep.studies: space-filling start, then TPE; or "random"

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler={self.sampler!r} must be one of {SAMPLERS}")
        if self.trials < 1:
            raise ConfigError(f"trials={self.trials} must be >= 1")
        if isinstance(self.lr, float) and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr={self.lr} must be a finite number > 0")
        _check_seed("sampler_seed", self.sampler_seed)


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
    sampler: Sampler | None = None

    def over(self, base: SearchSpec) -> SearchSpec:
        return _override(base, self)


@dataclass(frozen=True)
class AshaSpec:
    """Successive halving per setting (Optuna's ``SuccessiveHalvingPruner``): at epochs grace, grace·rf,
    grace·rf², … a trial goes on only if its validation score there is among the best 1/rf of the values its
    setting's trials had there so far; while fewer than rf trials have reached that epoch, only if it is
    the best of them (so the first to arrive always goes on)."""

    grace_epochs: int = 5  # no trial is stopped before this many epochs
    reduction_factor: int = 3

    def __post_init__(self) -> None:
        if self.grace_epochs < 1 or self.reduction_factor < 2:
            raise ConfigError(
                f"asha: grace_epochs={self.grace_epochs}, reduction_factor={self.reduction_factor}: "
                "need grace_epochs >= 1 and reduction_factor >= 2"
            )


@dataclass(frozen=True)
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0  # a fraction (0.25, 0.5) packs several trials on one GPU

    def __post_init__(self) -> None:
        if not (0 < self.cpu < math.inf and 0 <= self.gpu < math.inf):
            raise ConfigError(f"resources cpu={self.cpu}, gpu={self.gpu}: need cpu > 0 and gpu >= 0, both finite")
        if self.gpu > 1 and self.gpu != int(self.gpu):
            raise ConfigError(f"gpu={self.gpu}: above 1 it must be a whole number")


@dataclass(frozen=True)
class ResourcesOverride:
    """A stage's changes to the sweep's ``resources`` (keys not given are inherited)."""

    cpu: float | None = None
    gpu: float | None = None

    def over(self, base: Resources) -> Resources:
        return _override(base, self)


LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+=-]{0,99}")  # no '|', '>' or '[': setting keys hold labels


@dataclass(frozen=True)
class Source:
    """Where a stage's starting weights come from, exactly one of: checkpoints of an earlier stage (``stage``), a
    pretrained model by name (``pretrained``, a key of ``ltc.models.PRETRAINED``), or a checkpoint the user has
    (``checkpoint``: an ltc checkpoint file or URI, or a folder such as ``best/<stage>/<cell>/`` whose checkpoints,
    the fold models of a K-fold cell, are each a start). ``label`` names a checkpoint start in keys and reports
    (default: the file's name, or its folder's for a ``checkpoint.pt``)."""

    stage: str | None = None
    pretrained: str | None = None
    checkpoint: str | None = None
    label: str | None = None
    select: Literal["best", "every"] = "best"  # best per source dataset+size, or best per source setting (seed)
    skip_seen: bool = False  # no FT on a dataset the source trained on (Devi's 7×6 pairs, MPT leave-one-out)

    def __post_init__(self) -> None:
        given = {k: getattr(self, k) for k in ("stage", "pretrained", "checkpoint") if getattr(self, k) is not None}
        if len(given) != 1:
            got = ", ".join(f"{k}={v!r}" for k, v in given.items()) or "none"
            raise ConfigError(f"give stage, pretrained or checkpoint (exactly one), got {got}")
        if self.pretrained is not None and self.pretrained not in PRETRAINED:
            known = ", ".join(PRETRAINED)
            raise ConfigError(f"pretrained={self.pretrained!r} is not a pretrained model; known {known}")
        if self.stage is None and (self.select != "best" or self.skip_seen):
            what = f"pretrained={self.pretrained!r}" if self.pretrained else f"checkpoint={self.checkpoint!r}"
            raise ConfigError(f"{what}: select and skip_seen go with a stage source only")
        if self.label is not None and self.checkpoint is None:
            raise ConfigError(f"label={self.label!r} names a checkpoint start; a stage or pretrained start has its own")
        if self.checkpoint is not None and not LABEL_RE.fullmatch(self.name):
            raise ConfigError(
                f"checkpoint={self.checkpoint!r}: its label {self.name!r} cannot name a start (letters, digits and "
                "_.:+=- only); give label: …"
            )

    @property
    def name(self) -> str:
        """The source stage, the pretrained model's name, or the checkpoint's label."""
        if self.stage is not None:
            return self.stage
        if self.pretrained is not None:
            return self.pretrained
        return self.label or checkpoint_label(str(self.checkpoint))


def checkpoint_label(path: str) -> str:
    """A checkpoint start's default label: the file's name without suffix, or for a ``checkpoint.pt`` (what ltc
    writes) its folder's name; a folder's name for a folder."""
    p = PurePosixPath(path.split("://", 1)[-1].rstrip("/"))
    if p.suffix == ".pt":
        return p.parent.name if p.stem == "checkpoint" else p.stem
    return p.name


@dataclass(frozen=True)
class GivenCheckpoint:
    """One start of a ``checkpoint`` source: its label, the file, and what it is (from the checkpoint itself)."""

    label: str
    path: str
    arch: Arch
    datasets: tuple[str, ...]  # what it was last trained on (its history), for the results' pt_dataset
    size: int | None


def given_checkpoints(src: Source) -> tuple[GivenCheckpoint, ...]:
    """The starts of a ``checkpoint`` source, each loaded once and checked (not an ltc checkpoint: refused with the
    reason). A folder gives every ``checkpoint.pt`` beneath it, labelled ``<label>:<subfolder>``."""
    assert src.checkpoint is not None
    path = src.checkpoint
    stamp = os.stat(path).st_mtime_ns if os.path.exists(path) else None  # an edited file is read again
    return _given_checkpoints(path, src.name, stamp)


@functools.lru_cache(maxsize=64)
def _given_checkpoints(path: str, label: str, stamp: int | None) -> tuple[GivenCheckpoint, ...]:
    from ltc.checkpoints import load_checkpoint
    from ltc.io import is_uri
    from ltc.predict import expand_checkpoints

    files = expand_checkpoints([path])
    single = len(files) == 1
    out = []
    for file in files:
        ckpt = load_checkpoint(file)
        config = {k: v for k, v in ckpt["model"]["config"].items() if k != "n_targets"}  # a scratch twin: its own
        arch = Arch.of(ckpt["model"]["name"], config, GraphConfig(**ckpt["graph"]))
        last = (ckpt.get("history") or [{}])[-1]
        if single:
            name = label
        else:
            rel = file[len(path.rstrip("/")) + 1 :] if is_uri(path) else str(Path(file).relative_to(path))
            name = f"{label}:{str(PurePosixPath(rel).parent).replace('/', '-')}"
        out.append(GivenCheckpoint(name, str(file), arch, tuple(last.get("datasets") or ()), last.get("size")))
    return tuple(out)


@dataclass(frozen=True)
class Arch:
    """An architecture: a model, its config overrides and the graphs it reads. Each start carries one (a start
    from a stage trained with model M on graphs G fine-tunes M on G); scratch baselines are built from them."""

    model: str  # a name in ltc.archs.MODEL_NAMES
    config_json: str  # the model_config overrides as sorted JSON (hashable); ``model_config`` reads them
    graph: GraphConfig

    @classmethod
    def of(cls, model: str, model_config: dict[str, Any], graph: GraphConfig) -> Arch:
        return cls(model, json.dumps(model_config, sort_keys=True), graph)

    @property
    def model_config(self) -> dict[str, Any]:
        return json.loads(self.config_json)

    @property
    def label(self) -> str:
        """What setting keys and results call it (``scratch[chgnet]``)."""
        return self.model


def pretrained_arch(name: str) -> Arch:
    """The architecture of pretrained model ``name``: its model (its config is that model's defaults, which are
    the pretrained ones, e.g. ``CHGNetConfig``) on ``DEFAULT_GRAPHS[model]``, the graphs it was trained on."""
    model = PRETRAINED[name].model
    return Arch.of(model, {}, DEFAULT_GRAPHS[model])


@functools.lru_cache(maxsize=32)
def arch_config(model: str, config_json: str) -> ModelConfig:
    """The validated config of (model, overrides), for checks (blocks, strategies) that need no torch. Overrides
    are also checked against this machine's memory (``ltc.models.check_fits``, which imports torch); the defaults
    are small enough anywhere."""
    config = model_config(model, json.loads(config_json))
    if json.loads(config_json):
        from ltc.models import check_fits

        check_fits(model, config)
    return config


@dataclass(frozen=True)
class StageSpec:
    name: str
    datasets: list[str | list[str]]  # an inner list is one multi-property set (one head each)
    # None: from scratch (pre-training); a list: several sources in one stage (ParAIsite's step II beside
    # step III), so every start and the scratch baselines are compared on the same units in one report
    start_from: Source | list[Source] | None = None
    # a stage from scratch (PT) may train its own architecture; default: the sweep's. A fine-tuning stage takes
    # its architectures from its starts (its scratch baselines too), so these are errors there
    model: str | None = None  # one of ltc.archs.MODEL_NAMES
    model_config: dict[str, Any] | None = None  # default: the sweep's if the model is the sweep's, else {}
    graph: GraphConfig | None = None  # default: the sweep's if the model is the sweep's, else the model's usual
    sizes: list[int | None] | None = None  # exact train+val sizes (FT); null = all
    max_sizes: list[int] | None = None  # caps (PT size scans)
    seeds: list[int] = field(default_factory=lambda: [0])
    strategies: list[str] = field(default_factory=lambda: ["all"])
    scratch: bool = False  # add a from-scratch baseline per (dataset, size, seed)
    epochs: int = _TRAIN.epochs
    batch_size: int = _TRAIN.batch_size
    batch_size_by_size: dict[int, int] = field(default_factory=dict)  # Devi: {100: 2, 10: 1}
    loss: str = _TRAIN.loss  # one of ltc.train.LOSSES
    schedule: str = _TRAIN.schedule  # one of ltc.train.SCHEDULES
    weight_decay: float = _TRAIN.weight_decay
    patience: int | None = _TRAIN.patience
    select_by: str | None = (
        _TRAIN.select_by
    )  # what picks epochs and trials (ltc.choices.SELECT_BY); None: judging metric
    # target transform of every dataset of the stage (ltc.targets.TRANSFORMS); None: each dataset's default
    transform: str | None = None
    holdout: Literal["auto", "none"] | list[str] = "auto"  # auto: test sets of later stages' datasets
    split: SplitConfig | None = None  # this stage's split (e.g. kfold on a small FT set); default: the sweep's
    search: SearchOverride | None = None  # keys given here override the sweep's search
    resources: ResourcesOverride | None = None  # keys given here override the sweep's resources
    checkpoint_every: int = 5  # epochs between trial checkpoints (resume after a worker dies) …
    checkpoint_seconds: float = 300.0  # … and at least this long between them
    report_seconds: float = 2.0  # at least this long between epoch reports to Tune (the Optuna study, early stopping)

    def __post_init__(self) -> None:
        _check_name("stage name", self.name)
        if not self.datasets:
            raise ConfigError(f"stage {self.name!r} has no datasets")
        for key in ("sizes", "max_sizes"):
            for k, size in enumerate(getattr(self, key) or []):
                if size is not None and size < 1:
                    raise ConfigError(f"stage {self.name!r}: {key}[{k}]={size} must be >= 1 (null: every structure)")
        for k, seed in enumerate(self.seeds):
            _check_seed(f"stage {self.name!r}: seeds[{k}]", seed)
        for size, batch in self.batch_size_by_size.items():
            if size < 1 or batch < 1:
                raise ConfigError(f"stage {self.name!r}: batch_size_by_size {{{size}: {batch}}}: both must be >= 1")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"stage {self.name!r}: weight_decay={self.weight_decay} must be finite and >= 0")
        for key in ("checkpoint_seconds", "report_seconds"):
            if not 0 <= getattr(self, key) < math.inf:
                raise ConfigError(f"stage {self.name!r}: {key}={getattr(self, key)} must be finite and >= 0")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"stage {self.name!r}: patience={self.patience} must be >= 1 (null: no early stop)")
        # whether each name is known is checked by the sweep, which knows its declared datasets too
        if self.sizes is not None and self.max_sizes is not None:
            raise ConfigError(f"stage {self.name!r}: give sizes or max_sizes, not both")
        for s in self.strategies:
            if s not in STRATEGIES:
                raise ConfigError(f"stage {self.name!r}: strategy {s!r} must be one of {STRATEGIES}")
        if isinstance(self.start_from, list):
            stages = [src.name for src in self.start_from]
            if not stages or len(set(stages)) != len(stages):
                raise ConfigError(f"stage {self.name!r}: start_from lists each source stage once, got {stages}")
        if self.start_from is not None:
            given = [k for k in ("model", "model_config", "graph") if getattr(self, k) is not None]
            if given:
                raise ConfigError(
                    f"stage {self.name!r}: {', '.join(given)}: a fine-tuning stage (start_from) takes its model and "
                    "graphs from its starts; set them on the stage it starts from"
                )
        if self.start_from is None and self.strategies != ["all"]:
            raise ConfigError(f"stage {self.name!r}: strategies need start_from (a stage to fine-tune from)")
        if self.start_from is None and self.scratch:
            raise ConfigError(f"stage {self.name!r}: scratch baselines belong to fine-tuning stages (start_from)")
        if self.epochs < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ConfigError(f"stage {self.name!r}: epochs, batch_size and checkpoint_every must be >= 1")
        if not self.seeds:
            raise ConfigError(f"stage {self.name!r} has no seeds")
        if self.loss not in LOSSES:
            raise ConfigError(f"stage {self.name!r}: loss={self.loss!r} must be one of {LOSSES}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"stage {self.name!r}: schedule={self.schedule!r} must be one of {SCHEDULES}")
        if self.select_by is not None and self.select_by not in SELECT_BY:
            raise ConfigError(f"stage {self.name!r}: select_by={self.select_by!r} must be one of {SELECT_BY} or null")
        if self.transform is not None and self.transform not in TRANSFORMS:
            raise ConfigError(f"stage {self.name!r}: transform={self.transform!r} must be one of {TRANSFORMS} or null")

    @property
    def sources(self) -> list[Source]:
        """``start_from`` as a list (empty for a stage from scratch)."""
        if self.start_from is None:
            return []
        return list(self.start_from) if isinstance(self.start_from, list) else [self.start_from]

    def source(self, stage: str) -> Source:
        """The entry of ``start_from`` naming ``stage`` (a source stage, or a pretrained name)."""
        return next(src for src in self.sources if src.name == stage)

    @property
    def dataset_sets(self) -> list[tuple[str, ...]]:
        """Each entry of ``datasets`` as a tuple: one dataset, or one multi-property set (a head each)."""
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
    model: str = "cgcnn"  # one of ltc.archs.MODEL_NAMES
    model_config: dict[str, Any] = field(default_factory=dict)
    graph: GraphConfig | None = None  # default: the model's usual graphs
    split: SplitConfig = SplitConfig()
    search: SearchSpec = SearchSpec()
    asha: AshaSpec | None = AshaSpec()  # null: no early stopping
    resources: Resources = Resources()
    storage: str | None = None  # Ray storage (checkpoints): a folder, s3://… or gs://…; default results/<name>/ray
    max_failures: int = 2  # retries of a trial whose worker died, from its last checkpoint (0 … MAX_FAILURES)
    datasets: dict[str, UserDataset] = field(default_factory=dict)  # the user's own, used by name in stages

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        if not self.stages:
            raise ConfigError("a sweep needs at least one stage")
        for i, st in enumerate(self.stages):  # a checkpoint start is read now: its architecture, and whether it is one
            many = isinstance(st.start_from, list)
            for j, src in enumerate(st.sources):
                if src.checkpoint is not None:
                    try:
                        given_checkpoints(src)
                    except (LtcError, OSError) as err:
                        where = f"stages[{i}].start_from{f'[{j}]' if many else ''}.checkpoint"
                        raise ConfigError(f"{where}: {err}") from None
        with datasets.declare(self.declared_datasets()):  # a stage names built-in or declared datasets
            for st in self.stages:
                for key, names_ in [("datasets", [d for g in st.dataset_sets for d in g]),
                                    ("holdout", st.holdout if isinstance(st.holdout, list) else [])]:  # fmt: skip
                    for name in names_:
                        try:
                            datasets.spec(name)
                        except datasets.UnknownDatasetError as err:
                            raise ConfigError(f"stage {st.name!r}: {key}: {err}") from None
                for group in st.dataset_sets:  # what a trial's selection() would refuse
                    try:
                        check_select_by(st.select_by, group, kappa=datasets.spec(group[0]).kappa)
                    except ConfigError as err:
                        raise ConfigError(f"stage {st.name!r}: {err}") from None
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique: {names}")
        _check_name("name", self.name)
        if not 0 <= self.max_failures <= MAX_FAILURES:
            raise ConfigError(f"max_failures={self.max_failures} must be between 0 and {MAX_FAILURES}")
        if self.model not in MODEL_NAMES:
            known = ", ".join(repr(m) for m in MODEL_NAMES)
            raise ConfigError(f"model: expected one of {known}, got {self.model!r}")
        for i, st in enumerate(self.stages):
            if self.split_for(st).kfold and len(st.seeds) > 1:
                raise ConfigError(
                    f"stages[{i}].seeds={st.seeds} with a kfold split: its repeats (split.repeats) are the seeds "
                    "(repeat r uses seed seeds[0] + r); give one seed"
                )
            for src in st.sources:
                if src.stage is not None and src.stage not in names[:i]:
                    raise ConfigError(f"stage {st.name!r} starts from {src.stage!r}, which is not an earlier stage")
            if st.model is not None and st.model not in MODEL_NAMES:
                known = ", ".join(repr(m) for m in MODEL_NAMES)
                raise ConfigError(f"stages[{i}].model: expected one of {known}, got {st.model!r}")
        own = [(i, st) for i, st in enumerate(self.stages) if (st.model, st.model_config, st.graph) != (None,) * 3]
        archs = [(f"stages[{i}].", self.arch_for(st)) for i, st in own]  # a stage's own graphs are checked too
        for where, arch in [("", self.arch_for(None)), *archs]:
            try:  # a bad model_config fails here, not in a trial
                arch_config(arch.model, arch.config_json)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"{where}model_config {arch.model_config}: {err}") from None
            readable = ARCHS[arch.model].constructions
            if readable is not None and arch.graph.construction not in readable:
                raise ConfigError(
                    f"{where}graph: model {arch.model} needs graphs of construction {' or '.join(readable)}, "
                    f"not {arch.graph.construction!r}"
                )
        for i, st in enumerate(self.stages):
            for arch in self.archs(st):  # each start's model (several in a stage that mixes architectures)
                config = arch_config(arch.model, arch.config_json)
                for j, strategy in enumerate(st.strategies):
                    try:
                        check_strategy(arch.model, config, strategy, 0 if strategy == "blocks" else None)
                    except ConfigError as err:
                        raise ConfigError(f"stages[{i}].strategies[{j}]={strategy!r}: {err}") from None

    def declared_datasets(self) -> dict[str, datasets.DatasetSpec]:
        """The sweep's own datasets as specs (``datasets.user_spec``), to declare while the sweep runs."""
        out = {}
        for name, decl in self.datasets.items():
            try:
                out[name] = datasets.user_spec(name, decl)
            except ConfigError as err:
                raise ConfigError(f"datasets.{name}: {err}") from None
        return out

    def split_for(self, stage: StageSpec) -> SplitConfig:
        """The stage's split: its own, else the sweep's."""
        return stage.split or self.split

    def search_for(self, stage: StageSpec) -> SearchSpec:
        """The stage's search: the sweep's, with the stage's overrides."""
        return stage.search.over(self.search) if stage.search else self.search

    def resources_for(self, stage: StageSpec) -> Resources:
        return stage.resources.over(self.resources) if stage.resources else self.resources

    @property
    def graph_config(self) -> GraphConfig:
        """The sweep-level graphs (stages that name no model of their own train on these)."""
        return self.graph or DEFAULT_GRAPHS[self.model]

    def model_for(self, stage: StageSpec | None) -> str:
        """The model of ``stage``'s new models: its own, else the sweep's."""
        return stage.model if stage is not None and stage.model is not None else self.model

    def arch_for(self, stage: StageSpec | None) -> Arch:
        """The architecture ``stage`` builds fresh models of (its PT settings; None: the sweep's). A stage's
        ``model_config`` and ``graph`` win; else the sweep's when the model is the sweep's, else the model's
        defaults (a sweep's cgcnn settings never reach a stage's chgnet)."""
        model = self.model_for(stage)
        same = model == self.model
        config = stage.model_config if stage is not None and stage.model_config is not None else None
        graph = stage.graph if stage is not None and stage.graph is not None else None
        if config is None:
            config = self.model_config if same else {}
        if graph is None:
            graph = self.graph_config if same else DEFAULT_GRAPHS[model]
        return Arch.of(model, config, graph)

    def archs(self, stage: StageSpec) -> list[Arch]:
        """The architectures ``stage`` trains, in order: its own (a stage from scratch), else those of its starts
        (a stage source's archs, a pretrained model's own). One scratch baseline each (``scratch: true``)."""
        if not stage.sources:
            return [self.arch_for(stage)]
        by_name = {st.name: st for st in self.stages}
        out: list[Arch] = []
        for src in stage.sources:
            if src.pretrained is not None:
                found = [pretrained_arch(src.pretrained)]
            elif src.checkpoint is not None:
                found = [g.arch for g in given_checkpoints(src)]
            else:
                found = self.archs(by_name[str(src.stage)])
            out.extend(a for a in found if a not in out)
        return out


def load_sweep(path: str | os.PathLike[str]) -> SweepSpec:
    """Read and check a sweep file (unknown keys, wrong types and bad references are errors). A declared dataset's
    ``path`` and a start's ``checkpoint`` path resolve against the file's folder; a dataset folder's own
    ``dataset.yaml`` fills the keys its entry leaves out."""
    data = read_yaml(path, what="sweep file")
    try:
        return from_dict(SweepSpec, resolve_paths(data, Path(path).resolve().parent))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def resolve_paths(data: Any, base: Path) -> Any:
    """A sweep file's mapping with its paths made absolute against ``base`` (shapes it does not expect are left for
    the strict loader to name)."""
    from ltc.io import is_uri

    if not isinstance(data, dict):
        return data
    data = dict(data)
    declared = data.get("datasets")
    if isinstance(declared, dict):
        resolved = {}
        for name, entry in declared.items():
            if not isinstance(entry, (dict, str)):
                resolved[name] = entry  # the loader says what is wrong
                continue
            try:
                resolved[name] = datasets.declaration(entry, base=base)[0]
            except (ConfigError, datasets.DatasetError) as err:
                raise ConfigError(f"datasets.{name}: {err}") from None
        data["datasets"] = resolved
    stages = data.get("stages")
    if isinstance(stages, list):
        data["stages"] = [dict(st) if isinstance(st, dict) else st for st in stages]
        for st in data["stages"]:
            if not isinstance(st, dict):
                continue
            sources = st.get("start_from")
            many = isinstance(sources, list)
            fixed = []
            for src in sources if many else [sources]:
                path = src.get("checkpoint") if isinstance(src, dict) else None
                if isinstance(path, str) and path and not is_uri(path):
                    src = {**src, "checkpoint": str(datasets.absolute_path(path, base))}
                fixed.append(src)
            if "start_from" in st:
                st["start_from"] = fixed if many else fixed[0]
    return data


SMOKE_MODELS: dict[str, dict[str, Any]] = {
    "cgcnn": {"hidden": 16, "n_blocks": 2, "fc_dim": 16},
    "megnet": {"n_blocks": 2, "dense": [32, 16], "conv": [32, 16], "output": [16, 8]},
    "alignn": {"hidden": 16, "embedding": 8, "alignn_layers": 1, "gcn_layers": 1},
    "chgnet": {
        "atom_fea_dim": 16, "bond_fea_dim": 16, "angle_fea_dim": 16, "n_conv": 2, "atom_conv_hidden_dim": 16,
        "bond_conv_hidden_dim": 16, "mlp_hidden_dims": [16], "head_hidden": [16],
    },
}  # fmt: skip
_HEAD_KEYS = {"head_hidden", "head_activation"}  # a smoke model keeps the sweep's head shape


def _smoke_config(model: str, config: dict[str, Any]) -> dict[str, Any]:
    return {**SMOKE_MODELS[model], **{k: v for k, v in config.items() if k in _HEAD_KEYS}}


SMOKE_SIZE = 64


def smoke(spec: SweepSpec) -> SweepSpec:
    """A scaled-down copy of ``spec`` that checks it end to end in minutes on a CPU.

    Per stage: the first dataset set that has a starting checkpoint, the first size (at most 64
    structures), seed and strategy (scratch baselines kept); 1 trial, 2 epochs, no early stopping; small fresh
    models (the sweep's and a stage's own; a pretrained start and its scratch baseline keep their real size).
    A K-fold stage stays K-fold, with its folds but 1 repeat (so the smoke run checks that code path too).
    """
    kept: dict[str, set[str]] = {}
    stages = []
    for st in spec.stages:
        sets = st.dataset_sets
        seen = set().union(*(kept[src.stage] for src in st.sources if src.skip_seen and src.stage is not None))
        if seen:
            sets = [g for g in sets if not set(g) & seen] or sets
        group = sets[0]
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
                # kfold stays kfold (the code path is the check), at its smallest
                split=_smallest_kfold(spec.split_for(st)) if spec.split_for(st).kfold else st.split,
                model_config=_smoke_config(st.model, st.model_config or {}) if st.model is not None else None,
            )
        )
    model_config = _smoke_config(spec.model, spec.model_config)
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


def _smallest_kfold(split: SplitConfig) -> SplitConfig:
    # the folds stay (fewer would shrink each training pool below the stage's sizes); one repeat
    return dataclasses.replace(split, repeats=1)
