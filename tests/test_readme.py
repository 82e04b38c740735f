"""The README and docs/*.md show what the repository runs.

Every ```yaml block is one of three things, and is checked as such:

- a whole sweep file (a mapping with ``name`` and ``stages``): written to a folder and run through
  ``ltc sweep FILE --dry-run`` in this process, which must succeed;
- marked ``<!-- file sweeps/NAME.yaml -->`` on the line above: its lines are lines of that file, as they stand
  (and, being a whole sweep, it is dry-run too);
- marked ``<!-- fragment of sweeps/NAME.yaml -->``: every key and value in it is in that file, which itself
  passes ``--dry-run``.

Every ``ltc …`` line of a ```bash or ```console block parses with ltc's own argument parser, every
``sweeps/*.yaml`` and ``docs/*.md`` path the README names exists, and every relative link resolves, anchors
included. The README's claims about ``--dry-run`` and ``--smoke`` of the quickstart are checked against them.
"""

from __future__ import annotations

import re
import shlex
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from ltc import datasets
from ltc.cli import build_parser, main
from ltc.datasets import parse_structure, read

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^```(\w*)\s*$")
MARK = re.compile(r"^<!--\s*(file|fragment of)\s+(\S+)\s*-->$")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*\s+")
README_MAX_LINES = 350


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # the opening fence's line, 1-based
    lang: str
    text: str
    mark: tuple[str, str] | None  # ("file" | "fragment of", a path in the repository), from the line above

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, each with the marker comment on the non-empty line above it."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        assert end is not None, f"{page.relative_to(REPO)}:{i + 1}: a code block that is never closed"
        above = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        mark = MARK.match(above)
        text = "\n".join(lines[i + 1 : end]) + "\n"
        found.append(Block(page, i + 1, opening.group(1), text, (mark.group(1), mark.group(2)) if mark else None))
        i = end + 1
    return found


BLOCKS = [b for page in PAGES for b in code_blocks(page)]
YAML_BLOCKS = [b for b in BLOCKS if b.lang == "yaml"]
SHELL_BLOCKS = [b for b in BLOCKS if b.lang in ("bash", "console", "sh")]


def is_sweep(doc: Any) -> bool:
    return isinstance(doc, dict) and "name" in doc and "stages" in doc


def contained(part: Any, whole: Any) -> bool:
    """Every key and value of ``part`` is in ``whole``: mappings by key, each list item in some item of the list."""
    if isinstance(part, dict):
        return isinstance(whole, dict) and all(k in whole and contained(v, whole[k]) for k, v in part.items())
    if isinstance(part, list):
        return isinstance(whole, list) and all(any(contained(p, w) for w in whole) for p in part)
    return part == whole


def nodes(doc: Any) -> Iterator[Any]:
    """``doc`` and every mapping, list and value inside it."""
    yield doc
    children = doc.values() if isinstance(doc, dict) else doc if isinstance(doc, list) else ()
    for child in children:
        yield from nodes(child)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder as the README describes it: ``sweeps/`` for the files under test and ``my_kappa/``
    beside it, a CGCNN-style folder (one CIF per id, ``id_prop.csv``) written from real L96 structures."""
    root = tmp_path_factory.mktemp("project")
    (root / "sweeps").mkdir()
    folder = root / "my_kappa"
    folder.mkdir()
    rows = []
    for record in read("l96").records[:40]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parse_structure(record.fmt, record.payload).to(filename=str(folder / f"{record.id}.cif"), fmt="cif")
        rows.append(f"{record.id},{record.target!r}")
    (folder / datasets.ID_PROP).write_text("\n".join(rows) + "\n")
    return root


def dry_run(project: Path, name: str, text: str, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    """``ltc sweep sweeps/NAME --dry-run`` of ``text`` in ``project``, in this process; its output."""
    path = project / "sweeps" / name
    path.write_text(text)
    capsys.readouterr()
    code = main(["sweep", str(path), "--dry-run", "--results", str(project / "results"), *extra])
    out, err = capsys.readouterr()
    assert code == 0, f"ltc sweep {name} --dry-run exited {code}: {err.strip()}"
    return out


def test_pages_have_yaml_to_check() -> None:
    """The checks below are not vacuous: the README shows a whole sweep file and a fragment of another."""
    marks = {b.mark[0] for b in YAML_BLOCKS if b.page == README and b.mark}
    assert marks == {"file", "fragment of"}, marks
    assert len(SHELL_BLOCKS) >= 10


def test_readme_is_short_enough() -> None:
    n = len(README.read_text().splitlines())
    assert n < README_MAX_LINES, f"README.md has {n} lines; move detail into docs/ (target: under {README_MAX_LINES})"


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=str)
def test_yaml_block_is_what_the_repository_runs(block: Block, project: Path, capsys: pytest.CaptureFixture[str]):
    doc = yaml.safe_load(block.text)
    if block.mark is None:
        above = block.page.read_text().splitlines()[: block.line - 1]
        claim = next((line for line in reversed(above) if line.strip()), "")
        assert not re.search(r"\.ya?ml`?:$", claim.strip()), f"{block}: names a file above it; mark it <!-- file … -->"
        assert is_sweep(doc), f"{block}: neither a whole sweep file nor marked <!-- fragment of sweeps/NAME.yaml -->"
        out = dry_run(project, f"block_{block.page.stem}_{block.line}.yaml", block.text, capsys)
        assert f"sweep {doc['name']}" in out and "\ntotal: " in out
        return

    kind, target = block.mark
    file = REPO / target
    assert file.is_file(), f"{block}: marked as {kind} {target}, which does not exist"
    if kind == "file":
        lines, shown = file.read_text().splitlines(), block.text.splitlines()
        assert any(lines[i : i + len(shown)] == shown for i in range(len(lines) - len(shown) + 1)), (
            f"{block}: is not {target} as it stands (its lines must be lines of the file, in order)"
        )
        if is_sweep(doc):
            out = dry_run(project, file.name, block.text, capsys)
            assert f"sweep {doc['name']}" in out
        return
    whole = yaml.safe_load(file.read_text())
    assert isinstance(doc, (dict, list)) and doc, f"{block}: an empty fragment"
    assert any(contained(doc, node) for node in nodes(whole)), f"{block}: has keys or values that {target} lacks"
    if is_sweep(whole):  # the file the fragment comes from runs as the README says
        dry_run(project, file.name, file.read_text(), capsys)


def shell_commands(block: Block) -> Iterator[str]:
    """The command lines of a shell block: continuations joined, a console's ``$ `` prompt and leading
    ``VAR=value`` assignments dropped."""
    pending = ""
    for raw in block.text.splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if block.lang == "console":
            if not line.startswith("$ "):
                continue  # output
            line = line[2:]
        while ENV_ASSIGNMENT.match(line):
            line = ENV_ASSIGNMENT.sub("", line, count=1)
        yield line


LTC_COMMANDS = [
    pytest.param(command, id=f"{block}:{command[:60]}")
    for block in SHELL_BLOCKS
    for command in shell_commands(block)
    if command.startswith("ltc ") and not re.search(r"<[^>]+>", command)  # <cell> and the like: a placeholder
]


def test_readme_has_commands_to_check() -> None:
    readme = [b for b in SHELL_BLOCKS if b.page == README]
    assert sum(c.startswith("ltc ") for b in readme for c in shell_commands(b)) >= 20


@pytest.mark.parametrize("command", LTC_COMMANDS)
def test_ltc_command_parses(command: str) -> None:
    argv = shlex.split(command, comments=True)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`{command}` does not parse (argparse exited {exc.code})")
    assert args.command == argv[0]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but '-' and '_' dropped, spaces as '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # a '#' in code is no heading
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_paths_the_readme_names_exist() -> None:
    text = README.read_text()
    named = set(re.findall(r"\b((?:sweeps/[\w.-]+\.yaml)|(?:docs/[\w.-]+\.md))\b", text))
    assert {"sweeps/quickstart.yaml", "docs/cluster.md", "docs/testing.md"} <= named
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert not missing, f"README.md names files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        lost_anchor = bool(anchor) and file.suffix == ".md" and file.exists() and anchor not in anchors(file)
        if not file.exists() or lost_anchor:
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: links that lead nowhere: {broken}"


def test_quickstart_plan_is_as_the_readme_says(capsys: pytest.CaptureFixture[str]) -> None:
    """README: the quickstart is 31 settings and 62 trials; its smoke run keeps the 5 folds (1 repeat), PT->FT
    and scratch each: 10 fine-tuning settings."""
    readme = README.read_text()
    quickstart = str(REPO / "sweeps" / "quickstart.yaml")
    assert main(["sweep", quickstart, "--dry-run"]) == 0
    out = capsys.readouterr().out
    total = re.search(r"^total: (\d+) settings, (\d+) trials$", out, flags=re.M)
    assert total is not None, out
    assert f"{total.group(1)} settings, {total.group(2)} trials" in readme
    assert main(["sweep", quickstart, "--dry-run", "--smoke"]) == 0
    out = capsys.readouterr().out
    assert "sweep quickstart-smoke" in out
    assert "stage finetune [from pretrain (best)]: 10 settings (5 finetune, 5 scratch) x 1 trials" in out
    assert "smoke run has 10 FT settings" in " ".join(readme.split())
