#!/usr/bin/env python
"""Build the lesson notebooks (``lessons/*.ipynb``) from their sources (``lessons/src/*.py``).

Each source is a plain Python file in the "percent" format that editors (VS Code, PyCharm,
Spyder, jupytext) understand: a line ``# %%`` starts a code cell, a line ``# %% [markdown]``
starts a markdown cell whose lines are comments (``# `` is stripped). Sources are what you review
and edit; the notebooks are generated from them, with no outputs (they are executed by
``tests/test_lessons.py``, and by you in Jupyter).

Exercises ship as stubs. Each exercise cell has a region between a line ``# --- your solution ---``
and a line ``# --- check ---`` (the stub), then ``with check(N, answers...):`` and its asserts (see
``minikv/exercises.py``). ``lessons/solutions/<lesson>.py`` holds, for each exercise, a block
``# %% exercise N`` with the lines that replace the stub; ``--solved`` builds the notebooks with
the solutions in place (into ``lessons/solutions/``, not committed).

    python lessons/_build.py            # rebuild every notebook
    python lessons/_build.py --check    # exit 1 if a notebook differs from its source
    python lessons/_build.py --solved   # also write lessons/solutions/<lesson>.ipynb, solved
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

LESSONS = Path(__file__).resolve().parent
SOURCES = LESSONS / "src"
SOLUTIONS = LESSONS / "solutions"
STUB_START, STUB_END = "# --- your solution ---", "# --- check ---"

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def parse_cells(text: str) -> list[tuple[str, str]]:
    """Split a percent-format source into [(kind, source)], kind "code" or "markdown"."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            kind = "markdown" if "[markdown]" in line else "code"
            cells.append((kind, []))
            continue
        if not cells:
            continue  # a header before the first cell (e.g. a docstring for editors) is not part of the lesson
        kind, lines = cells[-1]
        if kind == "markdown":
            if line.startswith("# "):
                line = line[2:]
            elif line.startswith("#"):
                line = line[1:]
        lines.append(line)
    out = []
    for kind, lines in cells:
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        if lines:
            out.append((kind, "\n".join(lines)))
    return out


def parse_solutions(text: str) -> dict[int, str]:
    """Split a solutions file into {exercise number: the lines that replace its stub}."""
    blocks: dict[int, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("# %% exercise "):
            current = int(line.split()[-1])
            if current in blocks:
                raise ValueError(f"exercise {current} appears twice")
            blocks[current] = []
        elif current is not None:
            blocks[current].append(line)
    return {number: "\n".join(lines).strip("\n") for number, lines in blocks.items()}


def stub_regions(text: str) -> list[tuple[int, int, int]]:
    """[(exercise number, index of the STUB_START line, index of the STUB_END line)], in order.

    The number is read from the ``check(N`` call that follows STUB_END, so a solution can never be
    put in the wrong exercise's place.
    """
    lines = text.splitlines()
    regions = []
    start = None
    for index, line in enumerate(lines):
        if line.strip() == STUB_START:
            start = index
        elif line.strip() == STUB_END:
            if start is None:
                raise ValueError(f"line {index + 1}: {STUB_END!r} without a {STUB_START!r} before it")
            follow = "\n".join(lines[index + 1:index + 4])
            marker = follow.find("check(")
            if marker < 0:
                raise ValueError(f"line {index + 1}: no `with check(N, ...)` right after {STUB_END!r}")
            number = int(follow[marker + len("check("):].split(",")[0].split(")")[0])
            regions.append((number, start, index))
            start = None
    return regions


def solve(text: str, solutions: dict[int, str]) -> str:
    """The source with every stub replaced by its solution (every exercise must have exactly one)."""
    regions = stub_regions(text)
    numbers = [number for number, _, _ in regions]
    if sorted(numbers) != sorted(solutions):
        raise ValueError(f"stubs for exercises {numbers}, solutions for {sorted(solutions)}")
    lines = text.splitlines()
    for number, start, end in reversed(regions):
        lines[start + 1:end] = solutions[number].splitlines()
    return "\n".join(lines) + "\n"


def solutions_path(source: Path) -> Path:
    return SOLUTIONS / source.name


def build_notebook(source: Path, solved: bool = False) -> nbformat.NotebookNode:
    text = source.read_text(encoding="utf-8")
    if solved:
        text = solve(text, parse_solutions(solutions_path(source).read_text(encoding="utf-8")))
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    for index, (kind, text) in enumerate(parse_cells(text)):
        if kind == "markdown":
            cell = nbformat.v4.new_markdown_cell(text)
        else:
            cell = nbformat.v4.new_code_cell(text)  # outputs [], execution_count None
        cell["id"] = f"{source.stem[:2]}-{index:03d}"  # stable ids: rebuilding gives identical files
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def notebook_path(source: Path) -> Path:
    return LESSONS / (source.stem + ".ipynb")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the notebooks are up to date")
    parser.add_argument("--solved", action="store_true",
                        help="also write the solved notebooks to lessons/solutions/ (not committed)")
    args = parser.parse_args(argv)
    stale = []
    for source in sorted(SOURCES.glob("[0-9][0-9]_*.py")):
        text = render(build_notebook(source))
        target = notebook_path(source)
        if args.check:
            if not target.exists() or target.read_text(encoding="utf-8") != text:
                stale.append(target.name)
        else:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target.relative_to(LESSONS.parent)}")
        if args.solved and solutions_path(source).exists():
            solved = SOLUTIONS / (source.stem + ".ipynb")
            solved.write_text(render(build_notebook(source, solved=True)), encoding="utf-8")
            print(f"wrote {solved.relative_to(LESSONS.parent)}")
    if stale:
        print("out of date (run python lessons/_build.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
