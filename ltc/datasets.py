"""Dataset registry and readers: dataset name → records (id, structure, target) + rejected rows.

Every dataset of ``shared/data/SOURCES.md`` has a short stable name (``ltc datasets`` lists them).
A dataset is read from ``$LTC_DATA_HOME/<folder>/`` through the first of its sources whose file is
present; names that matminer knows can also be downloaded through ``matminer.datasets.load_dataset``
into that same folder. Reading is cheap and keeps structures unparsed (``RawRecord``): parsing happens
in the shard builders, in parallel, where a structure that fails to parse becomes a rejected row.

Nothing is dropped silently: every row of the source file ends up either as a ``RawRecord`` or as a
``Rejected`` row with its reason (missing or non-finite target, duplicate id, missing field).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

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
    ``cif`` / ``poscar`` (strings) or ``structure`` (an already built pymatgen ``Structure``).
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


# --------------------------------------------------------------------------------------------------
# Sources: one small class per file format, each behind ``rows(folder)``.


def _finite_target(value: Any) -> tuple[float | None, str | None]:
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
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetFileError(
            f"{path}: cannot read as {'gzipped ' if opener is gzip.open else ''}JSON ({err})"
        ) from err


def _json_rows(path: Path) -> list[dict[str, Any]]:
    data = _load_json(path)
    if not isinstance(data, list):
        raise DatasetFileError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
    return data


Row = tuple[str, str, Any, Any] | Rejected  # (id, fmt, payload, raw target) or a rejected row


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
        transform="minmax",
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
        units="W/(m K)",
        folder="ltc_paraisite",
        sources=(RecordsJSON(file, "mpd_id", "structure", "TC", "pymatgen"),),
        full_size=full,
        transform="log10p1+standardize",
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
            units="W/(m K)",
            folder="ltc_aflow_agl",
            sources=(
                RecordsJSON(
                    "aflow_agl_matched_3108.json.gz", "aflow_entry", "cif", "agl_thermal_conductivity_300K", "cif"
                ),
            ),
            full_size=5578,
            transform="log10p1+standardize",
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
            transform="minmax",
            reference="de Jong et al., Sci. Data 2, 150009 (2015)",
            notes="extra source; not the 10,987-entry matbench set",
        ),
    )
}


def spec(name: str) -> DatasetSpec:
    """The registry entry for ``name``; the error lists the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownDatasetError(f"unknown dataset {name!r}; known: {', '.join(REGISTRY)}") from None


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
    records, rejected = _check_rows(file.source.rows(file.path.parent))
    return RawDataset(file=file, records=records, rejected=rejected)


def _check_rows(rows: Iterator[Row]) -> tuple[list[RawRecord], list[Rejected]]:
    """Split rows into records and rejections: bad targets and duplicate ids become rejected rows."""
    records: list[RawRecord] = []
    rejected: list[Rejected] = []
    first_row: dict[str, int] = {}
    for i, row in enumerate(rows):
        if isinstance(row, Rejected):
            rejected.append(row)
            continue
        rid, fmt, payload, raw_target = row
        target, why = _finite_target(raw_target)
        if why is not None:  # checked first: a bad first copy must not make a good second one a "duplicate"
            rejected.append(Rejected(rid, why))
            continue
        if rid in first_row:
            rejected.append(Rejected(rid, f"duplicate id: first at row {first_row[rid]}, again at row {i}"))
            continue
        first_row[rid] = i
        records.append(RawRecord(rid, fmt, payload, target))
    return records, rejected


def fingerprint(path: Path, s: DatasetSpec, src: Source) -> str:
    """Content hash of a dataset: the file bytes plus what the reader takes from them."""
    h = hashlib.sha256()
    h.update(json.dumps([READER_VERSION, s.name, s.target, type(src).__name__, src.describe()]).encode())
    with open(path, "rb") as fh:
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
