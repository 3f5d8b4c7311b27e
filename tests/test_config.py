"""ModelConfig.from_hf / to_hf: every supported architecture is read right, everything else is refused.

What is proven here
-------------------
* LLaMA, Mistral, Qwen2 and GPT-2 config.json dicts are read into the right fields, in both the
  transformers 4.x spelling (top-level ``rope_theta``) and the 5.x one (``rope_parameters``), with
  transformers' own defaults for fields a file leaves out (Mistral's window is 4096 unless stated).
* RoPE scaling (linear, dynamic, llama3, yarn) is read in both spellings and resolved as transformers
  resolves it (defaults, mscale, the top-level original_max_position_embeddings); Qwen3 and Gemma 3
  text configs (per-layer windows, two RoPE bases, both spellings) are read with transformers' defaults.
* Every configuration minikv cannot run exactly is a ConfigError that names the offending field and
  never advises an edit that changes the numbers: another model_type, longrope or an unknown RoPE field,
  Gemma 3's attention softcapping or bidirectional attention, partial
  rotary, an odd head_dim, heads not divisible by kv heads, Qwen2's use_sliding_window, GPT-2's
  scale_attn_by_inverse_layer_idx, a hidden_act other than silu, missing or malformed required
  fields, an invalid JSON file. (A wrong answer would be worse than no answer.)
* to_hf round-trips through from_hf for every fixture and for generated configs, and refuses a
  config that transformers cannot express (it would load back as a different model).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from minikv.config import ModelConfig, RopeScaling
from minikv.errors import ConfigError, MinikvError

FIXTURE_ROOT = Path(__file__).parent / "fixtures" / "hf"
FIXTURES = ["llama_gqa", "llama_mqa_tied", "qwen2_bias", "mistral", "mistral_window", "gpt2"]

LLAMA_4X = {  # a transformers 4.x config.json (LLaMA 2 style, shrunk)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 320, "hidden_size": 64,
    "intermediate_size": 172, "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2,
    "hidden_act": "silu", "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": None, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "pretraining_tp": 1, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0",
}
LLAMA_5X = {**{k: v for k, v in LLAMA_4X.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")},
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "dtype": "bfloat16",
            "transformers_version": "5.23.0"}
MISTRAL = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 100, "hidden_size": 32,
           "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
           "head_dim": 16, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
           "sliding_window": 64, "tie_word_embeddings": False}
QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151, "hidden_size": 64,
         "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "use_sliding_window": False,
         "sliding_window": 4096, "max_window_layers": 28, "tie_word_embeddings": True,
         "bos_token_id": None, "eos_token_id": [7, 8]}
GPT2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 100, "n_embd": 48, "n_layer": 2,
        "n_head": 4, "n_inner": None, "n_positions": 64, "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new", "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "bos_token_id": 99, "eos_token_id": 99}


def with_changes(base: dict, **changes) -> dict:
    """A copy of base; a value of ... removes the key."""
    out = dict(base)
    for key, value in changes.items():
        if value is ...:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def refused(hf: dict, *names: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf(hf)
    for name in names:
        assert name in str(info.value), f"{name!r} not named in: {info.value}"
    assert isinstance(info.value, MinikvError) and isinstance(info.value, ValueError)
    return info.value


# ------------------------------------------------------------------ reading each family


@pytest.mark.parametrize("hf", [LLAMA_4X, LLAMA_5X], ids=["transformers4", "transformers5"])
def test_llama_both_spellings(hf):
    c = ModelConfig.from_hf(hf)
    assert (c.model_type, c.family, c.uses_rope) == ("llama", "llama", True)
    assert (c.vocab_size, c.hidden_size, c.n_layers, c.intermediate_size) == (320, 64, 3, 172)
    assert (c.n_heads, c.n_kv_heads, c.head_dim, c.n_groups) == (8, 2, 8, 4)
    assert c.rope_theta == 500000.0 and c.rope_convention == "half"
    assert (c.max_position_embeddings, c.norm_eps) == (512, 1e-5)
    assert not (c.qkv_bias or c.o_bias or c.mlp_bias or c.tie_word_embeddings)
    assert c.sliding_window is None and (c.bos_token_id, c.eos_token_id) == (1, 2)


def spelled_for_transformers5(hf: dict) -> dict:
    """The same config as transformers 5 writes it: rope_theta moves into rope_parameters."""
    out = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling")}
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": hf["rope_theta"]}
    return out


@pytest.mark.parametrize("hf", [LLAMA_4X, MISTRAL, QWEN2], ids=["llama", "mistral", "qwen2"])
def test_both_spellings_give_the_same_config(hf):
    five = spelled_for_transformers5(hf)
    assert "rope_theta" not in five
    assert ModelConfig.from_hf(five) == ModelConfig.from_hf(hf)
    assert ModelConfig.from_hf(five).rope_theta == hf["rope_theta"]
    assert ModelConfig.from_hf(LLAMA_5X) == ModelConfig.from_hf(LLAMA_4X)


def test_llama_attention_and_mlp_bias():
    c = ModelConfig.from_hf(with_changes(LLAMA_4X, attention_bias=True, mlp_bias=True))
    assert c.qkv_bias and c.o_bias and c.mlp_bias  # LLaMA's attention_bias biases o_proj too


def test_mistral():
    c = ModelConfig.from_hf(MISTRAL)
    assert (c.model_type, c.sliding_window, c.head_dim, c.n_kv_heads, c.rope_theta) == ("mistral", 64, 16, 1, 1e6)
    assert c.head_dim * c.n_heads != c.hidden_size  # explicit head_dim wins over hidden/heads
    assert ModelConfig.from_hf(with_changes(MISTRAL, sliding_window=None)).sliding_window is None


def test_missing_fields_take_transformers_defaults():
    """An absent field means what transformers' config class says, or the two would run different models."""
    mistral = ModelConfig.from_hf(with_changes(MISTRAL, sliding_window=..., num_key_value_heads=...,
                                               max_position_embeddings=..., rms_norm_eps=..., rope_theta=...,
                                               num_attention_heads=8, head_dim=4))
    assert (mistral.sliding_window, mistral.n_kv_heads, mistral.max_position_embeddings) == (4096, 8, 4096 * 32)
    assert (mistral.norm_eps, mistral.rope_theta) == (1e-6, 10000.0)
    llama = ModelConfig.from_hf(with_changes(LLAMA_4X, num_key_value_heads=..., max_position_embeddings=...,
                                             head_dim=None, hidden_act=...))
    assert (llama.n_kv_heads, llama.max_position_embeddings, llama.head_dim) == (8, 2048, 8)
    qwen2 = ModelConfig.from_hf(with_changes(QWEN2, max_position_embeddings=...))
    assert qwen2.max_position_embeddings == 32768
    gpt2 = ModelConfig.from_hf({"model_type": "gpt2"})  # GPT-2 small
    assert (gpt2.vocab_size, gpt2.hidden_size, gpt2.n_layers, gpt2.n_heads, gpt2.intermediate_size,
            gpt2.max_position_embeddings) == (50257, 768, 12, 12, 3072, 1024)


def test_qwen2():
    c = ModelConfig.from_hf(QWEN2)
    assert c.model_type == "qwen2" and c.head_dim == 16
    assert c.qkv_bias and not c.o_bias and not c.mlp_bias  # Qwen2 biases q, k and v only
    assert c.sliding_window is None  # use_sliding_window=false: the window setting is unused
    assert c.tie_word_embeddings and c.eos_token_id == 7 and c.bos_token_id is None
    # transformers hard-codes Qwen2's and Mistral's biases; their config's attention_bias/mlp_bias mean nothing.
    assert ModelConfig.from_hf(with_changes(QWEN2, attention_bias=True, mlp_bias=True)) == c
    assert ModelConfig.from_hf(with_changes(MISTRAL, attention_bias=True, mlp_bias=True)) == ModelConfig.from_hf(MISTRAL)


def test_gpt2():
    c = ModelConfig.from_hf(GPT2)
    assert (c.model_type, c.family, c.uses_rope) == ("gpt2", "gpt2", False)
    assert (c.hidden_size, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (48, 2, 4, 4, 12)
    assert c.intermediate_size == 4 * 48  # n_inner null means 4 * n_embd
    assert c.max_position_embeddings == 64 and c.norm_eps == 1e-5
    assert c.qkv_bias and c.o_bias and c.mlp_bias and c.tie_word_embeddings
    assert ModelConfig.from_hf(with_changes(GPT2, n_inner=100)).intermediate_size == 100


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_configs_load(name):
    c = ModelConfig.from_json(FIXTURE_ROOT / name / "config.json")
    hf = json.loads((FIXTURE_ROOT / name / "config.json").read_text())
    assert c.model_type == hf["model_type"] and c.vocab_size == hf["vocab_size"]


def test_kv_bytes_per_token():
    c = ModelConfig.from_hf(LLAMA_4X)
    assert c.kv_bytes_per_token == 2 * 3 * 2 * 8 * 4


# ------------------------------------------------------------------ refusals, each naming the field


@pytest.mark.parametrize("model_type", ["phi", "gemma", "mixtral", None])
def test_other_model_types_are_refused(model_type):
    refused(with_changes(LLAMA_4X, model_type=model_type), "model_type", repr(model_type))


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}   # Llama 3.2's config.json
YARN_SCALING = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}   # Qwen2.5's, 4.x spelling


@pytest.mark.parametrize("spec,expected", [
    ({"rope_type": "linear", "factor": 8.0}, RopeScaling("linear", 8.0)),
    ({"type": "linear", "factor": 2}, RopeScaling("linear", 2.0)),
    # dynamic: the original length is max_position_embeddings (512 here), as transformers reads it
    ({"rope_type": "dynamic", "factor": 2.0}, RopeScaling("dynamic", 2.0, 512)),
    (LLAMA3_SCALING, RopeScaling("llama3", 32.0, 8192, low_freq_factor=1.0, high_freq_factor=4.0)),
    # yarn: attention_factor = 0.1 ln(4) + 1, beta_fast/beta_slow default to 32/1
    (YARN_SCALING, RopeScaling("yarn", 4.0, 32768, beta_fast=32.0, beta_slow=1.0,
                               attention_factor=0.1 * math.log(4.0) + 1.0)),
    # yarn without original_max_position_embeddings: standardize_rope_params fills in max_position_embeddings
    ({"rope_type": "yarn", "factor": 2.0, "beta_fast": 16, "mscale": 2.0, "mscale_all_dim": 1.0},
     RopeScaling("yarn", 2.0, 512, beta_fast=16.0, beta_slow=1.0,
                 attention_factor=(0.2 * math.log(2.0) + 1.0) / (0.1 * math.log(2.0) + 1.0))),
    ({"rope_type": "yarn", "factor": 2.0, "attention_factor": 0.5, "truncate": False},
     RopeScaling("yarn", 2.0, 512, beta_fast=32.0, beta_slow=1.0, attention_factor=0.5, truncate=False)),
])
def test_rope_scaling_is_read_in_both_spellings(spec, expected):
    four = ModelConfig.from_hf(with_changes(LLAMA_4X, rope_scaling=spec))
    five = ModelConfig.from_hf(with_changes(LLAMA_5X, rope_parameters={**spec, "rope_theta": 5e5}))
    assert four.rope_scaling == five.rope_scaling == expected
    assert four.rope_theta == five.rope_theta == 5e5
    assert ModelConfig.from_hf(four.to_hf()) == four        # and it saves back as it was read
    # dynamic NTK runs past max_position_embeddings: minikv allows factor times it
    assert four.max_positions == (int(expected.factor * 512) if expected.rope_type == "dynamic" else 512)


def test_top_level_original_max_position_embeddings_wins_as_in_transformers():
    c = ModelConfig.from_hf(with_changes(LLAMA_4X, rope_scaling=LLAMA3_SCALING, original_max_position_embeddings=64))
    assert c.rope_scaling.original_max_position_embeddings == 64


@pytest.mark.parametrize("spec,names", [
    ({"rope_type": "longrope", "factor": 8.0, "long_factor": [1.0], "short_factor": [1.0]}, ("rope_type", "longrope")),
    ({"type": "su", "factor": 2.0}, ("rope_type", "su")),
    ({"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0}, ("low_freq_factor", "linear")),
    ({"rope_type": "linear"}, ("factor",)),
    ({"rope_type": "dynamic", "factor": 0}, ("factor",)),
    ({**LLAMA3_SCALING, "low_freq_factor": None}, ("low_freq_factor",)),
    ({**LLAMA3_SCALING, "low_freq_factor": 4.0}, ("high_freq_factor",)),
    ({**YARN_SCALING, "truncate": "yes"}, ("truncate",)),
])
def test_unsupported_rope_scaling_is_refused_without_advising_an_edit(spec, names):
    for hf, source in ((with_changes(LLAMA_4X, rope_scaling=spec), "rope_scaling"),
                       (with_changes(LLAMA_5X, rope_parameters={**spec, "rope_theta": 5e5}), "rope_parameters")):
        error = refused(hf, source, *names)
        # The old message said "remove the scaling": that runs the model with other numbers.
        assert "remove" not in str(error) and "set it to" not in str(error)


QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 300, "hidden_size": 64,
         "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 24, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
         "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "use_sliding_window": False,
         "sliding_window": None, "max_window_layers": 2, "layer_types": ["full_attention"] * 2,
         "attention_bias": False, "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": 5}
GEMMA3 = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 300, "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1,
          "head_dim": 16, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
          "query_pre_attn_scalar": 24, "sliding_window": 8,
          "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
          "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
          "final_logit_softcapping": None, "attn_logit_softcapping": None, "use_bidirectional_attention": False,
          "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": [1, 106]}
GEMMA3_4X = {**{k: v for k, v in GEMMA3.items() if k not in ("rope_parameters", "layer_types")},
             "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
             "sliding_window_pattern": 3}


def test_qwen3():
    c = ModelConfig.from_hf(QWEN3)
    assert (c.model_type, c.family, c.qk_norm, c.head_dim, c.rope_theta, c.tie_word_embeddings) == (
        "qwen3", "llama", True, 24, 1e6, True)
    assert (c.qkv_bias, c.o_bias, c.layer_windows) == (False, False, (None, None))
    assert ModelConfig.from_hf(with_changes(QWEN3, head_dim=...)).head_dim == 128   # Qwen3Config's default
    assert ModelConfig.from_hf(with_changes(QWEN3, attention_bias=True)).o_bias
    refused(with_changes(QWEN3, use_sliding_window=True, sliding_window=16), "use_sliding_window")


@pytest.mark.parametrize("hf", [GEMMA3, GEMMA3_4X], ids=["transformers5", "transformers4"])
def test_gemma3_text(hf):
    c = ModelConfig.from_hf(hf)
    assert (c.model_type, c.family, c.qk_norm, c.is_gemma3) == ("gemma3_text", "llama", True, True)
    assert c.layer_types == ("sliding_attention", "sliding_attention", "full_attention")
    assert c.layer_windows == (8, 8, None)
    assert (c.rope_theta, c.rope_local_theta, c.rope_scaling) == (1e6, 1e4, RopeScaling("linear", 8.0))
    assert (c.query_pre_attn_scalar, c.final_logit_softcapping, c.eos_token_ids) == (24, None, (1, 106))
    assert ModelConfig.from_hf(c.to_hf()) == c


def test_gemma3_defaults_are_transformers_defaults():
    bare = {k: GEMMA3[k] for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                   "num_hidden_layers", "num_attention_heads")}
    c = ModelConfig.from_hf({**bare, "num_hidden_layers": 7})
    assert (c.head_dim, c.n_kv_heads, c.query_pre_attn_scalar, c.sliding_window, c.tie_word_embeddings) == (
        256, 4, 256, 4096, True)
    # sliding_window_pattern 6: layer i is global iff (i + 1) % 6 == 0
    assert c.layer_windows == (4096,) * 5 + (None, 4096)
    assert (c.rope_theta, c.rope_local_theta, c.rope_scaling) == (1e6, 1e4, None)


@pytest.mark.parametrize("changes,names", [
    (dict(attn_logit_softcapping=50.0), ("attn_logit_softcapping",)),
    (dict(use_bidirectional_attention=True), ("use_bidirectional_attention",)),
    (dict(hidden_activation="relu"), ("hidden_activation", "relu")),
    (dict(layer_types=["sliding_attention", "chunked_attention", "full_attention"]), ("layer_types",)),
    (dict(layer_types=["full_attention"]), ("layer_types",)),
    (dict(layer_types="sliding_attention"), ("layer_types",)),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
     ("sliding_attention", "linear")),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}), ("rope_parameters",)),
    (dict(query_pre_attn_scalar=0), ("query_pre_attn_scalar",)),
    (dict(query_pre_attn_scalar=24.5), ("query_pre_attn_scalar",)),
])
def test_gemma3_refusals(changes, names):
    refused(with_changes(GEMMA3, **changes), *names)


def test_gemma3_final_logit_softcapping_is_read():
    assert ModelConfig.from_hf(with_changes(GEMMA3, final_logit_softcapping=30.0)).final_logit_softcapping == 30.0


def test_default_rope_type_is_accepted_in_both_spellings():
    assert ModelConfig.from_hf(with_changes(LLAMA_4X, rope_scaling={"rope_type": "default"})).rope_theta == 5e5
    assert ModelConfig.from_hf(with_changes(LLAMA_5X, rope_parameters={"rope_theta": 1e6})).rope_theta == 1e6


@pytest.mark.parametrize("changes,field", [
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}),
     "partial_rotary_factor"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6}}), "rope_parameters"),
    (dict(rope_parameters=["default"]), "rope_parameters"),
    (dict(rope_theta="10000"), "rope_theta"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(rope_theta=-1.0), "rope_theta"),
])
def test_unsupported_or_malformed_rope_settings(changes, field):
    refused(with_changes(LLAMA_4X, **changes), field)


def test_odd_head_dim_with_rope_is_refused():
    refused(with_changes(MISTRAL, head_dim=7), "head_dim=7")
    refused(with_changes(LLAMA_4X, hidden_size=72, num_attention_heads=8, num_key_value_heads=8), "head_dim=9")
    # GPT-2 has no RoPE: an odd head size is fine there.
    assert ModelConfig.from_hf(with_changes(GPT2, n_embd=36, n_head=4)).head_dim == 9


def test_heads_not_divisible_by_kv_heads_is_refused():
    refused(with_changes(LLAMA_4X, num_key_value_heads=3), "num_attention_heads=8", "num_key_value_heads=3")


def test_hidden_not_divisible_by_heads_without_head_dim_is_refused():
    refused(with_changes(LLAMA_4X, hidden_size=60), "hidden_size=60", "num_attention_heads=8")
    refused(with_changes(GPT2, n_embd=50), "n_embd=50", "n_head=4")


def test_qwen2_sliding_window_is_refused():
    refused(with_changes(QWEN2, use_sliding_window=True), "use_sliding_window")


def test_non_full_attention_layer_types_are_refused():
    refused(with_changes(QWEN2, layer_types=["full_attention", "sliding_attention"]), "layer_types")


@pytest.mark.parametrize("changes,field", [
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(scale_attn_weights=False), "scale_attn_weights"),
    (dict(add_cross_attention=True), "add_cross_attention"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings"),
    (dict(activation_function="relu"), "activation_function"),
    (dict(n_head=0), "n_head"),
    (dict(n_layer=0), "n_layer"),
    (dict(n_positions=-5), "n_positions"),
    (dict(layer_norm_epsilon="1e-5"), "layer_norm_epsilon"),
])
def test_gpt2_refusals(changes, field):
    refused(with_changes(GPT2, **changes), field)


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu", "tanh"])
def test_non_silu_hidden_act_is_refused(act):
    refused(with_changes(LLAMA_4X, hidden_act=act), "hidden_act", act)
    assert ModelConfig.from_hf(with_changes(LLAMA_4X, hidden_act="swish")).model_type == "llama"  # same function


def test_pretraining_tp_is_refused():
    refused(with_changes(LLAMA_4X, pretraining_tp=2), "pretraining_tp")


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size"])
@pytest.mark.parametrize("base", [LLAMA_4X, MISTRAL, QWEN2], ids=["llama", "mistral", "qwen2"])
def test_missing_required_fields_are_refused(field, base):
    refused(with_changes(base, **{field: ...}), "missing", field)
    refused(with_changes(base, **{field: None}), field)


@pytest.mark.parametrize("field,value", [
    ("vocab_size", 0), ("vocab_size", 320.0), ("vocab_size", "320"), ("vocab_size", True),
    ("num_attention_heads", 0), ("num_hidden_layers", -1), ("num_key_value_heads", 0),
    ("head_dim", 2.5), ("rms_norm_eps", 0.0), ("rms_norm_eps", None), ("max_position_embeddings", 0),
    ("eos_token_id", "2"), ("bos_token_id", -1),
])
def test_malformed_fields_are_refused(field, value):
    refused(with_changes(LLAMA_4X, **{field: value}), field)


def test_bad_sliding_window_is_refused():
    refused(with_changes(MISTRAL, sliding_window=0), "sliding_window=0")
    refused(with_changes(MISTRAL, sliding_window=True), "sliding_window")


def test_direct_construction_validates_too():
    c = ModelConfig.from_hf(LLAMA_4X)
    with pytest.raises(ConfigError, match="rope_convention"):
        c.replace(rope_convention="neox")
    with pytest.raises(ConfigError, match="num_key_value_heads=3"):
        c.replace(n_kv_heads=3)
    with pytest.raises(ConfigError, match="head_dim"):
        c.replace(head_dim=7)


# ------------------------------------------------------------------ config.json files


def test_invalid_json_file_is_a_config_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama", "vocab_size": 10,')
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(path)
    path.write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_json(path)
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_json(tmp_path / "missing" / "config.json")


def test_from_json_reads_a_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_5X))
    assert ModelConfig.from_json(path) == ModelConfig.from_hf(LLAMA_5X)


# ------------------------------------------------------------------ to_hf


@pytest.mark.parametrize("name", FIXTURES)
def test_to_hf_round_trips_for_every_fixture(name):
    c = ModelConfig.from_json(FIXTURE_ROOT / name / "config.json")
    hf = c.to_hf()
    assert json.loads(json.dumps(hf)) == hf  # plain JSON
    assert ModelConfig.from_hf(hf) == c


@pytest.mark.parametrize("hf", [LLAMA_4X, LLAMA_5X, MISTRAL, QWEN2, GPT2], ids=["llama4", "llama5", "mistral",
                                                                               "qwen2", "gpt2"])
def test_to_hf_round_trips_for_hand_written_configs(hf):
    c = ModelConfig.from_hf(hf)
    assert ModelConfig.from_hf(c.to_hf()) == c


@st.composite
def llama_family_configs(draw):
    model_type = draw(st.sampled_from(["llama", "mistral", "qwen2"]))
    n_kv = draw(st.integers(1, 4))
    n_heads = n_kv * draw(st.integers(1, 4))
    head_dim = 2 * draw(st.integers(1, 32))
    hf = {"model_type": model_type, "vocab_size": draw(st.integers(1, 5000)),
          "hidden_size": draw(st.integers(1, 512)), "num_hidden_layers": draw(st.integers(1, 8)),
          "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "head_dim": head_dim,
          "intermediate_size": draw(st.integers(1, 1024)), "max_position_embeddings": draw(st.integers(1, 8192)),
          "rms_norm_eps": draw(st.sampled_from([1e-5, 1e-6, 3e-7])),
          "rope_theta": draw(st.sampled_from([10000.0, 5e5, 1e6, 1234.5])),
          "tie_word_embeddings": draw(st.booleans()),
          "bos_token_id": draw(st.none() | st.integers(0, 10)), "eos_token_id": draw(st.none() | st.integers(0, 10))}
    if model_type == "llama":
        hf["attention_bias"], hf["mlp_bias"] = draw(st.booleans()), draw(st.booleans())
    if model_type == "mistral":
        hf["sliding_window"] = draw(st.none() | st.integers(1, 8192))
    return hf


@settings(max_examples=100, deadline=None)
@given(hf=llama_family_configs())
def test_to_hf_round_trips_for_generated_configs(hf):
    c = ModelConfig.from_hf(hf)
    assert ModelConfig.from_hf(c.to_hf()) == c


def test_to_hf_refuses_the_interleaved_convention():
    c = ModelConfig.from_hf(LLAMA_4X).replace(rope_convention="interleaved")
    with pytest.raises(ConfigError, match="rope_convention"):
        c.to_hf()


@pytest.mark.parametrize("base,changes,field", [
    (QWEN2, dict(qkv_bias=False), "qkv_bias"),              # transformers' Qwen2 always has q/k/v biases
    (LLAMA_4X, dict(qkv_bias=True), "o_bias"),              # LLaMA's attention_bias covers o_proj too
    (MISTRAL, dict(mlp_bias=True), "mlp_bias"),             # Mistral has no MLP biases
    (LLAMA_4X, dict(sliding_window=16), "sliding_window"),  # LLaMA has no sliding window
])
def test_to_hf_refuses_what_transformers_cannot_express(base, changes, field):
    c = ModelConfig.from_hf(base).replace(**changes)
    with pytest.raises(ConfigError, match=field):
        c.to_hf()


def test_a_list_of_eos_ids_keeps_every_one_and_generation_stops_on_any():
    hf = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 1,
          "num_attention_heads": 2, "intermediate_size": 32, "eos_token_id": [5, 9, 11]}
    config = ModelConfig.from_hf(hf)
    assert config.eos_token_id == 5 and config.eos_token_ids == (5, 9, 11)
    assert ModelConfig.from_hf(config.to_hf()).eos_token_ids == (5, 9, 11)
    import numpy as np

    import minikv
    from minikv.checkpoint import expected_shapes
    from minikv.generate import Stream

    rng = np.random.default_rng(0)
    weights = {n: rng.standard_normal(s) for n, s in expected_shapes(config).items()}
    model = minikv.Transformer(config, weights, dtype="float64")
    assert list(Stream(model, [[1, 2]], 4).stop_tokens) == [5, 9, 11]


# ------------------------------------------------------------------ the real checkpoints the README names

REAL_CONFIGS = Path(__file__).parent / "fixtures" / "real_configs"
# name -> parameters as transformers 5.24 counts them for that config.json (a model built on the meta
# device, sum of numel), and what minikv must read from the file.
REAL = {
    "SmolLM2-135M": (134_515_008, "llama", None),
    "Llama-3.2-1B": (1_235_814_400, "llama", "llama3"),
    "Qwen2.5-0.5B": (494_032_768, "qwen2", None),
    "Qwen3-0.6B": (596_049_920, "qwen3", None),
    "gemma-3-270m": (268_098_176, "gemma3_text", None),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_checkpoint_configs_are_read_with_transformers_parameter_count(name):
    """The config.json files of the smallest real checkpoint of each family (as published, bf16) are
    accepted, and the tensors minikv expects add up to transformers' parameter count (the README's
    float32 sizes are these counts x 4 bytes)."""
    from minikv.checkpoint import expected_shapes

    n_params, model_type, rope_type = REAL[name]
    config = ModelConfig.from_json(REAL_CONFIGS / f"{name}.json")
    assert config.model_type == model_type
    assert (config.rope_scaling.rope_type if config.rope_scaling else None) == rope_type
    assert sum(math.prod(shape) for shape in expected_shapes(config).values()) == n_params
    if model_type == "gemma3_text":
        assert config.layer_windows == ((512,) * 5 + (None,)) * 3 and config.rope_local_theta == 1e4
