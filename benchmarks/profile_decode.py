"""Where a decode step's time goes: cProfile of minikv's generation loop + a matmul-only lower bound.

    python -m benchmarks.profile_decode                 # mid, prompt 19 + 200 and 512 + 256
    python -m benchmarks.profile_decode --model small

Writes benchmarks/results/profile_decode.txt (or --out DIR). Not part of ``python -m benchmarks``:
it is a diagnosis tool for the performance work, not a table.

Three numbers per workload:

* the measured decode step (ms/step, median over the steps of a generate call, no profiler);
* the *matmul floor*: the same step's matrix products alone (x @ W for every weight matrix, with
  the model's own arrays, in a tight loop), i.e. what the step would cost with zero overhead;
* the *bandwidth floor*: bytes the step must read / the all-core read bandwidth (roofline.py).

The gap between the step and the matmul floor is Python and small-array overhead (norms, RoPE,
attention, cache writes, reshapes, sampling); the gap between the matmul floor and the bandwidth
floor is how well BLAS streams the weights.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

import numpy as np

import minikv

from .common import (MODELS, RESULTS_DIR, Context, decode_step_bytes, machine_info, machine_line, make_checkpoint,
                     median, prompt_ids)
from .peer import minikv_generate
from .roofline import measure_bandwidth


def matmul_floor_ms(model, repeats: int = 30) -> float:
    """One decode step's matrix products alone: a (1, d) vector through every weight matrix."""
    cfg = model.config
    mats = []
    for layer in model.layers:
        mats += [layer.qkv, layer.o, layer.mlp_in, layer.mlp_down]
    mats.append(model.lm_head)
    inputs = [np.ones((1, m.shape[0]), dtype=model.dtype) for m in mats]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x, w in zip(inputs, mats):
            x @ w
        times.append(time.perf_counter() - t0)
    del cfg
    return median(times) * 1e3


class LeanDecoder:
    """A deliberately minimal NumPy decode step for batch 1 (llama family only), to measure what pure
    NumPy can reach on this machine. Not part of minikv: a yardstick for the performance work.

    What it does differently from ``Transformer.forward`` (each a suggestion):
    * 1-D vectors throughout (x @ W with x of shape (d,) is a BLAS gemv, no batch/seq axes);
    * RMSNorm gains folded into the next projection at load: (x * g) @ W = x @ (g[:, None] * W);
    * RoPE on q and k together (they are adjacent in the fused qkv output), one gather of cos/sin;
    * attention for one query with no mask and no split: every cached key is visible at batch 1;
    * in-place residual adds, a preallocated static cache, no validation in the loop.
    """

    def __init__(self, model, max_len: int):
        cfg = model.config
        if cfg.family != "llama" or cfg.rope_convention != "half" or cfg.sliding_window is not None:
            raise ValueError("LeanDecoder covers llama-family models with half RoPE and no window only")
        self.cfg, dt = cfg, model.dtype
        self.embed = model.embed
        self.layers = []
        for layer in model.layers:
            self.layers.append((
                np.ascontiguousarray(layer.attn_norm[:, None] * layer.qkv),
                layer.o,
                np.ascontiguousarray(layer.mlp_norm[:, None] * layer.mlp_in),
                layer.mlp_down,
            ))
        self.lm_head = np.ascontiguousarray(model.final_norm[:, None] * model.lm_head)
        self.cos, self.sin = model.rope_cos, model.rope_sin
        shape = (cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [np.zeros(shape, dt) for _ in model.layers]
        self.v = [np.zeros(shape, dt) for _ in model.layers]
        self.eps = dt.type(cfg.norm_eps)
        self.inv_d = dt.type(1.0 / cfg.hidden_size)
        self.scale = dt.type(1.0 / np.sqrt(cfg.head_dim))
        self.length = 0

    def _rms(self, x):
        return x * (1.0 / np.sqrt(np.dot(x, x) * self.inv_d + self.eps))

    def step(self, token: int) -> np.ndarray:
        cfg, t = self.cfg, self.length
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        half = hd // 2
        cos, sin = self.cos[t], self.sin[t]
        x = self.embed[token].copy()
        for i, (w_qkv, w_o, w_in, w_down) in enumerate(self.layers):
            qkv = self._rms(x) @ w_qkv
            qk = qkv[: (H + KV) * hd].reshape(H + KV, hd)       # q heads then k heads: rotate together
            x1, x2 = qk[:, :half], qk[:, half:]
            rotated = np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=1)
            q = rotated[:H].reshape(KV, H // KV, hd)
            self.k[i][:, t] = rotated[H:]
            self.v[i][:, t] = qkv[(H + KV) * hd:].reshape(KV, hd)
            keys, values = self.k[i][:, : t + 1], self.v[i][:, : t + 1]
            scores = np.matmul(q, keys.transpose(0, 2, 1)) * self.scale          # (KV, group, t+1)
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            attn = np.matmul(probs, values).reshape(H * hd)
            x += attn @ w_o
            hidden = self._rms(x) @ w_in
            gate, up = hidden[: cfg.intermediate_size], hidden[cfg.intermediate_size:]
            x += (gate / (1.0 + np.exp(-gate)) * up) @ w_down
        self.length += 1
        return self._rms(x) @ self.lm_head


def lean_step_ms(model, prompt, n_new) -> tuple[float, float]:
    """(ms per decode step of LeanDecoder after a prompt, max |logits - minikv's| over the steps)."""
    lean = LeanDecoder(model, len(prompt) + n_new)
    cache = model.new_cache("static", batch_size=1, max_seq_len=len(prompt) + n_new)
    for token in prompt[:-1]:                      # fill the lean cache token by token (not timed)
        lean.step(token)
    model.forward(np.asarray([prompt[:-1]]), cache)
    token, worst, times = prompt[-1], 0.0, []
    for _ in range(n_new):
        t0 = time.perf_counter()
        logits = lean.step(token)
        times.append(time.perf_counter() - t0)
        reference = model.forward(np.asarray([[token]]), cache, last_only=True)[0]
        worst = max(worst, float(np.max(np.abs(logits - reference))))
        token = int(np.argmax(reference))
    return median(times) * 1e3, worst


def step_times_ms(model, prompt, n_new) -> float:
    result = minikv_generate(model, prompt, n_new)
    return result["decode_step_ms"]


def minikv_calls_per_step(model, prompt) -> tuple[int, str]:
    """Calls into minikv's own functions (its package and backends/) in one warm decode step of
    generation (forward through a static cache + greedy sampling), counted by cProfile; with the
    per-function breakdown. The target of the cache-seam work: at most 150 on the bundled model."""
    import os
    from minikv.sampling import SamplingParams, sample

    cache = model.new_cache("static", batch_size=1, max_seq_len=len(prompt) + 8)
    logits = model.forward(np.asarray([prompt]), cache, last_only=True)
    params = SamplingParams(temperature=0.0)
    for _ in range(3):                                              # warm-up (first-call caches)
        logits = model.forward(sample(logits, params, None)[:, None], cache, last_only=True)
    profiler = cProfile.Profile()
    profiler.enable()
    logits = model.forward(sample(logits, params, None)[:, None], cache, last_only=True)
    profiler.disable()
    package = Path(minikv.__file__).resolve().parent
    roots = (str(package), str((package.parent / "backends").resolve()),
             str(Path(minikv.backend.__file__).resolve().parent.parent / "backends"))
    rows, total = [], 0
    for (filename, _, function), (_, calls, *_rest) in pstats.Stats(profiler).stats.items():
        if os.path.realpath(filename).startswith(roots):
            total += calls
            rows.append(f"{calls:5d} {Path(filename).name}:{function}")
    return total, "\n".join(sorted(rows, reverse=True))


def profile_text(model, prompt, n_new, top: int = 30) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    minikv_generate(model, prompt, n_new)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    out.write("\n")
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_decode")
    parser.add_argument("--model", default="mid", choices=sorted(MODELS))
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    config = MODELS[args.model]
    info = machine_info()
    lines = [f"# decode profile: {args.model}, backend {args.backend}", f"machine: {machine_line(info)}", ""]
    with tempfile.TemporaryDirectory(prefix="minikv-profile-") as tmp:
        ctx = Context(out=args.out, work=Path(tmp), quick=False, peer=False, info=info)
        path = make_checkpoint(args.model, Path(tmp))
        model = minikv.load(path, backend=args.backend)
        minikv_generate(model, prompt_ids(config, 8), 4)
        bandwidth = measure_bandwidth(ctx)
        all_core = max(v["best_GBps"] for k, v in bandwidth.items() if "1 thread" not in k and "best_GBps" in v)
        floor = matmul_floor_ms(model)
        lines.append(f"all-core read bandwidth {all_core:.1f} GB/s; matmul floor (all projections + lm_head, "
                     f"batch 1) {floor:.2f} ms/step")
        calls, breakdown = minikv_calls_per_step(model, prompt_ids(config, 19))
        bundled_calls, _ = minikv_calls_per_step(minikv.load(backend=args.backend), list(b"The meaning of"))
        lines += ["", f"calls into minikv's own functions per warm decode step (forward + greedy sample, static "
                      f"cache): {calls} on {args.model}, {bundled_calls} on the bundled model", "", breakdown]
        for prompt_len, n_new in [(19, 200), (512, 256)]:
            prompt = prompt_ids(config, prompt_len)
            steps = [step_times_ms(model, prompt, n_new) for _ in range(3)]
            step = median(steps)
            bw_floor = decode_step_bytes(config, prompt_len + n_new / 2) / (all_core * 1e9) * 1e3
            lines += ["", f"## prompt {prompt_len} + {n_new} new tokens",
                      f"measured decode step {step:.2f} ms (runs: {', '.join(f'{s:.2f}' for s in steps)}); "
                      f"matmul floor {floor:.2f} ms ({100 * floor / step:.0f}% of the step); bandwidth floor "
                      f"{bw_floor:.2f} ms ({100 * bw_floor / step:.0f}% of the step)"]
            if model.config.family == "llama" and args.backend == "numpy":
                lean_ms, worst = lean_step_ms(model, prompt, min(n_new, 64))
                lines.append(f"lean NumPy decode step (LeanDecoder, same weights): {lean_ms:.2f} ms "
                             f"({step / lean_ms:.2f}x faster than minikv's step; max |logit diff| {worst:.1e})")
            lines += ["", profile_text(model, prompt, n_new)]
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"profile_decode_{args.model}.txt"
    target.write_text("\n".join(lines))
    print("\n".join(lines[:8]))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
