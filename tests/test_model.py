"""Transformer.forward: bad input is a named error; good input gives consistent logits every way it is asked.

What is proven here
-------------------
* Bad token ids (negative, >= vocab, non-integer floats, NaN, strings, bools), an empty sequence, a
  badly shaped array, bad n_new / positions, and a sequence past max_position_embeddings (alone
  or after what a cache already holds) are each an InvalidInputError / SequenceTooLongError naming
  the value; the failed call leaves the cache untouched.
* forward returns (batch, seq, vocab) in the model dtype (float32 and float64), and a float32 model
  computes every intermediate activation in float32 (no silent float64 promotion).
* last_only is the last column; with n_new it is each row's last real token.
* A right-padded ragged batch (n_new) gives each row the logits it gets alone, whatever the
  padding ids are; a batch of identical rows gives identical rows of logits.
* The attention algorithms "naive", "online" and "tiled" give the same logits (float64, 1e-12),
  through Transformer(attention=...) and minikv.load(..., attention=...), also on sequences long
  enough for tiled to use several blocks (with and without Mistral's sliding window).
* dtype="float16" for the model, or an unknown attention algorithm, is a ConfigError.
* Four input problems review found in model.py stay pinned: inf/float ids, ragged nested lists,
  negative positions, and explicit positions past max_position_embeddings (once silently clamped).

Tolerance: float64 1e-12 everywhere: the paths compared do the same arithmetic up to summation
order (row blocks, key blocks), which moves logits of size ~3 by ~1e-15.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minikv
from minikv import layers
from minikv.errors import ConfigError, InvalidInputError, SequenceTooLongError

FIXTURE_ROOT = Path(__file__).parent / "fixtures" / "hf"
FIXTURES = ["llama_gqa", "llama_mqa_tied", "qwen2_bias", "mistral", "mistral_window", "gpt2"]
ALGORITHMS = ["naive", "online", "tiled"]
TOL = 1e-12

_models: dict[tuple, minikv.Transformer] = {}


def model(name: str, dtype: str = "float64", attention: str | None = None) -> minikv.Transformer:
    key = (name, dtype, attention)
    if key not in _models:
        _models[key] = minikv.load(FIXTURE_ROOT / name, dtype=dtype, attention=attention)
    return _models[key]


def random_ids(vocab: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("bad_id", [-1, -1000, 97, 98, 10**9])
def test_token_id_out_of_range_is_named(bad_id):
    m = model("llama_gqa")
    ids = np.array([[1, 2, bad_id, 3]])
    with pytest.raises(InvalidInputError, match=rf"token id {bad_id} .*vocabulary of 97"):
        m.forward(ids)


def test_the_vocabulary_edges_are_valid():
    m = model("llama_gqa")
    assert m.forward([[0, 96]]).shape == (1, 2, 97)


@pytest.mark.parametrize("ids", [[[]], np.zeros((2, 0), dtype=np.int64), np.zeros((0, 3), dtype=np.int64)])
def test_empty_sequence(ids):
    with pytest.raises(InvalidInputError, match="empty"):
        model("llama_gqa").forward(ids)


@pytest.mark.parametrize("ids", [[[1.5, 2.0]], np.array([[0.1]]), [[np.nan, 1.0]], [["a", "b"]], [[True, False]]])
def test_non_integer_ids(ids):
    with pytest.raises(InvalidInputError, match="dtype"):
        model("llama_gqa").forward(ids)


@pytest.mark.parametrize("ids", [np.int64(3), np.zeros((1, 2, 3), dtype=np.int64)])
def test_badly_shaped_ids(ids):
    with pytest.raises(InvalidInputError, match="shape"):
        model("llama_gqa").forward(ids)


def test_one_dimensional_ids_are_one_sequence():
    m = model("llama_gqa")
    ids = [4, 8, 15, 16]
    assert np.array_equal(m.forward(ids), m.forward([ids]))


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2"])
def test_sequence_longer_than_max_position(name):
    m = model(name)
    limit = m.config.max_position_embeddings
    assert m.forward(np.zeros((1, limit), dtype=np.int64)).shape[1] == limit  # exactly the maximum is fine
    with pytest.raises(SequenceTooLongError, match=str(limit)):
        m.forward(np.zeros((1, limit + 1), dtype=np.int64))
    assert issubclass(SequenceTooLongError, InvalidInputError)


@pytest.mark.parametrize("kind", ["concat", "static"])
def test_cache_pushing_past_max_position(kind):
    m = model("llama_gqa")
    limit = m.config.max_position_embeddings
    cache = m.new_cache(kind, batch_size=1, max_seq_len=limit + 40)  # the cache could hold more
    m.forward(np.ones((1, limit - 4), dtype=np.int64), cache=cache)
    m.forward(np.ones((1, 4), dtype=np.int64), cache=cache)              # reaches the maximum exactly
    assert cache.lengths.tolist() == [limit]
    with pytest.raises(SequenceTooLongError, match=str(limit)):
        m.forward(np.ones((1, 1), dtype=np.int64), cache=cache)
    assert cache.lengths.tolist() == [limit]  # nothing written by the failed call


def test_cache_overflow_before_max_position_leaves_cache_unchanged():
    m = model("llama_gqa")
    cache = m.new_cache("static", batch_size=1, max_seq_len=40)
    m.forward(np.ones((1, 30), dtype=np.int64), cache=cache)
    with pytest.raises(minikv.CacheOverflowError):
        m.forward(np.ones((1, 20), dtype=np.int64), cache=cache)
    assert cache.lengths.tolist() == [30]


@pytest.mark.parametrize("n_new", [[3], [3, 3, 3], [-1, 2], [2, 8]])
def test_bad_n_tokens(n_new):
    with pytest.raises(InvalidInputError, match="n_new"):
        model("llama_gqa").forward(np.ones((2, 7), dtype=np.int64), n_new=n_new)


def test_bad_positions_shape():
    with pytest.raises(InvalidInputError, match="positions"):
        model("llama_gqa").forward(np.ones((2, 3), dtype=np.int64), positions=np.arange(3))


def test_float16_model_dtype_is_refused():
    with pytest.raises(ConfigError, match="float16"):
        minikv.load(FIXTURE_ROOT / "llama_gqa", dtype="float16")
    m = model("llama_gqa")
    with pytest.raises(ConfigError, match="float16"):
        minikv.Transformer(m.config, m.weights, dtype="float16")
    with pytest.raises(ConfigError, match="'bogus'"):     # a name NumPy does not know is no TypeError
        minikv.load(FIXTURE_ROOT / "llama_gqa", dtype="bogus")


def test_unknown_attention_algorithm_is_refused():
    with pytest.raises(ConfigError, match="flash"):
        minikv.load(FIXTURE_ROOT / "llama_gqa", attention="flash")


# -------- input problems found by review (each was a bug in model.py once)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_infinite_float_id_is_named():
    with pytest.raises(InvalidInputError, match="inf|dtype"):
        model("llama_gqa").forward([[np.inf, 1.0]])


@pytest.mark.parametrize("ids", [[[1.0, 2.0]], [[1.5, 2.0]]])
def test_float_ids_are_refused_even_whole_numbers(ids):
    # float32 cannot represent every id above 2**24, so floats are never taken as ids.
    with pytest.raises(InvalidInputError, match="float"):
        model("llama_gqa").forward(ids)


def test_ragged_nested_list_is_an_invalid_input():
    with pytest.raises(InvalidInputError):
        model("llama_gqa").forward([[1, 2, 3], [4, 5]])


def test_negative_position_is_named():
    with pytest.raises(InvalidInputError, match="-1"):
        model("llama_gqa").forward([[1, 2, 3]], positions=[[-1, 0, 1]])


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2"])
def test_explicit_positions_past_the_maximum_are_refused(name):
    m = model(name)
    limit = m.config.max_position_embeddings
    with pytest.raises(SequenceTooLongError, match=str(limit + 36)):
        m.forward([[1, 2]], positions=[[limit + 35, limit + 36]])


# ------------------------------------------------------------------ shapes and dtypes


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", FIXTURES)
def test_forward_returns_batch_seq_vocab_in_the_model_dtype(name, dtype):
    m = model(name, dtype)
    ids = random_ids(m.config.vocab_size, 3, 7)
    logits = m.forward(ids)
    assert isinstance(logits, np.ndarray)
    assert logits.shape == (3, 7, m.config.vocab_size) and logits.dtype == np.dtype(dtype)
    assert np.isfinite(logits).all()
    last = m.forward(ids, last_only=True)
    assert last.shape == (3, m.config.vocab_size) and last.dtype == np.dtype(dtype)


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_bias", "gpt2"])
def test_float32_model_computes_in_float32(name, monkeypatch):
    """Every projection's input and output is float32: a float64 scalar promoting an activation would
    show here even if a later step cast it back."""
    m = model(name, "float32")
    seen = []
    real_linear = layers.linear

    def recording_linear(x, w, b=None):
        out = real_linear(x, w, b)
        seen.append((x.dtype, w.dtype, out.dtype))
        return out

    assert m._linear is layers.linear          # float weights: the projections call layers.linear directly
    monkeypatch.setattr(m, "_linear", recording_linear)
    m.forward(random_ids(m.config.vocab_size, 2, 5))
    assert len(seen) == 4 * m.config.n_layers + 1  # qkv, o, mlp in, mlp down per layer; the lm_head
    assert all(d == np.float32 for triple in seen for d in triple), seen


@pytest.mark.parametrize("name", FIXTURES)
def test_last_only_is_the_last_column(name):
    m = model(name)
    ids = random_ids(m.config.vocab_size, 2, 9, seed=1)
    assert max_diff(m.forward(ids, last_only=True), m.forward(ids)[:, -1]) <= TOL


# ------------------------------------------------------------------ batches


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(FIXTURES), lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4),
       seed=st.integers(0, 2**32 - 1))
def test_ragged_rows_equal_each_row_alone(name, lengths, seed):
    m = model(name)
    vocab, width = m.config.vocab_size, max(lengths)
    ids = random_ids(vocab, len(lengths), width, seed)  # the padding columns hold random ids
    logits = m.forward(ids, n_new=lengths)
    last = m.forward(ids, n_new=lengths, last_only=True)
    for row, n in enumerate(lengths):
        alone = m.forward(ids[row:row + 1, :n])[0]
        assert max_diff(logits[row, :n], alone) <= TOL
        assert max_diff(last[row], alone[-1]) <= TOL


@pytest.mark.parametrize("name", ["llama_gqa", "mistral_window", "gpt2"])
def test_padding_ids_do_not_matter(name):
    m = model(name)
    ids = random_ids(m.config.vocab_size, 2, 8, seed=2)
    other = ids.copy()
    other[0, 5:] = (other[0, 5:] + 1) % m.config.vocab_size
    a, b = m.forward(ids, n_new=[5, 8]), m.forward(other, n_new=[5, 8])
    assert max_diff(a[0, :5], b[0, :5]) <= TOL and max_diff(a[1], b[1]) <= TOL


@pytest.mark.parametrize("name", FIXTURES)
def test_identical_rows_give_identical_logits(name):
    m = model(name)
    row = random_ids(m.config.vocab_size, 1, 10, seed=3)
    logits = m.forward(np.repeat(row, 4, axis=0))
    for b in range(1, 4):
        assert max_diff(logits[b], logits[0]) <= TOL
    assert max_diff(logits[0], m.forward(row)[0]) <= TOL


# ------------------------------------------------------------------ attention algorithms


@pytest.mark.parametrize("name", FIXTURES)
def test_attention_algorithms_agree_through_load(name):
    ids = random_ids(model(name).config.vocab_size, 2, 13, seed=4)
    reference = model(name, attention="naive").forward(ids)
    for algorithm in ("online", "tiled"):
        m = model(name, attention=algorithm)
        assert m.attention == algorithm
        assert max_diff(m.forward(ids), reference) <= TOL, algorithm


@pytest.mark.parametrize("name", ["llama_gqa", "llama_mqa_tied", "mistral_window"])
def test_attention_algorithms_agree_over_several_tiles(name):
    """Sequences of 150 tokens: tiled runs 3 x 3 blocks of 64 (skipping the causal upper ones), with
    mistral_window's 4-token window crossing block edges. RoPE models do not depend on
    max_position_embeddings except through the table length, so the fixture's limit of 64 is raised."""
    base = model(name)
    config = base.config.replace(max_position_embeddings=256)
    ids = random_ids(config.vocab_size, 2, 150, seed=5)
    logits = {a: minikv.Transformer(config, base.weights, dtype="float64", attention=a).forward(ids, n_new=[150, 97])
              for a in ALGORITHMS}
    for algorithm in ("online", "tiled"):
        assert max_diff(logits[algorithm][0], logits["naive"][0]) <= TOL, algorithm
        assert max_diff(logits[algorithm][1, :97], logits["naive"][1, :97]) <= TOL, algorithm
    # And the first 64 positions agree with the unmodified model: the longer table changes nothing.
    assert max_diff(logits["naive"][0, :64], base.forward(ids[:1, :64])[0]) <= TOL
