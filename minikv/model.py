"""``Transformer``: the whole forward pass, one named step at a time.

For the llama family (pre-norm residual blocks)::

    x = embed[ids]
    for each layer:
        h = rms_norm(x)
        q, k, v = split(h @ W_qkv)              # fused: one matmul instead of three
        q, k = rope(q, positions), rope(k, positions)
        x = x + attention(q, k, v) @ W_o          # with a cache: K/V of past positions come from it
        h = rms_norm(x)
        gate, up = split(h @ W_gate_up)          # fused: one matmul instead of two
        x = x + (silu(gate) * up) @ W_down
    logits = rms_norm(x) @ W_lm_head

GPT-2 differs only in its pieces: LayerNorm with bias, learned position embeddings added to x
instead of RoPE, biases on every projection, and a GELU (tanh) MLP.

Qwen3 adds one step: q and k are RMS-normalised per head (over head_dim) before RoPE. Gemma 3 adds
that too, and: x = embed[ids] * sqrt(d); every norm gains (1 + w); a norm after attention and after
the MLP (before each residual add); GeGLU (gelu_tanh(gate) * up); scores scaled by
query_pre_attn_scalar^-1/2; sliding-window layers with their own RoPE base between global layers;
optionally logits = cap * tanh(logits / cap).

``forward(ids)`` with no cache recomputes everything: the baseline every cache is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import layers, quant, validate
from .backend import Backend, get_backend
from .cache import CACHE_PROTOCOL, KVCache, KVView, dequantize_view, make_cache
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, InvalidInputError, SequenceTooLongError
from .generate import DEFAULT
from .rope import RopeTable

SUPPORTED_DTYPES = ("float32", "float64")


def model_dtype(dtype) -> np.dtype:
    """The model dtype asked for, or a ConfigError naming it (also for names NumPy does not know).

    None is refused: np.dtype(None) is float64, which would silently double the memory of a model
    whose caller meant "the default" (float32)."""
    try:
        resolved = None if dtype is None else np.dtype(dtype)
    except (TypeError, ValueError):
        resolved = None
    if resolved is None or resolved.name not in SUPPORTED_DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; choose one of {SUPPORTED_DTYPES}")
    return resolved


@dataclass
class LayerWeights:
    """One block's weights as the forward pass uses them: shaped (in, out), fused where it saves a matmul.
    In memory they are (in, out) or, for a backend whose ``weight_layout`` is "out_in" (numba), a
    transposed view of a contiguous (out, in) array: the math reads the same either way."""

    attn_norm: Any
    attn_norm_bias: Any
    qkv: Any            # (d, (n_heads + 2 n_kv_heads) head_dim): q, k and v side by side
    qkv_bias: Any
    o: Any              # (n_heads head_dim, d)
    o_bias: Any
    mlp_norm: Any
    mlp_norm_bias: Any
    mlp_in: Any         # llama: (d, 2 intermediate) = gate | up;  gpt2: (d, intermediate)
    mlp_in_bias: Any
    mlp_down: Any       # (intermediate, d)
    mlp_down_bias: Any
    qk_norm: Any = None         # Qwen3, Gemma 3: (n_heads + n_kv_heads, 1, head_dim): q_norm per q head, k_norm per k head
    post_attn_norm: Any = None  # Gemma 3: norm of the attention output before the residual add (d,)
    post_mlp_norm: Any = None   # Gemma 3: norm of the MLP output before the residual add (d,)
    # With quantize="int8" / "int4", the four projections are instead ``quant.QuantizedWeight``s of the
    # same fused matrices in (out, in) layout (groups run along ``in``); ``Transformer._linear`` dispatches.



def _given(arguments: dict, options: dict) -> dict:
    """The keyword arguments a caller actually passed to generate/stream (DEFAULT ones dropped, so that
    minikv.generate's own defaults apply: the checkpoint's generation_config.json, else minikv's), plus
    any others (a typo among them is refused by minikv.generate with the nearest valid name)."""
    passed = {name: value for name, value in arguments.items()
              if name not in ("self", "prompt", "options") and value is not DEFAULT}
    return {**passed, **options}


class Transformer:
    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray], *, dtype="float32",
                 backend: Optional[str | Backend] = None, attention: Optional[str] = None,
                 tokenizer=None, source: Optional[Path] = None, generation_config=None,
                 _take_weights: bool = False, quantize: Optional[str] = None):
        dtype = model_dtype(dtype)
        if quantize is not None and quantize not in quant.FORMATS:
            raise ConfigError(f"quantize={quantize!r} is not a weight format; "
                              f"choose None or one of {sorted(quant.FORMATS)}")
        # None: float weights; "int8" / "int4": every projection (lm_head included) quantized group-wise.
        self.quantize = quantize
        self.config = config
        self.dtype = dtype
        self.backend = get_backend(backend)
        # The projection every layer calls: the backend's float linear (numpy: layers.linear itself, no
        # dispatch call per matmul on the hot path), the quantized dispatch otherwise.
        self._linear = self.backend.linear if quantize is None else self._quantized_linear
        if quantize is not None and self.backend.xp is not np:
            raise ConfigError(f"quantize={quantize!r} runs on the CPU backends only (numpy, numba), "
                              f"not on {self.backend.name!r}; load without quantize there")
        if attention is not None and attention not in self.backend.attention_algorithms:
            raise ConfigError(f"attention={attention!r} is not available on backend {self.backend.name!r}; "
                              f"choose one of {self.backend.attention_algorithms}")
        # None lets the backend choose per call (the numpy backend: naive for short inputs, tiled for long).
        self.attention = attention
        self.tokenizer = tokenizer
        self.source = source
        # The checkpoint's generation_config.json (stop ids, default sampling), or None.
        self.generation_config = generation_config
        # Canonical weights on the host, in the model dtype (what save() and conversions use). load()
        # hands its dict over (_take_weights): the model keeps that very dict, so each weight that
        # _prepare replaces by a view of its prepared copy is freed at once (loading peaks near one copy).
        if _take_weights:
            for name, w in weights.items():
                weights[name] = np.ascontiguousarray(w, dtype=dtype)
            self.weights = weights
        else:
            self.weights = {name: np.ascontiguousarray(w, dtype=dtype) for name, w in weights.items()}
        self._prepare()

    # ------------------------------------------------------------ set-up
    def _prepare(self) -> None:
        """Lay the weights out for the forward pass, once, on the backend's device."""
        cfg, w, dev = self.config, self.weights, self.backend.to_device
        # Facts the forward pass asks every layer, read once (config properties are Python calls).
        self.is_gpt2, self.uses_rope, self.is_gemma3 = cfg.family == "gpt2", cfg.uses_rope, cfg.is_gemma3

        def get(name):
            return dev(w[name]) if name in w else None

        out_in = self.backend.weight_layout == "out_in"

        def fused(names):
            # (out, in) projections side by side as one (in, sum of outs) matrix.
            if self.quantize is not None:
                # Quantized: kept (sum of outs, in), the layout whose rows are the groups' runs.
                return quant.quantize(np.concatenate([w[n] for n in names], axis=0), self.quantize)
            stacked = w[names[0]] if len(names) == 1 else np.concatenate([w[n] for n in names], axis=0)
            if out_in:
                # (sum of outs, in) contiguous, seen as (in, sum of outs): the backend's layout (see
                # Backend.weight_layout); a single contiguous checkpoint tensor is used as it is.
                return dev(np.ascontiguousarray(stacked)).T
            return dev(np.ascontiguousarray(stacked.T))

        def fused_bias(names):
            return dev(np.concatenate([w[n] for n in names])) if names[0] in w else None

        def qk_norm(p):
            # One gain row per head, q heads then k heads as in the fused projection: one norm call for both.
            if not cfg.qk_norm:
                return None
            rows = [w[p + "attn.q_norm.weight"]] * cfg.n_heads + [w[p + "attn.k_norm.weight"]] * cfg.n_kv_heads
            return dev(np.stack(rows)[:, None, :])          # (n_heads + n_kv_heads, 1, head_dim)

        # On the host (NumPy arrays) the canonical weights become views of the prepared ones: each
        # weight is held once. (On a GPU the prepared copy lives on the device, the canonical on the host.)
        share = self.backend.xp is np and self.quantize is None    # (quantized: the float weights stay as loaded)
        self.layers: list[LayerWeights] = []
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            qkv = [p + f"attn.{x}.weight" for x in "qkv"]
            mlp_in = [p + "mlp.up.weight"] if cfg.family == "gpt2" else [p + "mlp.gate.weight", p + "mlp.up.weight"]
            self.layers.append(LayerWeights(
                attn_norm=get(p + "attn_norm.weight"), attn_norm_bias=get(p + "attn_norm.bias"),
                qkv=fused(qkv), qkv_bias=fused_bias([n.replace("weight", "bias") for n in qkv]),
                o=fused([p + "attn.o.weight"]), o_bias=get(p + "attn.o.bias"),
                mlp_norm=get(p + "mlp_norm.weight"), mlp_norm_bias=get(p + "mlp_norm.bias"),
                mlp_in=fused(mlp_in), mlp_in_bias=fused_bias([n.replace("weight", "bias") for n in mlp_in]),
                mlp_down=fused([p + "mlp.down.weight"]), mlp_down_bias=get(p + "mlp.down.bias"),
                qk_norm=qk_norm(p), post_attn_norm=get(p + "post_attn_norm.weight"),
                post_mlp_norm=get(p + "post_mlp_norm.weight"),
            ))
            if share:
                self._share_layer(p, self.layers[-1])
        self.embed = get("embed.weight")
        self.pos_embed = get("pos_embed.weight")
        self.final_norm, self.final_norm_bias = get("final_norm.weight"), get("final_norm.bias")
        head = "embed.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        self.lm_head = fused([head])
        if share and not cfg.tie_word_embeddings:
            w["lm_head.weight"] = self.lm_head.T
        # Each layer's own attention window (None: full causal attention) and the RoPE table it reads.
        self.layer_windows = list(cfg.layer_windows)
        self.layer_rope = ["sliding_attention" if cfg.is_gemma3 and t == "sliding_attention" else "full_attention"
                           for t in (cfg.layer_types or ("full_attention",) * cfg.n_layers)]
        self.rope_tables: dict[str, RopeTable] = {}
        if cfg.uses_rope:
            # cos/sin rows, computed once per position (a step only gathers rows), built for the
            # positions used so far (see RopeTable). Gemma 3's sliding layers rotate with their own base.
            self.rope_tables["full_attention"] = RopeTable(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                                                           self.dtype, cfg.max_positions, dev)
            if "sliding_attention" in self.layer_rope:
                self.rope_tables["sliding_attention"] = RopeTable(cfg.head_dim, cfg.rope_local_theta, None,
                                                                  self.dtype, cfg.max_positions, dev)
        # Gemma 3: x = embed[ids] * sqrt(d), the factor rounded to the model dtype (as transformers does);
        # scores scaled by query_pre_attn_scalar^-1/2: attention scales by head_dim^-1/2, so q is
        # multiplied by the ratio of the two.
        self.embed_scale = self.dtype.type(np.sqrt(cfg.hidden_size)) if cfg.is_gemma3 else None
        self.q_scale = (self.dtype.type(np.sqrt(cfg.head_dim / cfg.query_pre_attn_scalar))
                        if cfg.query_pre_attn_scalar not in (None, cfg.head_dim) else None)
        # A backend may run a whole batch-1 decode step itself (numba: compiled kernels per layer);
        # None: every step takes the generic path below.
        prepare = getattr(self.backend, "prepare_decode", None)
        self._decode_step = prepare(self) if prepare is not None else None

    def _share_layer(self, p: str, layer: LayerWeights) -> None:
        """Point layer ``p``'s canonical (out, in) weights at views of its prepared (in, out) arrays:
        W_q = qkv[:, :H hd].T, W_k and W_v the next column blocks, W_o = o.T, W_gate | W_up = mlp_in's
        column blocks transposed, W_down = mlp_down.T. The replaced arrays are freed unless the caller
        still holds them."""
        cfg, w = self.config, self.weights

        def split(prefix, names, fused, fused_bias, sizes):
            start = 0
            for name, size in zip(names, sizes):
                w[f"{prefix}{name}.weight"] = fused[:, start:start + size].T        # (out, in) view
                if fused_bias is not None:
                    w[f"{prefix}{name}.bias"] = fused_bias[start:start + size]
                start += size

        q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        split(p + "attn.", "qkv", layer.qkv, layer.qkv_bias, (q_out, kv_out, kv_out))
        w[p + "attn.o.weight"] = layer.o.T
        mlp_in = ("up",) if self.is_gpt2 else ("gate", "up")
        split(p + "mlp.", mlp_in, layer.mlp_in, layer.mlp_in_bias, (cfg.intermediate_size,) * len(mlp_in))
        w[p + "mlp.down.weight"] = layer.mlp_down.T

    @property
    def rope_cos(self):
        """The (full-attention layers') RoPE cos table built so far: (positions, head_dim/2)."""
        return self.rope_tables["full_attention"].cos

    @property
    def rope_sin(self):
        return self.rope_tables["full_attention"].sin

    @property
    def n_parameters(self) -> int:
        return int(sum(w.size for w in self.weights.values()))

    # ------------------------------------------------------------ forward
    def forward(self, token_ids, cache: Optional[KVCache] = None, positions=None, *, n_new=None,
                window: Optional[int] = None, last_only: bool = False, logit_rows=None) -> np.ndarray:
        """Logits for ``token_ids`` (batch, seq): (batch, seq, vocab), NumPy on the host.

        cache:     a KVCache: this call's K/V are written into it and attention reads every K/V it
                   holds. None recomputes everything (the baseline).
        positions: (batch, seq) positions for RoPE / position embeddings; default: each sequence's
                   cache length + 0, 1, 2, ...
        n_new:     (batch,) how many leading tokens of each row are real (a right-padded ragged
                   batch); default: all of them.
        window:    None: attention is as the model defines it (its config's sliding window, if any);
                   an int W: additionally restrict every query to the last W positions.
        last_only: return only each row's last real position: (batch, vocab).
        logit_rows: with last_only, only these rows' logits: (len(logit_rows), vocab). A serving step
                   whose rows are mostly prefill tokens needs few: the lm_head is the largest matmul.

        Every argument is checked here, once, before anything is written; after any exception
        (KeyboardInterrupt included) the cache is exactly as it was.
        """
        ids, n_new, positions = self._check_forward(token_ids, cache, positions, n_new)
        windows = self._layer_windows(window, cache)
        if logit_rows is not None:
            logit_rows = self._check_logit_rows(logit_rows, last_only, ids.shape[0])
        if cache is None:
            return self._forward(ids, positions, n_new, None, windows, last_only, logit_rows)
        cache.reserve(n_new)                      # claim room before any layer writes (or CacheOverflowError)
        try:
            logits = self._forward(ids, positions, n_new, cache, windows, last_only, logit_rows)
        except BaseException:
            cache.rollback()                      # a failed call leaves the cache as it was
            raise
        cache.advance(n_new)                      # commit: lengths += n_new
        return logits

    __call__ = forward

    def _forward(self, ids, positions, n_new, cache, windows, last_only, logit_rows=None):
        """The forward pass itself, on checked inputs (the hot path: no checks in here)."""
        cfg, backend = self.config, self.backend
        batch, seq = ids.shape
        if seq == 1 and cache is not None and self._decode_step is not None:
            # The backend's compiled decode step, where it supports this cache and batch (else None).
            logits = self._decode_step(ids, positions, n_new, cache, windows, last_only, logit_rows)
            if logits is not None:
                return logits
        # Activations are (tokens, d) rows: a 2-D matmul per projection (a decode step's is a BLAS
        # matrix-vector product).
        x = layers.embedding(self.embed, backend.to_device(ids.reshape(-1)))       # (batch*seq, d)
        if self.embed_scale is not None:
            x *= self.embed_scale                                                   # Gemma: * sqrt(d)
        rope = {}
        for kind, table in self.rope_tables.items():
            # (batch, seq, head_dim/2) -> (batch, 1, seq, head_dim/2): broadcast over heads. The
            # checked positions' maximum is the highest real one (padding is clamped to it).
            cos, sin = table.lookup(positions, int(positions.max()))
            rope[kind] = cos[:, None], sin[:, None]
        positions = backend.to_device(positions)
        if self.pos_embed is not None:
            x += self.pos_embed[positions.reshape(-1)]                              # (batch*seq, d)
        no_cache_offset = np.zeros(batch, dtype=np.int64)
        for index, layer in enumerate(self.layers):
            h = self._norm(x, layer.attn_norm, layer.attn_norm_bias)
            cos, sin = rope.get(self.layer_rope[index], (None, None))
            q, k, v = self._qkv(h, layer, batch, seq, cos, sin)     # (b, H, seq, hd), (b, KV, seq, hd) x 2
            if cache is None:
                view = KVView(k, v, no_cache_offset, n_new)          # attend over this call's tokens only
            else:
                view = cache.update(index, k, v)                     # write this step's K/V ...
            out = self._attend(q, view, windows[index])              # ... then attend over everything held
            # (b, H, seq, hd) -> (b, seq, H, hd) -> (b*seq, H*hd): the heads side by side again
            out = out.transpose(0, 2, 1, 3).reshape(batch * seq, cfg.n_heads * cfg.head_dim)
            attended = self._linear(out, layer.o, layer.o_bias)
            if layer.post_attn_norm is not None:
                attended = self._norm(attended, layer.post_attn_norm, None)    # Gemma 3: norm before the add
            x += attended                                            # residual adds in place: no new array
            h = self._norm(x, layer.mlp_norm, layer.mlp_norm_bias)
            mlp_out = self._mlp(h, layer)
            if layer.post_mlp_norm is not None:
                mlp_out = self._norm(mlp_out, layer.post_mlp_norm, None)
            x += mlp_out
        if last_only:
            # (batch*seq, d) -> (batch, seq, d) -> each row's last real token: (batch, d)
            x = x.reshape(batch, seq, -1)[backend.xp.arange(batch), backend.to_device(n_new - 1)]
            if logit_rows is not None:
                x = x[backend.to_device(logit_rows)]                     # (rows, d)
        x = self._norm(x, self.final_norm, self.final_norm_bias)
        logits = self._linear(x, self.lm_head, None)                 # (tokens, vocab)
        if cfg.final_logit_softcapping is not None:
            logits = layers.softcap(logits, cfg.final_logit_softcapping)
        logits = backend.to_host(logits)
        return logits if last_only else logits.reshape(batch, seq, -1)

    def _attend(self, q, view: KVView, window):
        """Causal attention of q (batch, H, seq, hd) over every K/V of ``view``: softmax(q K^T / sqrt(hd)) V.

        The one switch between prefill (many queries: the backend's attention algorithm) and decode
        (one query per sequence: its split-K decode kernel), each reading a paged view through its
        block table; a view with ``segments`` (the serving engine's ragged batch) mixes both in one
        backend call. Returns (batch, H, seq, hd)."""
        backend = self.backend
        if view.k_scales is not None:
            # An int8 cache: attention reads K = q_k * scale_k, V = q_v * scale_v (one scale per row).
            view = dequantize_view(view, q.dtype)
        if view.segments is not None:
            # A flattened ragged batch (the serving engine): rows of one query each, grouped into sequences.
            out, _ = backend.ragged_paged_attention(q, view.k, view.v, view.block_table, view.lengths, view.segments,
                                                    window=window, algorithm=self.attention)
        elif q.shape[2] == 1:
            # Decode: each sequence's one query sits at position lengths[b] - 1 of the view.
            if view.block_table is not None:
                out, _ = backend.paged_decode_attention(q, view.k, view.v, view.block_table, view.lengths,
                                                        window=window)
            else:
                out, _ = backend.decode_attention(q, view.k, view.v, view.lengths, window=window)
        elif view.block_table is not None:
            out, _ = backend.paged_attention(q, view.k, view.v, view.block_table, q_offset=view.q_offset,
                                             lengths=view.lengths, window=window, algorithm=self.attention)
        else:
            out, _ = backend.attention(q, view.k, view.v, causal=True, q_offset=view.q_offset,
                                       lengths=view.lengths, window=window, algorithm=self.attention)
        return out

    def _quantized_linear(self, x, weight, bias):
        """y = x @ W (+ b): a QuantizedWeight through the backend, a float (in, out) matrix through BLAS."""
        if isinstance(weight, quant.QuantizedWeight):
            return self.backend.quantized_linear(x, weight, bias)
        return self.backend.linear(x, weight, bias)

    def _norm(self, x, weight, bias):
        if self.is_gpt2:
            return layers.layer_norm(x, weight, bias, self.config.norm_eps)
        if self.is_gemma3:
            return layers.rms_norm_one_plus(x, weight, self.config.norm_eps)
        return self.backend.rms_norm(x, weight, self.config.norm_eps)

    def _mlp(self, h, layer: LayerWeights):
        hidden = self._linear(h, layer.mlp_in, layer.mlp_in_bias)
        if self.is_gpt2:
            act = layers.gelu_tanh(hidden)
        else:
            # (tokens, 2 intermediate) = gate | up side by side
            gate, up = hidden[..., :self.config.intermediate_size], hidden[..., self.config.intermediate_size:]
            act = layers.geglu(gate, up) if self.is_gemma3 else layers.swiglu(gate, up)
        return self._linear(act, layer.mlp_down, layer.mlp_down_bias)

    def _qkv(self, h, layer: LayerWeights, batch: int, seq: int, cos, sin):
        """h (batch*seq, d) -> q (batch, H, seq, hd), k and v (batch, KV, seq, hd), with the per-head q/k
        norm (Qwen3, Gemma 3) and RoPE applied to q and k."""
        cfg = self.config
        n_q, n_kv = cfg.n_heads, cfg.n_kv_heads
        qkv = self._linear(h, layer.qkv, layer.qkv_bias)           # (batch*seq, (H + 2 KV) hd)
        # The fused projection's columns are H query heads, then KV key heads, then KV value heads:
        # (batch*seq, (H + 2 KV) hd) -> (batch, seq, H + 2 KV, hd) -> (batch, H + 2 KV, seq, hd)
        heads = qkv.reshape(batch, seq, n_q + 2 * n_kv, cfg.head_dim).transpose(0, 2, 1, 3)
        qk = heads[:, : n_q + n_kv]
        if layer.qk_norm is not None:
            # RMSNorm of each head's vector over head_dim, q heads with q_norm's gain, k heads with k_norm's
            qk = self._norm(qk, layer.qk_norm, None)
        if self.uses_rope:
            # q and k heads sit side by side and share the positions: one rotation for both.
            qk = self.backend.apply_rope(qk, cos, sin, cfg.rope_convention)
        q = qk[:, :n_q]
        if self.q_scale is not None:
            q = q * self.q_scale      # scores = (c q) . k / sqrt(head_dim) = q . k / sqrt(query_pre_attn_scalar)
        return q, qk[:, n_q:], heads[:, n_q + n_kv:]

    # ------------------------------------------------------------ input checks (the door)
    def _check_forward(self, token_ids, cache, positions, n_new):
        """Every check of forward's arguments, before anything is written: (ids, n_new, positions),
        ids and positions (batch, seq) int64, n_new (batch,) int64."""
        cfg = self.config
        ids = self._check_ids(token_ids)
        batch, seq = ids.shape
        n_new = (np.full(batch, seq, dtype=np.int64) if n_new is None
                 else validate.per_sequence(n_new, "n_new", batch, 0, seq, "counts"))
        if cache is not None:
            # The cache protocol (minikv/cache.py), not a class: the serving engine's paged store implements it too.
            if not isinstance(cache, KVCache) and not all(hasattr(cache, name) for name in CACHE_PROTOCOL):
                raise InvalidInputError(f"cache={cache!r:.60} is not a KVCache; pass one made by model.new_cache(...) "
                                        "or minikv.load_cache(...), or None to recompute")
            cache.check_compatible(cfg, batch)
        q_offset = np.zeros(batch, dtype=np.int64) if cache is None else cache.lengths
        if positions is None:
            # Each row continues from its cache length: positions are >= 0 and the highest real one
            # is q_offset + n_new - 1 (a decode step checks two numbers, not a mask).
            positions = q_offset[:, None] + np.arange(seq)[None, :]
            highest = int((q_offset + n_new - 1)[n_new > 0].max(initial=-1))
        else:
            positions = np.asarray(positions)
            if positions.shape != (batch, seq) or positions.dtype.kind not in "iu":
                raise InvalidInputError(f"positions has shape {positions.shape} and dtype {positions.dtype}; "
                                        f"expected integers of shape {(batch, seq)} like token_ids")
            # Only the real (non-padding) columns must fit the model; padding columns are clamped below.
            real = np.arange(seq)[None, :] < n_new[:, None]
            if (positions[real] < 0).any():
                raise InvalidInputError(f"position {int(positions[real].min())} is negative; positions start at 0")
            highest = int(positions[real].max(initial=-1))
        if highest >= cfg.max_positions:
            raise SequenceTooLongError(
                f"position {highest} is beyond the model's maximum of "
                f"{cfg.max_positions} positions ({cfg.max_positions_name}); shorten the input to at most "
                f"{cfg.max_positions} tokens"
            )
        # Padding columns may run past the table: clamp them to the highest real position (their outputs
        # are never used), so positions.max() is the highest real one (what the RoPE tables need).
        return ids, n_new, np.minimum(positions, max(highest, 0)).astype(np.int64, copy=False)

    def _layer_windows(self, window, cache) -> list:
        """Each layer's attention window: the smallest of the model's own (config), the caller's
        ``window`` and a sliding cache's ring (None everywhere means: no window)."""
        if window is not None and (isinstance(window, bool) or not isinstance(window, (int, np.integer))
                                   or window < 1):
            raise InvalidInputError(f"window={window!r}; pass None (no extra window) or an int >= 1")
        ring = getattr(cache, "window", None)
        if window is None and ring is None:
            return self.layer_windows
        windows = []
        for own in self.layer_windows:
            limits = [w for w in (own, window, ring) if w is not None]
            effective = int(min(limits)) if limits else None
            if ring is not None and effective < ring:
                # The ring hands its slots over in ring order, so it cannot mask a narrower window.
                raise InvalidInputError(
                    f"attention window {effective} is narrower than the sliding cache's ring of {ring}; build "
                    f"the cache with model.new_cache('sliding', window={effective})")
            windows.append(effective)
        return windows

    def _check_ids(self, token_ids) -> np.ndarray:
        if hasattr(token_ids, "__cuda_array_interface__"):
            token_ids = self.backend.to_host(token_ids)
        try:
            ids = np.asarray(token_ids)
        except ValueError:
            raise InvalidInputError("token_ids rows have different lengths; right-pad them into one (batch, seq) "
                                    "array and pass each row's real length as n_new") from None
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2:
            raise InvalidInputError(f"token_ids has shape {ids.shape}; expected (batch, seq)")
        if ids.size == 0 or ids.shape[1] == 0:
            raise InvalidInputError(f"token_ids is empty (shape {ids.shape}); give at least one token per sequence")
        if ids.dtype.kind not in "iu":
            # Floats are refused outright: float32 cannot even represent every id above 2**24.
            raise InvalidInputError(f"token_ids has dtype {ids.dtype}; expected integers (e.g. np.int64)")
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bad.any():
            value = int(ids[bad][0])
            raise InvalidInputError(
                f"token id {value} is out of range for a vocabulary of {self.config.vocab_size} "
                f"(valid ids are 0..{self.config.vocab_size - 1})"
            )
        return ids.astype(np.int64, copy=False)

    @staticmethod
    def _check_logit_rows(logit_rows, last_only: bool, batch: int) -> np.ndarray:
        rows = np.asarray(logit_rows)
        if not last_only or rows.ndim != 1 or rows.dtype.kind not in "iu" or (rows.size and (
                rows.min() < 0 or rows.max() >= batch)):
            raise InvalidInputError(f"logit_rows={logit_rows!r:.60} must be a 1-D array of row indices in 0..{batch - 1}, "
                                    "with last_only=True")
        return rows.astype(np.int64)

    # ------------------------------------------------------------ caches and generation
    def new_cache(self, kind: str = "static", batch_size: int = 1, max_seq_len: Optional[int] = None,
                  dtype: Optional[str] = None, *, block_size: Optional[int] = None,
                  num_blocks: Optional[int] = None, window: Optional[int] = None) -> Optional[KVCache]:
        """A KV cache shaped for this model (its layers, K/V heads and head_dim), for ``forward``/``generate``.

        kind:        "static" (default: max_seq_len slots per sequence, allocated once), "concat" (grows by
                     np.concatenate: the textbook version), "paged" (blocks from a shared pool, through a
                     block table), "sliding" (a ring of the last ``window`` positions), or "none" (returns
                     None: recompute everything).
        batch_size:  sequences the cache holds side by side (default 1).
        max_seq_len: positions per sequence (default: the model's max_position_embeddings).
        dtype:       storage dtype (default: the model's; "float16" halves the memory; "int8", any kind,
                     stores K/V as int8 with a float32 scale per token and head: (head_dim + 4) / (4 head_dim)
                     of float32's bytes).
        block_size:  "paged" only: positions per block (default 16).
        num_blocks:  "paged" only: blocks in the pool (default: enough for batch_size x max_seq_len).
        window:      "sliding" only: positions kept (default max_seq_len; never more than the model's
                     own sliding_window, if its config has one).

        Raises ConfigError for an unknown kind or an option that belongs to another kind.
        """
        cfg = self.config
        max_seq_len = cfg.max_positions if max_seq_len is None else max_seq_len
        full_layers = [i for i, w in enumerate(cfg.layer_windows) if w is None]
        if kind == "sliding" and full_layers and len(full_layers) < cfg.n_layers:
            # Gemma 3 mixes sliding and full-attention layers: one ring of W positions cannot serve both.
            raise ConfigError(
                f"a sliding cache keeps only the last {cfg.sliding_window} positions, but the full-attention "
                f"layers {full_layers} attend to every position; use a static or paged cache")
        # Only the options given: make_cache refuses one that belongs to another kind, naming it.
        options = {name: value for name, value in
                   [("block_size", block_size), ("num_blocks", num_blocks), ("window", window)] if value is not None}
        if kind == "sliding" and cfg.sliding_window is not None:
            # The ring never exceeds the model's own window: slots beyond it could never be attended to.
            if window is None or validate.is_integer(window):     # (any other value: the cache names it)
                options["window"] = cfg.sliding_window if window is None else min(window, cfg.sliding_window)
        return make_cache(kind, n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                          batch_size=batch_size, max_seq_len=max_seq_len,
                          dtype=self.dtype.name if dtype is None else dtype,
                          backend=self.backend, **options)

    def generate(self, prompt, max_new_tokens=DEFAULT, *, cache=DEFAULT, temperature=DEFAULT, top_k=DEFAULT,
                 top_p=DEFAULT, min_p=DEFAULT, repetition_penalty=DEFAULT, seed=DEFAULT, rng=DEFAULT,
                 stop_tokens=DEFAULT, prefill_chunk=DEFAULT, max_seq_len=DEFAULT, cache_dtype=DEFAULT,
                 block_size=DEFAULT, num_blocks=DEFAULT, window=DEFAULT, cached_tokens=DEFAULT,
                 speculative=DEFAULT, num_speculative_tokens=DEFAULT, stream: bool = False, **options):
        """Generate text: prefill the prompt, then decode one token per step (``minikv.generate``).

        ``model.generate("Once upon", max_new_tokens=20).text``. Options; one left out takes the
        default shown (for max_new_tokens, the sampling options and stop_tokens: the checkpoint's
        ``generation_config.json`` if it sets one, else the default shown: greedy, 50 tokens):

        prompt:             a str, a list of str, a list of token ids, or a list of token-id lists (a
                            ragged batch; each row is generated as if alone).
        max_new_tokens:     tokens to generate per prompt (default 50).
        cache:              "static" (default), "none" (recompute every step), "concat", "paged",
                            "sliding", or a KVCache (e.g. from ``minikv.load_cache``: generation continues
                            after what it holds).
        temperature:        0.0 (default) = greedy; > 0 samples from softmax(logits / temperature).
        top_k:              keep only the k most likely tokens (default None: all).
        top_p:              keep the smallest set of tokens whose probability reaches p (default None).
        min_p:              keep tokens with probability >= min_p x the largest (default None).
        repetition_penalty: > 1 discourages tokens already in the sequence (default 1.0: off).
        seed:               seed of the random generator (default 0: the same text on every run).
        rng:                a ``numpy.random.Generator`` to draw from instead of ``seed``.
        stop_tokens:        token ids that end a sequence (default: the eos_token_id(s) of
                            generation_config.json, else of config.json).
        prefill_chunk:      prefill N prompt tokens at a time (same logits, less peak memory).
        max_seq_len:        positions the cache holds (default: just enough for prompt + new tokens).
        cache_dtype:        cache storage dtype (default the model's; "float16" halves it; "int8", any
                            cache kind, about quarters it: int8 K/V with a float32 scale per token and head).
        block_size, num_blocks: the "paged" cache's block size and pool size.
        window:             the "sliding" cache's window.
        cached_tokens:      with a given cache, the ids it already holds per sequence (for the
                            repetition penalty; ``chat`` passes them).
        speculative:        speculative decoding: "prompt_lookup" or a draft model (a ``Transformer`` with
                            the same vocabulary) proposes ``num_speculative_tokens`` (default 4) tokens per
                            step, verified in one forward: the same tokens when greedy, the same
                            distribution when sampling (see ``minikv.speculative``). Default None: off.
        stream:             True returns a ``Stream`` (iterate it for tokens as they are made).

        Returns a ``GenerationOutput``: ``.tokens`` (per prompt, the new token ids), ``.text`` (decoded;
        a str for a str prompt), ``.stats`` (timings, cache bytes), ``.finish_reasons``. Raises
        ``SequenceTooLongError`` or ``CacheOverflowError`` before any work if the generation cannot fit,
        ``SamplingError`` for an impossible sampling option, and ``UnknownOptionError`` (a ``TypeError``)
        for a keyword it does not take, naming the nearest valid one (``temprature`` -> temperature).
        """
        given = _given(locals(), options)   # first: the import below adds a local
        from .generate import generate

        return generate(self, prompt, **given)

    def stream(self, prompt, max_new_tokens=DEFAULT, *, cache=DEFAULT, temperature=DEFAULT, top_k=DEFAULT,
               top_p=DEFAULT, min_p=DEFAULT, repetition_penalty=DEFAULT, seed=DEFAULT, rng=DEFAULT,
               stop_tokens=DEFAULT, prefill_chunk=DEFAULT, max_seq_len=DEFAULT, cache_dtype=DEFAULT,
               block_size=DEFAULT, num_blocks=DEFAULT, window=DEFAULT, cached_tokens=DEFAULT,
               speculative=DEFAULT, num_speculative_tokens=DEFAULT, **options):
        """Like ``generate``, with the same options and defaults, but lazily: a ``Stream`` to iterate.

        ::

            s = model.stream("Once upon", max_new_tokens=20)
            for event in s:
                print(event.text, end="", flush=True)
            print(s.output.stats)

        Each ``TokenEvent`` has ``.sequence`` (which prompt), ``.token`` (the id) and ``.text`` (its text;
        empty until a UTF-8 character is complete, so multi-byte characters print whole). After the
        loop, ``s.output`` holds the ``GenerationOutput``, as ``generate`` returns it. The errors are
        ``generate``'s, raised here, before any token is made. A Stream can be iterated once.
        """
        given = _given(locals(), options)   # first: the import below adds a local
        from .generate import stream

        return stream(self, prompt, **given)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, **template_kwargs) -> list[int]:
        """The token ids of a conversation rendered with the checkpoint's own chat template (as
        transformers' ``tokenizer.apply_chat_template``); see ``minikv.chat``."""
        from .chat import apply_chat_template

        return apply_chat_template(self.tokenizer, messages, add_generation_prompt=add_generation_prompt,
                                   **template_kwargs)

    def chat(self, messages, max_new_tokens: Optional[int] = None, **options):
        """The assistant's reply to a conversation: a ``GenerationOutput`` whose ``.text`` is the reply.

        ``model.chat([{"role": "user", "content": "Hi!"}], max_new_tokens=60).text``

        messages:          a list of ``{"role": "system" | "user" | "assistant", "content": str}`` dicts.
        max_new_tokens:    the reply's length limit (default: generation_config.json's, else 50).
        chat_template_kwargs: extra variables for the checkpoint's template (e.g. ``enable_thinking``).
        every other option: as ``generate`` (temperature, top_p, seed, cache, ...; a misspelt one names
                           the nearest), each defaulting to the checkpoint's generation_config.json.

        The conversation is rendered with the checkpoint's own chat template (a generation prompt
        added: the same ids as transformers' ``apply_chat_template``), then generated from. Raises
        ``ChatTemplateError`` when the model has no tokenizer or no template. For a conversation that
        keeps its KV cache from turn to turn, use ``minikv.chat.ChatSession`` (``minikv chat``).
        """
        from .chat import chat

        return chat(self, messages, max_new_tokens=max_new_tokens, **options)

    # ------------------------------------------------------------ conversions
    def with_rope_convention(self, convention: str) -> "Transformer":
        """The same model with its q/k weights permuted for another RoPE pair convention (same logits)."""
        from .rope import convert_rope_convention

        weights, config = convert_rope_convention(self.weights, self.config, convention)
        return Transformer(config, weights, dtype=self.dtype, backend=self.backend, attention=self.attention,
                           tokenizer=self.tokenizer, generation_config=self.generation_config,
                           quantize=self.quantize)

    def save(self, path, dtype: Optional[str] = None) -> Path:
        """Write a Hugging Face checkpoint folder: config.json + model.safetensors, and the tokenizer
        files (tokenizer.json, tokenizer_config.json, chat template) and generation_config.json when
        the model has them, so that ``minikv.load(path)`` chats and stops as this model does."""
        from .generation_config import GENERATION_CONFIG_FILE
        from .validate import writable_file

        # Every file this writes is checked before the first is written (a FIFO there would block).
        path = validate.path_argument(path, "path")
        extra = list(getattr(self.tokenizer, "files", {})) + ([GENERATION_CONFIG_FILE] if self.generation_config else [])
        for name in extra:
            writable_file(Path(path) / name, "checkpoint file", CheckpointError)
        folder = save_checkpoint(path, self.config, self.weights, dtype=dtype)
        try:
            if hasattr(self.tokenizer, "save"):
                self.tokenizer.save(folder)
            if self.generation_config is not None:
                self.generation_config.save(folder)
        except OSError as exc:
            raise CheckpointError(f"cannot write the tokenizer or generation config to {folder}: {exc}") from None
        return folder

    def __repr__(self) -> str:
        c = self.config
        quantized = f", {self.quantize} weights" if self.quantize else ""
        return (f"<minikv Transformer {c.model_type}: {c.n_layers} layers, d={c.hidden_size}, heads {c.n_heads}/"
                f"{c.n_kv_heads} kv, vocab {c.vocab_size}, {self.n_parameters / 1e6:.2f}M params, "
                f"{self.dtype.name}{quantized}, backend {self.backend.name!r}>")


BUNDLED_MODEL = Path(__file__).parent / "data" / "tiny-fortunes"


def load(path=None, *, dtype: str = "float32", backend: Optional[str] = None,
         attention: Optional[str] = None, quantize: Optional[str] = None) -> Transformer:
    """Load a model: a Hugging Face checkpoint (a folder or a Hub id), or with no path the bundled tiny model.

    path:      a folder with ``config.json`` and ``model.safetensors`` (or a sharded
               ``model.safetensors.index.json``), and optionally ``tokenizer.json`` (with a chat
               template) and ``generation_config.json`` (generate's default sampling options); or a Hub
               id such as ``"Qwen/Qwen3-0.6B"``, read from the local Hugging Face cache, else downloaded
               (extra ``hub``; see ``minikv.hub``). Default None: the bundled model, a 3.9M-parameter byte-level
               LLaMA trained on fortune cookies (``minikv/data/tiny-fortunes``; trained on 256-byte
               windows, so prompt + generated text should stay within 256 bytes).
    dtype:     "float32" (default) or "float64" (for exact comparisons); the weights are converted.
    backend:   "numpy" (default), "numba" (CPU kernels), "cuda" (a GPU: CuPy + Numba CUDA), or
               "cuda-sim" (the CUDA kernels on the CPU through Numba's simulator); see
               ``minikv.available_backends()``.
    attention: the prefill attention algorithm: "naive", "online" or "tiled" (default: the backend's
               choice, by length).
    quantize:  None (float weights), "int8" or "int4": every projection, the lm_head included, is
               quantized group-wise at load (see minikv/quant.py); the embedding table and norms stay float.

    Architectures: LLaMA (Llama 3 RoPE scaling included), Mistral, Qwen2, Qwen3, Gemma 3 (text) and
    GPT-2 give a ``Transformer`` (``forward``, ``generate``, ``stream``, ``chat``, ``new_cache``); T5 and
    BART (model_type "t5", "bart") give a ``minikv.seq2seq.EncoderDecoder``. Weights may be stored in
    float32, float16, bfloat16 or float64. Raises ``CheckpointError`` for a missing or
    unreadable file, ``ConfigError`` for a configuration minikv cannot run, and
    ``BackendUnavailableError`` (saying what to install) for a backend this machine lacks. Only
    safetensors are read, never pickle files.
    """
    from .generation_config import read_generation_config
    from .hub import resolve_checkpoint
    from .seq2seq_checkpoint import is_seq2seq_folder
    from .tokenizer import tokenizer_for

    dtype = model_dtype(dtype)          # before reading any weights
    if path is not None:
        validate.path_argument(path, "path")        # a str or PathLike, not bytes or a number
    folder = BUNDLED_MODEL if path is None else resolve_checkpoint(path)
    if is_seq2seq_folder(folder):
        from .seq2seq import load_seq2seq

        return load_seq2seq(folder, dtype=dtype, backend=backend)
    config, weights = load_checkpoint(folder, dtype=dtype)
    return Transformer(config, weights, dtype=dtype, backend=backend, attention=attention,
                       tokenizer=tokenizer_for(folder, config.vocab_size), source=folder,
                       generation_config=read_generation_config(folder), _take_weights=True, quantize=quantize)
