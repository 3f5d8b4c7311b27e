"""Serving: continuous batching, prefix caching and an OpenAI-compatible HTTP server.

Split as nano-vllm splits it, one job per file, in the order a request meets them:

* ``server.py``     the HTTP front (``minikv serve``, extra ``serve``): OpenAI's API over the engine
* ``engine.py``     the loop: schedule, one forward over every scheduled token, sample, finish
* ``scheduler.py``  which tokens run this step (token budget, chunked prefill, preemption)
* ``blocks.py``     which pool block holds what (ids only: ref counts, hash chain, copy-on-write, LRU)
* ``kv_store.py``   the K/V pool, presented to the unchanged model as a cache of one-token rows
"""

from .blocks import BlockManager, PrefixStats, block_hash
from .engine import Engine, EngineStats, RequestOutput
from .kv_store import PagedKVStore
from .scheduler import Scheduler, Sequence

__all__ = ["BlockManager", "PrefixStats", "block_hash", "Engine", "EngineStats", "RequestOutput", "PagedKVStore",
           "Scheduler", "Sequence"]
