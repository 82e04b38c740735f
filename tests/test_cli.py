from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

from ltc import datasets
from ltc.cli import main


def test_datasets_lists_every_dataset_as_present(capsys, data_home):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert f"data home: {data_home}" in out
    lines = {line.split()[0]: line for line in out.splitlines()[3:] if line.strip() and ":" not in line}
    assert set(datasets.REGISTRY) <= set(lines)
    for name in datasets.REGISTRY:
        assert lines[name].rstrip().endswith("yes"), lines[name]
    assert "9,395 of 106,113" in lines["bg"]  # a partial local file says so
    assert "matbench_mp_gap.json.gz is read instead when present" in out
    assert lines["l96"].split()[1] == "95"


def test_datasets_on_an_empty_home_says_missing(capsys, tmp_path):
    assert main(["datasets", "--data-home", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(line.rstrip().endswith("no") for line in out.splitlines()[3 : 3 + len(datasets.REGISTRY)])


def test_prepare_prints_counts_then_nothing_to_do(capsys, tmp_path):
    assert main(["prepare", "hh143", "-q", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "hh143: 143 rows from ltc_paraisite/paraisite_Dataset2.json.gz -> 143 graphs, 0 rejected" in out
    folder = out.strip().splitlines()[-1].strip()
    assert folder.startswith(str(tmp_path / "shards" / "hh143-"))
    assert main(["prepare", "hh143", "-q", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "hh143: up to date, nothing to do" in out and folder in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prepare", "kappa"], "unknown dataset 'kappa'; known: pz, dc"),
        (["prepare", "l96", "--cutoff", "-1"], "cutoff=-1.0 must be a number > 0"),
        (["prepare", "l96", "--max-neighbors", "0"], "max_neighbors=0 must be an integer >= 1"),
        (["prepare"], "name a dataset"),
    ],
)
def test_bad_arguments_are_one_line_errors(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_data_is_a_clear_error(capsys, tmp_path):
    assert main(["prepare", "l96", "--data-home", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "put paraisite_Dataset1.json.gz in" in err


def test_console_script_help_explains_commands():
    out = subprocess.run(
        [sys.executable, "-m", "ltc.cli", "prepare", "--help"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    for option in ("--cutoff", "--max-neighbors", "--workers", "--cache", "--data-home", "--all"):
        assert option in out
    assert "rejected.parquet" in out
