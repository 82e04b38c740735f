"""Files: atomic writes (temp file in the same folder, then rename) and local-or-URI reads and copies.

Every file a reader must be able to trust (manifests, checkpoints, tables, reports) is written through
``write_atomic``: a killed writer leaves the old file or none, never half of one. Paths that may be
object-storage URIs (``s3://…``, ``gs://…``; ``file://`` and plain paths are local) are read and
copied through this module (``filesystem``, ``open_input``, ``copy_file``: pyarrow's filesystems). An
S3-compatible endpoint is named by ``AWS_ENDPOINT_URL`` (``s3_endpoint``), credentials by the AWS variables or
profile, never by the URI: ltc writes URIs into results and Tune state (``check_uri``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ltc.errors import ConfigError, DataError, MissingFileError


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


# The AWS SDKs' variables for an S3-compatible endpoint (MinIO, Ceph, a test server), the S3-specific one first.
# pyarrow reads neither, so ltc passes the endpoint to pyarrow itself.
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def s3_endpoint() -> tuple[str, str] | None:
    """(scheme, host[:port]) of the S3 endpoint in ``AWS_ENDPOINT_URL_S3`` or else ``AWS_ENDPOINT_URL``; None if
    neither is set. A value that is not ``http(s)://host[:port]`` is a ``ConfigError`` that does not echo it
    (a user name or query string in it could be a secret)."""
    for variable in ENDPOINT_VARIABLES:
        value = os.environ.get(variable, "").strip()
        if value:
            break
    else:
        return None
    parts = urllib.parse.urlsplit(value)
    if not _is_endpoint(parts):
        raise ConfigError(
            f"{variable} must be an S3 endpoint as http://host[:port] or https://host[:port], without a user, "
            "path or query string (credentials come from the AWS variables or profile)"
        )
    return parts.scheme, parts.netloc


def _is_endpoint(parts: urllib.parse.SplitResult) -> bool:
    try:
        parts.port  # noqa: B018 (parsing it is the check: a bad port raises)
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and "@" not in parts.netloc
        and parts.path in ("", "/")
        and not parts.query
        and not parts.fragment
    )


def check_uri(uri: str, *, what: str = "URI") -> None:
    """Refuse (``ConfigError``) a URI that ltc would write somewhere with something it must not hold.

    A query string (``s3://bucket/prefix?endpoint_override=…``, pyarrow's way to pass options) would reach the
    results table (checkpoint URIs), Tune's state and the logs, so it is refused without echoing it; so is an
    ``s3://`` URI while the endpoint variable is malformed. Local paths pass as they are.
    """
    if not is_uri(uri):
        return
    base, query = uri.split("?", 1) if "?" in uri else (uri, "")
    scheme, rest = base.split("://", 1)
    userinfo, at, after = rest.rpartition("@")
    # s3://KEY:SECRET@bucket/…, where a secret may hold "/" and "@": never echoed (only what follows the last "@")
    if at and (":" in userinfo or "/" not in userinfo):
        raise ConfigError(
            f"{what} {scheme}://…@{after}: credentials in a URI are refused (they would be written "
            "into results, Tune's state and the logs); give them with the AWS variables or an AWS profile"
        )
    if query:
        raise ConfigError(
            f"{what} {base}?…: a query string is not accepted, since it would be written into results and Tune "
            "state; give an S3-compatible endpoint with AWS_ENDPOINT_URL and credentials with the AWS variables "
            "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or an AWS profile"
        )
    if uri.startswith("s3://"):
        s3_endpoint()


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) of a local path or URI; the one place ltc builds filesystems.

    ``s3://bucket/key`` with an endpoint set (``s3_endpoint``) is ``bucket/key`` on an S3FileSystem at that
    endpoint, with its region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` if set (built directly, not with
    ``FileSystem.from_uri``, which would ask real AWS for the bucket's region). Credentials are never passed:
    pyarrow finds them in its default chain (AWS variables, profile). Other URIs: ``FileSystem.from_uri``.
    """
    import pyarrow.fs as pafs

    if not is_uri(uri):
        return pafs.LocalFileSystem(), str(local_path(uri).resolve())
    check_uri(uri)
    endpoint = s3_endpoint() if uri.startswith("s3://") else None
    if endpoint is None:
        return pafs.FileSystem.from_uri(uri)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    return _endpoint_s3(*endpoint, region), uri.removeprefix("s3://").rstrip("/")


def _endpoint_s3(scheme: str, endpoint: str, region: str | None) -> Any:
    """An S3FileSystem at ``scheme://endpoint`` (see ``filesystem``); also what unpickling one calls."""
    return _endpoint_s3_type()(scheme=scheme, endpoint_override=endpoint, region=region)


@functools.cache
def _endpoint_s3_type() -> type:
    import pyarrow.fs as pafs

    class EndpointS3FileSystem(pafs.S3FileSystem):
        """pyarrow's S3FileSystem that pickles as (scheme, endpoint, region) only.

        Tune pickles its storage filesystem into ``tuner.pkl`` and into every trial it starts; pyarrow's own
        pickle holds every option, credentials when they were given explicitly. This one holds none by
        construction: the node that unpickles it finds its credentials in its own default chain.
        """

        def __init__(self, *, scheme: str, endpoint_override: str, region: str | None) -> None:
            super().__init__(scheme=scheme, endpoint_override=endpoint_override, region=region)
            self._ltc_args = (scheme, endpoint_override, region)

        def __reduce__(self) -> tuple[Any, tuple[str, str, str | None]]:
            return _endpoint_s3, self._ltc_args

    return EndpointS3FileSystem


# Ray Tune copies these from the driver's environment into every trial's runtime env, which Ray's runtime-env
# agent writes into its log (ray/tune/execution/class_cache.py and runtime_env_agent.log, Ray 2.60)
# (variable → its key in a credentials file; the old AWS_SECURITY_TOKEN first, so AWS_SESSION_TOKEN wins)
CREDENTIAL_VARIABLES = {
    "AWS_ACCESS_KEY_ID": "aws_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
    "AWS_SECURITY_TOKEN": "aws_session_token",
    "AWS_SESSION_TOKEN": "aws_session_token",
}


CREDENTIALS_PROFILE = "ltc-environment"  # the profile the moved credentials go under: no config file names it


@contextmanager
def aws_credentials_in_a_file() -> Iterator[Path | None]:
    """For the block, AWS credentials out of this process's environment, in a private credentials file; its path.

    The file (mode 0600, in a 0700 temp folder named for this host and process, removed at exit, or by the next
    ltc to start here if this one was killed) holds them under profile ``CREDENTIALS_PROFILE``;
    ``AWS_SHARED_CREDENTIALS_FILE`` and ``AWS_PROFILE`` name it, so pyarrow and boto3 here, and the workers of a
    local Ray started in the block, find the same credentials, but Tune has none to copy into trials' runtime
    envs, which Ray logs. Trials on other nodes use their node's own credentials (instance profile, variables,
    file). The environment is as it was after the block; the file stays until exit (a local Ray's workers keep
    reading it). None, and nothing changed, when no credential variable is set.
    """
    found = {k: os.environ[k] for k in CREDENTIAL_VARIABLES if os.environ.get(k)}
    if not found:
        yield None
        return
    import atexit
    import socket

    host = socket.gethostname()
    _remove_dead_credentials(host)
    folder = Path(tempfile.mkdtemp(prefix=f"ltc-aws-{host}-{os.getpid()}-"))  # mkdtemp: 0700
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = folder / "credentials"
    entries = {CREDENTIAL_VARIABLES[k]: v for k, v in found.items()}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join([f"[{CREDENTIALS_PROFILE}]", *(f"{k} = {v}" for k, v in entries.items())]) + "\n")
    saved = {k: os.environ.get(k) for k in (*CREDENTIAL_VARIABLES, "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE")}
    for k in CREDENTIAL_VARIABLES:
        os.environ.pop(k, None)
    # a profile of its own: the user's AWS_PROFILE could name one whose config (role_arn, credential_process)
    # would take precedence over the keys the variables gave
    os.environ.update(AWS_SHARED_CREDENTIALS_FILE=str(path), AWS_PROFILE=CREDENTIALS_PROFILE)
    try:
        yield path
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _remove_dead_credentials(host: str) -> None:
    """Remove the credential folders of this host's ltc processes that ended without their exit handlers (a
    SIGKILL): their pid, in the folder's name, is gone."""
    for folder in Path(tempfile.gettempdir()).glob(f"ltc-aws-{host}-*"):
        pid = folder.name.removeprefix(f"ltc-aws-{host}-").split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, and someone else's
            pass


def tune_storage(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem or None) for Ray Tune's ``RunConfig`` and ``Tuner.restore`` of a local
    folder or URI. With an S3 endpoint set, ``s3://bucket/prefix`` is ``("bucket/prefix", S3FileSystem at the
    endpoint)``: Tune uses a path given beside a filesystem as it is. Anything else is left to Tune, as given."""
    check_uri(uri, what="storage")
    if not (uri.startswith("s3://") and s3_endpoint()):
        return uri, None
    fs, path = filesystem(uri)
    return path, fs


def file_type(uri: str) -> str | None:
    """``"file"``, ``"dir"`` or None (missing) for a local path or URI (an object-store prefix holding objects
    is a folder)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    kind = fs.get_file_info(path).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(kind)


def find_files(folder: str, name: str) -> list[str]:
    """Every file called ``name`` beneath ``folder`` (a local path or URI, searched recursively), sorted, as
    paths or URIs like ``folder``."""
    import pyarrow.fs as pafs

    fs, path = filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    found = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name == name)
    if not is_uri(folder):
        return found
    scheme = folder.split("://", 1)[0]
    return [f"{scheme}://{p}" for p in found]


def exists(uri: str) -> bool:
    return file_type(uri) is not None


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


def put_file(src: str, dest: str) -> None:
    """Copy ``src`` (local path or URI) to ``dest`` (local path or URI); a local ``dest`` appears whole or not at
    all, an object appears when its upload completes."""
    if not is_uri(dest):
        copy_file(src, dest)
        return
    fs, path = filesystem(dest)
    with open_input(src) as fin, fs.open_output_stream(path) as fout:
        shutil.copyfileobj(fin, fout)


def copy_file(src: str, dest: str | os.PathLike[str]) -> Path:
    """Copy ``src`` (local path or URI) to the local file ``dest``, atomically."""

    def write(tmp: Path) -> None:
        with open_input(src) as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)

    return write_atomic(dest, write)


def pause_for_tests(where: str) -> None:
    """Tests only: hold here (``LTC_TEST_PAUSE_AT=where``) after touching ``LTC_TEST_PAUSE_FILE``, so that a test
    can kill a process at a known point rather than race it."""
    if os.environ.get("LTC_TEST_PAUSE_AT") == where:
        Path(os.environ["LTC_TEST_PAUSE_FILE"]).touch()
        time.sleep(float(os.environ.get("LTC_TEST_PAUSE_SECONDS", "600")))


LOW_SPACE = 16 * 2**20  # bytes: a file system with less left is taken for the full one after a failed write


def free_space(folders: list[Path]) -> dict[Path, int]:
    """Bytes free on the file system of each local folder (of its nearest existing parent)."""
    free: dict[Path, int] = {}
    for folder in folders:
        folder = Path(folder).absolute()
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is not None:
            free.setdefault(folder, shutil.disk_usage(existing).free)
    return free


def raise_if_full(folders: list[Path]) -> None:
    """``OSError(ENOSPC)`` naming the first of ``folders`` with under ``LOW_SPACE`` left, if any: for a failure
    whose own error names no file (Arrow's writes, Tune's, a trial's), so that the user learns where to free space."""
    for folder, free in free_space(folders).items():
        if free < LOW_SPACE:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free / 2**20:.1f} MiB free)", str(folder))


def keep_working_directory() -> None:
    """Give this process a working directory again if its own was deleted under it, before it spawns processes
    (``multiprocessing`` hands them the parent's). A Ray job's driver stands in the job's unpacked ``working_dir``,
    and Ray's runtime-env agent of each node unpacks it afresh (it overwrites) into the session folder that nodes
    on one machine share: the folder is deleted and a new one made at its path. That path again, else the temp
    folder."""
    try:
        os.getcwd()
        return
    except FileNotFoundError:
        pass
    gone = ""
    with contextlib.suppress(OSError):  # not Linux
        gone = os.readlink("/proc/self/cwd").removesuffix(" (deleted)")
    where = gone if gone and os.path.isdir(gone) else tempfile.gettempdir()
    os.chdir(where)


def inside(base: str | os.PathLike[str], path: str | os.PathLike[str]) -> Any:
    """``path``, returned as given when it lies inside ``base`` (local folders compared as absolute, normalised
    paths, symlinks not followed; URIs by prefix, with no ``.``/``..`` segment after it): a path ltc derives from
    names must never leave the folder the user gave (``ConfigError`` otherwise)."""
    if is_uri(str(base)):
        prefix = str(base).rstrip("/") + "/"
        rest = str(path)[len(prefix) :]
        ok = str(path).startswith(prefix) and not {".", ".."} & set(rest.split("/"))
    else:
        root, full = (os.path.normpath(os.path.abspath(p)) for p in (base, path))
        ok = full == root or full.startswith(root.rstrip(os.sep) + os.sep)
    if not ok:
        raise ConfigError(
            f"{path} would lie outside {base}, where ltc keeps everything of this run: a name with a path in it?"
        )
    return path


def read_parquet_checked(path: Path, remedy: str) -> Any:
    """``pandas.read_parquet(path)``; a damaged file is a ``DataError`` naming it, the reader's first line and
    ``remedy`` (what to do about it). A permission error stays one (it is not damage)."""
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except PermissionError:
        raise
    except Exception as err:  # pyarrow raises several kinds on a damaged file
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise DataError(f"{path} is damaged ({type(err).__name__}: {first}): {remedy}") from None
