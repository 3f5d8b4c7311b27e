"""Compile every CUDA kernel to PTX ahead of time, without a GPU, and inspect it.

    python scripts/ptx_check.py            # a table
    python scripts/ptx_check.py --json     # what tests/test_cuda_ptx.py reads

For each kernel, head_dim and dtype combination the backends launch, ``numba.cuda.compile_ptx``
translates the kernel to PTX for a target compute capability (default sm_90, H100) and we check:

* it compiles (types, shared memory sizes, every operation supported on the device);
* a float32 kernel (float32 or float16 inputs) contains no ``.f64`` at all: one stray Python float
  literal makes Numba compute in float64, 2x slower on an H100 and 64x on consumer GPUs;
* when ``ptxas`` (the CUDA toolkit's assembler) is on this machine, the PTX assembles for the
  target, and we report registers and spills per thread.

It needs NVVM and NVRTC, the CUDA toolkit's compiler libraries (not a GPU, not a driver): a system
CUDA toolkit, or the wheels ``nvidia-cuda-nvrtc`` and ``nvidia-nvvm`` (CUDA 13; ``-cu12`` names
for CUDA 12). It must run in a process whose ``numba.cuda`` is the real target, not the simulator.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

# (q dtype, cache dtype) pairs per compute dtype: float32 compute serves float32 and float16 inputs.
FLOAT32_INPUTS = (("float32", "float32"), ("float32", "float16"), ("float16", "float16"))
FLOAT64_INPUTS = (("float64", "float64"),)


def _ptxas():
    found = shutil.which("ptxas")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "ptxas")):
            return os.path.join(home, "bin", "ptxas")
    return None


def _assemble(ptxas: str, ptx: str, cc) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        result = subprocess.run([ptxas, f"-arch=sm_{cc[0]}{cc[1]}", "-v", source, "-o", os.devnull],
                                capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {"ok": result.returncode == 0, "registers": int(registers.group(1)) if registers else None,
            "spill_bytes": int(spills.group(1)) if spills else None, "log": log[-2000:] if result.returncode else ""}


def f64_lines(ptx: str) -> list[str]:
    """PTX lines that mention a float64 register, parameter or instruction (comments excluded)."""
    return [line.strip() for line in ptx.splitlines() if ".f64" in line and not line.lstrip().startswith("//")]


def run(cc=(9, 0), head_dims=(64, 128), assemble=True) -> dict:
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return {"error": "NUMBA_ENABLE_CUDASIM is set: PTX needs the real CUDA target; unset it"}
    from minikv.backends.cuda import numba_cuda_mode
    from minikv.backends.cuda import kernels
    from numba import cuda

    if numba_cuda_mode() != "gpu":
        return {"error": "numba.cuda is the simulator in this process; run in a fresh process"}
    ptxas = _ptxas() if assemble else None
    report = {"cc": list(cc), "ptxas": ptxas, "results": [], "toolkit_missing": None}
    plans = []
    for head_dim in head_dims:
        # Every input combination at the first head_dim; the float16 cache (the common case) at the others.
        inputs = FLOAT32_INPUTS if head_dim == head_dims[0] else FLOAT32_INPUTS[1:2]
        plans.append((kernels.gpu_config(head_dim, "float32"), inputs))
    plans.append((kernels.gpu_config(head_dims[0], "float64"), FLOAT64_INPUTS))   # the detector's control
    for config, inputs in plans:
        functions = kernels.kernel_functions(config)
        for q_dtype, cache_dtype in inputs:
            signatures = kernels.example_signatures(config, q_dtype, cache_dtype)
            for name in kernels.KERNEL_NAMES:
                record = {"kernel": name, "head_dim": config.head_dim, "compute": config.compute,
                          "q_dtype": q_dtype, "cache_dtype": cache_dtype, "ok": False}
                started = time.perf_counter()
                try:
                    ptx, _ = cuda.compile_ptx(functions[name], signatures[name], cc=cc)
                except Exception as exc:   # report every failure; a missing toolkit stops the run
                    text = f"{type(exc).__name__}: {exc}"
                    record["error"] = text[-3000:]
                    if re.search(r"nvrtc|nvvm|libdevice|NVVM|NVRTC", text) and not report["results"]:
                        report["toolkit_missing"] = text[-1000:]
                        return report
                    report["results"].append(record)
                    continue
                record.update(ok=True, seconds=round(time.perf_counter() - started, 2), ptx_chars=len(ptx),
                              target=f"sm_{cc[0]}{cc[1]}" if f".target sm_{cc[0]}{cc[1]}" in ptx else None,
                              f64_lines=len(f64_lines(ptx)), f64_examples=f64_lines(ptx)[:3])
                if ptxas and config.compute == "float32":
                    record["ptxas"] = _assemble(ptxas, ptx, cc)
                report["results"].append(record)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", default="9.0", help="compute capability, e.g. 9.0 (H100) or 8.0 (A100)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-ptxas", action="store_true", help="do not assemble the PTX with ptxas")
    args = parser.parse_args(argv)
    cc = tuple(int(part) for part in args.cc.split("."))
    report = run(cc=cc, assemble=not args.no_ptxas)
    if args.json:
        print(json.dumps(report))
        return 0
    if report.get("error") or report.get("toolkit_missing"):
        print(report.get("error") or f"CUDA toolkit libraries missing: {report['toolkit_missing']}")
        return 1
    print(f"PTX for sm_{cc[0]}{cc[1]}; ptxas: {report['ptxas'] or 'not found'}")
    failed = 0
    for r in report["results"]:
        extra = ""
        if "ptxas" in r:
            extra = f"  ptxas {'ok' if r['ptxas']['ok'] else 'FAILED'}, {r['ptxas']['registers']} registers, " \
                    f"{r['ptxas']['spill_bytes']} B spilled"
        status = "ok" if r["ok"] else "FAILED: " + r.get("error", "")
        print(f"{r['kernel']:16s} d={r['head_dim']:<4d} {r['compute']} q={r['q_dtype']:8s} cache={r['cache_dtype']:8s}"
              f" {status}  .f64 lines: {r.get('f64_lines')}{extra}")
        failed += not r["ok"] or (r["compute"] == "float32" and r.get("f64_lines"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
