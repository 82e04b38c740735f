from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, read_json_gz, write_json_gz
from pymatgen.core import Lattice, Structure

import ltc.shards
from ltc import datasets
from ltc.datasets import DatasetFileError
from ltc.errors import MissingFileError
from ltc.graphs import GraphConfig, structure_to_graph
from ltc.shards import SCHEMA_VERSION, ShardError, ShardSet, prepare, shard_key, verify


@pytest.fixture(scope="module")
def ph(shared_cache):
    return prepare("ph", workers=1)


def test_prepare_writes_manifest_and_shards(ph, shared_cache):
    m = ph.manifest
    assert ph.path.parent == shared_cache / "shards"
    assert ph.path.name == f"ph-{shard_key('ph', m['fingerprint'], GraphConfig())}"
    assert m["schema_version"] == SCHEMA_VERSION and m["dataset"] == "ph"
    assert m["graph"] == {"cutoff": 8.0, "max_neighbors": 12, "construction": "knn"}
    assert m["n_input"] == m["n_graphs"] == 1265 and m["n_rejected"] == 0
    assert sum(s["n_graphs"] for s in m["shards"]) == 1265
    assert m["fingerprint"] == datasets.locate("ph").fingerprint
    for s in m["shards"]:
        assert (ph.path / s["file"]).is_file()
    assert pq.read_table(ph.path / "rejected.parquet").num_rows == 0


def test_prepare_again_does_nothing_and_new_settings_make_a_new_key(ph, tmp_path):
    mtime = (ph.path / "manifest.json").stat().st_mtime_ns
    again = prepare("ph")
    assert not again.built and again.path == ph.path
    assert (ph.path / "manifest.json").stat().st_mtime_ns == mtime
    # a private cache: other tests of the session build l96 shards in the shared one
    other = prepare("l96", graph=GraphConfig(cutoff=5.0, max_neighbors=12), cache=tmp_path)
    first = prepare("l96", cache=tmp_path)
    assert other.path != first.path and other.built and first.built
    assert other.manifest["graph"]["cutoff"] == 5.0
    assert (other.path / "manifest.json").is_file()  # the first build was not overwritten
    # the construction is a graph setting like any other: its own key, its own folder
    reference = prepare("l96", graph=GraphConfig(construction="jarvis"), cache=tmp_path)
    assert reference.built and reference.path not in (first.path, other.path)
    assert reference.manifest["graph"] == {"cutoff": 8.0, "max_neighbors": 12, "construction": "jarvis"}
    assert ShardSet(reference.path).graph == GraphConfig(construction="jarvis")
    edges = [sum(s["n_edges"] for s in r.manifest["shards"]) for r in (first, reference)]
    assert edges[0] == 12 * sum(s["n_nodes"] for s in first.manifest["shards"]) < edges[1]  # k per atom; more


def test_shard_contents_round_trip(ph):
    shards = ShardSet(ph.path)
    raw = datasets.read("ph")
    assert len(shards) == 1265
    assert shards.ids == [r.id for r in raw.records]
    np.testing.assert_array_equal(shards.y, [r.target for r in raw.records])
    for i in (0, 17, 1264):
        rec = raw.records[i]
        structure = datasets.parse_structure(rec.fmt, rec.payload)
        g = structure_to_graph(structure)
        d = shards.get(i)
        assert d.z.tolist() == g.z.tolist()
        assert torch.equal(d.edge_index, torch.from_numpy(g.edge_index).long())
        np.testing.assert_array_equal(d.edge_vec.numpy(), g.vectors)
        np.testing.assert_array_equal(d.edge_dist.numpy(), g.distances)
        assert shards.formulas[i] == structure.composition.reduced_formula


def test_batch_concatenates_graphs_in_the_order_asked(ph):
    shards = ShardSet(ph.path)
    assert len(ph.manifest["shards"]) >= 1
    idx = [1200, 3, 640, 3, 0]  # across shards, repeated, unsorted
    b = shards.batch(idx)
    assert b.num_graphs == 5 and b.idx.tolist() == idx
    parts = [shards.get(i) for i in idx]
    assert b.ptr.tolist() == np.cumsum([0] + [p.num_nodes for p in parts]).tolist()
    assert b.z.tolist() == [int(z) for p in parts for z in p.z]
    offset, edges = 0, []
    for p in parts:
        edges.append(p.edge_index + offset)
        offset += p.num_nodes
    assert torch.equal(b.edge_index, torch.cat(edges, dim=1))
    assert torch.equal(b.edge_vec, torch.cat([p.edge_vec for p in parts]))
    assert b.y.tolist() == [float(p.y) for p in parts]
    assert b.batch.tolist() == [k for k, p in enumerate(parts) for _ in range(p.num_nodes)]
    assert b.edge_index.dtype == torch.long and b.edge_vec.shape == (b.edge_index.shape[1], 3)
    with pytest.raises(IndexError, match="graph index 1265 out of range"):
        shards.batch([0, 1265])


def test_iter_batches_covers_each_graph_once(ph):
    shards = ShardSet(ph.path)
    seen = np.concatenate([b.idx.numpy() for b in shards.iter_batches(100, shuffle=True, seed=3)])
    assert sorted(seen.tolist()) == list(range(1265))
    again = np.concatenate([b.idx.numpy() for b in shards.iter_batches(100, shuffle=True, seed=3)])
    assert (seen == again).all() and (seen != np.arange(1265)).any()
    sub = [b.num_graphs for b in shards.iter_batches(64, indices=np.arange(200), drop_last=True)]
    assert sub == [64, 64, 64]


def test_opening_is_memory_mapped_not_read(ph):
    size = sum((ph.path / s["file"]).stat().st_size for s in ph.manifest["shards"])
    before = pa.total_allocated_bytes()
    shards = ShardSet(ph.path)
    _ = shards.get(5), shards.get(700)
    # Arrow's allocator holds none of the file: the columns view the mapped pages.
    assert pa.total_allocated_bytes() - before < size / 100
    assert not shards._shards[0].values["distances"].flags.writeable


def test_indices_of_ids(ph):
    shards = ShardSet(ph.path)
    ids = shards.ids
    assert shards.indices_of([ids[9], ids[2]]).tolist() == [9, 2]
    with pytest.raises(KeyError, match="1 id\\(s\\) not in ph shards"):
        shards.indices_of([ids[0], "nope"])
    assert shards.indices_of([ids[0], "nope"], missing="skip").tolist() == [0]


def test_bad_rows_become_rejected_rows_and_nothing_is_lost(tmp_path, data_home):
    rows = read_json_gz(data_home / "ltc_paraisite/paraisite_Dataset1.json.gz")
    good = rows[:20]
    lonely = Structure(Lattice.cubic(20.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    alloy = Structure(Lattice.cubic(3.6), [{"Fe": 0.5, "Ni": 0.5}], [[0, 0, 0]])
    empty = Structure(Lattice.cubic(4.0), [], [])
    bad = [
        {"mpd_id": "garbage", "TC": 1.0, "structure": {"lattice": "nonsense"}},
        {"mpd_id": "lonely", "TC": 2.0, "structure": lonely.as_dict()},
        {"mpd_id": "alloy", "TC": 3.0, "structure": alloy.as_dict()},
        {"mpd_id": "empty", "TC": 4.0, "structure": empty.as_dict()},
        {"mpd_id": "nan", "TC": float("nan"), "structure": good[0]["structure"]},
        dict(good[1]),  # duplicate id
    ]
    write_json_gz(tmp_path / "ltc_paraisite/paraisite_Dataset1.json.gz", good[:10] + bad + good[10:])
    res = prepare("l96", home=tmp_path, cache=tmp_path / "cache")
    m = res.manifest
    assert m["n_input"] == 26 and m["n_graphs"] == 20 and m["n_rejected"] == 6
    reasons = dict(res.rejected())
    assert reasons["garbage"].startswith("unparsable structure: ")
    assert reasons["lonely"].startswith("isolated atom: no neighbour within cutoff=8.0 Å")
    assert reasons["alloy"].startswith("disordered site: ")
    assert reasons["empty"] == "empty structure: no sites"
    assert reasons["nan"] == "missing target: NaN"
    assert reasons[good[1]["mpd_id"]].startswith("duplicate id: ")
    shards = ShardSet(res.path)
    assert shards.ids == [r["mpd_id"] for r in good]  # every good row, in order
    np.testing.assert_allclose(shards.y, [r["TC"] for r in good])


def test_a_malformed_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "ltc_paraisite" / "paraisite_Dataset2.json.gz"
    path.parent.mkdir()
    path.write_bytes(b"\x1f\x8b\x08 truncated")
    with pytest.raises(DatasetFileError, match=str(path)):
        prepare("hh143", home=tmp_path, cache=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("shards/hh143-*"))


def test_parallel_build_equals_serial_build(tmp_path, caplog):
    serial = ShardSet(prepare("mix", cache=tmp_path / "a", workers=1).path)
    par = prepare("mix", cache=tmp_path / "b", workers=2, shard_size=50)
    import ltc.shards as shards_mod

    assert len(par.manifest["shards"]) == 5
    # the parallel path ran (small sets build in-process unless told otherwise)
    old = shards_mod.PARALLEL_MIN_COST
    shards_mod.PARALLEL_MIN_COST = 0
    try:
        forced = prepare("mix", cache=tmp_path / "c", workers=2, shard_size=50)
    finally:
        shards_mod.PARALLEL_MIN_COST = old
    assert "worker processes failed" not in caplog.text
    for res in (par, forced):
        other = ShardSet(res.path)
        assert other.ids == serial.ids
        b1, b2 = serial.batch(np.arange(len(serial))), other.batch(np.arange(len(other)))
        for key in ("z", "edge_index", "edge_dist", "edge_vec", "y"):
            assert torch.equal(b1[key], b2[key]), key
    assert forced.path.name == par.path.name  # same content, same key


def test_opening_damaged_or_foreign_folders_fails_clearly(tmp_path, ph):
    with pytest.raises(ShardError, match="not a shard folder"):
        ShardSet(tmp_path)
    manifest = json.loads((ph.path / "manifest.json").read_text())
    copy = tmp_path / "old"
    copy.mkdir()
    for old in (0, SCHEMA_VERSION - 1):  # e.g. 2: built before the graph construction was a setting
        (copy / "manifest.json").write_text(json.dumps(dict(manifest, schema_version=old)))
        with pytest.raises(ShardError, match=f"schema version {old}, this ltc reads {SCHEMA_VERSION}"):
            ShardSet(copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"shard file shard-00000\.arrow is missing"):
        ShardSet(copy)


@pytest.mark.slow
def test_killed_prepare_leaves_nothing_trusted_and_next_run_completes(tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, LTC_CACHE=str(cache))
    # gvrh2015 parses 1,181 CIFs in-process: several seconds, time enough to kill it mid-build
    proc = subprocess.Popen(
        [sys.executable, "-m", "ltc.cli", "prepare", "gvrh2015", "--workers", "1", "-q"],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not list(cache.glob("shards/.tmp-gvrh2015-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    tmp = list(cache.glob("shards/.tmp-gvrh2015-*"))
    assert tmp, "the build never started"
    assert not [p for p in cache.glob("shards/gvrh2015-*")]  # nothing a reader would trust
    with pytest.raises(ShardError):
        ShardSet(tmp[0])
    res = prepare("gvrh2015", cache=cache)
    assert res.built and res.manifest["n_graphs"] + res.manifest["n_rejected"] == 1181
    assert not list(cache.glob("shards/.tmp-gvrh2015-*"))  # the killed build's leftovers are gone
    assert len(ShardSet(res.path)) == res.manifest["n_graphs"]


def test_prepare_every_registered_dataset_is_possible():
    # Cheap check that every name resolves to a local file (the full builds run in the slow test below).
    for name in datasets.REGISTRY:
        assert datasets.locate(name).path.is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pz", "dc", "ebg", "jarvis2d", "agl", "hh143", "gvrh2015"])
def test_prepare_real_dataset(name):
    res = prepare(name)
    m = res.manifest
    assert m["n_graphs"] + m["n_rejected"] == m["n_input"] == len(datasets.read(name).records)
    shards = ShardSet(res.path)
    b = shards.batch(np.arange(min(64, len(shards))))
    assert b.num_graphs == min(64, len(shards))
    assert b.edge_index.max() < b.z.shape[0]
    assert Path(res.path).name.startswith(f"{name}-")


# --------------------------------------------------------------------------------------------------
# Checksums: verified where a stage is resolved, damaged sets named and rebuilt.


def _small(tmp_path: Path, **kwargs):
    """A private l96 set of 3 shard files, free to damage."""
    res = prepare("l96", cache=tmp_path, workers=1, shard_size=40, **kwargs)
    assert len(res.manifest["shards"]) == 3
    return res


def test_manifest_records_size_and_checksum_of_every_file(ph):
    m = ph.manifest
    for s in m["shards"]:
        data = (ph.path / s["file"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
    rejected = (ph.path / "rejected.parquet").read_bytes()
    assert m["rejected_bytes"] == len(rejected) and m["rejected_sha256"] == hashlib.sha256(rejected).hexdigest()
    assert verify(ph.path) == []


def test_flipped_bytes_are_found_named_and_rebuilt(tmp_path, caplog):
    res = _small(tmp_path)
    before = ShardSet(res.path)
    ids, y = before.ids, before.y.copy()
    victim = res.path / "shard-00001.arrow"
    data = bytearray(victim.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(b ^ 0xFF for b in data[mid : mid + 8])
    victim.write_bytes(bytes(data))
    assert verify(res.path) == ["shard-00001.arrow is damaged (checksum differs from manifest)"]
    assert not prepare("l96", cache=tmp_path).built  # without verify: no hashing, no rebuild

    with caplog.at_level(logging.WARNING, logger="ltc.shards"):
        again = _small(tmp_path, verify=True)
    assert again.built and again.path == res.path
    assert again.repaired == ["shard-00001.arrow is damaged (checksum differs from manifest)"]
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "shards of l96: shard-00001.arrow is damaged" in warning.getMessage()
    assert str(res.path) in warning.getMessage()
    assert verify(res.path) == []
    after = ShardSet(res.path)
    assert after.ids == ids
    np.testing.assert_array_equal(after.y, y)
    assert not [p.name for p in res.path.parent.iterdir() if p.name.startswith(".")]  # nothing left aside
    # a reader that mapped the damaged set before the rebuild still reads it (the files outlive the rename)
    assert before.batch(np.arange(len(before))).num_graphs == 95 and before.ids == ids
    assert not _small(tmp_path, verify=True).built  # intact now: verified, kept


def test_a_truncated_or_foreign_shard_file_fails_loudly_and_prepare_repairs_it(tmp_path, caplog):
    res = _small(tmp_path)
    victim = res.path / "shard-00002.arrow"
    size = victim.stat().st_size
    with open(victim, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(ShardError, match=r"shard-00002\.arrow: .* bytes, manifest says .*ltc prepare l96"):
        ShardSet(res.path)
    assert verify(res.path) == [f"shard-00002.arrow is damaged ({size // 2} bytes, manifest says {size})"]
    # same size, not an Arrow file: only pyarrow can tell, and its error names the file
    victim.write_bytes(b"\0" * size)
    with pytest.raises(ShardError, match=r"shard-00002\.arrow: unreadable shard file .*ltc prepare l96"):
        ShardSet(res.path)
    with caplog.at_level(logging.WARNING, logger="ltc.shards"):
        fixed = _small(tmp_path, verify=True)
    assert fixed.built and fixed.repaired == ["shard-00002.arrow is damaged (checksum differs from manifest)"]
    assert "shard-00002.arrow is damaged" in caplog.text
    assert len(ShardSet(fixed.path)) == 95 and verify(fixed.path) == []


def test_missing_files_and_damaged_manifests_are_rebuilt(tmp_path, caplog):
    res = _small(tmp_path)
    (res.path / "rejected.parquet").unlink()
    assert verify(res.path) == ["rejected.parquet is missing"]
    assert _small(tmp_path, verify=True).repaired == ["rejected.parquet is missing"]

    (res.path / "manifest.json").write_text('{"schema_version": 2, "shar')
    assert "manifest.json: damaged manifest" in verify(res.path)[0]
    with pytest.raises(ShardError, match=r"manifest\.json: damaged manifest"):
        ShardSet(res.path)
    with caplog.at_level(logging.WARNING, logger="ltc.shards"):
        fixed = _small(tmp_path, verify=True)
    assert fixed.built and "manifest.json: damaged manifest" in fixed.repaired[0]
    assert "manifest.json: damaged manifest" in caplog.text
    assert verify(fixed.path) == [] and len(ShardSet(fixed.path)) == 95

    (res.path / "manifest.json").unlink()  # no manifest is seen without hashing: rebuilt even unverified
    assert _small(tmp_path).repaired == ["manifest.json is missing"]
    assert verify(res.path) == []


def test_opening_a_missing_folder_names_it(tmp_path):
    missing = tmp_path / "shards" / "ph-0123456789abcdef"
    with pytest.raises(MissingFileError, match=f"shard folder {missing} does not exist"):
        ShardSet(missing)
    with pytest.raises(MissingFileError, match=str(missing)):
        verify(missing)


def test_prepare_and_opening_never_hash_unless_asked(tmp_path, monkeypatch):
    res = _small(tmp_path)

    def no_hashing(path):
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr(ltc.shards, "file_sha256", no_hashing)
    again = prepare("l96", cache=tmp_path)
    assert not again.built and again.repaired == [] and again.path == res.path
    assert len(ShardSet(again.path)) == 95
    with pytest.raises(AssertionError, match="hashed"):  # the patch is where verification reads files
        prepare("l96", cache=tmp_path, verify=True)
