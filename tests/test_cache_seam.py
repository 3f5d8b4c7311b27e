"""The cache seam: a cache stores, the model attends (minikv/cache.py's reserve / update / advance /
rollback / truncate).

* ``update`` returns everything written so far: driven directly with random K/V in ragged chunks,
  the view of every kind holds exactly the K/V written for positions 0..length-1 of each sequence
  (read through the block table for paged), and attention over the view equals attention over
  everything written (the ring's slots are in ring order, which attention does not care about).
* ``truncate`` then re-feed == never having fed: logits through a rewound cache equal those of a
  fresh cache fed only the kept tokens and the new ones (float64, 1e-10), for every kind; a ring
  that has overwritten the positions it would need raises ``CacheRewindError`` and changes nothing.
* A deliberately broken rewind (lengths lowered but paged blocks kept, or a ring rewound past what
  it holds) is caught by the same checks.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_fixtures import FIXTURES, model_for, random_prompts
from minikv import attention
from minikv.backend import Backend, gather_pages
from minikv.cache import PagedCache, SlidingCache, make_cache
from minikv.errors import CacheRewindError, InvalidInputError

KINDS = ("concat", "static", "paged", "sliding")
EXACT = 1e-10
N_LAYERS, N_KV, N_HEADS, HEAD_DIM = 2, 2, 4, 4


def contiguous(view):
    """The view's K and V as (batch, kv, width, hd) arrays (paged: gathered through the block table)."""
    if view.block_table is None:
        return view.k, view.v
    return gather_pages(view.k, view.block_table), gather_pages(view.v, view.block_table)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_update_returns_everything_written_so_far(kind, data):
    batch = data.draw(st.integers(1, 3), label="batch")
    window = data.draw(st.integers(2, 9), label="ring window")
    options = {"paged": {"block_size": data.draw(st.integers(1, 5), label="block size")},
               "sliding": {"window": window}}.get(kind, {})
    cache = make_cache(kind, n_layers=N_LAYERS, n_kv_heads=N_KV, head_dim=HEAD_DIM, batch_size=batch,
                       max_seq_len=40, dtype="float64", backend=Backend(), **options)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    written = [[np.zeros((N_KV, 0, HEAD_DIM)) for _ in range(batch)] for _ in range(N_LAYERS)]
    for _ in range(data.draw(st.integers(1, 6), label="steps")):
        seq = data.draw(st.integers(1, 6), label="seq")
        n_new = np.array(data.draw(st.lists(st.integers(0, seq), min_size=batch, max_size=batch), label="n_new"))
        if seq == 1:
            n_new[:] = 1               # a decode step feeds every sequence, as generation does
        if (cache.lengths + n_new).max() > 40:
            break
        before = cache.lengths.copy()
        cache.reserve(n_new)
        for layer in range(N_LAYERS):
            k_new, v_new = rng.standard_normal((2, batch, N_KV, seq, HEAD_DIM))
            view = cache.update(layer, k_new, v_new)
            for b in range(batch):
                written[layer][b] = np.concatenate([written[layer][b], k_new[b, :, :n_new[b]]], axis=1)
            np.testing.assert_array_equal(view.lengths - view.q_offset, n_new)
            k_view, _ = contiguous(view)
            q = rng.standard_normal((batch, N_HEADS, seq, HEAD_DIM))
            for b in range(batch):
                everything = written[layer][b]                      # (kv, length, hd) keys written so far
                if isinstance(cache, SlidingCache):
                    # Attention over the view == attention over the last `window` keys written.
                    keep = min(everything.shape[1], window + n_new[b] - 1) if seq > 1 else min(everything.shape[1], window)
                    reference_k = everything[:, everything.shape[1] - keep:]
                    got = attention.naive(q[b:b + 1, :, :n_new[b]], k_view[b:b + 1, :, :view.lengths[b]],
                                          k_view[b:b + 1, :, :view.lengths[b]], q_offset=int(view.q_offset[b]),
                                          window=window)
                    want = attention.naive(q[b:b + 1, :, :n_new[b]], reference_k[None], reference_k[None],
                                           q_offset=keep - int(n_new[b]), window=window)
                    np.testing.assert_allclose(got, want, rtol=0, atol=EXACT)
                else:
                    np.testing.assert_array_equal(k_view[b, :, :view.lengths[b]], everything)
                    assert view.q_offset[b] == before[b]
        cache.advance(n_new)


def fed(model, cache, tokens_per_call):
    """Feed each (batch, seq) array of tokens in turn; return the last call's logits."""
    for ids in tokens_per_call:
        logits = model.forward(np.asarray(ids, dtype=np.int64), cache)
    return logits


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_rewind_then_refeed_equals_never_having_fed(kind, data):
    model = model_for(data.draw(st.sampled_from(FIXTURES), label="fixture"))
    prompt_len = data.draw(st.integers(1, 12), label="prompt length")
    extra = data.draw(st.integers(1, 6), label="tokens fed then dropped")
    dropped = data.draw(st.integers(1, extra), label="tokens dropped")
    refeed = data.draw(st.integers(1, 4), label="tokens fed after the rewind")
    prompt, more, after = random_prompts(model, [prompt_len, extra, refeed],
                                         seed=data.draw(st.integers(0, 2**16), label="seed"))
    options = {"paged": {"block_size": 3}, "sliding": {"window": data.draw(st.integers(2, 12), label="ring")}}
    cache = model.new_cache(kind, batch_size=1, max_seq_len=40, **options.get(kind, {}))
    fed(model, cache, [[prompt], [more]])
    keep = prompt_len + extra - dropped
    kept = (prompt + more)[:keep]
    if isinstance(cache, SlidingCache) and prompt_len + extra > cache.window and dropped > 1:
        before = [k.copy() for k in cache.k], cache.lengths.copy()
        with pytest.raises(CacheRewindError, match="overwritten"):
            cache.truncate([keep])
        np.testing.assert_array_equal(before[1], cache.lengths)
        return
    cache.truncate([keep])
    if isinstance(cache, PagedCache):
        assert cache.blocks_in_use == -(-keep // cache.block_size)     # the dropped blocks went back
    got = fed(model, cache, [[after]])
    fresh = model.new_cache(kind, batch_size=1, max_seq_len=40, **options.get(kind, {}))
    want = fed(model, fresh, [[kept], [after]])
    np.testing.assert_allclose(got, want, rtol=0, atol=EXACT)


def test_a_rewind_that_keeps_stale_lengths_is_caught():
    """The rewind property has teeth: lowering lengths by one too few (a classic off-by-one when
    counting rejected draft tokens) changes the logits beyond the tolerance."""
    model = model_for(FIXTURES[0])
    prompt, more, after = random_prompts(model, [6, 4, 2], seed=3)
    cache = model.new_cache("static", batch_size=1, max_seq_len=40)
    fed(model, cache, [[prompt], [more]])
    cache.truncate([len(prompt) + 1])                  # should have been len(prompt): one stale token kept
    got = fed(model, cache, [[after]])
    want = fed(model, model.new_cache("static", batch_size=1, max_seq_len=40), [[prompt], [after]])
    assert np.abs(got - want).max() > 1e-3


@pytest.mark.parametrize("bad", [[5], [-1], [1.5], [[1, 2]], "a"])
def test_truncate_refuses_lengths_it_cannot_take(bad):
    cache = make_cache("static", n_layers=1, n_kv_heads=1, head_dim=2, batch_size=1, max_seq_len=8)
    cache.reserve(np.array([3]))
    cache.advance(np.array([3]))
    with pytest.raises(InvalidInputError, match="truncate"):
        cache.truncate(bad)
    np.testing.assert_array_equal(cache.lengths, [3])


def test_reserve_is_a_visible_step_and_check_room_changes_nothing():
    """check_room only checks; reserve claims (paged: takes blocks from the free list)."""
    cache = make_cache("paged", n_layers=1, n_kv_heads=1, head_dim=2, batch_size=2, max_seq_len=8,
                       block_size=2, num_blocks=4)
    cache.check_room(np.array([3, 1]))
    assert cache.blocks_in_use == 0
    cache.reserve(np.array([3, 1]))
    assert cache.blocks_in_use == 3
    cache.rollback()
    assert cache.blocks_in_use == 0 and cache.free_blocks == [0, 1, 2, 3]
