"""Smoke test of the benchmark suite: ``python -m benchmarks --quick`` produces every table, and the
token-equality checks inside it pass.

The suite runs in a subprocess (tiny sizes, one repeat). This test never imports torch: when
torch or transformers is missing the run is told ``--no-peer``; when they are installed the
subprocess also runs the Hugging Face peer and its tokens must equal minikv's (float64).
Timings are written, never asserted.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OWN_TABLES = ["decode", "roofline", "caches", "prefill", "gpu"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    peer = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)] + ([] if peer else ["--no-peer"])
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"benchmarks failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out, peer


def _json(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_every_table_is_written_with_its_machine(quick_run):
    out, _ = quick_run
    for name in OWN_TABLES:
        assert (out / f"{name}.md").read_text().startswith("## "), name
        report = _json(out, name)
        assert report["quick"] is True
        assert report["machine"]["cores"] >= 1 and report["machine"]["numpy"]
    if (REPO / "benchmarks" / "attention.py").exists():
        assert (out / "attention.md").exists()
    combined = (out / "README_TABLES.md").read_text()
    for heading in ("Decode tokens/s", "Roofline", "KV cache kinds", "Prefill", "GPU"):
        assert heading in combined, heading
    if importlib.util.find_spec("matplotlib") is not None:
        for plot in ("caches.png", "prefill.png"):
            assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot


def test_decode_tokens_agree_with_every_engine_in_float64(quick_run):
    out, peer = quick_run
    decode = _json(out, "decode")
    assert decode["peer"] == peer
    assert decode["all_float64_checks_equal"] is True
    for row in decode["rows"]:
        checks = row["float64_tokens_vs_minikv_numpy"]
        if peer:
            # the peer really ran, and its greedy tokens equal minikv's
            assert {"transformers dynamic", "transformers static"} <= set(checks)
            assert row["ratio_numpy_vs_best_transformers"] > 0
        assert all(c["equal"] and c["first_difference"] is None for c in checks.values()), checks
        assert row["engines"]["minikv numpy"]["decode_tokens_per_s"] > 0


def test_every_cache_kind_gives_recompute_tokens_and_concat_copies_more_as_it_grows(quick_run):
    out, _ = quick_run
    caches = _json(out, "caches")
    assert caches["all_float64_checks_equal"] is True
    assert set(caches["float64_check"]) == {"concat", "static", "paged", "sliding"}
    copied = [row["kinds"]["concat"]["bytes_copied_total"] for row in caches["rows"]]
    # concat copies the whole cache every step: the total grows faster than the number of steps
    assert all(b > a for a, b in zip(copied, copied[1:])), copied
    for row in caches["rows"]:
        assert row["kinds"]["none"]["cache_bytes_at_end"] == 0
        for kind in ("concat", "static", "paged", "sliding"):
            assert row["kinds"][kind]["speedup_over_none"] > 0


def test_prefill_algorithms_agree_and_roofline_has_a_bandwidth(quick_run):
    out, _ = quick_run
    prefill = _json(out, "prefill")
    for row in prefill["rows"]:
        assert row["max_abs_logit_difference"] < 1e-3     # float32: naive and tiled compute the same function
        assert row["algorithms"]["naive"]["peak_bytes"] > 0
    roofline = _json(out, "roofline")
    assert roofline["all_core_GBps"] > 0 and roofline["single_thread_GBps"] > 0
    for row in roofline["rows"]:
        assert row["step_bytes"] > row["weight_bytes"] > 0


def test_decode_step_bytes_count_exactly_the_weights_a_step_reads(tmp_path):
    """The roofline's numerator: every weight of the checkpoint except the embedding table, of which a
    step reads one row (small's lm_head is untied, so it is counted as its own matrix)."""
    import minikv
    from benchmarks.common import SMALL, decode_weight_bytes, kv_bytes_per_position, make_checkpoint

    model = minikv.load(make_checkpoint("small", tmp_path))
    assert not model.config.tie_word_embeddings
    expected = sum(w.nbytes for name, w in model.weights.items() if name != "embed.weight")
    expected += model.weights["embed.weight"][0].nbytes
    assert decode_weight_bytes(SMALL) == expected
    assert decode_weight_bytes(SMALL.replace(tie_word_embeddings=True)) == expected
    cache = model.new_cache("static", batch_size=1, max_seq_len=10)
    assert kv_bytes_per_position(SMALL) == cache.bytes_per_position()
