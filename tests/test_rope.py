"""RoPE: the rotation's properties, the two pair conventions, and the weight permutation between them.

What is proven here
-------------------
* apply_rope is a rotation: it keeps every head vector's norm (both conventions) and is the identity
  at position 0 (bit for bit: cos 0 = 1 and sin 0 = 0 exactly).
* The score rope(q, m) . rope(k, n) depends only on m - n: shifting both positions by s leaves it
  unchanged. This is the property RoPE exists for.
* "half" (HF rotate_half) and "interleaved" (Meta) are the same rotation of permuted dimensions:
  apply_rope(x[perm], "half") == apply_rope(x, "interleaved")[perm], bit for bit.
* Converting a whole model between conventions (Transformer.with_rope_convention) leaves the logits
  unchanged on every RoPE fixture (float64, 1e-12), and converting back restores the weights exactly.
* The silent bug is caught: HF-layout weights run with the interleaved rotation give logits far
  (> 1e-3) from Hugging Face's, so the conformance tolerance (1e-10) would flag it.
* The cos/sin table equals cos/sin computed directly with the math module.

Tolerances: float64 throughout. The rotation itself rounds each output by ~1 ulp, so norms agree
to ~1e-15 relative (we ask 1e-12). In the relative-position test the angles m * f and (m + s) * f
are rounded separately: at positions up to ~2000 an angle carries ~2000 * 2.2e-16 = 4.4e-13 rad of
error, so the scores agree to ~1e-12 * |q| |k|; we allow 1e-10 * |q| |k|, while a position bug
moves a score by O(|q| |k|).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from safetensors import safe_open

import minikv
from minikv.rope import (apply_rope, convert_rope_convention, cos_sin_table, interleaved_to_half_permutation,
                         inverse_frequencies, rope_angles)

FIXTURE_ROOT = Path(__file__).parent / "fixtures" / "hf"
ROPE_FIXTURES = ["llama_gqa", "llama_mqa_tied", "qwen2_bias", "mistral", "mistral_window"]
CONVENTIONS = ["half", "interleaved"]

head_dims = st.integers(1, 16).map(lambda n: 2 * n)
thetas = st.sampled_from([10000.0, 500000.0, 1e6, 100.0])
seeds = st.integers(0, 2**32 - 1)


def rope_at(x, positions, theta, convention):
    """Rotate x (..., seq, head_dim) to the given positions (seq,), with cos/sin straight from the angles."""
    angles = rope_angles(np.asarray(positions), x.shape[-1], theta)
    return apply_rope(x, np.cos(angles), np.sin(angles), convention)


# ------------------------------------------------------------------ the rotation


@settings(max_examples=60, deadline=None)
@given(head_dim=head_dims, theta=thetas, seed=seeds, convention=st.sampled_from(CONVENTIONS),
       positions=st.lists(st.integers(0, 100_000), min_size=1, max_size=6))
def test_rotation_preserves_norms(head_dim, theta, seed, convention, positions):
    x = np.random.default_rng(seed).standard_normal((3, len(positions), head_dim))
    rotated = rope_at(x, positions, theta, convention)
    np.testing.assert_allclose(np.linalg.norm(rotated, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(head_dim=head_dims, theta=thetas, seed=seeds, convention=st.sampled_from(CONVENTIONS))
def test_position_zero_is_the_identity(head_dim, theta, seed, convention):
    x = np.random.default_rng(seed).standard_normal((2, 1, head_dim))
    cos, sin = cos_sin_table(4, head_dim, theta, np.float64)
    assert np.array_equal(apply_rope(x, cos[:1], sin[:1], convention), x)


def test_nonzero_position_really_rotates():
    """Positive control: the two tests above would pass for a function that returns x unchanged."""
    x = np.random.default_rng(0).standard_normal((1, 8))
    for convention in CONVENTIONS:
        assert np.max(np.abs(rope_at(x, [3], 10000.0, convention) - x)) > 0.1


@settings(max_examples=80, deadline=None)
@given(head_dim=head_dims, theta=thetas, seed=seeds, convention=st.sampled_from(CONVENTIONS),
       m=st.integers(0, 1000), n=st.integers(0, 1000), shift=st.integers(-1000, 1000))
def test_score_depends_only_on_relative_position(head_dim, theta, seed, convention, m, n, shift):
    shift = max(shift, -min(m, n))  # keep positions >= 0
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((1, head_dim)), rng.standard_normal((1, head_dim))
    score = (rope_at(q, [m], theta, convention) @ rope_at(k, [n], theta, convention).T).item()
    shifted = (rope_at(q, [m + shift], theta, convention) @ rope_at(k, [n + shift], theta, convention).T).item()
    scale = np.linalg.norm(q) * np.linalg.norm(k)
    assert abs(score - shifted) <= 1e-10 * scale


def test_score_does_change_with_relative_position():
    """Positive control for the relative-position test: RoPE is not trivially position independent."""
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((1, 16)), rng.standard_normal((1, 16))
    for convention in CONVENTIONS:
        near = (rope_at(q, [5], 10000.0, convention) @ rope_at(k, [5], 10000.0, convention).T).item()
        far = (rope_at(q, [9], 10000.0, convention) @ rope_at(k, [5], 10000.0, convention).T).item()
        assert abs(near - far) > 1e-2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_apply_rope_keeps_the_dtype(dtype, convention):
    x = np.random.default_rng(2).standard_normal((2, 3, 5, 8)).astype(dtype)
    cos, sin = cos_sin_table(5, 8, 10000.0, dtype)
    out = apply_rope(x, cos, sin, convention)
    assert out.dtype == dtype and out.shape == x.shape


def test_unknown_convention_is_refused():
    x = np.zeros((1, 4))
    with pytest.raises(ValueError, match="convention='neox'"):
        apply_rope(x, np.ones((1, 2)), np.zeros((1, 2)), "neox")


# ------------------------------------------------------------------ the two conventions


@settings(max_examples=40, deadline=None)
@given(head_dim=head_dims, seed=seeds, positions=st.lists(st.integers(0, 5000), min_size=1, max_size=5))
def test_half_and_interleaved_are_related_by_the_permutation(head_dim, seed, positions):
    perm = interleaved_to_half_permutation(head_dim)
    assert sorted(perm.tolist()) == list(range(head_dim))  # a permutation
    x = np.random.default_rng(seed).standard_normal((2, len(positions), head_dim))
    half = rope_at(x[..., perm], positions, 10000.0, "half")
    interleaved = rope_at(x, positions, 10000.0, "interleaved")
    assert np.array_equal(half, interleaved[..., perm])


def test_the_permutation_pairs_the_right_dimensions():
    # "half" pairs (p, p + d/2); interleaved pairs (2p, 2p + 1): half dim p <- 2p, half dim p + d/2 <- 2p + 1.
    assert interleaved_to_half_permutation(8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_the_conventions_really_differ():
    """Without the permutation the two rotations disagree: the bug the conversion prevents."""
    x = np.random.default_rng(3).standard_normal((4, 8))
    assert np.max(np.abs(rope_at(x, range(4), 10000.0, "half") - rope_at(x, range(4), 10000.0, "interleaved"))) > 0.1


# ------------------------------------------------------------------ whole models

_models: dict[str, minikv.Transformer] = {}


def float64_model(name: str) -> minikv.Transformer:
    if name not in _models:
        _models[name] = minikv.load(FIXTURE_ROOT / name, dtype="float64")
    return _models[name]


def fixture_inputs(name: str) -> tuple[np.ndarray, np.ndarray]:
    with safe_open(str(FIXTURE_ROOT / name / "expected.safetensors"), framework="numpy") as f:
        return f.get_tensor("input_ids"), f.get_tensor("logits")


@pytest.mark.parametrize("name", ROPE_FIXTURES)
def test_converting_the_convention_leaves_the_logits_unchanged(name):
    model = float64_model(name)
    ids, _ = fixture_inputs(name)
    converted = model.with_rope_convention("interleaved")
    assert converted.config.rope_convention == "interleaved"
    # The q/k rows really moved (else the test below would be vacuous) ...
    q_name = "layers.0.attn.q.weight"
    assert not np.array_equal(converted.weights[q_name], model.weights[q_name])
    # ... and the logits did not.
    diff = np.max(np.abs(converted.forward(ids) - model.forward(ids)))
    assert diff <= 1e-12, f"{name}: converting to interleaved moved the logits by {diff:.3e}"
    back = converted.with_rope_convention("half")
    assert back.config == model.config
    for tensor_name, weight in model.weights.items():
        assert np.array_equal(back.weights[tensor_name], weight), tensor_name


@pytest.mark.parametrize("name", ROPE_FIXTURES)
def test_wrong_convention_on_hf_weights_is_caught(name):
    """The silent bug: HF (rotate_half) weights run with the interleaved rotation. The logits still look
    plausible (finite, same shape) but are far from Hugging Face's, so the conformance test catches it."""
    model = float64_model(name)
    ids, expected = fixture_inputs(name)
    assert np.max(np.abs(model.forward(ids) - expected)) < 1e-10
    wrong = minikv.Transformer(model.config.replace(rope_convention="interleaved"), model.weights, dtype="float64")
    logits = wrong.forward(ids)
    assert np.isfinite(logits).all() and logits.shape == expected.shape
    assert np.max(np.abs(logits - expected)) > 1e-3


def test_conversion_permutes_qk_biases_too():
    """Qwen2 has q/k biases: they are per-dimension, so they must move with the weight rows."""
    model = float64_model("qwen2_bias")
    weights, config = convert_rope_convention(model.weights, model.config, "interleaved")
    perm = np.argsort(interleaved_to_half_permutation(config.head_dim))
    bias = model.weights["layers.0.attn.k.bias"].reshape(config.n_kv_heads, config.head_dim)
    assert np.array_equal(weights["layers.0.attn.k.bias"], bias[:, perm].reshape(-1))
    # v is not rotated: it must not be permuted.
    assert np.array_equal(weights["layers.0.attn.v.bias"], model.weights["layers.0.attn.v.bias"])


def test_conversion_is_a_no_op_without_rope():
    model = minikv.load(FIXTURE_ROOT / "gpt2", dtype="float64")
    ids, _ = fixture_inputs("gpt2")
    same = model.with_rope_convention("interleaved")
    assert same.config == model.config
    assert np.array_equal(same.forward(ids), model.forward(ids))


def test_conversion_to_an_unknown_convention_is_refused():
    model = float64_model("llama_gqa")
    with pytest.raises(ValueError, match="to='neox'"):
        convert_rope_convention(model.weights, model.config, "neox")


# ------------------------------------------------------------------ the cos/sin table


@pytest.mark.parametrize("head_dim,theta", [(8, 10000.0), (16, 1e6), (64, 500000.0)])
def test_cos_sin_table_matches_direct_trigonometry(head_dim, theta):
    positions = 600
    cos64, sin64 = cos_sin_table(positions, head_dim, theta, np.float64)
    cos32, sin32 = cos_sin_table(positions, head_dim, theta, np.float32)
    assert cos64.shape == sin64.shape == (positions, head_dim // 2)
    assert cos32.dtype == sin32.dtype == np.float32
    direct_cos = np.array([[math.cos(p * theta ** (-2 * i / head_dim)) for i in range(head_dim // 2)]
                           for p in range(positions)])
    direct_sin = np.array([[math.sin(p * theta ** (-2 * i / head_dim)) for i in range(head_dim // 2)]
                           for p in range(positions)])
    # The two angle computations round differently by ~ulp(600) = 1e-13 rad.
    np.testing.assert_allclose(cos64, direct_cos, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sin64, direct_sin, rtol=0, atol=1e-12)
    # float32: rounded once from float64, so within half an ulp of values <= 1 (6e-8), plus the above.
    np.testing.assert_allclose(cos32, direct_cos, rtol=0, atol=6e-8 + 1e-12)
    np.testing.assert_allclose(sin32, direct_sin, rtol=0, atol=6e-8 + 1e-12)


def test_inverse_frequencies_follow_the_formula():
    inv = inverse_frequencies(8, 10000.0)
    assert inv.dtype == np.float64
    np.testing.assert_allclose(inv, [1.0, 10000.0 ** -0.25, 10000.0 ** -0.5, 10000.0 ** -0.75], rtol=1e-15)
