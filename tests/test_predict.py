"""ltc predict: screening files and datasets with trained checkpoints."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from test_models import SMALL

from ltc import datasets
from ltc.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from ltc.cli import main
from ltc.errors import ConfigError, MissingFileError
from ltc.predict import expand_checkpoints, predict
from ltc.train import RunConfig, TrainConfig, train_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for seed in (0, 1):
        stage = RunConfig(datasets=("l96",), model="cgcnn", model_config=SMALL["cgcnn"], seed=seed,
                            train=TrainConfig(epochs=4, batch_size=8, seed=seed))  # fmt: skip
        train_run(stage, root / f"l96-{seed}")
        out[seed] = root / f"l96-{seed}"
    stage = RunConfig(datasets=("dc",), model="cgcnn", model_config=SMALL["cgcnn"], max_size=60,
                        train=TrainConfig(epochs=1))  # fmt: skip
    train_run(stage, root / "dc")
    out["dc"] = root / "dc"
    return out


def _test_predictions(run) -> pd.DataFrame:
    p = pd.read_parquet(run / "predictions.parquet")
    return p[p.split == "test"].set_index("id")


def test_dataset_input_reproduces_the_runs_test_metrics(runs):
    run = runs[0]
    metrics = json.loads((run / "metrics.json").read_text())
    table = predict([run / "checkpoint.pt"], "l96").set_index("id")
    test = _test_predictions(run)
    got = table.loc[test.index]
    # float32 sums differ in the last bits when graphs are batched with other graphs: 1e-6, not exact
    np.testing.assert_allclose(got.pred_mean, test.y_pred, rtol=1e-6)
    np.testing.assert_allclose(got.y_true, test.y_true)
    assert np.mean(np.abs(got.pred_mean - got.y_true)) == pytest.approx(metrics["test_mae"], rel=1e-6)
    assert len(table) == 95 and table.pred_std.isna().all()  # one model: no spread


def test_cif_folder_reproduces_the_runs_test_metrics_and_ranks(runs, tmp_path, capsys):
    run = runs[0]
    metrics = json.loads((run / "metrics.json").read_text())
    test = _test_predictions(run)
    records = {r.id: r for r in datasets.read("l96").records}
    folder = tmp_path / "cifs"
    folder.mkdir()
    for rid in test.index:
        datasets.parse_structure(records[rid].fmt, records[rid].payload).to(filename=str(folder / f"{rid}.cif"))
    (folder / "broken.cif").write_text("data_broken\n_cell_length_a 4\nloop_\n_atom_site_label\nX\n")
    (folder / "notes.txt").write_text("not a structure, not picked up")
    out = tmp_path / "preds.parquet"
    assert main(["predict", "--checkpoint", str(run / "checkpoint.pt"), str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 failed" in printed and "broken.cif: unreadable" in printed
    table = pd.read_parquet(out)
    bad = table[table.error.notna()]
    assert list(bad.id) == ["broken"] and bad.pred_mean.isna().all()
    ok = table[table.error.isna()].set_index("id")
    assert set(ok.index) == set(test.index)
    # CIF round trip (8-decimal coordinates): the same numbers as in training, to float precision
    np.testing.assert_allclose(ok.loc[test.index].pred_mean, test.y_pred, rtol=1e-4)
    mae = np.mean(np.abs(ok.loc[test.index].pred_mean - test.y_true))
    assert mae == pytest.approx(metrics["test_mae"], rel=1e-4)
    # kappa: ranked lowest first
    ranked = table[table.error.isna()]
    assert list(ranked["rank"]) == list(range(1, len(ranked) + 1))
    assert ranked.pred_mean.is_monotonic_increasing


def test_predict_prints_the_metrics_of_known_values(runs, tmp_path, capsys):
    """A labelled input: MAE / R² of the ensemble mean, log10 first for kappa, as computed from the table."""
    from ltc.targets import regression_metrics

    out = tmp_path / "p.parquet"
    assert main(["predict", "--checkpoint", str(runs[0] / "checkpoint.pt"), "hh143", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = pd.read_parquet(out)
    m = regression_metrics(table.y_true.to_numpy(), table.pred_mean.to_numpy(), kappa=True)
    line = next(x for x in printed.splitlines() if "against the known values" in x)  # the model's target is l96
    assert line.startswith("l96 against the known values (y_true) of hh143, 143 structures: ")
    assert f"MAE log10 {m['mae_log10']:.4g}, R² log10 {m['r2_log10']:.4g}; raw: MAE {m['mae']:.4g} W/(m K)" in line
    # unlabelled structures: no such line
    folder = tmp_path / "cifs"
    folder.mkdir()
    record = datasets.read("l96").records[0]
    datasets.parse_structure(record.fmt, record.payload).to(filename=str(folder / "one.cif"))
    assert main(["predict", "--checkpoint", str(runs[0] / "checkpoint.pt"), str(folder), "--out", str(out)]) == 0
    assert "against the known values" not in capsys.readouterr().out


def test_ensemble_mean_and_std(runs, tmp_path):
    out = tmp_path / "p.parquet"
    ckpts = [str(runs[s] / "checkpoint.pt") for s in (0, 1)]
    # INPUT after the checkpoints, as in the usage line
    assert main(["predict", "--checkpoint", *ckpts, "hh143", "--out", str(out)]) == 0
    table = pd.read_parquet(out)
    assert len(table) == 143 and (table.n_models == 2).all()
    # kappa: combined in log10 space (geometric mean), the spread that of log10 kappa, bounds mean ∓ 2 sigma
    logs = np.log10(table[["pred_0", "pred_1"]].clip(lower=1e-3).to_numpy())
    np.testing.assert_allclose(table.pred_mean, 10 ** logs.mean(axis=1))
    np.testing.assert_allclose(table.pred_log10_std, np.abs(logs[:, 0] - logs[:, 1]) / 2)
    np.testing.assert_allclose(table.pred_lower, 10 ** (logs.mean(axis=1) - 2 * table.pred_log10_std))
    np.testing.assert_allclose(table.pred_upper, 10 ** (logs.mean(axis=1) + 2 * table.pred_log10_std))
    np.testing.assert_allclose(table.pred_std, np.abs(table.pred_0 - table.pred_1) / 2)  # raw units, for reference
    assert (table.pred_std > 0).any() and table.y_true.notna().all()
    assert ((table.pred_lower <= table.pred_mean) & (table.pred_mean <= table.pred_upper)).all()
    # another target: the arithmetic mean ± 2 std in raw units, no log10 spread
    twin = tmp_path / "twin" / "checkpoint.pt"
    twin.parent.mkdir()
    shutil.copy(runs["dc"] / "checkpoint.pt", twin)
    dc = predict([runs["dc"] / "checkpoint.pt", twin], "dc")
    np.testing.assert_allclose(dc.pred_mean, (dc.pred_0 + dc.pred_1) / 2)
    assert dc.pred_log10_std.isna().all() and (dc.pred_std == 0).all() and (dc.pred_lower == dc.pred_mean).all()


def test_bad_inputs(runs, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="an ensemble needs checkpoints of the same target"):
        predict([runs[0] / "checkpoint.pt", runs["dc"] / "checkpoint.pt"], "l96")
    with pytest.raises(FileNotFoundError, match="neither a file, a folder, nor a dataset name"):
        predict([runs[0] / "checkpoint.pt"], "nosuch")
    (tmp_path / "empty").mkdir()
    assert main(["predict", "--checkpoint", str(runs[0] / "checkpoint.pt"), str(tmp_path / "empty"),
                 "--out", str(tmp_path / "x.parquet")]) == 2  # fmt: skip
    assert "empty holds no structure files" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(runs[0] / "checkpoint.pt"), "--out", str(tmp_path / "x.parquet")]) == 2
    assert "give INPUT" in capsys.readouterr().err


def test_poscar_files_are_read(runs, tmp_path):
    record = datasets.read("l96").records[3]
    structure = datasets.parse_structure(record.fmt, record.payload)
    structure.to(filename=str(tmp_path / "POSCAR"), fmt="poscar")
    table = predict([runs[0] / "checkpoint.pt"], str(tmp_path / "POSCAR"))
    assert len(table) == 1 and table.error.isna().all() and table.formula[0] == structure.composition.reduced_formula


def _fold_folder(runs, root):
    """A cross-validated setting laid out as a sweep saves it: ``<setting>/r0f<k>/checkpoint.pt``."""
    setting = root / "finetune" / "l96-setting"
    for k, seed in enumerate((0, 1)):
        (setting / f"r0f{k}").mkdir(parents=True)
        shutil.copy(runs[seed] / "checkpoint.pt", setting / f"r0f{k}" / "checkpoint.pt")
    (setting / "r0f0" / "metrics.json").write_text("{}")  # other files beside them are not checkpoints
    return setting


def test_checkpoint_folder_is_the_ensemble_of_its_checkpoints(runs, tmp_path):
    setting = _fold_folder(runs, tmp_path)
    files = [str(setting / f"r0f{k}" / "checkpoint.pt") for k in (0, 1)]
    assert expand_checkpoints([setting]) == files  # recursive, sorted
    assert expand_checkpoints([setting, files[1]]) == files  # a file reached twice counts once
    by_folder = predict([setting], "l96")
    by_files = predict(files, "l96")
    assert len(by_folder) == 95 and (by_folder.n_models == 2).all()
    pd.testing.assert_frame_equal(by_folder, by_files)
    assert (by_folder.pred_std > 0).all()
    # the CLI: `--checkpoint FOLDER INPUT`
    out = tmp_path / "p.parquet"
    assert main(["predict", "--checkpoint", str(setting), "l96", "--out", str(out)]) == 0
    table = pd.read_parquet(out)
    assert (table.n_models == 2).all()
    np.testing.assert_allclose(table.pred_mean, by_files.pred_mean)
    np.testing.assert_allclose(table.pred_std, by_files.pred_std)


def test_empty_or_missing_checkpoint_paths(runs, tmp_path, capsys):
    empty = tmp_path / "setting"
    (empty / "r0f0").mkdir(parents=True)
    missing = tmp_path / "nosuch"
    with pytest.raises(MissingFileError, match=re.escape(f"checkpoint folder {empty} holds no checkpoint.pt")):
        predict([runs[0] / "checkpoint.pt", empty], "l96")
    with pytest.raises(MissingFileError, match=re.escape(f"checkpoint {missing} does not exist")):
        predict([runs[0] / "checkpoint.pt", missing], "l96")
    assert main(["predict", "--checkpoint", str(empty), "l96", "--out", str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ltc predict: error: ") and str(empty) in err[0]
    assert not (tmp_path / "x.parquet").exists()


def test_ensemble_of_different_targets_names_both_checkpoints(runs, tmp_path):
    first, other = runs[0] / "checkpoint.pt", runs["dc"] / "checkpoint.pt"
    with pytest.raises(ConfigError, match="an ensemble needs checkpoints of the same target") as info:
        predict([first, other], "l96")
    assert str(first) in str(info.value) and str(other) in str(info.value)
    # same dataset, other units: not one target either (also found inside a folder)
    ckpt = load_checkpoint(runs[1] / "checkpoint.pt")
    ckpt["targets"][0]["units"] = "mW/(m K)"
    relabelled = save_checkpoint(tmp_path / "setting" / "r0f0" / "checkpoint.pt", ckpt)
    with pytest.raises(ConfigError, match=re.escape("mW/(m K)")) as info:
        predict([first, tmp_path / "setting"], "l96")
    assert str(first) in str(info.value) and str(relabelled) in str(info.value)


@pytest.fixture(scope="module")
def alignn_run(tmp_path_factory):
    """A small ALIGNN trained on l96 with its default graphs: the reference ("jarvis") construction."""
    out = tmp_path_factory.mktemp("alignn") / "l96"
    stage = RunConfig(datasets=("l96",), model="alignn", model_config=SMALL["alignn"],
                      train=TrainConfig(epochs=2, batch_size=8))  # fmt: skip
    train_run(stage, out)
    return out


def test_predictions_use_the_checkpoints_graph_construction(alignn_run, tmp_path):
    ckpt = load_checkpoint(alignn_run / "checkpoint.pt")
    assert ckpt["graph"]["construction"] == "jarvis" and ckpt["model"]["config"]["backtracking"] is True
    test = _test_predictions(alignn_run)
    table = predict([alignn_run / "checkpoint.pt"], "l96").set_index("id")
    np.testing.assert_allclose(table.loc[test.index].pred_mean, test.y_pred, rtol=1e-5)
    # structure files are built the checkpoint's way too: POSCARs written from the dataset's own structures
    records = {r.id: r for r in datasets.read("l96").records}
    folder = tmp_path / "poscars"
    folder.mkdir()
    for rid in test.index:
        structure = datasets.parse_structure(records[rid].fmt, records[rid].payload)
        structure.to(filename=str(folder / f"POSCAR-{rid}"), fmt="poscar")
    files = predict([alignn_run / "checkpoint.pt"], str(folder)).set_index("id")
    files.index = files.index.str.removeprefix("POSCAR-")
    close = np.isclose(files.loc[test.index].pred_mean, test.y_pred, rtol=1e-4)
    assert close.mean() > 0.8, close  # rounded coordinates can move a tied shell's cut (see ltc.graphs)
    # the same weights told they were trained on "knn" graphs predict something else: the construction matters
    ckpt["graph"]["construction"] = "knn"
    relabelled = save_checkpoint(tmp_path / "knn" / "checkpoint.pt", ckpt)
    other = predict([relabelled], "l96").set_index("id")
    assert not np.allclose(other.loc[test.index].pred_mean, test.y_pred, rtol=1e-3)


def test_reads_are_checked_damaged_shards_flipped_weights_and_missing_folds(runs, tmp_path, shared_cache, capsys):
    import struct
    import zipfile

    from ltc.shards import prepare

    before = predict([runs[0] / "checkpoint.pt"], "l96").set_index("id").pred_mean
    shard = next(prepare("l96").path.glob("shard-*.arrow"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the checksum tells
    shard.write_bytes(bytes(data))
    after = predict([runs[0] / "checkpoint.pt"], "l96").set_index("id").pred_mean  # verified, so rebuilt
    pd.testing.assert_series_equal(after.loc[before.index], before)

    flipped = tmp_path / "flipped.pt"
    shutil.copy(runs[0] / "checkpoint.pt", flipped)
    with zipfile.ZipFile(flipped) as z:  # a tensor's bytes, stored as they are in torch's zip
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(flipped.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + 8] ^= 0x40
    flipped.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"flipped\.pt: its weights changed since it was written"):
        load_checkpoint(flipped)

    cell = tmp_path / "cell"
    for unit in ("r0f0", "r0f1", "r1f0"):  # r1f1 missing
        (cell / unit).mkdir(parents=True)
        shutil.copy(runs[0] / "checkpoint.pt", cell / unit / "checkpoint.pt")
    out = tmp_path / "p.parquet"
    assert main(["predict", "--checkpoint", str(cell), "l96", "--out", str(out)]) == 2
    assert "holds 3 fold models; r1f1 missing" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(cell), "l96", "--out", str(out), "--allow-partial"]) == 0
    assert (pd.read_parquet(out).n_models == 3).all()


def test_missing_folds_are_counted_per_cell():
    from ltc.predict import missing_folds

    cells = ["best/ft/a/r0f0/checkpoint.pt", "best/ft/a/r0f1/checkpoint.pt", "best/ft/b/r0f1/checkpoint.pt"]
    assert missing_folds(cells, "best/ft") == ["b/r0f0"]  # one whole cell hides nothing of another
    assert missing_folds(cells[:2], "best/ft/a") == []
    assert missing_folds(["c/r0f0/checkpoint.pt", "c/r1f1/checkpoint.pt"], "c") == ["r0f1", "r1f0"]
    assert missing_folds(["runs/x/checkpoint.pt"], "runs") == []  # not a K-fold cell
