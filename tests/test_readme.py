"""The README's commands work as written (issue 6): every command in it is run here."""

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def bash_commands() -> list[str]:
    return [line.strip() for block in blocks("bash") for line in block.splitlines() if line.strip()]


def minikv_argv(command: str) -> list[str]:
    """`minikv ...` as argv; through the console script when installed, else `python -m minikv`."""
    words = shlex.split(command)
    assert words[0] == "minikv"
    exe = shutil.which("minikv")
    return ([exe] if exe else [sys.executable, "-m", "minikv"]) + words[1:]


def test_the_two_setup_commands_are_there():
    commands = bash_commands()
    assert commands[0].startswith("pip install -e . && minikv generate ")
    assert commands[1] == 'pip install -e ".[test]" && python -m pytest -q'


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert bash_commands()[1] in ci


def test_every_pip_extra_named_in_the_readme_exists():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in re.findall(r'pip install -e "\.\[([\w-]+)\]"', README):
        assert name in extras, name
    assert "cuda-sim" in extras


@pytest.mark.parametrize("command", [c for c in bash_commands() if "minikv " in c])
def test_minikv_commands_run(command):
    command = command.split("&&")[-1].strip()   # the install step is what we are running under
    result = subprocess.run(minikv_argv(command), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    if " generate " in f" {command} ":
        prompt = shlex.split(command)[2]
        assert result.stdout.startswith(prompt)
        assert len(result.stdout) > len(prompt) + 20          # it generated text
        assert "decode" in result.stderr and "tokens/s" in result.stderr   # the stats line


def test_the_tour_runs(capsys):
    (tour,) = [b for b in blocks("python") if "minikv.load()" in b]
    exec(compile(tour, "README tour", "exec"), {})
    printed = capsys.readouterr().out
    assert "Transformer" in printed and "tokens/s" in printed


def test_the_chat_section_uses_names_that_exist():
    """The chat/Hub examples need a download, so they are not run here; their names are checked."""
    from minikv.cli import build_parser

    (snippet,) = [b for b in blocks("python") if "apply_chat_template" in b]
    import minikv
    for name in ("load", "Transformer"):
        assert hasattr(minikv, name)
    for method in re.findall(r"model\.(\w+)\(", snippet):
        assert hasattr(minikv.Transformer, method), method
    commands = re.findall(r"`(minikv chat [^`]*)`", README)
    assert commands
    for command in commands:
        build_parser().parse_args(shlex.split(command)[1:])      # exits on an unknown option
