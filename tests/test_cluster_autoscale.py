"""Ray's own autoscaler, with fake nodes of cluster.yaml's shape, runs a sweep submitted as users submit one.

The head is a real ``ray start --head`` (``tests/ray_cluster.py``) given an autoscaling config built from
cluster.yaml: the same node types and resources (a CPU-only head that runs no trials, GPU workers of 48 CPUs
and 4 GPUs), shrunk to fit this machine (at most ``MAX_WORKERS`` workers, an idle timeout of seconds). Ray's
``fake_multinode`` provider starts each worker the autoscaler asks for as a raylet on this machine. The sweep
asks for trials of the cluster sweeps' shape (``sweeps/devi_pairwise.yaml``: 2 CPUs and a quarter GPU each).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, most_at_once
from ray_cluster import RayCluster, can_isolate, free_port, naming

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not can_isolate(), reason="needs unprivileged user, network and mount namespaces (unshare)"),
]

MAX_WORKERS = 2  # per worker type; cluster.yaml allows 8
IDLE_MINUTES = 0.1  # cluster.yaml: 10
SCALE_DOWN_MARGIN_S = 30  # past the idle timeout: the autoscaler's next round, the raylet's exit, GCS noticing
FAKE_HEAD = "ray.head.default"  # the type FakeMultiNodeProvider gives its head node

# One driver for the whole test, connected once: a line per second of alive nodes, with the pids of the
# processes that name each node's raylet socket (its raylet, agents and workers).
WATCH = r"""
import json, sys, time
import psutil, ray

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
with open(sys.argv[2], "a") as out:
    while True:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        by_socket = {n["RayletSocketName"]: n["NodeID"] for n in nodes}
        pids = {n["NodeID"]: [] for n in nodes}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            named = {by_socket.get(arg.partition("=")[2]) for arg in proc.info["cmdline"] or ()} - {None}
            for node in named:
                pids[node].append(proc.info["pid"])
        record = {"t": time.time(), "nodes": [
            {"id": n["NodeID"], "ip": n["NodeManagerAddress"], "resources": n["Resources"], "labels": n["Labels"],
             "raylet_socket": n["RayletSocketName"], "store_socket": n["ObjectStoreSocketName"],
             "pids": pids[n["NodeID"]]}
            for n in nodes
        ]}
        out.write(json.dumps(record) + "\n")
        out.flush()
        time.sleep(1.0)
"""


def fake_config(launcher: dict, *, gcs_address: str, max_workers: int, idle_minutes: float) -> dict:
    """cluster.yaml (``launcher``) as a ``fake_multinode`` autoscaling config: its node types and resources, its
    upscaling speed, fewer workers and a short idle timeout. Node configs, setup and start commands are dropped
    (fake nodes are raylets on this machine); ``gcs_address``: the head's, which is not on port 6379 here."""
    types = launcher["available_node_types"]
    head_start = " ".join(launcher["head_start_ray_commands"])
    head_cpus = re.search(r"--num-cpus[= ](\d+)", head_start)
    assert head_cpus, "cluster.yaml: the head's `ray start` sets no --num-cpus"
    workers = {name: t for name, t in types.items() if name != launcher["head_node_type"]}
    return {
        "cluster_name": launcher["cluster_name"],
        "max_workers": min(launcher["max_workers"], max_workers),
        "upscaling_speed": launcher["upscaling_speed"],
        "idle_timeout_minutes": idle_minutes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "head_node_type": FAKE_HEAD,
        "available_node_types": {
            FAKE_HEAD: {"resources": {"CPU": int(head_cpus[1]), "GPU": 0}, "node_config": {}, "max_workers": 0},
            **{
                name: {
                    "resources": dict(t["resources"]),
                    "node_config": {},
                    "min_workers": t["min_workers"],
                    "max_workers": min(t["max_workers"], max_workers),
                }
                for name, t in workers.items()
            },
        },
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def read_watch(path: Path) -> list[dict]:
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.endswith("}")]  # a line being written is skipped


def gpu_nodes(record: dict) -> list[dict]:
    return [n for n in record["nodes"] if n["resources"].get("GPU", 0) > 0]


def autoscaler_log(cluster: RayCluster) -> str:
    logs = sorted(cluster.root.glob("head/session_*/logs/monitor.log"))
    return logs[-1].read_text()[-4000:] if logs else "(no monitor.log)"


def test_gpu_stage_scales_fake_gpu_workers_up_then_back_to_zero(tmp_path):
    began = time.time()
    launcher = yaml.safe_load((REPO / "cluster.yaml").read_text())
    gpu_type, gpu_shape = next(
        (name, t["resources"])
        for name, t in launcher["available_node_types"].items()
        if name != launcher["head_node_type"] and t["resources"].get("GPU", 0) > 0
    )
    devi = yaml.safe_load((REPO / "sweeps" / "devi_pairwise.yaml").read_text())
    assert all("resources" not in s for s in devi["stages"])  # one shape for every stage
    shape = devi["resources"]
    assert 0 < shape["gpu"] < 1  # fractional: several trials share a GPU

    n_trials = 4
    spec = {
        "name": "autoscale",
        "model": "cgcnn",
        "model_config": {"hidden": 16, "n_blocks": 2, "fc_dim": 16},
        "resources": shape,
        "asha": None,
        "search": {"trials": 1, "lr": 1.0e-3},
        "stages": [{"name": "pt", "datasets": ["l96"], "seeds": list(range(n_trials)), "epochs": 8,
                    "batch_size": 8, "max_sizes": [60]}],
    }  # fmt: skip
    sweep_file = tmp_path / "autoscale.yaml"
    sweep_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    results = tmp_path / "results"
    # all trials fit on this many GPU workers (one here: 4 x a quarter GPU, 4 x 2 CPUs)
    needed = math.ceil(max(n_trials * shape["cpu"] / gpu_shape["CPU"], n_trials * shape["gpu"] / gpu_shape["GPU"]))

    # in a network namespace of its own (RayCluster): every server, the fake workers' too, on its loopback
    cluster = RayCluster()
    port = free_port()
    config = fake_config(launcher, gcs_address=f"127.0.0.1:{port}", max_workers=MAX_WORKERS, idle_minutes=IDLE_MINUTES)
    config_file = cluster.root / "autoscaling.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    watch_file = tmp_path / "nodes.jsonl"
    watcher = None
    try:
        cluster.start_head(
            port=port,
            num_cpus=config["available_node_types"][FAKE_HEAD]["resources"]["CPU"],
            autoscaling_config=config_file,
            env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
        )
        with open(tmp_path / "watch.log", "wb") as log:
            watcher = cluster.popen(
                [sys.executable, "-c", WATCH, cluster.gcs, str(watch_file)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 120
        while not read_watch(watch_file):
            assert watcher.poll() is None and time.monotonic() < deadline, (tmp_path / "watch.log").read_text()
            time.sleep(0.5)
        head_up = time.time()

        submitted = time.time()
        # `ray job submit --working-dir <repo> -- ltc sweep …`, from another folder: a fake worker shares the head's
        # session folder, and unpacking the job's working_dir there for its trials replaces the head's copy, the
        # driver's working directory (Ray always overwrites it on a node's first use), which Tune needs at the end
        sweep = shlex.join(["ltc", "sweep", str(sweep_file), "--results", str(results)])
        job = cluster.submit(["sh", "-c", f"cd {shlex.quote(str(tmp_path))} && {sweep}"], working_dir=REPO, timeout=600)
        job_ended = time.time()
        assert job.returncode == 0, f"{job.stdout[-3000:]}\n{job.stderr[-3000:]}\n{autoscaler_log(cluster)}"

        # back to no GPU worker, within the idle timeout and a margin
        deadline = job_ended + IDLE_MINUTES * 60 + SCALE_DOWN_MARGIN_S
        while True:
            records = read_watch(watch_file)
            if records[-1]["t"] > job_ended and not gpu_nodes(records[-1]):
                break
            assert time.time() < deadline, f"GPU workers still up:\n{records[-1]}\n{autoscaler_log(cluster)}"
            assert watcher.poll() is None, (tmp_path / "watch.log").read_text()
            time.sleep(1.0)
        assert watcher.poll() is None, (tmp_path / "watch.log").read_text()  # it watched throughout
        # a stopped worker's processes go too (its workers and agents a moment after its raylet)
        workers_sockets = {n["raylet_socket"] for r in records for n in gpu_nodes(r)}
        deadline = time.monotonic() + 30
        while still := [p.pid for s in workers_sockets for p in naming(s)]:
            assert time.monotonic() < deadline, f"processes of a stopped worker: {still}"
            time.sleep(0.5)
    finally:
        if watcher is not None:
            watcher.terminate()
            try:
                watcher.wait(timeout=10)
            except subprocess.TimeoutExpired:
                watcher.kill()
                watcher.wait()
        cluster.stop()
    left = [p.pid for p in naming(str(cluster.root))]
    assert not left, f"processes naming {cluster.root} after stop(): {left}"
    ended = time.time()

    # ---- what the watcher saw
    before = [r for r in records if r["t"] < submitted]
    assert before and not any(gpu_nodes(r) for r in before)  # min_workers 0: no GPU worker before the job
    workers: dict[str, dict] = {}
    for r in records:
        for n in gpu_nodes(r):
            seen = workers.setdefault(n["id"], {**n, "first": r["t"], "pids": set()})
            seen["last"] = r["t"]
            seen["pids"] |= set(n["pids"])
    assert 1 <= len(workers) <= MAX_WORKERS
    assert len(workers) == needed, f"the autoscaler started {len(workers)} GPU workers for {needed} nodes' work"
    head = next(n for n in records[0]["nodes"] if "node:__internal_head__" in n["resources"])
    assert head["resources"].get("CPU", 0) == 0 and head["resources"].get("GPU", 0) == 0  # runs no trials
    for node in workers.values():
        # cluster.yaml's shape, on the loopback, its files (sockets, logs) under the cluster's root folder
        assert {k: node["resources"][k] for k in gpu_shape} == gpu_shape
        assert node["ip"] == "127.0.0.1"
        for sock in (node["raylet_socket"], node["store_socket"]):
            assert sock.startswith(f"{cluster.root}/"), sock
        assert node["pids"], "no process of the worker was seen"
    up_at = min(w["first"] for w in workers.values())
    down_at = next(r["t"] for r in records if r["t"] > max(w["last"] for w in workers.values()))

    # ---- the trials: all completed, on the GPU workers, each holding a GPU, several on one GPU at a time
    trials = pd.read_parquet(results / "autoscale" / "trials.parquet")
    assert len(trials) == n_trials and (trials.status == "completed").all(), trials[["status", "error"]]
    assert set(trials.node_id) <= set(workers), (set(trials.node_id), set(workers))
    assert (trials.gpu_ids.str.len() > 0).all()
    per_gpu = [most_at_once(g.started, g.finished) for _, g in trials.groupby([trials.node_id, trials.gpu_ids])]
    most = max(per_gpu)
    assert most <= 1 / shape["gpu"], per_gpu
    assert most >= 2, "no two trials shared a GPU"
    resolution = max(b["t"] - a["t"] for a, b in itertools.pairwise(records))  # the watcher's
    for node in workers.values():  # the trials ran while their node was up
        ran = trials[trials.node_id == node["id"]]
        assert node["first"] - resolution <= ran.started.min() and ran.finished.max() <= node["last"] + resolution
    # the workers went once idle for the idle timeout (counted from the last load report that saw them busy: up to
    # a report interval before the last trial let go of its resources), not before, and not much later
    idle_s, last_trial = IDLE_MINUTES * 60, trials.finished.max()
    assert last_trial + idle_s - 2 <= down_at <= last_trial + idle_s + SCALE_DOWN_MARGIN_S

    print(
        f"\nautoscaler: {len(workers)} {gpu_type} node(s) of {gpu_shape} for {n_trials} trials of {shape} "
        f"(max {MAX_WORKERS}, idle timeout {IDLE_MINUTES * 60:.0f} s)\n"
        f"  head up {head_up - began:.1f} s after the test began; job ran {job_ended - submitted:.1f} s\n"
        f"  first GPU worker {up_at - submitted:.1f} s after submit, "
        f"{trials.started.min() - up_at:.1f} s before the first trial started\n"
        f"  trials {trials.started.min() - submitted:.1f}..{trials.finished.max() - submitted:.1f} s after submit, "
        f"at most {most} on one GPU\n"
        f"  back to 0 GPU workers {down_at - trials.finished.max():.1f} s after the last trial, "
        f"{down_at - job_ended:.1f} s after the job ended\n"
        f"  test wall time {ended - began:.1f} s; the workers' files: "
        + ", ".join(str(Path(w["raylet_socket"]).relative_to(cluster.root)) for w in workers.values())
    )
