"""Generation (minikv/generate.py): prefill, decode, ragged batches, stop tokens, sampling, streaming.

The logits that ``generate`` samples from are captured by wrapping ``minikv.generate.sample`` (the
sampler is not changed, only recorded), so every decode step of ``model.generate`` can be compared
with the no-cache recompute ``model.forward(prompt + tokens so far)[last]``: float64 to 1e-10 (far
above round-off ~1e-14, far below a wrong slot or position), for every cache kind, random ragged
batches, prefill chunk sizes and lengths. Greedy tokens must then be identical.

With sampling, one rng is shared by the batch, so a batch and single runs draw different random
numbers: there we check determinism by seed (and that every cache kind draws the same tokens for
the same seed, since their logits agree to 1e-10); "ragged batch == each prompt alone" is greedy.

Fixtures: the committed tiny Hugging Face checkpoints in tests/fixtures/hf (max 64 positions, no
tokenizer: prompts are token ids).
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minikv
from hf_fixtures import FIXTURES, cache_options, model_for, random_prompts
from minikv.errors import (CacheMismatchError, CacheOverflowError, ConfigError, InvalidInputError, MinikvError,
                           SamplingError, SequenceTooLongError)

GENERATE_MODULE = importlib.import_module("minikv.generate")
KINDS = ("concat", "static", "paged", "sliding")
ALL_KINDS = ("none",) + KINDS
EXACT = 1e-10

def recompute_last(model, sequence, window=None):
    return model.forward(np.asarray([sequence], dtype=np.int64), window=window)[0, -1]


@contextmanager
def recorded_logits():
    """Yields a list that receives a copy of the (batch, vocab) logits of every sampling step."""
    calls = []
    real_sample = GENERATE_MODULE.sample

    def recording_sample(logits, params, rng, previous_tokens=None):
        calls.append(np.array(logits, copy=True))
        return real_sample(logits, params, rng, previous_tokens)

    with mock.patch.object(GENERATE_MODULE, "sample", recording_sample):
        yield calls


def assert_steps_equal_recompute(model, prompts, out, calls, window=None):
    """Step s of row b sampled from recompute(prompt_b + tokens_b[:s]) and (greedy) took its argmax."""
    for b, prompt in enumerate(prompts):
        for s, token in enumerate(out.tokens[b]):
            want = recompute_last(model, prompt + out.tokens[b][:s], window)
            np.testing.assert_allclose(calls[s][b], want, rtol=0, atol=EXACT, err_msg=f"row {b}, step {s}")
            assert token == int(np.argmax(want)), f"row {b}, step {s}"


# ---------------------------------------------------------------------------------------------------
# 1. generate == recompute, per step, every cache kind (hypothesis)
# ---------------------------------------------------------------------------------------------------


@st.composite
def generations(draw):
    name = draw(st.sampled_from(FIXTURES))
    batch = draw(st.integers(1, 3))
    prompt_lengths = draw(st.lists(st.integers(1, 14), min_size=batch, max_size=batch))
    prefill_chunk = draw(st.one_of(st.none(), st.integers(1, 8)))
    max_new_tokens = draw(st.integers(1, 8))
    option = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    return name, prompt_lengths, prefill_chunk, max_new_tokens, option, seed


@pytest.mark.parametrize("kind", ALL_KINDS)
@settings(max_examples=40, deadline=None)
@given(case=generations())
def test_generate_equals_recompute_step_by_step(kind, case):
    name, prompt_lengths, prefill_chunk, max_new_tokens, option, seed = case
    model = model_for(name)
    prompts = random_prompts(model, prompt_lengths, seed)
    options = cache_options(kind, option, max(prompt_lengths) + max_new_tokens)
    with recorded_logits() as calls:
        out = model.generate(prompts, max_new_tokens, cache=kind, prefill_chunk=prefill_chunk, stop_tokens=[],
                             **options)
    assert len(calls) == max_new_tokens
    assert [len(t) for t in out.tokens] == [max_new_tokens] * len(prompts)
    assert out.finish_reasons == ["length"] * len(prompts)
    assert_steps_equal_recompute(model, prompts, out, calls)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(FIXTURES), prompt_lengths=st.lists(st.integers(1, 14), min_size=2, max_size=4),
       prefill_chunk=st.one_of(st.none(), st.integers(1, 6)), seed=st.integers(0, 2**31 - 1))
def test_ragged_batch_generates_what_each_prompt_generates_alone(kind, name, prompt_lengths, prefill_chunk, seed):
    """Token for token (greedy), with the config's stop token active so rows may stop at different steps."""
    model = model_for(name)
    prompts = random_prompts(model, prompt_lengths, seed)
    options = {"block_size": 3} if kind == "paged" else {}
    batch = model.generate(prompts, 10, cache=kind, prefill_chunk=prefill_chunk, **options)
    for b, prompt in enumerate(prompts):
        alone = model.generate(prompt, 10, cache=kind, **options)
        assert batch.tokens[b] == alone.tokens[0], f"row {b}"
        assert batch.finish_reasons[b] == alone.finish_reasons[0]


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(FIXTURES), window=st.integers(1, 6),
       prompt_lengths=st.lists(st.integers(1, 14), min_size=1, max_size=2),
       prefill_chunk=st.one_of(st.none(), st.integers(1, 6)), max_new_tokens=st.integers(1, 12),
       seed=st.integers(0, 2**31 - 1))
def test_generate_with_a_narrow_sliding_window_equals_windowed_recompute(name, window, prompt_lengths, prefill_chunk,
                                                                         max_new_tokens, seed):
    """cache="sliding", window=W shorter than the sequence: each step's logits equal
    model.forward(ids, window=min(W, config window))[last]."""
    model = model_for(name)
    prompts = random_prompts(model, prompt_lengths, seed)
    with recorded_logits() as calls:
        out = model.generate(prompts, max_new_tokens, cache="sliding", window=window, prefill_chunk=prefill_chunk,
                             stop_tokens=[])
    assert_steps_equal_recompute(model, prompts, out, calls, window=min(window, model.config.sliding_window or window))


def test_mistral_window_generates_the_same_with_every_cache():
    """The config's window of 4 applies everywhere: the ring of 4 slots and the full caches agree."""
    model = model_for("mistral_window")
    prompts = random_prompts(model, [12, 5], seed=2)
    results = {kind: model.generate(prompts, 20, cache=kind, stop_tokens=[]) for kind in ALL_KINDS}
    for kind in KINDS:
        assert results[kind].tokens == results["none"].tokens, kind
    assert results["sliding"].stats.cache_bytes == 2 * 2 * 2 * 4 * 2 * 8 * 8   # W=4 slots, not 31


# ---------------------------------------------------------------------------------------------------
# 2. Stop tokens
# ---------------------------------------------------------------------------------------------------


def cut_at_stop(tokens, stops):
    """What a row must produce with ``stops`` active: everything before the first stop token."""
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i], "stop"
    return tokens, "length"


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_a_row_that_hits_a_stop_token_stops_and_the_others_go_on(kind):
    model = model_for("llama_gqa")
    # Find, from a first greedy run without stops, a token row 0 produces (not first) and row 1 never does.
    for seed in range(100):
        prompts = random_prompts(model, [5, 8], seed)
        free = model.generate(prompts, 12, cache=kind, stop_tokens=[])
        row0, row1 = free.tokens
        candidates = [t for k, t in enumerate(row0) if k >= 2 and t not in row0[:k] and t not in row1]
        if candidates:
            break
    else:
        pytest.fail("no prompt pair with a usable stop token")
    stop = candidates[0]
    out = model.generate(prompts, 12, cache=kind, stop_tokens=[stop])
    assert out.tokens[0] == row0[:row0.index(stop)] and out.finish_reasons[0] == "stop"
    assert out.tokens[1] == row1 and out.finish_reasons[1] == "length"
    assert stop not in out.tokens[0]
    # Both rows stopping ends the loop early: no sampling step after the last row stopped.
    stops = [stop, row1[3]]
    with recorded_logits() as calls:
        out = model.generate(prompts, 12, cache=kind, stop_tokens=stops)
    expected = [cut_at_stop(row, stops) for row in (row0, row1)]
    assert out.tokens == [e[0] for e in expected] and out.finish_reasons == [e[1] for e in expected]
    assert out.finish_reasons == ["stop", "stop"]
    assert len(calls) == max(len(t) for t in out.tokens) + 1


def test_default_stop_token_is_the_config_eos():
    model = model_for("gpt2")
    eos = model.config.eos_token_id
    prompts = random_prompts(model, [3, 6, 4], seed=8)
    free = model.generate(prompts, 16, stop_tokens=[])
    default = model.generate(prompts, 16)
    assert default.tokens == [cut_at_stop(row, [eos])[0] for row in free.tokens]
    assert default.finish_reasons == [cut_at_stop(row, [eos])[1] for row in free.tokens]


# ---------------------------------------------------------------------------------------------------
# 3. Sampling: same seed, same output
# ---------------------------------------------------------------------------------------------------

SAMPLING = dict(temperature=1.3, top_k=40, top_p=0.95, min_p=0.02, repetition_penalty=1.2)


def test_same_seed_same_output_and_every_cache_draws_the_same_tokens():
    model = model_for("qwen2_bias")
    prompts = random_prompts(model, [6, 2, 9], seed=4)
    runs = {kind: model.generate(prompts, 10, cache=kind, seed=123, stop_tokens=[], **SAMPLING) for kind in ALL_KINDS}
    again = model.generate(prompts, 10, cache="static", seed=123, stop_tokens=[], **SAMPLING)
    assert again.tokens == runs["static"].tokens
    # Logits agree to 1e-10 across kinds and the rng draws the same numbers, so the tokens agree too.
    for kind in KINDS:
        assert runs[kind].tokens == runs["none"].tokens, kind
    # An explicit Generator is the same as its seed.
    explicit = model.generate(prompts, 10, rng=np.random.default_rng(123), stop_tokens=[], **SAMPLING)
    assert explicit.tokens == runs["none"].tokens
    # Different seeds can differ (temperature 1.3 on a random model: 30 tokens agreeing for 5 seeds
    # would mean the rng is ignored).
    outputs = {str(model.generate(prompts, 10, seed=s, stop_tokens=[], **SAMPLING).tokens) for s in range(5)}
    assert len(outputs) > 1


@pytest.mark.parametrize("options", [dict(temperature=0.7), dict(temperature=1.0, top_k=5),
                                     dict(temperature=1.0, top_p=0.5), dict(temperature=0.9, min_p=0.1),
                                     dict(temperature=0.0, repetition_penalty=1.5)])
def test_each_sampling_option_is_deterministic_by_seed(options):
    model = model_for("llama_mqa_tied")
    prompts = random_prompts(model, [4, 7], seed=9)
    a = model.generate(prompts, 8, seed=7, stop_tokens=[], **options)
    b = model.generate(prompts, 8, seed=7, stop_tokens=[], **options)
    assert a.tokens == b.tokens


def test_top_k_one_is_greedy_whatever_the_seed():
    model = model_for("mistral")
    prompts = random_prompts(model, [5], seed=10)
    greedy = model.generate(prompts, 8, stop_tokens=[]).tokens
    for seed in range(3):
        assert model.generate(prompts, 8, temperature=2.0, top_k=1, seed=seed, stop_tokens=[]).tokens == greedy


# ---------------------------------------------------------------------------------------------------
# 4. Errors
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value", [("temperature", -0.5), ("top_p", 1.5), ("top_p", 0.0), ("top_k", 0),
                                           ("min_p", 1.5), ("repetition_penalty", 0.0)])
def test_invalid_sampling_parameters_are_value_errors_naming_the_value(option, value):
    model = model_for("llama_gqa")
    with pytest.raises(SamplingError) as info:
        model.generate([1, 2, 3], 4, **{option: value})
    assert isinstance(info.value, ValueError)
    assert option in str(info.value) and repr(value) in str(info.value), str(info.value)


def test_invalid_prompts_are_refused():
    model = model_for("llama_gqa")
    vocab, limit = model.config.vocab_size, model.config.max_position_embeddings
    with pytest.raises(InvalidInputError):
        model.generate([], 4)
    with pytest.raises(InvalidInputError, match="prompt 1 is empty"):
        model.generate([[1, 2], []], 4)
    with pytest.raises(InvalidInputError, match=f"token id {vocab} .*0..{vocab - 1}"):
        model.generate([1, vocab], 4)
    with pytest.raises(InvalidInputError, match="token id -1"):
        model.generate([[3], [-1, 2]], 4)
    with pytest.raises(InvalidInputError, match="no tokenizer"):
        model.generate("hello", 4)
    with pytest.raises(InvalidInputError, match="max_new_tokens=0"):
        model.generate([1, 2], 0)
    with pytest.raises(InvalidInputError, match="prefill_chunk=0"):
        model.generate([1, 2], 3, prefill_chunk=0)
    with pytest.raises(ConfigError, match="cache='ring'"):
        model.generate([1, 2], 3, cache="ring")
    with pytest.raises(ConfigError, match="window=4 applies to cache='sliding'"):
        model.generate([1, 2], 3, cache="static", window=4)
    with pytest.raises(ConfigError, match="block_size=4 applies to cache='paged'"):
        model.generate([1, 2], 3, cache="sliding", block_size=4)
    # Too long for the position table: refused before any work, with the numbers and the fix.
    with pytest.raises(SequenceTooLongError, match=f"needs {limit + 1} positions .* max_position_embeddings={limit}"):
        model.generate(list(range(limit + 1)), 1)
    with pytest.raises(SequenceTooLongError, match="pass max_new_tokens<=5"):
        model.generate(list(range(60)), 10)
    assert len(model.generate(list(range(60)), 5, stop_tokens=[]).tokens[0]) == 5     # exactly fits: 60 + 4
    with pytest.raises(SequenceTooLongError):
        model.forward(np.arange(limit + 1)[None] % vocab)


def test_a_cache_for_another_model_or_batch_is_refused_before_any_work():
    model = model_for("llama_gqa")
    other = model_for("gpt2").new_cache("static", batch_size=1, max_seq_len=32)
    with pytest.raises(CacheMismatchError, match="layers, kv_heads, head_dim"):
        model.generate([1, 2, 3], 4, cache=other)
    two = model.new_cache("static", batch_size=2, max_seq_len=32)
    with pytest.raises(CacheMismatchError, match="batch_size=1"):
        model.generate([1, 2, 3], 4, cache=two)
    small = model.new_cache("static", batch_size=1, max_seq_len=8)
    with pytest.raises(CacheOverflowError, match=r"needs 9 positions but the static cache holds 8; pass max_seq_len>=9"):
        model.generate([1, 2, 3, 4, 5], 5, cache=small)
    np.testing.assert_array_equal(small.lengths, [0])


# ---------------------------------------------------------------------------------------------------
# 5. Streaming and statistics
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_stream_yields_the_tokens_generate_returns_and_fills_the_stats(kind):
    model = model_for("mistral")
    prompts = random_prompts(model, [4, 9, 6], seed=12)
    options = {"block_size": 4} if kind == "paged" else {}
    stream = model.stream(prompts, 7, cache=kind, stop_tokens=[], **options)
    events = list(stream)
    assert all(isinstance(e, GENERATE_MODULE.TokenEvent) and e.text == "" for e in events)   # no tokenizer
    assert [e.sequence for e in events] == [0, 1, 2] * 7           # made step by step, row by row
    per_row = [[e.token for e in events if e.sequence == b] for b in range(3)]
    reference = model.generate(prompts, 7, cache=kind, stop_tokens=[], **options)
    assert per_row == reference.tokens == stream.output.tokens
    stats = stream.output.stats
    assert stats.prefill_ms > 0 and stats.prefill_tokens == 4 + 9 + 6
    assert stats.tokens_generated == 21 and stats.batch_size == 3 and stats.cache_kind == kind
    assert stats.decode_tokens == 3 * 6 and stats.decode_tokens_per_s > 0
    if kind == "none":
        assert stream.cache is None and stats.cache_bytes == 0
    else:
        assert stats.cache_bytes == stream.cache.nbytes > 0
        # The cache holds each prompt and all but the last generated token (it is never fed back).
        np.testing.assert_array_equal(stream.cache.lengths, [4 + 6, 9 + 6, 6 + 6])
    with pytest.raises(MinikvError, match="already been iterated"):
        next(iter(stream))


def test_stream_with_stops_and_a_given_cache():
    model = model_for("llama_gqa")
    prompts = random_prompts(model, [3, 5], seed=13)
    free = model.generate(prompts, 9, stop_tokens=[])
    stop = free.tokens[0][4]
    cache = model.new_cache("paged", batch_size=2, max_seq_len=20, block_size=2)
    stream = model.generate(prompts, 9, cache=cache, stop_tokens=[stop], stream=True)
    assert isinstance(stream, GENERATE_MODULE.Stream) and stream.output is None
    tokens = [[], []]
    for event in stream:
        tokens[event.sequence].append(event.token)
    assert tokens == stream.output.tokens == [cut_at_stop(row, [stop])[0] for row in free.tokens]
    assert stream.output.stats.cache_bytes == cache.nbytes
    assert stream.output.stats.tokens_generated == sum(len(t) for t in tokens)


# ---------------------------------------------------------------------------------------------------
# 6. Continuing from a saved cache; dtype
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_generate_continues_a_saved_prefilled_cache(kind, tmp_path):
    """Prefill a shared prefix once, save it, load it later: generating the rest gives exactly the tokens
    of generating prefix + rest from scratch."""
    model = model_for("qwen2_bias")
    prefix, rest = random_prompts(model, [9, 4], seed=14)
    options = {"block_size": 4} if kind == "paged" else {}
    cache = model.new_cache(kind, batch_size=1, max_seq_len=24, **options)
    model.forward(np.array([prefix]), cache)
    loaded = minikv.load_cache(cache.save(tmp_path / "prefix.safetensors"), backend=model.backend)
    with recorded_logits() as calls:
        out = model.generate(rest, 8, cache=loaded, stop_tokens=[])
    reference = model.generate(prefix + rest, 8, cache="none", stop_tokens=[])
    assert out.tokens == reference.tokens
    assert_steps_equal_recompute(model, [prefix + rest], out, calls)
    np.testing.assert_array_equal(loaded.lengths, [9 + 4 + 7])


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_float32_model_samples_from_float32_logits(kind):
    model = model_for("gpt2", "float32")
    with recorded_logits() as calls:
        out = model.generate([[5, 6, 7], [8]], 4, cache=kind, stop_tokens=[])
    assert all(c.dtype == np.float32 for c in calls) and len(calls) == 4
    # float32 logits are ~1e-5 from float64, so for this fixed input (no near-tie among the top two
    # logits) the greedy tokens are those of the float64 model.
    reference = model_for("gpt2").generate([[5, 6, 7], [8]], 4, cache=kind, stop_tokens=[])
    assert out.tokens == reference.tokens
