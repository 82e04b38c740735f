"""A sweep on a 3-node Ray cluster (ray.cluster_utils.Cluster) with fake GPUs: fractional GPUs honoured."""

from __future__ import annotations

import pandas as pd
import pytest

from ltc.config import from_dict
from ltc.sweep import SweepSpec, run_sweep

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def three_nodes():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_half_gpu_trials_spread_over_nodes_two_per_gpu(three_nodes, tmp_path):
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    spec = from_dict(SweepSpec, {
        "name": "gpus",
        "model_config": {"hidden": 16, "n_blocks": 2, "fc_dim": 16},
        "resources": {"cpu": 1, "gpu": 0.5},
        "asha": None,
        "search": {"trials": 2, "lr": {"low": 1e-3, "high": 1e-2}},
        "stages": [{"name": "pt", "datasets": ["l96"], "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8], "epochs": 12,
                    "batch_size": 8, "max_sizes": [60]}],
    })  # fmt: skip
    trials = run_sweep(spec, results=tmp_path)
    assert len(trials) == 18 and (trials.status == "completed").all()
    assert trials.node_id.nunique() == 3  # spread over the nodes
    assert (trials.gpu_ids.str.len() > 0).all()  # every trial holds a (fake) GPU
    # at most two trials at a time on one GPU, and two did share one
    trials = trials.assign(gpu=trials.node_id + "/" + trials.gpu_ids)
    most = 0
    for _, g in trials.groupby("gpu"):
        events = sorted([(t, 1) for t in g.started] + [(t, -1) for t in g.finished], key=lambda e: (e[0], e[1]))
        running = 0
        for _, step in events:
            running += step
            most = max(most, running)
            assert running <= 2
    assert most == 2
    assert isinstance(trials, pd.DataFrame)
