"""A stage's inputs reach nodes that lack them (ltc.sweep.files): the server, the copy, the lock."""

from __future__ import annotations

from pathlib import Path

import pytest

from ltc.errors import MissingFileError
from ltc.graphs import GraphConfig
from ltc.inputs import resolve_inputs
from ltc.splits import SplitConfig
from ltc.sweep import files


@pytest.fixture(scope="module")
def l96_inputs(data_home, shared_cache):
    return resolve_inputs(["l96"], holdout=["hh143"], graph=GraphConfig(), split=SplitConfig(), home=data_home)


def test_the_server_lists_and_reads_its_inputs_and_nothing_else(l96_inputs, tmp_path):
    paths = files.input_paths([l96_inputs])
    assert paths == sorted([l96_inputs.shards["l96"], l96_inputs.splits["l96"], l96_inputs.holdout])
    server = files.InputServer(paths)
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
        files.InputServer([str(tmp_path / "gone")])


def test_server_names_are_per_stage_and_stable(tmp_path):
    assert files.server_name(tmp_path, "pt") == files.server_name(str(tmp_path), "pt")
    assert files.server_name(tmp_path, "pt") != files.server_name(tmp_path, "ft")
    assert files.server_name(tmp_path, "pt").startswith(files.SERVER_PREFIX)


def test_trials_of_one_node_copy_a_shard_folder_once_and_whole(l96_inputs, tmp_path):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        src = l96_inputs.shards["l96"]
        with files.serve_inputs("ltc-inputs-test", files.input_paths([l96_inputs])) as name:
            actor = ray.get_actor(name)
            target = tmp_path / "node" / "l96"

            @ray.remote(num_cpus=1)
            def trial(chunk: int) -> int:
                files.CHUNK_BYTES = chunk  # several reads per file
                return files.fetch_input(actor, src, target)

            copied = ray.get([trial.remote(1000), trial.remote(1000)])
            # the paths on this machine exist: localize keeps them and copies nothing
            assert files.localize(l96_inputs, name) == (l96_inputs, 0)
        size = sum(p.stat().st_size for p in (tmp_path / "node" / "l96").iterdir())
        assert sorted(copied) == [0, size]  # one trial copied, the other found the copy
        for p in (tmp_path / "node" / "l96").iterdir():
            assert p.read_bytes() == (Path(src) / p.name).read_bytes()
        assert [p.name for p in (tmp_path / "node").iterdir() if ".part" in p.name] == []
        with pytest.raises(ValueError):  # the server ends with its block
            ray.get_actor(name)
    finally:
        ray.shutdown()


def test_a_missing_input_without_a_server_is_an_error_naming_it(l96_inputs, tmp_path):
    from ltc.inputs import RunInputs

    gone = RunInputs({"l96": str(tmp_path / "l96-gone")}, dict(l96_inputs.splits), None)
    inputs, copied = files.localize(gone, None)
    assert copied == 0
    with pytest.raises(MissingFileError, match="l96-gone"):
        inputs.open_shards("l96")
