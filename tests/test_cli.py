"""The command line: generate streams text then a stats line; bad input is one line on stderr, exit 2."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "hf" / "llama_gqa"


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "minikv", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_generate_streams_text_and_stats():
    result = run("generate", "Once upon a time", "--max-new-tokens", "30", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Once upon a time")
    assert len(result.stdout.strip()) > len("Once upon a time")
    (stats,) = result.stderr.strip().splitlines()
    assert "prefill" in stats and "tokens/s" in stats and "static" in stats


def test_generate_greedy_is_repeatable_and_seeded_sampling_too():
    first = run("generate", "The ", "--max-new-tokens", "20", "--temperature", "0.9", "--seed", "3")
    second = run("generate", "The ", "--max-new-tokens", "20", "--temperature", "0.9", "--seed", "3")
    assert first.returncode == 0 and first.stdout == second.stdout


@pytest.mark.parametrize("cache", ["none", "concat", "static", "paged", "sliding"])
def test_generate_every_cache_kind_gives_the_same_greedy_text(cache):
    result = run("generate", "Hello", "--max-new-tokens", "12", "--temperature", "0", "--cache", cache)
    reference = run("generate", "Hello", "--max-new-tokens", "12", "--temperature", "0", "--cache", "none")
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference.stdout
    assert cache in result.stderr


def test_info_reports_config_size_and_backends():
    result = run("info")
    assert result.returncode == 0, result.stderr
    for word in ("layers", "parameters", "bytes per token", "backends", "numpy"):
        assert word in result.stdout


def test_info_on_a_fixture_checkpoint():
    result = run("info", "--model", str(FIXTURE))
    assert result.returncode == 0, result.stderr
    # 2 (K and V) * 2 layers * 2 kv heads * head_dim 8 * 4 bytes
    assert "256 bytes per token" in result.stdout


def test_bench_prints_a_table_with_every_cache_kind():
    result = run("bench", "--max-new-tokens", "8", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    for kind in ("none", "concat", "static", "paged", "sliding"):
        assert kind in result.stdout
    assert "same tokens with every cache kind: yes" in result.stdout


@pytest.mark.parametrize("args, needle", [
    (["generate", "x", "--model", "/no/such/folder"], "/no/such/folder"),
    (["generate", "x", "--cache", "bogus"], "bogus"),
    (["generate", "x", "--temperature", "-1"], "-1"),
    (["generate", "x", "--top-p", "1.5"], "1.5"),
    (["generate", "x", "--max-new-tokens", "0"], "0"),
    (["generate", "x", "--max-new-tokens", "many"], "many"),
    (["generate", "x", "--backend", "nonsense"], "nonsense"),
    (["generate", "x", "--backend", "cuda"], "cuda"),
    (["generate", "x" * 600, "--max-new-tokens", "10"], "position"),
    (["info", "--model", str(ROOT / "README.md")], "README.md"),
    (["frobnicate"], "frobnicate"),
])
def test_bad_input_is_one_clear_line_and_a_nonzero_exit(args, needle):
    result = run(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
