"""Object storage (``ltc/io.py`` and the sweep driver's ``--storage``) against moto's S3 server (conftest.s3_server)."""

from __future__ import annotations

import pickle
import re
import uuid
from pathlib import Path

import pytest
from conftest import aws_env, bucket_objects

from ltc import io
from ltc.errors import ConfigError, MissingFileError


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
    local = io.copy_to_local(f"{base}/a/b.bin")
    assert Path(local).read_bytes() == b"\x00payload"
    assert io.copy_file(f"{base}/a/b.bin", tmp_path / "c.bin").read_bytes() == b"\x00payload"
    assert io.find_files(base, "b.bin") == [f"{base}/a/b.bin"]
    missing = f"{base}/a/none.bin"
    with pytest.raises(MissingFileError, match=f"^{re.escape(missing)} does not exist$"), io.open_input(missing):
        pass
    with pytest.raises(MissingFileError, match=re.escape(f"{missing} does not exist")):
        io.copy_to_local(missing)


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


TINY = {"hidden": 16, "n_blocks": 2, "fc_dim": 16}


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
