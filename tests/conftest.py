"""Test-session settings.

One BLAS thread: the tests' matrices are tiny, and on a 2-core machine shared with other work
OpenBLAS's spinning threads slow small matmuls down by 10-100x. Set before NumPy is imported (also
inherited by the CLI and notebook subprocesses). Results do not depend on it.
"""

import os

for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")
