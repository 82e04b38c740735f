"""A stage's inputs on every node: the driver's shard folders and split files reach a node before its trials read them.

The driver resolves a stage's inputs into its shard cache (``ltc.inputs``): shard folders, split-id files, the
held-out formula list. With ``LTC_CACHE`` on a folder every node mounts (or on one machine), trials read those
paths as they are. On a cluster without one, a node lacks them: for the length of the stage the driver serves
them from an actor on its own node (``serve_inputs``: ``InputServer``, named, 0 CPUs), and a trial whose node
lacks a path copies it from there before it trains (``localize``), to the same path when it can write there,
else under the node's temp folder. One trial per node copies (a file lock beside the copy) while the others on
that node wait, then read the copy; a node that joins mid-stage gets the inputs with its first trial there.

A copy is the driver's bytes, checked against the sizes the server listed: no trial featurises, reads raw data
or hashes anything. A copy appears whole or not at all (written beside, then renamed into place). The server
serves the paths it was given and nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ltc.errors import MissingFileError
from ltc.inputs import RunInputs

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20  # per actor call: large enough to stream, small enough for the object store
SERVER_THREADS = 8  # calls the input server answers at once
SERVER_PREFIX = "ltc-inputs-"


def server_name(root: str | os.PathLike[str], stage: str) -> str:
    """The input server's actor name for one stage of the sweep in ``root``: the same on ``--resume``, so
    restored trials (whose configs hold it) find the new driver's server."""
    return SERVER_PREFIX + hashlib.sha256(f"{Path(root)}\0{stage}".encode()).hexdigest()[:16]


def input_paths(inputs: Iterable[RunInputs]) -> list[str]:
    """Every path some ``RunInputs`` opens: shard folders, split-id files, held-out formula lists."""
    paths: set[str] = set()
    for i in inputs:
        paths.update(i.shards.values())
        paths.update(i.splits.values())
        if i.holdout:
            paths.add(i.holdout)
    return sorted(paths)


class InputServer:
    """Lists and reads the files of ``paths`` (files, or folders: the files directly inside) and nothing else.

    Run as a Ray actor on the driver's node (``serve_inputs``); plain methods, so it is testable without Ray.
    """

    def __init__(self, paths: list[str]) -> None:
        self._listings: dict[str, tuple[bool, list[tuple[str, int]]]] = {}
        for p in paths:
            path = Path(p)
            if path.is_dir():
                files = sorted((f.name, f.stat().st_size) for f in path.iterdir() if f.is_file())
                self._listings[p] = (True, [(n, s) for n, s in files if not n.startswith(".")])
            elif path.is_file():
                self._listings[p] = (False, [(path.name, path.stat().st_size)])
            else:
                raise MissingFileError(f"input {p} does not exist on the driver's node")

    def paths(self) -> list[str]:
        """The paths served."""
        return sorted(self._listings)

    def listing(self, path: str) -> tuple[bool, list[tuple[str, int]]]:
        """(is a folder, [(file name, bytes)]) of a served path."""
        if path not in self._listings:
            raise MissingFileError(f"{path} is not an input of this stage")
        return self._listings[path]

    def read(self, path: str, name: str, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of file ``name`` of a served path."""
        is_dir, files = self.listing(path)
        if name not in dict(files):
            raise MissingFileError(f"{name} is not a file of input {path}")
        with open(Path(path) / name if is_dir else Path(path), "rb") as fh:
            fh.seek(offset)
            return fh.read(size)


@contextlib.contextmanager
def serve_inputs(name: str, paths: list[str]) -> Iterator[str]:
    """An ``InputServer`` of ``paths`` on this (the driver's) node, named ``name``, for the length of the block."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # 0 CPUs: the head of a cluster (cluster.yaml) has none to give, and serving is I/O. Threads: nodes that
    # join together (an autoscaler's) copy at once. Restarts: a server that died comes back for later trials.
    server = ray.remote(num_cpus=0, max_concurrency=SERVER_THREADS, max_restarts=-1)(InputServer)
    actor = server.options(name=name, scheduling_strategy=here).remote(paths)
    try:
        ray.get(actor.paths.remote())  # up, and its listings taken, before any trial asks
        yield name
    finally:
        ray.kill(actor)


def _present(path: Path) -> bool:
    """A shard folder counts once its manifest is there; a file, once it is there."""
    return path.is_file() or (path / "manifest.json").is_file()


def localize(inputs: RunInputs, server: str | None) -> tuple[RunInputs, int]:
    """``inputs`` with every path this node lacks replaced by a local copy fetched from ``server`` (the actor
    name in the trial's config; None: use the paths as they are); and the bytes copied."""
    missing = [p for p in input_paths([inputs]) if not _present(Path(p))]
    if not missing or server is None:
        return inputs, 0
    import ray

    try:
        actor = ray.get_actor(server)
    except ValueError:
        raise MissingFileError(
            f"{missing[0]} does not exist on this node, and the driver's input server {server} is gone"
        ) from None
    local: dict[str, str] = {}
    copied = 0
    for p in missing:
        target = _target(p)
        copied += fetch_input(actor, p, target)
        local[p] = str(target)

    def swap(p: str) -> str:
        return local.get(p, p)

    moved = RunInputs(
        {k: swap(v) for k, v in inputs.shards.items()},
        {k: swap(v) for k, v in inputs.splits.items()},
        swap(inputs.holdout) if inputs.holdout else None,
        inputs.holdout_datasets,
    )
    return moved, copied


def _target(path: str) -> Path:
    """Where this node keeps its copy of ``path``: the same path when its folder can be made and written to
    (nodes built from one image), else a folder of its own under the temp folder."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        if os.access(p.parent, os.W_OK):
            return p
    except OSError:
        pass
    digest = hashlib.sha256(path.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "ltc-inputs" / digest
    folder.mkdir(parents=True, exist_ok=True)
    return folder / p.name


def fetch_input(actor: Any, path: str, target: Path) -> int:
    """Copy the served ``path`` (folder or file) from ``actor`` (an ``InputServer``) to ``target``, under a lock
    beside it; the bytes copied (0: another trial of this node made the copy)."""
    import ray

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other trials of this node wait here, then find the copy
        if _present(target):
            return 0
        is_dir, files = ray.get(actor.listing.remote(path))
        # host and pid: a folder two machines share (an NFS home) never sees two copies write one part
        part = target.parent / f".{target.name}.{socket.gethostname()}.{os.getpid()}.part"
        try:
            if is_dir:
                part.mkdir()
            copied = 0
            for name, size in files:
                dest = part / name if is_dir else part
                with open(dest, "wb") as out:
                    for offset in range(0, size, CHUNK_BYTES):
                        out.write(ray.get(actor.read.remote(path, name, offset, CHUNK_BYTES)))
                if dest.stat().st_size != size:
                    where = f"{path}/{name}" if is_dir else path
                    raise MissingFileError(f"{where}: copied {dest.stat().st_size} bytes, the driver has {size}")
                copied += size
            if target.is_dir():  # a folder without its manifest: left by a copy or build that did not finish
                shutil.rmtree(target)
            os.replace(part, target)
        except BaseException:  # no half copy left behind (another trial of this node may try again)
            if part.is_dir():
                shutil.rmtree(part, ignore_errors=True)
            else:
                part.unlink(missing_ok=True)
            raise
    log.info("copied %s to %s (%d bytes)", path, target, copied)
    return copied
