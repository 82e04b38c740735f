"""Splits: the K-fold protocol for small sets (every structure tested once per repeat; selection never sees
the test fold), on real shards."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import DATA_HOME, read_json_gz, write_json_gz

from ltc import splits
from ltc.errors import ConfigError
from ltc.graphs import GraphConfig
from ltc.inputs import resolve_inputs
from ltc.shards import ShardSet
from ltc.splits import SplitConfig, fold_of, make_split, training_pool
from ltc.train import RunConfig, TrainConfig, fold_runs, train_kfold, train_run

KFOLD = SplitConfig(test="kfold", folds=5, repeats=3, val_fraction=0.2)
TINY = {"hidden": 16, "n_blocks": 2, "fc_dim": 16}


@pytest.fixture(scope="module")
def l96() -> ShardSet:
    return ShardSet.open("l96")


def test_every_structure_is_tested_exactly_once_per_repeat(l96):
    seen_by_repeat = []
    for repeat in range(KFOLD.repeats):
        tested = np.concatenate(
            [make_split(l96, size=None, seed=repeat, config=KFOLD, fold=f, repeat=repeat).test for f in range(5)]
        )
        assert len(tested) == len(l96) == 95 and len(set(tested.tolist())) == 95  # once each
        sizes = np.bincount(fold_of(l96, KFOLD, repeat))
        assert sizes.max() - sizes.min() <= 1  # balanced: 19 each
        seen_by_repeat.append(fold_of(l96, KFOLD, repeat))
    assert not np.array_equal(seen_by_repeat[0], seen_by_repeat[1])  # repeats re-partition
    np.testing.assert_array_equal(fold_of(l96, KFOLD, 0), fold_of(ShardSet.open("l96"), KFOLD, 0))  # stable


def test_a_fold_split_keeps_test_train_and_validation_apart(l96):
    s = make_split(l96, size=None, seed=1, config=KFOLD, fold=2, repeat=1)
    parts = [set(s.train.tolist()), set(s.val.tolist()), set(s.test.tolist())]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert len(s.test) == 19 and len(s.train) + len(s.val) == 76 and len(s.val) == round(0.2 * 76)
    with pytest.raises(ConfigError, match="needs fold and repeat"):
        make_split(l96, size=None, seed=0, config=KFOLD)
    with pytest.raises(ConfigError, match="fold=5 must be between 0 and 4"):
        make_split(l96, size=None, seed=0, config=KFOLD, fold=5, repeat=0)
    with pytest.raises(ConfigError, match="not kfold"):
        make_split(l96, size=None, seed=0, fold=0, repeat=0)


def test_a_k_folded_dataset_is_held_out_whole(l96):
    """Every structure of a k-folded set is a test structure once: earlier stages keep out all its formulas."""
    assert splits.test_formulas(l96, KFOLD) == set(l96.formulas)
    assert len(splits.test_formulas(l96, SplitConfig())) < len(set(l96.formulas))
    inputs = resolve_inputs(["hh143"], holdout={"l96": KFOLD}, graph=l96.graph, split=SplitConfig())
    assert inputs.holdout_formulas() == frozenset(l96.formulas)
    hh143 = inputs.open_shards("hh143")
    pool = training_pool(hh143, exclude_formulas=inputs.holdout_formulas())
    assert len(pool) > 0 and not {hh143.formulas[i] for i in pool} & set(l96.formulas)


def _relabelled_home(tmp_path, test_ids: set[str], factor: float):
    """A data home whose L96 file gives the structures ``test_ids`` other targets (same ids, same structures)."""
    home = tmp_path / "home"
    shutil.copytree(DATA_HOME / "ltc_paraisite", home / "ltc_paraisite")
    (home / "SOURCES.md").write_text("copy\n")
    path = home / "ltc_paraisite" / "paraisite_Dataset1.json.gz"
    rows = read_json_gz(path)
    for row in rows:
        if str(row["mpd_id"]) in test_ids:
            row["TC"] = float(row["TC"]) * factor
    write_json_gz(path, rows)
    return home


def test_the_test_fold_never_reaches_its_own_models_selection(tmp_path, l96):
    """Change every target of one test fold by 5x: the run picks the same epoch with the same validation losses and
    predicts the same; only its test metrics change. Selection cannot have looked at the fold. (Not more: L96 tops
    1,769 W/(m K), and a kappa above 10,000 is a rejected row.)"""
    fold, repeat = 3, 1
    stage = RunConfig(datasets=("l96",), model="cgcnn", model_config=TINY, seed=repeat, split=KFOLD, fold=fold,
                      repeat=repeat, train=TrainConfig(epochs=6, batch_size=16, seed=repeat))  # fmt: skip
    test = make_split(l96, size=None, seed=repeat, config=KFOLD, fold=fold, repeat=repeat).test
    test_ids = {l96.ids[i] for i in test}
    runs = {}
    for name, factor in (("orig", 1.0), ("relabelled", 5.0)):
        home = _relabelled_home(tmp_path / name, test_ids, factor)
        inputs = resolve_inputs(["l96"], graph=GraphConfig(), split=KFOLD, home=home, cache=tmp_path / name / "c")
        metrics = train_run(stage, tmp_path / name / "out", inputs=inputs)
        preds = pd.read_parquet(tmp_path / name / "out" / "predictions.parquet")
        runs[name] = (metrics, preds)
    (a, pa), (b, pb) = runs["orig"], runs["relabelled"]
    assert set(pa[pa.split == "test"].id) == test_ids  # the fold is the test set
    assert a["best_epoch"] == b["best_epoch"] and a["val_loss"] == b["val_loss"] and a["val_mae"] == b["val_mae"]
    np.testing.assert_array_equal(pa.y_pred.to_numpy(), pb.y_pred.to_numpy())  # same model
    assert b["test_mae"] > 3 * a["test_mae"]  # … which the changed fold does see, at test time only


def test_train_kfold_pools_out_of_fold_predictions(tmp_path):
    stage = RunConfig(datasets=("l96",), model="cgcnn", model_config=TINY, split=SplitConfig(test="kfold", folds=3,
                      repeats=2), train=TrainConfig(epochs=2, batch_size=16))  # fmt: skip
    assert [(r.repeat, r.fold, r.seed) for r in fold_runs(stage)] == [(0, 0, 0), (0, 1, 0), (0, 2, 0),
                                                                       (1, 0, 1), (1, 1, 1), (1, 2, 1)]  # fmt: skip
    cv = train_kfold(stage, tmp_path)
    oof = pd.read_parquet(tmp_path / "oof_predictions.parquet")
    assert len(oof) == 2 * 95 and oof.groupby("repeat").id.nunique().tolist() == [95, 95]
    res = cv["datasets"]["l96"]
    assert [r["n"] for r in res["repeats"]] == [95, 95]
    r0 = oof[oof.repeat == 0]
    from ltc.targets import regression_metrics

    expected = regression_metrics(r0.y_true.to_numpy(), r0.y_pred.to_numpy(), kappa=True)["mae_log10"]
    assert res["repeats"][0]["mae_log10"] == pytest.approx(expected)
    assert res["mae_log10_mean"] == pytest.approx(np.mean([r["mae_log10"] for r in res["repeats"]]))
    assert sorted(p.parent.name for p in tmp_path.glob("r*f*/checkpoint.pt")) == [
        f"r{r}f{f}" for r in range(2) for f in range(3)
    ]


def test_two_graph_kinds_of_one_stage_get_the_same_folds_and_test_sets(data_home, shared_cache):
    # chgnet graphs of 3 Å reject the l96 structures with an atom alone within 3 Å (15 of 95); cgcnn's keep all.
    # A stage training both is paired only if every fold, test set and training subset is the same structures.
    from ltc.inputs import resolve_inputs_by_graph
    from ltc.train import DEFAULT_GRAPHS

    knn, sparse = DEFAULT_GRAPHS["cgcnn"], GraphConfig(cutoff=3.0, construction="chgnet", bond_cutoff=2.0)
    kfold = SplitConfig(test="kfold", folds=5, repeats=2, val_fraction=0.2)
    for split in (kfold, SplitConfig()):
        both = resolve_inputs_by_graph(["l96"], graphs=[knn, sparse], split=split, home=data_home, cache=shared_cache)
        shards = {g: both[g].open_shards("l96") for g in (knn, sparse)}
        ids = {g: both[g].split_ids("l96") for g in (knn, sparse)}
        assert len(shards[knn]) == 95 and len(shards[sparse]) == 80  # really different structures
        units = [(f, r) for r in range(2) for f in range(5)] if split.kfold else [(None, None)]
        tested: dict[GraphConfig, list[str]] = {knn: [], sparse: []}
        for fold, repeat in units:
            split_of = {
                g: make_split(shards[g], size=40, seed=3, config=split, ids=ids[g], fold=fold, repeat=repeat)
                for g in (knn, sparse)
            }
            for part in ("test", "train", "val"):
                names = [sorted(shards[g].ids[i] for i in getattr(split_of[g], part)) for g in (knn, sparse)]
                assert names[0] == names[1], (split.test, fold, repeat, part)
            tested[knn] += [shards[knn].ids[i] for i in split_of[knn].test]
        if split.kfold:  # every structure both kinds have is tested once per repeat, the rejected ones by none
            assert sorted(tested[knn]) == sorted(2 * shards[sparse].ids)
    # one graph kind alone: split files and folds as they always were
    (alone,) = resolve_inputs_by_graph(["l96"], graphs=[knn], split=kfold, home=data_home, cache=shared_cache).values()
    plain = resolve_inputs(["l96"], graph=knn, split=kfold, home=data_home, cache=shared_cache)
    assert alone == plain and alone.split_ids("l96").universe is None
    np.testing.assert_array_equal(fold_of(alone.open_shards("l96"), kfold, 0), fold_of(ShardSet.open("l96"), kfold, 0))


# --- Matbench's official folds ------------------------------------------------------------------------------------

MATBENCH = SplitConfig(test="matbench", val_fraction=0.2)


def test_matbench_folds_are_the_official_files(data_home):
    """ph's folds are read from Matbench v0.1's file: mb-phonons-NNNN is row NNNN - 1 of the task's table."""
    from ltc import datasets

    folds = datasets.matbench_folds("ph")
    raw = read_json_gz(DATA_HOME / "matbench_phonons" / "matbench_v0.1_folds_matbench_phonons.json.gz")
    assert [len(f) for f in folds] == [len(raw["test_ids_per_fold"][f"fold_{k}"]) for k in range(5)] == [253] * 5
    assert folds[0][0] == str(int(raw["test_ids_per_fold"]["fold_0"][0].rsplit("-", 1)[1]) - 1)
    every = [i for f in folds for i in f]
    assert len(set(every)) == 1265 and set(every) == {r.id for r in datasets.read("ph").records}
    with pytest.raises(ConfigError, match="'l96' is not a Matbench task; those with official folds: bg, fe, gv, ph"):
        datasets.matbench_folds("l96")


def test_a_matbench_split_tests_each_official_fold_once(data_home):
    ph = ShardSet.open("ph")
    ids = splits.resolve_split_ids("ph", MATBENCH)
    folds = fold_of(ph, MATBENCH, 0, ids)
    for k, official in enumerate(ids.matbench_folds):
        s = make_split(ph, size=None, seed=0, config=MATBENCH, fold=k, repeat=0, ids=ids)
        assert sorted(ph.ids[i] for i in s.test) == sorted(official)  # the leaderboard's test fold, whole
        assert not set(s.test) & set(s.train) and not set(s.test) & set(s.val)
        assert len(s.val) == round(0.2 * (len(ph) - len(official)))  # selection on the training folds only
        assert (folds[s.test] == k).all()
    with pytest.raises(ConfigError, match=r"Matbench v0\.1's 5 official folds, one repeat: got folds=3"):
        SplitConfig(test="matbench", folds=3)
    # a local copy that lacks structures of the task would not be the leaderboard's folds
    partial = splits.SplitIds("ph", matbench_folds=(*ids.matbench_folds[:4], (*ids.matbench_folds[4], "999999")))
    with pytest.raises(ConfigError, match="ph: 1 of the 1,266 structures of its Matbench task are not in the local"):
        fold_of(ph, MATBENCH, 0, partial)
    assert splits.SplitIds.from_dict(ids.to_dict()) == ids  # what a trial reads back


def test_train_on_matbench_folds_reports_the_leaderboard_form(tmp_path, capsys, data_home):
    """`ltc train --split matbench` tests each official fold once; cv.json and the console give each fold's MAE,
    mean ± np.std over the 5 folds (Matbench's form), and a report's K-fold cell shows the same number."""
    import json

    from ltc import compare
    from ltc.cli import main
    from ltc.results import read_predictions

    out = tmp_path / "mb"
    args = ["train", "--dataset", "ph", "--model", "cgcnn", "--model-config", "hidden=8", "n_blocks=1", "fc_dim=8"]
    assert main([*args, "--split", "matbench", "--size", "60", "--epochs", "1", "--out", str(out), "-q"]) == 0
    res = json.loads((out / "cv.json").read_text())["datasets"]["ph"]
    folds = res["folds"]
    assert [(f["fold"], f["n"]) for f in folds] == [(k, 253) for k in range(5)]  # every official fold, whole
    maes = [json.loads((out / f"r0f{k}" / "metrics.json").read_text())["test_mae"] for k in range(5)]
    assert [f["mae"] for f in folds] == pytest.approx(maes)
    assert res["per_fold"]["mae"] == pytest.approx({"mean": np.mean(maes), "std": np.std(maes)})
    printed = capsys.readouterr().out
    assert f"ph: MAE per fold, mean ± std over 5 folds (np.std, Matbench's form): {np.mean(maes):.4g} ± " in printed
    rows = pd.DataFrame(
        {"ft_dataset": "ph", "fold": float(k), "repeat": 0.0, "n_folds": 5.0, "split": "matbench", "test_mae": mae,
         "checkpoint": str(out / f"r0f{k}" / "checkpoint.pt")}
        for k, mae in enumerate(maes)
    )  # fmt: skip
    shown = compare.cell_metrics(rows, read_predictions)
    assert shown[compare.MATBENCH_COLUMN] == compare.fmt_pm(np.mean(maes), np.std(maes))
    assert compare.MATBENCH_COLUMN not in compare.cell_metrics(rows.assign(split="kfold"), read_predictions)


def test_small_sets_validate_on_at_least_val_min_structures_up_to_a_fifth():
    # FT 100 at 10 %: 20 (not 10); FT 800: 10 % (80); a 50-structure set: a fifth (10); tiny sets: at least 1
    default = SplitConfig()
    assert [splits.val_count(n, default) for n in (0, 1, 2, 9, 50, 100, 200, 800, 941)] == [
        0,
        0,
        1,
        1,
        10,
        20,
        20,
        80,
        94,
    ]
    # a user's larger share is kept; val_min is theirs to lower
    assert splits.val_count(100, SplitConfig(val_fraction=0.3)) == 30
    assert splits.val_count(100, SplitConfig(val_min=5)) == 10
    assert splits.val_count(2, SplitConfig(val_fraction=0.9)) == 1  # one structure is always left to train
    with pytest.raises(ConfigError, match="val_min=0"):
        SplitConfig(val_min=0)
