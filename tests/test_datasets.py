from __future__ import annotations

import gzip
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import read_json_gz, write_json_gz

from ltc import datasets
from ltc.datasets import (
    DatasetError,
    DatasetFileError,
    DatasetNotFoundError,
    UnknownDatasetError,
    devi_subsets,
    devi_test_ids,
    devi_trial_ids,
    parse_structure,
    read,
)

# Entries per local file, from shared/data/SOURCES.md.
LOCAL_COUNTS = {
    "pz": 941, "dc": 1056, "ph": 1265, "ebg": 2451, "gv": 6683, "bg": 9395, "fe": 8741,
    "jarvis2d": 1103, "agl": 3108, "l96": 95, "hh143": 143, "mix": 238, "gvrh2015": 1181,
}  # fmt: skip


def test_registry_names_every_dataset_with_target_units_and_transform():
    assert set(datasets.REGISTRY) == set(LOCAL_COUNTS)
    for name, s in datasets.REGISTRY.items():
        assert s.name == name
        assert s.target and s.units and s.reference
        assert s.transform in ("minmax", "log10p1+standardize")
        assert s.full_size >= LOCAL_COUNTS[name]
    assert {n for n, s in datasets.REGISTRY.items() if s.kappa} == {"agl", "l96", "hh143", "mix"}


def test_unknown_name_lists_known_ones():
    with pytest.raises(UnknownDatasetError, match=r"unknown dataset 'kappa'.*pz, dc, ph"):
        datasets.spec("kappa")


@pytest.mark.parametrize("name", sorted(LOCAL_COUNTS))
def test_every_local_file_reads_fully(name, data_home):
    raw = read(name)
    assert raw.n_rows == LOCAL_COUNTS[name]
    assert len(raw.records) == LOCAL_COUNTS[name] and raw.rejected == []
    ids = [r.id for r in raw.records]
    assert len(set(ids)) == len(ids)
    y = np.array([r.target for r in raw.records])
    assert np.isfinite(y).all()
    assert raw.path.is_relative_to(data_home)
    assert len(raw.fingerprint) == 64


def test_targets_are_raw_units(data_home):
    # Devi's files hold min-max scaled targets; ltc reads target_raw, which equals matminer's value.
    csv = pd.read_csv(data_home / "piezoelectric_tensor/matminer_piezoelectric_tensor.csv.gz", comment="#")
    by_id = {r.id: r.target for r in read("pz").records}
    for idx, eij in zip(csv["idx"][:50], csv["eij_max"][:50], strict=True):
        assert by_id[str(idx)] == pytest.approx(eij, rel=1e-9, abs=1e-12)
    ph = np.array([r.target for r in read("ph").records])
    assert ph.min() == pytest.approx(59.5858, abs=1e-3) and ph.max() == pytest.approx(3643.7434, abs=1e-3)
    kappa = np.array([r.target for r in read("l96").records])
    assert kappa.min() == pytest.approx(0.51, abs=5e-3) and kappa.max() == pytest.approx(1769, rel=1e-3)  # W/(m K)
    # JARVIS 2D: only the scaled target exists.
    j = np.array([r.target for r in read("jarvis2d").records])
    assert j.min() >= -1 and j.max() <= 1


def test_jarvis_atoms_cartesian_flag_is_honoured():
    rec = read("jarvis2d").records[0]
    assert rec.fmt == "jarvis" and rec.payload["cartesian"] is True
    s = parse_structure(rec.fmt, rec.payload)
    np.testing.assert_allclose(s.cart_coords, rec.payload["coords"], atol=1e-8)
    np.testing.assert_allclose(s.lattice.matrix, rec.payload["lattice_mat"], atol=1e-8)

    frac = read("ph").records[0]
    assert frac.payload["cartesian"] is False
    s = parse_structure(frac.fmt, frac.payload)
    np.testing.assert_allclose(s.frac_coords, frac.payload["coords"], atol=1e-8)
    # the same atoms written with Cartesian coordinates give the same structure
    as_cart = dict(frac.payload, coords=s.cart_coords.tolist(), cartesian=True)
    np.testing.assert_allclose(parse_structure("jarvis", as_cart).frac_coords % 1, s.frac_coords % 1, atol=1e-8)

    bad = dict(frac.payload, cartesian="yes")
    with pytest.raises(ValueError, match="cartesian='yes'"):
        parse_structure("jarvis", bad)


def test_matminer_csv_with_cif_gives_the_same_dataset(tmp_path, data_home):
    # A data home holding only the old matminer CSV (CIF strings) reads as the same pz set.
    folder = tmp_path / "piezoelectric_tensor"
    folder.mkdir()
    shutil.copy(data_home / "piezoelectric_tensor/matminer_piezoelectric_tensor.csv.gz", folder)
    from_csv = read("pz", data_home=tmp_path)
    assert isinstance(from_csv.file.source, datasets.MatminerCSV)
    devi = {r.id: r for r in read("pz").records}
    assert len(from_csv.records) == 941
    for rec in from_csv.records[:40]:
        other = devi[rec.id]
        assert rec.target == pytest.approx(other.target, rel=1e-9, abs=1e-12)
        a, b = parse_structure(rec.fmt, rec.payload), parse_structure(other.fmt, other.payload)
        assert a.composition == b.composition
        assert a.volume == pytest.approx(b.volume, rel=1e-4)
    assert from_csv.fingerprint != read("pz").fingerprint


def _matminer_file(folder: Path, name: str, target: str, records: list[datasets.RawRecord]) -> Path:
    from matminer.utils.io import store_dataframe_as_json

    df = pd.DataFrame(
        {"structure": [parse_structure(r.fmt, r.payload) for r in records], target: [r.target for r in records]}
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json.gz"
    store_dataframe_as_json(df, str(path), compression="gz", pbar=False)
    return path


def test_matminer_load_dataset_path_with_a_file_on_disk(tmp_path):
    # The download path ends in matminer.datasets.load_dataset reading <name>.json.gz from the data home;
    # with the file already there, no network is touched and ltc reads matminer's dataframe.
    src = read("ph").records[:25]
    _matminer_file(tmp_path / "matbench_phonons", "matbench_phonons", "last phdos peak", src)
    raw = read("ph", data_home=tmp_path, download=False)
    assert isinstance(raw.file.source, datasets.MatminerDataset)
    assert [r.id for r in raw.records] == [str(i) for i in range(25)]  # row numbers, as Devi's jid
    assert [r.target for r in raw.records] == pytest.approx([r.target for r in src])
    assert raw.records[3].fmt == "structure"
    s = parse_structure(raw.records[3].fmt, raw.records[3].payload)
    assert s.composition == parse_structure(src[3].fmt, src[3].payload).composition


def test_full_matminer_file_wins_over_devi_subset(tmp_path, data_home):
    folder = tmp_path / "matbench_log_gvrh"
    folder.mkdir()
    shutil.copy(data_home / "matbench_log_gvrh/devi2024_gv_union.json.gz", folder)
    assert isinstance(read("gv", data_home=tmp_path).file.source, datasets.DeviUnion)
    _matminer_file(folder, "matbench_log_gvrh", "log10(G_VRH)", read("ph").records[:5])
    assert isinstance(read("gv", data_home=tmp_path).file.source, datasets.MatminerDataset)


def test_missing_file_without_network_says_which_file_to_put_where(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        read("ph", data_home=tmp_path, download=False)
    msg = str(err.value)
    assert "devi2024_ph_union.json.gz" in msg and str(tmp_path / "matbench_phonons") in msg
    assert "downloads are off" in msg
    with pytest.raises(DatasetNotFoundError, match=r"paraisite_Dataset1\.json\.gz in .*ltc_paraisite"):
        read("l96", data_home=tmp_path, download=True)  # not a matminer set: nothing to download


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"this is not gzip", "cannot read as gzipped JSON"),
        (gzip.compress(b'{"not": "a list"}'), "expected a JSON list of records, found dict"),
        (gzip.compress(b"[{]"), "cannot read as gzipped JSON"),
    ],
)
def test_malformed_whole_file_is_one_error_naming_it(tmp_path, content, match):
    path = tmp_path / "ltc_paraisite" / "paraisite_Dataset1.json.gz"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(DatasetFileError, match=match) as err:
        read("l96", data_home=tmp_path)
    assert str(path) in str(err.value)


def test_csv_missing_its_target_column_is_an_error(tmp_path, data_home):
    df = pd.read_csv(data_home / "piezoelectric_tensor/matminer_piezoelectric_tensor.csv.gz", comment="#")
    path = tmp_path / "piezoelectric_tensor" / "matminer_piezoelectric_tensor.csv.gz"
    path.parent.mkdir()
    df.drop(columns=["eij_max"]).head(5).to_csv(path, index=False)
    with pytest.raises(DatasetFileError, match=r"missing column\(s\) \['eij_max'\]"):
        read("pz", data_home=tmp_path)


def test_bad_rows_are_rejected_with_reasons_and_the_rest_kept(tmp_path, data_home):
    rows = read_json_gz(data_home / "ltc_paraisite/paraisite_Dataset1.json.gz")
    good = len(rows)
    bad = [
        dict(rows[0], mpd_id="no-target", TC=None),
        dict(rows[1], mpd_id="nan-target", TC=float("nan")),
        dict(rows[2], mpd_id="inf-target", TC="inf"),
        dict(rows[3], mpd_id="text-target", TC="high"),
        dict(rows[4]),  # duplicate of rows[4]'s id
        {"mpd_id": "no-structure", "TC": 1.0},
        {"TC": 1.0, "structure": rows[5]["structure"]},  # no id
        "not a record",
    ]
    write_json_gz(tmp_path / "ltc_paraisite/paraisite_Dataset1.json.gz", rows + bad)
    raw = read("l96", data_home=tmp_path)
    assert raw.n_rows == good + len(bad)
    assert len(raw.records) == good  # every good row survives
    reasons = {r.id: r.reason for r in raw.rejected}
    assert reasons["no-target"] == "missing target: empty"
    assert reasons["nan-target"] == "missing target: NaN"
    assert reasons["inf-target"] == "bad target: inf is not finite"
    assert reasons["text-target"] == "bad target: 'high' is not a number"
    assert reasons[rows[4]["mpd_id"]] == f"duplicate id: first at row 4, again at row {good + 4}"
    assert reasons["no-structure"] == "missing structure: no field 'structure'"
    assert reasons[f"row {good + 6}"] == "missing id: no field 'mpd_id'"
    assert reasons[f"row {good + 7}"] == "bad record: a str, not an object"
    # a duplicate whose first copy was rejected (bad target) is not lost as a "duplicate"
    again = [dict(rows[6], TC=None), dict(rows[6])]
    write_json_gz(tmp_path / "ltc_paraisite/paraisite_Dataset2.json.gz", again)
    raw2 = read("hh143", data_home=tmp_path)
    assert [r.id for r in raw2.records] == [rows[6]["mpd_id"]] and raw2.rejected[0].reason == "missing target: empty"
    # the kept duplicate is the first one, with its own target
    kept = next(r for r in raw.records if r.id == rows[4]["mpd_id"])
    assert math.isclose(kept.target, rows[4]["TC"])


def test_devi_paper_subsets_are_exposed():
    test = devi_test_ids("pz")
    assert len(test) == 94
    ft = devi_trial_ids("pz", trial=3, size=800)
    assert len(ft) == 800 and not set(ft) & set(test)
    assert len(devi_trial_ids("pz", trial=1, size=10, protocol="mpt")) == 10
    ids = {r.id for r in read("pz").records}
    assert set(test) <= ids and set(ft) <= ids
    # dc's pair-wise and multi-property test files agree
    dc = devi_subsets("dc")
    tests = {k: sorted(v) for k, v in dc.items() if "test" in k}
    assert len(tests) >= 2 and len({tuple(v) for v in tests.values()}) == 1


def test_devi_subsets_errors():
    with pytest.raises(DatasetNotFoundError, match="test set for 'bg' is not in the local snapshot"):
        devi_test_ids("bg")
    with pytest.raises(DatasetError, match="'l96' is not one of Devi"):
        devi_subsets("l96")
    with pytest.raises(DatasetNotFoundError, match=r"pz_trial9_800\.json"):
        devi_trial_ids("pz", trial=9, size=800)
    with pytest.raises(ValueError, match="protocol='mtp'"):
        devi_trial_ids("pz", trial=1, size=800, protocol="mtp")
