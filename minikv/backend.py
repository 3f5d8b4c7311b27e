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
  - ``apply_rope(x, cos, sin, convention)``;
  - ``write_kv(cache, new, starts, counts)``: the cache write.

Registry: ``get_backend(name)`` imports lazily (asking for "numba" imports numba only then),
``available_backends()`` lists those that work on this machine, and the environment variable
``MINIKV_BACKEND`` picks the default.

The accelerated backends live in the top-level folder ``backends/``, installed as the subpackage
``minikv.backends`` (setuptools ``package-dir``). From a source checkout that was not installed,
``_mount_backends_package`` below maps the folder to the same name, so both ways import alike.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import attention as reference_attention
from . import rope as reference_rope
from .errors import BackendUnavailableError, ConfigError

DEFAULT_ENV = "MINIKV_BACKEND"


class Backend:
    """The protocol, implemented with the NumPy reference kernels (backend ``"numpy"``).

    Other backends subclass it and override what they accelerate."""

    name = "numpy"
    xp = np
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
    def attention(self, q, k, v, *, causal=True, q_offset=0, lengths=None, window=None, algorithm=None):
        if algorithm is None:
            # Measured (benchmarks/results/prefill.md): naive wins below ~512 keys, tiled above, and
            # tiled's memory stays O(seq * block) where naive's scores grow O(seq^2).
            algorithm = "tiled" if k.shape[2] >= self.tiled_from_keys else self.default_attention
        kernel = getattr(reference_attention, algorithm)
        k, v = k.astype(q.dtype, copy=False), v.astype(q.dtype, copy=False)
        return kernel(q, k, v, causal=causal, q_offset=q_offset, lengths=lengths, window=window, return_lse=True)

    # Split-K pays where the splits run in parallel (GPU blocks); NumPy runs them one after another,
    # so one split saves three chunks' worth of Python and a merge per layer per step.
    decode_splits = 1

    def decode_attention(self, q, k_cache, v_cache, lengths, *, window=None, n_splits=None):
        # decode reads (and widens, for a float16 cache) only the filled prefix [0, max(lengths)).
        return reference_attention.decode(q, k_cache, v_cache, lengths, window=window, return_lse=True,
                                          n_splits=self.decode_splits if n_splits is None else n_splits)

    def paged_decode_attention(self, q, k_pool, v_pool, block_table, lengths, *, window=None, n_splits=None):
        # Reference: gather each sequence's blocks into a contiguous view, then run plain decode.
        # Only the table columns that hold positions are read: the copy grows with the length, not the capacity.
        block_size = k_pool.shape[2]
        used = -(-int(np.max(lengths)) // block_size)
        block_table = block_table[:, :used]
        k_cache, v_cache = gather_pages(k_pool, block_table), gather_pages(v_pool, block_table)
        return self.decode_attention(q, k_cache, v_cache, lengths, window=window, n_splits=n_splits)

    def apply_rope(self, x, cos, sin, convention="half"):
        return reference_rope.apply_rope(x, cos, sin, convention)

    def write_kv(self, cache, new, starts, counts) -> None:
        """cache[b, :, starts[b] : starts[b] + counts[b]] = new[b, :, :counts[b]] for every sequence b."""
        write_rows(cache, new, starts, counts)

    def __repr__(self) -> str:
        return f"<minikv backend {self.name!r}>"


def write_rows(cache, new, starts, counts) -> None:
    """Per-sequence cache write shared by every backend whose arrays support slicing."""
    starts, counts = np.asarray(starts), np.asarray(counts)
    if starts.size == 0:
        return
    seq, start = new.shape[2], int(starts[0])
    if len(starts) == 1 or ((starts == start).all() and (counts == seq).all()):
        # The common cases (one sequence, or a uniform batch): one strided copy for the whole batch.
        count = int(counts[0])
        cache[:, :, start:start + count] = new[:, :, :count]
        return
    for b, (start, count) in enumerate(zip(starts.tolist(), counts.tolist())):
        cache[b, :, start:start + count] = new[b, :, :count]


def gather_pages(pool, block_table):
    """(num_blocks, kv_heads, block_size, head_dim) pool + (batch, blocks_per_seq) table
    -> (batch, kv_heads, blocks_per_seq * block_size, head_dim). Unused table entries (-1) read
    block 0; the lengths mask them out."""
    table = block_table.clip(min=0)
    pages = pool[table]                              # (batch, blocks, kv_heads, block_size, head_dim)
    batch, n_blocks, kv_heads, block_size, head_dim = pages.shape
    return pages.transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, n_blocks * block_size, head_dim)


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
    try:
        if importlib.util.find_spec(BACKENDS_PACKAGE) is not None:
            return
    except (ImportError, ValueError):
        pass
    folder = Path(__file__).resolve().parent.parent / "backends"
    init = folder / "__init__.py"
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
    if name not in _REGISTRY:
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
