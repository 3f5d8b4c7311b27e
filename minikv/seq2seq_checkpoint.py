"""Encoder-decoder checkpoints (T5, BART): their config and their one name/layout table.

The decoder-only loader (checkpoint.py, config.py) reads the llama and gpt2 families; this module
reads Hugging Face's ``T5ForConditionalGeneration`` (model_type "t5") and
``BartForConditionalGeneration`` (model_type "bart") into ``Seq2SeqConfig`` + weights with
minikv's canonical names, the same rules as there: safetensors only (never pickle), one table from
HF names to ours, every shape checked against the config, float32 / float16 / bfloat16 on disk,
and every problem a ``ConfigError`` or ``CheckpointError`` naming the file, tensor or field.

Canonical names (projections in PyTorch's (out_features, in_features) layout)::

    embed.weight                       (vocab, d)          shared by encoder, decoder (and the tied head)
    lm_head.weight                     (vocab, d)          only when untied
    final_logits_bias                  (vocab,)            BART (zeros when the checkpoint has none)
    {stack}.rel_bias.weight            (buckets, heads)    T5: layer 0's table, used by every layer
    {stack}.final_norm.weight          (d,)                T5
    {stack}.pos_embed.weight           (max_pos + 2, d)    BART: learned positions, offset 2
    {stack}.embed_norm.weight / .bias  (d,)                BART: layernorm_embedding
    {stack}.layers.{i}.attn_norm / attn.{q,k,v,o}          self-attention (+ .bias for BART)
    decoder.layers.{i}.cross_norm / cross.{q,k,v,o}        cross-attention
    {stack}.layers.{i}.mlp_norm / mlp.{gate,up,down}       feed-forward (gate: T5 gated-gelu only)

with {stack} in (encoder, decoder). T5's norms sit *before* each sub-layer (pre-norm), BART's
*after* the residual add (post-norm): the names say which norm belongs to which sub-layer, the
model says where it is applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import CheckpointError, ConfigError, MinikvError
from .validate import MAX_SIZE, read_json

SEQ2SEQ_MODEL_TYPES = ("t5", "bart")
# The activation names checkpoints use, and what minikv computes for them: "gelu" is the exact erf
# GELU, "gelu_new" the tanh approximation. transformers reads T5's "gated-gelu" as gelu_new.
_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new"}
_T5_GATED = {"gated-gelu": "gelu_new", "gated-relu": "relu", "gated-gelu_new": "gelu_new"}


@dataclass(frozen=True)
class Seq2SeqConfig:
    """An encoder-decoder model's shape and conventions, from a Hugging Face config.json."""

    model_type: str                      # "t5" or "bart"
    vocab_size: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    head_dim: int                        # T5: d_kv; BART: d_model / heads
    encoder_ffn: int
    decoder_ffn: int
    activation: str                      # "relu", "gelu_new" (tanh) or "gelu" (exact erf)
    gated: bool                          # T5 v1.1 / Flan: act(x W_gate) * (x W_up)
    norm_eps: float
    tie_word_embeddings: bool            # lm_head = embed
    scale_decoder_outputs: bool          # T5 tied head: decoder output * d_model^-0.5 before the head
    # T5 relative positions
    num_buckets: int = 0
    max_distance: int = 0
    # BART learned positions
    max_position_embeddings: int = 0
    scale_embedding: bool = False        # BART: embeddings * sqrt(d_model)
    # special tokens (generation)
    pad_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: Optional[int] = None
    decoder_start_token_id: int = 0
    forced_bos_token_id: Optional[int] = None
    forced_eos_token_id: Optional[int] = None

    @property
    def family(self) -> str:
        return self.model_type

    @property
    def is_t5(self) -> bool:
        return self.model_type == "t5"

    @property
    def max_target_positions(self) -> Optional[int]:
        """The longest decoder sequence the model has positions for (None: T5's relative positions
        have no limit)."""
        return self.max_position_embeddings if not self.is_t5 else None

    # ------------------------------------------------------------ from Hugging Face
    @classmethod
    def from_hf(cls, hf: dict[str, Any], generation: Optional[dict[str, Any]] = None) -> "Seq2SeqConfig":
        model_type = hf.get("model_type")
        if model_type not in SEQ2SEQ_MODEL_TYPES:
            raise ConfigError(f"model_type={model_type!r} is not an encoder-decoder minikv reads; "
                              f"choose one of {SEQ2SEQ_MODEL_TYPES}")
        # Generation settings live in generation_config.json in newer exports, config.json in older ones.
        gen = dict(hf)
        gen.update({k: v for k, v in (generation or {}).items() if v is not None})
        specials = dict(pad_token_id=_single_id(gen, "pad_token_id"), eos_token_ids=_all_ids(gen, "eos_token_id"),
                        bos_token_id=_single_id(gen, "bos_token_id"),
                        forced_bos_token_id=_single_id(gen, "forced_bos_token_id"),
                        forced_eos_token_id=_single_id(gen, "forced_eos_token_id"))
        start = _single_id(gen, "decoder_start_token_id")
        if model_type == "t5":
            config = cls._from_t5(hf, specials, start)
        else:
            config = cls._from_bart(hf, specials, start)
        config.validate()
        return config

    @classmethod
    def _from_t5(cls, hf, specials, start) -> "Seq2SeqConfig":
        projection = str(hf.get("feed_forward_proj", "relu"))
        gated = projection in _T5_GATED
        if not gated and projection not in _ACTIVATIONS:
            raise ConfigError(f"T5 feed_forward_proj={projection!r} is not supported; minikv reads 'relu' (v1.0), "
                              f"'gated-gelu' (v1.1 / Flan), {sorted(set(_T5_GATED) | set(_ACTIVATIONS))}")
        activation = _T5_GATED[projection] if gated else _ACTIVATIONS[projection]
        layers = _positive_int(hf, "num_layers")
        tie = hf.get("tie_word_embeddings", True) is not False
        # transformers >= 5 writes scale_decoder_outputs; older configs imply it by tying.
        scale = hf.get("scale_decoder_outputs", tie)
        return cls(
            model_type="t5", vocab_size=_positive_int(hf, "vocab_size"), d_model=_positive_int(hf, "d_model"),
            encoder_layers=layers, decoder_layers=_positive_int(hf, "num_decoder_layers", layers),
            encoder_heads=_positive_int(hf, "num_heads"), decoder_heads=_positive_int(hf, "num_heads"),
            head_dim=_positive_int(hf, "d_kv"), encoder_ffn=_positive_int(hf, "d_ff"),
            decoder_ffn=_positive_int(hf, "d_ff"), activation=activation, gated=gated,
            norm_eps=_number(hf, "layer_norm_epsilon", 1e-6), tie_word_embeddings=tie,
            scale_decoder_outputs=bool(scale),
            num_buckets=_positive_int(hf, "relative_attention_num_buckets", 32),
            max_distance=_positive_int(hf, "relative_attention_max_distance", 128),
            decoder_start_token_id=0 if start is None else start,
            **specials,
        )

    @classmethod
    def _from_bart(cls, hf, specials, start) -> "Seq2SeqConfig":
        act = str(hf.get("activation_function", "gelu"))
        if act not in _ACTIVATIONS:
            raise ConfigError(f"BART activation_function={act!r} is not supported; choose one of "
                              f"{sorted(_ACTIVATIONS)}")
        if hf.get("add_final_layer_norm") or hf.get("normalize_before"):
            raise ConfigError("this BART config asks for pre-norm layers (normalize_before / add_final_layer_norm: "
                              "mBART's variant); minikv reads the original post-norm BART only")
        d = _positive_int(hf, "d_model")
        enc_heads, dec_heads = _positive_int(hf, "encoder_attention_heads"), _positive_int(hf, "decoder_attention_heads")
        if d % enc_heads or d % dec_heads or d // enc_heads != d // dec_heads:
            raise ConfigError(f"BART d_model={d} must be divisible by encoder_attention_heads={enc_heads} and "
                              f"decoder_attention_heads={dec_heads} with one head size")
        return cls(
            model_type="bart", vocab_size=_positive_int(hf, "vocab_size"), d_model=d,
            encoder_layers=_positive_int(hf, "encoder_layers"), decoder_layers=_positive_int(hf, "decoder_layers"),
            encoder_heads=enc_heads, decoder_heads=dec_heads, head_dim=d // enc_heads,
            encoder_ffn=_positive_int(hf, "encoder_ffn_dim"), decoder_ffn=_positive_int(hf, "decoder_ffn_dim"),
            activation=_ACTIVATIONS[act], gated=False, norm_eps=1e-5,
            tie_word_embeddings=hf.get("tie_word_embeddings", True) is not False, scale_decoder_outputs=False,
            max_position_embeddings=_positive_int(hf, "max_position_embeddings"),
            scale_embedding=bool(hf.get("scale_embedding", False)),
            decoder_start_token_id=2 if start is None else start,
            **specials,
        )

    def validate(self) -> None:
        if self.decoder_start_token_id is None or not 0 <= self.decoder_start_token_id < self.vocab_size:
            raise ConfigError(f"decoder_start_token_id={self.decoder_start_token_id!r} must be a token id below "
                              f"vocab_size={self.vocab_size}")
        for name in ("forced_bos_token_id", "forced_eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name}={value} must be below vocab_size={self.vocab_size}")
        if self.is_t5 and (self.num_buckets < 4 or self.max_distance <= self.num_buckets // 2):
            # Both bucket layouts need an exact part (max_exact = num_buckets // 4 or // 2, >= 1) and a
            # log part from max_exact up to max_distance (log(max_distance / max_exact) > 0).
            raise ConfigError(f"relative_attention_num_buckets={self.num_buckets} must be >= 4 and "
                              f"relative_attention_max_distance={self.max_distance} above num_buckets // 2")


# ---------------------------------------------------------------- the name/layout table


@dataclass(frozen=True)
class Seq2SeqTensor:
    """One Hugging Face tensor, the minikv tensor it becomes, and its shape in the checkpoint.

    ``optional``: the checkpoint may lack it (BART's final_logits_bias: zeros). The one layout change
    is BART's final_logits_bias, stored (1, vocab) and used as (vocab,): ``ours_shape`` says so."""

    hf: str
    ours: str
    shape: tuple[int, ...]
    optional: bool = False
    ours_shape: Optional[tuple[int, ...]] = None


def seq2seq_tensor_table(config: Seq2SeqConfig) -> list[Seq2SeqTensor]:
    """The one name/layout table between Hugging Face T5/BART checkpoints and minikv."""
    c, d, hd = config, config.d_model, config.head_dim
    rows: list[Seq2SeqTensor] = []

    def add(hf, ours, shape, **kw):
        rows.append(Seq2SeqTensor(hf, ours, tuple(shape), **kw))

    stacks = (("encoder", c.encoder_layers, c.encoder_heads, c.encoder_ffn),
              ("decoder", c.decoder_layers, c.decoder_heads, c.decoder_ffn))
    if c.is_t5:
        add("shared.weight", "embed.weight", (c.vocab_size, d))
        if not c.tie_word_embeddings:
            add("lm_head.weight", "lm_head.weight", (c.vocab_size, d))
        for stack, n_layers, heads, ffn in stacks:
            inner = heads * hd
            add(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", f"{stack}.rel_bias.weight",
                (c.num_buckets, heads))
            add(f"{stack}.final_layer_norm.weight", f"{stack}.final_norm.weight", (d,))
            for i in range(n_layers):
                hf, p = f"{stack}.block.{i}.layer.", f"{stack}.layers.{i}."
                add(hf + "0.layer_norm.weight", p + "attn_norm.weight", (d,))
                for x in "qkv":
                    add(hf + f"0.SelfAttention.{x}.weight", p + f"attn.{x}.weight", (inner, d))
                add(hf + "0.SelfAttention.o.weight", p + "attn.o.weight", (d, inner))
                ff = "1"
                if stack == "decoder":
                    add(hf + "1.layer_norm.weight", p + "cross_norm.weight", (d,))
                    for x in "qkv":
                        add(hf + f"1.EncDecAttention.{x}.weight", p + f"cross.{x}.weight", (inner, d))
                    add(hf + "1.EncDecAttention.o.weight", p + "cross.o.weight", (d, inner))
                    ff = "2"
                add(hf + f"{ff}.layer_norm.weight", p + "mlp_norm.weight", (d,))
                if c.gated:
                    add(hf + f"{ff}.DenseReluDense.wi_0.weight", p + "mlp.gate.weight", (ffn, d))
                    add(hf + f"{ff}.DenseReluDense.wi_1.weight", p + "mlp.up.weight", (ffn, d))
                else:
                    add(hf + f"{ff}.DenseReluDense.wi.weight", p + "mlp.up.weight", (ffn, d))
                add(hf + f"{ff}.DenseReluDense.wo.weight", p + "mlp.down.weight", (d, ffn))
        return rows

    # BART: every projection and norm has a bias.
    add("model.shared.weight", "embed.weight", (c.vocab_size, d))
    if not c.tie_word_embeddings:
        add("lm_head.weight", "lm_head.weight", (c.vocab_size, d))
    add("final_logits_bias", "final_logits_bias", (1, c.vocab_size), optional=True, ours_shape=(c.vocab_size,))
    for stack, n_layers, heads, ffn in stacks:
        m = f"model.{stack}."
        add(m + "embed_positions.weight", f"{stack}.pos_embed.weight", (c.max_position_embeddings + 2, d))
        for x in ("weight", "bias"):
            add(m + f"layernorm_embedding.{x}", f"{stack}.embed_norm.{x}", (d,))
        for i in range(n_layers):
            hf, p = f"{m}layers.{i}.", f"{stack}.layers.{i}."
            blocks = [("self_attn", "attn")] + ([("encoder_attn", "cross")] if stack == "decoder" else [])
            for theirs, ours in blocks:
                for x, proj in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
                    add(hf + f"{theirs}.{proj}.weight", p + f"{ours}.{x}.weight", (d, d))
                    add(hf + f"{theirs}.{proj}.bias", p + f"{ours}.{x}.bias", (d,))
                for x in ("weight", "bias"):
                    add(hf + f"{theirs}_layer_norm.{x}", p + f"{ours}_norm.{x}", (d,))
            for x in ("weight", "bias"):
                add(hf + f"final_layer_norm.{x}", p + f"mlp_norm.{x}", (d,))
            add(hf + "fc1.weight", p + "mlp.up.weight", (ffn, d))
            add(hf + "fc1.bias", p + "mlp.up.bias", (ffn,))
            add(hf + "fc2.weight", p + "mlp.down.weight", (d, ffn))
            add(hf + "fc2.bias", p + "mlp.down.bias", (d,))
    return rows


def _ignorable(name: str, config: Seq2SeqConfig) -> bool:
    """Tensors some exports write that hold nothing new: copies of the shared embedding, a tied
    head, and T5's unused cross-attention bias table."""
    copies = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    if name.endswith(copies) or (name == "lm_head.weight" and config.tie_word_embeddings):
        return True
    return name.endswith("EncDecAttention.relative_attention_bias.weight")


# ---------------------------------------------------------------- reading
# The weights are read by minikv.checkpoint.read_safetensors (one reader for every model: float32,
# float64, float16 and bfloat16, tensor by tensor, float8 and the rest refused by name).


def is_seq2seq_folder(folder: Path) -> bool:
    """Whether folder/config.json names an encoder-decoder model_type minikv reads."""
    try:
        # Read like every config (regular file, size cap): a FIFO here must not hang the check.
        return read_json(Path(folder) / "config.json", "config file", ConfigError).get("model_type") in SEQ2SEQ_MODEL_TYPES
    except (MinikvError, AttributeError):
        return False       # not an encoder-decoder folder, or unreadable: the decoder-only loader names why


def load_seq2seq_checkpoint(path, dtype="float32") -> tuple[Seq2SeqConfig, dict[str, np.ndarray]]:
    """Read a T5/BART checkpoint folder into (config, weights with canonical names, in ``dtype``)."""
    from .checkpoint import CONFIG_FILE, _weight_files, read_safetensors

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint path {folder} is not a folder (it needs config.json and model.safetensors)")
    hf = read_json(folder / CONFIG_FILE, "config file", ConfigError)
    generation = None
    generation_path = folder / "generation_config.json"
    if generation_path.exists() or generation_path.is_symlink():
        generation = read_json(generation_path, "generation config", ConfigError)
    if not isinstance(hf, dict):
        raise ConfigError(f"{folder / CONFIG_FILE} must hold a JSON object")
    try:
        config = Seq2SeqConfig.from_hf(hf, generation if isinstance(generation, dict) else None)
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
        if isinstance(exc, MinikvError):
            raise
        raise ConfigError(f"{folder / CONFIG_FILE} holds a value of the wrong type or form "
                          f"({type(exc).__name__}: {exc})") from None
    raw: dict[str, np.ndarray] = {}
    for file in _weight_files(folder):
        for name, tensor in read_safetensors(file, dtype=np.dtype(dtype)).items():
            if name in raw:
                raise CheckpointError(f"tensor {name!r} appears twice in {folder}")
            raw[name] = tensor
    # Layer counts against the tensors present, before any per-layer table is built (every layer has
    # at least its attention projections and a norm).
    layers = config.encoder_layers + config.decoder_layers
    if 4 * layers > len(raw):
        raise CheckpointError(f"config says {config.encoder_layers} + {config.decoder_layers} layers but {folder} "
                              f"holds only {len(raw)} tensors; is config.json from another model?")
    return config, seq2seq_weights_from_hf(raw, config, dtype, source=str(folder))


def seq2seq_weights_from_hf(raw: dict[str, np.ndarray], config: Seq2SeqConfig, dtype=np.float32,
                            source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Translate HF-named tensors to minikv's names, checking every name, shape and value."""
    dtype = np.dtype(dtype)
    table = seq2seq_tensor_table(config)
    known = {row.hf for row in table}
    unexpected = sorted(n for n in raw if n not in known and not _ignorable(n, config))
    if unexpected:
        raise CheckpointError(f"{source} has unexpected tensor(s) {unexpected[:5]} for model_type="
                              f"{config.model_type!r} (feed_forward_proj / tie_word_embeddings / layer counts in "
                              "config.json may disagree with the weights)")
    weights: dict[str, np.ndarray] = {}
    for row in table:
        if row.hf not in raw:
            if row.optional:
                weights[row.ours] = np.zeros(row.ours_shape or row.shape, dtype=dtype)
                continue
            raise CheckpointError(f"{source} is missing tensor {row.hf!r} (minikv {row.ours!r}, expected shape "
                                  f"{row.shape})")
        tensor = raw[row.hf]
        if not np.issubdtype(tensor.dtype, np.floating):
            raise CheckpointError(f"tensor {row.hf!r} in {source} has dtype {tensor.dtype}; expected floating point")
        if tuple(tensor.shape) != row.shape:
            raise CheckpointError(f"tensor {row.hf!r} in {source} has shape {tuple(tensor.shape)}; the config "
                                  f"implies {row.shape}")
        with np.errstate(over="ignore"):
            # a copy (np.array copies): the file stays mapped only while it is read
            value = np.array(tensor.reshape(row.ours_shape or row.shape), dtype=dtype, order="C")
        if not np.isfinite(value).all():
            raise CheckpointError(f"tensor {row.hf!r} in {source} holds NaN or infinite values as {dtype.name}")
        weights[row.ours] = value
    return weights


# ---------------------------------------------------------------- config helpers


def _positive_int(hf: dict[str, Any], key: str, default: Any = None) -> int:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
        raise ConfigError(f"config field {key}={value!r} must be a positive integer <= {MAX_SIZE} (2**31 - 1)")
    return value


def _number(hf: dict[str, Any], key: str, default: float) -> float:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"config field {key}={value!r} must be a positive number")
    return float(value)


def _all_ids(hf: dict[str, Any], key: str) -> tuple[int, ...]:
    value = hf.get(key)
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ConfigError(f"config field {key}={value!r} must be a token id or a list of token ids")
    return tuple(values)


def _single_id(hf: dict[str, Any], key: str) -> Optional[int]:
    value = hf.get(key)
    if value is None:
        return None
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"config field {key}={value!r} must be one token id")
    return value
