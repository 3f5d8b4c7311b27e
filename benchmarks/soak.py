"""Soak test: 10,000 decode steps of the bundled model, memory printed every 1,000.

    python -m benchmarks.soak                  # prints to stdout
    python -m benchmarks.soak --out benchmarks/results/soak.txt

A leak of one small array per step (a block never returned, a growing list, a cache copy kept
alive) is invisible in a test of 20 steps and obvious over 10,000: resident memory must stay flat
after the first few hundred steps. The model decodes into one static cache of its full length
(512 positions) and resets it when full, so the run covers reset as well as decode. Kept out of CI
(it takes minutes); the README quotes its result.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

import minikv

from .common import blas_line, machine_info, machine_line


def rss_bytes() -> int:
    """Resident memory now (Linux: /proc/self/statm); elsewhere the peak (getrusage)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def soak(steps: int = 10_000, every: int = 1_000, cache_kind: str = "static", seed: int = 0):
    """Yield (step, rss bytes, positions held, resets so far, seconds) every ``every`` steps."""
    model = minikv.load()
    cache = model.new_cache(cache_kind, batch_size=1)
    capacity = cache.capacity
    rng = np.random.default_rng(seed)
    params = minikv.SamplingParams(temperature=0.8, top_p=0.95)
    token = np.array([[int(rng.integers(0, model.config.vocab_size))]])
    resets, start = 0, time.perf_counter()
    yield 0, rss_bytes(), 0, 0, 0.0
    for step in range(1, steps + 1):
        if cache.lengths[0] >= capacity:
            cache.reset()
            resets += 1
        logits = model.forward(token, cache, last_only=True)
        token = minikv.sampling.sample(logits, params, rng)[:, None]
        if step % every == 0:
            gc.collect()
            yield step, rss_bytes(), int(cache.lengths[0]), resets, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=1_000)
    parser.add_argument("--cache", default="static")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    lines = [f"# minikv soak: {args.steps} decode steps of the bundled model, {args.cache} cache reset when full",
             f"# machine: {machine_line(machine_info())}",
             f"# {blas_line()}",
             "# (a shared machine: the steps/s column varies with the other work on it; memory does not)",
             f"{'step':>6} {'RSS MiB':>9} {'positions':>9} {'resets':>6} {'seconds':>8} {'steps/s':>8}"]
    print("\n".join(lines), flush=True)
    first = None
    for step, rss, held, resets, seconds in soak(args.steps, args.every, args.cache):
        rate = step / seconds if seconds > 0 else float("nan")
        line = f"{step:>6} {rss / 2**20:>9.1f} {held:>9} {resets:>6} {seconds:>8.1f} {rate:>8.1f}"
        print(line, flush=True)
        lines.append(line)
        if step == args.every:
            first = rss
        last = rss
    if first is not None:
        summary = (f"# RSS from step {args.every} to {args.steps}: {first / 2**20:.1f} -> {last / 2**20:.1f} MiB "
                   f"({(last - first) / 2**20:+.1f} MiB)")
        print(summary)
        lines.append(summary)
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
