"""Issue 19 on a GPU, in one run: does the device decode step (and its CUDA graph) make ``cuda`` fast?

    python -m benchmarks.gpu_step              # on a machine with an NVIDIA GPU (a few minutes)
    python -m benchmarks.gpu_step --quick      # fewer tokens
    python -m benchmarks.gpu_step --dry-run    # no GPU: the same code on "cuda-sim", a tiny model, no numbers

On the ``mid``-shaped model (LLaMA, ~55M parameters, 8 layers, float32, random weights, static
cache), greedy decode tokens/s at batch 1 and 16 for

    numpy              minikv on the host CPU (the baseline of the 5x target)
    cuda plain         backend "cuda", every step through model.forward (use_device_step = False)
    cuda step          backends/cuda/step.py launched kernel by kernel, matmuls by cuBLAS
    cuda free          the same step with our own GEMV kernels instead of cuBLAS (library_free = True)
    cuda graph         the library-free step captured once as a CUDA graph and replayed (use_graphs = True)
    transformers       on the same GPU, eager with a dynamic and with a static cache (if torch.cuda works)

with, for each, whether the greedy tokens equal numpy's, and for the step the host time and the GPU
time of one step (CUDA events around 20 back-to-back steps): their gap is what launches cost.

Targets (issue 19): cuda >= 5x numpy at batch 1, and >= the best transformers variant at batch 1
and at batch 16. The results go to ``benchmarks/results/gpu_step_<gpu>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import minikv
from minikv.errors import BackendUnavailableError

from .cuda_kernels import model_config, random_model, slug

REPO_RESULTS = Path(__file__).resolve().parent / "results"

TARGET_VS_NUMPY = 5.0
TARGET_VS_TRANSFORMERS = 1.0


def _generate(model, prompts, n_new):
    """Warm-up, then one timed greedy run: (decode tokens/s, tokens)."""
    model.generate(prompts, max_new_tokens=2, cache="static", temperature=0.0)
    out = model.generate(prompts, max_new_tokens=n_new, cache="static", temperature=0.0, stop_tokens=[])
    return out.stats.decode_tokens_per_s, out.tokens


def _set_variant(backend, variant):
    backend.use_device_step = variant != "plain"
    backend.library_free = variant == "free"
    backend.use_graphs = variant == "graph"


def step_timing(model, batch, prompt_len, steps=20):
    """Host microseconds and GPU microseconds per device step (with and without a graph)."""
    backend = model.backend
    rows = {}
    for kind in ("step", "free", "graph"):
        graphs = kind == "graph"
        cache = model.new_cache("static", batch_size=batch, max_seq_len=prompt_len + 2 * steps + 8)
        ids = np.ones((batch, prompt_len), dtype=np.int64)
        model.forward(ids, cache, last_only=True)
        step = backend.decode_step(model, cache, library_free=kind != "step")
        if graphs and not step.capture():
            rows[kind] = {"captured": False, "why": step.graph_error}
            continue
        step(np.ones(batch, dtype=np.int64))          # compiles, syncs the lengths
        backend.synchronize()
        # run() alone moves the device lengths without the host's bookkeeping: fine for timing, and
        # the cache has room for every step.
        timing = {"captured": graphs}
        if backend.name == "cuda":
            cupy = backend.cupy
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            t0 = time.perf_counter()
            start.record()
            for _ in range(steps):
                step.run()
            end.record()
            host_s = time.perf_counter() - t0
            end.synchronize()
            timing["gpu_us_per_step"] = cupy.cuda.get_elapsed_time(start, end) * 1e3 / steps
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                step.run()
            host_s = time.perf_counter() - t0
        timing["host_us_per_step"] = host_s * 1e6 / steps
        timing["launches_per_step"] = len(step.plan)
        rows[kind] = timing
    return rows


def transformers_rows(config, prompts_of, n_new):
    """tokens/s of transformers on the GPU (eager; dynamic and static cache), or a reason it is absent."""
    try:
        import torch
    except ImportError as exc:
        return {"error": f"torch not importable: {exc}"}
    if not torch.cuda.is_available():
        return {"error": "torch.cuda is not available"}
    from minikv.checkpoint import save_checkpoint, expected_shapes

    from .peer import load_hf

    rng = np.random.default_rng(0)
    weights = {name: (np.ones(shape, np.float32) if "norm" in name
                      else rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))
               for name, shape in sorted(expected_shapes(config).items())}
    folder = Path(tempfile.mkdtemp()) / "mid"
    save_checkpoint(folder, config, weights)
    hf = load_hf(folder, "float32", device="cuda")
    out = {}
    for cache in ("dynamic", "static"):
        for batch, prompts in prompts_of.items():
            ids = torch.tensor(prompts, dtype=torch.long, device="cuda")
            kwargs = dict(do_sample=False, num_beams=1, attention_mask=torch.ones_like(ids), pad_token_id=0,
                          eos_token_id=None, temperature=None, top_p=None, top_k=None)
            if cache == "static":
                kwargs["cache_implementation"] = "static"

            def run(n):
                torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.inference_mode():
                    result = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
                torch.cuda.synchronize()
                return time.perf_counter() - t, result

            run(4)                                     # warm-up
            t1, _ = run(1)                             # prefill + first token
            tn, result = run(n_new)
            out[f"transformers {cache}", batch] = {
                "decode_tokens_per_s": batch * (n_new - 1) / max(tn - t1, 1e-9),
                "tokens": result[:, ids.shape[1]:].tolist()}
    return out


def run(dry_run=False, quick=False, out_dir=None, with_transformers=True) -> dict:
    if dry_run:
        backend = minikv.get_backend("cuda-sim")
        batches, prompt_len, n_new, device = (1, 2), 4, 3, "cuda-sim"
    else:
        backend = minikv.get_backend("cuda")
        batches, prompt_len, n_new, device = (1, 16), 32, (32 if quick else 128), "cuda"
    config = model_config(dry_run)
    rng = np.random.default_rng(1)
    prompts_of = {b: [[int(t) for t in rng.integers(1, config.vocab_size, prompt_len)] for _ in range(b)]
                  for b in batches}
    results, tokens = {}, {}
    numpy_model = random_model(config, "numpy")
    for batch in batches:
        results["numpy", batch], tokens["numpy", batch] = _generate(numpy_model, prompts_of[batch], n_new)
    model = random_model(config, device)
    graph_status = {}
    try:
        for variant in ("plain", "step", "free", "graph"):
            _set_variant(backend, variant)
            for batch in batches:
                name = f"cuda {variant}"
                results[name, batch], tokens[name, batch] = _generate(model, prompts_of[batch], n_new)
                print(f"{name} batch {batch}: {results[name, batch]:.1f} tokens/s", flush=True)
        _set_variant(backend, "step")
        timing = {batch: step_timing(model, batch, prompt_len, steps=3 if dry_run else 20) for batch in batches}
        for batch in batches:
            graph_status[batch] = timing[batch].get("graph", {})
    finally:
        _set_variant(backend, "step")
    peers = transformers_rows(config, prompts_of, n_new) if with_transformers and not dry_run else {
        "error": "not run (dry run)" if dry_run else "not asked for"}
    for key, value in peers.items():
        if key != "error":
            results[key], tokens[key] = value["decode_tokens_per_s"], value["tokens"]
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "device": "dry run on cuda-sim (no GPU): code path only, no meaningful numbers" if dry_run
              else backend.device_name,
              "software": f"minikv {minikv.__version__}, numpy {np.__version__}, python {platform.python_version()}",
              "model": {"parameters": model.n_parameters, "layers": config.n_layers, "prompt": prompt_len,
                        "new_tokens": n_new},
              "rows": [{"engine": name, "batch": batch, "decode_tokens_per_s": value,
                        "tokens_equal_numpy": tokens[name, batch] == tokens["numpy", batch]}
                       for (name, batch), value in results.items()],
              "step_timing": {str(b): t for b, t in timing.items()}, "transformers_error": peers.get("error")}
    report["targets"] = targets(report, batches)
    out = Path(out_dir) if out_dir else (Path(tempfile.mkdtemp()) if dry_run else REPO_RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_step_" + ("dry-run" if dry_run else slug(report["device"]))
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=float))
    (out / f"{stem}.md").write_text(to_markdown(report))
    report["written"] = str(out / f"{stem}.md")
    return report


def targets(report, batches) -> list[dict]:
    speed = {(r["engine"], r["batch"]): r["decode_tokens_per_s"] for r in report["rows"]}
    lines = []
    for batch in batches:
        cuda = max((v for (n, b), v in speed.items() if b == batch and n.startswith("cuda")), default=None)
        peers = [v for (n, b), v in speed.items() if b == batch and n.startswith("transformers")]
        if batch == batches[0] and cuda is not None:
            ratio = cuda / speed["numpy", batch]
            lines.append({"target": f"best cuda >= {TARGET_VS_NUMPY:.0f}x numpy, batch {batch}", "ratio": ratio,
                          "met": ratio >= TARGET_VS_NUMPY})
        if peers and cuda is not None:
            ratio = cuda / max(peers)
            lines.append({"target": f"best cuda >= best transformers, batch {batch}", "ratio": ratio,
                          "met": ratio >= TARGET_VS_TRANSFORMERS})
    return lines


def to_markdown(report) -> str:
    m = report["model"]
    parts = [f"# Device decode step and CUDA graph: {report['device']}\n\n",
             f"{report['date']}; {report['software']}. Model: {m['parameters'] / 1e6:.1f}M parameters, "
             f"{m['layers']} layers, float32, static cache, greedy, prompt {m['prompt']} + {m['new_tokens']} tokens.\n\n",
             "| engine | batch | decode tokens/s | greedy tokens equal numpy |\n|---|---|---|---|\n"]
    for r in report["rows"]:
        engine = r["engine"]
        graph = report["step_timing"].get(str(r["batch"]), {}).get("graph", {})
        if engine == "cuda graph" and not graph.get("captured"):
            engine += " (not captured: ran launch by launch)"
        parts.append(f"| {engine} | {r['batch']} | {r['decode_tokens_per_s']:.1f} | "
                     f"{'yes' if r['tokens_equal_numpy'] else 'NO'} |\n")
    parts.append("\n| batch | step | captured | launches per step | host us per step | GPU us per step |\n"
                 "|---|---|---|---|---|---|\n")
    for batch, rows in report["step_timing"].items():
        for kind, t in rows.items():
            if "host_us_per_step" not in t:
                parts.append(f"| {batch} | {kind} | no: {t.get('why')} | | | |\n")
                continue
            gpu = f"{t['gpu_us_per_step']:.1f}" if "gpu_us_per_step" in t else "n/a"
            parts.append(f"| {batch} | {kind} | {t['captured']} | {t['launches_per_step']} | "
                         f"{t['host_us_per_step']:.1f} | {gpu} |\n")
    if report.get("transformers_error"):
        parts.append(f"\ntransformers: {report['transformers_error']}\n")
    parts.append("\n## Targets (issue 19)\n\n")
    for t in report["targets"]:
        parts.append(f"- {t['target']}: **{t['ratio']:.2f}x** ({'met' if t['met'] else 'NOT met'})\n")
    return "".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="cuda-sim and a tiny model: the code path, no GPU")
    parser.add_argument("--quick", action="store_true", help="32 new tokens instead of 128")
    parser.add_argument("--out", default=None, help=f"folder for gpu_step_<gpu>.md/.json (default {REPO_RESULTS})")
    parser.add_argument("--no-peer", action="store_true", help="skip transformers")
    args = parser.parse_args(argv)
    try:
        report = run(args.dry_run, args.quick, args.out, with_transformers=not args.no_peer)
    except BackendUnavailableError as exc:
        print(f"No usable GPU, nothing measured: {exc}\n(--dry-run runs the code path on the CUDA simulator.)")
        return 2
    print(Path(report["written"]).read_text())
    print("wrote", report["written"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
