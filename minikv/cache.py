"""KV caches: every way to keep the keys and values of past positions, behind one interface.

Why a cache at all: at decode step t, attention needs K and V of all positions 0..t. They do not
change once computed (causal attention: a position never sees the future), so recomputing them
every step (``cache="none"``) does O(t) work per layer per step that a cache makes O(1).

The four kinds, each provably equal to recomputing (tests/test_cache.py):

* ``concat``: grows with ``np.concatenate`` every step, what most tutorials write. Each step
  copies the whole cache into a new array: O(t) bytes copied per step, O(t^2) in total.
* ``static``: pre-allocated to ``max_seq_len`` and written in place at each sequence's position:
  no allocation per step.
* ``paged``: a pool of fixed-size blocks and a block table per sequence (vLLM's PagedAttention):
  a sequence takes blocks as it grows and gives them back on ``free(seq)`` / ``reset()``, so memory
  follows the tokens actually held rather than the worst case.
* ``sliding``: a ring buffer of the last W positions (Mistral's sliding window). Position p lives
  in slot p mod W; attention does not care about the order of keys (RoPE already encodes each
  key's position), so decode attends to the ring as it lies.

Memory held, for a cache of ``positions`` slots per sequence::

    nbytes = 2 (K and V) * layers * batch * positions * kv_heads * head_dim * itemsize

``dtype="int8"`` (every kind): each key and value row (one token, one head: head_dim numbers) is
quantized on write, ``q = round(row / scale)`` with ``scale = max|row| / 127`` (minikv.quant's
``quantize_rows``), and its float32 scale is kept beside it, laid out like the storage (a scale
array per K and V array with the head_dim axis dropped). A row then costs head_dim + 4 bytes instead
of 4 * head_dim; the view hands over q and the scales (``KVView.k_scales``), and attention reads
``q * scale`` (``dequantize_view``). Every promise below holds for the scales as for K and V.

A cache **stores**; it does not attend. One forward of ``n_new[b]`` new tokens per sequence drives
it like this (``Transformer.forward`` in model.py)::

    cache.reserve(n_new)                          # claim room; CacheOverflowError before any write
    for each layer:
        view = cache.update(layer, k_new, v_new)  # write this step's K/V, get back every K/V held
        out = attention(q, view.k, view.v, ...)   # the model attends, not the cache
    cache.advance(n_new)                          # commit: lengths += n_new
    # on any exception in between: cache.rollback() restores the cache exactly as it was

``cache.truncate(lengths)`` rewinds sequences to shorter lengths (speculative decoding throws away
rejected tokens this way); a ring that has already overwritten those positions cannot rewind and
raises ``CacheRewindError``.

Every cache knows its per-sequence ``lengths``, its ``capacity``, ``nbytes``, ``reset()``, and
``save(path)`` / ``load_cache(path)`` (safetensors).
"""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np

from . import validate
from .backend import Backend, get_backend
from .errors import (CacheMismatchError, CacheOverflowError, CacheRewindError, CheckpointError, ConfigError,
                     InvalidInputError)
from .quant import dequantize_rows, quantize_rows

CACHE_KINDS = ("none", "concat", "static", "paged", "sliding")
# Storage dtypes every kind takes; int8 stores each K/V row as int8 with a float32 scale beside it.
CACHE_DTYPES = ("float16", "float32", "float64", "int8")
_FORMAT_VERSION = "1"
# What Transformer.forward calls on a cache (a KVCache, or anything else that keeps the same promises).
CACHE_PROTOCOL = ("lengths", "check_compatible", "reserve", "update", "advance", "rollback")


@dataclass(frozen=True)
class KVView:
    """What attention needs after a write: every key and value the new queries may see.

    k, v:        contiguous caches: (batch, kv_heads, width, head_dim) views (no copy where the
                 storage allows it); paged: the pools (num_blocks, kv_heads, block_size, head_dim).
                 int8 caches: k, v hold the integers q, and k_scales, v_scales the float32 scale of
                 each row, laid out like k, v without the head_dim axis (see dequantize_view)
    q_offset:    (batch,) position *in the view* of each sequence's first new query
    lengths:     (batch,) keys present per sequence, the new ones included (= q_offset + n_new)
    block_table: paged only: (batch, blocks used) pool block of each block of positions; else None
    segments:    a flattened ragged batch only (the serving engine's store): (n_seqs + 1,) host int64
                 row boundaries, like flash-attention's cu_seqlens. Rows segments[s]:segments[s+1]
                 are consecutive tokens of one sequence (one query each, same block table, positions
                 increasing by one), so the backend can attend to them as one chunk; else None

    These are exactly the arguments of ``minikv.attention`` (q_offset, lengths) and of the backend's
    paged kernels (block_table, segments), so the model passes them through unchanged.
    """

    k: Any
    v: Any
    q_offset: np.ndarray
    lengths: np.ndarray
    block_table: Any = None
    k_scales: Any = None     # int8 caches: (batch, kv_heads, width) scale of each stored key row; else None
    v_scales: Any = None
    segments: Any = None     # ragged batches only (see above); every other cache leaves it None


def dequantize_view(view: KVView, dtype) -> KVView:
    """An int8 view read as floats: K = q_k * scale_k, V = q_v * scale_v, one scale per row (the
    reference reading; the numba decode step multiplies inside its dot products instead).

    Paged: only the blocks the block table names are dequantized, not the whole pool: they become a
    small pool of their own, (blocks named, kv_heads, block_size, head_dim), and the table is renumbered
    into it. Everything else of the view (offsets, lengths, which rows go together) stays as it was."""
    k, v, k_scales, v_scales, table = view.k, view.v, view.k_scales, view.v_scales, view.block_table
    if table is not None:
        # blocks[i] is the i-th distinct block named; renumbered[r, c] the index of table[r, c] in blocks
        blocks, renumbered = np.unique(table.clip(min=0), return_inverse=True)
        table = np.where(table >= 0, renumbered.reshape(table.shape), -1).astype(table.dtype)
        k, v, k_scales, v_scales = k[blocks], v[blocks], k_scales[blocks], v_scales[blocks]
    return replace(view, k=dequantize_rows(k, k_scales, dtype), v=dequantize_rows(v, v_scales, dtype),
                   block_table=table, k_scales=None, v_scales=None)


def check_cache_dtype(dtype, backend: Backend, name: str = "cache dtype") -> np.dtype:
    """The storage dtype of K/V, checked once for every cache and the serving engine's store: one of
    CACHE_DTYPES, and int8 only on the CPU backends (its quantize-on-write and reads run in NumPy)."""
    try:
        checked = np.dtype(dtype)
    except TypeError:
        raise ConfigError(f"{name}={dtype!r} is not a dtype; choose {', '.join(CACHE_DTYPES[:-1])} or "
                          f"{CACHE_DTYPES[-1]}") from None
    if checked.name not in CACHE_DTYPES:
        raise ConfigError(f"{name}={checked.name!r} must be {', '.join(CACHE_DTYPES[:-1])} or {CACHE_DTYPES[-1]}")
    if checked.name == "int8" and backend.xp is not np:
        raise ConfigError(f"{name}='int8' runs on the CPU backends only, not on {backend.name!r}")
    return checked


class KVCache:
    """The interface; subclasses decide where K and V live (see the module docstring for the protocol)."""

    kind = "base"

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, batch_size: int, max_seq_len: int,
                 dtype="float32", backend: Optional[Backend] = None):
        for name, value in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim),
                            ("batch_size", batch_size), ("max_seq_len", max_seq_len)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= validate.MAX_SIZE:
                raise ConfigError(f"{self.kind} cache: {name}={value!r} must be a positive integer "
                                  f"<= {validate.MAX_SIZE} (2**31 - 1)")
        self.n_layers, self.n_kv_heads, self.head_dim = int(n_layers), int(n_kv_heads), int(head_dim)
        self.batch_size, self.max_seq_len = int(batch_size), int(max_seq_len)
        self.backend = get_backend(backend)
        self.dtype = check_cache_dtype(dtype, self.backend)
        # int8: K and V rows quantized on write, one float32 scale per (sequence, head, position).
        self.quantized = self.dtype.name == "int8"
        self.xp = self.backend.xp
        # Positions held per sequence, on the host: every kernel reads it, Python indexes with it.
        self.lengths = np.zeros(self.batch_size, dtype=np.int64)
        # n_new of the forward in flight (between reserve and advance/rollback), else None.
        self._n_new: Optional[np.ndarray] = None

    # ---- facts ----
    @property
    def geometry(self) -> tuple[int, int, int]:
        return (self.n_layers, self.n_kv_heads, self.head_dim)

    @property
    def capacity(self) -> int:
        """Positions one sequence can hold."""
        return self.max_seq_len

    @property
    def positions_held(self) -> int:
        """Slots per sequence that hold memory now (the ``positions`` of the nbytes formula)."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """2 * layers * batch * positions_held * kv_heads * head_dim * itemsize (int8: + a float32 scale per row)."""
        return self.batch_size * self.positions_held * self.bytes_per_position()

    def bytes_per_position(self) -> int:
        row = self.head_dim * self.dtype.itemsize + (4 if self.quantized else 0)
        return 2 * self.n_layers * self.n_kv_heads * row

    def _check_allocation(self, positions: int, extra_bytes: int = 0) -> None:
        """Refuse, before allocating, K/V for ``positions`` slots (all sequences together) that this
        machine cannot hold: max_seq_len=10**12 is a ConfigError, not a MemoryError."""
        validate.allocation(positions * self.bytes_per_position() + extra_bytes,
                            f"a {self.kind} cache of {positions:,} positions ({self.batch_size} sequences, "
                            f"max_seq_len={self.max_seq_len:,})",
                            "pass a smaller max_seq_len (generate sizes its cache to prompt + max_new_tokens)")

    def _encoded(self, k_new, v_new):
        """What the arrays store of this step's K/V: (k, v, k_scale, v_scale). Float caches: the rows
        themselves and no scales; int8: q int8 (b, kv, seq, hd) and one float32 scale (b, kv, seq) per row."""
        if not self.quantized:
            return k_new, v_new, None, None
        (k, k_scale), (v, v_scale) = quantize_rows(k_new), quantize_rows(v_new)
        return k, v, k_scale, v_scale

    def check_compatible(self, config, batch_size: int) -> None:
        """Refuse a cache built for another model or batch, naming what differs. Changes nothing."""
        want = (config.n_layers, config.n_kv_heads, config.head_dim)
        if self.geometry != want:
            raise CacheMismatchError(
                f"{self.kind} cache was built for (layers, kv_heads, head_dim)={self.geometry} but the model has "
                f"{want}; create it with model.new_cache(...)"
            )
        if self.batch_size != batch_size:
            raise CacheMismatchError(
                f"{self.kind} cache holds batch_size={self.batch_size} sequences but the input has {batch_size} rows; "
                f"pass batch_size={batch_size} to new_cache"
            )

    def check_room(self, n_new: np.ndarray) -> None:
        """Raise CacheOverflowError if some sequence cannot take n_new[b] more positions. Changes nothing."""
        ends = self.lengths + n_new
        worst = int(np.argmax(ends))
        if ends[worst] > self.capacity:
            raise CacheOverflowError(
                f"{self.kind} cache holds {self.capacity} positions; writing {int(n_new[worst])} more at position "
                f"{int(self.lengths[worst])} (sequence {worst}) would exceed it (pass max_seq_len>={int(ends[worst])})"
            )

    # ---- the protocol the model drives: reserve, update per layer, advance (or rollback) ----
    def reserve(self, n_new: np.ndarray) -> None:
        """Claim room for n_new[b] more positions of every sequence b, before any layer writes.

        n_new: (batch,) int64, checked by the caller. Raises CacheOverflowError and changes nothing
        when the room is not there."""
        self.check_room(n_new)
        self._n_new = n_new

    def update(self, layer: int, k_new, v_new) -> KVView:
        """Write this step's k_new, v_new (batch, kv_heads, seq, head_dim) at each sequence's length
        (the first n_new[b] columns of row b are real) and return every K/V the queries may see."""
        raise NotImplementedError

    def advance(self, n_new: np.ndarray) -> None:
        """Commit the forward in flight: lengths += n_new."""
        self.lengths = self.lengths + n_new
        self._n_new = None

    def rollback(self) -> None:
        """Undo everything since ``reserve``: after a failed forward the cache is exactly as before it."""
        self._n_new = None

    def truncate(self, lengths) -> None:
        """Rewind: sequence b keeps its first lengths[b] positions (lengths[b] <= its length now).

        Equal to never having fed the dropped positions (tests/test_cache.py proves it per kind)."""
        lengths = self._check_truncate(lengths)
        self._truncate(lengths)
        self.lengths = lengths

    def _check_truncate(self, lengths) -> np.ndarray:
        values = np.asarray(lengths)
        if values.ndim == 0:
            values = np.broadcast_to(values, (self.batch_size,))
        if values.dtype.kind not in "iu" or values.shape != (self.batch_size,):
            raise InvalidInputError(f"truncate(lengths={lengths!r}): pass {self.batch_size} integer lengths, "
                                    "one per sequence")
        values = values.astype(np.int64)
        if (values < 0).any() or (values > self.lengths).any():
            raise InvalidInputError(f"truncate(lengths={values.tolist()}): each must lie in 0..its length now "
                                    f"{self.lengths.tolist()} (a cache cannot grow by truncating)")
        return values

    def _truncate(self, lengths: np.ndarray) -> None:
        """Per kind: release what the dropped positions held (static: nothing, slots are just ignored)."""

    def reset(self) -> None:
        """Forget every sequence; keep the memory for reuse."""
        self.lengths = np.zeros(self.batch_size, dtype=np.int64)
        self._n_new = None

    # ---- persistence (safetensors, never pickle) ----
    def _metadata(self) -> dict[str, str]:
        return {"kind": self.kind, "version": _FORMAT_VERSION, "n_layers": str(self.n_layers),
                "n_kv_heads": str(self.n_kv_heads), "head_dim": str(self.head_dim),
                "batch_size": str(self.batch_size), "max_seq_len": str(self.max_seq_len),
                "dtype": self.dtype.name, "extra": json.dumps(self._extra())}

    def _extra(self) -> dict:
        return {}

    def _tensors(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _restore(self, tensors: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def save(self, path) -> Path:
        """Write the cache (K, V, lengths, block table) to a safetensors file."""
        from safetensors.numpy import save_file

        path = validate.path_argument(path, "path")
        if path.is_dir() or not path.parent.is_dir():
            raise CheckpointError(f"cannot save the cache to {path}: " + (
                "it is a folder; pass a file path" if path.is_dir() else
                f"the folder {path.parent} does not exist; create it first"))
        tensors = {name: np.ascontiguousarray(self.backend.to_host(t)) for name, t in self._tensors().items()}
        tensors["lengths"] = self.lengths.copy()
        try:
            save_file(tensors, str(path), metadata=self._metadata())
        except Exception as exc:  # noqa: BLE001 (safetensors' SafetensorError wraps every I/O error)
            raise CheckpointError(f"cannot save the cache to {path}: {exc}") from None
        return path

    def __repr__(self) -> str:
        return (f"<{self.kind} KV cache: batch {self.batch_size}, lengths {self.lengths.tolist()}, capacity "
                f"{self.capacity}, {self.nbytes / 2**20:.2f} MiB {self.dtype.name}>")


class _PerLayerArrays(KVCache):
    """Caches that keep one K and one V array of shape (batch, kv_heads, slots, head_dim) per layer."""

    def _allocate(self, slots: int):
        self._check_allocation(self.batch_size * slots)
        shape = (self.batch_size, self.n_kv_heads, slots, self.head_dim)
        self.k = [self.xp.zeros(shape, dtype=self.dtype) for _ in range(self.n_layers)]
        self.v = [self.xp.zeros(shape, dtype=self.dtype) for _ in range(self.n_layers)]
        # int8: (batch, kv_heads, slots), the scale of each stored key / value row; float: None per layer
        self.k_scales = [self.xp.zeros(shape[:3], dtype=np.float32) if self.quantized else None
                         for _ in range(self.n_layers)]
        self.v_scales = [self.xp.zeros(shape[:3], dtype=np.float32) if self.quantized else None
                         for _ in range(self.n_layers)]

    def _arrays(self, layer: int) -> list:
        """The arrays one layer writes, in the order of ``_encoded``'s values: K, V (and int8: their scales)."""
        out = [self.k[layer], self.v[layer]]
        return out + [self.k_scales[layer], self.v_scales[layer]] if self.quantized else out

    def _tensors(self):
        out = {}
        for i in range(self.n_layers):
            out[f"k.{i}"], out[f"v.{i}"] = self.k[i], self.v[i]
            if self.quantized:
                out[f"k_scales.{i}"], out[f"v_scales.{i}"] = self.k_scales[i], self.v_scales[i]
        return out

    def _restore(self, tensors):
        self.k = [self.backend.to_device(tensors[f"k.{i}"]) for i in range(self.n_layers)]
        self.v = [self.backend.to_device(tensors[f"v.{i}"]) for i in range(self.n_layers)]
        if self.quantized:
            self.k_scales = [self.backend.to_device(tensors[f"k_scales.{i}"]) for i in range(self.n_layers)]
            self.v_scales = [self.backend.to_device(tensors[f"v_scales.{i}"]) for i in range(self.n_layers)]


class StaticCache(_PerLayerArrays):
    """Pre-allocated to max_seq_len; a step writes its new K/V in place at each sequence's position.

    Slots at or past a sequence's length are never read, so a failed forward (whose writes land
    only there) needs no undo, and truncating is just lowering the lengths."""

    kind = "static"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._allocate(self.max_seq_len)

    @property
    def positions_held(self) -> int:
        return self.max_seq_len

    def update(self, layer, k_new, v_new):
        q_offset, n_new = self.lengths, self._n_new
        lengths = q_offset + n_new
        width = int(lengths.max())
        if self.quantized:
            # int8: each new (token, head) row becomes q int8 (hd,) and one scale, written side by side
            for store, new in zip(self._arrays(layer), self._encoded(k_new, v_new)):
                self.backend.write_kv(store, new, q_offset, n_new)
            return KVView(self.k[layer][:, :, :width], self.v[layer][:, :, :width], q_offset, lengths,
                          k_scales=self.k_scales[layer][:, :, :width], v_scales=self.v_scales[layer][:, :, :width])
        # k[b, :, q_offset[b] : lengths[b]] = k_new[b, :, :n_new[b]]: llama2.c's one-line cache write
        self.backend.write_kv(self.k[layer], k_new, q_offset, n_new)
        self.backend.write_kv(self.v[layer], v_new, q_offset, n_new)
        # A view of the filled prefix, not a copy: (batch, kv_heads, width, head_dim)
        return KVView(self.k[layer][:, :, :width], self.v[layer][:, :, :width], q_offset, lengths)


class ConcatCache(_PerLayerArrays):
    """Grows by concatenation: each step allocates a new array one step longer and copies the old one.

    ``bytes_copied`` counts the bytes those copies moved (the O(t^2) cost this cache teaches)."""

    kind = "concat"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._allocate(0)
        self.bytes_copied = 0

    @property
    def positions_held(self) -> int:
        return int(self.k[0].shape[2])

    def reserve(self, n_new):
        super().reserve(n_new)
        # The arrays before this forward: a rollback puts them back (each update makes new ones).
        self._before = (list(self.k), list(self.v), list(self.k_scales), list(self.v_scales), self.bytes_copied)

    def update(self, layer, k_new, v_new):
        q_offset, n_new = self.lengths, self._n_new
        lengths = q_offset + n_new
        k, v, k_scale, v_scale = self._encoded(k_new, v_new)
        self.k[layer] = self._grown(self.k[layer], k, q_offset, n_new, lengths)
        self.v[layer] = self._grown(self.v[layer], v, q_offset, n_new, lengths)
        if self.quantized:
            # the scales (batch, kv_heads, width) grow with the arrays they belong to
            self.k_scales[layer] = self._grown(self.k_scales[layer], k_scale, q_offset, n_new, lengths)
            self.v_scales[layer] = self._grown(self.v_scales[layer], v_scale, q_offset, n_new, lengths)
        return KVView(self.k[layer], self.v[layer], q_offset, lengths, k_scales=self.k_scales[layer],
                      v_scales=self.v_scales[layer])

    def _grown(self, old, new, q_offset, n_new, lengths):
        """A new array: ``old`` (batch, kv_heads, width, ...) with ``new`` written at each sequence's length."""
        xp, width, seq = self.xp, old.shape[2], new.shape[2]
        self.bytes_copied += old.nbytes
        if np.all(q_offset == width) and np.all(n_new == seq):
            # Every sequence is as long as the array: the textbook k = concat([k, k_new]) on the seq axis.
            return xp.concatenate([old, new.astype(old.dtype)], axis=2)
        # A ragged batch: grow to the longest sequence with an empty block, then write each row.
        grow = max(int(lengths.max()) - width, 0)
        grown = xp.concatenate([old, xp.zeros(old.shape[:2] + (grow,) + old.shape[3:], dtype=old.dtype)], axis=2)
        self.backend.write_kv(grown, new, q_offset, n_new)
        return grown

    def rollback(self):
        if self._n_new is not None:
            self.k, self.v, self.k_scales, self.v_scales, self.bytes_copied = self._before
        super().rollback()

    def _truncate(self, lengths):
        # Keep only what the longest remaining sequence needs: (batch, kv, width, hd) -> (batch, kv, max(lengths), hd)
        width = int(lengths.max(initial=0))
        self.k = [k[:, :, :width] for k in self.k]
        self.v = [v[:, :, :width] for v in self.v]
        if self.quantized:
            self.k_scales = [s[:, :, :width] for s in self.k_scales]
            self.v_scales = [s[:, :, :width] for s in self.v_scales]

    def reset(self):
        super().reset()
        self._allocate(0)
        self.bytes_copied = 0


class PagedCache(KVCache):
    """A pool of ``num_blocks`` blocks of ``block_size`` positions, shared by the batch.

    ``block_table[b, i]`` is the pool block holding positions i*block_size .. (i+1)*block_size-1 of
    sequence b (-1: none yet). ``reserve`` takes the blocks a forward needs from the free list before
    any layer writes (a rollback gives them back); ``free(b)``, ``truncate`` and ``reset()`` return them."""

    kind = "paged"

    def __init__(self, *args, block_size: int = 16, num_blocks: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ConfigError(f"paged cache: block_size={block_size!r} must be a positive integer")
        self.block_size = int(block_size)
        self.blocks_per_seq = -(-self.max_seq_len // self.block_size)
        if num_blocks is not None and (isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer))
                                       or num_blocks < 1):
            raise ConfigError(f"paged cache: num_blocks={num_blocks!r} must be a positive integer")
        self.num_blocks = int(num_blocks) if num_blocks is not None else self.batch_size * self.blocks_per_seq
        # The pools, plus the block table and free list (int32 and a Python int per entry).
        self._check_allocation(self.num_blocks * self.block_size,
                               extra_bytes=4 * self.batch_size * self.blocks_per_seq + 8 * self.num_blocks)
        shape = (self.num_blocks, self.n_kv_heads, self.block_size, self.head_dim)
        self.k_pool = [self.xp.zeros(shape, dtype=self.dtype) for _ in range(self.n_layers)]
        self.v_pool = [self.xp.zeros(shape, dtype=self.dtype) for _ in range(self.n_layers)]
        # int8: (num_blocks, kv_heads, block_size) beside each pool, the scale of each stored row; float: None
        self.k_scales = [self.xp.zeros(shape[:3], dtype=np.float32) if self.quantized else None
                         for _ in range(self.n_layers)]
        self.v_scales = [self.xp.zeros(shape[:3], dtype=np.float32) if self.quantized else None
                         for _ in range(self.n_layers)]
        self.block_table = np.full((self.batch_size, self.blocks_per_seq), -1, dtype=np.int32)
        self.free_blocks = list(range(self.num_blocks))
        self._table_on_device = None
        self._claimed: list[tuple[int, int]] = []     # (sequence, table column) taken by the reserve in flight

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def positions_held(self) -> int:
        # Blocks in use, spread over the batch (so the nbytes formula counts exactly the blocks held).
        return self.blocks_in_use * self.block_size // self.batch_size

    @property
    def nbytes(self) -> int:
        return self.blocks_in_use * self.block_size * self.bytes_per_position()

    @property
    def reserved_nbytes(self) -> int:
        """The whole pool, in use or free."""
        return self.num_blocks * self.block_size * self.bytes_per_position()

    def _blocks_held(self) -> np.ndarray:
        return (self.block_table >= 0).sum(axis=1)

    def check_room(self, n_new):
        super().check_room(n_new)
        # Blocks each sequence still lacks: ceil(length / block_size) minus those it holds.
        needed = np.maximum(0, -(-(self.lengths + n_new) // self.block_size) - self._blocks_held())
        if needed.sum() > len(self.free_blocks):
            raise CacheOverflowError(
                f"paged cache pool has {self.num_blocks} blocks of {self.block_size} positions and {len(self.free_blocks)} "
                f"free; this step needs {int(needed.sum())} more (pass num_blocks>={self.blocks_in_use + int(needed.sum())}, "
                "or free finished sequences)"
            )

    def reserve(self, n_new):
        super().reserve(n_new)
        needed = np.maximum(0, -(-(self.lengths + n_new) // self.block_size) - self._blocks_held())
        held = self._blocks_held()
        self._claimed = []
        for b in np.nonzero(needed)[0].tolist():
            for column in range(int(held[b]), int(held[b] + needed[b])):
                self.block_table[b, column] = self.free_blocks.pop(0)
                self._claimed.append((b, column))
        if self._claimed:
            self._table_on_device = None

    def rollback(self):
        # Give back exactly the blocks this forward's reserve took, in their old order at the front.
        for b, column in reversed(self._claimed):
            self.free_blocks.insert(0, int(self.block_table[b, column]))
            self.block_table[b, column] = -1
        if self._claimed:
            self._table_on_device = None
        self._claimed = []
        super().rollback()

    def advance(self, n_new):
        self._claimed = []
        super().advance(n_new)

    def _table_device(self):
        if self._table_on_device is None:
            self._table_on_device = self.backend.to_device(self.block_table)
        return self._table_on_device

    def _write(self, pool, new, q_offset, n_new):
        for b in range(self.batch_size):
            positions = np.arange(int(q_offset[b]), int(q_offset[b] + n_new[b]))
            if positions.size == 0:
                continue
            blocks = self.block_table[b, positions // self.block_size]
            offsets = positions % self.block_size
            # pool[blocks[i], :, offsets[i]] = new[b, :, i]  for each new position i;  (kv, n, hd) -> (n, kv, hd)
            # (a scale pool the same with no hd: (kv, n) -> (n, kv))
            rows = new[b, :, :positions.size].swapaxes(0, 1)
            pool[self.backend.to_device(blocks), :, self.backend.to_device(offsets)] = rows

    def update(self, layer, k_new, v_new):
        q_offset, n_new = self.lengths, self._n_new
        k, v, k_scale, v_scale = self._encoded(k_new, v_new)
        self._write(self.k_pool[layer], k, q_offset, n_new)
        self._write(self.v_pool[layer], v, q_offset, n_new)
        if self.quantized:
            self._write(self.k_scales[layer], k_scale, q_offset, n_new)
            self._write(self.v_scales[layer], v_scale, q_offset, n_new)
        lengths = q_offset + n_new
        used = -(-int(lengths.max()) // self.block_size)      # table columns that hold positions
        return KVView(self.k_pool[layer], self.v_pool[layer], q_offset, lengths, self._table_device()[:, :used],
                      k_scales=self.k_scales[layer], v_scales=self.v_scales[layer])

    def _release(self, seq: int, keep_blocks: int) -> None:
        held = [int(x) for x in self.block_table[seq, keep_blocks:] if x >= 0]
        self.free_blocks.extend(held)
        self.block_table[seq, keep_blocks:] = -1
        self._table_on_device = None

    def _truncate(self, lengths):
        for b in range(self.batch_size):
            self._release(b, -(-int(lengths[b]) // self.block_size))

    def free(self, seq: int) -> None:
        """Return sequence ``seq``'s blocks to the pool; its length becomes 0."""
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or not 0 <= seq < self.batch_size:
            raise InvalidInputError(f"sequence {seq!r} is out of range for a batch of {self.batch_size}")
        self._release(int(seq), 0)
        self.lengths = self.lengths.copy()
        self.lengths[seq] = 0

    def reset(self):
        super().reset()
        self.block_table[:] = -1
        self.free_blocks = list(range(self.num_blocks))
        self._table_on_device = None
        self._claimed = []

    def _extra(self):
        return {"block_size": self.block_size, "num_blocks": self.num_blocks}

    def _tensors(self):
        out = {"block_table": self.block_table}
        for i in range(self.n_layers):
            out[f"k.{i}"], out[f"v.{i}"] = self.k_pool[i], self.v_pool[i]
            if self.quantized:
                out[f"k_scales.{i}"], out[f"v_scales.{i}"] = self.k_scales[i], self.v_scales[i]
        return out

    def _restore(self, tensors):
        self.k_pool = [self.backend.to_device(tensors[f"k.{i}"]) for i in range(self.n_layers)]
        self.v_pool = [self.backend.to_device(tensors[f"v.{i}"]) for i in range(self.n_layers)]
        if self.quantized:
            self.k_scales = [self.backend.to_device(tensors[f"k_scales.{i}"]) for i in range(self.n_layers)]
            self.v_scales = [self.backend.to_device(tensors[f"v_scales.{i}"]) for i in range(self.n_layers)]
        self.block_table = tensors["block_table"].astype(np.int32)
        used = set(int(x) for x in self.block_table.ravel() if x >= 0)
        self.free_blocks = [i for i in range(self.num_blocks) if i not in used]
        self._table_on_device = None


class SlidingCache(_PerLayerArrays):
    """A ring buffer of the last ``window`` positions: position p lives in slot p mod window.

    Attention then sees at most the last ``window`` positions (query included), exactly as
    Mistral's sliding-window attention, and memory stays window-sized however long the sequence.

    A write overwrites the slots of positions that are still visible, so ``update`` keeps what it
    overwrote (K, V and, int8, their scales) until ``advance``: ``rollback`` puts it back. For the
    same reason a ring can rewind only while the positions the next query needs are still in it
    (``CacheRewindError`` otherwise)."""

    kind = "sliding"

    def __init__(self, *args, window: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        window = self.max_seq_len if window is None else window
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
            raise ConfigError(f"sliding cache: window={window!r} must be a positive integer")
        self.window = int(min(window, self.max_seq_len))
        self._allocate(self.window)
        self._undo: list[tuple] = []

    @property
    def positions_held(self) -> int:
        return self.window

    def _ring_slots(self, q_offset, n_new):
        """Per sequence b: (positions written, their ring slots). Only the last `window` new positions
        survive a write; earlier ones would be overwritten at once."""
        out = []
        for b in range(self.batch_size):
            start, count = int(q_offset[b]), int(n_new[b])
            positions = np.arange(max(start, start + count - self.window), start + count)
            out.append((positions, positions % self.window))
        return out

    def _write_ring(self, stores, news, q_offset, n_new):
        """Write each news[i] (batch, kv_heads, seq, ...) into the ring stores[i] (K, V, int8: their scales)."""
        to_device = self.backend.to_device
        for b, (positions, slots) in enumerate(self._ring_slots(q_offset, n_new)):
            if positions.size == 0:
                continue
            slots_dev, new_dev = to_device(slots), to_device(positions - int(q_offset[b]))
            for store, new in zip(stores, news):
                # Keep the overwritten slots (b, :, slots) for a rollback, then write.
                self._undo.append((store, b, slots_dev, store[b][:, slots_dev]))
                store[b][:, slots_dev] = new[b][:, new_dev]

    def update(self, layer, k_new, v_new):
        W = self.window
        q_offset, n_new = self.lengths, self._n_new
        # K, V (int8: and their scales) with what this step writes into each (zip stops at the shorter)
        stores, news = self._arrays(layer), self._encoded(k_new, v_new)
        if k_new.shape[2] == 1:
            # Decode: write the new position into its slot, then hand over the ring as it lies. Every
            # filled slot is within the window, and attention does not care about the order of keys
            # (RoPE already put each key's position into it), so the keys are slots 0..filled-1 and
            # the query is the last of them.
            self._write_ring(stores, news, q_offset, n_new)
            filled = np.minimum(q_offset + n_new, W)
            return KVView(self.k[layer], self.v[layer], filled - n_new, filled, k_scales=self.k_scales[layer],
                          v_scales=self.v_scales[layer])
        # Prefill: lay out the last window-1 old positions in order, then the new ones, so the window
        # mask sees true relative positions; then keep the last W in the ring.
        n_old = np.minimum(q_offset, W - 1)
        width = int((n_old + n_new).max())
        in_order = [self._in_order(store, new, q_offset, n_old, n_new, width) for store, new in zip(stores, news)]
        self._write_ring(stores, news, q_offset, n_new)
        k_all, v_all, k_scales, v_scales = in_order + [None] * (4 - len(in_order))
        return KVView(k_all, v_all, n_old, n_old + n_new, k_scales=k_scales, v_scales=v_scales)

    def _in_order(self, store, new, q_offset, n_old, n_new, width):
        """(batch, kv_heads, width, ...): per sequence its last n_old[b] ring positions in position order,
        then its n_new[b] new ones (K or V with head_dim; int8 scales without)."""
        out = self.xp.zeros((self.batch_size, self.n_kv_heads, width) + store.shape[3:], dtype=new.dtype)
        for b in range(self.batch_size):
            old_positions = np.arange(int(q_offset[b] - n_old[b]), int(q_offset[b]))
            slots = self.backend.to_device(old_positions % self.window)
            out[b, :, :n_old[b]] = store[b][:, slots]
            out[b, :, n_old[b]:n_old[b] + n_new[b]] = new[b, :, :n_new[b]]
        return out

    def advance(self, n_new):
        self._undo = []
        super().advance(n_new)

    def rollback(self):
        for store, b, slots, old in reversed(self._undo):
            store[b][:, slots] = old
        self._undo = []
        super().rollback()

    def _truncate(self, lengths):
        # The next query at position L = lengths[b] needs keys max(0, L-W+1) .. L-1; the ring holds
        # positions max(0, length-W) .. length-1 (length = now). Rewinding is exact iff the first
        # needed one is still there: always before the ring wraps, by at most one position after.
        held_from = np.maximum(self.lengths - self.window, 0)
        needed_from = np.maximum(lengths - self.window + 1, 0)
        bad = np.nonzero(needed_from < held_from)[0]
        if bad.size:
            b = int(bad[0])
            raise CacheRewindError(
                f"sliding cache of window {self.window} holds positions {int(held_from[b])}..{int(self.lengths[b]) - 1} "
                f"of sequence {b}; rewinding to length {int(lengths[b])} needs position {int(needed_from[b])}, which "
                f"the ring has overwritten (it can rewind to length {int(held_from[b]) + self.window - 1} at the "
                f"shortest; use a static or paged cache to rewind further)")

    def reset(self):
        super().reset()
        self._undo = []

    def _extra(self):
        return {"window": self.window}


_KINDS = {"concat": ConcatCache, "static": StaticCache, "paged": PagedCache, "sliding": SlidingCache}
# The keyword options each kind takes (also what a saved cache's "extra" metadata holds).
CACHE_OPTIONS = {"none": (), "concat": (), "static": (), "paged": ("block_size", "num_blocks"), "sliding": ("window",)}


def make_cache(kind: str, *, n_layers: int, n_kv_heads: int, head_dim: int, batch_size: int, max_seq_len: int,
               dtype="float32", backend=None, **options) -> Optional[KVCache]:
    """Build a cache of ``kind`` ("none" returns None: recompute everything)."""
    if not isinstance(kind, str) or kind not in CACHE_OPTIONS:
        raise ConfigError(f"cache kind {kind!r} is unknown; choose one of {CACHE_KINDS}")
    # Each option belongs to one kind: name it instead of failing with a TypeError in a constructor.
    for option in options:
        if option not in CACHE_OPTIONS[kind]:
            owners = [k for k, names in CACHE_OPTIONS.items() if option in names]
            where = f"cache={owners[0]!r}" if owners else "no cache kind (options are block_size, num_blocks, window)"
            raise ConfigError(f"{option}={options[option]!r} applies to {where}, not cache={kind!r}")
    if kind == "none":
        return None
    return _KINDS[kind](n_layers, n_kv_heads, head_dim, batch_size, max_seq_len, dtype=dtype, backend=backend,
                        **options)


def load_cache(path, backend=None) -> KVCache:
    """Read a cache written by ``KVCache.save``; continue generating from it with identical results.

    A cache file is checked as a whole before anything is allocated or used (check at the door): the
    metadata, every tensor's name, shape and dtype, lengths within what the arrays hold, and for paged
    caches a block table whose entries lie in the pool, fill each sequence's columns without holes,
    cover its length and never share a block. A file that fails any of it is a CheckpointError: a bad
    block table must never reach a kernel, which would read outside the pool."""
    from safetensors import SafetensorError, safe_open

    path = validate.regular_file(validate.path_argument(path, "path"), "cache file", CheckpointError)
    try:
        with safe_open(str(path), framework="np") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, TypeError, ValueError, AttributeError) as exc:
        # TypeError/AttributeError: a dtype NumPy has no name for (bfloat16, float8)
        raise CheckpointError(f"{path} is not a readable minikv cache file: {exc}") from None
    if meta.get("kind") not in _KINDS or meta.get("version") != _FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a minikv cache file of format version {_FORMAT_VERSION} "
                              f"(metadata kind={meta.get('kind')!r}, version={meta.get('version')!r})")
    kind, sizes, options = _checked_metadata(path, meta)
    _check_cache_tensors(path, kind, sizes, options, meta["dtype"], tensors)
    try:
        cache = make_cache(kind, **sizes, dtype=meta["dtype"], backend=backend, **options)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    cache._restore(tensors)
    cache.lengths = tensors["lengths"].astype(np.int64)
    return cache


def _checked_metadata(path, meta: dict) -> tuple[str, dict, dict]:
    """(kind, the five sizes, the kind's options) from a cache file's metadata, each a checked int."""
    def size(name: str, text) -> int:
        value = text
        if isinstance(text, str) and text.isdigit() and len(text) <= 12:
            value = int(text)
        if not validate.is_integer(value) or not 1 <= value <= validate.MAX_SIZE:
            raise CheckpointError(f"{path}: cache metadata {name}={text!r} must be an integer 1..{validate.MAX_SIZE}")
        return int(value)

    kind = meta["kind"]
    sizes = {name: size(name, meta.get(name)) for name in ("n_layers", "n_kv_heads", "head_dim", "batch_size",
                                                           "max_seq_len")}
    if meta.get("dtype") not in CACHE_DTYPES:
        raise CheckpointError(f"{path}: cache metadata dtype={meta.get('dtype')!r} must be "
                              f"{', '.join(CACHE_DTYPES[:-1])} or {CACHE_DTYPES[-1]}")
    try:
        extra = json.loads(meta.get("extra", "{}"))
    except (ValueError, RecursionError):
        extra = None
    if not isinstance(extra, dict) or set(extra) != set(CACHE_OPTIONS[kind]):
        raise CheckpointError(f"{path}: cache metadata extra={meta.get('extra')!r:.200} must be a JSON object with "
                              f"exactly {list(CACHE_OPTIONS[kind])} for a {kind} cache")
    options = {name: size(name, value) for name, value in extra.items()}
    if kind == "sliding" and options["window"] > sizes["max_seq_len"]:
        raise CheckpointError(f"{path}: sliding window={options['window']} is larger than max_seq_len="
                              f"{sizes['max_seq_len']} (a saved ring is never wider than the cache)")
    return kind, sizes, options


def _check_cache_tensors(path, kind: str, sizes: dict, options: dict, dtype: str, tensors: dict) -> None:
    """Every tensor a cache of this kind needs, with the shape and dtype the metadata implies; lengths
    and (paged) the block table consistent with them. Raises CheckpointError naming what disagrees."""
    layers, kv, hd, batch, max_seq_len = (sizes[n] for n in ("n_layers", "n_kv_heads", "head_dim", "batch_size",
                                                             "max_seq_len"))
    kv_names = [f"{x}.{i}" for i in range(layers) for x in "kv"]
    # int8: a float32 scale per stored row beside each K and V tensor
    scale_names = [f"{x}_scales.{i}" for i in range(layers) for x in "kv"] if dtype == "int8" else []
    expected = set(kv_names) | set(scale_names) | {"lengths"} | ({"block_table"} if kind == "paged" else set())
    if scale_names and not set(scale_names) <= set(tensors):
        raise CheckpointError(f"{path}: cache metadata dtype='int8' needs a scale tensor beside every K and V "
                              f"tensor (k_scales.0, v_scales.0, ...); the file has {sorted(tensors)[:6]}...")
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors))[:4], sorted(set(tensors) - expected)[:4]
        raise CheckpointError(f"{path}: a {kind} cache of {layers} layers holds tensors {sorted(expected)[:6]}...; "
                              f"missing {missing}, unexpected {unexpected}")

    def need(name: str, shape: tuple, dtype_kind: Optional[str] = None, dtype_name: Optional[str] = None):
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{path}: cache tensor {name!r} has shape {tuple(tensor.shape)}; the metadata "
                                  f"implies {shape}")
        if (dtype_name and tensor.dtype.name != dtype_name) or (dtype_kind and tensor.dtype.kind not in dtype_kind):
            raise CheckpointError(f"{path}: cache tensor {name!r} has dtype {tensor.dtype}; expected "
                                  f"{dtype_name or 'integers'}")

    if kind == "static":
        slots = max_seq_len
    elif kind == "sliding":
        slots = options["window"]
    elif kind == "concat":
        slots = tensors["k.0"].shape[2] if tensors["k.0"].ndim == 4 else -1
        if not 0 <= slots <= max_seq_len:
            raise CheckpointError(f"{path}: concat cache tensor 'k.0' has shape {tuple(tensors['k.0'].shape)}; "
                                  f"expected (batch, kv_heads, 0..max_seq_len={max_seq_len}, head_dim)")
    if kind == "paged":
        block_size, num_blocks = options["block_size"], options["num_blocks"]
        kv_shape = (num_blocks, kv, block_size, hd)
    else:
        kv_shape = (batch, kv, slots, hd)
    for name in kv_names:
        need(name, kv_shape, dtype_name=dtype)
        if not np.isfinite(tensors[name]).all():
            raise CheckpointError(f"{path}: cache tensor {name!r} holds NaN or infinite values; the file is corrupt")
    for name in scale_names:
        need(name, kv_shape[:3], dtype_name="float32")
        if not (np.isfinite(tensors[name]).all() and (tensors[name] >= 0).all()):
            raise CheckpointError(f"{path}: cache tensor {name!r} holds negative, NaN or infinite scales; the file "
                                  "is corrupt")
    need("lengths", (batch,), dtype_kind="iu")
    lengths = tensors["lengths"].astype(np.int64)
    # A sequence may not claim more positions than were written: concat holds `slots` of them, the
    # others max_seq_len (sliding: its ring keeps the last `window` of up to max_seq_len positions).
    limit = slots if kind == "concat" else max_seq_len
    bad = np.nonzero((lengths < 0) | (lengths > limit))[0]
    if bad.size:
        b = int(bad[0])
        raise CheckpointError(f"{path}: sequence {b} has length {int(lengths[b])}; a {kind} cache of these arrays "
                              f"holds 0..{limit} positions")
    if kind == "paged":
        _check_block_table(path, tensors["block_table"], lengths, batch, max_seq_len, block_size, num_blocks)


def _check_block_table(path, table, lengths: np.ndarray, batch: int, max_seq_len: int, block_size: int,
                       num_blocks: int) -> None:
    """A paged cache's table: (batch, ceil(max_seq_len / block_size)) integers; row b holds its blocks
    in its first columns then -1 (no holes), at least ceil(lengths[b] / block_size) of them, each a
    block of the pool (0..num_blocks-1), and no block twice (in one row or across rows)."""
    columns = -(-max_seq_len // block_size)
    if tuple(table.shape) != (batch, columns) or table.dtype.kind not in "iu":
        raise CheckpointError(f"{path}: block_table has shape {tuple(table.shape)} and dtype {table.dtype}; "
                              f"expected integers of shape (batch={batch}, ceil(max_seq_len / block_size)={columns})")
    table = table.astype(np.int64)
    if ((table < -1) | (table >= num_blocks)).any():
        value = int(table[(table < -1) | (table >= num_blocks)][0])
        raise CheckpointError(f"{path}: block_table holds block {value}, outside the pool of {num_blocks} blocks "
                              "(entries are 0..num_blocks-1, or -1 for none)")
    held = table >= 0
    count = held.sum(axis=1)
    # Row b holds blocks exactly in columns 0..count[b]-1: a prefix, no -1 before a real block.
    prefix = np.arange(columns)[None, :] < count[:, None]
    if (held != prefix).any():
        b = int(np.nonzero((held != prefix).any(axis=1))[0][0])
        raise CheckpointError(f"{path}: block_table row {b} {table[b].tolist()[:16]} has a hole (-1 before a block); "
                              "a sequence's blocks fill its first columns")
    needed = -(-lengths // block_size)
    short = np.nonzero(count < needed)[0]
    if short.size:
        b = int(short[0])
        raise CheckpointError(f"{path}: sequence {b} has length {int(lengths[b])} ({int(needed[b])} blocks of "
                              f"{block_size}) but its block_table row holds {int(count[b])} blocks")
    used = table[held]
    if np.unique(used).size != used.size:
        values, counts = np.unique(used, return_counts=True)
        raise CheckpointError(f"{path}: block_table gives block {int(values[counts > 1][0])} to two places; each pool "
                              "block belongs to one sequence position range")
