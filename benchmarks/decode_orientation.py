"""Why the numpy backend's decode computes scores as K q^T: both orientations timed in one run.

    python -m benchmarks.decode_orientation

One decode step's scores for one sequence: ``group`` query heads per kv head against ``keys``
cached keys, (kv, group, hd) x (kv, keys, hd). ``q K^T`` is the textbook product; ``K q^T`` computes
the same numbers transposed (keys as rows), then copies them back to rows for the softmax. With a
few queries against hundreds of keys OpenBLAS runs the second much faster. Writes
benchmarks/results/decode_orientation.md with the BLAS in use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .attention import timings
from .common import RESULTS_DIR, machine_info, machine_line, median


def median_us(fn, repeats: int = 300) -> float:
    return 1e6 * median(timings(fn, repeats))


def main(out: Path = RESULTS_DIR) -> int:
    rng = np.random.default_rng(0)
    kv, group, hd = 2, 4, 32                    # the bundled model's decode step
    lines = ["# Decode scores: q K^T vs K q^T (median us per call, one sequence)", "",
             f"machine: {machine_line(machine_info())}", f"shapes: {kv} kv heads x {group} query heads each, head_dim {hd}, "
             "float32", "", "| keys | q @ K^T | (K @ q^T) copied to rows | speedup |", "|---|---|---|---|"]
    for keys in (64, 256, 384, 512, 640, 2048):
        q = rng.standard_normal((kv, group, hd)).astype(np.float32)
        k = rng.standard_normal((kv, keys, hd)).astype(np.float32)
        q_columns = np.ascontiguousarray(q.swapaxes(-1, -2))
        textbook = median_us(lambda: np.matmul(q, k.swapaxes(-1, -2)))
        transposed = median_us(lambda: np.ascontiguousarray(np.matmul(k, q_columns).swapaxes(-1, -2)))
        np.testing.assert_allclose(np.matmul(q, k.swapaxes(-1, -2)), np.matmul(k, q_columns).swapaxes(-1, -2),
                                   rtol=1e-5, atol=1e-5)
        lines.append(f"| {keys} | {textbook:.1f} | {transposed:.1f} | {textbook / transposed:.2f}x |")
        print(lines[-1], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_orientation.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'decode_orientation.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
