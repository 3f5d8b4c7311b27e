"""Conformance with Hugging Face transformers: minikv must compute the same logits as HF's own models.

Each folder in tests/fixtures/hf/ is a tiny randomly initialised HF checkpoint (config.json +
model.safetensors, written by `save_pretrained`) plus `expected.safetensors`: fixed `input_ids`
(2, 11) and the `logits` HF computed for them in float64 (eager attention, all-ones mask).
scripts/make_hf_fixtures.py builds them (it needs torch; these tests do not).

What each fixture pins down:
    llama_gqa       LLaMA: RMSNorm, rotate-half RoPE, SwiGLU, GQA (4 query heads share 2 kv heads), untied lm_head
    llama_mqa_tied  one kv head (MQA), tied embeddings (no lm_head.weight in the file), head_dim 16 != 48/4
    qwen2_bias      Qwen2: biases on q/k/v (not on o_proj), rope_theta 1e6, tied embeddings
    mistral         Mistral with sliding_window 64 > sequence length: behaves as full causal attention
    mistral_window  sliding_window 4 < 11 tokens: query i sees key j iff 0 <= i - j < 4
    gpt2            GPT-2: LayerNorm with bias, learned positions, GELU-tanh, fused c_attn, Conv1D (in, out) weights

Tolerances. The reference is a true float64 computation: the generator script keeps the float32
islands transformers uses (RMSNorm, RoPE tables, softmax) in float64, and an independent NumPy
implementation reproduces the stored logits to ~3e-14. So in float64 we demand 1e-10, far below the
~1e-3 .. 1 errors a wrong convention produces, and above float64 round-off for these sizes.
A float32 minikv model rounds every op to ~6e-8 relative; over two layers that grows to ~1e-5 on
logits of size ~3 (HF's own float32 model is 2e-6 .. 1e-5 away from the reference), so 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import minikv

FIXTURE_ROOT = Path(__file__).parent / "fixtures" / "hf"
EXPECTED_FIXTURES = {"llama_gqa", "llama_mqa_tied", "qwen2_bias", "mistral", "mistral_window", "gpt2"}
FIXTURES = sorted(p.name for p in FIXTURE_ROOT.iterdir() if (p / "expected.safetensors").is_file())

FLOAT64_TOL = 1e-10
FLOAT32_TOL = 1e-4
CAUSAL_TOL = 1e-10  # float64: the same computation on a prefix, only the summation length differs


def read_expected(name: str) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    with safe_open(str(FIXTURE_ROOT / name / "expected.safetensors"), framework="numpy") as f:
        return f.get_tensor("input_ids"), f.get_tensor("logits"), f.metadata()


_models: dict[tuple[str, str], object] = {}


def load_model(name: str, dtype: str):
    """minikv.load, memoised per (fixture, dtype): several tests use the same model."""
    key = (name, dtype)
    if key not in _models:
        _models[key] = minikv.load(FIXTURE_ROOT / name, dtype=dtype)
    return _models[key]


def test_every_fixture_is_present():
    # Parametrising over whatever folders exist would silently test nothing if a folder went missing.
    assert set(FIXTURES) == EXPECTED_FIXTURES


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_is_meaningful(name):
    """The comparison means something only if the expected logits are far from constant."""
    input_ids, expected, metadata = read_expected(name)
    assert input_ids.dtype == np.int64 and input_ids.shape == (2, 11)
    assert expected.dtype == np.float64 and expected.shape[:2] == (2, 11)
    vocab = expected.shape[2]
    assert input_ids.min() == 0 and input_ids.max() == vocab - 1  # both ends of the embedding table
    assert float(np.std(expected)) > 0.1
    # Different positions must have different logits, else a position bug could hide.
    assert float(np.min(np.abs(np.diff(expected, axis=1)).max(axis=-1))) > 1e-2
    assert metadata["transformers_version"] and metadata["torch_version"]


@pytest.mark.parametrize("name", FIXTURES)
def test_float64_logits_match_hf(name):
    input_ids, expected, _ = read_expected(name)
    model = load_model(name, "float64")
    logits = np.asarray(model.forward(input_ids))
    assert logits.dtype == np.float64
    assert logits.shape == expected.shape
    max_diff = float(np.max(np.abs(logits - expected)))
    assert max_diff < FLOAT64_TOL, f"{name}: max |minikv - HF| = {max_diff:.3e} (tolerance {FLOAT64_TOL:g})"


@pytest.mark.parametrize("name", FIXTURES)
def test_float32_logits_match_hf(name):
    input_ids, expected, _ = read_expected(name)
    model = load_model(name, "float32")
    logits = np.asarray(model.forward(input_ids))
    assert logits.dtype == np.float32  # no silent promotion to float64 anywhere on the way
    assert logits.shape == expected.shape
    max_diff = float(np.max(np.abs(logits.astype(np.float64) - expected)))
    assert max_diff < FLOAT32_TOL, f"{name}: max |minikv - HF| = {max_diff:.3e} (tolerance {FLOAT32_TOL:g})"


@pytest.mark.parametrize("name", FIXTURES)
def test_prefix_forward_is_causal(name):
    """Position t-1's logits depend only on tokens 0..t-1: forwarding just that prefix gives the same row."""
    input_ids, _, _ = read_expected(name)
    model = load_model(name, "float64")
    full = np.asarray(model.forward(input_ids))
    seq = input_ids.shape[1]
    for t in range(1, seq + 1):
        prefix_logits = np.asarray(model.forward(input_ids[:, :t]))
        assert prefix_logits.shape == (input_ids.shape[0], t, full.shape[2])
        diff = float(np.max(np.abs(prefix_logits[:, -1] - full[:, t - 1])))
        assert diff < CAUSAL_TOL, f"{name}: prefix of length {t}: last row differs by {diff:.3e}"
