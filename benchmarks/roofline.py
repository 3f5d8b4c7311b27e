"""Table 2: how close a decode step comes to this machine's memory bandwidth (the roofline).

At batch 1 a decode step multiplies one vector by every weight matrix: about 2 flops per weight
byte/4, far below what the cores can compute, so the step is bound by how fast the weights (and
the K/V cache) stream from memory. The ceiling is therefore

    best possible step time = bytes the step must read / memory read bandwidth
    bytes = every layer's weights + the lm_head + one embedding row + K/V at the mean position

and the fraction of the roofline a step reaches is (bytes / measured step time) / bandwidth.

The bandwidth is measured in the same run, several ways, because one NumPy thread cannot
saturate the memory system. Every array is at least 256 MiB per thread, and all threads together
read at least twice the last-level cache (this machine's L3 can be hundreds of MiB), so the
figures are memory, not cache, bandwidths:

* ``numpy sum, 1 thread``: ``a.sum()`` over one array;
* ``numpy sum, all cores``: one thread per core, each summing its own array at the same time
  (NumPy releases the GIL inside the reduction);
* ``BLAS sgemv``: a vector times a matrix with NumPy's BLAS on all its threads, in both layouts
  (x @ W as minikv stores weights, W @ x as PyTorch does): the very operation a decode step is made of;
* ``BLAS sdot``: ``np.dot(a, a)``;
* ``numba prange sum``: a parallel reduction compiled with Numba (when installed).

The all-core figure the target refers to is the best of the all-core methods (its best repeat).
Beside it, the table shows the bandwidth of re-reading a working set the size of one decode step's
weights (what decode does, step after step): where the last-level cache holds much of it, that
figure is higher, and it is the more honest ceiling for a model that fits in cache.
"""

from __future__ import annotations

import threading
import time

import numpy as np

import minikv

from .common import (MODELS, Context, backend_available, decode_step_bytes, decode_weight_bytes, fmt, has_module,
                     kv_bytes_per_position, machine_line, md_table, median, prompt_ids, usable_cores, write_result)
from .peer import minikv_generate

TARGET_FRACTION = 0.80
WORKLOADS = [(19, 50), (512, 256)]


def _best_and_median(seconds: list[float], n_bytes: int) -> dict:
    return {"best_GBps": n_bytes / min(seconds) / 1e9, "median_GBps": n_bytes / median(seconds) / 1e9,
            "bytes": n_bytes, "repeats": len(seconds)}


def numpy_sum_bandwidth(n_bytes: int, threads: int, repeats: int) -> dict:
    """``threads`` threads, each summing its own float32 array of n_bytes, started together."""
    arrays = [np.full(n_bytes // 4, 1.0, dtype=np.float32) for _ in range(threads)]
    for a in arrays:
        a.sum()                                      # touch: pages faulted in before timing
    seconds = []
    for _ in range(repeats):
        barrier = threading.Barrier(threads + 1)
        done = []

        def work(a):
            barrier.wait()
            a.sum()
            done.append(time.perf_counter())

        workers = [threading.Thread(target=work, args=(a,)) for a in arrays]
        for w in workers:
            w.start()
        barrier.wait()
        t0 = time.perf_counter()
        for w in workers:
            w.join()
        seconds.append(max(done) - t0)
    return _best_and_median(seconds, n_bytes * threads)


def blas_gemv_bandwidth(n_bytes: int, repeats: int, layout: str = "in_out") -> dict:
    """A float32 matrix of n_bytes times a vector with NumPy's BLAS (multi-threaded matrix-vector product).

    layout "in_out": x @ W with W (in, out), minikv's layout; "out_in": W @ x with W (out, in),
    PyTorch's nn.Linear layout. Both stream the whole matrix once; BLAS may do one faster."""
    cols = 4096
    rows = n_bytes // 4 // cols
    weight = np.full((rows, cols), 1e-3, dtype=np.float32)
    if layout == "in_out":
        x = np.ones(rows, dtype=np.float32)
        product = lambda: x @ weight          # noqa: E731
    else:
        x = np.ones(cols, dtype=np.float32)
        product = lambda: weight @ x          # noqa: E731
    product()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        product()
        seconds.append(time.perf_counter() - t0)
    return _best_and_median(seconds, weight.nbytes)


def blas_dot_bandwidth(n_bytes: int, repeats: int) -> dict:
    """np.dot(a, a) over n_bytes: BLAS sdot, both operands the same memory, so n_bytes are read once."""
    a = np.full(n_bytes // 4, 1e-3, dtype=np.float32)
    np.dot(a, a)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.dot(a, a)
        seconds.append(time.perf_counter() - t0)
    return _best_and_median(seconds, a.nbytes)


def numba_sum_bandwidth(n_bytes: int, threads: int, repeats: int) -> dict:
    import numba

    @numba.njit(parallel=True, fastmath=True, cache=False)
    def parallel_sum(a, chunks):
        # Each of `chunks` iterations sums a contiguous slice; Numba spreads them over its threads.
        size = a.size // chunks
        partial = np.zeros(chunks, dtype=np.float32)
        for c in numba.prange(chunks):
            s = np.float32(0.0)
            for i in range(c * size, (c + 1) * size):
                s += a[i]
            partial[c] = s
        return partial.sum()

    numba.set_num_threads(threads)
    a = np.full(n_bytes * threads // 4, 1.0, dtype=np.float32)
    parallel_sum(a, threads * 8)                     # compile and touch
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        parallel_sum(a, threads * 8)
        seconds.append(time.perf_counter() - t0)
    return _best_and_median(seconds, a.nbytes)


def dram_bytes_per_thread(ctx: Context) -> int:
    """Array size per thread for the memory (DRAM) figures: 256 MiB, or more so that all threads together
    read at least twice the last-level cache (else the figure would be a cache bandwidth)."""
    if ctx.quick:
        return 32 * 2**20
    llc = max((ctx.info.get("cpu_caches") or {}).values(), default=0)
    cores = usable_cores()
    return max(256 * 2**20, -(-2 * llc // cores // 2**20) * 2**20)


def working_set_bandwidth(n_bytes: int, threads: int, repeats: int) -> dict:
    """Like numpy_sum_bandwidth, for a working set the size of one decode step's reads, read again and again
    as decode does: this one may be served partly from a large last-level cache."""
    return numpy_sum_bandwidth(n_bytes // threads, threads, repeats)


def measure_bandwidth(ctx: Context) -> dict:
    per_thread = dram_bytes_per_thread(ctx)
    repeats = 3 if ctx.quick else 7
    cores = usable_cores()
    out = {"numpy sum, 1 thread": numpy_sum_bandwidth(per_thread, 1, repeats),
           f"numpy sum, {cores} threads": numpy_sum_bandwidth(per_thread, cores, repeats),
           f"BLAS sgemv x @ W (in, out), {ctx.info['numpy_threads']} threads":
               blas_gemv_bandwidth(per_thread * cores, repeats, "in_out"),
           f"BLAS sgemv W @ x (out, in), {ctx.info['numpy_threads']} threads":
               blas_gemv_bandwidth(per_thread * cores, repeats, "out_in"),
           f"BLAS sdot, {ctx.info['numpy_threads']} threads": blas_dot_bandwidth(per_thread * cores, repeats)}
    if has_module("numba"):
        try:
            out[f"numba prange sum, {cores} threads"] = numba_sum_bandwidth(per_thread, cores, repeats)
        except Exception as exc:          # a broken numba install must not sink the table
            out["numba prange sum"] = {"error": repr(exc)}
    return out


def run(ctx: Context) -> dict:
    model_name = "small" if ctx.quick else "mid"
    config = MODELS[model_name]
    workloads = [(19, 12)] if ctx.quick else WORKLOADS
    repeats = 1 if ctx.quick else 5
    path = ctx.checkpoint(model_name)
    backends = ["numpy"] + (["numba"] if backend_available("numba") else [])
    models = {b: minikv.load(path, backend=b) for b in backends}
    for m in models.values():
        minikv_generate(m, prompt_ids(config, 8), 4)           # warm-up
    bandwidth_before = measure_bandwidth(ctx)
    step_set = int(decode_weight_bytes(config))
    working_set = {"bytes": step_set, **working_set_bandwidth(step_set, usable_cores(), 3 if ctx.quick else 7)}
    rows = []
    for prompt_len, n_new in workloads:
        prompt = prompt_ids(config, prompt_len)
        for backend, model in models.items():
            runs = [minikv_generate(model, prompt, n_new) for _ in range(repeats)]
            steps = [r["decode_step_ms"] for r in runs]
            # The typical step: median over every decode step of every repeat (robust to steps stalled by other
            # processes on a shared machine); the mean-based figure is kept beside it.
            step_ms = median([r["median_step_ms"] for r in runs])
            mean_positions = prompt_len + n_new / 2
            n_bytes = decode_step_bytes(config, mean_positions)
            rows.append({"model": model_name, "backend": backend, "prompt": prompt_len, "new_tokens": n_new,
                         "mean_positions": mean_positions, "weight_bytes": decode_weight_bytes(config),
                         "kv_bytes": mean_positions * kv_bytes_per_position(config), "step_bytes": n_bytes,
                         "step_ms": step_ms, "mean_step_ms": median(steps), "mean_step_ms_all": steps,
                         "achieved_GBps": n_bytes / (step_ms / 1e3) / 1e9,
                         "achieved_GBps_mean_step": n_bytes / (median(steps) / 1e3) / 1e9})
            print(f"  roofline {model_name} {prompt_len}+{n_new} {backend}: {step_ms:.2f} ms/step, "
                  f"{rows[-1]['achieved_GBps']:.1f} GB/s", flush=True)
    bandwidth_after = measure_bandwidth(ctx)
    # The ceiling: the best all-core figure seen before or after the decode runs.
    all_core = {name: max(bandwidth_before[name].get("best_GBps", 0), bandwidth_after[name].get("best_GBps", 0))
                for name in bandwidth_before if "1 thread" not in name}
    ceiling_name = max(all_core, key=all_core.get)
    ceiling = all_core[ceiling_name]
    single = max(bandwidth_before["numpy sum, 1 thread"]["best_GBps"], bandwidth_after["numpy sum, 1 thread"]["best_GBps"])
    for row in rows:
        row["fraction_of_working_set"] = row["achieved_GBps"] / working_set["best_GBps"]
        row["fraction_of_all_core"] = row["achieved_GBps"] / ceiling
        row["fraction_of_single_thread"] = row["achieved_GBps"] / single
        row["roofline_step_ms"] = row["step_bytes"] / (ceiling * 1e9) * 1e3
    report = {"table": "roofline", "model": model_name, "target_fraction": TARGET_FRACTION,
              "bandwidth_before": bandwidth_before, "bandwidth_after": bandwidth_after,
              "all_core_GBps": ceiling, "all_core_method": ceiling_name, "single_thread_GBps": single,
              "working_set": working_set,
              "bytes_per_thread": dram_bytes_per_thread(ctx),
              "exceeds_last_level_cache": dram_bytes_per_thread(ctx) * usable_cores()
              >= 2 * max((ctx.info.get("cpu_caches") or {}).values(), default=0),
              "rows": rows}
    write_result(ctx, "roofline", report, to_markdown(report, ctx))
    return report


def to_markdown(report: dict, ctx: Context) -> str:
    bw_rows = []
    for name in report["bandwidth_before"]:
        before, after = report["bandwidth_before"][name], report["bandwidth_after"][name]
        if "error" in before:
            bw_rows.append([name, before["error"], "", ""])
            continue
        bw_rows.append([name, f"{before['bytes'] / 2**20:.0f} MiB", fmt(before["best_GBps"]) + " / " + fmt(after["best_GBps"]),
                        fmt(before["median_GBps"]) + " / " + fmt(after["median_GBps"])])
    rows = []
    for r in report["rows"]:
        rows.append([r["model"], r["backend"], f"{r['prompt']} + {r['new_tokens']}",
                     f"{r['weight_bytes'] / 1e6:.1f} + {r['kv_bytes'] / 1e6:.2f}", fmt(r["step_ms"], 2),
                     fmt(r["roofline_step_ms"], 2), fmt(r["achieved_GBps"]) + f" ({fmt(r['achieved_GBps_mean_step'])})",
                     f"**{100 * r['fraction_of_all_core']:.0f}%**", f"{100 * r['fraction_of_single_thread']:.0f}%",
                     f"{100 * r['fraction_of_working_set']:.0f}%"])
    return "".join([
        "## Roofline: decode step vs memory bandwidth\n",
        f"Machine: {machine_line(report['machine'] if 'machine' in report else ctx.info)}\n\n",
        "Memory read bandwidth measured in this run (GB/s, before / after the decode runs):\n\n",
        md_table(["method", "bytes read", "best GB/s", "median GB/s"], bw_rows),
        f"\nAll-core figure: **{report['all_core_GBps']:.1f} GB/s** ({report['all_core_method']}, best repeat); "
        f"single thread: {report['single_thread_GBps']:.1f} GB/s. "
        + ("Arrays are sized to at least twice the last-level cache (cpu_caches in roofline.json), so these are "
           "memory figures.\n\n" if report["exceeds_last_level_cache"] else
           "**The arrays fit in the last-level cache (quick run): these are cache figures, not memory.**\n\n")
        + f"A decode step re-reads the same {report['working_set']['bytes'] / 1e6:.0f} MB of weights every step; "
        f"reading a working set of that size again and again on all cores runs at "
        f"{report['working_set']['best_GBps']:.1f} GB/s here (best repeat; median "
        f"{report['working_set']['median_GBps']:.1f}): where it is higher than the memory figure, the last-level "
        f"cache serves part of it, and a decode step can in principle beat the memory roofline.\n\n",
        md_table(["model", "backend", "prompt + new", "MB read per step (weights + K/V)", "measured ms/step",
                  "roofline ms/step", "achieved GB/s (mean-step)", "% of all-core", "% of 1 thread", "% of working-set figure"],
                 rows),
        f"\nBytes per step = every weight a decode step reads (all layers, final norm, lm_head, one embedding row; "
        f"float32) + K/V at the mean cached position (prompt + new/2). Measured ms/step = the median decode step over "
        f"all steps of {report['rows'][0]['mean_step_ms_all'].__len__()} generate runs (static cache, batch 1; robust to "
        f"steps stalled by other processes); achieved GB/s = bytes / that time, and in brackets the same from the "
        f"mean step (total decode time / steps). Target: >= {100 * report['target_fraction']:.0f}% of the all-core figure "
        f"on mid.\n",
    ])
