"""Table 5: the GPU. minikv's "cuda" backend on ``mid`` vs minikv numpy and transformers on the GPU.

Runs only where a GPU is usable: minikv's "cuda" backend must be available (CuPy + Numba CUDA and
a device) for the minikv column, and ``torch.cuda.is_available()`` for the transformers column.
Otherwise the table says that no GPU was found, and why.

With a GPU it also runs the kernel-level measurements of ``benchmarks.cuda_kernels`` (decode
attention latency and fraction of HBM bandwidth, prefill TFLOP/s against torch's SDPA, end-to-end
decode tokens/s against numpy), which write ``gpu_<gpu name>.md/json`` beside this table.
"""

from __future__ import annotations

import shutil

import minikv

from .common import (MODELS, Context, backend_available, backend_error, fmt, machine_line, md_table, median, prompt_ids,
                     write_result)
from .peer import minikv_generate, tokens_summary

WORKLOADS = [(19, 50), (512, 256)]


def _gpu_status(ctx: Context) -> dict:
    status = {"nvidia_smi": shutil.which("nvidia-smi") is not None,
              "minikv_cuda": backend_available("cuda"), "torch_cuda": False, "gpu_name": None}
    if not status["minikv_cuda"]:
        status["minikv_cuda_error"] = backend_error("cuda")     # BackendUnavailableError names what is missing
    if ctx.peer_available:
        import torch

        status["torch_cuda"] = bool(torch.cuda.is_available())
        if status["torch_cuda"]:
            status["gpu_name"] = torch.cuda.get_device_name(0)
    return status


def run(ctx: Context) -> dict:
    status = _gpu_status(ctx)
    rows = []
    if status["minikv_cuda"] or status["torch_cuda"]:
        config = MODELS["mid"]
        path = ctx.checkpoint("mid")
        engines = {}
        for backend in ["numpy"] + (["cuda"] if status["minikv_cuda"] else []):
            model = minikv.load(path, backend=backend)
            engines[f"minikv {backend}"] = (lambda m: lambda p, n: minikv_generate(m, p, n))(model)
        if status["torch_cuda"]:
            from .peer import hf_generate, load_hf

            hf = load_hf(path, "float32", device="cuda")
            engines["transformers cuda dynamic"] = lambda p, n: hf_generate(hf, p, n, "dynamic")
            engines["transformers cuda static"] = lambda p, n: hf_generate(hf, p, n, "static")
        for engine in engines.values():
            engine(prompt_ids(config, 8), 4)
        for prompt_len, n_new in ([(19, 12)] if ctx.quick else WORKLOADS):
            prompt = prompt_ids(config, prompt_len)
            results = {name: [engine(prompt, n_new) for _ in range(1 if ctx.quick else 3)]
                       for name, engine in engines.items()}
            reference = results["minikv numpy"][0]["tokens"]
            rows.append({"prompt": prompt_len, "new_tokens": n_new, "engines": {
                name: {"decode_tokens_per_s": median([x["decode_tokens_per_s"] for x in rs]),
                       "tokens_vs_minikv_numpy": tokens_summary(reference, rs[0]["tokens"])}
                for name, rs in results.items()}})
    if status["minikv_cuda"]:
        from benchmarks import cuda_kernels as kernel_benchmark

        kernel_benchmark.main(["--out", str(ctx.out)] + (["--quick"] if ctx.quick else []))
    report = {"table": "gpu", "status": status, "rows": rows}
    write_result(ctx, "gpu", report, to_markdown(report, ctx))
    return report


def to_markdown(report: dict, ctx: Context) -> str:
    status = report["status"]
    head = ["## GPU\n", f"Machine: {machine_line(report['machine'] if 'machine' in report else ctx.info)}\n\n"]
    if not report["rows"]:
        why = status.get("minikv_cuda_error", "")
        return "".join(head + [
            "**No GPU on this machine**: this table was not measured. "
            f"(nvidia-smi found: {status['nvidia_smi']}; minikv 'cuda' backend available: {status['minikv_cuda']}; "
            f"torch.cuda available: {status['torch_cuda']}.)" + (f" minikv says: {why}" if why else "") + "\n\n"
            "On a machine with an NVIDIA GPU and `pip install 'minikv[cuda]' 'minikv[bench]'`, "
            "`python -m benchmarks --only gpu` fills it in: decode tokens/s on mid for minikv cuda vs minikv numpy "
            "vs transformers on the GPU (dynamic and static cache).\n"] + _elsewhere(ctx))
    names = sorted({n for r in report["rows"] for n in r["engines"]})
    rows = []
    for r in report["rows"]:
        engines = r["engines"]
        speed = {n: engines[n]["decode_tokens_per_s"] for n in engines}
        peers = [speed[n] for n in engines if n.startswith("transformers")]
        # The headline of this table: minikv's GPU backend against transformers' best on the same GPU.
        ratio = (f"**{speed['minikv cuda'] / max(peers):.2f}x**" if "minikv cuda" in speed and peers else "n/a")
        differ = [n for n in engines if not engines[n]["tokens_vs_minikv_numpy"]["equal"]]
        rows.append([f"{r['prompt']} + {r['new_tokens']}"] + [fmt(speed.get(n)) for n in names]
                    + [ratio, "yes" if not differ else "differ: " + ", ".join(differ)])
    header = (["prompt + new"] + [f"{n} tok/s" for n in names]
              + ["minikv cuda / best transformers", "greedy tokens equal to minikv numpy (float32)"])
    return "".join(head + [f"GPU: {status.get('gpu_name')}\n\n", md_table(header, rows)])


def _elsewhere(ctx: Context) -> list[str]:
    """Pointers to GPU measurements taken on another machine and committed beside this table."""
    files = sorted(p.name for p in ctx.out.glob("gpu_*.md"))
    if not files:
        return []
    return ["\nGPU kernel measurements taken on another machine are in " + ", ".join(
        f"[{name}](benchmarks/results/{name})" for name in files) + ".\n"]
