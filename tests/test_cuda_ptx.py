"""Every CUDA kernel compiles to PTX for sm_90 (H100), with no float64 in the float32 kernels.

No GPU is needed: ``numba.cuda.compile_ptx`` only needs the CUDA toolkit's compiler libraries
(NVVM and NVRTC). The compilation runs in a subprocess because this test process may hold
``numba.cuda`` as the simulator (backend "cuda-sim" in tests/test_backends.py), and the choice
between simulator and real target is made once per process. The subprocess runs
``python scripts/ptx_check.py --json`` (see that module).

What is proven, per kernel (flash_attention, split_k_decode, merge_splits, rope, and the device
decode step's fused rope_write_kv, add_rms_norm, swiglu and advance_lengths), for head_dim 64
with (q, cache) in float32/float32, float32/float16 and float16/float16, and head_dim 128 with a
float16 cache:
  * it compiles for the target sm_90;
  * the float32 kernels contain no ``.f64`` register, parameter or instruction, while the float64
    kernels do (so the check can see one);
  * when ptxas is installed, the PTX assembles for sm_90.

Without NVVM/NVRTC the test is skipped on a developer machine, and fails in CI (CI=true), where
the test extra must provide them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba_cuda")

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ("flash_attention", "split_k_decode", "merge_splits", "rope", "rope_write_kv", "add_rms_norm", "swiglu",
           "advance_lengths", "gemv_partial", "gemv_reduce", "embed_rows", "argmax_rows")
INTEGER_ONLY = {"advance_lengths"}      # no floating point at all: nothing for the .f64 control to see


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    result = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "scripts" / "ptx_check.py"), "--json", "--cc", "9.0"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert not data.get("error"), data["error"]
    if data["toolkit_missing"]:
        message = ("numba.cuda.compile_ptx needs the CUDA toolkit's NVVM and NVRTC libraries: install "
                   "nvidia-cuda-nvrtc and nvidia-nvvm (pip), or a CUDA toolkit. " + data["toolkit_missing"])
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return data


def records(report, **match):
    return [r for r in report["results"] if all(r[key] == value for key, value in match.items())]


def test_every_kernel_compiles_for_sm90(report):
    failed = [f"{r['kernel']} d={r['head_dim']} {r['q_dtype']}/{r['cache_dtype']}: {r.get('error')}"
              for r in report["results"] if not r["ok"]]
    assert not failed, "\n".join(failed)
    for q_dtype, cache_dtype in (("float32", "float32"), ("float32", "float16"), ("float16", "float16")):
        compiled = {r["kernel"] for r in records(report, head_dim=64, compute="float32", q_dtype=q_dtype,
                                                 cache_dtype=cache_dtype)}
        assert compiled == set(KERNELS), (q_dtype, cache_dtype)
    assert {r["kernel"] for r in records(report, head_dim=128, cache_dtype="float16")} == set(KERNELS)
    assert all(r["target"] == "sm_90" for r in report["results"])


def test_float32_kernels_have_no_float64_instruction(report):
    float32_kernels = records(report, compute="float32")
    assert len(float32_kernels) == 4 * len(KERNELS)
    offenders = {f"{r['kernel']} d={r['head_dim']} {r['q_dtype']}/{r['cache_dtype']}": r["f64_examples"]
                 for r in float32_kernels if r["f64_lines"]}
    assert not offenders, offenders


def test_the_float64_detector_sees_float64_kernels(report):
    # The control: the same check on the float64 kernels must find .f64 everywhere.
    float64_kernels = records(report, compute="float64")
    assert {r["kernel"] for r in float64_kernels} == set(KERNELS)
    assert all(r["f64_lines"] > 0 for r in float64_kernels if r["kernel"] not in INTEGER_ONLY)


def test_ptx_assembles_with_ptxas(report):
    if not report["ptxas"]:
        pytest.skip("ptxas (CUDA toolkit) is not installed: PTX was generated but not assembled")
    assembled = [r for r in report["results"] if "ptxas" in r]
    assert len(assembled) == 4 * len(KERNELS)
    failed = {f"{r['kernel']} d={r['head_dim']}": r["ptxas"]["log"] for r in assembled if not r["ptxas"]["ok"]}
    assert not failed, failed
