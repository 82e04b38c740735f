"""What a run may be asked for, and its defaults, importable without torch: the CLI's choices and help texts,
the sweep spec and ``--dry-run`` read them here; ``ltc.train`` and ``ltc.transfer`` act on them.

One source of truth: ``ltc.train`` re-exports ``TrainConfig``, ``RunConfig`` and the names below.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ltc import datasets
from ltc.archs import ARCHS, MODEL_NAMES, ModelConfig
from ltc.errors import ConfigError
from ltc.graphs import GraphConfig
from ltc.splits import SplitConfig
from ltc.targets import TRANSFORMS

if TYPE_CHECKING:
    from ltc.models import CrystalGNN

# Graph settings each architecture is usually trained with (a checkpoint's own settings win).
DEFAULT_GRAPHS = {
    "cgcnn": GraphConfig(cutoff=8.0, max_neighbors=12),
    # Devi et al.: ALIGNN's own graphs (jarvis-tools' k-nearest edges, undirected; 8 Å is its first search radius)
    "alignn": GraphConfig(cutoff=8.0, max_neighbors=12, construction="jarvis"),
    "megnet": GraphConfig(cutoff=4.0, max_neighbors=24),  # ParAIsite: 4 Å, all neighbours in practice
    # CHGNet 0.3.0's own graphs: every neighbour within 6 Å, and its bond graph of bonds shorter than 3 Å
    "chgnet": GraphConfig(cutoff=6.0, construction="chgnet"),
}


LOSSES = ("mse", "l1")
# What picks the epoch a run keeps, and the trial a sweep keeps (Optuna's objective), on the validation split:
# loss (the training loss in scaled units), mae (raw units), mae_log10 (kappa), r2 (as 1 - R²). Default: the
# metric that judges the dataset (ltc.targets.HEADLINE: kappa mae_log10, other properties r2; several datasets: loss)
SELECT_BY = ("loss", "mae", "mae_log10", "r2")
SCHEDULES = ("onecycle", "cosine", "constant")
HEADS = ("auto", "keep", "new")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-5
    loss: str = "mse"  # one of LOSSES
    schedule: str = "onecycle"  # one of SCHEDULES
    patience: int | None = None  # stop after this many epochs without a better validation score
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:1 …
    grad_clip: float | None = None
    select_by: str | None = None  # one of SELECT_BY; None: the dataset's judging metric (ltc.train.selection)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} must be an integer >= 1")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"lr={self.lr!r} must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay!r} must be >= 0")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r} must be one of {LOSSES}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} must be one of {SCHEDULES}")
        if self.select_by is not None and self.select_by not in SELECT_BY:
            raise ConfigError(f"select_by={self.select_by!r} must be one of {SELECT_BY}")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise ConfigError(f"patience={self.patience!r} must be an integer >= 1 or None")


STRATEGIES = ("all", "blocks", "last_layer", "new_head", "two_body", "three_body")  # see ltc.transfer


def check_strategy(model: str, config: ModelConfig, strategy: str, n_unfrozen: int | None) -> None:
    """A ``ConfigError`` if ``strategy`` / ``n_unfrozen`` do not fit model ``model`` of ``config`` (no model is
    built: ``ltc.archs.ARCHS`` knows its blocks and three-body parts)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy={strategy!r} must be one of {STRATEGIES}")
    n_blocks = ARCHS[model].n_blocks(config)
    if strategy == "blocks":
        if isinstance(n_unfrozen, bool) or not isinstance(n_unfrozen, int):
            raise ConfigError(f"strategy 'blocks' needs n_unfrozen (0..{n_blocks}), got {n_unfrozen!r}")
        if not 0 <= n_unfrozen <= n_blocks:
            raise ConfigError(
                f"n_unfrozen={n_unfrozen} must be between 0 and {n_blocks} ({model} has {n_blocks} blocks)"
            )
    elif n_unfrozen is not None:
        raise ConfigError(f"n_unfrozen={n_unfrozen} only goes with strategy 'blocks', not {strategy!r}")
    if strategy == "three_body" and not ARCHS[model].three_body(config):
        raise ConfigError(
            f"three_body needs model alignn or chgnet: {model} has no three-body (bond-angle) updates; "
            "use alignn or chgnet, or two_body / last_layer / new_head / blocks / all"
        )


def check_select_by(select_by: str | None, datasets_: Sequence[str], *, kappa: bool) -> None:
    """A ``ConfigError`` if ``select_by`` cannot pick the epochs of a run on ``datasets_`` (the first of them kappa
    or not): a metric other than the loss has no common units over several datasets, and MAE log10 is kappa's.
    ``ltc.train.selection`` (in the run) and the sweep spec (at load, --dry-run) both ask here."""
    if select_by not in (None, "loss") and len(datasets_) > 1:
        raise ConfigError(
            f"select_by={select_by!r} needs one dataset per run; {'+'.join(datasets_)} train together: use loss"
        )
    if select_by == "mae_log10" and not kappa:
        raise ConfigError(f"select_by='mae_log10' is for kappa datasets; {datasets_[0]} is not one")


def _chgnet_pretrained(version: str) -> tuple[CrystalGNN, GraphConfig, dict[str, Any]]:
    from ltc.models.chgnet import load_pretrained  # torch and chgnet, only when the weights are asked for

    return load_pretrained(version)


@dataclass(frozen=True)
class Pretrained:
    """A pretrained model ltc can start from by name (``ltc train --init NAME``), with no property head."""

    model: str  # a name in ltc.archs.MODEL_NAMES
    description: str  # one line, for help texts
    # () -> (model with a fresh head, the graphs it was trained on, {where the weights came from})
    load: Callable[[], tuple[CrystalGNN, GraphConfig, dict[str, Any]]]


# Pretrained names → how to load them; weights come from installed packages, never from the network.
PRETRAINED: dict[str, Pretrained] = {
    "chgnet-0.3.0": Pretrained(
        "chgnet",
        "CHGNet 0.3.0 (Deng et al. 2023), trained on MPtrj energies, forces, stresses and magmoms; "
        "weights from the chgnet wheel (pip install 'ltc[chgnet]')",
        functools.partial(_chgnet_pretrained, "0.3.0"),
    ),
}


@dataclass(frozen=True)
class RunConfig:
    """One PT or FT training run. ``init`` (a checkpoint path, or a name in ``PRETRAINED``) makes it
    a fine-tuning run."""

    datasets: tuple[str, ...]
    model: str | None = None  # from the checkpoint when fine-tuning
    model_config: dict[str, Any] = field(default_factory=dict)  # overrides of the model's config fields
    graph: GraphConfig | None = None  # default: the checkpoint's, else DEFAULT_GRAPHS[model]
    size: int | None = None  # exactly this many train+val structures per dataset (None: all)
    max_size: int | None = None  # at most this many (PT size caps)
    seed: int = 0
    split: SplitConfig = SplitConfig()
    fold: int | None = None  # kfold: the test fold of this run …
    repeat: int | None = None  # … in this repeat
    holdout: tuple[str, ...] = ()  # keep formulas of these datasets' test sets out of training
    transform: str | None = None  # target transform; default: the dataset's
    init: str | None = None
    strategy: str = "all"
    n_unfrozen: int | None = None
    head: str = "auto"  # one of HEADS (see ltc.transfer.model_from_checkpoint)
    train: TrainConfig = TrainConfig()

    def __post_init__(self) -> None:
        if isinstance(self.datasets, str):
            object.__setattr__(self, "datasets", (self.datasets,))
        if not self.datasets:
            raise ConfigError("a run needs at least one dataset")
        for name in self.datasets:
            # the name's syntax only: a declared dataset is unknown in a trial's process (inputs resolve it)
            datasets.check_name(name)
        if len(set(self.datasets)) != len(self.datasets):
            raise ConfigError(f"datasets={list(self.datasets)} names a dataset twice")
        if self.init is None and self.model is None:
            raise ConfigError(f"name a model ({', '.join(MODEL_NAMES)}) or a checkpoint to start from")
        if self.model is not None and self.model not in MODEL_NAMES:
            raise ConfigError(f"model={self.model!r} must be one of {list(MODEL_NAMES)}")
        if self.init is None and (self.strategy != "all" or self.n_unfrozen is not None):
            raise ConfigError(f"strategy={self.strategy!r} / n_unfrozen need a checkpoint to start from (init)")
        if self.size is not None and self.max_size is not None:
            raise ConfigError("give size or max_size, not both")
        if self.transform is not None and self.transform not in TRANSFORMS:
            raise ConfigError(f"transform={self.transform!r} must be one of {TRANSFORMS}")
        if self.head not in HEADS:
            raise ConfigError(f"head={self.head!r} must be one of {HEADS}")
        if not self.split.kfold and (self.fold is not None or self.repeat is not None):
            raise ConfigError(f"fold / repeat go with a kfold split, not {self.split.test!r}")


# What `ltc report` writes (``ltc.results``), for its --help: here, where reading it costs no scipy or matplotlib
REPORT_HELP = (
    "Read RESULTS_DIR/trials.parquet and write RESULTS_DIR/report.md with PNG figures beside it. Each unit (a "
    "seed, or a fold of a repeat) is represented by its trial with the lowest validation score (what picks "
    "epochs and trials: select_by, by default the dataset's judging metric). Tables: "
    "pre-training per dataset and size (mean ± std over seeds); per FT dataset and size, every start and scratch "
    "by the dataset's headline metric (kappa: MAE of log10 kappa; other properties: R²), as mean ± std over "
    "seeds, or over repeats of pooled out-of-fold predictions (K-fold); paired comparisons A − B of each start "
    "against scratch and of starts against each other, with a 95 % corrected resampled t interval, win count "
    "and verdict (fewer than 3 pairs: cannot be judged); how much the validation-score pick lost on test; and "
    "the cell with the lowest validation score, scratch included. Figures: a PT × FT heatmap of A − B (start "
    "minus scratch, as in the paired table; unjudged cells hatched), metrics against FT and PT size, "
    "strategies, a parity plot of the lowest-validation-score cell per FT dataset (K-fold: its pooled "
    "out-of-fold predictions, with the table's headline), and the Optuna trials. Partial sweeps work: what is "
    "missing is shown as missing."
)
