"""Model architectures as names, configs and facts, importable without torch.

The CLI's choices, ``--dry-run`` and the sweep spec read them here (``ltc --help`` never imports torch);
``ltc.models`` builds the networks from the same config classes. ``ARCHS[name]`` says what validation needs
of a model without building it: its config class, the graph constructions it reads, how many blocks a config
gives (what ``n_unfrozen`` counts) and whether it has three-body parts. ``tests/test_models.py`` checks these
facts against the built models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from importlib.util import find_spec
from typing import Any

from ltc.errors import ConfigError

# Activation names a head may use (``ltc.models.base.ACTIVATIONS`` maps each to its torch module)
ACTIVATION_NAMES = ("relu", "silu", "softplus", "none")


@dataclass(frozen=True)
class ModelConfig:
    """Fields every model config has; subclasses add their architecture's sizes."""

    n_targets: int = 1
    head_hidden: tuple[int, ...] = ()  # hidden widths of each head's MLP; () = one Linear
    head_activation: str = "relu"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # configs read back from JSON or checkpoints hold lists
                object.__setattr__(self, f.name, tuple(value))
        if not isinstance(self.n_targets, int) or self.n_targets < 1:
            raise ConfigError(f"n_targets={self.n_targets!r} must be an integer >= 1")
        if any(not isinstance(h, int) or h < 1 for h in self.head_hidden):
            raise ConfigError(f"head_hidden={self.head_hidden!r} must be positive integers")
        if self.head_activation not in ACTIVATION_NAMES:
            raise ConfigError(f"head_activation={self.head_activation!r} must be one of {list(ACTIVATION_NAMES)}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


def positive(config: ModelConfig, *names: str) -> None:
    """Each named field of ``config`` is an integer >= 1 (bools are not)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be an integer >= 1")


@dataclass(frozen=True)
class CGCNNConfig(ModelConfig):
    hidden: int = 64  # atom feature width (reference: atom_fea_len 64)
    n_blocks: int = 3  # convolutions (reference: n_conv 3)
    fc_dim: int = 128  # readout width (reference: h_fea_len 128)
    rbf_stop: float = 8.0  # Å, last Gaussian centre (reference: radius 8)
    rbf_step: float = 0.2  # Å, spacing and width of the Gaussians

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "hidden", "n_blocks", "fc_dim")
        if not self.rbf_stop > 0 or not 0 < self.rbf_step < self.rbf_stop:
            raise ConfigError(f"rbf_stop={self.rbf_stop!r}, rbf_step={self.rbf_step!r}: need 0 < step < stop")


@dataclass(frozen=True)
class MEGNetConfig(ModelConfig):
    n_blocks: int = 3
    node_embedding: int = 16
    state_dim: int = 2
    rbf_num: int = 100
    rbf_stop: float = 5.0  # Å: cutoff + 1 for matgl's 4 Å graphs
    rbf_width: float = 0.5  # Å
    dense: tuple[int, ...] = (64, 32)  # encoder and pre-block dense widths; the last is the block width
    conv: tuple[int, ...] = (64, 64, 32)  # edge/node/state update MLPs; the last must equal dense[-1]
    output: tuple[int, ...] = (32, 16)  # readout dense widths after Set2Set; the last is readout_dim
    set2set_steps: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "n_blocks", "node_embedding", "state_dim", "rbf_num", "set2set_steps")
        for name in ("dense", "conv", "output"):
            widths = getattr(self, name)
            if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
                raise ConfigError(f"{name}={widths!r} must be a non-empty tuple of positive integers")
        if self.conv[-1] != self.dense[-1]:
            raise ConfigError(f"conv[-1]={self.conv[-1]} must equal dense[-1]={self.dense[-1]} (residual blocks)")


@dataclass(frozen=True)
class ALIGNNConfig(ModelConfig):
    alignn_layers: int = 4
    gcn_layers: int = 4
    hidden: int = 256
    embedding: int = 64
    edge_bins: int = 80
    angle_bins: int = 40
    rbf_stop: float = 8.0  # Å
    # line graph keeps bond pairs a→b→a, as ALIGNN's; ltc.train sets it from GraphConfig.line_graph_backtracking.
    # False by default: the line graph of the "knn" graphs, and of every checkpoint made before this field.
    backtracking: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "hidden", "embedding", "edge_bins", "angle_bins")
        for name in ("alignn_layers", "gcn_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}={v!r} must be an integer >= 0")
        if self.alignn_layers + self.gcn_layers < 1:
            raise ConfigError("ALIGNN needs at least one layer (alignn_layers + gcn_layers >= 1)")
        if not isinstance(self.backtracking, bool):
            raise ConfigError(f"backtracking={self.backtracking!r} must be true or false")


NORMS = ("layer", "batch", "none")  # CHGNet's normalisations inside its gated MLPs and readout


@dataclass(frozen=True)
class CHGNetConfig(ModelConfig):
    """CHGNet's architecture arguments (its ``model_args``, defaults those of 0.3.0) and ltc's property heads."""

    head_hidden: tuple[int, ...] = (64, 64, 64)  # CHGNet's own readout MLP widths
    head_activation: str = "silu"
    atom_fea_dim: int = 64
    bond_fea_dim: int = 64
    angle_fea_dim: int = 64
    num_radial: int = 31
    num_angular: int = 31  # odd: 1 + sin and cos of (num_angular - 1) / 2 frequencies
    n_conv: int = 4
    atom_conv_hidden_dim: int = 64
    bond_conv_hidden_dim: int = 64
    angle_layer_hidden_dim: int = 0  # 0: the angle update's gated MLP has no hidden layer
    mlp_hidden_dims: tuple[int, ...] = (64, 64, 64)  # CHGNet's energy head (kept, never trained)
    atom_graph_cutoff: float = 6.0  # Å: must be the graphs' cutoff (ltc.train sets it from them)
    bond_graph_cutoff: float = 3.0  # Å: must be the graphs' bond_cutoff
    cutoff_coeff: int = 8  # smoothness of the polynomial envelope that takes the bond bases to 0 at the cutoff
    learnable_rbf: bool = True
    non_linearity: str = "silu"
    gmlp_norm: str = "layer"  # CHGNet's gMLP_norm: normalisation inside the gated MLPs, one of NORMS
    readout_norm: str = "layer"  # one of NORMS
    conv_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "atom_fea_dim", "bond_fea_dim", "angle_fea_dim", "num_radial", "num_angular", "n_conv")
        if self.num_angular % 2 != 1:
            raise ConfigError(f"num_angular={self.num_angular} must be odd (CHGNet's Fourier angle bases)")
        for name in ("gmlp_norm", "readout_norm"):
            if getattr(self, name) not in NORMS:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be one of {list(NORMS)}")
        if not 0 < self.bond_graph_cutoff <= self.atom_graph_cutoff:
            raise ConfigError(
                f"bond_graph_cutoff={self.bond_graph_cutoff} must be > 0 and <= "
                f"atom_graph_cutoff={self.atom_graph_cutoff}"
            )

    def chgnet_args(self) -> dict[str, Any]:
        """Keyword arguments of ``chgnet.model.CHGNet`` for this architecture."""
        norm = {"none": None}
        return {
            "atom_fea_dim": self.atom_fea_dim,
            "bond_fea_dim": self.bond_fea_dim,
            "angle_fea_dim": self.angle_fea_dim,
            "composition_model": "MPtrj",  # AtomRef's per-element energies (the weights overwrite them)
            "num_radial": self.num_radial,
            "num_angular": self.num_angular,
            "n_conv": self.n_conv,
            "atom_conv_hidden_dim": self.atom_conv_hidden_dim,
            "update_bond": True,
            "bond_conv_hidden_dim": self.bond_conv_hidden_dim,
            "update_angle": True,
            "angle_layer_hidden_dim": self.angle_layer_hidden_dim,
            "conv_dropout": self.conv_dropout,
            "mlp_hidden_dims": list(self.mlp_hidden_dims),
            "mlp_first": True,  # the energy head: per-atom energies, then their mean
            "is_intensive": True,
            "non_linearity": self.non_linearity,
            "atom_graph_cutoff": self.atom_graph_cutoff,
            "bond_graph_cutoff": self.bond_graph_cutoff,
            "cutoff_coeff": self.cutoff_coeff,
            "learnable_rbf": self.learnable_rbf,
            "gMLP_norm": norm.get(self.gmlp_norm, self.gmlp_norm),
            "readout_norm": norm.get(self.readout_norm, self.readout_norm),
        }

    @classmethod
    def from_chgnet_args(cls, args: dict[str, Any], **overrides: Any) -> CHGNetConfig:
        """The config of a CHGNet built with ``args`` (a weights file's ``model_args``); other settings are errors."""
        fixed = {"composition_model": "MPtrj", "update_bond": True, "update_angle": True, "mlp_first": True}
        fixed |= {"is_intensive": True, "mlp_dropout": 0}
        # read_out is unused when mlp_first; the converter's algorithm and the version do not change the model
        ignored = {"read_out", "graph_converter_algorithm", "version"}
        renamed = {"gMLP_norm": "gmlp_norm"}
        fields: dict[str, Any] = {}
        for key, value in args.items():
            if key in ignored:
                continue
            if key in fixed:
                if value != fixed[key]:
                    raise ConfigError(f"CHGNet with {key}={value!r} is not supported by ltc (needs {fixed[key]!r})")
                continue
            name = renamed.get(key, key)
            if name not in cls.__dataclass_fields__ or name in ModelConfig.__dataclass_fields__:
                raise ConfigError(f"CHGNet argument {key}={value!r} is not supported by ltc")
            fields[name] = "none" if value is None and name.endswith("_norm") else value
        for name in ("atom_graph_cutoff", "bond_graph_cutoff"):
            if name in fields:
                fields[name] = float(fields[name])
        return cls(**fields, **overrides)


@dataclass(frozen=True)
class ArchInfo:
    """What validation needs of an architecture without building it (``tests/test_models.py`` checks each)."""

    config_class: type[ModelConfig]
    n_blocks: Callable[[Any], int]  # config -> len(model.blocks): the range of n_unfrozen
    three_body: Callable[[Any], bool]  # config -> whether model.three_body_modules() is non-empty
    constructions: tuple[str, ...] | None = None  # graph constructions it reads (ltc.graphs.CONSTRUCTIONS); None: any
    package: str | None = None  # a package the model is built from, installed by an extra


ARCHS: dict[str, ArchInfo] = {
    "cgcnn": ArchInfo(CGCNNConfig, lambda c: c.n_blocks, lambda c: False),
    "megnet": ArchInfo(MEGNetConfig, lambda c: c.n_blocks, lambda c: False),
    "alignn": ArchInfo(ALIGNNConfig, lambda c: c.alignn_layers + c.gcn_layers, lambda c: c.alignn_layers > 0),
    # the last of CHGNet's n_conv blocks has no bond graph layers
    "chgnet": ArchInfo(CHGNetConfig, lambda c: c.n_conv, lambda c: c.n_conv > 1, ("chgnet",), "chgnet"),
}
MODEL_NAMES = tuple(ARCHS)


def model_config(name: str, config: dict[str, Any] | ModelConfig | None = None) -> ModelConfig:
    """The validated config of model ``name`` from a config, a plain dict of its fields (unknown fields are
    errors) or None (the defaults); an unknown name, or a model whose package is missing, is a ``ConfigError``."""
    try:
        arch = ARCHS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(ARCHS)}") from None
    require_package(name)
    if config is None:
        return arch.config_class()
    if isinstance(config, dict):
        return arch.config_class.from_dict(config)
    if not isinstance(config, arch.config_class):
        raise TypeError(f"{name} needs a {arch.config_class.__name__}, got {type(config).__name__}")
    return config


def require_package(name: str) -> None:
    """A ``ConfigError`` naming the extra to install when model ``name`` is built from a package that is missing."""
    package = ARCHS[name].package
    if package is not None and find_spec(package) is None:
        raise ConfigError(f"model {name} needs the {package} package: pip install 'ltc[{package}]'")
