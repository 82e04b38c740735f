"""The sweep driver: stages in order, each resolved once and run as one Ray Tune ``Tuner``; resume.

For each stage the driver picks the starting checkpoints from the stages before it, resolves the
stage's inputs once (shards built or verified, split ids, held-out formulas: ``ltc.inputs``), checks
every setting's size against them, and runs the stage's trials. A finished stage leaves its best
checkpoints in ``best/<stage>/`` and then, last, ``stages/<stage>.parquet``, which marks it done. On a
cluster the driver serves each stage's inputs to nodes that lack them while the stage runs
(``ltc.nodes``); checkpoints and Tune's state go to the storage (a folder, or a bucket: ``ltc.io``).
``--resume`` skips finished stages and restores the running one with ``Tuner.restore`` (finished
trials are kept, unfinished ones continue from their last checkpoint).

Interrupts: SIGINT (Ctrl-C) or SIGTERM stops the whole sweep. Inside a stage, Tune's own handler ends
the run gracefully (running trials keep their last checkpoint and the experiment state is saved); the
stage is then found incomplete, is not marked done, no later stage starts, and ``SweepInterrupted``
says how to resume. A second Ctrl-C (or one between stages) raises at once; the state on disk is then
the last experiment snapshot, from which ``--resume`` also finishes every planned trial exactly once.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ltc import datasets, io
from ltc.errors import AlreadyExistsError, ConfigError, DataError, LtcError
from ltc.inputs import resolve_inputs_by_graph
from ltc.splits import LEGACY_VAL_MIN
from ltc.sweep import studies
from ltc.sweep.plan import (
    Setting,
    Start,
    check_sizes,
    graphs_of,
    holdout_splits,
    plan_stage,
    plan_starts,
    select_starts,
    trial_config,
    validate,
)
from ltc.sweep.spec import AshaSpec, SearchSpec, StageSpec, SweepSpec
from ltc.tracking import Tracker

log = logging.getLogger(__name__)


class SweepInterrupted(LtcError):
    """The sweep was stopped (SIGINT / SIGTERM) before ``stage`` finished; ``--resume`` completes it."""

    def __init__(self, stage: str | None, finished: int | None = None, planned: int | None = None) -> None:
        self.stage, self.finished, self.planned = stage, finished, planned
        where = f" in stage {stage}" if stage else ""
        count = f" ({finished} of {planned} trials of that stage ended)" if planned is not None else ""
        super().__init__(f"interrupted{where}{count}; no stage was marked done that did not finish")


class StageFailed(LtcError):
    """Trials of ``stage`` failed for good (after their retries): the stage is not marked done, and ``--resume``
    runs them again once the cause is fixed."""

    def __init__(self, stage: str, errors: list[str], planned: int) -> None:
        from collections import Counter

        from ltc.results import error_cause

        self.stage = stage
        self.causes = Counter(error_cause(e) for e in errors).most_common()
        lines = "; ".join(f"{cause} ({n} trial{'s' if n > 1 else ''})" for cause, n in self.causes[:5])
        more = f"; and {len(self.causes) - 5} other causes" if len(self.causes) > 5 else ""
        super().__init__(
            f"stage {stage}: {len(errors)} of {planned} trials failed, the stage is not marked done: {lines}{more}"
        )


@contextmanager
def _interrupts() -> Iterator[None]:
    """SIGTERM behaves as SIGINT, and SIGINT outside a Tuner raises ``KeyboardInterrupt`` (restored after).

    Tune installs its own SIGINT handler while a stage runs (a first Ctrl-C ends that run gracefully) and
    leaves it installed afterwards; ``_arm`` puts the plain handler back before every stage.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread (e.g. run_sweep in a notebook thread)
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    _arm()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _arm() -> None:
    """Plain SIGINT (``KeyboardInterrupt``), SIGTERM as SIGINT. Again after ``ray.init``, whose fault handler
    takes SIGTERM, and before each stage, since Tune leaves its SIGINT handler behind."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _term_as_int)


def _term_as_int(signum: int, frame: object) -> None:
    signal.raise_signal(signal.SIGINT)


@dataclass
class SweepPaths:
    root: Path  # <results>/<sweep name>
    storage: str  # Ray storage path (local folder or URI)
    optuna: str  # Optuna storage reference (ltc.sweep.studies.register_storage): root/optuna.log or a masked URL

    @property
    def trials(self) -> Path:
        return self.root / "trials.parquet"

    def stage_table(self, stage: str) -> Path:
        return io.inside(self.root, self.root / "stages" / f"{stage}.parquet")

    def best(self, stage: str) -> Path:
        return io.inside(self.root, self.root / "best" / stage)

    def experiment(self, stage: str) -> str:
        """Tune's folder of ``stage``, in the storage."""
        return io.inside(self.storage, f"{self.storage.rstrip('/')}/{stage}")


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
    optuna_storage: str | None = None,
    tracking: Sequence[Tracker] = (),
) -> Any:
    """Run every stage of ``spec``; returns the trials table (pandas). See the module docstring.

    ``optuna_storage``: a database URL for the Optuna studies; default ``<results>/<name>/optuna.log``.
    ``tracking``: trackers each trial is logged to as well (``ltc.tracking.parse_tracking``).

    Raises ``SweepInterrupted`` after SIGINT or SIGTERM, leaving a state that ``resume=True`` completes.
    """
    from ltc.paths import cache_root
    from ltc.paths import data_home as _data_home

    with _interrupts(), datasets.declare(spec.declared_datasets()), ExitStack() as stack:  # its own datasets, by name
        try:
            _check_job_paths(results=results, storage=storage or spec.storage, cache=cache, data_home=data_home)
            home = str(_data_home(data_home).resolve())
            cache_dir = str(cache_root(cache, home=Path(home)).resolve())
            # what a trial would reject fails here, before Ray starts
            validate(spec, home=home, cache=cache_dir, local=not (address or os.environ.get("RAY_ADDRESS")))
            root = io.inside(Path(results).resolve(), Path(results).resolve() / spec.name)
            optuna_ref = studies.register_storage(optuna_storage or str(root / studies.JOURNAL_NAME))
            given = storage or spec.storage or str(root / "ray")
            # one spelling per place (./ckpts, ckpts/ and the absolute path are one folder): compared on --resume
            paths = SweepPaths(root, given.rstrip("/") if io.is_uri(given) else str(Path(given).resolve()), optuna_ref)
            io.tune_storage(paths.storage)  # a refused storage URI or endpoint fails here, in one line
            stack.enter_context(one_driver(paths.root))  # held to the end: a second driver is refused
            _claim_results(paths, spec, spec_text, resume)
            # before Ray starts: Tune would copy AWS credential variables into trials' runtime envs, which Ray logs
            with io.aws_credentials_in_a_file():
                init_ray(address)
                _arm()
                return _run_stages(spec, paths, resume=resume, home=home, cache_dir=cache_dir, tracking=tracking)
        except KeyboardInterrupt:  # before any stage started (validation, Ray's start)
            raise SweepInterrupted(None) from None


# `ray job submit --working-dir .` runs the driver inside Ray's temporary copy of that folder, deleted with the job
_JOB_COPY = f"{os.sep}runtime_resources{os.sep}working_dir_files{os.sep}"


def _check_job_paths(**paths: str | os.PathLike[str] | None) -> None:
    """Refuse relative paths in a Ray job's working-dir copy: what the sweep wrote there would go with the job."""
    if _JOB_COPY not in os.getcwd() + os.sep:
        return
    for flag, path in paths.items():
        if path is not None and not io.is_uri(path) and not Path(path).is_absolute():
            raise ConfigError(
                f"--{flag.replace('_', '-')} {path} is relative, and this Ray job runs in Ray's temporary copy of its "
                f"working dir ({os.getcwd()}), which goes with the job: give an absolute path"
            )


def _run_stages(
    spec: SweepSpec, paths: SweepPaths, *, resume: bool, home: str, cache_dir: str, tracking: Sequence[Tracker] = ()
) -> Any:
    import pandas as pd

    tables: dict[str, pd.DataFrame] = {}
    settings_by_stage: dict[str, list[Setting]] = {}
    for stage in spec.stages:
        try:
            tables[stage.name] = _run_or_read_stage(
                spec, stage, paths, tables, settings_by_stage, resume=resume, home=home, cache_dir=cache_dir,
                tracking=tracking,
            )  # fmt: skip
        except KeyboardInterrupt:  # outside a Tuner (resolving inputs, copying) or a second Ctrl-C
            raise SweepInterrupted(stage.name) from None
    trials = pd.concat(list(tables.values()), ignore_index=True)
    io.write_parquet_atomic(paths.trials, trials)
    return trials


def _run_or_read_stage(
    spec: SweepSpec,
    stage: StageSpec,
    paths: SweepPaths,
    tables: dict[str, Any],
    settings_by_stage: dict[str, list[Setting]],
    *,
    resume: bool,
    home: str,
    cache_dir: str,
    tracking: Sequence[Tracker] = (),
) -> Any:
    """One stage's trials table: read back if the stage finished earlier, else run (and then marked done)."""
    import pandas as pd

    io.keep_working_directory()  # a Ray job's driver can lose its own between stages (io.keep_working_directory)

    from ltc.results import copy_best

    _arm()
    starts = None
    if stage.sources:
        starts = select_starts(plan_starts(stage, settings_by_stage), tables)
        starts = [keep_given(paths, stage.name, s) if s.given else s for s in starts]
    settings = plan_stage(spec, stage, starts)
    settings_by_stage[stage.name] = settings
    done_table = paths.stage_table(stage.name)
    if done_table.is_file():
        table = io.read_parquet_checked(
            done_table, f"it marks stage {stage.name} done; remove it, and --resume gathers that stage's trials again"
        )
        print(f"stage {stage.name}: finished earlier ({len(table)} trials)")
        return table
    if not settings:
        origins = [src.name for src in stage.sources]
        raise ConfigError(f"stage {stage.name}: nothing to run (no starting checkpoint survived in {origins})")
    # once per stage and graph kind, here: shards built or verified, split ids and held-out formulas written
    # (several graph kinds kept on the same structures); trials open these paths and nothing else
    names = list(dict.fromkeys(d for g in stage.dataset_sets for d in g))
    inputs = resolve_inputs_by_graph(
        names, graphs=graphs_of(spec, stage), holdout=holdout_splits(spec, stage), split=spec.split_for(stage),
        home=home, cache=cache_dir, verify=True, progress=True,
    )  # fmt: skip
    check_sizes(spec, stage, settings, inputs)
    io.pause_for_tests(f"stage {stage.name}")  # tests: its inputs resolved, no trial started
    try:
        table = _run_stage(spec, stage, settings, paths, resume=resume, inputs=inputs, tracking=tracking)
    except EOFError:  # Tune reads back each failed trial's pickled error: a full disk leaves that file empty
        _raise_if_full(paths)
        raise
    _arm()
    planned = len(settings) * spec.search_for(stage).trials
    ended = int(table.status.isin(["completed", "pruned", "error"]).sum())
    if ended < planned:  # Tune ended the run early: a Ctrl-C or SIGTERM inside the stage
        raise SweepInterrupted(stage.name, ended, planned)
    failed = table[table.status == "error"]
    if len(failed):  # done means done: every planned trial completed (or pruned), and --resume runs these again
        full = any("No space left" in str(e) or "Errno 28" in str(e) for e in failed.error)
        try:
            io.write_parquet_atomic(paths.trials, pd.concat([*tables.values(), table], ignore_index=True))
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            full = True
        if full:  # trials that failed on a full disk: say which folder is full, not each trial's error
            _raise_if_full(paths)
        raise StageFailed(stage.name, [str(e) for e in failed.error], planned)
    copy_best(table, paths.best(stage.name), pause=lambda: io.pause_for_tests("copy_best"))
    # the stage table marks the stage done: written last, after its best checkpoints are in place
    io.write_parquet_atomic(done_table, table)
    io.write_parquet_atomic(paths.trials, pd.concat([*tables.values(), table], ignore_index=True))
    return table


LOCK_FILE = ".lock"


@contextmanager
def one_driver(root: Path) -> Iterator[None]:
    """Hold the results folder ``root`` for this process: a second driver on it (a second ``--resume`` while
    the first runs) is refused, naming the holder. An OS lock (``flock``), so it is released when its process
    ends, however it ends: a lock left by a killed driver never blocks. (On a network file system that does not
    pass locks between machines, it guards one machine's drivers only.)"""
    import fcntl
    import socket

    root.mkdir(parents=True, exist_ok=True)
    fh = open(root / LOCK_FILE, "a+")  # noqa: SIM115 (held for the length of the block)
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise AlreadyExistsError(
                f"{root} is in use by another ltc sweep ({holder}): wait for it to end, or stop it first"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        yield
    finally:
        fh.close()  # closing releases the lock


def keep_given(paths: SweepPaths, stage: str, start: Start) -> Start:
    """A given checkpoint start with its checkpoint copied into the sweep's storage (``starts/<stage>/<label>-<hash>/``,
    the hash of the label keeps two labels apart), once: every node reaches the storage, where a user's file may be
    on the driver's disk only. (A file edited since the sweep started is refused on ``--resume``: ``_claim_results``.)
    """
    digest = hashlib.sha256(start.label.encode()).hexdigest()[:8]
    label = re.sub(r"[^A-Za-z0-9_.+=-]", "-", start.label)
    kept = io.inside(paths.storage, f"{paths.storage.rstrip('/')}/starts/{stage}/{label}-{digest}/checkpoint.pt")
    if not io.exists(kept):
        io.put_file(str(start.checkpoint), kept)
    return dataclasses.replace(start, checkpoint=kept)


def spec_identity(spec_json: str) -> str:
    """A stored spec (``json.dumps(asdict(spec))``) without its null values, to compare across ltc versions.

    Keys that a newer ltc added with a null or empty default (a stage's ``model``, a source's ``pretrained``, the
    sweep's ``datasets``) are absent from specs saved before them; dropping them on both sides lets such a folder
    resume. Two specs of one
    version have the same keys, so a value set to null on one side only still differs (a key on one side).
    Where a declared dataset or a given checkpoint lies is left out (a moved project resumes): what they hold is
    compared by ``given_inputs``.
    """

    def drop(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):  # {} too: a sweep saved before `datasets:` existed has none
            return {k: drop(v, k) for k, v in value.items() if v not in (None, {}) and not _located(key, k)}
        if isinstance(value, list):
            return [drop(v, key) for v in value]
        return value

    spec = json.loads(spec_json)
    # a split stored before val_min existed validated on val_fraction alone (splits.LEGACY_VAL_MIN)
    for split in [spec.get("split"), *(st.get("split") for st in spec.get("stages") or [])]:
        if isinstance(split, dict):
            split.setdefault("val_min", LEGACY_VAL_MIN)
    return json.dumps(drop(spec), sort_keys=True)


def first_difference(a: Any, b: Any, where: str = "") -> tuple[str, Any, Any]:
    """(dotted path, value in a, value in b) of the first place two JSON values differ (``None``: absent)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else k)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return first_difference(x, y, f"{where}[{i}]")
    return where or "the sweep", a, b


def _located(parent: str, key: str) -> bool:
    """A path the sweep file resolved against its folder: a source's ``checkpoint``, a declared dataset's ``path``."""
    return key == "checkpoint" or (key == "path" and parent not in ("", "stages"))


def given_inputs(spec: SweepSpec) -> dict[str, str]:
    """Content hashes of what the sweep file brings: each declared dataset's fingerprint (its files) and each given
    checkpoint's SHA-256. A ``--resume`` refuses when one changed, so no stage mixes two versions of them."""
    from ltc.sweep.spec import given_checkpoints

    declared = spec.declared_datasets()
    with datasets.declare(declared):
        out = {f"dataset {name}": datasets.locate(name, download=False).fingerprint for name in declared}
    for stage in spec.stages:
        for src in stage.sources:
            if src.checkpoint is not None:
                for g in given_checkpoints(src):
                    h = hashlib.sha256()
                    with io.open_input(g.path) as fh:
                        for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                            h.update(chunk)
                    out[f"checkpoint {g.label} of stage {stage.name}"] = h.hexdigest()
    return out


def _claim_results(paths: SweepPaths, spec: SweepSpec, spec_text: str | None, resume: bool) -> None:
    """Make the results folder ours: a fresh one, or (``resume``) one started by the same sweep file."""
    stored = paths.root / "sweep.json"
    current = json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str)
    if stored.is_file():
        if not resume:
            raise AlreadyExistsError(
                f"{paths.root} holds results of sweep {spec.name!r} already: pass --resume to complete it, "
                "or --results another folder"
            )
        try:
            claimed = json.loads(stored.read_text())
            json.loads(claimed["spec"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(
                f"{stored} is damaged ({type(err).__name__}: {err}): it says which sweep the folder holds; restore it, "
                "or run the sweep anew with --results elsewhere"
            ) from None
        if claimed.get("root", str(paths.root)) != str(paths.root):
            raise ConfigError(
                f"{paths.root} was started as {claimed['root']} (a moved or copied folder): Tune's state there names "
                "the original's paths, so a resume here would write into it; resume in the original folder"
            )
        if claimed.get("storage", paths.storage) != paths.storage:
            raise ConfigError(
                f"{paths.root} keeps its checkpoints and Tune state in {claimed['storage']}, not {paths.storage}: "
                "pass the same --storage to resume"
            )
        then_id, now_id = spec_identity(claimed["spec"]), spec_identity(current)
        if then_id != now_id:
            where, was, is_ = first_difference(json.loads(then_id), json.loads(now_id))
            hint = ""
            if where.endswith("val_min"):
                hint = (
                    f"; it began before splits validated on at least val_min structures: add `val_min: {was}` to that "
                    "split to finish it as it began"
                )
            raise ConfigError(
                f"{paths.root} was started with a different version of sweep {spec.name!r} ({where}: {was} then, "
                f"{is_} now); not resuming{hint}"
            )
        now, then = given_inputs(spec), claimed.get("given_inputs", {})
        changed = [k for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
        if changed:
            what = ", ".join(changed)
            raise ConfigError(
                f"{paths.root} was started with other contents of {what} (the files have changed since): not "
                "resuming, its trials would mix two versions; restore them, or run it anew with --results elsewhere"
            )
        if claimed.get("optuna_storage", paths.optuna) != paths.optuna:
            raise ConfigError(
                f"{paths.root} keeps its Optuna studies in {claimed['optuna_storage']}, not {paths.optuna}: "
                "pass the same --optuna-storage to resume"
            )
        if not studies.is_url(paths.optuna):
            studies.repair_journal(paths.optuna)  # a torn last record, dropped before anything appends to it
        return
    if studies.is_url(paths.optuna):  # a database others use too: never continue another sweep's studies
        import optuna

        taken = [
            n for n in optuna.get_all_study_names(studies.open_storage(paths.optuna)) if n.startswith(f"{spec.name}/")
        ]
        if taken:
            raise AlreadyExistsError(
                f"{paths.optuna} holds studies of a sweep {spec.name!r} already ({taken[0]}, …): "
                "rename the sweep or use another database"
            )
    if resume:
        log.info("nothing to resume in %s: starting the sweep", paths.root)
    paths.root.mkdir(parents=True, exist_ok=True)
    if spec_text is not None:
        io.write_text_atomic(paths.root / "sweep.yaml", spec_text)
    io.write_text_atomic(
        paths.root / "sweep.json",
        json.dumps(
            {
                "spec": current,
                "started": time.time(),
                "root": str(paths.root),
                "storage": paths.storage,
                "optuna_storage": paths.optuna,
                "given_inputs": given_inputs(spec),
            }
        ),
    )


def _run_stage(
    spec: SweepSpec,
    stage: StageSpec,
    settings: list[Setting],
    paths: SweepPaths,
    *,
    resume: bool,
    inputs,
    tracking: Sequence[Tracker] = (),
):
    from ray import tune

    from ltc.results import results_table
    from ltc.sweep.plan import n_blocks
    from ltc.trial import ltc_trial

    res = spec.resources_for(stage)
    search = spec.search_for(stage)
    trainable = tune.with_resources(ltc_trial, {"cpu": res.cpu, "gpu": res.gpu})
    experiment = paths.experiment(stage.name)
    with _inputs_on_nodes(paths, stage, inputs) as server:
        from ltc.sweep.adapters import check_resume_state, keep_tuner_state, stage_began, tuner_state_whole

        if resume and stage_began(experiment):
            print(f"stage {stage.name}: resuming")
            for line in check_resume_state(experiment):  # Tune would start the stage over on a damaged file
                log.warning(line)
            path, fs = io.tune_storage(experiment)
            try:
                tuner = tune.Tuner.restore(
                    path, trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
                )
            except Exception as err:
                if tuner_state_whole(experiment):  # Ray unreachable, storage refused, …: not the file's fault
                    raise
                raise DataError(
                    f"{experiment}/tuner.pkl is damaged ({type(err).__name__}: {str(err).splitlines()[0][:200]}): "
                    f"Tune's state of stage {stage.name}; remove {experiment} to run that stage again from its start"
                ) from None
        else:
            from ltc.tracking import callbacks as tracker_callbacks

            configs = {s.key: {**trial_config(spec, stage, s, inputs), "input_server": server} for s in settings}
            tuner = make_tuner(
                trainable,
                configs,
                {k: search for k in configs},
                name=stage.name,
                storage_path=paths.storage,
                optuna_storage=paths.optuna,
                study_prefix=f"{spec.name}/{stage.name}",
                max_blocks=n_blocks(spec),
                asha=spec.asha,
                epochs=stage.epochs,
                max_failures=spec.max_failures,
                # a restored stage keeps the callbacks it was started with (Tune's state holds them)
                callbacks=tracker_callbacks(tracking, sweep=spec.name, stage=stage.name, root=paths.root),
            )
            keep_tuner_state(experiment)  # before any trial: a resume finds the Tuner whole, or starts the stage over
            print(f"stage {stage.name}: {len(settings)} settings, {sum(search.trials for _ in configs)} trials")
        grid = tuner.fit()
    return results_table(grid, stage.name)


def _raise_if_full(paths: SweepPaths) -> None:
    """``OSError(ENOSPC)`` naming the results folder, the storage or the temporary folder (Ray's session and
    trial workdirs) where one of them is (nearly) full."""
    import tempfile

    local = [] if io.is_uri(paths.storage) else [Path(paths.storage)]
    ray_tmp = [Path(os.environ["RAY_TMPDIR"])] if os.environ.get("RAY_TMPDIR") else []
    io.raise_if_full([paths.root, *local, *ray_tmp, Path(tempfile.gettempdir())])


@contextmanager
def _inputs_on_nodes(paths: SweepPaths, stage: StageSpec, inputs: Any) -> Iterator[str | None]:
    """On a cluster, the stage's inputs served to nodes that lack them (``ltc.nodes``), and the server's
    name for the trial configs; on a local Ray (one node, started here) nothing to serve: None."""
    from ltc.nodes import input_paths, serve_inputs, server_name

    if not on_cluster():
        yield None
        return
    resolved = inputs.values() if isinstance(inputs, dict) else [inputs]
    with serve_inputs(server_name(paths.root, stage.name), input_paths(resolved)) as name:
        yield name


def make_tuner(
    trainable: Any,
    configs: dict[str, dict[str, Any]],
    search: dict[str, SearchSpec],
    *,
    name: str,
    storage_path: str,
    optuna_storage: str,
    study_prefix: str,
    max_blocks: int,
    asha: AshaSpec | None,
    epochs: int,
    max_failures: int,
    callbacks: Sequence[Any] = (),
) -> Any:
    """One stage's ``Tuner``: the settings' trial configs (``configs``), searched per setting by Optuna
    (``search``; studies in ``optuna_storage``, a reference from ``studies.register_storage``), with early
    stopping per setting when ``asha`` is set; checkpoints and Tune's state go to ``storage_path`` (a folder or
    URI: ``ltc.io.tune_storage``); ``callbacks``: more Tune callbacks (trackers). Benchmarks build it with a no-op
    ``trainable``."""
    from ray import tune

    from ltc.sweep.adapters import METRIC, MODE, KeepLastGoodState, Progress, SettingSearch, StudyPruning

    searcher = SettingSearch(configs, search, max_blocks=max_blocks, storage=optuna_storage, prefix=study_prefix)
    total = searcher.total
    path, fs = io.tune_storage(storage_path)
    return tune.Tuner(
        trainable,
        param_space={},
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=searcher,
            scheduler=StudyPruning(storage=optuna_storage, prefix=study_prefix, asha=asha, max_epochs=epochs),
            num_samples=total,
            reuse_actors=True,
            trial_dirname_creator=lambda t: t.trial_id,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=max_failures),
            # 2, not 1: Tune snapshots the experiment whenever a trial has saved num_to_keep checkpoints
            # since the last snapshot; with 1, every finished trial would force one
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[Progress(name, total), KeepLastGoodState(f"{storage_path.rstrip('/')}/{name}"), *callbacks],
        ),
    )


# Ray 2.60 turns a local node's 127.0.0.1 into the machine's address (`resolve_ip_for_localhost` in Ray's
# services), so the GCS, raylet, workers and agents of a local Ray listen on every interface whatever
# `_node_ip_address` says (Ray's token guards them). The one switch that keeps them all on loopback is Ray's
# single-machine mode for Windows and macOS, read once when ray is imported. It is not documented as a bind
# setting: tests/test_sweep_ray.py checks what it does on the pinned Ray.
LOOPBACK_ONLY = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def local_ray_on_loopback() -> bool:
    """Keep the local Ray this process will start on 127.0.0.1 (``LOOPBACK_ONLY``, inherited by its workers).
    Call it before ray is imported; False when that is too late, or when the variable is set already."""
    name, value = LOOPBACK_ONLY
    if "ray" in sys.modules or name in os.environ:
        return False
    os.environ[name] = value
    return True


_CONNECTED = False  # init_ray joined a cluster (an address, $RAY_ADDRESS: also inside `ray job submit`)


def on_cluster() -> bool:
    """Whether trials may run on nodes other than the driver's: a cluster this process joined (nodes can join
    it later: an autoscaler), or a Ray of several nodes now."""
    import ray

    return _CONNECTED or len(ray.nodes()) > 1


def init_ray(address: str | None, *, num_cpus: int | None = None) -> None:
    """Connect to the cluster at ``address`` (or ``$RAY_ADDRESS``), else start a local Ray (of ``num_cpus``
    CPUs; default all), with the settings a sweep's Tune runs need."""
    global _CONNECTED
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        local_ray_on_loopback()  # before ray is imported (else a no-op): a local Ray's servers on 127.0.0.1 only
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
    # Worker logs stay in Ray's session folder: the driver shows a progress bar, not a wall of logs.
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": True, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **kwargs)
        _CONNECTED = True
    else:
        # a new local cluster of its own, dashboard off; on loopback only if ray was imported after
        # local_ray_on_loopback, else on every interface behind Ray's token (LOOPBACK_ONLY). address="local": without
        # it Ray joins the latest cluster started on this machine (/tmp/ray/ray_current_cluster), e.g. one of
        # another user's sweeps, or a dead one left by a killed driver, which fails `--resume`
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
        _CONNECTED = False
