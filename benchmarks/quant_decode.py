"""Decode tokens/s per weight format on ``mid``: minikv numpy / numba float32 / int8 / int4 against
transformers float32 and its dynamic int8 quantization, same run, same weights.

    python -m benchmarks.quant_decode [--model mid|mha] [--threads 1,2] [--new 64] [--repeats 3]
                                      [--no-peer] [--out DIR]

For each thread count (NumPy's BLAS, Numba and torch all get that many), every engine generates
``--new`` tokens greedily after a 19-token prompt from the same random ``mid`` checkpoint
(benchmarks/common.py: 8 layers, d 512, GQA 8/2, vocab 32000, 221 MB float32), static cache for
minikv, transformers' default dynamic cache.

``--model mha`` runs the MHA shape llama2.c's run.c is measured on by hand
(benchmarks/results/llama2c.md) the way run.c runs it: from BOS (token 1) alone, 256 new tokens by
default, so the 255 timed decode steps sit at positions 1..255 like run.c's ``-n 256``; its tables
are quant_decode_mha.md/.json. Repeats run every engine once in a rotated order; the
table shows medians. Effective GB/s = bytes a step must read (its format's projection matrices and
lm_head, the norms, one embedding row, the K/V at the mean position) x tokens/s.

The int8 peer: ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)``
(int8 weights per output channel, activations quantized per call; fbgemm/x86 kernels). It
quantizes every nn.Linear, the lm_head included, like minikv's int8.

Tokens: minikv numba int8/int4 are compared with their numpy-reference twins (the same quantized
weights through ``quant.quantized_linear``), numba float32 with numpy float32. A random model's
near-tied logits can flip a greedy token under float32 reordering; the tests compare on the trained
bundled model, where they are equal.
"""

from __future__ import annotations

import os

# Both OpenMP runtimes (Numba's pool, torch's intra-op pool) spin only briefly between parallel regions:
# on a shared machine long-spinning workers make every multi-threaded engine erratic (see the note in
# backends/numba_cpu.py). Set before numba or torch loads libgomp; the same policy for both engines.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

import argparse  # noqa: E402
import json
import sys
from pathlib import Path

import numpy as np  # noqa: E402

import minikv  # noqa: E402

from .common import (MODELS, RESULTS_DIR, blas_threads, kv_bytes_per_position, machine_info, machine_line,
                     make_checkpoint, md_table, median, prompt_ids)
from .peer import minikv_generate, tokens_summary  # noqa: E402

PROMPT = 19
BOS = 1     # llama2.c's (sentencepiece's) beginning-of-sequence token: run.c starts every sequence with it
# Per model: the prompt (a function of the config) and the default number of new tokens.
RUNS = {
    "mid": (lambda config: prompt_ids(config, PROMPT), 64),
    "mha": (lambda config: [BOS], 256),
}


def step_bytes(model, mean_positions: float) -> float:
    """Bytes one batch-1 decode step reads: projections + lm_head (as stored), norms, one embedding row, K/V."""
    total = sum(w.nbytes for layer in model.layers for w in (layer.qkv, layer.o, layer.mlp_in, layer.mlp_down))
    total += model.lm_head.nbytes
    total += sum(layer.attn_norm.nbytes + layer.mlp_norm.nbytes for layer in model.layers)
    total += model.embed.shape[1] * model.embed.itemsize
    return total + mean_positions * kv_bytes_per_position(model.config)


def blas_info() -> list[dict]:
    from threadpoolctl import threadpool_info

    return [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "threading_layer")}
            for d in threadpool_info()]


QUANTIZED = ("int8", "int4")


def engines_for(path: Path, peer: bool, quantized=QUANTIZED):
    """name -> (run(prompt, n_new) -> timing dict, bytes per step function, reference engine for tokens)."""
    import numba

    minikv_models = {
        "minikv numpy float32": minikv.load(path),
        "minikv numba float32": minikv.load(path, backend="numba"),
    }
    for fmt in quantized:
        minikv_models[f"minikv numba {fmt}"] = minikv.load(path, backend="numba", quantize=fmt)
    engines = {}
    for name, model in minikv_models.items():
        engines[name] = ((lambda m: lambda p, n: minikv_generate(m, p, n, cache="static"))(model),
                         (lambda m: lambda pos: step_bytes(m, pos))(model))
    hf_models = {}
    if peer:
        import torch

        from .peer import hf_generate, load_hf

        hf = load_hf(path, "float32")
        hf_int8 = torch.ao.quantization.quantize_dynamic(load_hf(path, "float32"), {torch.nn.Linear},
                                                         dtype=torch.qint8)
        f32_bytes = lambda pos: step_bytes(minikv_models["minikv numpy float32"], pos)   # noqa: E731
        # qint8 per-channel: 1 byte per weight + a float scale and zero point per output row (~ int8 minikv)
        int8_model = (minikv_models["minikv numba int8"] if "minikv numba int8" in minikv_models
                      else minikv.load(path, quantize="int8"))
        int8_bytes = lambda pos: step_bytes(int8_model, pos)    # noqa: E731
        engines["transformers float32"] = ((lambda p, n: hf_generate(hf, p, n, "dynamic")), f32_bytes)
        engines["transformers dynamic int8"] = ((lambda p, n: hf_generate(hf_int8, p, n, "dynamic")), int8_bytes)
        hf_models = {"float32": hf, "int8": hf_int8}
    return engines, minikv_models, hf_models, numba


def run(args) -> dict:
    config = MODELS[args.model]
    path = make_checkpoint(args.model, Path(args.work))
    engines, minikv_models, hf_models, numba = engines_for(path, args.peer, args.quantized)
    prompt = RUNS[args.model][0](config)
    mean_positions = len(prompt) + args.new / 2
    report = {"model": args.model, "prompt": len(prompt), "new_tokens": args.new, "repeats": args.repeats,
              "by_threads": {}}
    for threads in args.threads:
        if args.peer:
            import torch

            torch.set_num_threads(threads)
        previous = numba.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        with blas_threads(threads):
            for name, (engine, _) in engines.items():          # warm-up (compilation, first-call costs)
                engine(prompt_ids(config, 8), 4)
            runs = {name: [] for name in engines}
            names = list(engines)
            for r in range(args.repeats):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    runs[name].append(engines[name][0](prompt, args.new))
                    print(f"  {threads} thread(s) {name}: {runs[name][-1]['decode_tokens_per_s']:.1f} tok/s",
                          flush=True)
        numba.set_num_threads(previous)
        rows = {}
        for name, results in runs.items():
            tps = median([x["decode_tokens_per_s"] for x in results])
            rows[name] = {"decode_tokens_per_s": tps, "all": [x["decode_tokens_per_s"] for x in results],
                          "median_step_ms": median([x["median_step_ms"] for x in results]),
                          "step_bytes": engines[name][1](mean_positions),
                          "effective_GBps": engines[name][1](mean_positions) * tps / 1e9,
                          "effective_GBps_median_step": engines[name][1](mean_positions) / (
                              median([x["median_step_ms"] for x in results]) / 1e3) / 1e9,
                          "tokens": results[0]["tokens"]}
        best_hf = max([rows[n]["decode_tokens_per_s"] for n in rows if n == "transformers float32"] or [np.nan])
        for name, row in rows.items():
            row["vs_transformers_float32"] = row["decode_tokens_per_s"] / best_hf
            row["vs_minikv_numba_float32"] = row["decode_tokens_per_s"] / rows["minikv numba float32"][
                "decode_tokens_per_s"]
            row["vs_minikv_numpy_float32"] = row["decode_tokens_per_s"] / rows["minikv numpy float32"][
                "decode_tokens_per_s"]
        report["by_threads"][str(threads)] = rows
    # Token checks (one thread: only the tokens matter): numba vs its numpy twin, same weights.
    twins = {"minikv numba float32": minikv_models["minikv numpy float32"]}
    twins.update({f"minikv numba {fmt}": minikv.load(path, quantize=fmt) for fmt in args.quantized})
    checks = {}
    with blas_threads(1):
        for name, twin in twins.items():
            expected = minikv_generate(twin, prompt, args.new, cache="static")["tokens"]
            checks[name] = tokens_summary(expected, report["by_threads"][str(args.threads[0])][name]["tokens"])
    report["tokens_vs_numpy_twin"] = checks
    report["summary"] = summary(report)
    report["blas"] = blas_info()
    report["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    report["gomp_spincount"] = os.environ.get("GOMP_SPINCOUNT")
    return report


def _ratio(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.2f}x"


def summary(report: dict) -> dict:
    """The issue's targets, each engine at its best thread count (and the peer at its best)."""
    def best(name):
        return max(rows[name]["decode_tokens_per_s"] for rows in report["by_threads"].values() if name in rows)

    out = {name: best(name) for name in next(iter(report["by_threads"].values()))}
    if "transformers float32" in out:
        out["numba_float32_vs_best_transformers_float32"] = out["minikv numba float32"] / out["transformers float32"]
    for fmt in QUANTIZED:
        if f"minikv numba {fmt}" in out:
            out[f"numba_{fmt}_vs_numba_float32"] = out[f"minikv numba {fmt}"] / out["minikv numba float32"]
    out["numba_float32_vs_numpy_float32"] = out["minikv numba float32"] / out["minikv numpy float32"]
    return out


def markdown(report: dict, info: dict) -> str:
    out = [f"## Decode tokens/s per weight format (`{report['model']}`, batch 1, CPU)",
           f"Machine: {machine_line(info)}. **Shared machine** (other jobs running: see the load average): "
           "absolute figures are noisy; the ratios are measured in the same run, engines interleaved.",
           f"BLAS and OpenMP runtimes (threadpoolctl): {json.dumps(report['blas'])}; "
           f"OMP_WAIT_POLICY={report.get('omp_wait_policy')}, GOMP_SPINCOUNT={report.get('gomp_spincount')}",
           "",
           f"Prompt {report['prompt']} + {report['new_tokens']} new tokens, greedy, median of "
           f"{report['repeats']} repeats.", ""]
    header = ["threads", "engine", "tok/s", "median step ms", "bytes/step", "effective GB/s (tok/s)",
              "GB/s at the median step", "vs transformers float32", "vs minikv numba float32"]
    rows = []
    for threads, engines in report["by_threads"].items():
        for name, r in engines.items():
            rows.append([threads, name, f"{r['decode_tokens_per_s']:.1f}", f"{r['median_step_ms']:.2f}",
                         f"{r['step_bytes'] / 1e6:.1f} MB", f"{r['effective_GBps']:.1f}",
                         f"{r['effective_GBps_median_step']:.1f}",
                         _ratio(r['vs_transformers_float32']), _ratio(r['vs_minikv_numba_float32'])])
    out.append(md_table(header, rows))
    s = report["summary"]
    best = ["Each engine at its best thread count: " + ", ".join(
        f"{name} {s[name]:.1f} tok/s" for name in s if not name.startswith("numba_"))]
    if "numba_float32_vs_best_transformers_float32" in s:
        ratio = s["numba_float32_vs_best_transformers_float32"]
        best.append(f"numba float32 / best transformers float32 = **{ratio:.2f}x** (target 2.0x)")
    if "numba_int8_vs_numba_float32" in s:
        best.append(f"numba int8 / numba float32 = **{s['numba_int8_vs_numba_float32']:.2f}x** (target 1.5x)")
    if "numba_int4_vs_numba_float32" in s:
        best.append(f"int4 / float32 = {s['numba_int4_vs_numba_float32']:.2f}x")
    best.append(f"numba float32 / numpy float32 = {s['numba_float32_vs_numpy_float32']:.2f}x")
    out.append("; ".join(best) + ".\n")
    out.append("Greedy tokens vs the numpy-reference twin (same weights): " + ", ".join(
        f"{name}: {'equal' if c['equal'] else 'first difference at ' + str(c['first_difference'])}"
        for name, c in report["tokens_vs_numpy_twin"].items()) + "\n")
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1", help="comma-separated thread counts, e.g. 1,2")
    parser.add_argument("--model", default="mid", choices=sorted(RUNS))
    parser.add_argument("--new", type=int, default=None, help="new tokens (default: 64 for mid, 256 for mha)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peer", dest="peer", action="store_false")
    parser.add_argument("--quantized", default=",".join(QUANTIZED),
                        help="comma-separated quantized formats to run (default int8,int4; '' for none)")
    parser.add_argument("--work", default="/tmp/minikv-bench")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",")]
    args.quantized = [f for f in args.quantized.split(",") if f]
    if not set(args.quantized) <= set(QUANTIZED):
        parser.error(f"--quantized {args.quantized}: each must be one of {', '.join(QUANTIZED)}")
    if args.new is None:
        args.new = RUNS[args.model][1]
    info = machine_info()
    report = run(args)
    report["machine"] = info
    for rows in report["by_threads"].values():
        for row in rows.values():
            row.pop("tokens")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "quant_decode" if args.model == "mid" else f"quant_decode_{args.model}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    text = markdown(report, info)
    (args.out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
