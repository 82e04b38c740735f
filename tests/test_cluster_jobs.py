"""ltc on a real Ray cluster started from the command line, driven through the Jobs API as the README says.

One cluster for the module (``tests/ray_cluster.py``): a head with no trial CPUs (as cluster.yaml's) and worker
nodes of 1 CPU, token authentication on. Each worker sees its own folder in place of the driver's default shard
cache (a mount namespace): a node of a real cluster, which does not share the head's disk. Beside the cluster, in
its network namespace, runs moto's S3 server; every node has its AWS variables, as an instance profile would give,
and the test reads the bucket with a client run there (``Bucket``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml
from conftest import aws_variables, leaks, moto_command, read_files
from ray_cluster import BIN, RayCluster, can_isolate, free_port, namespace_of, until_each_node_runs_a_trial

REPO = Path(__file__).resolve().parents[1]
SWEEP = "sweeps/cluster_check.yaml"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not can_isolate(), reason="needs unprivileged user, network and mount namespaces (unshare)"),
]

# the test's own S3 client, run in the cluster's network namespace (where the server is): create, keys, download
S3_CLIENT = r"""
import json, os, sys
import boto3

command, bucket, prefix = sys.argv[1:4]
client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name=os.environ["AWS_REGION"])
if command == "create":
    client.create_bucket(Bucket=bucket)
    sys.exit()
pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
if command == "keys":
    print(json.dumps(keys))
else:  # objects: every object under prefix, base64
    import base64

    read = lambda key: client.get_object(Bucket=bucket, Key=key)["Body"].read()  # noqa: E731
    print(json.dumps({key: base64.b64encode(read(key)).decode() for key in keys}))
"""


@dataclass
class Bucket:
    """moto's S3 server in the cluster's network namespace, one bucket; its AWS variables are every node's."""

    ray: RayCluster
    name: str
    env: dict[str, str]

    @classmethod
    def start(cls, ray: RayCluster) -> Bucket:
        """The server at the cluster's ``AWS_ENDPOINT_URL``, with a bucket."""
        port = ray.env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]
        log = ray.root / "moto.log"
        with open(log, "wb") as out:
            ray.popen(moto_command(int(port)), stdout=out, stderr=out)
        deadline = time.monotonic() + 60
        while b"Running on" not in log.read_bytes():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        aws = {k: v for k, v in ray.env.items() if k.startswith("AWS_")}
        bucket = cls(ray, "ltc-cluster", aws)
        bucket._client("create", "")
        return bucket

    def _client(self, *args: str) -> str:
        out = self.ray.run([sys.executable, "-c", S3_CLIENT, args[0], self.name, *args[1:]], timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    def keys(self, prefix: str) -> list[str]:
        return json.loads(self._client("keys", prefix))

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Key → bytes of every object under ``prefix``."""
        return {k: base64.b64decode(v) for k, v in json.loads(self._client("objects", prefix)).items()}


@dataclass
class Cluster:
    ray: RayCluster
    cache: Path  # the driver's default shard cache (no LTC_CACHE): $XDG_CACHE_HOME/ltc/cache on the head
    private: dict[str, Path] = field(default_factory=dict)  # worker node id -> the folder it sees as `cache`
    bucket: Bucket | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)  # worker node id -> its `ray start`

    def add_worker(self, folder: Path) -> str:
        """A 1-CPU worker that sees ``folder`` where the head has its shard cache; its node id."""
        folder.mkdir(parents=True)
        before = {n["id"] for n in self.ray.nodes()}
        proc = self.ray.add_worker(num_cpus=1, hide={self.cache: folder})
        (node,) = [n["id"] for n in self.ray.nodes() if n["id"] not in before]
        self.private[node], self.procs[node] = folder, proc
        return node

    def remove_worker(self, node: str) -> None:
        """Worker ``node`` leaves the cluster (a lost machine); returns once Ray counts it dead."""
        self.ray.stop_node(self.procs.pop(node))
        del self.private[node]
        deadline = time.monotonic() + 120
        while node in {n["id"] for n in self.ray.nodes()}:
            assert time.monotonic() < deadline, f"node {node} still alive"
            time.sleep(1)

    def trials_on(self, nodes: list[str]) -> list[psutil.Process]:
        """The processes of the trials on worker ``nodes`` (``RayCluster.trials``)."""
        return [p for node in nodes for p in self.ray.trials(self.procs[node])]

    @contextlib.contextmanager
    def paused_trials(self, nodes: list[str]) -> Iterator[list[str]]:
        """Stop (SIGSTOP) the trials on worker ``nodes`` for the block, then let them go on; yields their
        process titles."""
        paused: dict[psutil.Process, str] = {}  # process -> its title
        try:
            for p in self.trials_on(nodes):
                with contextlib.suppress(psutil.NoSuchProcess):  # (a trial's actor that has just gone)
                    title = p.cmdline()[0]
                    p.suspend()
                    paused[p] = title
            assert paused, f"no trial running on {nodes}"
            yield list(paused.values())
        finally:
            for p in paused:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.resume()

    def two_workers(self, tmp_path: Path) -> None:
        """At least two workers (a test run alone has the fixture's one)."""
        if len(self.private) < 2:
            self.add_worker(tmp_path / "another_node")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    xdg = base / "xdg"
    cache = xdg / "ltc" / "cache"  # ltc.paths.cache_root's default here: the data home is read-only
    cache.mkdir(parents=True)
    aws = aws_variables(f"http://127.0.0.1:{free_port()}")  # the bucket's server, in the cluster's namespace
    ray = RayCluster(env={"XDG_CACHE_HOME": str(xdg), **aws})
    ray.env.pop("LTC_CACHE", None)  # the session's private cache: not here, the default one is under test
    c = Cluster(ray, cache)
    try:
        t0 = time.monotonic()
        c.bucket = Bucket.start(ray)
        ray.start_head(num_cpus=0)
        c.add_worker(base / "node1")
        print(f"cluster: head + 1 worker up in {time.monotonic() - t0:.1f} s")
        yield c
    finally:
        ray.stop()
    left = [p.pid for p in psutil.process_iter() if namespace_of(p.pid) == ray.netns]
    assert not left, f"processes left in the cluster's network namespace: {left}"


def _submit(
    cluster: Cluster, args: list[str], *, runtime_env: dict | None = None, job_id: str | None = None
) -> subprocess.Popen:
    """``ray job submit --working-dir . -- ltc sweep …`` from the repository, as the README says; runs until the
    job ends (its output: the driver's)."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster.ray.dashboard, "--working-dir", "."]
    if job_id:
        cmd += ["--submission-id", job_id]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    return cluster.ray.popen(
        [*cmd, "--", "ltc", "sweep", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(job: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = job.communicate(timeout=timeout)
    assert job.returncode == 0, out[-5000:]
    assert "succeeded" in out
    return out


def _wait_for(condition: Callable[[], object], what: str, job: subprocess.Popen, timeout: float = 300) -> None:
    """Until ``condition()`` holds, while the job runs."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert job.poll() is None, job.communicate()[0][-5000:]
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.5)


def _has_run_a_trial(folder: Path) -> bool:
    """Whether a trial started on the node that sees ``folder`` as the shard cache: it copies its inputs first."""
    shards = folder / "shards"
    return shards.is_dir() and any(shards.iterdir())


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_submitted_sweep_runs_on_both_workers_and_a_node_joining_mid_run_gets_the_shards(cluster, tmp_path):
    t0 = time.monotonic()
    results = tmp_path / "results"
    job = _submit(cluster, [SWEEP, "--results", str(results)])
    (node1, _), *_ = cluster.private.items()
    # the second worker joins once the first one runs a trial (its first: the other PT trial is pending)
    _wait_for(lambda: cluster.trials_on([node1]), "trial on the first worker", job)
    # Ray alone picks where a trial runs, and Tune hands a finished trial's actor the next trial (reuse_actors):
    # these trials last seconds, so a joining node could find nothing left to run. The first worker's trial
    # pauses (SIGSTOP) until the second worker has started one: the stage's pending trial must go to it.
    with cluster.paused_trials([node1]) as paused:
        joined_at = time.monotonic() - t0
        second = cluster.add_worker(tmp_path / "node2")
        _wait_for(lambda: _has_run_a_trial(cluster.private[second]), "trial on the second worker", job)
    out = _finish(job)
    wall = time.monotonic() - t0

    trials = pd.read_parquet(results / "cluster_check" / "trials.parquet")
    assert len(trials) == 6 and (trials.status == "completed").all(), trials[["setting", "status", "error"]]
    per_node = trials.node_id.value_counts().to_dict()
    assert set(per_node) == set(cluster.private), per_node  # both workers, never the head
    assert second in per_node
    ft = trials[trials.kind == "finetune"]
    assert ft.init.str.startswith(str(results)).all()  # best PT checkpoint, through the results' Ray storage
    # the driver built each stage's shards once, in its own cache; each worker holds byte-identical copies of
    # what its trials read (no trial featurised: there is nothing else to read)
    built = sorted(p.name for p in (cluster.cache / "shards").iterdir())
    assert [b.split("-")[0] for b in built] == ["agl", "l96"], built
    for node, folder in cluster.private.items():
        kinds = {trials.loc[i, "kind"] for i in trials.index[trials.node_id == node]}
        wanted = (["agl"] if "pretrain" in kinds else []) + (["l96"] if kinds - {"pretrain"} else [])
        copies = sorted(p.name for p in (folder / "shards").iterdir() if not p.name.startswith("."))
        assert [c.split("-")[0] for c in copies] == wanted, (node, copies)
        for name in copies:
            assert _files(folder / "shards" / name) == _files(cluster.cache / "shards" / name)
        assert sorted(p.name for p in (folder / "splits").iterdir() if p.suffix == ".json")
    print(
        f"\njob: {wall:.0f} s; second worker joined at {joined_at:.0f} s (paused on the first: "
        f"{paused}); trials per node {per_node}, on the second "
        f"{trials.kind[trials.node_id == second].value_counts().to_dict()}; "
        f"driver output tail:\n{out[-600:]}"
    )


def test_with_ltc_cache_on_a_folder_every_node_sees_nothing_is_copied(cluster, tmp_path):
    cluster.two_workers(tmp_path)
    shared = tmp_path / "shared_cache"
    shared.mkdir()
    results = tmp_path / "results"
    before = {node: sorted(f.rglob("*")) for node, f in cluster.private.items()}
    t0 = time.monotonic()
    job = _submit(cluster, [SWEEP, "--results", str(results)], runtime_env={"env_vars": {"LTC_CACHE": str(shared)}})
    until_each_node_runs_a_trial(list(cluster.procs.values()), job)
    _finish(job)
    trials = pd.read_parquet(results / "cluster_check" / "trials.parquet")
    assert len(trials) == 6 and (trials.status == "completed").all()
    assert trials.node_id.nunique() == 2
    assert sorted(p.name.split("-")[0] for p in (shared / "shards").iterdir()) == ["agl", "l96"]  # built once
    assert {node: sorted(f.rglob("*")) for node, f in cluster.private.items()} == before  # no copies
    print(f"\njob with a shared LTC_CACHE: {time.monotonic() - t0:.0f} s")


def test_checkpoints_in_a_bucket_reach_other_nodes_a_stopped_job_resumes_from_it_and_predict_reads_it(
    cluster, tmp_path
):
    bucket = cluster.bucket
    cluster.two_workers(tmp_path)
    t0 = time.monotonic()
    # cluster_check with intermediate checkpoints every 2 epochs, so that a stopped FT stage has some to resume from
    spec = yaml.safe_load((REPO / SWEEP).read_text())
    spec["name"] = "s3check"
    spec["stages"][1].update(epochs=40, checkpoint_every=2, checkpoint_seconds=0, report_seconds=0)
    sweep = tmp_path / "s3check.yaml"
    sweep.write_text(yaml.safe_dump(spec))
    prefix = f"cluster-{uuid.uuid4().hex[:8]}"
    storage = f"s3://{bucket.name}/{prefix}"
    results = tmp_path / "results"
    args = [str(sweep), "--results", str(results), "--storage", storage]
    # ray job stop sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s by default): time for Tune to
    # end the stage gracefully
    env = {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}}
    job = _submit(cluster, args, runtime_env=env, job_id=f"{prefix}-1")

    def stored() -> dict[str, list[str]]:  # FT stage trial id -> the files of its checkpoints in the bucket
        trials: dict[str, list[str]] = {}
        for key in bucket.keys(f"{prefix}/finetune/"):
            parts = key.split("/")[2:]  # <trial>/checkpoint_<n>/<file>, beside Tune's own files
            if len(parts) == 3 and parts[1].startswith("checkpoint_"):
                trials.setdefault(parts[0], []).append(parts[2])
        return trials

    # the stop comes once two FT trials have each stored two training states: the driver has taken the first
    # of each (a trial reports a checkpoint and waits for the driver before it trains on)
    def two_with_two_states() -> bool:
        return sum(names.count("train_state.pt") >= 2 for names in stored().values()) >= 2

    _wait_for(two_with_two_states, "two FT trials with two states each", job)
    stopped_at = time.monotonic() - t0
    # the running trials pause until the job has stopped, so that none of them finishes in the seconds the stop
    # takes: each FT trial then runs in the resumed job
    with cluster.paused_trials(list(cluster.private)):
        # (fails loudly in the unlikely case that one FT trial ran all its epochs before another stored two states)
        assert not any("checkpoint.pt" in names for names in stored().values()), "an FT trial finished first"
        stop = cluster.ray.run([str(BIN / "ray"), "job", "stop", "--address", cluster.ray.dashboard, f"{prefix}-1"])
        assert stop.returncode == 0, stop.stdout + stop.stderr
        first, _ = job.communicate(timeout=300)
    stop_s = time.monotonic() - t0 - stopped_at
    assert "ltc sweep: interrupted in stage finetune" in first, first[-5000:]
    assert not (results / "s3check" / "stages" / "finetune.parquet").exists()
    assert not (results / "s3check" / "ray").exists()  # Tune's state is in the bucket only
    assert f"{prefix}/finetune/tuner.pkl" in bucket.keys(f"{prefix}/finetune/")
    # the node that trained the best PT trial is lost and a fresh one joins: the resumed FT trials can find their
    # starting checkpoint in the bucket only (Ray alone decides where trials run: without this, all of them could
    # land on the node that trained it, and nothing would have been fetched)
    done = pd.read_parquet(results / "s3check" / "stages" / "pretrain.parquet")
    lost = done.loc[done.val_score.idxmin(), "node_id"]
    cluster.remove_worker(lost)
    cluster.add_worker(tmp_path / "replacement")

    second = _finish(_submit(cluster, [*args, "--resume"], runtime_env=env, job_id=f"{prefix}-2"))
    assert "stage pretrain: finished earlier" in second and "stage finetune: resuming" in second
    trials = pd.read_parquet(results / "s3check" / "trials.parquet")
    assert len(trials) == 6 and trials.trial_id.is_unique and (trials.status == "completed").all()
    assert trials.checkpoint.str.startswith(f"{storage}/").all()
    pt, ft = trials[trials.kind == "pretrain"], trials[trials.kind == "finetune"]
    best = pt.loc[pt.val_score.idxmin()]
    assert set(ft.init) == {best.checkpoint}  # FT starts from the best PT checkpoint, in the bucket …
    assert best.node_id == lost and lost not in set(ft.node_id)  # … which FT trials on other nodes fetched
    assert (trials.resumed_from_epoch > 0).sum() >= 2  # stopped trials went on from their states in the bucket
    assert (trials.epochs_run == trials.stage.map({"pretrain": 4, "finetune": 40})).all()

    # ltc predict on a checkpoint in the bucket, as a user on the head would
    out = tmp_path / "pred.parquet"
    ltc = cluster.ray.run(
        [str(BIN / "ltc"), "predict", "--checkpoint", ft.checkpoint.iloc[0], "l96", "--out", str(out)]
    )
    assert ltc.returncode == 0, ltc.stderr[-3000:]
    assert len(pd.read_parquet(out)) == 95

    # no key, secret or endpoint option in the results, the bucket, or any node's Ray files and logs (job logs too)
    keys = [bucket.env["AWS_ACCESS_KEY_ID"], bucket.env["AWS_SECRET_ACCESS_KEY"]]
    written = read_files(results)
    objects = bucket.objects(prefix)
    written.update(objects)
    logs = read_files(cluster.ray.root)
    assert any("job-driver-" in name for name in logs)
    ray_logs = {n: data for n, data in logs.items() if "/logs/" in n}  # (the rest holds the job's copy of the repo)
    checks = ((written, [*keys, "endpoint_override"]), (logs, keys), (ray_logs, ["endpoint_override"]))
    assert [found for blobs, words in checks for found in leaks(blobs, words)] == []
    print(
        f"\nbucket job: stopped at {stopped_at:.0f} s (in {stop_s:.0f} s), done at {time.monotonic() - t0:.0f} s; "
        f"{(trials.resumed_from_epoch > 0).sum()} FT trials resumed from a stored state; "
        f"{len(objects)} objects in {storage}; trials per node "
        f"{trials.node_id.value_counts().to_dict()}"
    )


def test_a_later_stage_builds_its_shards_in_parallel_after_a_worker_unpacked_the_job_again(tmp_path):
    """Nodes started on one machine share a temp folder (Ray's default, ``/tmp/ray``), and each node's runtime-env
    agent unpacks the job's working_dir afresh there (Ray overwrites it), deleting the folder the driver stands in.
    A later stage's parallel prepare spawns processes, which need a working directory (issue 25.9: a
    FileNotFoundError in os.getcwd()). Its own cluster: a head, and a worker that shares its temp folder."""
    spec = yaml.safe_load((REPO / SWEEP).read_text())
    spec["name"] = "parallel_prepare"
    spec["stages"] = [  # trials on the worker first (its agent unpacks the job); then agl, 3,108 CIFs: in parallel
        {"name": "first", "datasets": ["l96"], "seeds": [0], "epochs": 1, "batch_size": 16},
        {"name": "second", "datasets": ["agl"], "max_sizes": [100], "seeds": [0], "epochs": 1, "batch_size": 16},
    ]
    path = tmp_path / "parallel_prepare.yaml"
    path.write_text(yaml.safe_dump(spec))
    cache, results = tmp_path / "cache", tmp_path / "results"
    cluster = RayCluster(env={"LTC_CACHE": str(cache)})  # agl not built yet; every node sees this folder
    try:
        cluster.start_head(num_cpus=0)
        cluster.add_worker(num_cpus=1, share_temp=True)
        cmd = ["ltc", "sweep", str(path), "--results", str(results)]
        done = cluster.submit(cmd, working_dir=REPO, timeout=900)
    finally:
        cluster.stop()
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in out, out[-5000:]
    assert "worker processes failed" not in out  # built in parallel, not in the driver alone after a failure
    trials = pd.read_parquet(results / "parallel_prepare" / "trials.parquet")
    assert len(trials) == 2 and (trials.status == "completed").all(), trials[["setting", "status", "error"]]
    (agl,) = [p for p in (cache / "shards").iterdir() if p.name.startswith("agl-")]
    assert len(list(agl.glob("shard-*.arrow"))) > 1  # several chunks: the parallel path
