"""What quantization costs in quality: perplexity and KL to float32 of the bundled model, per format.

    python -m benchmarks.quant_quality [--windows N] [--out DIR]

The text: the bundled model's own validation split, rebuilt exactly as scripts/train_tiny_model.py
built it (the Debian ``fortunes`` corpus under /usr/share/games/fortunes, entries shuffled with seed
1234, 5% held out). It is not in the repository; this script regenerates it (and says so if the
corpus is missing). The float32 row must reproduce the validation loss in
minikv/data/tiny-fortunes/TRAINING.md (1.4669 nats/byte): that checks the split.

Each window of 257 bytes is one forward of 256 inputs predicting the next 256 bytes (stride 256,
as in training). Per format we report the mean negative log-likelihood (nats/byte), perplexity
exp(NLL), its change against float32, and the mean KL(p_float32 || p_format) over every predicted
position (nats): the distribution shift the rounding causes, which perplexity can hide when errors
cancel. Formats: int8 and int4 weights (every projection and the lm_head; see minikv/quant.py),
the int8 KV cache (float32 weights; K/V rounded per token and head: the prefill attends over the
rounded K/V, exactly what decode reads), and int8 weights + int8 KV together. The KV figure is
measured through a static cache; the concat, paged and sliding int8 caches give the same logits
(tests/test_kv_int8.py), so it holds for every kind. Runs on the numpy reference (the numba kernels
equal it to float32 round-off: tests/test_quant.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

import minikv

from .common import RESULTS_DIR, machine_info, machine_line, md_table

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 256
FORMATS = [("float32", None, None), ("int8 weights", "int8", None), ("int4 weights", "int4", None),
           ("int8 KV cache", None, "int8"), ("int8 weights + int8 KV", "int8", "int8")]


def validation_bytes() -> np.ndarray:
    """The bundled model's held-out validation stream, rebuilt with the training script's own functions."""
    spec = importlib.util.spec_from_file_location("train_tiny_model", ROOT / "scripts" / "train_tiny_model.py")
    train = importlib.util.module_from_spec(spec)
    sys.modules["train_tiny_model"] = train          # its dataclasses look their module up by name
    spec.loader.exec_module(train)
    hp = train.Hyperparameters()
    entries, _ = train.load_fortunes(train.FORTUNES_DIR)
    _, validation = train.split_train_validation(entries, hp.validation_fraction, seed=1234)
    return train.entries_to_bytes(validation).astype(np.int64)


def log_probs(model, window: np.ndarray, cache_dtype) -> np.ndarray:
    """log softmax of the logits for inputs window[:-1]: (WINDOW, vocab) float64."""
    ids = window[None, :-1]
    if cache_dtype is None:
        logits = model.forward(ids)[0]
    else:
        cache = model.new_cache("static", batch_size=1, max_seq_len=WINDOW, dtype=cache_dtype)
        logits = model.forward(ids, cache=cache)[0]
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def run(windows: int | None) -> dict:
    data = validation_bytes()
    n_windows = (len(data) - 1) // WINDOW
    if windows is not None:
        n_windows = min(n_windows, windows)
    models = {name: minikv.load(quantize=q) for name, q, _ in FORMATS}
    totals = {name: {"nll": 0.0, "kl": 0.0, "seconds": 0.0} for name, _, _ in FORMATS}
    positions = 0
    for w in range(n_windows):
        window = data[w * WINDOW: w * WINDOW + WINDOW + 1]
        targets = window[1:]
        reference = None
        for name, _, cache_dtype in FORMATS:
            start = time.perf_counter()
            lp = log_probs(models[name], window, cache_dtype)
            totals[name]["seconds"] += time.perf_counter() - start
            totals[name]["nll"] -= lp[np.arange(WINDOW), targets].sum()
            if reference is None:
                reference = lp
            else:
                # KL(p_ref || p) = sum_v p_ref (log p_ref - log p), per position
                totals[name]["kl"] += (np.exp(reference) * (reference - lp)).sum()
        positions += WINDOW
    rows = {}
    base = totals["float32"]["nll"] / positions
    for name, q, cache_dtype in FORMATS:
        nll = totals[name]["nll"] / positions
        rows[name] = {"quantize": q, "cache_dtype": cache_dtype, "nll_nats_per_byte": nll,
                      "perplexity": float(np.exp(nll)), "perplexity_change_vs_float32": float(np.exp(nll - base) - 1),
                      "mean_kl_to_float32_nats": totals[name]["kl"] / positions,
                      "weight_bytes": _weight_bytes(models[name]), "seconds": totals[name]["seconds"]}
    return {"windows": n_windows, "predicted_bytes": positions, "validation_stream_bytes": int(len(data)),
            "formats": rows}


def _weight_bytes(model) -> int:
    """Bytes of the projection matrices a decode step reads (quantized or float), lm_head included."""
    total = 0
    for layer in model.layers:
        total += sum(w.nbytes for w in (layer.qkv, layer.o, layer.mlp_in, layer.mlp_down))
    return int(total + model.lm_head.nbytes)


def markdown(report: dict, info: dict) -> str:
    header = ["format", "NLL (nats/byte)", "perplexity", "vs float32", "mean KL to float32 (nats)",
              "projection bytes"]
    rows = []
    for name, r in report["formats"].items():
        rows.append([name, f"{r['nll_nats_per_byte']:.4f}", f"{r['perplexity']:.4f}",
                     "(reference)" if name == "float32" else f"{100 * r['perplexity_change_vs_float32']:+.2f}%",
                     "-" if name == "float32" else f"{r['mean_kl_to_float32_nats']:.5f}",
                     f"{r['weight_bytes'] / 2**20:.2f} MiB"])
    return (
        "## Quantization quality (bundled tiny-fortunes model, validation text)\n"
        f"Machine: {machine_line(info)}\n\n"
        f"{report['windows']} windows of {WINDOW} predicted bytes ({report['predicted_bytes']:,} bytes) of the "
        f"validation split ({report['validation_stream_bytes']:,} bytes, the size TRAINING.md reports), "
        "regenerated from the fortunes corpus by scripts/train_tiny_model.py's own split (seed 1234, 5% of "
        "entries). TRAINING.md's 1.4669 nats/byte is over all 486 windows"
        + (f" (this run's float32 row: {report['formats']['float32']['nll_nats_per_byte']:.4f}, so the split is "
           "the same)" if report["windows"] >= 486 else "; this run used the first "
           f"{report['windows']} only (time on a shared machine), so its float32 row differs from it")
        + ". Weights: every projection and the "
        "lm_head quantized (int8: group 64, int4: group 32, symmetric, float32 scales); embeddings and norms "
        "float32. KV int8: one float32 scale per token and head. numpy reference backend.\n\n"
        + md_table(header, rows)
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=None, help="evaluate only the first N windows")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if not Path("/usr/share/games/fortunes").is_dir():
        sys.exit("the fortunes corpus is missing: apt-get install -y fortunes fortunes-min")
    info = machine_info()
    report = run(args.windows)
    report["machine"] = info
    write(report, args.out)


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantization.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report, report["machine"])
    (out / "quantization.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
