"""``ModelConfig``: everything minikv needs to know about an architecture, in one frozen dataclass.

Two families cover the checkpoints minikv runs:

* ``llama`` (LLaMA, Mistral, Qwen2): RMSNorm, rotary position embeddings (RoPE), SwiGLU MLP,
  grouped-query attention (``n_kv_heads`` <= ``n_heads``), optional q/k/v biases (Qwen2),
  optional sliding-window attention (Mistral), tied or untied embeddings.
* ``gpt2``: LayerNorm, learned absolute positions, GELU (tanh approximation) MLP, biases everywhere,
  one fused ``c_attn`` projection, always tied embeddings.

``ModelConfig.from_hf(config_dict)`` reads a Hugging Face ``config.json``. Anything minikv does not
implement (another ``model_type``, RoPE scaling, an odd ``head_dim`` with RoPE, ...) is a
``ConfigError`` naming the field: a model we cannot run exactly must never run approximately.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError
from .validate import INT64_MAX, MAX_SIZE, read_json

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
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
}

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
    model_type: str                 # "llama" | "mistral" | "qwen2" | "gpt2"
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

    # ---- derived facts, so no caller re-derives them differently ----
    @property
    def family(self) -> str:
        return "gpt2" if self.model_type == "gpt2" else "llama"

    @property
    def uses_rope(self) -> bool:
        return self.family == "llama"

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

        def need(key: str) -> int:
            if key not in hf or hf[key] is None:
                raise ConfigError(f"config.json for model_type={model_type!r} is missing the field {key!r}")
            return _positive_int(hf, key)

        act = hf.get("hidden_act", "silu")
        if act not in SILU_NAMES:
            raise ConfigError(f"hidden_act={act!r} is not supported for {model_type}; minikv implements SwiGLU with 'silu'")
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"pretraining_tp={hf['pretraining_tp']!r} is not supported; only 1")
        theta = _rope_theta(hf)
        hidden = need("hidden_size")
        n_heads = need("num_attention_heads")
        # transformers: head_dim = config.head_dim or hidden_size // num_attention_heads (0 and null alike).
        head_dim = _positive_int(hf, "head_dim") if hf.get("head_dim") else hidden // n_heads
        if not hf.get("head_dim") and hidden % n_heads != 0:
            raise ConfigError(f"hidden_size={hidden} is not divisible by num_attention_heads={n_heads} and no head_dim is given")
        n_kv_heads = hf.get("num_key_value_heads", defaults["num_key_value_heads"])
        n_kv_heads = n_heads if n_kv_heads is None else _positive_int({"num_key_value_heads": n_kv_heads},
                                                                       "num_key_value_heads")
        window = None
        if model_type == "mistral":
            window = hf.get("sliding_window", defaults["sliding_window"])
        elif model_type == "qwen2" and hf.get("use_sliding_window"):
            raise ConfigError(
                "use_sliding_window=true is not supported for qwen2 (its window applies to only some layers); "
                "set it to false"
            )
        for key in ("layer_types",):
            types = hf.get(key)
            if types is not None and (not isinstance(types, list) or not all(isinstance(t, str) for t in types)):
                raise ConfigError(f"{key}={types!r:.80} must be a list of layer type names")
            if types and any(t != "full_attention" for t in types) and model_type != "mistral":
                raise ConfigError(f"{key}={sorted(set(types))} is not supported; every layer must be 'full_attention'")
        # Only LLaMA reads attention_bias and mlp_bias; transformers hard-codes the others' biases
        # (Qwen2: q, k and v only; Mistral: none), whatever their config.json says.
        attention_bias = model_type == "llama" and bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            n_layers=need("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            intermediate_size=need("intermediate_size"),
            max_position_embeddings=hf.get("max_position_embeddings", defaults["max_position_embeddings"]),
            norm_eps=_number(hf, "rms_norm_eps", 1e-6),
            rope_theta=theta,
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,          # LLaMA's attention_bias also biases o_proj
            mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=window,
            bos_token_id=_single_id(hf, "bos_token_id"),
            eos_token_id=_single_id(hf, "eos_token_id"),
            eos_token_ids=_all_ids(hf, "eos_token_id"),
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
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        out: dict[str, Any] = {
            "architectures": [arch[self.model_type]], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta, "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": self._hf_eos(),
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.qkv_bias
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


def _rope_theta(hf: dict[str, Any]) -> float:
    """RoPE base from either spelling; refuse any RoPE variant we do not implement (it would change every angle).

    transformers 4.x writes ``rope_theta`` (and any scaling as ``rope_scaling``) at the top level;
    5.x writes ``rope_parameters = {"rope_type": "default", "rope_theta": ...}``. As in transformers,
    ``rope_scaling`` wins over ``rope_parameters``, and a top-level ``rope_theta`` fills in a missing one."""
    specs = {}
    for source in ("rope_parameters", "rope_scaling"):
        spec = hf.get(source)
        if spec is None or spec == {}:
            continue
        if not isinstance(spec, dict):
            raise ConfigError(f"{source}={spec!r} must be a JSON object like {{\"rope_type\": \"default\", ...}}")
        if any(isinstance(value, dict) for value in spec.values()):
            raise ConfigError(f"{source} holds per-layer-type RoPE settings ({sorted(spec)}); minikv supports one "
                              "RoPE shared by every layer")
        rope_type = spec.get("rope_type", spec.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(
                f"{source}.rope_type={rope_type!r} is not supported; minikv implements only the default RoPE "
                "(remove the scaling or use a checkpoint without it)"
            )
        specs[source] = spec
    chosen = specs.get("rope_scaling") or specs.get("rope_parameters") or {}
    for source, spec in (("config.json", hf), ("rope_parameters/rope_scaling", chosen)):
        factor = spec.get("partial_rotary_factor", 1.0)
        if factor not in (1, 1.0, None):
            raise ConfigError(f"{source} partial_rotary_factor={factor!r} is not supported; minikv rotates the whole "
                              "head (partial_rotary_factor 1.0)")
    return _number({"rope_theta": chosen.get("rope_theta", hf.get("rope_theta", 10000.0))}, "rope_theta", None)


def _positive_int(hf: dict[str, Any], key: str, default: Any = None) -> int:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"config.json field {key}={value!r} must be a positive integer")
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
