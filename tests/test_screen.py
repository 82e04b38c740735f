"""ltc screen: candidates through a fold ensemble on Ray Data, partition by partition, the same numbers as
``ltc predict``; bad rows; a killed screen resumed; actors on both nodes of a two-node cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from ltc import datasets
from ltc.cli import main
from ltc.errors import AlreadyExistsError, ConfigError, MissingFileError
from ltc.predict import predict
from ltc.screen import rank_predictions, screen

TINY = {"hidden": 16, "n_blocks": 2, "fc_dim": 16}
COLUMNS = ["pred_mean", "pred_std", "pred_log10_std", "pred_lower", "pred_upper", "pred_0", "pred_1", "pred_2"]


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory) -> Path:
    """Three small L96 (kappa) models, a folder of them as a K-fold cell keeps its fold models."""
    from ltc.train import RunConfig, TrainConfig, train_run

    root = tmp_path_factory.mktemp("ensemble") / "cell"
    for seed in range(3):
        stage = RunConfig(datasets=("l96",), model="cgcnn", model_config=TINY, seed=seed,
                          train=TrainConfig(epochs=2, batch_size=16, seed=seed))  # fmt: skip
        train_run(stage, root / f"r0f{seed}")
    return root


@pytest.fixture(scope="module")
def l96() -> list[tuple[str, object, float]]:
    return [(r.id, datasets.parse_structure(r.fmt, r.payload), r.target) for r in datasets.read("l96").records]


def write_inputs(root: Path, rows) -> dict[str, tuple[Path, str | None]]:
    """The same structures as a folder (CIF files and id_prop.csv), an extxyz file and a CSV table."""
    import ase.io
    from pymatgen.io.ase import AseAtomsAdaptor

    folder = root / "cifs"
    folder.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rid, s, _ in rows:
            s.to(filename=str(folder / f"{rid}.cif"))
    (folder / datasets.ID_PROP).write_text("".join(f"{rid},{y!r}\n" for rid, _, y in rows))
    frames = []
    for rid, s, y in rows:
        atoms = AseAtomsAdaptor.get_atoms(s)
        atoms.info.update(id=rid, kappa=y)
        frames.append(atoms)
    ase.io.write(root / "cands.extxyz", frames, format="extxyz")
    table = [{"material_id": rid, "structure": json.dumps(s.as_dict()), "kappa": y} for rid, s, y in rows]
    pd.DataFrame(table).to_csv(root / "cands.csv", index=False)
    return {
        "folder": (folder, None),
        "extxyz": (root / "cands.extxyz", "kappa"),
        "table": (root / "cands.csv", "kappa"),
    }


@pytest.mark.slow
def test_screen_gives_predicts_numbers_for_a_folder_an_extxyz_file_and_a_table(ensemble, l96, tmp_path, local_ray):
    inputs = write_inputs(tmp_path, l96)
    for layout, (path, target) in inputs.items():
        out = tmp_path / f"out-{layout}"
        result = screen([ensemble], path, out, partition_size=20, target=target, progress=False)
        assert (result.n_candidates, result.n_predicted, result.n_failed) == (95, 95, 0), layout
        parts = sorted((out / "predictions").glob("part-*.parquet"))
        assert len(parts) == 5  # 95 candidates, 20 per partition
        screened = pd.concat(map(pd.read_parquet, parts)).set_index("id")
        assert screened.row.tolist() == list(range(95))  # every candidate once, in the input's order
        expected = predict([ensemble], str(path), target=target).set_index("id")
        assert set(screened.index) == set(expected.index) == {rid for rid, _, _ in l96}
        got = screened.loc[expected.index]
        np.testing.assert_allclose(got[COLUMNS].to_numpy(), expected[COLUMNS].to_numpy(), rtol=1e-6)
        np.testing.assert_allclose(got.y_true.to_numpy(), expected.y_true.to_numpy())  # known values beside
        assert (got.n_models == 3).all() and got.error.isna().all()
        ranking = pd.read_parquet(result.ranking)
        assert ranking["rank"].tolist() == list(range(1, 96)) and ranking.pred_mean.is_monotonic_increasing
    by_lower, _, _ = rank_predictions(out / "predictions", tmp_path / "lower.parquet", rank_by="lower")
    assert pd.read_parquet(by_lower).pred_lower.is_monotonic_increasing
    top, _, _ = rank_predictions(out / "predictions", tmp_path / "top.parquet", descending=True)
    assert pd.read_parquet(top).pred_mean.is_monotonic_decreasing


@pytest.mark.slow
def test_bad_candidates_are_rows_and_nothing_readable_is_one_line(ensemble, l96, tmp_path, local_ray, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for rid, s, _ in l96[:6]:
        s.to(filename=str(folder / f"{rid}.cif"))
    (folder / "junk.cif").write_text("not a crystal\n")
    disordered = l96[0][1].copy()
    disordered.replace_species({disordered[0].specie: {disordered[0].specie: 0.5, "Ca": 0.5}})
    disordered.to(filename=str(folder / "disordered.cif"))
    (folder / "molecule.xyz").write_text("2\nno lattice\nH 0 0 0\nH 0 0 0.74\n")
    result = screen([ensemble], folder, tmp_path / "out", partition_size=4, progress=False)
    assert (result.n_candidates, result.n_predicted, result.n_failed) == (9, 6, 3)
    table = pd.concat(map(pd.read_parquet, sorted((tmp_path / "out" / "predictions").glob("*.parquet"))))
    reasons = table.set_index("id").error.dropna().to_dict()
    assert reasons["junk"].startswith("unreadable: ValueError: junk.cif: pymatgen cannot read it")
    assert reasons["disordered"].startswith("disordered site")
    assert "not a crystal: periodic boundary conditions" in reasons["molecule"]
    assert len(pd.read_parquet(result.ranking)) == 6  # errors are never ranked

    only_junk = tmp_path / "junk"
    only_junk.mkdir()
    (only_junk / "a.cif").write_text("nothing\n")
    (only_junk / "b.cif").write_text("nothing either\n")
    assert main(["screen", str(ensemble), str(only_junk), "--out", str(tmp_path / "out2"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "none of its 2 candidate(s) could be read or become a graph" in err and len(err.strip().splitlines()) == 1


def test_a_screen_folder_is_claimed_once(ensemble, tmp_path):
    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    (out / "predictions").mkdir(parents=True)
    with pytest.raises(AlreadyExistsError, match="is not empty and holds no screen"):
        screen([ensemble], tmp_path / "in", out, progress=False)
    with pytest.raises(ConfigError, match="rank_by='best'"):
        screen([ensemble], tmp_path / "in", tmp_path / "o2", rank_by="best", progress=False)
    with pytest.raises(MissingFileError, match="holds no structure files"):
        screen([ensemble], tmp_path / "in", tmp_path / "o3", progress=False)


def _screen_process(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "ltc.cli", "screen", *args], cwd=REPO, env={**os.environ, **env},
                                stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip


@pytest.mark.slow
def test_a_killed_screen_resumes_repeating_no_partition_and_losing_none(ensemble, l96, tmp_path):
    from test_sweep_resume import _cleanup

    path, _ = write_inputs(tmp_path, l96)["folder"]
    out = tmp_path / "out"
    args = [str(ensemble), str(path), "--out", str(out), "--partition-size", "5", "-q"]
    paused = tmp_path / "paused"  # the driver holds after its third partition is written: the kill comes midway
    first = _screen_process(args, tmp_path / "first.log", LTC_TEST_PAUSE_AT="screen written 3",
                            LTC_TEST_PAUSE_FILE=str(paused))  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not paused.exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "three partitions not written in 300 s"
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        _cleanup(first)
    written = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "predictions").glob("part-*.parquet")}
    assert len(written) == 3  # of 19: 95 candidates in partitions of 5
    assert main(["screen", *args]) == 2  # the folder holds a screen: --resume, or another folder
    second = _screen_process([*args, "--resume"], tmp_path / "second.log")
    try:
        assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        _cleanup(second)
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "predictions").glob("part-*.parquet")}
    assert len(after) == 19 and all(after[name] == stamp for name, stamp in written.items())  # none written again
    table = pd.concat(map(pd.read_parquet, sorted((out / "predictions").glob("part-*.parquet"))))
    assert table.row.tolist() == list(range(95)) and table.id.nunique() == 95  # each candidate exactly once
    assert len(pd.read_parquet(out / "ranking.parquet")) == 95


@pytest.mark.slow
def test_on_a_two_node_cluster_both_nodes_run_inference_actors(ensemble, l96, tmp_path):
    from ray_cluster import BIN, RayCluster, can_isolate

    if not can_isolate():
        pytest.skip("needs unprivileged user, network and mount namespaces (unshare)")
    path, _ = write_inputs(tmp_path, l96)["folder"]
    out = tmp_path / "out"
    cluster = RayCluster()
    try:
        cluster.start_head(num_cpus=2)
        cluster.add_worker(num_cpus=2)
        assert len(cluster.nodes()) == 2
        cmd = [str(BIN / "ltc"), "screen", str(ensemble), str(path), "--out", str(out), "--address", cluster.gcs,
               "--actors", "2", "--partition-size", "10", "--batch-size", "4", "-q"]  # fmt: skip
        done = cluster.run(cmd, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
        nodes = {n["id"] for n in cluster.nodes()}
    finally:
        cluster.stop()
    table = pd.concat(map(pd.read_parquet, sorted((out / "predictions").glob("part-*.parquet"))))
    assert len(table) == 95 and table.error.isna().all()
    assert set(table.node_id) == nodes  # an actor on each node, each predicting some of the candidates
    assert table.groupby("node_id").size().min() >= 1
