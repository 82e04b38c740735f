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
