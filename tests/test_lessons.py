"""The lesson notebooks: committed clean, generated from their sources, and executed green.

Every notebook in lessons/ is executed top to bottom in a fresh python3 kernel (nbclient), with the
working directory set to lessons/ as it is when a reader opens it in Jupyter. A cell that raises
fails the test, and so does a notebook that runs past its time budget (300 s; they take well under
a minute each). After execution each notebook must have shown at least one plot or measured table,
and its exercises must be checked by asserts.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
LESSONS = ROOT / "lessons"
EXPECTED = [
    "01_attention_and_softmax",
    "02_rope",
    "03_kv_cache",
    "04_generation_and_sampling",
    "05_batching_paging_sliding",
    "06_flash_decoding_and_gpu",
    "07_real_checkpoints",
    "08_encoder_decoder",
    "09_serving",
    "10_speculative_decoding",
    "11_quantization",
]
NOTEBOOK_BUDGET_S = 300


def notebook_paths() -> list[Path]:
    return sorted(LESSONS.glob("[0-9][0-9]_*.ipynb"))


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(str(path), as_version=4)


def test_every_lesson_exists():
    # Parametrising over whatever files exist would silently test nothing if one went missing.
    assert [p.stem for p in notebook_paths()] == EXPECTED
    readme = (LESSONS / "README.md").read_text(encoding="utf-8")
    for name in EXPECTED:
        assert f"{name}.ipynb" in readme, f"lessons/README.md does not mention {name}.ipynb"


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_notebook_has_no_outputs(name):
    nb = read(LESSONS / f"{name}.ipynb")
    nbformat.validate(nb)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells, f"{name} has no code"
    for index, cell in enumerate(code_cells):
        assert cell.outputs == [], f"{name}: code cell {index} was committed with outputs (strip them)"
        assert cell.execution_count is None, f"{name}: code cell {index} has an execution_count"


def test_notebooks_are_built_from_their_sources():
    """lessons/src/*.py are what reviewers read; the .ipynb must be exactly what _build.py makes of them."""
    spec = importlib.util.spec_from_file_location("lessons_build", LESSONS / "_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    sources = sorted(build.SOURCES.glob("[0-9][0-9]_*.py"))
    assert [s.stem for s in sources] == EXPECTED
    for source in sources:
        committed = build.notebook_path(source).read_text(encoding="utf-8")
        assert committed == build.render(build.build_notebook(source)), (
            f"{source.stem}.ipynb is out of date with lessons/src/{source.name}: run python lessons/_build.py"
        )


def has_exercise_assert(nb: nbformat.NotebookNode) -> bool:
    """A code cell containing an assert, after a markdown cell that states an exercise."""
    seen_exercise = False
    for cell in nb.cells:
        if cell.cell_type == "markdown" and "exercise" in cell.source.lower():
            seen_exercise = True
        elif cell.cell_type == "code" and seen_exercise:
            if any(line.strip().startswith("assert ") for line in cell.source.splitlines()):
                return True
    return False


@pytest.mark.parametrize("name", EXPECTED)
def test_exercises_are_checked_by_asserts(name):
    assert has_exercise_assert(read(LESSONS / f"{name}.ipynb")), f"{name}: no assert after an Exercise cell"


def is_plot_or_table(output) -> bool:
    data = output.get("data", {})
    if "image/png" in data or "image/svg+xml" in data:
        return True
    if "<table" in data.get("text/html", ""):
        return True
    text = output.get("text", "") if output.get("output_type") == "stream" else data.get("text/plain", "")
    lines = text.splitlines()
    # A printed markdown table: a |---|---| rule under its header.
    return any(set(line.replace(" ", "")) <= set("|-:") and line.count("|") >= 3 and "---" in line
               for line in lines)


def execute(path: Path) -> nbformat.NotebookNode:
    nb = read(path)
    deadline = time.monotonic() + NOTEBOOK_BUDGET_S

    def remaining(cell) -> int:
        # nbclient's timeout is per cell; handing each cell what is left makes it a per-notebook budget.
        return max(1, int(deadline - time.monotonic()))

    client = NotebookClient(nb, kernel_name="python3", timeout_func=remaining,
                            resources={"metadata": {"path": str(LESSONS)}})
    client.execute()   # raises CellExecutionError (with the cell and traceback) on any error
    return nb


@pytest.fixture(autouse=True)
def repo_on_kernel_path(monkeypatch):
    # The kernel is a subprocess started in lessons/; make `import minikv` work without an install.
    existing = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + (os.pathsep + existing if existing else ""))


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_executes(name):
    nb = execute(LESSONS / f"{name}.ipynb")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    assert any(is_plot_or_table(o) for o in outputs), f"{name} showed no plot and no table"
