"""Attention, step by step: four algorithms that compute the same numbers.

Every function here computes scaled dot-product attention

    out_i = sum_j softmax_j(s_ij) * v_j,      s_ij = scale * (q_i . k_j),

over the keys j that query i is allowed to see, and differs only in *how much
memory* it uses and *in what order* it visits the keys:

``naive``
    Materialise the whole score matrix S (seq_q x seq_k per head), mask it,
    take a numerically stable softmax, multiply by V.  O(seq_q * seq_k) memory:
    the reference every other function is tested against.

``online``
    One pass over the keys, one key at a time, never storing a row of scores.
    It carries three running quantities per query row: the largest score seen
    so far ``m``, the sum of exponentials ``l`` (relative to ``m``) and the
    unnormalised output ``acc``.  When a new key raises the maximum, the old
    ``l`` and ``acc`` are rescaled by ``exp(m_old - m_new)``: the *online
    softmax* (Milakov & Gimelshein, 2018).

``tiled``
    Flash attention's forward pass (Dao et al., 2022): the online softmax
    applied to *blocks* of queries and keys.  Only a ``block_q x block_k``
    tile of scores exists at any moment: O(seq * block) memory instead of
    O(seq^2).  With a causal mask, key blocks that lie entirely above the
    diagonal are never computed (about half of them for a long prefill), and
    only the blocks that straddle the diagonal need a mask at all.

``decode``
    Flash-decoding: one new query against a long KV cache.  A single query has
    too little work to parallelise over queries, so the *keys* are split into
    ``n_splits`` chunks, each chunk is reduced independently to a partial
    output and its log-sum-exp, and ``merge_partials`` combines them exactly.

Shapes and conventions (shared by every function)
-------------------------------------------------
q: ``(batch, n_heads, seq_q, head_dim)``;  k, v: ``(batch, n_kv_heads, seq_k, head_dim)``.

*GQA.*  ``n_heads`` is a multiple of ``n_kv_heads``; query head ``h`` uses kv
head ``h // group`` with ``group = n_heads // n_kv_heads``.  Instead of copying
K and V ``group`` times (``np.repeat``), q is *reshaped* to
``(batch, n_kv_heads, group, seq_q, head_dim)``: the ``group`` query heads that
share a kv head are stacked, and one matmul serves them all.

*Positions.*  Query ``i`` of sequence ``b`` sits at absolute position
``q_offset[b] + i`` (``q_offset`` is an int or an int array ``(batch,)``): a
chunk of new queries after ``q_offset`` cached tokens masks correctly.  Key
``j`` sits at position ``j``.  Key ``j`` is visible to query ``i`` iff all hold:

* ``causal``:           ``j <= q_offset[b] + i``
* ``lengths`` given:    ``j < lengths[b]``              (ragged caches: the rest is padding)
* ``window`` = W given: ``(q_offset[b] + i) - j < W``   (Mistral's sliding window)

A query row that sees no key at all returns zeros and ``lse = -inf``, never
NaN (for example padding rows of a ragged batch).

*Scale* defaults to ``1 / sqrt(head_dim)``, held in the input dtype so a
float32 computation stays float32 (a NumPy float64 scalar would silently
promote every array it touches).  The output has q's dtype; k and v may be
stored in another float dtype (a float16 cache) and are converted to q's dtype
block by block.

``return_lse=True`` also returns ``lse = log sum_j exp(s_ij)`` over the visible
keys, shape ``(batch, n_heads, seq_q)``: the one number per row that lets two
partial attentions over disjoint key sets be merged exactly.
"""

from __future__ import annotations

import math

import numpy as np

from minikv.errors import InvalidInputError

__all__ = ["naive", "online", "tiled", "decode", "merge_partials", "visible_mask", "masked_softmax_times_v",
           "CORES", "naive_softmax", "stable_softmax"]


# ---------------------------------------------------------------------------
# Shared plumbing: validation, GQA grouping, masks
# ---------------------------------------------------------------------------


def _check_inputs(q, k, v):
    """Validate shapes/dtypes; return (batch, n_kv_heads, group, seq_q, seq_k, head_dim)."""
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise InvalidInputError(f"attention expects 4-D arrays q (batch, n_heads, seq_q, head_dim) and k, v "
                                f"(batch, n_kv_heads, seq_k, head_dim); got q.ndim={q.ndim}, k.ndim={k.ndim}, "
                                f"v.ndim={v.ndim} (reshape your inputs)")
    if q.dtype not in (np.float32, np.float64):
        raise InvalidInputError(f"q has dtype {q.dtype}; attention computes in float32 or float64 "
                                f"(pass q.astype(np.float32))")
    for name, arr in (("k", k), ("v", v)):
        if arr.dtype.kind != "f":
            raise InvalidInputError(f"{name} has dtype {arr.dtype}; pass a floating-point array")
    batch, n_heads, seq_q, head_dim = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != batch or k.shape[3] != head_dim:
        raise InvalidInputError(f"shapes do not fit together: q {q.shape}, k {k.shape}, v {v.shape}; need "
                                f"k (batch, n_kv_heads, seq_k, head_dim={head_dim}) and v (batch, n_kv_heads, seq_k, d_v)")
    n_kv_heads, seq_k = k.shape[1], k.shape[2]
    check_gqa(n_heads, n_kv_heads)
    return q, k, v, (batch, n_kv_heads, n_heads // n_kv_heads, seq_q, seq_k, head_dim)


def check_gqa(n_heads: int, n_kv_heads: int) -> None:
    """GQA: query head h reads kv head h // (n_heads // n_kv_heads), so n_heads must be a multiple."""
    if n_kv_heads == 0 or n_heads % n_kv_heads != 0:
        raise InvalidInputError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads} "
                                f"(GQA needs n_heads % n_kv_heads == 0)")


def _scale_for(dtype, head_dim, scale):
    """The softmax temperature 1/sqrt(head_dim) as a scalar *of the input dtype*."""
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    return np.dtype(dtype).type(scale)


def _as_offsets(q_offset, batch):
    """q_offset (int or (batch,) ints) -> int64 array (batch,)."""
    offsets = np.asarray(q_offset)
    if offsets.dtype.kind not in "iu":
        raise InvalidInputError(f"q_offset must be an int or an int array; got {q_offset!r}")
    offsets = np.broadcast_to(offsets.astype(np.int64), (batch,)) if offsets.ndim == 0 else offsets
    if offsets.shape != (batch,):
        raise InvalidInputError(f"q_offset has shape {offsets.shape}; pass an int or an array of shape ({batch},)")
    return offsets.astype(np.int64)


def _as_lengths(lengths, batch, seq_k):
    """lengths (None or (batch,) ints in [0, seq_k]) -> int64 array (batch,) or None."""
    if lengths is None:
        return None
    lengths_arr = np.asarray(lengths)
    if lengths_arr.dtype.kind not in "iu":
        raise InvalidInputError(f"lengths must be an int array; got {lengths!r}")
    if lengths_arr.ndim == 0:
        lengths_arr = np.broadcast_to(lengths_arr, (batch,))
    if lengths_arr.shape != (batch,):
        raise InvalidInputError(f"lengths has shape {lengths_arr.shape}; pass one length per sequence, shape ({batch},)")
    if lengths_arr.size and (lengths_arr.min() < 0 or lengths_arr.max() > seq_k):
        raise InvalidInputError(f"lengths {lengths_arr.tolist()} must lie in [0, seq_k={seq_k}] (the keys present)")
    return lengths_arr.astype(np.int64)


def _check_window(window):
    if window is None:
        return None
    if isinstance(window, bool) or int(window) != window or window < 1:
        raise InvalidInputError(f"window={window!r}; pass None or an int >= 1")
    return int(window)


def _masking_args(q_offset, lengths, window, scale, batch, seq_k, head_dim, dtype):
    """The mask and scale arguments every algorithm takes, checked and normalised once:
    (offsets (batch,), lengths (batch,), window or None, scale in the input dtype)."""
    return (_as_offsets(q_offset, batch), _as_lengths(lengths, batch, seq_k), _check_window(window),
            _scale_for(dtype, head_dim, scale))


def _door(q, k, v, q_offset, lengths, window, scale):
    """The public functions' one check: (q, k, v in q's dtype, offsets, lengths, window, scale)."""
    q, k, v, (batch, _, _, _, seq_k, head_dim) = _check_inputs(q, k, v)
    k, v = k.astype(q.dtype, copy=False), v.astype(q.dtype, copy=False)
    return (q, k, v) + _masking_args(q_offset, lengths, window, scale, batch, seq_k, head_dim, q.dtype)


def trusted_args(q, k, v, q_offset, lengths, window, scale=None):
    """The same normalisation as the public door, for callers that checked already (the model's
    forward, through a backend): no validation, only the conversions the cores need."""
    dtype = q.dtype
    offsets = np.broadcast_to(np.asarray(q_offset, dtype=np.int64), (q.shape[0],))
    lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
    return (q, k.astype(dtype, copy=False), v.astype(dtype, copy=False), offsets, lengths, window,
            _scale_for(dtype, q.shape[-1], scale))


def _dims(q, k):
    """(batch, n_kv_heads, group, seq_q, seq_k, head_dim) of checked q, k."""
    batch, n_heads, seq_q, head_dim = q.shape
    return batch, k.shape[1], n_heads // k.shape[1], seq_q, k.shape[2], head_dim


def _visible(query_pos, key_pos, lengths, window, causal):
    """The mask from absolute positions.

    query_pos: (batch, n_q) absolute positions; key_pos: (n_k,) absolute positions.
    Returns bool (batch, 1, 1, n_q, n_k): broadcastable to scores (batch, n_kv_heads, group, n_q, n_k).
    """
    qp = query_pos[:, :, None]  # (batch, n_q, 1)
    kp = key_pos[None, None, :]  # (1, 1, n_k)
    visible = np.ones((query_pos.shape[0], query_pos.shape[1], key_pos.shape[0]), dtype=bool)
    if causal:
        visible &= kp <= qp  # no peeking at the future
    if lengths is not None:
        visible &= kp < lengths[:, None, None]  # padding beyond each sequence's end
    if window is not None:
        visible &= (qp - kp) < window  # only the last `window` positions
    return visible[:, None, None, :, :]


def visible_mask(seq_q, seq_k, q_offset=0, lengths=None, window=None, causal=True):
    """Boolean mask, True where query i may attend to key j.

    Shape ``(batch, 1, 1, seq_q, seq_k)`` (batch = len(q_offset) or len(lengths),
    1 when both are scalars/None): it broadcasts against scores of shape
    ``(batch, n_kv_heads, group, seq_q, seq_k)``.
    """
    batch = 1
    for arg in (q_offset, lengths):
        if arg is not None and np.ndim(arg) == 1:
            batch = len(arg)
    offsets = _as_offsets(q_offset, batch)
    lengths_arr = _as_lengths(lengths, batch, seq_k)
    window = _check_window(window)
    query_pos = offsets[:, None] + np.arange(seq_q, dtype=np.int64)[None, :]
    key_pos = np.arange(seq_k, dtype=np.int64)
    return _visible(query_pos, key_pos, lengths_arr, window, causal)


def _group_queries(q, n_kv_heads, group, scale):
    """(batch, n_heads, seq_q, d) -> scaled (batch, n_kv_heads, group*seq_q, d), no copy of K/V.

    Query head h = kv*group + g, so a plain reshape stacks the `group` heads that
    share kv head `kv`; the scores for all of them come out of one matmul.
    """
    batch, _, seq_q, head_dim = q.shape
    return (q * scale).reshape(batch, n_kv_heads, group * seq_q, head_dim)


def _probs_times_v(probs, v):
    """(batch, n_kv, group, n_q, n_k) weights times v (batch, n_kv, n_k, d_v): one matmul per kv head
    for all the query heads that share it -> (batch, n_kv, group, n_q, d_v)."""
    batch, n_kv, group, n_q, n_k = probs.shape
    weighted = np.matmul(probs.reshape(batch, n_kv, group * n_q, n_k), v)
    return weighted.reshape(batch, n_kv, group, n_q, v.shape[-1])


def _shift(m):
    """The amount subtracted before exp(): the running max m, or 0 for a row that has seen no visible
    key yet (m = -inf), so that exp(s - shift) = exp(-inf) = 0 instead of exp(-inf - -inf) = NaN."""
    return np.where(np.isfinite(m), m, m.dtype.type(0))


def _finish(m, l, acc):
    """The end of every softmax here: out = acc / l and lse = m + log(l).

    m: running max (..., 1), l: sum_j exp(s_j - m) (..., 1), acc: sum_j exp(s_j - m) v_j (..., d).
    A row that saw no visible key (l = 0) gives out = 0 and lse = -inf, never NaN.
    Returns (out (..., d), lse (...))."""
    dtype = acc.dtype
    has_key = l > 0
    safe_l = np.where(has_key, l, dtype.type(1))
    out = acc / safe_l                                          # rows with no key: 0 / 1 = 0
    lse = np.where(has_key, m + np.log(safe_l), dtype.type(-np.inf))
    return out, lse[..., 0]


def masked_softmax_times_v(scores, visible, v):
    """Stable softmax of scores over the visible keys, times v.

    scores: (batch, n_kv_heads, group, n_q, n_k); visible: bool, broadcastable to it;
    v: (batch, n_kv_heads, n_k, d_v).
    Returns (out (batch, n_kv_heads, group, n_q, d_v), lse (batch, n_kv_heads, group, n_q)).

        m   = max_j s_j                    (over visible j; the shift that keeps exp() <= 1)
        p_j = exp(s_j - m)
        l   = sum_j p_j
        out = (sum_j p_j v_j) / l,   lse = m + log(l)
    """
    scores = np.where(visible, scores, scores.dtype.type(-np.inf))
    m = scores.max(axis=-1, keepdims=True, initial=-np.inf)    # initial: zero keys is legal
    probs = np.exp(scores - _shift(m))
    return _finish(m, probs.sum(axis=-1, keepdims=True), _probs_times_v(probs, v))


def _ungroup(out, lse, n_heads, return_lse):
    """(batch, n_kv_heads, group, seq_q, d) -> (batch, n_heads, seq_q, d) (and lse likewise)."""
    batch, _, _, seq_q, d_v = out.shape
    out = out.reshape(batch, n_heads, seq_q, d_v)
    if return_lse:
        return out, lse.reshape(batch, n_heads, seq_q)
    return out


# ---------------------------------------------------------------------------
# 1. naive: materialise every score
# ---------------------------------------------------------------------------


def naive(q, k, v, causal=True, q_offset=0, lengths=None, window=None, scale=None, return_lse=False):
    """Reference attention: build S = scale * Q K^T in full, mask, softmax, times V.

    Memory O(batch * n_heads * seq_q * seq_k): 1 GiB of float32 scores for 4
    heads at 8k tokens.  Everything else in this module is tested against it.
    """
    return _naive(*_door(q, k, v, q_offset, lengths, window, scale), causal=causal, return_lse=return_lse)


def _naive(q, k, v, offsets, lengths, window, scale, *, causal, return_lse):
    batch, n_kv, group, seq_q, seq_k, head_dim = _dims(q, k)
    q_grouped = _group_queries(q, n_kv, group, scale)  # (b, kv, group*seq_q, d)
    # S = (scale * Q) K^T: one matmul per (batch, kv head) serves all `group` query heads
    scores = np.matmul(q_grouped, k.swapaxes(-1, -2)).reshape(batch, n_kv, group, seq_q, seq_k)
    query_pos = offsets[:, None] + np.arange(seq_q, dtype=np.int64)[None, :]
    visible = _visible(query_pos, np.arange(seq_k, dtype=np.int64), lengths, window, causal)
    out, lse = masked_softmax_times_v(scores, visible, v)
    return _ungroup(out, lse, q.shape[1], return_lse)


# ---------------------------------------------------------------------------
# 2. online: one pass over the keys with a running max and a running sum
# ---------------------------------------------------------------------------


def online(q, k, v, causal=True, q_offset=0, lengths=None, window=None, scale=None, return_lse=False):
    """Attention in one pass over the keys, one key at a time (the online softmax).

    No row of scores is ever stored: each query row carries

        m   = max of the scores seen so far           (starts at -inf)
        l   = sum_j exp(s_j - m)                      (starts at 0)
        acc = sum_j exp(s_j - m) * v_j                (starts at 0)

    and for each new key j with score s_j:

        m_new = max(m, s_j)
        l     = l   * exp(m - m_new) + exp(s_j - m_new)
        acc   = acc * exp(m - m_new) + exp(s_j - m_new) * v_j
        m     = m_new

    The factor exp(m - m_new) <= 1 re-expresses the old sums relative to the new
    maximum, so every exponent stays <= 0 (no overflow, even for scores of 1e4).
    At the end out = acc / l and lse = m + log(l): the same numbers as ``naive``.

    The loop runs over keys only; batch, heads and queries are vectorised.
    """
    return _online(*_door(q, k, v, q_offset, lengths, window, scale), causal=causal, return_lse=return_lse)


def _online(q, k, v, offsets, lengths_arr, window, scale, *, causal, return_lse):
    batch, n_kv, group, seq_q, seq_k, head_dim = _dims(q, k)
    dtype = q.dtype
    neg_inf = dtype.type(-np.inf)

    q_grouped = _group_queries(q, n_kv, group, scale)  # (b, kv, group*seq_q, d)
    query_pos = offsets[:, None] + np.arange(seq_q, dtype=np.int64)[None, :]

    d_v = v.shape[-1]
    m = np.full((batch, n_kv, group, seq_q, 1), neg_inf, dtype=dtype)
    l = np.zeros((batch, n_kv, group, seq_q, 1), dtype=dtype)
    acc = np.zeros((batch, n_kv, group, seq_q, d_v), dtype=dtype)

    for j in range(seq_k):
        k_j = k[:, :, j, :].astype(dtype, copy=False)  # (b, kv, d)
        v_j = v[:, :, j, :].astype(dtype, copy=False)[:, :, None, None, :]  # (b, kv, 1, 1, d_v)
        # s_j = (scale * q_i) . k_j for every query row at once
        s_j = np.matmul(q_grouped, k_j[..., None]).reshape(batch, n_kv, group, seq_q, 1)
        visible = _visible(query_pos, np.array([j], dtype=np.int64), lengths_arr, window, causal)
        s_j = np.where(visible, s_j, neg_inf)

        m_new = np.maximum(m, s_j)
        shift = _shift(m_new)  # rows with no visible key yet: l and acc stay exactly 0
        rescale = np.exp(m - shift)  # exp(m - m_new) <= 1
        p_j = np.exp(s_j - shift)  # exp(s_j - m_new) <= 1
        l = l * rescale + p_j
        acc = acc * rescale + p_j * v_j
        m = m_new

    out, lse = _finish(m, l, acc)
    return _ungroup(out, lse, q.shape[1], return_lse)


# ---------------------------------------------------------------------------
# 3. tiled: flash attention's forward pass
# ---------------------------------------------------------------------------


def tiled(q, k, v, causal=True, q_offset=0, lengths=None, window=None, scale=None, return_lse=False,
          block_q=256, block_k=256, stats=None):
    """Flash attention forward: the online softmax over tiles of queries and keys.

    For each block of ``block_q`` queries, walk the key blocks of ``block_k``
    keys, keeping per query row the running (m, l, acc) of ``online``, but now a
    whole tile of scores at a time:

        S     = (scale * Q_blk) K_blk^T                   (block_q x block_k)
        m_new = max(m, rowmax(S))
        P     = exp(S - m_new)
        l     = l   * exp(m - m_new) + rowsum(P)
        acc   = acc * exp(m - m_new) + P V_blk
        m     = m_new
    and finally out = acc / l.  Memory: one tile, O(block_q * block_k) per head,
    plus O(seq * head_dim) for inputs and output; never O(seq_q * seq_k).

    Block skipping.  A key block is never computed when no query of the query
    block (in any sequence of the batch) can see any of its keys:

    * causal:  its first key lies after the last query position
               (j0 > max_b q_offset[b] + i_last): above the diagonal;
    * lengths: its first key is at or past max(lengths): pure padding;
    * window:  its last key lies before every query's window
               (min_b q_offset[b] + i_first - j_last >= window).

    Blocks entirely inside every constraint need no mask; only those that
    straddle the diagonal (or a length or window edge) build one.

    ``stats``: pass a dict to have it filled with ``blocks_computed``,
    ``blocks_skipped`` and ``blocks_masked`` (computed blocks that needed a mask):
    the tests use it to prove that skipped blocks are really skipped.

    Block sizes change speed, never the result (any sizes >= 1 are exact).  The
    defaults, 256 x 256, keep a tile of float32 scores at 256 KiB per head (it
    stays in the CPU's L2/L3 cache) while making each NumPy call big enough that
    Python's per-call overhead is small; see benchmarks/results/attention.md.
    A GPU kernel would use far smaller tiles (64 x 64) sized to on-chip memory.
    """
    if isinstance(block_q, bool) or isinstance(block_k, bool) or int(block_q) < 1 or int(block_k) < 1:
        raise InvalidInputError(f"block_q={block_q}, block_k={block_k}; both must be ints >= 1")
    return _tiled(*_door(q, k, v, q_offset, lengths, window, scale), causal=causal, return_lse=return_lse,
                  block_q=int(block_q), block_k=int(block_k), stats=stats)


def _tiled(q, k, v, offsets, lengths_arr, window, scale, *, causal, return_lse, block_q=256, block_k=256,
           stats=None):
    batch, n_kv, group, seq_q, seq_k, head_dim = _dims(q, k)
    dtype = q.dtype
    neg_inf = dtype.type(-np.inf)
    d_v = v.shape[-1]

    q5 = q.reshape(batch, n_kv, group, seq_q, head_dim)
    out = np.empty((batch, n_kv, group, seq_q, d_v), dtype=dtype)
    lse = np.empty((batch, n_kv, group, seq_q), dtype=dtype)
    counts = {"blocks_computed": 0, "blocks_skipped": 0, "blocks_masked": 0}

    # The batch-wide extremes decide what can be skipped (q_offset may differ per sequence).
    offset_min = int(offsets.min()) if batch else 0
    offset_max = int(offsets.max()) if batch else 0
    keys_present = seq_k if lengths_arr is None else int(lengths_arr.max(initial=0))
    keys_everywhere = seq_k if lengths_arr is None else int(lengths_arr.min(initial=0))

    for i0 in range(0, seq_q, block_q):
        i1 = min(i0 + block_q, seq_q)
        n_q = i1 - i0
        q_blk = (q5[:, :, :, i0:i1, :] * scale).reshape(batch, n_kv, group * n_q, head_dim)
        query_pos = offsets[:, None] + np.arange(i0, i1, dtype=np.int64)[None, :]
        first_pos, last_pos = offset_min + i0, offset_max + i1 - 1  # over the whole batch

        m = np.full((batch, n_kv, group, n_q, 1), neg_inf, dtype=dtype)
        l = np.zeros((batch, n_kv, group, n_q, 1), dtype=dtype)
        acc = np.zeros((batch, n_kv, group, n_q, d_v), dtype=dtype)

        for j0 in range(0, seq_k, block_k):
            j1 = min(j0 + block_k, seq_k)
            above_diagonal = causal and j0 > last_pos
            past_lengths = j0 >= keys_present
            before_window = window is not None and first_pos - (j1 - 1) >= window
            if above_diagonal or past_lengths or before_window:
                counts["blocks_skipped"] += 1
                continue
            counts["blocks_computed"] += 1

            n_k = j1 - j0
            k_blk = k[:, :, j0:j1, :].astype(dtype, copy=False)
            v_blk = v[:, :, j0:j1, :].astype(dtype, copy=False)
            # S = (scale * Q_blk) K_blk^T, one tile per (batch, kv head)
            scores = np.matmul(q_blk, k_blk.swapaxes(-1, -2)).reshape(batch, n_kv, group, n_q, n_k)

            needs_mask = (
                (causal and j1 - 1 > first_pos)  # straddles the diagonal
                or j1 > keys_everywhere  # reaches past some sequence's length
                or (window is not None and last_pos - j0 >= window)  # reaches out of a window
            )
            if needs_mask:
                counts["blocks_masked"] += 1
                key_pos = np.arange(j0, j1, dtype=np.int64)
                visible = _visible(query_pos, key_pos, lengths_arr, window, causal)
                scores = np.where(visible, scores, neg_inf)

            # m_new = max(m, rowmax(S)); rows still without any visible key keep -inf
            m_new = np.maximum(m, scores.max(axis=-1, keepdims=True))
            shift = _shift(m_new)
            rescale = np.exp(m - shift)  # exp(m - m_new) <= 1
            probs = np.exp(scores - shift)  # P = exp(S - m_new), entries <= 1
            l = l * rescale + probs.sum(axis=-1, keepdims=True)
            acc = acc * rescale + _probs_times_v(probs, v_blk)
            m = m_new

        out[:, :, :, i0:i1, :], lse[:, :, :, i0:i1] = _finish(m, l, acc)

    if stats is not None:
        stats.update(counts)
    return _ungroup(out, lse, q.shape[1], return_lse)


# ---------------------------------------------------------------------------
# 4. decode: flash-decoding, split the keys and merge
# ---------------------------------------------------------------------------


def merge_partials(outs, lses):
    """Merge attention computed over disjoint key sets into attention over their union.

    Part p saw keys K_p and returned out_p = sum_{j in K_p} exp(s_j - lse_p) v_j with
    lse_p = log sum_{j in K_p} exp(s_j).  Over the union:

        lse = log sum_p exp(lse_p)                       (a logaddexp)
        out = sum_p exp(lse_p - lse) * out_p             (weights sum to 1)

    computed as m = max_p lse_p, lse = m + log sum_p exp(lse_p - m), so nothing
    overflows.  A part that saw no key has lse_p = -inf and weight 0; if no part
    saw a key, out = 0 and lse = -inf.

    outs: sequence of arrays (..., d) or one array (n_parts, ..., d);
    lses: sequence of arrays (...) or one array (n_parts, ...).
    Returns (out (..., d), lse (...)).
    """
    outs = np.stack([np.asarray(o) for o in outs])
    lses = np.stack([np.asarray(x) for x in lses])
    if outs.shape[:-1] != lses.shape:
        raise InvalidInputError(f"merge_partials: outs {outs.shape} and lses {lses.shape} disagree; "
                                f"each lse must have its out's shape without the last axis")
    dtype = np.result_type(outs.dtype, lses.dtype)
    outs, lses = outs.astype(dtype, copy=False), lses.astype(dtype, copy=False)[..., None]
    m = lses.max(axis=0)                                   # (..., 1)
    weights = np.exp(lses - _shift(m))                     # exp(lse_p - m) <= 1; 0 for empty parts
    # the same finish as a softmax: l = sum_p weights, acc = sum_p weights * out_p
    return _finish(m, weights.sum(axis=0), (weights * outs).sum(axis=0))


def decode(q, k_cache, v_cache, lengths, n_splits=4, window=None, scale=None, return_lse=False):
    """Flash-decoding: new queries against a KV cache, the keys split into chunks.

    q: (batch, n_heads, seq_q, head_dim), usually seq_q = 1; k_cache, v_cache:
    (batch, n_kv_heads, capacity, head_dim); lengths: (batch,) ints, the number of
    valid positions per sequence (None: the whole capacity).  The new tokens have
    already been written into the cache, so the last query of sequence b sits at
    position lengths[b] - 1 (query i at lengths[b] - seq_q + i) and sees keys
    j <= its position (and within the window).

    The keys [0, max(lengths)) are cut into ``n_splits`` contiguous chunks.  Each
    chunk is reduced independently (on a GPU: in parallel, one block per chunk)
    to a partial (out_p, lse_p); ``merge_partials`` then combines them exactly.
    More splits than keys is allowed: the empty chunks have lse = -inf and weight 0.
    """
    q, k_cache, v_cache, (batch, n_kv, group, seq_q, capacity, head_dim) = _check_inputs(q, k_cache, v_cache)
    if isinstance(n_splits, bool) or int(n_splits) != n_splits or n_splits < 1:
        raise InvalidInputError(f"n_splits={n_splits!r}; pass an int >= 1")
    n_splits = int(n_splits)
    lengths = np.full(batch, capacity, dtype=np.int64) if lengths is None else lengths
    offsets, lengths, window, scale = _masking_args(0, lengths, window, scale, batch, capacity, head_dim, q.dtype)
    offsets = lengths - seq_q  # query i sits at lengths[b] - seq_q + i
    query_pos = offsets[:, None] + np.arange(seq_q, dtype=np.int64)[None, :]
    q_grouped = _group_queries(q, n_kv, group, scale)  # (b, kv, group*seq_q, d)
    keys_present = int(lengths.max(initial=0))

    # Split boundaries: chunk p covers keys [p*n // n_splits, (p+1)*n // n_splits).
    boundaries = [(p * keys_present) // n_splits for p in range(n_splits + 1)]
    part_outs, part_lses = [], []
    for j0, j1 in zip(boundaries[:-1], boundaries[1:]):
        k_chunk = k_cache[:, :, j0:j1, :].astype(q.dtype, copy=False)
        v_chunk = v_cache[:, :, j0:j1, :].astype(q.dtype, copy=False)
        # S = (scale * Q) K_chunk^T; an empty chunk gives out 0 and lse -inf
        scores = np.matmul(q_grouped, k_chunk.swapaxes(-1, -2)).reshape(batch, n_kv, group, seq_q, j1 - j0)
        visible = _visible(query_pos, np.arange(j0, j1, dtype=np.int64), lengths, window, True)
        out_p, lse_p = masked_softmax_times_v(scores, visible, v_chunk)
        part_outs.append(out_p)
        part_lses.append(lse_p)
    out, lse = merge_partials(part_outs, part_lses)
    return _ungroup(out, lse, q.shape[1], return_lse)


# ---------------------------------------------------------------------------
# Softmax, the textbook way and the safe way (for the overflow lesson)
# ---------------------------------------------------------------------------


def naive_softmax(x, axis=-1):
    """softmax(x)_j = exp(x_j) / sum_i exp(x_i), exactly as written in textbooks.

    Overflows: exp(1000) is inf in float64 (exp(89) already in float32), and
    inf / inf = nan.  Kept on purpose to show why ``stable_softmax`` exists.
    """
    x = np.asarray(x)
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(x)
        return e / e.sum(axis=axis, keepdims=True)


def stable_softmax(x, axis=-1):
    """softmax(x) = softmax(x - max(x)): the same value, but every exp() argument is <= 0.

    exp(x_j - m) / sum_i exp(x_i - m) = exp(x_j) / sum_i exp(x_i) because the
    factor exp(-m) cancels; the largest term becomes exp(0) = 1, so nothing
    overflows and the sum is >= 1 (no division by zero).
    """
    x = np.asarray(x)
    m = x.max(axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=axis, keepdims=True)


# The algorithms' cores on checked, normalised arguments (see trusted_args): what a backend calls
# on the model's hot path, where the arguments were checked once at the door of forward.
CORES = {"naive": _naive, "online": _online, "tiled": _tiled}
