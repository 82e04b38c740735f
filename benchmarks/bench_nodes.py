"""How fast a node without the driver's shard cache gets a stage's inputs (``ltc.nodes``), against a plain
local copy of the same folder in the same process.

    python benchmarks/bench_nodes.py [--dataset fe] [--repeat 3]

Builds (or finds) the dataset's shards, serves the folder from an ``InputServer`` actor on a local Ray, and
times ``fetch_input`` into a fresh folder (what a trial on a node without the folder does once per node and
stage), against ``shutil.copytree`` of the same folder (the floor: one local disk copy). Prints MB/s of each
and their ratio, and the time of ``localize`` when every path is there already (what every other trial pays).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from bench_graphs import best_of  # (run as a script: benchmarks/ is on the path)

from ltc import nodes
from ltc.graphs import GraphConfig
from ltc.inputs import resolve_inputs
from ltc.splits import SplitConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fe")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import ray

    inputs = resolve_inputs([args.dataset], graph=GraphConfig(), split=SplitConfig(), progress=True)
    folder = inputs.shards[args.dataset]
    size = sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
    print(f"{args.dataset}: {folder}, {size / 1e6:.1f} MB in {len(list(Path(folder).iterdir()))} files")

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    with (
        tempfile.TemporaryDirectory(prefix="ltc-bench-files-") as tmp,
        nodes.serve_inputs("ltc-inputs-bench", nodes.input_paths([inputs])) as name,
    ):
        actor = ray.get_actor(name)
        n = [0]

        def served() -> None:
            n[0] += 1
            nodes.fetch_input(actor, folder, Path(tmp) / f"served{n[0]}")

        def local() -> None:
            n[0] += 1
            shutil.copytree(folder, Path(tmp) / f"local{n[0]}")

        t_served, t_local = best_of(served, args.repeat), best_of(local, args.repeat)
        t_present = best_of(lambda: nodes.localize(inputs, name), args.repeat)
    ray.shutdown()
    print(f"fetch_input through the actor: {t_served:.3f} s, {size / t_served / 1e6:.0f} MB/s")
    print(f"shutil.copytree (baseline):    {t_local:.3f} s, {size / t_local / 1e6:.0f} MB/s")
    print(f"ratio served / local copy: {t_served / t_local:.1f}x the time")
    print(f"localize with every path present: {t_present * 1e3:.2f} ms per trial")


if __name__ == "__main__":
    main()
