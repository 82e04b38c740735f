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
import re
from collections import defaultdict
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
from ltc.targets import TargetScaler, regression_metrics

log = logging.getLogger(__name__)


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


FOLD_RE = re.compile(r"r(\d+)-?f(\d+)")  # a fold model's folder: r<repeat>f<fold> (sweeps), r<repeat>-f<fold> (train)


def missing_folds(files: list[str], folder: str) -> list[str]:
    """The fold models the K-fold cells beneath ``folder`` lack: the ``files`` of each cell (the folder above their
    r<R>f<F> folders) should be every (repeat, fold) up to the largest of each; the missing ones' names (prefixed
    with the cell's path under ``folder`` where ``folder`` holds several cells). Files not in fold folders: none."""
    cells: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for f in files:
        parts = f.rstrip("/").split("/")
        m = FOLD_RE.fullmatch(parts[-2]) if len(parts) >= 2 else None
        if m is None:
            return []  # not K-fold cells: nothing to count
        cells["/".join(parts[:-2])].add((int(m.group(1)), int(m.group(2))))
    missing = []
    for cell, units in sorted(cells.items()):
        repeats, folds = max(r for r, _ in units) + 1, max(f for _, f in units) + 1
        where = f"{cell.removeprefix(folder.rstrip('/')).strip('/')}/" if len(cells) > 1 else ""
        missing += [f"{where}r{r}f{k}" for r in range(repeats) for k in range(folds) if (r, k) not in units]
    return missing


def expand_checkpoints(paths: list[str | os.PathLike[str]], *, allow_partial: bool = False) -> list[str]:
    """Checkpoint files for ``paths``: a file as given, a folder as every ``checkpoint.pt`` beneath it (sorted).
    Paths may be URIs (``s3://bucket/…``: ``ltc.io``), files or folders alike.

    A file reached twice (e.g. a folder and one of its files) counts once, at its first place. A K-fold cell's
    folder that lacks some of its fold models (``missing_folds``) is an error: its ensemble would average part of
    the folds, silently; ``allow_partial`` takes it as it is (a warning names what is missing).
    """
    out: dict[Path | str, str] = {}
    for given in paths:
        if io.is_uri(given):
            found_uris = _expand_uri(str(given))
            if found_uris != [str(given)]:  # a folder (prefix), not the one file given
                _check_folds(found_uris, str(given), allow_partial)
            for uri in found_uris:
                out.setdefault(uri, uri)
            continue
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob(CHECKPOINT_NAME) if p.is_file())
            if not found:
                raise MissingFileError(f"checkpoint folder {path} holds no {CHECKPOINT_NAME} (searched recursively)")
            log.info("checkpoint folder %s: %d %s file(s)", path, len(found), CHECKPOINT_NAME)
            _check_folds([str(p) for p in found], str(path), allow_partial)
        elif path.exists():
            found = [path]
        else:
            raise MissingFileError(f"checkpoint {path} does not exist")
        for p in found:
            out.setdefault(p.resolve(), str(p))
    return list(out.values())


def _check_folds(files: list[str], folder: str, allow_partial: bool) -> None:
    missing = missing_folds(files, folder)
    if not missing:
        return
    what = (
        f"{folder} holds {len(files)} fold models; {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''} missing"
    )
    if not allow_partial:
        raise MissingFileError(f"{what}: its ensemble would average part of the folds (--allow-partial to use it)")
    log.warning("%s: an ensemble of part of the folds", what)


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


def load_models(
    paths: list[str | os.PathLike[str]], *, device: torch.device, allow_partial: bool = False
) -> list[LoadedModel]:  # fmt: skip
    """Checkpoints (files, or folders: see ``expand_checkpoints``) ready to predict the same target(s)."""
    if not paths:
        raise ConfigError("give at least one --checkpoint")
    out = []
    recipes: dict[tuple, str] = {}  # how each model was trained (all but fold / seed) → a checkpoint of it
    for path in expand_checkpoints(paths, allow_partial=allow_partial):
        ckpt = load_checkpoint(path)
        recipes.setdefault(_recipe(ckpt), str(path))
        targets = ckpt["targets"]
        if out and _heads(targets) != _heads(out[0].targets):
            raise EnsembleError(
                f"{path} predicts {_heads(targets)}, but {out[0].path} predicts {_heads(out[0].targets)} "
                "(dataset, target, units): an ensemble needs checkpoints of the same target"
            )
        model = build_model(ckpt["model"]["name"], ckpt["model"]["config"])
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as err:  # torch lists every mismatched tensor: the first line says what
            raise CheckpointError(
                f"{path}: its weights do not fit its own {ckpt['model']['name']} config ({str(err).splitlines()[0]})"
            ) from None
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


# pred_lower / pred_upper: the ensemble's mean ∓ this many standard deviations of its models (of log10 kappa for
# kappa). The spread of the models, not a calibrated interval: fold models trained on overlapping data agree more
# than their errors do.
SPREAD_SIGMAS = 2.0


def combine(p: np.ndarray, *, kappa: bool) -> dict[str, np.ndarray]:
    """An ensemble's predictions ``p`` [models, n] (raw units) as columns of n: ``pred_mean``, ``pred_std`` (raw
    units), ``pred_log10_std``, ``pred_lower``, ``pred_upper``.

    Kappa is combined in log10 space, the space it is judged in: the mean is the geometric mean, the spread that of
    log10 kappa (predictions below ``KAPPA_FLOOR`` clipped first, as the metrics do). Other targets: the arithmetic
    mean ± std. One model: no spread (std NaN, both bounds the prediction).
    """
    from ltc.targets import KAPPA_FLOOR

    m = p.shape[0]
    nan = np.full(p.shape[1], np.nan)
    std = p.std(axis=0) if m > 1 else nan
    if kappa:
        logs = np.log10(np.maximum(p, KAPPA_FLOOR))
        mu, sigma = logs.mean(axis=0), logs.std(axis=0)
        lower, upper = 10.0 ** (mu - SPREAD_SIGMAS * sigma), 10.0 ** (mu + SPREAD_SIGMAS * sigma)
        return {"pred_mean": 10.0**mu, "pred_std": std, "pred_log10_std": sigma if m > 1 else nan,
                "pred_lower": lower, "pred_upper": upper}  # fmt: skip
    mean, sigma = p.mean(axis=0), p.std(axis=0)
    return {"pred_mean": mean, "pred_std": std, "pred_log10_std": nan,
            "pred_lower": mean - SPREAD_SIGMAS * sigma, "pred_upper": mean + SPREAD_SIGMAS * sigma}  # fmt: skip


TABLE_COLUMNS = ["id", "source", "formula", "target", "units", "n_models", "pred_mean", "pred_std", "pred_log10_std",
                 "pred_lower", "pred_upper"]  # fmt: skip


def prediction_table(models: list[LoadedModel], meta: pd.DataFrame, preds: np.ndarray) -> pd.DataFrame:
    """One row per (structure, head): ``meta`` (id, source, formula, and y_true when known; n rows), ``combine``'s
    columns, each model's ``pred_<i>`` and ``error`` (a non-finite prediction is an error, never a value)."""
    parts = []
    for k, target in enumerate(models[0].targets):
        p = preds[:, :, k]  # [models, n]
        cols = combine(p, kappa=bool(target.get("kappa")))
        bad = ~np.isfinite(p).all(axis=0)
        table = meta.assign(target=target["dataset"], units=target.get("units", ""), n_models=p.shape[0], **cols)
        table = table.assign(**{f"pred_{j}": p[j] for j in range(p.shape[0])})
        error = np.where(bad, "prediction is not finite (a model gave NaN or inf)", None)
        parts.append(table.assign(error=pd.Series(error, index=table.index, dtype=object)))
    return pd.concat(parts, ignore_index=True) if parts else meta


def error_table(models: list[LoadedModel], bad: list[tuple[str, str, str]]) -> pd.DataFrame:
    """One row per (unreadable structure, head): id, source, target, error."""
    return pd.DataFrame(
        [{"id": rid, "source": src, "target": t["dataset"], "units": t.get("units", ""), "error": why}
         for rid, src, why in bad for t in models[0].targets],
        columns=["id", "source", "target", "units", "error"],
    )  # fmt: skip


def candidate_graphs(fmt: str, payload: Any, configs: list[GraphConfig]) -> tuple[str, dict[GraphConfig, Any]] | str:
    """(reduced formula, a graph per config) of one candidate, or the reason it has none."""
    try:
        structure = datasets.parse_structure(fmt, payload)
        if len(structure) == 0:
            raise ValueError("no sites")
    except Exception as err:  # any reader failure is this structure's reason, not the run's
        return f"unreadable: {type(err).__name__}: {err}"[:300]
    try:
        return structure.composition.reduced_formula, {c: structure_to_graph(structure, config=c) for c in configs}
    except GraphError as err:
        return str(err)
    except Exception as err:  # e.g. a degenerate lattice inside pymatgen's neighbour search
        return f"graph failed: {type(err).__name__}: {err}"[:300]


def candidate_row(row: Any, input_name: str) -> tuple[str, str, str, Any, float] | tuple[str, str, str]:
    """A source row as (id, source, fmt, payload, y_true) or, rejected while reading, (id, source, reason)."""
    if isinstance(row, datasets.Rejected):
        return row.id, input_name, row.reason
    rid, fmt, payload, raw, *rest = row
    source = payload if fmt == "file" else (rest[0] if rest else input_name)
    y = datasets.finite_target(raw)[0] if raw is not None else None
    return rid, str(source), fmt, payload, float("nan") if y is None else y


@torch.no_grad()
def _forward(models: list[LoadedModel], batches: dict[GraphConfig, list], device) -> np.ndarray:
    """Raw-unit predictions [n_models, n_structures, n_heads]; ``batches`` maps a graph config to batches."""
    per_model = []
    for m in models:
        outs = [m.model(b.to(device)).double().cpu().numpy() for b in batches[m.graph]]
        scaled = np.concatenate(outs) if outs else np.zeros((0, len(m.scalers)))
        per_model.append(np.stack([s.inverse(scaled[:, k]) for k, s in enumerate(m.scalers)], axis=1))
    return np.stack(per_model)


def predict_graphs(
    models: list[LoadedModel], graphs: dict[GraphConfig, list], *, batch_size: int, device
) -> np.ndarray:  # fmt: skip
    """``_forward`` of in-memory graphs (one list per graph config, the same structures in the same order)."""
    batches = {
        c: [collate_graphs(g[i : i + batch_size]) for i in range(0, len(g), batch_size)] for c, g in graphs.items()
    }
    return _forward(models, batches, device)


def predict(
    checkpoints: list[str | os.PathLike[str]],
    input: str,
    *,
    batch_size: int = 256,
    device: str = "auto",
    home: str | os.PathLike[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    target: str | None = None,
    allow_partial: bool = False,
) -> pd.DataFrame:
    """Predictions for ``input`` from ``checkpoints``; see the module doc. ``input``: a dataset name, or a path read
    by ``datasets.candidate_source`` (``target``: the column / info key of known values, if any). A dataset's
    shards are verified against their checksums first, as training verifies them."""
    from ltc.shards import prepare
    from ltc.train import resolve_device

    dev = resolve_device(device)
    models = load_models(list(checkpoints), device=dev, allow_partial=allow_partial)
    configs = list(dict.fromkeys(m.graph for m in models))
    for c in configs:
        check_construction(c)  # a missing package is one error, not an error row per structure
    path = Path(input)
    if datasets.is_known(input):  # the dataset's shards (built-in or declared), with its true values
        shard_sets = {c: ShardSet(prepare(input, graph=c, home=home, cache=cache, verify=True).path) for c in configs}
        ids = list(shard_sets[configs[0]].ids)
        for s in shard_sets.values():  # graphs rejected under one setting but not another: use the common ones
            ids = [i for i in ids if i in s._positions]
        batches = {}
        for c, s in shard_sets.items():
            idx = s.indices_of(ids)
            batches[c] = [s.batch(idx[i : i + batch_size]) for i in range(0, len(idx), batch_size)]
        first = shard_sets[configs[0]]
        idx = first.indices_of(ids)
        meta = pd.DataFrame({"id": ids, "source": input, "formula": [first.formulas[i] for i in idx],
                             "y_true": first.y[idx]})  # fmt: skip
        table = prediction_table(models, meta, _forward(models, batches, dev))
    elif path.exists():
        source, folder = datasets.candidate_source(path, target=target)
        graphs: dict[GraphConfig, list] = {c: [] for c in configs}
        keep, bad = [], []
        for row in source.rows(folder):
            got = candidate_row(row, str(path))
            if len(got) == 3:
                bad.append(got)
                continue
            rid, src, fmt, payload, y = got
            built = candidate_graphs(fmt, payload, configs)
            if isinstance(built, str):
                bad.append((rid, src, built))
                continue
            for c in configs:
                graphs[c].append(built[1][c])
            keep.append({"id": rid, "source": src, "formula": built[0], "y_true": y})
        if not keep and not bad:
            raise MissingFileError(f"{path} holds no structures to predict")
        meta = pd.DataFrame(keep, columns=["id", "source", "formula", "y_true"])
        if meta.y_true.isna().all():
            meta = meta.drop(columns="y_true")  # no known values
        table = prediction_table(models, meta, predict_graphs(models, graphs, batch_size=batch_size, device=dev))
        if bad:
            table = pd.concat([table, error_table(models, bad)], ignore_index=True)
    else:
        raise MissingFileError(f"INPUT {input!r} is neither a file, a folder, nor a dataset name (see `ltc datasets`)")
    for col in [*TABLE_COLUMNS, "error"]:  # nothing readable: the error rows alone
        if col not in table.columns:
            table[col] = np.nan if col.startswith(("pred", "n_")) else None
    return rank(table, models)


def rank(table: pd.DataFrame, models: list[LoadedModel]) -> pd.DataFrame:
    """Kappa targets: rows ordered by predicted kappa, lowest first, with ``rank`` 1…n (errors last, unranked)."""
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


def score(table: pd.DataFrame) -> pd.DataFrame:
    """Per target, the ensemble mean's metrics against known values (``y_true``), on the rows that have both: n,
    MAE and R² in raw units, and for kappa targets (those ``rank`` orders) MAE and R² of log10 kappa, its headline
    metrics. Empty when no row has a known value."""
    if "y_true" not in table:
        return pd.DataFrame()
    rows = []
    for target, g in table[table.error.isna()].groupby("target", sort=False):
        known = g[g.y_true.notna() & g.pred_mean.notna()]
        if known.empty:
            continue
        kappa = bool(g["rank"].notna().any())
        m = regression_metrics(known.y_true.to_numpy(float), known.pred_mean.to_numpy(float), kappa=kappa)
        row = {"target": target, "units": g.units.iloc[0], "n": len(known), "mae": m["mae"], "r2": m["r2"]}
        if kappa:
            row |= {"mae_log10": m["mae_log10"], "r2_log10": m["r2_log10"]}
        rows.append(row)
    return pd.DataFrame(rows)
