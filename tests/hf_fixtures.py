"""The committed tiny Hugging Face checkpoints (tests/fixtures/hf), loaded once per process, and
small helpers the cache and generation tests share."""

from pathlib import Path

import numpy as np

import minikv

FIXTURE_ROOT = Path(__file__).parent / "fixtures" / "hf"
FIXTURES = ("llama_gqa", "llama_mqa_tied", "qwen2_bias", "mistral", "mistral_window", "gpt2")

_models: dict[tuple[str, str], minikv.Transformer] = {}


def model_for(name: str, dtype: str = "float64") -> minikv.Transformer:
    """Each checkpoint is loaded once (hypothesis calls the tests many times)."""
    if (name, dtype) not in _models:
        _models[(name, dtype)] = minikv.load(FIXTURE_ROOT / name, dtype=dtype)
    return _models[(name, dtype)]


def random_prompts(model, lengths, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, model.config.vocab_size, size=n).tolist() for n in lengths]


def cache_options(kind, option, total):
    """Options for the cached == recomputed checks: paged gets ``option`` as its block size; sliding a
    window of ``total + option - 1`` >= total, covering the whole sequence (narrower windows have tests
    of their own)."""
    if kind == "paged":
        return {"block_size": option}
    if kind == "sliding":
        return {"window": total + option - 1}
    return {}
