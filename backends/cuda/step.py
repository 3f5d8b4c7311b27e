"""A decode step that lives on the device: no host round-trip, static buffers, ready for a CUDA graph.

Why. ``Transformer.forward`` is written once for every backend, and on a GPU a decode step through
it pays for that generality on the host: the positions are computed on the host and uploaded, the
lengths are uploaded for the attention kernel, RoPE's cos/sin rows are gathered by a separate op,
the K/V write is two more ops per layer, every intermediate is a new array, and ~50 small CuPy ops
and 4 Numba launches per layer each cost host time (~160 us per Numba launch measured on an H100:
benchmarks/results/gpu_nvidia-h100-80gb-hbm3.md). At batch 1 the GPU waits for the host.

What this step does instead, for one new token per sequence:

* the cache lengths have a **device mirror**, ``ends`` = lengths + 1 (the keys present once this
  step's token is written). The kernels read the new token's position, ``ends[b] - 1``, from it,
  and the step's last launch (``advance_lengths``) adds 1 on the device. The host keeps its own
  ``cache.lengths`` by the same arithmetic (it knows every row grows by one), so neither side
  sends the other a length: the step's only transfers are the token ids in and the logits out
  (or, greedy, only the chosen ids out: the argmax lands in the ids buffer the next step reads);
* every buffer is allocated once, here; every launch writes into one of them (``out=``), so the
  step's pointers never change: the precondition of a CUDA graph, which replays fixed pointers;
* RoPE and the K/V write are one kernel (``rope_write_kv``), the residual add and the next
  RMSNorm another (``add_rms_norm``), silu(gate) * up a third (``swiglu``);
* the step is a **plan**: a list of launches bound to their arguments at construction, run in
  order. Counting its entries counts the kernels of a step (tests/test_cuda_step.py), and on a GPU
  the same list is what ``capture()`` records into a CUDA graph, replayed by one launch per step.

Per step, for a llama-family model of L layers (no projection biases): 10 L + 4 launches

    embedding gather (xp.take)                                               1
    first RMSNorm (add_rms_norm, add=False)                                  1
    per layer: qkv matmul, rope_write_kv, split_k_decode, merge_splits,
               o matmul, add_rms_norm, mlp_in matmul, swiglu, down matmul,
               add_rms_norm (the next layer's norm, or the final norm)    10 L
    lm_head matmul, advance_lengths                                          2

(+1 per bias add, +1 for the greedy argmax). The plain path's forward launches ~50 for the same.

``library_free=True`` replaces the CuPy calls (cuBLAS matmuls, ``take``, ``argmax``) by our own
kernels: each matmul becomes ``gemv_partial`` + ``gemv_reduce`` (bias fused), so 15 L + 4 launches,
every one a Numba kernel. That is the plan a graph captures: CuPy disables cuBLAS and most library
calls while a stream captures (cupy issue 6290). Whether our GEMV (K split across blocks, a few rows
per W read) is as fast as cuBLAS for batch <= 16 is UNMEASURED.

Scope: llama-family models (RoPE with any precomputed scaling: linear, YaRN, Llama 3; RMSNorm,
SwiGLU; Llama, Mistral, Qwen2) on a **static** or
**paged** cache, batch of any size, float32/float64 models, float32/float16/float64 caches,
sliding-window models (the window is a kernel argument). A paged cache's block table has a device
copy too, uploaded into the same buffer only on the steps where the host's table changed (a
sequence crossed into a new block: once every ``block_size`` steps). Anything else (GPT-2, Gemma 3,
Qwen3's q/k norms, dynamic NTK RoPE, concat and sliding caches) raises ``StepUnsupportedError`` naming why, and the caller keeps using
``model.forward``.

CUDA graphs (``capture``, library-free plans only) need backend "cuda" and CuPy's stream capture; without them, or if the
capture fails (e.g. a CuPy version that refuses cuBLAS calls while capturing), the step runs its
plan launch by launch and ``graph_error`` says why. The capture has not been run on a GPU yet:
see benchmarks/results/gpu_step_plan.md for what remains to be measured.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from minikv.errors import InvalidInputError, MinikvError, SequenceTooLongError

from .._common import default_scale, rope_is_interleaved, window_value


class StepUnsupportedError(MinikvError):
    """This model / cache combination has no device decode step; use ``model.forward``."""


class DecodeStep:
    """One decode step of ``model`` over ``cache`` (a static or paged cache on the model's cuda / cuda-sim
    backend), with every buffer allocated here. ``step(ids)`` -> logits (batch, vocab) on the host.

    The step and ``model.forward`` can take turns on the same cache (prefill with forward, decode
    with the step, rewind with ``cache.truncate``): the step notices on the host, without a
    transfer, when the cache's lengths are no longer those it left, and uploads them once."""

    def __init__(self, model, cache, *, greedy: bool = False, library_free: bool = False,
                 n_splits: Optional[int] = None):
        backend = model.backend
        if not getattr(backend, "device_step", False):
            raise StepUnsupportedError(f"backend {backend.name!r} has no device decode step (cuda, cuda-sim do)")
        cfg = model.config
        if not cfg.uses_rope or model.is_gpt2:
            raise StepUnsupportedError(f"model type {cfg.model_type!r}: the device step serves the llama family "
                                       "(RoPE, RMSNorm, SwiGLU)")
        unsupported = [name for name, present in (
            ("Gemma 3's norms, GeGLU and local RoPE", getattr(model, "is_gemma3", False)),
            ("per-head q/k norms", any(getattr(layer, "qk_norm", None) is not None for layer in model.layers)),
            ("scaled embeddings or queries", getattr(model, "embed_scale", None) is not None
             or getattr(model, "q_scale", None) is not None),
            ("logit softcapping", getattr(cfg, "final_logit_softcapping", None) is not None),
            ("dynamic NTK RoPE", any(getattr(t, "dynamic", False) for t in getattr(model, "rope_tables", {}).values())),
        ) if present]
        if unsupported:
            raise StepUnsupportedError(f"model type {cfg.model_type!r} uses {', '.join(unsupported)}, which the device "
                                       "step does not implement")
        if getattr(cache, "kind", None) not in ("static", "paged"):
            raise StepUnsupportedError(f"cache kind {getattr(cache, 'kind', None)!r}: the device step writes a "
                                       "static or paged cache (model.new_cache('static', ...))")
        self.paged = cache.kind == "paged"
        cache.check_compatible(cfg, cache.batch_size)
        self.model, self.cache, self.backend = model, cache, backend
        self.xp = backend.xp
        self.greedy = bool(greedy)
        # library_free: the matmuls, the embedding gather and the argmax run as our own kernels
        # (gemv_partial + gemv_reduce, embed_rows, argmax_rows) instead of cuBLAS / CuPy, so that the
        # plan holds nothing but Numba launches: what a CUDA graph capture through CuPy needs.
        self.library_free = bool(library_free)
        self.allocations = 0           # device arrays this step allocated (all in __init__)
        self.graph = None
        self.graph_error: Optional[str] = "not captured (call capture())"
        batch, dtype = cache.batch_size, model.dtype
        n_q, n_kv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d, inter = cfg.hidden_size, cfg.intermediate_size
        kernels = backend._kernels_for(hd, dtype)
        self.kernels = kernels
        config = kernels.config
        compute = np.dtype(config.compute).type
        capacity = cache.capacity
        self.n_splits = int(n_splits or backend.n_splits or backend._default_splits(batch * n_q, capacity,
                                                                                    config.decode_tile))

        # ---- the buffers: every array a launch reads or writes, allocated once
        empty = self._empty
        self.ids = empty((batch,), np.int64)                         # token ids in (greedy: also out)
        self.ends = empty((batch,), np.int64)                        # device mirror: cache.lengths + 1
        if self.paged:
            # The cache's block table, mirrored; block_size rows per block.
            self.table = empty(cache.block_table.shape, np.int32)
            block_size, k_pools, v_pools = cache.block_size, cache.k_pool, cache.v_pool
        else:
            # A contiguous cache is one block of `capacity` rows per sequence: table [[0], [1], ...].
            self.table = backend.to_device(np.arange(batch, dtype=np.int32)[:, None])
            self.allocations += 1
            block_size, k_pools, v_pools = capacity, cache.k, cache.v
        self._synced_table: Optional[np.ndarray] = None             # host table the device copy matches
        x = empty((batch, d), dtype)                                 # the residual stream
        h = empty((batch, d), dtype)                                 # normed x
        delta = empty((batch, d), dtype)                             # a block's output, added to x
        qkv = empty((batch, (n_q + 2 * n_kv) * hd), dtype)
        q = empty((batch, n_q, 1, hd), dtype)
        attn = empty((batch, n_q, 1, hd), dtype)
        attn_lse = empty((batch, n_q, 1), dtype)
        part_out = empty((batch, n_q, self.n_splits, hd), np.dtype(config.compute))
        part_lse = empty((batch, n_q, self.n_splits), np.dtype(config.compute))
        hidden = empty((batch, 2 * inter), dtype)
        act = empty((batch, inter), dtype)
        self.logits = empty((batch, cfg.vocab_size), dtype)
        self.buffers = dict(x=x, h=h, delta=delta, qkv=qkv, q=q, attn=attn, attn_lse=attn_lse, part_out=part_out,
                            part_lse=part_lse, hidden=hidden, act=act)
        self._synced: Optional[np.ndarray] = None                    # host lengths the device mirror matches
        self._ones = np.ones(batch, dtype=np.int64)
        # library_free: each matmul's K axis is cut into splits; their partial sums share one scratch buffer.
        gemv_shapes = [(layer_w.shape[0], layer_w.shape[1]) for layer_w in
                       (model.layers[0].qkv, model.layers[0].o, model.layers[0].mlp_in, model.layers[0].mlp_down,
                        model.lm_head)]
        gemv_splits = {shape: backend._gemv_splits(-(-shape[1] // config.gemv_threads), shape[0])
                       for shape in gemv_shapes}
        if self.library_free:
            self.buffers["gemv_scratch"] = empty((max(gemv_splits[k] * batch * k[1] for k in gemv_shapes),),
                                                 np.dtype(config.compute))

        # ---- the plan: (label, function, args, kwargs), bound once
        xp, bind = self.xp, backend._bind
        eps, inv_d = compute(cfg.norm_eps), compute(1.0 / d)
        scale = compute(default_scale(hd))
        interleaved = rope_is_interleaved(cfg.rope_convention)
        threads = config.rope_threads
        rope_grid = -(-batch * (n_q + 2 * n_kv) * (hd // 2) // threads)
        swiglu_grid = -(-batch * inter // threads)
        windows = model._layer_windows(None, cache)
        B = {name: bind(a) for name, a in self.buffers.items()}
        ends_b, table_b = bind(self.ends), bind(self.table)
        plan = []

        def launch(label, kernel, grid, block, *args):
            plan.append((label, backend._launch, (kernel, grid, block) + args, {}))

        def op(label, function, *args, **kwargs):
            plan.append((label, function, args, kwargs))

        layers = model.layers
        def matmul(label, rows, weight, bias, out, rows_bound, out_bound):
            """out = rows @ weight (+ bias): cuBLAS through CuPy, or (library_free) our two kernels."""
            if not self.library_free:
                op(label, xp.matmul, rows, weight, out=out)
                if bias is not None:
                    op(label + "_bias", xp.add, out, bias, out=out)
                return
            k, n = weight.shape
            splits = gemv_splits[(k, n)]
            # (splits * batch * n,) scratch -> (splits, batch, n): a view of the one buffer
            part = bind(self.buffers["gemv_scratch"][:splits * batch * n].reshape(splits, batch, n))
            launch(label, kernels.gemv_partial, (-(-n // config.gemv_threads), splits), config.gemv_threads,
                   rows_bound, bind(weight), part, -(-k // splits))
            launch(label + "_reduce", kernels.gemv_reduce, -(-batch * n // threads), threads, part,
                   bind(bias if bias is not None else weight[0]), bias is not None, out_bound)

        if self.library_free:
            launch("embed", kernels.embed_rows, -(-batch * d // threads), threads, bind(model.embed),
                   bind(self.ids), B["x"])
        else:
            op("embed", xp.take, model.embed, self.ids, axis=0, out=x)          # x = embed[ids]
        launch("attn_norm", kernels.add_rms_norm, batch, config.norm_threads,
               B["x"], B["delta"], bind(layers[0].attn_norm), eps, inv_d, False, B["h"])
        # The RoPE table grows on demand (minikv.rope.RopeTable): make it cover every position this
        # cache can hold, then bind those arrays (a later growth makes new ones with the same rows).
        table = getattr(model, "rope_tables", {}).get("full_attention")
        if table is not None:
            table.lookup(np.zeros(1, dtype=np.int64), min(capacity, cfg.max_positions) - 1)
        cos, sin = bind(model.rope_cos), bind(model.rope_sin)
        for index, layer in enumerate(layers):
            matmul("qkv", h, layer.qkv, layer.qkv_bias, qkv, B["h"], B["qkv"])    # (batch, (H + 2 KV) hd)
            # RoPE on q and k at position ends[b] - 1, k and v into the cache there: one launch
            launch("rope_write_kv", kernels.rope_write_kv, rope_grid, threads, B["qkv"], cos, sin, ends_b,
                   table_b, block_size, n_q, n_kv, interleaved, B["q"], bind(k_pools[index]), bind(v_pools[index]))
            launch("split_k_decode", kernels.split_k_decode, (self.n_splits, batch * n_q), config.decode_threads,
                   B["q"], bind(k_pools[index]), bind(v_pools[index]), table_b, block_size, ends_b,
                   window_value(windows[index]), scale, B["part_out"], B["part_lse"])
            launch("merge_splits", kernels.merge_splits, batch * n_q, hd, B["part_out"], B["part_lse"], B["attn"],
                   B["attn_lse"])
            # (batch, H, 1, hd) -> (batch, H hd): contiguous, a view
            attn_rows = attn.reshape(batch, n_q * hd)
            matmul("o", attn_rows, layer.o, layer.o_bias, delta, bind(attn_rows), B["delta"])
            launch("mlp_norm", kernels.add_rms_norm, batch, config.norm_threads,
                   B["x"], B["delta"], bind(layer.mlp_norm), eps, inv_d, True, B["h"])   # x += attn; h = norm(x)
            matmul("mlp_in", h, layer.mlp_in, layer.mlp_in_bias, hidden, B["h"], B["hidden"])   # gate | up
            launch("swiglu", kernels.swiglu, swiglu_grid, threads, B["hidden"], B["act"])
            matmul("down", act, layer.mlp_down, layer.mlp_down_bias, delta, B["act"], B["delta"])
            next_norm = layers[index + 1].attn_norm if index + 1 < len(layers) else model.final_norm
            launch("attn_norm" if index + 1 < len(layers) else "final_norm", kernels.add_rms_norm, batch,
                   config.norm_threads, B["x"], B["delta"], bind(next_norm), eps, inv_d, True, B["h"])
        logits_b = bind(self.logits)
        matmul("lm_head", h, model.lm_head, None, self.logits, B["h"], logits_b)
        if self.greedy:                                                          # the next step's input
            if self.library_free:
                launch("argmax", kernels.argmax_rows, batch, config.norm_threads, logits_b, bind(self.ids))
            else:
                op("argmax", xp.argmax, self.logits, axis=1, out=self.ids)
        launch("advance_lengths", kernels.advance_lengths, -(-batch // threads), threads, ends_b)
        self.plan = plan

    # ------------------------------------------------------------------ running
    def _empty(self, shape, dtype):
        self.allocations += 1
        return self.xp.zeros(shape, dtype=dtype)

    def run(self) -> None:
        """Every launch of one step, in order, on the device: no transfer, no host synchronisation.
        Replayed from the captured graph when there is one."""
        if self.graph is not None:
            self.backend._launch_graph(self.graph)
            return
        for _, function, args, kwargs in self.plan:
            function(*args, **kwargs)

    def warm_up(self) -> None:
        """Run the step's launches once except the last (advance_lengths): every kernel compiles and
        cuBLAS sets up, without moving the lengths. It writes the cache slot at each sequence's
        length, which holds no key yet (the next real step overwrites it; a paged cache's block for
        it is claimed and given back), and, greedy, the ids buffer: set the ids after it."""
        self._check(1)
        self.cache.reserve(self._ones)
        try:
            self.sync_lengths()
            for _, function, args, kwargs in self.plan[:-1]:
                function(*args, **kwargs)
        finally:
            self.cache.rollback()

    def capture(self) -> bool:
        """Record the plan as a CUDA graph (backend "cuda" only). Returns whether a graph is in use;
        when not, ``graph_error`` says why and every step runs the plan launch by launch."""
        if not self.library_free:
            # CuPy disables cuBLAS and most library calls while a stream captures (cupy issue 6290).
            self.graph, self.graph_error = None, ("the plan calls cuBLAS through CuPy, which CuPy refuses while "
                                                  "capturing; build the step with library_free=True")
            return False
        self.warm_up()
        self.graph, self.graph_error = self.backend._capture_graph(self.run)
        return self.graph is not None

    def sync_lengths(self) -> None:
        """Upload cache.lengths + 1 to the device mirror (and a paged cache's block table to its
        copy), each only when the host's differs from what this step left behind (a forward,
        truncate, reset, or a new block claimed by reserve happened since): host-side compares."""
        cache = self.cache
        if self._synced is None or not np.array_equal(self._synced, cache.lengths):
            self.backend.copy_to_device(self.ends, cache.lengths + 1)
            self._synced = cache.lengths.copy()
        if self.paged and (self._synced_table is None or not np.array_equal(self._synced_table, cache.block_table)):
            self.backend.copy_to_device(self.table, cache.block_table)
            self._synced_table = cache.block_table.copy()

    def _check(self, n_tokens: int) -> None:
        cache, cfg = self.cache, self.model.config
        cache.check_room(self._ones * n_tokens)               # CacheOverflowError; host only
        highest = int(cache.lengths.max()) + n_tokens - 1
        if highest >= cfg.max_positions:
            raise SequenceTooLongError(
                f"position {highest} is beyond the model's maximum of {cfg.max_positions} positions "
                f"({cfg.max_positions_name})")

    def _one(self, host_ids=None) -> None:
        """reserve, (sync), (ids in), run, advance: one step; on any exception the cache is as before."""
        cache = self.cache
        cache.reserve(self._ones)                 # a paged cache may claim a block here (host table)
        try:
            self.sync_lengths()
            if host_ids is not None:
                self.backend.copy_to_device(self.ids, host_ids)
            self.run()
        except BaseException:
            cache.rollback()
            self._synced = self._synced_table = None     # the device copies may have moved: upload next time
            raise
        cache.advance(self._ones)             # host: lengths + 1, the same arithmetic as the device's
        self._synced = cache.lengths.copy()

    def __call__(self, token_ids) -> np.ndarray:
        """Feed one token per sequence; the logits (batch, vocab) of the next, on the host.

        Transfers: the ids in, the logits out (plus the lengths, once, if the cache changed since
        this step last ran, and a paged cache's table on a step that claims a new block)."""
        ids = np.asarray(token_ids)
        batch = self.cache.batch_size
        if ids.shape not in ((batch,), (batch, 1)) or ids.dtype.kind not in "iu":
            raise InvalidInputError(f"token_ids has shape {ids.shape} and dtype {ids.dtype}; the decode step "
                                    f"takes one integer id per sequence: shape ({batch},)")
        if ((ids < 0) | (ids >= self.model.config.vocab_size)).any():
            raise InvalidInputError(f"token ids {ids.reshape(-1).tolist()} must lie in 0..{self.model.config.vocab_size - 1}")
        self._check(1)
        self._one(ids.reshape(batch).astype(np.int64))
        return self.backend.to_host(self.logits)

    def greedy_tokens(self, first_ids, n_steps: int) -> np.ndarray:
        """Greedy decoding for n_steps steps from first_ids (batch,): (n_steps, batch) ids, each the
        argmax of the step before. The ids never leave the device between steps: the argmax is
        written into the buffer the next step's embedding reads; each step sends only its ids out."""
        if not self.greedy:
            raise InvalidInputError("greedy_tokens needs DecodeStep(..., greedy=True)")
        ids = np.asarray(first_ids, dtype=np.int64).reshape(-1)
        self._check(n_steps)
        out = np.empty((n_steps, ids.size), dtype=np.int64)
        for i in range(n_steps):
            self._one(ids if i == 0 else None)
            out[i] = self.backend.to_host(self.ids)
        return out

    def launch_counts(self) -> dict[str, int]:
        """Launches per step by label (tests and lesson 6 read it)."""
        counts: dict[str, int] = {}
        for label, *_ in self.plan:
            counts[label] = counts.get(label, 0) + 1
        return counts
