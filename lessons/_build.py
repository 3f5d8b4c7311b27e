#!/usr/bin/env python
"""Build the lesson notebooks (``lessons/*.ipynb``) from their sources (``lessons/src/*.py``).

Each source is a plain Python file in the "percent" format that editors (VS Code, PyCharm,
Spyder, jupytext) understand: a line ``# %%`` starts a code cell, a line ``# %% [markdown]``
starts a markdown cell whose lines are comments (``# `` is stripped). Sources are what you review
and edit; the notebooks are generated from them, with no outputs (they are executed by
``tests/test_lessons.py``, and by you in Jupyter).

    python lessons/_build.py            # rebuild every notebook
    python lessons/_build.py --check    # exit 1 if a notebook differs from its source
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

LESSONS = Path(__file__).resolve().parent
SOURCES = LESSONS / "src"

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


def build_notebook(source: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    for index, (kind, text) in enumerate(parse_cells(source.read_text(encoding="utf-8"))):
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
    if stale:
        print("out of date (run python lessons/_build.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
