from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from ltc import datasets
from ltc.cli import main
from ltc.graphs import CONSTRUCTIONS


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


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["prepare", "l96", "-q", "--cache", "{F}/cache"], "--cache {F}/cache: Not a directory: {F}"),
        (["train", "--dataset", "l96", "--model", "cgcnn", "--out", "{F}/run"], "--out {F}/run: Not a directory: {F}"),
        (["predict", "--checkpoint", "{F}", "l96", "--out", "{F}/p.parquet"], "--out {F}/p.parquet: Not a directory"),
        (["sweep", "sweeps/quickstart.yaml", "--results", "{F}/res"], "--results {F}/res: Not a directory: {F}"),
        (
            ["sweep", "sweeps/quickstart.yaml", "--dry-run", "--results", "{F}/res"],
            "--results {F}/res: Not a directory",
        ),
        (["sweep", "sweeps/quickstart.yaml", "--storage", "{F}/s", "--results", "{T}/r"], "--storage {F}/s: Not a"),
        (["report", "{F}/results"], "{F}/results/trials.parquet does not exist"),
        (["prepare", "l96", "--data-home", "{F}/home"], "put paraisite_Dataset1.json.gz in {F}/home/ltc_paraisite"),
    ],
)
def test_a_path_under_a_file_is_one_line_naming_it(capsys, tmp_path, monkeypatch, argv, option):
    """The user's path mistakes (here: a path under a file) are one line naming the option and path, found before
    any work (no training, no Ray: the command returns in a second or two)."""
    monkeypatch.chdir(REPO)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    fill = {"F": str(blocker), "T": str(tmp_path)}
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option.format(**fill) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing was made


def test_a_folder_that_cannot_be_made_is_one_line(capsys, tmp_path):
    """mkdir under /proc fails with ENOENT, which inside ltc would be a bug; under --out it is the user's."""
    assert main(["train", "--dataset", "l96", "--model", "cgcnn", "--out", "/proc/ltc-test/run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ltc train: error: --out /proc/ltc-test/run: No such file or directory: /proc/ltc-test", err


def test_graph_construction_choices_are_the_librarys(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "l96", "--construction", "alignn"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'alignn'" in err and all(name in err for name in CONSTRUCTIONS)


def test_missing_data_is_a_clear_error(capsys, tmp_path):
    assert main(["prepare", "l96", "--data-home", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "put paraisite_Dataset1.json.gz in" in err


def test_console_script_help_explains_commands():
    out = subprocess.run(
        [sys.executable, "-m", "ltc.cli", "prepare", "--help"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    for option in ("--cutoff", "--max-neighbors", "--construction", "--workers", "--cache", "--data-home", "--all"):
        assert option in out
    for name in CONSTRUCTIONS:  # the choices and their lines come from the library
        assert f"{name}: {CONSTRUCTIONS[name].split()[0]}" in " ".join(out.split())
    assert "rejected.parquet" in out


# What `ltc --help`, each command's --help and a CPU sweep's --dry-run must not import: each costs seconds.
HEAVY = ("torch", "torch_geometric", "ray", "pymatgen.core", "optuna", "ase", "matminer", "mlflow", "wandb")
IMPORTS_OF = """
import sys
from ltc.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(" ".join(sorted(m for m in {heavy} if m in sys.modules)) or "-")
sys.exit(code)
"""


def test_help_and_dry_run_import_no_torch_nor_ray(data_home, tmp_path):
    """The CLI's choices and defaults come from torch-free modules (ltc.archs, ltc.choices)."""
    listed = subprocess.run([sys.executable, "-m", "ltc.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    commands = re.findall(r"^    ([a-z]+) ", listed.stdout, flags=re.MULTILINE)  # the commands `ltc --help` lists
    assert {"datasets", "prepare", "train", "sweep", "report", "predict", "screen"} <= set(commands)
    runs = [["--help"], *([c, "--help"] for c in commands)]
    runs.append(["sweep", str(REPO / "sweeps" / "quickstart.yaml"), "--dry-run", "--results", str(tmp_path)])
    script = IMPORTS_OF.format(heavy=HEAVY)
    for argv in runs:
        done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, (argv, done.stderr[-2000:])
        assert done.stdout.splitlines()[-1] == "-", (argv, done.stdout.splitlines()[-1])


# --- ltc train ---------------------------------------------------------------------------------------

SMALL_ARGS = {
    "cgcnn": ["hidden=16", "n_blocks=2", "fc_dim=16"],
    "megnet": ["n_blocks=2", "dense=[32,16]", "conv=[32,16]", "output=[16,8]"],
    "alignn": ["hidden=16", "embedding=8", "alignn_layers=1", "gcn_layers=1"],
}
STRATEGIES = {
    "cgcnn": ["all", "last_layer", "new_head", "two_body", "--n-unfrozen=1"],
    "megnet": ["all", "last_layer", "new_head", "two_body", "--n-unfrozen=0"],
    "alignn": ["all", "last_layer", "new_head", "two_body", "three_body", "--n-unfrozen=1"],
}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One tiny PT checkpoint per model, on the phonons set, from the CLI."""
    root = tmp_path_factory.mktemp("pt")
    out = {}
    for model, cfg in SMALL_ARGS.items():
        args = ["train", "--dataset", "ph", "--model", model, "--model-config", *cfg, "--max-size", "64"]
        args += ["--epochs", "2", "--batch-size", "16", "--out", str(root / model), "--cutoff", "6"]
        assert main(args) == 0
        out[model] = root / model / "checkpoint.pt"
    return out


@pytest.mark.parametrize(("model", "strategy"), [(m, s) for m, ss in STRATEGIES.items() for s in ss])
def test_cli_fine_tunes_every_model_with_every_strategy(pretrained, tmp_path, capsys, model, strategy):
    flag = [strategy] if strategy.startswith("--") else ["--strategy", strategy]
    out = tmp_path / "ft"
    args = ["train", "--dataset", "dc", "--init", str(pretrained[model]), "--size", "40", "--epochs", "2"]
    assert main([*args, "--batch-size", "8", "--out", str(out), *flag]) == 0
    printed = capsys.readouterr().out
    assert f"{model} on dc" in printed and "test" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_train"] + m["n_val"] == 40 and m["test_mae"] is not None
    expected = strategy.split("=")[0].removeprefix("--").replace("n-unfrozen", "blocks")
    assert m["strategy"] == expected
    assert (m["params_trainable"] < m["params_total"]) == (strategy != "all")
    assert m["graph"]["cutoff"] == 6.0  # the checkpoint's graphs


def test_cli_three_stage_chain(tmp_path, capsys):
    pt, ft1, ft2 = tmp_path / "pt", tmp_path / "ft1", tmp_path / "ft2"
    common = ["--epochs", "2", "--batch-size", "8", "--loss", "l1"]
    cfg = [*SMALL_ARGS["megnet"], "head_hidden=[45,35,35]"]
    assert main(["train", "--dataset", "pz", "--model", "megnet", "--model-config", *cfg, "--max-size", "60",
                 "--out", str(pt), *common]) == 0  # fmt: skip
    assert main(["train", "--dataset", "mix", "--init", str(pt / "checkpoint.pt"), "--size", "60",
                 "--holdout", "hh143", "--out", str(ft1), *common]) == 0  # fmt: skip
    assert main(["train", "--dataset", "hh143", "--init", str(ft1 / "checkpoint.pt"), "--size", "40",
                 "--out", str(ft2), *common]) == 0  # fmt: skip
    printed = capsys.readouterr()
    out = printed.out
    assert "MAE log10" in out
    # a bar of epochs per run, to its end (2 of 2), with the latest losses
    assert len(re.findall(r"training: +0%", printed.err)) == 3, printed.err[-2000:]
    assert len(re.findall(r"training: 100%\|[^|]*\| 2/2 \[[^\]]*val_score=", printed.err)) == 3, printed.err[-2000:]
    import torch

    ckpt = torch.load(ft2 / "checkpoint.pt", weights_only=True)
    assert [h["datasets"] for h in ckpt["history"]] == [["pz"], ["mix"], ["hh143"]]
    assert ckpt["model"]["config"]["head_hidden"] == [45, 35, 35]
    m = json.loads((ft2 / "metrics.json").read_text())
    assert m["graph"] == {"cutoff": 4.0, "max_neighbors": 24, "construction": "knn"}  # MEGNet's, kept down the chain


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--strategy", "three_body"], "cgcnn has no three-body"),
        (["--n-unfrozen", "5"], "n_unfrozen=5 must be between 0 and 2"),
        (["--strategy", "last_layer", "--n-unfrozen", "1"], "--n-unfrozen goes with --strategy blocks"),
        (["--model", "alignn"], "holds a cgcnn model, not alignn"),
        (["--cutoff", "5"], "trained on graphs"),
        (["--size", "5000"], "size=5000 but dc has only 950 structures outside its test set"),
    ],
)
def test_cli_train_errors(pretrained, tmp_path, capsys, extra, message):
    args = ["train", "--dataset", "dc", "--init", str(pretrained["cgcnn"]), "--epochs", "1", "--out", str(tmp_path)]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_one_graph_flag_keeps_the_other(pretrained, tmp_path):
    # the checkpoint was trained on 6 Å graphs with 12 neighbours: --max-neighbors 12 alone fits it
    args = ["train", "--dataset", "dc", "--init", str(pretrained["cgcnn"]), "--epochs", "1", "--size", "20"]
    assert main([*args, "--max-neighbors", "12", "--out", str(tmp_path / "a")]) == 0
    args = ["train", "--dataset", "l96", "--model", "megnet", "--model-config", *SMALL_ARGS["megnet"], "--epochs", "1"]
    assert main([*args, "--max-neighbors", "16", "--out", str(tmp_path / "b")]) == 0
    graph = json.loads((tmp_path / "b" / "metrics.json").read_text())["graph"]
    assert graph == {"cutoff": 4.0, "max_neighbors": 16, "construction": "knn"}


def test_cli_alignn_trains_on_the_reference_graphs(pretrained, tmp_path):
    # alignn's default graphs are ALIGNN's own ("jarvis"), with the line graph that keeps a->b->a pairs;
    # --cutoff alone kept the construction; the other models keep "knn"
    import torch

    ckpt = torch.load(pretrained["alignn"], weights_only=True)
    assert ckpt["graph"] == {"cutoff": 6.0, "max_neighbors": 12, "construction": "jarvis"}
    assert ckpt["model"]["config"]["backtracking"] is True
    assert torch.load(pretrained["cgcnn"], weights_only=True)["graph"]["construction"] == "knn"
    # an explicit --construction knn gives the old graphs and line graph
    args = ["train", "--dataset", "l96", "--model", "alignn", "--model-config", *SMALL_ARGS["alignn"], "--epochs", "1"]
    assert main([*args, "--construction", "knn", "--out", str(tmp_path / "knn")]) == 0
    ckpt = torch.load(tmp_path / "knn" / "checkpoint.pt", weights_only=True)
    assert ckpt["graph"]["construction"] == "knn" and ckpt["model"]["config"]["backtracking"] is False


def test_prepare_builds_the_reference_graphs(capsys, tmp_path):
    assert main(["prepare", "hh143", "-q", "--cache", str(tmp_path), "--construction", "jarvis"]) == 0
    out = capsys.readouterr().out
    assert "hh143: 143 rows" in out
    per_atom = float(re.search(r"and ([\d.]+) edges per atom", out).group(1))
    assert per_atom > 12  # every neighbour out to the 12th's distance, both ways (knn: exactly 12)


def test_cli_train_damaged_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["train", "--dataset", "dc", "--init", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "damaged or not a checkpoint" in capsys.readouterr().err


def test_prepare_names_a_damaged_shard_file_and_rebuilds_it(capsys, tmp_path):
    assert main(["prepare", "hh143", "-q", "--cache", str(tmp_path)]) == 0
    folder = capsys.readouterr().out.strip().splitlines()[-1].strip()
    shard = sorted(Path(folder).glob("shard-*.arrow"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle: same size, other content
    shard.write_bytes(bytes(data))
    assert main(["prepare", "hh143", "-q", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"hh143: damaged shards rebuilt ({shard.name} is damaged" in out
    assert main(["prepare", "hh143", "-q", "--cache", str(tmp_path)]) == 0
    assert "up to date, nothing to do" in capsys.readouterr().out


def test_internal_errors_keep_their_traceback(monkeypatch, tmp_path):
    """Only LtcError is the user's: a ValueError from a bug inside ltc is not turned into a one-line message."""
    import ltc.shards

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(ltc.shards, "prepare", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["prepare", "hh143", "-q", "--cache", str(tmp_path)])
