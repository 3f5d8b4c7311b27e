"""Table 4: prefill tokens/s for 128 .. 4096-token prompts, naive vs tiled attention (model ``small``).

Prefill runs the whole prompt through the model in one forward pass (into a static cache sized to
the prompt, as generation does) and keeps only the last position's logits. The two attention
algorithms compute the same function: ``naive`` materialises the (heads, n, n) score matrix, ``tiled``
(flash attention's forward) walks blocks of queries and keys with an online softmax and never
holds more than a block of scores.

Time: median of repeats, without tracing. Peak memory: a separate run under ``tracemalloc``
(NumPy reports its buffers to it), counting what the forward pass allocates on top of what existed
before it (weights and the pre-allocated cache are excluded).
"""

from __future__ import annotations

import gc
import time
import tracemalloc

import numpy as np

import minikv

from .common import MODELS, Context, fmt, machine_line, md_table, median, prompt_ids, write_result

LENGTHS = [128, 256, 512, 1024, 2048, 4096]
QUICK_LENGTHS = [128, 256]
ALGORITHMS = ["naive", "tiled"]


def _prefill(model, ids: np.ndarray) -> np.ndarray:
    cache = model.new_cache("static", batch_size=1, max_seq_len=ids.shape[1])
    return model.forward(ids, cache, last_only=True)


def _peak_bytes(model, ids) -> int:
    cache = model.new_cache("static", batch_size=1, max_seq_len=ids.shape[1])
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        model.forward(ids, cache, last_only=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base


def run(ctx: Context) -> dict:
    config = MODELS["small"]
    path = ctx.checkpoint("small")
    models = {a: minikv.load(path, attention=a) for a in ALGORITHMS}
    lengths = QUICK_LENGTHS if ctx.quick else LENGTHS
    for m in models.values():
        _prefill(m, np.asarray([prompt_ids(config, 16)]))         # warm-up
    rows = []
    for n in lengths:
        ids = np.asarray([prompt_ids(config, n, seed=2)], dtype=np.int64)
        repeats = 1 if ctx.quick else (5 if n <= 512 else 3 if n <= 2048 else 2)
        times = {a: [] for a in ALGORITHMS}
        logits = {}
        for r in range(repeats):
            for a in (ALGORITHMS if r % 2 == 0 else ALGORITHMS[::-1]):
                t0 = time.perf_counter()
                logits[a] = _prefill(models[a], ids)
                times[a].append(time.perf_counter() - t0)
        row = {"prompt": n, "repeats": repeats, "algorithms": {}}
        for a in ALGORITHMS:
            seconds = median(times[a])
            row["algorithms"][a] = {"seconds": seconds, "seconds_all": times[a], "tokens_per_s": n / seconds,
                                    "peak_bytes": _peak_bytes(models[a], ids)}
        row["max_abs_logit_difference"] = float(np.max(np.abs(logits["naive"] - logits["tiled"])))
        row["tiled_over_naive_time"] = row["algorithms"]["tiled"]["seconds"] / row["algorithms"]["naive"]["seconds"]
        row["tiled_over_naive_memory"] = (row["algorithms"]["tiled"]["peak_bytes"]
                                          / max(row["algorithms"]["naive"]["peak_bytes"], 1))
        rows.append(row)
        print(f"  prefill {n}: " + ", ".join(f"{a} {row['algorithms'][a]['tokens_per_s']:.0f} tok/s "
                                             f"{row['algorithms'][a]['peak_bytes'] / 2**20:.1f} MiB" for a in ALGORITHMS),
              flush=True)
        gc.collect()
    report = {"table": "prefill", "model": "small", "algorithms": ALGORITHMS, "rows": rows,
              "default_attention": minikv.get_backend("numpy").default_attention,
              "tiled_from_keys": minikv.get_backend("numpy").tiled_from_keys}
    write_result(ctx, "prefill", report, to_markdown(report, ctx))
    _plot(report, ctx)
    return report


def to_markdown(report: dict, ctx: Context) -> str:
    header = ["prompt tokens", "naive tok/s", "tiled tok/s", "tiled / naive time", "naive peak MiB",
              "tiled peak MiB", "tiled / naive memory", "max abs logit diff"]
    rows = []
    for r in report["rows"]:
        a = r["algorithms"]
        rows.append([r["prompt"], fmt(a["naive"]["tokens_per_s"], 0), fmt(a["tiled"]["tokens_per_s"], 0),
                     f"{r['tiled_over_naive_time']:.2f}x", fmt(a["naive"]["peak_bytes"] / 2**20, 1),
                     fmt(a["tiled"]["peak_bytes"] / 2**20, 1), f"{100 * r['tiled_over_naive_memory']:.0f}%",
                     f"{r['max_abs_logit_difference']:.1e}"])
    return "".join([
        "## Prefill: naive vs tiled attention (model small, float32, batch 1)\n",
        f"Machine: {machine_line(report['machine'] if 'machine' in report else ctx.info)}\n\n",
        md_table(header, rows),
        "\nTokens/s = prompt tokens / time of one forward pass over the whole prompt into a static cache (median of "
        "repeats). Peak MiB = the most memory the forward pass held on top of the weights and the cache "
        "(tracemalloc, a separate untimed run): the whole model's activations, not only attention's. "
        f"With no attention= given, the numpy backend uses {report['default_attention']!r} below "
        f"{report['tiled_from_keys']} keys and 'tiled' from there on (the crossover above).\n",
    ])


def _plot(report: dict, ctx: Context) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    lengths = [r["prompt"] for r in report["rows"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for a in report["algorithms"]:
        ax1.plot(lengths, [r["algorithms"][a]["tokens_per_s"] for r in report["rows"]], marker="o", label=a)
        ax2.plot(lengths, [r["algorithms"][a]["peak_bytes"] / 2**20 for r in report["rows"]], marker="o", label=a)
    ax1.set(xlabel="prompt tokens", ylabel="prefill tokens/s", title="prefill speed (small)")
    ax2.set(yscale="log", xlabel="prompt tokens", ylabel="peak MiB during prefill",
            title="prefill peak memory (tracemalloc)")
    from matplotlib.ticker import NullLocator

    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(n) for n in lengths])
        ax.legend()
    fig.tight_layout()
    fig.savefig(ctx.out / "prefill.png", dpi=110)
    plt.close(fig)
