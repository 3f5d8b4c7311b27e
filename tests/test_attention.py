"""Property tests for minikv.attention: four algorithms, one answer.

Tolerances
----------
float64: rtol = atol = 1e-12.  The algorithms only reorder the same sums
(blocks, splits, one key at a time), which moves a result by a few ulps
(~1e-16 each) times at most a few dozen terms here: far below 1e-12.

float32: atol = rtol = 2e-5.  Same reasoning with eps = 6e-8: with <= 40 keys
and head_dim <= 16, reordering sums moves a result by ~n * eps ~ 2.4e-6 at
worst; exp() of a score that differs by an ulp of the score (~4e-7 for |s|~4)
moves a weight by the same relative amount.  2e-5 leaves a ~10x margin while
still catching any real error (a wrong mask or a missing rescale is O(1e-2)).
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minikv import attention
from minikv.attention import (
    decode,
    merge_partials,
    naive,
    naive_softmax,
    online,
    stable_softmax,
    tiled,
    visible_mask,
)
from minikv.errors import InvalidInputError

# Any RuntimeWarning (overflow, invalid value in subtract, divide by zero) is a failure:
# the algorithms must handle -inf and fully masked rows without tripping NumPy.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

TOL = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=2e-5, atol=2e-5)}


# ---------------------------------------------------------------------------
# Strategies and the brute-force reference
# ---------------------------------------------------------------------------


@st.composite
def attention_cases(draw, max_seq_q=10, max_seq_k=24, dtypes=(np.float64, np.float32)):
    """A random attention problem: shapes, masks and the arrays themselves."""
    batch = draw(st.integers(1, 3))
    n_kv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    seq_q = draw(st.integers(1, max_seq_q))
    seq_k = draw(st.integers(1, max_seq_k))
    head_dim = draw(st.integers(1, 16))
    dtype = draw(st.sampled_from(dtypes))
    causal = draw(st.booleans())
    if draw(st.booleans()):
        q_offset = draw(st.integers(-2, seq_k))
    else:
        q_offset = np.array(draw(st.lists(st.integers(-2, seq_k), min_size=batch, max_size=batch)))
    lengths = draw(
        st.none() | st.lists(st.integers(0, seq_k), min_size=batch, max_size=batch).map(np.array)
    )
    window = draw(st.none() | st.integers(1, seq_k + 2))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, n_kv * group, seq_q, head_dim)).astype(dtype)
    k = rng.standard_normal((batch, n_kv, seq_k, head_dim)).astype(dtype)
    v = rng.standard_normal((batch, n_kv, seq_k, head_dim)).astype(dtype)
    masks = dict(causal=causal, q_offset=q_offset, lengths=lengths, window=window)
    return q, k, v, masks


def brute_force(q, k, v, causal=True, q_offset=0, lengths=None, window=None, scale=None):
    """Attention one query row at a time, straight from the definition (float64)."""
    batch, n_heads, seq_q, head_dim = q.shape
    n_kv, seq_k = k.shape[1], k.shape[2]
    group = n_heads // n_kv
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    offsets = np.broadcast_to(np.asarray(q_offset), (batch,))
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    lse = np.full(q.shape[:3], -np.inf)
    for b in range(batch):
        for h in range(n_heads):
            for i in range(seq_q):
                pos = int(offsets[b]) + i
                keys = [
                    j
                    for j in range(seq_k)
                    if (not causal or j <= pos)
                    and (lengths is None or j < lengths[b])
                    and (window is None or pos - j < window)
                ]
                if not keys:
                    continue  # sees nothing: zeros and -inf
                kv = h // group
                scores = np.array(
                    [scale * float(np.dot(q[b, h, i].astype(float), k[b, kv, j].astype(float))) for j in keys]
                )
                top = scores.max()
                weights = np.exp(scores - top)
                out[b, h, i] = weights @ v[b, kv, keys].astype(float) / weights.sum()
                lse[b, h, i] = top + math.log(weights.sum())
    return out, lse


def assert_lse_close(lse, expected, **tol):
    """-inf exactly where expected is -inf, close elsewhere, never NaN."""
    assert not np.isnan(lse).any()
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(lse[finite], expected[finite], **tol)


# ---------------------------------------------------------------------------
# naive against the definition
# ---------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(attention_cases(max_seq_q=6, max_seq_k=10, dtypes=(np.float64,)))
def test_naive_matches_brute_force_reference(case):
    q, k, v, masks = case
    out, lse = naive(q, k, v, return_lse=True, **masks)
    expected_out, expected_lse = brute_force(q, k, v, **masks)
    np.testing.assert_allclose(out, expected_out, rtol=1e-12, atol=1e-12)
    assert_lse_close(lse, expected_lse, rtol=1e-12, atol=1e-12)


def test_visible_mask_small_example():
    # query positions 2, 3 (q_offset=2); keys 0..4; window 2; sequence length 4
    mask = visible_mask(2, 5, q_offset=2, lengths=np.array([4]), window=2, causal=True)
    assert mask.shape == (1, 1, 1, 2, 5)
    expected = np.array(
        [
            [0, 1, 1, 0, 0],  # pos 2 sees 1, 2 (window 2; 3 and 4 are in the future)
            [0, 0, 1, 1, 0],  # pos 3 sees 2, 3 (4 is past the length)
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(mask[0, 0, 0], expected)
    # per-sequence offsets give one mask per sequence
    per_seq = visible_mask(1, 3, q_offset=np.array([0, 2]), causal=True)
    np.testing.assert_array_equal(per_seq[:, 0, 0, 0], [[1, 0, 0], [1, 1, 1]])


# ---------------------------------------------------------------------------
# online, tiled and decode against naive
# ---------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(attention_cases())
def test_online_equals_naive(case):
    q, k, v, masks = case
    out, lse = online(q, k, v, return_lse=True, **masks)
    expected_out, expected_lse = naive(q, k, v, return_lse=True, **masks)
    tol = TOL[q.dtype.type]
    assert out.dtype == q.dtype and lse.dtype == q.dtype
    np.testing.assert_allclose(out, expected_out, **tol)
    assert_lse_close(lse, expected_lse, **tol)


@settings(max_examples=250, deadline=None)
@given(attention_cases(max_seq_q=20, max_seq_k=40), st.integers(1, 9), st.integers(1, 9))
def test_tiled_equals_naive(case, block_q, block_k):
    q, k, v, masks = case
    stats = {}
    out, lse = tiled(q, k, v, return_lse=True, block_q=block_q, block_k=block_k, stats=stats, **masks)
    expected_out, expected_lse = naive(q, k, v, return_lse=True, **masks)
    tol = TOL[q.dtype.type]
    assert out.dtype == q.dtype and lse.dtype == q.dtype
    np.testing.assert_allclose(out, expected_out, **tol)
    assert_lse_close(lse, expected_lse, **tol)
    n_blocks = math.ceil(q.shape[2] / block_q) * math.ceil(k.shape[2] / block_k)
    assert stats["blocks_computed"] + stats["blocks_skipped"] == n_blocks


@settings(max_examples=150, deadline=None)
@given(attention_cases(max_seq_q=1, max_seq_k=40), st.integers(1, 50), st.integers(1, 3))
def test_decode_equals_naive(case, n_splits, seq_q):
    """decode's query i sits at lengths[b] - seq_q + i; n_splits may exceed the number of keys."""
    q, k, v, masks = case
    batch, seq_k = q.shape[0], k.shape[2]
    rng = np.random.default_rng(seq_k)
    q = np.concatenate([q] * seq_q, axis=2)  # seq_q = 1 (the usual) up to 3 new tokens
    lengths = masks["lengths"] if masks["lengths"] is not None else rng.integers(0, seq_k + 1, batch)
    window = masks["window"]
    out, lse = decode(q, k, v, lengths, n_splits=n_splits, window=window, return_lse=True)
    expected_out, expected_lse = naive(
        q, k, v, causal=True, q_offset=lengths - seq_q, lengths=lengths, window=window, return_lse=True
    )
    tol = TOL[q.dtype.type]
    assert out.dtype == q.dtype and lse.dtype == q.dtype
    np.testing.assert_allclose(out, expected_out, **tol)
    assert_lse_close(lse, expected_lse, **tol)


def test_online_handles_a_256_token_sequence():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, 256, 16))
    k = rng.standard_normal((1, 2, 256, 16))
    v = rng.standard_normal((1, 2, 256, 16))
    np.testing.assert_allclose(online(q, k, v), naive(q, k, v), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# Numerical safety: huge logits, fully masked rows
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_scores_of_1e4_stay_finite_and_agree(dtype):
    """Integer q and k with scale=1 make every score an exact integer beyond 1e4 in
    any summation order, so the only possible difference is the softmax itself."""
    rng = np.random.default_rng(1)
    q = rng.integers(-60, 61, (2, 4, 13, 16)).astype(dtype)
    k = rng.integers(-60, 61, (2, 2, 29, 16)).astype(dtype)
    v = rng.standard_normal((2, 2, 29, 16)).astype(dtype)
    scores = np.einsum("bhqd,bhkd->bhqk", q.reshape(2, 2, 26, 16), k)
    assert np.abs(scores).max() > 1e4  # the point of the test: exp(score) overflows
    assert np.abs(scores).max() < 2**24  # still exact integers in float32
    lengths = np.array([29, 17])
    expected_out, expected_lse = naive(q, k, v, scale=1.0, lengths=lengths, q_offset=16, return_lse=True)
    tol = TOL[dtype]
    results = [
        online(q, k, v, scale=1.0, lengths=lengths, q_offset=16, return_lse=True),
        tiled(q, k, v, scale=1.0, lengths=lengths, q_offset=16, return_lse=True, block_q=4, block_k=5),
    ]
    for out, lse in results:
        assert np.isfinite(out).all() and np.isfinite(lse).all()
        assert out.dtype == dtype
        np.testing.assert_allclose(out, expected_out, **tol)
        np.testing.assert_allclose(lse, expected_lse, **tol)
    q_last = q[:, :, -1:]
    out, lse = decode(q_last, k, v, lengths, n_splits=3, scale=1.0, return_lse=True)
    ref_out, ref_lse = naive(q_last, k, v, scale=1.0, lengths=lengths, q_offset=lengths - 1, return_lse=True)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    np.testing.assert_allclose(out, ref_out, **tol)
    np.testing.assert_allclose(lse, ref_lse, **tol)


def test_naive_softmax_overflows_where_stable_and_online_do_not():
    scores = np.array([[1000.0, 999.0, 998.0]])  # float64: exp(1000) = inf
    assert not np.isfinite(naive_softmax(scores)).all()  # inf / inf = nan
    stable = stable_softmax(scores)
    assert np.isfinite(stable).all()
    np.testing.assert_allclose(stable, stable_softmax(scores - 1000.0), rtol=1e-15)
    np.testing.assert_allclose(stable.sum(), 1.0, rtol=1e-15)
    # On modest scores the two agree: only the overflow differs.
    small = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(naive_softmax(small), stable_softmax(small), rtol=1e-15)
    # online attention with those scores (q . k = 1000, 999, 998 with scale 1) is finite
    # and its weights are the stable softmax's.
    q = np.ones((1, 1, 1, 1))
    k = scores.reshape(1, 1, 3, 1)
    v = np.eye(3).reshape(1, 1, 3, 3)
    out = online(q, k, v, causal=False, scale=1.0)
    np.testing.assert_allclose(out[0, 0, 0], stable[0], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fully_masked_rows_give_zeros_and_minus_inf(dtype):
    rng = np.random.default_rng(2)
    q = rng.standard_normal((3, 2, 4, 8)).astype(dtype)
    k = rng.standard_normal((3, 1, 6, 8)).astype(dtype)
    v = rng.standard_normal((3, 1, 6, 8)).astype(dtype)
    # sequence 0: empty cache; sequence 1: queries at positions -4..-1 (before every key);
    # sequence 2: normal.  Rows of 0 and 1 see nothing.
    lengths = np.array([0, 6, 6])
    q_offset = np.array([0, -4, 2])
    calls = [
        naive(q, k, v, q_offset=q_offset, lengths=lengths, return_lse=True),
        online(q, k, v, q_offset=q_offset, lengths=lengths, return_lse=True),
        tiled(q, k, v, q_offset=q_offset, lengths=lengths, return_lse=True, block_q=3, block_k=2),
    ]
    for out, lse in calls:
        assert out.dtype == dtype and not np.isnan(out).any()
        np.testing.assert_array_equal(out[:2], 0)
        assert np.isneginf(lse[:2]).all()
        assert np.isfinite(lse[2]).all() and np.abs(out[2]).sum() > 0
    out, lse = decode(q[:, :, :1], k, v, np.array([0, 0, 5]), return_lse=True)
    np.testing.assert_array_equal(out[:2], 0)
    assert np.isneginf(lse[:2]).all() and np.isfinite(lse[2]).all()


# ---------------------------------------------------------------------------
# dtype discipline
# ---------------------------------------------------------------------------


def test_float32_in_float32_out_everywhere():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 4, 5, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    for fn in (naive, online, tiled):
        out, lse = fn(q, k, v, return_lse=True)
        assert out.dtype == np.float32 and lse.dtype == np.float32, fn.__name__
    out, lse = decode(q[:, :, :1], k, v, np.array([5]), return_lse=True)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    merged_out, merged_lse = merge_partials([out, out], [lse, lse])
    assert merged_out.dtype == np.float32 and merged_lse.dtype == np.float32


def test_float16_cache_with_float32_queries_computes_in_float32():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 2, 3, 8)).astype(np.float32)
    k16 = rng.standard_normal((2, 1, 9, 8)).astype(np.float16)
    v16 = rng.standard_normal((2, 1, 9, 8)).astype(np.float16)
    k32, v32 = k16.astype(np.float32), v16.astype(np.float32)
    expected = naive(q, k32, v32, q_offset=6)
    for out in (
        naive(q, k16, v16, q_offset=6),
        online(q, k16, v16, q_offset=6),
        tiled(q, k16, v16, q_offset=6, block_q=2, block_k=4),
    ):
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, expected, **TOL[np.float32])
    lengths = np.array([9, 4])
    out = decode(q[:, :, :1], k16, v16, lengths, n_splits=2)
    assert out.dtype == np.float32
    np.testing.assert_allclose(
        out, naive(q[:, :, :1], k32, v32, q_offset=lengths - 1, lengths=lengths), **TOL[np.float32]
    )


# ---------------------------------------------------------------------------
# GQA, merging, block skipping
# ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(attention_cases(dtypes=(np.float64,)))
def test_gqa_equals_attention_with_repeated_kv_heads(case):
    q, k, v, masks = case
    group = q.shape[1] // k.shape[1]
    k_repeated = np.repeat(k, group, axis=1)  # head h -> kv head h // group
    v_repeated = np.repeat(v, group, axis=1)
    expected = naive(q, k_repeated, v_repeated, **masks)
    for fn in (naive, online, tiled):
        np.testing.assert_allclose(fn(q, k, v, **masks), expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(attention_cases(dtypes=(np.float64,)), st.data())
def test_merge_partials_of_a_split_equals_the_whole(case, data):
    """Attention over keys [0, s) and [s, n) merged == attention over [0, n)."""
    q, k, v, masks = case
    seq_k = k.shape[2]
    n_cuts = data.draw(st.integers(0, 3))
    cuts = sorted(data.draw(st.lists(st.integers(0, seq_k), min_size=n_cuts, max_size=n_cuts)))
    edges = [0, *cuts, seq_k]
    masks = dict(masks, causal=False, q_offset=0)  # keys keep their meaning only without position masks
    lengths = masks.pop("lengths")
    masks.pop("window")
    outs, lses = [], []
    for j0, j1 in zip(edges[:-1], edges[1:]):
        part_lengths = None if lengths is None else np.clip(lengths - j0, 0, j1 - j0)
        out, lse = naive(q, k[:, :, j0:j1], v[:, :, j0:j1], lengths=part_lengths, return_lse=True, **masks)
        outs.append(out)
        lses.append(lse)
    merged_out, merged_lse = merge_partials(outs, lses)
    whole_out, whole_lse = naive(q, k, v, lengths=lengths, return_lse=True, **masks)
    np.testing.assert_allclose(merged_out, whole_out, rtol=1e-12, atol=1e-12)
    assert_lse_close(merged_lse, whole_lse, rtol=1e-12, atol=1e-12)


def test_merge_partials_of_nothing_is_zero_and_minus_inf():
    outs = [np.zeros((2, 3)), np.zeros((2, 3))]
    lses = [np.full(2, -np.inf), np.full(2, -np.inf)]
    out, lse = merge_partials(outs, lses)
    np.testing.assert_array_equal(out, 0)
    assert np.isneginf(lse).all()


def _blocks_with_a_visible_pair(mask, block_q, block_k):
    """How many (query block, key block) tiles contain at least one visible (i, j)."""
    seq_q, seq_k = mask.shape
    return sum(
        bool(mask[i0 : i0 + block_q, j0 : j0 + block_k].any())
        for i0 in range(0, seq_q, block_q)
        for j0 in range(0, seq_k, block_k)
    )


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(0, 20),
    st.integers(1, 12),
    st.integers(1, 12),
    st.none() | st.integers(1, 30),
)
def test_tiled_skips_exactly_the_blocks_nobody_can_see(seq_q, extra_keys, block_q, block_k, window):
    """One sequence, causal prefill after `extra_keys` cached keys: a tile is computed
    iff some query in it can see some key in it; every other tile is skipped."""
    seq_k = seq_q + extra_keys
    rng = np.random.default_rng(seq_q)
    q = rng.standard_normal((1, 2, seq_q, 4))
    k = rng.standard_normal((1, 1, seq_k, 4))
    v = rng.standard_normal((1, 1, seq_k, 4))
    stats = {}
    tiled(q, k, v, q_offset=extra_keys, window=window, block_q=block_q, block_k=block_k, stats=stats)
    mask = visible_mask(seq_q, seq_k, q_offset=extra_keys, window=window)[0, 0, 0]
    assert stats["blocks_computed"] == _blocks_with_a_visible_pair(mask, block_q, block_k)


def test_causal_square_prefill_computes_the_lower_triangle_of_blocks():
    n_blocks, block = 8, 4
    seq = n_blocks * block
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 1, seq, 4))
    k = rng.standard_normal((1, 1, seq, 4))
    stats = {}
    tiled(q, k, k, block_q=block, block_k=block, stats=stats)
    assert stats["blocks_computed"] == n_blocks * (n_blocks + 1) // 2  # 36 of 64
    assert stats["blocks_skipped"] == n_blocks * (n_blocks - 1) // 2
    assert stats["blocks_masked"] == n_blocks  # only the diagonal tiles build a mask


def test_skipped_blocks_are_never_read():
    """Poison the keys and values that no query can see with NaN: if tiled touched a
    skipped block the output would be NaN (0 * NaN = NaN in the P V product)."""
    rng = np.random.default_rng(6)
    q = rng.standard_normal((2, 2, 8, 4))
    k = rng.standard_normal((2, 1, 64, 4))
    v = rng.standard_normal((2, 1, 64, 4))
    expected = naive(q, k[:, :, :16], v[:, :, :16], q_offset=np.array([8, 4]))
    k[:, :, 16:] = np.nan  # above the diagonal for every query of both sequences
    v[:, :, 16:] = np.nan
    stats = {}
    out = tiled(q, k, v, q_offset=np.array([8, 4]), block_q=4, block_k=8, stats=stats)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert stats["blocks_skipped"] >= 2 * 6  # key blocks 2..7 for both query blocks
    # the same with lengths: padding past every sequence's length is never read
    k[:, :, 16:] = np.nan
    out = tiled(q, k, v, causal=False, lengths=np.array([16, 12]), block_q=4, block_k=8)
    expected = naive(q, k[:, :, :16], v[:, :, :16], causal=False, lengths=np.array([16, 12]))
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# Bad input names the problem
# ---------------------------------------------------------------------------


def test_bad_inputs_raise_invalid_input_error():
    q = np.zeros((1, 3, 2, 4))
    k = np.zeros((1, 2, 2, 4))
    with pytest.raises(InvalidInputError, match="n_heads=3"):
        naive(q, k, k)
    with pytest.raises(InvalidInputError, match="4-D"):
        tiled(q[0], k, k)
    with pytest.raises(InvalidInputError, match="lengths"):
        online(np.zeros((1, 2, 2, 4)), k, k, lengths=np.array([3]))
    with pytest.raises(InvalidInputError, match="window"):
        naive(np.zeros((1, 2, 2, 4)), k, k, window=0)
    with pytest.raises(InvalidInputError, match="n_splits"):
        decode(np.zeros((1, 2, 1, 4)), k, k, np.array([2]), n_splits=0)
    with pytest.raises(InvalidInputError, match="dtype"):
        naive(np.zeros((1, 2, 2, 4), dtype=np.int64), k, k)


def test_module_exports():
    for name in ("naive", "online", "tiled", "decode", "merge_partials", "visible_mask"):
        assert callable(getattr(attention, name))


def test_zero_keys_is_legal_and_sees_nothing():
    q = np.ones((2, 2, 3, 4))
    empty = np.zeros((2, 1, 0, 4))
    for out, lse in (
        naive(q, empty, empty, return_lse=True),
        online(q, empty, empty, return_lse=True),
        tiled(q, empty, empty, return_lse=True),
        decode(q[:, :, :1], empty, empty, np.array([0, 0]), return_lse=True),
    ):
        np.testing.assert_array_equal(out, 0)
        assert np.isneginf(lse).all()


def test_a_decode_step_over_a_full_cache_builds_no_mask(monkeypatch):
    """The numpy backend's decode without a window never builds a mask: every sequence as long as the
    cache takes the plain softmax (the step the KV cache runs a thousand times), a ragged batch adds
    -inf to the scores of absent keys. A window must still build one, and all must equal naive
    attention (the reference ``attention.decode`` stays literal and always masks)."""
    from minikv.backend import Backend

    backend = Backend()
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 4, 1, 8))
    k, v = rng.standard_normal((2, 2, 9, 8)), rng.standard_normal((2, 2, 9, 8))
    built = []
    real_visible = attention._visible
    monkeypatch.setattr(attention, "_visible", lambda *a: built.append(a) or real_visible(*a))

    full, _ = backend.decode_attention(q, k, v, np.array([9, 9]))
    assert built == []
    ragged, _ = backend.decode_attention(q, k, v, np.array([9, 5]))
    assert built == []
    windowed, _ = backend.decode_attention(q, k, v, np.array([9, 5]), window=3)
    assert len(built) == 1
    np.testing.assert_allclose(full, naive(q, k, v, causal=True, q_offset=8), rtol=0, atol=1e-12)
    expected = naive(q, k, v, causal=True, q_offset=np.array([8, 4]), lengths=np.array([9, 5]))
    np.testing.assert_allclose(ragged, expected, rtol=0, atol=1e-12)
    expected = naive(q, k, v, causal=True, q_offset=np.array([8, 4]), lengths=np.array([9, 5]), window=3)
    np.testing.assert_allclose(windowed, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("keys", [5, 319, 320, 700])
def test_numpy_backend_decode_both_score_orientations_equal_naive(keys):
    """The numpy backend computes decode scores as q K^T below ``transposed_from_keys`` keys and as
    K q^T from there on (a BLAS speed rule): both sides of the switch, full and ragged, equal naive."""
    from minikv.backend import Backend

    backend = Backend()
    assert backend.transposed_from_keys == 320
    rng = np.random.default_rng(keys)
    q = rng.standard_normal((2, 4, 1, 8))
    k, v = rng.standard_normal((2, 2, keys, 8)), rng.standard_normal((2, 2, keys, 8))
    for lengths in (np.array([keys, keys]), np.array([keys, max(keys // 2, 1)])):
        out, _ = backend.decode_attention(q, k, v, lengths)
        expected = naive(q, k, v, causal=True, q_offset=lengths - 1, lengths=lengths)
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
