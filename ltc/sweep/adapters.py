"""Ray Tune adapters: the searcher (one Optuna study per setting), early stopping, the progress bar.

``SettingSearch`` is a Tune ``Searcher`` that hands out each setting's trials in turn (so every slot
stays busy across settings in one ``Tuner``), each proposed by that setting's Optuna study
(``ltc.sweep.studies``: storage, sampler). ``StudyPruning`` is a Tune scheduler, on Tune's public
scheduler interface, that writes every epoch report into the trial's Optuna trial and, with early
stopping on, stops the trials its study's pruner (successive halving) prunes: each setting is judged
against its own trials only (validation losses of different datasets or sizes are not comparable).
``Progress`` draws one bar per stage.
"""

from __future__ import annotations

import math
import pickle
from collections import Counter, deque
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from ltc.sweep import studies as st
from ltc.sweep.spec import AshaSpec, Range, SearchSpec
from ltc.trial import COMPLETED

METRIC, MODE = "val_loss", "min"
STEP = "epoch_count"  # the step of an epoch report: epochs trained so far
OPTUNA_TRIAL = "optuna_trial"  # trial config key: the number of its Optuna trial in its setting's study


class SettingSearch(Searcher):
    """One Optuna study per setting; ``suggest`` serves the settings in turn (round robin, O(1) each).

    Each suggestion is ``configs[setting] | {"lr": …, "n_unfrozen": …, "trial_index": i, "optuna_trial": n}``.
    A finished trial is told to its study with its best validation loss, one stopped early as pruned,
    a failed one as failed; one stopped by an interrupt is told when it ends after ``--resume``.
    ``storage`` is a reference from ``studies.register_storage``; the studies are opened lazily and are not
    part of the searcher's saved state (Tune's snapshot holds counters and ids only).
    """

    def __init__(
        self,
        configs: dict[str, dict[str, Any]],
        search: dict[str, SearchSpec],
        max_blocks: int,
        *,
        storage: str,
        prefix: str,
        metric: str = METRIC,
        mode: str = MODE,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self.configs = configs  # setting key → trial config without the searched values
        self.search = search  # setting key → its SearchSpec
        self.max_blocks = max_blocks
        self.storage, self.prefix = storage, prefix
        self.index = {key: i for i, key in enumerate(configs)}  # seeds: sampler_seed + index
        self.issued: Counter[str] = Counter()
        self.ended: Counter[str] = Counter()
        self.ready: deque[str] = deque(configs)  # settings that may be given a trial now, in turn
        self.waiting: set[str] = set()  # settings whose next trial waits for one of theirs to end
        self.live: dict[str, tuple[str, int]] = {}  # Tune trial id → (setting, Optuna trial number)
        self._studies: dict[str, Any] = {}  # opened lazily; not saved

    @property
    def total(self) -> int:
        return sum(self.search[k].trials for k in self.configs)

    # -- which setting next --------------------------------------------------------------------------
    def _startup(self, key: str) -> int:
        spec = self.search[key]
        return spec.trials if spec.sampler == "random" else st.startup_trials(spec.trials)

    def _may_issue(self, key: str) -> bool:
        n, k, issued = self.search[key].trials, self._startup(key), self.issued[key]
        if issued >= n:
            return False
        if issued < k:
            return True  # fixed space-filling points (or random draws): all may run at once
        running = issued - self.ended[key]
        return self.ended[key] >= k and running < st.MAX_MODEL_IN_FLIGHT

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        while self.ready:
            key = self.ready.popleft()
            if not self._may_issue(key):
                if self.issued[key] < self.search[key].trials:
                    self.waiting.add(key)
                continue
            config = self._issue(key, trial_id)
            if self._may_issue(key):
                self.ready.append(key)
            elif self.issued[key] < self.search[key].trials:
                self.waiting.add(key)
            return config
        # None: nothing to start now (a waiting setting gets its next trial when one of its trials ends)
        return None if self.waiting else self.FINISHED

    # -- Optuna ------------------------------------------------------------------------------------------
    def _study(self, key: str):
        study = self._studies.get(key)
        if study is None:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            spec = self.search[key]
            name = st.study_name(self.prefix, key)
            study = optuna.create_study(
                study_name=name,
                storage=st.open_storage(self.storage),
                sampler=st.make_sampler(spec.sampler, spec.trials, spec.sampler_seed + self.index[key]),
                direction="minimize" if self.mode == "min" else "maximize",
                load_if_exists=True,
            )
            if not study.user_attrs:
                for attr, value in st.study_attrs(self.configs[key]).items():
                    study.set_user_attr(attr, value)
            self._studies[key] = study
        return study

    def _issue(self, key: str, trial_id: str) -> dict[str, Any]:
        spec, base, i = self.search[key], self.configs[key], self.issued[key]
        study = self._study(key)
        searched_blocks = self.max_blocks if base["strategy"] == "blocks" and spec.n_unfrozen == "search" else None
        lr_range = (spec.lr.low, spec.lr.high) if isinstance(spec.lr, Range) else None
        attrs = {"ray_trial_id": trial_id, "trial_index": i}
        if spec.sampler == "budget" and i < self._startup(key):
            point = st.startup_points(
                self._startup(key), lr=lr_range, n_unfrozen=searched_blocks, seed=spec.sampler_seed + self.index[key]
            )[i]
            study.enqueue_trial(point, user_attrs=attrs)
            trial = study.ask()
        else:
            trial = study.ask()
            for attr, value in attrs.items():
                trial.set_user_attr(attr, value)
        lr = trial.suggest_float("lr", *lr_range, log=True) if lr_range else spec.lr
        n_unfrozen = None
        if base["strategy"] == "blocks":
            n_unfrozen = (
                trial.suggest_int("n_unfrozen", 0, self.max_blocks)
                if searched_blocks is not None
                else int(spec.n_unfrozen)
            )
        self.live[trial_id] = (key, trial.number)
        self.issued[key] += 1
        return {**base, "lr": lr, "n_unfrozen": n_unfrozen, "trial_index": i, OPTUNA_TRIAL: trial.number}

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        import optuna

        if trial_id not in self.live:
            return
        result = result or {}
        if not error and not result.get(COMPLETED) and not result.get("done"):
            return  # stopped by an interrupt, not by the scheduler: it resumes later and is told then
        key, number = self.live.pop(trial_id)
        study = self._study(key)
        value = result.get(self.metric)
        state = optuna.trial.TrialState
        if error or value is None or not math.isfinite(value):
            study.tell(number, state=state.FAIL, skip_if_finished=True)
        elif result.get(COMPLETED):
            study.tell(number, value, skip_if_finished=True)
        else:  # stopped early by the pruner (Tune marks the scheduler's stops done=True)
            study.tell(number, state=state.PRUNED, skip_if_finished=True)
        self.ended[key] += 1
        if key in self.waiting and self._may_issue(key):
            self.waiting.discard(key)
            self.ready.append(key)

    # -- Tune's snapshot (for --resume) --------------------------------------------------------------------
    def save(self, checkpoint_path: str) -> None:
        state = {k: v for k, v in self.__dict__.items() if k != "_studies"}
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(state, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.__dict__.update(pickle.load(fh))
        self._studies = {}
        self._fail_orphans()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_studies": {}}

    def _fail_orphans(self) -> None:
        """Optuna trials asked after Tune's last snapshot belong to no Tune trial: marked failed, so the
        study holds no trial that runs forever (their settings ask again, as the snapshot says)."""
        import optuna

        live = {(key, number) for key, number in self.live.values()}
        open_states = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
        for key in [k for k in self.configs if self.issued[k]]:
            study = self._study(key)
            for t in study.get_trials(deepcopy=False, states=open_states):
                if (key, t.number) not in live:
                    study.set_user_attr(f"orphan_{t.number}", "asked after Tune's last snapshot; failed on resume")
                    study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


class StudyPruning(FIFOScheduler):
    """Every epoch report goes into the trial's Optuna trial (``report(val_loss, epoch_count)``: that epoch's
    validation loss, never a best-so-far); with ``asha`` set, the study's ``SuccessiveHalvingPruner`` decides
    whether the trial stops. Studies are per setting, so a setting's trials are only ever judged against
    each other. The rung values live in the Optuna storage, so a resumed sweep judges as before.
    """

    def __init__(self, *, storage: str, prefix: str, asha: AshaSpec | None, max_epochs: int) -> None:
        super().__init__()
        self.storage, self.prefix, self.asha, self.max_epochs = storage, prefix, asha, max_epochs
        self.stopped = 0
        self._trials: dict[str, tuple[Any, int]] = {}  # Tune trial id → (Optuna trial, last step stored)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_trials": {}}

    def _pruner(self):
        import optuna

        if self.asha is None:
            return optuna.pruners.NopPruner()
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min(self.asha.grace_epochs, self.max_epochs), reduction_factor=self.asha.reduction_factor
        )

    def _optuna_trial(self, trial) -> tuple[Any, int]:
        known = self._trials.get(trial.trial_id)
        if known is None:
            import optuna

            storage = st.open_storage(self.storage)
            name = st.study_name(self.prefix, trial.config["setting"])
            study = optuna.load_study(study_name=name, storage=storage, pruner=self._pruner())
            tid = st.trial_id(storage, name, trial.config[OPTUNA_TRIAL])
            # a trial resumed from a checkpoint reports its epochs after that checkpoint again: once is enough
            steps = storage.get_trial(tid).intermediate_values
            known = (optuna.trial.Trial(study, tid), max(steps, default=-1))
        return known

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        value, step = result.get(METRIC), result.get(STEP)
        if result.get(COMPLETED) or OPTUNA_TRIAL not in trial.config or value is None or step is None:
            return TrialScheduler.CONTINUE  # the final report: its val_loss is the best epoch's, told by the searcher
        if not math.isfinite(value):
            return TrialScheduler.CONTINUE
        optuna_trial, last = self._optuna_trial(trial)
        step = int(step)
        if step <= last:
            self._trials[trial.trial_id] = (optuna_trial, last)
            return TrialScheduler.CONTINUE
        optuna_trial.report(float(value), step)
        self._trials[trial.trial_id] = (optuna_trial, step)
        if self.asha is not None and optuna_trial.should_prune():
            self.stopped += 1
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        self._trials.pop(trial.trial_id, None)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._trials.pop(trial.trial_id, None)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._trials.pop(trial.trial_id, None)

    def debug_string(self) -> str:
        if self.asha is None:
            return "epoch reports into each setting's Optuna study; no early stopping"
        return f"successive halving per setting (Optuna's pruner): {self.stopped} trials stopped early"


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
