"""Screening with trained models: checkpoints × structures → predictions in raw units (``ltc predict``).

Inputs are a CIF or POSCAR file, a folder of them, or a dataset name, built-in or declared (its shards, with the
true values beside the predictions; a name wins over a file of the same name, which ``./NAME`` reaches). Several
checkpoints (e.g. the seeds of one setting, or the K×R fold models of a cross-validated setting: give their
folder) give a mean and a standard deviation. A file that cannot be read, or a structure that cannot become a
graph, is a row with its error, never the end of the run. Kappa predictions are ranked lowest first (rank 1 =
lowest kappa).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ltc import datasets, io
from ltc.checkpoints import CheckpointError, load_checkpoint
from ltc.errors import ConfigError, MissingFileError
from ltc.graphs import GraphConfig, GraphError, check_construction, structure_to_graph
from ltc.models import CrystalGNN, build_model
from ltc.shards import ShardSet, collate_graphs
from ltc.targets import TargetScaler

log = logging.getLogger(__name__)

STRUCTURE_SUFFIXES = (".cif", ".vasp", ".poscar")


@dataclass
class LoadedModel:
    path: str
    model: CrystalGNN
    graph: GraphConfig
    targets: list[dict[str, Any]]  # per head: dataset, units, kappa, scaler
    scalers: list[TargetScaler]


CHECKPOINT_NAME = "checkpoint.pt"


class EnsembleError(ConfigError, CheckpointError):
    """Checkpoints that cannot be one ensemble: their heads predict different targets."""


def expand_checkpoints(paths: list[str | os.PathLike[str]]) -> list[str]:
    """Checkpoint files for ``paths``: a file as given, a folder as every ``checkpoint.pt`` beneath it (sorted).
    Paths may be URIs (``s3://bucket/…``: ``ltc.io``), files or folders alike.

    A file reached twice (e.g. a folder and one of its files) counts once, at its first place.
    """
    out: dict[Path | str, str] = {}
    for given in paths:
        if io.is_uri(given):
            for uri in _expand_uri(str(given)):
                out.setdefault(uri, uri)
            continue
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob(CHECKPOINT_NAME) if p.is_file())
            if not found:
                raise MissingFileError(f"checkpoint folder {path} holds no {CHECKPOINT_NAME} (searched recursively)")
            log.info("checkpoint folder %s: %d %s file(s)", path, len(found), CHECKPOINT_NAME)
        elif path.exists():
            found = [path]
        else:
            raise MissingFileError(f"checkpoint {path} does not exist")
        for p in found:
            out.setdefault(p.resolve(), str(p))
    return list(out.values())


def _expand_uri(uri: str) -> list[str]:
    """``expand_checkpoints`` of one URI: the file, or the ``checkpoint.pt`` objects beneath a folder (prefix)."""
    kind = io.file_type(uri)
    if kind == "file":
        return [uri]
    if kind is None:
        raise MissingFileError(f"checkpoint {uri} does not exist")
    found = io.find_files(uri, CHECKPOINT_NAME)
    if not found:
        raise MissingFileError(f"checkpoint folder {uri} holds no {CHECKPOINT_NAME} (searched recursively)")
    log.info("checkpoint folder %s: %d %s file(s)", uri, len(found), CHECKPOINT_NAME)
    return found


def _heads(targets: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """What each head predicts: (dataset, target, units)."""
    return [(t["dataset"], t.get("target", ""), t.get("units", "")) for t in targets]


def load_models(paths: list[str | os.PathLike[str]], *, device: torch.device) -> list[LoadedModel]:
    """Checkpoints (files, or folders: see ``expand_checkpoints``) ready to predict the same target(s)."""
    if not paths:
        raise ConfigError("give at least one --checkpoint")
    out = []
    recipes: dict[tuple, str] = {}  # how each model was trained (all but fold / seed) → a checkpoint of it
    for path in expand_checkpoints(paths):
        ckpt = load_checkpoint(path)
        recipes.setdefault(_recipe(ckpt), str(path))
        targets = ckpt["targets"]
        if out and _heads(targets) != _heads(out[0].targets):
            raise EnsembleError(
                f"{path} predicts {_heads(targets)}, but {out[0].path} predicts {_heads(out[0].targets)} "
                "(dataset, target, units): an ensemble needs checkpoints of the same target"
            )
        model = build_model(ckpt["model"]["name"], ckpt["model"]["config"])
        model.load_state_dict(ckpt["state_dict"])
        model.to(device).eval()
        out.append(
            LoadedModel(
                path,
                model,
                GraphConfig(**ckpt["graph"]),
                targets,
                [TargetScaler.from_dict(t["scaler"]) for t in targets],
            )
        )
    if len(recipes) > 1:
        # e.g. `--checkpoint best/finetune/` mixes the cells of a sweep (starts, scratch, strategies): allowed,
        # but rarely meant; the fold models of one cell share one recipe
        log.warning(
            "the ensemble mixes %d differently trained models (other starts, strategies or sizes), e.g. %s",
            len(recipes), ", ".join(list(recipes.values())[:3]),
        )  # fmt: skip
    return out


def _recipe(ckpt: dict) -> tuple:
    """What distinguishes how a checkpoint was trained, apart from its seed, fold and learning rate."""
    stages = [
        (tuple(h.get("datasets") or ()), h.get("strategy"), h.get("size"), h.get("init") is not None)
        for h in ckpt.get("history", [])
    ]
    return (ckpt["model"]["name"], *stages)


def structure_files(folder: Path) -> list[Path]:
    """CIF and POSCAR files of ``folder`` (by suffix, or named POSCAR* / CONTCAR*), sorted."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and (p.suffix.lower() in STRUCTURE_SUFFIXES or p.name.upper().startswith(("POSCAR", "CONTCAR")))
    )


def read_structures(paths: list[Path]) -> tuple[list[tuple[str, str, Any]], list[tuple[str, str, str]]]:
    """(id, source, Structure) for files that parse; (id, source, error) for those that do not."""
    from pymatgen.core import Structure

    good, bad = [], []
    for path in paths:
        rid = path.stem if path.suffix else path.name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pymatgen's CIF warnings on rounded coordinates
                structure = Structure.from_file(path)
            if len(structure) == 0:
                raise ValueError("no sites")
        except Exception as err:  # any parser failure is this file's error, not the run's
            bad.append((rid, str(path), f"unreadable: {type(err).__name__}: {err}"[:300]))
        else:
            good.append((rid, str(path), structure))
    return good, bad


@torch.no_grad()
def _forward(models: list[LoadedModel], batches: dict[GraphConfig, list], device) -> np.ndarray:
    """Raw-unit predictions [n_models, n_structures, n_heads]; ``batches`` maps a graph config to batches."""
    per_model = []
    for m in models:
        outs = [m.model(b.to(device)).double().cpu().numpy() for b in batches[m.graph]]
        scaled = np.concatenate(outs) if outs else np.zeros((0, len(m.scalers)))
        per_model.append(np.stack([s.inverse(scaled[:, k]) for k, s in enumerate(m.scalers)], axis=1))
    return np.stack(per_model)


def _rows(models, ids, sources, formulas, preds, y_true=None) -> pd.DataFrame:
    rows = []
    for k, target in enumerate(models[0].targets):
        p = preds[:, :, k]  # [models, structures]
        for i, rid in enumerate(ids):
            row = {
                "id": rid,
                "source": sources[i],
                "formula": formulas[i],
                "target": target["dataset"],
                "units": target.get("units", ""),
                "n_models": p.shape[0],
                "pred_mean": float(p[:, i].mean()),
                "pred_std": float(p[:, i].std()) if p.shape[0] > 1 else float("nan"),
            }
            row.update({f"pred_{j}": float(p[j, i]) for j in range(p.shape[0])})
            if y_true is not None:
                row["y_true"] = float(y_true[i])
            rows.append(row)
    return pd.DataFrame(rows)


def predict(
    checkpoints: list[str | os.PathLike[str]],
    input: str,
    *,
    batch_size: int = 256,
    device: str = "auto",
    home: str | os.PathLike[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Predictions for ``input`` (file, folder or dataset name) from ``checkpoints``; see the module doc."""
    from ltc.train import resolve_device

    dev = resolve_device(device)
    models = load_models(list(checkpoints), device=dev)
    configs = list(dict.fromkeys(m.graph for m in models))
    for c in configs:
        check_construction(c)  # a missing package is one error, not an error row per structure
    path = Path(input)
    if path.exists() and not datasets.is_known(input):
        files = structure_files(path) if path.is_dir() else [path]
        if not files:
            raise MissingFileError(f"{path} holds no CIF or POSCAR files (*.cif, *.vasp, *.poscar, POSCAR*, CONTCAR*)")
        good, bad = read_structures(files)
        graphs: dict[GraphConfig, list] = {c: [] for c in configs}
        keep = []
        for rid, source, structure in good:
            try:
                built = {c: structure_to_graph(structure, config=c) for c in configs}
            except GraphError as err:
                bad.append((rid, source, str(err)))
                continue
            except Exception as err:  # e.g. a degenerate lattice inside pymatgen's neighbour search
                bad.append((rid, source, f"graph failed: {type(err).__name__}: {err}"[:300]))
                continue
            for c in configs:
                graphs[c].append(built[c])
            keep.append((rid, source, structure.composition.reduced_formula))
        batches = {
            c: [collate_graphs(g[i : i + batch_size]) for i in range(0, len(g), batch_size)] for c, g in graphs.items()
        }
        preds = _forward(models, batches, dev)
        table = _rows(models, [k[0] for k in keep], [k[1] for k in keep], [k[2] for k in keep], preds)
        errors = pd.DataFrame(
            [
                {"id": rid, "source": src, "target": t["dataset"], "error": why}
                for rid, src, why in bad
                for t in models[0].targets
            ]
        )
        table = pd.concat([table, errors], ignore_index=True) if not errors.empty else table
    elif datasets.is_known(input):  # the dataset's shards (built-in or declared), with its true values
        shard_sets = {c: ShardSet.open(input, graph=c, home=home, cache=cache) for c in configs}
        ids = list(shard_sets[configs[0]].ids)
        for s in shard_sets.values():  # graphs rejected under one setting but not another: use the common ones
            ids = [i for i in ids if i in s._positions]
        batches = {}
        for c, s in shard_sets.items():
            idx = s.indices_of(ids)
            batches[c] = [s.batch(idx[i : i + batch_size]) for i in range(0, len(idx), batch_size)]
        first = shard_sets[configs[0]]
        idx = first.indices_of(ids)
        formulas = first.formulas
        preds = _forward(models, batches, dev)
        table = _rows(models, ids, [input] * len(ids), [formulas[i] for i in idx], preds, y_true=first.y[idx])
    else:
        raise MissingFileError(f"INPUT {input!r} is neither a file, a folder, nor a dataset name (see `ltc datasets`)")
    if "error" not in table.columns:
        table["error"] = None
    for col in ("n_models", "pred_mean", "pred_std"):  # nothing readable: the error rows alone
        if col not in table.columns:
            table[col] = np.nan
    return rank(table, models)


def rank(table: pd.DataFrame, models: list[LoadedModel]) -> pd.DataFrame:
    """Kappa targets: rows ordered by predicted kappa, lowest first, with ``rank`` 1…n (errors last)."""
    kappa = {t["dataset"] for t in models[0].targets if t.get("kappa")}
    table = table.assign(rank=pd.Series(pd.NA, index=table.index, dtype="Int64"))
    parts = []
    for target, g in table.groupby("target", sort=False):
        if target in kappa:
            ok = g[g.error.isna()].sort_values("pred_mean", kind="stable")
            ok = ok.assign(rank=pd.array(range(1, len(ok) + 1), dtype="Int64"))
            g = pd.concat([ok, g[g.error.notna()]])
        parts.append(g)
    return pd.concat(parts, ignore_index=True) if parts else table
