"""Fuzz hostile files in a child process with a memory cap and a timeout (issue 18).

tests/hostile_fuzz.py mutates real checkpoint folders, safetensors headers, config values and saved
caches with hypothesis; every example must load and run or raise a MinikvError. It runs in a child
process limited to 2 GiB of address space and a wall-clock timeout, so that an unbounded allocation,
a hang (a FIFO opened for reading) or a segfault (a kernel indexing outside its pool) fails this test
instead of taking the suite down. Bounded: derandomized, a few dozen examples, seconds.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("hostile_fuzz.py")
ROOT = WORKER.parents[1]


@pytest.mark.parametrize("target, examples", [("checkpoint", 120), ("cache", 120)])
def test_hostile_files_give_success_or_a_minikv_error(target, examples):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        result = subprocess.run([sys.executable, str(WORKER), target, str(examples)], capture_output=True, text=True,
                                timeout=150, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the {target} fuzz hung (no result after {exc.timeout} s): {exc.stdout!r:.2000}")
    assert result.returncode == 0, (
        f"the {target} fuzz failed with exit status {result.returncode} (negative: killed by that signal, "
        f"e.g. -11 = segfault)\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    )
    assert f"{target}: {examples} examples" in result.stdout
