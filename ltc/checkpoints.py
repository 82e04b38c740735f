"""Checkpoints: a plain dict, written atomically, read with ``torch.load(weights_only=True)``.

Keys: ``format`` ("ltc-checkpoint"), ``version``, ``ltc_version``, ``model`` ({name, config}),
``state_dict``, ``graph`` (the graph settings the model was trained on), ``targets`` (per head: dataset,
units, kappa flag, target scaler), ``history`` (one entry per training stage, oldest first) and
``metrics`` (of the last stage).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from ltc import __version__
from ltc.errors import DataError, MissingFileError
from ltc.io import copy_file, is_uri, write_atomic

FORMAT = "ltc-checkpoint"
VERSION = 1


class CheckpointError(DataError):
    """A checkpoint that is damaged, not ltc's, or does not fit the run."""


def save_checkpoint(path: str | os.PathLike[str], ckpt: dict[str, Any]) -> Path:
    """Write ``ckpt`` to ``path`` atomically (temp file, then rename)."""
    payload = {"format": FORMAT, "version": VERSION, "ltc_version": __version__, **ckpt}
    return write_atomic(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | os.PathLike[str], *, model: str | None = None) -> dict[str, Any]:
    """Read an ltc checkpoint (no pickled code: ``weights_only=True``); ``model`` checks the architecture.

    ``path``: a local file, or a URI (``s3://…``: ``ltc.io``) copied to a temporary file first.
    """
    if is_uri(path):
        with tempfile.TemporaryDirectory(prefix="ltc-checkpoint-") as tmp:
            try:
                local = copy_file(str(path), Path(tmp) / "checkpoint.pt")
            except MissingFileError:
                raise MissingFileError(f"checkpoint {path} does not exist") from None
            return _load(local, shown=str(path), model=model)
    if not Path(path).is_file():
        raise MissingFileError(f"checkpoint {path} does not exist")
    return _load(Path(path), shown=str(path), model=model)


def _load(path: Path, *, shown: str, model: str | None) -> dict[str, Any]:
    """``load_checkpoint`` of the local file ``path``; errors name ``shown`` (the path or URI given)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{shown}: damaged or not a checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{shown} is not an ltc checkpoint")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{shown}: checkpoint version {ckpt.get('version')}, this ltc reads {VERSION}")
    name = ckpt["model"]["name"]
    if model is not None and name != model:
        raise CheckpointError(f"{shown} holds a {name} model, not {model}")
    return ckpt
