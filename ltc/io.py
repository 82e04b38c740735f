"""Files: atomic writes (temp file in the same folder, then rename) and local-or-URI reads and copies.

Every file a reader must be able to trust (manifests, checkpoints, tables, reports) is written through
``write_atomic``: a killed writer leaves the old file or none, never half of one. Paths that may be
object-storage URIs (``s3://…``, ``gs://…``; ``file://`` and plain paths are local) are read and
copied through this module (``filesystem``, ``open_input``, ``copy_to_local``: pyarrow's filesystems).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ltc.errors import MissingFileError


def write_atomic(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place.

    The temporary name carries the pid, so two processes writing the same file never share one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """``obj`` as indented JSON at ``path``, atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_parquet_atomic(path: str | os.PathLike[str], table: Any) -> Path:
    """A pandas DataFrame or pyarrow Table as Parquet at ``path``, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(tmp: Path) -> None:
        if isinstance(table, pa.Table):
            pq.write_table(table, tmp)
        else:
            table.to_parquet(tmp, index=False)

    return write_atomic(path, write)


def is_uri(path: str | os.PathLike[str]) -> bool:
    """True for ``scheme://…`` other than ``file://``."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def local_path(path: str | os.PathLike[str]) -> Path:
    return Path(str(path).removeprefix("file://"))


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) of a local path or URI."""
    import pyarrow.fs as pafs

    if not is_uri(uri):
        return pafs.LocalFileSystem(), str(local_path(uri).resolve())
    return pafs.FileSystem.from_uri(uri)


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


@contextmanager
def open_input(uri: str) -> Any:
    """A binary input stream of a local path or URI; a missing file is a ``MissingFileError`` naming it."""
    if not is_uri(uri):
        p = local_path(uri)
        if not p.is_file():
            raise MissingFileError(f"{uri} does not exist")
        with open(p, "rb") as fh:
            yield fh
        return
    fs, path = filesystem(uri)
    try:
        stream = fs.open_input_stream(path)
    except FileNotFoundError as err:
        raise MissingFileError(f"{uri} does not exist") from err
    with stream:
        yield stream


def copy_file(src: str, dest: str | os.PathLike[str]) -> Path:
    """Copy ``src`` (local path or URI) to the local file ``dest``, atomically."""

    def write(tmp: Path) -> None:
        with open_input(src) as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)

    return write_atomic(dest, write)


_LOCAL_COPIES: dict[str, str] = {}  # URI → local file, per process (Ray reuses worker processes)


def copy_to_local(uri: str) -> str:
    """A local path for a local path or URI: URIs are copied once per process into a temp file."""
    if not is_uri(uri):
        return str(local_path(uri))
    if uri not in _LOCAL_COPIES or not Path(_LOCAL_COPIES[uri]).is_file():
        fd, local = tempfile.mkstemp(suffix=Path(uri).suffix or ".bin", prefix="ltc-")
        os.close(fd)
        copy_file(uri, local)
        _LOCAL_COPIES[uri] = local
    return _LOCAL_COPIES[uri]
