"""What every ltc model shares: embedding → ordered blocks → readout → head(s), and small layers.

A model maps a PyG ``Batch`` from ``ltc.shards`` (fields ``z, edge_index, edge_dist, edge_vec, batch``)
to predictions ``[B, n_targets]`` in the scaled target space. Its parts are attributes with fixed
names, so that fine-tuning can freeze them by position:

- ``embedding``: atom (and bond, angle) input layers;
- ``blocks``: ``nn.ModuleList`` of message-passing blocks, in order (``n_unfrozen=k`` trains the last k);
- ``readout``: pooling and the dense layers after it, giving ``[B, readout_dim]``;
- ``heads``: ``nn.ModuleList`` of ``Head``, one per target (several for multi-property pre-training).
"""

from __future__ import annotations

import itertools
import math
from typing import ClassVar

import torch
from torch import nn

from ltc.archs import ACTIVATION_NAMES, ModelConfig

ACTIVATIONS: dict[str, type[nn.Module] | None] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "none": None,
}
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES  # the names configs accept are the ones built here


class Head(nn.Module):
    """MLP ``in_dim → hidden… → 1``; ``out`` is its last ``Linear`` (Devi's "last layer")."""

    def __init__(self, in_dim: int, *, hidden: tuple[int, ...] = (), activation: str = "relu") -> None:
        super().__init__()
        act = ACTIVATIONS[activation]
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if act is not None:
                layers.append(act())
            width = h
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(width, 1)
        self.in_dim, self.widths, self.activation = in_dim, tuple(hidden), activation

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[B, in_dim] → [B, 1]."""
        return self.out(self.hidden(h))

    def __repr__(self) -> str:
        dims = "→".join(str(d) for d in (self.in_dim, *self.widths, 1))
        return f"Head({dims}, activation={self.activation})"


class RBF(nn.Module):
    """Radial basis expansion ``exp(-gamma (x - c_k)^2)`` on ``num`` centres from ``start`` to ``stop``.

    Written out rather than PyG's ``GaussianSmearing`` because each paper fixes its own width:
    CGCNN gamma = 1/0.2^2, MEGNet 1/0.5^2, ALIGNN 1/spacing.
    """

    def __init__(self, start: float, stop: float, num: int, gamma: float | None = None) -> None:
        super().__init__()
        centres = torch.linspace(start, stop, num)
        self.register_buffer("centres", centres, persistent=False)
        spacing = (stop - start) / max(num - 1, 1)
        self.gamma = float(gamma) if gamma is not None else 1.0 / spacing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[E] → [E, num]."""
        return torch.exp(-self.gamma * (x.unsqueeze(-1) - self.centres) ** 2)

    def __repr__(self) -> str:
        c = self.centres
        return f"RBF({float(c[0]):g}..{float(c[-1]):g}, num={c.numel()}, gamma={self.gamma:.3g})"


class ShiftedSoftplus(nn.Module):
    """``softplus(x) - log 2`` (MEGNet's "softplus2"): zero at zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(x) - math.log(2.0)


def mlp(dims: list[int], act: type[nn.Module], *, activate_last: bool = True) -> nn.Sequential:
    """Dense layers ``dims[0] → … → dims[-1]`` with ``act`` after each (and after the last if asked)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if activate_last or i < len(dims) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class CrystalGNN(nn.Module):
    """Base class: ``forward(batch) = cat([head(encode(batch)) for head in heads])`` → [B, n_targets]."""

    name: ClassVar[str]
    config_class: ClassVar[type[ModelConfig]]
    # the graph constructions (ltc.graphs.CONSTRUCTIONS) the model can read; None: any
    constructions: ClassVar[tuple[str, ...] | None] = None
    readout_dim: int

    embedding: nn.Module
    blocks: nn.ModuleList
    readout: nn.Module
    heads: nn.ModuleList

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    def _make_heads(self) -> nn.ModuleList:
        c = self.config
        return nn.ModuleList(
            Head(self.readout_dim, hidden=c.head_hidden, activation=c.head_activation) for _ in range(c.n_targets)
        )

    def encode(self, batch) -> torch.Tensor:  # pragma: no cover - interface
        """Graph features [B, readout_dim] after the readout."""
        raise NotImplementedError

    def forward(self, batch) -> torch.Tensor:
        """Predictions [B, n_heads], scaled target space."""
        h = self.encode(batch)
        return torch.cat([head(h) for head in self.heads], dim=1)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def two_body_modules(self) -> list[nn.Module]:
        """Modules updated by pair (bond) interactions: what Devi's "2-body" strategy trains."""
        return list(self.blocks)

    def three_body_modules(self) -> list[nn.Module]:
        """Modules updated by bond-angle (triplet) interactions: Devi's "3-body" strategy."""
        return []

    def inert_modules(self) -> list[nn.Module]:
        """Modules off the property path (e.g. CHGNet's energy head): no fine-tuning strategy trains them."""
        return []

    def reset_parameters(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def train(self, mode: bool = True) -> CrystalGNN:
        """As ``nn.Module.train``, but a BatchNorm whose parameters are all frozen stays in eval mode.

        Fine-tuning freezes parameters with ``requires_grad_(False)``; without this, a frozen block's
        BatchNorm would still update its running statistics on the new data.
        """
        super().train(mode)
        if mode:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    params = list(m.parameters(recurse=False))
                    if params and not any(p.requires_grad for p in params):
                        m.eval()
        return self

    def num_parameters(self, *, trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable)

    def extra_summary(self) -> str:
        return ""

    def __repr__(self) -> str:
        heads = ", ".join(repr(h) for h in self.heads[:2]) + (", …" if len(self.heads) > 2 else "")
        extra = self.extra_summary()
        return (
            f"{type(self).__name__}({extra}{', ' if extra else ''}n_blocks={self.n_blocks}, "
            f"readout_dim={self.readout_dim}, heads=[{heads}], "
            f"params={self.num_parameters():,} ({self.num_parameters(trainable=True):,} trainable))"
        )
