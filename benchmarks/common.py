"""What every benchmark shares: the two random checkpoints, timing, machine facts, and writing tables.

Nothing here measures anything by itself; ``decode.py``, ``roofline.py``, ``caches.py`` and
``prefill.py`` do, and ``python -m benchmarks`` runs them all.

The checkpoints are generated on the fly (NumPy only, seeded) into a temporary folder in the
Hugging Face layout (``config.json`` + ``model.safetensors``), so minikv and transformers load the
very same file and nothing large is ever committed.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from minikv.checkpoint import expected_shapes, save_checkpoint
from minikv.config import ModelConfig

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# ------------------------------------------------------------------ the two models

# "small": the 4-layer, 128-dim shape of a C# KV-cache write-up (a byte-sized vocabulary). Its
# max_position_embeddings is 4096 so the prefill table can run 4096-token prompts.
SMALL = ModelConfig(
    model_type="llama", vocab_size=256, hidden_size=128, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=32,
    intermediate_size=352, max_position_embeddings=4096, norm_eps=1e-5, rope_theta=10000.0,
)
# "mid": a LLaMA-shaped model of about 55M parameters (8 layers, d 512, GQA 8 query / 2 kv heads, a
# 32000-token vocabulary with an untied lm_head, like LLaMA's): 221 MB of float32 weights, of which a
# decode step reads 156 MB (all but the embedding table), so it is bound by memory bandwidth rather
# than by Python overhead.
MID = ModelConfig(
    model_type="llama", vocab_size=32000, hidden_size=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64,
    intermediate_size=1408, max_position_embeddings=2048, norm_eps=1e-5, rope_theta=10000.0,
)
# "mha": the shape issue 17 measures karpathy/llama2.c's run.c on (by hand; its code is not vendored, see
# benchmarks/results/llama2c.md): 8 layers, d 512, 8 query and 8 kv heads (MHA: llama2.c's run.c is
# written for it), llama2.c's FFN rule for d 512 (int(2 * 4d / 3) rounded up to a multiple of 32 = 1376),
# vocab 32000, untied lm_head, 256 positions (llama2.c's seq_len): 232 MB of float32 weights, of which a
# decode step reads 167 MB.
MHA = ModelConfig(
    model_type="llama", vocab_size=32000, hidden_size=512, n_layers=8, n_heads=8, n_kv_heads=8, head_dim=64,
    intermediate_size=1376, max_position_embeddings=256, norm_eps=1e-5, rope_theta=10000.0,
)
MODELS = {"small": SMALL, "mid": MID, "mha": MHA}
INIT_STD = 0.02     # the usual init scale (GPT-2, LLaMA): logits of a random model stay O(1)


def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Every canonical minikv tensor: N(0, 0.02) matrices, norm gains of 1 (float32)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in sorted(expected_shapes(config).items()):
        if "norm" in name:
            weights[name] = np.ones(shape, dtype=np.float32)
        else:
            weights[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(INIT_STD))
    return weights


def make_checkpoint(name: str, folder: Path, seed: int = 0) -> Path:
    """Write model ``name`` (a key of MODELS) as a Hugging Face folder under ``folder``; return its path."""
    path = Path(folder) / name
    if not (path / "config.json").exists():
        config = MODELS[name]
        save_checkpoint(path, config, random_weights(config, seed))
    return path


def n_parameters(config: ModelConfig) -> int:
    return int(sum(int(np.prod(s)) for s in expected_shapes(config).values()))


def decode_weight_bytes(config: ModelConfig, itemsize: int = 4) -> int:
    """Bytes of weights one decode step must read (batch 1).

    Every projection of every layer, the norms, and the lm_head are read in full; of the token
    embedding only one row is read. (With tied embeddings the lm_head *is* the embedding.)"""
    shapes = expected_shapes(config)
    total = 0
    for name, shape in shapes.items():
        if name == "embed.weight":
            continue
        total += int(np.prod(shape))
    if config.tie_word_embeddings:
        total += config.vocab_size * config.hidden_size   # the lm_head reads the whole embedding
    total += config.hidden_size                            # one embedding row
    return total * itemsize


def kv_bytes_per_position(config: ModelConfig, itemsize: int = 4) -> int:
    """Bytes of K and V one position holds across all layers: 2 * layers * kv_heads * head_dim * itemsize."""
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * itemsize


def decode_step_bytes(config: ModelConfig, mean_positions: float, itemsize: int = 4) -> float:
    """Weights + the K/V a decode step reads at ``mean_positions`` cached positions."""
    return decode_weight_bytes(config, itemsize) + mean_positions * kv_bytes_per_position(config, itemsize)


def prompt_ids(config: ModelConfig, length: int, seed: int = 1) -> list[int]:
    """A fixed pseudo-random prompt (token 0 avoided: some tools treat it as padding)."""
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(1, config.vocab_size, size=length)]


# ------------------------------------------------------------------ timing


def ab_arguments(prog: str, rounds: int, argv=None):
    """The command line of a two-tree A/B benchmark (ab_decode, decode_attention_paged): --before TREE,
    --after TREE (default: this one), --rounds, --out; the trees resolved to absolute paths."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, default=Path("."))
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.before, args.after = args.before.resolve(), args.after.resolve()
    return args


def write_ab_table(out: Path, name: str, lines: list[str]) -> None:
    """An A/B benchmark's table: results/NAME.md (and where it went, on stdout)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / (name + '.md')}")


def median(values):
    return float(statistics.median(values))


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def first_difference(a, b) -> Optional[int]:
    """Index of the first position where two token lists differ (None if equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    if len(a) != len(b):
        return min(len(a), len(b))
    return None


# ------------------------------------------------------------------ machine facts


def _openblas_symbol(kind: str):
    """OpenBLAS's get/set_num_threads function from the library NumPy loaded (None if not found)."""
    try:
        with open("/proc/self/maps") as handle:
            libs = sorted({line.split()[-1] for line in handle if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for lib_path in libs:
        try:
            lib = ctypes.CDLL(lib_path)
        except OSError:
            continue
        for symbol in (f"scipy_openblas_{kind}_num_threads64_", f"openblas_{kind}_num_threads64_",
                       f"openblas_{kind}_num_threads", f"scipy_openblas_{kind}_num_threads"):
            if hasattr(lib, symbol):
                return getattr(lib, symbol)
    return None


class blas_threads:
    """``with blas_threads(1): ...`` runs NumPy's OpenBLAS on n threads inside the block (no-op if unknown)."""

    def __init__(self, n: int):
        self.n = n
        self.previous = None

    def __enter__(self):
        setter = _openblas_symbol("set")
        if setter is not None:
            self.previous = numpy_threads()
            setter(ctypes.c_int(self.n))
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            _openblas_symbol("set")(ctypes.c_int(self.previous))
        return False


def blas_line() -> str:
    """The BLAS library, version, kernel (architecture) and threads NumPy uses, from threadpoolctl:
    recorded beside every CPU figure."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "BLAS unknown (threadpoolctl not installed)"
    pools = [f"{i.get('internal_api')} {i.get('version')} kernel {i.get('architecture')}, {i.get('num_threads')} threads"
             for i in threadpool_info() if i.get("user_api") == "blas"]
    return "BLAS " + ("; ".join(pools) or "none found")


def numpy_threads() -> int:
    """Threads NumPy's BLAS uses (OpenBLAS asked through ctypes; else the environment; else the cores)."""
    getter = _openblas_symbol("get")
    if getter is not None:
        return int(getter())
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return usable_cores()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> Optional[str]:
    """The installed version, read from metadata (does not import the package: torch stays unloaded)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def load_average() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_caches() -> dict[str, int]:
    """Per-level CPU cache sizes in bytes, from sysfs (e.g. {"L1d": 49152, "L2": 2097152, "L3": ...})."""
    out = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")) if base.exists() else []:
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        multiplier = {"K": 1024, "M": 2**20, "G": 2**30}.get(size[-1], 1)
        value = int(size.rstrip("KMG")) * multiplier
        name = f"L{level}" + ({"Data": "d", "Instruction": "i"}.get(kind, ""))
        out[name] = value
    return out


def machine_info() -> dict:
    mem_total = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal"):
                    mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "numpy_threads": numpy_threads(),
        "memory_bytes": mem_total,
        "cpu_caches": cpu_caches(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "numba": package_version("numba"),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "load_average_at_start": load_average(),
    }


def machine_line(info: dict) -> str:
    mem = f", {info['memory_bytes'] / 2**30:.0f} GiB RAM" if info.get("memory_bytes") else ""
    l3 = (info.get("cpu_caches") or {}).get("L3")
    mem += f", L3 {l3 / 2**20:.0f} MiB" if l3 else ""
    versions = ", ".join(f"{k} {info[k]}" for k in ("numpy", "numba", "torch", "transformers") if info.get(k))
    return (f"{info['cpu']}, {info['cores']} cores{mem}; NumPy BLAS threads {info['numpy_threads']}; "
            f"Python {info['python']}; {versions}; {info['date_utc']}; load average at start "
            f"{info.get('load_average_at_start')}")


# ------------------------------------------------------------------ context and tables


@dataclass
class Context:
    """What ``python -m benchmarks`` hands every benchmark."""

    out: Path                       # where tables go
    work: Path                      # a temporary folder for checkpoints
    quick: bool = False             # a smoke run: tiny sizes, one or two repeats
    peer: bool = True               # run Hugging Face transformers (needs torch)
    info: dict = field(default_factory=machine_info)

    def checkpoint(self, name: str) -> Path:
        return make_checkpoint(name, self.work)

    @property
    def peer_available(self) -> bool:
        return self.peer and has_module("torch") and has_module("transformers")


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def fmt(x, digits: int = 1) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and not np.isfinite(x):
        return "n/a"
    return f"{x:,.{digits}f}"


def write_result(ctx: Context, name: str, report: dict, markdown: str) -> None:
    """``name``.json (the raw numbers + the machine) and ``name``.md (the table) under ctx.out."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    report = dict(report)
    report.setdefault("machine", ctx.info)
    report["machine"] = dict(report["machine"], load_average_at_end=load_average())
    report["quick"] = ctx.quick
    (ctx.out / f"{name}.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    (ctx.out / f"{name}.md").write_text(markdown)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def backend_available(name: str) -> bool:
    """Whether minikv backend ``name`` works here. Like ``name in minikv.available_backends()``, but a
    backend that is broken in another way than BackendUnavailableError (e.g. half-installed) counts as
    unavailable instead of stopping the benchmarks."""
    import minikv

    try:
        minikv.get_backend(name)
    except Exception:
        return False
    return True


def backend_error(name: str) -> Optional[str]:
    import minikv

    try:
        minikv.get_backend(name)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
