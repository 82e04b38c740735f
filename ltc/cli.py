"""The ``ltc`` command line. Each sub-command is a thin layer over a library function."""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ltc.archs import MODEL_NAMES
from ltc.choices import (
    DEFAULT_GRAPHS,
    HEADS,
    LOSSES,
    PRETRAINED,
    REPORT_HELP,
    SCHEDULES,
    SELECT_BY,
    STRATEGIES,
    RunConfig,
    TrainConfig,
)
from ltc.datasets import KAPPA_MAX
from ltc.errors import ConfigError, DataError, LtcError
from ltc.graphs import CONSTRUCTIONS, GraphConfig
from ltc.splits import SPLIT_TESTS, SplitConfig
from ltc.targets import TRANSFORMS

log = logging.getLogger("ltc")

# OS errors that say the user's paths or disk are the trouble, not ltc: one line each (``main``)
USER_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ENAMETOOLONG,
    }
)

# Defaults and choices come from the library (one source of truth); the help texts quote them.
_GRAPH, _SPLIT, _TRAIN = GraphConfig(), SplitConfig(), TrainConfig()
_HEAD_DEFAULT = RunConfig.__dataclass_fields__["head"].default


def _construction_help() -> str:
    """Each graph construction, its line, and the models that train on it by default."""
    parts = []
    for name, text in CONSTRUCTIONS.items():
        models = [m for m, g in DEFAULT_GRAPHS.items() if g.construction == name]
        parts.append(f"{name}: {text}" + (f" (default for {', '.join(models)})" if models else ""))
    return "; ".join(parts)


def _construction_graph(construction: str) -> GraphConfig:
    """The usual graphs of a construction: those of the first model that trains on it by default, else ltc's."""
    return next((g for g in DEFAULT_GRAPHS.values() if g.construction == construction), _GRAPH)


def _dataset_args(names: Sequence[str], args: argparse.Namespace) -> list[str]:
    """Dataset arguments as names: a built-in or declared name as it is; a path (a folder with id_prop.csv or
    dataset.yaml, an extxyz file, a table, a JSON file) declared for this command, with --target, --units and
    --kappa; anything else is the unknown-name error, naming the known ones. Two paths of one name are an error."""
    from ltc import datasets
    from ltc.errors import MissingFileError

    out, own = [], []
    given: dict[str, str] = args.__dict__.setdefault("paths_declared", {})  # name -> path, over the command
    for name in names:
        if datasets.is_known(name):  # a name wins over a file of that name, which ./NAME reaches
            out.append(name)
            continue
        if not Path(name).exists():
            if "/" in name or os.sep in name or Path(name).suffix:
                raise MissingFileError(f"{name}: no such file or folder (nor a dataset name: see `ltc datasets`)")
            datasets.spec(name)  # a typo fails here, before any work, naming the known names
        kappa = True if getattr(args, "kappa", False) else None
        spec = datasets.from_path(name, target=getattr(args, "target", None), units=getattr(args, "units", None),
                                  kappa=kappa)  # fmt: skip
        where = str(Path(name).resolve())
        if given.get(spec.name, where) != where or (spec.name not in given and datasets.is_known(spec.name)):
            other = given.get(spec.name, "a declared dataset")
            raise ConfigError(
                f"{name} and {other} are both called {spec.name!r}: name one in its folder's "
                f"{datasets.DECLARATION_FILE} (name: …)"
            )
        if spec.name not in given:
            given[spec.name] = where
            own.append(spec)
        out.append(spec.name)
    if own:
        args.declared.append(datasets.declare(own))  # closed by main()
    return out


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
    specs = [datasets.spec(name) for name in datasets.known_names()]
    for s in specs:
        found = datasets.local_source(s.name, data_home=home)
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
        if s.declaration is not None:  # outside the data home: its whole path
            source = s.reference if found is None else str(path)
        rows.append((s.name, entries, s.target, s.units or "-", source, local))
    print(f"data home: {home}")
    print(_table(rows, ("name", "entries", "target", "units", "source (in its folder)", "local")))
    notes = []
    for (name, entries, *_), s in zip(rows, specs, strict=True):
        if s.declaration is not None:
            layout = {datasets.IdPropFolder: "id_prop", datasets.ExtXYZ: "extxyz", datasets.Table: "table"}.get(
                type(s.sources[0]), "json"
            )
            notes.append(f"{name}: your own{', kappa' if s.kappa else ''} ({datasets.LAYOUTS[layout]})")
            continue
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
    from ltc.shards import prepare, reason_kind, summarize_rejected

    base = _construction_graph(args.construction)  # knn and jarvis: 8 Å, 12; chgnet: CHGNet's 6 Å
    graph = GraphConfig(
        cutoff=base.cutoff if args.cutoff is None else args.cutoff,
        max_neighbors=base.max_neighbors if args.max_neighbors is None else args.max_neighbors,
        construction=args.construction,
    )
    names = datasets.known_names() if args.all else _dataset_args(args.names, args)
    if not names:
        raise ConfigError("name a dataset (see `ltc datasets`), give the path of your own, or pass --all")
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
            verify=True,
        )
        m = res.manifest
        if res.repaired:
            print(f"{name}: damaged shards rebuilt ({'; '.join(res.repaired)})")
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
# ltc train


def _model_overrides(items: Sequence[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs, values read as YAML scalars or lists (``hidden=32``, ``dense=[64,32]``)."""
    import yaml

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--model-config {item!r} must look like KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def _writable_folder(folder: Path, *, create: bool = True) -> None:
    """Make ``folder`` (and its parents; ``create=False``: only check that they could be made) and check that
    this user can write there: an ``OSError`` naming the path otherwise, which ``main`` prints as one line naming
    the option that gave it. Run before any work, so a mistyped path costs nothing."""
    from ltc.paths import nearest_existing

    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    if create:
        folder.mkdir(parents=True, exist_ok=True)
        existing = folder
    if not os.access(existing, os.W_OK | os.X_OK):  # a read-only mount says so, not "permission denied"
        read_only = hasattr(os, "statvfs") and os.statvfs(existing).f_flag & os.ST_RDONLY  # statvfs: POSIX only
        code = errno.EROFS if read_only else errno.EACCES
        raise OSError(code, os.strerror(code), str(existing))


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from ltc.train import RunConfig, run_inputs, train_run

    _writable_folder(Path(args.out))  # before any training: an unwritable --out fails now, not after the run
    if args.threads:
        torch.set_num_threads(args.threads)
    strategy = args.strategy
    if args.n_unfrozen is not None:
        if strategy not in (None, "blocks"):
            raise ConfigError(f"--n-unfrozen goes with --strategy blocks, not {strategy!r}")
        strategy = "blocks"
    names = _dataset_args(args.dataset, args)
    if args.init is not None and Path(args.init).is_dir():  # a folder of one checkpoint (a `best/<stage>/<cell>/`)
        from ltc.predict import expand_checkpoints

        found = expand_checkpoints([args.init])
        if len(found) > 1:
            raise ConfigError(
                f"--init {args.init} holds {len(found)} checkpoints (e.g. the fold models of a K-fold cell: "
                f"{', '.join(found[:3])}, …); start from one of them"
            )
        args.init = found[0]
    graph = None
    if args.cutoff is not None or args.max_neighbors is not None or args.construction is not None:
        # a flag not given keeps its value from the checkpoint's graphs, or the model's usual ones
        from ltc.transfer import load_init

        if args.init:
            base = GraphConfig(**load_init(args.init)["graph"])
        else:
            base = DEFAULT_GRAPHS.get(args.model or "", _GRAPH)
        construction = base.construction if args.construction is None else args.construction
        graph = GraphConfig(
            cutoff=base.cutoff if args.cutoff is None else args.cutoff,
            max_neighbors=base.max_neighbors if args.max_neighbors is None else args.max_neighbors,
            construction=construction,
            bond_cutoff=base.bond_cutoff if construction == base.construction else None,  # chgnet's, kept
        )
    stage = RunConfig(
        datasets=tuple(names),
        model=args.model,
        model_config=_model_overrides(args.model_config),
        graph=graph,
        size=args.size,
        max_size=args.max_size,
        seed=args.seed,
        split=SplitConfig(
            test=args.split,
            test_fraction=args.test_fraction,
            split_seed=args.split_seed,
            folds=args.folds,
            repeats=args.repeats,
            val_fraction=args.val_fraction,
            val_min=args.val_min,
        ),
        holdout=tuple(_dataset_args(args.holdout, args)),
        transform=args.transform,
        init=str(args.init) if args.init else None,
        strategy=strategy or "all",
        n_unfrozen=args.n_unfrozen,
        head=args.head,
        train=TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            loss=args.loss,
            schedule=args.schedule,
            patience=args.patience,
            select_by=args.select_by,
            seed=args.seed,
            device=args.device,
        ),
    )
    # resolved once before training, as a sweep's driver does: shards built or verified, split ids, holdout
    inputs = run_inputs(stage, home=args.data_home, cache=args.cache, progress=True)
    runs = stage.split.folds * stage.split.repeats if stage.split.kfold else 1
    bar = EpochBar(stage.train.epochs, runs=runs, quiet=args.quiet)
    try:
        if stage.split.kfold:
            return _train_kfold(stage, args.out, inputs, bar)
        m = train_run(stage, args.out, inputs=inputs, on_epoch=bar)
    finally:
        bar.close()
    print(
        f"{m['model']} on {'+'.join(m['datasets'])}: {m['epochs_run']} epochs in {m['train_seconds']:.1f} s, "
        f"{m['params_trainable']:,} of {m['params_total']:,} parameters trained (strategy {m['strategy']}"
        + (f", n_unfrozen {m['n_unfrozen']})" if m["n_unfrozen"] is not None else ")")
    )
    keys = ("mae", "rmse", "r2", "mape", "mae_log10")
    rows = []
    prefixes = [""] if len(m["datasets"]) == 1 else [f"{d}/" for d in m["datasets"]]
    for prefix in prefixes:
        for part in ("val", "test"):
            vals = [m.get(f"{prefix}{part}_{k}") for k in keys]
            n = m.get(f"{prefix}n_{part}")
            rows.append((f"{prefix}{part}", n, *("-" if v is None else f"{v:.4g}" for v in vals)))
    print(_table(rows, ("split", "n", "MAE", "RMSE", "R2", "MAPE %", "MAE log10")))
    out = Path(args.out)
    print(f"  {out / 'metrics.json'}\n  {out / 'checkpoint.pt'}")
    return 0


class EpochBar:
    """``fit``'s ``on_epoch`` for ``ltc train``: a bar of epochs per run with its latest losses (stderr; none with
    --quiet, and a line per epoch at -v, which a log file keeps). A new run (its epoch 1 again) starts a new bar."""

    def __init__(self, epochs: int, *, runs: int = 1, quiet: bool) -> None:
        self.epochs, self.total_runs, self.quiet = epochs, runs, quiet
        self.bar, self.runs = None, 0

    def __call__(self, record: dict[str, float], state: Callable[[], object]) -> None:
        from tqdm.auto import tqdm

        done = int(record["epoch"]) + 1  # fit counts epochs from 0
        if self.bar is None or done <= self.bar.n:  # the first epoch of the next run (K-fold)
            self.close()
            self.runs += 1
            desc = "training" if self.total_runs == 1 else f"run {self.runs}/{self.total_runs}"
            self.bar = tqdm(total=self.epochs, desc=desc, unit="epoch", disable=self.quiet, leave=False)
        self.bar.set_postfix(train_loss=f"{record['train_loss']:.3g}", val_score=f"{record['val_score']:.3g}",
                             refresh=False)  # fmt: skip
        self.bar.n = done  # one line per epoch, whatever the time since the last (tqdm's update may skip it)
        self.bar.refresh()
        log.debug("epoch %d: train_loss %.4g, val_loss %.4g, lr %.3g, %.1f s", record["epoch"],
                  record["train_loss"], record["val_loss"], record["lr"], record["seconds"])  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _train_kfold(stage, out: Path, inputs, bar: EpochBar) -> int:
    from ltc.train import train_kfold

    split = stage.split
    folds = f"{split.folds}-fold cross-validation"
    if split.test == "matbench":
        folds = f"Matbench v0.1's {split.folds} official folds"
    print(f"{folds} x {split.repeats} repeat(s): {split.folds * split.repeats} runs")
    cv = train_kfold(stage, out, inputs=inputs, on_epoch=bar)
    for name, res in cv["datasets"].items():
        from ltc.compare import shown_metrics

        found = [k.removesuffix("_mean") for k in res if k.endswith("_mean")]
        metrics = [m for m in shown_metrics(name) if m in found] + [m for m in found if m not in shown_metrics(name)]
        rows = [
            (r["repeat"], r["n"], *("-" if r[k] is None else f"{r[k]:.4g}" for k in metrics)) for r in res["repeats"]
        ]
        mean = [
            f"{res[f'{k}_mean']:.4g} ± {res[f'{k}_std']:.2g}" if res[f"{k}_mean"] is not None else "-" for k in metrics
        ]
        if len(res["repeats"]) > 1:  # one repeat has no spread to state
            rows.append(("mean ± std", "", *mean))
        print(f"{name}: pooled out-of-fold test predictions per repeat")
        print(_table(rows, ("repeat", "n", *metrics)))
        mae = (res.get("per_fold") or {}).get("mae")
        if split.test == "matbench" and mae is not None:  # as the Matbench leaderboard states it
            print(f"{name}: MAE per fold, mean ± std over {len(res['folds'])} folds (np.std, Matbench's form): "
                  f"{mae['mean']:.4g} ± {mae['std']:.4g}")  # fmt: skip
    print(f"  {out / 'cv.json'}\n  {out / 'oof_predictions.parquet'}\n  {out}/r<repeat>f<fold>/checkpoint.pt")
    return 0


# --------------------------------------------------------------------------------------------------
# ltc sweep


def cmd_sweep(args: argparse.Namespace) -> int:
    from ltc import datasets
    from ltc.io import check_uri, is_uri
    from ltc.sweep import describe, load_sweep, smoke, validate

    spec = load_sweep(args.file)
    from ltc.tracking import parse_tracking

    trackers = parse_tracking(args.tracking)  # a bad value or a missing package: one line, --dry-run too
    if args.smoke:
        spec = smoke(spec)
    args.declared.append(datasets.declare(spec.declared_datasets()))  # the summary below names them too
    for folder in (args.results, None if is_uri(args.storage or "") else args.storage):
        if folder:  # the driver makes them; a path it could not make fails now, before Ray starts
            _writable_folder(Path(folder), create=False)
    if args.dry_run:
        # what a trial would reject fails here, naming the key; Ray is never imported
        check_uri(args.storage or spec.storage or "", what="storage")
        validate(spec, home=args.data_home, cache=args.cache)
        print(describe(spec))
        if not (args.address or os.environ.get("RAY_ADDRESS")):
            from ltc.sweep.plan import beyond_this_machine

            for line in beyond_this_machine(spec):  # a cluster sweep checked on a laptop: said, not refused
                print(f"note: {line}: run it on a cluster (--address); here its trials would never start")
        return 0
    from ltc.results import summary
    from ltc.sweep.driver import StageFailed, SweepInterrupted, run_sweep
    from ltc.tracking import open_stores

    open_stores(trackers, sweep=spec.name)  # a store that refuses: one line, before Ray and the results folder

    for name in ("ray", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # after a Ctrl-C Tune suggests `Tuner.restore(...)`; an ltc user resumes with `ltc sweep --resume` (said below)
    logging.getLogger("ray.tune.tune").addFilter(lambda record: "Tuner.restore(" not in record.getMessage())
    logging.getLogger("ray.tune.analysis.experiment_analysis").addFilter(_unexpected_fetch_failures)
    results = Path(args.results)
    try:
        trials = run_sweep(
            spec,
            results=results,
            storage=args.storage,
            resume=args.resume,
            address=args.address,
            spec_text=Path(args.file).read_text(),
            data_home=args.data_home,
            cache=args.cache,
            optuna_storage=args.optuna_storage,
            tracking=trackers,
        )
    except StageFailed as err:
        # a line per cause: what to fix before the command that finishes the sweep
        again = [sys.argv[0] if sys.argv and sys.argv[0].endswith("ltc") else "ltc", *_resume_argv(args)]
        n = sum(k for _, k in err.causes)
        print(f"\nltc sweep: stage {err.stage}: {n} trial(s) failed, the stage is not marked done:", file=sys.stderr)
        for cause, k in err.causes:
            print(f"  {k} x {cause}", file=sys.stderr)
        print(f"Fix the cause, then resume with: {' '.join(again)}", file=sys.stderr)
        return 1
    except SweepInterrupted as err:
        # one line: what happened and the command that finishes the sweep (the same flags, plus --resume)
        again = [sys.argv[0] if sys.argv and sys.argv[0].endswith("ltc") else "ltc", *_resume_argv(args)]
        print(f"\nltc sweep: {err}. Resume with: {' '.join(again)}", file=sys.stderr)
        # Ray shuts its local cluster down at exit; another Ctrl-C meanwhile ends the process at once, quietly
        import signal

        signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))
        return 130

    print()
    print(summary(trials))
    root = results.resolve() / spec.name
    print(f"\nresults: {root / 'trials.parquet'}\nbest checkpoints: {root / 'best'}")
    print(f"report:  ltc report {root}")
    return 0


def _unexpected_fetch_failures(record: logging.LogRecord) -> bool:
    """False for Tune's "Failed to fetch metrics for N trial(s)" warning when every trial it lists merely had no
    result file yet (FileNotFoundError): the trials an interrupt left pending, a line each, dozens of them, which
    --resume runs. Any other failure it lists keeps the warning whole."""
    text = record.getMessage()
    if not text.startswith("Failed to fetch metrics"):
        return True
    return not all("FileNotFoundError" in line for line in text.splitlines()[1:])


def _resume_argv(args: argparse.Namespace) -> list[str]:
    argv = ["sweep", str(args.file), "--resume"]
    from ltc.sweep.studies import MASK, register_storage

    for flag in ("results", "storage", "address", "cache", "data_home", "optuna_storage"):
        value = getattr(args, flag, None)
        if flag == "optuna_storage" and value is not None:  # a database password is never printed
            value = register_storage(value).replace(MASK, "PASSWORD")
        if value is not None and not (flag == "results" and str(value) == "results"):
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    for value in getattr(args, "tracking", None) or []:  # later stages log to them too (a restored stage keeps its own)
        argv += ["--tracking", value]
    return argv + (["--smoke"] if args.smoke else [])


# --------------------------------------------------------------------------------------------------
# ltc report


def cmd_report(args: argparse.Namespace) -> int:
    from ltc.results import write_report

    report = write_report(args.results_dir)
    print(f"report: {report.path}")
    for title, path in report.figures.items():
        print(f"  {path.name:28s} {title}")
    for title, why in report.skipped.items():
        print(f"  {'(not drawn)':28s} {title}: {why}")
    return 0


# --------------------------------------------------------------------------------------------------
# ltc predict


def _num(value: object) -> str:
    """A metric for people: 4 significant digits, "-" where undefined."""
    return "-" if value is None or math.isnan(float(value)) else f"{float(value):.4g}"


def cmd_predict(args: argparse.Namespace) -> int:
    import pandas as pd

    from ltc.predict import predict, score

    checkpoints = list(args.checkpoint)
    source = args.input
    if source is None:  # `--checkpoint A B INPUT`: argparse gave INPUT to --checkpoint
        if len(checkpoints) < 2:
            raise ConfigError(
                "give INPUT: a structure file or a folder of them, an extxyz file, a table or a dataset name"
            )
        source = checkpoints.pop()
    out = Path(args.out)
    _writable_folder(out.parent)  # before predicting
    table = predict(checkpoints, source, batch_size=args.batch_size, device=args.device, home=args.data_home,
                    cache=args.cache, target=args.target, allow_partial=args.allow_partial)  # fmt: skip
    table.to_parquet(out, index=False)
    ok = table[table.error.isna()]
    failed = table[table.error.notna()].drop_duplicates("id")
    if ok.empty:
        first = failed.iloc[0] if len(failed) else None
        example = f" (e.g. {first.source}: {first.error})" if first is not None else ""
        raise DataError(f"{source}: none of its {len(failed)} structure(s) could be read{example}; reasons in {out}")
    n_models = int(table.n_models.max()) if len(table) else 0
    print(f"{ok.id.nunique():,} structures predicted by {n_models} model(s); {len(failed)} failed")
    for _, row in failed.iterrows():
        print(f"  {row.source}: {row.error}")
    for target, g in ok.groupby("target", sort=False):
        head = g.sort_values("rank") if g["rank"].notna().any() else g
        what = "lowest predicted first" if g["rank"].notna().any() else "first rows"
        print(f"\n{target} ({g.units.iloc[0]}), {what}:")
        cols = [
            "id",
            "formula",
            "pred_mean",
            "pred_lower",
            "pred_upper",
            *(["y_true"] if "y_true" in g else []),
            "rank",
        ]
        print(head[cols].head(args.show).to_string(index=False))
    for _, m in score(table).iterrows():  # where the input carried known values
        text = f"MAE {_num(m.mae)} {m.units}, R² {_num(m.r2)}"
        if "mae_log10" in m and pd.notna(m.mae_log10):  # kappa: log10 metrics first, as reports judge it
            text = f"MAE log10 {_num(m.mae_log10)}, R² log10 {_num(m.r2_log10)}; raw: {text}"
        print(f"\n{m.target} against the known values (y_true) of {source}, {m.n} structures: {text}")
    print(f"\npredictions: {out}")
    return 0


# --------------------------------------------------------------------------------------------------
# ltc screen


def cmd_screen(args: argparse.Namespace) -> int:
    import pandas as pd

    from ltc.screen import ScreenInterrupted, screen

    for name in ("ray", "ray.data", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        result = screen(
            [args.checkpoints], args.input, args.out, resume=args.resume, address=args.address,
            partition_size=args.partition_size, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=args.gpus_per_actor, batch_size=args.batch_size, rank_by=args.rank,
            descending=args.descending, target=args.target, id_key=args.id_key, structure_key=args.structure_key,
            progress=not args.quiet, allow_partial=args.allow_partial,
        )  # fmt: skip
    except ScreenInterrupted as err:
        again = ["ltc", "screen", str(args.checkpoints), str(args.input), "--out", str(args.out), "--resume"]
        print(f"\nltc screen: {err}. Resume with: {' '.join(again)}", file=sys.stderr)
        return 130
    rate = result.n_candidates / max(result.seconds, 1e-9)
    print(
        f"{result.n_predicted:,} of {result.n_candidates:,} candidates predicted, {result.n_failed:,} failed "
        f"({result.seconds:.0f} s, {rate:,.0f} structures/s)"
    )
    ranking = pd.read_parquet(result.ranking)
    key = f"pred_{args.rank}"
    for target, g in ranking.groupby("target", sort=False):
        order = "highest" if args.descending else "lowest"
        print(f"\n{target}: {order} {key} first")
        print(
            g[["rank", "id", "formula", "pred_mean", "pred_lower", "pred_upper"]].head(args.show).to_string(index=False)
        )
    print(f"\nranking:     {result.ranking}\npredictions: {result.out / 'predictions'}/part-*.parquet")
    return 0


# --------------------------------------------------------------------------------------------------


# The libraries whose versions decide a result, as `ltc --version` shows them (read from the installed metadata:
# importing them would take seconds)
STACK = ("torch", "torch-geometric", "ray", "optuna", "pymatgen", "pyarrow")


def version_line() -> str:
    """``ltc 0.1.0 (torch 2.13.0, torch-geometric …)``: ltc's version and those of its stack, as installed."""
    from importlib.metadata import PackageNotFoundError, version

    from ltc import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"ltc {__version__} (" + ", ".join(f"{name} {installed(name)}" for name in STACK) + ")"


ALLOW_PARTIAL_HELP = (
    "use a K-fold cell's folder that lacks some of its fold models (r<R>f<F>) as it is; without it, that is an error"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ltc",
        description="Pre-train / fine-tune sweeps of crystal graph neural networks for lattice thermal "
        "conductivity (and any crystal property), on Ray Tune.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=version_line(), help="ltc's version and its stack's")
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
        if name != "sweep":  # a sweep file declares its own
            sp.add_argument(
                "--datasets-from",
                metavar="FILE",
                type=Path,
                help="a YAML file whose `datasets:` declares your own datasets by name (a sweep file works): "
                "they are then known to this command as the built-in ones are",
            )
        return sp

    def own_data_flags(sp: argparse.ArgumentParser) -> None:
        g = sp.add_argument_group(
            "your own data (a dataset given by its path; a dataset.yaml in its folder can say the same)"
        )
        g.add_argument(
            "--target",
            help="the target's name; for an extxyz file, a table or a JSON file also the info key / column holding it",
        )
        g.add_argument("--units", help="the target's units (default: W/(m K) with --kappa, else none)")
        g.add_argument(
            "--kappa",
            action="store_true",
            help="the target is a lattice thermal conductivity: judged on log10 kappa and MAPE, ranked lowest first, "
            f"values <= 0 or above {KAPPA_MAX:,.0f} rejected",
        )

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
    sp.add_argument(
        "names",
        nargs="*",
        metavar="NAME_OR_PATH",
        help="dataset name(s), see `ltc datasets`, or the path of your own: a folder with id_prop.csv, an extxyz file, "
        "a CSV / Parquet table, a JSON list of records",
    )
    sp.add_argument("--all", action="store_true", help="prepare every dataset in the registry")
    chgnet = _construction_graph("chgnet")
    sp.add_argument(
        "--cutoff",
        type=float,
        help=f"neighbour cutoff radius in Å (default {_GRAPH.cutoff:g}; chgnet: {chgnet.cutoff:g}, CHGNet's)",
    )
    sp.add_argument(
        "--max-neighbors",
        type=int,
        help=f"keep at most this many nearest neighbours per atom (default {_GRAPH.max_neighbors}; not for chgnet)",
    )
    sp.add_argument(
        "--construction",
        choices=list(CONSTRUCTIONS),
        default=_GRAPH.construction,
        help=f"how edges are chosen (default {_GRAPH.construction}). {_construction_help()}",
    )
    sp.add_argument("--workers", type=int, default=None, help="parallel build processes (default: all CPUs)")
    sp.add_argument("--shard-size", type=int, default=None, help="graphs per shard file (default: automatic)")
    sp.add_argument("--cache", type=Path, default=None, help="shard cache folder (default: $LTC_CACHE)")
    sp.add_argument("--no-download", action="store_true", help="never download; use local files only")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    own_data_flags(sp)
    sp = add(
        "train",
        cmd_train,
        "train one model: pre-train from scratch, or fine-tune a checkpoint",
        "Train a crystal graph model on one dataset (several names: multi-property training, one head each) "
        "and write OUT/metrics.json (test and validation metrics in raw units, epochs, times, parameter counts), "
        "OUT/checkpoint.pt and OUT/predictions.parquet. With --init it fine-tunes a checkpoint, or a pretrained "
        f"model by name ({', '.join(PRETRAINED)}): --strategy chooses what trains "
        f"({', '.join(s for s in STRATEGIES if s != 'blocks')}) or --n-unfrozen K trains the last K blocks plus "
        "readout and head.",
    )
    sp.add_argument(
        "--dataset",
        nargs="+",
        required=True,
        metavar="NAME_OR_PATH",
        help="dataset name(s), see `ltc datasets`, or the path of your own (see ltc prepare --help)",
    )
    sp.add_argument("--out", type=Path, required=True, help="output folder")
    sp.add_argument("--model", choices=list(MODEL_NAMES), help="architecture (needed without --init)")
    sp.add_argument(
        "--model-config",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="model config overrides for a new model, e.g. hidden=32 n_blocks=2 head_hidden=[450,350,350]",
    )
    g = sp.add_argument_group("data and splits")
    g.add_argument(
        "--size", type=int, help="train+validation structures per dataset (default: all outside the test set)"
    )
    g.add_argument("--max-size", type=int, help="at most this many train+validation structures (PT size cap)")
    g.add_argument(
        "--seed",
        type=int,
        default=_TRAIN.seed,
        help="draws the subset, its train/validation split (--val-fraction, --val-min) and the init (default 0)",
    )
    g.add_argument(
        "--split",
        choices=list(SPLIT_TESTS),
        default=_SPLIT.test,
        help="test set: seeded (a fixed 10%% per dataset) or paper (Devi et al.'s files; their trial subsets for "
        "sizes 10..800 and seeds 1..5); paper_or_seeded: paper where the file exists; kfold: --folds x --repeats "
        "cross-validation, every structure tested once per repeat (the protocol for sets of ~100; writes "
        "OUT/cv.json with pooled out-of-fold metrics); matbench: the official Matbench v0.1 folds of a Matbench "
        "task (ph, gv, bg, fe; the whole task must be local), metrics also per fold, as the leaderboard shows them",
    )
    g.add_argument(
        "--test-fraction",
        type=float,
        default=_SPLIT.test_fraction,
        help=f"seeded test fraction (default {_SPLIT.test_fraction:g})",
    )
    g.add_argument("--folds", type=int, default=_SPLIT.folds, help=f"--split kfold: folds (default {_SPLIT.folds})")
    g.add_argument(
        "--repeats", type=int, default=_SPLIT.repeats, help=f"--split kfold: repeats (default {_SPLIT.repeats})"
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=_SPLIT.val_fraction,
        help=f"validation share of the training structures: picks the best epoch (default {_SPLIT.val_fraction:g})",
    )
    g.add_argument(
        "--val-min",
        type=int,
        default=_SPLIT.val_min,
        help=f"at least this many validation structures, up to a fifth of them (default {_SPLIT.val_min})",
    )
    g.add_argument(
        "--split-seed",
        type=int,
        default=_SPLIT.split_seed,
        help=f"fixes the seeded test set (default {_SPLIT.split_seed})",
    )
    g.add_argument(
        "--holdout",
        nargs="*",
        default=[],
        metavar="NAME",
        help="keep structures whose formula is in these datasets' test sets out of training (e.g. the FT set, in PT); "
        "their test sets are chosen by this run's --split options (with kfold: every formula of theirs)",
    )
    g.add_argument(
        "--transform",
        choices=list(TRANSFORMS),
        help="target transform (default: the dataset's: minmax, or log10p1+standardize for kappa)",
    )
    g.add_argument("--cutoff", type=float, help="graph cutoff in Å (default: the model's, or the checkpoint's)")
    g.add_argument("--max-neighbors", type=int, help="graph neighbours per atom (default: the model's)")
    g.add_argument(
        "--construction",
        choices=list(CONSTRUCTIONS),
        help=f"how graph edges are chosen (default: the model's, or the checkpoint's). {_construction_help()}",
    )
    g = sp.add_argument_group("fine-tuning")
    g.add_argument(
        "--init",
        metavar="CKPT_OR_NAME",
        help="checkpoint to start from (a PT or earlier FT stage: its file, or a folder holding one), or a pretrained "
        "model by name (a fresh head is put on): "
        + "; ".join(f"{name}: {p.description}" for name, p in PRETRAINED.items()),
    )
    g.add_argument(
        "--strategy",
        choices=list(STRATEGIES),
        help="what trains (default all); see ltc/transfer.py for the mapping onto each model",
    )
    g.add_argument(
        "--n-unfrozen", type=int, help="train the last K blocks + readout + head (implies --strategy blocks)"
    )
    g.add_argument(
        "--head",
        choices=list(HEADS),
        default=_HEAD_DEFAULT,
        help="keep the checkpoint's head, or a new one (auto: keep if the number of targets matches)",
    )
    g = sp.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=_TRAIN.epochs, help=f"default {_TRAIN.epochs}")
    g.add_argument("--batch-size", type=int, default=_TRAIN.batch_size, help=f"default {_TRAIN.batch_size}")
    g.add_argument("--lr", type=float, default=_TRAIN.lr, help=f"peak learning rate (default {_TRAIN.lr:g})")
    g.add_argument(
        "--weight-decay",
        type=float,
        default=_TRAIN.weight_decay,
        help=f"AdamW weight decay (default {_TRAIN.weight_decay:g})",
    )
    g.add_argument("--loss", choices=list(LOSSES), default=_TRAIN.loss, help=f"default {_TRAIN.loss}")
    g.add_argument("--schedule", choices=list(SCHEDULES), default=_TRAIN.schedule, help=f"default {_TRAIN.schedule}")
    g.add_argument(
        "--select-by",
        choices=list(SELECT_BY),
        default=_TRAIN.select_by,
        help="what picks the epoch kept, on the validation split: loss (scaled), mae, mae_log10 (kappa) or r2 "
        "(default: the metric that judges the dataset, kappa mae_log10, others r2; several datasets: loss)",
    )
    g.add_argument(
        "--patience", type=int, help="early stopping: epochs without a better validation score (default off)"
    )
    g.add_argument("--device", default=_TRAIN.device, help="auto (CUDA if available), cpu, cuda, cuda:1 …")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar of epochs (-v: a line per epoch)")
    sp.add_argument("--cache", type=Path, default=None, help="shard cache folder (default: $LTC_CACHE)")
    own_data_flags(sp)

    sp = add(
        "sweep",
        cmd_sweep,
        "run a PT/FT sweep (YAML) on Ray Tune with Optuna inside each setting",
        "Run the stages of a sweep file in order, each as a Ray Tune Tuner: settings (datasets, sizes, "
        "strategies, seeds, starting checkpoints, scratch baselines) with Optuna proposing lr and n_unfrozen "
        "inside each (one study per setting, kept in RESULTS/<sweep name>/optuna.log) and, with asha set, "
        "successive halving stopping weak trials within a setting. Writes RESULTS/<sweep name>/trials.parquet "
        "(one row per trial) and the best checkpoint of every setting. Runs on a local Ray unless --address (or "
        "RAY_ADDRESS) names a cluster.",
    )
    sp.add_argument("file", type=Path, help="sweep file, e.g. sweeps/quickstart.yaml")
    sp.add_argument(
        "--dry-run", action="store_true", help="print the expanded plan (stages, settings, trials) and stop"
    )
    sp.add_argument("--resume", action="store_true", help="complete an interrupted sweep (finished trials are kept)")
    sp.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    sp.add_argument(
        "--storage",
        help="Ray storage for checkpoints: a folder, s3://… or gs://… (default: the file's). An S3-compatible "
        "endpoint comes from AWS_ENDPOINT_URL, credentials from the AWS variables or profile, never the URI",
    )
    sp.add_argument("--results", default="results", help="results folder (default: results/)")
    sp.add_argument(
        "--optuna-storage",
        metavar="URL",
        help="database for the Optuna studies, e.g. sqlite:///studies.db or postgresql://user:pw@host/db "
        "(default: RESULTS/<sweep name>/optuna.log, a journal file; open either with optuna-dashboard)",
    )
    sp.add_argument(
        "--tracking",
        action="append",
        metavar="TRACKER",
        help="log every trial to a tracker too, one run each tagged with its setting (repeatable; pip install "
        "'ltc[tracking]'): mlflow:URI, an MLflow tracking URI such as sqlite:////abs/mlflow.db or "
        "http://127.0.0.1:5000 (experiment: the sweep's name); wandb, a W&B run in project $WANDB_PROJECT or the "
        "sweep's name, grouped by stage, OFFLINE (runs in RESULTS/<sweep name>/wandb/ for `wandb sync`, nothing "
        "sent) unless WANDB_MODE or WANDB_API_KEY is set. TensorBoard files are always written: "
        "STORAGE/<stage>/<trial>/events.out.tfevents.* (STORAGE: RESULTS/<sweep name>/ray by default)",
    )
    sp.add_argument(
        "--smoke",
        action="store_true",
        help="scaled-down copy (<name>-smoke) to check a sweep file end to end in minutes: per stage the first "
        "dataset set, size (at most 64 structures), seed and strategy, scratch kept; 1 trial of 2 epochs, small "
        "fresh models; a K-fold stage keeps all its folds, 1 repeat (the quickstart's: 10 FT settings)",
    )
    sp.add_argument("--cache", type=Path, default=None, help="shard cache folder (default: $LTC_CACHE)")

    sp = sub.add_parser(
        "report",
        help="write report.md and figures for a sweep's results",
        description=REPORT_HELP,
    )
    sp.set_defaults(func=cmd_report)
    sp.add_argument("results_dir", type=Path, metavar="RESULTS_DIR", help="a sweep's results, e.g. results/quickstart")

    sp = add(
        "predict",
        cmd_predict,
        "predict with trained checkpoints: screen CIF/POSCAR files or a dataset",
        "Predict the target of each structure in INPUT (a CIF or POSCAR file or a folder of them, an extxyz file, "
        "a CSV / Parquet table, a JSON list of records, or a dataset name) with one or more checkpoints; several "
        "(e.g. the seeds of one setting) give mean ± std. Kappa predictions are ranked lowest first. Unreadable "
        "files are reported and kept as rows with their error. Where INPUT has known values (a dataset, --target) "
        "it prints MAE and R² against them (log10 for kappa). Writes --out (Parquet): id, source, formula, target, "
        "units, n_models, pred_mean, pred_std, pred_<i>, y_true (known values), rank, error.",
    )
    sp.add_argument(
        "--checkpoint",
        nargs="+",
        required=True,
        metavar="CKPT",
        help="checkpoint.pt file(s), or folder(s) searched for them (the fold models of a K-fold setting: an ensemble)",
    )
    sp.add_argument(
        "input",
        nargs="?",
        metavar="INPUT",
        help="a dataset name; a structure file (CIF, POSCAR …) or a folder of them (with an id_prop.csv: its values "
        "go beside the predictions as y_true); an extxyz file, a CSV / Parquet table or a JSON list of structures",
    )
    sp.add_argument("--out", type=Path, required=True, help="output Parquet file")
    sp.add_argument("--batch-size", type=int, default=256, help="structures per forward pass (default %(default)s)")
    sp.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda …")
    sp.add_argument("--show", type=int, default=10, help="rows to print per target (default 10)")
    sp.add_argument("--cache", type=Path, default=None, help="shard cache folder (dataset inputs)")
    sp.add_argument(
        "--target",
        help="a table's column or an extxyz file's info key holding known values (y_true beside the predictions)",
    )
    sp.add_argument("--allow-partial", action="store_true", help=ALLOW_PARTIAL_HELP)

    from ltc.screen import PARTITION_SIZE, RANK_BY

    sp = add(
        "screen",
        cmd_screen,
        "rank a large set of candidate structures with a fold ensemble, on Ray Data",
        "Predict every candidate in INPUT with the checkpoints in CHECKPOINTS (a checkpoint.pt, or a folder of them: "
        "the fold models of a K-fold cell are an ensemble) and rank them. INPUT: a folder of structure files (CIF, "
        "POSCAR …; with an id_prop.csv its values go beside as y_true), an extxyz file, a CSV / Parquet table or a "
        "JSON list. Graphs are built in Ray tasks, predictions made in actors that each load the ensemble once, and "
        "written to OUT/predictions/part-*.parquet partition by partition (--resume skips those done); "
        "OUT/ranking.parquet ranks them. Kappa ensembles are combined in log10 space: pred_mean is the geometric "
        "mean, pred_lower and pred_upper its ensemble spread (mean ∓ 2 standard deviations of log10 kappa).",
    )
    sp.add_argument("checkpoints", metavar="CHECKPOINTS", help="a checkpoint.pt, or a folder searched for them")
    sp.add_argument("input", metavar="INPUT", help="candidates: a folder, an extxyz file, a table or a JSON list")
    sp.add_argument("--out", type=Path, required=True, help="output folder (a new one, or one to --resume)")
    sp.add_argument("--resume", action="store_true", help="finish an interrupted screen: finished partitions are kept")
    sp.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    sp.add_argument(
        "--rank",
        choices=list(RANK_BY),
        default=RANK_BY[0],
        help="rank by the ensemble's mean, or by a bound of its spread: lower is the optimistic one in a search for "
        "low kappa (default mean)",
    )
    sp.add_argument("--descending", action="store_true", help="highest first (default: lowest first)")
    sp.add_argument(
        "--partition-size",
        type=int,
        default=PARTITION_SIZE,
        help=f"candidates per output file, the unit --resume skips (default {PARTITION_SIZE})",
    )
    sp.add_argument("--actors", type=int, help="inference actors (default: one per GPU, else half the CPUs)")
    sp.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (and torch threads) per actor (default 1)")
    sp.add_argument(
        "--gpus-per-actor", type=float, help="GPUs per actor, a fraction to share one (default: 1 where GPUs exist)"
    )
    sp.add_argument("--batch-size", type=int, default=256, help="structures per forward pass (default %(default)s)")
    sp.add_argument("--target", help="a column / info key of known values, kept beside as y_true")
    sp.add_argument("--id-key", help="the id column / info key (default: id, material_id, mpd_id, jid or name)")
    sp.add_argument("--structure-key", help="the structure column (default: structure, cif, atoms or poscar)")
    sp.add_argument("--show", type=int, default=10, help="rows of the ranking to print per target (default 10)")
    sp.add_argument("--allow-partial", action="store_true", help=ALLOW_PARTIAL_HELP)
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def _full_folders(args: argparse.Namespace) -> str:
    """Which of the folders this command writes to is full (an ENOSPC that names no file): the results or output
    folder, the storage, the shard cache, the temporary folders (Ray's session); those with under ``io.LOW_SPACE``
    left, else all. Looks only: creates nothing on the full disk."""
    import tempfile

    from ltc import io

    given = [getattr(args, key, None) for key in ("results", "results_dir", "out", "storage", "cache")]
    given += [os.environ.get("LTC_CACHE"), os.environ.get("RAY_TMPDIR"), tempfile.gettempdir()]
    try:
        free = io.free_space([Path(f) for f in given if f and not io.is_uri(str(f))])
    except OSError:  # the file system fails even to say how full it is
        return "(its folder could not be examined)"
    low = [f for f, b in free.items() if b < io.LOW_SPACE] or list(free)
    return ", ".join(f"{f} ({free[f] / 2**20:.1f} MiB free)" for f in low)


# The paths a user gives, by the option (or variable) that gives them: an OS error on one of them, or on a folder
# above or below it, is theirs to fix, whatever its errno (mkdir under /proc or a dead mount is ENOENT).
USER_PATHS = {"results": "--results", "results_dir": "RESULTS_DIR", "out": "--out", "storage": "--storage",
              "cache": "--cache", "data_home": "--data-home"}  # fmt: skip
USER_PATH_VARIABLES = ("LTC_DATA_HOME", "LTC_CACHE", "RAY_TMPDIR")


def _given_path(args: argparse.Namespace, filename: object, *, below: bool) -> str | None:
    """``--out PATH`` (say) when ``filename`` is the path the user gave there or a folder above it (where making
    it failed), or with ``below`` a path inside it."""
    if not isinstance(filename, (str, os.PathLike)):
        return None
    given = [(flag, getattr(args, key, None)) for key, flag in USER_PATHS.items()]
    given += [(name, os.environ.get(name)) for name in USER_PATH_VARIABLES]
    bad = Path(os.path.abspath(filename))
    for flag, value in given:
        if value and "://" not in str(value):
            mine = Path(os.path.abspath(value))
            if bad == mine or bad in mine.parents or (below and mine in bad.parents):
                return f"{flag} {value}" if flag.startswith("-") else f"{flag}={value}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    args.declared = []  # the datasets this command declared (--datasets-from, paths): closed when it ends
    try:
        if getattr(args, "datasets_from", None) is not None:
            from ltc import datasets

            args.declared.append(datasets.declare(datasets.declarations_in(args.datasets_from)))
        return args.func(args)
    except LtcError as err:  # the user's to fix: one line; anything else is a bug and keeps its traceback
        if args.verbose:
            raise
        print(f"ltc {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path the user gave that cannot be written or read, a full disk: theirs to fix too
        # any errno on the path given or above it (it could not be made); below it, where ltc writes its own files,
        # only the errnos that say the disk or permissions are the trouble: anything else there is a bug
        given = _given_path(args, err.filename, below=err.errno in USER_ERRNOS)
        if args.verbose or (err.errno not in USER_ERRNOS and given is None):
            raise
        where = f": {err.filename}" if err.filename else ""
        if err.errno == errno.ENOSPC and not err.filename:  # Arrow's and Tune's writes name no file
            where = f": {_full_folders(args)}"
        full = "; free some space there, then run the same command (with --resume for a sweep)"
        option = f"{given}: " if given is not None else ""  # which of the paths given leads there
        print(f"ltc {args.command}: error: {option}{err.strerror}{where}{full if err.errno == errno.ENOSPC else ''}",
              file=sys.stderr)  # fmt: skip
        return 2
    finally:
        for declared in reversed(args.declared):
            declared.close()


if __name__ == "__main__":
    sys.exit(main())
