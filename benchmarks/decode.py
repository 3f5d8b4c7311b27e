"""Table 1: decode tokens/s at batch 1, minikv vs Hugging Face transformers on the CPU.

For each model (``small``, ``mid``) and workload (prompt 19 + 50 new tokens, prompt 512 + 256 new
tokens), greedy, exactly N new tokens (no stop token):

* minikv, backend "numpy" (and "numba" when ``minikv.available_backends()`` lists it), static cache;
* transformers ``generate`` with its default dynamic cache and with ``cache_implementation="static"``
  (eager PyTorch: transformers only auto-compiles static-cache generation on accelerators).

torch uses as many threads as NumPy's BLAS. Each repeat runs every engine once, in a rotated order
(so a noisy moment on a shared machine does not always hit the same engine); the table shows the
median over repeats. The headline is minikv numpy / the best transformers variant.

Token equality: the timed float32 runs are compared token by token with minikv numpy's (a random
model has near-tied logits, and float32 rounding that differs between two correct implementations
can flip one, after which the sequences diverge). The exact check runs both engines once more in
float64, where such flips do not happen, and the tokens must be equal.
"""

from __future__ import annotations

import gc
import sys
from typing import Optional


import minikv

from .common import (MODELS, Context, backend_available, blas_threads, decode_step_bytes, fmt, machine_line, md_table,
                     median, prompt_ids, write_result)
from .peer import minikv_generate, tokens_summary

WORKLOADS = [(19, 50), (512, 256)]
QUICK_WORKLOADS = [(19, 8)]
TARGET_RATIO = 2.0
SKIP_FACTOR = 10.0     # an engine more than this many times slower than minikv numpy in the probe is skipped


def _engines(ctx: Context, path, dtype: str = "float32", threads: Optional[int] = None):
    """name -> a function (prompt, n_new) -> timing dict. ``threads``: force every runtime to that many."""
    engines = {}
    backends = ["numpy"] + (["numba"] if backend_available("numba") else [])
    models = {backend: minikv.load(path, dtype=dtype, backend=backend) for backend in backends}
    for backend, model in models.items():
        engines[f"minikv {backend}"] = (lambda m: lambda p, n: minikv_generate(m, p, n, cache="static"))(model)
    if threads is not None:
        engines = {name: _with_threads(run, threads) for name, run in engines.items()}
    for extra_threads in ([] if threads is not None else _extra_threads(ctx)):

        def fewer_threads_numpy(p, n, k=extra_threads):
            with blas_threads(k):
                return minikv_generate(models["numpy"], p, n, cache="static")

        engines[f"minikv numpy, {extra_threads} thread"] = fewer_threads_numpy
    if ctx.peer_available:
        import torch

        from .peer import hf_generate, load_hf, setup_torch

        main_threads, extra = _torch_threads(ctx) if threads is None else (threads, [])
        setup_torch(main_threads)
        hf = load_hf(path, dtype)

        def hf_engine(cache, k):
            def run(p, n):
                torch.set_num_threads(k)
                return hf_generate(hf, p, n, cache)
            return run

        for cache in ("dynamic", "static"):
            engines[f"transformers {cache}"] = hf_engine(cache, main_threads)
        for k in extra:
            for cache in ("dynamic", "static"):
                engines[f"transformers {cache}, {k} thread"] = hf_engine(cache, k)
    return engines


def _with_threads(run, threads: int):
    """Run a minikv engine with NumPy's BLAS (and Numba, when loaded) on ``threads`` threads."""

    def wrapped(p, n):
        numba = sys.modules.get("numba")
        previous = numba.get_num_threads() if numba is not None else None
        try:
            if numba is not None:
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            with blas_threads(threads):
                return run(p, n)
        finally:
            if numba is not None:
                numba.set_num_threads(previous)
    return wrapped


def _torch_threads(ctx: Context) -> tuple[int, list[int]]:
    """(threads for the main transformers columns, extra thread counts measured beside them).

    The main columns use as many threads as NumPy's BLAS. On a shared machine an oversubscribed
    multi-threaded PyTorch slows down by an order of magnitude (its OpenMP threads wait on each
    other), so transformers on 1 thread is measured too and counts towards "best transformers":
    the headline never rests on the peer's worst configuration. The quick smoke run uses 1 thread only.
    """
    if ctx.quick:
        return 1, []
    return ctx.info["numpy_threads"], _extra_threads(ctx)


def _extra_threads(ctx: Context) -> list[int]:
    """Thread counts measured beside the main columns (both engines): 1, when the main count is more."""
    return [] if ctx.quick or ctx.info["numpy_threads"] == 1 else [1]


def _float64_check(ctx: Context, path, workloads) -> dict:
    """Greedy tokens of every engine in float64, compared with minikv numpy's: must be equal.

    Only the tokens matter here, so every runtime gets one thread (fast even on a busy machine)."""
    engines = _engines(ctx, path, "float64", threads=1)
    out = {}
    for prompt_len, n_new in workloads:
        prompt = prompt_ids(MODELS[path.name], prompt_len)
        reference = None
        checks = {}
        for name, run in engines.items():
            if "thread" in name:
                continue                  # the same computation as its main column
            tokens = run(prompt, n_new)["tokens"]
            if reference is None:
                reference = tokens
            else:
                checks[name] = tokens_summary(reference, tokens)
        out[f"{prompt_len}+{n_new}"] = checks
    del engines
    gc.collect()
    return out


def run(ctx: Context) -> dict:
    model_names = ["small"] if ctx.quick else ["small", "mid"]
    workloads = QUICK_WORKLOADS if ctx.quick else WORKLOADS
    rows = []
    for model_name in model_names:
        config = MODELS[model_name]
        path = ctx.checkpoint(model_name)
        engines = _engines(ctx, path)
        for name, engine in engines.items():                       # warm-up: first-call costs
            engine(prompt_ids(config, 8), 2 if ctx.quick else 4)
        # A probe of every engine; one that is pathologically slow here (e.g. a multi-threaded runtime on
        # an oversubscribed machine) is reported as skipped instead of running for many minutes.
        probe = {name: engine(prompt_ids(config, 19), 6)["decode_step_ms"] for name, engine in engines.items()}
        skipped = {name: ms for name, ms in probe.items()
                   if name != "minikv numpy" and ms > SKIP_FACTOR * probe["minikv numpy"] and not ctx.quick}
        for name in skipped:
            print(f"  decode {model_name}: skipping {name} ({skipped[name]:.1f} ms/step in the probe, minikv numpy "
                  f"{probe['minikv numpy']:.1f})", flush=True)
        engines = {name: engine for name, engine in engines.items() if name not in skipped}
        for prompt_len, n_new in workloads:
            repeats = 1 if ctx.quick else (5 if n_new <= 50 else 3)
            prompt = prompt_ids(config, prompt_len)
            runs: dict[str, list[dict]] = {name: [] for name in engines}
            names = list(engines)
            for r in range(repeats):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    runs[name].append(engines[name](prompt, n_new))
                    print(f"  decode {model_name} {prompt_len}+{n_new} {name}: "
                          f"{runs[name][-1]['decode_tokens_per_s']:.1f} tok/s", flush=True)
            mean_positions = prompt_len + n_new / 2
            step_bytes = decode_step_bytes(config, mean_positions)
            reference = runs["minikv numpy"][0]["tokens"]
            row = {"model": model_name, "prompt": prompt_len, "new_tokens": n_new, "repeats": repeats,
                   "decode_step_bytes": step_bytes, "engines": {}, "probe_step_ms": probe,
                   "skipped_too_slow": skipped}
            for name, results in runs.items():
                tps = median([x["decode_tokens_per_s"] for x in results])
                row["engines"][name] = {
                    "decode_tokens_per_s": tps,
                    "decode_tokens_per_s_all": [x["decode_tokens_per_s"] for x in results],
                    "decode_tokens_per_s_best": max(x["decode_tokens_per_s"] for x in results),
                    "median_step_ms": median([x["median_step_ms"] for x in results]),
                    "e2e_tokens_per_s": median([x["e2e_tokens_per_s"] for x in results]),
                    "first_token_ms": median([x["first_token_s"] * 1e3 for x in results]),
                    "decode_step_ms": 1e3 / tps,
                    "effective_GBps": step_bytes * tps / 1e9,
                    "float32_tokens_vs_minikv_numpy": tokens_summary(reference, results[0]["tokens"]),
                }
            hf = [row["engines"][n]["decode_tokens_per_s"] for n in row["engines"] if n.startswith("transformers")]
            if hf:
                best = max(hf)
                row["best_transformers_tokens_per_s"] = best
                row["ratio_numpy_vs_best_transformers"] = row["engines"]["minikv numpy"]["decode_tokens_per_s"] / best
                if "minikv numba" in row["engines"]:
                    row["ratio_numba_vs_best_transformers"] = row["engines"]["minikv numba"]["decode_tokens_per_s"] / best
                hf_e2e = max(row["engines"][n]["e2e_tokens_per_s"] for n in row["engines"] if n.startswith("transformers"))
                row["ratio_numpy_vs_best_transformers_e2e"] = row["engines"]["minikv numpy"]["e2e_tokens_per_s"] / hf_e2e
                # The same ratio from each engine's best repeat: less sensitive to a busy machine.
                best_hf = max(row["engines"][n]["decode_tokens_per_s_best"] for n in row["engines"]
                              if n.startswith("transformers"))
                row["ratio_numpy_vs_best_transformers_best_repeats"] = (
                    row["engines"]["minikv numpy"]["decode_tokens_per_s_best"] / best_hf)
            rows.append(row)
        del engines
        gc.collect()
        checks = _float64_check(ctx, path, workloads) if len(_names_for_check(ctx)) > 1 else {}
        for row in rows:
            if row["model"] == model_name:
                row["float64_tokens_vs_minikv_numpy"] = checks.get(f"{row['prompt']}+{row['new_tokens']}", {})
    report = {
        "table": "decode",
        "description": "decode tokens/s at batch 1, greedy, static cache for minikv; median of repeats",
        "threads": ctx.info["numpy_threads"],
        "torch_threads": _torch_threads(ctx)[0] if ctx.peer_available else None,
        "extra_threads": _extra_threads(ctx),
        "peer": ctx.peer_available,
        "target_ratio": TARGET_RATIO,
        "rows": rows,
        "all_float64_checks_equal": all(c["equal"] for row in rows
                                        for c in row.get("float64_tokens_vs_minikv_numpy", {}).values()),
    }
    write_result(ctx, "decode", report, to_markdown(report, ctx))
    return report


def _names_for_check(ctx: Context) -> list[str]:
    names = ["minikv numpy"]
    if backend_available("numba"):
        names.append("minikv numba")
    if ctx.peer_available:
        names += ["transformers dynamic", "transformers static"]
    return names


def to_markdown(report: dict, ctx: Context) -> str:
    names = _names_for_check(ctx)
    t = report.get("torch_threads")
    main_names = ["minikv numpy", "minikv numba", "transformers dynamic", "transformers static"]
    extra = [f"{e}, {k} thread" for k in report.get("extra_threads", [])
             for e in ("minikv numpy", "transformers dynamic", "transformers static")]
    labels = {"transformers dynamic": f"transformers dynamic ({t} thr)", "transformers static": f"transformers static ({t} thr)",
              "minikv numpy": f"minikv numpy ({report['threads']} thr)"}
    header = (["model", "prompt + new"] + [f"{labels.get(n, n)} tok/s" for n in main_names + extra]
              + ["minikv numpy / best transformers", "tokens equal (float64)"])
    rows = []
    for row in report["rows"]:
        cells = [row["model"], f"{row['prompt']} + {row['new_tokens']}"]
        for n in main_names + extra:
            e = row["engines"].get(n)
            if e:
                cells.append(fmt(e["decode_tokens_per_s"]))
            elif n in row.get("skipped_too_slow", {}):
                cells.append(f"skipped (probe {row['skipped_too_slow'][n]:.0f} ms/step)")
            else:
                cells.append("n/a (not available)" if n not in names else "n/a")
        ratio = row.get("ratio_numpy_vs_best_transformers")
        cells.append(f"**{ratio:.2f}x**" if ratio is not None else "n/a (peer not run)")
        checks = row.get("float64_tokens_vs_minikv_numpy", {})
        if checks:
            cells.append("yes" if all(c["equal"] for c in checks.values()) else
                         "NO: " + ", ".join(f"{k} differs at {c['first_difference']}" for k, c in checks.items()
                                            if not c["equal"]))
        else:
            cells.append("n/a")
        rows.append(cells)
    text = ["## Decode tokens/s at batch 1 (minikv vs Hugging Face transformers, CPU)\n",
            f"Machine: {machine_line(report['machine'] if 'machine' in report else ctx.info)}\n\n",
            md_table(header, rows)]
    # Details: step time, effective bandwidth, end-to-end, float32 agreement.
    detail_header = ["model", "prompt + new", "engine", "decode ms/step", "median step ms", "best repeat tok/s",
                     "effective GB/s", "first token ms", "end-to-end tok/s", "float32 tokens vs minikv numpy"]
    detail = []
    for row in report["rows"]:
        for name, e in row["engines"].items():
            agreement = e["float32_tokens_vs_minikv_numpy"]
            same = ("identical" if agreement["equal"] else f"first {agreement['matching_prefix']} equal")
            detail.append([row["model"], f"{row['prompt']} + {row['new_tokens']}", labels.get(name, name),
                           fmt(e["decode_step_ms"], 2), fmt(e["median_step_ms"], 2),
                           fmt(e["decode_tokens_per_s_best"]), fmt(e["effective_GBps"], 1), fmt(e["first_token_ms"], 1),
                           fmt(e["e2e_tokens_per_s"]), same if name != "minikv numpy" else "(reference)"])
    ratios = [f"{row['model']} {row['prompt']} + {row['new_tokens']}: "
              f"{row['ratio_numpy_vs_best_transformers_best_repeats']:.2f}x" for row in report["rows"]
              if "ratio_numpy_vs_best_transformers_best_repeats" in row]
    text += ["\nDetails (medians over repeats). decode ms/step = 1 / decode tokens/s; median step ms = the typical "
             "single step (median over the steps of a run), robust to a few steps stalled by other work on a shared "
             "machine; effective GB/s = bytes a decode step must read (weights + K/V at the mean position) / step "
             "time.\n\n", md_table(detail_header, detail)]
    if ratios:
        text.append("\nThe headline ratio from each engine's best repeat instead of the median: " + "; ".join(ratios)
                    + ".\n")
    text.append(
        f"\nDecode tokens/s = (N - 1) / (time from the first to the last new token): the N - 1 single-token decode "
        f"steps, prefill excluded, timed identically for both engines from outside; median of the repeats listed in "
        f"decode.json, engines alternating. Threads: NumPy BLAS {report['threads']}; torch.set_num_threads({t}) for "
        f"the main transformers columns"
        + (f", and both engines on {report['extra_threads']} thread(s) beside them (an oversubscribed "
           f"multi-threaded PyTorch on a shared machine can be far slower; 'best transformers' is the best of all "
           f"transformers columns)" if report.get("extra_threads") else "")
        + f". Target: minikv numpy >= {report['target_ratio']:.1f}x the best transformers variant. transformers runs "
        f"eagerly (no torch.compile: generate auto-compiles static caches only on accelerators). Token equality: "
        f"exact check in float64 (each engine's greedy tokens must equal minikv numpy's); the float32 timed runs are "
        f"compared too, where a near-tie in a random model's logits may legitimately flip a token.\n")
    if not report["peer"]:
        text.append("\ntransformers was not run (torch/transformers not installed, or --no-peer).\n")
    return "".join(text)
