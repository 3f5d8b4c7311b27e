"""Backend ``"numba"``: the hot loops of attention and RoPE compiled for the CPU with Numba.

The arrays stay NumPy arrays (``xp = numpy``: the matmuls of the projections already run in BLAS);
what Numba replaces are the loops NumPy cannot express without temporaries:

``tiled_attention_kernel``
    Flash attention's forward pass, the same algorithm as ``minikv.attention.tiled``, written as
    the loops it really is. The work is cut into tasks (sequence b, head h, block of ``block_q``
    queries) run in parallel by ``prange``; a task walks the key blocks of ``block_k`` keys with
    the running (m, l, acc) of the online softmax per query row. Block skipping is *per
    sequence*: a task only visits the key blocks its own queries can see (causal diagonal, the
    sequence's length, the window), which is finer than the batch-wide rule NumPy has to use.

``split_k_decode_kernel`` and ``merge_splits_kernel``
    Flash-decoding: one query per sequence against its cache. The visible keys of each sequence
    are cut into ``n_splits`` chunks; each task (b, KV head, chunk) reduces its chunk to a partial
    (out_p, lse_p) for the query heads sharing that KV head, and the merge combines them exactly:
        lse = log sum_p exp(lse_p),   out = sum_p exp(lse_p - lse) out_p
    (with one chunk, the partial is the answer and no merge runs). The kernel reads keys *through
    a block table*: key j of sequence b lives in block ``block_table[b, j // block_size]`` at row
    ``j % block_size``, walked block by block. A contiguous cache
    (batch, kv_heads, capacity, head_dim) is the special case of one block per sequence of size
    ``capacity`` and the table ``[[0], [1], ...]``: one kernel serves the static and the paged cache.
    Its speed comes from register tiles (2 query heads x 4 keys per pass over head_dim), a vectorised
    exp (``exp_nonpositive``) and prefetching the next page while one computes; the kernel's
    docstring has the measurements.

``rope_kernel``
    Rotates each pair (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos), for both pair conventions.

Precision: every kernel computes in the dtype of q (float32 or float64), as the reference does,
so float64 agrees with NumPy to round-off and float32 to a few ulps (only the summation order
differs). The two attention kernels are compiled with ``fastmath={'reassoc', 'contract'}`` and
nothing else: reassociation lets LLVM vectorise their dot products q . k (a sum over head_dim that
IEEE order keeps scalar). Measured on `mid`'s geometry, 1 thread: decode of 17 rows 0.84 -> 0.30
ms per call, a prefill chunk of 128 queries over 256 keys 8.3 -> 2.4 ms. It only reorders sums, so
the tests' tolerances hold; without 'nnan'/'ninf', -inf and NaN still behave. The other kernels
keep ``fastmath=False`` (IEEE semantics, no reassociation). The decode kernel's exponentials are a
polynomial within 2 ulps (float32) / 4 ulps (float64) of exp (``exp_nonpositive``), which moves a
softmax weight by as much; the reference's np.exp has its own ulp, so the tolerances hold as well.
Numba has no float16 on the CPU, so a float16 cache is widened to q's dtype before a kernel reads
it (a copy per call; the GPU backend reads float16 directly).

Compilation: ``cache=True`` stores the machine code in ``__pycache__``, so only the first run on a
machine pays the compile time (a few seconds per kernel and dtype).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings

import numpy as np

from minikv.backend import Backend
from minikv.errors import BackendUnavailableError, ConfigError

# Numba's OpenMP (libgomp) workers spin between parallel regions, by default for ~300,000 iterations,
# before they sleep. A decode step opens ~40 regions a few microseconds apart, so a short spin catches
# the next region, but a long one steals the core that a peer (OpenBLAS's threads, another process)
# needs. Measured on 2 shared cores, `mid`'s compiled decode step on 2 threads (benchmarks/results/
# quant_decode.md): under load ~10, default spinning 170-780 ms/step, no spinning (OMP_WAIT_POLICY=
# PASSIVE) 10-11 ms; under load ~3, no spinning 10.9 ms, spinning forever 7.4 ms (but NumPy's BLAS in
# the same process slowed from 6.2 to 15 ms), GOMP_SPINCOUNT=10000 7.35 ms with BLAS at 6.2 ms. Read by
# libgomp when it loads, so set before any parallel kernel runs; either variable set by the user wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

try:
    import numba
    from numba import njit, prange, types
    from numba.core.errors import NumbaIRAssumptionWarning
    from numba.extending import overload
except ImportError as exc:  # pragma: no cover - exercised only where numba is missing
    raise BackendUnavailableError(
        f"backend 'numba' needs the numba package, which could not be imported ({exc}); "
        "install it with: pip install 'minikv[numba]'") from None

from .numba_intrinsics import float_from_bits, prefetch
from ._common import (SplitKDecode, as_4d, attention_geometry, check_float_dtypes, check_rope_shapes, default_scale,
                      host_lengths, host_offsets, pool_geometry, rope_is_interleaved, window_value)

_JIT = dict(parallel=True, fastmath=False, cache=True, nogil=True)
# exp_nonpositive is inlined at Numba's IR level (so that LLVM sees and vectorises the loop around it);
# Numba's pedantic IR check then reports the inlined overload's locals as "not in scope", a message about
# its own bookkeeping (numba_decode.py silences the same one for its row_dot).
warnings.filterwarnings("ignore", message=r"variable '_exp_nonpositive_overload", category=NumbaIRAssumptionWarning)
_REASSOC_JIT = dict(_JIT, fastmath={'reassoc', 'contract'})   # see the module docstring (Precision)

# Keys a decode task reduces between two rescalings of its accumulator (a tile of scores).
DECODE_TILE = 64
# How many pages ahead of the one it computes the decode kernel prefetches (see split_k_decode_kernel).
PREFETCH_PAGES = 1


# --------------------------------------------------------------------------- kernels
# Conventions inside the kernels: `neg_inf` and `scale` arrive as scalars of the compute dtype, and
# every other constant is derived from them, because a Python float literal is a float64 in Numba
# and would silently promote a float32 computation (and slow it down).


@njit(**_REASSOC_JIT)
def tiled_attention_kernel(q, k, v, q_offset, lengths, causal, window, scale, neg_inf, block_q, block_k,
                           out, lse):
    """out[b, h, i] = softmax_j(scale * q_i . k_j) v_j over the keys j query i sees; lse likewise.

    q (batch, n_heads, seq_q, d); k, v (batch, n_kv_heads, seq_k, d), same dtype as q;
    q_offset, lengths (batch,) int64; window 0 = none. Query i of sequence b sits at position
    q_offset[b] + i and sees key j iff j < lengths[b], (causal) j <= q_offset[b] + i and
    (window) q_offset[b] + i - j < window.
    """
    batch, n_heads, seq_q, head_dim = q.shape
    group = n_heads // k.shape[1]
    zero = scale - scale
    n_qblocks = (seq_q + block_q - 1) // block_q
    for task in prange(batch * n_heads * n_qblocks):
        b = task // (n_heads * n_qblocks)
        h = (task // n_qblocks) % n_heads
        i0 = (task % n_qblocks) * block_q
        kv = h // group  # GQA: query head h reads kv head h // group
        n_q = min(block_q, seq_q - i0)
        first_pos = q_offset[b] + i0          # position of the block's first query
        last_pos = first_pos + n_q - 1

        # Block skipping: only the keys [key_begin, key_end) can be seen by any query of this block.
        key_end = lengths[b]
        if causal:
            key_end = min(key_end, last_pos + 1)
        key_begin = 0
        if window != 0:
            key_begin = max(0, first_pos - window + 1)
        key_begin = (key_begin // block_k) * block_k  # start on a block boundary, like the reference

        q_scaled = np.empty((n_q, head_dim), dtype=q.dtype)
        for r in range(n_q):
            for d in range(head_dim):
                q_scaled[r, d] = q[b, h, i0 + r, d] * scale
        m = np.full(n_q, neg_inf)                    # running max per row
        l = np.zeros(n_q, dtype=q.dtype)             # running sum of exp(s - m)
        acc = np.zeros((n_q, head_dim), dtype=q.dtype)  # running sum of exp(s - m) v
        scores = np.empty(block_k, dtype=q.dtype)

        for j0 in range(key_begin, key_end, block_k):
            n_k = min(block_k, key_end - j0)
            for r in range(n_q):
                pos = first_pos + r
                row_max = neg_inf
                for c in range(n_k):
                    j = j0 + c
                    if (causal and j > pos) or (window != 0 and pos - j >= window):
                        scores[c] = neg_inf
                        continue
                    s = zero
                    for d in range(head_dim):
                        s += q_scaled[r, d] * k[b, kv, j, d]
                    scores[c] = s
                    row_max = max(row_max, s)
                # m_new = max(m, rowmax(S)); a row that has still seen no key keeps -inf and is skipped,
                # so exp(-inf - -inf) never happens.
                m_new = max(m[r], row_max)
                if m_new == neg_inf:
                    continue
                rescale = np.exp(m[r] - m_new)  # exp(m - m_new) <= 1 (0 when m = -inf)
                l[r] *= rescale
                for d in range(head_dim):
                    acc[r, d] *= rescale
                for c in range(n_k):
                    p = np.exp(scores[c] - m_new)  # masked keys: exp(-inf) = 0
                    if p != zero:
                        l[r] += p
                        for d in range(head_dim):
                            acc[r, d] += p * v[b, kv, j0 + c, d]
                m[r] = m_new

        for r in range(n_q):
            if l[r] > zero:
                for d in range(head_dim):
                    out[b, h, i0 + r, d] = acc[r, d] / l[r]
                lse[b, h, i0 + r] = m[r] + np.log(l[r])
            else:  # a row that sees no key: zeros and lse = -inf, never NaN
                for d in range(head_dim):
                    out[b, h, i0 + r, d] = zero
                lse[b, h, i0 + r] = neg_inf


# exp(x) for x <= 0, in a form LLVM vectorises. np.exp inside a kernel is a call to libm's exp per element
# (Numba has no vector math library here): the softmax of a tile of 16 keys x 4 heads cost as much as its
# q . k products (9.5 vs 9-12 ns per key). This is the textbook reduction:
#     x = k ln2 + r,  k = round(x / ln2),  |r| <= ln2 / 2,   so   e^x = 2^k e^r,
# with ln2 = ln2_hi + ln2_lo split so that k ln2_hi is exact (Cody-Waite), e^r by its Taylor polynomial
# (Horner), and 2^k written straight into the exponent field of a float. Taylor to r^7 / 7! leaves
# |r|^8 / 8! < 6e-9 (float32 rounds to 6e-8), to r^13 / 13! leaves 4e-18 (float64 rounds to 1.1e-16):
# measured max relative error 1.2e-7 (float32, 1 ulp) against np.exp in float64. Arguments below the smallest normal
# power (e^-87.3 float32, e^-708.4 float64), -inf included, give 0 (IEEE would give a subnormal < 1e-38
# next to the softmax's largest weight, 1); NaN stays NaN. Measured on a tile of 4 x 16 scores:
# 9.5 -> 1.3 ns per key.


def exp_nonpositive(x):
    """e^x for x <= 0 (the softmax's exp(s - max)); compiled per dtype by the overload below."""
    raise NotImplementedError("exp_nonpositive() runs inside compiled kernels only")


@njit(inline="always", fastmath={'reassoc', 'contract'}, cache=True)
def _exp_float32(x):
    lowest = np.float32(-87.33654)                  # ln(2^-126): below it 2^k is no normal float
    clamped = lowest if x < lowest else x           # also keeps k in range for -inf (NaN passes)
    k = np.floor(clamped * np.float32(1.4426950408889634) + np.float32(0.5))     # round(x / ln2)
    r = clamped - k * np.float32(0.693145751953125) - k * np.float32(1.428606765330187e-06)
    e_r = np.float32(1.0 / 5040)                    # e^r = 1 + r + r^2/2! + ... + r^7/7!
    e_r = e_r * r + np.float32(1.0 / 720)
    e_r = e_r * r + np.float32(1.0 / 120)
    e_r = e_r * r + np.float32(1.0 / 24)
    e_r = e_r * r + np.float32(1.0 / 6)
    e_r = e_r * r + np.float32(0.5)
    e_r = e_r * r + np.float32(1.0)
    e_r = e_r * r + np.float32(1.0)
    two_k = float_from_bits(np.int32((k + np.float32(127.0)) * np.float32(2.0 ** 23)))   # exponent field k + 127
    return np.float32(0.0) if x < lowest else e_r * two_k


@njit(inline="always", fastmath={'reassoc', 'contract'}, cache=True)
def _exp_float64(x):
    lowest = -708.3964185322641                     # ln(2^-1022)
    clamped = lowest if x < lowest else x
    k = np.floor(clamped * 1.4426950408889634 + 0.5)
    r = clamped - k * 6.93147180369123816490e-01 - k * 1.90821492927058770002e-10
    e_r = 1.0 / 6227020800.0                        # 1/13!, then Horner down to 1
    for n in range(12, 0, -1):                      # unrolled by LLVM (constant trip count)
        e_r = e_r * r + _INVERSE_FACTORIALS[n]
    e_r = e_r * r + 1.0
    two_k = float_from_bits(np.int64((k + 1023.0) * 2.0 ** 52))                         # exponent field k + 1023
    return 0.0 if x < lowest else e_r * two_k


_INVERSE_FACTORIALS = np.array([1.0 / math.factorial(n) for n in range(13)])   # 1/n!, n = 0..12


@overload(exp_nonpositive, inline="always")
def _exp_nonpositive_overload(x):
    if x == types.float32:
        return lambda x: _exp_float32(x)
    if x == types.float64:
        return lambda x: _exp_float64(x)
    return None


@njit(cache=True, inline='always')
def page_run(j, j0, j1, block_size):
    """The run of keys of tile j0 .. j1 - 1 that starts at key j and lies in one page: (the page's index in
    the sequence's block table, its first row, its end row, where it starts in the tile)."""
    blk = j // block_size
    r0 = j - blk * block_size
    return blk, r0, min(block_size, r0 + j1 - j), j - j0


@njit(**_REASSOC_JIT)
def split_k_decode_kernel(q, k_pool, v_pool, block_table, block_size, lengths, window, scale, neg_inf,
                          n_splits, part_out, part_lse):
    """Partial attention of each chunk of keys: part_out (batch, n_heads, n_splits, d), part_lse (.., n_splits).

    q (batch, n_heads, 1, d); k_pool, v_pool (num_blocks, n_kv_heads, block_size, d); block_table
    (batch, blocks_per_seq) int; lengths (batch,). The query of sequence b sits at position
    lengths[b] - 1 and sees the keys [start, lengths[b]) with start = max(0, lengths[b] - window).
    Those keys are cut into n_splits chunks of ceil(span / n_splits) keys; chunk p is reduced alone.

    One task is (sequence b, KV head, chunk): the ``group`` query heads that share KV head kv
    (GQA) are reduced together, so each K and V row comes from memory once for all of them. The chunk
    is walked a tile of DECODE_TILE keys at a time, and a tile page by page (key j lives at row
    j % block_size of page block_table[b, j // block_size]). Per tile and query head g, with
    s_j = scale q_g . k_j, the running (m, l, acc) of the online softmax becomes
        m' = max(m, max_j s_j)                      (the rescale below only runs when the max grows)
        l' = l e^(m - m') + sum_j e^(s_j - m')
        acc' = acc e^(m - m') + sum_j e^(s_j - m') v_j
    and at the end out = acc / l, lse = m + log l. The accumulator is part_out itself.

    Shaped for a serving step (`mid`: 8-32 rows of 2 KV heads x 4 query heads, head_dim 64, pages of
    16 keys, 16-256 keys per row, 8 layers' pools of 16 MB each, so a step's pages come from memory).
    Per key and KV head a task reads 512 bytes (a K row and a V row) and does 512 multiply-adds (4 heads
    x 64 for q . k, as many for p v), so both the loops and the memory traffic matter:
    * q . k and p v by register tiles of 2 heads x 4 keys (``scores_2x4``, ``add_rows_2x4``): per
      vector of d, 2 loads of q (or acc) and 4 of K (or V) feed 8 multiply-adds;
    * the exponentials by ``exp_nonpositive`` (vectorised): libm's exp per score cost as much as the
      q . k products of a page;
    * the page PREFETCH_PAGES ahead is prefetched while a page computes (its K rows during the q . k
      walk, its V rows during the p v walk), a share before each pair of heads: a sequence's pages lie
      anywhere in the pool, so the hardware prefetcher cannot guess them; and asking for a whole page
      (128 lines) at once stalls the core until the lines arrive (measured 5-25% slower than shares);
    * the softmax's bookkeeping (max, rescale, sum) runs once per tile of 64 keys, not per page.
    Measured with benchmarks/decode_attention_paged.py against the kernel before (results/
    decode_attention_paged.md; a shared 2-core AMD EPYC; median ms per call, 5 alternating rounds, the
    backend's threads): serving 8 rows 0.249 -> 0.150, 17 rows 0.311 -> 0.176 (1 thread 0.536 -> 0.304),
    32 rows 0.537 -> 0.282; window 64 0.150 -> 0.091; float64 0.470 -> 0.304; batch 1 with 4096 keys,
    paged 0.251 -> 0.162, contiguous 0.254 -> 0.133: 1.5-2.1x (another run: 1.6-2.3x). With the pages in
    L2 (1 thread, 17 rows of 136 keys): 57 -> 39 ns per key and KV head.
    """
    batch, n_heads, _, head_dim = q.shape
    n_kv = k_pool.shape[1]
    group = n_heads // n_kv
    zero, one = scale - scale, scale / scale       # 0 and 1 in q's dtype
    for task in prange(batch * n_kv * n_splits):
        b = task // (n_kv * n_splits)
        kv = (task // n_splits) % n_kv
        split = task % n_splits
        h0 = kv * group                      # query heads h0 .. h0 + group - 1 read this KV head
        length = lengths[b]
        start = 0
        if window != 0:
            start = max(0, length - window)  # keys before the window are never read
        chunk = (length - start + n_splits - 1) // n_splits
        j_begin = start + split * chunk
        j_end = min(j_begin + chunk, length)

        for g in range(group):               # part_out[b, h, split] accumulates sum_j e^(s_j - m) v_j
            part_out[b, h0 + g, split] = zero
        m = np.full(group, neg_inf)                           # running max per query head
        l = np.zeros(group, dtype=q.dtype)                    # running sum of e^(s_j - m)
        p = np.empty((group, DECODE_TILE), dtype=q.dtype)    # a tile's scores, then its weights
        # The first PREFETCH_PAGES pages are asked for now (at most a tile of keys: a contiguous cache is
        # one long page, which the hardware prefetcher streams), the later ones by the walks below.
        first_keys = min(j_end, j_begin + DECODE_TILE)
        for blk in range(j_begin // block_size, min((first_keys - 1) // block_size + 1,
                                                    j_begin // block_size + PREFETCH_PAGES)):
            prefetch_share(k_pool, block_table, b, kv, blk, j_begin, first_keys, block_size, 0, 1)
            prefetch_share(v_pool, block_table, b, kv, blk, j_begin, first_keys, block_size, 0, 1)
        shares = max(1, group // 2)          # the walks prefetch a page in a share per pair of heads
        for j0 in range(j_begin, j_end, DECODE_TILE):
            j1 = min(j0 + DECODE_TILE, j_end)              # the tile: keys j0 .. j1 - 1
            n = j1 - j0
            # p[g, j - j0] = scale q_g . k_j, a page at a time (rows r0 .. r1 - 1 of page blk)
            j = j0
            while j < j1:
                blk, r0, r1, at = page_run(j, j0, j1, block_size)
                j += r1 - r0
                page = k_pool[block_table[b, blk], kv]        # (block_size, d)
                for g in range(0, group - 1, 2):
                    prefetch_share(k_pool, block_table, b, kv, blk + PREFETCH_PAGES, j0, j_end, block_size, g // 2,
                                   shares)
                    scores_2x4(q[b, h0 + g, 0], q[b, h0 + g + 1, 0], page, r0, r1, scale, p[g], p[g + 1], at)
                if group == 1:
                    prefetch_share(k_pool, block_table, b, kv, blk + PREFETCH_PAGES, j0, j_end, block_size, 0, 1)
                if group % 2 == 1:
                    scores_1x4(q[b, h0 + group - 1, 0], page, r0, r1, scale, p[group - 1], at)
            # the online softmax, per head: rescale by e^(m - m') if the max grew, then the weights
            for g in range(group):
                s = p[g]
                tile_max = s[0]
                for c in range(1, n):
                    tile_max = max(tile_max, s[c])
                if tile_max > m[g]:
                    rescale = exp_nonpositive(m[g] - tile_max)     # 0 on the first tile (m = -inf)
                    l[g] *= rescale
                    acc = part_out[b, h0 + g, split]
                    for d in range(head_dim):
                        acc[d] *= rescale
                    m[g] = tile_max
                total = zero
                for c in range(n):
                    s[c] = exp_nonpositive(s[c] - m[g])            # now the weights e^(s_j - m')
                    total += s[c]
                l[g] += total
            # acc_g += sum_j p[g, j - j0] v_j, a page at a time
            j = j0
            while j < j1:
                blk, r0, r1, at = page_run(j, j0, j1, block_size)
                j += r1 - r0
                page = v_pool[block_table[b, blk], kv]
                for g in range(0, group - 1, 2):
                    prefetch_share(v_pool, block_table, b, kv, blk + PREFETCH_PAGES, j0, j_end, block_size, g // 2,
                                   shares)
                    add_rows_2x4(p[g], p[g + 1], page, r0, r1, at, part_out[b, h0 + g, split],
                                 part_out[b, h0 + g + 1, split])
                if group == 1:
                    prefetch_share(v_pool, block_table, b, kv, blk + PREFETCH_PAGES, j0, j_end, block_size, 0, 1)
                if group % 2 == 1:
                    add_rows_1x4(p[group - 1], page, r0, r1, at, part_out[b, h0 + group - 1, split])
        for g in range(group):
            if l[g] > zero:
                inv = one / l[g]
                acc = part_out[b, h0 + g, split]
                for d in range(head_dim):
                    acc[d] *= inv
                part_lse[b, h0 + g, split] = m[g] + np.log(l[g])
            else:  # an empty chunk (more splits than keys): weight exp(-inf) = 0 in the merge
                part_lse[b, h0 + g, split] = neg_inf


# The register tiles of the decode kernel. Each walks the rows r0 .. r1 - 1 of one page, four at a time
# (then one at a time for the last (r1 - r0) mod 4), and runs one loop over d per group of four rows,
# which LLVM vectorises: the 4 (or 2 x 4) sums live in vector registers, and the 4 rows' loads are shared
# by the two heads. Scores and weights of row r sit at index at + r - r0 of the tile's p.
# Measured on a page of 16 rows of 64 floats in L1, 4 query heads, ns per key: q . k one key at a time
# 11, 4 keys of one head 11-12, 4 keys x 2 heads 9; p v one key at a time 21.5, 4 keys of one head 14,
# 4 keys x 2 heads 9.5. (4 heads x 4 keys and 2 heads x 8 keys measured no better: registers run out.)


@njit(fastmath={'reassoc', 'contract'}, cache=True, inline='always')
def scores_2x4(q_a, q_b, page, r0, r1, scale, s_a, s_b, at):
    """s_a[at + r - r0] = scale q_a . page[r] and s_b likewise, for r in r0 .. r1 - 1."""
    zero = scale - scale
    r = r0
    while r + 4 <= r1:
        k0, k1, k2, k3 = page[r], page[r + 1], page[r + 2], page[r + 3]
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = zero
        for d in range(q_a.shape[0]):
            x, y = q_a[d], q_b[d]
            u0, u1, u2, u3 = k0[d], k1[d], k2[d], k3[d]
            a0 += x * u0
            a1 += x * u1
            a2 += x * u2
            a3 += x * u3
            b0 += y * u0
            b1 += y * u1
            b2 += y * u2
            b3 += y * u3
        i = at + r - r0
        s_a[i], s_a[i + 1], s_a[i + 2], s_a[i + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
        s_b[i], s_b[i + 1], s_b[i + 2], s_b[i + 3] = b0 * scale, b1 * scale, b2 * scale, b3 * scale
        r += 4
    while r < r1:
        k0 = page[r]
        a0 = b0 = zero
        for d in range(q_a.shape[0]):
            a0 += q_a[d] * k0[d]
            b0 += q_b[d] * k0[d]
        s_a[at + r - r0], s_b[at + r - r0] = a0 * scale, b0 * scale
        r += 1


@njit(fastmath={'reassoc', 'contract'}, cache=True, inline='always')
def scores_1x4(q_a, page, r0, r1, scale, s_a, at):
    """scores_2x4 for one head (the last of an odd group)."""
    zero = scale - scale
    r = r0
    while r + 4 <= r1:
        k0, k1, k2, k3 = page[r], page[r + 1], page[r + 2], page[r + 3]
        a0 = a1 = a2 = a3 = zero
        for d in range(q_a.shape[0]):
            x = q_a[d]
            a0 += x * k0[d]
            a1 += x * k1[d]
            a2 += x * k2[d]
            a3 += x * k3[d]
        i = at + r - r0
        s_a[i], s_a[i + 1], s_a[i + 2], s_a[i + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
        r += 4
    while r < r1:
        k0 = page[r]
        a0 = zero
        for d in range(q_a.shape[0]):
            a0 += q_a[d] * k0[d]
        s_a[at + r - r0] = a0 * scale
        r += 1


@njit(fastmath={'reassoc', 'contract'}, cache=True, inline='always')
def add_rows_2x4(p_a, p_b, page, r0, r1, at, acc_a, acc_b):
    """acc_a += sum_r p_a[at + r - r0] page[r] and acc_b likewise, for r in r0 .. r1 - 1."""
    r = r0
    while r + 4 <= r1:
        v0, v1, v2, v3 = page[r], page[r + 1], page[r + 2], page[r + 3]
        i = at + r - r0
        a0, a1, a2, a3 = p_a[i], p_a[i + 1], p_a[i + 2], p_a[i + 3]
        b0, b1, b2, b3 = p_b[i], p_b[i + 1], p_b[i + 2], p_b[i + 3]
        for d in range(acc_a.shape[0]):
            x0, x1, x2, x3 = v0[d], v1[d], v2[d], v3[d]
            acc_a[d] += (a0 * x0 + a1 * x1) + (a2 * x2 + a3 * x3)
            acc_b[d] += (b0 * x0 + b1 * x1) + (b2 * x2 + b3 * x3)
        r += 4
    while r < r1:
        v0 = page[r]
        a0, b0 = p_a[at + r - r0], p_b[at + r - r0]
        for d in range(acc_a.shape[0]):
            acc_a[d] += a0 * v0[d]
            acc_b[d] += b0 * v0[d]
        r += 1


@njit(fastmath={'reassoc', 'contract'}, cache=True, inline='always')
def add_rows_1x4(p_a, page, r0, r1, at, acc_a):
    """add_rows_2x4 for one head (the last of an odd group)."""
    r = r0
    while r + 4 <= r1:
        v0, v1, v2, v3 = page[r], page[r + 1], page[r + 2], page[r + 3]
        i = at + r - r0
        a0, a1, a2, a3 = p_a[i], p_a[i + 1], p_a[i + 2], p_a[i + 3]
        for d in range(acc_a.shape[0]):
            acc_a[d] += (a0 * v0[d] + a1 * v1[d]) + (a2 * v2[d] + a3 * v3[d])
        r += 4
    while r < r1:
        v0 = page[r]
        a0 = p_a[at + r - r0]
        for d in range(acc_a.shape[0]):
            acc_a[d] += a0 * v0[d]
        r += 1


@njit(cache=True, inline='always')
def prefetch_share(pool, block_table, b, kv, blk, j_begin, j_end, block_size, share, shares):
    """Prefetch share ``share`` of ``shares`` (equal runs of rows) of page blk of sequence b, KV head kv: every
    64-byte line of its rows that hold keys in j_begin .. j_end - 1 (none if the page holds none)."""
    first = max(j_begin - blk * block_size, 0)              # rows of the page inside the keys
    last = min(j_end - blk * block_size, block_size)
    r0 = max(first, share * block_size // shares)
    r1 = min(last, (share + 1) * block_size // shares)
    if r0 >= r1:
        return
    rows = pool[block_table[b, blk], kv]                     # (block_size, d)
    step = max(1, 64 // pool.itemsize)                       # elements per cache line
    for r in range(r0, r1):
        for d in range(0, pool.shape[3], step):
            prefetch(rows, r, d)


@njit(**_JIT)
def merge_splits_kernel(part_out, part_lse, zero, neg_inf, out, lse):
    """lse = log sum_p exp(lse_p); out = sum_p exp(lse_p - lse) out_p  (per sequence and head).

    Computed as m = max_p lse_p, lse = m + log sum_p exp(lse_p - m), so nothing overflows; when no
    chunk saw a key, out = 0 and lse = -inf."""
    batch, n_heads, n_splits, head_dim = part_out.shape
    for task in prange(batch * n_heads):
        b = task // n_heads
        h = task % n_heads
        m = neg_inf
        for p in range(n_splits):
            m = max(m, part_lse[b, h, p])
        if m == neg_inf:
            for d in range(head_dim):
                out[b, h, 0, d] = zero
            lse[b, h, 0] = neg_inf
            continue
        total = np.exp(part_lse[b, h, 0] - m)  # weights exp(lse_p - m) <= 1; 0 for empty chunks
        for p in range(1, n_splits):
            total += np.exp(part_lse[b, h, p] - m)
        for d in range(head_dim):
            value = np.exp(part_lse[b, h, 0] - m) * part_out[b, h, 0, d]
            for p in range(1, n_splits):
                value += np.exp(part_lse[b, h, p] - m) * part_out[b, h, p, d]
            out[b, h, 0, d] = value / total
        lse[b, h, 0] = m + np.log(total)


@njit(**_JIT)
def rope_kernel(x, cos, sin, interleaved, out):
    """out = x with every pair (x1, x2) rotated: (x1 cos - x2 sin, x1 sin + x2 cos).

    x (batch, heads, seq, d); cos, sin 4-D and broadcastable to (batch, heads, seq, d/2): an axis of
    size 1 is read at index 0 (``b % cos.shape[0]``). Pair p is (p, p + d/2) for the "half"
    convention, (2p, 2p + 1) for "interleaved"."""
    batch, heads, seq, head_dim = x.shape
    half = head_dim // 2
    for task in prange(batch * heads * seq):
        b = task // (heads * seq)
        h = (task // seq) % heads
        s = task % seq
        cb, ch, cs = b % cos.shape[0], h % cos.shape[1], s % cos.shape[2]
        for p in range(half):
            if interleaved:
                first, second = 2 * p, 2 * p + 1
            else:
                first, second = p, p + half
            x1 = x[b, h, s, first]
            x2 = x[b, h, s, second]
            c = cos[cb, ch, cs, p]
            sn = sin[cb, ch, cs, p]
            out[b, h, s, first] = x1 * c - x2 * sn
            out[b, h, s, second] = x1 * sn + x2 * c


# --------------------------------------------------------------------------- the backend


def choose_splits(batch: int, n_kv_heads: int, longest: int, workers: int, tile: int) -> int:
    """Enough chunks that batch * n_kv_heads * n_splits tasks (one per KV head: GQA) keep every worker
    busy (two tasks each), but never a chunk shorter than one tile of keys: a split adds a merge term
    and saves nothing then. A batch that already has the tasks gets one split (and no merge)."""
    wanted = -(-2 * workers // max(1, batch * n_kv_heads))
    return int(max(1, min(wanted, -(-longest // tile))))


# Below this many multiply-adds a kernel runs on the calling thread only. Waking Numba's thread pool
# costs more than a batch-1 decode step's attention, and the woken threads then fight OpenBLAS's
# spinning threads for the same cores: measured on 2 cores, decode of a 55M model went from
# 12.7 to 126 tokens/s with this rule.
PARALLEL_MIN_WORK = 1 << 21
SPLIT_K_WORK = 2


def threads_for(work: int) -> int:
    return 1 if work < PARALLEL_MIN_WORK else numba.config.NUMBA_NUM_THREADS


@contextlib.contextmanager
def numba_threads(threads: int):
    """Run the enclosed kernels on ``threads`` threads (numba.set_num_threads is per calling thread)."""
    previous = numba.get_num_threads()
    if threads == previous:          # set_num_threads costs ~2 us; a serving step asks this per layer
        yield
        return
    numba.set_num_threads(threads)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


class NumbaBackend(SplitKDecode, Backend):
    """NumPy arrays, Numba-compiled CPU kernels for attention (prefill and decode) and RoPE.

    ``block_q``, ``block_k``: the tile of the prefill kernel; ``n_splits``: fix the number of
    decode chunks (default: chosen from the batch, the heads and the CPU's threads). Every choice
    gives the same result up to round-off; the tests vary them."""

    name = "numba"
    xp = np
    # Float weights kept (out, in): the compiled decode step's matrix-vector kernel reads each output's
    # row contiguously (backends/numba_decode.py; measured there). The generic path still computes
    # x @ W through a transposed view (BLAS takes it as a transposed operand, no copy).
    weight_layout = "out_in"
    # "naive" and "online" run the NumPy reference (they exist to be read, not to be fast).
    attention_algorithms = ("tiled", "naive", "online")
    default_attention = "tiled"
    cache_dtypes = ("float32", "float64", "float16")

    def __init__(self, block_q: int = 64, block_k: int = 64, n_splits=None):
        if int(block_q) < 1 or int(block_k) < 1:
            raise ConfigError(f"block_q={block_q}, block_k={block_k}; both must be >= 1")
        self.block_q, self.block_k = int(block_q), int(block_k)
        self.n_splits = n_splits

    # ---- prefill
    def attention(self, q, k, v, *, causal=True, q_offset=0, lengths=None, window=None, algorithm=None):
        algorithm = algorithm or self.default_attention
        if algorithm != "tiled":
            if algorithm not in self.attention_algorithms:
                raise ConfigError(f"algorithm={algorithm!r}; choose one of {self.attention_algorithms}")
            return super().attention(q, k, v, causal=causal, q_offset=q_offset, lengths=lengths, window=window,
                                     algorithm=algorithm)
        batch, n_heads, _, seq_q, seq_k, head_dim = attention_geometry(q, k, v)
        check_float_dtypes(q, k, v)
        dtype = np.dtype(q.dtype)
        q = np.ascontiguousarray(q)
        k = np.ascontiguousarray(k, dtype=dtype)   # float16 -> q's dtype (Numba has no CPU float16)
        v = np.ascontiguousarray(v, dtype=dtype)
        out = np.empty(q.shape, dtype=dtype)
        lse = np.empty(q.shape[:3], dtype=dtype)
        with numba_threads(threads_for(batch * n_heads * seq_q * seq_k * head_dim)):
            tiled_attention_kernel(q, k, v, host_offsets(q_offset, batch), host_lengths(lengths, batch, seq_k),
                                   bool(causal), window_value(window), dtype.type(default_scale(head_dim)),
                                   dtype.type(-np.inf), self.block_q, self.block_k, out, lse)
        return out, lse

    # ---- decode
    def _block_table(self, block_table):
        return np.ascontiguousarray(block_table, dtype=np.int32)

    def _split_k(self, q, k_pool, v_pool, table, block_size, lengths, window, n_splits):
        batch, n_heads, n_kv, head_dim = pool_geometry(q, k_pool, v_pool)
        check_float_dtypes(q, k_pool, v_pool)
        dtype = np.dtype(q.dtype)
        lens = host_lengths(lengths, batch, table.shape[1] * block_size)
        if k_pool.dtype != dtype:  # float16 caches: widen (see the module docstring)
            k_pool, v_pool = k_pool.astype(dtype), v_pool.astype(dtype)
        longest = int(lens.max(initial=0))
        # multiply-adds: q.k and p v, head_dim each, per key and query head
        threads = threads_for(SPLIT_K_WORK * batch * n_heads * longest * head_dim)
        n_splits = int(n_splits or self.n_splits or choose_splits(batch, n_kv, longest, threads, DECODE_TILE))
        part_out = np.empty((batch, n_heads, n_splits, head_dim), dtype=dtype)
        part_lse = np.empty((batch, n_heads, n_splits), dtype=dtype)
        neg_inf = dtype.type(-np.inf)
        with numba_threads(threads):
            split_k_decode_kernel(np.ascontiguousarray(q), k_pool, v_pool, table, int(block_size), lens,
                                  window_value(window), dtype.type(default_scale(head_dim)), neg_inf, n_splits,
                                  part_out, part_lse)
            if n_splits == 1:
                # One chunk is the whole answer: the merge would compute out = e^0 out_0 / e^0, lse = lse_0.
                return part_out, part_lse                  # (batch, H, 1, hd), (batch, H, 1)
            out = np.empty(q.shape, dtype=dtype)
            lse = np.empty(q.shape[:3], dtype=dtype)
            merge_splits_kernel(part_out, part_lse, dtype.type(0), neg_inf, out, lse)
        return out, lse

    # ---- the compiled decode step and quantized products (backends/numba_decode.py)
    def prepare_decode(self, model):
        from . import numba_decode

        return numba_decode.prepare_decode(model)

    def linear(self, x, weight, bias=None):
        """y = x @ W (+ b), W (in, out) seen through a transposed view of its contiguous (out, in) array.

        Up to numba_decode.TILED_TO_ROWS rows (a decode step of a batch, a short prompt): a compiled
        product that streams W once (numba_decode.few_rows_product: one dot per output for 1-3 rows,
        register tiles from 4). More rows: BLAS on the (out, in) array as it lies, y^T = W^T x^T,
        returned as its transposed view: x @ W through the view (a transposed B operand) is 1.3-1.6x
        slower from 8 to 32 rows on `mid`'s matrices (2 cores)."""
        from . import numba_decode

        w = weight.T                                                       # (out, in)
        if x.ndim != 2 or not w.flags.c_contiguous:
            return super().linear(x, weight, bias)
        y = numba_decode.few_rows_product(x, w, numba_decode.NO_SCALES, 0, bias)
        if y is None:
            y = (w @ x.T).T                                  # (out, in) @ (in, rows) -> (out, rows) -> (rows, out)
            if bias is not None:
                y += bias
        return y

    def quantized_linear(self, x, weight, bias=None):
        from . import numba_decode

        y = numba_decode.few_rows_product(x, weight.values, weight.scales, weight.group, bias)
        return super().quantized_linear(x, weight, bias) if y is None else y

    # ---- the elementwise parts of a block (float32 rows; anything else: the reference)
    # One pass per row where NumPy makes five temporaries (the compiled decode step's RMSNorm, rows in
    # parallel). 512 rows of `mid`, one thread: 0.27 -> 0.08 ms. (SwiGLU stays NumPy's: its vectorised exp
    # beats Numba's scalar one, 512 x 1408: ~1 ms vs 3.9 ms.)
    def rms_norm(self, x, weight, eps):
        from . import numba_decode

        if x.ndim != 2 or x.dtype != np.float32 or weight.dtype != np.float32:
            return super().rms_norm(x, weight, eps)
        out = np.empty(x.shape, dtype=np.float32)
        with numba_threads(threads_for(x.size * 8)):       # ~8 flops an element, counted as multiply-adds
            numba_decode.rms_norm_parallel(x, weight, np.float32(eps), out)
        return out

    # ---- RoPE
    def apply_rope(self, x, cos, sin, convention="half"):
        interleaved = rope_is_interleaved(convention)
        check_rope_shapes(x, cos, sin)
        cos4 = as_4d(np.asarray(cos, dtype=x.dtype), np)
        sin4 = as_4d(np.asarray(sin, dtype=x.dtype), np)
        out = np.empty(x.shape, dtype=x.dtype)
        # q and k arrive as transposed views; one contiguous copy keeps a single compiled variant per dtype.
        with numba_threads(threads_for(x.size)):
            rope_kernel(np.ascontiguousarray(x), np.ascontiguousarray(cos4), np.ascontiguousarray(sin4), interleaved,
                        out)
        return out
