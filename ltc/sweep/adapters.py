"""Ray Tune adapters: the searcher (Optuna inside each setting), the per-setting scheduler, the progress bar.

``SettingSearch`` is a Tune ``Searcher`` holding one Optuna study per setting; it hands out each
setting's trials in turn, so every slot stays busy across settings in one ``Tuner``.
``PerSettingASHA`` runs successive halving separately per setting (validation losses of different
datasets or sizes are not comparable). ``Progress`` draws one bar per stage.
"""

from __future__ import annotations

import math
import pickle
from collections import Counter
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import Searcher

from ltc.sweep.spec import Range, SearchSpec
from ltc.trial import COMPLETED

METRIC, MODE = "val_loss", "min"


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
        self.reported: dict[str, int] = {}  # Tune trial id → last epoch reported to its Optuna trial

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
            value, step = result[self.metric], int(result["epoch"])
            # a trial resumed from a checkpoint reports its epochs after that checkpoint again: once is enough
            if value is not None and math.isfinite(value) and step > self.reported.get(trial_id, -1):
                self.reported[trial_id] = step
                self.live[trial_id][1].report(value, step)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        import optuna

        if trial_id not in self.live:
            return
        result = result or {}
        if not error and not result.get(COMPLETED) and not result.get("done"):
            return  # stopped by an interrupt, not by the scheduler: it resumes later and is told then
        key, trial = self.live.pop(trial_id)
        study = self.studies[key]
        value = result.get(self.metric)
        if error or value is None or not math.isfinite(value):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        elif result.get(COMPLETED):
            study.tell(trial, value)
        else:  # stopped early by ASHA (Tune marks the scheduler's stops done=True)
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
