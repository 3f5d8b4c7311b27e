"""Rotary position embeddings (RoPE), both pair conventions, and the weight permutation between them.

RoPE splits each head's vector into head_dim/2 pairs and rotates pair p by the angle
``position * theta^(-2p/head_dim)``::

    (x1, x2) -> (x1 cos a - x2 sin a,  x1 sin a + x2 cos a)

A rotation keeps the norm, and the dot product of a query rotated to position m with a key rotated
to position n depends only on m - n: that is how RoPE encodes *relative* position.

Which two dimensions form pair p is a convention, and the two in use are incompatible:

* ``"half"`` (Hugging Face's ``rotate_half``): pair p is (p, p + head_dim/2).
* ``"interleaved"`` (Meta's original LLaMA code, llama2.c): pair p is (2p, 2p + 1).

A checkpoint's q/k projection weights are laid out for one of them. Running HF weights with the
interleaved rotation (or the reverse) gives plausible-looking but wrong logits, the classic silent
bug of NumPy LLaMA ports. ``convert_rope_convention`` permutes the rows of W_q and W_k (and their
biases) so a checkpoint can be moved between conventions without changing a single logit.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from .errors import ConfigError


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """theta^(-2p/head_dim) for p = 0 .. head_dim/2 - 1, in float64."""
    return 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


# ---------------------------------------------------------------- scaled RoPE (long context)
#
# A model trained on L_orig positions sees angles it never saw beyond L_orig. The scalings stretch
# the slow (long-wavelength) frequencies so that long positions map back into the trained range.
# Each function follows transformers 5.24's _compute_<type>_parameters line by line, in float64.


def linear_inverse_frequencies(inv_freq: np.ndarray, factor: float) -> np.ndarray:
    """Position interpolation: angle = (position / factor) * inv_freq, i.e. inv_freq / factor."""
    return inv_freq / factor


def dynamic_ntk_inverse_frequencies(head_dim: int, theta: float, factor: float, original: int,
                                    seq_len: int) -> np.ndarray:
    """Dynamic NTK: the base grows with the sequence length L (no change up to L_orig):

        L = max(L, L_orig);  base = theta * (factor * L / L_orig - (factor - 1)) ^ (d / (d - 2))

    transformers recomputes it each forward call with L = max(position in the call) + 1, so keys
    cached by earlier calls keep the rotation of their own call (the cache is not recomputed)."""
    seq_len = max(seq_len, original)
    base = theta * ((factor * seq_len / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return inverse_frequencies(head_dim, base)


def llama3_inverse_frequencies(inv_freq: np.ndarray, factor: float, low_freq_factor: float,
                               high_freq_factor: float, original: int) -> np.ndarray:
    """Llama 3.1's scaling, by wavelength lambda = 2 pi / inv_freq:

        lambda < L_orig / high_freq_factor:  unchanged (fast rotations carry local order)
        lambda > L_orig / low_freq_factor:   inv_freq / factor
        in between:                          (1 - s) inv_freq / factor + s inv_freq,
                                             s = (L_orig / lambda - low_freq_factor) / (high - low)"""
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = original / low_freq_factor
    high_freq_wavelength = original / high_freq_factor
    scaled = np.where(wavelength > low_freq_wavelength, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelength < high_freq_wavelength) & ~(wavelength > low_freq_wavelength)
    return np.where(medium, smoothed, scaled)


def yarn_inverse_frequencies(head_dim: int, theta: float, factor: float, original: int, beta_fast: float,
                             beta_slow: float, truncate: bool) -> np.ndarray:
    """YaRN (arXiv 2309.00071): dimension p rotates r_p = L_orig * inv_freq_p / (2 pi) times over the
    trained length. Dimensions with r >= beta_fast keep their frequency (extrapolate), those with
    r <= beta_slow are interpolated (inv_freq / factor), a linear ramp in p joins them:

        p(r) = d ln(L_orig / (2 pi r)) / (2 ln theta)       (the dimension that rotates r times)
        low, high = p(beta_fast), p(beta_slow)              (floor / ceil if truncate; clipped to [0, d-1])
        ramp_p = clip((p - low) / (high - low), 0, 1)       (high += 0.001 if equal)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)

    The attention factor (cos and sin times mscale) is applied to the table, see cos_sin_table."""
    inv_freq = inverse_frequencies(head_dim, theta)

    def dimension_for(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension_for(beta_fast), dimension_for(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001       # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    return inv_freq / factor * (1 - extrapolation_weight) + inv_freq * extrapolation_weight


def scaled_inverse_frequencies(head_dim: int, theta: float, scaling=None,
                               seq_len: Optional[int] = None) -> tuple[np.ndarray, float]:
    """(inv_freq (head_dim/2,) float64, attention factor) for plain or scaled RoPE.

    scaling: a config.RopeScaling or None. seq_len: only dynamic NTK depends on it (None: no growth)."""
    inv_freq = inverse_frequencies(head_dim, theta)
    if scaling is None:
        return inv_freq, 1.0
    kind, factor, original = scaling.rope_type, scaling.factor, scaling.original_max_position_embeddings
    if kind == "linear":
        return linear_inverse_frequencies(inv_freq, factor), 1.0
    if kind == "dynamic":
        return dynamic_ntk_inverse_frequencies(head_dim, theta, factor, original, seq_len or original), 1.0
    if kind == "llama3":
        return llama3_inverse_frequencies(inv_freq, factor, scaling.low_freq_factor, scaling.high_freq_factor,
                                          original), 1.0
    if kind == "yarn":
        return yarn_inverse_frequencies(head_dim, theta, factor, original, scaling.beta_fast, scaling.beta_slow,
                                        scaling.truncate), scaling.attention_factor
    raise ConfigError(f"rope_type={kind!r} is not implemented")


def rope_angles(positions, head_dim: int, theta: float) -> np.ndarray:
    """angle[..., p] = position * inv_freq[p], in float64."""
    positions = np.asarray(positions, dtype=np.float64)
    return positions[..., None] * inverse_frequencies(head_dim, theta)


def cos_sin_table(max_positions, head_dim: int, theta: float, dtype, scaling=None,
                  seq_len: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of every angle for positions 0 .. max_positions-1: (max_positions, head_dim/2) each
    (or for the given array of positions: positions.shape + (head_dim/2,)).

    Computed in float64 and rounded once to the model dtype: at position 4000 a float32 angle is
    already off by ~2e-4 rad, while the rounded float64 cos/sin are off by at most half an ulp.
    With yarn both are multiplied by its attention factor (so q.k grows by its square)."""
    positions = np.arange(max_positions) if np.ndim(max_positions) == 0 else np.asarray(max_positions)
    inv_freq, attention_factor = scaled_inverse_frequencies(head_dim, theta, scaling, seq_len)
    angles = positions.astype(np.float64)[..., None] * inv_freq
    cos, sin = np.cos(angles), np.sin(angles)
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.astype(dtype), sin.astype(dtype)


class RopeTable:
    """The cos/sin rows a model gathers per position, built for the positions actually used.

    Rows 0..n-1 are computed once (cos_sin_table) and the table doubles when a later position needs
    more, up to the model's limit: a checkpoint that allows 4M positions costs nothing until it uses
    them. Each row depends only on its own position, so a grown table holds the same values.

    Dynamic NTK rotates by the call's length L beyond L_orig: those calls compute their rows directly
    (a few trigonometric functions per token) instead of reading the table."""

    INITIAL_ROWS = 4096

    def __init__(self, head_dim: int, theta: float, scaling, dtype, limit: int,
                 to_device: Callable = np.asarray):
        self.head_dim, self.theta, self.scaling, self.dtype = head_dim, theta, scaling, np.dtype(dtype)
        self.limit, self.to_device = limit, to_device
        self.dynamic = scaling is not None and scaling.rope_type == "dynamic"
        self.cos = self.sin = None
        self._grow(min(limit, self.INITIAL_ROWS))

    def _grow(self, rows: int) -> None:
        cos, sin = cos_sin_table(rows, self.head_dim, self.theta, self.dtype, self.scaling)
        self.cos, self.sin = self.to_device(cos), self.to_device(sin)

    def lookup(self, positions: np.ndarray, highest: int):
        """cos, sin (positions.shape + (head_dim/2,)) on the device for host ``positions``, every one
        of them <= ``highest`` < the limit (the model checks and clamps them at its door)."""
        if self.dynamic and highest + 1 > self.scaling.original_max_position_embeddings:
            cos, sin = cos_sin_table(positions, self.head_dim, self.theta, self.dtype, self.scaling,
                                     seq_len=highest + 1)
            return self.to_device(cos), self.to_device(sin)
        rows = len(self.cos)
        if highest >= rows:
            while rows <= highest:
                rows *= 2
            self._grow(min(rows, self.limit))
        index = self.to_device(positions)
        return self.cos[index], self.sin[index]


def apply_rope(x, cos, sin, convention: str = "half"):
    """Rotate x (..., seq, head_dim) by per-position cos/sin (..., seq, head_dim/2).

    cos and sin broadcast against x without the last axis, e.g. x (batch, heads, seq, head_dim)
    with cos (batch, 1, seq, head_dim/2).
    """
    half = x.shape[-1] // 2
    if convention == "half":
        x1, x2 = x[..., :half], x[..., half:]
    elif convention == "interleaved":
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        raise ConfigError(f"convention={convention!r} must be 'half' or 'interleaved'")
    # (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos), pair by pair
    rotated_1 = x1 * cos - x2 * sin
    rotated_2 = x1 * sin + x2 * cos
    out = np.empty_like(x) if isinstance(x, np.ndarray) else x.copy()
    if convention == "half":
        out[..., :half], out[..., half:] = rotated_1, rotated_2
    else:
        out[..., 0::2], out[..., 1::2] = rotated_1, rotated_2
    return out


def interleaved_to_half_permutation(head_dim: int) -> np.ndarray:
    """perm such that a head laid out for "half" is ``w_interleaved[perm]``.

    "half" dimension r belongs to pair r mod (head_dim/2), as its first member when r < head_dim/2;
    in the interleaved layout that member sits at 2 * pair + (first ? 0 : 1).
    """
    half = head_dim // 2
    r = np.arange(head_dim)
    return 2 * (r % half) + r // half


def permute_heads(rows: np.ndarray, n_heads: int, head_dim: int, perm: np.ndarray) -> np.ndarray:
    """Apply a per-head permutation to the output rows of a projection laid out (n_heads*head_dim, ...)."""
    shaped = rows.reshape(n_heads, head_dim, *rows.shape[1:])
    return shaped[:, perm].reshape(rows.shape)


def convert_rope_convention(weights: dict, config, to: str):
    """Return (weights, config) with the q/k projections permuted to convention ``to``.

    ``weights`` uses minikv's canonical names (see checkpoint.py), projections as (out, in).
    Logits are unchanged: q.k is a sum over dimensions, and permuting q and k the same way
    only reorders that sum, while the rotation now pairs the dimensions the new convention expects.
    """
    if to not in ("half", "interleaved"):
        raise ConfigError(f"to={to!r} must be 'half' or 'interleaved'")
    if not config.uses_rope or config.rope_convention == to:
        return dict(weights), config
    perm = interleaved_to_half_permutation(config.head_dim)
    if to == "interleaved":
        perm = np.argsort(perm)  # the inverse permutation
    converted = dict(weights)
    for i in range(config.n_layers):
        for proj, heads in (("q", config.n_heads), ("k", config.n_kv_heads)):
            for kind in ("weight", "bias"):
                name = f"layers.{i}.attn.{proj}.{kind}"
                if name in converted:
                    converted[name] = permute_heads(converted[name], heads, config.head_dim, perm)
            # Qwen3 / Gemma 3: the per-head norm's gain (head_dim,) follows its dimensions.
            name = f"layers.{i}.attn.{proj}_norm.weight"
            if name in converted:
                converted[name] = converted[name][perm]
    return converted, config.replace(rope_convention=to)
