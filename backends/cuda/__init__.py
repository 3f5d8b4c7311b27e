"""Backends ``"cuda"`` and ``"cuda-sim"``: the CUDA kernels of ``kernels.py``, on a GPU or simulated.

``"cuda"``      CuPy arrays on the GPU: the weights are uploaded once (``to_device``), the caches
                live on the device, every matmul and elementwise op runs through CuPy (cuBLAS),
                and attention and RoPE run the Numba CUDA kernels. CuPy arrays go to the kernels
                as they are, through ``__cuda_array_interface__``, on CuPy's current stream, so
                nothing waits for the GPU until the logits come back to the host.
``"cuda-sim"``  the very same kernels on NumPy arrays through Numba's CUDA simulator: every
                CUDA thread becomes a Python thread. Thousands of times slower than a GPU, and
                exact: CI and readers without a GPU run every kernel this way.

Importing this package imports neither CuPy nor ``numba.cuda``; the backends do, when created.

Simulator or GPU: one per process
---------------------------------
Numba decides *once*, when ``numba.cuda`` is first imported, whether it is the real CUDA target
or the simulator (the environment variable ``NUMBA_ENABLE_CUDASIM=1``). So:

* asking for ``"cuda-sim"`` before anything imported ``numba.cuda`` sets NUMBA_ENABLE_CUDASIM=1
  for this process and imports it in simulator mode;
* asking for ``"cuda"`` checks CuPy and a GPU first (without touching ``numba.cuda``), then
  imports ``numba.cuda`` for real;
* asking for the other one afterwards raises ``BackendUnavailableError`` that says to use a
  fresh process (e.g. ``NUMBA_ENABLE_CUDASIM=1 python ...`` for the simulator).

``minikv.available_backends()`` tries "cuda" before "cuda-sim": on a machine without a GPU (or
without CuPy) "cuda" fails before importing ``numba.cuda``, and "cuda-sim" is then available; on
a GPU machine "cuda" wins and "cuda-sim" needs its own process.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading

import numpy as np

from minikv.backend import Backend, write_rows
from minikv.errors import BackendUnavailableError, ConfigError

from .._common import (SplitKDecode, as_4d, attention_geometry, check_float_dtypes, check_rope_shapes,
                       default_scale, host_lengths, host_offsets, pool_geometry, rope_is_interleaved, window_value)

INSTALL_HINT = ("pip install 'minikv[cuda]' (CUDA 12 wheels) or pip install 'minikv[cuda13]' (CUDA 13 wheels)")
SIMULATOR_HINT = "pip install 'minikv[cuda-sim]' (numba and numba-cuda; no GPU or CuPy needed)"
SIMULATOR_ENV = "NUMBA_ENABLE_CUDASIM"


# --------------------------------------------------------------------------- numba.cuda, in one mode


def numba_cuda_mode() -> str | None:
    """"simulator", "gpu", or None when ``numba.cuda`` has not been imported in this process."""
    if "numba.cuda" not in sys.modules:
        return None
    return "simulator" if "numba.cuda.simulator_init" in sys.modules else "gpu"


def _import_numba_cuda(simulator: bool):
    """Import ``numba.cuda`` as the simulator or as the real target, or say why it cannot be."""
    wanted = "simulator" if simulator else "gpu"
    backend = "cuda-sim" if simulator else "cuda"
    hint = SIMULATOR_HINT if simulator else INSTALL_HINT
    try:
        import numba  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(f"backend {backend!r} needs numba and numba-cuda ({exc}); install them: "
                                      f"{hint}") from None
    if importlib.util.find_spec("numba_cuda") is None:
        raise BackendUnavailableError(f"backend {backend!r} needs the numba-cuda package (Numba's maintained CUDA "
                                      f"target and its simulator), which is not installed: {hint}")
    mode = numba_cuda_mode()
    if mode is None:
        if simulator:
            os.environ[SIMULATOR_ENV] = "1"
        elif os.environ.get(SIMULATOR_ENV, "0") not in ("", "0"):
            raise BackendUnavailableError(f"backend 'cuda' cannot run with {SIMULATOR_ENV}="
                                          f"{os.environ[SIMULATOR_ENV]} set (numba.cuda would be the simulator); "
                                          f"unset it, or use backend 'cuda-sim'")
        if not simulator:
            # We launch every kernel on the stream CuPy is using, so the arrays' producer and the kernel
            # are ordered by the stream itself: Numba need not synchronize when it receives a CuPy
            # array (its default does, once per array per launch). A user's own setting wins.
            os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")
            # A decode step of a small batch launches a grid of a few blocks by nature; Numba would
            # warn about "GPU under-utilization" at every such launch.
            os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")
        from numba.core import config
        config.reload_config()   # numba read its environment when it was imported; read it again
        try:
            from numba import cuda  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailableError(f"backend {backend!r}: numba.cuda could not be imported ({exc}); "
                                          f"{INSTALL_HINT}") from None
        mode = numba_cuda_mode()
    if mode != wanted:
        if simulator:
            raise BackendUnavailableError(
                "backend 'cuda-sim' needs Numba's CUDA simulator, but numba.cuda was already imported for the GPU "
                f"in this process (the choice is made once per process); run it in a fresh process with "
                f"{SIMULATOR_ENV}=1 set before numba is imported, or ask for 'cuda-sim' before anything imports "
                "numba.cuda")
        raise BackendUnavailableError(
            f"backend 'cuda' needs the real CUDA target, but numba.cuda was already imported as the simulator in "
            f"this process ({SIMULATOR_ENV}=1, e.g. by backend 'cuda-sim'); run it in a fresh process without "
            f"{SIMULATOR_ENV}")
    from numba import cuda
    return cuda


def _kernels_module():
    return importlib.import_module(__name__ + ".kernels")


# --------------------------------------------------------------------------- shared host-side logic


class _CudaKernelBackend(SplitKDecode, Backend):
    """What "cuda" and "cuda-sim" share: argument checks, launch geometry, the protocol methods.

    Subclasses provide ``xp``, the kernel configuration for a head_dim and dtype, how arrays reach
    a kernel (``_kernel_input``), the stream to launch on, and the number of decode splits."""

    attention_algorithms = ("tiled",)
    default_attention = "tiled"
    cache_dtypes = ("float32", "float64", "float16")
    q_dtypes = ("float32", "float64", "float16")

    # backends/cuda/step.py: a decode step that keeps lengths, positions and buffers on the device.
    device_step = True
    # generate() decodes through that step wherever it serves the model and cache (static and paged caches of
    # llama-family models); False: every step through model.forward (what benchmarks compare).
    use_device_step = True
    # Capture the step as a CUDA graph (backend "cuda" only). Off until measured on a GPU. A graph
    # needs the library-free plan (own GEMV kernels instead of cuBLAS); library_free asks for that
    # plan without a graph (to measure the GEMV kernels alone).
    use_graphs = False
    library_free = False

    def __init__(self, kernels_module, n_splits=None):
        self._kernels = kernels_module
        self.n_splits = n_splits
        # What crosses the host/device boundary and how many kernels start, for tests and lesson 6:
        # to_device / to_host count every transfer made through the backend (index uploads
        # included), launches every Numba kernel launch (CuPy's own ops are not counted here; the
        # device step counts its plan instead).
        self.counters = {"to_device": 0, "to_host": 0, "launches": 0}

    # -- hooks
    def kernel_config(self, head_dim: int, compute: str):
        raise NotImplementedError

    def _kernel_input(self, array):
        return array

    def _index_array(self, host_values: np.ndarray):
        """A small int array (lengths, offsets, a block table) where the kernels can read it."""
        return host_values

    def _launch_options(self) -> tuple:
        return ()

    def _default_splits(self, batch_heads: int, capacity: int, tile: int) -> int:
        raise NotImplementedError

    # -- helpers
    @staticmethod
    def _compute_dtype(dtype) -> str:
        return "float64" if np.dtype(dtype) == np.float64 else "float32"

    def _kernels_for(self, head_dim: int, dtype):
        return self._kernels.build_kernels(self.kernel_config(head_dim, self._compute_dtype(dtype)))

    def _launch(self, kernel, grid, block, *args):
        self.counters["launches"] += 1
        kernel[(grid, block) + self._launch_options()](*args)

    # -- the device decode step (step.py)
    def decode_step(self, model, cache, **options):
        """A ``DecodeStep`` for model and cache: one token per sequence, lengths advanced on the device,
        static buffers (raises ``StepUnsupportedError`` for what it does not serve)."""
        from .step import DecodeStep

        return DecodeStep(model, cache, **options)

    def try_decode_step(self, model, cache):
        """The device step for (model, cache), made once per cache, or None where it does not serve
        them (or ``use_device_step`` is off): the hook ``minikv.generate`` calls before decoding."""
        from .step import DecodeStep, StepUnsupportedError

        if not self.use_device_step or cache is None:
            return None
        # Kept on the cache itself, so it lives exactly as long as the cache does.
        step = getattr(cache, "_device_step", None)
        if step is not None and step.model is model and step.backend is self:
            return step
        try:
            # A graph may hold only our own kernels: the library-free plan (own GEMV, no cuBLAS).
            step = DecodeStep(model, cache, library_free=self.use_graphs or self.library_free)
        except StepUnsupportedError:
            return None
        if self.use_graphs:
            step.capture()
        cache._device_step = step
        return step

    def _gemv_splits(self, column_blocks: int, k: int) -> int:
        """How many pieces gemv_partial cuts a matmul's K axis into (library-free step)."""
        raise NotImplementedError

    def _bind(self, array):
        """An array as a kernel takes it on every launch of a plan, converted once."""
        return array

    def copy_to_device(self, device_array, host_array) -> None:
        """Write host values into an existing device buffer (a transfer, counted; no allocation)."""
        self.counters["to_device"] += 1
        device_array[...] = host_array

    def _capture_graph(self, run):
        """(graph, None) after recording ``run()`` as a CUDA graph, or (None, why not)."""
        return None, f"backend {self.name!r} cannot capture CUDA graphs (they need backend 'cuda' on a GPU)"

    def _launch_graph(self, graph) -> None:
        raise NotImplementedError

    # -- prefill
    def attention(self, q, k, v, *, causal=True, q_offset=0, lengths=None, window=None, algorithm=None):
        if (algorithm or self.default_attention) != "tiled":
            raise ConfigError(f"algorithm={algorithm!r}; backend {self.name!r} implements {self.attention_algorithms}")
        batch, n_heads, _, seq_q, seq_k, head_dim = attention_geometry(q, k, v)
        check_float_dtypes(q, k, v, self.q_dtypes)
        xp = self.xp
        out = xp.empty(q.shape, dtype=q.dtype)
        lse = xp.empty(q.shape[:3], dtype=q.dtype)
        if out.size == 0:
            lse[...] = -np.inf
            return out, lse
        kernels = self._kernels_for(head_dim, q.dtype)
        compute = np.dtype(kernels.config.compute).type
        block_q = kernels.config.block_q
        offsets = self._index_array(host_offsets(q_offset, batch))
        lens = self._index_array(host_lengths(lengths, batch, seq_k))
        grid = (-(-seq_q // block_q), batch * n_heads)
        self._launch(kernels.flash_attention, grid, block_q,
                     self._kernel_input(q), self._kernel_input(k), self._kernel_input(v), offsets, lens,
                     bool(causal), window_value(window), compute(default_scale(head_dim)), out, lse)
        return out, lse

    # -- decode (entry points: SplitKDecode)
    def _split_k(self, q, k_pool, v_pool, table, block_size, lengths, window, n_splits):
        batch, n_heads, _, head_dim = pool_geometry(q, k_pool, v_pool)
        check_float_dtypes(q, k_pool, v_pool, self.q_dtypes)
        xp = self.xp
        kernels = self._kernels_for(head_dim, q.dtype)
        config = kernels.config
        compute = np.dtype(config.compute)
        capacity = int(table.shape[1]) * int(block_size)
        lens = self._index_array(host_lengths(lengths, batch, capacity))
        if isinstance(table, np.ndarray):
            table = self._index_array(np.ascontiguousarray(table, dtype=np.int32))
        elif table.dtype != np.int32:
            table = table.astype(np.int32)
        n_splits = int(n_splits or self.n_splits or self._default_splits(batch * n_heads, capacity,
                                                                           config.decode_tile))
        part_out = xp.empty((batch, n_heads, n_splits, head_dim), dtype=compute)
        part_lse = xp.empty((batch, n_heads, n_splits), dtype=compute)
        out = xp.empty(q.shape, dtype=q.dtype)
        lse = xp.empty(q.shape[:3], dtype=q.dtype)
        if batch * n_heads == 0:
            return out, lse
        self._launch(kernels.split_k_decode, (n_splits, batch * n_heads), config.decode_threads,
                     self._kernel_input(q), self._kernel_input(k_pool), self._kernel_input(v_pool), table,
                     int(block_size), lens, window_value(window), compute.type(default_scale(head_dim)),
                     part_out, part_lse)
        self._launch(kernels.merge_splits, batch * n_heads, head_dim, part_out, part_lse, out, lse)
        return out, lse

    # -- RoPE
    def apply_rope(self, x, cos, sin, convention="half"):
        interleaved = rope_is_interleaved(convention)
        check_rope_shapes(x, cos, sin)
        xp = self.xp
        out = xp.empty(x.shape, dtype=x.dtype)
        pairs = out.size // 2
        if pairs == 0:
            return out
        kernels = self._kernels_for(x.shape[-1], x.dtype)
        threads = kernels.config.rope_threads
        cos4 = as_4d(cos.astype(x.dtype, copy=False), xp)
        sin4 = as_4d(sin.astype(x.dtype, copy=False), xp)
        self._launch(kernels.rope, -(-pairs // threads), threads,
                     self._kernel_input(x), self._kernel_input(cos4), self._kernel_input(sin4), bool(interleaved),
                     out)
        return out


# --------------------------------------------------------------------------- "cuda-sim"


def _lock_simulator_shared_arrays() -> None:
    """Make the simulator's ``cuda.shared.array`` atomic (once per process).

    The simulator hands every thread of a block the same NumPy array for a ``cuda.shared.array``
    call by looking it up in a dict and, if absent, creating and storing it: a check-then-act with no
    lock. If the interpreter switches threads between the check and the store (``_launch`` sets a
    short switch interval), two threads of one block get two different "shared" arrays and the kernel
    computes garbage. This is the likely cause of a cuda-sim greedy-token test that failed about 2 times
    in 40 runs; the race was found by reading the simulator, not reproduced on demand. A lock around
    the allocation restores CUDA's semantics; real GPUs never had the problem.
    """
    from numba.cuda.simulator import kernelapi

    shared = kernelapi.FakeCUDAShared
    if getattr(shared.array, "_minikv_locked", False):
        return
    unlocked, lock = shared.array, threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:     # dynamic shared memory / unsupported: no lookup to guard
            return unlocked(self, shape, dtype, alignment)
        caller = sys._getframe(1)                   # as the simulator does: one array per source line
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            found = self._allocations.get(key)
            if found is None:
                if isinstance(dtype, kernelapi.types.Type):
                    dtype = kernelapi.numpy_support.as_dtype(dtype)
                found = self._allocations[key] = np.empty(shape, dtype)
        return found

    array._minikv_locked = True
    shared.array = array


class CudaSimBackend(_CudaKernelBackend):
    """The CUDA kernels on NumPy arrays through Numba's CUDA simulator (slow, exact, no GPU needed).

    The tiles are small by default (4 query rows, 4 keys, head_dim decode threads) so that tiny
    test shapes still cross several tiles and splits, and the simulator, which runs one Python
    thread per CUDA thread, stays quick. Any tile sizes compute the same result."""

    name = "cuda-sim"
    xp = np

    def __init__(self, block_q: int = 4, block_k: int = 4, decode_tile: int = 4, n_splits=None):
        _import_numba_cuda(simulator=True)
        _lock_simulator_shared_arrays()
        super().__init__(_kernels_module(), n_splits=n_splits)
        self.block_q, self.block_k, self.decode_tile = int(block_q), int(block_k), int(decode_tile)

    def kernel_config(self, head_dim, compute):
        # norm_threads=16, gemv_rows=1: the fixtures' rows (d >= 32) take several passes of a norm
        # block, and a batch of 2 several row groups of a GEMV block.
        return self._kernels.KernelConfig(head_dim=head_dim, block_q=self.block_q, block_k=self.block_k,
                                          decode_threads=head_dim, decode_tile=min(self.decode_tile, head_dim),
                                          rope_threads=32, norm_threads=16, gemv_threads=32, gemv_rows=1,
                                          compute=compute)

    def _gemv_splits(self, column_blocks, k):
        return max(1, min(2, k))

    def _kernel_input(self, array):
        # The simulator copies each argument to a fake device array, which must be contiguous.
        return np.ascontiguousarray(array)

    def _default_splits(self, batch_heads, capacity, tile):
        return 2

    def _launch(self, kernel, grid, block, *args):
        # Each simulated thread is a Python thread, and every syncthreads() hands the GIL around the
        # whole block. With Python's default 5 ms switch interval a launch spends most of its time
        # waiting for those hand-overs; 0.1 ms makes the simulator about ten times faster.
        previous = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)
        try:
            super()._launch(kernel, grid, block, *args)
        finally:
            sys.setswitchinterval(previous)

    def to_device(self, array):
        self.counters["to_device"] += 1
        return np.asarray(array)

    def to_host(self, array):
        self.counters["to_host"] += 1
        return np.asarray(array)

    def _index_array(self, host_values):
        self.counters["to_device"] += 1      # on a GPU: an upload (memoised per step there)
        return host_values


# --------------------------------------------------------------------------- "cuda"


class CudaBackend(_CudaKernelBackend):
    """CuPy arrays on the GPU + the Numba CUDA kernels (see the package docstring)."""

    name = "cuda"

    def __init__(self, n_splits=None, device=None):
        try:
            import cupy
        except ImportError as exc:
            raise BackendUnavailableError(
                f"backend 'cuda' needs CuPy, which could not be imported ({exc}); install it with {INSTALL_HINT} "
                "(pick the one matching your NVIDIA driver's CUDA version: nvidia-smi shows it)") from None
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:   # CUDARuntimeError: no driver, no device, ...
            raise BackendUnavailableError(f"backend 'cuda' found no usable NVIDIA GPU: CuPy reports {exc!r}; "
                                          "check nvidia-smi, or use backend 'numba' on the CPU") from None
        if count < 1:
            raise BackendUnavailableError("backend 'cuda' found no NVIDIA GPU (CuPy sees 0 devices); "
                                          "use backend 'numba' on the CPU")
        cuda = _import_numba_cuda(simulator=False)
        if not cuda.is_available():
            raise BackendUnavailableError(f"backend 'cuda': Numba cannot use the GPU ({cuda.cuda_error()}); "
                                          f"{INSTALL_HINT}")
        super().__init__(_kernels_module(), n_splits=n_splits)
        self.cupy = cupy
        self.xp = cupy
        self._cuda = cuda
        self._device = cupy.cuda.Device(device if device is not None else cupy.cuda.runtime.getDevice())
        self._sm_count = int(self._device.attributes["MultiProcessorCount"])
        self._streams = {}
        self._index_memo = {}

    @property
    def device_name(self) -> str:
        name = self.cupy.cuda.runtime.getDeviceProperties(self._device.id)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    def kernel_config(self, head_dim, compute):
        return self._kernels.gpu_config(head_dim, compute)

    def _launch_options(self):
        # The stream CuPy is using now: kernels queue behind the CuPy work that produced their inputs.
        ptr = self.cupy.cuda.get_current_stream().ptr
        if ptr not in self._streams:
            self._streams[ptr] = self._cuda.default_stream() if ptr == 0 else self._cuda.external_stream(ptr)
        return (self._streams[ptr],)

    def _index_array(self, host_values):
        # lengths and offsets are the same for every layer of a step: upload them once per step.
        key = (host_values.dtype.str, host_values.shape, host_values.tobytes())
        if key not in self._index_memo:
            self.counters["to_device"] += 1
            if len(self._index_memo) > 64:
                self._index_memo.clear()
            self._index_memo[key] = self.cupy.asarray(host_values)
        return self._index_memo[key]

    def _gemv_splits(self, column_blocks, k):
        # Two blocks per streaming multiprocessor in all, each with at least 64 rows of W (UNMEASURED).
        return int(max(1, min(-(-2 * self._sm_count // column_blocks), k // 64)))

    def _default_splits(self, batch_heads, capacity, tile):
        # About sixteen blocks per streaming multiprocessor in all (more than fit at once, so the
        # last wave is short), but no chunk shorter than one tile.
        wanted = -(-16 * self._sm_count // max(1, batch_heads))
        return int(max(1, min(wanted, -(-capacity // tile), 64)))

    def to_device(self, array):
        self.counters["to_device"] += 1
        return self.cupy.asarray(array)

    def to_host(self, array):
        self.counters["to_host"] += 1
        return self.cupy.asnumpy(array)

    def copy_to_device(self, device_array, host_array):
        self.counters["to_device"] += 1
        device_array.set(np.ascontiguousarray(host_array, dtype=device_array.dtype))

    def synchronize(self):
        self.cupy.cuda.get_current_stream().synchronize()

    def _bind(self, array):
        # A Numba device array made once from the CuPy array: passing it costs ~45 us of host time
        # per launch instead of ~160 us for the CuPy array (table 4 of
        # benchmarks/results/gpu_nvidia-h100-80gb-hbm3.md). Same memory, no copy.
        if hasattr(array, "__cuda_array_interface__"):
            return self._cuda.as_cuda_array(array)
        return array

    def _capture_graph(self, run):
        """Record ``run()`` on a non-blocking CuPy stream (CUDA stream capture) into a graph.

        UNMEASURED: written for CuPy >= 13's ``Stream.begin_capture`` / ``end_capture`` and Numba
        kernels launched on the capturing stream through ``external_stream``; it has not run on a GPU
        yet. Any failure (cuBLAS refused during capture, an allocation in the pool while capturing,
        an old CuPy) returns the reason and the step runs launch by launch."""
        cupy = self.cupy
        try:
            stream = cupy.cuda.Stream(non_blocking=True)
            with stream:
                stream.begin_capture()
                try:
                    run()
                finally:
                    graph = stream.end_capture()
            stream.synchronize()
        except Exception as exc:   # capture is an optimisation: never fatal
            return None, f"{type(exc).__name__}: {exc}"
        return graph, None

    def _launch_graph(self, graph):
        graph.launch(stream=self.cupy.cuda.get_current_stream())

    write_kv = staticmethod(write_rows)
