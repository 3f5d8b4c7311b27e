"""Encoder-decoder models (T5, BART) and the cross-attention cache.

An encoder-decoder reads a *source* once and writes a *target* token by token::

    states = encode(source)                         # (batch, src_len, d): bidirectional self-attention
    target = [decoder_start]
    repeat:
        x = embed[target]
        for each decoder layer:
            x = x + self_attention(x)               # causal, over the target so far   -> self cache
            x = x + cross_attention(x, states)      # over every source position       -> cross cache
            x = x + mlp(x)
        target.append(sample(x[-1] @ W_head))

Two caches, two lifetimes (``EncoderDecoderCache``):

* the **self-attention cache** grows by one position per step, exactly like a decoder-only model's
  (any minikv KVCache kind: concat, static, paged);
* the **cross-attention cache** holds, per decoder layer, K = states W_k and V = states W_v of the
  source. The source does not change while the target grows, so these are computed **once**, on
  the first decoder call, and only read afterwards. Without it every step would redo
  2 * layers * src_len * d * d multiply-adds, however short the target.

The two families differ only in their pieces:

=====================  ======================================  =====================================
                       T5 (v1.0 "relu", v1.1/Flan "gated-gelu")  BART
=====================  ======================================  =====================================
positions              relative buckets, a bias on the scores  learned table, offset 2, added to x
                       (layer 0's table, shared by all layers)
norm                   RMS ("T5LayerNorm"), *before* each      LayerNorm with bias, *after* each
                       sub-layer, + a final norm per stack     residual add, + layernorm_embedding
score scale            none (1, folded into the init)          1/sqrt(head_dim)
feed-forward           relu, or gelu_tanh(x Wg) * (x Wu)       exact (erf) GELU, biases
head                   tied: x * d^-0.5 @ embed^T; or untied   tied + final_logits_bias
=====================  ======================================  =====================================

Attention goes through the backend (``backend.attention`` with ``causal=False`` for the encoder and
cross-attention, its decode kernel for one query), with ``scale=`` passed through. T5's
self-attention adds a position bias to the scores, which no kernel takes, so it is written here as
plain math (``_biased_attention``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import layers, validate
from .attention import masked_softmax_times_v, visible_mask
from .backend import Backend, gather_pages, get_backend
from .cache import KVCache, KVView, make_cache
from .errors import ConfigError, InvalidInputError, SequenceTooLongError
from .generate import GenerationOutput, GenerationStats
from .sampling import SamplingParams, sample
from .seq2seq_checkpoint import Seq2SeqConfig, load_seq2seq_checkpoint

SEQ2SEQ_CACHE_KINDS = ("none", "concat", "static", "paged")
T5_DEFAULT_MAX_TARGET = 512      # T5 has no position table; a cache needs some capacity


# ------------------------------------------------------------------ pure functions


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucket of each relative position (key position - query position): int64, same shape.

    Half the buckets are exact distances 0, 1, .., max_exact-1; the other half cover max_exact ..
    max_distance logarithmically; everything farther shares the last bucket. Bidirectional (encoder):
    the first half of the buckets for keys at or before the query, the second half for keys after it.
    Unidirectional (decoder): keys after the query cannot be seen anyway and share bucket 0.

        large = max_exact + floor( log(distance / max_exact) / log(max_distance / max_exact)
                                   * (num_buckets - max_exact) )

    computed in float32 as the reference does: the floor of a float is sensitive to its last bit, and
    the buckets must be those the model was trained with."""
    relative_position = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(np.int64) * num_buckets
        distance = np.abs(relative_position)
    else:
        distance = -np.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    ratio = np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact)   # the small ones are not used
    scaled = np.log(ratio) / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return buckets + np.where(is_small, distance, large)


def gelu_erf(x):
    """The exact GELU (BART's "gelu"): 0.5 x (1 + erf(x / sqrt(2))).

    NumPy has no erf; ``math.erf`` (C's erf, accurate to an ulp in float64) applied elementwise is the
    plain reference. It is a Python call per element (~0.1 us): fine for the small models this module
    is tested and taught with; a backend would fuse it."""
    erf = np.frompyfunc(math.erf, 1, 1)
    return (0.5 * x * (1.0 + erf(x.astype(np.float64) * (1.0 / math.sqrt(2.0))).astype(x.dtype))).astype(x.dtype)


def relu(x):
    return np.maximum(x, x.dtype.type(0))


_ACTIVATIONS = {"relu": relu, "gelu_new": layers.gelu_tanh, "gelu": gelu_erf}


# ------------------------------------------------------------------ the caches


class CrossAttentionCache:
    """Per decoder layer, K and V of the encoder states: (batch, heads, src_len, head_dim) each.

    Filled once from the encoder states (``fill``), then only read. ``fills`` counts how many times
    it was filled (tests prove it is once per source); ``source`` remembers which states array it
    was filled from, so a call with another source is refused instead of silently reusing stale K/V.
    K/V are stored in ``dtype`` (the self-attention cache's: float16 halves both)."""

    def __init__(self, n_layers: int, dtype="float32"):
        self.n_layers = n_layers
        self.dtype = np.dtype(dtype)
        self.k: list = [None] * n_layers
        self.v: list = [None] * n_layers
        self.encoder_lengths: Optional[np.ndarray] = None
        self.source: Any = None
        self.fills = 0

    @property
    def filled(self) -> bool:
        return self.k[0] is not None

    def fill(self, k: list, v: list, encoder_lengths: np.ndarray, source) -> None:
        self.k, self.v = list(k), list(v)
        self.encoder_lengths, self.source = encoder_lengths, source
        self.fills += 1

    @property
    def nbytes(self) -> int:
        """2 * layers * batch * src_len * heads * head_dim * itemsize (0 before the first call)."""
        return int(sum(a.nbytes for a in self.k + self.v if a is not None))

    def reset(self) -> None:
        self.k, self.v = [None] * self.n_layers, [None] * self.n_layers
        self.encoder_lengths, self.source = None, None


class EncoderDecoderCache:
    """The decoder's two caches: ``self_attention`` (a KVCache of any kind, grows per step) and
    ``cross_attention`` (the encoder side, computed once per source).

    ``cache_cross=False`` keeps the self-attention cache but recomputes the encoder-side K/V at every
    call (what the benchmark measures the cross cache against)."""

    def __init__(self, self_attention: KVCache, n_layers: int, cache_cross: bool = True):
        self.self_attention = self_attention
        self.cross_attention = CrossAttentionCache(n_layers, self_attention.dtype)
        self.cache_cross = bool(cache_cross)

    @property
    def kind(self) -> str:
        return self.self_attention.kind

    @property
    def lengths(self) -> np.ndarray:
        return self.self_attention.lengths

    @property
    def batch_size(self) -> int:
        return self.self_attention.batch_size

    @property
    def capacity(self) -> int:
        return self.self_attention.capacity

    @property
    def nbytes(self) -> int:
        return self.self_attention.nbytes + self.cross_attention.nbytes

    def truncate(self, lengths) -> None:
        """Rewind the target (the source, and so the cross cache, stays)."""
        self.self_attention.truncate(lengths)

    def reset(self) -> None:
        """Forget the target and the source."""
        self.self_attention.reset()
        self.cross_attention.reset()

    def __repr__(self) -> str:
        return (f"<encoder-decoder cache: self {self.self_attention!r}; cross "
                f"{'filled' if self.cross_attention.filled else 'empty'}, {self.cross_attention.nbytes} bytes>")


# ------------------------------------------------------------------ the model


@dataclass
class _Block:
    """One layer's weights, (in, out) layout, q/k/v fused where they read the same input."""

    attn_norm: tuple            # (weight, bias or None)
    qkv: Any                    # (d, 3 inner)
    qkv_bias: Any
    o: Any                      # (inner, d)
    o_bias: Any
    mlp_norm: tuple
    mlp_in: Any                 # (d, ffn) or gated (d, 2 ffn) = gate | up
    mlp_in_bias: Any
    mlp_down: Any               # (ffn, d)
    mlp_down_bias: Any
    cross_norm: tuple = (None, None)
    cross_q: Any = None         # (d, inner): from the decoder's hidden state
    cross_q_bias: Any = None
    cross_kv: Any = None        # (d, 2 inner): from the encoder states (the cross cache)
    cross_kv_bias: Any = None
    cross_o: Any = None
    cross_o_bias: Any = None


class EncoderDecoder:
    """A T5 or BART model: ``encode``, ``forward`` (the decoder), ``new_cache``, ``generate``."""

    def __init__(self, config: Seq2SeqConfig, weights: dict[str, np.ndarray], *, dtype="float32",
                 backend: Optional[str | Backend] = None, tokenizer=None, source: Optional[Path] = None):
        from .model import model_dtype

        self.config = config
        self.dtype = model_dtype(dtype)
        self.backend = get_backend(backend)
        if self.backend.name != "numpy":
            raise ConfigError(f"encoder-decoder models run on the numpy backend (asked for {self.backend.name!r}); "
                              "pass backend='numpy'")
        self.tokenizer = tokenizer
        self.source = source
        self.weights = {name: np.ascontiguousarray(w, dtype=self.dtype) for name, w in weights.items()}
        # How many times the encoder-side K/V were projected (one count per decoder layer): the cross
        # cache makes it layers once per source; without it, layers per decoder call.
        self.cross_kv_computations = 0
        self._prepare()

    def _prepare(self) -> None:
        c, w = self.config, self.weights
        self.pre_norm = c.is_t5
        self.scale = self.dtype.type(1.0) if c.is_t5 else None   # None: the kernels' 1/sqrt(head_dim)
        self.activation = _ACTIVATIONS[c.activation]

        def t(name):        # (out, in) -> (in, out)
            return np.ascontiguousarray(w[name].T)

        def fused(names):
            return np.ascontiguousarray(np.concatenate([w[n] for n in names], axis=0).T)

        def bias(names):
            return np.concatenate([w[n] for n in names]) if names[0] in w else None

        def norm(name):
            return (w[name + ".weight"], w.get(name + ".bias"))

        def block(p, cross):
            mlp_in = [p + "mlp.gate.weight", p + "mlp.up.weight"] if c.gated else [p + "mlp.up.weight"]
            qkv = [p + f"attn.{x}.weight" for x in "qkv"]
            b = _Block(attn_norm=norm(p + "attn_norm"), qkv=fused(qkv), qkv_bias=bias([n[:-6] + "bias" for n in qkv]),
                       o=t(p + "attn.o.weight"), o_bias=w.get(p + "attn.o.bias"),
                       mlp_norm=norm(p + "mlp_norm"), mlp_in=fused(mlp_in),
                       mlp_in_bias=bias([n[:-6] + "bias" for n in mlp_in]),
                       mlp_down=t(p + "mlp.down.weight"), mlp_down_bias=w.get(p + "mlp.down.bias"))
            if cross:
                kv = [p + "cross.k.weight", p + "cross.v.weight"]
                b.cross_norm = norm(p + "cross_norm")
                b.cross_q, b.cross_q_bias = t(p + "cross.q.weight"), w.get(p + "cross.q.bias")
                b.cross_kv, b.cross_kv_bias = fused(kv), bias([n[:-6] + "bias" for n in kv])
                b.cross_o, b.cross_o_bias = t(p + "cross.o.weight"), w.get(p + "cross.o.bias")
            return b

        self.encoder_layers = [block(f"encoder.layers.{i}.", False) for i in range(c.encoder_layers)]
        self.decoder_layers = [block(f"decoder.layers.{i}.", True) for i in range(c.decoder_layers)]
        self.embed = w["embed.weight"]
        self.lm_head = t("embed.weight" if c.tie_word_embeddings else "lm_head.weight")   # (d, vocab)
        self.final_logits_bias = w.get("final_logits_bias")
        if c.is_t5:
            self.rel_bias = {s: w[f"{s}.rel_bias.weight"] for s in ("encoder", "decoder")}   # (buckets, heads)
            self.final_norm = {s: norm(f"{s}.final_norm") for s in ("encoder", "decoder")}
        else:
            self.pos_embed = {s: w[f"{s}.pos_embed.weight"] for s in ("encoder", "decoder")}
            self.embed_norm = {s: norm(f"{s}.embed_norm") for s in ("encoder", "decoder")}
            self.embed_scale = self.dtype.type(math.sqrt(c.d_model) if c.scale_embedding else 1.0)

    @property
    def n_parameters(self) -> int:
        return int(sum(w.size for w in self.weights.values()))

    # ------------------------------------------------------------ pieces
    def _norm(self, x, norm):
        weight, bias = norm
        if self.pre_norm:
            return layers.rms_norm(x, weight, self.config.norm_eps)           # T5: no mean, no bias
        return layers.layer_norm(x, weight, bias, self.config.norm_eps)

    def _residual(self, x, norm, sublayer):
        """T5 (pre-norm): x + f(norm(x)).  BART (post-norm): norm(x + f(x))."""
        if self.pre_norm:
            return x + sublayer(self._norm(x, norm))
        return self._norm(x + sublayer(x), norm)

    def _mlp(self, h, block: _Block):
        hidden = layers.linear(h, block.mlp_in, block.mlp_in_bias)
        if self.config.gated:
            ffn = hidden.shape[-1] // 2
            act = self.activation(hidden[..., :ffn]) * hidden[..., ffn:]     # act(x W_gate) * (x W_up)
        else:
            act = self.activation(hidden)
        return layers.linear(act, block.mlp_down, block.mlp_down_bias)

    def _heads(self, x, n_heads):
        """(batch, seq, n_heads * hd) -> (batch, n_heads, seq, hd)."""
        batch, seq, _ = x.shape
        return x.reshape(batch, seq, n_heads, self.config.head_dim).transpose(0, 2, 1, 3)

    def _merge(self, out):
        """(batch, heads, seq, hd) -> (batch, seq, heads * hd)."""
        batch, heads, seq, hd = out.shape
        return out.transpose(0, 2, 1, 3).reshape(batch, seq, heads * hd)

    def _position_bias(self, stack: str, query_pos, n_keys: int):
        """T5's relative position bias for queries at ``query_pos`` (batch, n_q) over keys 0..n_keys-1:
        (batch, heads, n_q, n_keys), from the one table of layer 0."""
        c = self.config
        relative = np.arange(n_keys)[None, None, :] - query_pos[:, :, None]        # (batch, n_q, n_k): key - query
        buckets = relative_position_bucket(relative, stack == "encoder", c.num_buckets, c.max_distance)
        return self.rel_bias[stack][buckets].transpose(0, 3, 1, 2)                  # (b, n_q, n_k, H) -> (b, H, n_q, n_k)

    def _decoder_bias(self, positions):
        """T5's decoder bias for queries at ``positions`` (batch, seq), as a function of the key width the
        view has (a paged view is wider than the keys held): computed once per width, shared by every layer."""
        tables: dict[int, Any] = {}

        def bias(n_keys: int):
            if n_keys not in tables:
                tables[n_keys] = self._position_bias("decoder", positions, n_keys)
            return tables[n_keys]
        return bias

    def _biased_attention(self, q, k, v, bias, causal, q_offset, lengths):
        """softmax(scale * q k^T + bias, masked) v: T5's self-attention, in plain math.

        q (b, H, n_q, hd); k, v (b, H, n_k, hd); bias (b or 1, H, n_q, n_k). Returns (b, H, n_q, hd)."""
        k, v = k.astype(q.dtype, copy=False), v.astype(q.dtype, copy=False)
        scores = np.matmul(q, k.swapaxes(-1, -2)) * self.scale + bias                  # (b, H, n_q, n_k)
        visible = visible_mask(q.shape[2], k.shape[2], q_offset, lengths, causal=causal)  # (b, 1, 1, n_q, n_k)
        # (b, H, n_q, n_k) -> (b, H, 1, n_q, n_k): the reference softmax's (batch, kv, group, ...) layout
        out, _ = masked_softmax_times_v(scores[:, :, None], visible, v)
        return out[:, :, 0]

    def _attend(self, q, view: KVView, causal: bool, bias=None):
        """Attention of q over every K/V of ``view``; ``bias`` (T5 self-attention) or a backend kernel."""
        backend = self.backend
        if bias is not None:
            k, v = view.k, view.v
            if view.block_table is not None:
                k, v = gather_pages(k, view.block_table), gather_pages(v, view.block_table)
            return self._biased_attention(q, k, v, bias(k.shape[2]), causal, view.q_offset, view.lengths)
        if q.shape[2] == 1:
            # One query per sequence that sees keys 0..lengths[b]-1: a causal self-attention decode step,
            # and equally a cross-attention step (every source position, none past the source's end).
            if view.block_table is not None:
                out, _ = backend.paged_decode_attention(q, view.k, view.v, view.block_table, view.lengths,
                                                        scale=self.scale)
            else:
                out, _ = backend.decode_attention(q, view.k, view.v, view.lengths, scale=self.scale)
        elif view.block_table is not None:
            out, _ = backend.paged_attention(q, view.k, view.v, view.block_table, q_offset=view.q_offset,
                                             lengths=view.lengths, scale=self.scale)
        else:
            out, _ = backend.attention(q, view.k, view.v, causal=causal, q_offset=view.q_offset,
                                       lengths=view.lengths, scale=self.scale)
        return out

    def _embed(self, stack: str, ids, positions):
        x = self.embed[ids]                                                            # (b, seq, d)
        if not self.config.is_t5:
            # BART: scaled token embedding + learned position (the table starts at offset 2), then a LayerNorm.
            x = x * self.embed_scale + self.pos_embed[stack][positions + 2]
            x = self._norm(x, self.embed_norm[stack])
        return x

    # ------------------------------------------------------------ encoder
    def encode(self, input_ids, lengths=None) -> np.ndarray:
        """The encoder's output for a batch of sources: (batch, src_len, d_model), host NumPy.

        input_ids (batch, src_len) right-padded; lengths (batch,) real tokens per row (default: all).
        Padding keys are masked, so row b equals that source encoded alone (its padded rows are
        garbage, and masked in cross-attention by the same lengths)."""
        ids, lengths = self._check_source(input_ids, lengths)
        return self._encode(ids, lengths)

    def _encode(self, ids, lengths):
        batch, src = ids.shape
        positions = np.broadcast_to(np.arange(src), (batch, src))
        x = self._embed("encoder", ids, positions)                                    # (b, src, d)
        no_offset = np.zeros(batch, dtype=np.int64)
        bias = None
        if self.config.is_t5:
            table = self._position_bias("encoder", positions[:1], src)                # (1, H, src, src)

            def bias(n_keys):             # every layer, every row: the same positions 0..src-1
                return table
        heads = self.config.encoder_heads
        for block in self.encoder_layers:
            def self_attention(h, block=block):
                q, k, v = np.split(layers.linear(h, block.qkv, block.qkv_bias), 3, axis=-1)
                view = KVView(self._heads(k, heads), self._heads(v, heads), no_offset, lengths)
                out = self._attend(self._heads(q, heads), view, causal=False, bias=bias)
                return layers.linear(self._merge(out), block.o, block.o_bias)
            x = self._residual(x, block.attn_norm, self_attention)
            x = self._residual(x, block.mlp_norm, lambda h, block=block: self._mlp(h, block))
        if self.config.is_t5:
            x = self._norm(x, self.final_norm["encoder"])
        return x

    # ------------------------------------------------------------ decoder
    def cross_kv(self, encoder_states) -> tuple[list, list]:
        """Every decoder layer's cross-attention K and V of the encoder states:
        lists of (batch, heads, src_len, hd). What the cross cache holds."""
        heads, ks, vs = self.config.decoder_heads, [], []
        for block in self.decoder_layers:
            k, v = np.split(layers.linear(encoder_states, block.cross_kv, block.cross_kv_bias), 2, axis=-1)
            ks.append(self._heads(k, heads))
            vs.append(self._heads(v, heads))
            self.cross_kv_computations += 1
        return ks, vs

    def forward(self, decoder_ids, encoder_states=None, cache: Optional[EncoderDecoderCache] = None,
                encoder_lengths=None, *, n_new=None, last_only: bool = False) -> np.ndarray:
        """Decoder logits for ``decoder_ids`` (batch, seq): (batch, seq, vocab) (or (batch, vocab) last_only).

        encoder_states:  (batch, src_len, d_model) from ``encode``. With a cache whose cross part is
                         filled it may be omitted (or be the same array); anything else is refused.
        cache:           an EncoderDecoderCache: this call's self-attention K/V are written into it and
                         its cross part is filled on the first call; None recomputes everything.
        encoder_lengths: (batch,) real source tokens per row (default: all src_len).
        n_new:           (batch,) real leading tokens per row of decoder_ids (default: all).

        Every argument is checked here, before anything is written; after an exception the cache
        is exactly as it was."""
        ids = self._check_ids(decoder_ids, "decoder_ids")
        batch, seq = ids.shape
        n_new = self._check_lengths(n_new, batch, seq, "n_new")          # None: every column is real
        self_cache = None
        if cache is not None:
            if not isinstance(cache, EncoderDecoderCache):
                raise InvalidInputError(f"cache must be an EncoderDecoderCache from model.new_cache(...); got "
                                        f"{type(cache).__name__}")
            if cache.batch_size != batch:
                raise InvalidInputError(f"cache holds batch_size={cache.batch_size} sequences but decoder_ids has "
                                        f"{batch} rows; pass batch_size={batch} to new_cache")
            self_cache = cache.self_attention
        cross = cache.cross_attention if cache is not None and cache.cache_cross else None
        if cross is not None and cross.filled:
            if encoder_states is not None and encoder_states is not cross.source:
                raise InvalidInputError("this cache already holds the cross-attention K/V of another source; "
                                        "call cache.reset() (or model.new_cache) before decoding a new source")
            if encoder_lengths is not None and not np.array_equal(np.asarray(encoder_lengths), cross.encoder_lengths):
                raise InvalidInputError(f"encoder_lengths={np.asarray(encoder_lengths).tolist()} differ from those "
                                        f"the cache was filled with {cross.encoder_lengths.tolist()}")
            cross_k, cross_v, enc_lengths, states = cross.k, cross.v, cross.encoder_lengths, None
        else:
            states, enc_lengths = self._check_states(encoder_states, encoder_lengths, batch)
            cross_k = cross_v = None
        q_offset = np.zeros(batch, dtype=np.int64) if self_cache is None else self_cache.lengths
        positions = q_offset[:, None] + np.arange(seq)[None, :]                       # (batch, seq)
        limit = self.config.max_target_positions
        highest = int((q_offset + n_new - 1).max())
        if limit is not None and highest >= limit:
            raise SequenceTooLongError(f"decoder position {highest} is beyond the model's maximum of {limit} "
                                       "(max_position_embeddings); generate fewer tokens")
        if limit is not None:
            positions = np.minimum(positions, limit - 1)      # padding columns only
        if self_cache is not None:
            self_cache.reserve(n_new)
        try:
            if cross_k is None:
                cross_k, cross_v = self.cross_kv(states)      # the encoder side, projected now
                if cross is not None:
                    # Stored as the cache keeps them, and used so already on this first call: every step
                    # attends to the very same K/V.
                    cross_k = [k.astype(cross.dtype, copy=False) for k in cross_k]
                    cross_v = [v.astype(cross.dtype, copy=False) for v in cross_v]
            logits = self._decode(ids, positions, n_new, self_cache, cross_k, cross_v, enc_lengths, last_only)
        except BaseException:
            if self_cache is not None:
                self_cache.rollback()
            raise
        if self_cache is not None:
            self_cache.advance(n_new)
        if cross is not None and not cross.filled:
            cross.fill(cross_k, cross_v, enc_lengths, encoder_states)   # once per source, read from now on
        return logits

    __call__ = forward

    def _decode(self, ids, positions, n_new, self_cache, cross_k, cross_v, enc_lengths, last_only):
        """The decoder stack on checked inputs (the hot path: no checks in here)."""
        c = self.config
        batch, seq = ids.shape
        heads = c.decoder_heads
        x = self._embed("decoder", ids, positions)                                    # (b, seq, d)
        no_offset = np.zeros(batch, dtype=np.int64)
        bias = self._decoder_bias(positions) if c.is_t5 else None
        for index, block in enumerate(self.decoder_layers):
            def self_attention(h, block=block, index=index):
                q, k, v = np.split(layers.linear(h, block.qkv, block.qkv_bias), 3, axis=-1)
                k, v = self._heads(k, heads), self._heads(v, heads)
                if self_cache is None:
                    view = KVView(k, v, no_offset, n_new)            # this call's tokens only
                else:
                    view = self_cache.update(index, k, v)           # write this step's K/V, see all held
                out = self._attend(self._heads(q, heads), view, causal=True, bias=bias)
                return layers.linear(self._merge(out), block.o, block.o_bias)

            def cross_attention(h, block=block, index=index):
                q = self._heads(layers.linear(h, block.cross_q, block.cross_q_bias), heads)
                view = KVView(cross_k[index], cross_v[index], no_offset, enc_lengths)   # read, never written
                out = self._attend(q, view, causal=False)
                return layers.linear(self._merge(out), block.cross_o, block.cross_o_bias)

            x = self._residual(x, block.attn_norm, self_attention)
            x = self._residual(x, block.cross_norm, cross_attention)
            x = self._residual(x, block.mlp_norm, lambda h, block=block: self._mlp(h, block))
        if c.is_t5:
            x = self._norm(x, self.final_norm["decoder"])
        if last_only:
            x = x[np.arange(batch), n_new - 1]                                         # (b, d)
        if c.scale_decoder_outputs:
            x = x * self.dtype.type(c.d_model ** -0.5)       # T5's tied head: rescale before embed^T
        logits = x @ self.lm_head                                                      # (..., vocab)
        if self.final_logits_bias is not None:
            logits = logits + self.final_logits_bias
        return logits

    # ------------------------------------------------------------ checks (the door)
    def _check_ids(self, token_ids, what: str) -> np.ndarray:
        try:
            ids = np.asarray(token_ids)
        except ValueError:
            raise InvalidInputError(f"{what} rows have different lengths; right-pad them into one (batch, seq) array "
                                    "and pass the real lengths") from None
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.size == 0:
            raise InvalidInputError(f"{what} has shape {ids.shape}; expected a non-empty (batch, seq) array")
        if ids.dtype.kind not in "iu":
            raise InvalidInputError(f"{what} has dtype {ids.dtype}; expected integers (e.g. np.int64)")
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bad.any():
            raise InvalidInputError(f"token id {int(ids[bad][0])} in {what} is out of range for a vocabulary of "
                                    f"{self.config.vocab_size} (valid ids are 0..{self.config.vocab_size - 1})")
        return ids.astype(np.int64, copy=False)

    @staticmethod
    def _check_lengths(lengths, batch: int, width: int, what: str) -> np.ndarray:
        if lengths is None:
            return np.full(batch, width, dtype=np.int64)
        return validate.per_sequence(lengths, what, batch, 1, width, "lengths")

    def _check_source(self, input_ids, lengths):
        ids = self._check_ids(input_ids, "input_ids")
        batch, src = ids.shape
        lengths = self._check_lengths(lengths, batch, src, "lengths")
        limit = self.config.max_target_positions
        if limit is not None and int(lengths.max()) > limit:
            raise SequenceTooLongError(f"a source of {int(lengths.max())} tokens is longer than the model's "
                                       f"{limit} positions (max_position_embeddings); shorten it")
        if limit is not None and src > limit:
            ids = ids[:, :limit]             # only padding lies past the limit
        return ids, lengths

    def _check_states(self, states, lengths, batch: int):
        if states is None:
            raise InvalidInputError("encoder_states is required (states = model.encode(source_ids)) unless the "
                                    "cache already holds the cross-attention K/V of this source")
        states = np.asarray(states)
        if states.ndim != 3 or states.shape[0] != batch or states.shape[2] != self.config.d_model or not states.shape[1]:
            raise InvalidInputError(f"encoder_states has shape {states.shape}; expected (batch={batch}, src_len >= 1, "
                                    f"d_model={self.config.d_model}) from model.encode")
        if states.dtype.kind != "f":
            raise InvalidInputError(f"encoder_states has dtype {states.dtype}; expected floating point")
        lengths = self._check_lengths(lengths, batch, states.shape[1], "encoder_lengths")
        return states.astype(self.dtype, copy=False), lengths

    # ------------------------------------------------------------ caches and generation
    def new_cache(self, kind: str = "static", batch_size: int = 1, max_seq_len: Optional[int] = None,
                  dtype: Optional[str] = None, cache_cross: bool = True, **options) -> Optional[EncoderDecoderCache]:
        """An EncoderDecoderCache: a self-attention cache of ``kind`` ("concat", "static", "paged"; "none"
        gives None) holding ``max_seq_len`` target positions, plus the cross-attention cache."""
        if kind not in SEQ2SEQ_CACHE_KINDS:
            raise ConfigError(f"cache kind {kind!r} is not available for encoder-decoder models; choose one of "
                              f"{SEQ2SEQ_CACHE_KINDS}")
        if kind == "none":
            return None
        c = self.config
        if max_seq_len is None:
            max_seq_len = c.max_target_positions or T5_DEFAULT_MAX_TARGET
        self_cache = make_cache(kind, n_layers=c.decoder_layers, n_kv_heads=c.decoder_heads, head_dim=c.head_dim,
                                batch_size=batch_size, max_seq_len=max_seq_len, dtype=dtype or self.dtype.name,
                                backend=self.backend, **options)
        if self_cache.quantized:
            # An int8 cache hands attention q and per-row scales (KVView.k_scales); this model's attention
            # and its cross-attention cache read floats only.
            raise ConfigError("cache dtype='int8' is for decoder-only models (minikv.Transformer); an "
                              "encoder-decoder model's cache takes float16, float32 or float64")
        return EncoderDecoderCache(self_cache, c.decoder_layers, cache_cross=cache_cross)

    def _sources(self, source) -> tuple[list[list[int]], bool]:
        if isinstance(source, str):
            return [self._encode_text(source)], True
        if isinstance(source, np.ndarray):
            source = source.tolist()
        if not isinstance(source, (list, tuple)) or len(source) == 0:
            raise InvalidInputError(f"source must be a str, a list of str, or token ids; got {source!r:.80}")
        if all(isinstance(s, str) for s in source):
            return [self._encode_text(s) for s in source], False
        if all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in source):
            return [[int(t) for t in source]], False
        if all(isinstance(s, (list, tuple, np.ndarray)) for s in source):
            return [[int(t) for t in s] for s in source], False
        raise InvalidInputError("source must be a str, a list of str, a list of token ids, or a list of such lists")

    def _encode_text(self, text: str) -> list[int]:
        from .tokenizer import require_tokenizer

        # With the tokenizer's special tokens (T5 appends </s>, BART wraps in <s> .. </s>), as transformers'
        # tokenizer(text) gives: the encoder was trained on sources that end so.
        return require_tokenizer(self.tokenizer, "a text source").encode(text, add_special_tokens=True)

    def _forced(self, logits, step: int, max_new_tokens: int):
        """transformers' forced tokens: forced_bos_token_id as the first generated token, forced_eos_token_id
        as the last one a length limit allows (every other logit -inf)."""
        c = self.config
        forced = None
        if step == max_new_tokens - 1 and c.forced_eos_token_id is not None:
            forced = c.forced_eos_token_id
        if step == 0 and c.forced_bos_token_id is not None:
            forced = c.forced_bos_token_id
        if forced is None:
            return logits
        out = np.full_like(logits, -np.inf)
        out[:, forced] = 0
        return out

    def generate(self, source, max_new_tokens: int = 50, *, cache="static", temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
                 repetition_penalty: float = 1.0, seed: Optional[int] = 0, rng: Optional[np.random.Generator] = None,
                 stop_tokens=None, cache_dtype: Optional[str] = None, cache_cross: bool = True,
                 **cache_options) -> GenerationOutput:
        """Encode ``source`` once, then decode from decoder_start_token_id.

        source: a str (needs a tokenizer), a list of str, token ids, or a list of token-id lists (a ragged
        batch: each row is encoded and decoded exactly as alone). cache: "none" (recompute the target
        every step), "concat", "static", "paged", or a fresh EncoderDecoderCache; cache_cross=False
        recomputes the encoder-side K/V every step. Sampling options as ``minikv.generate``. Outputs exclude
        the decoder start token and stop at a stop token (default: the config's eos), which is excluded."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
        c = self.config
        sources, single = self._sources(source)
        for i, row in enumerate(sources):
            if not row:
                raise InvalidInputError(f"source {i} is empty; give at least one token")
        batch = len(sources)
        lengths = np.array([len(r) for r in sources], dtype=np.int64)
        pad = c.pad_token_id if c.pad_token_id is not None else 0
        ids = np.full((batch, int(lengths.max())), pad, dtype=np.int64)
        for b, row in enumerate(sources):
            ids[b, :len(row)] = row
        ids, lengths = self._check_source(ids, lengths)
        limit = c.max_target_positions
        if limit is not None and max_new_tokens > limit:
            raise SequenceTooLongError(f"max_new_tokens={max_new_tokens} needs {max_new_tokens} decoder positions but "
                                       f"the model has {limit}; pass max_new_tokens<={limit}")
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty)
        # The same checks as minikv.generate (minikv/validate.py), before any cache is made or written.
        rng = validate.rng(rng) if rng is not None else np.random.default_rng(validate.seed(seed))
        stops = np.asarray(list(c.eos_token_ids) if stop_tokens is None else
                           validate.token_ids(stop_tokens, "stop_tokens", c.vocab_size), dtype=np.int64)
        if isinstance(cache, EncoderDecoderCache):
            if cache.batch_size != batch or cache.lengths.any() or cache.cross_attention.filled:
                raise InvalidInputError(f"a cache passed to generate must be fresh and hold batch_size={batch}; "
                                        "call cache.reset() or model.new_cache(...)")
            if cache.capacity < max_new_tokens:
                raise InvalidInputError(f"the cache holds {cache.capacity} target positions; max_new_tokens="
                                        f"{max_new_tokens} needs {max_new_tokens}")
        elif cache is None or isinstance(cache, str):
            cache = self.new_cache(cache or "none", batch, max_new_tokens, dtype=cache_dtype, cache_cross=cache_cross,
                                   **cache_options)
        else:
            raise InvalidInputError(f"cache={cache!r}: pass a kind name {SEQ2SEQ_CACHE_KINDS} or an EncoderDecoderCache")

        stats = GenerationStats(batch_size=batch, cache_kind="none" if cache is None else cache.kind)
        t0 = time.perf_counter()
        states = self._encode(ids, lengths)
        stats.prefill_ms, stats.prefill_tokens = (time.perf_counter() - t0) * 1e3, int(lengths.sum())

        t0 = time.perf_counter()
        target = np.full((batch, 1), c.decoder_start_token_id, dtype=np.int64)       # (batch, 1 + generated)
        generated: list[list[int]] = [[] for _ in range(batch)]
        reasons = ["length"] * batch
        finished = np.zeros(batch, dtype=bool)
        for step in range(max_new_tokens):
            if cache is None:
                logits = self.forward(target, encoder_states=states, encoder_lengths=lengths, last_only=True)
            else:
                logits = self.forward(target[:, -1:], encoder_states=states, cache=cache, encoder_lengths=lengths,
                                      last_only=True)
            logits = self._forced(logits, step, max_new_tokens)
            previous = list(target) if params.repetition_penalty != 1.0 else None
            tokens = sample(logits, params, rng, previous)
            for b in np.nonzero(~finished)[0]:
                if tokens[b] in stops:
                    finished[b], reasons[b] = True, "stop"
                else:
                    generated[b].append(int(tokens[b]))
            target = np.concatenate([target, tokens[:, None]], axis=1)
            stats.decode_tokens += int((~finished).sum())
            if finished.all():
                break
        stats.decode_ms = (time.perf_counter() - t0) * 1e3
        stats.tokens_generated = sum(len(g) for g in generated)
        stats.cache_bytes = 0 if cache is None else cache.nbytes
        text = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(g) for g in generated]
            text = texts[0] if single else texts
        return GenerationOutput(tokens=generated, text=text, stats=stats, finish_reasons=reasons)

    def __repr__(self) -> str:
        c = self.config
        return (f"<minikv EncoderDecoder {c.model_type}: {c.encoder_layers}+{c.decoder_layers} layers, d={c.d_model}, "
                f"heads {c.encoder_heads}, vocab {c.vocab_size}, {self.n_parameters / 1e6:.2f}M params, "
                f"{self.dtype.name}>")


def load_seq2seq(path, *, dtype: str = "float32", backend: Optional[str] = None) -> EncoderDecoder:
    """Load a T5 / BART checkpoint folder (what ``minikv.load`` does for model_type t5 / bart)."""
    from .model import model_dtype
    from .tokenizer import tokenizer_for

    folder = Path(path)
    dtype = model_dtype(dtype)
    config, weights = load_seq2seq_checkpoint(folder, dtype=dtype)
    return EncoderDecoder(config, weights, dtype=dtype, backend=backend,
                          tokenizer=tokenizer_for(folder, config.vocab_size), source=folder)
