"""Ray Tune adapters: the searcher (one Optuna study per setting), early stopping, the progress bar.

``SettingSearch`` is a Tune ``Searcher`` that hands out each setting's trials in turn (so every slot
stays busy across settings in one ``Tuner``), each proposed by that setting's Optuna study
(``ltc.sweep.studies``: storage, sampler). ``StudyPruning`` is a Tune scheduler, on Tune's public
scheduler interface, that writes every epoch report into the trial's Optuna trial and, with early
stopping on, stops the trials its study's pruner (successive halving) prunes: each setting is judged
against its own trials only (validation scores of different datasets or sizes are not comparable).
``Progress`` draws one bar per stage.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from ltc import io
from ltc.errors import DataError
from ltc.sweep import studies as st
from ltc.sweep.spec import AshaSpec, Range, SearchSpec
from ltc.trial import COMPLETED

log = logging.getLogger(__name__)

METRIC, MODE = "val_score", "min"  # what picks epochs and trials (ltc.train.selection), lower is better
STEP = "epoch_count"  # the step of an epoch report: epochs trained so far
OPTUNA_TRIAL = "optuna_trial"  # trial config key: the number of its Optuna trial in its setting's study


BACKUP = "ltc-searcher-state.json"  # the searcher's last good state, beside Tune's searcher-state-*.pkl


def read_state(path: Path) -> dict[str, Any]:
    """A saved ``SettingSearch`` state: ``path``, else its backup beside it when ``path`` is damaged (named in a
    warning). JSON only: a planted pickle is a damaged file, never run. Raises ``DataError`` naming both when
    neither can be read."""
    errors = []
    for candidate in (path, path.parent / BACKUP):
        try:
            data = candidate.read_bytes()
            if not _searcher_state(data):  # the one test of a whole searcher state, as check_resume_state's
                raise ValueError("not a searcher state (ltc's JSON with 'issued')")
            state = json.loads(data)
        except (OSError, ValueError) as err:
            errors.append(f"{candidate}: {type(err).__name__}: {str(err)[:120]}")
            continue
        if candidate != path:
            log.warning("%s is damaged (%s); using the last good copy, %s", path, errors[0], candidate)
        return state
    raise DataError(f"the searcher state of {path.parent} cannot be read: " + "; ".join(errors))


class SettingSearch(Searcher):
    """One Optuna study per setting; ``suggest`` serves the settings in turn (round robin, O(1) each).

    Each suggestion is ``configs[setting] | {"lr": …, "n_unfrozen": …, "trial_index": i, "optuna_trial": n}``.
    A finished trial is told to its study with its best validation score (``METRIC``), one stopped early as pruned,
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
        self.index = {key: i for i, key in enumerate(configs)}  # seeds: sampler_seed + index (_seed)
        self.issued: Counter[str] = Counter()
        self.ended: Counter[str] = Counter()
        self.ready: deque[str] = deque(configs)  # settings that may be given a trial now, in turn
        self.waiting: set[str] = set()  # settings whose next trial waits for one of theirs to end
        self.live: dict[str, tuple[str, int]] = {}  # Tune trial id → (setting, Optuna trial number)
        self.failed: dict[str, tuple[str, int]] = {}  # errored for good (Tune may resume them after a restart)
        self._studies: dict[str, Any] = {}  # opened lazily; not saved

    @property
    def total(self) -> int:
        return sum(self.search[k].trials for k in self.configs)

    # -- which setting next --------------------------------------------------------------------------
    def _seed(self, key: str) -> int:
        """The setting's seed for its sampler and its hypercube points."""
        return self.search[key].sampler_seed + self.index[key]

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
            config = self._issue(key, trial_id) if self._may_issue(key) else None
            if self._may_issue(key):
                self.ready.append(key)
            elif self.issued[key] < self.search[key].trials:
                self.waiting.add(key)
            if config is not None:
                return config
        # None: nothing to start now (a waiting setting gets its next trial when one of its trials ends)
        return None if self.waiting else self.FINISHED

    # -- Optuna ------------------------------------------------------------------------------------------
    def _study(self, key: str) -> Any:
        study = self._studies.get(key)
        if study is None:
            import optuna

            # Optuna logs every trial it is told at INFO: that would bury the progress bar (process-wide, as
            # Optuna's logging is; the driver is ltc's process)
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            spec = self.search[key]
            name = st.study_name(self.prefix, key)
            study = optuna.create_study(
                study_name=name,
                storage=st.open_storage(self.storage),
                sampler=st.make_sampler(spec.sampler, spec.trials, self._seed(key)),
                direction="minimize" if self.mode == "min" else "maximize",
                load_if_exists=True,
            )
            if not study.user_attrs:
                for attr, value in st.study_attrs(self.configs[key]).items():
                    study.set_user_attr(attr, value)
            else:  # opened again (after --resume or a restarted stage): nothing may stay open by mistake
                self._fail_orphans(key, study)
            self._studies[key] = study
        return study

    def _issue(self, key: str, trial_id: str) -> dict[str, Any]:
        spec, base, i = self.search[key], self.configs[key], self.issued[key]
        study = self._study(key)
        # a setting's own model's blocks (a stage may mix architectures); configs without it: the sweep's model
        blocks = int(base.get("n_blocks", self.max_blocks))
        searched_blocks = blocks if base["strategy"] == "blocks" and spec.n_unfrozen == "search" else None
        lr_range = (spec.lr.low, spec.lr.high) if isinstance(spec.lr, Range) else None
        attrs = {"ray_trial_id": trial_id, "trial_index": i}
        k = self._startup(key)
        if spec.sampler == "budget" and i < k:
            point = st.startup_points(k, lr=lr_range, n_unfrozen=searched_blocks, seed=self._seed(key))[i]
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
                trial.suggest_int("n_unfrozen", 0, blocks) if searched_blocks is not None else int(spec.n_unfrozen)
            )
        self.live[trial_id] = (key, trial.number)
        self.issued[key] += 1
        return {**base, "lr": lr, "n_unfrozen": n_unfrozen, "trial_index": i, OPTUNA_TRIAL: trial.number}

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        result = result or {}
        if trial_id in self.failed and result.get(COMPLETED):
            self._tell_again(trial_id, result)
            return
        if trial_id not in self.live:
            return
        if not error and not result.get(COMPLETED) and not result.get("done"):
            return  # stopped by an interrupt, not by the scheduler: it resumes later and is told then
        key, number = self.live[trial_id]
        try:
            self._study(key)  # opened (its orphans failed) while this trial still counts as live
            self._tell(key, number, result, error)
            if error:
                self.failed[trial_id] = (key, number)
        finally:  # counted even if the storage failed, so the setting's next trials are never held back
            del self.live[trial_id]
            self.ended[key] += 1
            if key in self.waiting and self._may_issue(key):
                self.waiting.discard(key)
                self.ready.append(key)

    def _tell(self, key: str, number: int, result: dict[str, Any], error: bool) -> None:
        import optuna

        study, state = self._study(key), optuna.trial.TrialState
        value = result.get(self.metric)
        if error or value is None or not math.isfinite(value):
            study.tell(number, state=state.FAIL, skip_if_finished=True)
        elif result.get(COMPLETED):
            study.tell(number, value, skip_if_finished=True)
        else:  # stopped early by the pruner (Tune marks the scheduler's stops done=True)
            study.tell(number, state=state.PRUNED, skip_if_finished=True)

    def _tell_again(self, trial_id: str, result: dict[str, Any]) -> None:
        """A trial that had failed for good, then finished after ``--resume`` (Tune resumes errored trials):
        its Optuna trial stays failed (Optuna cannot reopen it), and its result is added as a new trial with
        the same values and Ray trial id, so the study agrees with the trials table."""
        import optuna

        key, number = self.failed.pop(trial_id)
        study = self._study(key)
        old = study.trials[number]
        value = result.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        study.add_trial(
            optuna.trial.create_trial(
                params=old.params, distributions=old.distributions, value=value,
                user_attrs={**old.user_attrs, "retry_of": number},
            )
        )  # fmt: skip

    # -- Tune's snapshot (for --resume) --------------------------------------------------------------------

    def save(self, checkpoint_path: str) -> None:
        """Counters and ids only (the settings' configs are in Tune's tuner.pkl already), as JSON: nothing a
        resume reads of ltc's can run code. A copy beside it (``BACKUP``) is the last good state if one is damaged."""
        text = json.dumps(self.state())
        with open(checkpoint_path, "w") as fh:
            fh.write(text)
        # Tune saves into its local staging folder and copies that folder to the storage: the backup goes along
        io.write_text_atomic(Path(checkpoint_path).parent / BACKUP, text)

    def state(self) -> dict[str, Any]:
        return {
            "_metric": self._metric, "_mode": self._mode, "issued": dict(self.issued), "ended": dict(self.ended),
            "ready": list(self.ready), "waiting": sorted(self.waiting), "live": self.live, "failed": self.failed,
        }  # fmt: skip

    def restore(self, checkpoint_path: str) -> None:
        # Tune swallows an error raised here and silently starts the stage again: the driver checks the file first
        # (read_state), so a damaged one never gets this far
        self.set_state(read_state(Path(checkpoint_path)))

    def set_state(self, state: dict[str, Any]) -> None:
        self._metric, self._mode = state["_metric"], state["_mode"]
        self.issued, self.ended = Counter(state["issued"]), Counter(state["ended"])
        self.ready, self.waiting = deque(state["ready"]), set(state["waiting"])
        self.live = {k: (key, int(n)) for k, (key, n) in state["live"].items()}
        self.failed = {k: (key, int(n)) for k, (key, n) in state["failed"].items()}
        self._studies = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_studies": {}}

    def _fail_orphans(self, key: str, study: Any) -> None:
        """Trials of ``study`` still open that belong to no live Tune trial (asked after Tune's last snapshot,
        or by a run Tune restarted from scratch) are failed, so that none runs forever in the study and TPE's
        constant liar does not count them. Their settings ask again, as Tune's snapshot says."""
        import optuna

        state = optuna.trial.TrialState
        live = {number for k, number in self.live.values() if k == key}
        for t in study.get_trials(deepcopy=False, states=(state.RUNNING, state.WAITING)):
            if t.number in live:
                continue
            if t.state == state.WAITING:  # enqueued, never asked: only an asked trial can be told
                study.ask()
            study.tell(t.number, state=state.FAIL, skip_if_finished=True)


class StudyPruning(FIFOScheduler):
    """Every epoch report goes into the trial's Optuna trial (``report(val_score, epoch_count)``: that epoch's
    validation score, never a best-so-far); with ``asha`` set, the study's ``SuccessiveHalvingPruner`` decides
    whether the trial stops. Studies are per setting, so a setting's trials are only ever judged against
    each other. The rung values live in the Optuna storage, so a resumed sweep judges as before.
    """

    def __init__(self, *, storage: str, prefix: str, asha: AshaSpec | None, max_epochs: int) -> None:
        super().__init__()
        self.storage, self.prefix, self.asha, self.max_epochs = storage, prefix, asha, max_epochs
        self.stopped = 0
        self._trials: dict[str, tuple[Any, int, str | None]] = {}  # Tune trial id → see _optuna_trial

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_trials": {}}

    def _pruner(self) -> Any:
        import optuna

        if self.asha is None:
            return optuna.pruners.NopPruner()
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min(self.asha.grace_epochs, self.max_epochs), reduction_factor=self.asha.reduction_factor
        )

    def _optuna_trial(self, trial: Trial) -> tuple[Any, int, str | None]:
        """(Optuna trial, last step stored, its state if it has ended already) of a Tune trial."""
        known = self._trials.get(trial.trial_id)
        if known is None:
            import optuna

            storage = st.open_storage(self.storage)
            name = st.study_name(self.prefix, trial.config["setting"])
            # the sampler is the searcher's business; a seeded random one here does no work when a Trial is made
            study = optuna.load_study(
                study_name=name, storage=storage, pruner=self._pruner(), sampler=optuna.samplers.RandomSampler(0)
            )
            tid = st.trial_id(storage, name, trial.config[OPTUNA_TRIAL])
            stored = storage.get_trial(tid)
            # a trial resumed from a checkpoint reports its epochs after that checkpoint again: once is enough.
            # One whose Optuna trial has ended (pruned or failed before a restart) is never reported into again.
            ended = stored.state.name if stored.state.is_finished() else None
            known = (optuna.trial.Trial(study, tid), max(stored.intermediate_values, default=-1), ended)
            self._trials[trial.trial_id] = known
        return known

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        value, step = result.get(METRIC), result.get(STEP)
        if result.get(COMPLETED) or OPTUNA_TRIAL not in trial.config or value is None or step is None:
            return TrialScheduler.CONTINUE  # the final report: its val_score is the best epoch's, told by the searcher
        if not math.isfinite(value):
            return TrialScheduler.CONTINUE
        optuna_trial, last, ended = self._optuna_trial(trial)
        if ended is not None:
            return TrialScheduler.STOP if ended == "PRUNED" else TrialScheduler.CONTINUE
        step = int(step)
        if step <= last:
            return TrialScheduler.CONTINUE
        optuna_trial.report(float(value), step)
        self._trials[trial.trial_id] = (optuna_trial, step, None)
        if self.asha is not None and optuna_trial.should_prune():
            self.stopped += 1
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> None:
        self._trials.pop(trial.trial_id, None)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._trials.pop(trial.trial_id, None)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self._trials.pop(trial.trial_id, None)

    def debug_string(self) -> str:
        if self.asha is None:
            return "epoch reports into each setting's Optuna study; no early stopping"
        return f"successive halving per setting (Optuna's pruner): {self.stopped} trials stopped early"


class Progress(Callback):
    """One bar per stage: finished trials, with running / pruned / failed counts.

    Tune pickles its callbacks with the Tuner when a stage starts, so a resumed stage's copy knows nothing of the
    trials that finished since: the bar counts them from Tune's restored trials when it is made, and a resumed
    stage's bar starts where the interrupted one stopped and ends at its total.
    """

    def __init__(self, stage: str, total: int) -> None:
        self.stage, self.total = stage, total
        self.bar = None
        self.counts: Counter[str] = Counter()
        self.running: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "bar": None, "running": set()}

    @staticmethod
    def _outcome(trial: Trial) -> str:
        return "done" if trial.last_result.get(COMPLETED) else "pruned"

    def _update(self, trials: list[Trial], finished: Trial | None = None, outcome: str | None = None) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:  # first event of this driver: what finished before it is in Tune's trials
            ended = [t for t in trials if t.status in (Trial.TERMINATED, Trial.ERROR) and t is not finished]
            self.counts = Counter("failed" if t.status == Trial.ERROR else self._outcome(t) for t in ended)
            self.bar = tqdm(total=self.total, initial=len(ended), desc=f"stage {self.stage}", unit="trial",
                            dynamic_ncols=True)  # fmt: skip
        if finished is not None and outcome is not None:
            self.counts[outcome] += 1
            self.bar.update(1)
        self.bar.set_postfix(
            running=len(self.running), done=self.counts["done"], pruned=self.counts["pruned"],
            failed=self.counts["failed"], refresh=True,
        )  # fmt: skip

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._update(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self._update(trials, trial, self._outcome(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self._update(trials, trial, "failed")

    def on_experiment_end(self, trials, **info):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --------------------------------------------------------------------------------------------------
# Tune's resume state, kept whole: a full disk or a kill can leave its files truncated, and Tune then silently
# starts a stage over ("Failed to restore the run state"). ltc keeps the last copy that read back whole, and
# the driver puts it back before a resume (``check_resume_state``).

LAST_GOOD = "ltc-last-good"  # beside Tune's files in a stage's experiment folder
STATE_GLOB = "experiment_state-*.json"  # Tune's experiment state (TuneController.CKPT_FILE_TMPL)
SEARCHER_GLOB = "searcher-state-*.pkl"  # Searcher.CKPT_FILE_TMPL: ltc's is JSON under that name
SEARCH_GEN_GLOB = "search_gen_state-*.json"  # SearchGenerator.CKPT_FILE_TMPL: Tune's wrappers, a cloudpickle


TUNER_STATE = "tuner.pkl"  # Tune's, written once, when a stage's Tuner is made (TunerInternal._TUNER_PKL)


def keep_tuner_state(experiment: str) -> None:
    """Copy the ``tuner.pkl`` of a Tuner just made into ``LAST_GOOD/``: Tune never writes it again, so this copy is
    the good one, and its presence says that the Tuner was made whole."""
    fs, root = io.filesystem(experiment)
    data = _read(experiment, f"{root}/{TUNER_STATE}")
    fs.create_dir(f"{root}/{LAST_GOOD}", recursive=True)
    _write(experiment, f"{root}/{LAST_GOOD}/{TUNER_STATE}", data)


def tuner_state_whole(experiment: str) -> bool:
    """Whether ``experiment``'s ``tuner.pkl`` is one whole pickle (read opcode by opcode, never loaded)."""
    _, root = io.filesystem(experiment)
    return _whole_pickle(_read(experiment, f"{root}/{TUNER_STATE}"))


def stage_began(experiment: str) -> bool:
    """Whether Tune can resume ``experiment``: its Tuner was made (``tuner.pkl`` and ltc's copy of it; or, for a
    stage begun before ltc kept that copy, a ``tuner.pkl`` with an experiment state beside it). A ``tuner.pkl``
    alone, torn by a full disk as the Tuner was made, is a stage that ran no trial: it starts over."""
    fs, root = io.filesystem(experiment)
    if fs.get_file_info(f"{root}/{TUNER_STATE}").type.name != "File":
        return False
    return fs.get_file_info(f"{root}/{LAST_GOOD}/{TUNER_STATE}").type.name == "File" or bool(
        _files(experiment, STATE_GLOB)
    )


def _files(folder: str, pattern: str) -> list[tuple[str, int, int]]:
    """(path, size, mtime ns) of the files of ``folder`` (local or URI) matching ``pattern``."""
    import fnmatch

    import pyarrow.fs as pafs

    fs, path = io.filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return [(i.path, i.size, i.mtime_ns or 0) for i in infos
            if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, pattern)]  # fmt: skip


def _read(folder: str, path: str) -> bytes:
    fs, _ = io.filesystem(folder)
    with fs.open_input_stream(path) as fh:
        return fh.readall()


def _write(folder: str, path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` of ``folder``'s file system, whole or not at all (a temp file renamed; an
    object store's object appears when written)."""
    fs, _ = io.filesystem(folder)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as fh:
        fh.write(data)
    fs.move(tmp, path)


def _whole_state(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def _whole_pickle(data: bytes) -> bool:
    """Whether ``data`` is one whole pickle, read opcode by opcode (``pickletools.genops``): nothing is built or
    run, so this is safe on any file."""
    import pickletools

    last = None
    try:
        for op, _, _ in pickletools.genops(data):
            last = op.name
    except Exception:  # genops raises ValueError and others on torn or foreign bytes
        return False
    return last == "STOP"


def _whole(path: str, data: bytes) -> bool:
    """Whether a state file of one of the snapshot's kinds reads back whole."""
    name = path.rsplit("/", 1)[-1]
    if name.startswith("search_gen_state-"):
        return _whole_pickle(data)
    return _searcher_state(data) if name.startswith("searcher-state-") else _whole_state(data)


def _snapshot(experiment: str) -> list[tuple[str, int, int]]:
    """The state files Tune reads to resume ``experiment``, all written at each of its saves: the experiment state,
    the search generator's wrappers and ltc's searcher state."""
    return [f for glob in (STATE_GLOB, SEARCH_GEN_GLOB, SEARCHER_GLOB) for f in _files(experiment, glob)]


def keep_last_good(experiment: str, seen: dict[str, tuple[int, int]]) -> None:
    """When ``experiment``'s state files changed since ``seen`` and all read back whole, copy them together (one
    snapshot: they must agree) into ``LAST_GOOD/``."""
    fs, root = io.filesystem(experiment)
    files = _snapshot(experiment)
    if not files or all(seen.get(path) == (size, mtime) for path, size, mtime in files):
        return
    data = {path: _read(experiment, path) for path, _, _ in files}
    if not all(_whole(path, d) for path, d in data.items()) or not _agree(data):
        return  # being written, or damaged: the copy kept so far stays
    fs.create_dir(f"{root}/{LAST_GOOD}", recursive=True)
    for path, d in data.items():
        _write(experiment, f"{root}/{LAST_GOOD}/{path.rsplit('/', 1)[-1]}", d)
    seen.update({path: (size, mtime) for path, size, mtime in files})


class KeepLastGoodState(Callback):
    """Keeps the last whole copy of a stage's experiment state (``keep_last_good``), looked at every few seconds
    and at the end."""

    def __init__(self, experiment: str, every_s: float = 5.0) -> None:
        self.experiment, self.every_s = experiment, every_s
        self.seen: dict[str, tuple[int, int]] = {}
        self.last = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "seen": {}, "last": 0.0}

    def _keep(self) -> None:
        try:
            keep_last_good(self.experiment, self.seen)
        except OSError as err:  # a full disk: the copy kept so far stays as it was
            log.debug("could not keep Tune's state of %s: %s", self.experiment, err)

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._keep()

    def on_experiment_end(self, trials, **info):
        self._keep()


def _searcher_state(data: bytes) -> bool:
    try:
        state = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(state, dict) and "issued" in state


def _agree(data: dict[str, bytes]) -> bool:
    """Whether the newest experiment state in ``data`` (path → bytes) and the searcher state of its save are of one
    save: Tune holds as many trials as the searcher issued. Tune uploads its files one by one, so whole files can
    still be of two saves."""
    states = sorted(p for p in data if p.rsplit("/", 1)[-1].startswith("experiment_state-"))
    if not states:
        return True
    session = states[-1].rsplit("/", 1)[-1].removeprefix("experiment_state-").removesuffix(".json")
    searcher = next((d for p, d in data.items() if p.rsplit("/", 1)[-1] == f"searcher-state-{session}.pkl"), None)
    if searcher is None:
        return True
    try:
        trials = len(json.loads(data[states[-1]])["trial_data"])
        return trials == sum(json.loads(searcher)["issued"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def check_resume_state(experiment: str) -> list[str]:
    """Before Tune resumes ``experiment``: damaged state files (0 bytes, truncated, of two saves, a searcher state
    that is not ltc's JSON: a planted pickle is never read) are replaced by good copies; what was replaced, one line
    each.

    A searcher state damaged alone is replaced by the backup its last save wrote beside it (``BACKUP``) when that
    is of the experiment state's save; otherwise every state file is put back from the last snapshot kept whole
    (``keep_last_good``). Raises ``DataError`` naming a damaged file that has no good copy."""
    fs, root = io.filesystem(experiment)
    repaired: list[str] = []

    def is_file(path: str) -> bool:
        return fs.get_file_info(path).type.name == "File"

    def put(path: str, data: bytes, copy: str) -> None:
        _write(experiment, path, data)
        repaired.append(f"{path}: damaged, replaced by the last good copy ({copy})")

    tuner, kept_tuner = f"{root}/{TUNER_STATE}", f"{root}/{LAST_GOOD}/{TUNER_STATE}"
    if is_file(kept_tuner) and _read(experiment, tuner) != (whole := _read(experiment, kept_tuner)):
        put(tuner, whole, kept_tuner)  # Tune never rewrites it: any change is damage
    current = {path: _read(experiment, path) for path, _, _ in _snapshot(experiment)}
    damaged = [path for path, data in current.items() if not _whole(path, data)]
    if not damaged and _agree(current):
        return repaired
    backup = f"{root}/{BACKUP}"
    if damaged and all(p.rsplit("/", 1)[-1].startswith("searcher-state-") for p in damaged) and is_file(backup):
        data = _read(experiment, backup)
        if _searcher_state(data) and _agree({**current, **dict.fromkeys(damaged, data)}):
            for path in damaged:
                put(path, data, backup)
            return repaired
    copies = {path: f"{root}/{LAST_GOOD}/{path.rsplit('/', 1)[-1]}" for path in current}
    kept = {path: _read(experiment, copy) for path, copy in copies.items() if is_file(copy)}
    if len(kept) < len(current) or not all(_whole(p, d) for p, d in kept.items()) or not _agree(kept):
        bad = damaged[0] if damaged else max(current)
        older = " (a pickle: an older ltc's, or not ltc's)" if current.get(bad, b"")[:1] == b"\x80" else ""
        raise DataError(
            f"{bad} is damaged{older} or of another save than the files beside it, and no whole copy of this stage's "
            f"state was kept: remove {experiment} to run the stage again from its start"
        )
    for path, data in kept.items():
        if data != current[path]:
            put(path, data, copies[path])
    return repaired
