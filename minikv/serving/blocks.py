"""The block manager: which pool block holds which positions of which sequence. Ids only, no arrays.

The KV pool (``kv_store.py``) is ``num_blocks`` blocks of ``block_size`` positions. A sequence's
``block_table[i]`` is the pool block holding its positions ``i*block_size .. (i+1)*block_size - 1``.
This module hands out block ids, counts who uses each (``ref_count``), and does prefix caching:

* **Hash chain.** A *full* block of tokens is named by ``h_i = sha256(h_{i-1} || tokens of block i)``
  (``h_{-1}`` = empty). The parent hash is in it because a block's K/V depend on every token before
  it (attention mixed them in), not just on its own tokens: the same 16 tokens after a different
  prefix are different K/V. ``hashlib`` and not Python's ``hash``: stable across runs, no collisions
  in practice (we still compare the tokens on a hit).
* **Sharing.** A new sequence walks its full blocks' hashes; every hit is a block some other (or
  an earlier) sequence already computed: take it (``ref_count += 1``) instead of recomputing it.
* **Copy-on-write.** A block with a hash is immutable (its K/V are what the hash names), and a block
  with ``ref_count > 1`` is read by others. Before a sequence writes into such a block it gets a
  private copy (``cow_copies`` counts them): the K/V store copies the arrays, this module swaps ids.
* **LRU.** A hashed block whose last user is gone is not freed but kept, ready for a later hit;
  when the pool needs room the least recently released of them is evicted (``evictions``).

Invariants (checked by ``check()`` and by tests/test_serving.py): every block is exactly one of
*free* (ref 0, no hash), *cached* (ref 0, hashed, in the LRU), or *in use* (ref >= 1); ref counts
equal the number of block-table entries that name the block; no ref count is ever negative.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..errors import ConfigError


def block_hash(parent: Optional[bytes], tokens: Sequence[int]) -> bytes:
    """h_i = sha256(h_{i-1} || tokens_i): names a full block together with everything before it."""
    digest = hashlib.sha256(parent or b"")
    digest.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return digest.digest()


@dataclass
class PrefixStats:
    """Prefix-cache counters since the engine started."""

    queried_tokens: int = 0      # prompt tokens looked up on admission
    cached_tokens: int = 0       # of those, found in cached blocks (not recomputed)
    shared_blocks: int = 0       # block hits: a block taken from the cache instead of computed
    evictions: int = 0           # cached blocks dropped to make room
    cow_copies: int = 0          # blocks copied before a write into a shared or hashed block

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    """Hands out block ids, counts references, caches full blocks by hash. Knows nothing of K/V arrays.

    Every method that changes state says so in its name (take, release, write, register)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        self.num_blocks, self.block_size = int(num_blocks), int(block_size)
        self.prefix_caching = prefix_caching
        self.ref_count = [0] * self.num_blocks
        self.block_hashes: list[Optional[bytes]] = [None] * self.num_blocks
        self.block_tokens: list[Optional[tuple]] = [None] * self.num_blocks
        self.free_ids: deque[int] = deque(range(self.num_blocks))
        self.lru: OrderedDict[int, None] = OrderedDict()     # cached, unused blocks; oldest first
        self.by_hash: dict[bytes, int] = {}
        self.stats = PrefixStats()

    # ---- facts ----
    @property
    def num_available(self) -> int:
        """Blocks a sequence could get now: free ones plus cached ones that may be evicted."""
        return len(self.free_ids) + len(self.lru)

    @property
    def num_in_use(self) -> int:
        return self.num_blocks - self.num_available

    @property
    def num_cached(self) -> int:
        return len(self.lru)

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def hash_of(self, parent: Optional[bytes], tokens: Sequence[int]) -> bytes:
        return block_hash(parent, tokens)

    # ---- one block ----
    def _take_free_block(self) -> int:
        if self.free_ids:
            block = self.free_ids.popleft()
        else:
            # Evict the least recently released cached block: forget its hash, reuse its memory.
            block, _ = self.lru.popitem(last=False)
            del self.by_hash[self.block_hashes[block]]
            self.block_hashes[block] = self.block_tokens[block] = None
            self.stats.evictions += 1
        self.ref_count[block] = 1
        return block

    def _take_cached_block(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.lru[block]
        self.ref_count[block] += 1

    def _release_block(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] < 0:
            raise AssertionError(f"block {block}: ref count went negative")
        if self.ref_count[block] == 0:
            if self.block_hashes[block] is not None:
                self.lru[block] = None               # most recently released: evicted last
            else:
                self.free_ids.append(block)

    # ---- sequences: a sequence is anything with .token_ids, .block_table, .block_hashes, .num_computed ----
    def take_cached_prefix(self, seq) -> int:
        """Admit ``seq`` (no blocks yet): take every cached block of the longest cached prefix of its
        full blocks; return how many of its tokens are already computed. At least the last token is
        left to compute (its logits give the next token), so a prompt found whole is recomputed from
        its last position, which lies in a shared, hashed block: that write is a copy-on-write."""
        tokens, size = seq.token_ids, self.block_size
        seq.block_table, seq.block_hashes = [], []
        if self.prefix_caching:
            parent = None
            for i in range(len(tokens) // size):
                chunk = tokens[i * size:(i + 1) * size]
                digest = self.hash_of(parent, chunk)
                block = self.by_hash.get(digest)
                if block is None or self.block_tokens[block] != tuple(chunk):
                    break
                self._take_cached_block(block)
                seq.block_table.append(block)
                seq.block_hashes.append(digest)
                parent = digest
        return min(len(seq.block_table) * size, len(tokens) - 1)

    def record_admission(self, seq, hit: int) -> None:
        """Count an admitted sequence in the prefix-cache stats (once, however often it waited)."""
        self.stats.queried_tokens += len(seq.token_ids)
        self.stats.cached_tokens += hit
        self.stats.shared_blocks += -(-hit // self.block_size)

    def _blocks_to_copy(self, seq, n_new: int) -> list[int]:
        """Table columns that this write lands in and that must be copied first (shared or hashed)."""
        first = seq.num_computed // self.block_size
        last = min(self.blocks_for(seq.num_computed + n_new), len(seq.block_table))
        return [i for i in range(first, last)
                if self.ref_count[seq.block_table[i]] > 1 or self.block_hashes[seq.block_table[i]] is not None]

    def blocks_needed(self, seq, n_new: int) -> int:
        """Blocks ``write_blocks(seq, n_new)`` would take: new ones past the table, plus copies."""
        grow = max(0, self.blocks_for(seq.num_computed + n_new) - len(seq.block_table))
        return grow + len(self._blocks_to_copy(seq, n_new))

    def can_write(self, seq, n_new: int) -> bool:
        return self.blocks_needed(seq, n_new) <= self.num_available

    def write_blocks(self, seq, n_new: int) -> list[tuple[int, int]]:
        """Make positions num_computed .. num_computed+n_new-1 of ``seq`` writable (check ``can_write``
        first): copy-on-write shared/hashed blocks there, append new blocks. Returns the (src, dst)
        block copies the K/V store must make before the forward."""
        copies = []
        for column in self._blocks_to_copy(seq, n_new):
            src = seq.block_table[column]
            dst = self._take_free_block()
            copies.append((src, dst))
            seq.block_table[column] = dst
            self._release_block(src)
            # The copy is private and will be written: it has no hash until it is full again.
            del seq.block_hashes[column:]
            self.stats.cow_copies += 1
        while len(seq.block_table) < self.blocks_for(seq.num_computed + n_new):
            seq.block_table.append(self._take_free_block())
        return copies

    def register_full_blocks(self, seq) -> None:
        """After a forward: name each newly full, computed block by its hash so others may share it.
        A block whose hash another block already holds (two sequences computed the same prefix at
        once) stays private and is freed as usual."""
        if not self.prefix_caching:
            return
        size = self.block_size
        while len(seq.block_hashes) < seq.num_computed // size:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            chunk = seq.token_ids[i * size:(i + 1) * size]
            digest = self.hash_of(parent, chunk)
            seq.block_hashes.append(digest)
            block = seq.block_table[i]
            if digest not in self.by_hash and self.block_hashes[block] is None:
                self.by_hash[digest] = block
                self.block_hashes[block], self.block_tokens[block] = digest, tuple(chunk)

    def fork(self, parent, child) -> None:
        """``child`` shares every block of ``parent`` (parallel sampling: one prompt, n answers).
        The first write into a shared block copies it."""
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        for block in child.block_table:
            self._take_cached_block(block)

    def release(self, seq) -> None:
        """Give back every block of ``seq``. The last blocks are released first, so that the LRU
        evicts a prefix's tail before its head (a head is the part other prompts are likelier to share)."""
        for block in reversed(seq.block_table):
            self._release_block(block)
        seq.block_table, seq.block_hashes = [], []

    # ---- invariants ----
    def check(self, tables: Sequence[Sequence[int]] = ()) -> None:
        """Raise AssertionError unless the accounting is consistent with these live block tables."""
        refs = [0] * self.num_blocks
        for table in tables:
            for block in table:
                refs[block] += 1
        assert refs == self.ref_count, "ref counts differ from the block tables that hold them"
        free, cached = set(self.free_ids), set(self.lru)
        assert len(free) == len(self.free_ids) and not free & cached
        for block in range(self.num_blocks):
            in_use = self.ref_count[block] > 0
            assert self.ref_count[block] >= 0
            assert (block in free) + (block in cached) + in_use == 1, f"block {block} is in two states"
            assert (block in free) <= (self.block_hashes[block] is None)
            assert (block in cached) <= (self.block_hashes[block] is not None)
        assert all(self.block_hashes[b] == h for h, b in self.by_hash.items())
