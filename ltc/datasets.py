"""Datasets: a name → records (id, structure, target) + rejected rows. Built-in sets, and the user's own.

Every dataset of ``shared/data/SOURCES.md`` has a short stable name (``ltc datasets`` lists them).
A dataset is read from ``$LTC_DATA_HOME/<folder>/`` through the first of its sources whose file is
present; names that matminer knows can also be downloaded through ``matminer.datasets.load_dataset``
into that same folder. Reading is cheap and keeps structures unparsed (``RawRecord``): parsing happens
in the shard builders, in parallel, where a structure that fails to parse becomes a rejected row.

A user's own dataset (``UserDataset``: a folder with ``id_prop.csv``, an extended XYZ file, a CSV or Parquet
table, a JSON list of records) becomes a ``DatasetSpec`` like the built-in ones (``user_spec``), known by name
while it is declared (``declare``: a sweep file's ``datasets:``, or a path given to the CLI). Its structures are
read by pymatgen's and ASE's own readers; from its records on, nothing downstream knows the difference.

Nothing is dropped silently: every row of the source file ends up either as a ``RawRecord`` or as a
``Rejected`` row with its reason (missing or non-finite target, duplicate id, missing field, no structure
file, a kappa that cannot be one).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from ltc.errors import ConfigError, DataError, LtcError, MissingFileError
from ltc.paths import data_home as _data_home

log = logging.getLogger(__name__)

READER_VERSION = 1  # bump when a reader changes what it yields for the same file (part of the fingerprint)


class DatasetError(LtcError):
    """Base class for dataset errors."""


class UnknownDatasetError(DatasetError, ConfigError, KeyError):
    """A dataset name that is not in the registry."""


class DatasetNotFoundError(DatasetError, MissingFileError):
    """No local file for a dataset, and no download possible."""


class DatasetFileError(DatasetError, DataError):
    """A dataset file that exists but cannot be read as a whole."""


class EmptyStructureError(ValueError):
    """A structure record with no sites (pymatgen cannot even build it)."""

    def __init__(self) -> None:
        super().__init__("empty structure: no sites")


@dataclass(frozen=True)
class RawRecord:
    """One row of a dataset with its structure still unparsed.

    ``fmt`` says how to parse ``payload``: ``jarvis`` (JARVIS Atoms dict), ``pymatgen`` (``Structure.as_dict``),
    ``cif`` / ``poscar`` (strings), ``structure`` (an already built pymatgen ``Structure``), ``file`` (the path of
    a structure file, read by pymatgen, else ASE), ``ase`` (an ``ase.Atoms``) or ``extxyz`` (one frame as text).
    ``target`` is in the dataset's raw physical units.
    """

    id: str
    fmt: str
    payload: Any
    target: float


@dataclass(frozen=True)
class Rejected:
    """A row that did not become a graph, and why: ``reason`` reads ``"<kind>: <detail>"``."""

    id: str
    reason: str


def parse_structure(fmt: str, payload: Any):
    """Build a pymatgen ``Structure`` from a ``RawRecord`` payload. Raises on bad input."""
    from pymatgen.core import Lattice, Structure

    if fmt == "structure":
        return payload
    if fmt == "file":
        return read_structure_file(Path(payload))
    if fmt == "ase":
        return ase_to_structure(payload)
    if fmt == "extxyz":  # one frame as text (how ltc screen keeps an extxyz frame)
        import ase.io

        return ase_to_structure(ase.io.read(io.StringIO(payload), format="extxyz"))
    if fmt == "jarvis":
        for key in ("lattice_mat", "elements", "coords"):
            if key not in payload:
                raise ValueError(f"JARVIS atoms dict has no {key!r}")
        if not payload["elements"]:
            raise EmptyStructureError
        cartesian = payload.get("cartesian")
        if not isinstance(cartesian, bool):
            raise ValueError(f"JARVIS atoms dict has cartesian={cartesian!r}, expected true or false")
        return Structure(
            Lattice(payload["lattice_mat"]),
            payload["elements"],
            payload["coords"],
            coords_are_cartesian=cartesian,
        )
    if fmt == "pymatgen":
        if isinstance(payload, dict) and payload.get("sites") == []:
            raise EmptyStructureError
        return Structure.from_dict(payload)
    if fmt in ("cif", "poscar"):
        if not isinstance(payload, str) or not payload.strip():
            raise ValueError(f"empty {fmt.upper()} string")
        import warnings

        with warnings.catch_warnings():
            # pymatgen warns on every CIF with rounded fractional coordinates; the rows are still fine
            warnings.simplefilter("ignore")
            return Structure.from_str(payload, fmt=fmt)
    raise ValueError(f"unknown structure format {fmt=}")


# Files pymatgen reads by their name (``Structure.from_file``); any other file is ASE's. A file pymatgen knows and
# refuses is refused: ASE would read some of them differently (two species on one CIF site become one).
PYMATGEN_SUFFIXES = (".cif", ".mcif", ".vasp", ".poscar", ".json", ".cssr", ".xsf", ".res")
PYMATGEN_NAMES = ("POSCAR", "CONTCAR")


def read_structure_file(path: Path):
    """One structure from a file: by pymatgen for the formats it knows by name (CIF, POSCAR/CONTCAR, .vasp, pymatgen
    JSON …), else by ASE (any format ASE knows). A file of several structures is refused. Raises ``ValueError``
    naming the file and the reader's complaint."""
    import warnings

    name = path.name.removesuffix(next((c for c in _COMPRESSED if path.name.endswith(c)), ""))
    if name.lower().endswith(PYMATGEN_SUFFIXES) or name.upper().startswith(PYMATGEN_NAMES):
        from pymatgen.core import Structure
        from pymatgen.io.cif import CifParser

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pymatgen's CIF warnings on rounded coordinates
                if not name.lower().endswith((".cif", ".mcif")):
                    return Structure.from_file(path)
                found = CifParser(path).parse_structures(primitive=False, on_error="raise")
        except Exception as err:  # any reader failure is this file's reason
            why = f"{type(err).__name__}: {_first_line(err)}"
            raise ValueError(f"{path.name}: pymatgen cannot read it ({why})") from None
        if len(found) != 1:
            raise ValueError(f"{path.name} holds {len(found)} structures (data_ blocks); give one per file")
        return found[0]
    import ase.io

    try:
        frames = ase.io.read(path, index=":")
    except Exception as err:
        raise ValueError(f"{path.name}: ASE cannot read it ({type(err).__name__}: {_first_line(err)})") from None
    if len(frames) != 1:
        raise ValueError(f"{path.name} holds {len(frames)} structures; give one structure per file")
    return ase_to_structure(frames[0])


def ase_to_structure(atoms):
    """An ``ase.Atoms`` as a pymatgen ``Structure`` (pymatgen's ``AseAtomsAdaptor``); it must be periodic."""
    from pymatgen.io.ase import AseAtomsAdaptor

    if len(atoms) == 0:
        raise EmptyStructureError
    if not all(atoms.pbc):
        raise ValueError(f"not a crystal: periodic boundary conditions pbc={list(map(bool, atoms.pbc))}, need all true")
    if atoms.cell.volume <= 0:
        raise ValueError(f"not a crystal: cell volume {atoms.cell.volume:g} Å^3")
    return AseAtomsAdaptor.get_structure(atoms)


def _first_line(err: BaseException) -> str:
    """An exception's message, first line only (readers' messages can run to several lines)."""
    text = str(err).strip()
    return (text.splitlines() or [""])[0][:200]


# --------------------------------------------------------------------------------------------------
# Sources: one small class per file format, each behind ``rows(folder)``.


def finite_target(value: Any) -> tuple[float | None, str | None]:
    """(target, None) if ``value`` is a finite number, else (None, reason)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, "missing target: empty"
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None, f"bad target: {value!r} is not a number"
    if math.isnan(x):
        return None, "missing target: NaN"
    if not math.isfinite(x):
        return None, f"bad target: {x} is not finite"
    return x, None


def _load_json(path: Path) -> Any:
    import bz2
    import lzma

    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix, open)
    packed = {gzip.open: "gzipped ", bz2.open: "bzip2 ", lzma.open: "xz "}.get(opener, "")
    try:
        with opener(path, "rt", encoding="utf-8-sig") as fh:  # -sig: an editor's byte-order mark
            return json.load(fh)
    except (OSError, EOFError, UnicodeDecodeError, lzma.LZMAError, json.JSONDecodeError) as err:
        raise DatasetFileError(f"{path}: cannot read as {packed}JSON ({err})") from err


def _json_rows(path: Path) -> list[dict[str, Any]]:
    data = _load_json(path)
    if not isinstance(data, list):
        raise DatasetFileError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
    return data


# (id, fmt, payload, raw target), optionally with where the row is ("id_prop.csv line 7"), or a rejected row
Row = tuple[str, str, Any, Any] | tuple[str, str, Any, Any, str] | Rejected


class Source:
    """Where and how a dataset is stored in its folder of the data home.

    Subclasses have ``file`` (name in the dataset folder) and ``fmt`` (see ``RawRecord``).
    """

    file: str
    fmt: str

    def rows(self, folder: Path) -> Iterator[Row]:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:
        return self.file

    def content_files(self, folder: Path) -> list[Path]:
        """Files the rows are read from besides ``file`` (a folder's structure files): part of the fingerprint."""
        return []


def _dict_rows(path: Path, *, id_key: str, structure_key: str, target_key: str, fmt: str) -> Iterator[Row]:
    for i, rec in enumerate(_json_rows(path)):
        if not isinstance(rec, dict):
            yield Rejected(f"row {i}", f"bad record: a {type(rec).__name__}, not an object")
            continue
        rid = rec.get(id_key)
        if rid is None or str(rid) == "":
            yield Rejected(f"row {i}", f"missing id: no field {id_key!r}")
            continue
        if rec.get(structure_key) is None:
            yield Rejected(str(rid), f"missing structure: no field {structure_key!r}")
            continue
        yield str(rid), fmt, rec[structure_key], rec.get(target_key)


@dataclass(frozen=True)
class DeviUnion(Source):
    """``devi2024_<p>_union.json.gz``: JARVIS Atoms dicts, ``jid`` = row of the matminer dataframe."""

    prop: str
    target_key: str = "target_raw"
    fmt: str = "jarvis"

    @property
    def file(self) -> str:  # type: ignore[override]
        return f"devi2024_{self.prop}_union.json.gz"

    def rows(self, folder: Path) -> Iterator[Row]:
        return _dict_rows(
            folder / self.file, id_key="jid", structure_key="atoms", target_key=self.target_key, fmt=self.fmt
        )


@dataclass(frozen=True)
class RecordsJSON(Source):
    """A gzipped JSON list of records with an id, a structure (pymatgen dict or CIF) and a target."""

    file: str
    id_key: str
    structure_key: str
    target_key: str
    fmt: str

    def rows(self, folder: Path) -> Iterator[Row]:
        return _dict_rows(
            folder / self.file,
            id_key=self.id_key,
            structure_key=self.structure_key,
            target_key=self.target_key,
            fmt=self.fmt,
        )


@dataclass(frozen=True)
class MatminerCSV(Source):
    """Old matminer CSV (``# ref`` first line, ``idx`` column, CIF in ``structure``)."""

    file: str
    target_key: str
    fmt: str = "cif"

    def rows(self, folder: Path) -> Iterator[Row]:
        import pandas as pd

        path = folder / self.file
        try:
            df = pd.read_csv(path, comment="#")
        except Exception as err:  # pandas raises many kinds on a damaged file
            raise DatasetFileError(f"{path}: cannot read as CSV ({err})") from err
        missing = [c for c in ("idx", "structure", self.target_key) if c not in df.columns]
        if missing:
            raise DatasetFileError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
        for rid, cif, target in zip(df["idx"], df["structure"], df[self.target_key], strict=True):
            if not isinstance(cif, str):
                yield Rejected(str(rid), "missing structure: no CIF in column 'structure'")
                continue
            yield str(rid), self.fmt, cif, target


@dataclass(frozen=True)
class MatminerDataset(Source):
    """A dataset through ``matminer.datasets.load_dataset`` (``<name>.json.gz`` in the same folder).

    Ids are the dataframe's row numbers, which are the ``jid`` of Devi's files.
    """

    name: str
    target_key: str
    fmt: str = "structure"

    @property
    def file(self) -> str:  # type: ignore[override]
        return f"{self.name}.json.gz"

    def rows(self, folder: Path, *, download: bool = False) -> Iterator[Row]:
        df = load_matminer(self.name, folder, download=download)
        missing = [c for c in ("structure", self.target_key) if c not in df.columns]
        if missing:
            raise DatasetFileError(f"{folder / self.file}: missing column(s) {missing}")
        for rid, structure, target in zip(df.index, df["structure"], df[self.target_key], strict=True):
            if structure is None:
                yield Rejected(str(rid), "missing structure: null")
                continue
            yield str(rid), self.fmt, structure, target

    def describe(self) -> str:
        return f"{self.file} (matminer {self.name})"


def load_matminer(name: str, folder: Path, *, download: bool):
    """``matminer.datasets.load_dataset(name)`` stored in ``folder``; errors name the file."""
    from matminer.datasets import load_dataset

    path = folder / f"{name}.json.gz"
    if not path.exists() and not download:
        raise DatasetNotFoundError(f"{path} does not exist and downloads are off")
    try:
        return load_dataset(name, data_home=str(folder), download_if_missing=download, pbar=False)
    except Exception as err:
        if path.exists():
            raise DatasetFileError(f"{path}: matminer could not read it ({err})") from err
        raise DatasetNotFoundError(f"could not download matminer dataset {name!r} into {folder} ({err})") from err


# --------------------------------------------------------------------------------------------------
# Sources of a user's own data (``UserDataset``): the field's layouts, read by pymatgen, ASE, pandas and matminer.

ID_PROP = "id_prop.csv"  # CGCNN's and ALIGNN's convention: id,target rows without a header
DECLARATION_FILE = "dataset.yaml"  # a folder's own declaration (the keys of UserDataset, and its name)
LAYOUTS: dict[str, str] = {
    "id_prop": f"a folder with {ID_PROP} (id,target rows, no header) and one structure file per id beside it",
    "extxyz": "an extended XYZ file (.xyz, .extxyz), the target in each frame's info",
    "table": "a CSV or Parquet table with an id, a target and a structure column (CIF text or a pymatgen dict)",
    "json": "a JSON list of records with an id, a target and a structure (a pymatgen dict or CIF text)",
}
_SUFFIX_LAYOUT = {".xyz": "extxyz", ".extxyz": "extxyz", ".csv": "table", ".parquet": "table", ".json": "json"}
_COMPRESSED = (".gz", ".bz2", ".xz")  # pandas, ASE and pymatgen open these themselves
# Structure files an id of id_prop.csv may name, by suffix (the id itself may be a file name, as in ALIGNN's)
STRUCTURE_SUFFIXES = (".cif", ".vasp", ".poscar", ".json", ".extxyz", ".xyz", ".xsf", ".cssr", ".res")
ID_KEYS = ("id", "material_id", "mpd_id", "jid", "name")  # tried in this order when `id` is not given
STRUCTURE_KEYS = ("structure", "cif", "atoms", "poscar")  # likewise for `structure`
KAPPA_UNITS = "W/(m K)"
# Above this a lattice thermal conductivity is a unit mistake, not a crystal: diamond, the highest known, is
# ~2,000-3,300 W/(m K) at 300 K. Values <= 0 are no conductivity at all.
KAPPA_MAX = 1e4
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a safe path component, no '+' (multi-property joins)


def default_transform(kappa: bool) -> str:
    """A dataset's target transform: log10(kappa + 1) standardised for kappa (ParAIsite's), else min-max to
    [-1, 1] (Devi et al.'s); the built-in sets' and a declared one's.

    Measured by ``benchmarks/bench_targets.py`` (inner 5-fold on each built-in set's training pool): no other
    transform beat these with an interval clear of zero; for kappa the log transform was the better on AGL, L96
    and MIX (docs/training.md)."""
    return "log10p1+standardize" if kappa else "minmax"


def _structure_payload(value: Any) -> tuple[str, Any] | str:
    """(fmt, payload) for a structure cell of a table or a JSON record, else the reason it cannot be one."""
    from pymatgen.core import Structure

    if isinstance(value, Structure):
        return "structure", value
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return "missing structure: empty"
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                return f"unparsable structure: JSON text that is not valid JSON ({err})"
        elif "_cell_length_a" in text or text.startswith("data_"):
            return "cif", text
        else:
            return "poscar", text
    if isinstance(value, dict):
        return ("jarvis", value) if "lattice_mat" in value else ("pymatgen", value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "missing structure: empty"
    return f"unparsable structure: a {type(value).__name__}, not CIF or POSCAR text or a pymatgen dict"


def _pick_key(given: str | None, options: tuple[str, ...], found: Iterable[str], what: str, where: Path) -> str:
    """The key (column) ``given``, else the first of ``options`` present; an error names what is there."""
    found = list(found)
    if given is not None:
        if given not in found:
            raise DatasetFileError(f"{where}: no {what} {given!r}; found {found[:20]}")
        return given
    key = next((k for k in options if k in found), None)
    if key is None:
        raise DatasetFileError(
            f"{where}: no {what} among {list(options)} (found {found[:20]}); name it in the declaration"
        )
    return key


_MISSING_WORDS = {"", "nan", "na", "n/a", "none", "null", "-", "inf", "-inf", "+inf", "infinity"}


def _is_header(target: str) -> bool:
    """Whether the first row's target field is a column name (``kappa``), not a value, nor a missing one."""
    if target.strip().lower() in _MISSING_WORDS:
        return False
    try:
        float(target)
    except ValueError:
        return True
    return False


@dataclass(frozen=True)
class IdPropFolder(Source):
    """CGCNN's and ALIGNN's layout: ``id_prop.csv`` (``id,target`` rows, no header) and a structure file per id
    beside it: ``<id>`` itself (ALIGNN's ids are file names) or ``<id>`` + one of ``STRUCTURE_SUFFIXES``."""

    file: str = ID_PROP
    fmt: str = "file"

    def _lines(self, folder: Path) -> Iterator[tuple[int, list[str]]]:
        path = folder / self.file
        try:
            text = path.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's byte-order mark
        except UnicodeDecodeError as err:
            raise DatasetFileError(f"{path}: not UTF-8 text (byte {err.start})") from None
        except OSError as err:
            raise DatasetFileError(f"{path}: cannot read it ({err})") from None
        reader = csv.reader(io.StringIO(text))
        try:
            for fields in reader:
                fields = [f.strip() for f in fields]
                if not any(fields):
                    continue
                if len(fields) != 2:
                    raise DatasetFileError(
                        f"{path} line {reader.line_num}: {len(fields)} fields; expected 2 (id,target), e.g. mp-1,12.3"
                    )
                yield reader.line_num, fields
        except csv.Error as err:
            raise DatasetFileError(f"{path} line {reader.line_num}: {err}") from None

    def _find(self, folder: Path, rid: str, names: set[str]) -> Path | str:
        """The structure file of ``rid``, or the reason there is none."""
        # by its spelling, not by resolving: a structure file may be a link into another folder
        if os.path.isabs(rid) or os.path.normpath(rid).split(os.sep)[0] == "..":
            return f"missing structure: id {rid!r} points outside {folder}"
        candidates = (
            [rid]
            + [rid + s for s in STRUCTURE_SUFFIXES]
            + [rid + s + c for s in STRUCTURE_SUFFIXES for c in _COMPRESSED]
        )
        nested = "/" in rid or os.sep in rid
        hits = [c for c in candidates if ((folder / c).is_file() if nested else c in names) and c != self.file]
        if len(hits) > 1:
            return f"ambiguous structure: several files for id {rid!r} ({', '.join(hits)}); keep one"
        if not hits:
            tried = ", ".join([rid, *(rid + s for s in STRUCTURE_SUFFIXES[:3])])
            return f"missing structure: no file for id {rid!r} in {folder} (looked for {tried}, …)"
        return folder / hits[0]

    def _files(self, folder: Path) -> Iterator[tuple[int, str, Path | str, str]]:
        """(line, id, structure file or why none, target text) per row; a header line is skipped."""
        names = {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()
        first = True
        for line, (rid, target) in self._lines(folder):
            found = self._find(folder, rid, names)
            if first and isinstance(found, str) and _is_header(target):
                log.info("%s line %d: %r looks like a header; skipped", folder / self.file, line, f"{rid},{target}")
                first = False
                continue
            first = False
            yield line, rid, found, target

    def rows(self, folder: Path) -> Iterator[Row]:
        for line, rid, found, target in self._files(folder):
            where = f"{self.file} line {line}"
            if not rid:
                yield Rejected(f"line {line}", f"missing id: empty ({where})")
            elif isinstance(found, str):
                yield Rejected(rid, f"{found} ({where})")
            else:
                yield rid, self.fmt, str(found), target, where

    def content_files(self, folder: Path) -> list[Path]:
        return [found for _, _, found, _ in self._files(folder) if isinstance(found, Path)]

    def describe(self) -> str:
        return f"{self.file} + structure files"


@dataclass(frozen=True)
class ExtXYZ(Source):
    """An extended XYZ file (ASE's reader): one structure per frame, the target in each frame's ``info``."""

    file: str
    target_key: str | None  # None: candidates without a target (``iter_candidates``)
    id_key: str | None = None  # default: info "id" when the frames have it, else the frame's index
    fmt: str = "ase"

    def rows(self, folder: Path) -> Iterator[Row]:
        import ase.io

        path = folder / self.file
        frames = ase.io.iread(str(path), index=":", format="extxyz")
        line, i = 1, 0
        while True:
            try:
                atoms = next(frames)
            except StopIteration:
                return
            except Exception as err:  # ASE's reader: the file from here on cannot be read
                raise DatasetFileError(
                    f"{path} line {line}: frame {i} cannot be read by ASE ({type(err).__name__}: {_first_line(err)})"
                ) from None
            where = f"{self.file} frame {i}, line {line}"
            line += len(atoms) + 2  # a frame: a count line, a comment line, a line per atom
            results = dict(atoms.calc.results) if atoms.calc is not None else {}  # ASE moves energy=… there
            info = {**results, **atoms.info}
            rid = info.get(self.id_key or "id")
            if rid is None and self.id_key is not None:
                yield Rejected(f"frame {i}", f"missing id: no info key {self.id_key!r} ({where})")
            elif self.target_key is not None and self.target_key not in info:
                yield Rejected(
                    str(i) if rid is None else str(rid), f"missing target: no info key {self.target_key!r} ({where})"
                )
            else:
                target = info[self.target_key] if self.target_key is not None else None
                atoms.calc, atoms.info = None, {}  # the structure only travels to the graph builders
                yield (str(i) if rid is None else str(rid)), self.fmt, atoms, target, where
            i += 1

    def describe(self) -> str:
        return f"{self.file} (info {self.target_key!r}{f', id {self.id_key!r}' if self.id_key else ''})"


def _record_rows(
    chunks: Iterable[list[Any]], *, path: Path, target: str | None, id_key: str | None, structure_key: str | None,
    what: str,
) -> Iterator[Row]:  # fmt: skip
    """Rows of a table's or a JSON list's records, given in chunks (the first chunk's keys decide which are the id
    and structure): ids, sniffed structures (``_structure_payload``), targets (none when ``target`` is None)."""
    start = 0
    for records in chunks:
        if start == 0 and records:
            keys: dict[str, None] = {}
            for rec in records[:1000]:  # every key some record has (JSON records need not share them)
                if isinstance(rec, Mapping):
                    keys.update(dict.fromkeys(rec))
            id_key = _pick_key(id_key, ID_KEYS, keys, f"id {what}", path)
            structure_key = _pick_key(structure_key, STRUCTURE_KEYS, keys, f"structure {what}", path)
            if target is not None:
                _pick_key(target, (), keys, f"target {what}", path)
        for i, rec in enumerate(records, start):
            where = f"{path.name} row {i + 1}"
            if not isinstance(rec, Mapping):
                yield Rejected(f"row {i + 1}", f"bad record: a {type(rec).__name__}, not an object ({where})")
                continue
            rid = rec.get(id_key)  # type: ignore[arg-type]
            if rid is None or (isinstance(rid, float) and math.isnan(rid)) or str(rid).strip() == "":
                yield Rejected(f"row {i + 1}", f"missing id: empty {id_key!r} ({where})")
                continue
            rid = str(rid).strip()
            found = _structure_payload(rec.get(structure_key))  # type: ignore[arg-type]
            if isinstance(found, str):
                yield Rejected(rid, f"{found} ({where})")
                continue
            yield rid, found[0], found[1], (rec.get(target) if target is not None else None), where
        start += len(records)


CHUNK_ROWS = 4096  # records a table is read in at a time: memory stays flat however long it is


@dataclass(frozen=True)
class Table(Source):
    """A CSV (pandas) or Parquet (pyarrow) table: one row per structure, CIF text or a pymatgen dict (a JSON string
    in CSV) in the structure column. Read in chunks of ``CHUNK_ROWS``."""

    file: str
    target_key: str | None  # None: candidates without a target
    id_key: str | None = None
    structure_key: str | None = None
    fmt: str = "auto"  # per row: see _structure_payload

    def _chunks(self, path: Path) -> Iterator[list[dict[str, Any]]]:
        parquet = ".parquet" in [x.lower() for x in path.suffixes]
        try:
            if parquet:
                import pyarrow.parquet as pq

                for batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK_ROWS):
                    yield batch.to_pylist()
            else:
                import pandas as pd

                # every cell as text: ids stay as written ("007"), a bad target is a row's reason, not the file's
                with pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=CHUNK_ROWS) as reader:
                    for df in reader:
                        yield df.to_dict("records")
        except Exception as err:  # pandas and pyarrow raise many kinds on a damaged file
            raise DatasetFileError(
                f"{path}: cannot read as {'Parquet' if parquet else 'CSV'} ({type(err).__name__}: {_first_line(err)})"
            ) from None

    def rows(self, folder: Path) -> Iterator[Row]:
        path = folder / self.file
        yield from _record_rows(
            self._chunks(path), path=path, target=self.target_key, id_key=self.id_key,
            structure_key=self.structure_key, what="column",
        )  # fmt: skip

    def describe(self) -> str:
        return f"{self.file} (column {self.target_key!r})"


@dataclass(frozen=True)
class JSONRecords(Source):
    """A JSON list of records (``[{"id": …, "structure": {pymatgen dict}, "<target>": …}, …]``, pymatgen's and
    matminer's style), or a DataFrame matminer stored as JSON (``store_dataframe_as_json``; read by matminer)."""

    file: str
    target_key: str | None  # None: candidates without a target
    id_key: str | None = None
    structure_key: str | None = None
    fmt: str = "auto"

    def rows(self, folder: Path) -> Iterator[Row]:
        path = folder / self.file
        data = _load_json(path)  # whole: JSON has no streaming reader here (a table or extxyz file streams)
        if isinstance(data, dict) and {"columns", "data"} <= set(data):
            from matminer.utils.io import load_dataframe_from_json

            try:
                df = load_dataframe_from_json(str(path), pbar=False)
            except Exception as err:
                raise DatasetFileError(f"{path}: matminer cannot read it ({type(err).__name__}: {err})") from None
            data = df.reset_index().to_dict("records") if df.index.name else df.to_dict("records")
        if not isinstance(data, list):
            raise DatasetFileError(
                f"{path}: expected a JSON list of records (or a matminer DataFrame), found {type(data).__name__}"
            )
        yield from _record_rows(
            [data], path=path, target=self.target_key, id_key=self.id_key, structure_key=self.structure_key, what="key"
        )

    def describe(self) -> str:
        return f"{self.file} (key {self.target_key!r})"


def is_structure_file(path: Path) -> bool:
    """A file a folder of candidates holds: by suffix (``STRUCTURE_SUFFIXES``, compressed or not), or named
    POSCAR* / CONTCAR*."""
    name = path.name.removesuffix(next((c for c in _COMPRESSED if path.name.endswith(c)), ""))
    return name.lower().endswith(STRUCTURE_SUFFIXES) or name.upper().startswith(PYMATGEN_NAMES)


@dataclass(frozen=True)
class StructureFiles(Source):
    """Candidates without targets: the structure files of a folder (sorted; ids their names without the suffix),
    or one file (``only``)."""

    file: str = ""
    only: str | None = None
    fmt: str = "file"

    def rows(self, folder: Path) -> Iterator[Row]:
        files = [folder / self.only] if self.only else sorted(p for p in folder.iterdir() if p.is_file())
        for path in files:
            if self.only or is_structure_file(path):
                name = path.name.removesuffix(next((c for c in _COMPRESSED if path.name.endswith(c)), ""))
                yield (Path(name).stem if Path(name).suffix else name), self.fmt, str(path), None, path.name


def candidate_source(
    path: str | os.PathLike[str], *, target: str | None = None, id_key: str | None = None,
    structure_key: str | None = None,
) -> tuple[Source, Path]:  # fmt: skip
    """How to read ``path`` as candidates to predict (``ltc predict``, ``ltc screen``), and the folder its source
    reads from: a folder with ``id_prop.csv`` (its values become ``y_true``), a folder of structure files, an
    extxyz file, a table, a JSON list, or one structure file. ``target`` names the column / info key of known
    values, if any."""
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / DECLARATION_FILE).is_file():
            spec = from_path(p, target=target)
            return spec.sources[0], Path(spec.folder)
        if (p / ID_PROP).is_file():
            return IdPropFolder(), p
        if not any(is_structure_file(f) for f in p.iterdir() if f.is_file()):
            raise MissingFileError(
                f"{p} holds no structure files ({', '.join(f'*{x}' for x in STRUCTURE_SUFFIXES[:4])}, POSCAR*, …) "
                f"and no {ID_PROP}"
            )
        return StructureFiles(), p
    layout = dataset_layout(p)
    if layout == "extxyz":
        return ExtXYZ(p.name, target, id_key), p.parent
    if layout == "table":
        return Table(p.name, target, id_key, structure_key), p.parent
    if layout == "json":
        return JSONRecords(p.name, target, id_key, structure_key), p.parent
    return StructureFiles(only=p.name), p.parent


# --------------------------------------------------------------------------------------------------
# The registry.


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: what its target is, where its files live, how to transform its target."""

    name: str
    title: str
    target: str  # the property, in words
    units: str  # of the raw target
    folder: str  # sub-folder of the data home
    sources: tuple[Source, ...]  # in order of preference; the first present one is read
    full_size: int  # entries in the full public set (the local file may hold fewer)
    transform: str  # default target transform: "minmax" (to [-1, 1]) or "log10p1+standardize"
    reference: str
    devi_prop: str | None = None  # name in Devi et al.'s files, if the set is one of theirs
    kappa: bool = False  # lattice thermal conductivity (report MAPE and MAE on log10 kappa too)
    notes: str = ""
    declaration: UserDataset | None = None  # a user's own dataset: how it was declared (folder is then absolute)

    @property
    def matminer(self) -> MatminerDataset | None:
        return next((s for s in self.sources if isinstance(s, MatminerDataset)), None)


def _devi(
    name: str,
    title: str,
    target: str,
    units: str,
    folder: str,
    full: int,
    *,
    matminer: tuple[str, str] | None = None,
    csv: tuple[str, str] | None = None,
    full_first: bool = False,
    target_key: str = "target_raw",
    notes: str = "",
) -> DatasetSpec:
    """A set from Devi et al. 2024, with matminer alternatives when matminer knows it."""
    devi = DeviUnion(name, target_key=target_key)
    mm = (MatminerDataset(*matminer),) if matminer else ()
    alt = (MatminerCSV(*csv),) if csv else ()
    # Where Devi's file holds only part of the public set, the full matminer file wins when present.
    sources = (*mm, devi, *alt) if full_first else (devi, *alt, *mm)
    return DatasetSpec(
        name=name,
        title=title,
        target=target,
        units=units,
        folder=folder,
        sources=sources,
        full_size=full,
        transform=default_transform(kappa=False),
        reference="Devi, Butler & Sai Gautam, npj Comput. Mater. 10, 300 (2024)",
        devi_prop=name,
        notes=notes,
    )


_KAPPA_REF = "Klochko et al. (ParAIsite), arXiv 2411.18259"


def _paraisite(name: str, title: str, file: str, full: int) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        title=title,
        target="kappa_L, ab initio",
        units=KAPPA_UNITS,
        folder="ltc_paraisite",
        sources=(RecordsJSON(file, "mpd_id", "structure", "TC", "pymatgen"),),
        full_size=full,
        transform=default_transform(kappa=True),
        reference=_KAPPA_REF,
        kappa=True,
    )


REGISTRY: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        _devi(
            "pz",
            "piezoelectric modulus",
            "eij_max",
            "C/m^2",
            "piezoelectric_tensor",
            941,
            matminer=("piezoelectric_tensor", "eij_max"),
            csv=("matminer_piezoelectric_tensor.csv.gz", "eij_max"),
        ),
        _devi(
            "dc",
            "dielectric constant",
            "poly_total",
            "dimensionless",
            "dielectric_constant",
            1056,
            matminer=("dielectric_constant", "poly_total"),
            csv=("matminer_dielectric_constant.csv.gz", "poly_total"),
        ),
        _devi(
            "ph",
            "phonons (last phDOS peak)",
            "last phdos peak",
            "1/cm",
            "matbench_phonons",
            1265,
            matminer=("matbench_phonons", "last phdos peak"),
        ),
        _devi(
            "ebg",
            "experimental band gap (MP structures)",
            "experimental band gap",
            "eV",
            "expt_gap_devi2481",
            2481,
            notes="Devi's 2,481-entry set; 30 jids are in none of their committed files",
        ),
        _devi(
            "gv",
            "shear modulus log10(G_VRH)",
            "log10(G_VRH)",
            "log10 GPa",
            "matbench_log_gvrh",
            10987,
            matminer=("matbench_log_gvrh", "log10(G_VRH)"),
            full_first=True,
        ),
        _devi(
            "bg",
            "PBE band gap",
            "gap pbe",
            "eV",
            "matbench_mp_gap",
            106113,
            matminer=("matbench_mp_gap", "gap pbe"),
            full_first=True,
        ),
        _devi(
            "fe",
            "formation energy",
            "e_form",
            "eV/atom",
            "matbench_mp_e_form",
            132752,
            matminer=("matbench_mp_e_form", "e_form"),
            full_first=True,
        ),
        _devi(
            "jarvis2d",
            "JARVIS 2D band gap (OptB88vdW)",
            "band gap (scaled)",
            "[-1, 1]",
            "jarvis_dft_2d_bandgap",
            1103,
            target_key="target_scaled",
            notes="only the scaled target is public; raw eV values are unknown",
        ),
        DatasetSpec(
            name="agl",
            title="AFLOW AGL kappa at 300 K (matched CIFs)",
            target="kappa_L, AGL 300 K",
            units=KAPPA_UNITS,
            folder="ltc_aflow_agl",
            sources=(
                RecordsJSON(
                    "aflow_agl_matched_3108.json.gz", "aflow_entry", "cif", "agl_thermal_conductivity_300K", "cif"
                ),
            ),
            full_size=5578,
            transform=default_transform(kappa=True),
            reference=_KAPPA_REF + "; Toher et al., PRB 90, 174107 (2014)",
            kappa=True,
            notes="3,108 of ParAIsite's 5,578 AGL values could be matched to their CIF",
        ),
        _paraisite("l96", "L96: 95 binaries, ab initio kappa (ParAIsite Dataset1)", "paraisite_Dataset1.json.gz", 95),
        _paraisite(
            "hh143", "HH143: half-Heuslers, ab initio kappa (ParAIsite Dataset2)", "paraisite_Dataset2.json.gz", 143
        ),
        _paraisite("mix", "MIX: L96 + HH143 (ParAIsite)", "paraisite_MIX.json.gz", 238),
        DatasetSpec(
            name="gvrh2015",
            title="shear modulus G_VRH (de Jong 2015 elastic tensors)",
            target="G_VRH",
            units="GPa",
            folder="elastic_tensor_2015",
            sources=(
                MatminerCSV("matminer_elastic_tensor_2015.csv.gz", "G_VRH"),
                MatminerDataset("elastic_tensor_2015", "G_VRH"),
            ),
            full_size=1181,
            transform=default_transform(kappa=False),
            reference="de Jong et al., Sci. Data 2, 150009 (2015)",
            notes="extra source; not the 10,987-entry matbench set",
        ),
    )
}


def spec(name: str) -> DatasetSpec:
    """The dataset ``name``: built in, or declared (``declare``); the error lists the known names."""
    if name in REGISTRY:
        return REGISTRY[name]
    for layer in reversed(_DECLARED):
        if name in layer:
            return layer[name]
    hint = ""
    if isinstance(name, str) and any(c in name for c in "/\\."):
        hint = (
            "; a dataset of your own is declared under a sweep file's `datasets:` and used by its name, or given by "
            "its path to `ltc prepare PATH` / `ltc train --dataset PATH` (README: Your own data)"
        )
    raise UnknownDatasetError(f"unknown dataset {name!r}; known: {', '.join(known_names())}{hint}") from None


def known_names() -> list[str]:
    """Built-in names, then the declared ones."""
    out = list(REGISTRY)
    for layer in _DECLARED:
        out.extend(n for n in layer if n not in out)
    return out


def is_known(name: str) -> bool:
    return name in REGISTRY or any(name in layer for layer in _DECLARED)


# --------------------------------------------------------------------------------------------------
# Your own datasets: declared once, then used by name exactly as a built-in one.


@dataclass(frozen=True)
class UserDataset:
    """How to read a dataset of the user's own: a sweep file's ``datasets:`` entry, or a ``dataset.yaml``.

    ``path``: a folder with ``id_prop.csv`` (or with a ``dataset.yaml`` that says the rest), an extended XYZ file,
    a CSV / Parquet table or a JSON list of records (``LAYOUTS``; ``format`` when the suffix does not tell).
    ``target``: the property's name; for extxyz, tables and JSON also the info key / column that holds it.
    ``id`` / ``structure``: the id and structure keys of tables and JSON (default: the first of ``ID_KEYS`` /
    ``STRUCTURE_KEYS`` present), the info key of each frame's id in extxyz (default ``id``, else the frame's index).
    ``kappa``: a lattice thermal conductivity: judged on log10 kappa and MAPE, ranked lowest first, values <= 0 or
    above ``KAPPA_MAX`` rejected; its units default to W/(m K).
    """

    path: str
    target: str | None = None
    units: str | None = None
    kappa: bool = False
    title: str | None = None
    format: Literal["auto", "id_prop", "extxyz", "table", "json"] = "auto"
    id: str | None = None
    structure: str | None = None

    def __post_init__(self) -> None:
        if not str(self.path).strip():
            raise ConfigError("path: empty; give a folder with id_prop.csv, an extxyz file, a table or a JSON file")


def check_name(name: Any) -> str:
    """``name`` if it can name a dataset (a short safe path component: letters, digits, '_' and '-')."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(
            f"dataset name {name!r}: use letters, digits, '_' and '-' (at most 64, starting with a letter or digit)"
        )
    return name


def absolute_path(path: str | os.PathLike[str], base: Path) -> Path:
    """``path`` made absolute against ``base`` (``~`` expanded; not resolved: a symlinked folder keeps its name)."""
    p = Path(path).expanduser()
    return Path(os.path.abspath(p if p.is_absolute() else base / p))


def read_declaration_file(folder: Path) -> dict[str, Any]:
    """``folder/dataset.yaml`` as a mapping, its ``path`` (default: the folder) made absolute against the folder."""
    import yaml

    file = folder / DECLARATION_FILE
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DatasetFileError(f"{file}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise DatasetFileError(f"{file}{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise DatasetFileError(f"{file}: expected a mapping (target: …, units: …, kappa: …), got {type(data).__name__}")
    return {**data, "path": str(absolute_path(data.get("path", "."), folder))}


def declaration(entry: Mapping[str, Any] | str, *, base: str | os.PathLike[str]) -> tuple[dict[str, Any], str | None]:
    """A declaration as a plain mapping with an absolute ``path`` (relative paths resolve against ``base``), merged
    with the ``dataset.yaml`` of a folder it points at (the entry's own keys win); and the name that file gives."""
    from ltc.config import from_dict
    from ltc.io import is_uri

    raw = {"path": entry} if isinstance(entry, str) else dict(entry)
    if "path" not in raw:
        raise ConfigError("missing key 'path' (a folder with id_prop.csv, an extxyz file, a table or a JSON file)")
    if not isinstance(raw["path"], str):
        raise ConfigError(f"path: expected a string, got {raw['path']!r}")
    if is_uri(raw["path"]):
        raise ConfigError(f"path: {raw['path']!r} is a URI; a dataset of your own is read from a local or shared path")
    path = absolute_path(raw["path"], Path(base))
    name = None
    if path.is_dir() and (path / DECLARATION_FILE).is_file():
        own = read_declaration_file(path)
        name = own.pop("name", None)
        if name is not None:
            check_name(name)
        from_dict(UserDataset, own, str(path / DECLARATION_FILE))  # its own mistakes name the file
        raw = {**own, **{k: v for k, v in raw.items() if k != "path"}}
    else:
        raw["path"] = str(path)
    return raw, name


def user_spec(name: str, decl: UserDataset) -> DatasetSpec:
    """The ``DatasetSpec`` of a user's dataset ``name`` (a safe name that is not a built-in one's)."""
    check_name(name)
    if name in REGISTRY:
        raise ConfigError(f"dataset name {name!r} is a built-in dataset's (see `ltc datasets`); give yours another")
    path = Path(decl.path)
    layout = decl.format if decl.format != "auto" else _layout_of(name, path)
    if layout != "id_prop" and decl.target is None:
        raise ConfigError(
            f"dataset {name!r}: {path.name} is read as {layout}: name the "
            f"{'info key' if layout == 'extxyz' else 'column'} that holds the target (target: …)"
        )
    meta = declared_metadata(name, decl)
    source: Source
    if layout == "id_prop":
        folder, source = path, IdPropFolder()
    elif layout == "extxyz":
        folder, source = path.parent, ExtXYZ(path.name, meta.target, decl.id)
    elif layout == "table":
        folder, source = path.parent, Table(path.name, meta.target, decl.id, decl.structure)
    else:
        folder, source = path.parent, JSONRecords(path.name, meta.target, decl.id, decl.structure)
    return dataclasses.replace(meta, folder=str(folder), sources=(source,))


def declared_metadata(name: str, decl: UserDataset) -> DatasetSpec:
    """What a declared dataset is (its target, units, kappa flag), without a look at its files: how results name
    it after the files have moved (``ltc.results.declared_in``). It reads nothing (no sources)."""
    return DatasetSpec(
        name=name,
        title=decl.title or name,
        target=decl.target or "target",
        units=decl.units if decl.units is not None else (KAPPA_UNITS if decl.kappa else ""),
        folder=decl.path,
        sources=(),
        full_size=0,
        transform=default_transform(decl.kappa),
        reference=decl.path,
        kappa=decl.kappa,
        declaration=decl,
    )


def dataset_layout(path: Path) -> str | None:
    """The layout a file's name says (``LAYOUTS``: extxyz, table, json), or None."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes.pop()
    return _SUFFIX_LAYOUT.get(suffixes[-1] if suffixes else "")


def _layout_of(name: str, path: Path) -> str:
    if path.is_dir() or (not path.exists() and not path.suffix):
        return "id_prop"
    layout = dataset_layout(path)
    if layout is None:
        known = "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items())
        raise ConfigError(
            f"dataset {name!r}: cannot tell how to read {path.name} (by its suffix); give format: ({known})"
        )
    return layout


def from_path(
    path: str | os.PathLike[str],
    *,
    target: str | None = None,
    units: str | None = None,
    kappa: bool | None = None,
    base: str | os.PathLike[str] = ".",
) -> DatasetSpec:
    """A dataset given by its path (``ltc prepare PATH``, ``ltc train --dataset PATH``): named by its folder's
    ``dataset.yaml`` (``name:``), else by the folder or file name; the arguments given win over that file."""
    from ltc.config import from_dict

    given = {k: v for k, v in (("target", target), ("units", units), ("kappa", kappa)) if v is not None}
    if not Path(base, path).exists():
        raise MissingFileError(f"{path}: no such file or folder")
    raw, name = declaration({"path": str(path), **given}, base=base)
    if name is None:
        p = Path(raw["path"])
        stem = p.name if p.is_dir() else p.name.split(".")[0]
        name = re.sub(r"[^A-Za-z0-9_-]", "_", stem).lstrip("_-") or "data"
        if name in REGISTRY:
            raise ConfigError(
                f"{path}: its name {name!r} is a built-in dataset's; name yours in {p / DECLARATION_FILE} (name: …) "
                "or rename the folder"
            )
    try:
        return user_spec(str(name), from_dict(UserDataset, raw, "dataset"))
    except ConfigError as err:  # the command line's words for the keys
        raise ConfigError(f"{path}: {str(err).replace('(target: …)', '(--target)')}") from None


def declarations_in(path: str | os.PathLike[str]) -> dict[str, DatasetSpec]:
    """The datasets a YAML file declares under ``datasets:`` (a sweep file, or a file of that key alone), their
    paths resolved against the file's folder."""
    from ltc.config import from_dict, read_yaml

    data = read_yaml(path, what="datasets file")
    declared = data.get("datasets") if isinstance(data, dict) else None
    if not isinstance(declared, dict) or not declared:
        raise ConfigError(f"{path}: no `datasets:` mapping of names to declarations (path: …, target: …)")
    out = {}
    for name, entry in declared.items():
        try:
            raw = declaration(entry, base=Path(path).resolve().parent)[0] if isinstance(entry, (str, dict)) else entry
            out[name] = user_spec(str(name), from_dict(UserDataset, raw, "dataset"))
        except (ConfigError, DatasetError) as err:
            raise ConfigError(f"{path}: datasets.{name}: {err}") from None
    return out


class Declared:
    """User datasets known by name while it lasts: a ``with`` block, or until ``close()`` (a notebook)."""

    def __init__(self, specs: Mapping[str, DatasetSpec] | Iterable[DatasetSpec]) -> None:
        items = specs.values() if isinstance(specs, Mapping) else specs
        self.layer = {s.name: s for s in items}
        for s in self.layer.values():
            if s.name in REGISTRY:
                raise ConfigError(f"dataset name {s.name!r} is a built-in dataset's; give yours another")
        _DECLARED.append(self.layer)
        remember(self.layer.values())

    def close(self) -> None:
        for i, layer in enumerate(_DECLARED):
            if layer is self.layer:  # by identity: two layers may hold equal declarations
                del _DECLARED[i]
                return

    def __enter__(self) -> Declared:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def declare(specs: Mapping[str, DatasetSpec] | Iterable[DatasetSpec]) -> Declared:
    """Make ``specs`` (``user_spec``) known to ``spec``, ``locate``, ``read`` … by name; see ``Declared``."""
    return Declared(specs)


_DECLARED: list[dict[str, DatasetSpec]] = []  # layers pushed by ``declare``, innermost last
# Every dataset declared in this process, the latest by each name: what results tables mean by a name (units,
# kappa) after its sweep's declaration has ended (``described``). Never read from: only ``spec`` locates files.
_SEEN: dict[str, DatasetSpec] = {}


def remember(specs: Iterable[DatasetSpec]) -> None:
    """Note what these datasets are, for ``described`` (``declare`` does it; so does loading a results folder)."""
    _SEEN.update({s.name: s for s in specs if s.name not in REGISTRY})


def described(name: str) -> DatasetSpec | None:
    """What ``name`` is, for reading results: a built-in or declared dataset, else the latest one declared under that
    name in this process (a sweep that has ended, a results folder loaded), else None."""
    if is_known(name):
        return spec(name)
    return _SEEN.get(name)


@dataclass(frozen=True)
class TargetInfo:
    """What training and metrics need to know of a dataset's target."""

    target: str
    units: str
    kappa: bool
    transform: str  # the default target transform


def target_info(name: str, manifest: Mapping[str, Any]) -> TargetInfo:
    """``name``'s target: from the registry for a built-in set (its manifest may predate these fields), else from
    its shards' manifest, which the driver wrote from the declaration."""
    if name in REGISTRY:
        s = REGISTRY[name]
        return TargetInfo(s.target, s.units, s.kappa, s.transform)
    missing = [k for k in ("target", "units", "kappa", "transform") if k not in manifest]
    if missing:
        raise DatasetFileError(f"shards of {name!r}: the manifest lacks {missing}; run `ltc prepare` to rebuild them")
    return TargetInfo(str(manifest["target"]), str(manifest["units"]), bool(manifest["kappa"]), manifest["transform"])


# --------------------------------------------------------------------------------------------------
# Reading.


@dataclass(frozen=True)
class DatasetFile:
    """The file a dataset is read from, and its content fingerprint."""

    spec: DatasetSpec
    source: Source
    path: Path
    fingerprint: str  # sha256 over the file bytes, the reader and the spec's target


@dataclass
class RawDataset:
    """What ``read`` returns: records with unparsed structures, rows rejected while reading, provenance."""

    file: DatasetFile
    records: list[RawRecord]
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def spec(self) -> DatasetSpec:
        return self.file.spec

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def fingerprint(self) -> str:
        return self.file.fingerprint

    @property
    def n_rows(self) -> int:
        """Rows in the source file: every one is a record or a rejected row."""
        return len(self.records) + len(self.rejected)


def local_source(name: str, *, data_home: str | os.PathLike[str] | None = None) -> tuple[Source, Path] | None:
    """The first source of ``name`` whose file is in the data home, with its path, or None."""
    s = spec(name)
    folder = _data_home(data_home) / s.folder
    for src in s.sources:
        path = folder / src.file
        if path.is_file():
            return src, path
    return None


def _missing_message(s: DatasetSpec, folder: Path, why: str) -> str:
    files = " or ".join(src.file for src in s.sources)
    if s.declaration is not None:
        if isinstance(s.sources[0], IdPropFolder) and folder.is_dir():
            return (
                f"dataset {s.name!r}: {folder} has no {ID_PROP} (id,target rows; or a {DECLARATION_FILE} that names "
                f"a file of another layout in it: path: …){why}"
            )
        what = f"{folder} (a folder with {ID_PROP})" if isinstance(s.sources[0], IdPropFolder) else str(folder / files)
        return f"dataset {s.name!r}: {what} does not exist{why}"
    return (
        f"dataset {s.name!r} has no local file: put {files} in {folder} "
        f"(set LTC_DATA_HOME to a folder laid out like shared/data; see SOURCES.md){why}"
    )


def locate(name: str, *, data_home: str | os.PathLike[str] | None = None, download: bool | None = None) -> DatasetFile:
    """Find (or download through matminer, if allowed and needed) the file of dataset ``name``.

    ``download`` defaults to ``$LTC_DOWNLOAD`` != "0". Raises ``DatasetNotFoundError`` naming the file to
    put where.
    """
    s = spec(name)
    home = _data_home(data_home)
    folder = home / s.folder
    if download is None:
        download = os.environ.get("LTC_DOWNLOAD", "1") != "0"
    found = local_source(name, data_home=home)
    if found is None and s.declaration is not None:
        raise DatasetNotFoundError(_missing_message(s, folder, ""))
    if found is None:
        mm = s.matminer
        if mm is None:
            raise DatasetNotFoundError(_missing_message(s, folder, ""))
        if not download:
            raise DatasetNotFoundError(_missing_message(s, folder, "; downloads are off (LTC_DOWNLOAD=0)"))
        log.info("%s: no local file, downloading matminer dataset %r into %s", name, mm.name, folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            load_matminer(mm.name, folder, download=True)
        except (DatasetError, OSError) as err:
            raise DatasetNotFoundError(_missing_message(s, folder, f"; download failed: {err}")) from err
        found = mm, folder / mm.file
    src, path = found
    return DatasetFile(spec=s, source=src, path=path, fingerprint=fingerprint(path, s, src))


def read(
    name: str | DatasetFile, *, data_home: str | os.PathLike[str] | None = None, download: bool | None = None
) -> RawDataset:
    """Read dataset ``name`` (or an already located file): records plus the rows rejected on reading.

    Raises ``DatasetNotFoundError`` naming the file to put where, ``DatasetFileError`` naming a damaged file.
    """
    file = name if isinstance(name, DatasetFile) else locate(name, data_home=data_home, download=download)
    records, rejected = _check_rows(file.source.rows(file.path.parent), kappa=file.spec.kappa)
    if not records and not rejected:  # an empty file would only fail later, inside a trial
        raise DatasetFileError(f"{file.path}: holds no rows (dataset {file.spec.name!r})")
    return RawDataset(file=file, records=records, rejected=rejected)


def _kappa_problem(kappa: float) -> str | None:
    """Why ``kappa`` (W/(m K)) cannot be a lattice thermal conductivity, or None."""
    if kappa <= 0:
        return f"bad target: kappa {kappa:g} <= 0 (a thermal conductivity is positive)"
    if kappa > KAPPA_MAX:
        return f"bad target: kappa {kappa:g} > {KAPPA_MAX:,.0f} W/(m K) (diamond's is ~2,000-3,300): a unit mistake?"
    return None


def _check_rows(rows: Iterator[Row], *, kappa: bool = False) -> tuple[list[RawRecord], list[Rejected]]:
    """Split rows into records and rejections: bad targets (for ``kappa``, outside (0, KAPPA_MAX]) and duplicate ids
    become rejected rows, each reason saying where its row is when the source tells (``id_prop.csv line 7``)."""
    records: list[RawRecord] = []
    rejected: list[Rejected] = []
    first_row: dict[str, str] = {}
    for i, row in enumerate(rows):
        if isinstance(row, Rejected):
            rejected.append(row)
            continue
        rid, fmt, payload, raw_target, *rest = row
        where = rest[0] if rest else None
        target, why = finite_target(raw_target)
        if why is None and kappa:
            why = _kappa_problem(target)  # type: ignore[arg-type]
        if why is not None:  # checked first: a bad first copy must not make a good second one a "duplicate"
            rejected.append(Rejected(rid, f"{why} ({where})" if where else why))
            continue
        if rid in first_row:
            again = f"again at {where}" if where else f"again at row {i}"
            rejected.append(Rejected(rid, f"duplicate id: first at {first_row[rid]}, {again}"))
            continue
        first_row[rid] = where or f"row {i}"
        records.append(RawRecord(rid, fmt, payload, target))
    return records, rejected


def fingerprint(path: Path, s: DatasetSpec, src: Source) -> str:
    """Content hash of a dataset: the file bytes (and a folder's structure files) plus what the reader takes from
    them (a user dataset's reading keys and kappa flag, which rejects rows)."""
    h = hashlib.sha256()
    header: list[Any] = [READER_VERSION, s.name, s.target, type(src).__name__, src.describe()]
    if s.declaration is not None:  # built-in keys stay as they were; a declaration's keys all reach the manifest
        header.append({"kappa": s.kappa, "units": s.units, "title": s.title, "source": repr(src)})
    h.update(json.dumps(header).encode())
    extra = src.content_files(path.parent)
    for file in [path, *extra]:
        if file is not path:
            h.update(b"\0" + str(file.relative_to(path.parent)).encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Devi et al.'s exact subsets.


def devi_subsets(name: str, *, data_home: str | os.PathLike[str] | None = None) -> dict[str, list[str]]:
    """Devi et al.'s committed subsets of ``name``: original repo file path → ids (as in ``read``).

    Keys look like ``PAIR-WISE/DATA-JSON-TRIAL-RUNS/pz/pz_trial3_800.json`` (trial 3, 800 points) or
    ``.../mp-pz-multi-test.json`` (the fixed test set).
    """
    s = spec(name)
    if s.devi_prop is None:
        raise DatasetError(f"dataset {name!r} is not one of Devi et al.'s; it has no paper subsets")
    path = _data_home(data_home) / s.folder / f"devi2024_{s.devi_prop}_subsets.json.gz"
    if not path.is_file():
        raise DatasetNotFoundError(f"no subsets file for {name!r}: put {path.name} in {path.parent}")
    return {k: list(v) for k, v in _read_subsets(str(path), path.stat().st_mtime_ns).items()}  # copies: cached


@lru_cache(maxsize=32)
def _read_subsets(path_str: str, mtime_ns: int) -> dict[str, list[str]]:
    """Parsed subsets file (splits read it for every trial); the mtime in the key drops a stale copy."""
    path = Path(path_str)
    data = _load_json(path)
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise DatasetFileError(f"{path}: expected an object with a 'files' mapping")
    return {k: [str(j) for j in v] for k, v in files.items()}


def matbench_folds(name: str, *, data_home: str | os.PathLike[str] | None = None) -> list[list[str]]:
    """The official Matbench v0.1 test ids of each of the 5 folds of ``name``'s task, as ltc ids (a row's id is its
    0-based row index in the task's table; Matbench's ``mb-<task>-NNNN`` counts from 1)."""
    s = spec(name)
    if not s.folder.startswith("matbench_"):
        known = sorted(n for n, d in REGISTRY.items() if d.folder.startswith("matbench_"))
        raise ConfigError(f"dataset {name!r} is not a Matbench task; those with official folds: {', '.join(known)}")
    path = _data_home(data_home) / s.folder / f"matbench_v0.1_folds_{s.folder}.json.gz"
    if not path.is_file():
        raise DatasetNotFoundError(f"no Matbench folds file for {name!r}: put {path.name} in {path.parent}")
    per_fold = _load_json(path)["test_ids_per_fold"]
    prefix = f"mb-{s.folder.removeprefix('matbench_').replace('_', '-')}-"
    folds = []
    for key in sorted(per_fold, key=lambda k: int(k.rsplit("_", 1)[1])):  # fold_0 … fold_4
        bad = [i for i in per_fold[key] if not i.startswith(prefix)]
        if bad:
            raise DataError(f"{path}: {key} holds {bad[0]!r}, not an id of the form {prefix}NNNN")
        folds.append([str(int(i.removeprefix(prefix)) - 1) for i in per_fold[key]])
    return folds


def devi_test_ids(name: str, *, data_home: str | os.PathLike[str] | None = None) -> list[str]:
    """The fixed test set of Devi et al. for ``name`` (never used in PT or FT)."""
    subsets = devi_subsets(name, data_home=data_home)
    # Pair-wise and multi-property runs share one test set per property (checked: identical where both exist).
    tests = sorted(k for k in subsets if "test" in Path(k).name)
    if not tests:
        raise DatasetNotFoundError(
            f"Devi et al.'s test set for {name!r} is not in the local snapshot (too large to commit upstream); "
            "use a seeded test split instead"
        )
    return subsets[tests[0]]


def devi_trial_ids(
    name: str, *, trial: int, size: int, protocol: str = "pairwise", data_home: str | os.PathLike[str] | None = None
) -> list[str]:
    """Ids of Devi et al.'s FT subset for (trial 1–5, size 10/100/200/500/800) of ``name``.

    ``protocol`` is ``pairwise`` (``<p>_trial<k>_<n>.json``) or ``mpt`` (``mp_<p>_trial<k>_<n>.json``).
    """
    if protocol not in ("pairwise", "mpt"):
        raise ConfigError(f"{protocol=} must be 'pairwise' or 'mpt'")
    p = spec(name).devi_prop
    want = f"{'mp_' if protocol == 'mpt' else ''}{p}_trial{trial}_{size}.json"
    subsets = devi_subsets(name, data_home=data_home)
    for key, ids in subsets.items():
        if Path(key).name == want:
            return ids
    raise DatasetNotFoundError(f"no Devi subset {want!r} for {name!r}")
