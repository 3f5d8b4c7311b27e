"""The three GPU measurements of the CUDA backend (issue 5), in one run.

    python -m benchmarks.cuda_kernels              # on a machine with an NVIDIA GPU
    python -m benchmarks.cuda_kernels --quick      # fewer sizes and repeats
    python -m benchmarks.cuda_kernels --dry-run    # no GPU: every step on backend "cuda-sim", tiny sizes

1. Decode attention (split-K + merge) for batch 16, 8 heads, head_dim 64 and a cache of 128 ..
   4096 positions in float16 and float32 (q in float32): the GPU time per call, the host time per
   call (what a Python decode loop waits for), and the fraction of the memory bandwidth reached,
       bytes of K and V read / kernel time / peak bandwidth.
   Peak is the theoretical HBM bandwidth (memory clock x bus width, or the datasheet figure for the
   GPU's name); a device-to-device copy gives the achievable figure beside it. Small caches fit in
   the L2 cache, so each timed call reads another of several copies of the cache (3x L2 in all).
2. Prefill attention (the tiled flash-attention kernel), causal, batch 4, 8 heads, head_dim 64,
   512 .. 4096 tokens: TFLOP/s, counting 4 * head_dim flops per visible (query, key) pair, against
   ``torch.nn.functional.scaled_dot_product_attention`` on the same (DLPack-shared) arrays.
3. End to end: greedy decode tokens/s of a ~53M-parameter LLaMA-shaped model with random weights,
   backend "cuda" against backend "numpy", batch 1 and 8.

Every kernel result is also checked against a float64 reference on the same device; the tables
say how far off it was. Results go to ``benchmarks/results/gpu_<gpu name>.md`` and ``.json``.

GPU timing: kernels are asynchronous, so each measurement first queues a ~50 ms busy-wait kernel,
then queues the timed calls behind it while the GPU is still busy, and reads CUDA events recorded
around them: the interval is GPU execution only, back to back, without the host's launch gaps. If
the host could not queue the calls within the busy-wait, the row is marked.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import minikv
from minikv.errors import BackendUnavailableError

REPO_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"

# Theoretical DRAM bandwidth by name, used when the device attributes do not give it.
DATASHEET_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
                       ("GH200", 4.0e12), ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12),
                       ("A100", 1.555e12), ("L40S", 8.64e11), ("L4", 3.0e11), ("A10", 6.0e11), ("T4", 3.2e11)]


# --------------------------------------------------------------------------- timing


class HostTimer:
    """Dry run: wall-clock time of each call (the simulator is synchronous)."""

    def __init__(self, backend):
        self.backend = backend

    def host_us(self, call, iters):
        start = time.perf_counter()
        for i in range(iters):
            call(i)
        return (time.perf_counter() - start) * 1e6 / iters

    def kernel_ms(self, call, iters, host_us=None):
        return self.host_us(call, iters) / 1e3, True


class GpuTimer:
    """CUDA events around calls queued behind a busy-wait kernel (see the module docstring)."""

    SPIN_SOURCE = r'''
    extern "C" __global__ void spin(long long cycles) {
        long long start = clock64();
        while (clock64() - start < cycles) { }
    }'''

    def __init__(self, backend):
        import cupy

        self.cupy = cupy
        self.backend = backend
        self.spin = cupy.RawKernel(self.SPIN_SOURCE, "spin")
        self.clock_khz = _attribute(cupy, "ClockRate") or 2_000_000

    def kernel_ms(self, call, iters, host_us=None):
        """GPU time per call. ``host_us``: the host's time per call, measured before, so that the
        busy-wait lasts well beyond the time the host needs to queue the calls."""
        cp = self.cupy
        call(0)
        self.backend.synchronize()
        spin_ms = 10.0 + 3 * iters * (host_us if host_us is not None else 1000.0) / 1e3
        spun, started, ended = cp.cuda.Event(), cp.cuda.Event(), cp.cuda.Event()
        self.spin((1,), (1,), (np.int64(self.clock_khz * spin_ms),))   # kHz * ms = cycles
        spun.record()
        started.record()
        for i in range(iters):
            call(i)
        ended.record()
        queued_in_time = not spun.done     # the GPU was still spinning when the last call was queued
        ended.synchronize()
        return cp.cuda.get_elapsed_time(started, ended) / iters, queued_in_time

    def host_us(self, call, iters):
        self.backend.synchronize()
        start = time.perf_counter()
        for i in range(iters):
            call(i)
        self.backend.synchronize()
        return (time.perf_counter() - start) * 1e6 / iters


def _attribute(cupy, name):
    try:
        return int(cupy.cuda.Device().attributes[name])
    except Exception:
        return None


def median_of(measure, repeats):
    results = [measure() for _ in range(repeats)]
    return statistics.median(r[0] for r in results), all(r[1] for r in results)


# --------------------------------------------------------------------------- the machine


def gpu_facts(backend, dry_run):
    if dry_run:
        return {"name": "dry-run (cuda-sim, no GPU)", "peak_bandwidth": None, "copy_bandwidth": None,
                "l2_bytes": 1 << 20, "sm_count": None}
    import cupy

    name = backend.device_name
    clock_khz, bus_bits = _attribute(cupy, "MemoryClockRate"), _attribute(cupy, "GlobalMemoryBusWidth")
    peak, source = None, None
    if clock_khz and bus_bits:
        peak, source = 2 * clock_khz * 1e3 * bus_bits / 8, "memory clock x bus width (double data rate)"
    else:
        for key, value in DATASHEET_BANDWIDTH:
            if key.lower() in name.lower():
                peak, source = value, f"datasheet figure for {key}"
                break
    # Achievable: a 1 GiB device-to-device copy (bytes read + bytes written).
    src = cupy.ones(1 << 28, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    timer = GpuTimer(backend)
    ms, _ = median_of(lambda: timer.kernel_ms(lambda i: dst.__setitem__(Ellipsis, src), 10, 100.0), 3)
    copy = 2 * src.nbytes / (ms / 1e3)
    del src, dst
    return {"name": name, "peak_bandwidth": peak or copy, "peak_source": source or "measured copy (no peak known)",
            "copy_bandwidth": copy, "l2_bytes": _attribute(cupy, "L2CacheSize") or (50 << 20),
            "sm_count": _attribute(cupy, "MultiProcessorCount"), "cupy": cupy.__version__}


# --------------------------------------------------------------------------- references (float64, on the device)


def reference_attention(xp, q, k, v, causal):
    """softmax(q k^T / sqrt(d)) v in float64, GQA by repeating kv heads (fine for a reference)."""
    q, k, v = (a.astype(xp.float64) for a in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = xp.repeat(k, group, axis=1), xp.repeat(v, group, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    if causal:
        seq_q, seq_k = q.shape[2], k.shape[2]
        visible = xp.arange(seq_k)[None, :] <= (xp.arange(seq_q)[:, None] + seq_k - seq_q)
        scores = xp.where(visible, scores, -xp.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = xp.exp(scores)
    return (weights / weights.sum(axis=-1, keepdims=True)) @ v


def max_error(xp, got, expected):
    return float(xp.abs(got.astype(xp.float64) - expected).max())


def randn(xp, shape, dtype, seed):
    rng = np.random.default_rng(seed)
    return xp.asarray(rng.standard_normal(shape, dtype=np.float32).astype(dtype))


# --------------------------------------------------------------------------- 1. decode attention


def bench_decode(backend, timer, facts, sizes, repeats, batch=16, heads=8, head_dim=64):
    xp = backend.xp
    rows = []
    q = randn(xp, (batch, heads, 1, head_dim), np.float32, 0)
    for cache_dtype in ("float16", "float32"):
        itemsize = np.dtype(cache_dtype).itemsize
        for length in sizes:
            kv_bytes = 2 * batch * heads * length * head_dim * itemsize
            copies = int(min(16, max(1, math.ceil(3 * facts["l2_bytes"] / kv_bytes))))
            ks = [randn(xp, (batch, heads, length, head_dim), cache_dtype, 10 + c) for c in range(copies)]
            vs = [randn(xp, (batch, heads, length, head_dim), cache_dtype, 100 + c) for c in range(copies)]
            lengths = np.full(batch, length, dtype=np.int64)
            out, _ = backend.decode_attention(q, ks[0], vs[0], lengths)
            error = max_error(xp, out, reference_attention(xp, q, ks[0], vs[0], causal=False))

            def call(i):
                backend.decode_attention(q, ks[i % copies], vs[i % copies], lengths)

            iters = 50 if not isinstance(timer, HostTimer) else 2
            host_us = timer.host_us(call, iters)
            kernel_ms, clean = median_of(lambda: timer.kernel_ms(call, iters, host_us), repeats)
            row = {"cache_dtype": cache_dtype, "cache_len": length, "kv_bytes": kv_bytes, "copies": copies,
                   "kernel_us": kernel_ms * 1e3, "host_us_per_call": host_us, "max_abs_error": error,
                   "queued_in_time": clean}
            if facts["peak_bandwidth"]:
                row["bandwidth_GBps"] = kv_bytes / (kernel_ms / 1e3) / 1e9
                row["fraction_of_peak"] = kv_bytes / (kernel_ms / 1e3) / facts["peak_bandwidth"]
                row["fraction_of_copy"] = kv_bytes / (kernel_ms / 1e3) / facts["copy_bandwidth"]
            rows.append(row)
            print(f"decode {cache_dtype} L={length}: {row['kernel_us']:.1f} us GPU, {host_us:.1f} us host, "
                  f"{row.get('fraction_of_peak', float('nan')):.1%} of peak, err {error:.2e}", flush=True)
            del ks, vs
    return rows


# --------------------------------------------------------------------------- 2. prefill attention


def bench_prefill(backend, timer, sizes, repeats, dry_run, batch=4, heads=8, head_dim=64):
    xp = backend.xp
    torch = None
    if not dry_run:
        try:
            import torch
            import torch.nn.functional as F
        except ImportError:
            torch = None
    rows = []
    for dtype in ("float16", "float32"):
        for seq in sizes:
            q, k, v = (randn(xp, (batch, heads, seq, head_dim), dtype, s) for s in (1, 2, 3))
            flops = 4 * head_dim * batch * heads * seq * (seq + 1) / 2   # visible (query, key) pairs, causal
            out, _ = backend.attention(q, k, v, causal=True)
            row = {"dtype": dtype, "seq": seq, "flops": flops,
                   "max_abs_error": max_error(xp, out, reference_attention(xp, q, k, v, causal=True))}
            iters = 10 if not dry_run else 1
            ours = lambda i: backend.attention(q, k, v, causal=True)   # noqa: E731
            host_us = timer.host_us(ours, 2)
            ms, clean = median_of(lambda: timer.kernel_ms(ours, iters, host_us), repeats)
            row.update(minikv_ms=ms, minikv_tflops=flops / (ms / 1e3) / 1e12, queued_in_time=clean)
            if torch is not None:
                tq, tk, tv = (torch.from_dlpack(a) for a in (q, k, v))
                expected = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
                row["max_abs_diff_vs_torch"] = float((torch.from_dlpack(out).double() - expected.double()).abs().max())
                theirs = lambda i: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)   # noqa: E731
                host_t = timer.host_us(theirs, 2)
                ms_t, clean_t = median_of(lambda: timer.kernel_ms(theirs, iters, host_t), repeats)
                row.update(torch_ms=ms_t, torch_tflops=flops / (ms_t / 1e3) / 1e12, torch_queued_in_time=clean_t)
            rows.append(row)
            print(f"prefill {dtype} S={seq}: minikv {row['minikv_tflops']:.2f} TFLOP/s"
                  + (f", torch SDPA {row['torch_tflops']:.2f}" if "torch_tflops" in row else "")
                  + f", err {row['max_abs_error']:.2e}", flush=True)
    return rows


# --------------------------------------------------------------------------- 3. end to end


def model_config(dry_run):
    from minikv.config import ModelConfig

    if dry_run:
        return ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2,
                           head_dim=8, intermediate_size=64, max_position_embeddings=64, norm_eps=1e-5,
                           rope_theta=10000.0)
    # LLaMA-shaped, ~53M parameters: 8 layers, d 512, 8 query / 2 kv heads of 64, a 32000-token
    # vocabulary with an untied lm_head (the shape of benchmarks/common.py's "mid" model).
    return ModelConfig(model_type="llama", vocab_size=32000, hidden_size=512, n_layers=8, n_heads=8, n_kv_heads=2,
                       head_dim=64, intermediate_size=1408, max_position_embeddings=2048, norm_eps=1e-5,
                       rope_theta=10000.0)


def random_model(config, backend, seed=0):
    from minikv.checkpoint import expected_shapes

    rng = np.random.default_rng(seed)
    weights = {name: (np.ones(shape, np.float32) if "norm" in name
                      else rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))
               for name, shape in sorted(expected_shapes(config).items())}
    return minikv.Transformer(config, weights, backend=backend)


def bench_end_to_end(backend_names, dry_run, quick):
    config = model_config(dry_run)
    prompt_len, new_tokens = (4, 3) if dry_run else (32, 32 if quick else 64)
    rng = np.random.default_rng(1)
    batches = (1,) if dry_run else (1, 8)
    prompts_of = {batch: [[int(t) for t in rng.integers(1, config.vocab_size, prompt_len)] for _ in range(batch)]
                  for batch in batches}
    rows, tokens = [], {}
    for name in backend_names:
        model = random_model(config, name)
        for batch in batches:
            prompts = prompts_of[batch]
            model.generate(prompts, max_new_tokens=2, cache="static")   # warm-up: compile, allocate
            out = model.generate(prompts, max_new_tokens=new_tokens, cache="static", temperature=0.0)
            tokens[name, batch] = out.tokens
            rows.append({"backend": name, "batch": batch, "prompt": prompt_len, "new_tokens": new_tokens,
                         "decode_tokens_per_s": out.stats.decode_tokens_per_s, "prefill_ms": out.stats.prefill_ms,
                         "parameters": model.n_parameters})
            print(f"end to end {name} batch {batch}: {out.stats.decode_tokens_per_s:.1f} tokens/s", flush=True)
    for row in rows:
        reference = tokens[backend_names[0], row["batch"]]
        mine = tokens[row["backend"], row["batch"]]
        row["tokens_identical_to_" + backend_names[0]] = mine == reference
    return {"parameters": rows[0]["parameters"], "rows": rows}


# --------------------------------------------------------------------------- 4. launch overhead


def bench_launch_overhead(backend, iters=300):
    """Host time to launch one tiny kernel with 7 array arguments, by how the arrays are handed over.

    A decode step launches a few kernels per layer on tiny data, so this fixed cost, not the GPU,
    sets decode speed at small batches."""
    import cupy

    cuda = backend._cuda

    @cuda.jit
    def touch(a, b, c, d, e, f, g):
        i = cuda.threadIdx.x
        if i < a.shape[0]:
            a[i] = b[i] + c[i] + d[i] + e[i] + f[i] + g[i]

    class InterfaceOnly:
        """Exposes only __cuda_array_interface__ (no __dlpack__), so Numba takes that path."""

        def __init__(self, array):
            self.__cuda_array_interface__ = array.__cuda_array_interface__

    arrays = [cupy.ones(32, dtype=cupy.float32) for _ in range(7)]
    variants = {"CuPy arrays": arrays,
                "objects with only __cuda_array_interface__": [InterfaceOnly(a) for a in arrays],
                "Numba device arrays (converted once, outside the loop)": [cuda.as_cuda_array(a) for a in arrays]}
    stream = backend._launch_options()[0]
    rows = []
    for name, args in variants.items():
        touch[1, 32, stream](*args)
        backend.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            touch[1, 32, stream](*args)
        backend.synchronize()
        rows.append({"arguments": name, "us_per_launch": (time.perf_counter() - start) * 1e6 / iters})
    raw = cupy.RawKernel(r'''extern "C" __global__ void touch(float* a, const float* b, const float* c,
        const float* d, const float* e, const float* f, const float* g) {
        int i = threadIdx.x; if (i < 32) a[i] = b[i] + c[i] + d[i] + e[i] + f[i] + g[i]; }''', "touch")
    raw((1,), (32,), tuple(arrays))
    backend.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        raw((1,), (32,), tuple(arrays))
    backend.synchronize()
    rows.append({"arguments": "CuPy RawKernel (CUDA C++, for comparison)",
                 "us_per_launch": (time.perf_counter() - start) * 1e6 / iters})
    for row in rows:
        print(f"launch: {row['arguments']}: {row['us_per_launch']:.1f} us", flush=True)
    return rows


# --------------------------------------------------------------------------- report


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "gpu"


def to_markdown(report) -> str:
    facts = report["gpu"]
    lines = [f"# GPU benchmarks: {facts['name']}\n", f"{report['date']}; {report['software']}\n"]
    if facts.get("peak_bandwidth"):
        lines.append(f"Peak memory bandwidth {facts['peak_bandwidth'] / 1e9:.0f} GB/s ({facts['peak_source']}); "
                     f"a device-to-device copy reached {facts['copy_bandwidth'] / 1e9:.0f} GB/s "
                     f"(read + write). L2 {facts['l2_bytes'] >> 20} MiB, {facts['sm_count']} SMs.\n")
    lines.append("\n## 1. Decode attention (split-K + merge), batch 16, 8 heads, head_dim 64, q float32\n\n")
    lines.append("| cache | positions | K+V MiB | GPU us/call | host us/call | GB/s | of peak | of copy | max abs err |\n")
    lines.append("|---|---|---|---|---|---|---|---|---|\n")
    for r in report["decode"]:
        mark = "" if r["queued_in_time"] else " *"
        lines.append(f"| {r['cache_dtype']} | {r['cache_len']} | {r['kv_bytes'] / 2**20:.1f} | {r['kernel_us']:.1f}{mark} "
                     f"| {r['host_us_per_call']:.1f} | {r.get('bandwidth_GBps', float('nan')):.0f} "
                     f"| {r.get('fraction_of_peak', float('nan')):.1%} | {r.get('fraction_of_copy', float('nan')):.1%} "
                     f"| {r['max_abs_error']:.1e} |\n")
    lines.append("\n## 2. Prefill attention, causal, batch 4, 8 heads, head_dim 64\n\n")
    lines.append("| dtype | tokens | minikv ms | minikv TFLOP/s | torch SDPA ms | torch TFLOP/s | max abs err (fp64 ref) "
                 "| max abs diff vs torch |\n|---|---|---|---|---|---|---|---|\n")
    for r in report["prefill"]:
        lines.append(f"| {r['dtype']} | {r['seq']} | {r['minikv_ms']:.3f} | {r['minikv_tflops']:.2f} "
                     f"| {r.get('torch_ms', float('nan')):.3f} | {r.get('torch_tflops', float('nan')):.2f} "
                     f"| {r['max_abs_error']:.1e} | {r.get('max_abs_diff_vs_torch', float('nan')):.1e} |\n")
    e2e = report["end_to_end"]
    lines.append(f"\n## 3. End-to-end greedy decode, {e2e['parameters'] / 1e6:.1f}M-parameter model, float32, "
                 "static cache\n\n| backend | batch | prompt + new | decode tokens/s | same tokens as numpy |\n"
                 "|---|---|---|---|---|\n")
    for r in e2e["rows"]:
        same = next(v for k, v in r.items() if k.startswith("tokens_identical_to_"))
        lines.append(f"| {r['backend']} | {r['batch']} | {r['prompt']} + {r['new_tokens']} "
                     f"| {r['decode_tokens_per_s']:.1f} | {'yes' if same else 'no'} |\n")
    if report.get("launch_overhead"):
        lines.append("\n## 4. Host time to launch one tiny kernel with 7 array arguments\n\n"
                     "| arguments passed as | us per launch |\n|---|---|\n")
        for r in report["launch_overhead"]:
            lines.append(f"| {r['arguments']} | {r['us_per_launch']:.1f} |\n")
    lines.append("\n`*`: the host could not queue the timed calls while the GPU was busy; the time includes "
                 "launch gaps.\n")
    return "".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="GPU benchmarks of minikv's cuda backend")
    parser.add_argument("--dry-run", action="store_true", help="run every step on cuda-sim with tiny sizes (no GPU)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--out", default=None, help=f"folder for gpu_<name>.md/.json (default {REPO_RESULTS})")
    args = parser.parse_args(argv)

    if args.dry_run:
        backend = minikv.get_backend("cuda-sim")
        timer = HostTimer(backend)
        decode_sizes, prefill_sizes, repeats = (8, 16), (8,), 1
        e2e_backends = ("numpy", "cuda-sim")
    else:
        try:
            backend = minikv.get_backend("cuda")
        except BackendUnavailableError as exc:
            print(f"No usable GPU, nothing measured: {exc}\n(--dry-run runs every step on the CUDA simulator.)")
            return 2
        timer = GpuTimer(backend)
        decode_sizes = (128, 1024, 4096) if args.quick else (128, 256, 512, 1024, 2048, 4096)
        prefill_sizes = (512, 2048) if args.quick else (512, 1024, 2048, 4096)
        repeats = 3 if args.quick else 5
        e2e_backends = ("numpy", "cuda")

    facts = gpu_facts(backend, args.dry_run)
    import numba
    software = f"minikv {minikv.__version__}, numpy {np.__version__}, numba {numba.__version__}, python " \
               f"{platform.python_version()}" + (f", cupy {facts['cupy']}" if "cupy" in facts else "")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "software": software, "gpu": facts, "dry_run": args.dry_run}
    report["decode"] = bench_decode(backend, timer, facts, decode_sizes, repeats,
                                    **({"batch": 2, "heads": 2, "head_dim": 8} if args.dry_run else {}))
    report["prefill"] = bench_prefill(backend, timer, prefill_sizes, repeats, args.dry_run,
                                      **({"batch": 1, "heads": 2, "head_dim": 8} if args.dry_run else {}))
    report["end_to_end"] = bench_end_to_end(e2e_backends, args.dry_run, args.quick)
    report["launch_overhead"] = [] if args.dry_run else bench_launch_overhead(backend)

    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) if args.dry_run else REPO_RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_" + ("dry-run" if args.dry_run else slug(facts["name"]))
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=float))
    markdown = to_markdown(report)
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
