"""Sweep files, plans and the Optuna searcher (no Ray cluster needed here; see test_sweep_ray.py)."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from ltc.cli import main
from ltc.config import ConfigError, from_dict
from ltc.graphs import GraphConfig
from ltc.sweep import AshaSpec, Range, SweepSpec, load_sweep, plan, smoke, validate
from ltc.sweep.plan import describe, plan_starts, select_starts, trial_config
from ltc.sweep.spec import SMOKE_MODELS
from ltc.train import DEFAULT_GRAPHS

# own_kappa.yaml reads the user's folder: tests/test_own_data.py writes one and runs it
SWEEPS = [p for p in sorted((REPO / "sweeps").glob("*.yaml")) if p.stem != "own_kappa"]
MINIMAL = {"name": "t", "stages": [{"name": "pt", "datasets": ["l96"]}]}


def _spec(**over) -> dict:
    d = copy.deepcopy(MINIMAL)
    d.update(over)
    return d


def test_every_shipped_sweep_loads_and_passes_dry_run(capsys):
    names = {p.stem for p in SWEEPS}
    assert {"quickstart", "devi_pairwise", "devi_ft_size", "devi_pt_size", "devi_strategies", "devi_mpt",
            "paraisite_ltc"} <= names  # fmt: skip
    for path in SWEEPS:
        assert main(["sweep", str(path), "--dry-run"]) == 0
        out = capsys.readouterr().out
        spec = load_sweep(path)
        settings = plan(spec)
        expected = sum(len(settings[st.name]) * spec.search_for(st).trials for st in spec.stages)
        assert f"total: {sum(len(v) for v in settings.values())} settings, {expected} trials" in out
        assert re.search(r"\d+ CPU \+ [\d.]+ GPU per trial", out)


def test_paper_sweeps_have_the_papers_shape():
    pairwise = plan(load_sweep(REPO / "sweeps/devi_pairwise.yaml"))
    ft = pairwise["finetune"]
    assert sum(s.kind == "finetune" for s in ft) == 7 * 6 * 5  # 7x6 pairs, 5 seeds
    assert sum(s.kind == "scratch" for s in ft) == 7 * 5
    assert all(set(s.datasets).isdisjoint(s.start.datasets) for s in ft if s.start)
    assert {s.size for s in ft} == {800}
    assert {s.max_size for s in pairwise["pretrain"]} == {941}

    strategies = plan(load_sweep(REPO / "sweeps/devi_strategies.yaml"))["finetune"]
    assert {s.strategy for s in strategies if s.kind == "finetune"} == {
        "last_layer", "new_head", "two_body", "three_body", "all", "blocks",
    }  # fmt: skip

    mpt = plan(load_sweep(REPO / "sweeps/devi_mpt.yaml"))
    for s in mpt["finetune"]:
        if s.kind == "finetune":  # each property from the MPT model that left it out
            assert s.datasets[0] not in s.start.datasets and len(s.start.datasets) == 6
    assert all(len(s.start.datasets) == 7 for s in mpt["jarvis2d"] if s.start)

    para = load_sweep(REPO / "sweeps/paraisite_ltc.yaml")
    assert para.model == "megnet" and para.model_config["head_hidden"] == [450, 350, 350]
    assert para.graph_config.construction == "knn"
    steps = plan(para)
    assert next(s.start.label for s in steps["step3"] if s.start) == "fe:all>agl:all[all]"  # step III chain
    assert {s.datasets[0] for s in steps["step2"]} == {"l96", "hh143", "mix"}
    assert sum(s.kind == "scratch" for s in steps["step3"]) == 3 * 9  # step I


def test_laptop_reproductions_have_the_papers_shape():
    devi = load_sweep(REPO / "sweeps/devi_laptop.yaml")
    ft = plan(devi)["finetune"]
    assert devi.split.test == "paper"  # their own test files and trial subsets
    assert sum(s.kind == "finetune" for s in ft) == 3 * 2 * 2 * 5  # 3 targets x 2 sources x 2 sizes x 5 subsets
    assert sum(s.kind == "scratch" for s in ft) == 3 * 2 * 5 and {s.size for s in ft} == {100, 800}
    assert all(set(s.datasets).isdisjoint(s.start.datasets) for s in ft if s.start)
    para = load_sweep(REPO / "sweeps/paraisite_laptop.yaml")
    precise = plan(para)["precise"]
    assert para.model_config["head_hidden"] == [450, 350, 350]  # ParAIsite's head
    # steps I, II, III of each set on the same 15 (repeat, fold) units
    for dataset in ("l96", "hh143", "mix"):
        cells = {(s.start.label if s.start else "scratch") for s in precise if s.datasets == (dataset,)}
        assert cells == {"scratch", "fe:max1000", "fe:max1000>agl:max1000[all]"}
        units = {(s.repeat, s.fold) for s in precise if s.datasets == (dataset,)}
        assert len(units) == 15


def test_devi_sweeps_train_alignn_on_its_reference_graphs(capsys):
    # the laptop reproduction (devi_laptop) trains CGCNN instead, as its file says
    for path in sorted(p for p in (REPO / "sweeps").glob("devi_*.yaml") if not p.stem.endswith("_laptop")):
        spec = load_sweep(path)
        assert spec.model == "alignn" and spec.graph_config == DEFAULT_GRAPHS["alignn"], path.name
        assert spec.graph_config == GraphConfig(cutoff=8.0, max_neighbors=12, construction="jarvis")
    assert main(["sweep", str(REPO / "sweeps/devi_pairwise.yaml"), "--dry-run"]) == 0
    assert "graphs jarvis 8 Å, 12 neighbours" in capsys.readouterr().out
    # sweep files written before the construction was a setting keep their graphs: "knn"
    old = from_dict(SweepSpec, _spec(model="alignn", graph={"cutoff": 8.0, "max_neighbors": 12}))
    assert old.graph_config.construction == "knn"
    assert from_dict(SweepSpec, _spec(model="alignn")).graph_config.construction == "jarvis"  # no graph: alignn's


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_spec(epochs=3), "unknown key 'epochs'"),
        (_spec(stages=[{"name": "pt", "datasets": ["l96"], "epoch": 3}]), r"stages\[0\]: unknown key 'epoch'"),
        (
            _spec(stages=[{"name": "pt", "datasets": ["l96"], "epochs": "many"}]),
            r"stages\[0\].epochs: expected int, got 'many'",
        ),
        (_spec(search={"trials": "3x"}), r"search.trials: expected int, got '3x'"),
        (_spec(model="schnet"), "model: expected one of 'cgcnn', 'megnet', 'alignn', 'chgnet', got 'schnet'"),
        (_spec(stages=[{"name": "pt", "datasets": ["kappa"]}]), "unknown dataset 'kappa'"),
        (
            _spec(stages=[{"name": "a", "datasets": ["l96"]}, {"name": "a", "datasets": ["l96"]}]),
            "stage names must be unique",
        ),
        (_spec(stages=[{"name": "ft", "datasets": ["l96"], "start_from": {"stage": "pt"}}]), "not an earlier stage"),
        (
            _spec(
                stages=[
                    {"name": "pt", "datasets": ["l96"]},
                    {"name": "ft", "datasets": ["l96"], "start_from": {"stage": "pt"}, "strategies": ["three_body"]},
                ]
            ),
            "three_body needs model alignn",
        ),
        (_spec(stages=[{"name": "pt", "datasets": ["l96"], "strategies": ["blocks"]}]), "strategies need start_from"),
        (_spec(search={"lr": {"low": 1e-2, "high": 1e-4}}), "need 0 < low < high"),
        (_spec(resources={"cpu": 1, "gpu": 1.5}), "above 1 it must be a whole number"),
        (_spec(model_config={"hiden": 3}), r"unknown CGCNNConfig field\(s\) \['hiden'\]"),
        (_spec(graph={"cutoff": -2}), "cutoff=-2"),
        (_spec(graph={"construction": "dgl"}), "construction='dgl' must be one of"),
        ({"stages": []}, "missing key 'name'"),
        (
            _spec(stages=[{"name": "pt", "datasets": ["ph"], "select_by": "mae_log10"}]),
            "stage 'pt': select_by='mae_log10' is for kappa datasets; ph is not one",
        ),
        (
            _spec(stages=[{"name": "pt", "datasets": [["ph", "dc"]], "select_by": "mae"}]),
            "stage 'pt': select_by='mae' needs one dataset per run; ph\\+dc train together",
        ),
        (_spec(stages=[{"name": "pt", "datasets": ["ph"], "select_by": "rmse"}]), "select_by='rmse' must be one of"),
    ],
)
def test_strict_loader_names_the_bad_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(SweepSpec, data)


def test_yaml_numbers_and_files(tmp_path):
    # YAML reads "1e-3" (no dot) as a string: the loader still takes it as a float
    spec = from_dict(SweepSpec, _spec(search={"lr": "1e-3"}))
    assert spec.search.lr == 1e-3
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_sweep(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sweep(tmp_path / "none.yaml")
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(_spec(storag="/x")))
    assert main(["sweep", str(tmp_path / "typo.yaml"), "--dry-run"]) == 2


def test_plan_sources_and_baselines():
    spec = from_dict(SweepSpec, {
        "name": "p",
        "stages": [
            {"name": "pt", "datasets": ["pz", "dc"], "max_sizes": [100, 200], "seeds": [0, 1]},
            {"name": "ft", "datasets": ["pz", "l96"], "sizes": [40], "seeds": [3], "strategies": ["all", "blocks"],
             "start_from": {"stage": "pt", "select": "every", "skip_seen": True}, "scratch": True},
            {"name": "ft2", "datasets": ["hh143"], "start_from": {"stage": "ft"}, "sizes": [20]},
        ],
    })  # fmt: skip
    p = plan(spec)
    assert len(p["pt"]) == 2 * 2 * 2
    ft = p["ft"]
    starts = {s.start.label for s in ft if s.start}
    assert len(starts) == 8  # every: one per PT setting (dataset x size x seed)
    # pz is never fine-tuned from a pz model (skip_seen); l96 from all 8
    assert sum(1 for s in ft if s.kind == "finetune" and s.datasets == ("pz",)) == 4 * 2
    assert sum(1 for s in ft if s.kind == "finetune" and s.datasets == ("l96",)) == 8 * 2
    assert sum(1 for s in ft if s.kind == "scratch") == 2  # one per (dataset, size, seed)
    # ft2 starts from each FT source: its own start and strategy count (never merged), baselines never
    ft2 = {s.start.label for s in p["ft2"]}
    assert len(ft2) == (8 + 4) * 2  # (l96 from 8 starts, pz from the 4 dc ones) x 2 strategies
    assert "pz:max100:seed0>l96:40[blocks]" in ft2 and "dc:max200:seed1>pz:40[all]" in ft2
    assert all("scratch" not in g for g in ft2)
    # holdout: a stage's training excludes the test formulas of every later stage's datasets, its own too
    from ltc.sweep import resolve_holdout

    assert resolve_holdout(spec, spec.stages[0]) == ["pz", "l96", "hh143"]
    assert resolve_holdout(spec, spec.stages[2]) == []
    pairwise = load_sweep(REPO / "sweeps/devi_pairwise.yaml")
    assert set(resolve_holdout(pairwise, pairwise.stages[0])) == {"pz", "dc", "ph", "ebg", "gv", "bg", "fe"}


def test_a_stage_can_start_from_several_stages():
    # ParAIsite's steps II and III in one stage: from the fe model and from fe -> agl, beside scratch, so
    # all three are compared on the same folds in one report
    spec = from_dict(SweepSpec, {
        "name": "p",
        "stages": [
            {"name": "pt_fe", "datasets": ["fe"], "max_sizes": [100]},
            {"name": "ft_agl", "datasets": ["agl"], "max_sizes": [50], "start_from": {"stage": "pt_fe"}},
            {"name": "ft", "datasets": ["l96", "hh143"], "scratch": True,
             "start_from": [{"stage": "pt_fe"}, {"stage": "ft_agl", "skip_seen": True}],
             "split": {"test": "kfold", "folds": 3, "repeats": 1}},
        ],
    })  # fmt: skip
    ft = plan(spec)["ft"]
    starts = sorted({(s.start.stage, s.start.label) for s in ft if s.start})
    assert starts == [("ft_agl", "fe:max100>agl:max50[all]"), ("pt_fe", "fe:max100")]
    # 2 datasets x 3 folds, each from both starts and from scratch, on the same units
    assert len(ft) == 2 * 3 * 3
    units = {k: {(s.fold, s.repeat) for s in ft if s.kind == k} for k in ("finetune", "scratch")}
    assert units["finetune"] == units["scratch"] == {(f, 0) for f in range(3)}
    summary = describe(spec)
    assert "stage ft [from pt_fe (best), ft_agl (best)]" in summary
    # each start takes its checkpoint from its own stage's table
    import pandas as pd

    def table(stage, key, ckpt):
        return pd.DataFrame({"status": ["completed"], "checkpoint": [ckpt], "kind": ["pretrain"],
                             "source_key": [key], "seed": [0], "val_loss": [0.1], "stage": [stage]})  # fmt: skip

    tables = {
        "pt_fe": table("pt_fe", "fe:max100", "/a.pt"),
        "ft_agl": table("ft_agl", "fe:max100>agl:max50[all]", "/b.pt"),
    }
    chosen = {s.stage: s.checkpoint for s in select_starts(plan_starts(spec.stages[2], plan(spec)), tables)}
    assert chosen == {"pt_fe": "/a.pt", "ft_agl": "/b.pt"}


@pytest.mark.parametrize(
    ("start_from", "match"),
    [
        ([], r"start_from lists each source stage once, got \[\]"),
        ([{"stage": "pt"}, {"stage": "pt"}], r"start_from lists each source stage once, got \['pt', 'pt'\]"),
        ([{"stage": "pt"}, {"stage": "later"}], "starts from 'later', which is not an earlier stage"),
    ],
)
def test_several_starts_are_checked_at_load(start_from, match):
    data = _spec(
        stages=[{"name": "pt", "datasets": ["l96"]}, {"name": "ft", "datasets": ["hh143"], "start_from": start_from}]
    )
    with pytest.raises(ConfigError, match=match):
        from_dict(SweepSpec, data)


def test_two_starts_with_one_label_are_refused():
    spec = from_dict(SweepSpec, _spec(stages=[
        {"name": "a", "datasets": ["l96"]},
        {"name": "b", "datasets": ["l96"]},
        {"name": "ft", "datasets": ["hh143"], "start_from": [{"stage": "a"}, {"stage": "b"}]},
    ]))  # fmt: skip
    with pytest.raises(ConfigError, match="stages 'a' and 'b' both produce source 'l96:all'"):
        plan(spec)


def test_smoke_keeps_one_setting_per_stage():
    for path in SWEEPS:
        spec = smoke(load_sweep(path))
        p = plan(spec)
        for stage in spec.stages:
            kinds = [s.kind for s in p[stage.name]]
            split = spec.split_for(stage)
            units = split.folds if split.kfold else 1  # a K-fold stage keeps its folds, of 1 repeat
            starts = max(1, len({s.start.label for s in p[stage.name] if s.start}))  # each start of the stage
            assert kinds.count("finetune") + kinds.count("pretrain") == units * starts, (path.name, stage.name)
            assert stage.epochs == 2 and spec.search_for(stage).trials == 1
        assert spec.name.endswith("-smoke") and spec.resources.gpu == 0


def test_stage_search_and_resources_override_only_the_keys_given():
    spec = from_dict(SweepSpec, {
        "name": "x", "search": {"trials": 5, "lr": {"low": 1e-3, "high": 1e-2}}, "resources": {"cpu": 2, "gpu": 0.5},
        "stages": [{"name": "pt", "datasets": ["l96"], "search": {"trials": 2}, "resources": {"gpu": 1}}],
    })  # fmt: skip
    search, res = spec.search_for(spec.stages[0]), spec.resources_for(spec.stages[0])
    assert search.trials == 2 and search.lr == Range(1e-3, 1e-2)
    assert (res.cpu, res.gpu) == (2.0, 1.0)


def test_summary_keeps_pt_sizes_apart():
    import pandas as pd

    from ltc.sweep import summary

    rows = []
    for lineage, r2 in (("fe:max941", 0.5), ("fe:max10000", 0.7)):
        for seed in (1, 2):
            rows.append({"stage": "ft", "kind": "finetune", "setting": f"{lineage}|{seed}", "status": "completed",
                         "val_loss": 0.1, "lineage": lineage, "pt_dataset": "fe", "dataset": "pz", "size": 800,
                         "strategy": "all", "test_r2": r2 + seed / 100, "test_mae": 1.0, "lr": 1e-3,
                         "n_unfrozen": None})  # fmt: skip
    text = summary(pd.DataFrame(rows))
    assert "fe:max941" in text and "fe:max10000" in text and "0.515 ± 0.005" in text


def test_smoke_sizes():
    spec = from_dict(SweepSpec, {"name": "x", "stages": [
        {"name": "pt", "datasets": ["l96"], "max_sizes": [5000]},
        {"name": "ft", "datasets": ["hh143"], "start_from": {"stage": "pt"}, "sizes": [None, 40]},
        {"name": "ft2", "datasets": ["mix"], "start_from": {"stage": "ft"}, "sizes": [20]},
    ]})  # fmt: skip
    assert [(st.sizes, st.max_sizes) for st in smoke(spec).stages] == [(None, [64]), ([64], None), ([20], None)]


def test_cluster_yaml_is_a_valid_launcher_config():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    text = (REPO / "cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    validate_config(fillout_defaults(copy.deepcopy(cfg)))  # Ray's own schema
    nodes = cfg["available_node_types"]
    head = nodes[cfg["head_node_type"]]
    workers = [n for k, n in nodes.items() if k != cfg["head_node_type"]]
    assert "GPU" not in str(head["node_config"]["InstanceType"]) and "--num-cpus=0" in " ".join(
        cfg["head_start_ray_commands"]
    )
    assert workers and all(w["min_workers"] == 0 and w["max_workers"] >= 1 for w in workers)
    assert any(w["node_config"]["InstanceType"].startswith(("g", "p")) for w in workers)  # GPU instances
    assert any("pip install" in c and "ltc" in c for c in cfg["setup_commands"])
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    assert any("/mnt/ltc" in c for c in cfg["setup_commands"])  # shared storage for shards and results
    for secret in ("aws_access_key_id", "aws_secret_access_key", "password", "ssh_private_key", "ray_auth_token"):
        assert secret not in text.lower(), secret
    # Ray's token authentication: on for every node, the token itself copied by path, never written here
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for commands in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(commands)
    assert Path(REPO / cfg["file_mounts"]["~/ltc"]).resolve() == REPO


# --------------------------------------------------------------------------------------------------
# Several architectures in one sweep: pretrained starts, a stage's own model, scratch per architecture.

MIXED = {
    "name": "mixed",
    "model_config": {"hidden": 16, "n_blocks": 2, "fc_dim": 16},
    "stages": [
        {"name": "ft_agl_chgnet", "datasets": ["agl"], "max_sizes": [50], "start_from": {"pretrained": "chgnet-0.3.0"}},
        {"name": "pt_agl_cgcnn", "datasets": ["agl"], "max_sizes": [80]},
        {"name": "ft", "datasets": ["l96"], "scratch": True, "strategies": ["all"],
         "split": {"test": "kfold", "folds": 3, "repeats": 1},
         "start_from": [{"pretrained": "chgnet-0.3.0"}, {"stage": "ft_agl_chgnet"}, {"stage": "pt_agl_cgcnn"}]},
    ],
}  # fmt: skip


def test_a_stage_mixes_pretrained_and_stage_starts_of_two_architectures():
    spec = from_dict(SweepSpec, copy.deepcopy(MIXED))
    chgnet, cgcnn = spec.archs(spec.stages[0])[0], spec.arch_for(spec.stages[1])
    assert (chgnet.model, chgnet.graph, chgnet.model_config) == ("chgnet", DEFAULT_GRAPHS["chgnet"], {})
    assert (cgcnn.model, cgcnn.model_config) == ("cgcnn", MIXED["model_config"])
    assert spec.archs(spec.stages[2]) == [chgnet, cgcnn]
    p = plan(spec)
    # a pretrained start: no source stage, its name is its label, lineage and checkpoint
    (pre,) = {s.start for s in p["ft_agl_chgnet"]}
    assert (pre.label, pre.checkpoint, pre.stage, pre.pretrained, pre.arch) == (
        "chgnet-0.3.0", "chgnet-0.3.0", "", True, chgnet
    )  # fmt: skip
    ft = p["ft"]
    labels = {s.start.label: s.arch.model for s in ft if s.start}
    assert labels == {"chgnet-0.3.0": "chgnet", "chgnet-0.3.0>agl:max50[all]": "chgnet", "agl:max80": "cgcnn"}
    scratch = {s.start_name: s.arch for s in ft if s.kind == "scratch"}
    assert scratch == {"scratch[chgnet]": chgnet, "scratch[cgcnn]": cgcnn}  # one per architecture of its starts
    assert "ft|scratch[chgnet]|l96:all|r0f2" in {s.key for s in ft}
    assert len({s.key for s in ft}) == len(ft) == 3 * (3 + 2)  # 3 folds x (3 starts + 2 baselines)
    # the trial configs: FT takes the model from its checkpoint (or the pretrained name), on the start's graphs
    from ltc.inputs import RunInputs

    graphs = (chgnet.graph, cgcnn.graph)
    inputs = {g: RunInputs({"l96": f"/shards/{g.construction}"}, {"l96": "/ids.json"}) for g in graphs}
    configs = {s.start_name: trial_config(spec, spec.stages[2], s, inputs) for s in ft if s.fold == 0}
    c = configs["chgnet-0.3.0"]
    assert (c["init"], c["model"], c["arch"], c["pt_datasets"]) == ("chgnet-0.3.0", None, "chgnet", ["chgnet-0.3.0"])
    assert c["graph"] == chgnet.graph.to_dict() and c["inputs"]["shards"] == {"l96": "/shards/chgnet"}
    s = configs["scratch[chgnet]"]  # a fresh chgnet of the pretrained one's config
    assert (s["model"], s["model_config"], s["init"], s["start"]) == ("chgnet", {}, None, "scratch[chgnet]")
    s = configs["scratch[cgcnn]"]
    assert (s["model"], s["model_config"]) == ("cgcnn", MIXED["model_config"])
    assert s["inputs"]["shards"] == {"l96": "/shards/knn"}
    assert configs["agl:max80"]["graph"] == cgcnn.graph.to_dict() and configs["agl:max80"]["n_blocks"] == 2
    # pretrained starts need no source table; stage starts take their checkpoints from their tables
    chosen = select_starts(plan_starts(spec.stages[0], p), {})
    assert [(c.label, c.checkpoint) for c in chosen] == [("chgnet-0.3.0", "chgnet-0.3.0")]
    text = describe(spec)
    assert "stage ft [from pretrained chgnet-0.3.0, ft_agl_chgnet (best), pt_agl_cgcnn (best)]" in text
    assert "models chgnet (4 blocks); graphs chgnet 6 Å, every neighbour; cgcnn (2 blocks)" in text


def test_a_single_architecture_sweep_keeps_its_keys():
    spec = from_dict(SweepSpec, {"name": "p", "stages": [
        {"name": "pt", "datasets": ["agl"], "max_sizes": [50]},
        {"name": "ft", "datasets": ["l96"], "start_from": {"stage": "pt"}, "scratch": True},
    ]})  # fmt: skip
    keys = [s.key for s in plan(spec)["ft"]]
    assert keys == ["ft|from=agl:max50|l96:all|all|seed0", "ft|scratch|l96:all|seed0"]
    # a pretrained start alone: its own architecture's baseline, still called scratch
    spec = from_dict(SweepSpec, {"name": "p", "stages": [
        {"name": "ft", "datasets": ["l96"], "start_from": {"pretrained": "chgnet-0.3.0"}, "scratch": True},
    ]})  # fmt: skip
    (ft, scratch) = plan(spec)["ft"]
    assert ft.key == "ft|from=chgnet-0.3.0|l96:all|all|seed0" and scratch.key == "ft|scratch|l96:all|seed0"
    assert scratch.arch.model == "chgnet" and scratch.start_name == "scratch"


def test_a_stage_trains_its_own_model():
    spec = from_dict(SweepSpec, {"name": "p", "model": "cgcnn", "model_config": {"hidden": 16}, "stages": [
        {"name": "a", "datasets": ["agl"], "model": "alignn"},
        {"name": "b", "datasets": ["agl"], "model": "cgcnn"},
        {"name": "c", "datasets": ["agl"], "model": "megnet", "model_config": {"n_blocks": 2},
         "graph": {"cutoff": 5.0, "max_neighbors": 16}},
    ]})  # fmt: skip
    a, b, c = (spec.arch_for(st) for st in spec.stages)
    assert (a.model, a.model_config, a.graph) == ("alignn", {}, DEFAULT_GRAPHS["alignn"])  # not cgcnn's settings
    assert (b.model, b.model_config, b.graph) == ("cgcnn", {"hidden": 16}, DEFAULT_GRAPHS["cgcnn"])
    assert (c.model, c.model_config, c.graph) == ("megnet", {"n_blocks": 2}, GraphConfig(cutoff=5.0, max_neighbors=16))
    assert plan(spec)["c"][0].arch == c
    small = smoke(spec)
    assert small.arch_for(small.stages[0]).model_config == SMOKE_MODELS["alignn"]


@pytest.mark.parametrize(
    ("start_from", "extra", "match"),
    [
        ({"pretrained": "chgnet-9"}, {},
         r"^stages\[1\].start_from: pretrained='chgnet-9' is not a pretrained model; known chgnet-0.3.0$"),
        ({"pretrained": "chgnet-0.3.0", "stage": "pt"}, {}, r"^stages\[1\].start_from: give stage, pretrained or"),
        ([{"stage": "pt"}, {"select": "best"}], {}, r"^stages\[1\].start_from\[1\]: give stage, pretrained"),
        ({"pretrained": "chgnet-0.3.0", "select": "every"}, {}, r"^stages\[1\].start_from: .*select and skip_seen"),
        ([{"pretrained": "chgnet-0.3.0"}, {"pretrained": "chgnet-0.3.0"}], {}, r"^stages\[1\]: .*lists each source"),
        ({"stage": "pt"}, {"model": "chgnet"}, r"stage 'ft': model: a fine-tuning stage \(start_from\)"),
        # three_body: fine for a chgnet start, not for a cgcnn one
        ([{"pretrained": "chgnet-0.3.0"}, {"stage": "pt"}], {"strategies": ["three_body"]},
         r"stages\[1\].strategies\[0\]='three_body': three_body needs model alignn or chgnet: cgcnn"),
    ],
)  # fmt: skip
def test_pretrained_starts_and_stage_models_are_checked_at_load(start_from, extra, match):
    data = _spec(stages=[{"name": "pt", "datasets": ["agl"]},
                         {"name": "ft", "datasets": ["l96"], "start_from": start_from, **extra}])  # fmt: skip
    with pytest.raises(ConfigError, match=match):
        from_dict(SweepSpec, data)


def test_stage_models_are_checked_at_load():
    with pytest.raises(ConfigError, match=r"stages\[0\].model: expected one of .* got 'schnet'"):
        from_dict(SweepSpec, _spec(stages=[{"name": "pt", "datasets": ["agl"], "model": "schnet"}]))
    with pytest.raises(ConfigError, match=r"stages\[0\].model_config \{'hidden': 4\}: unknown"):
        from_dict(SweepSpec, _spec(stages=[{"name": "pt", "datasets": ["agl"], "model": "chgnet",
                                            "model_config": {"hidden": 4}}]))  # fmt: skip
    with pytest.raises(ConfigError, match=r"stages\[0\].graph: model chgnet needs graphs of construction chgnet"):
        from_dict(SweepSpec, _spec(stages=[{"name": "pt", "datasets": ["agl"], "model": "chgnet",
                                            "graph": {"cutoff": 6.0}}]))  # fmt: skip
    # a stage's own graphs under the sweep's model (no stage model) are checked as well
    with pytest.raises(ConfigError, match=r"stages\[0\].graph: model chgnet needs graphs of construction chgnet"):
        from_dict(SweepSpec, _spec(model="chgnet", stages=[{"name": "pt", "datasets": ["agl"],
                                                            "graph": {"cutoff": 8.0}}]))  # fmt: skip
    ok = from_dict(SweepSpec, _spec(stages=[
        {"name": "ft", "datasets": ["l96"], "start_from": {"pretrained": "chgnet-0.3.0"}, "strategies": ["three_body"]}
    ]))  # fmt: skip
    assert plan(ok)["ft"][0].strategy == "three_body"


def test_n_unfrozen_is_checked_against_each_start_model():
    data = copy.deepcopy(MIXED)
    data["search"] = {"n_unfrozen": 3}
    data["stages"][2]["strategies"] = ["blocks"]
    with pytest.raises(ConfigError, match=r"search\.n_unfrozen=3: cgcnn has 2 blocks"):
        validate(from_dict(SweepSpec, data), counts=False)
    data["search"] = {"n_unfrozen": 2}
    validate(from_dict(SweepSpec, data), counts=False)


def test_smoke_shrinks_fresh_models_only():
    spec = smoke(from_dict(SweepSpec, copy.deepcopy(MIXED)))
    assert spec.arch_for(spec.stages[1]).model_config == SMOKE_MODELS["cgcnn"]
    # the pretrained start (and its scratch twin) keep chgnet-0.3.0's own size
    assert spec.archs(spec.stages[2])[0].model_config == {}
    p = plan(spec)
    assert {s.start_name for s in p["ft"] if s.kind == "scratch"} == {"scratch[chgnet]", "scratch[cgcnn]"}


def test_a_folder_started_by_an_older_ltc_resumes(tmp_path):
    # sweep.json of a version before a stage's model/model_config/graph and a source's pretrained existed: the
    # same sweep file resumes; a real change to it is still refused
    import json

    from ltc.errors import ConfigError as LtcConfigError
    from ltc.sweep.driver import SweepPaths, _claim_results

    spec = load_sweep(REPO / "sweeps/quickstart.yaml")
    old = json.loads(json.dumps(dataclasses.asdict(spec), default=str))
    assert old.pop("datasets") == {}
    for stage in old["stages"]:
        for key in ("model", "model_config", "graph"):
            assert stage.pop(key) is None
        if stage["start_from"] is not None:
            for key in ("pretrained", "checkpoint", "label"):
                assert stage["start_from"].pop(key) is None
    root = tmp_path / spec.name
    root.mkdir()
    paths = SweepPaths(root, str(root / "ray"), str(root / "optuna.log"))
    stored = {"spec": json.dumps(old, sort_keys=True, default=str), "optuna_storage": paths.optuna}
    (root / "sweep.json").write_text(json.dumps(stored))
    _claim_results(paths, spec, None, resume=True)  # accepted
    changed = dataclasses.replace(spec, stages=[dataclasses.replace(spec.stages[0], epochs=16), spec.stages[1]])
    with pytest.raises(LtcConfigError, match="different version of sweep 'quickstart'"):
        _claim_results(paths, changed, None, resume=True)
    # a null that becomes a value (quickstart's asha: null, now set) is a change too
    assert spec.asha is None
    with pytest.raises(LtcConfigError, match="different version"):
        _claim_results(paths, dataclasses.replace(spec, asha=AshaSpec()), None, resume=True)


def test_a_sweep_begun_before_val_min_resumes_on_its_own_split_once_told(tmp_path):
    # sweep.json and trial configs written before splits had val_min: the same file is refused, naming the key and
    # what to add; with `val_min: 1` (what those splits did) it resumes, and its stored trials keep their split
    import json

    from ltc.errors import ConfigError as LtcConfigError
    from ltc.splits import LEGACY_VAL_MIN, SplitConfig
    from ltc.sweep.driver import SweepPaths, _claim_results

    spec = load_sweep(REPO / "sweeps/quickstart.yaml")
    old = json.loads(json.dumps(dataclasses.asdict(spec), default=str))
    for split in [old["split"], *(st["split"] for st in old["stages"] if st["split"])]:
        del split["val_min"]
    root = tmp_path / spec.name
    root.mkdir()
    paths = SweepPaths(root, str(root / "ray"), str(root / "optuna.log"))
    (root / "sweep.json").write_text(json.dumps({"spec": json.dumps(old), "optuna_storage": paths.optuna}))
    with pytest.raises(LtcConfigError, match=r"\(split.val_min: 1 then, 20 now\).*add `val_min: 1` to that split"):
        _claim_results(paths, spec, None, resume=True)
    told = dataclasses.replace(
        spec,
        split=dataclasses.replace(spec.split, val_min=LEGACY_VAL_MIN),
        stages=[
            dataclasses.replace(st, split=st.split and dataclasses.replace(st.split, val_min=1)) for st in spec.stages
        ],
    )
    _claim_results(paths, told, None, resume=True)  # accepted
    stored = {k: v for k, v in dataclasses.asdict(SplitConfig(val_fraction=0.2)).items() if k != "val_min"}
    assert SplitConfig.from_stored(stored) == SplitConfig(val_fraction=0.2, val_min=1)
    assert SplitConfig.from_stored({**stored, "val_min": 20}).val_min == 20


def test_a_ray_job_refuses_relative_result_paths(tmp_path, monkeypatch):
    # `ray job submit --working-dir .` runs `ltc sweep` in Ray's temporary copy of the folder: results written
    # there relative to it would go with the job
    from ltc.errors import ConfigError as LtcConfigError
    from ltc.sweep import run_sweep

    copy_of_it = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy_of_it.mkdir(parents=True)
    monkeypatch.chdir(copy_of_it)
    spec = load_sweep(REPO / "sweeps/cluster_check.yaml")
    with pytest.raises(LtcConfigError, match=r"--results results is relative, and this Ray job runs in"):
        run_sweep(spec, results="results")
    with pytest.raises(LtcConfigError, match=r"--storage ckpts is relative"):
        run_sweep(spec, results=tmp_path / "r", storage="ckpts")
    assert not (copy_of_it / "results").exists() and not (tmp_path / "r").exists()  # refused before writing


def test_one_driver_per_results_folder_and_a_copy_or_another_storage_is_refused(tmp_path):
    import json
    import shutil
    import subprocess
    import sys

    from ltc.errors import AlreadyExistsError
    from ltc.errors import ConfigError as LtcConfigError
    from ltc.sweep.driver import SweepPaths, _claim_results, one_driver

    root = tmp_path / "res" / "sw"
    holder = subprocess.Popen(  # another process holds the folder, as a running driver would
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from ltc.sweep.driver import one_driver\n"
         f"with one_driver(Path({str(root)!r})):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = pytest.raises(AlreadyExistsError, match=rf"is in use by another ltc sweep \(pid {holder.pid} on ")
        with refused, one_driver(root):
            pass
    finally:
        holder.kill()
        holder.wait()
    with one_driver(root):  # its holder gone, however it ended: free again
        pass

    spec = load_sweep(REPO / "sweeps/quickstart.yaml")
    paths = SweepPaths(root, str(root / "ray"), str(root / "optuna.log"))
    _claim_results(paths, spec, None, resume=False)
    with pytest.raises(LtcConfigError, match=r"keeps its checkpoints and Tune state in .*ray, not .*elsewhere"):
        _claim_results(SweepPaths(root, str(tmp_path / "elsewhere"), paths.optuna), spec, None, resume=True)
    copy = tmp_path / "copy" / "sw"
    shutil.copytree(root, copy)
    with pytest.raises(LtcConfigError, match=r"was started as .*res/sw \(a moved or copied folder\)"):
        _claim_results(SweepPaths(copy, str(copy / "ray"), str(copy / "optuna.log")), spec, None, resume=True)
    (root / "sweep.json").write_text(json.dumps({"spec": {"name": "quickstart"}, "root": str(root)})[:30])  # torn
    with pytest.raises(ValueError, match=r"sweep\.json is damaged"):
        _claim_results(paths, spec, None, resume=True)


def test_credentials_are_refused_in_a_uri_and_a_killed_drivers_file_is_removed(tmp_path, monkeypatch):
    import os
    import socket
    import subprocess
    import sys

    from ltc import io

    for uri in ("s3://AKIAEXAMPLE:SECRET@bucket/p", "s3://AKIA:se/cr@et@bucket/p", "s3://AKIA@bucket/p"):
        with pytest.raises(ConfigError, match=r"storage s3://…@bucket/p: credentials in a URI are refused") as err:
            io.check_uri(uri, what="storage")
        assert not any(part in str(err.value) for part in ("AKIA", "SECRET", "se/cr", "et@"))  # nothing echoed
    io.check_uri("s3://bucket/run@v2/p", what="storage")  # an "@" in a key is not a credential
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    left = tmp_path / f"ltc-aws-{socket.gethostname()}-{dead.pid}-abc"
    left.mkdir()
    (left / "credentials").write_text("[ltc]\naws_secret_access_key = x\n")
    mine = tmp_path / f"ltc-aws-{socket.gethostname()}-{os.getpid()}-def"  # a live process's: kept
    mine.mkdir()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    with io.aws_credentials_in_a_file() as path:
        assert path is not None and path.parent.name.startswith(f"ltc-aws-{socket.gethostname()}-{os.getpid()}-")
    assert not left.exists() and mine.exists()


def test_no_path_ltc_derives_leaves_the_results_folder_or_the_storage(tmp_path):
    """Names are checked at load (test_sweep_plan); this is the second line: every derived path is checked where
    it is made, locally and in a bucket."""
    from ltc import io
    from ltc.sweep.driver import SweepPaths

    paths = SweepPaths(tmp_path / "res" / "sw", str(tmp_path / "res" / "sw" / "ray"), "")
    assert paths.stage_table("ft") == tmp_path / "res" / "sw" / "stages" / "ft.parquet"
    assert paths.experiment("ft") == str(tmp_path / "res" / "sw" / "ray" / "ft")
    for escape in (lambda: paths.stage_table("../../x"), lambda: paths.best("../.."), lambda: paths.experiment("..")):
        with pytest.raises(ConfigError, match="would lie outside"):
            escape()
    bucket = SweepPaths(tmp_path, "s3://bucket/runs/sw", "")
    assert bucket.experiment("ft") == "s3://bucket/runs/sw/ft"
    with pytest.raises(ConfigError, match=r"s3://bucket/runs/sw/\.\./x would lie outside s3://bucket/runs/sw"):
        bucket.experiment("../x")
    assert io.inside(tmp_path, tmp_path / "a" / ".." / "b") == tmp_path / "a" / ".." / "b"  # normalised inside
    with pytest.raises(ConfigError):
        io.inside(tmp_path / "a", tmp_path / "ab")  # a sibling sharing the prefix is outside
