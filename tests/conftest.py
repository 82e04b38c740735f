"""Shared fixtures: the real data home (``$LTC_DATA_HOME`` or ``../shared/data``), a private cache, and an S3
server (moto's, a subprocess on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ltc.sweep.driver import local_ray_on_loopback

REPO = Path(__file__).resolve().parents[1]


def _find_data_home() -> Path:
    env = os.environ.get("LTC_DATA_HOME")
    home = Path(env) if env else REPO.parent / "shared" / "data"
    if not (home / "SOURCES.md").is_file():
        pytest.exit(
            f"ltc's tests read real data: set LTC_DATA_HOME to a folder laid out like shared/data (looked in {home})",
            returncode=2,
        )
    return home.resolve()


DATA_HOME = _find_data_home()

# the local Rays the tests start keep their servers on 127.0.0.1 (a shared machine), as `ltc sweep`'s own do
# (ltc.sweep.driver.LOOPBACK_ONLY); RayCluster's nodes leave it out (its `ray start` clusters would refuse workers)
local_ray_on_loopback()


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs on 127.0.0.1 for one test module, shut down after it (the module's own)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory):
    """Every test session reads the real data and writes shards into its own cache, never the user's."""
    cache = tmp_path_factory.mktemp("ltc_cache")
    saved = {k: os.environ.get(k) for k in ("LTC_DATA_HOME", "LTC_CACHE", "LTC_DOWNLOAD")}
    os.environ.update(LTC_DATA_HOME=str(DATA_HOME), LTC_CACHE=str(cache), LTC_DOWNLOAD="0")
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def data_home() -> Path:
    return DATA_HOME


@pytest.fixture(scope="session")
def shared_cache() -> Path:
    """The session's shard cache: shards built here are reused by every test that asks for the same key."""
    return Path(os.environ["LTC_CACHE"])


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>
    bucket: str
    env: dict[str, str]  # AWS_ENDPOINT_URL, made-up credentials for this run, AWS_REGION: set them with monkeypatch


def moto_command(port: int) -> list[str]:
    """moto's S3 server on 127.0.0.1:``port`` (the venv's ``moto_server``)."""
    return [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]


def aws_variables(endpoint: str) -> dict[str, str]:
    """The AWS variables of a test server at ``endpoint``: credentials made up per run, so that a test can look
    for them in whatever ltc, Tune and Ray wrote."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": f"AKIA{secrets.token_hex(8).upper()}",
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
        "AWS_REGION": "us-east-1",
    }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server with one bucket, started once per session and stopped by its own process group."""
    import boto3
    from ray_cluster import free_port

    port = free_port()  # moto binds it right after (a race no other test runs)
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(moto_command(port), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # an HTTP answer, even an error: it is up
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start:\n{log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        env = aws_variables(endpoint)
        bucket = "ltc-test"
        boto3.client(
            "s3", endpoint_url=endpoint, region_name=env["AWS_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        ).create_bucket(Bucket=bucket)  # fmt: skip
        yield S3Server(endpoint, bucket, env)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # the group it leads: the server and nothing else
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def aws_env(monkeypatch: pytest.MonkeyPatch, server: S3Server) -> None:
    """Point pyarrow and ltc at ``server`` only: its variables set, other AWS settings that could win cleared."""
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)


def _client(server: S3Server):
    import boto3

    return boto3.client(
        "s3", endpoint_url=server.endpoint, region_name=server.env["AWS_REGION"],
        aws_access_key_id=server.env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=server.env["AWS_SECRET_ACCESS_KEY"],
    )  # fmt: skip


def bucket_keys(server: S3Server, prefix: str) -> list[str]:
    """The keys under ``prefix`` in the server's bucket (listed with the test's own client)."""
    client = _client(server)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def bucket_objects(server: S3Server, prefix: str) -> dict[str, bytes]:
    """Key → bytes of every object under ``prefix`` in the server's bucket (read with the test's own client)."""
    client = _client(server)
    return {k: client.get_object(Bucket=server.bucket, Key=k)["Body"].read() for k in bucket_keys(server, prefix)}


def read_files(folder: Path) -> dict[str, bytes]:
    """Path -> bytes of every regular file under ``folder``; files that go while it reads (a live Ray's) are left
    out."""
    files = {}
    for parent, _, names in os.walk(folder):  # (os.walk passes over folders that go)
        for name in names:
            p = Path(parent) / name
            with contextlib.suppress(FileNotFoundError):
                if p.is_file():  # (not a socket)
                    files[str(p)] = p.read_bytes()
    return files


def most_at_once(started: Iterable[float], finished: Iterable[float]) -> int:
    """The largest number of [started, finished) intervals that overlap (a finish before a start at a tie)."""
    events = sorted([(t, 1) for t in started] + [(t, -1) for t in finished])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def leaks(blobs: dict[str, bytes], words: list[str]) -> list[tuple[str, str]]:
    """(name, word) for every word found in a blob: what must not have been written (keys, secrets, options)."""
    return [(name, w) for name, data in blobs.items() for w in words if w.encode() in data]


def make_task(name: str = "ph", *, size: int, seed: int, transform: str = "minmax"):
    """A training task on a real dataset's shards: a seeded split and a scaler fit on its training part."""
    from ltc.shards import ShardSet
    from ltc.splits import make_split
    from ltc.targets import TargetScaler
    from ltc.train import Task

    shards = ShardSet.open(name)
    split = make_split(shards, size=size, seed=seed)
    return Task(name, shards, split, TargetScaler.fit(transform, shards.y[split.train]))


def read_json_gz(path: Path) -> Any:
    with gzip.open(path, "rt") as fh:
        return json.load(fh)


def write_json_gz(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as fh:
        json.dump(obj, fh)
    return path


def assert_studies_match(root: Path, trials: Any) -> None:
    """The sweep's Optuna journal (``root/optuna.log``) holds a study per setting whose trials are the setting's
    rows (``trials``, the trials table), by Ray trial id, in the same state, with nothing left running. A
    trial asked for after Tune's last snapshot before a crash is the one extra allowed: failed, on no row."""
    import optuna

    from ltc.sweep import studies

    storage = studies.open_storage(str(root / studies.JOURNAL_NAME))
    name = root.name
    expected = {f"{name}/{r.stage}/{r.setting}" for r in trials.itertuples()}
    assert set(optuna.get_all_study_names(storage)) == expected
    state = {"completed": "COMPLETE", "pruned": "PRUNED", "error": "FAIL"}
    for (stage, setting), rows in trials.groupby(["stage", "setting"]):
        study = optuna.load_study(study_name=f"{name}/{stage}/{setting}", storage=storage)
        assert study.user_attrs["setting"] == setting
        assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
        ids = set(rows.trial_id)
        told = {t.user_attrs["ray_trial_id"]: t for t in study.trials if t.user_attrs["ray_trial_id"] in ids}
        assert set(told) == set(rows.trial_id)
        assert all(t.state.name == "FAIL" for t in study.trials if t.user_attrs["ray_trial_id"] not in told)
        for r in rows.itertuples():
            assert told[r.trial_id].state.name == state[r.status]
            assert told[r.trial_id].params.get("lr", r.lr) == pytest.approx(r.lr)
            if r.status == "completed":
                assert told[r.trial_id].value == pytest.approx(r.val_score)


def live_parameters(model: Any, batch: Any) -> set[str]:
    """Names of ``model``'s parameters with a gradient path from its predictions on ``batch`` (trainable ones that
    nothing downstream reads get none); gradients are cleared again."""
    model(batch)[:, 0].sum().backward()
    live = {n for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return live


def assert_only_live_trained(model: Any, before: dict[str, Any], live: set[str]) -> None:
    """Every parameter in ``live`` moved from ``before`` (name → tensor); every other one is bit-identical."""
    import torch

    for n, p in model.named_parameters():
        if n in live:
            assert not torch.equal(p, before[n]), f"{n} should have trained"
        else:
            assert torch.equal(p, before[n]), f"{n} is frozen but changed"
