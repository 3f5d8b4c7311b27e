"""The KV caches (minikv/cache.py): each kind is provably the same computation as recomputing.

The central property: drive the model through a cache exactly as generation does (a prompt
prefilled in chunks, then one token per step) and every logit row equals
``model.forward(sequence so far)[last position]`` with no cache, in float64 to 1e-10, and the
greedy token is the same. 1e-10 is far above float64 round-off for these tiny two-layer
models (observed ~1e-14) and far below what a wrong slot, position or mask does (~1e-2 .. 1).
A deliberately broken cache (the off-by-one a well-known NumPy LLaMA port shipped: its first
decode step wrote one slot too far) must FAIL the same check, so the check has teeth.

Then the interface: lengths, capacity, the nbytes formula (written here independently),
reset, paged free, float16 storage, save/load, the errors (overflow without lost state, pool
exhaustion, a cache for another model or batch), the allocation behaviour of the static
cache's decode step (tracemalloc), and dtype discipline.

Fixtures: the committed tiny Hugging Face checkpoints in tests/fixtures/hf (max 64 positions).
"""

from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_fixtures import (FIXTURE_ROOT, FIXTURES, cache_options, forward_failing_at_layer,
                         model_for, padded, random_prompts)
from minikv import Transformer
from minikv.backend import Backend
from minikv.cache import KVView, PagedCache, StaticCache, load_cache, make_cache
from minikv.errors import CacheMismatchError, CacheOverflowError, CheckpointError, InvalidInputError

KINDS = ("concat", "static", "paged", "sliding")
EXACT = 1e-10        # float64 cached vs recomputed logits (see the module docstring)

def recompute(model, sequence, window=None):
    """The no-cache reference: the whole sequence again, (seq, vocab)."""
    return model.forward(np.asarray([sequence], dtype=np.int64), window=window)[0]


def chunk_bounds(total, chunk_sizes):
    """[(start, size), ...] covering 0..total: the sizes in order, the last one repeated."""
    bounds, start, i = [], 0, 0
    while start < total:
        size = chunk_sizes[min(i, len(chunk_sizes) - 1)]
        bounds.append((start, size))
        start, i = start + size, i + 1
    return bounds


def check_cached_forward(model, cache, prompts, chunk_sizes, n_decode, *, reference_window=None, tol=EXACT):
    """Prefill ``prompts`` (a right-padded ragged batch) through ``cache`` in chunks of ``chunk_sizes``,
    then decode ``n_decode`` greedy tokens one at a time; every logit row must equal the recompute of
    that row's sequence (restricted to ``reference_window`` if given). Raises AssertionError if not."""
    ids, lengths = padded(prompts)
    sequences = [list(p) for p in prompts]
    references = [recompute(model, p, reference_window) for p in prompts]
    last = [None] * len(prompts)
    for start, size in chunk_bounds(ids.shape[1], chunk_sizes):
        counts = np.clip(lengths - start, 0, size)
        got = model.forward(ids[:, start:start + size], cache, n_new=counts)
        for b, count in enumerate(counts):
            if count:
                np.testing.assert_allclose(got[b, :count], references[b][start:start + count], rtol=0, atol=tol,
                                           err_msg=f"prefill chunk at {start}, row {b}")
                last[b] = got[b, count - 1]
        np.testing.assert_array_equal(cache.lengths, np.minimum(lengths, start + size))
    for step in range(n_decode):
        tokens = np.array([int(np.argmax(row)) for row in last], dtype=np.int64)
        # Greedy tokens identical: the cached argmax is the recompute's argmax.
        assert tokens.tolist() == [int(np.argmax(r[-1])) for r in references], f"greedy token differs at step {step}"
        got = model.forward(tokens[:, None], cache)
        for b, token in enumerate(tokens):
            sequences[b].append(int(token))
            references[b] = recompute(model, sequences[b], reference_window)
            np.testing.assert_allclose(got[b, 0], references[b][-1], rtol=0, atol=tol,
                                       err_msg=f"decode step {step}, row {b}")
            last[b] = got[b, 0]
        np.testing.assert_array_equal(cache.lengths, [len(s) for s in sequences])


# ---------------------------------------------------------------------------------------------------
# 1. Every cache kind equals recomputing (hypothesis)
# ---------------------------------------------------------------------------------------------------


@st.composite
def scenarios(draw):
    name = draw(st.sampled_from(FIXTURES))
    batch = draw(st.integers(1, 3))
    prompt_lengths = draw(st.lists(st.integers(1, 16), min_size=batch, max_size=batch))
    chunk_sizes = draw(st.lists(st.integers(1, 9), min_size=1, max_size=4))
    n_decode = draw(st.integers(1, 8))
    option = draw(st.integers(1, 8))     # paged block_size, or the sliding window's slack
    seed = draw(st.integers(0, 2**31 - 1))
    return name, prompt_lengths, chunk_sizes, n_decode, option, seed


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None)
@given(scenario=scenarios())
def test_cached_forward_equals_recompute(kind, scenario):
    """Per-step logits through every cache kind == no-cache recompute (float64, 1e-10), greedy tokens
    identical: random fixture, ragged batch, prompt lengths, chunked-prefill split points, decode length."""
    name, prompt_lengths, chunk_sizes, n_decode, option, seed = scenario
    model = model_for(name)
    prompts = random_prompts(model, prompt_lengths, seed)
    total = max(prompt_lengths) + n_decode
    cache = model.new_cache(kind, batch_size=len(prompts), max_seq_len=total, **cache_options(kind, option, total))
    check_cached_forward(model, cache, prompts, chunk_sizes, n_decode)


class SkipsASlotStaticCache(StaticCache):
    """The bug one well-known NumPy LLaMA port shipped: its first decode step wrote the new K/V one
    slot past the prompt, so slot ``prompt_len`` stays empty (zeros) and every later query attends to
    it. Lengths and RoPE positions still look right: only the logits can tell."""

    skip = 0

    def update(self, layer, k_new, v_new):
        if k_new.shape[2] == 1:
            self.skip = 1            # from the first decode step on, every write lands one slot late
        n_new = self._n_new
        q_offset = self.lengths + self.skip
        self.backend.write_kv(self.k[layer], k_new, q_offset, n_new)
        self.backend.write_kv(self.v[layer], v_new, q_offset, n_new)
        lengths = q_offset + n_new
        width = int(lengths.max())
        return KVView(self.k[layer][:, :, :width], self.v[layer][:, :, :width], q_offset, lengths)


@pytest.mark.parametrize("name", FIXTURES)
def test_equivalence_check_catches_a_cache_that_skips_a_slot(name):
    """The property has teeth: the same check passes for StaticCache and fails for the off-by-one cache."""
    model = model_for(name)
    cfg = model.config
    prompts = random_prompts(model, [7, 4], seed=1)
    geometry = (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 2, 20)
    # Chunks of 4 (7 = 4 + 3): no prefill chunk has a single token, which the broken cache would take for decode.
    check_cached_forward(model, StaticCache(*geometry, dtype="float64", backend=model.backend), prompts, [4], 4)
    broken = SkipsASlotStaticCache(*geometry, dtype="float64", backend=model.backend)
    with pytest.raises(AssertionError, match="decode step"):
        # Prefill is right; decode step 0's query already attends to the empty slot.
        check_cached_forward(model, broken, prompts, [4], 4)


# ---------------------------------------------------------------------------------------------------
# 2. Sliding window: the ring buffer equals a recompute restricted to the last W positions
# ---------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(FIXTURES), window=st.integers(1, 8),
       prompt_lengths=st.lists(st.integers(1, 20), min_size=1, max_size=2),
       chunk_sizes=st.lists(st.integers(1, 9), min_size=1, max_size=3), n_decode=st.integers(1, 12),
       seed=st.integers(0, 2**31 - 1))
def test_sliding_cache_equals_windowed_recompute(name, window, prompt_lengths, chunk_sizes, n_decode, seed):
    """A ring of W slots, sequences longer than W (wrap-around in prefill and decode): logits equal
    model.forward(ids, window=W'), W' = min(W, the config's sliding_window) since both windows apply."""
    model = model_for(name)
    prompts = random_prompts(model, prompt_lengths, seed)
    total = max(prompt_lengths) + n_decode
    cache = model.new_cache("sliding", batch_size=len(prompts), max_seq_len=total, window=window)
    # The ring never exceeds the model's own window: slots beyond it could never be attended to.
    effective = min(window, model.config.sliding_window or window)
    assert cache.window == min(effective, total)
    check_cached_forward(model, cache, prompts, chunk_sizes, n_decode, reference_window=effective)
    # Memory stays window-sized however long the sequences got.
    assert cache.k[0].shape[2] == cache.window


def test_mistral_window_fixture_uses_its_config_window():
    """mistral_window's config says sliding_window=4: new_cache("sliding") takes W=4 from it, and every
    cache kind reproduces the plain forward (which applies the config window) over 30 positions."""
    model = model_for("mistral_window")
    assert model.config.sliding_window == 4
    prompts = random_prompts(model, [13, 9], seed=7)
    sliding = model.new_cache("sliding", batch_size=2, max_seq_len=30)
    assert sliding.window == 4
    check_cached_forward(model, sliding, prompts, [5], 17)
    assert sliding.nbytes == 2 * 2 * 2 * 4 * 2 * 8 * 8       # layers=2, batch=2, W=4, kv=2, hd=8, float64
    # The window really matters here: a full-attention recompute differs.
    seq = prompts[0] + [1, 2, 3]
    full_attention = Transformer(model.config.replace(sliding_window=None), model.weights, dtype=model.dtype)
    assert np.abs(recompute(model, seq) - recompute(full_attention, seq)).max() > 1e-3
    for kind in ("concat", "static", "paged"):
        check_cached_forward(model, model.new_cache(kind, batch_size=2, max_seq_len=30), prompts, [4, 6], 17)


# ---------------------------------------------------------------------------------------------------
# 3. The interface: lengths, capacity, nbytes, reset, free, float16, save/load
# ---------------------------------------------------------------------------------------------------


def expected_nbytes(kind, cfg, lengths, *, max_seq_len, window, block_size, itemsize):
    """2 * layers * batch * positions * kv_heads * head_dim * itemsize, with positions per kind, from
    the numbers the test chose (independent of cache.py's own arithmetic)."""
    batch = len(lengths)
    per_position = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize
    if kind == "static":
        return per_position * batch * max_seq_len
    if kind == "concat":
        return per_position * batch * int(max(lengths))    # one array as long as the longest sequence
    if kind == "sliding":
        return per_position * batch * window
    # paged: the blocks actually held, ceil(length / block_size) per sequence (batch is inside the count)
    blocks = sum(-(-int(n) // block_size) for n in lengths)
    return per_position * blocks * block_size


def held_array_bytes(kind, cache):
    """What the cache's arrays really occupy (the paged pool counts only the blocks in use)."""
    if kind == "paged":
        per_block = cache.k_pool[0].nbytes // cache.num_blocks
        return 2 * cache.n_layers * per_block * cache.blocks_in_use
    return sum(a.nbytes for a in cache.k) + sum(a.nbytes for a in cache.v)


@pytest.mark.parametrize("kind", KINDS)
def test_lengths_capacity_and_nbytes_formula(kind):
    model = model_for("llama_gqa")
    cfg = model.config
    options = {"paged": {"block_size": 3}, "sliding": {"window": 5}}.get(kind, {})
    cache = model.new_cache(kind, batch_size=2, max_seq_len=24, **options)
    assert cache.capacity == 24
    np.testing.assert_array_equal(cache.lengths, [0, 0])
    prompts = random_prompts(model, [7, 11], seed=3)
    ids, lengths = padded(prompts)
    model.forward(ids, cache, n_new=lengths)
    for step in range(1, 4):
        model.forward(np.array([[5], [6]]), cache)
        lengths = lengths + 1
        np.testing.assert_array_equal(cache.lengths, lengths)
        assert cache.nbytes == expected_nbytes(kind, cfg, lengths, max_seq_len=24, window=5, block_size=3, itemsize=8)
        assert cache.nbytes == held_array_bytes(kind, cache)
    if kind == "paged":
        assert cache.blocks_in_use == -(-14 // 3) + -(-10 // 3)
    if kind == "sliding":
        assert cache.window == 5


@pytest.mark.parametrize("kind", KINDS)
def test_reset_reuses_the_cache_with_identical_results(kind):
    """A reset cache (stale K/V still in its memory) gives bit-identical logits to a fresh one."""
    model = model_for("qwen2_bias")
    options = {"paged": {"block_size": 4}, "sliding": {"window": 6}}.get(kind, {})
    used = model.new_cache(kind, batch_size=2, max_seq_len=20, **options)
    ids, lengths = padded(random_prompts(model, [9, 5], seed=11))
    model.forward(ids, used, n_new=lengths)
    model.forward(np.array([[3], [4]]), used)
    used.reset()
    np.testing.assert_array_equal(used.lengths, [0, 0])
    fresh = model.new_cache(kind, batch_size=2, max_seq_len=20, **options)
    if kind == "paged":
        assert used.blocks_in_use == 0 and used.nbytes == 0
    ids, lengths = padded(random_prompts(model, [4, 8], seed=12))
    np.testing.assert_array_equal(model.forward(ids, used, n_new=lengths),
                                  model.forward(ids, fresh, n_new=lengths))
    for token in (7, 8, 9):
        np.testing.assert_array_equal(model.forward(np.full((2, 1), token), used),
                                      model.forward(np.full((2, 1), token), fresh))
    assert used.nbytes == fresh.nbytes


def test_paged_free_returns_blocks_and_the_row_can_be_reused():
    model = model_for("llama_mqa_tied")
    cfg = model.config
    cache = model.new_cache("paged", batch_size=2, max_seq_len=32, block_size=4)
    assert cache.num_blocks == 2 * 8 and cache.nbytes == 0
    prompts = random_prompts(model, [7, 3], seed=5)
    ids, lengths = padded(prompts)
    model.forward(ids, cache, n_new=lengths)
    assert cache.blocks_in_use == 2 + 1
    row0_blocks = {int(x) for x in cache.block_table[0] if x >= 0}
    cache.free(0)
    np.testing.assert_array_equal(cache.lengths, [0, 3])
    assert cache.blocks_in_use == 1
    assert row0_blocks <= set(cache.free_blocks)
    assert cache.nbytes == 2 * cfg.n_layers * 1 * 4 * cfg.n_kv_heads * cfg.head_dim * 8
    # Row 0 takes a new prompt while row 1 continues: both still equal their recompute.
    new_prompt = random_prompts(model, [5], seed=6)[0]
    ids = np.zeros((2, 5), dtype=np.int64)
    ids[0] = new_prompt
    got = model.forward(ids, cache, n_new=[5, 0])
    np.testing.assert_allclose(got[0], recompute(model, new_prompt), rtol=0, atol=EXACT)
    sequences = [new_prompt, prompts[1]]
    for token in (10, 11, 12, 13):
        got = model.forward(np.full((2, 1), token), cache)
        for b in range(2):
            sequences[b] = sequences[b] + [token]
            np.testing.assert_allclose(got[b, 0], recompute(model, sequences[b])[-1], rtol=0, atol=EXACT)
    with pytest.raises(InvalidInputError, match="out of range"):
        cache.free(2)


@pytest.mark.parametrize("kind", KINDS)
def test_float16_storage_halves_nbytes_and_stays_close(kind):
    """A float32 model with a float16 cache: nbytes is exactly half the float32 cache's, logits stay
    float32 and within 1e-2 of the float32 cache's relative to the largest logit (float16 keeps ~3
    significant digits of K and V), and the greedy tokens of this fixed 12-step run are identical
    (observed: max relative logit difference 8.5e-4, i.e. ~2.5e-3 absolute, while the smallest gap
    between the top two logits in this run is 7.9e-3, so no token can flip)."""
    model = model_for("llama_gqa", "float32")
    options = {"paged": {"block_size": 4}, "sliding": {"window": 32}}.get(kind, {})
    half = model.new_cache(kind, batch_size=2, max_seq_len=32, dtype="float16", **options)
    full = model.new_cache(kind, batch_size=2, max_seq_len=32, **options)
    assert half.dtype == np.float16 and full.dtype == np.float32
    ids, lengths = padded(random_prompts(model, [10, 6], seed=21))
    a, b = model.forward(ids, half, n_new=lengths), model.forward(ids, full, n_new=lengths)
    tokens_half, tokens_full = [], []
    for step in range(12):
        assert a.dtype == np.float32
        last_a = a[np.arange(2), (lengths - 1) if step == 0 else 0]
        last_b = b[np.arange(2), (lengths - 1) if step == 0 else 0]
        assert np.abs(last_a - last_b).max() <= 1e-2 * np.abs(last_b).max()
        tokens_half.append(last_a.argmax(-1))
        tokens_full.append(last_b.argmax(-1))
        # Feed the float32 path's tokens to both, so one flipped token cannot derail the comparison.
        a = model.forward(tokens_full[-1][:, None], half)
        b = model.forward(tokens_full[-1][:, None], full)
    np.testing.assert_array_equal(tokens_half, tokens_full)
    assert half.nbytes * 2 == full.nbytes > 0


@pytest.mark.parametrize("cache_dtype", [None, "float16"])
@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_continue_with_identical_logits(kind, cache_dtype, tmp_path):
    """A prefilled cache written with save() and read with load_cache() continues bit-identically."""
    model = model_for("gpt2")
    options = {"paged": {"block_size": 3}, "sliding": {"window": 5}}.get(kind, {})
    cache = model.new_cache(kind, batch_size=2, max_seq_len=24, dtype=cache_dtype, **options)
    ids, lengths = padded(random_prompts(model, [8, 5], seed=31))
    model.forward(ids, cache, n_new=lengths)
    path = cache.save(tmp_path / f"{kind}.safetensors")
    loaded = load_cache(path, backend=model.backend)
    assert type(loaded) is type(cache)
    assert (loaded.kind, loaded.capacity, loaded.dtype, loaded.nbytes) == (cache.kind, cache.capacity, cache.dtype,
                                                                              cache.nbytes)
    np.testing.assert_array_equal(loaded.lengths, cache.lengths)
    if kind == "paged":
        np.testing.assert_array_equal(loaded.block_table, cache.block_table)
        assert sorted(loaded.free_blocks) == sorted(cache.free_blocks)
    if kind == "sliding":
        assert loaded.window == cache.window
    for token in (4, 40, 44, 14, 41, 1, 2):        # runs past the sliding window and into new pages
        a = model.forward(np.full((2, 1), token), cache)
        b = model.forward(np.full((2, 1), token), loaded)
        np.testing.assert_array_equal(a, b)


def test_load_cache_refuses_a_file_that_is_not_a_cache(tmp_path):
    bogus = tmp_path / "not_a_cache.safetensors"
    bogus.write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="not a readable minikv cache"):
        load_cache(bogus)
    with pytest.raises(CheckpointError, match="format version"):
        load_cache(FIXTURE_ROOT / "gpt2" / "model.safetensors")


# ---------------------------------------------------------------------------------------------------
# 4. Errors: overflow without lost state, pool exhaustion, a cache for another model or batch
# ---------------------------------------------------------------------------------------------------


def visible_kv(cache):
    """Every K/V slot a later query can read, per layer and sequence, copied: positions 0..length-1
    (through the block table for paged; the ring's filled slots for sliding). Slots past a sequence's
    length are free to hold anything: no query reads them."""
    out = []
    for layer in range(cache.n_layers):
        for b, length in enumerate(cache.lengths.tolist()):
            if isinstance(cache, PagedCache):
                positions = np.arange(length)
                blocks = cache.block_table[b, positions // cache.block_size]
                for pool in (cache.k_pool[layer], cache.v_pool[layer]):
                    out.append(pool[blocks, :, positions % cache.block_size].copy())
            else:
                filled = min(length, getattr(cache, "window", length))
                out += [cache.k[layer][b, :, :filled].copy(), cache.v[layer][b, :, :filled].copy()]
    return out


def snapshot(cache):
    if isinstance(cache, PagedCache):
        return visible_kv(cache), cache.block_table.copy(), list(cache.free_blocks), cache.lengths.copy()
    return visible_kv(cache), cache.lengths.copy()


def assert_same_state(before, after):
    for x, y in zip(before, after):
        if isinstance(x, list) and x and isinstance(x[0], np.ndarray):
            assert len(x) == len(y)
            for a, b in zip(x, y):
                np.testing.assert_array_equal(a, b)
        elif isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y


@pytest.mark.parametrize("kind", KINDS)
def test_writing_past_capacity_raises_with_the_numbers_and_loses_nothing(kind):
    model = model_for("mistral")
    options = {"paged": {"block_size": 3}, "sliding": {"window": 4}}.get(kind, {})
    cache = model.new_cache(kind, batch_size=1, max_seq_len=8, **options)
    prompt = random_prompts(model, [6], seed=41)[0]
    model.forward(np.array([prompt]), cache)
    before = snapshot(cache)
    with pytest.raises(CacheOverflowError) as info:
        model.forward(np.array([[1, 2, 3]]), cache)
    message = str(info.value)
    assert re.search(r"holds 8 positions; writing 3 more at position 6", message), message
    assert "max_seq_len>=9" in message
    assert_same_state(before, snapshot(cache))
    # Nothing was lost: the cache continues exactly as if the failed call never happened.
    sequence = prompt + [1, 2]
    got = model.forward(np.array([[1, 2]]), cache)
    window = cache.window if kind == "sliding" else None
    np.testing.assert_allclose(got[0], recompute(model, sequence, window)[-2:], rtol=0, atol=EXACT)
    with pytest.raises(CacheOverflowError, match=r"writing 1 more at position 8"):
        model.forward(np.array([[1]]), cache)
    np.testing.assert_array_equal(cache.lengths, [8])


def test_paged_pool_exhaustion_raises_and_keeps_the_pool():
    model = model_for("llama_gqa")
    cache = model.new_cache("paged", batch_size=2, max_seq_len=16, block_size=4, num_blocks=3)
    ids, lengths = padded(random_prompts(model, [4, 4], seed=42))
    model.forward(ids, cache, n_new=lengths)          # 2 of the 3 blocks
    before = snapshot(cache)
    with pytest.raises(CacheOverflowError) as info:
        model.forward(np.array([[1], [2]]), cache)       # both rows cross into a new block: needs 2, 1 free
    message = str(info.value)
    assert "3 blocks of 4 positions and 1 free" in message and "needs 2 more" in message, message
    assert "num_blocks>=4" in message, message
    assert_same_state(before, snapshot(cache))
    # Freeing a finished sequence is the other fix: then the remaining row fits.
    cache.free(0)
    got = model.forward(np.array([[0], [2]]), cache, n_new=[0, 1])
    np.testing.assert_allclose(got[1, 0], recompute(model, ids[1].tolist() + [2])[-1], rtol=0, atol=EXACT)


def test_paged_blocks_reserved_by_a_failed_call_go_back_to_the_pool():
    """reserve takes blocks before the layers write; if the forward then fails, rollback gives them
    back, so the pool is as before and another sequence's request is checked against all free blocks."""
    model = model_for("llama_gqa")
    cache = model.new_cache("paged", batch_size=2, max_seq_len=16, block_size=2, num_blocks=4)
    prompt = random_prompts(model, [6], seed=43)[0]
    ids = np.zeros((2, 6), dtype=np.int64)
    ids[0] = prompt
    before = snapshot(cache)

    def failing_update(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    cache.update = failing_update
    with pytest.raises(RuntimeError, match="simulated"):
        model.forward(ids, cache, n_new=[6, 0])
    del cache.update
    assert_same_state(before, snapshot(cache))
    assert cache.blocks_in_use == 0
    got = model.forward(np.array([[5, 0, 0], [1, 2, 3]]), cache, n_new=[1, 3])     # 1 + 2 blocks of 4 free
    np.testing.assert_allclose(got[1], recompute(model, [1, 2, 3]), rtol=0, atol=EXACT)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_a_forward_that_fails_at_any_layer_leaves_the_cache_exactly_as_it_was(kind, data):
    """Transactional writes: an exception injected after a random number of layers have written their
    K/V (even a BaseException such as KeyboardInterrupt) leaves lengths, every slot, the block table
    and the free list exactly as before the call, and the cache then continues as if it never happened.
    The sliding ring is the hard case: its writes overwrite slots that are still visible."""
    model = model_for(data.draw(st.sampled_from(FIXTURES), label="fixture"))
    prompt_lengths = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=2), label="prompt lengths")
    n_fail = data.draw(st.integers(1, 6), label="tokens of the failing call")
    fail_at = data.draw(st.integers(0, model.config.n_layers - 1), label="failing layer")
    prompts = random_prompts(model, prompt_lengths, seed=data.draw(st.integers(0, 2**16), label="seed"))
    options = {"paged": {"block_size": 3}, "sliding": {"window": 5}}.get(kind, {})
    cache = model.new_cache(kind, batch_size=len(prompts), max_seq_len=32, **options)
    ids, lengths = padded(prompts)
    model.forward(ids, cache, n_new=lengths)
    before = snapshot(cache)
    forward_failing_at_layer(model, cache, np.ones((len(prompts), n_fail), dtype=np.int64), fail_at)
    assert_same_state(before, snapshot(cache))
    got = model.forward(np.full((len(prompts), 1), 2, dtype=np.int64), cache, last_only=True)
    for b, prompt in enumerate(prompts):
        np.testing.assert_allclose(got[b], recompute(model, prompt + [2], getattr(cache, "window", None))[-1],
                                   rtol=0, atol=EXACT)


@pytest.mark.parametrize("change", ["n_layers", "n_kv_heads", "head_dim", "batch_size"])
def test_cache_for_another_model_or_batch_is_refused(change):
    model = model_for("llama_gqa")
    cfg = model.config
    geometry = {"n_layers": cfg.n_layers, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "batch_size": 1}
    geometry[change] += 1
    cache = make_cache("static", max_seq_len=16, dtype="float64", backend=model.backend, **geometry)
    with pytest.raises(CacheMismatchError) as info:
        model.forward(np.array([[1, 2, 3]]), cache)
    message = str(info.value)
    if change == "batch_size":
        assert "batch_size=2" in message and "1 rows" in message, message
    else:
        wrong = (geometry["n_layers"], geometry["n_kv_heads"], geometry["head_dim"])
        assert str(wrong) in message and str((cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)) in message, message
    np.testing.assert_array_equal(cache.lengths, np.zeros(geometry["batch_size"]))


def test_cache_of_another_checkpoint_is_refused():
    other = model_for("llama_mqa_tied").new_cache("paged", batch_size=1, max_seq_len=16)
    with pytest.raises(CacheMismatchError, match="kv_heads"):
        model_for("llama_gqa").forward(np.array([[1, 2]]), other)


# ---------------------------------------------------------------------------------------------------
# 5. Allocation: the static cache's decode step does not grow with the sequence; concat's does
# ---------------------------------------------------------------------------------------------------


N_LAYERS, N_KV, HEAD_DIM = 2, 2, 8


def decode_step_peak_bytes(kind, length):
    """tracemalloc peak of one decode step's cache work (reserve, update on every layer, advance) of a
    cache already holding ``length`` positions. Only the cache is measured: attention is the model's
    (and its score buffer grows with t for every kind)."""
    options = {"paged": {"block_size": 16}, "sliding": {"window": 1024}}.get(kind, {})
    cache = make_cache(kind, n_layers=N_LAYERS, n_kv_heads=N_KV, head_dim=HEAD_DIM, batch_size=1, max_seq_len=1024,
                       dtype="float64", backend=Backend(), **options)
    rng = np.random.default_rng(0)
    prompt_k = rng.standard_normal((1, N_KV, length, HEAD_DIM))
    n = np.array([length])
    cache.reserve(n)
    for layer in range(N_LAYERS):
        cache.update(layer, prompt_k, prompt_k)
    cache.advance(n)
    k_new = np.ones((1, N_KV, 1, HEAD_DIM))
    one = np.ones(1, dtype=np.int64)
    step = [lambda: cache.reserve(one)] + [
        (lambda layer=layer: cache.update(layer, k_new, k_new)) for layer in range(N_LAYERS)
    ] + [lambda: cache.advance(one)]
    for call in step:                 # warm up once (first-call caches, e.g. the paged device table)
        call()
    tracemalloc.start()
    try:
        for call in step:
            call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert cache.lengths[0] == length + 2
    return peak


def test_static_decode_allocations_do_not_grow_with_length_but_concat_copies():
    copy_bytes = 2 * N_LAYERS * N_KV * HEAD_DIM * 8           # one position of K and V, every layer, float64
    growth = {kind: decode_step_peak_bytes(kind, 512) - decode_step_peak_bytes(kind, 64) for kind in KINDS}
    # Static, paged and sliding write one position in place: 8x the length, no more bytes per step
    # (a few hundred bytes of Python/NumPy bookkeeping noise allowed; one position is 512 bytes here,
    # a growing copy would be 448 positions = 229 KB).
    for kind in ("static", "paged", "sliding"):
        assert abs(growth[kind]) < copy_bytes, (kind, growth)
    # Concat allocates a new K and V one step longer for every layer: its peak grows by at least the
    # 448 extra positions it copies.
    assert growth["concat"] >= (512 - 64) * copy_bytes, growth


def test_static_cache_writes_in_place():
    model = model_for("llama_gqa")
    cache = model.new_cache("static", batch_size=1, max_seq_len=16)
    arrays = list(cache.k) + list(cache.v)
    model.forward(np.array([[1, 2, 3, 4]]), cache)
    for token in (5, 6, 7):
        model.forward(np.array([[token]]), cache)
    assert all(a is b for a, b in zip(arrays, list(cache.k) + list(cache.v)))
    # Positions 0..6 were written, 7.. never touched.
    assert np.abs(cache.k[0][0, :, :7]).sum(axis=-1).min() > 0 and np.abs(cache.k[0][0, :, 7:]).max() == 0


def test_concat_counts_its_copies():
    """bytes_copied = the O(t^2) cost: each step copies the whole cache once per layer for K and V."""
    model = model_for("llama_gqa")
    cfg = model.config
    cache = model.new_cache("concat", batch_size=1, max_seq_len=16)
    model.forward(np.array([[1, 2, 3, 4]]), cache)
    for token in (5, 6, 7):
        model.forward(np.array([[token]]), cache)
    per_position = 2 * cfg.n_kv_heads * cfg.head_dim * 8 * cfg.n_layers
    assert cache.bytes_copied == per_position * (0 + 4 + 5 + 6)


# ---------------------------------------------------------------------------------------------------
# 6. dtype discipline
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["qwen2_bias", "gpt2"])
def test_float32_model_gives_float32_logits_through_every_cache(kind, name):
    model = model_for(name, "float32")
    cache = model.new_cache(kind, batch_size=2, max_seq_len=20)
    assert cache.dtype == np.float32
    prompts = random_prompts(model, [6, 3], seed=51)
    ids, lengths = padded(prompts)
    logits = model.forward(ids, cache, n_new=lengths)
    assert logits.dtype == np.float32
    for token in (1, 2, 3):
        logits = model.forward(np.full((2, 1), token), cache)
        assert logits.dtype == np.float32
    arrays = cache.k_pool if kind == "paged" else cache.k
    assert all(a.dtype == np.float32 for a in arrays)
    # float32 through the cache stays close to the float32 recompute (round-off only: 1e-4 on logits ~3).
    np.testing.assert_allclose(logits[1, 0], model.forward(np.array([prompts[1] + [1, 2, 3]]))[0, -1], atol=1e-4)
