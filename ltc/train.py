"""Training: ``fit`` a model on one or more tasks, ``evaluate`` it in raw units, ``run_stage`` end to end.

A *task* is one dataset's shards, its split and its target scaler; several tasks train one head each
on a shared backbone (multi-property pre-training). Batches come from one task at a time, interleaved
in a seeded random order; the loss of a batch is taken on its task's head only, which is the masked
loss of Devi et al.'s MPT when each structure carries one property.

``train_run`` is one PT or FT run: it opens the shards its ``RunInputs`` name, splits, scales, builds
or loads the model, freezes per strategy, fits, evaluates and writes ``metrics.json``,
``checkpoint.pt`` and ``predictions.parquet``. ``ltc train`` and each Ray Tune trial call it; both
resolve the inputs first (``ltc.inputs.resolve_inputs``), so a run never reads raw data or hashes files.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ltc.checkpoints import save_checkpoint
from ltc.choices import (
    DEFAULT_GRAPHS,
    RunConfig,
    TrainConfig,
    check_select_by,
)  # defined without torch; used and re-exported here
from ltc.errors import ConfigError
from ltc.graphs import GraphConfig
from ltc.inputs import RunInputs, resolve_inputs
from ltc.io import write_json_atomic, write_parquet_atomic
from ltc.models import MODELS, CrystalGNN, build_model
from ltc.shards import ShardSet
from ltc.splits import Split, make_split
from ltc.targets import HEADLINE, TargetScaler, regression_metrics
from ltc.transfer import check_strategy, freeze, load_init, model_from_checkpoint

log = logging.getLogger(__name__)

MIN_IMPROVEMENT = 1e-6  # relative decrease of the validation score that counts as better


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but no CUDA device is available")
    return dev


@dataclass
class Task:
    """One target: a dataset's shards, its split, and the scaler fit on its training split."""

    name: str
    shards: ShardSet
    split: Split
    scaler: TargetScaler
    kappa: bool = False
    y_scaled: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.y_scaled = self.scaler.transform(self.shards.y).astype(np.float32)


@dataclass
class FitResult:
    epochs_run: int
    best_epoch: int
    best_val_loss: float | None  # the validation loss of the kept epoch
    best_val_score: float | None  # its validation score, what picked it (``selection``)
    select_by: str
    history: list[dict[str, float]]
    train_seconds: float
    data_seconds: float  # of which spent building batches and moving them to the device
    skipped_batches: int
    stopped_early: bool


def _loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return nn.functional.mse_loss if name == "mse" else nn.functional.l1_loss


def _epoch_plan(tasks: list[Task], batch_size: int, seed: int, epoch: int) -> list[tuple[int, np.ndarray]]:
    """(task, indices) batches of one epoch, shuffled within tasks and interleaved across them."""
    plan: list[tuple[int, np.ndarray]] = []
    for k, task in enumerate(tasks):
        idx = np.random.default_rng([seed, epoch, k]).permutation(task.split.train)
        chunks = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        if len(chunks) > 1 and len(chunks[-1]) == 1:
            # a one-graph batch can have a single atom, which BatchNorm cannot normalise
            chunks[-2] = np.concatenate([chunks[-2], chunks.pop()])
        plan.extend((k, c) for c in chunks)
    order = np.random.default_rng([seed, epoch, len(tasks)]).permutation(len(plan))
    return [plan[i] for i in order]


def _make_optimizer(model: nn.Module, config: TrainConfig, total_steps: int):
    # only parameters that train: the optimizer never holds (or decays) a frozen one
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen")
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=max(total_steps, 1))
    elif config.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    else:
        sched = None
    return opt, sched


@torch.no_grad()
def predict(model: CrystalGNN, task: Task, indices: np.ndarray, *, head: int, batch_size: int = 256) -> np.ndarray:
    """Predictions in raw units for ``indices`` of ``task`` (model put in eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(indices), batch_size):
        batch = task.shards.batch(indices[i : i + batch_size]).to(device)
        out.append(model(batch)[:, head].double().cpu().numpy())
    scaled = np.concatenate(out) if out else np.zeros(0)
    return task.scaler.inverse(scaled)


# Fewer validation structures than this: R² is left to one point (SST over a handful of values), MAE selects.
R2_MIN_VAL = 10


def selection(select_by: str | None, tasks: list[Task]) -> str:
    """What picks a run's epoch (and a sweep's trial): ``select_by`` checked against the tasks, or by default the
    metric that judges the dataset (``HEADLINE``: kappa MAE log10, other properties R²); several datasets have
    no one metric in common units: their loss."""
    check_select_by(select_by, [t.name for t in tasks], kappa=tasks[0].kappa)
    select = select_by or ("loss" if len(tasks) > 1 else HEADLINE[tasks[0].kappa].metric)
    if select == "r2":
        # R² needs two different validation targets, and over a few it is one point's (a fine-tune of 10-49
        # structures validates on 2-9). Decided once per run (never epoch by epoch): MAE orders the epochs instead.
        task = tasks[0]
        if len(task.split.val) < R2_MIN_VAL or len(np.unique(task.shards.y[task.split.val])) < 2:
            log.info("%s: R² on %d validation structure(s) is one point's; epochs are kept by MAE", task.name,
                     len(task.split.val))  # fmt: skip
            return "mae"
    return select


@torch.no_grad()
def _validate(
    model: CrystalGNN, tasks: list[Task], loss: Callable, batch_size: int, select: str
) -> tuple[float, float]:
    """(validation loss in scaled units, validation score: what ``select`` minimises) in one pass; NaN without
    a validation split. Scores: mae, mae_log10 in raw units (log10 for kappa), r2 as 1 - R²."""
    model.eval()
    device = next(model.parameters()).device
    total, count, scaled = 0.0, 0, []
    for k, task in enumerate(tasks):
        for i in range(0, len(task.split.val), batch_size):
            idx = task.split.val[i : i + batch_size]
            batch = task.shards.batch(idx).to(device)
            target = torch.from_numpy(task.y_scaled[idx]).to(device)
            out = model(batch)[:, k]
            total += loss(out, target, reduction="sum").item()
            count += len(idx)
            if select != "loss":  # the loss needs no copy of the predictions off the device
                scaled.append(out.double().cpu().numpy())
    if not count:
        return math.nan, math.nan
    val_loss = total / count
    if select == "loss":
        return val_loss, val_loss
    task = tasks[0]  # selection(): a metric other than the loss has one task
    m = regression_metrics(task.shards.y[task.split.val], task.scaler.inverse(np.concatenate(scaled)), kappa=task.kappa)
    value = m[select]
    if value is None:  # R² of a constant validation target, log10 metrics without a positive value
        return val_loss, math.nan
    return val_loss, 1.0 - value if select == "r2" else value


def fit(
    model: CrystalGNN,
    tasks: list[Task],
    config: TrainConfig,
    *,
    on_epoch: Callable[[dict[str, float], Callable[[], dict[str, Any]]], bool | None] | None = None,
    resume: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` on ``tasks`` (task k → head k); the best validation epoch's weights are kept.

    ``on_epoch(record, state)`` is called after every epoch with ``record`` (epoch, train_loss,
    val_loss, val_score, lr, seconds) and ``state()``, which returns a dict from which ``fit(resume=…)`` continues
    exactly where this run is; returning True stops training. Batch order depends only on (seed,
    epoch), so a resumed run follows the same path as an uninterrupted one.
    """
    if len(tasks) != len(model.heads):
        raise ValueError(f"{len(tasks)} task(s) but the model has {len(model.heads)} head(s)")
    device = next(model.parameters()).device
    loss = _loss_fn(config.loss)
    steps = len(_epoch_plan(tasks, config.batch_size, config.seed, 0))
    opt, sched = _make_optimizer(model, config, config.epochs * steps)

    select = selection(config.select_by, tasks)
    if resume is not None:  # a run continues as it began; a state written before select_by was picked by the loss
        select = resume.get("select", "loss")
    start_epoch, best_val, best_loss, best_epoch, bad, history = 0, math.inf, math.nan, -1, 0, []
    best_state: dict[str, torch.Tensor] | None = None
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        if sched is not None and resume.get("scheduler") is not None:
            sched.load_state_dict(resume["scheduler"])
        start_epoch = resume["epoch"] + 1
        best_val = resume["best_val"] if resume["best_val"] is not None else math.inf
        best_epoch, bad, history = resume["best_epoch"], resume["bad_epochs"], list(resume["history"])
        best_loss = history[best_epoch]["val_loss"] if 0 <= best_epoch < len(history) else math.nan
        best_state = resume.get("best_state")

    t_start, data_s, skipped, stopped = time.perf_counter(), 0.0, 0, False
    epoch = start_epoch - 1
    for epoch in range(start_epoch, config.epochs):
        t_epoch = time.perf_counter()
        model.train()
        running, seen = 0.0, 0
        for k, idx in _epoch_plan(tasks, config.batch_size, config.seed, epoch):
            t0 = time.perf_counter()
            batch = tasks[k].shards.batch(idx).to(device)
            target = torch.from_numpy(tasks[k].y_scaled[idx]).to(device)
            data_s += time.perf_counter() - t0
            if batch.num_nodes < 2:
                skipped += 1  # BatchNorm cannot train on one atom (batch size 1, one-atom cell)
                continue
            out = model(batch)[:, k]
            batch_loss = loss(out, target)
            opt.zero_grad(set_to_none=True)
            batch_loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            if sched is not None:
                sched.step()
            running += batch_loss.item() * len(idx)
            seen += len(idx)
        val_loss, val = _validate(model, tasks, loss, max(config.batch_size, 64), select)
        record = {
            "epoch": epoch,
            "train_loss": running / seen if seen else float("nan"),
            "val_loss": val_loss,
            "val_score": val,
            "lr": opt.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t_epoch,
        }
        history.append(record)
        # "better" means by a relative 1e-6: rounding noise must not reset the patience count
        if math.isfinite(val) and (not math.isfinite(best_val) or val < best_val * (1 - MIN_IMPROVEMENT)):
            best_val, best_loss, best_epoch, bad = val, val_loss, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1

        def state(epoch: int = epoch, best: tuple = (best_val, best_epoch, best_state, bad)) -> dict[str, Any]:
            # copies: the live tensors change in place when training goes on (or the best weights return)
            return copy.deepcopy(
                {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched is not None else None,
                    "best_val": best[0] if math.isfinite(best[0]) else None,
                    "select": select,
                    "best_epoch": best[1],
                    "best_state": best[2],
                    "bad_epochs": best[3],
                    "history": list(history),
                }
            )

        if on_epoch is not None and on_epoch(record, state):
            stopped = True
            break
        if config.patience is not None and math.isfinite(val) and bad >= config.patience:
            stopped = True
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:  # no validation set: the last epoch stands
        best_epoch = epoch
    return FitResult(
        epochs_run=epoch + 1,
        best_epoch=best_epoch,
        best_val_loss=best_loss if math.isfinite(best_loss) else None,
        best_val_score=best_val if math.isfinite(best_val) else None,
        select_by=select,
        history=history,
        train_seconds=time.perf_counter() - t_start,
        data_seconds=data_s,
        skipped_batches=skipped,
        stopped_early=stopped,
    )


# --------------------------------------------------------------------------------------------------
# One run, end to end.


def graph_for(stage: RunConfig, ckpt: dict[str, Any] | None, model_name: str) -> GraphConfig:
    """The graphs a run trains on: the checkpoint's (a different request is an error), else asked or default."""
    if ckpt is not None:
        trained = GraphConfig(**ckpt["graph"])
        if stage.graph is not None and stage.graph != trained:
            raise ConfigError(f"the checkpoint was trained on graphs {trained}; this run asks for {stage.graph}")
        return trained
    graph = stage.graph or DEFAULT_GRAPHS[model_name]
    readable = MODELS[model_name].constructions
    if readable is not None and graph.construction not in readable:
        raise ConfigError(f"model {model_name} needs graphs of construction {' or '.join(readable)}, not {graph}")
    return graph


def _fresh_model(stage: RunConfig, graph: GraphConfig) -> CrystalGNN:
    cls = MODELS[stage.model]  # type: ignore[index]
    defaults: dict[str, Any] = {"n_targets": len(stage.datasets)}
    # the bond-length expansion spans the graph's cutoff (MEGNet: cutoff + 1, as matgl)
    known = set(cls.config_class.__dataclass_fields__)
    if "rbf_stop" in known:
        defaults["rbf_stop"] = graph.cutoff + (1.0 if stage.model == "megnet" else 0.0)
    # the line graph of the graphs' construction (ALIGNN's keeps bond pairs a→b→a on the reference graphs)
    if "backtracking" in known:
        defaults["backtracking"] = graph.line_graph_backtracking
    # CHGNet's bond bases reach zero at the graphs' cutoffs
    if "atom_graph_cutoff" in known:
        defaults.update(atom_graph_cutoff=graph.cutoff, bond_graph_cutoff=graph.bond_cutoff)
    torch.manual_seed(stage.train.seed)
    return build_model(stage.model, {**defaults, **stage.model_config})  # type: ignore[arg-type]


def run_inputs(
    stage: RunConfig,
    *,
    home: str | os.PathLike[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> RunInputs:
    """Resolve what ``stage`` reads (shards built or verified, split ids, held-out formulas), once."""
    ckpt = load_init(stage.init, model=stage.model) if stage.init else None
    graph = graph_for(stage, ckpt, ckpt["model"]["name"] if ckpt else stage.model)  # type: ignore[arg-type]
    return resolve_inputs(
        stage.datasets, holdout=stage.holdout, graph=graph, split=stage.split, home=home, cache=cache,
        progress=progress,
    )  # fmt: skip


@torch.no_grad()
def start_heads_at_mean(model: CrystalGNN, tasks: list[Task]) -> None:
    """Set the output bias of each fresh head (head k: task k) to the mean of its task's scaled training targets.

    A heavy-tailed target min-max scaled to [-1, 1] sits far from 0 (the phonon set: mean -0.71, std 0.28), so a
    head starting near 0 begins at an MSE several times the targets' variance, and a short fine-tune spends its
    first epochs learning that offset. Starting at the mean, the first epoch begins near the variance. The
    weights stay as initialised (random features, small outputs), so only the offset moves.
    """
    for head, task in zip(model.heads, tasks, strict=True):
        head.out.bias.fill_(float(task.y_scaled[task.split.train].mean()))


def train_run(
    stage: RunConfig,
    out_dir: str | os.PathLike[str],
    *,
    inputs: RunInputs | None = None,
    home: str | os.PathLike[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    on_epoch: Callable[[dict[str, float], Callable[[], dict[str, Any]]], bool | None] | None = None,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one run and write ``out_dir/{metrics.json, checkpoint.pt, predictions.parquet}``; return metrics.

    ``inputs``: what the run reads, resolved by the caller (a sweep trial always passes them); None
    resolves them here first from ``home`` and ``cache`` (``run_inputs``).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    if stage.split.kfold and (stage.fold is None or stage.repeat is None):
        raise ConfigError("a kfold run needs fold and repeat (train_kfold runs them all)")
    ckpt = load_init(stage.init, model=stage.model) if stage.init else None
    model_name = ckpt["model"]["name"] if ckpt else stage.model
    assert model_name is not None
    graph = graph_for(stage, ckpt, model_name)
    if inputs is None:
        inputs = run_inputs(stage, home=home, cache=cache)

    exclude = inputs.holdout_formulas()
    tasks = []
    for name in stage.datasets:
        shards = inputs.open_shards(name)
        if shards.graph != graph:
            raise ConfigError(f"shards {shards.path} hold graphs {shards.graph}; this run needs {graph}")
        ids = inputs.split_ids(name)
        info = shards.target
        size = stage.size
        if stage.max_size is not None:
            size = None  # capped below, after the pool is known
        where = {
            "config": stage.split,
            "exclude_formulas": exclude,
            "ids": ids,
            "fold": stage.fold,
            "repeat": stage.repeat,
        }
        split = make_split(shards, size=size, seed=stage.seed, **where)
        if stage.max_size is not None and len(split.train) + len(split.val) > stage.max_size:
            split = make_split(shards, size=stage.max_size, seed=stage.seed, **where)
        if len(split.train) == 0:
            raise ConfigError(f"{shards.name}: no training structures (size={stage.size}, seed={stage.seed})")
        scaler = TargetScaler.fit(stage.transform or info.transform, shards.y[split.train])
        tasks.append(Task(shards.name, shards, split, scaler, kappa=info.kappa))

    torch.manual_seed(stage.train.seed)  # fresh heads of a fine-tuned model are seeded too
    if ckpt is not None:
        model = model_from_checkpoint(ckpt, n_targets=len(tasks), strategy=stage.strategy, head=stage.head)
        if stage.model_config:
            raise ConfigError("model_config overrides apply to new models; a checkpoint brings its own config")
    else:
        model = _fresh_model(stage, graph)
    if ckpt is None or getattr(model, "fresh_heads", False):
        start_heads_at_mean(model, tasks)
    check_strategy(model, stage.strategy, stage.n_unfrozen)
    device = resolve_device(stage.train.device)
    model.to(device)
    freeze(model, strategy=stage.strategy, n_unfrozen=stage.n_unfrozen)
    torch.manual_seed(stage.train.seed)
    log.info("%s on %s: %s", model_name, "+".join(stage.datasets), model)

    result = fit(model, tasks, stage.train, on_epoch=on_epoch, resume=resume)

    metrics: dict[str, Any] = {}
    rows = []
    for k, task in enumerate(tasks):
        prefix = "" if len(tasks) == 1 else f"{task.name}/"
        for part in ("val", "test"):
            idx = getattr(task.split, part)
            pred = predict(model, task, idx, head=k)
            true = task.shards.y[idx]
            for key, value in regression_metrics(true, pred, kappa=task.kappa).items():
                metrics[f"{prefix}{part}_{key}"] = value
            ids = task.shards.ids
            rows.extend(
                {"dataset": task.name, "split": part, "id": ids[i], "y_true": float(t), "y_pred": float(p)}
                for i, t, p in zip(idx, true, pred, strict=True)
            )
        metrics.update({f"{prefix}{k2}": v for k2, v in task.split.sizes().items()})
    metrics.update(
        {
            "datasets": list(stage.datasets),
            "model": model_name,
            "strategy": stage.strategy,
            "n_unfrozen": stage.n_unfrozen,
            "lr": stage.train.lr,
            "seed": stage.seed,
            "fold": stage.fold,
            "repeat": stage.repeat,
            "size": stage.size if stage.size is not None else stage.max_size,
            "init": str(stage.init) if stage.init else None,
            "graph": graph.to_dict(),
            "val_loss": result.best_val_loss,
            "val_score": result.best_val_score,
            "select_by": result.select_by,
            "transform": "+".join(t.scaler.kind for t in tasks),  # the target transform each head learnt in
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early,
            "skipped_batches": result.skipped_batches,
            "train_seconds": round(result.train_seconds, 3),
            "data_seconds": round(result.data_seconds, 3),
            "params_total": model.num_parameters(),
            "params_trainable": model.num_parameters(trainable=True),
            "device": str(device),
        }
    )

    history = list(ckpt["history"]) if ckpt else []
    history.append(
        {
            "stage": len(history),
            "datasets": list(stage.datasets),
            "size": metrics["size"],
            "seed": stage.seed,
            "strategy": stage.strategy,
            "n_unfrozen": stage.n_unfrozen,
            "train": asdict(stage.train),
            "init": str(stage.init) if stage.init else None,
            "epochs_run": result.epochs_run,
            "metrics": {k: v for k, v in metrics.items() if k.startswith(("test_", "val_")) or "/" in k},
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    model.cpu()
    save_checkpoint(
        out / "checkpoint.pt",
        {
            "model": {"name": model_name, "config": model.config.to_dict()},
            "state_dict": model.state_dict(),
            "graph": graph.to_dict(),
            "targets": [
                {
                    "dataset": t.name,
                    "target": t.shards.target.target,
                    "units": t.shards.target.units,
                    "kappa": t.kappa,
                    "scaler": t.scaler.to_dict(),
                }
                for t in tasks
            ],
            "history": history,
            "metrics": _json_safe(metrics),
        },
    )
    _write_predictions(out / "predictions.parquet", rows)
    metrics["wall_seconds"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(out / "metrics.json", _json_safe({**metrics, "history": result.history}))
    return metrics


def fold_runs(stage: RunConfig) -> list[RunConfig]:
    """The runs of a kfold ``stage``: one per (repeat, fold), seeded by the repeat (init, inner split)."""
    if not stage.split.kfold:
        raise ConfigError(f"fold_runs needs a kfold split, not {stage.split.test!r}")
    from dataclasses import replace

    return [
        replace(stage, fold=f, repeat=r, seed=stage.seed + r, train=replace(stage.train, seed=stage.train.seed + r))
        for r in range(stage.split.repeats)
        for f in range(stage.split.folds)
    ]


def pooled_metrics(predictions: Any, *, kappa: bool) -> dict[str, Any]:
    """Per repeat, metrics of the pooled out-of-fold test predictions; then mean and std over repeats.

    ``predictions``: a DataFrame with ``repeat, y_true, y_pred`` (one row per structure and repeat).
    Returns ``{"repeats": [{metric: value}…], "<metric>_mean": …, "<metric>_std": …}`` (std ddof 0).
    """
    per_repeat = []
    for repeat, g in predictions.groupby("repeat", sort=True):
        m = regression_metrics(g.y_true.to_numpy(), g.y_pred.to_numpy(), kappa=kappa)
        per_repeat.append({"repeat": int(repeat), "n": len(g), **m})
    out: dict[str, Any] = {"repeats": per_repeat}
    for key in per_repeat[0] if per_repeat else []:
        if key in ("repeat", "n"):
            continue
        values = [r[key] for r in per_repeat if r[key] is not None]
        out[f"{key}_mean"] = float(np.mean(values)) if values else None
        out[f"{key}_std"] = float(np.std(values)) if values else None
    if "fold" in predictions:
        # each fold's own test metrics, mean and std (np.std) over every fold: Matbench's leaderboard form
        per_fold = []
        for (repeat, fold), g in predictions.groupby(["repeat", "fold"], sort=True):
            m = regression_metrics(g.y_true.to_numpy(), g.y_pred.to_numpy(), kappa=kappa)
            per_fold.append({"repeat": int(repeat), "fold": int(fold), "n": len(g), **m})
        out["folds"] = per_fold
        out["per_fold"] = {}  # metric -> {"mean", "std"} over the folds
        for key in ("mae", "rmse"):
            values = [f[key] for f in per_fold if f[key] is not None]
            out["per_fold"][key] = {"mean": float(np.mean(values)), "std": float(np.std(values))} if values else None
    return out


def train_kfold(
    stage: RunConfig,
    out_dir: str | os.PathLike[str],
    *,
    inputs: RunInputs | None = None,
    home: str | os.PathLike[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    on_epoch: Callable[[dict[str, float], Callable[[], dict[str, Any]]], bool | None] | None = None,
) -> dict[str, Any]:
    """Every (repeat, fold) run of a kfold ``stage`` into ``out_dir/r<repeat>f<fold>/``, then ``cv.json``;
    ``on_epoch`` is each run's (``fit``).

    ``cv.json`` holds the metrics of each repeat's pooled out-of-fold test predictions (every structure
    tested once per repeat) and their mean ± std over repeats; returned as well.
    """
    import pandas as pd

    out = Path(out_dir)
    if inputs is None:
        inputs = run_inputs(stage, home=home, cache=cache)
    preds = []
    for run in fold_runs(stage):
        folder = out / f"r{run.repeat}f{run.fold}"  # as a sweep names a K-fold unit
        train_run(run, folder, inputs=inputs, on_epoch=on_epoch)
        p = pd.read_parquet(folder / "predictions.parquet")
        preds.append(p[p.split == "test"].assign(repeat=run.repeat, fold=run.fold))
    table = pd.concat(preds, ignore_index=True)
    result = {}
    for name, g in table.groupby("dataset", sort=False):
        result[name] = pooled_metrics(g, kappa=inputs.open_shards(str(name)).target.kappa)
    cv = {"folds": stage.split.folds, "repeats": stage.split.repeats, "datasets": result}
    write_json_atomic(out / "cv.json", _json_safe(cv))
    write_parquet_atomic(out / "oof_predictions.parquet", table)
    return cv


def _json_safe(obj: Any) -> Any:
    """NaN and infinities → None, recursively (JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa

    schema = pa.schema(
        [
            ("dataset", pa.string()),
            ("split", pa.string()),
            ("id", pa.string()),
            ("y_true", pa.float64()),
            ("y_pred", pa.float64()),
        ]
    )
    write_parquet_atomic(path, pa.Table.from_pylist(rows, schema=schema))
