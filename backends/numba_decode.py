"""The numba backend's compiled decode step: one token per row (batch 1, a batch, or a serving step's
flattened rows) as three kernels per layer.

At batch 1 a decode step is a string of matrix-vector products: every weight is read once and used
for one multiply-add, so the step runs at the speed memory delivers weights, and every Python call,
temporary array and thread wake-up between two of them is time the memory bus sits idle. The
generic path (model.py) makes ~30 NumPy calls per layer; this one makes four:

    decode_layer_in:   h = rms_norm(x); qkv = h W_qkv (+ b); RoPE on q and k        (kernel 1)
    cache.update:      write k, v; get every K/V held                              (the cache seam, Python)
    attention:         the split-K decode kernel (numba_cpu; int8 caches: attend_rows)         (kernel 2)
    decode_layer_out:  x += attn W_o; h = rms_norm(x); x += (silu(h W_gate) * h W_up) W_down  (kernel 3)

and one more for the final norm and the lm_head. Each kernel opens one parallel region per product
and one for attention (``prange``): 5 thread wake-ups per layer below TILED_FROM_ROWS rows (SwiGLU runs
inside the gate/up product, ``project_swiglu``), 6 from there on (the tiles' SwiGLU is a pass of its own,
``swiglu_rows``).

One loop shape for every product (``project``: each thread owns a range of outputs j), and one dot
product per weight format (``row_dot``), chosen when a kernel is compiled (``overload`` on the
weight's dtype):

* float (out, in), the numba backend's layout (``weight_layout``): y[j] = dot(W[j], x), each
  thread streaming its rows of W front to back;
* int8 (out, in) + scales (out, groups): y[j] = sum_g scale[j, g] sum_{i in g} x[i] q[j, i]: the
  weight is converted to float inside the dot product; activations stay float32 (llama2.c's runq.c
  also quantizes x to int8; keeping x in float32 makes the kernel equal to the reference
  ``x @ dequantize(W).T`` up to round-off, and the step is memory-bound either way);
* int4 (out, in / 2) nibbles: the same, each byte unpacked into two 4-bit values (offset 8).

Sums run with ``fastmath={"reassoc", "contract"}`` so LLVM may vectorise them (reordering additions
only: inf and NaN keep IEEE meaning); results differ from the reference by float32 round-off, and
the tests state the bound.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import fields

import numba
import numpy as np
from numba import njit, prange, types
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import overload

from minikv import quant

from .numba_cpu import exp_nonpositive, numba_threads, split_k_decode_kernel, threads_for
from .numba_intrinsics import prefetch

_KERNEL = dict(parallel=True, fastmath={"reassoc", "contract"}, cache=True, nogil=True)
_SERIAL = dict(parallel=False, fastmath={"reassoc", "contract"}, cache=True, nogil=True)

# --------------------------------------------------------------------------- matrix-vector products


# Inlined into the parallel kernels at Numba's IR level: in alternating A/B rounds on `mha` (2 threads)
# 5 of 7 rounds ran 2-33% faster than leaving the calls to LLVM. Numba's pedantic IR check then reports
# the inlined overload's locals as "not in scope" (a NumbaIRAssumptionWarning about its own bookkeeping,
# not about the result, which the tests compare with the reference); that one message is silenced below.
_ROW = dict(fastmath={"reassoc", "contract"}, cache=True, inline="always")
warnings.filterwarnings("ignore", message=r"variable '_row_dot_overload", category=NumbaIRAssumptionWarning)


@njit(**_ROW)
def dot_float(w, scales, group, j, x):
    """sum_i x[i] w[j, i] for a float w (out, in), C-contiguous (the backend's weight layout): one
    contiguous row of w streamed front to back (the prefetcher's best case). Measured on `mid`'s 33
    matrices, 2 cores, batch 1: this form read 34.6 GB/s, the (in, out) axpy form (y[j0:j1] +=
    x[i] w[i, j0:j1]) 26.1 GB/s and OpenBLAS's x @ W 25.9 GB/s."""
    row = w[j]
    acc = np.float32(0.0)
    for i in range(row.shape[0]):
        acc += x[i] * row[i]
    return acc


@njit(**_ROW)
def dot_int8(q, scales, group, j, x):
    """sum_g scale[j, g] sum_{i in g} x[i] q[j, i]: the weight converted to float inside the dot product."""
    row = q[j]
    n_in = row.shape[0]
    acc = np.float32(0.0)
    for g in range(scales.shape[1]):
        i0 = g * group
        i1 = min(i0 + group, n_in)
        xs, qs = x[i0:i1], row[i0:i1]
        s = np.float32(0.0)
        for i in range(i1 - i0):
            s += xs[i] * np.float32(qs[i])
        acc += s * scales[j, g]
    return acc


@njit(**_ROW)
def dot_int4(packed, scales, group, j, x):
    """The same for int4 (layout: minikv.quant.pack_int4): byte b of a group of L elements holds
    element b + 8 in its low nibble and element b + L/2 + 8 in its high nibble."""
    row = packed[j]
    n_in = x.shape[0]
    acc = np.float32(0.0)
    for g in range(scales.shape[1]):
        i0 = g * group
        half = (min(i0 + group, n_in) - i0) // 2
        bs = row[i0 // 2:i0 // 2 + half]
        x_low, x_high = x[i0:i0 + half], x[i0 + half:i0 + 2 * half]
        s = np.float32(0.0)
        for b in range(half):
            # The nibbles in float arithmetic: byte = 16 high + low, so high = floor(byte / 16) and
            # low = byte - 16 high (exact in float32). Integer & and >> would be typed int64 by Numba,
            # vectorising 8 lanes wide instead of 16 (measured 1.37x slower on `mid`).
            byte = np.float32(bs[b])
            high = np.floor(byte * np.float32(0.0625))
            low = byte - np.float32(16.0) * high
            s += x_low[b] * (low - np.float32(8.0)) + x_high[b] * (high - np.float32(8.0))
        acc += s * scales[j, g]
    return acc


def row_dot(weight, scales, group, j, x):
    """Output j of x @ W for any weight format; resolved at compile time by the overload below."""
    raise NotImplementedError("row_dot() runs inside compiled kernels only")


@overload(row_dot, inline="always")
def _row_dot_overload(weight, scales, group, j, x):
    dtype = weight.dtype
    if dtype == types.int8:
        return lambda weight, scales, group, j, x: dot_int8(weight, scales, group, j, x)
    if dtype == types.uint8:
        return lambda weight, scales, group, j, x: dot_int4(weight, scales, group, j, x)
    return lambda weight, scales, group, j, x: dot_float(weight, scales, group, j, x)


@njit(**_KERNEL)
def project(weight, scales, group, x, y):
    """y (rows, out) = x (rows, in) @ W^T for W (out, in) in any format (float: scales and group unused):
    each thread owns a range of outputs j and reuses row j of W for every row of x while it sits in L1."""
    rows = x.shape[0]
    for j in prange(y.shape[1]):
        for r in range(rows):
            y[r, j] = row_dot(weight, scales, group, j, x[r])


@njit(**_KERNEL)
def project_tiled(w, x, y):
    """y (rows, out) = x (rows, in) @ W^T for a float W (out, in), by register tiles: 2 rows of x times
    8 rows of W. For each i the tile loads 8 weights and 2 activations and does 16 multiply-adds into 16
    accumulators; LLVM vectorises the loop over i, so each accumulator is one vector register. ``project``
    (one dot per output and row) does one load per multiply-add, which is fine while memory is the limit
    (1-3 rows) but becomes the limit itself from ~4 rows on. Each thread owns a range of 8-row blocks of
    W: the block is read from memory by the first pair of x rows and from L1 by the others.

    Measured on `mid`'s 33 matrices (2 cores, AMD EPYC, the weights streamed from memory each step):
    8 rows 73 vs OpenBLAS's 51 GFLOP/s, 16 rows 105 vs 81, 32 rows 134 vs 117; 2x8 was the best of the
    2x8, 4x4, 4x8, 8x4, 8x2, 6x4 and 3x8 tiles tried (more accumulators spill, fewer reload x).

    While a block is computed, the next block's cache lines are prefetched, a share before each pair of
    rows: without it the block's first pair waits for memory while the others compute, and memory sits
    idle (8 rows 75 -> 94, 16 rows 107 -> 126, 32 rows 137 -> 149 GFLOP/s; prefetching one block ahead
    into the outer caches beat two or four blocks ahead and into L1)."""
    rows, n_in = x.shape
    n_out = w.shape[0]
    full = n_out - n_out % 8
    n_blocks = full // 8
    zero = np.float32(0.0)
    pairs = rows // 2
    lines = (8 * n_in + 15) // 16                  # 64-byte lines (16 floats) in a block of 8 rows
    lines_per_pair = (lines + pairs - 1) // max(pairs, 1)
    for t in prange(n_blocks):
        j = 8 * t
        w0, w1, w2, w3, w4, w5, w6, w7 = w[j], w[j + 1], w[j + 2], w[j + 3], w[j + 4], w[j + 5], w[j + 6], w[j + 7]
        for r in range(0, rows - 1, 2):
            if t + 1 < n_blocks:                   # this pair's share of the next block (rows j + 8 ..)
                for line in range((r // 2) * lines_per_pair, min(lines, (r // 2 + 1) * lines_per_pair)):
                    flat = 16 * line               # the block's rows lie end to end: flat element -> (row, col)
                    prefetch(w, j + 8 + flat // n_in, flat % n_in)
            xa, xb = x[r], x[r + 1]
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero      # row r:     outputs j .. j + 7
            b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = zero      # row r + 1: outputs j .. j + 7
            for i in range(n_in):
                u, v = xa[i], xb[i]
                c = w0[i]; a0 += u * c; b0 += v * c           # noqa: E702 (one line per weight row)
                c = w1[i]; a1 += u * c; b1 += v * c           # noqa: E702
                c = w2[i]; a2 += u * c; b2 += v * c           # noqa: E702
                c = w3[i]; a3 += u * c; b3 += v * c           # noqa: E702
                c = w4[i]; a4 += u * c; b4 += v * c           # noqa: E702
                c = w5[i]; a5 += u * c; b5 += v * c           # noqa: E702
                c = w6[i]; a6 += u * c; b6 += v * c           # noqa: E702
                c = w7[i]; a7 += u * c; b7 += v * c           # noqa: E702
            y[r, j], y[r, j + 1], y[r, j + 2], y[r, j + 3] = a0, a1, a2, a3
            y[r, j + 4], y[r, j + 5], y[r, j + 6], y[r, j + 7] = a4, a5, a6, a7
            y[r + 1, j], y[r + 1, j + 1], y[r + 1, j + 2], y[r + 1, j + 3] = b0, b1, b2, b3
            y[r + 1, j + 4], y[r + 1, j + 5], y[r + 1, j + 6], y[r + 1, j + 7] = b4, b5, b6, b7
        if rows % 2 == 1:                                     # the last row of an odd count: 1 x 8
            xa = x[rows - 1]
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero
            for i in range(n_in):
                u = xa[i]
                a0 += u * w0[i]; a1 += u * w1[i]; a2 += u * w2[i]; a3 += u * w3[i]  # noqa: E702
                a4 += u * w4[i]; a5 += u * w5[i]; a6 += u * w6[i]; a7 += u * w7[i]  # noqa: E702
            y[rows - 1, j], y[rows - 1, j + 1], y[rows - 1, j + 2], y[rows - 1, j + 3] = a0, a1, a2, a3
            y[rows - 1, j + 4], y[rows - 1, j + 5], y[rows - 1, j + 6], y[rows - 1, j + 7] = a4, a5, a6, a7
    for j in range(full, n_out):                              # the last n_out % 8 outputs: one dot each
        for r in range(rows):
            y[r, j] = dot_float(w, NO_SCALES, 0, j, x[r])


@njit(**_KERNEL)
def project_swiglu(weight, scales, group, x, intermediate, act):
    """act (rows, I) = silu(x W_gate^T) * (x W_up^T) with W = [W_gate; W_up] ((2 I, in), any format):
    gate j and up j are computed by the same task, so SwiGLU runs inside the parallel product (a
    separate loop of I exponentials after it would run on one thread while the others wait)."""
    rows = x.shape[0]
    for j in prange(intermediate):
        for r in range(rows):
            gate = row_dot(weight, scales, group, j, x[r])
            up = row_dot(weight, scales, group, intermediate + j, x[r])
            act[r, j] = silu(gate) * up


def product(weight, scales, group, x, y):
    """y = x @ W^T for W (out, in) in any format, by the kernel that serves that many rows best: register
    tiles (``project_tiled``) for a float W from TILED_FROM_ROWS rows on, else one dot per output and row
    (``project``). Resolved when a kernel is compiled (overload below); the row count at run time."""
    raise NotImplementedError("product() runs inside compiled kernels only")


@overload(product)
def _product_overload(weight, scales, group, x, y):
    if weight.dtype == types.float32:
        def tiled_or_dots(weight, scales, group, x, y):
            if x.shape[0] >= TILED_FROM_ROWS:
                project_tiled(weight, x, y)
            else:
                project(weight, scales, group, x, y)
        return tiled_or_dots
    return lambda weight, scales, group, x, y: project(weight, scales, group, x, y)


@njit(**_SERIAL)    # its parallel loops are those of the product it runs
def product_from_python(weight, scales, group, x, y):
    """``product`` called from Python (few_rows_product): the same choice of kernel as the decode step's."""
    product(weight, scales, group, x, y)


def product_swiglu(weight, scales, group, x, intermediate, hidden, act):
    """act (rows, I) = silu(x W_gate^T) * (x W_up^T), W = [W_gate; W_up], as ``product`` chooses: for tiles
    (float, TILED_FROM_ROWS rows on) gate | up into ``hidden`` (rows, 2 I) first, then ``swiglu_rows``
    (a tile does not pair gate j with up j); else ``project_swiglu``, SwiGLU inside the product."""
    raise NotImplementedError("product_swiglu() runs inside compiled kernels only")


@overload(product_swiglu)
def _product_swiglu_overload(weight, scales, group, x, intermediate, hidden, act):
    if weight.dtype == types.float32:
        def tiled_or_dots(weight, scales, group, x, intermediate, hidden, act):
            if x.shape[0] >= TILED_FROM_ROWS:
                project_tiled(weight, x, hidden)
                swiglu_rows(hidden, intermediate, act)
            else:
                project_swiglu(weight, scales, group, x, intermediate, act)
        return tiled_or_dots
    return lambda weight, scales, group, x, intermediate, hidden, act: project_swiglu(
        weight, scales, group, x, intermediate, act)


@njit(**_ROW)
def silu(g):
    """silu(g) = g / (1 + e^-g), through e = e^-|g| <= 1 (exp_nonpositive: vectorisable, where libm's exp
    is a call per element): g / (1 + e) for g >= 0, and g e / (1 + e) = g / (1 + e^-g) for g < 0."""
    e = exp_nonpositive(-abs(g))
    return (g if g >= 0 else g * e) / (np.float32(1.0) + e)


@njit(**_KERNEL)
def swiglu_rows(hidden, intermediate, act):
    """act (rows, I) = silu(gate) * up with hidden (rows, 2 I) = gate | up side by side, C-contiguous: Numba
    vectorises the loop only where it knows the unit stride (512 x 1408: 0.13 ms; gate and up passed as
    column views of hidden, 1.3 ms)."""
    for r in prange(hidden.shape[0]):
        for j in range(intermediate):
            act[r, j] = silu(hidden[r, j]) * hidden[r, intermediate + j]


# --------------------------------------------------------------------------- one layer in three kernels


@njit(**_SERIAL)
def rms_norm_rows(x, weight, eps, out):
    """out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight (the reference's order: sum * (1/d))."""
    rows, d = x.shape
    inv_d = np.float32(1.0) / np.float32(d)
    for r in range(rows):
        total = np.float32(0.0)
        for i in range(d):
            total += x[r, i] * x[r, i]
        inv = np.float32(1.0) / np.sqrt(total * inv_d + eps)
        for i in range(d):
            out[r, i] = x[r, i] * inv * weight[i]


@njit(**_KERNEL)
def rms_norm_parallel(x, weight, eps, out):
    """rms_norm_rows with the rows in parallel (a prefill chunk's hundreds of rows)."""
    for r in prange(x.shape[0]):
        rms_norm_rows(x[r:r + 1], weight, eps, out[r:r + 1])


@njit(**_SERIAL)    # its parallel loops are those of the product, compiled parallel itself
def decode_layer_in(x, norm, eps, w_qkv, s_qkv, g_qkv, bias, has_bias, cos, sin, interleaved,
                    n_rope_heads, head_dim, h, qkv):
    """h = rms_norm(x); qkv (rows, (H + 2 KV) hd) = h W_qkv (+ b); RoPE on the first n_rope_heads heads
    (q and k) of each row. cos, sin (rows, hd / 2): each row's own position's angles."""
    rms_norm_rows(x, norm, eps, h)
    product(w_qkv, s_qkv, g_qkv, h, qkv)
    rows = x.shape[0]
    half = head_dim // 2
    for r in range(rows):
        if has_bias:
            for c in range(qkv.shape[1]):
                qkv[r, c] += bias[c]
        for head in range(n_rope_heads):
            base = head * head_dim
            for i in range(half):
                if interleaved:
                    a, b = base + 2 * i, base + 2 * i + 1
                else:
                    a, b = base + i, base + i + half
                x1 = qkv[r, a]
                x2 = qkv[r, b]
                qkv[r, a] = x1 * cos[r, i] - x2 * sin[r, i]
                qkv[r, b] = x1 * sin[r, i] + x2 * cos[r, i]


@njit(**_KERNEL)
def attend_rows(qkv, n_heads, n_kv_heads, head_dim, k_pool, v_pool, k_scales, v_scales, quantized_kv,
                block_table, block_size, lengths, window, attn):
    """Attention of each row's query heads (the first H heads of qkv) over the cache, into attn (rows, H hd):
    the decode step's attention over an int8 cache (float caches go to the split-K decode kernel,
    backends/numba_cpu.py, which reads floats only; this one reads either, and the tests compare the two).

    Rows are independent: a serving step's rows may be several tokens of one sequence (a prefill chunk,
    each row's lengths[r] its own position + 1, its keys written by cache.update before this kernel
    runs), so row r attends causally within its chunk by its length alone.

    The cache is read through a block table, as the paged cache stores it: key t of row r lives in
    block block_table[r, t // block_size] at row t % block_size of k_pool, v_pool (blocks, KV,
    block_size, hd), float or int8 (then k_scales, v_scales (blocks, KV, block_size)). A contiguous
    cache (rows, KV, width, hd) is one block per row: block_size = width, block_table[r] = [r].
    Row r's query sits at position lengths[r] - 1 and sees keys max(0, lengths[r] - window) ..
    lengths[r] - 1 (window 0: all)."""
    rows = qkv.shape[0]
    group = n_heads // n_kv_heads
    scale = np.float32(1.0) / np.sqrt(np.float32(head_dim))
    # One task per (row, KV head): the `group` query heads that share KV head kv (GQA) are served
    # together, so each key and value row is loaded once for all of them (a task per query head loaded
    # it `group` times). s[g, t] = q_g . k_t * scale; p = exp(s - max_t s) / sum_t exp(s - max_t s);
    # out_g = sum_t p[g, t] v_t (two passes over the keys: the span is short enough to keep s).
    for task in prange(rows * n_kv_heads):
        r = task // n_kv_heads
        kv = task % n_kv_heads
        h0 = kv * group                                   # query heads h0 .. h0 + group - 1
        end = lengths[r]
        start = 0
        if window > 0:
            start = max(0, end - window)
        scores = np.empty((group, end - start), dtype=np.float32)
        queries = qkv[r, h0 * head_dim:(h0 + group) * head_dim]     # the group's heads side by side
        # Walk the blocks that hold keys start..end-1 (no division per key).
        for blk in range(start // block_size, (end + block_size - 1) // block_size):
            block = block_table[r, blk]
            t0 = blk * block_size
            for t in range(max(start, t0), min(end, t0 + block_size)):
                key = k_pool[block, kv, t - t0]
                key_scale = scale * k_scales[block, kv, t - t0] if quantized_kv else scale
                for g in range(group):
                    s = np.float32(0.0)
                    for d in range(head_dim):
                        s += queries[g * head_dim + d] * np.float32(key[d])
                    scores[g, t - start] = s * key_scale
        for g in range(group):
            best = np.float32(-np.inf)
            for t in range(end - start):
                best = max(best, scores[g, t])
            total = np.float32(0.0)
            for t in range(end - start):
                scores[g, t] = np.exp(scores[g, t] - best)
                total += scores[g, t]
            inv = np.float32(1.0) / total                 # the normalisation, folded into the weights
            for t in range(end - start):
                scores[g, t] *= inv
        out = attn[r, h0 * head_dim:(h0 + group) * head_dim]
        for i in range(group * head_dim):
            out[i] = np.float32(0.0)
        for blk in range(start // block_size, (end + block_size - 1) // block_size):
            block = block_table[r, blk]
            t0 = blk * block_size
            for t in range(max(start, t0), min(end, t0 + block_size)):
                value = v_pool[block, kv, t - t0]
                value_scale = v_scales[block, kv, t - t0] if quantized_kv else np.float32(1.0)
                for g in range(group):
                    p = scores[g, t - start] * value_scale
                    for d in range(head_dim):
                        out[g * head_dim + d] += p * np.float32(value[d])


@njit(**_SERIAL)    # its parallel loops are those of the products, compiled parallel themselves
def decode_layer_out(x, attn, w_o, s_o, g_o, mlp_norm, eps, w_in, s_in, g_in, w_down, s_down, g_down, intermediate,
                     h, hidden, act, y):
    """x += attn W_o; x += (silu(gate) * up) W_down with gate | up = rms_norm(x) W_in (attn: this layer's
    attention, (rows, H hd))."""
    rows = x.shape[0]
    product(w_o, s_o, g_o, attn, y)
    for r in range(rows):
        for i in range(x.shape[1]):
            x[r, i] += y[r, i]
    rms_norm_rows(x, mlp_norm, eps, h)
    product_swiglu(w_in, s_in, g_in, h, intermediate, hidden, act)
    product(w_down, s_down, g_down, act, y)
    for r in range(rows):
        for i in range(x.shape[1]):
            x[r, i] += y[r, i]


@njit(**_SERIAL)
def decode_head(x, norm, eps, w_head, s_head, g_head, h, logits):
    """logits = rms_norm(x) W_head."""
    rms_norm_rows(x, norm, eps, h)
    product(w_head, s_head, g_head, h, logits)


# --------------------------------------------------------------------------- the plan: which models, which caches

# Model types whose decode step is exactly the llama block (RMSNorm, RoPE, SwiGLU, optional qkv bias).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# LayerWeights fields the kernels read; a model with any other field set (a newer layer kind) is left
# to the generic path.
KNOWN_FIELDS = {"attn_norm", "attn_norm_bias", "qkv", "qkv_bias", "o", "o_bias", "mlp_norm", "mlp_norm_bias",
                "mlp_in", "mlp_in_bias", "mlp_down", "mlp_down_bias"}
# Largest batch the step takes with quantized weights (one dot per output and row: each weight row is
# reused for every row of x while in cache; beyond a few rows dequantizing for BLAS, the generic path, wins).
MAX_ROWS = 8
# The rows a float product runs by register tiles (project_tiled) rather than one dot per output (below)
# or BLAS (above), measured on `mid` (2 cores): see project_tiled.
# BLAS catches up from ~96 rows (x @ W, `mid`'s layers: 96 rows 163 vs tiles 165, 128 rows 170 vs 165,
# 512 rows 193 vs 167 GFLOP/s): the generic path's products (few_rows_product) switch to BLAS above
# TILED_TO_ROWS; the compiled step tiles at any size (see DecodeStep.max_rows).
TILED_FROM_ROWS = 4
TILED_TO_ROWS = 128
NO_SCALES = np.zeros((1, 1), dtype=np.float32)        # the scales argument of a float weight (unused)
NO_KV_SCALES = np.zeros((1, 1, 1), dtype=np.float32)


def _weight_args(weight):
    """(values, scales, group) as the kernels take them: a QuantizedWeight's (out, in) values, or a float
    matrix the model sees as (in, out) and the numba backend stores (out, in) (Backend.weight_layout):
    its transpose is then that contiguous (out, in) array, no copy."""
    if isinstance(weight, quant.QuantizedWeight):
        return weight.values, weight.scales, weight.group
    return np.ascontiguousarray(weight.T), NO_SCALES, 0


def _supported(model) -> bool:
    cfg = model.config
    if (cfg.model_type not in SUPPORTED_MODEL_TYPES or model.is_gpt2 or not model.uses_rope
            or model.dtype != np.float32 or model.pos_embed is not None):
        return False
    # What the llama block does not have (Gemma's embedding scale, query scale, logit soft-capping, a
    # second RoPE table): left to the generic path, whatever the model type says.
    if (getattr(model, "embed_scale", None) is not None or getattr(model, "q_scale", None) is not None
            or getattr(cfg, "final_logit_softcapping", None) is not None
            or set(getattr(model, "rope_tables", {"full_attention": None})) != {"full_attention"}):
        return False
    for layer in model.layers:
        for field in fields(layer):
            value = getattr(layer, field.name)
            if field.name not in KNOWN_FIELDS and value is not None:
                return False
        if layer.attn_norm_bias is not None or layer.o_bias is not None or layer.mlp_norm_bias is not None:
            return False
        if layer.mlp_in_bias is not None or layer.mlp_down_bias is not None:
            return False
    return model.final_norm_bias is None


class DecodeStep:
    """A model's compiled decode step: ``step(ids, positions, n_new, cache, windows, last_only)`` returns
    the logits, or None where this step does not apply (then the model takes its generic path):
    prefill, a sliding cache (its ring is not in position order), float16 caches, more than MAX_ROWS
    rows with quantized weights (float weights: any number), padding rows. With
    ``logit_rows`` (a serving step), only those rows' logits."""

    CACHE_KINDS = ("static", "concat", "paged")

    def __init__(self, model):
        cfg = model.config
        self.model = model
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.intermediate = cfg.intermediate_size
        self.eps = np.float32(cfg.norm_eps)
        self.scale, self.neg_inf = np.float32(1.0 / np.sqrt(cfg.head_dim)), np.float32(-np.inf)   # attention's
        self.interleaved = cfg.rope_convention == "interleaved"
        self.layers = []
        for layer in model.layers:
            has_bias = layer.qkv_bias is not None
            self.layers.append((layer.attn_norm, _weight_args(layer.qkv),
                                layer.qkv_bias if has_bias else NO_SCALES[0], has_bias,
                                _weight_args(layer.o), layer.mlp_norm, _weight_args(layer.mlp_in),
                                _weight_args(layer.mlp_down)))
        self.head = _weight_args(model.lm_head)
        # The most rows a step takes. Float weights: any number (a serving step: decode rows and prompt chunks
        # alike, one token per row), every product by register tiles. At 512 rows BLAS multiplies faster
        # (193 vs 167 GFLOP/s alone), but the step's fused kernels and its attention (the split-K kernel,
        # each prompt row attending causally by its own length) win the whole step: the serving engine on
        # `mid` went 767 -> 813 tok/s (3 alternating rounds, 1.04-1.07x) against a limit of 128 rows.
        # Quantized weights: one dot per output and row, up to MAX_ROWS.
        floats = all(values.dtype == np.float32 for layer in self.layers
                     for values, _, _ in (layer[1], layer[4], layer[6], layer[7])) and self.head[0].dtype == np.float32
        self.max_rows = math.inf if floats else MAX_ROWS
        # Multiply-adds of one layer's products: below numba_cpu.PARALLEL_MIN_WORK the kernels run on the
        # calling thread (waking the pool costs more than it saves; see threads_for).
        d = cfg.hidden_size
        self.layer_work = d * ((self.n_heads + 2 * self.n_kv) * self.head_dim + 2 * self.intermediate) + (
            self.n_heads * self.head_dim + self.intermediate) * d

    @staticmethod
    def _contiguous_table(rows):
        return np.arange(rows, dtype=np.int32)[:, None]

    def __call__(self, ids, positions, n_new, cache, windows, last_only, logit_rows=None):
        rows = ids.shape[0]
        # Any object keeping the cache protocol may arrive (the serving engine's store): only the
        # kinds and dtypes this step knows are taken.
        dtype = getattr(cache, "dtype", None)
        if (getattr(cache, "kind", None) not in self.CACHE_KINDS or rows > self.max_rows or (n_new != 1).any()
                or getattr(dtype, "name", None) not in ("float32", "int8")):
            return None
        model, n_heads, n_kv, head_dim = self.model, self.n_heads, self.n_kv, self.head_dim
        d = model.config.hidden_size
        x = np.ascontiguousarray(model.embed[ids[:, 0]])                  # (rows, d)
        # (rows, 1) positions -> (rows, 1, hd/2) angles -> (rows, hd/2); the table grows as the generic
        # path's would (and dynamic NTK rotates by this call's length, as there)
        cos, sin = model.rope_tables["full_attention"].lookup(positions, int(positions.max()))
        cos, sin = np.ascontiguousarray(cos[:, 0]), np.ascontiguousarray(sin[:, 0])
        width = (n_heads + 2 * n_kv) * head_dim
        h = np.empty((rows, d), dtype=np.float32)
        qkv = np.empty((rows, width), dtype=np.float32)
        attn = np.empty((rows, n_heads * head_dim), dtype=np.float32)
        hidden = np.empty((rows, 2 * self.intermediate), dtype=np.float32)
        act = np.empty((rows, self.intermediate), dtype=np.float32)
        y = np.empty((rows, d), dtype=np.float32)
        lse = np.empty((rows, n_heads, 1), dtype=np.float32)              # split-K's lse (not used here)
        # (rows, (H + 2 KV) hd) -> (rows, H + 2 KV, 1, hd): this step's heads, as cache.update takes them
        heads = qkv.reshape(rows, n_heads + 2 * n_kv, 1, head_dim)
        # At most the caller's numba.get_num_threads() (a benchmark or server may have lowered it).
        with numba_threads(min(threads_for(rows * self.layer_work), numba.get_num_threads())):
            return self._layers(x, cos, sin, cache, windows, last_only, logit_rows, h, qkv, heads, attn, lse, hidden,
                                act, y)

    def _layers(self, x, cos, sin, cache, windows, last_only, logit_rows, h, qkv, heads, attn, lse, hidden, act, y):
        model, n_heads, n_kv, head_dim = self.model, self.n_heads, self.n_kv, self.head_dim
        rows = x.shape[0]
        for index, (norm, (w_qkv, s_qkv, g_qkv), bias, has_bias, (w_o, s_o, g_o), mlp_norm,
                    (w_in, s_in, g_in), (w_down, s_down, g_down)) in enumerate(self.layers):
            decode_layer_in(x, norm, self.eps, w_qkv, s_qkv, g_qkv, bias, has_bias, cos, sin, self.interleaved,
                            n_heads + n_kv, head_dim, h, qkv)
            view = cache.update(index, heads[:, n_heads:n_heads + n_kv], heads[:, n_heads + n_kv:])
            quantized_kv = view.k_scales is not None
            window = windows[index]
            if view.block_table is None:
                # contiguous (rows, KV, width, hd): one block of `width` positions per row
                table, block_size = self._contiguous_table(rows), view.k.shape[2]
            else:
                table, block_size = np.ascontiguousarray(view.block_table), view.k.shape[2]   # (rows, blocks) int32
            window = 0 if window is None else int(window)
            if quantized_kv:
                attend_rows(qkv, n_heads, n_kv, head_dim, view.k, view.v, view.k_scales, view.v_scales, True, table,
                            block_size, view.lengths, window, attn)
            else:
                # Float K/V: the backend's split-K decode kernel, one split (each row x KV head is a task), its
                # output straight into attn: (rows, H, 1, hd) is attn's (rows, H hd) seen per head.
                split_k_decode_kernel(heads[:, :n_heads], view.k, view.v, table, block_size, view.lengths, window,
                                      self.scale, self.neg_inf, 1, attn.reshape(rows, n_heads, 1, head_dim),
                                      lse)
            decode_layer_out(x, attn, w_o, s_o, g_o, mlp_norm, self.eps, w_in, s_in, g_in, w_down, s_down, g_down,
                             self.intermediate, h, hidden, act, y)
        if logit_rows is not None:
            # a serving step: only the rows that sample next (the last token of each chunk) need logits
            x, h = np.ascontiguousarray(x[logit_rows]), h[:len(logit_rows)]                # (rows', d)
        w_head, s_head, g_head = self.head
        logits = np.empty((x.shape[0], model.config.vocab_size), dtype=np.float32)
        decode_head(x, model.final_norm, self.eps, w_head, s_head, g_head, h, logits)
        return logits if last_only else logits[:, None, :]


def prepare_decode(model):
    """The compiled decode step for ``model``, or None where its layers are not the llama block."""
    return DecodeStep(model) if _supported(model) else None


def few_rows_product(x, values, scales, group, bias=None):
    """x (rows, in) @ W^T (+ b) by a compiled product for W (out, in) in any format (float: scales and
    group unused): ``project`` up to TILED_FROM_ROWS - 1 rows and for the quantized formats (up to
    MAX_ROWS), ``project_tiled`` for a float W from TILED_FROM_ROWS to TILED_TO_ROWS rows. None where
    none serves: more rows (there BLAS's blocked matmul wins, after dequantizing for a quantized W) or
    float64 (the kernels accumulate in float32)."""
    rows = x.shape[0] if x.ndim == 2 else 0
    most = TILED_TO_ROWS if values.dtype == np.float32 else MAX_ROWS
    if not 0 < rows <= most or x.dtype != np.float32 or values.dtype == np.float64:
        return None
    x = np.ascontiguousarray(x)
    y = np.empty((rows, values.shape[0]), dtype=np.float32)
    # At most the caller's numba.get_num_threads(), as in DecodeStep.
    with numba_threads(min(threads_for(rows * values.size), numba.get_num_threads())):
        product_from_python(values, scales, group, x, y)
    if bias is not None:
        y += bias
    return y
