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


class InjectedFailure(BaseException):
    """Raised mid-forward by the transactional-cache tests; a BaseException like KeyboardInterrupt."""


def forward_failing_at_layer(model, cache, ids, fail_at: int) -> None:
    """Run ``model.forward(ids, cache)`` with an InjectedFailure raised right after layer ``fail_at``
    has written its K/V through ``cache.update``; the cache's own update is put back afterwards."""
    import pytest

    real_update = cache.update

    def update(layer, k_new, v_new):
        view = real_update(layer, k_new, v_new)          # this layer has written
        if layer == fail_at:
            raise InjectedFailure
        return view

    cache.update = update
    try:
        with pytest.raises(InjectedFailure):
            model.forward(ids, cache)
    finally:
        del cache.update


def padded(prompts):
    """Right-padded ids (batch, longest) of ragged prompts, and each prompt's length (batch,)."""
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    ids = np.zeros((len(prompts), int(lengths.max())), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    return ids, lengths
