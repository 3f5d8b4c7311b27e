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


# ------------------------------------------------------------------ scaled RoPE (long context)
#
# Each scaling against the formula written out here per frequency pair with the math module, as the
# papers / transformers 5.24's modeling_rope_utils state it (the fixtures in tests/fixtures/hf_families
# then check the whole model against transformers itself).

def direct_frequency(p: int, d: int, theta: float) -> float:
    return theta ** (-(2 * p) / d)


def direct_llama3(p, d, theta, factor, low, high, original):
    f = direct_frequency(p, d, theta)
    wavelength = 2 * math.pi / f
    if wavelength < original / high:
        return f                                    # fast pairs: unchanged
    if wavelength > original / low:
        return f / factor                           # slow pairs: interpolated
    s = (original / wavelength - low) / (high - low)
    return (1 - s) * f / factor + s * f


def direct_yarn(p, d, theta, factor, original, beta_fast, beta_slow, truncate):
    f = direct_frequency(p, d, theta)
    # the pair index that turns r times over the original length: r = original * f_p / (2 pi)
    def pair_dim(r):
        return d * math.log(original / (r * 2 * math.pi)) / (2 * math.log(theta))
    low, high = pair_dim(beta_fast), pair_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = min(max((p - low) / (high - low), 0.0), 1.0)     # 0: keep f (extrapolate), 1: f / factor
    return f / factor * ramp + f * (1 - ramp)


scaled_kinds = st.sampled_from(["linear", "dynamic", "llama3", "yarn"])


@settings(max_examples=80, deadline=None)
@given(kind=scaled_kinds, head_dim=st.integers(2, 64).map(lambda n: 2 * n),
       theta=st.sampled_from([100.0, 10000.0, 500000.0, 1e6]), factor=st.sampled_from([1.5, 2.0, 4.0, 8.0, 32.0]),
       original=st.sampled_from([16, 64, 4096, 8192, 32768]), seq_len=st.integers(1, 200_000),
       betas=st.sampled_from([(32.0, 1.0), (4.0, 0.25), (8.0, 2.0)]), truncate=st.booleans(),
       freq_factors=st.sampled_from([(1.0, 4.0), (2.0, 8.0)]))
def test_scaled_inverse_frequencies_match_the_direct_formula(kind, head_dim, theta, factor, original, seq_len, betas,
                                                             truncate, freq_factors):
    from minikv.config import RopeScaling
    from minikv.rope import scaled_inverse_frequencies

    low, high = freq_factors
    scaling = RopeScaling(kind, factor, original, low_freq_factor=low, high_freq_factor=high,
                          beta_fast=betas[0], beta_slow=betas[1], attention_factor=1.25, truncate=truncate)
    ours, attention_factor = scaled_inverse_frequencies(head_dim, theta, scaling, seq_len=seq_len)
    pairs = range(head_dim // 2)
    if kind == "linear":
        direct = [direct_frequency(p, head_dim, theta) / factor for p in pairs]
    elif kind == "dynamic":
        length = max(seq_len, original)
        base = theta * (factor * length / original - (factor - 1)) ** (head_dim / (head_dim - 2))
        direct = [direct_frequency(p, head_dim, base) for p in pairs]
    elif kind == "llama3":
        direct = [direct_llama3(p, head_dim, theta, factor, low, high, original) for p in pairs]
    else:
        direct = [direct_yarn(p, head_dim, theta, factor, original, betas[0], betas[1], truncate) for p in pairs]
    assert ours.dtype == np.float64 and ours.shape == (head_dim // 2,)
    np.testing.assert_allclose(ours, direct, rtol=1e-12, atol=0)
    assert attention_factor == (1.25 if kind == "yarn" else 1.0)


def test_dynamic_ntk_is_plain_rope_up_to_the_original_length():
    from minikv.config import RopeScaling
    from minikv.rope import scaled_inverse_frequencies

    scaling = RopeScaling("dynamic", 4.0, 64)
    for seq_len in (1, 63, 64):
        np.testing.assert_array_equal(scaled_inverse_frequencies(16, 1e4, scaling, seq_len)[0],
                                      inverse_frequencies(16, 1e4))
    assert np.all(scaled_inverse_frequencies(16, 1e4, scaling, 65)[0][1:] < inverse_frequencies(16, 1e4)[1:])


def test_llama3_scaling_of_llama_3_2_by_wavelength():
    """Llama 3.2's numbers (factor 32, low 1, high 4, original 8192, theta 5e5, head_dim 64): pair 0 keeps its
    frequency, the slowest pair is divided by 32 exactly, and the medium pairs lie strictly between."""
    from minikv.config import RopeScaling
    from minikv.rope import scaled_inverse_frequencies

    scaling = RopeScaling("llama3", 32.0, 8192, low_freq_factor=1.0, high_freq_factor=4.0)
    ours, _ = scaled_inverse_frequencies(64, 5e5, scaling)
    plain = inverse_frequencies(64, 5e5)
    wavelength = 2 * math.pi / plain
    assert np.array_equal(ours[wavelength < 2048], plain[wavelength < 2048])
    assert np.array_equal(ours[wavelength > 8192], plain[wavelength > 8192] / 32)
    medium = (wavelength >= 2048) & (wavelength <= 8192)
    assert medium.any() and np.all((ours[medium] < plain[medium]) & (ours[medium] > plain[medium] / 32))


def test_yarn_table_carries_the_attention_factor():
    from minikv.config import RopeScaling

    scaling = RopeScaling("yarn", 4.0, 16, beta_fast=32.0, beta_slow=1.0, attention_factor=1.1386)
    cos, sin = cos_sin_table(50, 8, 1e4, np.float64, scaling)
    np.testing.assert_allclose(cos ** 2 + sin ** 2, 1.1386 ** 2, rtol=1e-14)


# ------------------------------------------------------------------ the table is built for the positions used


def test_rope_table_grows_on_demand_and_stays_exact():
    """Issue 18: max_position_embeddings of 4M must not build 4M rows at load. The table starts small,
    doubles when a later position needs it, and every row equals the directly computed one."""
    from minikv.checkpoint import expected_shapes
    from minikv.config import ModelConfig

    config = ModelConfig(model_type="llama", vocab_size=50, hidden_size=16, n_layers=1, n_heads=2, n_kv_heads=1,
                         head_dim=8, intermediate_size=32, max_position_embeddings=4_000_000, norm_eps=1e-5)
    rng = np.random.default_rng(0)
    weights = {n: rng.standard_normal(s) * 0.3 for n, s in expected_shapes(config).items()}
    model = minikv.Transformer(config, weights, dtype="float64")
    table = model.rope_tables["full_attention"]
    start = len(table.cos)
    assert start <= 4096 and table.cos.nbytes <= 4096 * 4 * 8
    ids = np.array([[3, 1, 4]])
    positions = np.array([[0, 5000, 9000]])
    logits = model.forward(ids, positions=positions)
    assert len(table.cos) == 16384 == start * 4                # doubled twice to cover position 9000
    direct_cos, direct_sin = cos_sin_table(16384, 8, config.rope_theta, np.float64)
    assert np.array_equal(table.cos, direct_cos) and np.array_equal(table.sin, direct_sin)
    # the same logits as a model whose table was built that large from the start
    fresh = minikv.Transformer(config, weights, dtype="float64")
    fresh.rope_tables["full_attention"]._grow(16384)
    assert np.array_equal(fresh.forward(ids, positions=positions), logits)
