"""Crystal graph models: ``MODELS[name](config)``; one file per architecture."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ltc.errors import ConfigError
from ltc.graphs import GraphConfig
from ltc.models.alignn import ALIGNN, ALIGNNConfig
from ltc.models.base import CrystalGNN, Head, ModelConfig
from ltc.models.cgcnn import CGCNN, CGCNNConfig
from ltc.models.chgnet import CHGNet, CHGNetConfig, load_pretrained
from ltc.models.megnet import MEGNet, MEGNetConfig

MODELS: dict[str, type[CrystalGNN]] = {"cgcnn": CGCNN, "megnet": MEGNet, "alignn": ALIGNN, "chgnet": CHGNet}


@dataclass(frozen=True)
class Pretrained:
    """A pretrained model ltc can start from by name (``ltc train --init NAME``), with no property head."""

    model: str  # a name in MODELS
    description: str  # one line, for help texts
    # () -> (model with a fresh head, the graphs it was trained on, {where the weights came from})
    load: Callable[[], tuple[CrystalGNN, GraphConfig, dict[str, Any]]]


# Pretrained names → how to load them; weights come from installed packages, never from the network.
PRETRAINED: dict[str, Pretrained] = {
    "chgnet-0.3.0": Pretrained(
        "chgnet",
        "CHGNet 0.3.0 (Deng et al. 2023), trained on MPtrj energies, forces, stresses and magmoms; "
        "weights from the chgnet wheel (pip install 'ltc[chgnet]')",
        functools.partial(load_pretrained, "0.3.0"),
    ),
}

__all__ = [
    "ALIGNN",
    "CGCNN",
    "MODELS",
    "PRETRAINED",
    "ALIGNNConfig",
    "CGCNNConfig",
    "CHGNet",
    "CHGNetConfig",
    "CrystalGNN",
    "Head",
    "MEGNet",
    "MEGNetConfig",
    "ModelConfig",
    "Pretrained",
    "build_model",
]


def build_model(name: str, config: dict[str, Any] | ModelConfig | None = None) -> CrystalGNN:
    """Model ``name`` from a config dataclass or a plain dict of its fields (unknown fields are errors)."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None
    if config is None:
        config = cls.config_class()
    elif isinstance(config, dict):
        config = cls.config_class.from_dict(config)
    elif not isinstance(config, cls.config_class):
        raise TypeError(f"{name} needs a {cls.config_class.__name__}, got {type(config).__name__}")
    check_fits(name, config)
    return cls(config)


# What training holds per parameter (float32): the weight, its gradient and AdamW's two moments.
TRAINING_BYTES_PER_PARAMETER = 16


def check_fits(name: str, config: ModelConfig) -> None:
    """Refuse a model whose parameters and optimizer state alone exceed this machine's memory (``hidden: 1e6``
    asks for terabytes): counted on PyTorch's meta device, where building allocates nothing."""
    import psutil
    import torch

    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in MODELS[name](config).parameters())
    except Exception:  # a model whose construction needs real tensors: no estimate, build it as it is
        return
    need, have = n * TRAINING_BYTES_PER_PARAMETER, psutil.virtual_memory().total
    if need > have:
        raise ConfigError(
            f"{name} with {config.to_dict()}: {n:,} parameters need ~{need / 2**30:,.0f} GiB to train, more than this "
            f"machine's {have / 2**30:,.0f} GiB"
        )
