"""Every backend computes what the NumPy reference computes.

One suite, parametrised over ``minikv.available_backends()``: on a machine without a GPU that is
"numpy", "numba" and "cuda-sim" (the CUDA kernels run by Numba's simulator); on a GPU machine
"cuda" joins (and "cuda-sim" needs a process of its own, see backends/cuda/__init__.py).

What is compared
----------------
* each kernel of the protocol against the reference (``minikv.attention.naive`` and ``decode``,
  the latter through a gathered block table for paged decode, ``minikv.rope.apply_rope``) on random problems drawn
  by hypothesis: ragged ``lengths``, per-sequence ``q_offset`` arrays, sliding windows, GQA,
  shuffled paged block tables, float16 caches;
* greedy generation on the Hugging Face fixture checkpoints (tests/fixtures/hf): the same tokens
  as the numpy backend for every cache kind, and logits close to numpy's.

Tolerances
----------
float64: rtol = atol = 1e-12. The kernels only reorder the reference's sums (tiles, splits,
unrolled dot products): a few ulps (1e-16) times a few dozen terms.

float32: rtol = atol = 2e-5, the bound of tests/test_attention.py: with <= 24 keys and
head_dim <= 16, reordering moves a result by ~n * eps ~ 1.5e-6 at worst, exp() of a score off by
an ulp moves a weight by as much relatively; 2e-5 leaves a 10x margin and still catches any real
error (a wrong mask or a missing rescale is O(1e-2)).

float16 caches: the reference is given the *same* float16 values, which both sides widen exactly
to float32 before any arithmetic, so the float32 tolerance applies unchanged. Against the float32
values the float16 cache was rounded from, the error is the rounding itself, ~2^-11 relative
per element: there we allow atol = rtol = 4e-3.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minikv
from minikv.backend import Backend, gather_pages, write_rows
from minikv.errors import BackendUnavailableError, ConfigError

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "hf"

BACKENDS = minikv.available_backends()
REFERENCE = minikv.get_backend("numpy")
SIMULATED = {"cuda-sim"}      # one Python thread per CUDA thread: tiny problems, few examples

TOL = {np.dtype(np.float64): dict(rtol=1e-12, atol=1e-12), np.dtype(np.float32): dict(rtol=2e-5, atol=2e-5)}
FLOAT16_ROUNDING_TOL = dict(rtol=4e-3, atol=4e-3)

# A NaN from -inf - -inf or a division by zero anywhere (NumPy reference, simulated kernels) fails.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def examples(name: str, fast: int, simulated: int) -> int:
    return simulated if name in SIMULATED else fast


def head_dims(name: str):
    """The CUDA kernels are compiled per head_dim (a constant of their loops): a few values on a GPU;
    the simulator compiles nothing but is slow, so small ones; Numba's CPU kernels take any."""
    if name == "cuda":
        return st.sampled_from([5, 8, 16])
    return st.integers(1, 8) if name in SIMULATED else st.integers(1, 16)


def host(backend, array) -> np.ndarray:
    return np.asarray(backend.to_host(array))


def assert_lse_close(lse, expected, tol):
    """log-sum-exp: -inf exactly where the reference has -inf (a row that sees no key), close elsewhere."""
    lse, expected = np.asarray(lse), np.asarray(expected)
    assert lse.shape == expected.shape
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(expected))
    finite = np.isfinite(expected)
    assert np.isfinite(lse[finite]).all()
    np.testing.assert_allclose(lse[finite], expected[finite], **tol)


# --------------------------------------------------------------------------- strategies


@st.composite
def attention_problems(draw, max_seq_q=9, max_seq_k=16, head_dims=st.integers(1, 16), cache_f16=True):
    batch = draw(st.integers(1, 3))
    n_kv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    seq_q = draw(st.integers(1, max_seq_q))
    seq_k = draw(st.integers(1, max_seq_k))
    head_dim = draw(head_dims)
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    kv_dtype = np.dtype(np.float16) if cache_f16 and dtype == np.float32 and draw(st.booleans()) else dtype
    causal = draw(st.booleans())
    if draw(st.booleans()):
        q_offset = draw(st.integers(-2, seq_k))
    else:
        q_offset = np.array(draw(st.lists(st.integers(-2, seq_k), min_size=batch, max_size=batch)))
    lengths = draw(st.none() | st.lists(st.integers(0, seq_k), min_size=batch, max_size=batch).map(np.array))
    window = draw(st.none() | st.integers(1, seq_k + 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # q as the model makes it: a transposed view of (batch, seq, heads, head_dim), not contiguous.
    q = rng.standard_normal((batch, seq_q, n_kv * group, head_dim)).astype(dtype).transpose(0, 2, 1, 3)
    k = rng.standard_normal((batch, n_kv, seq_k, head_dim)).astype(kv_dtype)
    v = rng.standard_normal((batch, n_kv, seq_k, head_dim)).astype(kv_dtype)
    return q, k, v, dict(causal=causal, q_offset=q_offset, lengths=lengths, window=window)


@st.composite
def decode_problems(draw, max_capacity=20, head_dims=st.integers(1, 16), paged=False, groups=st.integers(1, 3),
                    block_sizes=st.integers(1, 4)):
    batch = draw(st.integers(1, 3))
    n_kv = draw(st.integers(1, 2))
    group = draw(groups)
    head_dim = draw(head_dims)
    capacity = draw(st.integers(1, max_capacity))
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    cache_dtype = np.dtype(np.float16) if dtype == np.float32 and draw(st.booleans()) else dtype
    lengths = np.array(draw(st.lists(st.integers(0, capacity), min_size=batch, max_size=batch)))
    window = draw(st.none() | st.integers(1, capacity + 2))
    n_splits = draw(st.none() | st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = rng.standard_normal((batch, 1, n_kv * group, head_dim)).astype(dtype).transpose(0, 2, 1, 3)
    problem = dict(q=q, lengths=lengths, window=window, n_splits=n_splits)
    if not paged:
        problem["k"] = rng.standard_normal((batch, n_kv, capacity, head_dim)).astype(cache_dtype)
        problem["v"] = rng.standard_normal((batch, n_kv, capacity, head_dim)).astype(cache_dtype)
        return problem
    # A pool with more blocks than needed, handed out in a random order; unused table entries -1.
    block_size = draw(block_sizes)
    blocks_per_seq = -(-capacity // block_size)
    num_blocks = batch * blocks_per_seq + draw(st.integers(0, 3))
    order = rng.permutation(num_blocks)
    table = np.full((batch, blocks_per_seq), -1, dtype=np.int32)
    taken = 0
    for b in range(batch):
        used = -(-int(lengths[b]) // block_size)
        table[b, :used] = order[taken:taken + used]
        taken += used
    problem["block_table"] = table
    problem["k"] = rng.standard_normal((num_blocks, n_kv, block_size, head_dim)).astype(cache_dtype)
    problem["v"] = rng.standard_normal((num_blocks, n_kv, block_size, head_dim)).astype(cache_dtype)
    return problem


@st.composite
def ragged_problems(draw, head_dims=st.integers(1, 16), max_chunk=6):
    """The serving engine's step: a few sequences, each a chunk of consecutive positions (a decode is a
    chunk of one), flattened into T rows of one query, every row carrying its sequence's block table."""
    n_kv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    head_dim = draw(head_dims)
    block_size = draw(st.integers(1, 4))
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    window = draw(st.none() | st.integers(1, 12))
    chunks = draw(st.lists(st.tuples(st.integers(0, 10), st.integers(1, max_chunk)), min_size=1, max_size=4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # Each sequence's blocks hand out from a shuffled pool with spare blocks; unused table entries -1.
    needed = [-(-(first + n) // block_size) for first, n in chunks]
    num_blocks = sum(needed) + draw(st.integers(0, 3))
    order = rng.permutation(num_blocks)
    columns = max(needed) + draw(st.integers(0, 2))
    positions, tables, segments, taken = [], [], [0], 0
    for (first, n), used in zip(chunks, needed):
        row = np.full(columns, -1, dtype=np.int32)
        row[:used] = order[taken:taken + used]
        taken += used
        positions += range(first, first + n)
        tables += [row] * n
        segments.append(segments[-1] + n)
    total = len(positions)
    # q as the model makes it: a transposed view of (T, 1, heads, head_dim)
    q = rng.standard_normal((total, 1, n_kv * group, head_dim)).astype(dtype).transpose(0, 2, 1, 3)
    k = rng.standard_normal((num_blocks, n_kv, block_size, head_dim)).astype(dtype)
    v = rng.standard_normal((num_blocks, n_kv, block_size, head_dim)).astype(dtype)
    return dict(q=q, k=k, v=v, block_table=np.array(tables), lengths=np.array(positions, dtype=np.int64) + 1,
                segments=np.array(segments, dtype=np.int64), window=window)


def ragged_error(backend, problem):
    """max |ragged - per-row reference| / tolerance scale, and the tolerance of q's dtype.

    The reference is the plain math row by row: each row's one query against its own block table's
    keys up to its position (``minikv.attention.decode`` over the gathered pages), whatever its segment."""
    q, k, v, table, lengths = (problem[key] for key in ("q", "k", "v", "block_table", "lengths"))
    expected, expected_lse = minikv.attention.decode(q, gather_pages(k, table), gather_pages(v, table), lengths,
                                                     window=problem["window"], return_lse=True)
    dev = backend.to_device
    out, lse = backend.ragged_paged_attention(dev(q), dev(k), dev(v), dev(table), lengths, problem["segments"],
                                              window=problem["window"])
    return host(backend, out), host(backend, lse), expected, expected_lse


# --------------------------------------------------------------------------- the registry


def test_available_backends_on_this_machine():
    assert BACKENDS[0] == "numpy"
    if importlib.util.find_spec("numba") is not None:
        assert "numba" in BACKENDS
    gpu = "cuda" in BACKENDS
    if not gpu and importlib.util.find_spec("numba_cuda") is not None:
        # No GPU here: "cuda" failed *before* importing numba.cuda, so the simulator could be had.
        assert "cuda-sim" in BACKENDS
    if importlib.util.find_spec("cupy") is None:
        assert not gpu


def test_every_backend_is_a_backend_with_the_protocol():
    for name in BACKENDS:
        backend = minikv.get_backend(name)
        assert isinstance(backend, Backend) and backend.name == name
        assert backend.default_attention in backend.attention_algorithms
        assert minikv.get_backend(name) is backend        # one instance per name
    for name in ("numba", "cuda", "cuda-sim"):
        if name in BACKENDS:
            assert minikv.get_backend(name).default_attention == "tiled"


def test_cuda_without_gpu_or_cupy_says_what_is_missing():
    if "cuda" in BACKENDS:
        pytest.skip("a GPU is available: backend 'cuda' works here")
    with pytest.raises(BackendUnavailableError) as info:
        minikv.get_backend("cuda")
    message = str(info.value)
    assert "pip install 'minikv[cuda]'" in message or "GPU" in message
    if importlib.util.find_spec("cupy") is None:
        assert "CuPy" in message
        assert "pip install 'minikv[cuda]'" in message and "'minikv[cuda13]'" in message
    # Failing for "cuda" must not have imported numba.cuda for the GPU (which would lock out cuda-sim).
    from minikv.backends.cuda import numba_cuda_mode
    assert numba_cuda_mode() in (None, "simulator")


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="tpu"):
        minikv.get_backend("tpu")


def test_minikv_backend_environment_variable_picks_the_default(monkeypatch):
    name = BACKENDS[-1]
    monkeypatch.setenv("MINIKV_BACKEND", name)
    assert minikv.get_backend().name == name
    model = minikv.load(FIXTURES / "llama_gqa")
    assert model.backend.name == name
    monkeypatch.setenv("MINIKV_BACKEND", "no-such-backend")
    with pytest.raises(ConfigError, match="no-such-backend"):
        minikv.get_backend()


@pytest.mark.skipif("cuda-sim" not in BACKENDS, reason="the simulator is not in use in this process")
def test_cuda_refuses_a_process_whose_numba_cuda_is_the_simulator():
    from minikv.backends.cuda import _import_numba_cuda, numba_cuda_mode
    assert numba_cuda_mode() == "simulator"
    with pytest.raises(BackendUnavailableError, match="fresh process"):
        _import_numba_cuda(simulator=False)


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "MINIKV_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None, reason="numba-cuda is not installed")
def test_cuda_sim_after_numba_cuda_was_imported_for_the_gpu_explains_the_fix():
    result = _run_python(
        "import numba.cuda, minikv\n"
        "try:\n"
        "    minikv.get_backend('cuda-sim')\n"
        "except minikv.BackendUnavailableError as exc:\n"
        "    print('REFUSED:', exc)\n"
        "print('AVAILABLE:', minikv.available_backends())\n")
    assert result.returncode == 0, result.stderr
    assert "REFUSED:" in result.stdout and "NUMBA_ENABLE_CUDASIM=1" in result.stdout, result.stdout
    assert "fresh process" in result.stdout
    assert "'cuda-sim'" not in result.stdout.split("AVAILABLE:")[1]


def test_missing_numba_names_the_extra_to_install():
    # `sys.modules["numba"] = None` makes `import numba` fail, as on a machine without it.
    result = _run_python(
        "import sys; sys.modules['numba'] = None\n"
        "import minikv\n"
        "for name in ('numba', 'cuda-sim'):\n"
        "    try:\n"
        "        minikv.get_backend(name)\n"
        "    except minikv.BackendUnavailableError as exc:\n"
        "        print(name, 'REFUSED:', exc)\n"
        "print(minikv.available_backends())\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("numba REFUSED:") and "pip install 'minikv[numba]'" in line for line in lines)
    assert any(line.startswith("cuda-sim REFUSED:") and "pip install" in line for line in lines)
    assert lines[-1] == "['numpy']"


def test_minikv_backends_imports_from_a_source_checkout():
    result = _run_python("import minikv.backends, minikv.backends._common; print(minikv.backends.__path__[0])")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == ROOT / "backends"


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("name", BACKENDS)
def test_prefill_attention_matches_the_reference(name):
    backend = minikv.get_backend(name)
    simulated = name in SIMULATED

    @settings(max_examples=examples(name, 60, 25), deadline=None)
    @given(problem=attention_problems(max_seq_q=6 if simulated else 9, max_seq_k=10 if simulated else 16,
                                      head_dims=head_dims(name)))
    def check(problem):
        q, k, v, masks = problem
        expected, expected_lse = minikv.attention.naive(q, k, v, return_lse=True, **masks)
        out, lse = backend.attention(backend.to_device(q), backend.to_device(k), backend.to_device(v),
                                     algorithm=backend.default_attention, **masks)
        out, lse = host(backend, out), host(backend, lse)
        assert out.dtype == q.dtype and lse.dtype == q.dtype and out.shape == q.shape
        np.testing.assert_allclose(out, expected, **TOL[q.dtype])
        assert_lse_close(lse, expected_lse, TOL[q.dtype])

    check()


@pytest.mark.parametrize("name", BACKENDS)
def test_decode_attention_matches_the_reference(name):
    backend = minikv.get_backend(name)
    simulated = name in SIMULATED

    @settings(max_examples=examples(name, 60, 25), deadline=None)
    @given(problem=decode_problems(max_capacity=12 if simulated else 20, head_dims=head_dims(name)))
    def check(problem):
        q, k, v, lengths = problem["q"], problem["k"], problem["v"], problem["lengths"]
        expected, expected_lse = minikv.attention.decode(q, k, v, lengths, window=problem["window"], return_lse=True)
        dev = backend.to_device
        out, lse = backend.decode_attention(dev(q), dev(k), dev(v), lengths, window=problem["window"],
                                            n_splits=problem["n_splits"])
        out, lse = host(backend, out), host(backend, lse)
        assert out.dtype == q.dtype and lse.dtype == q.dtype and out.shape == q.shape
        np.testing.assert_allclose(out, expected, **TOL[q.dtype])
        assert_lse_close(lse, expected_lse, TOL[q.dtype])

    check()


def decode_result(backend, problem):
    """(out, lse) of the backend's decode (paged when the problem has a block table) and the reference's:
    ``minikv.attention.decode`` over the gathered pages."""
    q, k, v, lengths, table = (problem.get(key) for key in ("q", "k", "v", "lengths", "block_table"))
    dev = backend.to_device
    if table is None:
        expected, expected_lse = minikv.attention.decode(q, k, v, lengths, window=problem["window"], return_lse=True)
        out, lse = backend.decode_attention(dev(q), dev(k), dev(v), lengths, window=problem["window"],
                                            n_splits=problem["n_splits"])
    else:
        expected, expected_lse = minikv.attention.decode(q, gather_pages(k, table), gather_pages(v, table), lengths,
                                                         window=problem["window"], return_lse=True)
        out, lse = backend.paged_decode_attention(dev(q), dev(k), dev(v), dev(table), lengths,
                                                  window=problem["window"], n_splits=problem["n_splits"])
    return host(backend, out), host(backend, lse), expected, expected_lse


@pytest.mark.parametrize("name", BACKENDS)
def test_paged_decode_attention_matches_the_reference(name):
    backend = minikv.get_backend(name)
    simulated = name in SIMULATED

    @settings(max_examples=examples(name, 60, 20), deadline=None)
    @given(problem=decode_problems(max_capacity=12 if simulated else 20, head_dims=head_dims(name), paged=True))
    def check(problem):
        out, lse, expected, expected_lse = decode_result(backend, problem)
        np.testing.assert_allclose(out, expected, **TOL[problem["q"].dtype])
        assert_lse_close(lse, expected_lse, TOL[problem["q"].dtype])

    check()


# The numba decode kernel at the sizes its structure depends on (backends/numba_cpu.py,
# split_k_decode_kernel): several tiles of DECODE_TILE = 64 keys, pages of 1 to 100 keys (a tile spans
# pages, a page spans tiles), windows and chunks that start inside a page, GQA groups of 1 to 5 (pairs of
# heads and one left over), head_dim past a vector's width; a contiguous cache of up to 300 rows is one
# long page. The tolerances above still hold: the reordered sums now run over up to 300 keys and 64
# dimensions, a few ulps times a few hundred terms (float64 ~1e-14 at most); in float32 a score moves by
# ~sqrt(64) eps |q| |k| scale ~ 1e-6 and a weight by as much relatively, the kernel's exp by 1 ulp more.
# Measured over 400 examples: float32 max error 4.8e-7 (out) and 9.5e-7 (lse), float64 8.9e-16.
def long_decode_problems(paged):
    return decode_problems(max_capacity=300, head_dims=st.sampled_from([1, 7, 16, 33, 64]), paged=paged,
                           groups=st.integers(1, 5), block_sizes=st.sampled_from([1, 3, 16, 100]))


needs_numba = pytest.mark.skipif("numba" not in BACKENDS, reason="numba is not installed")


@needs_numba
@pytest.mark.parametrize("paged", [True, False])
def test_numba_decode_matches_the_reference_past_a_tile(paged):
    backend = minikv.get_backend("numba")

    @settings(max_examples=30, deadline=None)
    @given(problem=long_decode_problems(paged))
    def check(problem):
        out, lse, expected, expected_lse = decode_result(backend, problem)
        np.testing.assert_allclose(out, expected, **TOL[problem["q"].dtype])
        assert_lse_close(lse, expected_lse, TOL[problem["q"].dtype])

    check()


@needs_numba
@pytest.mark.parametrize("bug", ["the newest key dropped past a tile", "the second page read twice"])
def test_long_decode_property_catches_a_broken_kernel(bug, monkeypatch):
    """The comparison above finds a kernel that reads one key too few, or one page twice."""
    from hypothesis import find

    from minikv.backends import numba_cpu

    original = numba_cpu.split_k_decode_kernel

    def broken(q, k_pool, v_pool, block_table, block_size, lengths, *rest):
        if bug.startswith("the newest"):
            lengths = np.where(lengths > numba_cpu.DECODE_TILE, lengths - 1, lengths)
        elif block_table.shape[1] > 1:
            block_table = block_table.copy()
            block_table[:, 1] = block_table[:, 0]
        return original(q, k_pool, v_pool, block_table, block_size, lengths, *rest)

    monkeypatch.setattr(numba_cpu, "split_k_decode_kernel", broken)
    backend = minikv.get_backend("numba")

    def wrong(problem):
        out, _, expected, _ = decode_result(backend, problem)
        return not np.allclose(out, expected, **TOL[problem["q"].dtype])

    find(long_decode_problems(paged=True), wrong, settings=settings(max_examples=300, deadline=None))


@needs_numba
@pytest.mark.parametrize("dtype, ulps", [(np.float32, 2), (np.float64, 4)])
def test_exp_nonpositive_is_within_ulps_of_exp(dtype, ulps):
    """The decode kernel's exp (a polynomial, vectorisable) against np.exp in float64: relative error at
    most ``ulps`` units of the last place over [ln(smallest normal), 0]; 0 below that and for -inf; NaN
    stays NaN."""
    from numba import njit

    from minikv.backends import numba_cpu

    @njit
    def exp_all(x, out):
        for i in range(x.shape[0]):
            out[i] = numba_cpu.exp_nonpositive(x[i])

    finfo = np.finfo(dtype)
    lowest = np.log(float(finfo.tiny))                 # e^lowest = the smallest normal float (in float64)
    x = np.concatenate([-np.geomspace(1e-30, -lowest, 200_000), np.linspace(lowest, 0, 200_000),
                        [0.0, -0.0, lowest * 1.001, -1e4, -np.inf, np.nan]]).astype(dtype)
    got = np.empty_like(x)
    exp_all(x, got)
    normal = x >= lowest
    exact = np.exp(x[normal].astype(np.float64))
    assert np.abs(got[normal] / exact - 1).max() <= ulps * finfo.eps
    assert (got[(x < lowest)] == 0).all()
    assert np.isnan(got[-1])


@pytest.mark.parametrize("name", BACKENDS)
def test_ragged_attention_equals_the_per_row_reference(name):
    """Prefill chunks attended as one causal block each, decodes together: the same as every row alone
    (float64 to 1e-12, float32 to 2e-5, the tolerances above)."""
    backend = minikv.get_backend(name)

    @settings(max_examples=examples(name, 60, 10), deadline=None)
    @given(problem=ragged_problems(head_dims=head_dims(name), max_chunk=3 if name in SIMULATED else 6))
    def check(problem):
        out, lse, expected, expected_lse = ragged_error(backend, problem)
        q = problem["q"]
        assert out.dtype == q.dtype and lse.dtype == q.dtype and out.shape == q.shape
        np.testing.assert_allclose(out, expected, **TOL[q.dtype])
        assert_lse_close(lse, expected_lse, TOL[q.dtype])

    check()


class ChunkOffByOne(Backend):
    """Deliberately broken: a prefill chunk's queries placed one position later (each sees one key too many)."""

    def paged_attention(self, q, k_pool, v_pool, block_table, *, q_offset, lengths, **options):
        return super().paged_attention(q, k_pool, v_pool, block_table, q_offset=q_offset + 1, lengths=lengths,
                                       **options)


def test_ragged_property_catches_a_chunk_offset_off_by_one():
    from hypothesis import find

    def wrong(problem):
        out, _, expected, _ = ragged_error(ChunkOffByOne(), problem)
        return not np.allclose(out, expected, **TOL[problem["q"].dtype])

    found = find(ragged_problems(), wrong, settings=settings(max_examples=200, deadline=None))
    assert (np.diff(found["segments"]) > 1).any()        # only a chunk of several rows can show it


@pytest.mark.parametrize("name", BACKENDS)
def test_float16_cache_is_within_rounding_of_the_float32_cache(name):
    backend = minikv.get_backend(name)
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 4, 1, 8)).astype(np.float32)
    k = rng.standard_normal((2, 2, 11, 8)).astype(np.float32)
    v = rng.standard_normal((2, 2, 11, 8)).astype(np.float32)
    lengths = np.array([11, 6])
    exact, _ = REFERENCE.decode_attention(q, k, v, lengths)
    dev = backend.to_device
    half, _ = backend.decode_attention(dev(q), dev(k.astype(np.float16)), dev(v.astype(np.float16)), lengths)
    half = host(backend, half)
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, exact, **FLOAT16_ROUNDING_TOL)
    assert np.abs(half - exact).max() > 0     # the cache really was rounded


@pytest.mark.parametrize("name", BACKENDS)
def test_rope_matches_the_reference(name):
    backend = minikv.get_backend(name)

    @settings(max_examples=examples(name, 40, 10), deadline=None)
    @given(batch=st.integers(1, 3), heads=st.integers(1, 4), seq=st.integers(1, 6),
           half=st.sampled_from([4, 8]) if name == "cuda" else st.integers(1, 4 if name in SIMULATED else 8), dtype=st.sampled_from([np.float32, np.float64]),
           convention=st.sampled_from(["half", "interleaved"]), per_sequence=st.booleans(),
           seed=st.integers(0, 2**32 - 1))
    def check(batch, heads, seq, half, dtype, convention, per_sequence, seed):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((batch, seq, heads, 2 * half)).astype(dtype).transpose(0, 2, 1, 3)
        table_shape = (batch, 1, seq, half) if per_sequence else (seq, half)  # broadcast over heads (and batch)
        angles = rng.uniform(-np.pi, np.pi, table_shape)
        cos, sin = np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)
        expected = minikv.rope.apply_rope(x, cos, sin, convention)
        dev = backend.to_device
        out = host(backend, backend.apply_rope(dev(x), dev(cos), dev(sin), convention))
        assert out.dtype == x.dtype and out.shape == x.shape
        np.testing.assert_allclose(out, expected, **TOL[np.dtype(dtype)])

    check()


@pytest.mark.parametrize("name", BACKENDS)
def test_write_kv_writes_each_sequence_at_its_own_position(name):
    backend = minikv.get_backend(name)
    rng = np.random.default_rng(3)
    cache = np.zeros((3, 2, 10, 4), dtype=np.float16)
    new = rng.standard_normal((3, 2, 4, 4)).astype(np.float32)
    starts, counts = np.array([0, 5, 9]), np.array([4, 2, 1])
    device_cache = backend.to_device(cache)
    backend.write_kv(device_cache, backend.to_device(new), starts, counts)
    write_rows(cache, new, starts, counts)
    np.testing.assert_array_equal(host(backend, device_cache), cache)


# --------------------------------------------------------------------------- whole models


def generation_cases():
    """(backend, fixture, cache kind): every fixture and kind on the fast backends, a tiny corner
    (GQA + sliding window, static and paged) under the simulator."""
    kinds = ("none", "concat", "static", "paged", "sliding")
    fixtures = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())
    cases = []
    for name in BACKENDS:
        if name == "numpy":
            continue
        if name in SIMULATED:
            cases += [(name, fixture, kind) for fixture in ("llama_gqa", "mistral_window") for kind in ("static", "paged")]
        else:
            cases += [(name, fixture, kind) for fixture in fixtures for kind in kinds]
    return cases


_MODELS: dict = {}


def model(fixture: str, backend: str):
    if (fixture, backend) not in _MODELS:
        _MODELS[fixture, backend] = minikv.load(FIXTURES / fixture, backend=backend)
    return _MODELS[fixture, backend]


PROMPTS = [[5, 17, 3, 42, 8], [9, 1, 30]]    # a ragged batch: 5 and 3 tokens


@pytest.mark.parametrize("name, fixture, kind", generation_cases())
def test_greedy_generation_gives_the_numpy_tokens(name, fixture, kind):
    options = {"block_size": 2} if kind == "paged" else {}
    expected = model(fixture, "numpy").generate(PROMPTS, max_new_tokens=3, cache=kind, temperature=0.0, **options)
    got = model(fixture, name).generate(PROMPTS, max_new_tokens=3, cache=kind, temperature=0.0, **options)
    assert got.tokens == expected.tokens


@pytest.mark.parametrize("name", [n for n in BACKENDS if n != "numpy"])
def test_chunked_prefill_and_float16_cache_give_the_numpy_tokens(name):
    # Chunked prefill: later chunks attend with q_offset > 0 into the cache (bottom-right aligned mask).
    for options in (dict(prefill_chunk=2), dict(cache_dtype="float16")):
        expected = model("llama_gqa", "numpy").generate(PROMPTS, max_new_tokens=3, cache="static", **options)
        got = model("llama_gqa", name).generate(PROMPTS, max_new_tokens=3, cache="static", **options)
        assert got.tokens == expected.tokens, options


@pytest.mark.parametrize("name", [n for n in BACKENDS if n != "numpy"])
def test_logits_agree_with_numpy(name):
    fixtures = ["llama_gqa"] if name in SIMULATED else ["llama_gqa", "llama_mqa_tied", "qwen2_bias", "mistral_window",
                                                        "gpt2"]
    ids = np.array([[5, 17, 3, 42, 8, 11, 2]])
    for fixture in fixtures:
        expected = model(fixture, "numpy").forward(ids)
        got = model(fixture, name).forward(ids)
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        # float32 through two layers: see tests/test_hf_conformance.py for why 1e-4.
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_write_rows_writes_exactly_the_counted_rows(data):
    """write_rows against an element-by-element loop: one sequence, a uniform batch (the one-slice
    paths) and ragged batches; rows past each count and outside [start, start + count) stay as they were."""
    batch = data.draw(st.integers(1, 3))
    seq = data.draw(st.integers(1, 4))
    capacity = data.draw(st.integers(seq, 9))
    uniform = data.draw(st.booleans())
    start0 = data.draw(st.integers(0, capacity - seq))
    starts = np.full(batch, start0) if uniform else np.array(
        [data.draw(st.integers(0, capacity - seq)) for _ in range(batch)])
    counts = np.full(batch, seq) if uniform else np.array([data.draw(st.integers(0, seq)) for _ in range(batch)])
    rng = np.random.default_rng(batch * 100 + seq)
    cache = rng.standard_normal((batch, 2, capacity, 3))
    new = rng.standard_normal((batch, 2, seq, 3))
    expected = cache.copy()
    for b in range(batch):
        for i in range(int(counts[b])):
            expected[b, :, starts[b] + i] = new[b, :, i]
    write_rows(cache, new, starts, counts)
    np.testing.assert_array_equal(cache, expected)
