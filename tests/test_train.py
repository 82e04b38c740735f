from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_task
from test_models import SMALL

from ltc.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from ltc.models import build_model
from ltc.shards import ShardSet
from ltc.splits import make_split
from ltc.targets import TargetScaler, regression_metrics
from ltc.train import RunConfig, Task, TrainConfig, fit, run_inputs, train_run

TINY = TrainConfig(epochs=3, batch_size=16, lr=3e-3)


# --- targets and metrics ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["minmax", "standardize", "log10p1", "log10p1+standardize", "none"])
def test_scaler_round_trips(kind):
    y = np.array([0.5, 2.0, 17.0, 1500.0])
    s = TargetScaler.fit(kind, y)
    np.testing.assert_allclose(s.inverse(s.transform(y)), y, rtol=1e-12)
    assert TargetScaler.from_dict(s.to_dict()) == s


def test_scaler_values():
    y = np.array([2.0, 4.0, 10.0])
    np.testing.assert_allclose(TargetScaler.fit("minmax", y).transform(y), [-1.0, -0.5, 1.0])
    z = TargetScaler.fit("standardize", y).transform(y)
    assert z.mean() == pytest.approx(0) and z.std() == pytest.approx(1)
    k = TargetScaler.fit("log10p1+standardize", np.array([0.0, 9.0, 99.0]))
    np.testing.assert_allclose(k.transform(np.array([0.0, 9.0, 99.0])), [-1.22474487, 0, 1.22474487])
    assert TargetScaler.fit("minmax", np.array([3.0, 3.0])).scale == 1.0  # constant target
    with pytest.raises(ValueError, match="log10p1 needs targets > -1; the training split has min -2"):
        TargetScaler.fit("log10p1", np.array([-2.0, 1.0]))
    with pytest.raises(ValueError, match="not one of"):
        TargetScaler.fit("log", y)


def test_metrics_by_hand():
    t = np.array([1.0, 2.0, 4.0, 0.0])
    p = np.array([1.5, 1.0, 4.0, 0.5])
    m = regression_metrics(t, p, kappa=True)
    assert m["mae"] == pytest.approx((0.5 + 1 + 0 + 0.5) / 4)
    assert m["rmse"] == pytest.approx(np.sqrt((0.25 + 1 + 0 + 0.25) / 4))
    assert m["r2"] == pytest.approx(1 - 1.5 / ((t - t.mean()) ** 2).sum())
    assert m["mape"] == pytest.approx(100 * (0.5 + 0.5 + 0) / 3)  # the zero target is skipped
    expected = np.mean(np.abs(np.log10([1.5, 1.0, 4.0]) - np.log10([1.0, 2.0, 4.0])))
    assert m["mae_log10"] == pytest.approx(expected)
    assert regression_metrics(np.array([]), np.array([]))["mae"] is None
    assert regression_metrics(np.ones(3), np.ones(3))["r2"] is None  # constant truth: R² undefined


# --- splits ----------------------------------------------------------------------------------------


def test_test_set_is_fixed_and_subsets_vary_with_seed():
    shards = ShardSet.open("dc")
    a, b = make_split(shards, size=100, seed=1), make_split(shards, size=100, seed=2)
    assert np.array_equal(a.test, b.test) and len(a.test) == 106  # ceil(10% of 1056)
    assert len(a.train) == 80 and len(a.val) == 20  # val_min: 20 validate, not 10 % (splits.val_count)
    assert not np.array_equal(np.sort(np.r_[a.train, a.val]), np.sort(np.r_[b.train, b.val]))
    for s in (a, b):
        assert not set(s.test) & set(s.train) and not set(s.test) & set(s.val) and not set(s.train) & set(s.val)
    again = make_split(shards, size=100, seed=1)
    assert np.array_equal(again.train, a.train) and np.array_equal(again.val, a.val)
    # a larger subset of the same seed contains the smaller one
    big = make_split(shards, size=500, seed=1)
    assert set(a.train) | set(a.val) <= set(big.train) | set(big.val)


def test_test_set_does_not_depend_on_graph_settings():
    ids = ShardSet.open("l96").ids
    other = ShardSet.open("l96", graph=__import__("ltc.graphs", fromlist=["GraphConfig"]).GraphConfig(cutoff=4.0))
    t1 = {ids[i] for i in make_split(ShardSet.open("l96"), size=None, seed=0).test}
    t2 = {other.ids[i] for i in make_split(other, size=None, seed=0).test}
    assert t2 <= t1 and len(t1 - t2) == len(set(other.rejected_ids) & t1)


def test_paper_split_uses_devi_files():
    from ltc.datasets import devi_test_ids, devi_trial_ids
    from ltc.splits import SplitConfig

    shards = ShardSet.open("pz")
    s = make_split(shards, size=100, seed=2, config=SplitConfig(test="paper"))
    ids = shards.ids
    assert {ids[i] for i in s.test} == set(devi_test_ids("pz"))
    assert {ids[i] for i in np.r_[s.train, s.val]} == set(devi_trial_ids("pz", trial=2, size=100))
    assert len(s.val) == 20  # val_min


def test_paper_or_seeded_falls_back_per_dataset():
    from ltc.datasets import DatasetNotFoundError, devi_test_ids
    from ltc.splits import SplitConfig

    both = SplitConfig(test="paper_or_seeded")
    j = ShardSet.open("jarvis2d")  # Devi's test file, but no trial subsets: a seeded draw of 800
    s = make_split(j, size=800, seed=1, config=both)
    assert len(s.train) + len(s.val) == 800 and {j.ids[i] for i in s.test} == set(devi_test_ids("jarvis2d"))
    with pytest.raises(DatasetNotFoundError, match="jarvis2d_trial1_800"):
        make_split(j, size=800, seed=1, config=SplitConfig(test="paper"))
    bg = ShardSet.open("bg")  # no Devi test file: seeded test set, and then a seeded subset outside it
    s = make_split(bg, size=800, seed=1, config=both)
    assert len(s.train) + len(s.val) == 800 and len(s.test) == 940
    assert not set(s.test) & (set(s.train) | set(s.val))


def test_split_errors_and_holdout():
    shards = ShardSet.open("l96")
    with pytest.raises(ValueError, match="size=90 but l96 has only 85 structures outside its test set"):
        make_split(shards, size=90, seed=0)
    with pytest.raises(ValueError, match="size=1 must be an integer >= 2"):
        make_split(shards, size=1, seed=0)
    formulas = shards.formulas
    banned = {formulas[0], formulas[1], formulas[2]}
    s = make_split(shards, size=None, seed=0, exclude_formulas=banned)
    assert not {formulas[i] for i in np.r_[s.train, s.val]} & banned


# --- fit --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ph_task() -> Task:
    return make_task("ph", size=80, seed=0)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_same_numbers(ph_task):
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("cgcnn", SMALL["cgcnn"])
        r = fit(model, [ph_task], TINY)
        results.append((r.history, _state(model)))
    assert [h["val_loss"] for h in results[0][0]] == [h["val_loss"] for h in results[1][0]]
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])


def test_resume_continues_exactly(ph_task):
    config = TrainConfig(epochs=4, batch_size=16, lr=3e-3)
    torch.manual_seed(0)
    straight = build_model("cgcnn", SMALL["cgcnn"])
    full = fit(straight, [ph_task], config)

    torch.manual_seed(0)
    first = build_model("cgcnn", SMALL["cgcnn"])
    saved = {}

    def stop_after_two(record, state):
        if record["epoch"] == 1:
            saved.update(state())
            return True
        return None

    part = fit(first, [ph_task], config, on_epoch=stop_after_two)
    assert part.epochs_run == 2 and part.stopped_early
    # through a real checkpoint file, as a Ray trial restoring after a crash
    torch.save(saved, ph_task.shards.path.parent / "resume-test.pt")
    state = torch.load(ph_task.shards.path.parent / "resume-test.pt", weights_only=True)
    resumed_model = build_model("cgcnn", SMALL["cgcnn"])  # fresh weights: the state brings them
    resumed = fit(resumed_model, [ph_task], config, resume=state)
    assert resumed.epochs_run == 4
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in full.history]
    assert all(
        torch.equal(a, b)
        for a, b in zip(straight.state_dict().values(), resumed_model.state_dict().values(), strict=True)
    )
    assert saved["select"] == full.select_by == resumed.select_by == "r2"  # the run goes on as it began
    # a state written before select_by existed held the loss's best: the run keeps selecting by the loss
    old = {k: v for k, v in state.items() if k != "select"}
    again = fit(build_model("cgcnn", SMALL["cgcnn"]), [ph_task], config, resume=old)
    assert again.select_by == "loss" and again.best_val_score == again.best_val_loss


def test_early_stopping_and_best_epoch(ph_task):
    from ltc.transfer import freeze

    torch.manual_seed(0)
    model = build_model("cgcnn", SMALL["cgcnn"])
    # only the last layer trains (so no BatchNorm statistics move either), at a learning rate too small to
    # improve anything: patience runs out after the first epoch
    freeze(model, strategy="last_layer")
    r = fit(model, [ph_task], TrainConfig(epochs=50, batch_size=16, lr=1e-12, schedule="constant", patience=3))
    assert r.stopped_early and r.epochs_run == 4 and r.best_epoch == 0


def test_one_atom_batches_are_counted_not_fatal():
    from ltc.splits import Split

    shards = ShardSet.open("jarvis2d")
    single = np.flatnonzero(shards.num_nodes == 1)
    assert len(single) == 5  # 2D cells of one atom
    others = np.flatnonzero(shards.num_nodes > 1)
    split = Split(train=np.r_[single, others[:10]], val=others[10:15], test=others[15:20])
    task = Task("jarvis2d", shards, split, TargetScaler.fit("minmax", shards.y[split.train]))
    torch.manual_seed(0)
    r = fit(build_model("cgcnn", SMALL["cgcnn"]), [task], TrainConfig(epochs=2, batch_size=1))
    from ltc.train import _epoch_plan

    one_atom_batches = sum(
        int(shards.num_nodes[idx].sum() < 2) for e in range(2) for _, idx in _epoch_plan([task], 1, 0, e)
    )
    assert one_atom_batches >= 8  # each epoch: 5, unless the last batch was merged into the one before
    assert r.skipped_batches == one_atom_batches  # BatchNorm cannot train on one atom: skipped, counted
    assert np.isfinite(r.history[-1]["train_loss"])  # the other batches trained


# --- train_run, checkpoints ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pt")
    stage = RunConfig(datasets=("ph",), model="cgcnn", model_config=SMALL["cgcnn"], max_size=200, train=TINY)
    return out, train_run(stage, out)


def test_run_stage_writes_metrics_checkpoint_predictions(pt_run):
    out, m = pt_run
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("test_mae", "test_rmse", "test_r2", "test_mape", "val_mae", "epochs_run", "train_seconds",
                "params_total", "params_trainable", "n_train", "n_val", "n_test"):  # fmt: skip
        assert key in saved, key
    assert saved["n_train"] + saved["n_val"] == 200 and saved["n_test"] == 127
    assert saved["params_trainable"] == saved["params_total"] == m["params_total"]
    assert len(saved["history"]) == 3
    ckpt = load_checkpoint(out / "checkpoint.pt", model="cgcnn")
    assert ckpt["targets"][0]["dataset"] == "ph" and ckpt["targets"][0]["scaler"]["kind"] == "minmax"
    assert ckpt["history"][0]["datasets"] == ["ph"]
    assert ckpt["graph"] == {"cutoff": 8.0, "max_neighbors": 12, "construction": "knn"}
    preds = pq.read_table(out / "predictions.parquet").to_pandas()
    assert (preds["split"] == "test").sum() == 127 and (preds["split"] == "val").sum() == saved["n_val"]
    test = preds[preds.split == "test"]
    assert np.mean(np.abs(test.y_pred - test.y_true)) == pytest.approx(saved["test_mae"])


def test_checkpoint_errors(pt_run, tmp_path):
    out, _ = pt_run
    with pytest.raises(CheckpointError, match="holds a cgcnn model, not alignn"):
        load_checkpoint(out / "checkpoint.pt", model="alignn")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((out / "checkpoint.pt").read_bytes()[:500])
    with pytest.raises(CheckpointError, match="damaged or not a checkpoint"):
        load_checkpoint(damaged)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": build_model("cgcnn").state_dict()}, foreign)
    with pytest.raises(CheckpointError, match="is not an ltc checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    # a pickle with code in it is refused by weights_only loading
    evil = tmp_path / "evil.pt"
    torch.save({"format": "ltc-checkpoint", "x": np.random.default_rng(0)}, evil)
    with pytest.raises(CheckpointError, match=r"not an ltc checkpoint: it holds pickled Python objects \(numpy"):
        load_checkpoint(evil)
    stage = RunConfig(datasets=("l96",), model="megnet", init=str(out / "checkpoint.pt"), train=TINY)
    with pytest.raises(CheckpointError, match="holds a cgcnn model, not megnet"):
        train_run(stage, tmp_path / "x")


def test_save_is_atomic(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"model": {"name": "cgcnn"}})
    assert path.is_file() and not list(tmp_path.glob(".*tmp"))


def test_three_stage_chain_keeps_history(pt_run, tmp_path):
    out, _ = pt_run
    ft1 = train_run(
        RunConfig(
            datasets=("dc",), init=str(out / "checkpoint.pt"), size=100, strategy="blocks", n_unfrozen=1, train=TINY
        ),
        tmp_path / "ft1",
    )
    assert ft1["params_trainable"] < ft1["params_total"]
    ft2 = train_run(
        RunConfig(datasets=("l96",), init=str(tmp_path / "ft1/checkpoint.pt"), size=40, seed=3, train=TINY),
        tmp_path / "ft2",
    )
    ckpt = load_checkpoint(tmp_path / "ft2/checkpoint.pt")
    assert [h["datasets"] for h in ckpt["history"]] == [["ph"], ["dc"], ["l96"]]
    assert ckpt["history"][1]["n_unfrozen"] == 1 and ckpt["history"][2]["seed"] == 3
    assert ckpt["targets"][0]["kappa"] and "test_mae_log10" in ft2
    # the kappa target was rescaled on l96's own training split, not kept from dc
    assert ckpt["targets"][0]["scaler"]["kind"] == "log10p1+standardize"


def test_multi_property_pretraining_then_new_property(tmp_path):
    mpt = train_run(
        RunConfig(datasets=("ph", "dc"), model="cgcnn", model_config=SMALL["cgcnn"], max_size=150, train=TINY),
        tmp_path / "mpt",
    )
    for name in ("ph", "dc"):
        assert mpt[f"{name}/test_mae"] is not None and mpt[f"{name}/n_train"] > 0
    ckpt = load_checkpoint(tmp_path / "mpt/checkpoint.pt")
    assert ckpt["model"]["config"]["n_targets"] == 2 and [t["dataset"] for t in ckpt["targets"]] == ["ph", "dc"]
    ft = train_run(
        RunConfig(datasets=("jarvis2d",), init=str(tmp_path / "mpt/checkpoint.pt"), size=100, train=TINY),
        tmp_path / "ft",
    )
    assert ft["test_r2"] is not None
    assert load_checkpoint(tmp_path / "ft/checkpoint.pt")["model"]["config"]["n_targets"] == 1


def test_fine_tuning_is_reproducible_whatever_ran_before(pt_run, tmp_path):
    out, _ = pt_run
    stage = RunConfig(datasets=("dc",), init=str(out / "checkpoint.pt"), size=40, head="new", train=TINY)
    first = train_run(stage, tmp_path / "a")
    torch.rand(1000)  # another trial in the same worker would move the global RNG
    second = train_run(stage, tmp_path / "b")
    assert first["test_mae"] == second["test_mae"]


def test_stage_config_errors():
    with pytest.raises(ValueError, match="name a model"):
        RunConfig(datasets=("ph",))
    with pytest.raises(ValueError, match="need a checkpoint to start from"):
        RunConfig(datasets=("ph",), model="cgcnn", strategy="last_layer")
    with pytest.raises(ValueError, match="unknown dataset 'kappa'"):  # when its inputs are resolved
        run_inputs(RunConfig(datasets=("kappa",), model="cgcnn"))
    with pytest.raises(ValueError, match="dataset name 'data/kappa': use letters"):  # a trial knows no declarations
        RunConfig(datasets=("data/kappa",), model="cgcnn")
    with pytest.raises(ValueError, match="names a dataset twice"):
        RunConfig(datasets=("ph", "ph"), model="cgcnn")
    with pytest.raises(ValueError, match="batch_size=0 must be an integer >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="loss='huber'"):
        TrainConfig(loss="huber")


# --- where a fresh head starts ------------------------------------------------------------------------------------


def _head_biases(path) -> list[float]:
    state = load_checkpoint(path)["state_dict"]
    return [float(v) for k, v in sorted(state.items()) if k.startswith("heads.") and k.endswith(".out.bias")]


def test_fresh_heads_start_at_the_mean_of_the_scaled_training_targets(tmp_path, pt_run):
    """Fresh models (every head, one per property) and new heads of a fine-tune start with their output bias at the
    mean of their task's scaled training targets; a kept head keeps its trained bias. Trained at lr 1e-12 for one
    epoch, a run's checkpoint shows where its heads started."""
    from ltc.train import start_heads_at_mean

    tasks = [make_task("ph", size=80, seed=0), make_task("dc", size=80, seed=0)]
    model = build_model("cgcnn", {**SMALL["cgcnn"], "n_targets": 2})
    start_heads_at_mean(model, tasks)
    means = [float(t.y_scaled[t.split.train].mean()) for t in tasks]
    assert means[0] < -0.5  # phonons min-max scaled sit far from 0, where a head would start without this
    assert [float(h.out.bias) for h in model.heads] == pytest.approx(means, abs=1e-7)

    still = TrainConfig(epochs=1, batch_size=64, lr=1e-12, schedule="constant")
    train_run(RunConfig(datasets=("ph",), model="cgcnn", model_config=SMALL["cgcnn"], size=80, train=still),
              tmp_path / "fresh")  # fmt: skip
    shards = ShardSet.open("ph")
    split = make_split(shards, size=80, seed=0)  # the run's split: seeded test set, 80 drawn for seed 0
    mean = float(TargetScaler.fit("minmax", shards.y[split.train]).transform(shards.y[split.train]).mean())
    assert _head_biases(tmp_path / "fresh" / "checkpoint.pt") == pytest.approx([mean], abs=1e-6)

    pt_out, _ = pt_run
    trained = _head_biases(pt_out / "checkpoint.pt")
    for head, same in (("keep", True), ("new", False)):
        ft = RunConfig(datasets=("ph",), init=str(pt_out / "checkpoint.pt"), size=60, head=head, train=still, seed=1)
        train_run(ft, tmp_path / head)
        got = _head_biases(tmp_path / head / "checkpoint.pt")
        assert (got == pytest.approx(trained, abs=1e-6)) == same, (head, got, trained)


# --- the epoch kept is picked by the metric that judges ---------------------------------------------------------


CHOICES = [("ph", None, "r2"), ("ph", "mae", "mae"), ("l96", None, "mae_log10"), ("ph", "loss", None)]


@pytest.mark.parametrize(("dataset", "select_by", "metric"), CHOICES)
def test_the_kept_epoch_has_the_best_validation_score(tmp_path, dataset, select_by, metric):
    """The kept epoch is the argmin of the validation score over the epochs, and that score is the kept model's
    validation metric (raw units; 1 - R²; log10 for kappa): selection and report measure the same thing."""
    train = TrainConfig(epochs=6, batch_size=16, lr=3e-3, select_by=select_by)
    stage = RunConfig(datasets=(dataset,), model="cgcnn", model_config=SMALL["cgcnn"], max_size=120, train=train)
    train_run(stage, tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())  # with each epoch's record
    scores = [h["val_score"] for h in m["history"]]
    assert m["select_by"] == (select_by or metric)
    assert m["best_epoch"] == int(np.argmin(scores)) and m["val_score"] == pytest.approx(min(scores))
    assert m["val_loss"] == pytest.approx(m["history"][m["best_epoch"]]["val_loss"])
    if metric is None:  # the loss: the scaled validation MSE itself
        assert scores == pytest.approx([h["val_loss"] for h in m["history"]])
    else:
        kept = 1 - m["val_r2"] if metric == "r2" else m[f"val_{metric}"]
        assert m["val_score"] == pytest.approx(kept, rel=1e-5)


def test_select_by_errors_name_the_value():
    with pytest.raises(ValueError, match=r"select_by='mse' must be one of \('loss', 'mae', 'mae_log10', 'r2'\)"):
        TrainConfig(select_by="mse")
    from ltc.train import selection

    ph, dc = make_task("ph", size=50, seed=0), make_task("dc", size=50, seed=0)  # 10 validate each
    assert selection(None, [ph, dc]) == "loss" and selection(None, [ph]) == "r2"
    with pytest.raises(ValueError, match=r"select_by='mae' needs one dataset per run; ph\+dc train together: use loss"):
        selection("mae", [ph, dc])
    with pytest.raises(ValueError, match="select_by='mae_log10' is for kappa datasets; ph is not one"):
        selection("mae_log10", [ph])
    tiny = make_task("ph", size=9, seed=0)  # one validation structure (a fifth of 9 is 1), where R² is undefined
    assert len(tiny.split.val) == 1 and selection(None, [tiny]) == "mae" and selection("r2", [tiny]) == "mae"
    few = make_task("ph", size=45, seed=0)  # 9 validate: R² would be one point's
    assert len(few.split.val) == 9 and selection(None, [few]) == "mae" and len(ph.split.val) == 10
