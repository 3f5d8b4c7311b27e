"""minikv.layers against independent formulas written with the math module, one scalar at a time.

What is proven here
-------------------
* rms_norm, layer_norm, gelu_tanh, silu, swiglu, linear and embedding compute what their docstrings
  say (and what Hugging Face's RMSNorm / LayerNorm / gelu_new / SiLU compute), checked element by
  element against plain-Python math (math.fsum, math.sqrt, math.tanh, math.exp).
* dtype discipline: a float32 input gives a float32 output even when eps arrives as a NumPy float64
  scalar or a Python float, and no RuntimeWarning fires for large activations (silu(-100) in float32
  overflows exp(100) internally; the answer, -0.0, is the exact limit).

Tolerances: float64 1e-12 relative (+1e-12 absolute near 0): each function is a handful of
roundings (~1e-16 each) and the reference is exact up to its own few roundings. float32: 2e-6
relative (a few float32 ulps, eps = 1.2e-7), atol 1e-6 for values near 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from minikv import layers

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

F64 = dict(rtol=1e-12, atol=1e-12)
F32 = dict(rtol=2e-6, atol=1e-6)


def rows(dtype=np.float64, max_value=50.0, min_width=1):
    return st.tuples(st.integers(1, 3), st.integers(min_width, 12)).flatmap(
        lambda shape: arrays(dtype, shape, elements=st.floats(-max_value, max_value, allow_nan=False,
                                                            width=64 if dtype == np.float64 else 32)))


def per_row(x, f):
    return np.array([f([float(v) for v in row]) for row in np.asarray(x, dtype=np.float64)])


# ------------------------------------------------------------------ references (plain Python)


def ref_rms_norm(row, weight, eps):
    mean_square = math.fsum(v * v for v in row) / len(row)
    return [v / math.sqrt(mean_square + eps) * w for v, w in zip(row, weight)]


def ref_layer_norm(row, weight, bias, eps):
    mean = math.fsum(row) / len(row)
    variance = math.fsum((v - mean) ** 2 for v in row) / len(row)  # biased, as torch's layer_norm
    return [(v - mean) / math.sqrt(variance + eps) * w + b for v, w, b in zip(row, weight, bias)]


def ref_silu(v):
    if v < -700:  # math.exp(700+) overflows; the limit of v / (1 + e^-v) is -0
        return 0.0
    return v / (1.0 + math.exp(-v))


def ref_gelu_tanh(v):
    return 0.5 * v * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))


# ------------------------------------------------------------------ norms


@settings(max_examples=60, deadline=None)
@given(x=rows(), seed=st.integers(0, 2**32 - 1), eps=st.sampled_from([1e-5, 1e-6, 1e-2]))
def test_rms_norm_matches_the_formula(x, seed, eps):
    weight = np.random.default_rng(seed).uniform(-2, 2, x.shape[-1])
    out = layers.rms_norm(x, weight, eps)
    expected = np.array([ref_rms_norm(list(row), list(weight), eps) for row in x])
    np.testing.assert_allclose(out, expected, **F64)


@settings(max_examples=60, deadline=None)
@given(x=rows(min_width=2), seed=st.integers(0, 2**32 - 1), eps=st.sampled_from([1e-5, 1e-2]))
def test_layer_norm_matches_the_formula(x, seed, eps):
    rng = np.random.default_rng(seed)
    weight, bias = rng.uniform(-2, 2, x.shape[-1]), rng.uniform(-1, 1, x.shape[-1])
    out = layers.layer_norm(x, weight, bias, eps)
    expected = np.array([ref_layer_norm(list(row), list(weight), list(bias), eps) for row in x])
    # The centred values cancel: allow the cancellation's absolute error relative to the row's scale.
    scale = np.max(np.abs(x)) / math.sqrt(eps) * np.max(np.abs(weight)) + 1.0
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-13 * scale)


def test_rms_norm_does_not_subtract_the_mean():
    """Distinguishes RMSNorm from LayerNorm: a constant row keeps its sign and unit RMS."""
    out = layers.rms_norm(np.full((1, 4), 3.0), np.ones(4), 0.0 + 1e-12)
    np.testing.assert_allclose(out, np.ones((1, 4)), rtol=1e-9)
    out = layers.layer_norm(np.full((1, 4), 3.0), np.ones(4), np.zeros(4), 1e-5)
    np.testing.assert_allclose(out, np.zeros((1, 4)), atol=1e-12)


# ------------------------------------------------------------------ activations


@settings(max_examples=60, deadline=None)
@given(x=rows(max_value=1000.0))
def test_silu_matches_the_formula(x):
    np.testing.assert_allclose(layers.silu(x), per_row(x, lambda r: [ref_silu(v) for v in r]), **F64)


@settings(max_examples=60, deadline=None)
@given(x=rows(max_value=30.0))
def test_gelu_tanh_matches_the_formula(x):
    np.testing.assert_allclose(layers.gelu_tanh(x), per_row(x, lambda r: [ref_gelu_tanh(v) for v in r]), **F64)


def test_gelu_tanh_is_close_to_the_exact_gelu():
    """Sanity of the constants: the tanh approximation is within 1e-3 of x * Phi(x) (erf form)."""
    x = np.linspace(-6, 6, 241)
    exact = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])
    assert np.max(np.abs(layers.gelu_tanh(x) - exact)) < 1e-3


@settings(max_examples=40, deadline=None)
@given(gate=rows(max_value=100.0), seed=st.integers(0, 2**32 - 1))
def test_swiglu_is_silu_of_gate_times_up(gate, seed):
    up = np.random.default_rng(seed).standard_normal(gate.shape)
    expected = per_row(gate, lambda r: [ref_silu(v) for v in r]) * up
    np.testing.assert_allclose(layers.swiglu(gate, up), expected, **F64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activations_of_extreme_values_are_exact_limits_without_warnings(dtype):
    x = np.array([-1e4, -100.0, -90.0, 0.0, 90.0, 100.0, 1e4], dtype=dtype)
    silu = layers.silu(x)
    assert silu.dtype == dtype
    np.testing.assert_allclose(silu, [ref_silu(float(v)) for v in x], rtol=1e-6, atol=1e-37)
    np.testing.assert_array_equal(silu[[0, 3]], 0.0)
    np.testing.assert_array_equal(silu[[5, 6]], x[[5, 6]])
    big = np.array([-1e15, -1e6, 1e6, 1e15], dtype=dtype)   # x^3 overflows float32 (and 1e15^3 is fine in f64)
    gelu = layers.gelu_tanh(big)
    assert gelu.dtype == dtype
    np.testing.assert_array_equal(gelu, [0.0, 0.0, big[2], big[3]])


# ------------------------------------------------------------------ linear and embedding


def test_linear_is_x_times_w_plus_b():
    rng = np.random.default_rng(4)
    x, w, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((5, 7)), rng.standard_normal(7)
    expected = np.array([[[math.fsum(x[i, j, k] * w[k, o] for k in range(5)) + b[o] for o in range(7)]
                          for j in range(3)] for i in range(2)])
    np.testing.assert_allclose(layers.linear(x, w, b), expected, **F64)
    np.testing.assert_allclose(layers.linear(x, w), expected - b, **F64)
    b_before = b.copy()
    layers.linear(x, w, b)
    assert np.array_equal(b, b_before)  # the bias is not modified in place


def test_embedding_is_a_row_lookup():
    table = np.arange(12.0).reshape(4, 3)
    ids = np.array([[3, 0], [1, 1]])
    out = layers.embedding(table, ids)
    assert out.shape == (2, 2, 3)
    assert np.array_equal(out[0, 0], table[3]) and np.array_equal(out[1, 1], table[1])


# ------------------------------------------------------------------ dtype discipline


@settings(max_examples=30, deadline=None)
@given(x=rows(dtype=np.float32, max_value=20.0, min_width=2), eps=st.sampled_from([1e-5, 1e-6]),
       eps_kind=st.sampled_from(["python", "numpy64"]))
def test_float32_stays_float32(x, eps, eps_kind):
    eps = np.float64(eps) if eps_kind == "numpy64" else float(eps)
    width = x.shape[-1]
    weight, bias = np.linspace(0.5, 1.5, width, dtype=np.float32), np.linspace(-1, 1, width, dtype=np.float32)
    x64 = x.astype(np.float64)
    checks = {
        "rms_norm": (layers.rms_norm(x, weight, eps), layers.rms_norm(x64, weight.astype(np.float64), float(eps))),
        "layer_norm": (layers.layer_norm(x, weight, bias, eps),
                       layers.layer_norm(x64, weight.astype(np.float64), bias.astype(np.float64), float(eps))),
        "silu": (layers.silu(x), layers.silu(x64)),
        "gelu_tanh": (layers.gelu_tanh(x), layers.gelu_tanh(x64)),
        "swiglu": (layers.swiglu(x, x), layers.swiglu(x64, x64)),
        "linear": (layers.linear(x, np.eye(width, dtype=np.float32), bias),
                   layers.linear(x64, np.eye(width), bias.astype(np.float64))),
    }
    for name, (out32, out64) in checks.items():
        assert out32.dtype == np.float32, f"{name} promoted float32 to {out32.dtype}"
        scale = 1.0 if name in ("rms_norm", "layer_norm") else 1.0 + np.abs(out64)
        # layer_norm of a nearly constant float32 row cancels: x - mean is off by a few ulps of max|x|
        # (the mean sums up to 12 values), and dividing by sqrt(var + eps) >= sqrt(eps) magnifies that.
        cancellation = 12 * np.finfo(np.float32).eps * float(np.max(np.abs(x))) / math.sqrt(float(eps)) * 1.5
        atol = 1e-6 + cancellation if name == "layer_norm" else 1e-6
        np.testing.assert_allclose(out32, out64, rtol=2e-6 * np.max(scale), atol=atol, err_msg=name)
