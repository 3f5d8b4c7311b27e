"""The building blocks of a transformer block: pure functions of arrays.

Each works for any array module with NumPy's API (NumPy on the CPU, CuPy on the GPU), and keeps
the input's dtype: a float32 activation stays float32 (constants are cast to the input's dtype,
because a NumPy float64 scalar would silently promote the whole array to float64).
"""

from __future__ import annotations

import math

import numpy as np


def embedding(table, token_ids):
    """Row lookup: (vocab, d)[ids] -> ids.shape + (d,)."""
    return table[token_ids]


def rms_norm(x, weight, eps: float):
    """RMSNorm (LLaMA): x / sqrt(mean(x^2) + eps) * weight. No mean subtraction, no bias."""
    # sum * (1/d) rather than .mean(): the same value to an ulp, without mean()'s Python wrapper (~4 us a call)
    variance = (x * x).sum(axis=-1, keepdims=True) * x.dtype.type(1.0 / x.shape[-1])
    return x * (1.0 / np.sqrt(variance + x.dtype.type(eps))) * weight


def rms_norm_one_plus(x, weight, eps: float):
    """Gemma's RMSNorm: x / sqrt(mean(x^2) + eps) * (1 + w). Gemma stores each gain as its offset
    from 1 (initialised to zeros), so a checkpoint's w = 0 means "no change"."""
    return rms_norm(x, 1 + weight, eps)


def layer_norm(x, weight, bias, eps: float):
    """LayerNorm (GPT-2): (x - mean) / sqrt(var + eps) * weight + bias, var the biased variance."""
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    variance = (centered * centered).mean(axis=-1, keepdims=True)
    return centered * (1.0 / np.sqrt(variance + x.dtype.type(eps))) * weight + bias


def linear(x, weight_in_out, bias=None):
    """y = x @ W (+ b), W shaped (in_features, out_features). The numpy backend stores W contiguous in
    that shape, BLAS's fastest orientation for x @ W; PyTorch's nn.Linear stores (out, in) and computes
    x @ W.T, as the numba backend does (a transposed view; see Backend.weight_layout)."""
    y = x @ weight_in_out
    if bias is not None:
        y += bias
    return y


def silu(x):
    """SiLU (swish): x * sigmoid(x) = x / (1 + exp(-x))."""
    # For x < -88 (float32) exp(-x) overflows to inf and x / inf = -0.0, the exact limit:
    # the overflow is harmless, so it must not warn.
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))


def swiglu(gate, up):
    """SwiGLU's elementwise part: silu(x W_gate) * (x W_up); the down projection follows."""
    return silu(gate) * up


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(x):
    """GELU, tanh approximation (GPT-2's "gelu_new"):
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    c = x.dtype.type(_SQRT_2_OVER_PI)
    # x^3 overflows to +-inf for |x| > ~7e12 (float32); tanh(+-inf) = +-1 gives the exact limits x and -0.
    with np.errstate(over="ignore"):
        return 0.5 * x * (1.0 + np.tanh(c * (x + x.dtype.type(0.044715) * (x * x * x))))


def geglu(gate, up):
    """GeGLU's elementwise part (Gemma): gelu_tanh(x W_gate) * (x W_up); the down projection follows."""
    return gelu_tanh(gate) * up


def softcap(x, cap: float):
    """Soft-capping (Gemma's final logits): cap * tanh(x / cap), smooth, odd, and bounded by +-cap."""
    cap = x.dtype.type(cap)
    return np.tanh(x / cap) * cap
