"""Backends: where the arrays live and which kernels run the hot loops.

The model, the caches and the generation loop are written once, against this protocol; a backend
supplies

* ``xp``: the array module (``numpy`` or ``cupy``) every other array operation goes through,
* ``to_device`` / ``to_host``: moving arrays in and out (a no-op on the CPU),
* the kernels that differ between backends, each returning the log-sum-exp beside the output so
  partial results over disjoint keys compose (see ``minikv.attention.merge_partials``):

  - ``attention(q, k, v, causal, q_offset, lengths, window, algorithm)``: prefill attention;
  - ``decode_attention(q, k_cache, v_cache, lengths, window, n_splits)``: one query per sequence
    against a contiguous cache (split-K / flash-decoding; ``n_splits=None`` lets the backend choose);
  - ``paged_decode_attention(q, k_pool, v_pool, block_table, lengths, window, n_splits)``: the same,
    reading the cache through a paged block table;
  - ``paged_attention(q, k_pool, v_pool, block_table, q_offset, lengths, window, algorithm)``: prefill
    through a block table;
  - ``ragged_paged_attention(q, k_pool, v_pool, block_table, lengths, segments, window, algorithm)``:
    a flattened ragged batch (one query per row, rows grouped into sequences by ``segments``), the
    serving engine's step; the reference routes each segment to the two kernels above;
  - ``apply_rope(x, cos, sin, convention)``;
  - ``write_kv(cache, new, q_offset, n_new)``: the cache write;
  - ``linear(x, weight, bias)``: x @ W (+ b) for a float weight shaped (in, out), laid out as the
    backend's ``weight_layout`` says (the reference: ``layers.linear``);
  - ``quantized_linear(x, weight, bias)``: x @ W^T for a group-quantized weight (``minikv.quant``);
  - optionally ``prepare_decode(model)``: a function that runs a whole batch-1 decode step (or None).

The model checks its inputs once, at the door (``Transformer.forward``); these kernels trust them.

Registry: ``get_backend(name)`` imports lazily (asking for "numba" imports numba only then),
``available_backends()`` lists those that work on this machine, and the environment variable
``MINIKV_BACKEND`` picks the default.

The accelerated backends live in the top-level folder ``backends/``, installed as the subpackage
``minikv.backends`` (setuptools ``package-dir``). From a source checkout that was not installed,
``_mount_backends_package`` below maps the folder to the same name, so both ways import alike.
"""

from __future__ import annotations

import importlib
import math
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import attention as reference_attention
from . import layers
from . import quant as reference_quant
from . import rope as reference_rope
from .errors import BackendUnavailableError, ConfigError

DEFAULT_ENV = "MINIKV_BACKEND"


def write_rows(cache, new, q_offset, n_new) -> None:
    """Per-sequence cache write shared by every backend whose arrays support slicing:
    cache[b, :, q_offset[b] : q_offset[b] + n_new[b]] = new[b, :, :n_new[b]]."""
    if q_offset.size == 0:
        return
    seq, start = new.shape[2], int(q_offset[0])
    if len(q_offset) == 1 or ((q_offset == start).all() and (n_new == seq).all()):
        # The common cases (one sequence, or a uniform batch): one strided copy for the whole batch.
        count = int(n_new[0])
        cache[:, :, start:start + count] = new[:, :, :count]
        return
    for b, (start, count) in enumerate(zip(q_offset.tolist(), n_new.tolist())):
        cache[b, :, start:start + count] = new[b, :, :count]


def gather_pages(pool, block_table, xp=np):
    """(num_blocks, kv_heads, block_size, head_dim) pool + (batch, blocks_per_seq) table
    -> (batch, kv_heads, blocks_per_seq * block_size, head_dim). Unused table entries (-1) read
    block 0; the lengths mask them out. ``xp``: the arrays' module (a backend passes its own)."""
    num_blocks, kv_heads, block_size, head_dim = pool.shape
    # One copy, in the order the result wants: the pool as (num_blocks * kv_heads, block_size, head_dim)
    # pages (page block * kv_heads + h is block `block` of head h), gathered (batch, kv_heads, blocks).
    # Indexing the leading axis of a contiguous array is NumPy's fast gather; the former gather of
    # whole blocks, then a transpose copy to (batch, kv_heads, ...), took ~2.5x as long (17 sequences
    # of 16 blocks of mid's geometry: 0.24 -> 0.09 ms; a gather through a transposed view: 0.16 ms).
    pages = pool.reshape(num_blocks * kv_heads, block_size, head_dim)
    index = block_table.clip(min=0)[:, None, :] * kv_heads + xp.arange(kv_heads)[None, :, None]  # (b, kv, blocks)
    batch, _, n_blocks = index.shape
    # (batch, kv_heads, blocks, block_size, head_dim) -> (batch, kv_heads, blocks * block_size, head_dim)
    return pages[index].reshape(batch, kv_heads, n_blocks * block_size, head_dim)


class Backend:
    """The protocol, implemented with the NumPy reference kernels (backend ``"numpy"``).

    Other backends subclass it and override what they accelerate."""

    name = "numpy"
    xp = np
    # How the model lays out its float projection matrices in memory (it always *sees* them as
    # (in, out), so every forward computes y = x @ W):
    #   "in_out": C-contiguous (in, out): BLAS's fastest orientation for x @ W at any number of rows
    #             (OpenBLAS, 2 cores, mid: 1.4x faster than (out, in) at 32 rows, 1.3x at 1 row);
    #   "out_in": C-contiguous (out, in), PyTorch's and llama2.c's layout, seen through a transposed
    #             view: each output is a dot product of one contiguous row with x, the form a compiled
    #             matrix-vector kernel streams fastest (the numba backend's decode step).
    weight_layout = "in_out"
    attention_algorithms: tuple[str, ...] = ("naive", "online", "tiled")
    default_attention = "naive"   # the fastest in NumPy for the short prompts of generation
    tiled_from_keys = 512         # ... and from this many keys on, tiled (see attention())
    # float16 caches are read as the query's dtype by the reference kernels.
    cache_dtypes: tuple[str, ...] = ("float32", "float64", "float16")

    def to_device(self, array):
        return np.asarray(array)

    def to_host(self, array) -> np.ndarray:
        return np.asarray(array)

    def synchronize(self) -> None:
        """Wait for queued device work (timing needs it on a GPU; nothing to wait for on the CPU)."""

    # ---- kernels ----
    def attention(self, q, k, v, *, causal=True, q_offset=0, lengths=None, window=None, algorithm=None, scale=None):
        # scale: the score scale, None = 1/sqrt(head_dim); T5 passes 1.0 (it scales nothing).
        if algorithm is None:
            # Measured (benchmarks/results/prefill.md): naive wins below ~512 keys, tiled above, and
            # tiled's memory stays O(seq * block) where naive's scores grow O(seq^2).
            algorithm = "tiled" if k.shape[2] >= self.tiled_from_keys else self.default_attention
        # Trusted inside: the model checked its inputs at the door, so the algorithm's core runs directly.
        core = reference_attention.CORES[algorithm]
        return core(*reference_attention.trusted_args(q, k, v, q_offset, lengths, window, scale), causal=causal,
                    return_lse=True)

    # Split-K pays where the splits run in parallel (GPU blocks); NumPy runs them one after another,
    # so one split saves three chunks' worth of Python and a merge per layer per step.
    decode_splits = 1
    transposed_from_keys = 320    # decode scores as K q^T from here on (see decode_attention)

    def decode_attention(self, q, k_cache, v_cache, lengths, *, window=None, n_splits=None, scale=None):
        """One query per sequence at position lengths[b] - 1 against the cache's keys 0..lengths[b]-1.

        The math of ``minikv.attention.decode`` with one split (NumPy runs splits one after another),
        and two speed rules measured in benchmarks/results/profile_decode_*.txt:

        * from ``transposed_from_keys`` keys on, scores as K q^T, then copied to rows: with a few
          queries against hundreds of keys OpenBLAS runs this orientation ~2.5-3x faster than
          q K^T, while below ~300 keys q K^T is faster (benchmarks/results/decode_orientation.md);
          the softmax's max wants rows, not strided columns, hence the copy;
        * no mask when there is no window: a key past a sequence's length gets -inf added to its
          score (nothing at all when all lengths are equal); the -inf guards of the masked softmax
          cost ~8 small array ops per layer per step.

        Trusted inside: the model checked the shapes; only the filled prefix [0, max(lengths)) is read
        (and widened from float16 where the cache is stored so)."""
        if q.shape[2] != 1 or (n_splits or self.decode_splits) != 1:
            return reference_attention.decode(q, k_cache, v_cache, lengths, window=window, return_lse=True,
                                              scale=scale, n_splits=self.decode_splits if n_splits is None else n_splits)
        batch, n_heads, _, head_dim = q.shape
        n_kv = k_cache.shape[1]
        group = n_heads // n_kv
        lengths = np.full(batch, k_cache.shape[2], dtype=np.int64) if lengths is None else np.asarray(lengths)
        width = int(lengths.max(initial=0))
        k = k_cache[:, :, :width].astype(q.dtype, copy=False)               # (b, kv, width, hd)
        v = v_cache[:, :, :width].astype(q.dtype, copy=False)
        scale = q.dtype.type(1.0 / math.sqrt(head_dim) if scale is None else scale)
        q_rows = (q * scale).reshape(batch, n_kv, group, head_dim)          # (b, H, 1, hd) -> (b, kv, group, hd)
        if width >= self.transposed_from_keys:
            # (b, kv, width, hd) @ (b, kv, hd, group) -> (b, kv, width, group) -> rows (b, kv, group, width)
            scores = np.ascontiguousarray(np.matmul(k, np.ascontiguousarray(q_rows.swapaxes(-1, -2))).swapaxes(-1, -2))
        else:
            scores = np.matmul(q_rows, k.swapaxes(-1, -2))                   # (b, kv, group, width)
        if window is None and width > 0 and int(lengths.min()) > 0:
            if int(lengths.min()) < width:
                # Keys j >= lengths[b] are absent: s = -inf there, so p = exp(-inf - m) = 0 exactly (m is
                # finite: every query sees key 0). One broadcast add instead of the masked softmax.
                absent = np.arange(width) >= lengths[:, None]                   # (b, width)
                scores += np.where(absent, -np.inf, 0).astype(q.dtype)[:, None, None, :]
            row_max = scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores - row_max)
            row_sum = probs.sum(axis=-1, keepdims=True)
            out = np.matmul(probs, v) / row_sum                                  # (b, kv, group, hd)
            lse = row_max + np.log(row_sum)
        else:
            # (b, kv, group, width) -> (b, kv, group, 1, width): the reference's masked softmax
            visible = reference_attention.visible_mask(1, width, lengths - 1, lengths, window)
            out, lse = reference_attention.masked_softmax_times_v(scores[:, :, :, None], visible, v)
        # (b, kv, group, [1,] hd) -> (b, H, 1, hd)
        return out.reshape(batch, n_heads, 1, head_dim), lse.reshape(batch, n_heads, 1)

    def paged_decode_attention(self, q, k_pool, v_pool, block_table, lengths, *, window=None, n_splits=None,
                               scale=None):
        # Reference: gather each sequence's blocks into a contiguous view, then run plain decode.
        # The view's table holds only the columns with positions: the copy grows with the length.
        k_cache, v_cache = gather_pages(k_pool, block_table, self.xp), gather_pages(v_pool, block_table, self.xp)
        # scale only when asked for: the accelerated backends' decode_attention has no scale= (the encoder-
        # decoder models that pass one run on numpy)
        extra = {} if scale is None else {"scale": scale}
        return self.decode_attention(q, k_cache, v_cache, lengths, window=window, n_splits=n_splits, **extra)

    def paged_attention(self, q, k_pool, v_pool, block_table, *, q_offset, lengths, window=None, algorithm=None,
                        scale=None):
        """Prefill (many queries per sequence) through a block table: gather, then ``attention``."""
        k_all, v_all = gather_pages(k_pool, block_table, self.xp), gather_pages(v_pool, block_table, self.xp)
        extra = {} if scale is None else {"scale": scale}     # as in paged_decode_attention
        return self.attention(q, k_all, v_all, causal=True, q_offset=q_offset, lengths=lengths, window=window,
                              algorithm=algorithm, **extra)

    def ragged_paged_attention(self, q, k_pool, v_pool, block_table, lengths, segments, *, window=None,
                               algorithm=None):
        """A flattened ragged batch (the serving engine's step) through a block table, varlen style.

        q (T, H, 1, hd): row r is one query at position lengths[r] - 1 of the sequence whose pool
        blocks are block_table[r] (T, columns); it sees that sequence's keys 0..lengths[r] - 1.
        segments (n_seqs + 1,) host int64: rows segments[s]:segments[s+1] are consecutive tokens of one
        sequence (the cu_seqlens of flash_attn_varlen_func). Returns out (T, H, 1, hd), lse (T, H, 1).

        Row by row this is ``paged_decode_attention`` (the reference the tests compare with); here
        each sequence's keys are read once per segment, not once per row:

        * a segment of n > 1 rows (a prefill chunk: queries at positions p..p+n-1) is one causal
          ``paged_attention`` with q_offset = p over its sequence's blocks, gathered once;
        * all one-row segments (decodes) go together through ``paged_decode_attention``, their table
          cut to the columns the longest of them uses.

        Trusted inside: the store built the segments from the engine's chunks."""
        starts, ends = segments[:-1], segments[1:]
        single = ends - starts == 1
        if single.all():                       # a pure decode step: every row is its own sequence
            return self._decode_rows(q, k_pool, v_pool, block_table, lengths, window)
        xp, block_size = self.xp, k_pool.shape[2]
        out = xp.empty(q.shape, dtype=q.dtype)                   # (T, H, 1, hd)
        lse = xp.empty(q.shape[:3], dtype=q.dtype)               # (T, H, 1)
        if single.any():
            rows = starts[single]
            rows_device = self.to_device(rows)
            out[rows_device], lse[rows_device] = self._decode_rows(q[rows_device], k_pool, v_pool,
                                                                   block_table[rows_device], lengths[rows], window)
        for start, end in zip(starts[~single].tolist(), ends[~single].tolist()):
            first, last = int(lengths[start]) - 1, int(lengths[end - 1])   # positions first .. last - 1
            used = -(-last // block_size)                                  # table columns holding them
            # rows start..end-1 of one sequence as one batch-1 prefill: (n, H, 1, hd) -> (1, H, n, hd)
            chunk = q[start:end, :, 0].transpose(1, 0, 2)[None]
            chunk_out, chunk_lse = self.paged_attention(
                chunk, k_pool, v_pool, block_table[start:start + 1, :used], q_offset=np.array([first]),
                lengths=np.array([last]), window=window, algorithm=algorithm)
            out[start:end, :, 0] = chunk_out[0].transpose(1, 0, 2)     # (1, H, n, hd) -> (n, H, hd)
            lse[start:end, :, 0] = chunk_lse[0].T                      # (1, H, n) -> (n, H)
        return out, lse

    def _decode_rows(self, q, k_pool, v_pool, block_table, lengths, window):
        """One query per row through ``paged_decode_attention``, reading only the table columns that
        hold a position of the longest row (the gather copies every column it is given)."""
        used = -(-int(lengths.max()) // k_pool.shape[2])
        return self.paged_decode_attention(q, k_pool, v_pool, block_table[:, :used], lengths, window=window)

    def apply_rope(self, x, cos, sin, convention="half"):
        return reference_rope.apply_rope(x, cos, sin, convention)

    # y = x @ W (+ b): one BLAS matmul on the contiguous (in, out) weight (no wrapper call in between).
    linear = staticmethod(layers.linear)
    # RMSNorm, the reference's own function (no wrapper call in between); a compiled backend runs it as
    # one pass over each row instead of NumPy's five temporaries.
    rms_norm = staticmethod(layers.rms_norm)

    def quantized_linear(self, x, weight, bias=None):
        """y = x @ dequantize(W)^T (+ b) for a ``quant.QuantizedWeight``: the reference (dequantize, then BLAS)."""
        return reference_quant.quantized_linear(x, weight, bias)

    # write_kv(cache, new, q_offset, n_new): the cache write, write_rows itself (no wrapper call per write).
    write_kv = staticmethod(write_rows)

    def __repr__(self) -> str:
        return f"<minikv backend {self.name!r}>"


# ------------------------------------------------------------------ registry

BACKENDS_PACKAGE = "minikv.backends"


def _mount_backends_package() -> None:
    """Make ``import minikv.backends`` work from a source checkout that was never pip-installed.

    Installed (editable or not), setuptools' ``package-dir`` maps the top-level folder
    ``backends/`` to ``minikv.backends`` and this does nothing. Run from the repository root, no
    finder knows that mapping, so we load ``backends/__init__.py`` under that name ourselves; its
    ``__path__`` then points at the folder and every submodule imports the ordinary way. Loading it
    is cheap: the package's ``__init__`` imports no numba and no CUDA.
    """
    if BACKENDS_PACKAGE in sys.modules:
        return
    folder = Path(__file__).resolve().parent.parent / "backends"
    init = folder / "__init__.py"
    # A source tree's own backends/ wins over an installed mapping: a second checkout (a git worktree)
    # imported by PYTHONPATH must not run the kernels of the checkout that was pip-installed.
    own_tree = init.is_file() and (folder / "numba_cpu.py").is_file()
    try:
        spec = importlib.util.find_spec(BACKENDS_PACKAGE)
        if spec is not None and (not own_tree or Path(spec.origin or "").resolve().parent == folder):
            return
    except (ImportError, ValueError):
        pass
    if not init.is_file():
        return  # an installed minikv without its backends: get_backend reports what is missing
    spec = importlib.util.spec_from_file_location(BACKENDS_PACKAGE, init,
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[BACKENDS_PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[BACKENDS_PACKAGE]
        raise
    parent = sys.modules.get(__package__)
    if parent is not None:
        parent.backends = module   # what the import system does for a submodule it imports itself


_mount_backends_package()

# name -> (module path, factory attribute). Modules are imported only when asked for.
_REGISTRY: dict[str, tuple[str, str]] = {
    "numpy": ("minikv.backend", "Backend"),
    "numba": ("minikv.backends.numba_cpu", "NumbaBackend"),
    "cuda": ("minikv.backends.cuda", "CudaBackend"),
    "cuda-sim": ("minikv.backends.cuda", "CudaSimBackend"),
}
_INSTANCES: dict[str, Backend] = {}


def register_backend(name: str, module: str, attribute: str) -> None:
    """Add a backend to the registry (for out-of-tree experiments)."""
    _REGISTRY[name] = (module, attribute)


def get_backend(name: Optional[str | Backend] = None) -> Backend:
    """The backend called ``name`` (default: $MINIKV_BACKEND, else "numpy").

    Raises ``BackendUnavailableError`` saying what is missing and how to install it."""
    if isinstance(name, Backend):
        return name
    if name is None:
        name = os.environ.get(DEFAULT_ENV) or "numpy"
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"backend={name!r} is unknown; choose one of {sorted(_REGISTRY)}")
    if name not in _INSTANCES:
        module_name, attribute = _REGISTRY[name]
        try:
            module = importlib.import_module(module_name)   # may raise BackendUnavailableError itself
        except ImportError as exc:
            raise BackendUnavailableError(
                f"backend {name!r} could not be imported ({exc}); install its extra: pip install 'minikv[{name}]'"
            ) from None
        factory: Callable[[], Backend] = getattr(module, attribute)
        _INSTANCES[name] = factory()   # factories raise BackendUnavailableError with the fix
    return _INSTANCES[name]


def available_backends() -> list[str]:
    """Backends that work on this machine, in registry order."""
    names = []
    for name in _REGISTRY:
        try:
            get_backend(name)
        except BackendUnavailableError:
            continue
        names.append(name)
    return names
