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

import numpy as np

from .errors import ConfigError


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """theta^(-2p/head_dim) for p = 0 .. head_dim/2 - 1, in float64."""
    return 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def rope_angles(positions, head_dim: int, theta: float) -> np.ndarray:
    """angle[..., p] = position * inv_freq[p], in float64."""
    positions = np.asarray(positions, dtype=np.float64)
    return positions[..., None] * inverse_frequencies(head_dim, theta)


def cos_sin_table(max_positions: int, head_dim: int, theta: float, dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of every angle for positions 0 .. max_positions-1: (max_positions, head_dim/2) each.

    Computed in float64 and rounded once to the model dtype: at position 4000 a float32 angle is
    already off by ~2e-4 rad, while the rounded float64 cos/sin are off by at most half an ulp.
    Built once at load, so a decode step only gathers rows (no trigonometry per token)."""
    angles = rope_angles(np.arange(max_positions), head_dim, theta)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


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
    return converted, config.replace(rope_convention=to)
