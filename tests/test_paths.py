from __future__ import annotations

import os
import stat

from ltc.paths import cache_root, data_home


def test_data_home_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("LTC_DATA_HOME", str(tmp_path / "d"))
    assert data_home() == tmp_path / "d"
    assert data_home(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("LTC_DATA_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_home() == tmp_path / "xdg" / "ltc" / "data"


def test_cache_defaults_inside_a_writable_data_home(monkeypatch, tmp_path):
    monkeypatch.delenv("LTC_CACHE", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    assert cache_root(home=home) == home / ".ltc_cache"
    monkeypatch.setenv("LTC_CACHE", str(tmp_path / "c"))
    assert cache_root(home=home) == tmp_path / "c"


def test_read_only_data_home_is_never_written_even_by_root(monkeypatch, tmp_path):
    monkeypatch.delenv("LTC_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    home = tmp_path / "shared-data"
    home.mkdir()
    home.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        root = cache_root(home=home)
        assert root == tmp_path / "xdg" / "ltc" / "cache" and root.is_dir()
        assert os.listdir(home) == []
    finally:
        home.chmod(0o755)


def test_a_deleted_working_directory_is_replaced_by_its_path_made_again_else_the_temp_folder(tmp_path):
    """What a Ray job's driver meets when another node's agent unpacks the job afresh (io.keep_working_directory):
    run in a child process, whose working directory this test may take away."""
    import subprocess
    import sys
    import tempfile

    code = """
import os, shutil, sys, tempfile
from ltc import io
here = sys.argv[1]
os.makedirs(here); os.chdir(here); shutil.rmtree(here)
io.keep_working_directory(); print(os.getcwd())       # gone for good: the temp folder
os.makedirs(here); os.chdir(here); shutil.rmtree(here); os.makedirs(here)
io.keep_working_directory(); print(os.getcwd())       # made again at its path (a fresh unpack): there
io.keep_working_directory(); print(os.getcwd())       # whole: left as it is
"""
    here = tmp_path / "job"
    out = subprocess.run([sys.executable, "-c", code, str(here)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [tempfile.gettempdir(), str(here), str(here)]
