"""ALIGNN: Choudhary & DeCost, "Atomistic Line Graph Neural Network for improved materials property
predictions", npj Comput. Mater. 7, 185 (2021). The 2021 layout (BatchNorm, no bottleneck), as Devi
et al. (2024) used: 4 ALIGNN layers then 4 edge-gated GCN layers, hidden 256, CGCNN atom features.

Bonds start from an RBF of their length (80 bins, 0–8 Å), angles from an RBF of their cosine (40 bins,
-1…1); both through two dense layers (64, then hidden). The line graph (bond pairs sharing an atom)
and its angles are built per batch from the shard's edge vectors, on the batch's device. On the reference
("jarvis") graphs it is DGL's ``line_graph(shared=True)``, as ALIGNN builds it: every pair a→b, b→c,
including c = a (``backtracking``); ``ltc.train`` sets ``backtracking`` from the graphs' construction.

An ALIGNN layer updates bonds on the line graph with angles as its edges (``edge_update``: three-body),
then atoms on the crystal graph with the new bonds (``node_update``: two-body). A GCN layer is a
``node_update`` alone. Readout: mean over atoms (``readout_dim`` = hidden); the head is ALIGNN's ``fc``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import global_mean_pool
from torch_geometric.utils import scatter

from ltc.archs import ALIGNNConfig
from ltc.graphs import cgcnn_atom_features
from ltc.models.base import RBF, CrystalGNN


def _dense(a: int, b: int) -> nn.Sequential:
    """ALIGNN's MLPLayer: Linear, BatchNorm, SiLU."""
    return nn.Sequential(nn.Linear(a, b), nn.BatchNorm1d(b), nn.SiLU())


class EdgeGatedGraphConv(nn.Module):
    """Edge-gated graph convolution (Bresson & Laurent 2017, arXiv:1711.07553), as in ALIGNN.

    ``m_ij = A x_i + B x_j + C e_ij``; ``x_i' = x_i + SiLU(BN(U x_i + sum_j s(m_ij) V x_j / (sum_j s(m_ij) + eps)))``;
    ``e_ij' = e_ij + SiLU(BN(m_ij))`` (s = sigmoid; residuals optional). PyG's ``ResGatedGraphConv``
    has no edge update and no normalised gate sum, hence this layer.
    """

    def __init__(self, dim: int, *, residual: bool = True) -> None:
        super().__init__()
        self.src_gate = nn.Linear(dim, dim)
        self.dst_gate = nn.Linear(dim, dim)
        self.edge_gate = nn.Linear(dim, dim)
        self.bn_edges = nn.BatchNorm1d(dim)
        self.src_update = nn.Linear(dim, dim)
        self.dst_update = nn.Linear(dim, dim)
        self.bn_nodes = nn.BatchNorm1d(dim)
        self.residual = residual

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d], edge_index [2, E] (source j → target i), e [E, d] → (x', e')."""
        src, dst = edge_index
        m = self.src_gate(x)[src] + self.dst_gate(x)[dst] + self.edge_gate(e)
        sigma = torch.sigmoid(m)
        n = x.shape[0]
        num = scatter(sigma * self.dst_update(x)[src], dst, dim=0, dim_size=n, reduce="sum")
        den = scatter(sigma, dst, dim=0, dim_size=n, reduce="sum")
        h = self.src_update(x) + num / (den + 1e-6)
        x_new = nn.functional.silu(self.bn_nodes(h))
        e_new = nn.functional.silu(self.bn_edges(m))
        if self.residual:
            x_new, e_new = x + x_new, e + e_new
        return x_new, e_new


class ALIGNNLayer(nn.Module):
    """Bond update on the line graph (angles as its edges), then atom update with the new bonds."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.edge_update = EdgeGatedGraphConv(dim, residual=True)  # three-body
        self.node_update = EdgeGatedGraphConv(dim, residual=True)  # two-body

    def forward(self, x, y, z, edge_index, line_index):
        """x atoms [N, d], y bonds [E, d], z angles [T, d] → updated (x, y, z)."""
        y, z = self.edge_update(y, line_index, z)
        x, y = self.node_update(x, edge_index, y)
        return x, y, z


def line_graph(
    edge_index: torch.Tensor, edge_vec: torch.Tensor, num_nodes: int, *, backtracking: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bond pairs (a→b, b→c) sharing atom b, and the cosine of the angle a-b-c.

    Returns ``line_index`` [2, T] (bond → bond; PyG flow, source first) and ``cos`` [T]. With shard
    vectors ``v = r_src - r_dst``, the bond a→b points from b to a (``v1``) and b→c points from c to b,
    so the angle at b is between ``v1`` and ``-v2`` (ALIGNN's ``compute_bond_cosines``).

    ``backtracking``: keep pairs that return along the same bond (c = a, same image; cosine 1), as DGL's
    ``line_graph(shared=True)`` that ALIGNN calls; False drops them (ltc's line graph of "knn" graphs).
    """
    src, dst = edge_index
    n_edges = src.shape[0]
    # outgoing bonds of each atom, grouped
    order = torch.argsort(src, stable=True)
    out_deg = torch.bincount(src, minlength=num_nodes)
    out_start = torch.cumsum(out_deg, 0) - out_deg
    # every bond e1 = (a→b) pairs with each outgoing bond of b
    count = out_deg[dst]
    e1 = torch.repeat_interleave(torch.arange(n_edges, device=src.device), count)
    first = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    rank = torch.arange(e1.shape[0], device=src.device) - first
    e2 = order[out_start[dst[e1]] + rank]
    v1, v2 = edge_vec[e1], -edge_vec[e2]
    cos = ((v1 * v2).sum(-1) / (v1.norm(dim=-1) * v2.norm(dim=-1)).clamp_min(1e-12)).clamp(-1.0, 1.0)
    if backtracking:
        return torch.stack([e1, e2]), cos
    keep = ~((dst[e2] == src[e1]) & ((v1 - v2).abs().amax(-1) < 1e-4))
    return torch.stack([e1[keep], e2[keep]]), cos[keep]


DEFAULT_CONFIG = ALIGNNConfig()  # frozen: one shared default


class ALIGNN(CrystalGNN):
    """Atomistic Line Graph Neural Network (Choudhary & DeCost 2021); Devi et al.'s backbone."""

    name = "alignn"
    config_class = ALIGNNConfig

    def __init__(self, config: ALIGNNConfig = DEFAULT_CONFIG) -> None:
        super().__init__(config)
        c = config
        self.register_buffer("atom_table", torch.from_numpy(cgcnn_atom_features()))
        self.embedding = nn.ModuleDict(
            {
                "atom": _dense(self.atom_table.shape[1], c.hidden),
                "bond": nn.Sequential(
                    RBF(0.0, c.rbf_stop, c.edge_bins), _dense(c.edge_bins, c.embedding), _dense(c.embedding, c.hidden)
                ),
                "angle": nn.Sequential(
                    RBF(-1.0, 1.0, c.angle_bins), _dense(c.angle_bins, c.embedding), _dense(c.embedding, c.hidden)
                ),
            }
        )
        self.blocks = nn.ModuleList(
            [ALIGNNLayer(c.hidden) for _ in range(c.alignn_layers)]
            + [EdgeGatedGraphConv(c.hidden) for _ in range(c.gcn_layers)]
        )
        self.readout = nn.Identity()  # mean pooling, no parameters (ALIGNN's AvgPooling)
        self.readout_dim = c.hidden
        self.heads = self._make_heads()

    def encode(self, batch) -> torch.Tensor:
        x = self.embedding["atom"](self.atom_table[batch.z])
        y = self.embedding["bond"](batch.edge_dist)
        if self.config.alignn_layers:
            line_index, cos = line_graph(
                batch.edge_index, batch.edge_vec, x.shape[0], backtracking=self.config.backtracking
            )
            z = self.embedding["angle"](cos)
        for block in self.blocks:
            if isinstance(block, ALIGNNLayer):
                x, y, z = block(x, y, z, batch.edge_index, line_index)
            else:
                x, y = block(x, batch.edge_index, y)
        return self.readout(global_mean_pool(x, batch.batch, size=batch.num_graphs))

    def two_body_modules(self) -> list[nn.Module]:
        # Devi et al.'s "2b": node_update of every ALIGNN layer, and every GCN layer
        return [b.node_update if isinstance(b, ALIGNNLayer) else b for b in self.blocks]

    def three_body_modules(self) -> list[nn.Module]:
        # Devi et al.'s "3b": the line-graph (bond-angle) update of every ALIGNN layer
        return [b.edge_update for b in self.blocks if isinstance(b, ALIGNNLayer)]

    def extra_summary(self) -> str:
        c = self.config
        return (
            f"hidden={c.hidden}, alignn_layers={c.alignn_layers}, gcn_layers={c.gcn_layers}, "
            f"backtracking={c.backtracking}"
        )
