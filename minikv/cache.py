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

Every cache knows its per-sequence ``lengths``, its ``capacity``, ``nbytes``, ``reset()``, and
``save(path)`` / ``load_cache(path)`` (safetensors). Writing past capacity raises
``CacheOverflowError`` *before* anything is written, so a failed call loses no state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from .backend import Backend, gather_pages, get_backend
from .errors import CacheMismatchError, CacheOverflowError, ConfigError, InvalidInputError

CACHE_KINDS = ("none", "concat", "static", "paged", "sliding")
_FORMAT_VERSION = "1"


class KVCache:
    """The interface; subclasses decide where K and V live.

    The model calls, for one forward of ``n_new[b]`` new tokens per sequence::

        cache.check_capacity(n_new)                   # may raise; nothing written yet
        for layer ...: out = cache.attend(layer, q, k_new, v_new, n_new, window=..., algorithm=...)
        cache.advance(n_new)                          # lengths += n_new
    """

    kind = "base"

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, batch_size: int, max_seq_len: int,
                 dtype="float32", backend: Optional[Backend] = None):
        for name, value in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim),
                            ("batch_size", batch_size), ("max_seq_len", max_seq_len)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{self.kind} cache: {name}={value!r} must be a positive integer")
        self.n_layers, self.n_kv_heads, self.head_dim = int(n_layers), int(n_kv_heads), int(head_dim)
        self.batch_size, self.max_seq_len = int(batch_size), int(max_seq_len)
        self.dtype = np.dtype(dtype)
        if self.dtype.name not in ("float16", "float32", "float64"):
            raise ConfigError(f"cache dtype={self.dtype.name!r} must be float16, float32 or float64")
        self.backend = get_backend(backend)
        self.xp = self.backend.xp
        # Positions held per sequence, on the host: every kernel reads it, Python indexes with it.
        self.lengths = np.zeros(self.batch_size, dtype=np.int64)

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
        """2 * layers * batch * positions_held * kv_heads * head_dim * itemsize."""
        return (2 * self.n_layers * self.batch_size * self.positions_held * self.n_kv_heads
                * self.head_dim * self.dtype.itemsize)

    def bytes_per_position(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.dtype.itemsize

    def check_compatible(self, config, batch_size: int) -> None:
        """Refuse a cache built for another model or batch, naming what differs."""
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

    # ---- the protocol the model drives ----
    def check_capacity(self, n_new: np.ndarray) -> None:
        ends = self.lengths + n_new
        worst = int(np.argmax(ends))
        if ends[worst] > self.capacity:
            raise CacheOverflowError(
                f"{self.kind} cache holds {self.capacity} positions; writing {int(n_new[worst])} more at position "
                f"{int(self.lengths[worst])} (sequence {worst}) would exceed it (pass max_seq_len>={int(ends[worst])})"
            )

    def attend(self, layer: int, q, k_new, v_new, n_new: np.ndarray, *, window=None, algorithm=None):
        raise NotImplementedError

    def advance(self, n_new: np.ndarray) -> None:
        self.lengths = self.lengths + np.asarray(n_new, dtype=np.int64)

    def reset(self) -> None:
        """Forget every sequence; keep the memory for reuse."""
        self.lengths = np.zeros(self.batch_size, dtype=np.int64)

    # ---- shared attention step over a contiguous (batch, kv_heads, width, head_dim) view ----
    def _attend_contiguous(self, q, k_all, v_all, starts, ends, window, algorithm):
        if q.shape[2] == 1:
            # Decode: one query per sequence sits at position ends-1 and sees keys 0..ends-1.
            out, _ = self.backend.decode_attention(q, k_all, v_all, ends, window=window)
        else:
            out, _ = self.backend.attention(q, k_all, v_all, causal=True, q_offset=starts, lengths=ends,
                                            window=window, algorithm=algorithm)
        return out

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

        path = Path(path)
        tensors = {name: np.ascontiguousarray(self.backend.to_host(t)) for name, t in self._tensors().items()}
        tensors["lengths"] = self.lengths.copy()
        save_file(tensors, str(path), metadata=self._metadata())
        return path

    def __repr__(self) -> str:
        return (f"<{self.kind} KV cache: batch {self.batch_size}, lengths {self.lengths.tolist()}, capacity "
                f"{self.capacity}, {self.nbytes / 2**20:.2f} MiB {self.dtype.name}>")


class _PerLayerArrays(KVCache):
    """Caches that keep one K and one V array of shape (batch, kv_heads, slots, head_dim) per layer."""

    def _allocate(self, slots: int):
        shape = (self.batch_size, self.n_kv_heads, slots, self.head_dim)
        self.k = [self.xp.zeros(shape, dtype=self.dtype) for _ in range(self.n_layers)]
        self.v = [self.xp.zeros(shape, dtype=self.dtype) for _ in range(self.n_layers)]

    def _tensors(self):
        out = {}
        for i in range(self.n_layers):
            out[f"k.{i}"], out[f"v.{i}"] = self.k[i], self.v[i]
        return out

    def _restore(self, tensors):
        self.k = [self.backend.to_device(tensors[f"k.{i}"]) for i in range(self.n_layers)]
        self.v = [self.backend.to_device(tensors[f"v.{i}"]) for i in range(self.n_layers)]


class StaticCache(_PerLayerArrays):
    """Pre-allocated to max_seq_len; a step writes its new K/V in place at each sequence's position."""

    kind = "static"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._allocate(self.max_seq_len)

    @property
    def positions_held(self) -> int:
        return self.max_seq_len

    def attend(self, layer, q, k_new, v_new, n_new, *, window=None, algorithm=None):
        starts, ends = self.lengths, self.lengths + n_new
        self.backend.write_kv(self.k[layer], k_new, starts, n_new)
        self.backend.write_kv(self.v[layer], v_new, starts, n_new)
        width = int(ends.max())
        # A view of the filled prefix, not a copy.
        return self._attend_contiguous(q, self.k[layer][:, :, :width], self.v[layer][:, :, :width],
                                       starts, ends, window, algorithm)


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

    def attend(self, layer, q, k_new, v_new, n_new, *, window=None, algorithm=None):
        xp = self.xp
        starts, ends = self.lengths, self.lengths + n_new
        width, steps = self.k[layer].shape[2], k_new.shape[2]
        self.bytes_copied += 2 * self.k[layer].nbytes
        if np.all(starts == width) and np.all(n_new == steps):
            # Every sequence is as long as the array: the textbook k = concat([k, k_new]).
            self.k[layer] = xp.concatenate([self.k[layer], k_new.astype(self.dtype)], axis=2)
            self.v[layer] = xp.concatenate([self.v[layer], v_new.astype(self.dtype)], axis=2)
        else:
            # A ragged batch: grow to the longest sequence with an empty block, then write each row.
            grow = max(int(ends.max()) - width, 0)
            pad = xp.zeros(self.k[layer].shape[:2] + (grow, self.head_dim), dtype=self.dtype)
            self.k[layer] = xp.concatenate([self.k[layer], pad], axis=2)
            self.v[layer] = xp.concatenate([self.v[layer], pad], axis=2)
            self.backend.write_kv(self.k[layer], k_new, starts, n_new)
            self.backend.write_kv(self.v[layer], v_new, starts, n_new)
        return self._attend_contiguous(q, self.k[layer], self.v[layer], starts, ends, window, algorithm)

    def reset(self):
        super().reset()
        self._allocate(0)
        self.bytes_copied = 0


class PagedCache(KVCache):
    """A pool of ``num_blocks`` blocks of ``block_size`` positions, shared by the batch.

    ``block_table[b, i]`` is the pool block holding positions i*block_size .. (i+1)*block_size-1 of
    sequence b (-1: none yet). Blocks are taken from the free list as sequences grow and returned
    by ``free(b)`` and ``reset()``."""

    kind = "paged"

    def __init__(self, *args, block_size: int = 16, num_blocks: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ConfigError(f"paged cache: block_size={block_size!r} must be a positive integer")
        self.block_size = int(block_size)
        self.blocks_per_seq = -(-self.max_seq_len // self.block_size)
        self.num_blocks = int(num_blocks) if num_blocks is not None else self.batch_size * self.blocks_per_seq
        if self.num_blocks < 1:
            raise ConfigError(f"paged cache: num_blocks={num_blocks!r} must be >= 1")
        shape = (self.num_blocks, self.n_kv_heads, self.block_size, self.head_dim)
        self.k_pool = [self.xp.zeros(shape, dtype=self.dtype) for _ in range(self.n_layers)]
        self.v_pool = [self.xp.zeros(shape, dtype=self.dtype) for _ in range(self.n_layers)]
        self.block_table = np.full((self.batch_size, self.blocks_per_seq), -1, dtype=np.int32)
        self.free_blocks = list(range(self.num_blocks))
        self._table_on_device = None

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

    def check_capacity(self, n_new):
        super().check_capacity(n_new)
        ends = self.lengths + n_new
        # Blocks each sequence still lacks: ceil(end / block_size) minus those it holds. Clamped at 0: a
        # sequence may hold more than its length needs (blocks reserved by a call that then failed), and
        # its surplus must not be counted as free room for the others.
        needed = [max(0, int(-(-e // self.block_size)) - int((self.block_table[b] >= 0).sum()))
                  for b, e in enumerate(ends)]
        if sum(needed) > len(self.free_blocks):
            raise CacheOverflowError(
                f"paged cache pool has {self.num_blocks} blocks of {self.block_size} positions and {len(self.free_blocks)} "
                f"free; this step needs {sum(needed)} more (pass num_blocks>={self.blocks_in_use + sum(needed)}, "
                "or free finished sequences)"
            )
        # Reserve now, before any layer writes, so a failure above leaves the cache untouched.
        for b, count in enumerate(needed):
            have = int((self.block_table[b] >= 0).sum())
            for i in range(have, have + count):
                self.block_table[b, i] = self.free_blocks.pop(0)
                self._table_on_device = None

    def _table_device(self):
        if self._table_on_device is None:
            self._table_on_device = self.backend.to_device(self.block_table)
        return self._table_on_device

    def _write(self, pool, new, starts, n_new):
        for b in range(self.batch_size):
            positions = np.arange(int(starts[b]), int(starts[b] + n_new[b]))
            if positions.size == 0:
                continue
            blocks = self.block_table[b, positions // self.block_size]
            offsets = positions % self.block_size
            # pool[blocks[i], :, offsets[i]] = new[b, :, i]  for each new position i
            pool[self.backend.to_device(blocks), :, self.backend.to_device(offsets)] = new[b, :, :positions.size].transpose(1, 0, 2)

    def attend(self, layer, q, k_new, v_new, n_new, *, window=None, algorithm=None):
        starts, ends = self.lengths, self.lengths + n_new
        self._write(self.k_pool[layer], k_new, starts, n_new)
        self._write(self.v_pool[layer], v_new, starts, n_new)
        table = self._table_device()
        if q.shape[2] == 1:
            out, _ = self.backend.paged_decode_attention(q, self.k_pool[layer], self.v_pool[layer], table, ends,
                                                         window=window)
            return out
        # Prefill: read the blocks into a contiguous view, then ordinary attention.
        used = -(-int(ends.max()) // self.block_size)
        k_all = gather_pages(self.k_pool[layer], table[:, :used])
        v_all = gather_pages(self.v_pool[layer], table[:, :used])
        return self._attend_contiguous(q, k_all, v_all, starts, ends, window, algorithm)

    def free(self, seq: int) -> None:
        """Return sequence ``seq``'s blocks to the pool; its length becomes 0."""
        if not 0 <= seq < self.batch_size:
            raise InvalidInputError(f"sequence {seq} is out of range for a batch of {self.batch_size}")
        held = [int(x) for x in self.block_table[seq] if x >= 0]
        self.free_blocks.extend(held)
        self.block_table[seq] = -1
        self.lengths = self.lengths.copy()
        self.lengths[seq] = 0
        self._table_on_device = None

    def reset(self):
        super().reset()
        self.block_table[:] = -1
        self.free_blocks = list(range(self.num_blocks))
        self._table_on_device = None

    def _extra(self):
        return {"block_size": self.block_size, "num_blocks": self.num_blocks}

    def _tensors(self):
        out = {"block_table": self.block_table}
        for i in range(self.n_layers):
            out[f"k.{i}"], out[f"v.{i}"] = self.k_pool[i], self.v_pool[i]
        return out

    def _restore(self, tensors):
        self.k_pool = [self.backend.to_device(tensors[f"k.{i}"]) for i in range(self.n_layers)]
        self.v_pool = [self.backend.to_device(tensors[f"v.{i}"]) for i in range(self.n_layers)]
        self.block_table = tensors["block_table"].astype(np.int32)
        used = set(int(x) for x in self.block_table.ravel() if x >= 0)
        self.free_blocks = [i for i in range(self.num_blocks) if i not in used]
        self._table_on_device = None


class SlidingCache(_PerLayerArrays):
    """A ring buffer of the last ``window`` positions: position p lives in slot p mod window.

    Attention then sees at most the last ``window`` positions (query included), exactly as
    Mistral's sliding-window attention, and memory stays window-sized however long the sequence."""

    kind = "sliding"

    def __init__(self, *args, window: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        window = self.max_seq_len if window is None else window
        if not isinstance(window, (int, np.integer)) or window < 1:
            raise ConfigError(f"sliding cache: window={window!r} must be a positive integer")
        self.window = int(min(window, self.max_seq_len))
        self._allocate(self.window)

    @property
    def positions_held(self) -> int:
        return self.window

    def _write_ring(self, ring, new, starts, n_new):
        for b in range(self.batch_size):
            start, count = int(starts[b]), int(n_new[b])
            # Only the last `window` new positions survive; earlier ones would be overwritten at once.
            first = max(start, start + count - self.window)
            positions = np.arange(first, start + count)
            if positions.size:
                slots = self.backend.to_device(positions % self.window)
                ring[b][:, slots] = new[b][:, self.backend.to_device(positions - start)]

    def attend(self, layer, q, k_new, v_new, n_new, *, window=None, algorithm=None):
        xp, W = self.xp, self.window
        window = W if window is None else min(window, W)
        starts = self.lengths
        steps = q.shape[2]
        if steps == 1 and window == W:
            # Decode: write the new position into its slot, then attend to the ring as it lies. Every
            # filled slot is within the window, and attention is order-free, so no mask is needed
            # beyond the number of filled slots.
            self._write_ring(self.k[layer], k_new, starts, n_new)
            self._write_ring(self.v[layer], v_new, starts, n_new)
            filled = np.minimum(starts + n_new, W)
            out, _ = self.backend.decode_attention(q, self.k[layer], self.v[layer], filled)
            return out
        # Prefill (or a window narrower than the ring): lay out the last window-1 old positions in
        # order, append the new ones, and attend with the window mask; then keep the last W in the ring.
        n_old = np.minimum(starts, W - 1)
        width = int((n_old + n_new).max())
        k_all = xp.zeros((self.batch_size, self.n_kv_heads, width, self.head_dim), dtype=q.dtype)
        v_all = xp.zeros_like(k_all)
        for b in range(self.batch_size):
            old_positions = np.arange(int(starts[b] - n_old[b]), int(starts[b]))
            slots = self.backend.to_device(old_positions % W)
            k_all[b, :, :n_old[b]] = self.k[layer][b][:, slots]
            v_all[b, :, :n_old[b]] = self.v[layer][b][:, slots]
            k_all[b, :, n_old[b]:n_old[b] + n_new[b]] = k_new[b, :, :n_new[b]]
            v_all[b, :, n_old[b]:n_old[b] + n_new[b]] = v_new[b, :, :n_new[b]]
        self._write_ring(self.k[layer], k_new, starts, n_new)
        self._write_ring(self.v[layer], v_new, starts, n_new)
        return self._attend_contiguous(q, k_all, v_all, n_old, n_old + n_new, window, algorithm)

    def _extra(self):
        return {"window": self.window}


_KINDS = {"concat": ConcatCache, "static": StaticCache, "paged": PagedCache, "sliding": SlidingCache}


def make_cache(kind: str, *, n_layers: int, n_kv_heads: int, head_dim: int, batch_size: int, max_seq_len: int,
               dtype="float32", backend=None, **options) -> Optional[KVCache]:
    """Build a cache of ``kind`` ("none" returns None: recompute everything)."""
    if kind == "none":
        return None
    if kind not in _KINDS:
        raise ConfigError(f"cache kind {kind!r} is unknown; choose one of {CACHE_KINDS}")
    return _KINDS[kind](n_layers, n_kv_heads, head_dim, batch_size, max_seq_len, dtype=dtype, backend=backend,
                        **options)


def load_cache(path, backend=None) -> KVCache:
    """Read a cache written by ``KVCache.save``; continue generating from it with identical results."""
    from safetensors import SafetensorError, safe_open

    from .errors import CheckpointError

    try:
        with safe_open(str(path), framework="np") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable minikv cache file: {exc}") from None
    if meta.get("kind") not in _KINDS or meta.get("version") != _FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a minikv cache file of format version {_FORMAT_VERSION} "
                              f"(metadata kind={meta.get('kind')!r}, version={meta.get('version')!r})")
    cache = make_cache(meta["kind"], n_layers=int(meta["n_layers"]), n_kv_heads=int(meta["n_kv_heads"]),
                       head_dim=int(meta["head_dim"]), batch_size=int(meta["batch_size"]),
                       max_seq_len=int(meta["max_seq_len"]), dtype=meta["dtype"], backend=backend,
                       **json.loads(meta.get("extra", "{}")))
    cache._restore(tensors)
    cache.lengths = tensors["lengths"].astype(np.int64)
    return cache
