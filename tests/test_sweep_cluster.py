"""A sweep on a 3-node Ray cluster with fake GPUs (one per node): fractional GPUs honoured, trials spread.

The cluster is ``tests/ray_cluster.py``'s: real ``ray start`` nodes in a private network namespace (Ray's
multi-node servers listen on every interface; there, nobody else reaches them), and ``ltc sweep --address``
run in it as a user on the head would.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pandas as pd
import pytest
import yaml
from conftest import most_at_once
from ray_cluster import BIN, RayCluster, can_isolate, until_each_node_runs_a_trial

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not can_isolate(), reason="needs unprivileged user, network and mount namespaces (unshare)"),
]


@pytest.fixture(scope="module")
def three_nodes() -> Iterator[tuple[RayCluster, list[subprocess.Popen]]]:
    """The cluster and its nodes' ``ray start`` processes."""
    cluster = RayCluster()
    try:
        cluster.start_head(num_cpus=2, num_gpus=1)
        nodes = [cluster.head, *(cluster.add_worker(num_cpus=2, num_gpus=1) for _ in range(2))]
        yield cluster, nodes
    finally:
        cluster.stop()


def test_half_gpu_trials_spread_over_nodes_two_per_gpu(three_nodes, tmp_path):
    cluster, nodes = three_nodes
    assert len(cluster.nodes()) == 3
    spec = {
        "name": "gpus",
        "model_config": {"hidden": 16, "n_blocks": 2, "fc_dim": 16},
        "resources": {"cpu": 1, "gpu": 0.5},
        "asha": None,
        "search": {"trials": 2, "lr": {"low": 1e-3, "high": 1e-2}},
        "stages": [{"name": "pt", "datasets": ["l96"], "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8], "epochs": 12,
                    "batch_size": 8, "max_sizes": [60]}],
    }  # fmt: skip
    sweep = tmp_path / "gpus.yaml"
    sweep.write_text(yaml.safe_dump(spec))
    cmd = [str(BIN / "ltc"), "sweep", str(sweep), "--results", str(tmp_path), "--address", cluster.gcs]
    job = cluster.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    until_each_node_runs_a_trial(nodes, job)
    out, _ = job.communicate(timeout=600)
    assert job.returncode == 0, out[-5000:]

    trials = pd.read_parquet(tmp_path / "gpus" / "trials.parquet")
    assert len(trials) == 18 and (trials.status == "completed").all()
    assert trials.node_id.nunique() == 3  # spread over the nodes
    assert (trials.gpu_ids.str.len() > 0).all()  # every trial holds a (fake) GPU
    # at most two trials at a time on one GPU, and two did share one
    per_gpu = [most_at_once(g.started, g.finished) for _, g in trials.groupby([trials.node_id, trials.gpu_ids])]
    assert max(per_gpu) == 2, per_gpu
