"""Build the Hugging Face conformance fixtures in tests/fixtures/hf/.

Run by hand (never by the tests; the tests must not need torch):

    python scripts/make_hf_fixtures.py            # writes tests/fixtures/hf/<name>/
    python scripts/make_hf_fixtures.py --check    # rebuild in a temp dir, compare with the committed files
    python scripts/make_hf_fixtures.py --families-only   # only tests/fixtures/hf_families/ (see below)

Needs torch (2.13.0) and transformers (5.x). For each tiny, randomly initialised model it writes

    tests/fixtures/hf/<name>/config.json          save_pretrained(..., safe_serialization=True)
    tests/fixtures/hf/<name>/model.safetensors    float32 weights, HF tensor names
    tests/fixtures/hf/<name>/expected.safetensors input_ids (int64, (2, 11)) and logits (float64, (2, 11, vocab))

The expected logits are what Hugging Face's own model computes, in float64, with eager attention
and an all-ones attention mask. minikv's tests load the folder with minikv.load and compare.

Why the reference needs patching to be float64
----------------------------------------------
`model.double()` alone is *not* a float64 model in transformers 5.x for the llama family: three
places compute in float32 on purpose (to be safe in bfloat16 training):

  * LlamaRMSNorm.forward casts the hidden state to float32, normalises, casts back;
  * the rotary embedding computes inv_freq and position * inv_freq in float32;
  * eager attention calls softmax(..., dtype=torch.float32).

Each rounds to float32's ~6e-8 relative precision, which after two layers moves the logits by
~1e-7..1e-6: the same size as the float64 tolerance we want to test with. So while computing the
reference we patch those three spots to keep float64 (`float64_everywhere`). The patched model
computes the same mathematical function; the script checks that its logits agree with the
unpatched HF float32 model to float32 accuracy, and records both gaps in the metadata.

The bfloat16 families (tests/fixtures/hf_families/)
--------------------------------------------------
LLaMA with RoPE scaling llama3 / linear / dynamic / yarn, Qwen3 (plain and yarn) and Gemma 3 text,
each saved the way Hub checkpoints are: **bfloat16**. A tiny original length (16) and 40-token
inputs cross every scaling's original_max_position_embeddings; Gemma's window of 8 is crossed too.
expected.safetensors holds input_ids (2, 40), `logits` (float64: the patched exact reference on the
weights upcast from bf16), `logits_float32` (transformers' own float32 model on the same upcast
weights, unpatched) and `generated` (transformers' float32 greedy `generate` ids, new tokens only).
The float64 reference computes the scaled inverse frequencies in float64 with the formulas of
transformers' modeling_rope_utils (checked against transformers' float32 ones to 1e-6), keeps
Gemma's (1 + w) RMSNorm in float64, and uses the float64 sqrt(d) embedding scale.

Bias and norm parameters
------------------------
HF initialises every bias to 0 and every norm weight to 1, so a loader that forgot a bias or a
norm weight would still pass. After the HF init we overwrite them with seeded random values
(bias ~ N(0, 0.1), norm weight ~ 1 + N(0, 0.1)) so each tensor in the checkpoint matters.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURE_DIR = REPO_ROOT / "tests" / "fixtures" / "hf"
FAMILY_FIXTURE_DIR = REPO_ROOT / "tests" / "fixtures" / "hf_families"

BATCH, SEQ = 2, 11  # the fixed input shape
SLIDING_WINDOW = 4  # mistral_window: shorter than SEQ so the window changes the logits


# ---------------------------------------------------------------------------------------------
# The models. Each entry: (name, seed, model class, config).
# ---------------------------------------------------------------------------------------------

def model_specs():
    common_llama = dict(
        num_hidden_layers=2,
        max_position_embeddings=64,
        initializer_range=0.2,
        hidden_act="silu",
        attention_dropout=0.0,
    )
    return [
        (
            "llama_gqa",
            1001,
            LlamaForCausalLM,
            LlamaConfig(
                vocab_size=97,
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                rope_theta=10000.0,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                **common_llama,
            ),
        ),
        (
            "llama_mqa_tied",
            1002,
            LlamaForCausalLM,
            LlamaConfig(
                vocab_size=128,
                hidden_size=48,
                intermediate_size=96,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=16,  # != 48 / 4 = 12: q_proj is (64, 48), o_proj is (48, 64)
                rope_theta=500000.0,
                rms_norm_eps=1e-5,
                tie_word_embeddings=True,
                **common_llama,
            ),
        ),
        (
            "qwen2_bias",
            1003,
            Qwen2ForCausalLM,
            Qwen2Config(
                vocab_size=113,
                hidden_size=64,
                intermediate_size=96,
                num_attention_heads=4,
                num_key_value_heads=2,
                rope_theta=1000000.0,
                rms_norm_eps=1e-6,
                tie_word_embeddings=True,
                use_sliding_window=False,
                **common_llama,
            ),
        ),
        (
            "mistral",
            1004,
            MistralForCausalLM,
            MistralConfig(
                vocab_size=101,
                hidden_size=32,
                intermediate_size=80,
                num_attention_heads=4,
                num_key_value_heads=2,
                rope_theta=10000.0,
                rms_norm_eps=1e-5,
                sliding_window=64,  # longer than the 11-token inputs: no effect here
                tie_word_embeddings=False,
                **common_llama,
            ),
        ),
        (
            "mistral_window",
            1005,
            MistralForCausalLM,
            MistralConfig(
                vocab_size=101,
                hidden_size=32,
                intermediate_size=80,
                num_attention_heads=4,
                num_key_value_heads=2,
                rope_theta=10000.0,
                rms_norm_eps=1e-5,
                sliding_window=SLIDING_WINDOW,
                tie_word_embeddings=False,
                **common_llama,
            ),
        ),
        (
            "gpt2",
            1006,
            GPT2LMHeadModel,
            GPT2Config(
                vocab_size=100,
                n_positions=64,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_inner=None,  # HF default: 4 * n_embd = 128, as in the real gpt2 config
                activation_function="gelu_new",
                layer_norm_epsilon=1e-5,
                initializer_range=0.2,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                tie_word_embeddings=True,
                bos_token_id=99,  # HF's default 50256 lies outside this vocabulary
                eos_token_id=99,
            ),
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Building one model
# ---------------------------------------------------------------------------------------------

def build_model(model_cls, config, seed: int) -> torch.nn.Module:
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config)
    model.eval()
    # Make biases and norm weights non-trivial (see the module docstring). Draw from a generator
    # of our own, in the deterministic order of named_parameters().
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            elif param.ndim == 1 and ("norm" in name or ".ln_" in name or name.startswith("transformer.ln_f")):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
    return model


def make_input_ids(vocab_size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(BATCH, SEQ), dtype=np.int64)
    ids[0, 2] = 0  # the smallest id
    ids[1, 5] = vocab_size - 1  # the largest id
    return ids


# ---------------------------------------------------------------------------------------------
# float64 reference: undo transformers' deliberate float32 islands (see module docstring)
# ---------------------------------------------------------------------------------------------

def _rms_norm_keep_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary_forward_float64(self, x, position_ids):
    # Same math as LlamaRotaryEmbedding.forward (default rope type), in float64 throughout.
    base = self.config.rope_parameters["rope_theta"]
    dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = position_ids[..., None].to(torch.float64) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    assert self.attention_scaling == 1.0
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _softmax_keeping_float64():
    """(torch's softmax, a softmax that keeps float64 where eager attention asks for float32)."""
    original_softmax = torch.nn.functional.softmax

    def softmax_keep_float64(input, dim=None, _stacklevel=3, dtype=None):
        if dtype == torch.float32 and input.dtype == torch.float64:
            dtype = torch.float64
        return original_softmax(input, dim=dim, dtype=dtype)

    return original_softmax, softmax_keep_float64


@contextlib.contextmanager
def float64_everywhere(model):
    """Patch RMSNorm, rotary embedding and softmax of `model` to compute in the input dtype."""
    original_softmax, softmax_keep_float64 = _softmax_keeping_float64()

    patched = []
    for module in model.modules():
        cls_name = type(module).__name__
        if cls_name.endswith("RMSNorm"):
            patched.append((module, "forward"))
            module.forward = _rms_norm_keep_dtype.__get__(module)
        elif cls_name.endswith("RotaryEmbedding"):
            assert module.rope_type == "default", module.rope_type
            patched.append((module, "forward"))
            module.forward = _rotary_forward_float64.__get__(module)
    torch.nn.functional.softmax = softmax_keep_float64
    try:
        yield
    finally:
        torch.nn.functional.softmax = original_softmax
        for module, attr in patched:
            delattr(module, attr)  # drop the instance attribute: the class method shows again


def run_logits(model, input_ids: np.ndarray) -> np.ndarray:
    ids = torch.from_numpy(input_ids)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits.detach().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Writing one fixture
# ---------------------------------------------------------------------------------------------

def make_fixture(name, seed, model_cls, config, out_root: Path) -> dict:
    model = build_model(model_cls, config, seed)
    folder = out_root / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    # Save first, in float32: the float64 reference below uses exactly these (float32-representable) weights.
    model.save_pretrained(folder, safe_serialization=True)

    input_ids = make_input_ids(config.vocab_size, seed)
    logits_hf_float32 = run_logits(model, input_ids)

    model.double()
    logits_hf_double_unpatched = run_logits(model, input_ids)
    with float64_everywhere(model):
        logits = run_logits(model, input_ids)
    assert logits.dtype == np.float64 and logits.shape == (BATCH, SEQ, config.vocab_size)

    gap_float32 = float(np.max(np.abs(logits - logits_hf_float32)))
    gap_unpatched = float(np.max(np.abs(logits - logits_hf_double_unpatched)))
    # The patched model must compute the same function as HF's: agree to float32 accuracy.
    assert gap_float32 < 1e-4, (name, gap_float32)
    assert gap_unpatched < 1e-4, (name, gap_unpatched)
    assert float(np.std(logits)) > 0.1, (name, float(np.std(logits)))

    metadata = {
        "model": name,
        "model_class": model_cls.__name__,
        "seed": str(seed),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "attn_implementation": "eager",
        "attention_mask": "all ones",
        "reference": "HF model.double(); any RMSNorm, rotary embedding and softmax kept in float64 (transformers casts them to float32)",
        "max_abs_diff_vs_hf_float32": repr(gap_float32),
        "max_abs_diff_vs_hf_double_unpatched": repr(gap_unpatched),
        "generator": "scripts/make_hf_fixtures.py",
    }
    save_file({"input_ids": input_ids, "logits": logits}, str(folder / "expected.safetensors"), metadata=metadata)
    sort_safetensors_metadata(folder / "expected.safetensors")
    return {
        "name": name,
        "logits_std": float(np.std(logits)),
        "gap_vs_hf_float32": gap_float32,
        "gap_vs_hf_double_unpatched": gap_unpatched,
    }


def sort_safetensors_metadata(path: Path) -> None:
    """Rewrite the header with the metadata keys sorted, so reruns give byte-identical files.

    safetensors writes `__metadata__` from a Rust HashMap, whose order changes from run to run.
    A file is: 8-byte little-endian header length n, n bytes of JSON (space-padded), the data.
    Reordering keys keeps the JSON's length, so the data offsets stay valid.
    """
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    new_header = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(new_header) <= n, (len(new_header), n)
    path.write_bytes(raw[:8] + new_header.ljust(n, b" ") + raw[8 + n :])


def check_sliding_window_semantics() -> dict:
    """Pin down HF's window numerically: is key j visible to query i iff i - j < W, or i - j <= W?

    A Mistral model with window W and the same model without a window agree exactly at every
    position i where the window hides nothing (in both layers). Under "i - j < W" the first
    position where a key drops out is i = W (key 0); under "i - j <= W" it is i = W + 1.
    """
    name, seed, model_cls, config = next(s for s in model_specs() if s[0] == "mistral_window")
    W = config.sliding_window
    windowed = build_model(model_cls, config, seed).double()
    unwindowed_config = MistralConfig(**{**config.to_dict(), "sliding_window": None})
    unwindowed = build_model(model_cls, unwindowed_config, seed).double()
    for (n1, p1), (n2, p2) in zip(windowed.named_parameters(), unwindowed.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    input_ids = make_input_ids(config.vocab_size, seed)
    with float64_everywhere(windowed):
        a = run_logits(windowed, input_ids)
    with float64_everywhere(unwindowed):
        b = run_logits(unwindowed, input_ids)
    per_position = np.max(np.abs(a - b), axis=(0, 2))
    first_diff = int(np.argmax(per_position > 0))
    assert np.all(per_position[:W] == 0.0), per_position
    assert per_position[W] > 1e-3, per_position  # query W no longer sees key 0: "i - j < W"
    assert np.all(per_position[W:] > 1e-3), per_position
    return {"window": W, "first_position_that_differs": first_diff, "per_position_max_diff": per_position.tolist()}


# ---------------------------------------------------------------------------------------------
# bfloat16 families: RoPE scaling, Qwen3, Gemma 3 (see the module docstring)
# ---------------------------------------------------------------------------------------------

FAMILY_SEQ = 40          # > ORIGINAL: crosses every scaling's original length (and Gemma's window)
ORIGINAL = 16            # original_max_position_embeddings of the scaled fixtures
GEMMA_WINDOW = 8
NEW_TOKENS = 8           # greedy tokens generated per row


def family_specs():
    llama = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128, initializer_range=0.2,
                 tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)

    def llama_rope(rope):
        return LlamaConfig(**llama, rope_parameters=rope)

    qwen3 = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-6, max_position_embeddings=128,
                 initializer_range=0.2, tie_word_embeddings=True, use_sliding_window=False,
                 bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return [
        ("llama_rope_llama3", 2001, LlamaForCausalLM, llama_rope(
            {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL})),
        ("llama_rope_linear", 2002, LlamaForCausalLM, llama_rope(
            {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
        # dynamic NTK's original length is max_position_embeddings itself; minikv allows factor x 16 = 64
        ("llama_rope_dynamic", 2003, LlamaForCausalLM, LlamaConfig(
            **{**llama, "max_position_embeddings": ORIGINAL},
            rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0})),
        # a small theta and narrow betas so the ramp spans several of the 8 frequency pairs
        ("llama_rope_yarn", 2004, LlamaForCausalLM, llama_rope(
            {"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
             "beta_fast": 4.0, "beta_slow": 0.25})),
        ("qwen3", 2005, Qwen3ForCausalLM, Qwen3Config(
            **qwen3, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
        # yarn as Qwen3 ships it for long context (default betas; attention factor 0.1 ln 4 + 1)
        ("qwen3_yarn", 2006, Qwen3ForCausalLM, Qwen3Config(
            **qwen3, rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                      "original_max_position_embeddings": ORIGINAL})),
        ("gemma3_text", 2007, Gemma3ForCausalLM, Gemma3TextConfig(
            vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=24, rms_norm_eps=1e-6,
            max_position_embeddings=128, initializer_range=0.2, sliding_window=GEMMA_WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
            final_logit_softcapping=5.0, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)),
    ]


def float64_inverse_frequencies(params: dict, head_dim: int, max_position_embeddings: int,
                                seq_len: int) -> tuple[torch.Tensor, float]:
    """transformers 5.24's _compute_<type>_parameters, in float64 (theirs run in float32)."""
    base = params["rope_theta"]
    rope_type = params.get("rope_type", "default")
    dim = head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    inv_freq = 1.0 / (base ** exponents)
    if rope_type == "default":
        return inv_freq, 1.0
    factor = params["factor"]
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    if rope_type == "dynamic":
        seq_len = max(seq_len, max_position_embeddings)
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** exponents), 1.0
    original = params["original_max_position_embeddings"]
    if rope_type == "llama3":
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < original / high) * ~(wavelen > original / low)
        return torch.where(medium, smoothed, scaled), 1.0
    assert rope_type == "yarn", rope_type
    attention_factor = params.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    return inv, float(attention_factor)


def _rope_params(module, layer_type):
    params = module.config.rope_parameters
    return params[layer_type] if layer_type is not None else params


def _rotary_forward_float64_scaled(self, x, position_ids, layer_type=None):
    """Any supported RoPE type in float64; dynamic NTK uses L = max(position) + 1 of this call, like
    transformers' dynamic_rope_update for a fresh model and growing inputs."""
    config = self.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq, scaling = float64_inverse_frequencies(_rope_params(self, layer_type), head_dim,
                                                    config.max_position_embeddings, int(position_ids.max()) + 1)
    freqs = position_ids[..., None].to(torch.float64) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)


def _gemma_rms_norm_keep_dtype(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


@contextlib.contextmanager
def float64_families(model):
    """float64_everywhere for the new families: scaled RoPE, Gemma's norm and embedding scale too."""
    original_softmax, softmax_keep_float64 = _softmax_keeping_float64()

    patched = []
    for module in model.modules():
        cls_name = type(module).__name__
        if cls_name == "Gemma3RMSNorm":
            patched.append(module)
            module.forward = _gemma_rms_norm_keep_dtype.__get__(module)
        elif cls_name.endswith("RMSNorm"):
            patched.append(module)
            module.forward = _rms_norm_keep_dtype.__get__(module)
        elif cls_name.endswith("RotaryEmbedding"):
            patched.append(module)
            module.forward = _rotary_forward_float64_scaled.__get__(module)
        elif cls_name == "Gemma3TextScaledWordEmbedding":
            # transformers builds the scale as a float32 tensor: sqrt(d) rounded to float32
            module.embed_scale.fill_(math.sqrt(model.config.hidden_size))
    torch.nn.functional.softmax = softmax_keep_float64
    try:
        yield
    finally:
        torch.nn.functional.softmax = original_softmax
        for module in patched:
            delattr(module, "forward")


def check_inverse_frequencies_against_transformers(model) -> float:
    """Our float64 formulas must be transformers' own (their float32 buffers) to float32 accuracy."""
    worst = 0.0
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for module in model.modules():
        if not type(module).__name__.endswith("RotaryEmbedding"):
            continue
        layer_types = sorted(set(config.layer_types)) if hasattr(module, "layer_types") else [None]
        for layer_type in layer_types:
            prefix = "" if layer_type is None else f"{layer_type}_"
            theirs = getattr(module, f"{prefix}original_inv_freq").double()
            scaling = getattr(module, f"{prefix}attention_scaling", getattr(module, "attention_scaling", 1.0))
            ours, our_scaling = float64_inverse_frequencies(_rope_params(module, layer_type), head_dim,
                                                           config.max_position_embeddings, 0)
            rel = float(((ours - theirs).abs() / theirs.abs()).max())
            assert rel < 1e-6 and abs(our_scaling - scaling) < 1e-6, (layer_type, rel, our_scaling, scaling)
            worst = max(worst, rel)
    return worst


def build_family_model(model_cls, config, seed):
    model = build_model(model_cls, config, seed)
    if model_cls is Gemma3ForCausalLM:
        # Gemma's norm weights are offsets from 1 (zero init): random offsets instead of build_model's 1 + N.
        gen = torch.Generator().manual_seed(seed + 11)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model


def make_family_fixture(name, seed, model_cls, config, out_root: Path) -> dict:
    folder = out_root / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    model = build_family_model(model_cls, config, seed)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    header = json.loads((folder / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (folder / "model.safetensors").read_bytes()[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}, name

    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, config.vocab_size, size=(BATCH, FAMILY_SEQ), dtype=np.int64)
    input_ids[0, 2], input_ids[1, 5] = 0, config.vocab_size - 1

    def load(dtype):
        loaded = model_cls.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
        return loaded.eval()

    hf32 = load(torch.float32)                     # the bf16 weights upcast, exactly
    rope_gap = check_inverse_frequencies_against_transformers(hf32)
    logits_float32 = run_logits(hf32, input_ids).astype(np.float32)
    with torch.no_grad():
        generated = hf32.generate(torch.from_numpy(input_ids), attention_mask=torch.ones_like(torch.from_numpy(input_ids)),
                                  max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    generated = generated[:, FAMILY_SEQ:].numpy().astype(np.int64)

    hf64 = load(torch.float64)
    with float64_families(hf64):
        logits = run_logits(hf64, input_ids)
        with torch.no_grad():
            generated64 = hf64.generate(torch.from_numpy(input_ids),
                                        attention_mask=torch.ones_like(torch.from_numpy(input_ids)),
                                        max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert logits.dtype == np.float64 and logits.shape == (BATCH, FAMILY_SEQ, config.vocab_size)
    gap_float32 = float(np.max(np.abs(logits - logits_float32)))
    assert gap_float32 < 1e-4, (name, gap_float32)
    # Greedy ids must not hinge on rounding: the exact reference picks the same tokens.
    assert np.array_equal(generated64[:, FAMILY_SEQ:].numpy(), generated), (name, generated, generated64)
    assert float(np.std(logits)) > 0.1, name
    metadata = {
        "model": name, "model_class": model_cls.__name__, "seed": str(seed), "weights": "bfloat16",
        "transformers_version": transformers.__version__, "torch_version": torch.__version__,
        "numpy_version": np.__version__, "attn_implementation": "eager", "attention_mask": "all ones",
        "reference": "HF float64 model on the bf16 weights; RMSNorm (also Gemma's 1 + w), scaled RoPE (float64 "
                     "formulas of modeling_rope_utils), softmax and the embedding scale kept in float64",
        "logits_float32": "HF float32 model, unpatched, on the same weights",
        "generated": f"HF float32 greedy generate, {NEW_TOKENS} new tokens, no eos",
        "max_abs_diff_vs_hf_float32": repr(gap_float32),
        "max_rel_diff_inv_freq_vs_hf_float32": repr(rope_gap),
        "generator": "scripts/make_hf_fixtures.py",
    }
    save_file({"input_ids": input_ids, "logits": logits, "logits_float32": logits_float32, "generated": generated},
              str(folder / "expected.safetensors"), metadata=metadata)
    sort_safetensors_metadata(folder / "expected.safetensors")
    return {"name": name, "logits_std": float(np.std(logits)), "gap_vs_hf_float32": gap_float32,
            "gap_vs_hf_double_unpatched": rope_gap}


def check_gemma3_window_semantics() -> dict:
    """Gemma 3's sliding layers in transformers 5.24: is key j visible to query i iff i - j < W (W keys,
    as Mistral) or i - j <= W? A model whose layers all slide, against the same weights with a window
    longer than the input: the first position that differs is W under "i - j < W"."""
    name, seed, model_cls, config = next(s for s in family_specs() if s[0] == "gemma3_text")
    base = {**config.to_dict(), "layer_types": ["sliding_attention"] * config.num_hidden_layers}
    base.pop("sliding_window_pattern", None)
    windowed = build_family_model(model_cls, Gemma3TextConfig(**base), seed).double()
    wide = build_family_model(model_cls, Gemma3TextConfig(**{**base, "sliding_window": 1000}), seed).double()
    input_ids = np.random.default_rng(seed).integers(0, config.vocab_size, size=(BATCH, FAMILY_SEQ))
    with float64_families(windowed):
        a = run_logits(windowed, input_ids)
    with float64_families(wide):
        b = run_logits(wide, input_ids)
    per_position = np.max(np.abs(a - b), axis=(0, 2))
    W = config.sliding_window
    assert np.all(per_position[:W] == 0.0) and per_position[W] > 1e-6, per_position
    return {"window": W, "first_position_that_differs": int(np.argmax(per_position > 0))}


def write_families(out_root: Path) -> list[dict]:
    out_root.mkdir(parents=True, exist_ok=True)
    return [make_family_fixture(*spec, out_root=out_root) for spec in family_specs()]


def write_all(out_root: Path) -> list[dict]:
    out_root.mkdir(parents=True, exist_ok=True)
    return [make_fixture(*spec, out_root=out_root) for spec in model_specs()]


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare with the committed fixtures")
    parser.add_argument("--out", type=Path, default=FIXTURE_DIR)
    parser.add_argument("--families-out", type=Path, default=FAMILY_FIXTURE_DIR)
    parser.add_argument("--families-only", action="store_true", help="only the bf16 families (hf_families/)")
    args = parser.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # the same reduction order every run

    window = check_sliding_window_semantics()
    print(f"sliding window W={window['window']}: first position that differs from no window = "
          f"{window['first_position_that_differs']}  => key j visible iff i - j < W")
    gemma_window = check_gemma3_window_semantics()
    print(f"gemma3 sliding window W={gemma_window['window']}: first position that differs = "
          f"{gemma_window['first_position_that_differs']}  => key j visible iff i - j < W (as Mistral)")

    if args.families_only:
        for row in write_families(args.families_out):
            print(f"{row['name']:18s} logits std {row['logits_std']:.3f}  |ref - hf float32| "
                  f"{row['gap_vs_hf_float32']:.2e}  inv_freq rel gap {row['gap_vs_hf_double_unpatched']:.1e}")
        return 0

    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            write_all(Path(tmp) / "hf")
            write_families(Path(tmp) / "hf_families")
            new = {**file_digests(Path(tmp) / "hf"),
                   **{"hf_families/" + k: v for k, v in file_digests(Path(tmp) / "hf_families").items()}}
            old = {**file_digests(args.out),
                   **{"hf_families/" + k: v for k, v in file_digests(args.families_out).items()}}
        if new != old:
            print("MISMATCH:", json.dumps({k: (old.get(k), new.get(k)) for k in set(new) | set(old) if old.get(k) != new.get(k)}, indent=1))
            return 1
        print(f"OK: {len(new)} files identical")
        return 0

    write_families(args.families_out)
    for row in write_all(args.out):
        print(f"{row['name']:16s} logits std {row['logits_std']:.3f}  "
              f"|ref - hf float32| {row['gap_vs_hf_float32']:.2e}  "
              f"|ref - hf double unpatched| {row['gap_vs_hf_double_unpatched']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
