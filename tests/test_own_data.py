"""Your own data: the field's layouts, written by the test from real structures of ``../shared/data``, read into the
graphs of the built-in set they came from; every kind of bad row; fingerprints; declarations in sweep files, in
``dataset.yaml`` and on the command line; checkpoints you have as the start of a fine-tuning run."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ltc import datasets
from ltc.cli import main
from ltc.datasets import DatasetFileError, UserDataset, declare, from_path, parse_structure, read, user_spec
from ltc.errors import ConfigError
from ltc.shards import ShardSet, prepare

KAPPA = "kappa_300K"


@pytest.fixture(scope="module")
def l96() -> list[tuple[str, object, float]]:
    """(id, pymatgen Structure, kappa) of every L96 structure, in the built-in file's order."""
    return [(r.id, parse_structure(r.fmt, r.payload), r.target) for r in read("l96").records]


def write_id_prop(folder: Path, rows, *, suffix: str = ".cif", name=lambda rid: rid) -> Path:
    """A CGCNN / ALIGNN folder: one structure file per id (written by pymatgen), ``id_prop.csv`` beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for rid, structure, y in rows:
        file = f"{name(rid)}{suffix}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure.to(filename=str(folder / file), fmt="cif" if suffix == ".cif" else "poscar")
        lines.append(f"{file if name(rid) != rid else rid},{y!r}")
    (folder / datasets.ID_PROP).write_text("\n".join(lines) + "\n")
    return folder


def write_layout(layout: str, root: Path, rows) -> tuple[Path, dict]:
    """``rows`` written in ``layout``; the path and the declaration keys that read it back."""
    import ase.io
    from pymatgen.io.ase import AseAtomsAdaptor

    if layout == "id_prop_cif":
        return write_id_prop(root / "cifs", rows), {}
    if layout == "id_prop_alignn":  # ALIGNN's: the id column holds the file names
        return write_id_prop(root / "poscars", rows, suffix=".vasp", name=lambda rid: f"POSCAR-{rid}"), {}
    if layout == "extxyz":
        frames = []
        for rid, structure, y in rows:
            atoms = AseAtomsAdaptor.get_atoms(structure)
            atoms.info.update(id=rid, **{KAPPA: y})
            frames.append(atoms)
        ase.io.write(root / "l96.extxyz", frames, format="extxyz")
        return root / "l96.extxyz", {"target": KAPPA}
    if layout == "csv":  # pymatgen dicts as JSON text, under matminer-like column names
        table = [{"material_id": rid, "kappa": y, "structure": json.dumps(s.as_dict())} for rid, s, y in rows]
        pd.DataFrame(table).to_csv(root / "l96.csv", index=False)
        return root / "l96.csv", {"target": "kappa"}
    if layout == "parquet":  # CIF text
        table = [{"id": rid, "kappa": y, "cif": s.to(fmt="cif")} for rid, s, y in rows]
        pd.DataFrame(table).to_parquet(root / "l96.parquet")
        return root / "l96.parquet", {"target": "kappa"}
    if layout == "json":
        records = [{"id": rid, KAPPA: y, "structure": s.as_dict()} for rid, s, y in rows]
        (root / "l96.json").write_text(json.dumps(records))
        return root / "l96.json", {"target": KAPPA}
    if layout == "matminer_json":  # a DataFrame of Structure objects, stored by matminer
        from matminer.utils.io import store_dataframe_as_json

        df = pd.DataFrame([{"mpd_id": rid, "structure": s, "TC": y} for rid, s, y in rows])
        store_dataframe_as_json(df, str(root / "l96_mm.json"))
        return root / "l96_mm.json", {"target": "TC"}
    raise AssertionError(layout)


LAYOUTS = ["id_prop_cif", "id_prop_alignn", "extxyz", "csv", "parquet", "json", "matminer_json"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_gives_the_graphs_of_the_built_in_set(l96, tmp_path, layout):
    path, keys = write_layout(layout, tmp_path, l96)
    spec = user_spec("mine", UserDataset(str(path), kappa=True, **keys))
    with declare([spec]):
        res = prepare("mine")
    assert res.built and res.manifest["n_graphs"] == 95 and res.manifest["n_rejected"] == 0
    assert res.manifest["kappa"] is True and res.manifest["units"] == "W/(m K)"
    mine, ref = ShardSet(res.path), ShardSet(prepare("l96").path)
    ids = [i.removeprefix("POSCAR-").removesuffix(".vasp") for i in mine.ids]
    assert ids == ref.ids  # every structure, in the file's order
    np.testing.assert_array_equal(mine.y, ref.y)
    assert mine.formulas == ref.formulas
    a, b = mine.batch(np.arange(95)), ref.batch(np.arange(95))
    assert a.z.tolist() == b.z.tolist()
    assert a.edge_index.tolist() == b.edge_index.tolist()  # the same neighbours, edge for edge
    # CIF text rounds the cell and coordinates (one L96 cell by up to 1.4e-4 Å), and stores the cell as lengths and
    # angles, so pymatgen reads it back in its own orientation: edge vectors are rotated, distances are not
    cif = layout in ("id_prop_cif", "parquet")
    np.testing.assert_allclose(a.edge_dist.numpy(), b.edge_dist.numpy(), atol=5e-4 if cif else 1e-5)
    if not cif:  # in a shell of equal distances that straddles the 12th neighbour, "knn" keeps the images its tie
        # key ranks first, and last-bit noise can swap them: vectors are compared inside each atom's 12th distance
        np.testing.assert_allclose(_inner_edges(a), _inner_edges(b), atol=1e-5)
    # a trial learns the target from the shards alone (no declaration in its process)
    assert mine.target == datasets.TargetInfo(KAPPA if keys.get("target") == KAPPA else keys.get("target", "target"),
                                              "W/(m K)", True, "log10p1+standardize")  # fmt: skip


def _inner_edges(batch) -> np.ndarray:
    """[E', 6] (centre, neighbour, distance, vector) of the edges nearer than their centre's farthest kept neighbour,
    sorted: what defines the graph whatever order ties took."""
    dst, src = batch.edge_index[1].numpy(), batch.edge_index[0].numpy()
    dist = batch.edge_dist.numpy().astype(np.float64)
    farthest = np.zeros(int(dst.max()) + 1)
    np.maximum.at(farthest, dst, dist)
    inner = dist < farthest[dst] - 1e-3
    rows = np.column_stack([dst, src, dist, batch.edge_vec.numpy()])[inner]
    return rows[np.lexsort(np.round(rows, 2).T[::-1])]


def _disordered_cif(structure) -> str:
    s = structure.copy()
    s.replace_species({s[0].specie: {s[0].specie: 0.5, "Ca": 0.5}})
    return s.to(fmt="cif")


def test_every_kind_of_bad_row_is_a_rejected_row_naming_its_line(l96, tmp_path, capsys):
    folder = write_id_prop(tmp_path / "kappa", l96[:6])
    s0 = l96[0][1]
    (folder / "garbage.cif").write_text("this is not a crystal\n")
    (folder / "disordered.cif").write_text(_disordered_cif(s0))
    (folder / "molecule.xyz").write_text("2\nno lattice here\nH 0 0 0\nH 0 0 0.74\n")
    for name in ("twice.cif", "twice.vasp"):
        s0.to(filename=str(folder / name))
    cif = s0.to(fmt="cif")
    (folder / "two_blocks.cif").write_text(cif + "\n" + cif.replace("data_", "data_again_", 1))
    # a second species on a site pymatgen reads as one: pymatgen refuses it (ASE would merge them silently)
    lines = cif.splitlines()
    site = next(i for i, line in enumerate(lines) if line.strip().startswith(str(s0[0].specie)))
    extra = lines[site].replace(str(s0[0].specie), "Cl", 1)
    (folder / "shared_site.cif").write_text("\n".join([*lines[: site + 1], extra, *lines[site + 1 :]]) + "\n")
    for name in ("empty", "text", "nan", "inf", "negative", "zero", "huge"):
        s0.to(filename=str(folder / f"{name}.cif"))
    good = (folder / datasets.ID_PROP).read_text()
    bad = [
        "absent,1.5",  # line 7: no structure file
        "garbage,1.5",
        "disordered,1.5",
        "molecule,1.5",  # 10: ASE reads it, but it is no crystal
        "twice,1.5",
        "empty,",
        "text,high",
        "nan,nan",
        "inf,inf",  # 15
        "negative,-2.0",
        "zero,0",
        "huge,1e30",
        f"{l96[2][0]},9.9",  # 19: a duplicate id
        "../outside,1.0",
        "two_blocks,1.5",  # 21
        "shared_site,1.5",
    ]
    (folder / datasets.ID_PROP).write_text(good + "\n".join(bad) + "\n")
    assert main(["prepare", str(folder), "--kappa", "-q"]) == 0
    out = capsys.readouterr().out
    assert f"kappa: {6 + len(bad)} rows" in out and "-> 6 graphs, 16 rejected" in out
    spec = from_path(folder, kappa=True)
    with declare([spec]):
        res = prepare("kappa")
    reasons = dict(res.rejected())
    expected = {
        "absent": ("missing structure: no file for id 'absent'", 7),
        "garbage": ("unparsable structure", None),  # read in the graph builders: the file's name, both readers
        "disordered": ("disordered site", None),
        "molecule": ("unparsable structure", None),
        "twice": ("ambiguous structure: several files for id 'twice' (twice.cif, twice.vasp)", 11),
        "empty": ("missing target: empty", 12),
        "text": ("bad target: 'high' is not a number", 13),
        "nan": ("missing target: NaN", 14),
        "inf": ("bad target: inf is not finite", 15),
        "negative": ("bad target: kappa -2 <= 0", 16),
        "zero": ("bad target: kappa 0 <= 0", 17),
        "huge": ("bad target: kappa 1e+30 > 10,000 W/(m K)", 18),
        l96[2][0]: (f"duplicate id: first at {datasets.ID_PROP} line 3, again at {datasets.ID_PROP} line 19", None),
        "../outside": ("missing structure: id '../outside' points outside", 20),
        "two_blocks": ("unparsable structure", None),
        "shared_site": ("unparsable structure", None),
    }
    assert set(reasons) == set(expected)
    for rid, (start, line) in expected.items():
        assert reasons[rid].startswith(start), (rid, reasons[rid])
        if line is not None:
            assert reasons[rid].endswith(f"({datasets.ID_PROP} line {line})"), reasons[rid]
    assert "garbage.cif: pymatgen cannot read it" in reasons["garbage"]
    assert "not a crystal: periodic boundary conditions" in reasons["molecule"]
    assert "two_blocks.cif holds 2 structures" in reasons["two_blocks"]
    assert "shared_site.cif: pymatgen cannot read it" in reasons["shared_site"]
    assert ShardSet(res.path).ids == [rid for rid, _, _ in l96[:6]]  # the good rows, all of them


def test_a_header_line_is_skipped_and_a_misshapen_file_is_one_error_naming_its_line(l96, tmp_path):
    folder = write_id_prop(tmp_path / "k", l96[:3])
    rows = (folder / datasets.ID_PROP).read_text()
    (folder / datasets.ID_PROP).write_text("id,kappa\n" + rows)
    with declare([from_path(folder, kappa=True)]):
        assert len(read("k").records) == 3 and read("k").rejected == []
    (folder / datasets.ID_PROP).write_text(rows + "mp-1,1.0,extra\n")
    with declare([from_path(folder)]), pytest.raises(DatasetFileError, match=r"id_prop\.csv line 4: 3 fields"):
        read("k")
    bad = tmp_path / "bad.extxyz"
    bad.write_text('2\nkappa=1.0 pbc="T T T" Lattice="3 0 0 0 3 0 0 0 3"\nH 0 0 0\n')  # a frame cut short
    with (
        declare([from_path(bad, target="kappa")]),
        pytest.raises(DatasetFileError, match=r"bad\.extxyz line 1: frame 0"),
    ):
        read("bad")
    table = tmp_path / "t.csv"
    pd.DataFrame({"id": ["a"], "structure": ["x"], "kap": [1.0]}).to_csv(table, index=False)
    found = r"t\.csv: no target column 'kappa'; found \['id', 'structure', 'kap'\]"
    with declare([from_path(table, target="kappa")]), pytest.raises(DatasetFileError, match=found):
        read("t")
    (tmp_path / "k.xlsx").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"cannot tell how to read k\.xlsx"):
        from_path(tmp_path / "k.xlsx", target="kappa")
    with pytest.raises(ConfigError, match="name the info key that holds the target"):
        from_path(bad)
    (tmp_path / "l96").mkdir()
    with pytest.raises(ConfigError, match="'l96' is a built-in dataset's"):
        from_path(tmp_path / "l96")


def test_an_edited_file_makes_new_shards_and_an_unchanged_one_is_reused(l96, tmp_path):
    folder = write_id_prop(tmp_path / "k", l96[:8])
    cache = tmp_path / "cache"

    def build():
        with declare([from_path(folder, kappa=True)]):
            return prepare("k", cache=cache)

    first = build()
    again = build()
    assert first.built and not again.built and again.path == first.path
    (folder / f"{l96[0][0]}.cif").touch()  # a new time stamp, the same bytes: the same shards
    assert build().path == first.path
    text = (folder / datasets.ID_PROP).read_text()
    (folder / datasets.ID_PROP).write_text(text.replace(f"{l96[0][2]!r}", "12.5", 1))
    edited = build()
    assert edited.built and edited.path != first.path
    assert ShardSet(edited.path).y[0] == 12.5
    moved = l96[1][1].copy()
    moved.translate_sites([0], [0.01, 0, 0])
    moved.to(filename=str(folder / f"{l96[1][0]}.cif"))  # one structure file edited
    again_edited = build()
    assert again_edited.built and again_edited.path not in (first.path, edited.path)
    with declare([from_path(folder)]):  # not kappa: other rows could be rejected, so other shards
        assert prepare("k", cache=cache).path != again_edited.path


def test_a_folders_dataset_yaml_declares_it(l96, tmp_path):
    folder = write_id_prop(tmp_path / "thermal", l96[:4])
    (folder / datasets.DECLARATION_FILE).write_text(f"name: hotstuff\ntarget: {KAPPA}\nkappa: true\n")
    spec = from_path(folder)
    assert (spec.name, spec.target, spec.kappa, spec.units) == ("hotstuff", KAPPA, True, "W/(m K)")
    assert from_path(folder, units="mW/(cm K)").units == "mW/(cm K)"  # what is given wins over the file
    sweep = _sweep(tmp_path, {"hot": {"path": "thermal", "units": "W/mK"}})
    from ltc.sweep import load_sweep

    decl = load_sweep(sweep).datasets["hot"]
    assert (decl.path, decl.target, decl.kappa, decl.units) == (str(folder), KAPPA, True, "W/mK")


def _sweep(tmp_path: Path, declared: dict, *, stages: list | None = None, **top) -> Path:
    data = {
        "name": "own",
        "model_config": {"hidden": 16, "n_blocks": 2, "fc_dim": 16},
        "datasets": declared,
        "stages": stages or [{"name": "ft", "datasets": [next(iter(declared), "l96")], "epochs": 2}],
        **top,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_sweep_uses_a_declared_dataset_by_name_its_path_relative_to_the_file(l96, tmp_path, capsys, monkeypatch):
    write_id_prop(tmp_path / "data" / "kappa", l96)
    sweep = _sweep(
        tmp_path,
        {"mykappa": {"path": "data/kappa", "kappa": True}},
        stages=[
            {"name": "pt", "datasets": ["agl"], "max_sizes": [100], "epochs": 2},
            {"name": "ft", "datasets": ["mykappa"], "start_from": {"stage": "pt"}, "scratch": True, "epochs": 2,
             "split": {"test": "kfold", "folds": 5}, "sizes": [70]},
        ],
    )  # fmt: skip
    monkeypatch.chdir(tmp_path.parent)  # the path is the file's, not the shell's
    assert main(["sweep", str(sweep), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "datasets mykappa" in out and "every formula of mykappa (k-folded later)" in out
    # sizes are checked against the declared set as against a built-in one: 95 rows, folds of 19
    bigger = yaml.safe_load(sweep.read_text())
    bigger["stages"][1]["sizes"] = [80]
    sweep.write_text(yaml.safe_dump(bigger))
    assert main(["sweep", str(sweep), "--dry-run"]) == 2
    assert (
        "stages[1].sizes[0]=80: mykappa has at most 76 structures outside a test fold of 5" in capsys.readouterr().err
    )
    assert not datasets.is_known("mykappa")  # declared while the command ran, no longer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small L96 model, and its folder."""
    from ltc.train import RunConfig, TrainConfig, train_run

    out = tmp_path_factory.mktemp("ckpt") / "pt_l96"
    stage = RunConfig(datasets=("l96",), model="cgcnn", model_config={"hidden": 16, "n_blocks": 2, "fc_dim": 16},
                      train=TrainConfig(epochs=1, batch_size=16))  # fmt: skip
    train_run(stage, out)
    return out / "checkpoint.pt"


@pytest.mark.parametrize(
    ("declared", "start_from", "message"),
    [
        ({"mykappa": {"path": "kappa", "kappa": 3}}, None, "datasets.mykappa.kappa: expected bool, got 3"),
        ({"mykappa": {"path": "kappa", "colour": "red"}}, None, "datasets.mykappa: unknown key 'colour'"),
        ({"mykappa": {"path": "kappa", "format": "xlsx"}}, None, "datasets.mykappa.format: expected one of"),
        ({"mykappa": {"target": "k"}}, None, "datasets.mykappa: missing key 'path'"),
        ({"mykappa": {"path": "nowhere", "kappa": True}}, None, "nowhere (a folder with id_prop.csv) does not exist"),
        ({"mykappa": {"path": "k.extxyz"}}, None, "datasets.mykappa: dataset 'mykappa': k.extxyz is read as extxyz"),
        ({"l96": {"path": "kappa"}}, None, "datasets.l96: dataset name 'l96' is a built-in dataset's"),
        ({"my/kappa": {"path": "kappa"}}, None, "dataset name 'my/kappa': use letters, digits"),
        ({"mykappa": "kappa"}, {"checkpoint": "missing.pt"}, "stages[1].start_from.checkpoint: checkpoint "),
        ({"mykappa": "kappa"}, {"checkpoint": "kappa/id_prop.csv"}, "id_prop.csv: damaged or not a checkpoint"),
        ({"mykappa": "kappa"}, {"checkpoint": "CKPT", "stage": "pt"}, "give stage, pretrained or checkpoint (exactly"),
        (
            {"mykappa": "kappa"},
            {"checkpoint": "CKPT", "select": "every"},
            "select and skip_seen go with a stage source",
        ),
        ({"mykappa": "kappa"}, {"checkpoint": "CKPT", "label": "a|b"}, "its label 'a|b' cannot name a start"),
        ({"mykappa": "kappa"}, {"stage": "pt", "label": "x"}, "label='x' names a checkpoint start"),
    ],
)
def test_dry_run_rejects_each_bad_key(l96, tmp_path, capsys, checkpoint, declared, start_from, message):
    write_id_prop(tmp_path / "kappa", l96[:10])
    (tmp_path / "k.extxyz").write_text("")
    stages = [{"name": "pt", "datasets": ["agl"], "max_sizes": [50], "epochs": 1}]
    if start_from is not None:
        start = {k: (str(checkpoint) if v == "CKPT" else v) for k, v in start_from.items()}
        stages.append({"name": "ft", "datasets": ["mykappa"], "start_from": start, "epochs": 1})
    rc = main(["sweep", str(_sweep(tmp_path, declared, stages=stages)), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_an_undeclared_path_in_a_stage_says_how_to_declare_it(tmp_path, capsys):
    sweep = _sweep(tmp_path, {}, stages=[{"name": "ft", "datasets": ["data/kappa/"], "epochs": 1}])
    assert main(["sweep", str(sweep), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'data/kappa/'" in err and "declared under a sweep file's `datasets:`" in err


def test_a_checkpoint_start_takes_its_architecture_and_label_from_the_file(l96, tmp_path, checkpoint, capsys):
    from ltc.sweep import load_sweep, plan

    write_id_prop(tmp_path / "kappa", l96)
    cell = tmp_path / "best" / "cell"
    for fold in ("r0f0", "r0f1"):
        (cell / fold).mkdir(parents=True)
        shutil.copy(checkpoint, cell / fold / "checkpoint.pt")
    stages = [
        {"name": "ft", "datasets": ["mykappa"], "scratch": True, "epochs": 1, "start_from": [
            {"checkpoint": str(checkpoint)},  # label: its folder's name (the file is checkpoint.pt)
            {"checkpoint": "best/cell", "label": "folds"},  # each fold model a start
        ]},
    ]  # fmt: skip
    sweep = load_sweep(_sweep(tmp_path, {"mykappa": {"path": "kappa", "kappa": True}}, stages=stages))
    starts = sorted({s.start.label for s in plan(sweep)["ft"] if s.start})
    assert starts == ["folds:r0f0", "folds:r0f1", "pt_l96"]
    ft = plan(sweep)["ft"]
    from_file = next(s for s in ft if s.start and s.start.label == "pt_l96")
    assert from_file.start.datasets == ("l96",) and from_file.start.checkpoint == str(checkpoint)
    scratch = next(s for s in ft if s.kind == "scratch")
    assert scratch.arch.model == "cgcnn" and scratch.arch.model_config["hidden"] == 16  # the checkpoint's own
    assert "n_targets" not in scratch.arch.model_config
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--dry-run"]) == 0
    assert "checkpoint pt_l96" in capsys.readouterr().out


def test_cli_train_prepare_and_predict_on_a_folder_of_your_own(l96, tmp_path, checkpoint, capsys):
    folder = write_id_prop(tmp_path / "my_kappa", l96)
    out = tmp_path / "ft"
    rc = main(["train", "--dataset", str(folder), "--kappa", "--init", str(checkpoint.parent), "--out", str(out),
               "--epochs", "1", "--batch-size", "16"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0 and "cgcnn on my_kappa" in printed and "MAE log10" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["datasets"] == ["my_kappa"] and metrics["test_mae_log10"] is not None
    target = json.loads(json.dumps(__import__("torch").load(out / "checkpoint.pt", weights_only=True)["targets"]))
    assert target[0]["dataset"] == "my_kappa" and target[0]["kappa"] and target[0]["units"] == "W/(m K)"

    decl = tmp_path / "decl.yaml"
    decl.write_text("datasets:\n  mykappa: {path: my_kappa, kappa: true}\n")
    assert main(["datasets", "--datasets-from", str(decl)]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mykappa ")]
    assert listed and listed[0].split()[1] == "95" and str(folder / datasets.ID_PROP) in listed[0]

    for source in (["mykappa", "--datasets-from", str(decl)], [str(folder)]):
        pred = tmp_path / "pred.parquet"
        assert main(["predict", "--checkpoint", str(out), *source, "--out", str(pred)]) == 0, capsys.readouterr()
        table = pd.read_parquet(pred).set_index("id")
        truth = {rid: y for rid, _, y in l96}
        assert len(table) == 95 and table.y_true.to_dict() == pytest.approx(truth)
        assert table["rank"].min() == 1  # kappa: ranked lowest first
    capsys.readouterr()
    assert main(["train", "--dataset", str(folder), "--init", str(tmp_path / "decl.yaml"), "--out", str(out)]) == 2
    assert "damaged or not a checkpoint" in capsys.readouterr().err


def test_a_non_ltc_checkpoint_is_refused_with_the_reason(tmp_path, capsys):
    import torch

    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "state.pt")
    for file, reason in [("module.pt", "pickled Python objects (torch.nn.modules.linear.Linear)"),
                         ("state.pt", "a bare state_dict (2 tensors)")]:  # fmt: skip
        rc = main(["train", "--dataset", "l96", "--init", str(tmp_path / file), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 2 and f"{tmp_path / file} is not an ltc checkpoint: " in err and reason in err
        assert len(err.strip().splitlines()) == 1 and "\x1b" not in err


def test_init_from_a_folder_of_fold_models_asks_for_one(tmp_path, checkpoint, capsys):
    for fold in ("r0f0", "r0f1"):
        (tmp_path / fold).mkdir()
        shutil.copy(checkpoint, tmp_path / fold / "checkpoint.pt")
    assert main(["train", "--dataset", "l96", "--init", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "holds 2 checkpoints" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# End to end, on a real local Ray: the user's folder in sweeps, trials that never see it, a second sweep that starts
# from the first one's best checkpoints.


def _kfold_ft(name: str, start_from, **extra) -> dict:
    split = {"test": "kfold", "folds": 3, "repeats": 1, "val_fraction": 0.2}
    return {"name": name, "datasets": ["mykappa"], "start_from": start_from, "scratch": True, "epochs": 3,
            "batch_size": 16, "split": split, **extra}  # fmt: skip


@pytest.mark.slow
def test_pt_on_agl_then_ft_on_your_folder_then_a_sweep_from_its_best_checkpoints(l96, tmp_path, local_ray):
    from ltc.results import write_report
    from ltc.sweep import load_sweep, run_sweep, summary

    write_id_prop(tmp_path / "my_kappa", l96)
    declared = {"mykappa": {"path": "my_kappa", "target": KAPPA, "kappa": True}}
    first = _sweep(
        tmp_path,
        declared,
        stages=[{"name": "pretrain", "datasets": ["agl"], "max_sizes": [120], "epochs": 2, "batch_size": 32},
                _kfold_ft("finetune", {"stage": "pretrain"})],
        search={"trials": 1, "lr": 3e-3},
        asha=None,
    )  # fmt: skip
    trials = run_sweep(load_sweep(first), results=tmp_path / "results", spec_text=first.read_text())
    assert (trials.status == "completed").all(), trials[["setting", "status", "error"]]
    ft = trials[trials.stage == "finetune"]
    assert set(ft.dataset) == {"mykappa"} and len(ft) == 6  # 3 folds x (PT start, scratch)
    assert set(ft[ft.kind == "finetune"].pt_dataset) == {"agl"}
    assert ft.test_mae_log10.notna().all() and (ft.n_test * 3 >= 93).all()  # kappa: judged on log10
    assert "finetune: mykappa, FT size all; judged by MAE log10 kappa" in summary(trials)
    assert not datasets.is_known("mykappa")  # declared while the sweep ran; what it is is remembered for results

    root = tmp_path / "results" / "own"
    pt_cell = next((root / "best" / "pretrain").glob("*/checkpoint.pt")).parent
    ft_cell = next(p for p in (root / "best" / "finetune").iterdir() if p.is_dir() and "from=" in p.name)
    second = tmp_path / "second" / "sweep.yaml"
    second.parent.mkdir()
    second.write_text(yaml.safe_dump({
        "name": "again",
        "datasets": {"mykappa": {"path": "../my_kappa", "target": KAPPA, "kappa": True}},
        "search": {"trials": 1, "lr": 3e-3},
        "asha": None,
        "stages": [_kfold_ft("ft", [{"checkpoint": str(pt_cell), "label": "agl_pt"},
                                    {"checkpoint": str(ft_cell), "label": "folds"}])],
    }))  # fmt: skip
    again = run_sweep(load_sweep(second), results=tmp_path / "results", spec_text=second.read_text())
    assert (again.status == "completed").all(), again[["setting", "status", "error"]]
    starts = set(again[again.kind == "finetune"].start)
    assert starts == {"agl_pt", "folds:r0f0", "folds:r0f1", "folds:r0f2"}  # each fold model a start
    assert len(again) == 3 * (4 + 1)
    by_start = again[again.kind == "finetune"].groupby("start").pt_dataset.first().to_dict()
    assert by_start["agl_pt"] == "agl" and by_start["folds:r0f0"] == "mykappa"  # what each was trained on
    kept = tmp_path / "results" / "again" / "ray" / "starts" / "ft"
    assert {p.parent.name.rsplit("-", 1)[0] for p in kept.glob("*/checkpoint.pt")} == {
        "agl_pt", "folds-r0f0", "folds-r0f1", "folds-r0f2"
    }  # fmt: skip
    assert set(again[again.kind == "finetune"].init) == {str(p) for p in kept.glob("*/checkpoint.pt")}
    scratch = again[again.kind == "scratch"]
    assert set(scratch.arch) == {"cgcnn"} and scratch.test_mae_log10.notna().all()

    # `ltc report` in another process: the folder says what mykappa is (kappa: log10 headline, W/(m K))
    report = write_report(tmp_path / "results" / "again")
    text = report.path.read_text()
    assert "mykappa" in text and "MAE log10" in text and "| agl_pt [all] | scratch |" in text


@pytest.mark.slow
def test_a_trial_on_your_dataset_runs_with_the_folder_gone(l96, tmp_path, local_ray):
    """The driver prepares a declared folder; its trial, in a Ray worker that knows no declaration, trains from the
    shards after the folder is deleted."""
    from ray import tune

    from ltc.config import from_dict
    from ltc.inputs import resolve_inputs
    from ltc.sweep import SweepSpec
    from ltc.sweep.plan import plan, resolve_holdout, trial_config
    from ltc.trial import COMPLETED, ltc_trial

    folder = write_id_prop(tmp_path / "my_kappa", l96)
    spec = from_dict(SweepSpec, {
        "name": "gone", "model_config": {"hidden": 16, "n_blocks": 2, "fc_dim": 16},
        "datasets": {"mykappa": {"path": str(folder), "kappa": True}},
        "stages": [{"name": "pt", "datasets": ["mykappa"], "epochs": 2, "batch_size": 16, "checkpoint_every": 1,
                    "checkpoint_seconds": 0, "report_seconds": 0}],
    })  # fmt: skip
    stage = spec.stages[0]
    with declare(spec.declared_datasets()):
        inputs = resolve_inputs(["mykappa"], holdout=resolve_holdout(spec, stage), graph=spec.graph_config,
                                split=spec.split, cache=tmp_path / "cache")  # fmt: skip
    config = trial_config(spec, stage, plan(spec)["pt"][0], inputs) | {"lr": 1e-3, "n_unfrozen": None, "trial_index": 0}
    shutil.rmtree(folder)
    grid = tune.Tuner(
        tune.with_resources(ltc_trial, {"cpu": 1}),
        param_space=config,
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="t", verbose=0),
    ).fit()
    result = grid[0]
    assert result.error is None, result.error
    assert result.metrics[COMPLETED] and result.metrics["test_mae_log10"] is not None  # kappa, from the manifest


@pytest.mark.slow
def test_the_shipped_template_answers_on_a_folder_of_cifs(l96, tmp_path, local_ray, capsys):
    """README's one command on a folder of CIF files and an id_prop.csv: a paired PT->FT vs scratch answer."""
    from conftest import REPO

    (tmp_path / "sweeps").mkdir()
    shutil.copy(REPO / "sweeps" / "own_kappa.yaml", tmp_path / "sweeps")
    write_id_prop(tmp_path / "my_kappa", l96)
    sweep = str(tmp_path / "sweeps" / "own_kappa.yaml")
    assert main(["sweep", sweep, "--dry-run"]) == 0
    assert "30 settings (15 finetune, 15 scratch)" in capsys.readouterr().out  # 5 folds x 3 repeats, paired
    assert main(["sweep", sweep, "--smoke", "--results", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "finetune: mykappa, FT size 64; judged by MAE log10 kappa" in out
    assert "agl:max64 [all] vs scratch:" in out and "(A better on " in out


def test_a_declared_dataset_goes_where_a_built_in_one_goes(l96, tmp_path, capsys):
    """Multi-property sets, an explicit holdout list, K-fold and sizes: as for a built-in name."""
    from ltc.sweep import load_sweep, plan

    write_id_prop(tmp_path / "kappa", l96)
    stages = [
        {"name": "mpt", "datasets": [["mykappa", "hh143"]], "max_sizes": [60], "epochs": 1, "holdout": ["mykappa"]},
        {"name": "ft", "datasets": ["mykappa"], "start_from": {"stage": "mpt"}, "sizes": [40], "epochs": 1,
         "split": {"test": "kfold", "folds": 4}},
    ]  # fmt: skip
    path = _sweep(tmp_path, {"mykappa": {"path": "kappa", "kappa": True}}, stages=stages)
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "datasets mykappa+hh143" in out and "starting checkpoints: 1 (mykappa+hh143:max60)" in out
    assert [s.datasets for s in plan(load_sweep(path))["mpt"]] == [("mykappa", "hh143")]


def test_only_a_column_name_is_taken_for_a_header(l96, tmp_path):
    folder = write_id_prop(tmp_path / "k", l96[:3])
    rows = (folder / datasets.ID_PROP).read_text()
    for first, header in [("id,kappa", True), ("material,kappa_300K", True), ("mp-404,nan", False),
                          ("mp-404,", False), ("mp-404,n/a", False), ("mp-404,1.5", False)]:  # fmt: skip
        (folder / datasets.ID_PROP).write_text(f"{first}\n{rows}")
        with declare([from_path(folder, kappa=True)]):
            raw = read("k")
        assert len(raw.records) == 3, first
        # a data row (no structure file here) is a rejected row, never a skipped "header"
        assert [r.id for r in raw.rejected] == ([] if header else ["mp-404"]), first


def test_links_compressed_json_byte_order_marks_and_empty_files(l96, tmp_path):
    import bz2
    import lzma

    store = write_id_prop(tmp_path / "store", l96[:3])
    folder = tmp_path / "linked"
    folder.mkdir()
    for rid, _, _ in l96[:3]:  # ALIGNN's ids are file names; the files are links into another folder
        (folder / f"{rid}.cif").symlink_to(store / f"{rid}.cif")
    (folder / datasets.ID_PROP).write_text("".join(f"{rid}.cif,{y}\n" for rid, _, y in l96[:3]))
    with declare([from_path(folder)]):
        assert [r.id for r in read("linked").records] == [f"{rid}.cif" for rid, _, _ in l96[:3]]
    records = json.dumps([{"id": rid, "k": y, "structure": st.as_dict()} for rid, st, y in l96[:3]])
    for name, data in [("a.json.bz2", bz2.compress(records.encode())), ("b.json.xz", lzma.compress(records.encode())),
                       ("c.json", "\ufeff".encode() + records.encode())]:  # fmt: skip
        (tmp_path / name).write_bytes(data)
        spec = from_path(tmp_path / name, target="k")
        with declare([spec]):
            assert len(read(spec.name).records) == 3, name
    for name, text in [("empty.json", "[]"), ("empty.csv", "id,structure,k\n"), ("empty.extxyz", "")]:
        (tmp_path / name).write_text(text)
        spec = from_path(tmp_path / name, target="k")
        with declare([spec]), pytest.raises(DatasetFileError, match=f"{name}: holds no rows"):
            read(spec.name)
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / datasets.ID_PROP).write_text("")
    with declare([from_path(tmp_path / "none")]), pytest.raises(DatasetFileError, match="holds no rows"):
        read("none")


def test_declared_units_are_part_of_the_shards(l96, tmp_path):
    folder = write_id_prop(tmp_path / "k", l96[:5])
    with declare([from_path(folder, units="W/mK")]):
        first = prepare("k", cache=tmp_path / "c")
    with declare([from_path(folder, units="mW/(cm K)")]):
        second = prepare("k", cache=tmp_path / "c")
    assert second.built and second.path != first.path and ShardSet(second.path).target.units == "mW/(cm K)"


def test_cli_paths_of_one_name_and_mistyped_paths_are_one_line_errors(l96, tmp_path, capsys):
    a, b = write_id_prop(tmp_path / "a" / "kappa", l96[:4]), write_id_prop(tmp_path / "b" / "kappa", l96[4:8])
    for argv in (["prepare", str(a), str(b)], ["train", "--dataset", str(a), "--holdout", str(b), "--model", "cgcnn",
                                                "--out", str(tmp_path / "o")]):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{b} and {a} are both called 'kappa'" in err and len(err.strip().splitlines()) == 1
    assert main(["prepare", str(a), str(a), "-q"]) == 0  # the same folder twice is one dataset
    capsys.readouterr()
    assert main(["prepare", str(tmp_path / "nothere.csv")]) == 2
    assert "nothere.csv: no such file or folder" in capsys.readouterr().err
    (tmp_path / "cifs").mkdir()
    assert main(["prepare", str(tmp_path / "cifs")]) == 2
    assert "cifs has no id_prop.csv" in capsys.readouterr().err
    (tmp_path / "t.csv").write_text("id,structure,k\n")
    assert main(["prepare", str(tmp_path / "t.csv")]) == 2
    assert "that holds the target (--target)" in capsys.readouterr().err
    (a / datasets.DECLARATION_FILE).write_text("kappa: maybe\n")
    assert main(["prepare", str(a)]) == 2
    assert f"{a / datasets.DECLARATION_FILE}.kappa: expected bool" in capsys.readouterr().err


def test_dry_run_reads_every_declared_dataset_and_report_survives_its_removal(l96, tmp_path, capsys):
    from ltc.results import declared_in

    table = tmp_path / "k.csv"
    pd.DataFrame([{"id": rid, "kappa": y, "structure": json.dumps(st.as_dict())} for rid, st, y in l96]).to_csv(
        table, index=False
    )
    for stage in ({"name": "pt", "datasets": ["mine"], "epochs": 1},
                  {"name": "pt", "datasets": ["l96"], "holdout": ["mine"], "epochs": 1}):  # fmt: skip
        sweep = _sweep(tmp_path, {"mine": {"path": "k.csv", "target": "kapa"}}, stages=[stage])
        assert main(["sweep", str(sweep), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert "datasets.mine: " in err and "no target column 'kapa'" in err
    # the results of a sweep whose folder (with a dot in its name) has gone: still a dataset of W/(m K), kappa
    (tmp_path / "res").mkdir()
    decl = {"path": str(tmp_path / "gone_v1.2"), "kappa": True, "target": None, "units": None, "title": None,
            "format": "auto", "id": None, "structure": None}  # fmt: skip
    (tmp_path / "res" / "sweep.json").write_text(json.dumps({"spec": json.dumps({"datasets": {"old": decl}})}))
    found = declared_in(tmp_path / "res")
    assert found["old"].kappa and found["old"].units == "W/(m K)"
    (tmp_path / "res" / "sweep.json").write_text("{not json")
    assert declared_in(tmp_path / "res") == {}


def test_a_uri_is_not_a_dataset_path(tmp_path, capsys):
    sweep = _sweep(tmp_path, {"mine": {"path": "s3://bucket/kappa/"}})
    assert main(["sweep", str(sweep), "--dry-run"]) == 2
    assert "datasets.mine: path: 's3://bucket/kappa/' is a URI" in capsys.readouterr().err


def test_predict_on_a_table_of_your_own_and_on_nothing_readable(l96, tmp_path, checkpoint, capsys):
    table = tmp_path / "cands.csv"
    rows = [{"id": rid, "kappa": y, "structure": json.dumps(st.as_dict())} for rid, st, y in l96[:10]]
    pd.DataFrame(rows).to_csv(table, index=False)
    out = tmp_path / "p.parquet"
    assert main(["predict", "--checkpoint", str(checkpoint), str(table), "--target", "kappa", "--out", str(out)]) == 0
    truth = pd.read_parquet(out).set_index("id").y_true.to_dict()
    assert truth == pytest.approx({rid: y for rid, _, y in l96[:10]})
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.cif").write_text("no crystal here\n")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), str(junk), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "none of its 1 structure(s) could be read (e.g." in err and "Traceback" not in err
    assert pd.read_parquet(out).error.notna().all()  # the reasons are written


def test_a_resume_refuses_changed_data_or_checkpoints_and_accepts_a_moved_project(l96, tmp_path, checkpoint):
    from ltc.errors import ConfigError as LtcConfigError
    from ltc.sweep import load_sweep
    from ltc.sweep.driver import SweepPaths, _claim_results

    project = tmp_path / "project"
    write_id_prop(project / "kappa", l96[:20])
    shutil.copy(checkpoint, project / "pt.pt")
    stages = [{"name": "ft", "datasets": ["mykappa"], "start_from": {"checkpoint": "pt.pt"}, "epochs": 1}]
    sweep = _sweep(project, {"mykappa": {"path": "kappa", "kappa": True}}, stages=stages)
    root = tmp_path / "results" / "own"
    paths = SweepPaths(root, str(root / "ray"), str(root / "optuna.log"))
    _claim_results(paths, load_sweep(sweep), sweep.read_text(), resume=False)
    stored = json.loads((root / "sweep.json").read_text())["given_inputs"]
    assert set(stored) == {"dataset mykappa", "checkpoint pt of stage ft"}

    moved = tmp_path / "elsewhere"
    shutil.move(project, moved)  # the same files in another place: the same sweep
    _claim_results(paths, load_sweep(moved / "sweep.yaml"), None, resume=True)

    cif = moved / "kappa" / f"{l96[3][0]}.cif"
    cif.write_text(cif.read_text().replace("_cell_length_a", "_cell_length_a ", 1) + "\n")
    with pytest.raises(LtcConfigError, match="started with other contents of dataset mykappa"):
        _claim_results(paths, load_sweep(moved / "sweep.yaml"), None, resume=True)
    shutil.rmtree(moved / "kappa")
    write_id_prop(moved / "kappa", l96[:20])  # the same contents again
    _claim_results(paths, load_sweep(moved / "sweep.yaml"), None, resume=True)
    torch = pytest.importorskip("torch")
    ckpt = torch.load(moved / "pt.pt", weights_only=True)
    ckpt["metrics"] = {"edited": 1.0}
    torch.save(ckpt, moved / "pt.pt")
    with pytest.raises(LtcConfigError, match="other contents of checkpoint pt of stage ft"):
        _claim_results(paths, load_sweep(moved / "sweep.yaml"), None, resume=True)


def test_kept_checkpoints_of_two_labels_never_share_a_folder(tmp_path, checkpoint):
    from ltc.sweep.driver import SweepPaths, keep_given
    from ltc.sweep.plan import Start

    paths = SweepPaths(tmp_path, str(tmp_path / "ray"), str(tmp_path / "optuna.log"))
    kept = {keep_given(paths, "ft", Start(label, (), None, checkpoint=str(checkpoint), given=True)).checkpoint
            for label in ("a:r0f0", "a-r0f0", "a_r0f0")}  # fmt: skip
    assert len(kept) == 3 and all(Path(k).is_file() for k in kept)
