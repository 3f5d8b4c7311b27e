"""The int8 KV cache on every cache kind (concat, static, paged, sliding): minikv/cache.py.

Each K/V row (one token, one head) is stored as q = round(row / scale) in int8 beside its float32
scale (minikv.quant.quantize_rows). The reference it must equal is not the float cache (the
rounding changes the logits by ~1e-2) but the *same rounding*: a float cache of the same kind whose
``update`` stores dequantize(quantize(row)) (the "rounding twin"). The model and its inputs are the
same, so K and V are computed bitwise identically and round to the same integers; in float64 the
two must then agree to 1e-10 (any wrong scale, slot or page is off by >= 1e-3).

Properties
----------
* every kind: prefill in ragged chunks + greedy decode through the int8 cache == the rounding twin
  (float64, 1e-10); the four kinds give the same logits (so the static cache's quality figure in
  benchmarks/quant_quality.py holds for all of them);
* a forward that fails after any layer leaves K, V AND the scales exactly as they were (the sliding
  ring's undo puts back overwritten scales; concat's arrays and the whole ring are compared in full);
* truncate then re-feed == never having fed;
* save / load continues bit-identically; a file with a bad scale tensor is refused at load;
* nbytes counts the scales: (head_dim + 4) bytes per row instead of head_dim * itemsize;
* numba backend: its compiled decode step reads int8 paged and concat caches (through the block
  table / contiguously) and equals its own static-cache result to float32 round-off (1e-5), and the
  numpy reference to the bound of tests/test_quant.py's int8 test (every logit within 0.1, the mean
  difference below 1e-3: see there);
* broken variants: a ring that forgets to restore scales, and a paged cache that writes each scale
  to the next head's slot, are both caught.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minikv
from hf_fixtures import FIXTURES, forward_failing_at_layer, model_for, padded, random_prompts
from minikv import quant
from minikv.cache import PagedCache, SlidingCache, load_cache
from minikv.errors import CacheRewindError, CheckpointError, ConfigError

KINDS = ("concat", "static", "paged", "sliding")
EXACT = 1e-10
HAS_NUMBA = "numba" in minikv.available_backends()


def rounding_twin(cache):
    """Make a float cache store every K/V row exactly as the int8 cache rounds it: q * scale."""
    real_update = cache.update

    def update(layer, k_new, v_new):
        k = quant.dequantize_rows(*quant.quantize_rows(k_new), k_new.dtype)
        v = quant.dequantize_rows(*quant.quantize_rows(v_new), v_new.dtype)
        return real_update(layer, k, v)

    cache.update = update
    return cache


def drive(model, cache, prompts, chunk, n_decode):
    """Prefill a ragged batch in chunks of ``chunk``, then ``n_decode`` greedy steps; every logit row."""
    ids, lengths = padded(prompts)
    out, last = [], [None] * len(prompts)
    for start in range(0, ids.shape[1], chunk):
        counts = np.clip(lengths - start, 0, chunk)
        logits = model.forward(ids[:, start:start + chunk], cache, n_new=counts)
        for b in np.nonzero(counts)[0]:
            last[b] = logits[b, counts[b] - 1]           # each row's newest real position
            out.append(last[b])
    last = np.stack(last)
    for _ in range(n_decode):
        tokens = np.argmax(last, axis=-1)
        last = model.forward(tokens[:, None], cache, last_only=True)
        out += list(last)
    return np.stack(out)


def new_cache(model, kind, batch, dtype, window=None, block_size=3, max_seq_len=40):
    """window: the sliding ring's (None: max_seq_len); block_size: the paged cache's."""
    options = {"paged": {"block_size": block_size}, "sliding": {"window": window} if window else {}}.get(kind, {})
    return model.new_cache(kind, batch_size=batch, max_seq_len=max_seq_len, dtype=dtype, **options)


# ---------------------------------------------------------------------------------------------------
# 1. int8 == attention over the same rounding, every kind
# ---------------------------------------------------------------------------------------------------


def check_equals_rounding_twin(model, kind, prompts, chunk, n_decode, window=None, int8_cache=None):
    cache = int8_cache or new_cache(model, kind, len(prompts), "int8", window)
    twin = rounding_twin(new_cache(model, kind, len(prompts), model.dtype.name, window))
    got = drive(model, cache, prompts, chunk, n_decode)
    want = drive(model, twin, prompts, chunk, n_decode)
    np.testing.assert_allclose(got, want, rtol=0, atol=EXACT)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_int8_cache_equals_attention_over_the_same_rounding(kind, data):
    model = model_for(data.draw(st.sampled_from(FIXTURES), label="fixture"))
    prompt_lengths = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=3), label="prompt lengths")
    chunk = data.draw(st.integers(1, 8), label="prefill chunk")
    n_decode = data.draw(st.integers(1, 6), label="decode steps")
    # sliding: a ring narrower than the sequence (it wraps during prefill and decode)
    window = data.draw(st.integers(2, 8), label="window") if kind == "sliding" else None
    prompts = random_prompts(model, prompt_lengths, seed=data.draw(st.integers(0, 2**16), label="seed"))
    check_equals_rounding_twin(model, kind, prompts, chunk, n_decode, window)


class ScaleOnTheNextHead(PagedCache):
    """Broken: every scale lands in the next K/V head's slot."""

    def _write(self, pool, new, q_offset, n_new):
        super()._write(pool, np.roll(new, 1, axis=1) if pool.ndim == 3 else new, q_offset, n_new)


def test_a_scale_written_to_the_wrong_slot_is_caught():
    model = model_for("llama_gqa")
    assert model.config.n_kv_heads > 1
    cfg = model.config
    broken = ScaleOnTheNextHead(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 2, 40, dtype="int8",
                                backend=model.backend, block_size=3)
    prompts = random_prompts(model, [7, 4], seed=5)
    with pytest.raises(AssertionError):
        check_equals_rounding_twin(model, "paged", prompts, 3, 3, int8_cache=broken)
    check_equals_rounding_twin(model, "paged", prompts, 3, 3)       # ... and the real one passes


def test_int8_really_rounds_and_every_kind_gives_the_same_logits():
    """All four kinds give the static cache's logits (the figure benchmarks/quant_quality.py measures
    on the static cache holds for each), on the bundled float32 model: 1e-5 (float32 attention over the
    same dequantized values, read in another layout; observed 0). And int8 is not secretly float:
    the logits differ from the float32 cache's."""
    model = minikv.load()
    prompts = [[5, 80, 99, 101, 32, 7], [64, 3, 9]]
    logits = {kind: drive(model, new_cache(model, kind, 2, "int8", block_size=4), prompts, 4, 5) for kind in KINDS}
    for kind in KINDS:
        np.testing.assert_allclose(logits[kind], logits["static"], rtol=1e-5, atol=1e-5, err_msg=kind)
    exact = drive(model, new_cache(model, "static", 2, "float32"), prompts, 4, 5)
    assert not np.allclose(logits["static"], exact, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits["static"], exact, atol=0.5)


# ---------------------------------------------------------------------------------------------------
# 2. A failed forward leaves K, V and the scales exactly as they were
# ---------------------------------------------------------------------------------------------------


def state(cache):
    """Everything a later query can read, scales included, copied; plus what must come back in full:
    concat's arrays, the sliding ring (every slot may be visible), paged's table and free list."""
    out = [cache.lengths.copy()]
    for layer in range(cache.n_layers):
        if isinstance(cache, PagedCache):
            arrays = (cache.k_pool[layer], cache.v_pool[layer], cache.k_scales[layer], cache.v_scales[layer])
            for b, length in enumerate(cache.lengths.tolist()):
                positions = np.arange(length)
                blocks = cache.block_table[b, positions // cache.block_size]
                out += [a[blocks, :, positions % cache.block_size].copy() for a in arrays]
        elif cache.kind == "static":
            for b, length in enumerate(cache.lengths.tolist()):
                out += [a[b, :, :length].copy() for a in cache._arrays(layer)]
        else:
            out += [a.copy() for a in cache._arrays(layer)]                 # concat, the whole ring
    if isinstance(cache, PagedCache):
        out += [cache.block_table.copy(), np.array(cache.free_blocks)]
    return out


def check_failed_forward_changes_nothing(model, cache, prompts, n_fail, fail_at):
    ids, lengths = padded(prompts)
    model.forward(ids, cache, n_new=lengths)
    before = state(cache)
    # layer fail_at has written K, V and scales when the failure comes
    forward_failing_at_layer(model, cache, np.ones((len(prompts), n_fail), dtype=np.int64), fail_at)
    after = state(cache)
    assert len(before) == len(after)
    for x, y in zip(before, after):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_a_failed_forward_restores_k_v_and_scales(kind, data):
    model = model_for(data.draw(st.sampled_from(FIXTURES), label="fixture"))
    prompt_lengths = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=2), label="prompt lengths")
    n_fail = data.draw(st.integers(1, 6), label="tokens of the failing call")
    fail_at = data.draw(st.integers(0, model.config.n_layers - 1), label="failing layer")
    prompts = random_prompts(model, prompt_lengths, seed=data.draw(st.integers(0, 2**16), label="seed"))
    cache = new_cache(model, kind, len(prompts), "int8", window=5)
    check_failed_forward_changes_nothing(model, cache, prompts, n_fail, fail_at)
    # ... and the cache continues as if the failure never happened
    twin = new_cache(model, kind, len(prompts), "int8", window=5)
    ids, lengths = padded(prompts)
    model.forward(ids, twin, n_new=lengths)
    step = np.full((len(prompts), 1), 2, dtype=np.int64)
    np.testing.assert_array_equal(model.forward(step, cache), model.forward(step, twin))


class ForgetsScales(SlidingCache):
    """Broken: rollback restores the ring's K and V but not the scales it overwrote."""

    def rollback(self):
        self._undo = [entry for entry in self._undo if entry[0].dtype != np.float32]
        super().rollback()


def test_a_ring_that_does_not_restore_scales_is_caught():
    model = model_for("llama_gqa")
    cfg = model.config
    broken = ForgetsScales(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 1, 40, dtype="int8", backend=model.backend,
                           window=5)
    prompts = random_prompts(model, [7], seed=11)        # the ring has wrapped: a write overwrites position 2
    with pytest.raises(AssertionError):
        check_failed_forward_changes_nothing(model, broken, prompts, 1, cfg.n_layers - 1)
    check_failed_forward_changes_nothing(model, new_cache(model, "sliding", 1, "int8", window=5), prompts, 1,
                                         cfg.n_layers - 1)


# ---------------------------------------------------------------------------------------------------
# 3. truncate, save / load, nbytes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_truncate_then_refeed_equals_never_having_fed(kind, data):
    model = model_for(data.draw(st.sampled_from(FIXTURES), label="fixture"))
    prompt_len = data.draw(st.integers(1, 12), label="prompt length")
    extra = data.draw(st.integers(1, 6), label="tokens fed then dropped")
    dropped = data.draw(st.integers(1, extra), label="tokens dropped")
    prompt, more, after = random_prompts(model, [prompt_len, extra, 3], seed=data.draw(st.integers(0, 2**16)))
    window = data.draw(st.integers(2, 12), label="window")
    cache = new_cache(model, kind, 1, "int8", window)
    model.forward(np.array([prompt]), cache)
    model.forward(np.array([more]), cache)
    keep = prompt_len + extra - dropped
    if isinstance(cache, SlidingCache) and prompt_len + extra > cache.window and dropped > 1:
        with pytest.raises(CacheRewindError):
            cache.truncate([keep])
        return
    cache.truncate([keep])
    got = model.forward(np.array([after]), cache)
    fresh = new_cache(model, kind, 1, "int8", window)
    model.forward(np.array([(prompt + more)[:keep]]), fresh)
    want = model.forward(np.array([after]), fresh)
    np.testing.assert_allclose(got, want, rtol=0, atol=EXACT)


@pytest.mark.parametrize("kind", KINDS)
def test_int8_cache_saves_and_loads(kind, tmp_path):
    model = model_for("llama_gqa")
    cache = new_cache(model, kind, 2, "int8", window=5, max_seq_len=24)
    ids, lengths = padded(random_prompts(model, [8, 5], seed=31))
    model.forward(ids, cache, n_new=lengths)
    loaded = load_cache(cache.save(tmp_path / f"{kind}.safetensors"), backend=model.backend)
    assert (type(loaded), loaded.dtype.name, loaded.nbytes) == (type(cache), "int8", cache.nbytes)
    for a, b in zip(state(cache), state(loaded)):
        np.testing.assert_array_equal(a, b)
    for token in (4, 40, 44, 14, 41, 1, 2):        # past the ring's window and into new pages
        np.testing.assert_array_equal(model.forward(np.full((2, 1), token), cache),
                                      model.forward(np.full((2, 1), token), loaded))


def rewrite(path, change):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        meta = handle.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("kind", ["concat", "paged", "sliding"])
@pytest.mark.parametrize("change, needle", [
    (lambda t: t["k_scales.0"].__setitem__((0, 0, 0), -1.0), "negative"),
    (lambda t: t["v_scales.1"].__setitem__((0, 0, 0), np.nan), "NaN"),
    (lambda t: t.update({"k_scales.0": t["k_scales.0"][:, :, :-1].copy()}), "shape"),
    (lambda t: t.update({"v_scales.0": t["v_scales.0"].astype(np.float64)}), "dtype"),
    (lambda t: t.pop("v_scales.1"), "scale tensor"),
])
def test_a_bad_scale_tensor_is_refused_at_load(kind, change, needle, tmp_path):
    model = model_for("llama_gqa")
    cache = new_cache(model, kind, 1, "int8", window=5, max_seq_len=24)
    model.forward(np.array([[1, 2, 3, 4, 5, 6]]), cache)
    path = cache.save(tmp_path / "c.safetensors")
    rewrite(path, change)
    with pytest.raises(CheckpointError, match=needle):
        load_cache(path)


@pytest.mark.parametrize("kind", KINDS)
def test_nbytes_counts_the_scales(kind):
    """(head_dim int8 + one float32 scale) per row, written here from the numbers the test chose, and
    equal to what the arrays really hold."""
    model = model_for("llama_gqa")
    cfg = model.config
    cache = new_cache(model, kind, 2, "int8", window=5, max_seq_len=24)
    ids, lengths = padded(random_prompts(model, [7, 11], seed=3))
    model.forward(ids, cache, n_new=lengths)
    per_position = 2 * cfg.n_layers * cfg.n_kv_heads * (cfg.head_dim + 4)
    # positions held, all sequences together; paged: ceil(7 / 3) + ceil(11 / 3) blocks of 3
    positions = {"static": 2 * 24, "concat": 2 * 11, "sliding": 2 * 5, "paged": 3 * (3 + 4)}[kind]
    assert cache.nbytes == per_position * positions
    if isinstance(cache, PagedCache):
        pools = sum(a.nbytes for layer in range(cfg.n_layers)
                    for a in (cache.k_pool[layer], cache.v_pool[layer], cache.k_scales[layer], cache.v_scales[layer]))
        held = pools // cache.num_blocks * cache.blocks_in_use
    else:
        held = sum(a.nbytes for layer in range(cfg.n_layers) for a in cache._arrays(layer))
    assert cache.nbytes == held


def test_encoder_decoder_caches_refuse_int8():
    """Their attention and cross-attention cache read floats: refused, naming what is possible."""
    from hf_fixtures import FIXTURE_ROOT

    model = minikv.load(FIXTURE_ROOT.parent / "seq2seq" / "bart")
    with pytest.raises(ConfigError, match="decoder-only"):
        model.new_cache("static", dtype="int8")


# ---------------------------------------------------------------------------------------------------
# 4. The numba backend's compiled decode step over int8 paged and concat caches
# ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_NUMBA, reason="numba backend not available")
def test_compiled_decode_step_reads_int8_paged_and_concat_caches():
    compiled, reference = minikv.load(backend="numba"), minikv.load()
    step = compiled._decode_step
    prompts = [[5, 80, 99, 101, 32, 7], [64, 3, 9]]
    taken = []

    def counting(*args):
        logits = step(*args)
        taken.append(logits is not None)
        return logits

    compiled._decode_step = counting
    got = {kind: drive(compiled, new_cache(compiled, kind, 2, "int8", block_size=4), prompts, 4, 5)
           for kind in ("static", "concat", "paged")}
    assert taken == [True] * 15                          # every decode step of every kind was compiled
    for kind in ("concat", "paged"):
        # The same kernel over the same integers, read contiguously or through the block table.
        np.testing.assert_allclose(got[kind], got["static"], rtol=1e-5, atol=1e-5, err_msg=kind)
        want = drive(reference, new_cache(reference, kind, 2, "int8", block_size=4), prompts, 4, 5)
        # K/V of later layers may round to a neighbouring integer (see tests/test_quant.py's int8 test).
        difference = np.abs(got[kind] - want)
        assert difference.max() < 0.1 and difference.mean() < 1e-3, (kind, difference.max(), difference.mean())


# ---------------------------------------------------------------------------------------------------
# 5. The serving engine's paged store in int8: served == generated alone (with an int8 cache)
# ---------------------------------------------------------------------------------------------------


def served(engine, prompts, max_tokens):
    ids = [engine.add_request(p, max_tokens) for p in prompts]
    out = {r: [] for r in ids}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
        engine.check_blocks()
    return [out[r] for r in ids]


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2"])
def test_int8_store_serves_what_an_int8_cache_generates_alone(name):
    """Rows of one token, preemption (12 blocks of 4 cannot hold the four), prefix reuse: each request's
    greedy tokens equal generate(cache_dtype="int8") of its prompt alone (float64: same K/V, same
    rounding; see tests/test_serving.py for why argmax then agrees)."""
    from minikv.serving import Engine

    model = model_for(name)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, model.config.vocab_size, size=n).tolist() for n in (3, 11, 17, 6)]
    prompts.append(prompts[2][:9] + [1, 2])                 # shares two full blocks with the third
    engine = Engine(model, num_blocks=12, block_size=4, max_num_tokens=7, cache_dtype="int8")
    assert engine.store.k_pool[0].dtype == np.int8
    got = served(engine, prompts, 9)
    want = [model.generate([p], max_new_tokens=9, temperature=0.0, cache_dtype="int8").tokens[0] for p in prompts]
    assert got == want
    assert engine.stats.preemptions > 0
    float_engine = Engine(model, num_blocks=12, block_size=4, max_num_tokens=7)
    # a row: head_dim int8 + a float32 scale, against head_dim floats of the model's dtype
    hd, itemsize = model.config.head_dim, model.dtype.itemsize
    assert engine.store.nbytes * hd * itemsize == float_engine.store.nbytes * (hd + 4)


def test_int8_store_copy_on_write_copies_the_scales():
    """n answers fork the prompt's partial block (copy-on-write): answer i equals generate(seed + i) with
    an int8 cache; a store whose copy forgets the scales is caught by the same comparison."""
    from minikv.serving import Engine

    model = model_for("llama_gqa")
    prompt = [3, 1, 4, 1, 5, 9, 2]                          # 7 tokens: the last block (of 4) is partial

    def answers(broken):
        engine = Engine(model, block_size=4, num_blocks=32, cache_dtype="int8")
        store = engine.store
        if broken:
            copy = store.copy_blocks

            def copy_without_scales(copies):                 # copies K/V, not the scales
                store.quantized = False
                try:
                    copy(copies)
                finally:
                    store.quantized = True

            store.copy_blocks = copy_without_scales
        engine.add_request(prompt, 10, temperature=1.0, seed=11, n=3, stop_token_ids=[])
        out = {0: [], 1: [], 2: []}
        while engine.has_unfinished():
            for o in engine.step():
                out[o.index] += o.new_token_ids
        assert engine.blocks.stats.cow_copies >= 2
        return out

    want = {i: model.generate([prompt], max_new_tokens=10, temperature=1.0, seed=11 + i, stop_tokens=[],
                              cache_dtype="int8").tokens[0] for i in range(3)}
    assert answers(broken=False) == want
    assert answers(broken=True) != want


@pytest.mark.parametrize("dtype, message", [("int16", "cache_dtype='int16' must be float16, float32, float64 or int8"),
                                            ("bogus", "cache_dtype='bogus' is not a dtype"),
                                            ("complex64", "cache_dtype='complex64' must be")])
def test_the_engine_store_and_every_cache_refuse_other_dtypes_alike(dtype, message):
    """The serving store checks its dtype with the caches' own check (minikv.cache.check_cache_dtype):
    a ConfigError naming the value and the dtypes it takes, for the store and for every cache kind."""
    from minikv.serving import Engine

    model = model_for("llama_gqa")
    with pytest.raises(ConfigError, match=message):
        Engine(model, block_size=4, num_blocks=8, cache_dtype=dtype)
    for kind in KINDS:
        with pytest.raises(ConfigError, match=message.replace("cache_dtype", "cache dtype")):
            model.new_cache(kind, batch_size=1, max_seq_len=8, dtype=dtype)
