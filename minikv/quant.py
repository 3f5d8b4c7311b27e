"""Group-wise symmetric quantization: int8 / int4 weights and an int8 KV cache, as plain math.

A decode step at batch 1 reads every weight once and does two flops with it: it is bound by
memory bandwidth, not arithmetic. Storing a weight in 8 bits instead of 32 reads 4x fewer bytes;
4 bits, 8x fewer. The price is rounding error, which this module keeps small and *bounded*.

The format (llama2.c's ``runq.c`` "Q8_0", and a 4-bit sibling): a weight matrix W (out, in) is
cut along ``in`` into groups of ``group`` consecutive weights; each group g of row j gets one
float32 scale and its weights become small integers::

    scale[j, g] = max_i |W[j, i]| / qmax          (qmax = 127 for int8, 7 for int4)
    q[j, i]     = round(W[j, i] / scale[j, g])    an integer in [-qmax, qmax]
    W[j, i]    ~= q[j, i] * scale[j, g]           (dequantize)

Symmetric (no zero point): 0 stays exactly 0, and the largest weight of a group maps to +-qmax.
Rounding to the nearest integer misses by at most half a step, so every element obeys

    |W - dequantize(quantize(W))| <= scale / 2                            (the format's bound)

(plus the float32 rounding of the product q * scale, half an ulp of the result). Two details keep
the bound true at the edges: the scale is rounded *up* to the next float32 when rounding to
nearest would make ``max / scale`` exceed qmax (so no integer is ever clipped), and a group of
zeros gets scale 0 and q 0 (no 0/0). Denormal weights then quantize like any others.

Formats (``FORMATS``):

* ``int8``: group 64, one int8 per weight: 8 + 32/64 = 8.5 bits per weight.
* ``int4``: group 32, values in [-8, 7] (only -7..7 are produced: symmetric), two per byte (see
  ``pack_int4`` for the nibble order): 4 + 32/32 = 5 bits per weight.

A row whose length is not a multiple of the group ends in a shorter last group (the bundled model's
MLP has 608 inputs: 9 groups of 64 and one of 32); int4 needs an even row length.

The reference product ``quantized_linear(x, qw) = x @ dequantize(qw).T`` is slow (it rebuilds the
float matrix on every call) but it is the definition: the numba backend's kernels dequantize
inside the dot product and must equal it to float32 round-off (tests/test_quant.py).

KV cache (``quantize_rows``): a key or value vector of one token and one head (head_dim numbers)
is one group with its own scale: int8 with per-token-per-head scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

# name -> (bits, qmax, default group)
FORMATS = {"int8": (8, 127, 64), "int4": (4, 7, 32)}


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized (out, in) matrix: ``values`` the integers, ``scales`` float32 (out, n_groups),
    ``shape`` the float matrix's (out, in)."""

    format: str
    values: np.ndarray      # int8 (out, in), or for int4 uint8 (out, in / 2)
    scales: np.ndarray
    group: int
    shape: tuple

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.scales.nbytes)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])


def group_scales(w: np.ndarray, group: int, qmax: int) -> np.ndarray:
    """scale[j, g] = max |w[j, group g]| / qmax as float32, rounded up where rounding to nearest would
    put max / scale above qmax. w (out, in) -> (out, ceil(in / group))."""
    out_features, in_features = w.shape
    n_groups = -(-in_features // group)
    padded = np.zeros((out_features, n_groups * group), dtype=np.float64)
    padded[:, :in_features] = np.abs(w)
    # (out, n_groups * group) -> (out, n_groups, group): the groups of each row
    group_max = padded.reshape(out_features, n_groups, group).max(axis=-1)
    scales = (group_max / qmax).astype(np.float32)
    too_small = scales.astype(np.float64) * qmax < group_max
    scales[too_small] = np.nextafter(scales[too_small], np.float32(np.inf))
    return scales


def _expand(scales: np.ndarray, group: int, in_features: int) -> np.ndarray:
    """(out, n_groups) -> (out, in): each group's scale repeated over its elements."""
    return np.repeat(scales, group, axis=1)[:, :in_features]


def quantize(w, format: str = "int8", group: int | None = None) -> QuantizedWeight:
    """Quantize a float (out, in) matrix group-wise along ``in`` (see the module docstring)."""
    if format not in FORMATS:
        raise ConfigError(f"quantize={format!r} is not a weight format; choose one of {sorted(FORMATS)}")
    bits, qmax, default_group = FORMATS[format]
    group = default_group if group is None else int(group)
    w = np.asarray(w)
    if w.ndim != 2 or w.size == 0:
        raise ConfigError(f"quantize: expected a non-empty (out, in) matrix, got shape {w.shape}")
    if group < 1 or (format == "int4" and (group % 2 or w.shape[1] % 2)):
        raise ConfigError(f"quantize: group={group} must be >= 1; int4 needs an even group and an even number "
                          f"of columns (the matrix has {w.shape[1]})")
    if not np.isfinite(w).all():
        raise ConfigError("quantize: the matrix holds inf or NaN; such weights cannot be scaled into integers")
    out_features, in_features = w.shape
    scales = group_scales(w, group, qmax)
    safe = np.where(scales == 0, np.float32(1), scales)               # a group of zeros: q = 0 / 1 = 0
    # Divide in float64: w / scale is then exact enough that only the rounding to an integer errs.
    q = np.rint(w.astype(np.float64) / _expand(safe, group, in_features).astype(np.float64))
    q = np.clip(q, -qmax, qmax).astype(np.int8)                      # the clip never binds (scale rounded up)
    if bits == 8:
        values = q
    else:
        values = pack_int4(q, group)
    return QuantizedWeight(format, np.ascontiguousarray(values), scales, group, (out_features, in_features))


def pack_int4(q: np.ndarray, group: int) -> np.ndarray:
    """int8 values in [-8, 7], (out, in) with ``in`` even -> uint8 (out, in / 2), stored as q + 8 in
    [0, 15] (offset binary, like GGML's Q4_0). Within each group of L elements (the last may be
    shorter), byte b holds element b in its low nibble and element b + L/2 in its high nibble: a
    kernel then multiplies the low nibbles by x's first half-group and the high ones by its second,
    both contiguous (pairs (2b, 2b + 1) would need strided reads of x)."""
    out_features, in_features = q.shape
    nibbles = (q.astype(np.int16) + 8).astype(np.uint8)
    packed = np.empty((out_features, in_features // 2), dtype=np.uint8)
    for start in range(0, in_features, group):
        half = (min(start + group, in_features) - start) // 2
        low, high = nibbles[:, start:start + half], nibbles[:, start + half:start + 2 * half]
        packed[:, start // 2:start // 2 + half] = low | (high << 4)
    return packed


def unpack_int4(packed: np.ndarray, in_features: int, group: int) -> np.ndarray:
    """The inverse of pack_int4: uint8 (out, in / 2) -> int8 (out, in)."""
    values = np.empty((packed.shape[0], in_features), dtype=np.int8)
    for start in range(0, in_features, group):
        half = (min(start + group, in_features) - start) // 2
        block = packed[:, start // 2:start // 2 + half]
        values[:, start:start + half] = (block & 0xF).astype(np.int8) - 8
        values[:, start + half:start + 2 * half] = (block >> 4).astype(np.int8) - 8
    return values


def integer_values(qw: QuantizedWeight) -> np.ndarray:
    """The integers q (out, in) as int8, whatever the packing."""
    return qw.values if qw.format == "int8" else unpack_int4(qw.values, qw.shape[1], qw.group)


def dequantize(qw: QuantizedWeight, dtype=np.float32) -> np.ndarray:
    """W ~= q * scale, (out, in) in ``dtype``: the product taken in float32 (as the kernels do), then cast."""
    q = integer_values(qw).astype(np.float32)
    return (q * _expand(qw.scales, qw.group, qw.shape[1])).astype(dtype, copy=False)


def quantized_linear(x, qw: QuantizedWeight, bias=None):
    """The reference product: y = x @ dequantize(W)^T (+ b), x (tokens, in) -> (tokens, out).

    Slow and plain: the float matrix is rebuilt on every call. The numba kernels compute the same
    sum without building it: y[j] = sum_g scale[j, g] * sum_{i in g} x[i] q[j, i]."""
    y = x @ dequantize(qw, x.dtype).T
    if bias is not None:
        y += bias
    return y


# ------------------------------------------------------------------ KV cache: one scale per (token, head)

KV_QMAX = 127


def quantize_rows(x):
    """int8 per-row quantization of the last axis: x (..., d) -> (q int8 (..., d), scale float32 (...)).

    For a KV cache each row is one token's key (or value) for one head: scale = max|row| / 127,
    q = round(row / scale); rounded up like the weights' scales, so |x - q * scale| <= scale / 2."""
    x = np.asarray(x)
    rows = x.reshape(-1, x.shape[-1])                                  # (tokens * heads..., d)
    scales = group_scales(rows, rows.shape[1], KV_QMAX)[:, 0]          # one group per row
    safe = np.where(scales == 0, np.float32(1), scales)
    q = np.clip(np.rint(rows.astype(np.float64) / safe[:, None].astype(np.float64)), -KV_QMAX, KV_QMAX)
    return q.astype(np.int8).reshape(x.shape), scales.reshape(x.shape[:-1])


def dequantize_rows(q, scales, dtype=np.float32):
    """q (..., d) int8, scales (...) -> q * scale in ``dtype`` (the product in float32)."""
    return (q.astype(np.float32) * scales[..., None].astype(np.float32)).astype(dtype, copy=False)
