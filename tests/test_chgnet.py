"""CHGNet as a pretrained backbone: its graphs in ltc's shards, its energy reproduced, fine-tuning and checkpoints.

Real structures (L96, the phonons set) and CHGNet 0.3.0's real weights from the chgnet wheel; no mocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_only_live_trained, live_parameters
from pymatgen.core import Lattice, Structure

from ltc import datasets
from ltc.checkpoints import CheckpointError
from ltc.cli import main
from ltc.errors import ConfigError
from ltc.graphs import GraphConfig, GraphError, structure_to_graph
from ltc.models import PRETRAINED, build_model
from ltc.models.chgnet import CHGNetConfig, load_pretrained
from ltc.predict import predict as ltc_predict
from ltc.shards import ShardSet, collate_graphs, prepare, shard_key
from ltc.splits import SplitConfig, make_split
from ltc.targets import TargetScaler
from ltc.train import DEFAULT_GRAPHS, RunConfig, Task, TrainConfig, _make_optimizer, fit, train_run
from ltc.transfer import (
    check_strategy,
    freeze,
    load_init,
    model_from_checkpoint,
    pretrained_checkpoint,
    trainable_modules,
)

GRAPH = DEFAULT_GRAPHS["chgnet"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # CHGNet's many small ops on 2 shared cores: one thread is ~20x faster than two fighting another process
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def l96() -> ShardSet:
    return ShardSet.open("l96", graph=GRAPH, workers=1)


@pytest.fixture(scope="module")
def structures() -> dict[str, Structure]:
    """L96's structures (2–4 atoms) and a few larger, low-symmetry ones from the phonons set (6–12 atoms)."""
    out = {r.id: datasets.parse_structure(r.fmt, r.payload) for r in datasets.read("l96").records}
    ph = [r for r in datasets.read("ph").records if 6 <= len(r.payload["elements"]) <= 12][:6]
    out.update({f"ph-{r.id}": datasets.parse_structure(r.fmt, r.payload) for r in ph})
    return out


@pytest.fixture(scope="module")
def chgnet_itself():
    """CHGNet 0.3.0 loaded by chgnet's own public API: the reference."""
    from chgnet.model import CHGNet

    return CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False)


def _task(shards: ShardSet, *, size: int, seed: int = 0) -> Task:
    split = make_split(shards, size=size, seed=seed, config=SplitConfig())
    return Task(shards.name, shards, split, TargetScaler.fit("log10p1+standardize", shards.y[split.train]))


def _pretrained(n_targets: int = 1, **kwargs):
    torch.manual_seed(0)
    return model_from_checkpoint(pretrained_checkpoint("chgnet-0.3.0"), n_targets=n_targets, **kwargs)


# --- graphs and shards --------------------------------------------------------------------------------


def test_graphs_are_chgnets_own(structures, chgnet_itself):
    converter = chgnet_itself.graph_converter
    assert (converter.atom_graph_cutoff, converter.bond_graph_cutoff) == (GRAPH.cutoff, GRAPH.bond_cutoff)
    n_angles = 0
    for s in structures.values():
        g, ref = structure_to_graph(s, config=GRAPH), converter(s)
        pairs = ref.atom_graph.numpy().reshape(-1, 2)
        np.testing.assert_array_equal(g.edge_index, pairs[:, ::-1].T)  # ltc: neighbour → centre
        np.testing.assert_array_equal(g.directed2undirected, ref.directed2undirected.numpy())
        # what ltc drops of CHGNet's graph follows from what it keeps: undirected2directed and the bond graph
        first = np.unique(g.directed2undirected, return_index=True)[1]
        np.testing.assert_array_equal(first, ref.undirected2directed.numpy())
        bond_graph = ref.bond_graph.numpy().reshape(-1, 5)
        a = g.angle_edges
        np.testing.assert_array_equal(a, bond_graph[:, [2, 4]])
        np.testing.assert_array_equal(g.edge_index[1][a[:, 0]], bond_graph[:, 0])  # the angle's atom
        np.testing.assert_array_equal(g.edge_index[1][a[:, 1]], bond_graph[:, 0])
        np.testing.assert_array_equal(g.directed2undirected[a], bond_graph[:, [1, 3]])
        # vectors r_j + image - r_i, as CHGNet computes them (in float32)
        cart = (ref.atom_frac_coord @ ref.lattice).detach().numpy()
        vec = cart[pairs[:, 1]] + ref.neighbor_image.numpy() @ ref.lattice.detach().numpy() - cart[pairs[:, 0]]
        np.testing.assert_allclose(g.vectors, vec, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(g.vectors, axis=1), g.distances, rtol=1e-6)
        assert g.distances.max() <= GRAPH.cutoff and g.distances[a].max(initial=0) <= GRAPH.bond_cutoff
        n_angles += len(a)
    assert n_angles > 1000


def test_graph_settings_and_rejections():
    assert GraphConfig(cutoff=6.0, construction="chgnet", bond_cutoff=3.0) == GRAPH
    assert GRAPH.to_dict() == {"cutoff": 6.0, "max_neighbors": 12, "construction": "chgnet", "bond_cutoff": 3.0}
    # the other constructions' settings, and so their shard keys, are what they were before bond_cutoff existed
    assert GraphConfig().to_dict() == {"cutoff": 8.0, "max_neighbors": 12, "construction": "knn"}
    assert shard_key("l96", "f" * 16, GraphConfig()) == shard_key("l96", "f" * 16, GraphConfig(bond_cutoff=None))
    for bad, match in [
        (dict(construction="chgnet", max_neighbors=24), "max_neighbors=24 does not apply to construction 'chgnet'"),
        (dict(construction="chgnet", cutoff=6.0, bond_cutoff=7.0), "bond_cutoff=7.0 must be a number > 0 and <="),
        (dict(bond_cutoff=3.0), "bond_cutoff=3.0 goes with construction 'chgnet' only"),
    ]:
        with pytest.raises(ConfigError, match=match):
            GraphConfig(**bad)
    lonely = Structure(Lattice.cubic(20.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    with pytest.raises(GraphError, match=r"isolated atom: no neighbour within cutoff=6.0 Å for atom 0 \(Na\)"):
        structure_to_graph(lonely, config=GRAPH)
    americium = Structure(Lattice.cubic(3.0), ["Am"], [[0, 0, 0]])
    with pytest.raises(GraphError, match="Z=95 is not in CHGNet's atom embedding"):
        structure_to_graph(americium, config=GRAPH)


def test_shards_hold_the_bond_graph_and_batches_offset_it(tmp_path, structures):
    # several shard files, gathered out of order: the same batch as collating the graphs in memory
    res = prepare("l96", graph=GRAPH, cache=tmp_path, workers=1, shard_size=30)
    assert len(res.manifest["shards"]) == 4 and res.manifest["n_rejected"] == 0
    assert res.manifest["graph"] == GRAPH.to_dict()
    shards = ShardSet(res.path)
    idx = np.array([70, 3, 94, 41, 0, 65, 31])
    batch = shards.batch(idx)
    memory = collate_graphs([structure_to_graph(structures[shards.ids[i]], config=GRAPH) for i in idx])
    for key in ("z", "edge_index", "edge_dist", "edge_vec", "directed2undirected", "undirected2directed"):
        assert torch.equal(batch[key], memory[key]), key
    assert torch.equal(batch.angle_edges, memory.angle_edges) and batch.angle_edges.shape[0] > 0
    # indices into the batch: an angle's two edges leave the same atom, a bond's two edges are each other's reverse
    a, ei = batch.angle_edges, batch.edge_index
    assert torch.equal(ei[1, a[:, 0]], ei[1, a[:, 1]])
    u2d, d2u = batch.undirected2directed, batch.directed2undirected
    assert torch.equal(d2u[u2d], torch.arange(len(u2d))) and len(d2u) == 2 * len(u2d)
    one = shards.get(3)
    assert one.angle_edges.shape[1] == 2 and one.directed2undirected.shape[0] == one.edge_index.shape[1]


# --- the pretrained backbone ---------------------------------------------------------------------------


# chgnet's own batching converts a tensor that requires grad to a float (its stress path)
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True:UserWarning")
def test_energy_head_reproduces_chgnet_through_the_shards(l96, chgnet_itself, structures):
    model, graph, source = load_pretrained("0.3.0")
    assert graph == GRAPH and source["weights"].endswith("0.3.0/chgnet_0.3.0_e29f68s314m37.pth.tar")
    # sweeps plan a pretrained start's architecture without loading it (spec.pretrained_arch): the defaults
    assert model.config == CHGNetConfig()
    model.eval()
    ids = l96.ids  # every L96 structure; 15 of them have no bond shorter than 3 Å, so no angles
    with torch.no_grad():
        ours = torch.cat([model.energy(l96.batch(np.arange(i, min(i + 16, len(ids))))) for i in range(0, len(ids), 16)])
    ref = chgnet_itself.predict_structure([structures[i] for i in ids], task="e", batch_size=16)
    ref = np.array([r["e"] for r in ref], dtype=np.float64).reshape(-1)
    diff = np.abs(ours.double().numpy() - ref)
    assert diff.max() < 1e-5, f"max |ΔE| = {diff.max():.2e} eV/atom"
    # larger, low-symmetry cells, from in-memory graphs (as ltc predict builds them)
    larger = [s for k, s in structures.items() if k.startswith("ph-")]
    with torch.no_grad():
        ours = model.energy(collate_graphs([structure_to_graph(s, config=GRAPH) for s in larger])).double().numpy()
    ref = np.array([r["e"] for r in chgnet_itself.predict_structure(larger, task="e")]).reshape(-1)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_parts_and_repr():
    model = _pretrained(n_targets=2)
    assert model.n_blocks == 4 and model.readout_dim == 64 and len(model.heads) == 2
    assert repr(model.blocks[0]) == "CHGNetBlock(atom_conv, bond_conv, angle_update)"
    assert repr(model.blocks[-1]) == "CHGNetBlock(atom_conv)"  # CHGNet's last block: atom convolution only
    assert repr(model.heads[0]) == "Head(64→64→64→64→1, activation=silu)"
    assert "cutoffs=6/3 Å" in repr(model) and "n_blocks=4" in repr(model)
    # CHGNet 0.3.0 has 412,525 parameters; ltc drops its magmom layer (65) and adds a head (12,545) per target
    assert model.num_parameters() == 412_525 - 65 + 2 * 12_545
    with pytest.raises(ConfigError, match="num_angular=30 must be odd"):
        CHGNetConfig(num_angular=30)
    with pytest.raises(ConfigError, match="gmlp_norm='group' must be one of"):
        build_model("chgnet", {"gmlp_norm": "group"})
    with pytest.raises(ConfigError, match="mlp_first=False is not supported"):
        CHGNetConfig.from_chgnet_args({"mlp_first": False})


def test_strategies_map_onto_chgnets_updates():
    model = _pretrained()
    b = model.blocks
    assert trainable_modules(model, "two_body")[:4] == [blk.atom_conv for blk in b]
    three = trainable_modules(model, "three_body")
    assert b[0].bond_conv in three and b[2].angle_update in three and b[0].atom_conv not in three
    assert model.heads in three  # a fresh head trains whole
    assert trainable_modules(model, "blocks", 1) == [b[3], model.readout, model.heads]
    assert model.embedding in trainable_modules(model, "blocks", 4)
    with pytest.raises(ConfigError, match="n_unfrozen=5 must be between 0 and 4"):
        check_strategy(model, "blocks", 5)
    # CHGNet's energy head is off the property path: frozen whatever the strategy, "all" included
    freeze(model, strategy="all")
    assert not any(p.requires_grad for p in model.energy_head.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("energy_head."))


@pytest.mark.parametrize(("strategy", "k"), [("last_layer", None), ("blocks", 1), ("three_body", None)])
def test_frozen_parts_stay_bit_identical(l96, strategy, k):
    model = _pretrained(strategy=strategy)
    freeze(model, strategy=strategy, n_unfrozen=k)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt, _ = _make_optimizer(model, TrainConfig(), 1)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for n, p in model.named_parameters() if n in trainable
    }
    task = _task(l96, size=24)
    # parameters with a gradient path (CHGNet's last angle update makes angle features that nothing reads)
    live = live_parameters(model, l96.batch(task.split.train[:16]))
    assert live <= trainable and set(trainable - live) <= {n for n in trainable if n.startswith("blocks.2.angle_")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, [task], TrainConfig(epochs=2, batch_size=8, lr=1e-2, schedule="constant"))
    assert_only_live_trained(model, before, live)
    assert any(n.startswith("energy_head.") for n in before)  # and it was among the frozen


def test_fine_tuning_overfits_16_real_graphs(l96):
    model = _pretrained()
    freeze(model, strategy="all")
    batch = l96.batch(np.arange(16))
    y = torch.from_numpy(np.log10(l96.y[:16])).float()
    y = (y - y.mean()) / y.std()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(80):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(batch)[:, 0], y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    final = torch.nn.functional.mse_loss(model(batch)[:, 0], y).item()
    assert final < 0.1 * losses[0], f"loss {losses[0]:.3f} -> {final:.3f}"


def test_predictions_invariant_to_translation_and_supercell(structures):
    model = _pretrained().eval()
    cells = [structures[k] for k in list(structures)[:4]] + [s for k, s in structures.items() if k.startswith("ph-")]

    def predict(cells):
        with torch.no_grad():
            return model(collate_graphs([structure_to_graph(s, config=GRAPH) for s in cells]))

    moved = []
    for s in cells:
        t = s.copy()
        t.translate_sites(range(len(t)), [0.31, -0.12, 0.57], frac_coords=True, to_unit_cell=True)
        moved.append(t)
    base = predict(cells)
    torch.testing.assert_close(predict(moved), base, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(predict([s * (2, 1, 1) for s in cells]), base, rtol=1e-4, atol=1e-5)


# --- pretrained names, runs and checkpoints -------------------------------------------------------------


def test_pretrained_names_resolve_to_headless_checkpoints(tmp_path):
    assert set(PRETRAINED) == {"chgnet-0.3.0"} and PRETRAINED["chgnet-0.3.0"].model == "chgnet"
    ckpt = load_init("chgnet-0.3.0")
    assert ckpt["targets"] == [] and ckpt["graph"] == GRAPH.to_dict()
    assert ckpt["history"][0]["pretrained"] == "chgnet-0.3.0" and ckpt["history"][0]["chgnet_version"]
    with pytest.raises(ConfigError, match="no property head to keep"):
        model_from_checkpoint(ckpt, n_targets=1, head="keep")
    with pytest.raises(CheckpointError, match=r"chgnet-0\.3\.0 is a pretrained chgnet model, not cgcnn"):
        load_init("chgnet-0.3.0", model="cgcnn")
    with pytest.raises(ConfigError, match="unknown pretrained model 'chgnet-9'"):
        pretrained_checkpoint("chgnet-9")
    # a model that reads only its own graphs says so before any work
    stage = RunConfig(datasets=("l96",), model="chgnet", graph=GraphConfig(), train=TrainConfig(epochs=1))
    with pytest.raises(ConfigError, match="model chgnet needs graphs of construction chgnet"):
        train_run(stage, tmp_path)


def test_fine_tuned_checkpoint_round_trips_and_predicts_the_same(tmp_path, l96):
    stage = RunConfig(
        datasets=("l96",),
        init="chgnet-0.3.0",
        size=32,
        strategy="blocks",
        n_unfrozen=1,
        train=TrainConfig(epochs=2, batch_size=16, lr=1e-3),
    )
    metrics = train_run(stage, tmp_path / "ft")
    assert metrics["model"] == "chgnet" and metrics["graph"] == GRAPH.to_dict()
    assert metrics["params_trainable"] < metrics["params_total"]
    ckpt = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)  # a plain dict, no pickled code
    assert ckpt["model"]["name"] == "chgnet" and ckpt["graph"] == GRAPH.to_dict()
    assert [h.get("pretrained") for h in ckpt["history"]] == ["chgnet-0.3.0", None]
    assert ckpt["history"][1]["init"] == "chgnet-0.3.0"
    # the fine-tuned model is an ordinary checkpoint: it keeps its head and predicts what the run predicted
    model = model_from_checkpoint(ckpt, n_targets=1, head="keep").eval()
    run = pd.read_parquet(tmp_path / "ft" / "predictions.parquet")
    test = run[run.split == "test"]
    table = ltc_predict([tmp_path / "ft" / "checkpoint.pt"], "l96", device="cpu").set_index("id")
    np.testing.assert_allclose(table.loc[test.id, "pred_mean"], test.y_pred, rtol=1e-5)
    scaler = TargetScaler.from_dict(ckpt["targets"][0]["scaler"])
    with torch.no_grad():
        out = model(l96.batch(l96.indices_of(test.id)))[:, 0].double().numpy()
    np.testing.assert_allclose(scaler.inverse(out), test.y_pred, rtol=1e-5)
    # and a further stage starts from it like from any checkpoint
    again = RunConfig(datasets=("l96",), init=str(tmp_path / "ft" / "checkpoint.pt"), size=16, strategy="last_layer",
                      train=TrainConfig(epochs=1, batch_size=16))  # fmt: skip
    assert train_run(again, tmp_path / "ft2")["params_trainable"] == 65  # the kept head's last Linear


def test_cli_prepare_train_kfold_from_chgnet_then_predict_cif_files(tmp_path, structures, capsys):
    # ltc prepare --construction chgnet: CHGNet's cutoffs unless told otherwise
    assert main(["prepare", "l96", "--construction", "chgnet", "-q", "--cache", str(tmp_path / "cache")]) == 0
    folder = capsys.readouterr().out.strip().splitlines()[-1].strip()
    assert json.loads((Path(folder) / "manifest.json").read_text())["graph"] == GRAPH.to_dict()
    out = tmp_path / "cv"
    argv = ["train", "--dataset", "l96", "--init", "chgnet-0.3.0", "--split", "kfold", "--folds", "2",
            "--repeats", "1", "--epochs", "1", "--batch-size", "16", "--threads", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    cv = json.loads((out / "cv.json").read_text())
    assert cv["folds"] == 2 and cv["datasets"]["l96"]["repeats"][0]["n"] == 95
    assert all((out / f"r0f{f}" / "checkpoint.pt").is_file() for f in (0, 1))
    # screening CIF files with the two fold models: the graphs are built from the files as the shards were
    cifs = tmp_path / "cifs"
    cifs.mkdir()
    ids = list(structures)[:5]
    for rid in ids:
        structures[rid].to(filename=str(cifs / f"{rid}.cif"))
    assert main(["predict", "--checkpoint", str(out), str(cifs), "--out", str(tmp_path / "p.parquet")]) == 0
    files = pd.read_parquet(tmp_path / "p.parquet").set_index("id")
    assert files.error.isna().all() and (files.n_models == 2).all()
    dataset = ltc_predict([out], "l96", device="cpu").set_index("id")
    np.testing.assert_allclose(files.loc[ids, "pred_mean"], dataset.loc[ids, "pred_mean"], rtol=1e-4)
