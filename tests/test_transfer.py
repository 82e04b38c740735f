from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_only_live_trained, live_parameters, make_task
from test_models import SMALL

from ltc.models import build_model
from ltc.train import Task, TrainConfig, _make_optimizer, fit
from ltc.transfer import NEW_HEAD_HIDDEN, freeze, model_from_checkpoint, replace_heads, trainable_modules


@pytest.fixture(scope="module")
def task() -> Task:
    return make_task("ph", size=48, seed=1)


def _snapshot(model):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if "running" in n}
    return params, buffers


CASES = [
    ("cgcnn", "blocks", 0),
    ("cgcnn", "blocks", 2),
    ("cgcnn", "last_layer", None),
    ("cgcnn", "new_head", None),
    ("cgcnn", "two_body", None),
    ("megnet", "blocks", 1),
    ("megnet", "last_layer", None),
    ("alignn", "blocks", 1),
    ("alignn", "blocks", 3),
    ("alignn", "two_body", None),
    ("alignn", "three_body", None),
    ("alignn", "new_head", None),
]


@pytest.mark.parametrize(("name", "strategy", "k"), CASES)
def test_frozen_parameters_stay_bit_identical_and_trainable_ones_move(task, name, strategy, k):
    torch.manual_seed(0)
    model = build_model(name, SMALL[name])
    if strategy == "new_head":
        replace_heads(model, 1, hidden=NEW_HEAD_HIDDEN, activation="none")
    freeze(model, strategy=strategy, n_unfrozen=k)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        n
        for m in trainable_modules(model, strategy, k)
        for n, p in model.named_parameters()
        if any(p is q for q in m.parameters())
    }
    assert trainable == expected and trainable
    assert len(trainable) < len(list(model.parameters()))

    opt, _ = _make_optimizer(model, TrainConfig(), 1)
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for n, p in model.named_parameters() if n in trainable}  # no frozen param in it

    # parameters with a gradient path (ALIGNN's last layer updates bonds that nothing reads afterwards)
    live = live_parameters(model, task.shards.batch(task.split.train[:16]))
    assert live <= trainable and len(live) > len(trainable) // 2

    params, buffers = _snapshot(model)
    fit(model, [task], TrainConfig(epochs=2, batch_size=16, lr=1e-2, schedule="constant"))
    assert_only_live_trained(model, params, live)
    # BatchNorm statistics of frozen parts are frozen too; those of trained parts move
    frozen_bn = [n for n in buffers if n.rsplit(".", 1)[0] + ".weight" not in trainable]
    for n in frozen_bn:
        assert torch.equal(dict(model.named_buffers())[n], buffers[n]), f"{n} moved in a frozen BatchNorm"
    moved = [n for n in buffers if n not in frozen_bn]
    assert all(not torch.equal(dict(model.named_buffers())[n], buffers[n]) for n in moved)


def test_strategy_parts_per_architecture():
    alignn = build_model("alignn", SMALL["alignn"])
    two = trainable_modules(alignn, "two_body")
    assert alignn.blocks[0].node_update in two and alignn.blocks[0].edge_update not in two
    assert alignn.blocks[3] in two  # a GCN layer
    three = trainable_modules(alignn, "three_body")
    assert alignn.blocks[1].edge_update in three and alignn.blocks[1].node_update not in three
    assert all(h.out in three for h in alignn.heads)

    cgcnn = build_model("cgcnn", SMALL["cgcnn"])
    assert trainable_modules(cgcnn, "blocks", 0) == [cgcnn.readout, cgcnn.heads]
    everything = trainable_modules(cgcnn, "blocks", cgcnn.n_blocks)
    assert cgcnn.embedding in everything and all(b in everything for b in cgcnn.blocks)


@pytest.mark.parametrize(
    ("name", "strategy", "k", "match"),
    [
        ("cgcnn", "three_body", None, "cgcnn has no three-body"),
        ("megnet", "three_body", None, "megnet has no three-body"),
        ("cgcnn", "blocks", 4, "n_unfrozen=4 must be between 0 and 3"),
        ("cgcnn", "blocks", None, "strategy 'blocks' needs n_unfrozen"),
        ("cgcnn", "all", 1, "n_unfrozen=1 only goes with strategy 'blocks'"),
        ("cgcnn", "some", None, "strategy='some' must be one of"),
    ],
)
def test_bad_strategies_are_errors(name, strategy, k, match):
    with pytest.raises(ValueError, match=match):
        freeze(build_model(name, SMALL[name]), strategy=strategy, n_unfrozen=k)


def _ckpt(model):
    return {"model": {"name": model.name, "config": model.config.to_dict()}, "state_dict": model.state_dict()}


def test_checkpoint_heads_kept_replaced_or_new():
    torch.manual_seed(0)
    pt = build_model("cgcnn", SMALL["cgcnn"])
    kept = model_from_checkpoint(_ckpt(pt), n_targets=1)
    assert torch.equal(kept.heads[0].out.weight, pt.heads[0].out.weight)
    assert torch.equal(kept.blocks[1].conv.lin_f.weight, pt.blocks[1].conv.lin_f.weight)

    new = model_from_checkpoint(_ckpt(pt), n_targets=1, head="new")
    assert not torch.equal(new.heads[0].out.weight, pt.heads[0].out.weight)
    assert torch.equal(new.blocks[1].conv.lin_f.weight, pt.blocks[1].conv.lin_f.weight)

    devi = model_from_checkpoint(_ckpt(pt), n_targets=1, strategy="new_head")
    assert repr(devi.heads[0]) == "Head(32→64→1, activation=none)"
    assert devi.config.head_hidden == (64,) and devi.config.head_activation == "none"

    mpt = build_model("cgcnn", {**SMALL["cgcnn"], "n_targets": 7})
    ft = model_from_checkpoint(_ckpt(mpt), n_targets=1)  # a multi-property model gets a fresh head
    assert len(ft.heads) == 1 and ft.config.n_targets == 1
    with pytest.raises(ValueError, match="head='keep' needs 7 target"):
        model_from_checkpoint(_ckpt(mpt), n_targets=1, head="keep")


def test_a_replaced_head_trains_whole_under_last_layer():
    mpt = build_model("megnet", {**SMALL["megnet"], "n_targets": 3, "head_hidden": [8, 8]})
    ft = model_from_checkpoint(_ckpt(mpt), n_targets=1, strategy="last_layer")  # fresh head: random hidden layers
    freeze(ft, strategy="last_layer")
    assert all(p.requires_grad for p in ft.heads.parameters())
    assert not any(p.requires_grad for p in ft.blocks.parameters())
    kept = model_from_checkpoint(_ckpt(build_model("megnet", {**SMALL["megnet"], "head_hidden": [8]})), n_targets=1)
    freeze(kept, strategy="last_layer")  # a trained head keeps Devi's meaning: its last Linear only
    assert [n for n, p in kept.heads.named_parameters() if p.requires_grad] == ["0.out.weight", "0.out.bias"]


def test_frozen_batchnorm_stays_in_eval_mode():
    model = build_model("cgcnn", SMALL["cgcnn"])
    freeze(model, strategy="blocks", n_unfrozen=1)
    model.train()
    assert not model.blocks[0].conv.bn.training and model.blocks[-1].conv.bn.training
    model.eval()
    assert not model.blocks[-1].conv.bn.training
    freeze(model, strategy="all")
    model.train()
    assert all(b.conv.bn.training for b in model.blocks)


def test_nothing_to_train_is_an_error(task):
    model = build_model("cgcnn", SMALL["cgcnn"])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        fit(model, [task], TrainConfig(epochs=1))


def test_setting_module_requires_grad_attribute_freezes_nothing(task):
    # The pitfall Devi et al.'s code fell into: ltc never relies on it, and this shows why.
    model = build_model("cgcnn", SMALL["cgcnn"])
    model.blocks[0].requires_grad = False
    assert all(p.requires_grad for p in model.blocks[0].parameters())
    np.testing.assert_equal(len(list(model.parameters())), len([p for p in model.parameters() if p.requires_grad]))
