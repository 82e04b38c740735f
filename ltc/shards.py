"""Arrow graph shards: build each (dataset, graph config) once, memory-map it in every trial.

A shard set is a folder ``<cache>/shards/<dataset>-<key>/`` holding

- ``shard-00000.arrow`` …: Arrow IPC files (uncompressed, one record batch each), one row per graph;
- ``rejected.parquet``: every input row that did not become a graph (``id``, ``reason``);
- ``manifest.json``: schema version, dataset, fingerprint, graph config, counts, and the shard list
  with each file's size (``bytes``) and SHA-256 (``sha256``); ``rejected_bytes`` / ``rejected_sha256``.

``key`` hashes (schema version, dataset, dataset fingerprint, graph config): changed inputs give a new
folder and never overwrite an old one. A set is built in a temporary folder and renamed into place,
so a killed build leaves nothing that a reader trusts.

Trust after that (disk faults, a truncated copy, a stray write) is checked by ``verify``, which hashes
every file against the manifest. Hashing a large set takes seconds, so it runs where a stage is resolved
(``prepare(..., verify=True)`` in the driver and ``ltc prepare``), once, never in a trial; a damaged set is
named in a warning and rebuilt. ``ShardSet`` makes only the cheap checks (existence, size, row counts).

Reading (``ShardSet``) memory-maps the files: opening costs near nothing, the page cache is shared by
every process on a node, and ``batch(indices)`` gathers graphs straight from the mapped buffers into a
PyG ``Batch``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import cached_property
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ltc import __version__, datasets, io
from ltc.errors import DataError, MissingFileError
from ltc.graphs import CrystalGraph, GraphConfig, GraphError, check_construction, structure_to_graph
from ltc.io import write_json_atomic
from ltc.paths import cache_root, data_home

log = logging.getLogger(__name__)

# 2: file sizes and SHA-256 checksums in the manifest; 3: the graph construction ("knn" or "jarvis", see
# ltc.graphs.CONSTRUCTIONS) in the manifest's graph config and so in the cache key. Construction "chgnet" came
# later without a bump: its shards add columns (EXTRA_COLUMNS) under a graph config, and so keys, of its own;
# the files and keys of "knn" and "jarvis" shards are unchanged.
SCHEMA_VERSION = 3

# One row per graph. Ragged per-graph arrays are Arrow lists; ``vectors`` holds 3 floats per edge.
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("y", pa.float64()),  # target, raw units
        ("formula", pa.string()),  # reduced formula
        ("num_nodes", pa.int32()),
        ("num_edges", pa.int32()),
        ("z", pa.list_(pa.uint8())),  # [n] atomic numbers
        ("edge_src", pa.list_(pa.int32())),  # [E] neighbour j (local index)
        ("edge_dst", pa.list_(pa.int32())),  # [E] centre i
        ("distances", pa.list_(pa.float32())),  # [E] Å
        ("vectors", pa.list_(pa.float32())),  # [3E] Å, r_j + image - r_i, row-major
    ],
    metadata={"ltc_schema_version": str(SCHEMA_VERSION)},
)
_RAGGED = ("z", "edge_src", "edge_dst", "distances", "vectors")
# Constructions whose graphs carry more than the common columns: CHGNet's bond graph (see ltc.graphs.CrystalGraph).
EXTRA_COLUMNS: dict[str, list[pa.Field]] = {
    "chgnet": [
        pa.field("directed2undirected", pa.list_(pa.int32())),  # [E] bond of each directed edge (local)
        pa.field("angle_edges", pa.list_(pa.int32())),  # [2A] the two directed edges of each angle, row-major
    ]
}


def schema_for(graph: GraphConfig) -> pa.Schema:
    """The Arrow schema of shards of ``graph``: ``SCHEMA``, plus ``EXTRA_COLUMNS`` of its construction."""
    extra = EXTRA_COLUMNS.get(graph.construction, [])
    return pa.schema([*SCHEMA, *extra], metadata=SCHEMA.metadata) if extra else SCHEMA


# Below this much work (in JSON-structure units), building in-process beats starting worker processes.
PARALLEL_MIN_COST = 4096
_PARSE_COST = {"cif": 20, "poscar": 5, "file": 20, "ase": 3}  # CIF parsing costs ~25x a JARVIS or pymatgen dict
_HASH_CHUNK = 1 << 20


class ShardError(DataError):
    """A shard folder that is missing, incomplete or of another schema version."""


# --------------------------------------------------------------------------------------------------
# Building.


def shard_key(dataset: str, fingerprint: str, config: GraphConfig) -> str:
    """Content address of a shard set: 16 hex digits."""
    blob = json.dumps(
        {"schema": SCHEMA_VERSION, "dataset": dataset, "fingerprint": fingerprint, "graph": config.to_dict()},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PrepareResult:
    """Where a shard set is, what its manifest says, and whether this call built it.

    ``repaired``: the problems found in a set that was there but damaged (and is now rebuilt); empty
    when nothing was wrong or nothing was checked.
    """

    path: Path
    manifest: dict[str, Any]
    built: bool
    seconds: float
    repaired: list[str] = dataclasses.field(default_factory=list)

    def rejected(self) -> list[tuple[str, str]]:
        """(id, reason) of every rejected row."""
        table = pq.read_table(self.path / "rejected.parquet")
        return list(zip(table["id"].to_pylist(), table["reason"].to_pylist(), strict=True))


def prepare(
    name: str,
    *,
    graph: GraphConfig = GraphConfig(),
    home: str | os.PathLike[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    progress: bool = False,
    download: bool | None = None,
    shard_size: int | None = None,
    verify: bool = False,
) -> PrepareResult:
    """Build the shards of dataset ``name`` under ``graph`` settings, or find them already built.

    ``workers`` processes build shards in parallel (default: the CPUs this process may use);
    ``shard_size`` graphs per shard file (default: sized to keep every worker busy). Neither changes
    the content, so neither is part of the cache key.

    ``verify``: hash an existing set's files against its manifest (see ``verify``); a damaged set is
    named in a warning and rebuilt. A set whose manifest is missing or unreadable is rebuilt either way
    (that check costs nothing).
    """
    t0 = time.perf_counter()
    home_path = data_home(home)
    file = datasets.locate(name, data_home=home_path, download=download)
    key = shard_key(name, file.fingerprint, graph)
    root = cache_root(cache, home=home_path) / "shards"
    final = root / f"{name}-{key}"
    repaired: list[str] = []
    if final.exists():
        manifest, problem = _read_manifest_or_problem(final)
        if manifest is None:
            problems = [problem]
        else:
            problems = _check_files(final, manifest) if verify else []
            if not problems:
                return PrepareResult(final, manifest, built=False, seconds=time.perf_counter() - t0)
        log.warning("shards of %s: %s; rebuilding %s", name, "; ".join(problems), final)
        _discard(final)
        repaired = problems

    check_construction(graph)  # a missing package is one error, not a rejected row per structure
    raw = datasets.read(file)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root, f"{name}-{key}")
    tmp = root / f".tmp-{name}-{key}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        shards, build_rejected = _build_shards(
            raw.records, graph, tmp, workers=workers, progress=progress, name=name, shard_size=shard_size
        )
        rejected = raw.rejected + build_rejected
        n_graphs = sum(s["n_graphs"] for s in shards)
        if n_graphs + len(rejected) != raw.n_rows:  # never a silently shorter dataset
            raise RuntimeError(
                f"{name}: {raw.n_rows} input rows but {n_graphs} graphs + {len(rejected)} rejected; please report"
            )
        pq.write_table(
            pa.table(
                {"id": [r.id for r in rejected], "reason": [r.reason for r in rejected]},
                schema=pa.schema([("id", pa.string()), ("reason", pa.string())]),
            ),
            tmp / "rejected.parquet",
        )
        rejected_bytes, rejected_sha256 = _size_and_digest(tmp / "rejected.parquet")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "ltc_version": __version__,
            "dataset": name,
            "title": raw.spec.title,
            "target": raw.spec.target,
            "units": raw.spec.units,
            # what a trial needs to know of the dataset, which it never looks up (a user's dataset is declared on
            # the driver only): kappa (metrics, rejected rows) and the default target transform
            "kappa": raw.spec.kappa,
            "transform": raw.spec.transform,
            "source_file": str(raw.path.relative_to(home_path))
            if raw.path.is_relative_to(home_path)
            else str(raw.path),
            "fingerprint": raw.fingerprint,
            "graph": graph.to_dict(),
            "key": key,
            "n_input": raw.n_rows,
            "n_graphs": n_graphs,
            "n_rejected": len(rejected),
            "shards": shards,
            "rejected_bytes": rejected_bytes,
            "rejected_sha256": rejected_sha256,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.perf_counter() - t0, 3),
        }
        write_json_atomic(tmp / "manifest.json", manifest)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "manifest.json").is_file():
                raise
            # Another process built the same key first: its shards are identical, keep them.
            shutil.rmtree(tmp, ignore_errors=True)
            manifest = read_manifest(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PrepareResult(final, manifest, built=True, seconds=time.perf_counter() - t0, repaired=repaired)


def _discard(folder: Path) -> None:
    """Remove a damaged shard folder: first renamed aside, so its name is free at once for the rebuild.

    Readers that still have its files memory-mapped keep reading them (Linux frees them on unmap).
    """
    aside = folder.with_name(f".damaged-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        os.rename(folder, aside)
    except FileNotFoundError:  # another process moved it first
        return
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    else:  # a stray file where the folder belongs
        aside.unlink(missing_ok=True)


def _remove_stale_builds(root: Path, stem: str) -> None:
    """Remove temporary folders of killed builds of ``stem`` on this host (their process is gone)."""
    host = socket.gethostname()
    for tmp in root.glob(f".tmp-{stem}-*"):
        m = re.fullmatch(rf"\.tmp-{re.escape(stem)}-(.+)-(\d+)-[0-9a-f]+", tmp.name)
        if m is None or m.group(1) != host:
            continue
        try:
            os.kill(int(m.group(2)), 0)
        except ProcessLookupError:
            log.info("removing %s, left by a killed build", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, owned by someone else
            pass


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _build_shards(
    records: list[datasets.RawRecord],
    graph: GraphConfig,
    folder: Path,
    *,
    workers: int | None,
    progress: bool,
    name: str,
    shard_size: int | None = None,
) -> tuple[list[dict[str, Any]], list[datasets.Rejected]]:
    """Write the shard files of ``records`` into ``folder``; return shard entries and rejected rows."""
    from tqdm.auto import tqdm

    workers = _default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"{workers=} must be >= 1")
    # Several chunks per worker keep the pool busy to the end; a chunk is also one shard file.
    if shard_size is not None and shard_size < 1:
        raise ValueError(f"{shard_size=} must be >= 1")
    size = shard_size or max(1024, min(8192, math.ceil(len(records) / (4 * workers))))
    chunks = [records[i : i + size] for i in range(0, len(records), size)] or [[]]
    files = [folder / f"shard-{i:05d}.arrow" for i in range(len(chunks))]
    results: list[tuple[dict[str, Any], list[datasets.Rejected]] | None] = [None] * len(chunks)
    with tqdm(total=len(records), desc=f"prepare {name}", unit="struct", disable=not progress) as bar:
        # Starting worker processes costs seconds (imports); small sets build faster in this one.
        cost = sum(_PARSE_COST.get(r.fmt, 1) for r in records)
        if workers > 1 and cost >= PARALLEL_MIN_COST and len(chunks) > 1:
            try:
                # spawn, not fork: the caller may hold threads (Ray, torch) that fork would copy half-locked
                ctx = get_context("spawn")
                io.keep_working_directory()  # spawn hands it on; a Ray job's driver can lose its own
                with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=ctx) as pool:
                    futures = {pool.submit(build_shard, chunks[i], graph, files[i]): i for i in range(len(chunks))}
                    for fut in as_completed(futures):
                        i = futures[fut]
                        results[i] = fut.result()
                        bar.update(len(chunks[i]))
            except BrokenProcessPool as err:
                # e.g. a __main__ that spawned workers cannot import (python - < script): finish here
                log.warning("worker processes failed (%s); building the remaining shards in this process", err)
        for i in range(len(chunks)):
            if results[i] is None:
                results[i] = build_shard(chunks[i], graph, files[i], on_record=bar.update)
    shards: list[dict[str, Any]] = []
    rejected: list[datasets.Rejected] = []
    for entry, rej in results:  # type: ignore[misc]
        shards.append(entry)
        rejected.extend(rej)
    return shards, rejected


def build_shard(
    records: Sequence[datasets.RawRecord],
    graph: GraphConfig,
    path: Path,
    *,
    on_record=None,
) -> tuple[dict[str, Any], list[datasets.Rejected]]:
    """Parse ``records``, build their graphs and write one Arrow IPC file at ``path``.

    Returns the shard entry for the manifest and the rows rejected (unparsable structure, empty
    structure, atom without neighbour …), each with its reason.
    """
    schema = schema_for(graph)
    cols: dict[str, list[Any]] = {name: [] for name in schema.names}
    rejected: list[datasets.Rejected] = []
    for rec in records:
        try:
            structure = datasets.parse_structure(rec.fmt, rec.payload)
        except datasets.EmptyStructureError as err:
            rejected.append(datasets.Rejected(rec.id, str(err)))
        except Exception as err:  # any parser failure is this row's reason, never the dataset's end
            rejected.append(datasets.Rejected(rec.id, f"unparsable structure: {type(err).__name__}: {err}"[:500]))
        else:
            try:
                g = structure_to_graph(structure, config=graph)
            except GraphError as err:
                rejected.append(datasets.Rejected(rec.id, str(err)))
            except Exception as err:  # e.g. a degenerate lattice inside pymatgen's neighbour search
                rejected.append(datasets.Rejected(rec.id, f"graph failed: {type(err).__name__}: {err}"[:500]))
            else:
                cols["id"].append(rec.id)
                cols["y"].append(rec.target)
                cols["formula"].append(structure.composition.reduced_formula)
                cols["num_nodes"].append(g.num_nodes)
                cols["num_edges"].append(g.num_edges)
                cols["z"].append(g.z)
                cols["edge_src"].append(g.edge_index[0])
                cols["edge_dst"].append(g.edge_index[1])
                cols["distances"].append(g.distances)
                cols["vectors"].append(g.vectors.reshape(-1))
                if "angle_edges" in cols:
                    cols["directed2undirected"].append(g.directed2undirected)
                    cols["angle_edges"].append(g.angle_edges.reshape(-1))
        if on_record is not None:
            on_record(1)
    arrays = []
    for field in schema:
        if pa.types.is_list(field.type):
            arrays.append(_list_array(cols[field.name], field.type))
        else:
            arrays.append(pa.array(cols[field.name], type=field.type))
    table = pa.Table.from_arrays(arrays, schema=schema)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        # One record batch per file: each column is one contiguous buffer, gathered without joins.
        writer.write_table(table, max_chunksize=max(1, table.num_rows))
    size, digest = _size_and_digest(path)  # here, in the worker: hashing is spread over the pool
    entry = {
        "file": path.name,
        "n_graphs": table.num_rows,
        "n_nodes": int(sum(cols["num_nodes"])),
        "n_edges": int(sum(cols["num_edges"])),
        "bytes": size,
        "sha256": digest,
    }
    return entry, rejected


def _list_array(parts: list[np.ndarray], type_: pa.ListType) -> pa.ListArray:
    """A list array from per-row numpy arrays, with one concatenation (no per-element Python)."""
    dtype = type_.value_type.to_pandas_dtype()
    lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    offsets = np.zeros(len(parts) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=type_.value_type))


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a shard folder; errors say what is wrong with it."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise ShardError(f"{folder} is not a shard folder (no manifest.json); run `ltc prepare` first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{path}: damaged manifest ({err})") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards", []), list):
        raise ShardError(f"{path}: damaged manifest (not a shard manifest)")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ShardError(
            f"{folder}: shard schema version {version}, this ltc reads {SCHEMA_VERSION}; run `ltc prepare` again"
        )
    return manifest


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (never whole into memory)."""
    with open(path, "rb") as fh:
        if hasattr(hashlib, "file_digest"):  # Python >= 3.11
            return hashlib.file_digest(fh, "sha256").hexdigest()
        digest = hashlib.sha256()
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
        return digest.hexdigest()


def _size_and_digest(path: Path) -> tuple[int, str]:
    return path.stat().st_size, file_sha256(path)


def verify(folder: str | os.PathLike[str]) -> list[str]:
    """What is wrong with a shard folder's files against its manifest, one line per file; [] if nothing.

    Checks each shard file and ``rejected.parquet``: present, of the recorded size, of the recorded
    SHA-256. Reads every byte, so it belongs where a stage is resolved, not in a trial.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"shard folder {folder} does not exist")
    manifest, problem = _read_manifest_or_problem(folder)
    return [problem] if manifest is None else _check_files(folder, manifest)


def _read_manifest_or_problem(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """(manifest, "") or (None, what is wrong with it)."""
    if not (folder / "manifest.json").is_file():
        return None, "manifest.json is missing"
    try:
        return read_manifest(folder), ""
    except ShardError as err:
        return None, str(err)


def _check_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    t0 = time.perf_counter()
    try:
        expected = [(s["file"], s.get("bytes"), s.get("sha256")) for s in manifest["shards"]]
    except (KeyError, TypeError, AttributeError):
        return [f"{folder / 'manifest.json'}: damaged manifest (bad shard list)"]
    expected.append(("rejected.parquet", manifest.get("rejected_bytes"), manifest.get("rejected_sha256")))
    problems = [p for file, size, digest in expected if (p := _check_file(folder, file, size, digest))]
    log.info("verified %d files in %s in %.1f s", len(expected), folder, time.perf_counter() - t0)
    return problems


def _check_file(folder: Path, file: str, size: int | None, digest: str | None) -> str | None:
    """The problem with one file, or None; the size (a stat) before the hash (a full read)."""
    path = folder / file
    if size is None or digest is None:
        return f"{file} has no size or checksum in the manifest (damaged manifest)"
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        return f"{file} is missing"
    if not path.is_file():
        return f"{file} is not a file"
    if actual != size:
        return f"{file} is damaged ({actual} bytes, manifest says {size})"
    if file_sha256(path) != digest:
        return f"{file} is damaged (checksum differs from manifest)"
    return None


def reason_kind(reason: str) -> str:
    """The kind of a rejection reason (``"<kind>: <detail>"``), for counting."""
    return reason.split(":", 1)[0]


def summarize_rejected(reasons: Sequence[str]) -> list[tuple[str, int]]:
    """(kind, count) of rejection reasons, most frequent first."""
    return Counter(reason_kind(r) for r in reasons).most_common()


# --------------------------------------------------------------------------------------------------
# Reading.


@dataclass(frozen=True)
class _Shard:
    """Zero-copy numpy views of one memory-mapped shard file."""

    table: pa.Table
    offsets: dict[str, np.ndarray]  # [n + 1] per ragged column
    values: dict[str, np.ndarray]  # flat values per ragged column


def _open_shard(path: Path, schema: pa.Schema = SCHEMA) -> _Shard:
    source = pa.memory_map(str(path), "r")
    table = pa.ipc.open_file(source).read_all()
    if not table.schema.equals(schema):
        raise ValueError(f"columns {table.schema.names} are not those of a shard of these graphs ({schema.names})")
    offsets, values = {}, {}
    for name in (f.name for f in schema if pa.types.is_list(f.type)):
        col = table.column(name)
        if col.num_chunks != 1:
            col = pa.chunked_array([pa.concat_arrays(col.chunks)]) if col.num_chunks else col
        arr = col.chunk(0) if col.num_chunks else pa.array([], type=schema.field(name).type)
        offsets[name] = arr.offsets.to_numpy(zero_copy_only=True)
        values[name] = arr.values.to_numpy(zero_copy_only=True)
    return _Shard(table, offsets, values)


def _ragged_gather(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat positions of the values of ``rows`` (in order) and each row's length."""
    starts = offsets[rows].astype(np.int64)
    lengths = offsets[rows + 1].astype(np.int64) - starts
    total = int(lengths.sum())
    # position k of the output reads value starts[row(k)] + (k - first output position of row(k))
    shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift, lengths


def _reorder(cat: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Graph-wise reorder of concatenated batch arrays: output graph k is input graph ``rows[k]``."""
    node_off = np.concatenate([[0], np.cumsum(cat["n"])])
    edge_off = np.concatenate([[0], np.cumsum(cat["e"])])
    npos, _ = _ragged_gather(node_off, rows)
    epos, _ = _ragged_gather(edge_off, rows)
    out = {"z": cat["z"][npos], "n": cat["n"][rows], "e": cat["e"][rows], "y": cat["y"][rows]}
    for name in ("edge_src", "edge_dst", "distances"):
        out[name] = cat[name][epos]
    out["vectors"] = cat["vectors"].reshape(-1, 3)[epos].reshape(-1)
    if "angle_edges" in cat:
        out["directed2undirected"] = cat["directed2undirected"][epos]
        angle_off = np.concatenate([[0], np.cumsum(cat["a"])])
        apos, _ = _ragged_gather(angle_off, rows)
        out["angle_edges"] = cat["angle_edges"].reshape(-1, 2)[apos].reshape(-1)
        out["a"] = cat["a"][rows]
    return out


def _to_batch(cat: dict[str, np.ndarray], idx: np.ndarray):
    """A PyG ``Batch`` from concatenated per-graph arrays (local node indices in ``edge_src/dst``)."""
    import torch
    from torch_geometric.data import Batch

    n, e = cat["n"], cat["e"]
    shift = np.repeat(np.cumsum(n) - n, e)  # each graph's first node in the batch, per edge
    edge_index = np.stack([cat["edge_src"] + shift, cat["edge_dst"] + shift])
    return Batch(
        z=torch.from_numpy(cat["z"].astype(np.int64)),
        edge_index=torch.from_numpy(edge_index.astype(np.int64)),
        edge_dist=torch.from_numpy(np.ascontiguousarray(cat["distances"], dtype=np.float32)),
        edge_vec=torch.from_numpy(np.ascontiguousarray(cat["vectors"], dtype=np.float32).reshape(-1, 3)),
        y=torch.from_numpy(cat["y"].astype(np.float64)),
        idx=torch.from_numpy(np.asarray(idx, dtype=np.int64)),
        batch=torch.from_numpy(np.repeat(np.arange(len(n)), n)),
        ptr=torch.from_numpy(np.concatenate([[0], np.cumsum(n)])),
        **(_bond_graph(cat) if "angle_edges" in cat else {}),
    )


def _bond_graph(cat: dict[str, np.ndarray]) -> dict[str, Any]:
    """CHGNet's bond graph of a batch, indices offset per graph (fields as ``ShardSet.batch`` documents)."""
    import torch

    e, a = cat["e"], cat["a"]
    bonds = e // 2  # every bond is two directed edges
    d2u = cat["directed2undirected"].astype(np.int64) + np.repeat(np.cumsum(bonds) - bonds, e)
    angles = cat["angle_edges"].astype(np.int64).reshape(-1, 2) + np.repeat(np.cumsum(e) - e, a)[:, None]
    # CHGNet's undirected2directed: each bond's first directed edge
    u2d = np.unique(d2u, return_index=True)[1]
    return {
        "directed2undirected": torch.from_numpy(d2u),
        "undirected2directed": torch.from_numpy(u2d.astype(np.int64)),
        "angle_edges": torch.from_numpy(angles),
    }


def collate_graphs(graphs: Sequence[CrystalGraph], y: Sequence[float] | None = None):
    """In-memory ``CrystalGraph``s (e.g. from new CIFs) as one PyG ``Batch``, like ``ShardSet.batch``.

    ``y`` defaults to NaN (unknown targets); ``idx`` is 0 … len-1.
    """
    if not graphs:
        raise ValueError("no graphs to collate")
    chgnet = [g.angle_edges is not None for g in graphs]
    if any(chgnet) and not all(chgnet):
        raise ValueError("cannot collate graphs with and without CHGNet's bond graph")
    cat = {
        "n": np.asarray([g.num_nodes for g in graphs], dtype=np.int64),
        "e": np.asarray([g.num_edges for g in graphs], dtype=np.int64),
        "z": np.concatenate([g.z for g in graphs]),
        "edge_src": np.concatenate([g.edge_index[0] for g in graphs]),
        "edge_dst": np.concatenate([g.edge_index[1] for g in graphs]),
        "distances": np.concatenate([g.distances for g in graphs]),
        "vectors": np.concatenate([g.vectors.reshape(-1) for g in graphs]),
        "y": np.full(len(graphs), np.nan) if y is None else np.asarray(y, dtype=np.float64),
    }
    if all(chgnet):
        cat["directed2undirected"] = np.concatenate([g.directed2undirected for g in graphs])
        cat["angle_edges"] = np.concatenate([g.angle_edges.reshape(-1) for g in graphs])
        cat["a"] = np.asarray([len(g.angle_edges) for g in graphs], dtype=np.int64)
    return _to_batch(cat, np.arange(len(graphs)))


class ShardSet:
    """A memory-mapped shard set: ``len``, ``ids``, ``y``, ``get(i)`` and ``batch(indices)``.

    Indices are positions 0 … len-1 in the set, in shard order.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.path = Path(folder)
        if not self.path.is_dir():
            raise MissingFileError(f"shard folder {self.path} does not exist; run `ltc prepare <dataset>` to build it")
        self.manifest = read_manifest(self.path)
        self.graph = GraphConfig(**self.manifest["graph"])
        self._schema = schema_for(self.graph)
        self._bond_graph = "angle_edges" in self._schema.names  # CHGNet's, carried into every batch
        # Cheap checks only (stat, footer, row count): hashing is the driver's job, once per stage.
        repair = f"run `ltc prepare {self.manifest.get('dataset', '<dataset>')}` to verify and rebuild the set"
        self._shards: list[_Shard] = []
        for entry in self.manifest["shards"]:
            file = self.path / entry["file"]
            if not file.is_file():
                raise ShardError(f"{self.path}: shard file {entry['file']} is missing; {repair}")
            size = file.stat().st_size
            if "bytes" in entry and size != entry["bytes"]:
                raise ShardError(f"{file}: {size} bytes, manifest says {entry['bytes']} (truncated?); {repair}")
            try:
                shard = _open_shard(file, self._schema)
            except (pa.ArrowException, OSError, ValueError, KeyError, IndexError) as err:
                raise ShardError(f"{file}: unreadable shard file ({type(err).__name__}: {err}); {repair}") from err
            if shard.table.num_rows != entry["n_graphs"]:
                raise ShardError(f"{file}: {shard.table.num_rows} rows, manifest says {entry['n_graphs']}; {repair}")
            self._shards.append(shard)
        counts = [s.table.num_rows for s in self._shards]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.name: str = self.manifest["dataset"]

    @classmethod
    def open(
        cls,
        name: str,
        *,
        graph: GraphConfig = GraphConfig(),
        home: str | os.PathLike[str] | None = None,
        cache: str | os.PathLike[str] | None = None,
        **prepare_kwargs: Any,
    ) -> ShardSet:
        """Prepare (if needed) and open the shards of dataset ``name``."""
        return cls(prepare(name, graph=graph, home=home, cache=cache, **prepare_kwargs).path)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        return f"ShardSet({self.name!r}, n_graphs={len(self)}, graph={self.graph}, path='{self.path}')"

    def _column(self, name: str) -> np.ndarray:
        parts = [s.table.column(name).to_numpy() for s in self._shards]
        return np.concatenate(parts) if parts else np.zeros(0)

    @cached_property
    def target(self) -> datasets.TargetInfo:
        """What the set's target is (units, kappa, default transform): a built-in dataset's from the registry, a
        user's from the manifest (a trial has no declarations: ``datasets.declare`` runs on the driver)."""
        return datasets.target_info(self.name, self.manifest)

    @cached_property
    def ids(self) -> list[str]:
        return [i for s in self._shards for i in s.table.column("id").to_pylist()]

    @property
    def rejected_ids(self) -> list[str]:
        """Ids of the input rows that did not become graphs (see ``rejected.parquet``)."""
        path = self.path / "rejected.parquet"
        return pq.read_table(path, columns=["id"])["id"].to_pylist() if path.is_file() else []

    @property
    def y(self) -> np.ndarray:
        """[n] targets in raw units (float64)."""
        return self._column("y").astype(np.float64)

    @cached_property
    def formulas(self) -> list[str]:
        return [f for s in self._shards for f in s.table.column("formula").to_pylist()]

    @property
    def num_nodes(self) -> np.ndarray:
        return self._column("num_nodes").astype(np.int64)

    @cached_property
    def _positions(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.ids)}

    def indices_of(self, ids: Sequence[str], *, missing: str = "raise") -> np.ndarray:
        """Positions of ``ids`` in this set. ``missing``: "raise" or "skip" ids not in the set."""
        pos = self._positions
        out = [pos.get(str(k), -1) for k in ids]
        if missing == "raise" and -1 in out:
            absent = [k for k, i in zip(ids, out, strict=True) if i < 0]
            raise KeyError(f"{len(absent)} id(s) not in {self.name} shards, e.g. {absent[:5]}")
        return np.asarray([i for i in out if i >= 0], dtype=np.int64)

    def _locate(self, indices: np.ndarray) -> np.ndarray:
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            bad = indices[(indices < 0) | (indices >= len(self))][0]
            raise IndexError(f"graph index {int(bad)} out of range for {len(self)} graphs")
        return np.searchsorted(self._starts, indices, side="right") - 1

    def get(self, i: int):
        """Graph ``i`` as a PyG ``Data`` whose arrays view the mapped file (no copy)."""
        import torch
        from torch_geometric.data import Data

        shard_no = int(self._locate(np.asarray([i]))[0])
        s, row = self._shards[shard_no], i - int(self._starts[shard_no])

        def view(name: str) -> np.ndarray:
            o = s.offsets[name]
            return s.values[name][o[row] : o[row + 1]]

        extra = {}
        if self._bond_graph:  # local indices, as stored
            extra["directed2undirected"] = torch.from_numpy(view("directed2undirected").astype(np.int64))
            extra["angle_edges"] = torch.from_numpy(view("angle_edges").astype(np.int64)).view(-1, 2)
        with warnings.catch_warnings():
            # the mapped buffers are read-only; the tensors are only read
            warnings.simplefilter("ignore", UserWarning)
            return Data(
                z=torch.from_numpy(view("z")).long(),
                edge_index=torch.from_numpy(np.stack([view("edge_src"), view("edge_dst")])).long(),
                edge_dist=torch.from_numpy(view("distances")),
                edge_vec=torch.from_numpy(view("vectors")).view(-1, 3),
                y=torch.tensor([float(s.table.column("y")[row].as_py())], dtype=torch.float64),
                num_nodes=int(view("z").shape[0]),
                idx=torch.tensor([i]),
                **extra,
            )

    def batch(self, indices: Sequence[int] | np.ndarray):
        """Graphs ``indices`` as one PyG ``Batch`` (node indices offset per graph, ``batch``, ``ptr``).

        Fields: ``z`` [N] long, ``edge_index`` [2, E] long, ``edge_dist`` [E] float32 (Å),
        ``edge_vec`` [E, 3] float32 (Å), ``y`` [B] float64 (raw units), ``idx`` [B] positions in this set.
        "chgnet" graphs add CHGNet's bond graph (long, indices into the batch): ``directed2undirected`` [E]
        (the bond of each directed edge), ``undirected2directed`` [U] (each bond's first directed edge) and
        ``angle_edges`` [A, 2] (the two directed edges of each angle, both from its centre atom).
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        shard_of = self._locate(idx)
        extra = ("directed2undirected", "angle_edges", "a") if self._bond_graph else ()
        parts: dict[str, list[np.ndarray]] = {k: [] for k in (*_RAGGED, "y", "n", "e", *extra)}
        order = np.argsort(shard_of, kind="stable")
        for shard_no in np.unique(shard_of):
            s = self._shards[int(shard_no)]
            rows = idx[order][shard_of[order] == shard_no] - self._starts[shard_no]
            pos, n = _ragged_gather(s.offsets["z"], rows)
            parts["z"].append(s.values["z"][pos])
            parts["n"].append(n)
            pos, e = _ragged_gather(s.offsets["edge_src"], rows)
            for name in ("edge_src", "edge_dst", "distances"):
                parts[name].append(s.values[name][pos])
            parts["e"].append(e)
            vpos = (pos[:, None] * 3 + np.arange(3)).reshape(-1)
            parts["vectors"].append(s.values["vectors"][vpos])
            if self._bond_graph:
                parts["directed2undirected"].append(s.values["directed2undirected"][pos])
                apos, two_a = _ragged_gather(s.offsets["angle_edges"], rows)
                parts["angle_edges"].append(s.values["angle_edges"][apos])
                parts["a"].append(two_a // 2)
            parts["y"].append(s.table.column("y").chunk(0).to_numpy()[rows])
        cat = {k: np.concatenate(v) for k, v in parts.items()}
        if len(parts["n"]) > 1:
            # Gathered shard by shard; put the graphs back in the order asked for.
            cat = _reorder(cat, np.argsort(order))
        return _to_batch(cat, idx)

    def iter_batches(
        self,
        batch_size: int,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> Iterator[Any]:
        """Batches of ``batch_size`` graphs over ``indices`` (default all), optionally shuffled by ``seed``."""
        if batch_size < 1:
            raise ValueError(f"{batch_size=} must be >= 1")
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        if shuffle:
            idx = np.random.default_rng(seed).permutation(idx)
        stop = len(idx) - (len(idx) % batch_size if drop_last else 0)
        for i in range(0, stop, batch_size):
            yield self.batch(idx[i : i + batch_size])
