"""Object storage (``ltc/io.py`` and the sweep driver's ``--storage``) against moto's S3 server (conftest.s3_server)."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from conftest import aws_env, bucket_objects, leaks, read_files

from ltc import io
from ltc.checkpoints import load_checkpoint
from ltc.errors import ConfigError, MissingFileError

TINY = {"hidden": 16, "n_blocks": 2, "fc_dim": 16}
# two stages of two tiny trials each: PT, then FT from the best PT trial
SWEEP = {
    "name": "s3sweep",
    "model_config": TINY,
    "asha": None,
    "search": {"trials": 2, "lr": {"low": 1e-3, "high": 1e-2}},
    "stages": [
        {"name": "pt", "datasets": ["l96"], "max_sizes": [60], "epochs": 2, "batch_size": 8},
        {"name": "ft", "datasets": ["hh143"], "start_from": {"stage": "pt", "select": "best"}, "sizes": [40],
         "epochs": 2, "batch_size": 8},
    ],
}  # fmt: skip


@pytest.fixture
def s3(s3_server, monkeypatch):
    aws_env(monkeypatch, s3_server)
    return s3_server


def _prefix() -> str:
    return f"t/{uuid.uuid4().hex[:8]}"


def test_io_reads_and_copies_objects_at_the_endpoint(s3, tmp_path):
    import pyarrow.fs as pafs

    prefix = _prefix()
    base = f"s3://{s3.bucket}/{prefix}"
    fs, path = io.filesystem(f"{base}/a/b.bin")
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{base.removeprefix('s3://')}/a/b.bin"
    with fs.open_output_stream(path) as out:
        out.write(b"\x00payload")
    assert bucket_objects(s3, prefix) == {f"{prefix}/a/b.bin": b"\x00payload"}

    assert io.exists(f"{base}/a/b.bin") and io.exists(f"{base}/a") and not io.exists(f"{base}/a/none.bin")
    assert io.file_type(f"{base}/a/b.bin") == "file" and io.file_type(f"{base}/a") == "dir"
    with io.open_input(f"{base}/a/b.bin") as fh:
        assert fh.read() == b"\x00payload"
    assert io.copy_file(f"{base}/a/b.bin", tmp_path / "c.bin").read_bytes() == b"\x00payload"
    assert io.find_files(base, "b.bin") == [f"{base}/a/b.bin"]
    missing = f"{base}/a/none.bin"
    with pytest.raises(MissingFileError, match=f"^{re.escape(missing)} does not exist$"), io.open_input(missing):
        pass
    with pytest.raises(MissingFileError, match=re.escape(f"{missing} does not exist")):
        io.copy_file(missing, tmp_path / "none.bin")
    assert not list(tmp_path.glob("none.bin*"))  # nothing half-written left behind


def test_tune_gets_the_path_in_the_bucket_and_a_filesystem_that_pickles_without_credentials(s3):
    storage_path, fs = io.tune_storage(f"s3://{s3.bucket}/sweeps/x")
    assert storage_path == f"{s3.bucket}/sweeps/x" and fs.type_name == "s3"
    pickled = pickle.dumps(fs)
    for secret in (s3.env["AWS_ACCESS_KEY_ID"], s3.env["AWS_SECRET_ACCESS_KEY"]):
        assert secret.encode() not in pickled
    assert b"endpoint_override" not in pickled  # ltc's own reduce: scheme, endpoint and region only
    again = pickle.loads(pickled)
    assert again.region == "us-east-1" and again.get_file_info(storage_path).type is not None
    # without an endpoint, and for local folders, Tune resolves the storage itself, as before
    assert io.tune_storage("/tmp/ray") == ("/tmp/ray", None)


def test_a_uri_with_a_query_string_is_refused_without_echoing_it(s3):
    bad = f"s3://{s3.bucket}/p?endpoint_override=127.0.0.1:9&access_key=AKIAXX"
    for call in (lambda: io.tune_storage(bad), lambda: io.exists(bad), lambda: io.check_uri(bad, what="storage")):
        with pytest.raises(ConfigError, match="AWS_ENDPOINT_URL") as err:
            call()
        assert "endpoint_override" not in str(err.value) and "AKIAXX" not in str(err.value)
        assert f"s3://{s3.bucket}/p?…" in str(err.value) and "\n" not in str(err.value)


def test_a_bad_storage_is_one_line_before_ray_starts(s3, tmp_path, capsys):
    import ray
    from conftest import REPO

    from ltc.cli import main
    from ltc.config import from_dict
    from ltc.sweep import SweepSpec, run_sweep

    bad = f"s3://{s3.bucket}/p?endpoint_override=127.0.0.1:9"
    quickstart = str(REPO / "sweeps" / "quickstart.yaml")
    assert main(["sweep", quickstart, "--dry-run", "--storage", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ltc sweep: error: storage s3://{s3.bucket}/p?…: a query string")
    with pytest.raises(ConfigError, match="AWS_ENDPOINT_URL"):
        run_sweep(from_dict(SweepSpec, SWEEP), results=tmp_path, storage=bad)
    assert not ray.is_initialized() and not (tmp_path / "s3sweep").exists()


@pytest.mark.parametrize(
    "value", ["127.0.0.1:9000", "ftp://h:1", "http://user:pw@h:1", "http://h:1/path", "http://h:1?x=y", "http://h:x"]
)
def test_a_malformed_endpoint_is_refused_without_echoing_it(monkeypatch, value):
    monkeypatch.setenv("AWS_ENDPOINT_URL", value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with pytest.raises(ConfigError, match=r"^AWS_ENDPOINT_URL must be an S3 endpoint") as err:
        io.filesystem("s3://b/k")
    assert value not in str(err.value)
    io.check_uri("gs://b/k")  # only s3:// reads the variable


def test_the_s3_specific_endpoint_wins(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://general:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3only:2")
    assert io.s3_endpoint() == ("https", "s3only:2")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert io.s3_endpoint() == ("http", "general:1")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert io.s3_endpoint() is None


def test_predict_reads_checkpoints_and_checkpoint_folders_from_the_bucket(s3, tmp_path):
    import pandas as pd
    import pyarrow.fs as pafs

    from ltc.checkpoints import load_checkpoint
    from ltc.predict import expand_checkpoints, predict
    from ltc.train import RunConfig, TrainConfig, train_run

    run = tmp_path / "run"
    train_run(RunConfig(datasets=("l96",), model="cgcnn", model_config=TINY, train=TrainConfig(epochs=2)), run)
    base = f"s3://{s3.bucket}/{_prefix()}"
    uris = [f"{base}/cell/r0f{k}/checkpoint.pt" for k in (0, 1)]
    for uri in [*uris, f"{base}/other/metrics.json"]:
        fs, path = io.filesystem(uri)
        pafs.copy_files(str(run / "checkpoint.pt"), path, destination_filesystem=fs)

    assert load_checkpoint(uris[0])["model"]["name"] == "cgcnn"
    assert expand_checkpoints([f"{base}/cell", uris[1]]) == uris  # a folder: recursive, sorted; no repeats
    local = predict([run / "checkpoint.pt"], "l96")
    pd.testing.assert_frame_equal(predict([uris[0]], "l96"), local)
    both = predict([f"{base}/cell"], "l96")
    assert (both.n_models == 2).all() and both.pred_mean.tolist() == local.pred_mean.tolist()
    with pytest.raises(MissingFileError, match=re.escape(f"checkpoint {base}/nosuch.pt does not exist")):
        predict([f"{base}/nosuch.pt"], "l96")
    with pytest.raises(MissingFileError, match=re.escape(f"checkpoint folder {base}/other holds no checkpoint.pt")):
        predict([f"{base}/other"], "l96")


# --- a sweep whose Tune storage is the bucket (local Ray, 2 CPUs) -------------------------------------------


@pytest.fixture
def s3_ray(s3_server, monkeypatch):
    """A local Ray started with the server's variables set, so that its trial workers inherit them; its files
    (logs included) under a temp folder of its own, yielded with the server."""
    import ray

    from ltc.sweep.driver import init_ray

    aws_env(monkeypatch, s3_server)
    ray_files = Path(tempfile.mkdtemp(prefix="ltc-ray-", dir="/tmp"))  # short: Ray's socket paths are under it
    monkeypatch.setenv("RAY_TMPDIR", str(ray_files))
    init_ray(None, num_cpus=2)
    try:
        yield s3_server, ray_files
    finally:
        ray.shutdown()
        shutil.rmtree(ray_files, ignore_errors=True)


@pytest.mark.slow
def test_a_sweep_keeps_checkpoints_and_tune_state_in_the_bucket(s3_ray, tmp_path):
    import pandas as pd

    from ltc.cli import main
    from ltc.config import from_dict
    from ltc.sweep import SweepSpec, run_sweep

    s3, ray_files = s3_ray
    prefix = _prefix()
    storage = f"s3://{s3.bucket}/{prefix}"
    spec = from_dict(SweepSpec, SWEEP)
    trials = run_sweep(spec, results=tmp_path, storage=storage)

    assert len(trials) == 4 and (trials.status == "completed").all(), trials[["setting", "status", "error"]]
    assert trials.checkpoint.str.startswith(f"{storage}/").all()
    assert trials.checkpoint.str.endswith("/checkpoint.pt").all()
    objects = bucket_objects(s3, prefix)
    for uri in trials.checkpoint:  # the checkpoints are objects in the bucket, with their predictions beside
        key = uri.removeprefix(f"s3://{s3.bucket}/")
        assert key in objects and key.replace("checkpoint.pt", "predictions.parquet") in objects
    # Tune's state is there too, with the storage filesystem pickled by ltc's reduce (checked for leaks below)
    assert b"_endpoint_s3" in objects[f"{prefix}/pt/tuner.pkl"] and f"{prefix}/ft/tuner.pkl" in objects
    assert not (tmp_path / "s3sweep" / "ray").exists()  # nothing of Tune's went to the local default

    # the FT trials started from the best PT trial's checkpoint, fetched from the bucket by their workers
    pt, ft = trials[trials.kind == "pretrain"], trials[trials.kind == "finetune"]
    assert set(ft.init) == {pt.loc[pt.val_score.idxmin()].checkpoint}
    # … and say so in what they wrote (the checkpoint's history, metrics.json): the URI, not a copy's temp path
    for uri in ft.checkpoint:
        key = uri.removeprefix(f"s3://{s3.bucket}/")
        metrics = json.loads(objects[key.replace("checkpoint.pt", "metrics.json")])
        assert metrics["init"] == load_checkpoint(uri)["history"][-1]["init"] == ft.init.iloc[0]
    # best checkpoints copied from the bucket into the results folder, byte for byte
    for stage in ("pt", "ft"):
        best = pd.read_parquet(tmp_path / "s3sweep" / "best" / stage / "best.parquet")
        assert len(best) == 1 and Path(best.best_checkpoint.iloc[0]).is_relative_to(tmp_path)
        key = best.checkpoint.iloc[0].removeprefix(f"s3://{s3.bucket}/")
        assert Path(best.best_checkpoint.iloc[0]).read_bytes() == objects[key]

    # ltc predict with a checkpoint in the bucket, through the CLI
    out = tmp_path / "p.parquet"
    assert main(["predict", "--checkpoint", ft.checkpoint.iloc[0], "l96", "--out", str(out)]) == 0
    assert len(pd.read_parquet(out)) == 95

    # a finished sweep resumed: its stages are read back, nothing runs again
    again = run_sweep(spec, results=tmp_path, storage=storage, resume=True)
    assert again.trial_id.tolist() == trials.trial_id.tolist()

    # no credential, and no endpoint option, in anything ltc or Tune wrote: the results folder and the bucket;
    # and no credential in Ray's files and logs (Tune copies the driver's AWS variables into trials' runtime
    # envs, which Ray logs: ltc moved them into a private credentials file first, io.aws_credentials_in_a_file)
    written = read_files(tmp_path)
    written.update(bucket_objects(s3, prefix))
    assert leaks(written, [s3.env["AWS_ACCESS_KEY_ID"], s3.env["AWS_SECRET_ACCESS_KEY"], "endpoint_override"]) == []
    logs = read_files(ray_files)
    assert any(name.endswith("runtime_env_agent.log") for name in logs)
    assert leaks(logs, [s3.env["AWS_SECRET_ACCESS_KEY"], s3.env["AWS_ACCESS_KEY_ID"], "endpoint_override"]) == []


@pytest.mark.slow
def test_an_interrupted_sweep_restores_its_tuner_from_the_bucket(s3_server, tmp_path, monkeypatch):
    import signal

    import pandas as pd
    import yaml
    from test_sweep_resume import _cleanup, _start, _tail, _wait

    aws_env(monkeypatch, s3_server)
    spec = {**SWEEP, "name": "s3resume"}
    path = tmp_path / "s3resume.yaml"
    path.write_text(yaml.safe_dump(spec))
    results, marker = tmp_path / "results", tmp_path / "paused"
    prefix = _prefix()
    storage = f"s3://{s3_server.bucket}/{prefix}"
    args = [str(path), "--results", str(results), "--storage", storage]
    log1, log2 = tmp_path / "first.log", tmp_path / "second.log"
    # the driver (ltc sweep in a subprocess) holds still once the PT stage's Tune run is over, and is killed there
    with monkeypatch.context() as pause:
        pause.setenv("LTC_TEST_PAUSE_AT", "copy_best")
        pause.setenv("LTC_TEST_PAUSE_FILE", str(marker))
        first = _start(args, log1)
    try:
        _wait(marker.exists, 300, "the driver to pause while copying the PT stage's best checkpoints", first, log1)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        _cleanup(first)
    assert not (results / "s3resume" / "stages" / "pt.parquet").exists()
    assert io.exists(f"{storage}/pt/tuner.pkl")
    finished = {  # the PT trials whose final checkpoints are in the bucket (trial folders are named by trial id)
        key.removeprefix(f"{prefix}/pt/").split("/")[0]
        for key in bucket_objects(s3_server, f"{prefix}/pt/")
        if key.endswith("/checkpoint.pt")
    }
    assert len(finished) == 2

    second = _start([*args, "--resume"], log2)
    try:
        assert second.wait(timeout=300) == 0, _tail(log2)
    finally:
        _cleanup(second)
    assert "stage pt: resuming" in log2.read_text()  # Tuner.restore from s3://…/pt, its trials kept
    trials = pd.read_parquet(results / "s3resume" / "trials.parquet")
    assert len(trials) == 4 and trials.trial_id.is_unique and (trials.status == "completed").all()
    assert set(trials[trials.stage == "pt"].trial_id) == finished  # restored, not trained again
    assert trials.checkpoint.str.startswith(f"{storage}/").all()


def test_aws_credentials_move_from_the_environment_into_a_private_file(monkeypatch):
    import os
    import stat

    import boto3

    for key in (*io.CREDENTIAL_VARIABLES, "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    before = dict(os.environ)
    with io.aws_credentials_in_a_file() as path:
        assert path is None and dict(os.environ) == before
    monkeypatch.setenv("AWS_PROFILE", "lab")  # may name a profile whose config would win over these keys
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    monkeypatch.setenv("AWS_SECURITY_TOKEN", "old-token")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token")
    before = dict(os.environ)
    with io.aws_credentials_in_a_file() as path:
        assert os.environ["AWS_SHARED_CREDENTIALS_FILE"] == str(path)
        assert os.environ["AWS_PROFILE"] == io.CREDENTIALS_PROFILE
        assert not [k for k in io.CREDENTIAL_VARIABLES if k in os.environ]  # nothing left for Tune to copy
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert path.read_text().splitlines() == [
            f"[{io.CREDENTIALS_PROFILE}]",
            "aws_access_key_id = AKIDEXAMPLE",
            "aws_secret_access_key = wJalrXUtnFEMI",
            "aws_session_token = session-token",
        ]
        creds = boto3.Session().get_credentials()  # the AWS SDK finds the same credentials through the file
        assert (creds.access_key, creds.secret_key, creds.token) == ("AKIDEXAMPLE", "wJalrXUtnFEMI", "session-token")
    assert dict(os.environ) == before  # as it was; the file stays until exit, for a local Ray's workers
    assert path.is_file()
