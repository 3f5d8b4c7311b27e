"""Accelerated backends for minikv, installed as the subpackage ``minikv.backends``.

Each module here implements the protocol of ``minikv.backend.Backend`` with faster kernels, and
each is imported only when its backend is asked for (``minikv.get_backend("numba")``), so this
package itself imports nothing heavy:

``numba_cpu``   backend ``"numba"``: ``@njit(parallel=True)`` CPU kernels for tiled attention,
                split-K decode attention (contiguous and paged) and RoPE.
``numba_decode`` the numba backend's compiled batch-1 decode step (two kernels per layer) and its
                matrix-vector products for float32, int8 and int4 weights (``minikv.quant``).
``cuda``        backends ``"cuda"`` (CuPy arrays + Numba CUDA kernels on a GPU) and ``"cuda-sim"``
                (the very same CUDA kernels on NumPy arrays through Numba's CUDA simulator).
``_common``     the argument checks and conventions every accelerated backend shares.

Every backend is tested against the NumPy reference (tests/test_backends.py).
"""
