"""A real Ray cluster started from the command line, as the README tells users, for the cluster tests.

``RayCluster`` runs ``ray start --head`` and ``ray start --address`` (each ``--block``, in its own process
group and temp dir under one short root folder), with token authentication on: one token file, named by
``RAY_AUTH_TOKEN_PATH`` for every node and every client (``ray job submit``), as on a real cluster where the
token is copied to each node.

The whole cluster, and every client the tests run against it (``run``, ``popen``: ``ray job submit``, a
watcher, a local S3 server), live in a private network namespace that has only a loopback interface
(``unshare --user --net``, entered with ``nsenter``). Ray 2.60 replaces ``--node-ip-address=127.0.0.1`` with
the machine's address for a multi-node cluster, and its GCS and raylets then listen on every interface; in the
namespace, the node address is 127.0.0.1 and nothing the cluster opens is reachable from outside it (nor do
its ports meet anybody else's). A worker node can also be given a private view of some folders (a mount
namespace with bind mounts): that is how a test shows a node that does not see the driver's shard cache.

``stop`` ends exactly the processes the cluster started: its process groups, then anything left in its network
namespace or naming its root folder, then the namespace's holder. Never by name, never ``ray stop``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent  # the venv's ray, ltc and moto_server
TRIAL_TITLE = "ray::ImplicitFunc"  # Ray's process title for an actor of Tune's function trainable class: a trial


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HOLDER = ["unshare", "--user", "--map-root-user", "--net", "--mount", "--propagation", "private"]


def can_isolate() -> bool:
    """Whether unprivileged user, network and mount namespaces work here (``unshare``, ``nsenter``, ``ip``)."""
    if not all(shutil.which(tool) for tool in ("unshare", "nsenter", "ip")):
        return False
    probe = subprocess.run([*HOLDER, "sh", "-c", "ip link set lo up"], capture_output=True)
    return probe.returncode == 0


class RayCluster:
    """A head and worker nodes on this machine; see the module docstring."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        # short: Ray's unix socket paths live under it (108 bytes at most)
        self.root = Path(tempfile.mkdtemp(prefix="ltc-ray-", dir="/tmp"))
        self.token = self.root / "auth_token"
        self.token.write_text(uuid.uuid4().hex)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
        self.env.update(
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token),
            RAY_USAGE_STATS_ENABLED="0",
            RAY_TMPDIR=str(self.root),  # nodes the autoscaler starts put their files here too
            PYTHONUNBUFFERED="1",
        )
        self.env.update(env or {})
        self.procs: list[subprocess.Popen] = []
        self.gcs = ""
        self.dashboard = ""
        # the namespaces' holder: a process that sleeps in them, for nsenter to enter (with its loopback up)
        self.holder = subprocess.Popen(
            [*HOLDER, "sh", "-c", "ip link set lo up && exec sleep infinity"], start_new_session=True
        )
        deadline = time.monotonic() + 30
        while Path(f"/proc/{self.holder.pid}/cmdline").read_bytes().split(b"\0")[0] != b"sleep":
            if self.holder.poll() is not None or time.monotonic() > deadline:
                _signal_group(self.holder.pid, signal.SIGKILL)
                raise RuntimeError("could not make a private network namespace (unshare --user --net)")
            time.sleep(0.05)
        self.netns = os.readlink(f"/proc/{self.holder.pid}/ns/net")  # what every process of this cluster is in
        self.enter = ["nsenter", f"--target={self.holder.pid}", "--user", "--net", "--mount", "--preserve-credentials"]

    # ---- nodes

    def _start(
        self,
        name: str,
        args: list[str],
        *,
        env: dict[str, str] | None,
        hide: dict[Path, Path] | None,
        temp: str | None = None,
    ) -> subprocess.Popen:
        temp = self.root / (temp or name)
        log = self.root / f"{name}.log"
        cmd = [str(BIN / "ray"), "start", *args, f"--temp-dir={temp}", "--block", "--disable-usage-stats"]
        if hide:  # a mount namespace of its own: each folder shows the node its own replacement
            binds = " && ".join(f"mount --bind {shlex.quote(str(r))} {shlex.quote(str(f))}" for f, r in hide.items())
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{binds} && exec {shlex.join(cmd)}"]
        with open(log, "wb") as out:
            proc = self.popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while b"Ray runtime started" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start ({name}) failed:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        return proc

    def start_head(
        self,
        *,
        num_cpus: int = 0,
        num_gpus: int | None = None,
        autoscaling_config: Path | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        """``port``: the GCS port (default a free one), for a config written before the head starts."""
        port, dash = port or free_port(), free_port()
        args = [
            "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={num_cpus}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
        ]  # fmt: skip
        if num_gpus is not None:
            args.append(f"--num-gpus={num_gpus}")
        if autoscaling_config is not None:
            args.append(f"--autoscaling-config={autoscaling_config}")
        self.head = self._start("head", args, env=env, hide=None)
        self.gcs, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"

    def add_worker(
        self,
        *,
        num_cpus: int,
        num_gpus: int | None = None,
        env: dict[str, str] | None = None,
        hide: dict[Path, Path] | None = None,
        share_temp: bool = False,
    ) -> subprocess.Popen:
        """A worker node; its ``ray start --block`` process, for ``stop_node``. ``share_temp``: the head's temp
        folder, as every node started on one machine with Ray's defaults shares ``/tmp/ray``."""
        name = f"worker{len(self.procs)}"
        args = [
            f"--address={self.gcs}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
            f"--dashboard-agent-listen-port={free_port()}",
        ]  # fmt: skip
        if num_gpus is not None:
            args.append(f"--num-gpus={num_gpus}")
        return self._start(name, args, env=env, hide=hide, temp="head" if share_temp else None)

    def stop_node(self, node: subprocess.Popen) -> None:
        """End one node as a lost machine ends (its whole process group), leaving the others running."""
        _signal_group(node.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.wait(timeout=30)
        _signal_group(node.pid, signal.SIGKILL)
        node.wait()

    @staticmethod
    def trials(node: subprocess.Popen) -> list:
        """The processes (psutil) of the Ray Tune trials on ``node`` (its ``ray start`` process: the raylet
        starts the workers), from the moment Tune creates them: actors of Tune's function trainable class, which
        Ray titles ``TRIAL_TITLE`` (``.__init__``, ``.train`` while Tune calls it)."""
        import psutil

        found = []
        for p in psutil.Process(node.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if (p.cmdline() or [""])[0].startswith(TRIAL_TITLE):
                    found.append(p)
        return found

    # ---- clients (subprocesses: this test process never joins the cluster)

    def popen(self, cmd: list[str], *, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """``cmd`` in the cluster's network namespace, in a process group of its own, stopped by ``stop``."""
        env = {**self.env, **(env or {})}
        # entering a mount namespace moves the working directory to its root: say where to be (nsenter --wd)
        wd = f"--wd={kwargs.pop('cwd', None) or os.getcwd()}"
        proc = subprocess.Popen([*self.enter, wd, "--", *cmd], env=env, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def run(
        self, cmd: list[str], *, cwd: Path | str | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess:
        """``cmd`` in the cluster's network namespace, to its end; its output as text."""
        proc = self.popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def submit(self, entrypoint: list[str], *, working_dir: Path, timeout: float = 900) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir …  -- <entrypoint>``, waiting for the job to end."""
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--working-dir", ".", "--", *entrypoint]
        return self.run(cmd, cwd=working_dir, timeout=timeout)

    def nodes(self) -> list[dict]:
        """Alive nodes: id, resources (what ``ray.nodes()`` says, read by a short-lived driver)."""
        code = (
            f"import json, ray; ray.init(address={self.gcs!r}, logging_level='ERROR', log_to_driver=False); "
            "print(json.dumps([{'id': n['NodeID'], 'resources': n['Resources']} for n in ray.nodes() if n['Alive']]))"
        )
        out = self.run([sys.executable, "-c", code], timeout=120)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    # ---- the end

    def stop(self) -> None:
        """End every process this cluster started: process groups (SIGTERM, then SIGKILL), then stragglers
        that name the root folder; then remove the folder."""
        import psutil

        for proc in self.procs:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            _signal_group(proc.pid, signal.SIGKILL)
        # what is left: processes in the cluster's network namespace (job drivers run in a session of their own)
        # or naming its root folder; then the namespace's holder
        named = {p.pid for p in naming(str(self.root))}
        killed = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if p.pid != self.holder.pid and (p.pid in named or namespace_of(p.pid) == self.netns):
                    p.kill()
                    killed.append(p)
        # a killed process lingers while it frees its memory (then as a zombie until reaped: gone for us)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in killed) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_group(self.holder.pid, signal.SIGKILL)
        self.holder.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def until_each_node_runs_a_trial(nodes: list[subprocess.Popen], job: subprocess.Popen, timeout: float = 300) -> None:
    """Until every node runs a trial (Tune calls ``train`` on it), a node's trials are held (SIGSTOP) from the
    moment one of them runs; then they all go on. Why: Tune hands a trial whose actor is still starting to
    an actor that a finished trial freed on another node (reuse_actors), so on a loaded machine a node slow to
    start its workers could run none. A held trial cannot finish and free its actor."""
    import psutil

    running: set[int] = set()
    held: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(running) < len(nodes):
            for i, node in enumerate(nodes):
                for p in RayCluster.trials(node):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        if p.cmdline()[0].endswith(".train"):
                            running.add(i)
                        if i in running and p.pid not in held:
                            p.suspend()
                            held[p.pid] = p
            assert job.poll() is None, job.communicate()[0][-5000:]
            assert time.monotonic() < deadline, f"nodes running a trial after {timeout:.0f} s: {sorted(running)}"
            time.sleep(0.1)
    finally:
        for p in held.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.resume()


def naming(text: str) -> list:
    """Processes (psutil) whose command line names ``text``."""
    import psutil

    return [p for p in psutil.process_iter(["pid", "cmdline"]) if any(text in a for a in p.info["cmdline"] or ())]


def listening(root: int) -> set[str]:
    """The addresses that process ``root`` and its descendants listen on (TCP)."""
    import psutil

    ours = {root} | {p.pid for p in psutil.Process(root).children(recursive=True)}
    return {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in ours}


def namespace_of(pid: int, kind: str = "net") -> str | None:
    """Process ``pid``'s namespace of ``kind`` (net, mnt: ``/proc/PID/ns``)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:  # gone, or not ours to look at
        return None


def _alive(p) -> bool:
    """Whether psutil process ``p`` still runs (a zombie does not)."""
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
