"""Crystal graph models: ``MODELS[name](config)``; one file per architecture."""

from __future__ import annotations

from typing import Any

from ltc.errors import ConfigError
from ltc.models.alignn import ALIGNN, ALIGNNConfig
from ltc.models.base import CrystalGNN, Head, ModelConfig
from ltc.models.cgcnn import CGCNN, CGCNNConfig
from ltc.models.megnet import MEGNet, MEGNetConfig

MODELS: dict[str, type[CrystalGNN]] = {"cgcnn": CGCNN, "megnet": MEGNet, "alignn": ALIGNN}

__all__ = [
    "ALIGNN",
    "CGCNN",
    "MODELS",
    "ALIGNNConfig",
    "CGCNNConfig",
    "CrystalGNN",
    "Head",
    "MEGNet",
    "MEGNetConfig",
    "ModelConfig",
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
    return cls(config)
