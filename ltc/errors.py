"""What the user got wrong: ``LtcError`` and its kinds.

The CLI prints an ``LtcError`` as one line (``ltc <command>: error: …``) and exits 2; any other
exception is a bug in ltc (or a library under it) and keeps its traceback. Each kind also derives
from the built-in exception it refines, so ``except ValueError`` keeps working for library users.
"""

from __future__ import annotations


class LtcError(Exception):
    """Base class of every error that is the user's to fix: its message names the bad value or file."""

    def __str__(self) -> str:  # KeyError-derived kinds would quote their message; keep it plain
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ConfigError(LtcError, ValueError):
    """A value that does not fit: a sweep-file key, a command-line flag, a config field."""


class MissingFileError(LtcError, FileNotFoundError):
    """A file or folder the user pointed at (or that a run needs) does not exist."""


class DataError(LtcError, ValueError):
    """Data that exists but is damaged or unusable: a dataset file, a shard, a checkpoint."""


class AlreadyExistsError(LtcError, FileExistsError):
    """Something would be overwritten that holds the user's work (a sweep's results folder)."""
