"""ltc: pre-train / fine-tune sweeps of crystal graph neural networks for lattice thermal conductivity."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:  # one source of truth: pyproject.toml's version, as installed
    __version__ = version("ltc")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
