"""CHGNet: Deng, Zhong, Jun, Riebesell, Han, Bartel & Ceder, "CHGNet as a pretrained universal neural network
potential for charge-informed atomistic modelling", Nat. Mach. Intell. 5, 1031 (2023). A foundation model: its
0.3.0 weights were trained on the energies, forces, stresses and magnetic moments of MPtrj (1.58M structures,
146k materials), and ship inside the ``chgnet`` wheel, so loading them needs no network.

ltc reuses CHGNet's own modules (``chgnet.model``) and graph converter (``ltc.graphs``, construction "chgnet"),
and only arranges them into ltc's parts:

- ``embedding``: ``atom`` (element embedding), ``bond_basis`` (smooth radial Bessel bases of bond lengths, one set
  for the atom graph, 6 Å, and one for the bond graph, 3 Å; learnable frequencies), ``bond`` and the bond weights
  ``bond_weights_ag`` / ``bond_weights_bg``, ``angle_basis`` (Fourier bases of angles) and ``angle``;
- ``blocks``: CHGNet's ``n_conv`` interaction blocks (``CHGNetBlock``), each an atom convolution (two-body: atom,
  neighbour, bond) then, except in the last, a bond convolution on the bond graph (three-body: two bonds, their
  angle, their shared atom) and an angle update (three-body);
- ``readout``: CHGNet's readout LayerNorm on atom features, then the mean over atoms (``readout_dim`` = 64);
- ``heads``: ltc ``Head``s on those pooled features (default 64 → 64 → 64 → 64 → 1, SiLU, as CHGNet's own MLP).

CHGNet's energy head (its per-atom MLP, summed and divided by the atom count, plus the fixed per-element
reference energies of ``AtomRef``) is kept as ``energy_head`` so that ``energy(batch)`` reproduces CHGNet's
energy prediction; it is not on the property path and no fine-tuning strategy trains it (``inert_modules``).
Forces, stresses and magnetic moments are not computed (the bond vectors come precomputed from the shards).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch_geometric.nn import global_mean_pool

from ltc.archs import ARCHS, CHGNetConfig, require_package
from ltc.errors import ConfigError
from ltc.graphs import CHGNET_MAX_Z, GraphConfig
from ltc.models.base import CrystalGNN


class CHGNetBlock(nn.Module):
    """One CHGNet interaction block: atom convolution (two-body), then, if present, bond convolution and angle
    update on the bond graph (three-body). CHGNet's last block has the atom convolution only."""

    def __init__(self, atom_conv: nn.Module, bond_conv: nn.Module | None, angle_update: nn.Module | None) -> None:
        super().__init__()
        self.atom_conv = atom_conv
        self.bond_conv = bond_conv
        self.angle_update = angle_update

    def forward(
        self,
        atom: torch.Tensor,
        bond: torch.Tensor,
        angle: torch.Tensor | None,
        graph: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """atom [N, da], bond [U, db], angle [A, dg] or None (no angles in the batch) → the same, updated.

        ``graph``: ``atom_graph`` [E, 2] (centre, neighbour), ``directed2undirected`` [E], ``bond_graph`` [A, 3]
        (atom, bond i, bond j), ``weights_ag`` [U, da] and ``weights_bg`` [U, db] (CHGNet's bond weights).
        """
        atom = self.atom_conv(
            atom_feas=atom,
            bond_feas=bond,
            bond_weights=graph["weights_ag"],
            atom_graph=graph["atom_graph"],
            directed2undirected=graph["directed2undirected"],
        )
        # as CHGNet's _compute: the bond graph layers run only when the batch has angles
        if angle is not None and self.bond_conv is not None:
            bond = self.bond_conv(
                atom_feas=atom,
                bond_feas=bond,
                bond_weights=graph["weights_bg"],
                angle_feas=angle,
                bond_graph=graph["bond_graph"],
            )
            if self.angle_update is not None:
                angle = self.angle_update(
                    atom_feas=atom, bond_feas=bond, angle_feas=angle, bond_graph=graph["bond_graph"]
                )
        return atom, bond, angle

    def __repr__(self) -> str:
        parts = [n for n in ("atom_conv", "bond_conv", "angle_update") if getattr(self, n) is not None]
        return f"CHGNetBlock({', '.join(parts)})"


class CHGNetReadout(nn.Module):
    """CHGNet's readout normalisation on atom features, then the mean over each crystal's atoms."""

    def __init__(self, norm: nn.Module | None) -> None:
        super().__init__()
        self.norm = norm if norm is not None else nn.Identity()

    def forward(self, atom: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        """atom [N, d], batch [N] → [B, d]."""
        return global_mean_pool(self.norm(atom), batch, size=num_graphs)


def _build_chgnet(config: CHGNetConfig):
    """chgnet's own ``CHGNet`` for ``config`` (its constructor prints a line; kept quiet)."""
    require_package("chgnet")
    from chgnet.model.model import CHGNet as ChgnetModel

    with contextlib.redirect_stdout(io.StringIO()):
        return ChgnetModel(**config.chgnet_args())


DEFAULT_CONFIG = CHGNetConfig()  # frozen: one shared default


class CHGNet(CrystalGNN):
    """Crystal Hamiltonian Graph neural Network (Deng et al. 2023), from chgnet's modules; a foundation model.

    Needs the "chgnet" graphs (``ltc.graphs``): ``batch.directed2undirected``, ``undirected2directed`` and
    ``angle_edges`` beside the usual fields.
    """

    name = "chgnet"
    config_class = CHGNetConfig
    constructions = ARCHS["chgnet"].constructions

    def __init__(self, config: CHGNetConfig = DEFAULT_CONFIG, *, core: nn.Module | None = None) -> None:
        """``core``: a chgnet ``CHGNet`` of this config to take the modules from (e.g. with pretrained weights)."""
        super().__init__(config)
        core = core if core is not None else _build_chgnet(config)
        self.embedding = nn.ModuleDict(
            {
                "atom": core.atom_embedding,
                "bond_basis": core.bond_basis_expansion,
                "bond": core.bond_embedding,
                "bond_weights_ag": core.bond_weights_ag,
                "bond_weights_bg": core.bond_weights_bg,
                "angle_basis": core.angle_basis_expansion,
                "angle": core.angle_embedding,
            }
        )
        n = config.n_conv
        self.blocks = nn.ModuleList(
            CHGNetBlock(
                core.atom_conv_layers[i],
                core.bond_conv_layers[i] if i < n - 1 else None,
                core.angle_layers[i] if i < n - 1 else None,
            )
            for i in range(n)
        )
        self.readout = CHGNetReadout(core.readout_norm)
        self.readout_dim = config.atom_fea_dim
        self.heads = self._make_heads()
        # CHGNet's energy head: per-atom MLP (mean over atoms) + AtomRef's fixed per-element energies
        self.energy_head = nn.ModuleDict({"mlp": core.mlp, "atom_ref": core.composition_model})

    def _graph(self, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """CHGNet's bond-graph tensors of a batch, and the atom-graph bond bases [U, num_radial]."""
        emb = self.embedding
        # bond lengths of the U bonds, from one directed edge each (as CHGNet's BondEncoder)
        lengths = batch.edge_dist[batch.undirected2directed]
        bases_ag = emb["bond_basis"].rbf_expansion_ag(lengths)
        bases_bg = emb["bond_basis"].rbf_expansion_bg(lengths)
        d2u, angles = batch.directed2undirected, batch.angle_edges
        centre = batch.edge_index[1]
        graph = {
            "atom_graph": torch.stack([centre, batch.edge_index[0]], dim=1),  # CHGNet: (centre, neighbour)
            "directed2undirected": d2u,
            "bond_graph": torch.stack([centre[angles[:, 0]], d2u[angles[:, 0]], d2u[angles[:, 1]]], dim=1),
            "weights_ag": emb["bond_weights_ag"](bases_ag),
            "weights_bg": emb["bond_weights_bg"](bases_bg),
        }
        return graph, bases_ag

    def atom_features(self, batch) -> torch.Tensor:
        """Atom features [N, atom_fea_dim] after the last block (before the readout normalisation)."""
        emb = self.embedding
        graph, bases_ag = self._graph(batch)
        atom = emb["atom"](batch.z - 1)  # CHGNet: H is row 0
        bond = emb["bond"](bases_ag)
        angle = None
        if batch.angle_edges.shape[0]:
            # CHGNet's bond vectors point from neighbour to centre, unit length; the shards' point the other way
            unit = -batch.edge_vec / batch.edge_dist[:, None]
            a = batch.angle_edges
            angle = emb["angle"](emb["angle_basis"](unit[a[:, 0]], unit[a[:, 1]]))
        for block in self.blocks:
            atom, bond, angle = block(atom, bond, angle, graph)
        return atom

    def encode(self, batch) -> torch.Tensor:
        return self.readout(self.atom_features(batch), batch.batch, batch.num_graphs)

    def energy(self, batch) -> torch.Tensor:
        """CHGNet's energy prediction [B] in eV/atom, from its own energy head (not a property head)."""
        atom = self.readout.norm(self.atom_features(batch))
        per_atom = self.energy_head["mlp"](atom).view(-1)
        energy = global_mean_pool(per_atom, batch.batch, size=batch.num_graphs)
        # AtomRef, as chgnet's: element counts / atom count, times the per-element energies
        fractions = nn.functional.one_hot(batch.z - 1, CHGNET_MAX_Z).float()
        fractions = global_mean_pool(fractions, batch.batch, size=batch.num_graphs)
        return energy + self.energy_head["atom_ref"].fc(fractions).view(-1)

    def inert_modules(self) -> list[nn.Module]:
        return [self.energy_head]

    def two_body_modules(self) -> list[nn.Module]:
        # atom convolutions: messages from (atom, neighbour, bond), as ALIGNN's node_update
        return [b.atom_conv for b in self.blocks]

    def three_body_modules(self) -> list[nn.Module]:
        # the bond-graph layers: bond convolution (two bonds, their angle, their atom) and angle update, as
        # ALIGNN's line-graph edge_update
        return [m for b in self.blocks for m in (b.bond_conv, b.angle_update) if m is not None]

    def extra_summary(self) -> str:
        c = self.config
        return f"atom_fea_dim={c.atom_fea_dim}, cutoffs={c.atom_graph_cutoff:g}/{c.bond_graph_cutoff:g} Å"


# The weights files of the chgnet wheel, by version (under chgnet/pretrained/).
WEIGHTS = {"0.3.0": "0.3.0/chgnet_0.3.0_e29f68s314m37.pth.tar"}


def weights_path(version: str) -> Path:
    """The weights file of CHGNet ``version`` inside the installed chgnet package."""
    require_package("chgnet")
    if version not in WEIGHTS:
        raise ConfigError(f"CHGNet version {version!r} is not known to ltc; known: {list(WEIGHTS)}")
    import chgnet

    path = Path(chgnet.__file__).parent / "pretrained" / WEIGHTS[version]
    if not path.is_file():
        raise ConfigError(f"the installed chgnet ({chgnet.__version__}) has no weights file {path}")
    return path


def load_pretrained(version: str = "0.3.0") -> tuple[CHGNet, GraphConfig, dict[str, Any]]:
    """CHGNet ``version``'s pretrained weights from the chgnet wheel, in an ltc ``CHGNet`` (one fresh head).

    Returns the model, the graphs it was trained on and where the weights came from. The file is read with
    ``torch.load(weights_only=True)`` (chgnet's own loader unpickles it in full), and the model is built from
    its ``model_args`` and ``state_dict`` with chgnet's ``CHGNet``; the head is random (seeded by the caller).
    """
    import chgnet

    path = weights_path(version)
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    config = CHGNetConfig.from_chgnet_args(state["model_args"])
    core = _build_chgnet(config)
    core.load_state_dict(state["state_dict"])  # strict: every tensor of the file has its place
    model = CHGNet(config, core=core)
    graph = GraphConfig(cutoff=config.atom_graph_cutoff, construction="chgnet", bond_cutoff=config.bond_graph_cutoff)
    source = {"weights": f"chgnet/pretrained/{WEIGHTS[version]}", "chgnet_version": chgnet.__version__}
    return model, graph, source
