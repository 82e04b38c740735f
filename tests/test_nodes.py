"""A stage's inputs reach nodes that lack them (ltc.nodes): the server, the copy, the lock."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from ltc import nodes
from ltc.errors import MissingFileError
from ltc.graphs import GraphConfig
from ltc.inputs import RunInputs, resolve_inputs
from ltc.splits import SplitConfig


@pytest.fixture(scope="module")
def l96_inputs(data_home, shared_cache):
    return resolve_inputs(["l96"], holdout=["hh143"], graph=GraphConfig(), split=SplitConfig(), home=data_home)


def test_the_server_lists_and_reads_its_inputs_and_nothing_else(l96_inputs, tmp_path):
    paths = nodes.input_paths([l96_inputs])
    assert paths == sorted([l96_inputs.shards["l96"], l96_inputs.splits["l96"], l96_inputs.holdout])
    server = nodes.InputServer(paths)
    is_dir, listing = server.listing(l96_inputs.shards["l96"])
    assert is_dir and "manifest.json" in dict(listing)
    manifest = (Path(l96_inputs.shards["l96"]) / "manifest.json").read_bytes()
    assert server.read(l96_inputs.shards["l96"], "manifest.json", 0, 10) == manifest[:10]
    assert server.read(l96_inputs.shards["l96"], "manifest.json", 10, 1 << 20) == manifest[10:]
    assert server.listing(l96_inputs.splits["l96"])[0] is False
    with pytest.raises(MissingFileError, match="not an input of this stage"):
        server.listing("/etc")
    with pytest.raises(MissingFileError, match="passwd is not a file of input"):
        server.read(l96_inputs.shards["l96"], "../../../../etc/passwd", 0, 10)
    with pytest.raises(MissingFileError, match="does not exist on the driver's node"):
        nodes.InputServer([str(tmp_path / "gone")])


def test_server_names_are_per_stage_and_stable(tmp_path):
    assert nodes.server_name(tmp_path, "pt") == nodes.server_name(str(tmp_path), "pt")
    assert nodes.server_name(tmp_path, "pt") != nodes.server_name(tmp_path, "ft")
    assert nodes.server_name(tmp_path, "pt").startswith(nodes.SERVER_PREFIX)


def test_trials_of_one_node_copy_a_shard_folder_once_and_whole(l96_inputs, tmp_path):
    import fcntl

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        src = l96_inputs.shards["l96"]
        target = tmp_path / "node" / "l96"
        target.parent.mkdir()
        with nodes.serve_inputs("ltc-inputs-test", nodes.input_paths([l96_inputs])) as name:
            actor = ray.get_actor(name)

            @ray.remote(num_cpus=1)
            def trial() -> int:
                nodes.CHUNK_BYTES = 1000  # several reads per file
                return nodes.fetch_input(actor, src, target)

            # both trials wait at the node's lock (held here) until both are there, then one copies
            with open(target.parent / f".{target.name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                running = [trial.remote(), trial.remote()]
                time.sleep(3)
                assert ray.wait(running, timeout=0)[0] == []  # both held
            copied = ray.get(running)
            # the paths on this machine exist: localize keeps them and copies nothing
            assert nodes.localize(l96_inputs, name) == (l96_inputs, 0)
        size = sum(p.stat().st_size for p in target.iterdir())
        assert sorted(copied) == [0, size]  # one trial copied, the other found the copy
        for p in target.iterdir():
            assert p.read_bytes() == (Path(src) / p.name).read_bytes()
        assert [p.name for p in target.parent.iterdir() if ".part" in p.name] == []
        with pytest.raises(ValueError):  # the server ends with its block
            ray.get_actor(name)
    finally:
        ray.shutdown()


def _until_dead(actor: Any, timeout: float = 60) -> None:
    """Until a call to the killed ``InputServer`` actor fails."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.paths.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            continue
        time.sleep(0.1)
    raise AssertionError(f"actor still answers {timeout} s after ray.kill")


def test_a_copy_that_fails_leaves_nothing_behind(l96_inputs, tmp_path):
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        src = shutil.copytree(l96_inputs.shards["l96"], tmp_path / "driver" / "l96")
        node = tmp_path / "node"
        with nodes.serve_inputs("ltc-inputs-test", [str(src)]) as name:
            actor = ray.get_actor(name)
            with pytest.raises(MissingFileError, match="is not an input of this stage"):
                nodes.fetch_input(actor, f"{src}-other", node / "l96")
            shard = sorted(src.glob("*.arrow"))[-1]
            shard.write_bytes(shard.read_bytes()[:100])  # the driver's file changed after it was listed
            with pytest.raises(MissingFileError, match=rf"{shard.name}: copied 100 bytes, the driver has"):
                nodes.fetch_input(actor, str(src), node / "l96")
            ray.kill(actor, no_restart=True)  # the driver's server gone mid-stage
            _until_dead(actor)  # ray.kill returns before the actor has gone: a call may still reach it
            with pytest.raises(ray.exceptions.RayActorError):
                nodes.fetch_input(actor, str(src), node / "l96")
        assert sorted(p.name for p in node.iterdir()) == [".l96.lock"]  # no part, no half folder
        gone = RunInputs({"l96": str(tmp_path / "l96-gone")}, dict(l96_inputs.splits), None)
        with pytest.raises(MissingFileError, match=r"l96-gone does not exist on this node, and the driver's input"):
            nodes.localize(gone, name)
    finally:
        ray.shutdown()


def test_a_missing_input_without_a_server_is_an_error_naming_it(l96_inputs, tmp_path):
    gone = RunInputs({"l96": str(tmp_path / "l96-gone")}, dict(l96_inputs.splits), None)
    inputs, copied = nodes.localize(gone, None)
    assert copied == 0
    with pytest.raises(MissingFileError, match="l96-gone"):
        inputs.open_shards("l96")
