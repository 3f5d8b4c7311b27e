"""Run the benchmark suite and regenerate every table: ``python -m benchmarks``.

    python -m benchmarks                       # everything (tens of minutes on 2 cores)
    python -m benchmarks --quick               # a smoke run of a few seconds: tiny sizes, 1 repeat
    python -m benchmarks --only decode,caches  # a selection: decode roofline caches prefill attention gpu
    python -m benchmarks --out DIR             # write tables elsewhere (default benchmarks/results)
    python -m benchmarks --no-peer             # skip Hugging Face transformers (needs torch)

Every benchmark writes ``NAME.md`` and ``NAME.json`` (numbers + the machine they came from) under the
output folder; ``README_TABLES.md`` combines all tables found there, in a fixed order, for
benchmarks/README.md. See benchmarks/README.md for what each table measures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

from .common import RESULTS_DIR, Context, machine_info, machine_line

ORDER = ["decode", "roofline", "caches", "prefill", "attention", "gpu"]
TITLES = {"decode": "1. Decode tokens/s vs transformers", "roofline": "2. Roofline", "caches": "3. Cache kinds",
          "prefill": "4. Prefill", "attention": "Attention kernels", "gpu": "5. GPU"}
PLOTS = {"caches": "caches.png", "prefill": "prefill.png"}


def _run_attention(ctx: Context) -> None:
    """benchmarks/attention.py has its own command line; run it into the same folder."""
    attention = importlib.import_module("benchmarks.attention")
    argv = ["--out-dir", str(ctx.out)] + (["--quick"] if ctx.quick else [])
    attention.main(argv)


def run_selected(ctx: Context, names: list[str]) -> dict[str, float]:
    seconds = {}
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        if name == "attention":
            _run_attention(ctx)
        else:
            importlib.import_module(f"benchmarks.{name}").run(ctx)
        seconds[name] = time.perf_counter() - t0
        print(f"== {name} done in {seconds[name]:.1f} s", flush=True)
    return seconds


def _load(out: Path, name: str):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def headline(out: Path) -> str:
    """The targets, met or not, from whatever results are in ``out``."""
    lines = []
    decode = _load(out, "decode")
    if decode and decode.get("peer"):
        for row in decode["rows"]:
            ratio = row.get("ratio_numpy_vs_best_transformers")
            if ratio is not None:
                met = "reached" if ratio >= decode["target_ratio"] else "not reached"
                lines.append(f"- decode, {row['model']}, prompt {row['prompt']} + {row['new_tokens']}: minikv numpy "
                             f"**{ratio:.2f}x** the best transformers variant (goal {decode['target_ratio']:.1f}x: "
                             f"{met})")
    roofline = _load(out, "roofline")
    if roofline:
        for row in roofline["rows"]:
            if row["backend"] == "numpy":
                met = "reached" if row["fraction_of_all_core"] >= roofline["target_fraction"] else "not reached"
                if row["model"] != "mid":
                    met = "the goal applies to mid"
                lines.append(f"- roofline, {row['model']}, prompt {row['prompt']} + {row['new_tokens']}: "
                             f"{row['achieved_GBps']:.1f} GB/s = **{100 * row['fraction_of_all_core']:.0f}%** of the "
                             f"all-core {roofline['all_core_GBps']:.1f} GB/s (goal "
                             f"{100 * roofline['target_fraction']:.0f}%: {met})")
    caches = _load(out, "caches")
    if caches:
        for row in caches["rows"]:
            if row["new_tokens"] == 50:
                s = row["kinds"]["static"]["speedup_over_none"]
                lines.append(f"- static cache vs recompute at 50 new tokens (small, prompt 19): **{s:.2f}x** "
                             "(a C# write-up reported 13.2x for the same shape)")
    return "\n".join(lines)


def _demote_headings(text: str, top: int) -> str:
    """Shift every markdown heading so the file's highest heading becomes level ``top``."""
    lines = text.split("\n")
    in_code = False
    levels = []
    for line in lines:
        in_code ^= line.startswith("```")
        if not in_code and line.startswith("#"):
            levels.append(len(line) - len(line.lstrip("#")))
    if not levels:
        return text
    shift = top - min(levels)
    out, in_code = [], False
    for line in lines:
        in_code ^= line.startswith("```")
        if not in_code and line.startswith("#") and shift > 0:
            line = "#" * shift + line
        out.append(line)
    return "\n".join(out)


def combine(out: Path) -> Path:
    """README_TABLES.md: every table found in ``out``, in ORDER, with the plots."""
    parts = ["## Benchmark results\n\n"]
    info = None
    for name in ORDER:
        data = _load(out, name)
        if data and "machine" in data:
            info = data["machine"]
            break
    if info:
        parts.append(f"Machine: {machine_line(info)}\n\n")
    summary = headline(out)
    if summary:
        parts.append("Headline:\n\n" + summary + "\n\n")
    for name in ORDER:
        md = out / f"{name}.md"
        if not md.exists():
            continue
        text = _demote_headings(md.read_text(), top=3)
        data = _load(out, name) or {}
        when = data.get("machine", {})
        if when.get("date_utc"):
            # The machine is named once at the top; per table, only when it ran and how busy the machine was.
            stamp = f"_Measured {when['date_utc']}; load average at start {when.get('load_average_at_start')}._"
            text = "\n".join(stamp if line.startswith("Machine: ") else line for line in text.split("\n"))
        parts.append(text.rstrip() + "\n\n")
        if name in PLOTS and (out / PLOTS[name]).exists():
            # Relative to benchmarks/README.md, where update_readme copies the tables.
            rel = f"results/{PLOTS[name]}" if out.resolve() == RESULTS_DIR.resolve() else PLOTS[name]
            parts.append(f"![{name}]({rel})\n\n")
    target = out / "README_TABLES.md"
    target.write_text("".join(parts))
    return target


README = Path(__file__).resolve().parent / "README.md"   # benchmarks/README.md: the full tables
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def update_readme(tables: Path, readme: Path = README) -> bool:
    """Copy README_TABLES.md (less its title) between the README's bench markers."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    body = tables.read_text().split("\n", 1)[1].strip()
    start = text.index(README_START) + len(README_START)
    readme.write_text(text[:start] + "\n" + body + "\n" + text[text.index(README_END):])
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="minikv benchmark suite")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one repeat (seconds)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(ORDER)}")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder (default benchmarks/results)")
    parser.add_argument("--no-peer", action="store_true", help="do not run Hugging Face transformers")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the generated checkpoints (default: a temporary folder, deleted after)")
    args = parser.parse_args(argv)

    names = ORDER if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {ORDER}")
    if args.quick and args.only is None:
        names = [n for n in names if n != "attention"] + ["attention"]   # theirs last: the slowest in quick mode
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="minikv-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ctx = Context(out=args.out, work=work, quick=args.quick, peer=not args.no_peer, info=machine_info())
        print(f"machine: {machine_line(ctx.info)}", flush=True)
        if not ctx.peer_available:
            print("transformers peer: not run" + (" (--no-peer)" if args.no_peer else " (torch/transformers not installed)"))
        seconds = run_selected(ctx, names)
    target = combine(args.out)
    # Only a full run into the committed results folder may rewrite the README's tables.
    if not args.quick and args.only is None and args.out.resolve() == RESULTS_DIR.resolve() and update_readme(target):
        print(f"updated the benchmark tables in {README}")
    print(f"\nwrote {target}; times: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    summary = headline(args.out)
    if summary:
        print(summary)
    failed = [name for name in ("decode", "caches")
              if name in names and (_load(args.out, name) or {}).get("all_float64_checks_equal") is False]
    if failed:
        print(f"TOKEN EQUALITY CHECK FAILED in: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
