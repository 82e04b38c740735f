"""Screening a database (``ltc screen``): candidates → graphs → a fold ensemble → ranked Parquet, on Ray Data.

The input (a folder of structure files, or one with ``id_prop.csv``; an extxyz file; a CSV or Parquet table; a
JSON list: ``datasets.candidate_source``, the readers of your own data) is cut into partitions of
``partition_size`` candidates, written once under ``OUT/input/`` as Parquet while the driver streams the input, so
its memory stays flat however large the input. Ray Data then reads the partitions still to do, builds their graphs
in tasks (``build_graphs``) and predicts in actors that each load the ensemble once (``Ensemble``: a GPU, or a
fraction of one, each where there are GPUs). The driver writes a partition's predictions to
``OUT/predictions/part-NNNNN.parquet`` once its last row has arrived, atomically: a killed run loses at most the
partitions in flight, and ``--resume`` skips the finished ones, so none is written twice and none is lost. Last,
``OUT/ranking.parquet`` ranks every prediction per target.

A candidate that cannot be read or become a graph is a row with its reason (``error``), never the end of the run;
a run where nothing could be read ends with one line saying so. The ensemble is combined as ``ltc predict``
combines it (``ltc.predict.combine``: kappa in log10 space).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ltc import datasets
from ltc.errors import AlreadyExistsError, ConfigError, DataError
from ltc.io import pause_for_tests, write_atomic, write_json_atomic, write_parquet_atomic

log = logging.getLogger(__name__)

PARTITION_SIZE = 1024  # candidates per partition: the unit of output files and of --resume
GRAPH_BATCH = 64  # candidates a graph task builds at a time
ACTOR_START_TIMEOUT_S = 900  # an autoscaler may take minutes to start a GPU node
RANK_BY = ("mean", "lower", "upper")  # which prediction orders the ranking (pred_mean, pred_lower, pred_upper)
SPEC_FILE = "screen.json"
INPUT_DONE = "done.json"
_META = ["part", "row", "id", "source", "y_true"]  # what travels with every candidate, from input to output


def _input_schema():
    import pyarrow as pa

    text = pa.string()
    return pa.schema([("part", pa.int64()), ("row", pa.int64()), ("id", text), ("source", text),
                      ("y_true", pa.float64()), ("fmt", text), ("payload", text), ("error", text)])  # fmt: skip


class ScreenInterrupted(DataError):
    """The screen stopped before every partition was written; ``--resume`` finishes it."""


@dataclass(frozen=True)
class ScreenResult:
    out: Path
    n_candidates: int
    n_predicted: int  # candidates with a prediction
    n_failed: int  # candidates with an error
    seconds: float
    ranking: Path
    seconds_input: float = 0.0  # cutting the input into partitions
    seconds_pipeline: float = 0.0  # Ray's start and the pipeline, to the last partition written
    stats: str = ""  # Ray Data's per-operator figures of the pipeline (``Dataset.stats()``)


# --------------------------------------------------------------------------------------------------
# The input, in partitions (the driver, streaming).


def _payload_text(fmt: str, payload: Any) -> tuple[str, str]:
    """A candidate's structure as (fmt, text) for a Parquet cell; ``decode`` reads it back."""
    if fmt in ("file", "cif", "poscar"):
        return fmt, str(payload)
    if fmt in ("pymatgen", "jarvis"):
        return fmt, json.dumps(payload)
    if fmt == "structure":  # a pymatgen Structure (matminer's JSON)
        return "pymatgen", json.dumps(payload.as_dict())
    if fmt == "ase":
        import io

        import ase.io

        buf = io.StringIO()
        ase.io.write(buf, payload, format="extxyz")
        return "extxyz", buf.getvalue()
    raise ValueError(f"no text form for structure format {fmt!r}")


def decode(fmt: str, text: str) -> tuple[str, Any]:
    """(fmt, payload) for ``datasets.parse_structure`` from a partition's cell."""
    return (fmt, json.loads(text)) if fmt in ("pymatgen", "jarvis") else (fmt, text)


def write_partitions(
    input: Path, folder: Path, *, partition_size: int, target: str | None = None, id_key: str | None = None,
    structure_key: str | None = None,
) -> list[int]:  # fmt: skip
    """Cut ``input`` into partition files ``folder/part-NNNNN.parquet`` (columns ``_META``, fmt, payload, error);
    the candidates of each. Finished by ``done.json``: a cut that was killed is made again."""
    from ltc.predict import candidate_row

    source, where = datasets.candidate_source(input, target=target, id_key=id_key, structure_key=structure_key)
    folder.mkdir(parents=True, exist_ok=True)
    counts: list[int] = []
    rows: list[dict[str, Any]] = []

    def flush() -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        part = len(counts)
        table = pa.Table.from_pandas(pd.DataFrame(rows).assign(part=part), schema=_input_schema(), preserve_index=False)
        # a row group per graph task: each task reads its own (read_and_build)
        write_atomic(
            folder / f"part-{part:05d}.parquet", lambda tmp: pq.write_table(table, tmp, row_group_size=GRAPH_BATCH)
        )
        counts.append(len(rows))
        rows.clear()

    n = 0
    for raw in source.rows(where):
        got = candidate_row(raw, str(input))
        if len(got) == 3:
            rid, src, why = got
            rows.append({"row": n, "id": rid, "source": src, "y_true": np.nan, "fmt": "", "payload": "", "error": why})
        else:
            rid, src, fmt, payload, y = got
            try:
                fmt, text = _payload_text(fmt, payload)
            except Exception as err:  # an object no reader could give as text: this row's reason
                rows.append({"row": n, "id": rid, "source": src, "y_true": y, "fmt": "", "payload": "",
                             "error": f"unreadable: {type(err).__name__}: {err}"[:300]})  # fmt: skip
            else:
                rows.append({"row": n, "id": rid, "source": src, "y_true": y, "fmt": fmt, "payload": text,
                             "error": None})  # fmt: skip
        n += 1
        if len(rows) == partition_size:
            flush()
    if rows:
        flush()
    if not counts:
        raise DataError(f"{input}: holds no structures to screen")
    write_json_atomic(folder / INPUT_DONE, {"partitions": counts, "candidates": n})
    return counts


# --------------------------------------------------------------------------------------------------
# Ray Data's stages: graphs in tasks, the ensemble in actors.


def read_and_build(tasks: pd.DataFrame, configs: list[dict[str, Any]]) -> pd.DataFrame:
    """A task: the candidates of one row group of an input partition (``path``, ``group``), with their graphs."""
    import pyarrow.parquet as pq

    batches = [
        pq.ParquetFile(p).read_row_group(int(g)).to_pandas() for p, g in zip(tasks.path, tasks.group, strict=True)
    ]
    return build_graphs(pd.concat(batches, ignore_index=True), configs)


def build_graphs(batch: pd.DataFrame, configs: list[dict[str, Any]]) -> pd.DataFrame:
    """Each candidate's graphs (``g0``, ``g1`` … one per graph config, as ``CrystalGraph.to_bytes``), its formula,
    or its reason (``error``)."""
    from ltc.graphs import GraphConfig
    from ltc.predict import candidate_graphs

    cfgs = [GraphConfig(**c) for c in configs]
    formulas, errors = [], []
    graphs: list[list[bytes | None]] = [[] for _ in cfgs]
    for fmt, text, error in zip(batch.fmt, batch.payload, batch.error, strict=True):
        built = error if isinstance(error, str) else candidate_graphs(*decode(fmt, text), cfgs)
        if isinstance(built, str):
            formulas.append(None)
            errors.append(built)
            for g in graphs:
                g.append(None)
            continue
        formulas.append(built[0])
        errors.append(None)
        for g, c in zip(graphs, cfgs, strict=True):
            g.append(built[1][c].to_bytes())
    out = batch[_META].assign(formula=formulas, error=pd.Series(errors, index=batch.index, dtype=object))
    return out.assign(**{f"g{i}": g for i, g in enumerate(graphs)})


class Ensemble:
    """An actor: the ensemble loaded once; a batch of candidates' graphs in, their predictions out (one row per
    candidate and target, ``ltc.predict.prediction_table``'s columns, and ``node_id``)."""

    def __init__(self, checkpoints: list[str], configs: list[dict[str, Any]], batch_size: int, threads: int) -> None:
        import ray
        import torch

        from ltc.graphs import GraphConfig
        from ltc.predict import load_models
        from ltc.train import resolve_device

        torch.set_num_threads(max(1, threads))
        self.device = resolve_device("auto")  # the GPU Ray gave this actor, if any
        self.models = load_models(checkpoints, device=self.device)
        self.configs = [GraphConfig(**c) for c in configs]
        self.batch_size = batch_size
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from ltc.graphs import CrystalGraph
        from ltc.predict import predict_graphs, prediction_table

        ok = batch[batch.error.isna()]
        parts = []
        if len(ok):
            graphs = {c: [CrystalGraph.from_bytes(b) for b in ok[f"g{i}"]] for i, c in enumerate(self.configs)}
            preds = predict_graphs(self.models, graphs, batch_size=self.batch_size, device=self.device)
            parts.append(prediction_table(self.models, ok[[*_META, "formula"]], preds))
        bad = batch[batch.error.notna()]
        for t in self.models[0].targets if len(bad) else []:
            parts.append(bad[[*_META, "formula", "error"]].assign(target=t["dataset"], units=t.get("units", "")))
        return pd.concat(parts, ignore_index=True).assign(node_id=self.node)


# --------------------------------------------------------------------------------------------------
# The driver.


def _claim(out: Path, spec: dict[str, Any], resume: bool) -> None:
    """Make ``out`` this screen's: a new folder, or (``resume``) one a screen of the same input and checkpoints
    started."""
    stored = out / SPEC_FILE
    if stored.is_file():
        if not resume:
            raise AlreadyExistsError(
                f"{out} holds a screen already: pass --resume to finish it, or --out another folder"
            )
        before = json.loads(stored.read_text())
        changed = [k for k in spec if before.get(k) != spec[k]]
        if changed:
            raise ConfigError(
                f"{out} was started with another {changed[0]} ({before.get(changed[0])!r}, now {spec[changed[0]]!r}); "
                "not resuming"
            )
        return
    if out.is_dir() and any(out.iterdir()):
        raise AlreadyExistsError(f"{out} is not empty and holds no screen; give --out a new folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stored, spec)


def screen(
    checkpoints: list[str | os.PathLike[str]],
    input: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    address: str | None = None,
    partition_size: int = PARTITION_SIZE,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float | None = None,
    batch_size: int = 256,
    rank_by: str = "mean",
    descending: bool = False,
    target: str | None = None,
    id_key: str | None = None,
    structure_key: str | None = None,
    progress: bool = True,
    allow_partial: bool = False,
) -> ScreenResult:
    """Screen ``input`` with the ensemble of ``checkpoints`` into ``out`` (see the module docstring).

    ``actors``: inference actors (default: one per GPU, else half the CPUs, at least 1); ``gpus_per_actor``:
    default 1 where the cluster has GPUs, else 0 (0.25: four actors share a GPU). ``rank_by``: ``mean``, or
    ``lower`` (an optimistic bound in a search for low kappa) or ``upper``; lowest first unless ``descending``.
    """
    from tqdm.auto import tqdm

    from ltc.predict import expand_checkpoints, load_models

    t0 = time.perf_counter()
    if rank_by not in RANK_BY:
        raise ConfigError(f"rank_by={rank_by!r} must be one of {RANK_BY}")
    if partition_size < 1 or batch_size < 1:
        raise ConfigError(f"partition_size={partition_size} and batch_size={batch_size} must be >= 1")
    out, input = Path(out), Path(input)
    files = expand_checkpoints(list(checkpoints), allow_partial=allow_partial)
    import torch

    models = load_models(files, device=torch.device("cpu"))  # what they predict, checked here once
    configs = [c.to_dict() for c in dict.fromkeys(m.graph for m in models)]
    heads = len(models[0].targets)
    from ltc.io import is_uri

    where = [f if is_uri(f) else str(Path(f).resolve()) for f in files]
    spec = {"input": str(input.resolve()), "checkpoints": where, "partition_size": partition_size,
            "target": target, "id_key": id_key, "structure_key": structure_key}  # fmt: skip
    _claim(out, spec, resume)
    inputs, predictions = out / "input", out / "predictions"
    t_input = time.perf_counter()
    if (inputs / INPUT_DONE).is_file():
        counts = json.loads((inputs / INPUT_DONE).read_text())["partitions"]
    else:
        counts = write_partitions(input, inputs, partition_size=partition_size, target=target, id_key=id_key,
                                  structure_key=structure_key)  # fmt: skip
    done = {k for k in range(len(counts)) if (predictions / f"part-{k:05d}.parquet").is_file()}
    todo = [k for k in range(len(counts)) if k not in done]
    if done:
        log.info("%s: %d of %d partitions done earlier", out, len(done), len(counts))
    total = sum(counts)
    bar = tqdm(total=total, initial=sum(counts[k] for k in done), desc="screen", unit="struct", disable=not progress,
               smoothing=0.1)  # fmt: skip
    t_pipeline, stats = time.perf_counter(), ""
    try:
        if todo:
            stats = _run(todo, counts, inputs, predictions, files, configs, heads, bar, address=address,
                         actors=actors, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor,
                         batch_size=batch_size)  # fmt: skip
    except KeyboardInterrupt:
        raise ScreenInterrupted(f"interrupted with {bar.n:,} of {total:,} candidates written") from None
    finally:
        bar.close()
    ranking, n_ok, n_failed = rank_predictions(predictions, out / "ranking.parquet", rank_by=rank_by,
                                               descending=descending)  # fmt: skip
    if n_ok == 0:
        raise DataError(
            f"{input}: none of its {n_failed:,} candidate(s) could be read or become a graph; reasons in {predictions}"
        )
    return ScreenResult(out, total, n_ok, n_failed, time.perf_counter() - t0, ranking,
                        seconds_input=t_pipeline - t_input, seconds_pipeline=time.perf_counter() - t_pipeline,
                        stats=stats)  # fmt: skip


def _run(
    todo: list[int], counts: list[int], inputs: Path, predictions: Path, checkpoints: list[str],
    configs: list[dict[str, Any]], heads: int, bar: Any, *, address: str | None, actors: int | None,
    cpus_per_actor: float, gpus_per_actor: float | None, batch_size: int,
) -> str:  # fmt: skip
    """The Ray Data pipeline over the partitions ``todo``; each partition written as its last row arrives. Returns
    Ray Data's figures of the run (``Dataset.stats()``)."""
    import ray

    from ltc.sweep.driver import init_ray

    init_ray(address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ltc's bar counts structures; Ray's would count blocks over it
    context.print_on_execution_start = False
    # every actor up (its ensemble loaded) before work is handed out, so that all share it from the start; a
    # cluster that cannot give them their CPUs or GPUs is an error after this long, not a wait forever
    context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    # batches to whichever actor is free, not to the one beside the task that built them: graphs are small to move,
    # and an actor on another node would otherwise stay idle while its own node builds no graphs
    with warnings.catch_warnings():  # deprecated for after January 2027, still obeyed by the pinned Ray: revisit then
        warnings.simplefilter("ignore", DeprecationWarning)
        context.execution_options.actor_locality_enabled = False
    from ltc.sweep.driver import on_cluster

    gpus = float(ray.cluster_resources().get("GPU", 0))
    cpus = float(ray.cluster_resources().get("CPU", 1))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus else 0.0
    if gpus_per_actor > gpus and not on_cluster():  # no autoscaler will add a GPU to this machine's Ray
        raise ConfigError(f"--gpus-per-actor {gpus_per_actor:g}: this machine's Ray has {gpus:g} GPUs")
    if actors is None:
        actors = max(1, int(gpus / gpus_per_actor) if gpus_per_actor else int(cpus // 2))
    # one graph task per row group of GRAPH_BATCH candidates: small enough to keep every CPU busy from the start
    groups = [{"path": str(inputs / f"part-{k:05d}.parquet"), "group": g}
              for k in todo for g in range(-(-counts[k] // GRAPH_BATCH))]  # fmt: skip
    ds = ray.data.from_items(groups, override_num_blocks=len(groups))
    ds = ds.map_batches(read_and_build, fn_kwargs={"configs": configs}, batch_size=1, batch_format="pandas",
                        num_cpus=1)  # fmt: skip
    with warnings.catch_warnings():
        # Ray 2.60 deprecates ray_remote_args_fn (removal planned for 2.64) and offers no other way to set an actor
        # pool's scheduling strategy: revisit when the pin on Ray is raised
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map_batches(
            Ensemble,
            fn_constructor_kwargs={"checkpoints": checkpoints, "configs": configs, "batch_size": batch_size,
                                   "threads": max(1, int(cpus_per_actor))},
            batch_size=batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor,
            # the actors over the nodes, not packed onto one. Given as a function, this also keeps Ray Data from
            # fusing the graph tasks into the actors, which would then build every graph themselves, one by one
            ray_remote_args_fn=_spread,
        )  # fmt: skip
    schema = output_schema(len(checkpoints))
    expected = {k: counts[k] * heads for k in todo}
    buffers: dict[int, list[pd.DataFrame]] = defaultdict(list)
    got: Counter[int] = Counter()
    written = 0
    for batch in _batches(ds):
        for k, rows in batch.groupby("part", sort=False):
            k = int(k)
            buffers[k].append(rows)
            got[k] += len(rows)
            bar.update(len(rows) // heads)
            if got[k] == expected[k]:
                table = pd.concat(buffers.pop(k), ignore_index=True).sort_values(["row", "target"], kind="stable")
                write_parquet_atomic(predictions / f"part-{k:05d}.parquet", _as_output(table, schema))
                written += 1
                pause_for_tests(f"screen written {written}")  # tests: a kill after a known number of partitions
    missing = [k for k in todo if not (predictions / f"part-{k:05d}.parquet").is_file()]
    if missing:  # every row of a partition comes back once: anything else is a bug
        raise RuntimeError(f"partitions {missing[:5]} came back incomplete ({dict(got)}); please report")
    return ds.stats()


def _batches(ds: Any) -> Iterator[pd.DataFrame]:
    """The pipeline's output; actors that never start (no node has their CPUs or GPUs) are one line, not a
    traceback."""
    import ray

    try:
        yield from ds.iter_batches(batch_format="pandas", batch_size=None)
    except ray.exceptions.GetTimeoutError as err:
        raise ConfigError(
            f"the inference actors did not start in {ACTOR_START_TIMEOUT_S} s: no node has the CPUs and GPUs each "
            f"asks for (--cpus-per-actor, --gpus-per-actor) ({err})"
        ) from None


def _spread() -> dict[str, Any]:
    return {"scheduling_strategy": "SPREAD"}


def output_schema(n_models: int):
    """The columns of every predictions file, typed, so that all partitions read back as one table."""
    import pyarrow as pa

    from ltc.predict import TABLE_COLUMNS

    text = {"id", "source", "formula", "target", "units", "error", "node_id"}
    names = ["part", "row", *TABLE_COLUMNS, *(f"pred_{j}" for j in range(n_models)), "y_true", "error", "node_id"]
    kinds = {"part": pa.int64(), "row": pa.int64()}
    return pa.schema([(n, kinds.get(n, pa.string() if n in text else pa.float64())) for n in names])


def _as_output(table: pd.DataFrame, schema: Any) -> Any:
    import pyarrow as pa

    table = table.reindex(columns=schema.names)  # a partition of errors only has no prediction columns
    # without pandas' metadata: Ray Data's frames carry Arrow-backed dtypes, which pandas would read back
    return pa.Table.from_pandas(table, schema=schema, preserve_index=False).replace_schema_metadata(None)


def rank_predictions(
    predictions: Path, path: Path, *, rank_by: str = "mean", descending: bool = False
) -> tuple[Path, int, int]:  # fmt: skip
    """``path``: every candidate with a prediction, ranked per target by ``pred_<rank_by>`` (1 = lowest, or
    highest when ``descending``); and how many had a prediction and an error. Reads only the columns it ranks."""
    import pyarrow.dataset as pads

    cols = ["target", "id", "formula", "source", "pred_mean", "pred_lower", "pred_upper", "error", "part", "row"]
    table = pads.dataset(str(predictions), format="parquet").to_table(columns=cols).to_pandas()
    failed = int(table[table.error.notna()].drop_duplicates(["part", "row"]).shape[0])
    ok = table[table.error.isna()].drop(columns="error")
    key = f"pred_{rank_by}"
    ranked = []
    for _, g in ok.groupby("target", sort=False):
        g = g.sort_values([key, "part", "row"], ascending=[not descending, True, True], kind="stable")
        ranked.append(g.assign(rank=np.arange(1, len(g) + 1)))
    ranking = pd.concat(ranked, ignore_index=True) if ranked else ok.assign(rank=pd.Series(dtype="int64"))
    write_parquet_atomic(path, ranking[["target", "rank", *[c for c in cols if c not in ("target", "error")]]])
    n_ok = int(ok.drop_duplicates(["part", "row"]).shape[0])
    return path, n_ok, failed
