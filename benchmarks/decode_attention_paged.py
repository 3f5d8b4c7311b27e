"""The numba backend's decode attention, two source trees in the same run: did a kernel change help?

    python -m benchmarks.decode_attention_paged --before /path/to/old/checkout [--after .] [--rounds 3]

Each round runs one subprocess per tree (PYTHONPATH set to that tree, one BLAS thread); rounds alternate
the trees so that a machine that slows down mid-run slows both. A child times
``NumbaBackend().paged_decode_attention`` (or ``decode_attention``) on these cases, all `mid`'s head
geometry (8 query heads, 2 KV heads, head_dim 64), float32 unless said:

* ``serving R rows``: what the serving engine's decode step asks of it (minikv/serving): R rows, lengths
  U[16, 256], pages of 16 keys, 8 layers' pools (1024, 2, 16, 64) of 16 MB each called layer after
  layer, a fresh random page table each step, so the pages come from memory (as in the engine, where a
  step's weights stream through the caches in between);
* ``window 64``: the serving case with a sliding window of 64 keys (17 rows);
* ``float64``: the serving case in float64 (17 rows);
* ``batch 1, 4096 keys``: one sequence, paged (the kernel splits the keys over the cores) and a
  contiguous cache (1, 2, 4096, 64), the batch-1 decode of a long context;
* ``float16 cache``: 4 rows of 1024 keys in a float16 pool (widened to float32 per call).

Each case runs on the backend's own thread choice (``threads_for``) and on 1 thread: on a shared
2-core machine a parallel region waits whenever a core is busy elsewhere, so the 1-thread figure is the
steadier comparison of the kernels themselves. Reported: the median ms per call of each tree, their
ratio (before / after: > 1 is faster). Writes benchmarks/results/decode_attention_paged.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from .common import ab_arguments, blas_line, machine_info, machine_line, write_ab_table

CHILD = r"""
import json, sys, time
import numpy as np
import minikv
from minikv.backends import numba_cpu

backend = numba_cpu.NumbaBackend()
rng = np.random.default_rng(0)
LAYERS, BLOCKS, KV, BS, HD, H = 8, 1024, 2, 16, 64, 8

def pools(dtype, blocks=BLOCKS, layers=LAYERS):
    return [tuple(rng.standard_normal((blocks, KV, BS, HD)).astype(dtype) for _ in "kv") for _ in range(layers)]

def serving_steps(rows, steps, dtype):
    work = []
    for _ in range(steps):
        lengths = rng.integers(16, 257, rows)
        cols = -(-int(lengths.max()) // BS)
        table = rng.permutation(BLOCKS)[:rows * cols].reshape(rows, cols).astype(np.int32)
        work.append((lengths, table, [rng.standard_normal((rows, H, 1, HD)).astype(dtype) for _ in range(LAYERS)]))
    return work

policy = numba_cpu.threads_for

def time_steps(call, work, one_thread):
    numba_cpu.threads_for = (lambda work: 1) if one_thread else policy   # the backend asks it per call
    times = []
    for step in work:
        t0 = time.perf_counter()
        call(step)
        times.append((time.perf_counter() - t0))
    numba_cpu.threads_for = policy
    return times

def serving(rows, dtype=np.float32, window=None, steps=24):
    layer_pools = pools(dtype)
    work = serving_steps(rows, steps, dtype)
    def call(step):
        lengths, table, qs = step
        for layer in range(LAYERS):
            backend.paged_decode_attention(qs[layer], *layer_pools[layer], table, lengths, window=window)
    return call, work, LAYERS

def batch1_paged(keys=4096, steps=40):
    (k, v), = pools(np.float32, layers=1)
    table = rng.permutation(BLOCKS)[None, :keys // BS].astype(np.int32)
    lengths = np.array([keys])
    work = [rng.standard_normal((1, H, 1, HD)).astype(np.float32) for _ in range(steps)]
    return (lambda q: backend.paged_decode_attention(q, k, v, table, lengths)), work, 1

def batch1_contiguous(keys=4096, steps=40):
    k, v = (rng.standard_normal((1, KV, keys, HD)).astype(np.float32) for _ in "kv")
    lengths = np.array([keys])
    work = [rng.standard_normal((1, H, 1, HD)).astype(np.float32) for _ in range(steps)]
    return (lambda q: backend.decode_attention(q, k, v, lengths)), work, 1

def float16_cache(rows=4, keys=1024, steps=40):
    (k, v), = pools(np.float16, blocks=rows * keys // BS, layers=1)
    table = np.arange(rows * keys // BS, dtype=np.int32).reshape(rows, keys // BS)
    lengths = np.full(rows, keys)
    work = [rng.standard_normal((rows, H, 1, HD)).astype(np.float32) for _ in range(steps)]
    return (lambda q: backend.paged_decode_attention(q, k, v, table, lengths)), work, 1

CASES = {"serving 8 rows": lambda: serving(8), "serving 17 rows": lambda: serving(17),
         "serving 32 rows": lambda: serving(32), "window 64": lambda: serving(17, window=64),
         "float64": lambda: serving(17, dtype=np.float64), "batch 1, 4096 keys, paged": batch1_paged,
         "batch 1, 4096 keys, contiguous": batch1_contiguous, "float16 cache": float16_cache}
result = {"minikv": minikv.__file__, "backends": numba_cpu.__file__}
for name, make in CASES.items():
    call, work, calls_per_step = make()
    call(work[0])                                                    # compile / warm up
    for one_thread, label in ((False, "policy"), (True, "1 thread")):
        times = time_steps(call, work, one_thread)
        result[f"{name} | {label}"] = 1e3 * sorted(times)[len(times) // 2] / calls_per_step
print(json.dumps(result))
"""


def run_tree(tree: Path, benchmarks_root: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{benchmarks_root}", OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True, cwd=tree)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for module in ("minikv", "backends"):                    # the tree we meant, not an installed copy
        assert result.pop(module).startswith(str(tree)), (module, tree)
    return result


def describe(tree: Path) -> str:
    """The tree's path and git commit (+ "with changes" when its work tree differs from the commit)."""
    git = ["git", "-C", str(tree)]
    commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return f"{tree} (commit {commit or 'unknown'}{', with changes' if dirty else ''})"


def main(argv=None) -> int:
    args = ab_arguments("python -m benchmarks.decode_attention_paged", 3, argv)
    before, after = args.before, args.after
    root = Path(__file__).resolve().parent.parent
    info = machine_info()
    runs = {"before": [], "after": []}
    for _ in range(args.rounds):
        runs["before"].append(run_tree(before, root))
        runs["after"].append(run_tree(after, root))
        print("round done", flush=True)
    lines = ["# Decode attention (numba), before vs after (same run, alternating rounds)", "",
             f"machine: {machine_line(info)}; {blas_line()}; load average at end "
             f"{[round(x, 2) for x in os.getloadavg()]}",
             f"before: {describe(before)}", f"after: {describe(after)}", "",
             "median ms per call (per layer); threads: the backend's choice (\"policy\") or 1; a shared machine, "
             "so compare within a row.", "",
             "| case | threads | before ms | after ms | before / after (speed) | rounds |", "|---|---|---|---|---|---|"]
    for key in runs["before"][0]:
        case, threads = key.split(" | ")
        b = statistics.median(run[key] for run in runs["before"])
        a = statistics.median(run[key] for run in runs["after"])
        lines.append(f"| {case} | {threads} | {b:.3f} | {a:.3f} | {b / a:.2f}x | {args.rounds} |")
    print("\n".join(lines))
    write_ab_table(args.out, "decode_attention_paged", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
