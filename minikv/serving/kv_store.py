"""The K/V pool of the engine, seen by the model as a cache whose batch is "the tokens of this step".

The engine's batch is ragged and flattened: one step runs T tokens, a few from each scheduled
sequence (a prefill chunk of many, a decode of one). We hand the model these T tokens as T rows of
one token each, ``ids`` of shape (T, 1). Row r is token r of the step, and this store tells the
model where it belongs:

    lengths[r]        its position (= the keys before it: the row continues a sequence of that length)
    block_table[r]    the block table of the sequence it belongs to

    segments          (n_seqs + 1,) row boundaries: rows segments[s]:segments[s+1] are one
                      sequence's chunk (flash-attention's cu_seqlens)

``Transformer.forward(ids, cache=store)`` then does what it does for any cache: ``reserve``, per
layer ``update`` (write each row's K/V into its slot, return the pools, block tables and
segments), attention, ``advance``. Row by row, attention is the decode kernel: one query reading
the pool through row r's block table up to its position. A layer writes *all* rows' K/V before any
row attends, so the second token of a prefill chunk sees the first one's K/V in the pool: the
causal mask inside a chunk comes out of ``lengths`` alone. The segments let the backend do the
same work cheaper (``Backend.ragged_paged_attention``): a chunk of n rows becomes one causal
attention over its sequence's blocks read once, instead of n reads of them. No padding anywhere:
the matmuls run on exactly T rows, whatever the mix.

The model needs no change for this; the store implements the protocol of ``minikv.cache.KVCache``
(reserve / update / advance / rollback) for a batch it is told about with ``bind`` before each step.

``dtype="int8"``: as the int8 caches of minikv/cache.py, each K/V row is stored as int8 with a float32
scale beside it (scale pools (num_blocks, kv_heads, block_size) per layer; copy-on-write copies them too).
"""

from __future__ import annotations

import numpy as np

from ..cache import KVView, check_cache_dtype
from ..errors import CacheMismatchError, CacheOverflowError
from ..quant import quantize_rows


class PagedKVStore:
    """K and V pools per layer: (num_blocks, kv_heads, block_size, head_dim), shared by all sequences."""

    kind = "paged"
    window = None            # full attention (the model's own sliding window, if any, still applies)

    def __init__(self, model, num_blocks: int, block_size: int, dtype=None):
        cfg = model.config
        self.backend, self.xp = model.backend, model.backend.xp
        self.n_layers, self.n_kv_heads, self.head_dim = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
        self.num_blocks, self.block_size = int(num_blocks), int(block_size)
        self.dtype = check_cache_dtype(dtype or model.dtype, self.backend, "cache_dtype")
        self.quantized = self.dtype.name == "int8"
        shape = (self.num_blocks, self.n_kv_heads, self.block_size, self.head_dim)
        self.k_pool = [self.xp.zeros(shape, dtype=self.dtype) for _ in range(self.n_layers)]
        self.v_pool = [self.xp.zeros(shape, dtype=self.dtype) for _ in range(self.n_layers)]
        # int8: the scale of each stored row, (num_blocks, kv_heads, block_size) beside each pool; float: None
        self.k_scales = [np.zeros(shape[:3], np.float32) if self.quantized else None for _ in range(self.n_layers)]
        self.v_scales = [np.zeros(shape[:3], np.float32) if self.quantized else None for _ in range(self.n_layers)]
        self.lengths = np.zeros(0, dtype=np.int64)
        self._table = np.zeros((0, 1), dtype=np.int32)
        self._segments = np.zeros(1, dtype=np.int64)
        self._n_new = None

    @property
    def nbytes(self) -> int:
        row = self.head_dim * self.dtype.itemsize + (4 if self.quantized else 0)      # int8: + a float32 scale
        return 2 * self.n_layers * self.num_blocks * self.block_size * self.n_kv_heads * row

    # ---- the engine's side ----
    def copy_blocks(self, copies) -> None:
        """Copy-on-write: pool block dst becomes a copy of block src, in every layer."""
        if not copies:
            return
        src, dst = (self.backend.to_device(np.array(c, dtype=np.int64)) for c in zip(*copies))
        for pool in self.k_pool + self.v_pool + (self.k_scales + self.v_scales if self.quantized else []):
            pool[dst] = pool[src]

    def bind(self, positions: np.ndarray, block_tables: np.ndarray, segments: np.ndarray) -> None:
        """Set the batch of the next forward: row r is one token at position positions[r] of the
        sequence whose block table is block_tables[r] ((T, columns), -1 past its blocks); rows
        segments[s]:segments[s+1] are consecutive tokens of one sequence."""
        segments = np.asarray(segments, dtype=np.int64)
        # Checked here, once per step (attention trusts it): boundaries from 0 to T, each segment's
        # positions one apart (what a chunk attending as one causal block assumes).
        ok = len(segments) >= 2 and segments[0] == 0 and segments[-1] == len(positions) and (np.diff(segments) >= 1).all()
        if ok:
            steps = np.diff(positions)
            inside = np.ones(len(steps), dtype=bool)
            inside[segments[1:-1] - 1] = False             # the step from a segment's last row to the next's first
            ok = (steps[inside] == 1).all()
        if not ok:
            raise CacheMismatchError(f"segments={segments.tolist()} do not split the {len(positions)} rows into runs of "
                                     f"consecutive positions (positions={positions.tolist()})")
        self.lengths = positions.astype(np.int64)
        self._table = block_tables
        self._segments = segments
        size = self.block_size
        # The slot of each row's token: block table[r, p // size], offset p % size.
        self._slot_blocks = self.backend.to_device(block_tables[np.arange(len(positions)), positions // size])
        self._slot_offsets = self.backend.to_device(positions % size)
        used = -(-(int(positions.max()) + 1) // size) if len(positions) else 0
        self._table_device = self.backend.to_device(np.ascontiguousarray(block_tables[:, :used]))

    # ---- the cache protocol the model drives ----
    def check_compatible(self, config, batch_size: int) -> None:
        want = (config.n_layers, config.n_kv_heads, config.head_dim)
        if (self.n_layers, self.n_kv_heads, self.head_dim) != want or batch_size != len(self.lengths):
            raise CacheMismatchError(f"K/V store bound to {len(self.lengths)} rows of geometry "
                                     f"{(self.n_layers, self.n_kv_heads, self.head_dim)}; got {batch_size} rows "
                                     f"of {want} (bind the step's rows first)")

    def reserve(self, n_new: np.ndarray) -> None:
        # The scheduler took every block before the step (BlockManager.write_blocks): only check.
        if (n_new != 1).any():
            raise CacheOverflowError("the engine's K/V store takes one token per row (ids of shape (T, 1))")
        self._n_new = n_new

    def update(self, layer: int, k_new, v_new) -> KVView:
        if self.quantized:
            (k_new, k_scale), (v_new, v_scale) = quantize_rows(k_new), quantize_rows(v_new)
            # scales[block[r], :, offset[r]] = scale[r, :, 0]: (T, kv, 1) -> (T, kv)
            self.k_scales[layer][self._slot_blocks, :, self._slot_offsets] = k_scale[:, :, 0]
            self.v_scales[layer][self._slot_blocks, :, self._slot_offsets] = v_scale[:, :, 0]
        # pool[block[r], :, offset[r]] = new[r, :, 0] for every row r: (T, kv, 1, hd) -> (T, kv, hd)
        self.k_pool[layer][self._slot_blocks, :, self._slot_offsets] = k_new[:, :, 0]
        self.v_pool[layer][self._slot_blocks, :, self._slot_offsets] = v_new[:, :, 0]
        return KVView(self.k_pool[layer], self.v_pool[layer], self.lengths, self.lengths + 1, self._table_device,
                      k_scales=self.k_scales[layer], v_scales=self.v_scales[layer], segments=self._segments)

    def advance(self, n_new: np.ndarray) -> None:
        # The engine owns the sequence lengths; the rows of a step are forgotten after it.
        self._n_new = None

    def rollback(self) -> None:
        # Writes land only at positions no sequence had committed: nothing to undo.
        self._n_new = None
