"""Hub ids: ``minikv.load("Org/name")`` reads the local Hugging Face cache (no network here).

The cache is faked in tmp_path with huggingface_hub's layout (``models--Org--name/snapshots/<commit>/``
holding symlinks into ``blobs/``, ``refs/main`` naming the commit), and the loads run in a subprocess
because huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE / HF_ENDPOINT when it is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import minikv
from minikv.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "chat" / "chatml"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for file in folder.iterdir():
        if file.name == "expected.json":
            continue
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def run(code: str, cache: Path, **env):
    environment = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf_home"),
                   "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=environment)


def test_a_hub_id_loads_from_the_local_cache_offline(tmp_path):
    snapshot = fake_hub_cache(tmp_path / "hub", "Org/tiny-chat", FIXTURE)
    expected = json.loads((FIXTURE / "expected.json").read_text())["chat"][0]
    code = ("import json, minikv; m = minikv.load('Org/tiny-chat', dtype='float64'); "
            "print(m.source); print(json.dumps(m.apply_chat_template(%r, add_generation_prompt=True)))"
            % (expected["messages"],))
    result = run(code, tmp_path / "hub", HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    source, ids = result.stdout.strip().splitlines()
    assert Path(source) == snapshot
    assert json.loads(ids) == expected["ids"]


def test_the_cli_takes_a_hub_id(tmp_path):
    fake_hub_cache(tmp_path / "hub", "Org/tiny-chat", FIXTURE)
    result = run("from minikv.cli import main; raise SystemExit(main(['info', '--model', 'Org/tiny-chat']))",
                 tmp_path / "hub", HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert "snapshots" in result.stdout and "llama" in result.stdout


def test_not_cached_and_offline_names_both_ways(tmp_path):
    (tmp_path / "hub").mkdir()
    result = run("import minikv; minikv.load('Org/missing')", tmp_path / "hub", HF_HUB_OFFLINE="1")
    assert result.returncode != 0
    assert "CheckpointError" in result.stderr
    for needle in ("Org/missing", "local Hugging Face cache", "HF_HUB_OFFLINE=1", "hf download Org/missing",
                   "checkpoint folder"):
        assert needle in result.stderr


def test_not_cached_and_the_download_failing_names_both_ways(tmp_path):
    (tmp_path / "hub").mkdir()
    # A closed local port stands in for "no network": the download fails at once.
    result = run("import minikv; minikv.load('Org/missing')", tmp_path / "hub", HF_HUB_OFFLINE="0",
                 HF_ENDPOINT="http://127.0.0.1:9")
    assert result.returncode != 0
    assert "CheckpointError" in result.stderr and "downloading it failed" in result.stderr
    assert "hf download Org/missing" in result.stderr
    (line,) = [l for l in result.stderr.splitlines() if l.startswith("minikv.errors.CheckpointError")]
    assert "Connection refused" in line or "ConnectError" in line      # the cause, on the same line


def test_without_huggingface_hub_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)        # import fails as if not installed
    with pytest.raises(CheckpointError, match=r"pip install 'minikv\[hub\]'.*checkpoint folder"):
        minikv.load("Org/not-a-folder")


def test_a_path_that_is_not_a_hub_id_stays_a_folder_error():
    with pytest.raises(CheckpointError, match="not a folder"):
        minikv.load("no/such/folder/here")
