from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from ltc import datasets
from ltc.archs import ARCHS, model_config
from ltc.errors import ConfigError
from ltc.graphs import GraphConfig, structure_to_graph
from ltc.models import MODELS, build_model
from ltc.models.alignn import line_graph
from ltc.shards import ShardSet, collate_graphs

# Small configs keep CPU tests fast; the defaults are the papers' sizes. chgnet (pretrained, on its own graphs) is
# tested in test_chgnet.py.
SMALL = {
    "cgcnn": {"hidden": 32, "n_blocks": 3, "fc_dim": 32},
    "megnet": {"n_blocks": 2},
    "alignn": {"hidden": 32, "embedding": 16, "alignn_layers": 2, "gcn_layers": 2},
}


def test_every_model_is_tested_here_or_in_its_own_file():
    assert set(MODELS) == {*SMALL, "chgnet"}


# Configs that differ in what ltc.archs derives without building: blocks and three-body parts.
ARCH_CASES = [
    ("cgcnn", {"n_blocks": 2}),
    ("megnet", {"n_blocks": 1}),
    ("alignn", {"alignn_layers": 2, "gcn_layers": 1}),
    ("alignn", {"alignn_layers": 0, "gcn_layers": 2}),
    ("chgnet", {"n_conv": 3}),
    ("chgnet", {"n_conv": 1}),
]


@pytest.mark.parametrize(("name", "overrides"), ARCH_CASES)
def test_arch_facts_match_the_built_model(name, overrides):
    """What --dry-run and the sweep spec read from ltc.archs (no torch) is what the built model has."""
    if name == "chgnet":
        pytest.importorskip("chgnet")
    config = model_config(name, overrides)
    model = build_model(name, config)
    arch = ARCHS[name]
    assert arch.n_blocks(config) == model.n_blocks == len(model.blocks)
    assert arch.three_body(config) == bool(model.three_body_modules())
    assert arch.constructions == type(model).constructions and arch.config_class is type(model).config_class


def test_arch_config_errors_need_no_model():
    with pytest.raises(ConfigError, match="unknown model 'gcn'; known: cgcnn"):
        model_config("gcn")
    with pytest.raises(ConfigError, match=r"unknown CGCNNConfig field\(s\) \['hiden'\]"):
        model_config("cgcnn", {"hiden": 3})
    with pytest.raises(ConfigError, match="n_blocks=0 must be an integer >= 1"):
        model_config("cgcnn", {"n_blocks": 0})


@pytest.fixture(scope="module")
def ph() -> ShardSet:
    return ShardSet.open("ph")


@pytest.mark.parametrize("name", list(SMALL))
def test_output_shapes_and_repr(name, ph):
    model = build_model(name, {**SMALL[name], "n_targets": 3})
    batch = ph.batch(np.arange(10))
    out = model(batch)
    assert out.shape == (10, 3) and out.dtype == torch.float32 and torch.isfinite(out).all()
    text = repr(model)
    assert f"n_blocks={model.n_blocks}" in text and f"params={model.num_parameters():,}" in text
    assert len(model.heads) == 3 and model.heads[0].out.out_features == 1


def test_default_sizes_match_the_papers():
    alignn = build_model("alignn")
    assert alignn.n_blocks == 8 and alignn.readout_dim == 256  # 4 ALIGNN + 4 GCN layers, hidden 256
    assert 3.9e6 < alignn.num_parameters() < 4.2e6  # ALIGNN paper: ~4.0M
    megnet = build_model("megnet", {"head_hidden": [450, 350, 350]})
    assert megnet.n_blocks == 3 and megnet.readout_dim == 16
    assert repr(megnet.heads[0]) == "Head(16→450→350→350→1, activation=relu)"
    cgcnn = build_model("cgcnn")
    assert cgcnn.n_blocks == 3 and cgcnn.atom_table.shape == (101, 92)


def test_bad_configs_name_the_value():
    with pytest.raises(ValueError, match="unknown model 'schnet'"):
        build_model("schnet")
    with pytest.raises(ValueError, match="hidden=0 must be an integer >= 1"):
        build_model("cgcnn", {"hidden": 0})
    with pytest.raises(ValueError, match=r"unknown CGCNNConfig field\(s\) \['hiden'\]"):
        build_model("cgcnn", {"hiden": 32})
    with pytest.raises(ValueError, match="conv\\[-1\\]=16 must equal dense\\[-1\\]=32"):
        build_model("megnet", {"conv": [64, 16]})
    with pytest.raises(ValueError, match="head_activation='tanh'"):
        build_model("cgcnn", {"head_activation": "tanh"})


def test_reset_parameters_reinitialises(ph):
    model = build_model("cgcnn", SMALL["cgcnn"])
    before = [p.detach().clone() for p in model.parameters()]
    model.reset_parameters()
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert changed > len(before) // 2


@pytest.mark.parametrize("construction", ["knn", "jarvis"])
def test_line_graph_of_rock_salt(construction):
    # 6 nearest: the Cl octahedron closes the first shell, so both constructions give the same 48 bonds
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    config = GraphConfig(cutoff=3.0, max_neighbors=6, construction=construction)
    batch = collate_graphs([structure_to_graph(nacl, config=config)])
    # backtracking=False (ltc's "knn" line graph): each bond continues through its end atom along the 5 others
    index, cos = line_graph(batch.edge_index, batch.edge_vec, batch.z.shape[0])
    assert index.shape == (2, 48 * 5)
    assert (batch.edge_index[1, index[0]] == batch.edge_index[0, index[1]]).all()  # bonds share an atom
    values, counts = torch.unique(cos.round(decimals=5), return_counts=True)
    assert values.tolist() == [-1.0, 0.0] and counts.tolist() == [48, 192]  # 180° once, 90° four times
    # backtracking=True (DGL's line_graph(shared=True), ALIGNN's): also back along the same bond, at 0°
    index, cos = line_graph(batch.edge_index, batch.edge_vec, batch.z.shape[0], backtracking=True)
    assert index.shape == (2, 48 * 6)
    values, counts = torch.unique(cos.round(decimals=5), return_counts=True)
    assert values.tolist() == [-1.0, 0.0, 1.0] and counts.tolist() == [48, 192, 48]
    back = index[:, cos > 0.99999]
    assert (batch.edge_index[0, back[0]] == batch.edge_index[1, back[1]]).all()  # c = a


def test_alignn_consumes_the_line_graph_it_is_configured_for():
    # the same weights on the same reference graphs: keeping the a->b->a pairs changes the three-body messages
    graphs = [structure_to_graph(s, config=GraphConfig(construction="jarvis")) for s in _structures()]
    batch = collate_graphs(graphs)
    torch.manual_seed(0)
    ref = build_model("alignn", {**SMALL["alignn"], "backtracking": True})
    old = build_model("alignn", {**SMALL["alignn"], "backtracking": False})
    old.load_state_dict(ref.state_dict())
    # train mode: BatchNorm on batch statistics (in eval mode a fresh model's updates are too small to see)
    out_ref, out_old = ref(batch), old(batch)
    assert torch.isfinite(out_ref).all() and (out_ref - out_old).abs().max() > 1e-3
    assert "backtracking=True" in repr(ref)
    with pytest.raises(ValueError, match="backtracking='yes' must be true or false"):
        build_model("alignn", {"backtracking": "yes"})


def _structures(n: int = 4) -> list[Structure]:
    recs = [r for r in datasets.read("ph").records if 4 <= len(r.payload["elements"]) <= 10][:n]
    return [datasets.parse_structure(r.fmt, r.payload) for r in recs]


@pytest.mark.parametrize("name", list(SMALL))
def test_predictions_invariant_to_translation_and_supercell(name):
    torch.manual_seed(0)
    model = build_model(name, SMALL[name]).eval()
    config = GraphConfig()
    structures = _structures()
    base = model(collate_graphs([structure_to_graph(s, config=config) for s in structures]))
    moved = []
    for s in structures:
        t = s.copy()
        t.translate_sites(range(len(t)), [0.31, -0.12, 0.57], frac_coords=True, to_unit_cell=True)
        moved.append(t)
    shifted = model(collate_graphs([structure_to_graph(s, config=config) for s in moved]))
    supercells = model(collate_graphs([structure_to_graph(s * (2, 1, 1), config=config) for s in structures]))
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(supercells, base, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(SMALL))
def test_overfits_16_real_graphs(name, ph):
    torch.manual_seed(0)
    model = build_model(name, SMALL[name])
    batch = ph.batch(np.arange(16))
    y = torch.from_numpy(ph.y[:16]).float()
    y = (y - y.mean()) / y.std()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(batch)[:, 0], y)
        loss.backward()
        opt.step()
    model.eval()  # BatchNorm with running statistics, as at prediction time
    final = torch.nn.functional.mse_loss(model(batch)[:, 0], y).item()
    assert loss.item() < 1e-3, f"train-mode loss {loss.item():.2e}"
    assert final < 0.05, f"eval-mode loss {final:.2e} (target variance 1)"
