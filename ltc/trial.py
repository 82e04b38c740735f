"""One Ray Tune trial: a PT or FT training run (``ltc.train.train_run``) that reports to Tune.

The trial's config holds names, numbers and paths only (Tune snapshots it), all resolved by the
driver: ``inputs`` (shard folders, split ids, held-out formulas: ``ltc.inputs.RunInputs``) and the
starting checkpoint (a path or URI, or a name in ``ltc.models.PRETRAINED``, loaded by ``ltc.transfer.load_init``).
A trial opens those and nothing else: it never reads raw data, hashes files or builds shards. On a cluster, a
node without the driver's shard cache copies those paths from the driver first (``ltc.nodes``, the server
named by ``input_server``); otherwise a path missing on its node is an error that names it.

Every epoch reports ``val_score`` (into its Optuna trial, for early stopping); every ``checkpoint_every``
epochs a resumable training state goes with it, so a trial whose worker died continues from there. The last report
carries the test metrics, ``done=True`` and the final checkpoint (``checkpoint.pt``, ``metrics.json``,
``predictions.parquet``), marked ``ltc_completed``; a trial restored after it finished re-reports that
instead of training again. Intermediate checkpoints are taken every ``checkpoint_every`` epochs but at
most every ``checkpoint_seconds``: short trials simply restart, long ones lose little. Epoch reports
are sent at most every ``report_seconds`` (each one waits for the driver).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

# Tune reserves "done" (it is True for trials early stopping stopped too): ltc marks a finished training with this.
COMPLETED = "ltc_completed"


def run_config(config: dict[str, Any]):
    """The ``RunConfig`` a trial config describes."""
    from ltc.graphs import GraphConfig
    from ltc.splits import SplitConfig
    from ltc.train import RunConfig, TrainConfig

    return RunConfig(
        datasets=tuple(config["datasets"]),
        model=config.get("model"),
        model_config=dict(config.get("model_config") or {}),
        graph=GraphConfig(**config["graph"]),
        size=config.get("size"),
        max_size=config.get("max_size"),
        seed=config["seed"],
        split=SplitConfig.from_stored(config["split"]),  # a resumed older trial: its own split
        fold=config.get("fold"),
        repeat=config.get("repeat"),
        holdout=tuple(config.get("holdout") or ()),
        transform=config.get("transform"),
        # a URI as it is: load_checkpoint copies it for the load only, and results record where the run started
        init=config.get("init") or None,
        strategy="all" if config["kind"] != "finetune" else config["strategy"],
        n_unfrozen=config.get("n_unfrozen"),
        train=TrainConfig(**config["train"], lr=config["lr"], seed=config["seed"], device="auto"),
    )


def _flat(metrics: dict[str, Any]) -> dict[str, Any]:
    """Scalars only (Tune's result rows); lists become '+'-joined strings."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, (list, tuple)):
            out[k] = "+".join(str(x) for x in v)
        elif isinstance(v, dict):
            continue
        else:
            out[k] = v
    return out


def ltc_trial(config: dict[str, Any]) -> None:
    """The Ray Tune function trainable of every ltc sweep."""
    import ray
    import torch
    from ray import tune

    from ltc.inputs import RunInputs
    from ltc.nodes import localize
    from ltc.train import train_run

    torch.set_num_threads(int(config.get("threads", 1)))
    # a node without the driver's shard cache copies the stage's inputs from the driver first (ltc.nodes)
    inputs, copied = localize(RunInputs.from_dict(config["inputs"]), config.get("input_server"))
    where = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "inputs_copied_bytes": copied,
    }
    started = time.time()

    resume = None
    previous = tune.get_checkpoint()
    if previous is not None:
        with previous.as_directory() as folder:
            folder = Path(folder)
            if (folder / "metrics.json").is_file():  # finished before the driver went down: report again
                metrics = json.loads((folder / "metrics.json").read_text())
                metrics.pop("history", None)
                if "val_score" not in metrics:  # written before val_score: it was picked by the loss
                    metrics |= {"val_score": metrics.get("val_loss"), "select_by": "loss"}
                final = {**_flat(metrics), **where, COMPLETED: True, "epoch_count": metrics["epochs_run"]}
                tune.report(final, checkpoint=previous)
                return
            if (folder / "train_state.pt").is_file():
                resume = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=True)

    every = int(config.get("checkpoint_every", 5))
    min_seconds = float(config.get("checkpoint_seconds", 300.0))
    report_seconds = float(config.get("report_seconds", 2.0))
    epochs = int(config["train"]["epochs"])
    last = {"checkpoint": time.monotonic(), "report": time.monotonic()}

    def on_epoch(record: dict[str, float], state) -> None:
        count = int(record["epoch"]) + 1
        if count == epochs:
            return  # the final report follows at once, with the test metrics
        now = time.monotonic()
        report = {**record, "epoch_count": count}
        if count % every == 0 and now - last["checkpoint"] >= min_seconds:
            last["checkpoint"] = last["report"] = now
            with tempfile.TemporaryDirectory(prefix="ltc-state-") as tmp:
                torch.save(state(), Path(tmp) / "train_state.pt")
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(tmp))
        elif now - last["report"] >= report_seconds:
            # each report waits for the driver: short epochs report every few seconds, not every epoch
            # (successive halving judges a trial at its first report past a rung)
            last["report"] = now
            tune.report(report)

    out = Path(tempfile.mkdtemp(prefix="ltc-trial-"))
    try:
        metrics = train_run(run_config(config), out, inputs=inputs, on_epoch=on_epoch, resume=resume)
        final = {
            **_flat(metrics),
            **where,
            COMPLETED: True,
            "epoch_count": metrics["epochs_run"],
            "started": started,
            "finished": time.time(),
            "resumed_from_epoch": int(resume["epoch"]) + 1 if resume else 0,
        }
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(out))
    finally:
        shutil.rmtree(out, ignore_errors=True)
