"""Decode speed of two source trees in the same run: did a change make the decode step slower?

    python -m benchmarks.ab_decode --before /path/to/old/checkout [--after .] [--rounds 5]

Each round runs one subprocess per tree (PYTHONPATH set to that tree, one BLAS thread), which
builds the benchmark model ("small" and "mid" of benchmarks/common.py, same seed), prefills a
19-token prompt and times 128 greedy decode steps through a static cache; rounds alternate the
trees so that a machine that slows down mid-run slows both. Reported: the median ms/step of each
tree and their ratio. Writes benchmarks/results/ab_decode.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from .common import ab_arguments, machine_info, machine_line, write_ab_table

CHILD = r"""
import json, sys, tempfile, time
from pathlib import Path
import numpy as np
import minikv
from benchmarks.common import MODELS, make_checkpoint, prompt_ids
name = sys.argv[1]
with tempfile.TemporaryDirectory() as tmp:
    model = minikv.load(make_checkpoint(name, Path(tmp)))
prompt = prompt_ids(MODELS[name], 19)
cache = model.new_cache("static", batch_size=1, max_seq_len=19 + 160)
logits = model.forward(np.asarray([prompt]), cache, last_only=True)
token = np.array([[int(logits.argmax())]])
for _ in range(16):                                   # warm-up
    token = np.array([[int(model.forward(token, cache, last_only=True).argmax())]])
times = []
for _ in range(128):
    t0 = time.perf_counter()
    logits = model.forward(token, cache, last_only=True)
    times.append(time.perf_counter() - t0)
    token = np.array([[int(logits.argmax())]])
print(json.dumps({"ms": 1e3 * sorted(times)[len(times) // 2], "minikv": minikv.__file__}))
"""


def run_tree(tree: Path, name: str, benchmarks_root: Path) -> float:
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{benchmarks_root}", OPENBLAS_NUM_THREADS="1",
               OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, name], env=env, capture_output=True, text=True, check=True,
                         cwd=tree)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["minikv"].startswith(str(tree)), (result, tree)   # the tree we meant, not an installed copy
    return result["ms"]


def main(argv=None) -> int:
    args = ab_arguments("python -m benchmarks.ab_decode", 5, argv)
    before, after = args.before, args.after
    root = Path(__file__).resolve().parent.parent
    lines = ["# Decode step, before vs after (same run, alternating rounds)", "",
             f"machine: {machine_line(machine_info())}", f"before: {before}", f"after: {after}", "",
             "| model | before ms/step | after ms/step | after / before (speed) | rounds |", "|---|---|---|---|---|"]
    for name in ("small", "mid"):
        b, a = [], []
        for _ in range(args.rounds):
            b.append(run_tree(before, name, root))
            a.append(run_tree(after, name, root))
        mb, ma = statistics.median(b), statistics.median(a)
        lines.append(f"| {name} | {mb:.3f} | {ma:.3f} | {mb / ma:.2f}x | {args.rounds} |")
        print(lines[-1], flush=True)
    write_ab_table(args.out, "ab_decode", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
