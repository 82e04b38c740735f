"""Crystal graph models: ``MODELS[name](config)``; one file per architecture."""

from __future__ import annotations

from typing import Any

from ltc.archs import MODEL_NAMES, ALIGNNConfig, CGCNNConfig, CHGNetConfig, MEGNetConfig, ModelConfig, model_config
from ltc.choices import PRETRAINED, Pretrained
from ltc.errors import ConfigError
from ltc.models.alignn import ALIGNN
from ltc.models.base import CrystalGNN, Head
from ltc.models.cgcnn import CGCNN
from ltc.models.chgnet import CHGNet
from ltc.models.megnet import MEGNet

MODELS: dict[str, type[CrystalGNN]] = {"cgcnn": CGCNN, "megnet": MEGNet, "alignn": ALIGNN, "chgnet": CHGNet}
assert tuple(MODELS) == MODEL_NAMES  # ltc.archs names them for the CLI and validation, without torch

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
    config = model_config(name, config)
    check_fits(name, config)
    return MODELS[name](config)


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
