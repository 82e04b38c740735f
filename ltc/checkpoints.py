"""Checkpoints: a plain dict, written atomically, read with ``torch.load(weights_only=True)``.

Keys: ``format`` ("ltc-checkpoint"), ``version``, ``ltc_version``, ``state_sha256`` (``state_digest``: checked at
load), ``model`` ({name, config}),
``state_dict``, ``graph`` (the graph settings the model was trained on), ``targets`` (per head: dataset,
units, kappa flag, target scaler), ``history`` (one entry per training stage, oldest first) and
``metrics`` (of the last stage).
"""

from __future__ import annotations

import hashlib
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
_WHAT_LTC_READS = "ltc starts from checkpoints that `ltc train` or a sweep wrote, or a pretrained model by name"


class CheckpointError(DataError):
    """A checkpoint that is damaged, not ltc's, or does not fit the run."""


def state_digest(state_dict: dict[str, Any]) -> str:
    """SHA-256 over a state dict's tensors (names, dtypes, shapes, bytes): what ``load_checkpoint`` checks, so that
    flipped bytes in the weights are found, not predicted with."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.detach().cpu().reshape(-1).contiguous()  # 1-D: a 0-D tensor cannot be viewed as bytes
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike[str], ckpt: dict[str, Any]) -> Path:
    """Write ``ckpt`` to ``path`` atomically (temp file, then rename), with the digest of its weights."""
    payload = {"format": FORMAT, "version": VERSION, "ltc_version": __version__, **ckpt}
    if "state_dict" in ckpt:
        payload["state_sha256"] = state_digest(ckpt["state_dict"])
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
    except pickle.UnpicklingError as err:
        # torch's message runs to a dozen lines with terminal escapes; the classes it refused are what matter
        try:
            refused = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not even a file torch.save wrote
            refused = []
        if not refused:
            raise CheckpointError(f"{shown}: damaged or not a checkpoint (not a file torch.save wrote)") from err
        what = f"pickled Python objects ({', '.join(refused[:3])}{', …' if len(refused) > 3 else ''})"
        raise CheckpointError(
            f"{shown} is not an ltc checkpoint: it holds {what}, which ltc never loads (weights_only=True runs no "
            f"code); {_WHAT_LTC_READS}"
        ) from err
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{shown}: damaged or not a checkpoint ({type(err).__name__}: {first})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            what = f"a bare state_dict ({len(ckpt)} tensors) with no model config, graphs or target scaler"
        elif isinstance(ckpt, dict):
            what = f"a dict without ltc's format key (keys: {', '.join(map(str, list(ckpt)[:6]))})"
        else:
            what = f"a {type(ckpt).__name__}"
        raise CheckpointError(f"{shown} is not an ltc checkpoint: {what}; {_WHAT_LTC_READS}")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{shown}: checkpoint version {ckpt.get('version')}, this ltc reads {VERSION}")
    # checkpoints written before the digest have none: they load as they did
    if "state_sha256" in ckpt and state_digest(ckpt["state_dict"]) != ckpt["state_sha256"]:
        raise CheckpointError(f"{shown}: its weights changed since it was written (checksum mismatch): damaged")
    name = ckpt["model"]["name"]
    if model is not None and name != model:
        raise CheckpointError(f"{shown} holds a {name} model, not {model}")
    return ckpt
