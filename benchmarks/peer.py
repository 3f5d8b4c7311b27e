"""The peer: Hugging Face transformers' ``generate`` on CPU PyTorch, timed exactly like minikv.

Imported only when the peer runs (torch and transformers are the benchmark-only extra
``minikv[bench]``; the tests never import them).

Both engines are timed the same way, from outside, per token:

    t_start                 the call begins
    t_first                 the first new token is known (prefill + one sampling)
    t_last                  the last new token is known

    decode tokens/s   = (N - 1) / (t_last - t_first)     # N - 1 single-token decode steps
    end-to-end tok/s  = N / (t_last - t_start)

minikv yields a token per ``Stream`` step; transformers calls a streamer's ``put`` once with the
prompt and then once per new token, which is where the timestamps come from.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def setup_torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass    # can only be set once per process, before any parallel work
    return torch


def load_hf(path: Path, dtype: str = "float32", device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    model.eval()
    return model.to(device)


class _TimingStreamer:
    """Records when each new token arrives (the first put() is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_generate(model, prompt: list[int], n_new: int, cache: str = "dynamic") -> dict:
    """Greedy generate ``n_new`` tokens (no eos, exactly n_new): tokens and per-token timestamps."""
    import torch

    ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
    kwargs = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, num_beams=1,
                  attention_mask=torch.ones_like(ids), pad_token_id=0, eos_token_id=None,
                  temperature=None, top_p=None, top_k=None)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    streamer = _TimingStreamer()
    with torch.inference_mode():
        t_start = time.perf_counter()
        out = model.generate(ids, streamer=streamer, **kwargs)
        t_end = time.perf_counter()
    tokens = out[0, len(prompt):].tolist()
    return _timing(tokens, t_start, streamer.times, t_end)


def minikv_generate(model, prompt: list[int], n_new: int, cache: str = "static", **options) -> dict:
    """The same measurement for minikv (greedy, no stop tokens)."""
    times = []
    tokens = []
    t_start = time.perf_counter()
    stream = model.stream(prompt, max_new_tokens=n_new, cache=cache, temperature=0.0, stop_tokens=[], **options)
    for event in stream:
        times.append(time.perf_counter())
        tokens.append(event.token)
    t_end = time.perf_counter()
    result = _timing(tokens, t_start, times, t_end)
    result["stats"] = stream.output.stats
    result["cache"] = stream.cache
    return result


def _timing(tokens, t_start, times, t_end) -> dict:
    n = len(tokens)
    t_first = times[0] if times else t_end
    t_last = times[-1] if times else t_end
    decode_s = t_last - t_first
    return {
        "tokens": [int(t) for t in tokens],
        "total_s": t_end - t_start,
        "first_token_s": t_first - t_start,
        "decode_s": decode_s,
        "decode_tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else float("nan"),
        "e2e_tokens_per_s": n / (t_end - t_start),
        "decode_step_ms": decode_s / (n - 1) * 1e3 if n > 1 else float("nan"),
        # The typical step, robust to a few steps stalled by other work on a shared machine.
        "median_step_ms": float(np.median(np.diff(times))) * 1e3 if n > 2 else float("nan"),
    }


def tokens_summary(reference: list[int], other: list[int]) -> dict:
    from .common import first_difference

    diff = first_difference(reference, other)
    return {"equal": diff is None, "first_difference": diff,
            "matching_prefix": len(reference) if diff is None else diff}


def as_array(x) -> np.ndarray:
    return np.asarray(x)
