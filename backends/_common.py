"""What every accelerated backend checks and decides the same way, before it launches a kernel.

The kernels themselves trust their arguments (a wrong index in a compiled loop reads garbage or
crashes instead of raising), so the Python wrapper of each kernel validates shapes and turns the
optional arguments of the protocol into plain values a kernel can take:

* ``q_offset``: an int or ``(batch,)`` ints -> an int64 array ``(batch,)``;
* ``lengths``: ``None`` (every key is present) or ``(batch,)`` ints -> an int64 array ``(batch,)``;
* ``window``: ``None`` or an int ``W >= 1`` -> an int, with ``0`` meaning "no window" (a kernel
  argument cannot be ``None``);
* ``convention``: ``"half"`` / ``"interleaved"`` -> a flag.

These run on the host: ``q_offset`` and ``lengths`` come from the caches, which keep them in NumPy.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from minikv import attention as reference_attention
from minikv.errors import InvalidInputError

NO_WINDOW = 0


def attention_geometry(q, k, v):
    """(batch, n_heads, n_kv_heads, seq_q, seq_k, head_dim) of q (b, h, sq, d), k and v (b, kv, sk, d)."""
    if len(q.shape) != 4 or len(k.shape) != 4 or len(v.shape) != 4:
        raise InvalidInputError(
            f"attention expects 4-D arrays q (batch, n_heads, seq_q, head_dim) and k, v (batch, n_kv_heads, "
            f"seq_k, head_dim); got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} (reshape your inputs)")
    batch, n_heads, seq_q, head_dim = q.shape
    if tuple(k.shape) != tuple(v.shape) or k.shape[0] != batch or k.shape[3] != head_dim:
        raise InvalidInputError(
            f"shapes do not fit together: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; need k and v "
            f"both (batch={batch}, n_kv_heads, seq_k, head_dim={head_dim})")
    n_kv_heads = k.shape[1]
    reference_attention.check_gqa(n_heads, n_kv_heads)
    return batch, n_heads, n_kv_heads, seq_q, k.shape[2], head_dim


@functools.lru_cache(maxsize=None)
def _dtypes(names: tuple) -> frozenset:
    return frozenset(np.dtype(name) for name in names)


def check_float_dtypes(q, k, v, allowed_q=("float32", "float64")):
    # Compared as dtype objects: np.dtype(...).name builds a string per call (~4 us in NumPy 2), and a
    # decode step calls this once per layer.
    if np.dtype(q.dtype) not in _dtypes(tuple(allowed_q)):
        raise InvalidInputError(f"q has dtype {np.dtype(q.dtype).name}; this backend computes attention for q in "
                                f"{allowed_q} (pass q.astype(np.float32))")
    for name, array in (("k", k), ("v", v)):
        if np.dtype(array.dtype) not in _dtypes(("float16", "float32", "float64")):
            raise InvalidInputError(f"{name} has dtype {np.dtype(array.dtype).name}; pass float16, float32 or float64")


def host_offsets(q_offset, batch: int) -> np.ndarray:
    """q_offset (int or (batch,) ints) -> contiguous int64 array (batch,), checked as the reference checks it.
    A negative offset is legal: queries before position 0 see no key (causal)."""
    return np.ascontiguousarray(reference_attention._as_offsets(q_offset, batch))


def host_lengths(lengths, batch: int, seq_k: int) -> np.ndarray:
    """lengths (None or (batch,) ints in [0, seq_k]) -> contiguous int64 array (batch,); None means all seq_k keys."""
    if lengths is None:
        return np.full(batch, seq_k, dtype=np.int64)
    return np.ascontiguousarray(reference_attention._as_lengths(lengths, batch, seq_k))


def window_value(window) -> int:
    """None -> NO_WINDOW (0); an int W >= 1 -> W (checked as the reference checks it)."""
    window = reference_attention._check_window(window)
    return NO_WINDOW if window is None else window


def rope_is_interleaved(convention: str) -> bool:
    if convention == "half":
        return False
    if convention == "interleaved":
        return True
    raise InvalidInputError(f"convention={convention!r} must be 'half' or 'interleaved'")


def default_scale(head_dim: int) -> float:
    """1 / sqrt(head_dim) as a Python float; each backend rounds it once to its compute dtype."""
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def as_4d(table, xp):
    """cos/sin tables broadcastable to (batch, heads, seq, half) -> exactly 4-D (leading axes of size 1).

    Kernels index a table with ``b % table.shape[0]`` (and so on for every axis), which is the
    broadcasting rule: an axis of size 1 is read at index 0 for every b."""
    if table.ndim > 4:
        raise InvalidInputError(f"cos/sin tables have {table.ndim} axes; at most 4 (batch, heads, seq, head_dim/2)")
    return table.reshape((1,) * (4 - table.ndim) + tuple(table.shape)) if table.ndim < 4 else table


def check_rope_shapes(x, cos, sin):
    if len(x.shape) != 4:
        raise InvalidInputError(f"apply_rope expects x (batch, heads, seq, head_dim); got shape {tuple(x.shape)}")
    half = x.shape[-1] // 2
    if x.shape[-1] % 2:
        raise InvalidInputError(f"RoPE needs an even head_dim; got {x.shape[-1]}")
    if tuple(cos.shape) != tuple(sin.shape):
        raise InvalidInputError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    try:
        target = np.broadcast_shapes(tuple(cos.shape), tuple(x.shape[:-1]) + (half,))
    except ValueError:
        target = None
    if target != tuple(x.shape[:-1]) + (half,):
        raise InvalidInputError(f"cos/sin of shape {tuple(cos.shape)} do not broadcast to "
                                f"{tuple(x.shape[:-1]) + (half,)} (x without its last axis, then head_dim/2)")


def pool_geometry(q, k_pool, v_pool):
    """(batch, n_heads, n_kv_heads, head_dim) of q (batch, n_heads, 1, d) and a paged pool
    (num_blocks, n_kv_heads, block_size, d); a contiguous cache (batch, n_kv_heads, capacity, d) is a
    pool of one block per sequence."""
    if len(q.shape) != 4 or len(k_pool.shape) != 4 or tuple(k_pool.shape) != tuple(v_pool.shape):
        raise InvalidInputError(
            f"decode expects q (batch, n_heads, 1, head_dim) and k, v pools (num_blocks, n_kv_heads, block_size, "
            f"head_dim) of one shape; got {tuple(q.shape)}, {tuple(k_pool.shape)}, {tuple(v_pool.shape)}")
    batch, n_heads, _, head_dim = q.shape
    n_kv_heads = k_pool.shape[1]
    if k_pool.shape[3] != head_dim:
        raise InvalidInputError(f"q has head_dim={head_dim} but the cache rows have {k_pool.shape[3]}")
    reference_attention.check_gqa(n_heads, n_kv_heads)
    return batch, n_heads, n_kv_heads, head_dim


class SplitKDecode:
    """The decode entry points of a backend whose one split-K kernel reads through a block table.

    Mixed in before ``minikv.backend.Backend``; the backend supplies ``_split_k(q, k_pool, v_pool,
    table, block_size, lengths, window, n_splits)`` and ``attention``. A contiguous cache is a paged
    one with a single block of ``capacity`` rows per sequence (table ``[[0], [1], ...]``), so static,
    concat, sliding and paged caches all run the same kernel.
    """

    def decode_attention(self, q, k_cache, v_cache, lengths, *, window=None, n_splits=None):
        batch, _, _, seq_q, capacity, _ = attention_geometry(q, k_cache, v_cache)
        if seq_q != 1:
            return self._decode_as_prefill(q, k_cache, v_cache, lengths, window)
        table = np.arange(batch, dtype=np.int32)[:, None]
        return self._split_k(q, k_cache, v_cache, table, max(capacity, 1), lengths, window, n_splits)

    def paged_decode_attention(self, q, k_pool, v_pool, block_table, lengths, *, window=None, n_splits=None):
        if q.shape[2] != 1:
            return super().paged_decode_attention(q, k_pool, v_pool, block_table, lengths, window=window,
                                                  n_splits=n_splits)
        if len(block_table.shape) != 2 or block_table.shape[0] != q.shape[0]:
            raise InvalidInputError(f"block_table has shape {tuple(block_table.shape)}; expected "
                                    f"(batch={q.shape[0]}, blocks_per_seq)")
        return self._split_k(q, k_pool, v_pool, self._block_table(block_table), k_pool.shape[2], lengths, window,
                             n_splits)

    def _block_table(self, block_table):
        """The table as the kernel takes it (already on the device for CUDA)."""
        return block_table

    def _decode_as_prefill(self, q, k_cache, v_cache, lengths, window):
        """Several new queries per sequence: query i sits at lengths[b] - seq_q + i (the prefill kernel)."""
        lens = host_lengths(lengths, q.shape[0], k_cache.shape[2])
        return self.attention(q, k_cache, v_cache, causal=True, q_offset=np.maximum(lens - q.shape[2], 0),
                              lengths=lens, window=window)
