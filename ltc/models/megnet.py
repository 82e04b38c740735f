"""MEGNet: Chen, Ye, Zuo, Zheng & Ong, "Graph Networks as a Universal Machine Learning Framework for
Molecules and Crystals", Chem. Mater. 31, 3564 (2019). Layout and defaults follow matgl's MEGNet,
which ParAIsite (Klochko et al. 2024) fine-tunes.

Atoms start from a learned element embedding (16), bonds from Gaussians on their length (100 centres,
0 … cutoff + 1 Å, width 0.5), the global state from zeros (2). Encoders map all three to 32. Each block
runs dense pre-layers (not in the first block), then edge, node and state updates (PyG ``MetaLayer``,
means over incident edges and over the graph) with residual connections. Readout: Set2Set over atoms
and over bonds, concatenated with the state, then dense 160 → 32 → 16 (``readout_dim`` 16, the
features ParAIsite's MLP head reads).
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import MetaLayer
from torch_geometric.nn.aggr import Set2Set
from torch_geometric.utils import scatter

from ltc.archs import MEGNetConfig
from ltc.graphs import MAX_Z
from ltc.models.base import RBF, CrystalGNN, ShiftedSoftplus, mlp


class _EdgeUpdate(nn.Module):
    def __init__(self, dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.mlp = mlp([4 * dim, *hidden], ShiftedSoftplus)

    def forward(self, src, dst, edge_attr, u, batch):
        # MetaLayer passes x[row], x[col], edge_attr, u, batch[row]
        return self.mlp(torch.cat([src, dst, edge_attr, u[batch]], dim=1))


class _NodeUpdate(nn.Module):
    def __init__(self, dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.mlp = mlp([3 * dim, *hidden], ShiftedSoftplus)

    def forward(self, x, edge_index, edge_attr, u, batch):
        incoming = scatter(edge_attr, edge_index[1], dim=0, dim_size=x.shape[0], reduce="mean")
        return self.mlp(torch.cat([x, incoming, u[batch]], dim=1))


class _StateUpdate(nn.Module):
    def __init__(self, dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.mlp = mlp([3 * dim, *hidden], ShiftedSoftplus)

    def forward(self, x, edge_index, edge_attr, u, batch):
        n_graphs = u.shape[0]
        edges = scatter(edge_attr, batch[edge_index[1]], dim=0, dim_size=n_graphs, reduce="mean")
        nodes = scatter(x, batch, dim=0, dim_size=n_graphs, reduce="mean")
        return self.mlp(torch.cat([u, edges, nodes], dim=1))


class MEGNetBlock(nn.Module):
    """Dense pre-layers, then edge → node → state updates, each with a residual connection."""

    def __init__(self, dim: int, dense: tuple[int, ...], conv: tuple[int, ...], *, first: bool) -> None:
        super().__init__()
        # matgl's first block has no pre-layers: the encoders just ran
        pre = [] if first else [dim, *dense]
        self.pre_edge = mlp(pre, ShiftedSoftplus) if pre else nn.Identity()
        self.pre_node = mlp(pre, ShiftedSoftplus) if pre else nn.Identity()
        self.pre_state = mlp(pre, ShiftedSoftplus) if pre else nn.Identity()
        width = dense[-1]
        self.conv = MetaLayer(_EdgeUpdate(width, conv), _NodeUpdate(width, conv), _StateUpdate(width, conv))

    def forward(self, x, edge_index, e, u, batch):
        """x [N, d], e [E, d], u [B, d] → same shapes."""
        x1, e1, u1 = self.pre_node(x), self.pre_edge(e), self.pre_state(u)
        x2, e2, u2 = self.conv(x1, edge_index, e1, u1, batch)
        return x + x2, e + e2, u + u2


DEFAULT_CONFIG = MEGNetConfig()  # frozen: one shared default


class MEGNet(CrystalGNN):
    """MatErials Graph Network (Chen et al. 2019); ParAIsite's backbone."""

    name = "megnet"
    config_class = MEGNetConfig

    def __init__(self, config: MEGNetConfig = DEFAULT_CONFIG) -> None:
        super().__init__(config)
        c = config
        width = c.dense[-1]
        self.rbf = RBF(0.0, c.rbf_stop, c.rbf_num, gamma=1.0 / c.rbf_width**2)
        self.embedding = nn.ModuleDict(
            {
                "element": nn.Embedding(MAX_Z + 1, c.node_embedding),
                "node": mlp([c.node_embedding, *c.dense], ShiftedSoftplus),
                "edge": mlp([c.rbf_num, *c.dense], ShiftedSoftplus),
                "state": mlp([c.state_dim, *c.dense], ShiftedSoftplus),
            }
        )
        self.blocks = nn.ModuleList(MEGNetBlock(width, c.dense, c.conv, first=(i == 0)) for i in range(c.n_blocks))
        self.readout = nn.ModuleDict(
            {
                "node_s2s": Set2Set(width, processing_steps=c.set2set_steps),
                "edge_s2s": Set2Set(width, processing_steps=c.set2set_steps),
                "dense": mlp([5 * width, *c.output], ShiftedSoftplus),
            }
        )
        self.readout_dim = c.output[-1]
        self.heads = self._make_heads()

    def encode(self, batch) -> torch.Tensor:
        c = self.config
        n_graphs = batch.num_graphs
        x = self.embedding["node"](self.embedding["element"](batch.z))
        e = self.embedding["edge"](self.rbf(batch.edge_dist))
        u = self.embedding["state"](x.new_zeros(n_graphs, c.state_dim))
        for block in self.blocks:
            x, e, u = block(x, batch.edge_index, e, u, batch.batch)
        nodes = self.readout["node_s2s"](x, batch.batch, dim_size=n_graphs)
        edges = self.readout["edge_s2s"](e, batch.batch[batch.edge_index[1]], dim_size=n_graphs)
        return self.readout["dense"](torch.cat([nodes, edges, u], dim=1))

    def extra_summary(self) -> str:
        return f"width={self.config.dense[-1]}"
