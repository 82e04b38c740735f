"""Experiment trackers for a sweep's trials, through Ray Tune's own logger callbacks (``ltc sweep --tracking``).

``mlflow:URI``: each trial is one MLflow run (Ray's ``MLflowLoggerCallback``) in the experiment named for the sweep,
its config as params and its reports as metrics. ``wandb``: each trial is one W&B run (Ray's
``WandbLoggerCallback``) in the project named for the sweep, grouped by stage; offline unless ``WANDB_MODE`` or
``WANDB_API_KEY`` says otherwise, so nothing leaves the machine unasked (``wandb sync`` sends the runs written in
``<results>/<sweep>/wandb/`` later). Either run carries the trial's setting as tags (``setting_tags``).
TensorBoard needs nothing here: Tune writes event files into every trial's folder.

Parsing (``parse_tracking``) imports neither Ray nor a tracker, so ``--dry-run`` checks the values and the
packages without them; ``callbacks`` builds a stage's callbacks once Ray runs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ltc.errors import ConfigError

log = logging.getLogger(__name__)

INSTALL = "pip install 'ltc[tracking]'"
PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}  # tracker → the module it needs (mlflow-skinny provides mlflow)

WANDB_TAG_CHARS = 64  # W&B refuses longer tags; the full values are in the run's config


@dataclass(frozen=True)
class Tracker:
    """One ``--tracking`` value: ``kind`` (mlflow, wandb) and, for MLflow, its tracking URI."""

    kind: str
    uri: str | None = None


def parse_tracking(values: Iterable[str] | None) -> list[Tracker]:
    """The trackers of ``--tracking`` values; ``ConfigError`` naming a bad value or a package that is missing."""
    out: list[Tracker] = []
    for value in values or ():
        kind, sep, rest = value.partition(":")
        if kind == "mlflow":
            tracker = Tracker("mlflow", _mlflow_uri(value, rest if sep else os.environ.get("MLFLOW_TRACKING_URI", "")))
        elif kind == "wandb":
            if sep:
                raise ConfigError(
                    f"--tracking {value}: wandb takes no value; WANDB_PROJECT, WANDB_ENTITY and WANDB_MODE set it"
                )
            tracker = Tracker("wandb")
        else:
            raise ConfigError(f"--tracking {value}: unknown tracker {kind!r}; use mlflow:URI or wandb")
        if importlib.util.find_spec(PACKAGES[kind]) is None:
            raise ConfigError(f"--tracking {kind} needs {PACKAGES[kind]}: {INSTALL}")
        if tracker in out or (kind == "wandb" and any(t.kind == "wandb" for t in out)):
            raise ConfigError(f"--tracking {value} is given twice")
        out.append(tracker)
    return out


def _mlflow_uri(value: str, uri: str) -> str:
    """An MLflow tracking URI, checked; a plain folder becomes an absolute ``file:`` URI (the driver's working
    directory may not be the user's: a Ray job's copy)."""
    if not uri:
        raise ConfigError(
            f"--tracking {value}: give MLflow's tracking URI, e.g. mlflow:sqlite:////abs/mlflow.db or "
            "mlflow:http://127.0.0.1:5000 (or set MLFLOW_TRACKING_URI)"
        )
    parts = urlsplit(uri)
    if parts.password is not None:  # it would be printed, pickled into Tune's state and logged
        raise ConfigError(
            f"--tracking mlflow:{parts.scheme}://…: a password in the URI; set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead"
        )
    if not parts.scheme or len(parts.scheme) == 1:  # a path (C:\… has a one-letter "scheme")
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def setting_tags(config: Mapping[str, Any], *, sweep: str) -> dict[str, str]:
    """The setting of a trial of ``sweep`` (its config: ``ltc.sweep.plan.trial_config``) as string tags, named and
    valued as the trials table's columns (``ltc.results``), so that runs filter and join like its rows; values
    that are None left out. Optuna's proposals (lr, n_unfrozen) and the paths stay params."""
    kind = config.get("kind")
    values = {
        "sweep": sweep,
        "stage": config.get("stage"),
        "kind": kind,
        "setting": config.get("setting"),
        "dataset": "+".join(config.get("datasets") or []) or None,
        "size": config.get("size") if config.get("size") is not None else config.get("max_size"),
        "start": config.get("start"),
        "lineage": config.get("lineage"),
        "arch": config.get("arch"),
        # the trials table's strategy: what pre-training and scratch trials do is their kind
        "strategy": kind if kind in ("pretrain", "scratch") else config.get("strategy"),
        "seed": config.get("seed"),
        "fold": config.get("fold"),
        "repeat": config.get("repeat"),
    }
    return {key: str(value) for key, value in values.items() if value is not None}


def _trial_tags(trial: Any, *, sweep: str) -> dict[str, str]:
    """A Tune trial's setting tags and its id (the trials table's ``trial_id``, its folder's name)."""
    return {**setting_tags(trial.config, sweep=sweep), "trial_id": trial.trial_id}


def open_stores(trackers: Iterable[Tracker], *, sweep: str) -> None:
    """Open each MLflow store now: one that refuses (a file store MLflow no longer accepts, a server that is down)
    fails in one line before Ray starts and the results folder is claimed, not once the sweep runs."""
    for tracker in trackers:
        if tracker.kind == "mlflow":
            assert tracker.uri is not None  # parse_tracking gave it one
            _open_mlflow(tracker.uri, _experiment(sweep))


def _experiment(sweep: str) -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or sweep


def _open_mlflow(uri: str, experiment: str) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    except MlflowException as err:
        raise ConfigError(f"--tracking mlflow:{uri}: {str(err.message).splitlines()[0]}") from None


def callbacks(trackers: Iterable[Tracker], *, sweep: str, stage: str, root: str | os.PathLike[str]) -> list[Any]:
    """Tune logger callbacks of ``trackers`` for one stage of ``sweep`` whose results folder is ``root``. An MLflow
    store is opened here too (``open_stores``), so one that refuses fails before the stage's trials start."""
    out: list[Any] = []
    for tracker in trackers:
        if tracker.kind == "mlflow":
            assert tracker.uri is not None  # parse_tracking gave it one
            out.append(_mlflow_callback(tracker.uri, sweep=sweep))
        else:
            out.append(_wandb_callback(sweep=sweep, stage=stage, root=root))
    return out


def _mlflow_callback(uri: str, *, sweep: str) -> Any:
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    experiment = _experiment(sweep)
    _open_mlflow(uri, experiment)

    class SettingMLflow(MLflowLoggerCallback):
        """Ray's callback, with each trial's run tagged with the trial's setting."""

        def log_trial_start(self, trial: Any) -> None:
            # Ray tags every run with the callback's `tags` when it creates it: the trial's own are added for it
            shared = self.tags
            self.tags = {**shared, **_trial_tags(trial, sweep=sweep)}
            try:
                super().log_trial_start(trial)
            finally:
                self.tags = shared

    return SettingMLflow(tracking_uri=uri, experiment_name=experiment)


def _wandb_callback(*, sweep: str, stage: str, root: str | os.PathLike[str]) -> Any:
    from ray.air.integrations.wandb import WandbLoggerCallback

    mode = os.environ.get("WANDB_MODE") or (None if os.environ.get("WANDB_API_KEY") else "offline")
    if mode == "offline" and "WANDB_MODE" not in os.environ:
        # Ray's callback asks for an API key on the driver unless WANDB_MODE says offline there
        os.environ["WANDB_MODE"] = "offline"
        log.info("wandb: offline (set WANDB_MODE or WANDB_API_KEY to send runs to W&B)")
    # passed explicitly: the callback's logging actors run in Ray workers, whose environment is not the driver's.
    # dir: by default they write into Tune's staging copy of each trial's folder (under Ray's temporary folder),
    # and the copy Tune syncs to the storage can be taken before W&B has finished writing; the results folder
    # lies on the driver's machine, where Ray runs those actors, and keeps all runs together for `wandb sync`
    init: dict[str, Any] = {"dir": os.environ.get("WANDB_DIR") or str(root)}
    if mode:
        init["mode"] = mode
    if os.environ.get("WANDB_ENTITY"):
        init["entity"] = os.environ["WANDB_ENTITY"]

    class SettingWandb(WandbLoggerCallback):
        """Ray's callback, with each trial's run tagged with the trial's setting (``key=value`` tags)."""

        def log_trial_start(self, trial: Any) -> None:
            # Ray passes the callback's `kwargs` to wandb.init for every run: the trial's tags are added for it
            shared = self.kwargs
            tags = [f"{k}={v}"[:WANDB_TAG_CHARS] for k, v in _trial_tags(trial, sweep=sweep).items()]
            self.kwargs = {**shared, "tags": tags}
            try:
                super().log_trial_start(trial)
            finally:
                self.kwargs = shared

    return SettingWandb(project=os.environ.get("WANDB_PROJECT") or sweep, group=stage, **init)
