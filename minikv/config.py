"""``ModelConfig``: everything minikv needs to know about an architecture, in one frozen dataclass.

Two families cover the checkpoints minikv runs:

* ``llama`` (LLaMA, Mistral, Qwen2, Qwen3, Gemma 3 text): RMSNorm, rotary position embeddings (RoPE,
  optionally scaled: linear, dynamic NTK, llama3, yarn), gated MLP, grouped-query attention
  (``n_kv_heads`` <= ``n_heads``), optional q/k/v biases (Qwen2), optional sliding-window attention
  (Mistral: every layer; Gemma 3: the layers ``layer_types`` names), tied or untied embeddings.
  Qwen3 adds a per-head RMSNorm on q and k; Gemma 3 adds those too, plus (1 + w) norms, a norm after
  attention and after the MLP, GeGLU, embeddings scaled by sqrt(d) and its own attention scale.
* ``gpt2``: LayerNorm, learned absolute positions, GELU (tanh approximation) MLP, biases everywhere,
  one fused ``c_attn`` projection, always tied embeddings.

``ModelConfig.from_hf(config_dict)`` reads a Hugging Face ``config.json``. Anything minikv does not
implement (another ``model_type``, longrope, partial rotary, attention logit softcapping, ...) is a
``ConfigError`` naming the field: a model we cannot run exactly must never run approximately, and
the error never suggests an edit that would change the model's numbers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError
from .validate import INT64_MAX, MAX_SIZE, read_json

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
SUPPORTED_MODEL_TYPES = LLAMA_FAMILY + ("gpt2",)
# GPT-2's "gelu_new" is the tanh approximation; so are the other two spellings.
GELU_TANH_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_tanh")
# transformers maps both names to the same x * sigmoid(x).
SILU_NAMES = ("silu", "swish")

# Defaults of the transformers config classes for fields a config.json may leave out: a field
# that is absent must mean what it means to transformers (e.g. Mistral's window is 4096 unless
# the file says otherwise), or the same checkpoint would run differently in the two.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "num_key_value_heads": None, "sliding_window": None},
    "mistral": {"max_position_embeddings": 4096 * 32, "num_key_value_heads": 8, "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "sliding_window": None},
    "qwen3": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "sliding_window": None,
              "head_dim": 128},
    "gemma3_text": {"max_position_embeddings": 131072, "num_key_value_heads": 4, "sliding_window": 4096,
                    "head_dim": 256, "tie_word_embeddings": True, "query_pre_attn_scalar": 256,
                    "hidden_activation": "gelu_pytorch_tanh", "sliding_window_pattern": 6,
                    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
                    "bos_token_id": 2, "eos_token_id": 1},
}
# RoPE types minikv implements, and the fields each may carry (transformers 5.24's _validate_*_rope_parameters).
ROPE_FIELDS: dict[str, set[str]] = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"},
}
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class RopeScaling:
    """A scaled RoPE, every value resolved as transformers resolves it (see rope.scaled_inverse_frequencies).

    linear:  inv_freq / factor
    dynamic: NTK: the base grows with the sequence length L beyond original_max_position_embeddings
             (which for "dynamic" is the config's max_position_embeddings, as in transformers)
    llama3:  long wavelengths divided by factor, short ones kept, a smooth ramp between
    yarn:    a ramp between interpolated and extrapolated frequencies, and cos/sin times attention_factor
    """

    rope_type: str
    factor: float
    original_max_position_embeddings: Optional[int] = None
    low_freq_factor: Optional[float] = None     # llama3
    high_freq_factor: Optional[float] = None    # llama3
    beta_fast: Optional[float] = None           # yarn
    beta_slow: Optional[float] = None           # yarn
    attention_factor: float = 1.0               # yarn: cos and sin are multiplied by it (mscale)
    truncate: bool = True                       # yarn: round the ramp's ends to whole dimensions

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type in ("llama3", "yarn"):
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
        if self.rope_type == "llama3":
            out.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor)
        if self.rope_type == "yarn":
            out.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow, attention_factor=self.attention_factor,
                       truncate=self.truncate)
        return out

# minikv field -> its config.json spelling per family, so an error names the field the user can edit.
HF_FIELD_NAMES: dict[str, dict[str, str]] = {
    "llama": {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "n_layers": "num_hidden_layers",
              "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
              "intermediate_size": "intermediate_size", "max_position_embeddings": "max_position_embeddings",
              "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta", "sliding_window": "sliding_window"},
    "gpt2": {"vocab_size": "vocab_size", "hidden_size": "n_embd", "n_layers": "n_layer", "n_heads": "n_head",
             "n_kv_heads": "n_head", "head_dim": "n_embd / n_head", "intermediate_size": "n_inner",
             "max_position_embeddings": "n_positions", "norm_eps": "layer_norm_epsilon"},
}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str                 # "llama" | "mistral" | "qwen2" | "qwen3" | "gemma3_text" | "gpt2"
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float = 10000.0
    # "half": HF's rotate_half, pairs (i, i + head_dim/2). "interleaved": Meta's original, pairs (2i, 2i+1).
    # The convention describes how the q/k projection *weights* are laid out; see rope.py.
    rope_convention: str = "half"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    # Every end-of-sequence id (Llama 3 lists several); eos_token_id is the first of them.
    eos_token_ids: tuple[int, ...] = ()
    # Scaled RoPE (of the full-attention layers, for Gemma 3); None: plain RoPE with rope_theta.
    rope_scaling: Optional[RopeScaling] = None
    # Per layer "full_attention" or "sliding_attention" (Gemma 3); empty: every layer alike, with
    # sliding_window (if any) applying to all of them (Mistral).
    layer_types: tuple[str, ...] = ()
    # Gemma 3: the RoPE base of the sliding layers, the attention scale query_pre_attn_scalar^-1/2
    # (instead of head_dim^-1/2) and tanh soft-capping of the final logits (None: none).
    rope_local_theta: Optional[float] = None
    query_pre_attn_scalar: Optional[int] = None
    final_logit_softcapping: Optional[float] = None

    # ---- derived facts, so no caller re-derives them differently ----
    @property
    def family(self) -> str:
        return "gpt2" if self.model_type == "gpt2" else "llama"

    @property
    def uses_rope(self) -> bool:
        return self.family == "llama"

    @property
    def is_gemma3(self) -> bool:
        return self.model_type == "gemma3_text"

    @property
    def qk_norm(self) -> bool:
        """A per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3)."""
        return self.model_type in ("qwen3", "gemma3_text")

    @property
    def layer_windows(self) -> tuple[Optional[int], ...]:
        """Each layer's sliding window (None: full causal attention)."""
        if not self.layer_types:
            return (self.sliding_window,) * self.n_layers
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in self.layer_types)

    @property
    def max_positions(self) -> int:
        """How many positions the model runs. Dynamic NTK scaling exists to run beyond
        max_position_embeddings (its original length); minikv allows factor times that."""
        if self.rope_scaling is not None and self.rope_scaling.rope_type == "dynamic":
            return int(self.rope_scaling.factor * self.max_position_embeddings)
        return self.max_position_embeddings

    @property
    def max_positions_name(self) -> str:
        """Where max_positions comes from, for error messages."""
        if self.max_positions == self.max_position_embeddings:
            return "max_position_embeddings"
        return f"dynamic RoPE factor {self.rope_scaling.factor:g} x max_position_embeddings"

    @property
    def n_groups(self) -> int:
        """Query heads per key/value head (1 = multi-head, n_heads = multi-query attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes the KV cache holds per position at float32: 2 (K and V) * layers * kv_heads * head_dim * 4."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 4

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def spelled(name: str) -> str:
            hf_name = HF_FIELD_NAMES[self.family].get(name, name)
            return name if hf_name == name else f"{name} (config.json {hf_name})"

        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIZE:
                raise ConfigError(f"config field {spelled(name)}={value!r} must be a positive integer "
                                  f"<= {MAX_SIZE} (2**31 - 1)")

        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type={self.model_type!r} is not supported; minikv runs {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings"):
            positive(name)
        if self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"num_attention_heads={self.n_heads} is not a multiple of num_key_value_heads={self.n_kv_heads}; "
                "grouped-query attention needs every kv head to serve the same number of query heads"
            )
        if self.uses_rope and self.head_dim % 2 != 0:
            raise ConfigError(f"head_dim={self.head_dim} is odd; RoPE rotates pairs of dimensions and needs it even")
        if self.rope_convention not in ("half", "interleaved"):
            raise ConfigError(f"rope_convention={self.rope_convention!r} must be 'half' or 'interleaved'")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < float("inf")):
                raise ConfigError(f"config field {spelled(name)}={value!r} must be a finite number > 0")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or isinstance(self.sliding_window, bool) or self.sliding_window < 1):
            raise ConfigError(f"sliding_window={self.sliding_window!r} must be a positive integer or null")
        if self.layer_types and (len(self.layer_types) != self.n_layers
                                 or any(t not in LAYER_TYPES for t in self.layer_types)):
            raise ConfigError(f"layer_types={list(self.layer_types)} must name one of {LAYER_TYPES} for each of "
                              f"the {self.n_layers} layers")
        for name in ("rope_local_theta", "query_pre_attn_scalar", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not (0 < value < float("inf"))):
                raise ConfigError(f"config field {name}={value!r} must be a finite number > 0 or null")
        if self.family == "gpt2" and self.n_kv_heads != self.n_heads:
            raise ConfigError("gpt2 has no grouped-query attention: n_kv_heads must equal n_heads")
        if self.family == "gpt2" and self.hidden_size != self.n_heads * self.head_dim:
            raise ConfigError(f"gpt2 n_embd={self.hidden_size} must equal n_head * head_dim")

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dict (transformers 4.x and 5.x spellings)."""
        if not isinstance(hf, dict):
            raise ConfigError(f"a config must be a JSON object (dict), not {type(hf).__name__}")
        try:
            return cls._from_hf(hf)
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
            # A field of a type no reader expects (a list where a number belongs, a dict in a list
            # of names, ...): name it as the config's fault, never a raw TypeError from inside.
            raise ConfigError(f"config.json holds a value of the wrong type or form ({type(exc).__name__}: {exc}); "
                              "compare it with the model's published config.json") from None

    @classmethod
    def _from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"config.json model_type={model_type!r} is not supported; minikv runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if model_type == "gpt2":
            return cls._from_hf_gpt2(hf)
        return cls._from_hf_llama(hf, model_type)

    @classmethod
    def _from_hf_llama(cls, hf: dict[str, Any], model_type: str) -> "ModelConfig":
        defaults = HF_DEFAULTS[model_type]
        gemma = model_type == "gemma3_text"

        def need(key: str) -> int:
            if key not in hf or hf[key] is None:
                raise ConfigError(f"config.json for model_type={model_type!r} is missing the field {key!r}")
            return _positive_int(hf, key)

        if gemma:
            act = hf.get("hidden_activation", defaults["hidden_activation"])
            if act not in GELU_TANH_NAMES:
                raise ConfigError(f"hidden_activation={act!r} is not supported for gemma3_text; minikv implements "
                                  f"GeGLU with the tanh GELU {GELU_TANH_NAMES}")
            for key in ("attn_logit_softcapping",):
                if hf.get(key) is not None:
                    raise ConfigError(f"{key}={hf[key]!r} is not supported: minikv does not soft-cap attention "
                                      "scores; this checkpoint needs an engine that does")
            if hf.get("use_bidirectional_attention"):
                raise ConfigError("use_bidirectional_attention=true is not supported: minikv runs causal "
                                  "(decoder) attention only")
        else:
            act = hf.get("hidden_act", "silu")
            if act not in SILU_NAMES:
                raise ConfigError(f"hidden_act={act!r} is not supported for {model_type}; minikv implements SwiGLU "
                                  "with 'silu'")
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"pretraining_tp={hf['pretraining_tp']!r} is not supported; only 1")
        hidden = need("hidden_size")
        n_heads = need("num_attention_heads")
        n_layers = need("num_hidden_layers")
        # transformers: head_dim = config.head_dim or hidden_size // num_attention_heads (0 and null alike);
        # Qwen3 and Gemma 3 default to 128 and 256 when the file has no head_dim at all.
        head_dim_value = hf.get("head_dim", defaults.get("head_dim"))
        head_dim = _positive_int({"head_dim": head_dim_value}, "head_dim") if head_dim_value else hidden // n_heads
        if not head_dim_value and hidden % n_heads != 0:
            raise ConfigError(f"hidden_size={hidden} is not divisible by num_attention_heads={n_heads} and no head_dim is given")
        n_kv_heads = hf.get("num_key_value_heads", defaults["num_key_value_heads"])
        n_kv_heads = n_heads if n_kv_heads is None else _positive_int({"num_key_value_heads": n_kv_heads},
                                                                       "num_key_value_heads")
        max_positions = hf.get("max_position_embeddings", defaults["max_position_embeddings"])
        window = None
        layer_types: tuple[str, ...] = ()
        if model_type == "mistral":
            window = hf.get("sliding_window", defaults["sliding_window"])
        elif model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
            raise ConfigError(
                f"use_sliding_window=true is not supported for {model_type} (its window applies to only the layers "
                "from max_window_layers on, which minikv does not implement)"
            )
        if gemma:
            window = hf.get("sliding_window", defaults["sliding_window"])
            types = hf.get("layer_types")
            if types is None:
                # Older files: every pattern-th layer is global, the others slide (transformers' __post_init__).
                pattern = _positive_int(hf, "sliding_window_pattern", defaults["sliding_window_pattern"])
                types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
            if not isinstance(types, list):
                raise ConfigError(f"layer_types={types!r} must be a list naming each layer's attention")
            layer_types = tuple(types)
        else:
            types = hf.get("layer_types")
            if types and any(t != "full_attention" for t in types) and model_type != "mistral":
                raise ConfigError(f"layer_types={sorted(set(types))} is not supported for {model_type}; every "
                                  "layer must be 'full_attention'")
        theta, scaling, local_theta = _rope(hf, model_type, max_positions)
        # LLaMA, Qwen3 and Gemma 3 read attention_bias (q, k, v and o); LLaMA alone reads mlp_bias.
        # transformers hard-codes the others' biases (Qwen2: q, k and v only; Mistral: none).
        attention_bias = model_type in ("llama", "qwen3", "gemma3_text") and bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            intermediate_size=need("intermediate_size"),
            max_position_embeddings=max_positions,
            norm_eps=_number(hf, "rms_norm_eps", 1e-6),
            rope_theta=theta,
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,          # attention_bias also biases o_proj
            mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", defaults.get("tie_word_embeddings", False))),
            sliding_window=window,
            bos_token_id=_single_id({"bos_token_id": hf.get("bos_token_id", defaults.get("bos_token_id"))},
                                    "bos_token_id"),
            eos_token_id=_single_id({"eos_token_id": hf.get("eos_token_id", defaults.get("eos_token_id"))},
                                    "eos_token_id"),
            eos_token_ids=_all_ids({"eos_token_id": hf.get("eos_token_id", defaults.get("eos_token_id"))},
                                   "eos_token_id"),
            rope_scaling=scaling,
            layer_types=layer_types,
            rope_local_theta=local_theta,
            # transformers types it int (its strict config refuses 256.0)
            query_pre_attn_scalar=(_positive_int(hf, "query_pre_attn_scalar", defaults["query_pre_attn_scalar"])
                                   if gemma else None),
            final_logit_softcapping=(None if not gemma or hf.get("final_logit_softcapping") is None
                                     else _number(hf, "final_logit_softcapping", None)),
        )

    @classmethod
    def _from_hf_gpt2(cls, hf: dict[str, Any]) -> "ModelConfig":
        act = hf.get("activation_function", "gelu_new")
        if act not in GELU_TANH_NAMES:
            raise ConfigError(f"activation_function={act!r} is not supported for gpt2; minikv implements {GELU_TANH_NAMES}")
        if hf.get("scale_attn_by_inverse_layer_idx"):
            raise ConfigError("scale_attn_by_inverse_layer_idx=true is not supported for gpt2")
        if hf.get("scale_attn_weights") is False:
            raise ConfigError("scale_attn_weights=false is not supported for gpt2")
        if hf.get("add_cross_attention"):
            raise ConfigError("add_cross_attention=true is not supported: minikv runs decoder-only models")
        if hf.get("tie_word_embeddings") is False:
            raise ConfigError("tie_word_embeddings=false is not supported for gpt2 (its lm_head is the token embedding)")
        # GPT2Config's defaults (GPT-2 small) for every field the file leaves out.
        n_embd = _positive_int(hf, "n_embd", 768)
        n_head = _positive_int(hf, "n_head", 12)
        if n_embd % n_head != 0:
            raise ConfigError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        return cls(
            model_type="gpt2",
            vocab_size=hf.get("vocab_size", 50257),
            hidden_size=n_embd,
            n_layers=hf.get("n_layer", 12),
            n_heads=n_head,
            n_kv_heads=n_head,
            head_dim=n_embd // n_head,
            intermediate_size=hf.get("n_inner") or 4 * n_embd,
            max_position_embeddings=hf.get("n_positions", 1024),
            norm_eps=_number(hf, "layer_norm_epsilon", 1e-5),
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            bos_token_id=_single_id(hf, "bos_token_id"),
            eos_token_id=_single_id(hf, "eos_token_id"),
            eos_token_ids=_all_ids(hf, "eos_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict for this config (round-trips through ``from_hf``)."""
        if self.rope_convention != "half":
            raise ConfigError(
                "a checkpoint saved for Hugging Face must use rope_convention='half'; "
                "convert the weights first with minikv.rope.convert_rope_convention(..., to='half')"
            )
        if self.family == "gpt2":
            return self._checked_round_trip({
                "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "vocab_size": self.vocab_size, "n_embd": self.hidden_size, "n_layer": self.n_layers,
                "n_head": self.n_heads, "n_inner": self.intermediate_size,
                "n_positions": self.max_position_embeddings, "layer_norm_epsilon": self.norm_eps,
                "activation_function": "gelu_new", "tie_word_embeddings": True,
                "bos_token_id": self.bos_token_id, "eos_token_id": self._hf_eos(),
            })
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
        out: dict[str, Any] = {
            "architectures": [arch[self.model_type]], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": self._hf_eos(),
        }
        # The transformers 4.x spelling (top-level rope_theta, rope_scaling), which 5.x reads too.
        out["rope_theta"] = self.rope_theta
        out["rope_scaling"] = None if self.rope_scaling is None else self.rope_scaling.to_hf()
        if self.is_gemma3:
            out.update(hidden_activation="gelu_pytorch_tanh", sliding_window=self.sliding_window,
                       layer_types=list(self.layer_types), query_pre_attn_scalar=self.query_pre_attn_scalar,
                       final_logit_softcapping=self.final_logit_softcapping, attn_logit_softcapping=None,
                       rope_local_base_freq=self.rope_local_theta)
        else:
            out["hidden_act"] = "silu"
        if self.model_type in ("llama", "qwen3", "gemma3_text"):
            out["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        return self._checked_round_trip(out)

    def _checked_round_trip(self, hf: dict[str, Any]) -> dict[str, Any]:
        """Refuse a config the Hugging Face classes cannot express (e.g. Qwen2 without its q/k/v biases):
        saving it would write a checkpoint that transformers (and minikv) load as a different model."""
        back = ModelConfig.from_hf(hf)
        differ = [f.name for f in dataclasses.fields(self) if getattr(back, f.name) != getattr(self, f.name)]
        if differ:
            raise ConfigError(
                f"this {self.model_type} config cannot be written as a Hugging Face config.json: "
                + ", ".join(f"{name}={getattr(self, name)!r} would load back as {getattr(back, name)!r}"
                            for name in differ)
            )
        return hf

    def _hf_eos(self):
        return list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_id

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.exists() and not path.is_symlink():
            raise ConfigError(f"no config file at {path}; a checkpoint folder needs config.json")
        hf = read_json(path, "config file", ConfigError)
        if not isinstance(hf, dict):
            raise ConfigError(f"{path} must hold a JSON object, not {type(hf).__name__}")
        return cls.from_hf(hf)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _rope(hf: dict[str, Any], model_type: str, max_positions: int
          ) -> tuple[float, Optional[RopeScaling], Optional[float]]:
    """(rope_theta, scaling or None, the sliding layers' theta (Gemma 3) or None) from either spelling.

    transformers 4.x writes ``rope_theta`` (and any scaling as ``rope_scaling``) at the top level;
    5.x writes ``rope_parameters = {"rope_type": ..., "rope_theta": ..., ...}``, and for Gemma 3 one such
    dict per layer type. As in transformers, ``rope_scaling`` wins over ``rope_parameters`` (for Gemma 3
    it updates the full-attention layers' dict), and a top-level ``rope_theta`` fills in a missing one."""
    factor = hf.get("partial_rotary_factor", 1.0)
    if factor not in (1, 1.0, None):
        raise ConfigError(f"config.json partial_rotary_factor={factor!r} is not supported; minikv rotates the "
                          "whole head (partial_rotary_factor 1.0)")
    for source in ("rope_parameters", "rope_scaling"):
        spec = hf.get(source)
        if spec is not None and not isinstance(spec, dict):
            raise ConfigError(f"{source}={spec!r} must be a JSON object like {{\"rope_type\": \"default\", ...}}")
    if model_type == "gemma3_text":
        defaults = HF_DEFAULTS[model_type]
        params = hf.get("rope_parameters") or {}
        if params and not set(params) <= set(LAYER_TYPES):
            # transformers 5 always nests Gemma 3's rope_parameters by layer type.
            raise ConfigError(f"rope_parameters keys {sorted(params)} must be the layer types {LAYER_TYPES} "
                              "for gemma3_text")
        full = dict(params.get("full_attention") or {"rope_type": "default"})
        local = dict(params.get("sliding_attention") or {"rope_type": "default"})
        if hf.get("rope_scaling"):
            full.update(hf["rope_scaling"])
        full.setdefault("rope_theta", hf.get("rope_theta", defaults["rope_theta"]))
        local.setdefault("rope_theta", hf.get("rope_local_base_freq", defaults["rope_local_base_freq"]))
        # Nested per layer type, transformers ignores a top-level original_max_position_embeddings: pass {}.
        theta, scaling = _rope_spec(full, "rope_parameters.full_attention", {}, max_positions)
        local_theta, local_scaling = _rope_spec(local, "rope_parameters.sliding_attention", {}, max_positions)
        if local_scaling is not None:
            raise ConfigError(f"rope_parameters.sliding_attention.rope_type={local_scaling.rope_type!r} is not "
                              "supported: minikv scales RoPE of the full-attention layers only")
        return theta, scaling, local_theta
    spec, source = {}, "rope_parameters"
    for name in ("rope_parameters", "rope_scaling"):
        if hf.get(name):
            spec, source = dict(hf[name]), name
    if any(isinstance(value, dict) for value in spec.values()):
        raise ConfigError(f"{source} holds per-layer-type RoPE settings ({sorted(spec)}); minikv supports that "
                          "only for gemma3_text")
    spec.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    theta, scaling = _rope_spec(spec, source, hf, max_positions)
    return theta, scaling, None


def _rope_spec(spec: dict[str, Any], source: str, hf: dict[str, Any], max_positions: int
               ) -> tuple[float, Optional[RopeScaling]]:
    """One RoPE dict -> (theta, RopeScaling or None), resolved exactly as transformers 5.24 resolves it
    (standardize_rope_params, then _compute_<type>_parameters)."""
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    if rope_type not in ROPE_FIELDS:
        raise ConfigError(f"{source}.rope_type={rope_type!r} is not supported; minikv implements "
                          f"{sorted(ROPE_FIELDS)}: this checkpoint cannot run here exactly")
    factor = spec.get("partial_rotary_factor", 1.0)
    if factor not in (1, 1.0, None):
        raise ConfigError(f"{source} partial_rotary_factor={factor!r} is not supported; minikv rotates the whole "
                          "head (partial_rotary_factor 1.0)")
    unknown = set(spec) - ROPE_FIELDS[rope_type] - {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
    if unknown:
        raise ConfigError(f"{source} field(s) {sorted(unknown)} are not understood for rope_type={rope_type!r}; "
                          f"minikv knows {sorted(ROPE_FIELDS[rope_type])} and will not guess what the others do")
    theta = _number({"rope_theta": spec["rope_theta"]}, "rope_theta", None)
    if rope_type == "default":
        return theta, None

    def number(key: str, default: Any = None) -> Optional[float]:
        value = spec.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < float("inf")):
            raise ConfigError(f"{source}.{key}={value!r} must be a finite number > 0")
        return float(value)

    original = None
    if rope_type in ("llama3", "yarn"):
        # standardize_rope_params: a top-level original_max_position_embeddings wins, else the dict's,
        # else max_position_embeddings.
        original = hf.get("original_max_position_embeddings", spec.get("original_max_position_embeddings",
                                                                      max_positions))
        original = _positive_int({f"{source}.original_max_position_embeddings": original},
                                 f"{source}.original_max_position_embeddings")
    if rope_type == "dynamic":
        original = max_positions      # _compute_dynamic_ntk_parameters reads config.max_position_embeddings
    if rope_type == "yarn":
        # factor None: max_position_embeddings / original (DeepSeek-V3's convention).
        factor = number("factor") or max_positions / original
        attention_factor = number("attention_factor")
        if attention_factor is None:
            # get_mscale(s, m) = 0.1 m ln(s) + 1 for s > 1, else 1
            def mscale(scale: float, m: float = 1.0) -> float:
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

            m, m_all = number("mscale"), number("mscale_all_dim")
            attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        truncate = spec.get("truncate", True)
        if not isinstance(truncate, bool):
            raise ConfigError(f"{source}.truncate={truncate!r} must be true or false")
        return theta, RopeScaling("yarn", factor, original, beta_fast=number("beta_fast") or 32.0,
                                  beta_slow=number("beta_slow") or 1.0, attention_factor=float(attention_factor),
                                  truncate=truncate)
    if spec.get("factor") is None:
        raise ConfigError(f"{source} has rope_type={rope_type!r} but no factor")
    factor = number("factor")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if spec.get(key) is None:
                raise ConfigError(f"{source} has rope_type='llama3' but no {key}")
        low, high = number("low_freq_factor"), number("high_freq_factor")
        if high <= low:
            raise ConfigError(f"{source}: high_freq_factor={high} must be greater than low_freq_factor={low}")
        return theta, RopeScaling("llama3", factor, original, low_freq_factor=low, high_freq_factor=high)
    return theta, RopeScaling(rope_type, factor, original)


def _positive_int(hf: dict[str, Any], key: str, default: Any = None) -> int:
    value = hf.get(key, default)
    # Capped here, as it is read: a per-layer list is built from num_hidden_layers before validate() runs.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
        raise ConfigError(f"config.json field {key}={value!r} must be a positive integer <= {MAX_SIZE} (2**31 - 1)")
    return value


def _number(hf: dict[str, Any], key: str, default: Any) -> float:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config.json field {key}={value!r} must be a number")
    return float(value)


def _all_ids(hf: dict[str, Any], key: str) -> tuple[int, ...]:
    """Every id of a field that may hold one id or a list of them (checked like _single_id)."""
    value = hf.get(key)
    values = value if isinstance(value, list) else [value]
    return tuple(_single_id({key: v}, key) for v in values if v is not None)


def _single_id(hf: dict[str, Any], key: str) -> Optional[int]:
    """A token id; transformers allows a list of them (several end-of-sequence tokens): minikv keeps the first."""
    value = hf.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX:
        raise ConfigError(f"config.json field {key}={hf.get(key)!r} must be a non-negative integer token id "
                          "(< 2**63) or null")
    return value
