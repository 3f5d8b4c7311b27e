"""Quantized weights (minikv/quant.py) and the numba backend's compiled decode step.

Properties
----------
* quantize -> dequantize misses every element by at most half a quantization step:
  |w - deq| <= scale / 2 + ulp(deq) / 2 (the float32 rounding of q * scale), for random groups
  with zeros, all-zero groups, outliers, denormals, short last groups; and |q| <= qmax.
* int4 packing round-trips every integer in [-8, 7].
* the numba kernels (float32, int8, int4) equal the reference product x @ dequantize(W)^T.
* the compiled decode step equals the numpy reference's step (float32, int8, int4 weights), and
  greedy tokens of quantized models equal their numpy-reference twins.

Tolerances (float32)
--------------------
A matrix-vector product sums n = in_features terms; any two summation orders differ by at most
~n * eps * sum_i |x_i w_i| (eps = 2^-24 ~ 6e-8). With n <= 608 that is 3.6e-5 * (|x| @ |W|^T);
in practice errors partly cancel, and we allow 2e-5 * (|x| @ |W|^T) per output (a wrong scale, a
swapped nibble or a skipped group is off by O(1) relative to that sum and fails). Logits of a whole
step pass through 6 layers: atol = rtol = 1e-4 (observed differences ~1e-6 on logits of size ~10).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import minikv
from minikv import quant
from minikv.cache import StaticCache
from minikv.errors import ConfigError

HAS_NUMBA = "numba" in minikv.available_backends()
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba backend not available")

FLOAT32_TINY = float(np.finfo(np.float32).smallest_subnormal)
BIG = float(np.float32(1e30))                 # outliers (exactly representable bounds, as hypothesis wants)
DENORMAL = float(np.float32(1e-38))           # below float32's smallest normal (1.18e-38)


def _ulp(x):
    return np.spacing(np.abs(x).astype(np.float32))


def _matrices(max_rows=4, max_cols=80):
    """float32 matrices mixing ordinary values, zeros, outliers and denormals; even columns (int4)."""
    element = st.one_of(
        st.floats(-1.0, 1.0, width=32),
        st.just(0.0),
        st.floats(-BIG, BIG, width=32),
        st.floats(-DENORMAL, DENORMAL, width=32),                  # denormals (below float32's smallest normal)
        st.sampled_from([FLOAT32_TINY, -FLOAT32_TINY, 3 * FLOAT32_TINY]),
    )
    shape = st.tuples(st.integers(1, max_rows), st.integers(1, max_cols // 2).map(lambda n: 2 * n))
    return shape.flatmap(lambda s: hnp.arrays(np.float32, s, elements=element))


def _expanded_scales(qw):
    return np.repeat(qw.scales, qw.group, axis=1)[:, :qw.shape[1]]


@pytest.mark.parametrize("format", ["int8", "int4"])
@settings(max_examples=60, deadline=None)
@given(w=_matrices(), group_choice=st.sampled_from([None, 2, 6, 16]))
def test_dequantize_error_within_half_a_step(format, w, group_choice):
    qw = quant.quantize(w, format, group=group_choice)
    q = quant.integer_values(qw)
    qmax = quant.FORMATS[format][1]
    assert q.shape == w.shape and qw.scales.dtype == np.float32
    assert np.abs(q.astype(np.int16)).max() <= qmax
    deq = quant.dequantize(qw)
    assert deq.dtype == np.float32
    scale = _expanded_scales(qw).astype(np.float64)
    error = np.abs(w.astype(np.float64) - deq.astype(np.float64))
    bound = scale / 2 + _ulp(deq).astype(np.float64) / 2
    assert (error <= bound).all(), float((error - bound).max())
    # All-zero groups are exactly zero; so is every zero weight.
    assert (deq[w == 0] == 0).all()


def test_a_wrong_scale_breaks_the_bound():
    """The bound above is tight enough to catch a broken dequantization (scales shifted by one group)."""
    w = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32) * np.linspace(0.01, 3, 256)
    qw = quant.quantize(w, "int8")
    broken = quant.QuantizedWeight("int8", qw.values, np.roll(qw.scales, 1, axis=1), qw.group, qw.shape)
    error = np.abs(w - quant.dequantize(broken))
    assert (error > _expanded_scales(qw) / 2 + _ulp(w)).any()


@settings(max_examples=30, deadline=None)
@given(q=st.tuples(st.integers(1, 3), st.integers(1, 40).map(lambda n: 2 * n)).flatmap(
    lambda s: hnp.arrays(np.int8, s, elements=st.integers(-8, 7))), group=st.sampled_from([2, 4, 32]))
def test_int4_packing_round_trips(q, group):
    packed = quant.pack_int4(q, group)
    assert packed.dtype == np.uint8 and packed.shape == (q.shape[0], q.shape[1] // 2)
    assert np.array_equal(quant.unpack_int4(packed, q.shape[1], group), q)


def test_scales_follow_the_formula_rounded_up():
    w = np.array([[0.5, -2.0, 1.0, 0.25], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    qw = quant.quantize(w, "int8", group=4)
    nearest = np.float32(2.0 / 127)
    # fl(2/127) * 127 < 2 here, so the scale is the next float32 up (the largest weight maps to -127).
    assert float(nearest) * 127 < 2.0 and qw.scales[0, 0] == np.nextafter(nearest, np.float32(1))
    assert qw.scales[1, 0] == 0
    # 1.0 / scale is just below 63.5 (the scale was rounded up), so it rounds to 63, not 64
    assert quant.integer_values(qw)[0].tolist() == [32, -127, 63, 16]
    assert quant.integer_values(qw)[1].tolist() == [0, 0, 0, 0]


def test_quantize_refuses_bad_input():
    with pytest.raises(ConfigError, match="inf or NaN"):
        quant.quantize(np.array([[1.0, np.nan]], dtype=np.float32))
    with pytest.raises(ConfigError, match="even"):
        quant.quantize(np.ones((2, 3), dtype=np.float32), "int4")
    with pytest.raises(ConfigError, match="int3"):
        quant.quantize(np.ones((2, 4), dtype=np.float32), "int3")
    with pytest.raises(ConfigError, match="quantize="):
        minikv.load(quantize="int3")


def test_kv_rows_quantize_within_half_a_step():
    x = np.random.default_rng(1).standard_normal((2, 3, 5, 16)).astype(np.float32)
    x[0, 0, 0] = 0.0
    q, scales = quant.quantize_rows(x)
    assert q.dtype == np.int8 and scales.shape == (2, 3, 5)
    deq = quant.dequantize_rows(q, scales)
    assert (np.abs(x - deq) <= scales[..., None] / 2 + _ulp(deq) / 2).all()
    assert (deq[0, 0, 0] == 0).all()


def test_quantized_model_uses_quantized_projections_only():
    model = minikv.load(quantize="int8")
    layer = model.layers[0]
    assert isinstance(layer.qkv, quant.QuantizedWeight) and isinstance(model.lm_head, quant.QuantizedWeight)
    assert model.embed.dtype == np.float32 and layer.attn_norm.dtype == np.float32
    logits = model.forward(np.array([[1, 2, 3]]))
    assert logits.dtype == np.float32


# ------------------------------------------------------------------ numba kernels and the decode step


def _close_to_product(y, x, dense):
    bound = 2e-5 * (np.abs(x).astype(np.float64) @ np.abs(dense).astype(np.float64).T) + 1e-30
    return np.abs(y.astype(np.float64) - (x.astype(np.float64) @ dense.astype(np.float64).T)) <= bound


@needs_numba
@pytest.mark.parametrize("format", ["float32", "int8", "int4"])
@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 3), out_features=st.integers(1, 70), in_half=st.integers(1, 80),
       seed=st.integers(0, 2**16))
def test_numba_projection_equals_dequantized_product(format, rows, out_features, in_half, seed):
    from minikv.backends import numba_decode

    rng = np.random.default_rng(seed)
    in_features = 2 * in_half
    w = (rng.standard_normal((out_features, in_features)) * rng.exponential(1, (1, in_features))).astype(np.float32)
    x = rng.standard_normal((rows, in_features)).astype(np.float32)
    y = np.full((rows, out_features), np.nan, dtype=np.float32)
    if format == "float32":
        numba_decode.project(w, numba_decode.NO_SCALES, 0, x, y)   # (out, in): the numba backend's layout
        dense = w
    else:
        qw = quant.quantize(w, format)
        numba_decode.project(qw.values, qw.scales, qw.group, x, y)
        dense = quant.dequantize(qw)
        # The backend's quantized_linear is the same kernel and equals the reference function.
        reference = quant.quantized_linear(x, qw)
        assert _close_to_product(minikv.get_backend("numba").quantized_linear(x, qw), x, dense).all()
        assert _close_to_product(reference, x, dense).all()
    assert _close_to_product(y, x, dense).all()
    # The fused SwiGLU product over the same matrix as [W_gate; W_up]: silu(x W_gate^T) * (x W_up^T).
    if out_features % 2 == 0:
        inter = out_features // 2
        act = np.full((rows, inter), np.nan, dtype=np.float32)
        if format == "float32":
            numba_decode.project_swiglu(w, numba_decode.NO_SCALES, 0, x, inter, act)
        else:
            numba_decode.project_swiglu(qw.values, qw.scales, qw.group, x, inter, act)
        gate, up = (x.astype(np.float64) @ dense.astype(np.float64).T)[:, :inter], \
            (x.astype(np.float64) @ dense.astype(np.float64).T)[:, inter:]
        expected = gate / (1 + np.exp(-gate)) * up
        np.testing.assert_allclose(act, expected, rtol=1e-3, atol=1e-3 * (1 + np.abs(expected).max()))


def _decode_logits(model, prompts, steps, cache_dtype=None, kind="static"):
    """Prefill ``prompts`` (a right-padded batch) into a cache, then ``steps`` decode steps feeding
    fixed tokens; returns each step's logits (batch, vocab)."""
    lengths = np.array([len(p) for p in prompts])
    ids = np.zeros((len(prompts), lengths.max()), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    options = dict(block_size=4) if kind == "paged" else {}     # several blocks per sequence
    cache = model.new_cache(kind, batch_size=len(prompts), max_seq_len=64, dtype=cache_dtype, **options)
    model.forward(ids, cache=cache, n_new=lengths)
    out = []
    for step in range(steps):
        token = np.array([[(7 * step + 3 * b + 1) % model.config.vocab_size] for b in range(len(prompts))])
        out.append(model.forward(token, cache=cache, last_only=True))
    return np.stack(out)


@needs_numba
@pytest.mark.parametrize("quantize, kind", [(None, "static"), ("int8", "static"), ("int4", "static"),
                                            (None, "paged"), (None, "concat")])
def test_compiled_decode_step_equals_numpy_reference(quantize, kind):
    reference = minikv.load(quantize=quantize)
    compiled = minikv.load(quantize=quantize, backend="numba")
    assert compiled._decode_step is not None
    calls = []
    step = compiled._decode_step
    compiled._decode_step = lambda *args: calls.append(1) or step(*args)
    prompts = [[10, 20, 30, 40, 50], [60, 70, 80]]          # ragged: the two rows sit at different positions
    expected = _decode_logits(reference, prompts, 4, kind=kind)
    got = _decode_logits(compiled, prompts, 4, kind=kind)
    assert len(calls) == 4                                # every decode step took the compiled path
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@needs_numba
def test_numba_backend_keeps_float_weights_out_in_without_a_copy():
    """The numba backend's weights: (in, out)-shaped views of contiguous (out, in) arrays, the same
    memory the canonical weights and the compiled step read (no second copy of the model); the numpy
    backend's are contiguous (in, out). Both compute the same logits."""
    from minikv.backends import numba_decode

    numpy_model, numba_model = minikv.load(), minikv.load(backend="numba")
    for model, contiguous_as in ((numpy_model, "in_out"), (numba_model, "out_in")):
        for layer in model.layers:
            for w in (layer.qkv, layer.o, layer.mlp_in, layer.mlp_down):
                assert (w.flags.c_contiguous if contiguous_as == "in_out" else w.T.flags.c_contiguous)
    layer = numba_model.layers[0]
    assert np.shares_memory(numba_model.weights["layers.0.attn.q.weight"], layer.qkv)
    values, _, _ = numba_decode._weight_args(layer.mlp_down)
    assert np.shares_memory(values, layer.mlp_down)                 # the kernel reads the model's array
    ids = np.array([[5, 80, 99, 101, 32]])
    np.testing.assert_allclose(numba_model.forward(ids), numpy_model.forward(ids), rtol=1e-4, atol=1e-4)


@needs_numba
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 140), n_in=st.integers(1, 70), n_out=st.integers(1, 70), seed=st.integers(0, 2**16),
       with_bias=st.booleans())
@example(rows=5, n_in=17, n_out=13, seed=0, with_bias=False)     # tiles: an odd row and 13 % 8 outputs left
@example(rows=128, n_in=33, n_out=64, seed=1, with_bias=True)    # the largest tiled product
@example(rows=129, n_in=33, n_out=9, seed=2, with_bias=False)    # BLAS
def test_numba_linear_equals_the_product_for_few_and_many_rows(rows, n_in, n_out, seed, with_bias):
    """NumbaBackend.linear over an (out, in) weight seen as (in, out): one dot per output up to 3 rows,
    register tiles from TILED_FROM_ROWS to TILED_TO_ROWS, BLAS on the (out, in) array beyond; each
    equals x @ W (float32 round-off)."""
    rng = np.random.default_rng(seed)
    w_out_in = rng.standard_normal((n_out, n_in)).astype(np.float32)
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    backend = minikv.get_backend("numba")
    y = backend.linear(x, w_out_in.T)
    assert y.shape == (rows, n_out) and y.dtype == np.float32
    assert _close_to_product(y, x, w_out_in).all()
    if with_bias:
        bias = rng.standard_normal(n_out).astype(np.float32)
        np.testing.assert_array_equal(backend.linear(x, w_out_in.T, bias), y + bias)


@needs_numba
@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 40), d=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_numba_rms_norm_equals_the_reference(rows, d, seed):
    """NumbaBackend.rms_norm (compiled, rows in parallel) equals layers.rms_norm to float32 round-off; other
    shapes and dtypes (a head-wise norm's 4-D view, float64) go to the reference itself."""
    from minikv import layers

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, d)) * rng.uniform(0.01, 100)).astype(np.float32)
    weight = rng.standard_normal(d).astype(np.float32)
    backend = minikv.get_backend("numba")
    got, expected = backend.rms_norm(x, weight, 1e-5), layers.rms_norm(x, weight, 1e-5)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6 * np.abs(weight).max())
    assert not np.allclose(backend.rms_norm(x, weight, 1e-5), layers.rms_norm(x, weight * 1.01, 1e-5),
                           rtol=2e-5, atol=1e-6 * np.abs(weight).max())  # the bound tells a 1% error
    x64 = x[None, None].astype(np.float64)
    np.testing.assert_array_equal(backend.rms_norm(x64, weight, 1e-5), layers.rms_norm(x64, weight, 1e-5))


@needs_numba
def test_compiled_swiglu_equals_the_reference_over_the_whole_range():
    """swiglu_rows (the compiled step's SwiGLU: silu through exp_nonpositive of -|g|, both signs of g)
    against layers.swiglu in float64: within 1e-6 relative (float32 round-off) from g = -200 (where
    e^-g overflows, the reference's limit -0) to +200, the absolute floor 1e-35 (exp_nonpositive returns 0
    below e^-87.3, where silu(g) = g e^g is ~1e-36); a silu that used e^-|g| for both signs fails."""
    from minikv import layers
    from minikv.backends import numba_decode

    gate = np.concatenate([np.linspace(-200, 200, 4001), [0.0, -0.0, -88.0, -87.0, 1e-30, -1e-30]]).astype(np.float32)
    up = np.random.default_rng(0).uniform(0.5, 2.0, gate.size).astype(np.float32)
    hidden = np.ascontiguousarray(np.concatenate([gate, up])[None])            # (1, 2 I): gate | up
    act = np.empty((1, gate.size), np.float32)
    numba_decode.swiglu_rows(hidden, gate.size, act)
    expected = layers.swiglu(gate.astype(np.float64), up.astype(np.float64))
    assert np.all(np.abs(act[0] - expected) <= 1e-6 * np.abs(expected) + 1e-35)
    wrong = gate / (1 + np.exp(-np.abs(gate).astype(np.float64))) * up             # e^-|g| for g < 0 too
    assert not np.all(np.abs(wrong - expected) <= 1e-6 * np.abs(expected) + 1e-35)


@needs_numba
def test_tiled_product_broken_variant_is_caught():
    """The comparison above fails for a tiled product that forgets an odd last row or the outputs past
    the last full tile of 8 (both left as np.empty's garbage, here NaN-filled to be sure)."""
    from minikv.backends import numba_decode

    rng = np.random.default_rng(0)
    w_out_in = rng.standard_normal((13, 24)).astype(np.float32)
    x = rng.standard_normal((7, 24)).astype(np.float32)
    backend = minikv.get_backend("numba")
    assert _close_to_product(backend.linear(x, w_out_in.T), x, w_out_in).all()
    original = numba_decode.product_from_python        # the compiled product the backend's linear calls
    tiles = numba_decode.project_tiled

    def broken(kind):
        def product(w, scales, group, x, y):
            y[:] = np.nan
            if kind == "odd row":
                tiles(w, x[:-1], y[:-1])
            else:
                tiles(w[:8], x, y[:, :8])
        return product

    for kind in ("odd row", "tail outputs"):
        numba_decode.product_from_python = broken(kind)
        try:
            assert not _close_to_product(backend.linear(x, w_out_in.T), x, w_out_in).all(), kind
        finally:
            numba_decode.product_from_python = original


@needs_numba
def test_compiled_decode_step_broken_variant_is_caught():
    """The comparison above fails for a step that skips the newest key (lengths - 1)."""
    from minikv.backends import numba_decode

    reference = minikv.load()
    compiled = minikv.load(backend="numba")
    original = numba_decode.split_k_decode_kernel

    def skip_newest_key(*args):
        args = list(args)
        args[5] = args[5] - 1                                # lengths
        return original(*args)

    numba_decode.split_k_decode_kernel = skip_newest_key
    try:
        got = _decode_logits(compiled, [[10, 20, 30]], 2)
    finally:
        numba_decode.split_k_decode_kernel = original
    expected = _decode_logits(reference, [[10, 20, 30]], 2)
    assert not np.allclose(got, expected, rtol=1e-4, atol=1e-4)


@needs_numba
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_greedy_tokens_of_quantized_models_equal_their_numpy_twin(quantize):
    prompt = "The cat"
    reference = minikv.load(quantize=quantize).generate(prompt, max_new_tokens=24, temperature=0.0)
    compiled = minikv.load(quantize=quantize, backend="numba").generate(prompt, max_new_tokens=24, temperature=0.0)
    assert compiled.tokens == reference.tokens


# ------------------------------------------------------------------ int8 KV cache


class RoundingCache(StaticCache):
    """A float32 static cache that stores every K/V row rounded exactly as the int8 cache rounds it:
    dequantize(quantize(row)). Attention over it is attention over the int8 cache's values."""

    def update(self, layer, k_new, v_new):
        k = quant.dequantize_rows(*quant.quantize_rows(k_new))
        v = quant.dequantize_rows(*quant.quantize_rows(v_new))
        return super().update(layer, k, v)


def _decode_with(model, ids, prompt_len, cache):
    model.forward(ids[:, :prompt_len], cache=cache)
    return np.stack([model.forward(ids[:, t:t + 1], cache=cache, last_only=True)
                     for t in range(prompt_len, ids.shape[1])])


def _rounding_cache(model, max_seq_len=32):
    cfg = model.config
    return RoundingCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 1, max_seq_len, backend=model.backend)


@pytest.mark.parametrize("backend", ["numpy"] + (["numba"] if HAS_NUMBA else []))
@settings(max_examples=4, deadline=None)
@given(ids=hnp.arrays(np.int64, (1, 9), elements=st.integers(0, 255)), prompt_len=st.integers(1, 6))
@example(ids=np.array([[3, 5, 3, 3, 3, 3, 3, 3, 3]]), prompt_len=1)    # a K/V element on a rounding boundary
def test_int8_kv_cache_equals_attention_over_the_same_rounding(backend, ids, prompt_len):
    """Prefill + decode through the int8 cache equals the same steps through a float32 cache holding
    the identically rounded K/V (on numba, the int8 one is read by the compiled step, which
    dequantizes inside its dot products). Comparing against a fresh prefill of each prefix instead is
    not exact: K computed by another kernel may differ by an ulp and round to a neighbouring integer."""
    model = _bundled(backend)
    int8_cache = model.new_cache("static", batch_size=1, max_seq_len=32, dtype="int8")
    got = _decode_with(model, ids, prompt_len, int8_cache)
    expected = _decode_with(model, ids, prompt_len, _rounding_cache(model))
    # numpy: the int8 path dequantizes and runs the very same attention: equal to round-off.
    # numba: the compiled step reads int8 inside its dot products, whose round-off differs from
    # attention over the dequantized floats by ~1e-7; a K or V element of a later layer that sits on a
    # rounding boundary then rounds to the neighbouring integer (one step: seen up to 3e-3 in the
    # logits; seen up to 2.6e-2 on 2 of 2048 logits; on the repeated tokens of the example above a
    # flipped row shifts every logit of later steps: max 1.0e-2, mean 6.8e-3). The kernel itself is
    # checked to round-off below; here a wrong scale must still fail: scales 1.1x too large gave, over 40
    # random prompts, a max difference >= 0.39 and a mean >= 0.094. So on numba: every logit within 0.1
    # and their mean difference below 2e-2.
    if backend == "numpy":
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    else:
        difference = np.abs(got - expected)
        assert difference.max() < 0.1 and difference.mean() < 2e-2, (difference.max(), difference.mean())


@needs_numba
@settings(max_examples=10, deadline=None)
@given(width=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_compiled_attention_over_int8_equals_attention_over_its_dequantized_values(width, seed):
    """The compiled step's int8 attention (attend_rows) with int8 K/V and per-row scales equals the same
    kernel over the dequantized float32 K/V (strided views, as the static cache hands them over), and the
    split-K kernel the step uses for float caches, to float32 round-off."""
    from minikv.backends import numba_decode as nd

    rng = np.random.default_rng(seed)
    n_heads, n_kv, head_dim, d, inter = 4, 2, 16, 32, 24

    def strided(a):                   # a (1, kv, width, ...) prefix view of a 32-slot array
        full = np.zeros(a.shape[:2] + (32,) + a.shape[3:], a.dtype)
        full[:, :, :width] = a
        return full[:, :, :width]

    k = rng.standard_normal((1, n_kv, width, head_dim)).astype(np.float32)
    v = rng.standard_normal((1, n_kv, width, head_dim)).astype(np.float32)
    (kq, ks), (vq, vs) = quant.quantize_rows(k), quant.quantize_rows(v)
    dense = (quant.dequantize_rows(kq, ks), quant.dequantize_rows(vq, vs), nd.NO_KV_SCALES, nd.NO_KV_SCALES, False)
    qkv = rng.standard_normal((1, (n_heads + 2 * n_kv) * head_dim)).astype(np.float32)
    table, lengths = np.zeros((1, 1), np.int32), np.array([width])
    outputs = []
    for k_pool, v_pool, k_scales, v_scales, quantized in ((kq, vq, ks, vs, True), dense):
        attn = np.zeros((1, n_heads * head_dim), np.float32)
        nd.attend_rows(qkv, n_heads, n_kv, head_dim, strided(k_pool), strided(v_pool),
                       strided(k_scales) if quantized else k_scales, strided(v_scales) if quantized else v_scales,
                       quantized, table, width, lengths, 0, attn)
        outputs.append(attn)
    split_k = np.zeros((1, n_heads, 1, head_dim), np.float32)
    heads = qkv.reshape(1, n_heads + 2 * n_kv, 1, head_dim)
    nd.split_k_decode_kernel(heads[:, :n_heads], strided(dense[0]), strided(dense[1]), table, width, lengths, 0,
                             np.float32(1 / np.sqrt(head_dim)), np.float32(-np.inf), 1, split_k,
                             np.zeros((1, n_heads, 1), np.float32))
    outputs.append(split_k.reshape(1, -1))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outputs[2], outputs[1], rtol=1e-5, atol=1e-5)


def test_int8_kv_cache_rounds_for_real():
    """The broken variant: against a float32 cache (no rounding) the same comparison fails, and the
    int8 cache holds about a quarter of the bytes."""
    model = _bundled("numpy")
    ids = np.array([[5, 80, 99, 101, 32, 7, 64]])
    cached = _decode_with(model, ids, 3, model.new_cache("static", batch_size=1, max_seq_len=32, dtype="int8"))
    float_cache = model.new_cache("static", batch_size=1, max_seq_len=32)
    exact = _decode_with(model, ids, 3, float_cache)
    assert not np.allclose(cached, exact, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cached, exact, atol=0.5)          # ... and the rounding stays small
    int8_cache = model.new_cache("static", batch_size=1, max_seq_len=32, dtype="int8")
    assert int8_cache.nbytes * 32 == float_cache.nbytes * (32 + 4) // 4   # (hd + 4) bytes per row vs 4 hd, hd = 32


def test_int8_kv_cache_saves_and_loads(tmp_path):
    model = _bundled("numpy")
    cache = model.new_cache("static", batch_size=1, max_seq_len=16, dtype="int8")
    model.forward(np.array([[1, 2, 3]]), cache=cache)
    restored = minikv.load_cache(cache.save(tmp_path / "c.safetensors"))
    a = model.forward(np.array([[4]]), cache=cache)
    b = model.forward(np.array([[4]]), cache=restored)
    assert np.array_equal(a, b)


# The int8 KV cache of the other kinds (concat, paged, sliding): tests/test_kv_int8.py.


_MODELS = {}


def _bundled(backend):
    if backend not in _MODELS:
        _MODELS[backend] = minikv.load(backend=backend)
    return _MODELS[backend]
