"""Shared fixtures: the real data home (``$LTC_DATA_HOME`` or ``../shared/data``) and a private cache."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import pytest

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
