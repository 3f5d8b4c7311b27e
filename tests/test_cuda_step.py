"""The device decode step (backends/cuda/step.py) and its fused kernels, on "cuda-sim" (or "cuda").

What is proven here without a GPU, by Numba's CUDA simulator running the very kernels a GPU runs:

* the fused kernels equal the reference math: ``rope_write_kv`` = ``minikv.rope.apply_rope`` +
  ``write_rows`` at the position read from the device; ``add_rms_norm`` = ``x + delta`` then
  ``minikv.layers.rms_norm``; ``swiglu`` = ``minikv.layers.swiglu`` (float32: 2e-5, float64: 1e-12,
  the bounds of tests/test_backends.py);
* greedy tokens of the step equal the numpy backend's ``generate`` for a ragged batch, and its
  logits equal numpy's forward (1e-4, float32 through two layers as in test_backends);
* per step, exactly 2 host<->device transfers (ids in, logits out; greedy: 1, the ids out) and
  10 L + 4 launches (6 L + 2 of them Numba kernels), counted by the backend's own counters;
* after construction the step allocates nothing: every launch writes into a buffer that existed
  before the first step (the precondition of a CUDA graph);
* the library-free plan (what a CUDA graph captures: own GEMV, embedding and argmax kernels, no
  cuBLAS) holds only Numba launches and gives numpy's tokens (static and paged, float16 cache,
  biases, sliding window); its kernels equal NumPy's matmul / indexing / argmax;
* a paged cache's block table is uploaded only on the steps that claim a block;
* deliberately broken variants fail: a step whose lengths never advance on the device gives other
  tokens; a plan entry without ``out=`` is seen allocating.

The simulator runs one Python thread per CUDA thread (~0.5 s per step of the 2-layer fixture), so
every case is tiny.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minikv
from minikv import layers
from minikv.backend import write_rows
from minikv.rope import apply_rope, cos_sin_table

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
DEVICE = [name for name in ("cuda", "cuda-sim") if name in minikv.available_backends()]
if not DEVICE:
    pytest.skip("neither backend 'cuda' nor 'cuda-sim' is available here", allow_module_level=True)
NAME = DEVICE[0]
TOL = {np.dtype(np.float64): dict(rtol=1e-12, atol=1e-12), np.dtype(np.float32): dict(rtol=2e-5, atol=2e-5)}
PROMPTS = [[5, 17, 3, 42, 8], [9, 1, 30]]    # a ragged batch: 5 and 3 tokens

_MODELS: dict = {}


def model(fixture: str, backend: str):
    if (fixture, backend) not in _MODELS:
        _MODELS[fixture, backend] = minikv.load(FIXTURES / fixture, backend=backend)
    return _MODELS[fixture, backend]


def host(backend, array):
    return np.asarray(backend.to_host(array))


def prefill(m, prompts, max_seq_len=16):
    """A static cache holding the prompts (plain forward) and each row's first greedy token."""
    from minikv.generate import _padded

    ids, lengths = _padded(prompts)
    cache = m.new_cache("static", batch_size=len(prompts), max_seq_len=max_seq_len)
    logits = m.forward(ids, cache, n_new=lengths, last_only=True)
    return cache, logits.argmax(-1)


def delta(before: dict, after: dict) -> dict:
    return {key: after[key] - before[key] for key in before}


# --------------------------------------------------------------------------- fused kernels


@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 2), n_kv=st.integers(1, 2), group=st.integers(1, 2), half=st.integers(1, 3),
       dtype=st.sampled_from([np.float32, np.float64]), f16=st.booleans(), interleaved=st.booleans(),
       seed=st.integers(0, 2**31))
def test_rope_write_kv_is_rope_then_the_cache_write(batch, n_kv, group, half, dtype, f16, interleaved, seed):
    backend = minikv.get_backend(NAME)
    rng = np.random.default_rng(seed)
    head_dim, n_q, capacity = 2 * half, n_kv * group, 6
    cache_dtype = np.float16 if f16 and dtype == np.float32 else dtype
    qkv = rng.standard_normal((batch, (n_q + 2 * n_kv) * head_dim)).astype(dtype)
    cos, sin = cos_sin_table(capacity, head_dim, 10000.0, dtype)
    lengths = rng.integers(0, capacity, size=batch)            # the new token sits at position lengths[b]
    k_cache = rng.standard_normal((batch, n_kv, capacity, head_dim)).astype(cache_dtype)
    v_cache = rng.standard_normal((batch, n_kv, capacity, head_dim)).astype(cache_dtype)
    convention = "interleaved" if interleaved else "half"

    # The reference: (batch, heads, 1, head_dim) heads, RoPE at each row's position, then write_rows.
    heads = qkv.reshape(batch, 1, n_q + 2 * n_kv, head_dim).transpose(0, 2, 1, 3)
    rotated = apply_rope(heads[:, :n_q + n_kv], cos[lengths][:, None, None], sin[lengths][:, None, None], convention)
    want_k, want_v = k_cache.copy(), v_cache.copy()
    write_rows(want_k, rotated[:, n_q:], lengths, np.ones(batch, dtype=np.int64))
    write_rows(want_v, heads[:, n_q + n_kv:], lengths, np.ones(batch, dtype=np.int64))

    kernels = backend._kernels_for(head_dim, dtype)
    dev = backend.to_device
    q_out = dev(np.zeros((batch, n_q, 1, head_dim), dtype=dtype))
    k_dev, v_dev = dev(k_cache.copy()), dev(v_cache.copy())
    table = dev(np.arange(batch, dtype=np.int32)[:, None])
    threads = kernels.config.rope_threads
    backend._launch(kernels.rope_write_kv, -(-batch * (n_q + 2 * n_kv) * half // threads), threads,
                    dev(qkv), dev(cos), dev(sin), dev((lengths + 1).astype(np.int64)), table, capacity, n_q, n_kv,
                    interleaved, q_out, k_dev, v_dev)
    np.testing.assert_allclose(host(backend, q_out), rotated[:, :n_q], **TOL[np.dtype(dtype)])
    # Cache rows: float16 caches hold the rounded values, compared after the same rounding.
    np.testing.assert_allclose(host(backend, k_dev).astype(np.float64), want_k.astype(np.float64),
                               **TOL[np.dtype(dtype)])
    np.testing.assert_array_equal(host(backend, v_dev), want_v)


@settings(max_examples=5, deadline=None)
@given(rows=st.integers(1, 3), d=st.integers(1, 40), add=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**31))
def test_add_rms_norm_is_the_residual_add_then_rms_norm(rows, d, add, dtype, seed):
    backend = minikv.get_backend(NAME)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, d)).astype(dtype)
    delta_ = rng.standard_normal((rows, d)).astype(dtype)
    weight = rng.standard_normal(d).astype(dtype)
    eps = 1e-5
    want_x = x + delta_ if add else x.copy()
    want_h = layers.rms_norm(want_x, weight, eps)
    kernels = backend._kernels_for(8, dtype)
    compute = np.dtype(kernels.config.compute).type
    x_dev, h_dev = backend.to_device(x.copy()), backend.to_device(np.zeros_like(x))
    backend._launch(kernels.add_rms_norm, rows, kernels.config.norm_threads, x_dev, backend.to_device(delta_),
                    backend.to_device(weight), compute(eps), compute(1.0 / d), add, h_dev)
    np.testing.assert_allclose(host(backend, x_dev), want_x, **TOL[np.dtype(dtype)])
    np.testing.assert_allclose(host(backend, h_dev), want_h, **TOL[np.dtype(dtype)])


def test_swiglu_kernel_is_silu_gate_times_up():
    backend = minikv.get_backend(NAME)
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        hidden = (3 * rng.standard_normal((2, 2 * 37))).astype(dtype)
        want = layers.swiglu(hidden[:, :37], hidden[:, 37:])
        kernels = backend._kernels_for(8, dtype)
        act = backend.to_device(np.zeros((2, 37), dtype=dtype))
        threads = kernels.config.rope_threads
        backend._launch(kernels.swiglu, -(-2 * 37 // threads), threads, backend.to_device(hidden), act)
        np.testing.assert_allclose(host(backend, act), want, **TOL[np.dtype(dtype)])


# --------------------------------------------------------------------------- the whole step


def test_step_gives_the_numpy_tokens_with_two_transfers_per_step():
    expected = model("llama_gqa", "numpy").generate(PROMPTS, max_new_tokens=4, cache="static",
                                                    temperature=0.0).tokens
    m = model("llama_gqa", NAME)
    backend, n_layers = m.backend, m.config.n_layers
    cache, token = prefill(m, PROMPTS)
    step = backend.decode_step(m, cache)
    assert len(step.plan) == 10 * n_layers + 4
    got, per_step = [token], []
    for _ in range(3):
        before = dict(backend.counters)
        token = step(token).argmax(-1)
        per_step.append(delta(before, backend.counters))
        got.append(token)
    assert np.array(got).T.tolist() == expected
    # The first step uploads the lengths once (the cache came from a forward); then ids in, logits out.
    assert per_step[0] == {"to_device": 2, "to_host": 1, "launches": 6 * n_layers + 2}
    assert per_step[1:] == [{"to_device": 1, "to_host": 1, "launches": 6 * n_layers + 2}] * 2
    np.testing.assert_array_equal(cache.lengths, [5 + 3, 3 + 3])


def test_paged_step_uploads_the_block_table_only_when_a_block_is_claimed():
    # Blocks of 2 positions; prompts of 5 and 3 tokens hold 3 and 2 blocks. Step 1 writes positions
    # 5 and 3 (blocks held), step 2 positions 6 and 4 (a new block each), step 3 positions 7 and 5.
    expected = model("llama_gqa", "numpy").generate(PROMPTS, max_new_tokens=4, cache="paged", block_size=2,
                                                    temperature=0.0).tokens
    m = model("llama_gqa", NAME)
    from minikv.generate import _padded

    ids, lengths = _padded(PROMPTS)
    cache = m.new_cache("paged", batch_size=2, max_seq_len=16, block_size=2, num_blocks=12)
    token = m.forward(ids, cache, n_new=lengths, last_only=True).argmax(-1)
    step = m.backend.decode_step(m, cache)
    got, uploads = [token], []
    for _ in range(3):
        before = dict(m.backend.counters)
        got.append(step(got[-1]).argmax(-1))
        counts = delta(before, m.backend.counters)
        assert counts["to_host"] == 1
        uploads.append(counts["to_device"])
    assert np.array(got).T.tolist() == expected
    # step 1: lengths + table (first sync) + ids; step 2: the new blocks' table + ids; step 3: ids.
    assert uploads == [3, 2, 1]


def test_greedy_step_sends_only_the_ids_out():
    expected = model("llama_gqa", "numpy").generate(PROMPTS, max_new_tokens=3, cache="static",
                                                    temperature=0.0).tokens
    m = model("llama_gqa", NAME)
    cache, token = prefill(m, PROMPTS)
    step = m.backend.decode_step(m, cache, greedy=True)
    assert step.launch_counts()["argmax"] == 1
    step.sync_lengths()
    before = dict(m.backend.counters)
    tokens = step.greedy_tokens(token, 2)                # (2, batch)
    counts = delta(before, m.backend.counters)
    assert np.concatenate([token[None], tokens]).T.tolist() == expected
    # One upload of the first ids, then one transfer per step: the chosen ids out.
    assert counts["to_device"] == 1 and counts["to_host"] == 2


def test_step_logits_equal_numpy_forward_with_a_sliding_window_and_rewinds():
    # mistral_window: a 4-position window, so the device step's window argument is exercised;
    # forward and the step take turns on one cache, and a truncate in between is noticed.
    ref, m = model("mistral_window", "numpy"), model("mistral_window", NAME)
    ref_cache, _ = prefill(ref, PROMPTS)
    cache, _ = prefill(m, PROMPTS)
    step = m.backend.decode_step(m, cache)
    feeds = [np.array([7, 11]), np.array([13, 2]), np.array([4, 4])]
    for i, ids in enumerate(feeds):
        want = ref.forward(ids[:, None], ref_cache, last_only=True)
        if i == 1:
            got = m.forward(ids[:, None], cache, last_only=True)    # the plain path in between
        else:
            got = step(ids)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for c in (ref_cache, cache):
        c.truncate(c.lengths - np.array([2, 1]))
    before = dict(m.backend.counters)
    got = step(np.array([9, 9]))
    assert delta(before, m.backend.counters)["to_device"] == 2       # the rewound lengths, uploaded once
    np.testing.assert_allclose(got, ref.forward(np.array([[9], [9]]), ref_cache, last_only=True), rtol=1e-4,
                               atol=1e-4)


def test_step_allocates_nothing_after_construction_and_warm_up_changes_nothing():
    expected = model("llama_gqa", "numpy").generate(PROMPTS, max_new_tokens=3, cache="static",
                                                    temperature=0.0).tokens
    m = model("llama_gqa", NAME)
    cache, token = prefill(m, PROMPTS)
    step = m.backend.decode_step(m, cache)
    allocated = step.allocations
    step.warm_up()
    assert new_arrays_per_step(step) == []
    got = [token]
    for _ in range(2):
        got.append(step(got[-1]).argmax(-1))
    assert np.array(got).T.tolist() == expected    # the warm-up's write past the lengths changed nothing
    assert step.allocations == allocated


def new_arrays_per_step(step) -> list[str]:
    """Labels of plan entries that return an array they were not given (an allocation per step).
    Runs every entry but the last (advance_lengths), as warm_up does."""
    offenders = []
    for label, function, args, kwargs in step.plan[:-1]:
        result = function(*args, **kwargs)
        if result is not None and not any(result is value for value in kwargs.values()):
            offenders.append(label)
    return offenders


def test_the_checks_catch_broken_steps():
    m = model("llama_gqa", NAME)
    # An entry without out= allocates per step: the allocation check sees it.
    cache, token = prefill(m, PROMPTS)
    step = m.backend.decode_step(m, cache)
    label, function, args, kwargs = step.plan[1 + 1]            # embed, attn_norm, then the first qkv matmul
    assert label == "qkv"
    step.plan[2] = (label, function, args, {})
    assert new_arrays_per_step(step) == ["qkv"]
    # Lengths that never advance on the device: every step overwrites one slot, other tokens.
    expected = model("llama_gqa", "numpy").generate(PROMPTS, max_new_tokens=3, cache="static",
                                                    temperature=0.0).tokens
    cache, token = prefill(m, PROMPTS)
    step = m.backend.decode_step(m, cache)
    assert step.plan[-1][0] == "advance_lengths"
    step.plan.pop()
    got = [token]
    for _ in range(2):
        got.append(step(got[-1]).argmax(-1))
    assert np.array(got).T.tolist() != expected


def family(fixture: str, backend: str):
    """A checkpoint of tests/fixtures/hf_families (RoPE scalings, Qwen3, Gemma 3)."""
    if ("families", fixture, backend) not in _MODELS:
        _MODELS["families", fixture, backend] = minikv.load(ROOT / "tests" / "fixtures" / "hf_families" / fixture,
                                                            backend=backend)
    return _MODELS["families", fixture, backend]


@pytest.mark.parametrize("fixture", ["llama_rope_yarn", "llama_rope_llama3"])
def test_step_logits_equal_numpy_with_scaled_rope_tables(fixture):
    # YaRN and Llama 3 scalings live in the cos/sin table the step gathers from on the device.
    ref, m = family(fixture, "numpy"), family(fixture, NAME)
    ref_cache, _ = prefill(ref, PROMPTS)
    cache, _ = prefill(m, PROMPTS)
    step = m.backend.decode_step(m, cache)
    for ids in (np.array([7, 11]), np.array([13, 2])):
        np.testing.assert_allclose(step(ids), ref.forward(ids[:, None], ref_cache, last_only=True), rtol=1e-4,
                                   atol=1e-4)


def test_unsupported_models_and_caches_are_refused_with_the_reason():
    from minikv.backends.cuda.step import StepUnsupportedError

    m = model("llama_gqa", NAME)
    with pytest.raises(StepUnsupportedError, match="static or paged"):
        m.backend.decode_step(m, m.new_cache("sliding", batch_size=1, max_seq_len=8, window=4))
    with pytest.raises(StepUnsupportedError, match="llama family"):
        g = model("gpt2", NAME)
        g.backend.decode_step(g, g.new_cache("static", batch_size=1, max_seq_len=8))
    for fixture, reason in (("qwen3", "q/k norms"), ("gemma3_text", "Gemma 3"), ("llama_rope_dynamic", "dynamic NTK")):
        f = family(fixture, NAME)
        with pytest.raises(StepUnsupportedError, match=reason):
            f.backend.decode_step(f, f.new_cache("static", batch_size=1, max_seq_len=8))
    numpy_model = model("llama_gqa", "numpy")
    from minikv.backends.cuda.step import DecodeStep
    with pytest.raises(StepUnsupportedError, match="numpy"):
        DecodeStep(numpy_model, numpy_model.new_cache("static", batch_size=1, max_seq_len=8))


def test_generate_decodes_through_the_step_and_equals_the_plain_path():
    # Two generations of 1 and 3 tokens: their difference is 2 decode steps (same prefill).
    m = model("llama_gqa", NAME)
    backend, n_layers = m.backend, m.config.n_layers
    runs = {}
    for use in (True, False):
        backend.use_device_step = use
        try:
            counts = []
            for n in (1, 3):
                before = dict(backend.counters)
                tokens = m.generate(PROMPTS, max_new_tokens=n, cache="static", temperature=0.0).tokens
                counts.append(delta(before, backend.counters))
            runs[use] = (tokens, delta(counts[0], counts[1]))
        finally:
            backend.use_device_step = True
    assert runs[True][0] == runs[False][0]
    # The step: the lengths once, then per step the ids in and the logits out.
    assert runs[True][1] == {"to_device": 1 + 2, "to_host": 2, "launches": 2 * (6 * n_layers + 2)}
    # The plain path uploads ids, positions and each layer's lengths every step.
    assert runs[False][1]["to_device"] >= 2 * (2 + n_layers)


@settings(max_examples=5, deadline=None)
@given(rows=st.integers(1, 3), k=st.integers(1, 40), n=st.integers(1, 70), splits=st.integers(1, 3),
       bias=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**31))
def test_gemv_kernels_are_a_matmul(rows, k, n, splits, bias, dtype, seed):
    backend = minikv.get_backend(NAME)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(dtype)
    w = rng.standard_normal((k, n)).astype(dtype)
    b = rng.standard_normal(n).astype(dtype)
    want = x @ w + (b if bias else 0)
    kernels = backend._kernels_for(8, dtype)
    config = kernels.config
    splits = min(splits, k)
    part = backend.to_device(np.zeros((splits, rows, n), dtype=config.compute))
    out = backend.to_device(np.zeros((rows, n), dtype=dtype))
    backend._launch(kernels.gemv_partial, (-(-n // config.gemv_threads), splits), config.gemv_threads,
                    backend.to_device(x), backend.to_device(w), part, -(-k // splits))
    backend._launch(kernels.gemv_reduce, -(-rows * n // 32), 32, part, backend.to_device(b), bias, out)
    # K-term dot products in another order than BLAS: ~k eps relative to the sum of |terms|.
    scale = np.abs(x) @ np.abs(w) + 1
    assert (np.abs(host(backend, out) - want) <= 8 * k * np.finfo(dtype).eps * scale).all()


def test_embed_and_argmax_kernels():
    backend = minikv.get_backend(NAME)
    rng = np.random.default_rng(5)
    kernels = backend._kernels_for(8, np.float32)
    table = rng.standard_normal((11, 5)).astype(np.float32)
    ids = np.array([3, 0, 10], dtype=np.int64)
    out = backend.to_device(np.zeros((3, 5), dtype=np.float32))
    backend._launch(kernels.embed_rows, 1, 32, backend.to_device(table), backend.to_device(ids), out)
    np.testing.assert_array_equal(host(backend, out), table[ids])
    logits = rng.standard_normal((3, 37)).astype(np.float32)
    logits[1, [4, 20, 30]] = 9.0          # ties: NumPy's argmax takes the first
    logits[2, :] = -np.inf
    got = backend.to_device(np.zeros(3, dtype=np.int64))
    backend._launch(kernels.argmax_rows, 3, kernels.config.norm_threads, backend.to_device(logits), got)
    np.testing.assert_array_equal(host(backend, got), logits.argmax(axis=1))


def test_library_free_step_holds_only_our_kernels_and_gives_the_numpy_tokens():
    """The plan a CUDA graph would capture: every entry a Numba launch (no cuBLAS, no CuPy call)."""
    from minikv.backends.cuda.step import DecodeStep

    expected = model("qwen2_bias", "numpy").generate(PROMPTS, max_new_tokens=3, cache="static",
                                                     temperature=0.0).tokens
    m = model("qwen2_bias", NAME)                 # projection biases: fused into gemv_reduce
    cache, token = prefill(m, PROMPTS)
    step = DecodeStep(m, cache, greedy=True, library_free=True)
    assert all(function == m.backend._launch for _, function, _, _ in step.plan)
    before = dict(m.backend.counters)
    tokens = step.greedy_tokens(token, 2)
    counts = delta(before, m.backend.counters)
    assert np.concatenate([token[None], tokens]).T.tolist() == expected
    assert counts["launches"] == 2 * len(step.plan)
    assert new_arrays_per_step(step) == []


def test_graph_capture_replays_the_step_or_says_why_not():
    """On "cuda": capture() records the plan as a CUDA graph and its replays give numpy's tokens
    (UNMEASURED until run on a GPU). On the simulator: no graph, the reason, and the plain plan."""
    expected = model("llama_gqa", "numpy").generate(PROMPTS, max_new_tokens=3, cache="static",
                                                    temperature=0.0).tokens
    m = model("llama_gqa", NAME)
    cache, token = prefill(m, PROMPTS)
    step = m.backend.decode_step(m, cache)
    assert not step.capture() and "library_free" in step.graph_error      # cuBLAS cannot be captured
    step = m.backend.decode_step(m, cache, library_free=True)
    captured = step.capture()
    if NAME == "cuda":
        assert captured, step.graph_error
    else:
        assert not captured and "backend 'cuda'" in step.graph_error
    got = [token]
    for _ in range(2):
        got.append(step(got[-1]).argmax(-1))
    assert np.array(got).T.tolist() == expected


def test_library_free_step_through_generate_on_a_paged_float16_cache():
    options = dict(max_new_tokens=3, cache="paged", block_size=2, cache_dtype="float16", temperature=0.0)
    expected = model("mistral_window", "numpy").generate(PROMPTS, **options).tokens
    m = model("mistral_window", NAME)
    m.backend.library_free = True
    try:
        before = dict(m.backend.counters)
        got = m.generate(PROMPTS, **options).tokens
        launches = delta(before, m.backend.counters)["launches"]
    finally:
        m.backend.library_free = False
    assert got == expected
    # 2 decode steps of 15 L + 3 Numba launches each (the cuBLAS step would launch 6 L + 2), plus prefill
    assert launches >= 2 * (15 * m.config.n_layers + 3)


def test_generate_through_the_step_refuses_a_cache_changed_between_steps():
    from minikv.errors import CacheMismatchError

    m = model("llama_gqa", NAME)
    cache = m.new_cache("static", batch_size=1, max_seq_len=32)
    tokens = iter(m.stream([5, 17, 3], max_new_tokens=4, cache=cache, temperature=0.0))
    next(tokens)                                    # prefill; the first token
    m.forward(np.array([[4]]), cache)               # another call writes to the same cache
    with pytest.raises(CacheMismatchError, match="another call changed it"):
        next(tokens)
