"""The ``ltc`` command line. Each sub-command is a thin layer over a library function."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("ltc")

# Errors that are the user's to fix: printed as one line, exit status 2, no traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, FileNotFoundError)


def _table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# ltc datasets


def cmd_datasets(args: argparse.Namespace) -> int:
    from ltc import datasets
    from ltc.paths import data_home

    home = data_home(args.data_home)
    rows = []
    for name, s in datasets.REGISTRY.items():
        found = datasets.local_source(name, data_home=home)
        if found is None:
            entries, source, local = "-", " or ".join(src.file for src in s.sources), "no"
        else:
            src, path = found
            raw = datasets.read(datasets.DatasetFile(s, src, path, fingerprint=""))
            n = len(raw.records)
            entries = f"{n:,}" if n >= s.full_size else f"{n:,} of {s.full_size:,}"
            bad = f" (+{len(raw.rejected)} bad rows)" if raw.rejected else ""
            entries += bad
            source, local = src.describe(), "yes"
        rows.append((name, entries, s.target, s.units, source, local))
    print(f"data home: {home}")
    print(_table(rows, ("name", "entries", "target", "units", "source (in its folder)", "local")))
    notes = []
    for (name, entries, *_), s in zip(rows, datasets.REGISTRY.values(), strict=True):
        if " of " in entries:
            full = f"; matminer's full {s.matminer.file} is read instead when present" if s.matminer else ""
            notes.append(f"{name}: the local file holds part of the {s.full_size:,}-entry public set{full}")
        elif s.notes:
            notes.append(f"{name}: {s.notes}")
    if notes:
        print("\n" + "\n".join(notes))
    return 0


# --------------------------------------------------------------------------------------------------
# ltc prepare


def cmd_prepare(args: argparse.Namespace) -> int:
    from ltc import datasets
    from ltc.graphs import GraphConfig
    from ltc.shards import prepare, reason_kind, summarize_rejected

    graph = GraphConfig(cutoff=args.cutoff, max_neighbors=args.max_neighbors)
    names = list(datasets.REGISTRY) if args.all else args.names
    if not names:
        raise ValueError("name a dataset (see `ltc datasets`) or pass --all")
    for name in names:
        datasets.spec(name)  # fail on a typo before any work
    for name in names:
        res = prepare(
            name,
            graph=graph,
            home=args.data_home,
            cache=args.cache,
            workers=args.workers,
            progress=not args.quiet,
            download=not args.no_download,
            shard_size=args.shard_size,
        )
        m = res.manifest
        if not res.built:
            print(f"{name}: up to date, nothing to do ({m['n_graphs']:,} graphs, {m['n_rejected']:,} rejected)")
            print(f"  {res.path}")
            continue
        print(
            f"{name}: {m['n_input']:,} rows from {m['source_file']} -> {m['n_graphs']:,} graphs, "
            f"{m['n_rejected']:,} rejected, {len(m['shards'])} shard(s) in {res.seconds:.1f} s "
            f"({m['n_input'] / max(res.seconds, 1e-9):,.0f} structures/s)"
        )
        edges = sum(s["n_edges"] for s in m["shards"])
        nodes = sum(s["n_nodes"] for s in m["shards"])
        if m["n_graphs"]:
            print(f"  {nodes / m['n_graphs']:.1f} atoms and {edges / max(nodes, 1):.1f} edges per atom on average")
        if m["n_rejected"]:
            rejected = res.rejected()
            for kind, count in summarize_rejected([r for _, r in rejected])[:8]:
                rid, example = next((i, r) for i, r in rejected if reason_kind(r) == kind)
                print(f"  rejected {count:>6,}  {kind}  (e.g. {rid}: {example.split(': ', 1)[-1][:90]})")
            print(f"  reasons per row: {res.path / 'rejected.parquet'}")
        print(f"  {res.path}")
    return 0


# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ltc",
        description="Pre-train / fine-tune sweeps of crystal graph neural networks for lattice thermal "
        "conductivity (and any crystal property), on Ray Tune.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str, desc: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=desc)
        sp.set_defaults(func=func)
        sp.add_argument(
            "--data-home",
            type=Path,
            default=None,
            help="folder laid out like shared/data (default: $LTC_DATA_HOME, else ~/.cache/ltc/data)",
        )
        return sp

    add(
        "datasets",
        cmd_datasets,
        "list the datasets ltc knows and which are present locally",
        "List every dataset with its local entry count, target, units and source file.",
    )

    sp = add(
        "prepare",
        cmd_prepare,
        "build the graph shards of a dataset (once per dataset and graph settings)",
        "Read a dataset, build its periodic crystal graphs and write Arrow shards into the cache "
        "(a folder keyed by dataset fingerprint, graph settings and schema version). Running it again "
        "with the same inputs does nothing. Rows that cannot become graphs are listed with their reason "
        "in rejected.parquet beside the shards.",
    )
    sp.add_argument("names", nargs="*", metavar="NAME", help="dataset name(s), see `ltc datasets`")
    sp.add_argument("--all", action="store_true", help="prepare every dataset in the registry")
    sp.add_argument("--cutoff", type=float, default=8.0, help="neighbour cutoff radius in Å (default 8.0)")
    sp.add_argument(
        "--max-neighbors", type=int, default=12, help="keep at most this many nearest neighbours per atom (default 12)"
    )
    sp.add_argument("--workers", type=int, default=None, help="parallel build processes (default: all CPUs)")
    sp.add_argument("--shard-size", type=int, default=None, help="graphs per shard file (default: automatic)")
    sp.add_argument("--cache", type=Path, default=None, help="shard cache folder (default: $LTC_CACHE)")
    sp.add_argument("--no-download", action="store_true", help="never download; use local files only")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except _USER_ERRORS as err:
        if args.verbose:
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"ltc {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
