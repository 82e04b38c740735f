"""ltc: pre-train / fine-tune sweeps of crystal graph neural networks for lattice thermal conductivity."""

from __future__ import annotations

__version__ = "0.1.0"
