"""Where ltc reads data and writes its cache.

- data home: ``$LTC_DATA_HOME``, else ``~/.cache/ltc/data`` (laid out like ``shared/data``: one folder
  per dataset, see ``SOURCES.md``).
- shard cache: ``$LTC_CACHE``, else ``<data home>/.ltc_cache`` when the data home is writable, else
  ``~/.cache/ltc/cache`` (a read-only data home, as on CI, still works).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
_told: set[Path] = set()  # read-only data homes already reported


def user_cache_root() -> Path:
    """``$XDG_CACHE_HOME/ltc`` or ``~/.cache/ltc``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ltc"


def data_home(path: str | os.PathLike[str] | None = None) -> Path:
    """The data home: ``path`` if given, else ``$LTC_DATA_HOME``, else the user cache folder."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("LTC_DATA_HOME")
    if env:
        return Path(env).expanduser()
    return user_cache_root() / "data"


def cache_root(path: str | os.PathLike[str] | None = None, *, home: Path | None = None) -> Path:
    """The shard cache folder (created if missing)."""
    if path is not None:
        root = Path(path).expanduser()
    elif os.environ.get("LTC_CACHE"):
        root = Path(os.environ["LTC_CACHE"]).expanduser()
    else:
        home = data_home() if home is None else home
        root = home / ".ltc_cache"
        if not _writable(root):
            fallback = user_cache_root() / "cache"
            if home not in _told:
                _told.add(home)
                log.info("data home %s is not writable; caching shards in %s", home, fallback)
            root = fallback
    root.mkdir(parents=True, exist_ok=True)
    return root


def _writable(folder: Path) -> bool:
    """True if ``folder`` (or its nearest existing parent) may be written to.

    A folder with no write permission bit at all counts as read-only even for root, who passes
    ``os.access``: a shared, read-only data home must never receive a cache.
    """
    probe = nearest_existing(folder)
    return bool(probe.stat().st_mode & 0o222) and os.access(probe, os.W_OK)


def nearest_existing(folder: Path) -> Path:
    """``folder`` if it exists, else its nearest existing parent (where making it would begin)."""
    return next(p for p in (folder, *folder.parents) if p.exists())  # the root always exists
