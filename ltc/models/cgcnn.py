"""CGCNN: Xie & Grossman, "Crystal Graph Convolutional Neural Networks", PRL 120, 145301 (2018).

Atoms start from CGCNN's 92-dim one-hot features (matminer's table), bonds from a Gaussian expansion
of their length. Each block is PyG's ``CGConv`` (gated sum over neighbours, BatchNorm, residual)
followed by softplus, as the reference ``ConvLayer``. Readout: mean over atoms → softplus → Linear →
softplus (``fc_dim``); the head maps that to the target.
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import CGConv, global_mean_pool

from ltc.archs import CGCNNConfig
from ltc.graphs import cgcnn_atom_features
from ltc.models.base import RBF, CrystalGNN


class CGCNNBlock(nn.Module):
    """``softplus(x + BN(sum_j sigmoid(z W_f) * softplus(z W_s)))`` with ``z = [x_i, x_j, e_ij]``."""

    def __init__(self, hidden: int, edge_dim: int) -> None:
        super().__init__()
        self.conv = CGConv(hidden, dim=edge_dim, aggr="add", batch_norm=True)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        """x [N, hidden], edge_index [2, E], edge_attr [E, edge_dim] → [N, hidden]."""
        return nn.functional.softplus(self.conv(x, edge_index, edge_attr))


DEFAULT_CONFIG = CGCNNConfig()  # frozen: one shared default


class CGCNN(CrystalGNN):
    """Crystal graph convolutional network (Xie & Grossman 2018); ltc's fast baseline."""

    name = "cgcnn"
    config_class = CGCNNConfig

    def __init__(self, config: CGCNNConfig = DEFAULT_CONFIG) -> None:
        super().__init__(config)
        c = config
        self.register_buffer("atom_table", torch.from_numpy(cgcnn_atom_features()))
        self.rbf = RBF(0.0, c.rbf_stop, round(c.rbf_stop / c.rbf_step) + 1, gamma=1.0 / c.rbf_step**2)
        edge_dim = self.rbf.centres.numel()
        self.embedding = nn.Linear(self.atom_table.shape[1], c.hidden)
        self.blocks = nn.ModuleList(CGCNNBlock(c.hidden, edge_dim) for _ in range(c.n_blocks))
        self.readout = nn.Sequential(nn.Softplus(), nn.Linear(c.hidden, c.fc_dim), nn.Softplus())
        self.readout_dim = c.fc_dim
        self.heads = self._make_heads()

    def encode(self, batch) -> torch.Tensor:
        x = self.embedding(self.atom_table[batch.z])
        e = self.rbf(batch.edge_dist)
        for block in self.blocks:
            x = block(x, batch.edge_index, e)
        return self.readout(global_mean_pool(x, batch.batch, size=batch.num_graphs))

    def extra_summary(self) -> str:
        return f"hidden={self.config.hidden}"
