"""The bundled tiny-fortunes model: loads offline, is what the issue asks, and every cache agrees on it."""

import json

import numpy as np
import pytest

import minikv
from minikv import BUNDLED_MODEL


@pytest.fixture(scope="module")
def model():
    return minikv.load()


def test_it_is_a_small_byte_level_llama_with_gqa(model):
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.vocab_size == 256
    assert cfg.n_kv_heads < cfg.n_heads                      # grouped-query attention
    assert isinstance(model.tokenizer, minikv.ByteTokenizer)
    assert (BUNDLED_MODEL / "model.safetensors").stat().st_size <= 8 * 2**20
    assert json.loads((BUNDLED_MODEL / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (BUNDLED_MODEL / "TRAINING.md").exists()


def test_loading_converts_to_the_requested_dtype(model):
    assert all(w.dtype == np.float32 for w in model.weights.values())
    assert minikv.load(dtype="float64").forward([[72, 105]]).dtype == np.float64


def test_greedy_continuation_is_the_same_with_every_cache_kind(model):
    prompt = "The meaning of life is"
    reference = model.generate(prompt, max_new_tokens=60, cache="none").tokens
    for kind in ("concat", "static", "paged", "sliding"):
        assert model.generate(prompt, max_new_tokens=60, cache=kind).tokens == reference, kind


def test_it_has_learned_english_bytes(model):
    # After an English prefix a trained byte model puts nearly all its probability on printable ASCII
    # and newlines; an untrained one spreads it over all 256 bytes (those 96 hold 37.5% of uniform mass).
    ids = np.array([list(b"It is a truth universally acknowledged that a single man")])
    probs = np.exp(model.forward(ids, last_only=True).astype(np.float64))
    probs /= probs.sum()
    printable = list(range(32, 127)) + [ord("\n")]
    assert probs[0, printable].sum() > 0.95
    assert probs[0].argmax() == ord(" ")          # a word has just ended


def test_validation_loss_recorded_is_under_the_target():
    text = (BUNDLED_MODEL / "TRAINING.md").read_text()
    assert "validation loss" in text
    import re
    (loss,) = re.findall(r"validation loss \| \*\*([0-9.]+) nats/byte", text)
    assert float(loss) < 1.8
