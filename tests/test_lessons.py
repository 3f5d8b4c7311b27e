"""The lesson notebooks: committed clean, generated from their sources, and executed green.

Every notebook in lessons/ is executed top to bottom in a fresh python3 kernel (nbclient), with the
working directory set to lessons/ as it is when a reader opens it in Jupyter. A cell that raises
fails the test, and so does a notebook that runs past its time budget (300 s; they take well under
a minute each). After execution each notebook must have shown at least one plot or measured table.

Exercises ship as stubs (minikv/exercises.py, lessons/README.md): executed as shipped, every lesson
prints "exercise N: not solved yet" for each of its exercises; built with lessons/solutions/ in
place of the stubs, every one prints "exercise N: correct"; and a deliberately wrong answer makes
the check raise WrongAnswer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import linecache
import math
import os
import re
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from minikv.exercises import WrongAnswer, check

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


def load_build():
    spec = importlib.util.spec_from_file_location("lessons_build", LESSONS / "_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


build = load_build()


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
    sources = sorted(build.SOURCES.glob("[0-9][0-9]_*.py"))
    assert [s.stem for s in sources] == EXPECTED
    for source in sources:
        committed = build.notebook_path(source).read_text(encoding="utf-8")
        assert committed == build.render(build.build_notebook(source)), (
            f"{source.stem}.ipynb is out of date with lessons/src/{source.name}: run python lessons/_build.py"
        )


@pytest.mark.parametrize("name", EXPECTED)
def test_lessons_read_no_data_from_the_test_suite(name):
    """tests/ exists only in a clone; a lesson's data ships with the package or is made by the lesson."""
    source = (build.SOURCES / f"{name}.py").read_text(encoding="utf-8")
    assert "tests/" not in source.replace("tests/test_", ""), f"{name} reads from tests/"


def test_shipped_hf_examples_are_the_test_fixtures():
    """minikv/data/hf-examples/* are copies of fixtures the conformance tests check against transformers."""
    examples = ROOT / "minikv" / "data" / "hf-examples"
    folders = sorted(p for p in examples.iterdir() if p.is_dir())
    assert [p.name for p in folders] == ["gpt2", "llama_gqa", "mistral_window", "t5_v1_1"]
    for folder in folders:
        kind = "seq2seq" if folder.name.startswith("t5") else "hf"
        fixture = ROOT / "tests" / "fixtures" / kind / folder.name
        names = sorted(p.name for p in folder.iterdir())
        assert names == sorted(p.name for p in fixture.iterdir())
        for file_name in names:
            assert (folder / file_name).read_bytes() == (fixture / file_name).read_bytes(), (folder.name, file_name)


def exercise_numbers(name: str) -> list[int]:
    return [number for number, _, _ in build.stub_regions((build.SOURCES / f"{name}.py").read_text(encoding="utf-8"))]


@pytest.mark.parametrize("name", EXPECTED)
def test_every_exercise_has_a_stub_a_check_and_a_solution(name):
    source = (build.SOURCES / f"{name}.py").read_text(encoding="utf-8")
    numbers = exercise_numbers(name)
    assert numbers and numbers == list(range(1, len(numbers) + 1)), f"{name}: exercises numbered {numbers}"
    solutions = build.parse_solutions((build.SOLUTIONS / f"{name}.py").read_text(encoding="utf-8"))
    assert sorted(solutions) == numbers, f"{name}: stubs for {numbers}, solutions for {sorted(solutions)}"
    lines = source.splitlines()
    for number, start, end in build.stub_regions(source):
        stub = "\n".join(lines[start + 1:end])
        # A stub is an answer left as `...` or a function that raises NotImplementedError, never a solution.
        assert "= ..." in stub or "raise NotImplementedError" in stub, f"{name}: exercise {number} ships solved"
        assert solutions[number].strip() and solutions[number].strip() != stub.strip()


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


def execute(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
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


def printed(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream")


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_executes_as_shipped(name):
    nb = execute(read(LESSONS / f"{name}.ipynb"))
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    assert any(is_plot_or_table(o) for o in outputs), f"{name} showed no plot and no table"
    text = printed(nb)
    for number in exercise_numbers(name):
        assert re.search(rf"^exercise {number}: not solved yet", text, re.M), f"{name}: exercise {number} said {text[-300:]!r}"
    assert not re.search(r"^exercise \d+: correct", text, re.M), f"{name}: a stub passed its check"


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_executes_with_the_solutions(name):
    nb = execute(build.build_notebook(build.SOURCES / f"{name}.py", solved=True))
    text = printed(nb)
    for number in exercise_numbers(name):
        assert re.search(rf"^exercise {number}: correct", text, re.M), f"{name}: exercise {number} not correct"
    assert "not solved yet" not in text


# --- the checker itself -------------------------------------------------------------------------------

def run_check(number, answers, body):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        with check(number, *answers) as exercise:
            body(exercise)
    return out.getvalue().strip()


def test_check_says_not_solved_for_a_stub_and_correct_for_an_answer():
    def body(_):
        assert answer * 2 == 4

    answer = ...
    assert run_check(1, [answer], body) == "exercise 1: not solved yet"       # the TypeError is swallowed
    answer = 2
    assert run_check(1, [answer], body) == "exercise 1: correct"

    def stub(x):
        raise NotImplementedError("exercise 2: write me")

    assert run_check(2, [stub], lambda _: stub(1)) == "exercise 2: not solved yet"
    assert run_check(3, [1, ...], lambda _: None) == "exercise 3: not solved yet (answer 2 of 2 is still `...`)"

    def noted(exercise):
        exercise.note = "42 bytes"

    assert run_check(4, [42], noted) == "exercise 4: correct: 42 bytes"


def test_check_rejects_a_wrong_answer():
    def body(_):
        assert answer == 89, "float32 overflows at exp(89)"

    answer = 88
    with pytest.raises(WrongAnswer, match=r"exercise 5: not correct yet; this check failed: .*answer == 89"):
        run_check(5, [answer], body)

    def broken(_):
        raise ValueError("shapes (3,) and (4,) not aligned")

    with pytest.raises(WrongAnswer, match="exercise 6: not correct yet; your answer raised ValueError: shapes"):
        run_check(6, [np.zeros(3)], broken)


def exercise_cell(name: str, number: int, replacement: str) -> str:
    """The code of exercise `number`'s cell of lesson `name`, its stub replaced by `replacement`."""
    source = (build.SOURCES / f"{name}.py").read_text(encoding="utf-8")
    solutions = build.parse_solutions((build.SOLUTIONS / f"{name}.py").read_text(encoding="utf-8"))
    solved = build.solve(source, {**solutions, number: replacement})
    return next(code for kind, code in build.parse_cells(solved) if kind == "code" and f"check({number}," in code)


@pytest.mark.parametrize("name, number, wrong", [
    ("01_attention_and_softmax", 3, "first_inf_32, first_inf_64 = 88, 709   # off by one"),
    ("05_batching_paging_sliding", 1, "one_batch, two_batches = 125 / 300, 0.5   # used, not padding"),
])
def test_a_lesson_check_rejects_a_deliberately_wrong_answer(name, number, wrong):
    """Run one self-contained exercise cell of a real lesson with the solution, then with a wrong answer."""
    solution = build.parse_solutions((build.SOLUTIONS / f"{name}.py").read_text(encoding="utf-8"))[number]
    namespace = {"np": np, "math": math, "check": check}

    def run(code: str) -> str:
        # Register the cell's text as IPython does, so the failure can quote the failing line.
        filename = f"<{name} exercise {number}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, filename, "exec"), dict(namespace))
        return out.getvalue()

    assert run(exercise_cell(name, number, solution)).startswith(f"exercise {number}: correct")
    with pytest.raises(WrongAnswer, match=f"exercise {number}: not correct yet; this check failed: assert"):
        run(exercise_cell(name, number, wrong))
