#!/usr/bin/env python
"""Train minikv's bundled tiny model: a byte-level LLaMA on Debian's fortune cookies.

The model that ships in ``minikv/data/tiny-fortunes/`` is a genuine Hugging Face
``LlamaForCausalLM`` checkpoint (RMSNorm, RoPE, SwiGLU, grouped-query attention),
just very small, so that every lesson and test can run a *trained* model on a laptop
CPU with no download. Its vocabulary is the 256 byte values: token id == byte value,
so ``"The ".encode("utf-8")`` is already a list of token ids and no tokenizer file is
needed (minikv's ``ByteTokenizer`` does exactly this).

The corpus is the text of the Debian packages ``fortunes`` and ``fortunes-min``
(the classic BSD fortune(6) database), installed offline from the package archive:

    apt-get update && apt-get install -y fortunes fortunes-min

Only the plain-text files in /usr/share/games/fortunes are read (not the ``.dat``
indexes nor the ``.u8`` symlinks), and never the ``off/`` (offensive) folder.

Everything is seeded, runs on the CPU with a fixed number of threads, and stops when
a wall-clock budget (``--minutes``) runs out; it then evaluates, samples, and writes

    config.json, model.safetensors (float16), generation_config.json, TRAINING.md

Retrain the bundled model with (see TRAINING.md for the exact command used):

    python scripts/train_tiny_model.py --threads 1 --minutes 40

Loss is reported in nats per byte: the mean over predicted bytes of -ln p(byte).
(Divide by ln 2 = 0.693 for bits per byte; a uniform guess over 256 bytes is
ln 256 = 5.55 nats/byte.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FORTUNES_DIR = Path("/usr/share/games/fortunes")
CORPUS_PACKAGES = ("fortunes", "fortunes-min")
INSTALL_HINT = "apt-get update && apt-get install -y fortunes fortunes-min"
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "minikv" / "data" / "tiny-fortunes"

SAMPLE_PROMPTS = ("The ", "A man ", "Life is ")


# --------------------------------------------------------------------------- corpus


def resolve_overstrikes(line: str) -> str:
    """Render a line the way a teletype would: ``X<BS>Y`` prints Y over X.

    Several fortune files underline words the 1970s way, e.g. ``_\\bI`` or
    ``*____\\b\\b\\b\\bonly*``. We keep the letter that was struck over the underscore,
    so the model learns plain words rather than backspace soup.
    """
    cells: list[str] = []
    cursor = 0
    for ch in line:
        if ch == "\b":
            cursor = max(0, cursor - 1)
            continue
        if cursor < len(cells):
            # a letter beats the underscore it was struck over (and vice versa)
            if cells[cursor] == "_" or ch != "_":
                cells[cursor] = ch
        else:
            cells.append(ch)
        cursor += 1
    return "".join(cells)


def split_fortune_file(text: str) -> list[str]:
    """Split a fortune(6) source file into entries: entries are separated by lines of '%'."""
    entries: list[str] = []
    current: list[str] = []
    for raw_line in text.split("\n"):
        line = resolve_overstrikes(raw_line).rstrip()
        if line == "%":
            entries.append("\n".join(current).strip("\n"))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current).strip("\n"))
    return [entry for entry in entries if entry.strip()]


def package_versions(packages: tuple[str, ...]) -> dict[str, str]:
    versions = {}
    for package in packages:
        try:
            out = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", package],
                capture_output=True, text=True, check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            out = "unknown (dpkg-query failed)"
        versions[package] = out
    return versions


def load_fortunes(directory: Path = FORTUNES_DIR) -> tuple[list[str], list[str]]:
    """Return (entries, file names) from the plain-text fortune files, sorted by name."""
    if not directory.is_dir():
        sys.exit(
            f"error: fortune corpus not found: {directory} does not exist.\n"
            f"Install it (offline-capable Debian packages) with:\n    {INSTALL_HINT}"
        )
    files = sorted(
        path for path in directory.iterdir()
        if path.is_file() and not path.is_symlink() and path.suffix not in (".dat", ".u8")
    )
    if not files:
        sys.exit(
            f"error: no plain-text fortune files in {directory}.\n"
            f"Install the corpus with:\n    {INSTALL_HINT}"
        )
    entries: list[str] = []
    for path in files:
        text = path.read_bytes().decode("utf-8")  # all fortune files are UTF-8 (mostly ASCII)
        entries.extend(split_fortune_file(text))
    return entries, [path.name for path in files]


def split_train_validation(entries: list[str], validation_fraction: float, seed: int):
    """Shuffle whole entries (seeded) and hold out a fraction of them for validation.

    Holding out entries rather than a random byte range means no validation fortune
    was ever seen, even partly, during training.
    """
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    n_validation = max(1, round(validation_fraction * len(entries)))
    validation = [entries[i] for i in order[:n_validation]]
    train = [entries[i] for i in order[n_validation:]]
    return train, validation


def entries_to_bytes(entries: list[str]) -> np.ndarray:
    """Concatenate entries, each followed by a blank line, into one stream of byte ids."""
    text = "".join(entry + "\n\n" for entry in entries)
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


# --------------------------------------------------------------------------- model


@dataclass
class Hyperparameters:
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    intermediate_size: int = 608
    max_position_embeddings: int = 256   # = context: the model never sees a later position
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    context: int = 256
    batch_size: int = 16
    peak_lr: float = 3e-3
    min_lr_fraction: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    validation_fraction: float = 0.05
    autocast_bf16: bool = True


def build_config(hp: Hyperparameters):
    from transformers import LlamaConfig

    if hp.hidden_size % hp.num_attention_heads:
        raise SystemExit(f"hidden_size {hp.hidden_size} is not a multiple of heads {hp.num_attention_heads}")
    head_dim = hp.hidden_size // hp.num_attention_heads
    if head_dim % 2:
        raise SystemExit(f"head_dim {head_dim} must be even for RoPE rotation pairs")
    if hp.num_attention_heads % hp.num_key_value_heads:
        raise SystemExit("num_attention_heads must be a multiple of num_key_value_heads (GQA)")
    return LlamaConfig(
        vocab_size=256,
        hidden_size=hp.hidden_size,
        intermediate_size=hp.intermediate_size,
        num_hidden_layers=hp.num_hidden_layers,
        num_attention_heads=hp.num_attention_heads,
        num_key_value_heads=hp.num_key_value_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=hp.max_position_embeddings,
        rms_norm_eps=hp.rms_norm_eps,
        rope_theta=hp.rope_theta,
        tie_word_embeddings=hp.tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        # Byte vocabulary: no special tokens. Fortunes are multi-line, so '\n' would be
        # a poor end-of-sequence; generation simply runs for max_new_tokens.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def learning_rate(hp: Hyperparameters, step: int, progress: float) -> float:
    """Linear warmup over `warmup_steps`, then cosine from peak_lr down to min_lr_fraction*peak_lr.

    `progress` in [0, 1] is how far through the budget we are (time or steps, whichever
    is further), so the cosine reaches its floor exactly when training stops.
    """
    if step < hp.warmup_steps:
        return hp.peak_lr * (step + 1) / hp.warmup_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    floor = hp.min_lr_fraction
    return hp.peak_lr * (floor + (1.0 - floor) * cosine)


def evaluate(model, data: np.ndarray, context: int, batch_size: int, max_bytes: int | None, autocast: bool):
    """Mean cross-entropy in nats per predicted byte over non-overlapping windows of `data`."""
    import torch

    if max_bytes is not None:
        data = data[: max_bytes + 1]
    n_windows = (len(data) - 1) // context
    starts = np.arange(n_windows) * context
    total_nats = 0.0
    total_bytes = 0
    model.eval()
    with torch.no_grad():
        for first in range(0, n_windows, batch_size):
            batch_starts = starts[first : first + batch_size]
            x = torch.from_numpy(np.stack([data[s : s + context] for s in batch_starts]).astype(np.int64))
            y = torch.from_numpy(np.stack([data[s + 1 : s + context + 1] for s in batch_starts]).astype(np.int64))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
            )
            total_nats += loss.item()
            total_bytes += y.numel()
    model.train()
    return total_nats / total_bytes


def generate_samples(model, prompts, max_new_tokens: int, seed: int):
    """Greedy and sampled (temperature 0.8, top-k 40) continuations, in float32."""
    import torch

    samples = []
    model.eval()
    with torch.no_grad():
        for index, prompt in enumerate(prompts):
            ids = torch.tensor([list(prompt.encode("utf-8"))], dtype=torch.int64)
            greedy = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
            torch.manual_seed(seed + index)
            sampled = model.generate(
                ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=40
            )
            samples.append({
                "prompt": prompt,
                "greedy": bytes(greedy[0, ids.shape[1]:].tolist()).decode("utf-8", errors="replace"),
                "sampled": bytes(sampled[0, ids.shape[1]:].tolist()).decode("utf-8", errors="replace"),
            })
    return samples


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def add_classic_config_keys(config_path: Path) -> None:
    """Also write the pre-v5 spellings `rope_theta` and `torch_dtype` at the top level.

    transformers 5 nests rope_theta under `rope_parameters` and renames torch_dtype to
    `dtype`; older transformers and most third-party readers look for the classic keys.
    Writing both keeps the folder readable by either (transformers 5 accepts both).
    """
    config = json.loads(config_path.read_text())
    rope_parameters = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope_parameters:
        config["rope_theta"] = rope_parameters["rope_theta"]
    if "torch_dtype" not in config and "dtype" in config:
        config["torch_dtype"] = config["dtype"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- report


def fenced(text: str) -> str:
    return "```text\n" + text.replace("```", "'''") + "\n```"


def write_training_md(path: Path, record: dict) -> None:
    hp = record["hyperparameters"]
    lines = [
        f"# {path.parent.name}: how this model was trained",
        "",
        "A byte-level LLaMA-architecture model (`LlamaForCausalLM`: RMSNorm, RoPE, SwiGLU,",
        "grouped-query attention) trained from scratch on the Debian fortune-cookie database by",
        "`scripts/train_tiny_model.py`. It exists so that minikv's lessons and tests run a",
        "*trained* model offline; it is a toy, and its text is only roughly English.",
        "",
        "## Retrain",
        "",
        "```bash",
        f"{INSTALL_HINT}",
        record["command"],
        "```",
        "",
        "Seeded and single-process, but the learning-rate schedule and stopping point follow the",
        "wall-clock budget, so a rerun on another machine takes a different number of steps.",
        f"For a step-exact rerun add `--max-steps {record['steps']} --minutes 100000`",
        "(same torch version and thread count; bf16 autocast kernels may still differ across CPUs).",
        "",
        "## Vocabulary and special tokens",
        "",
        "256 token ids, **id = byte value** (`list(text.encode('utf-8'))`); there is no tokenizer",
        "file. There are **no special tokens**: `bos_token_id`, `eos_token_id` and `pad_token_id`",
        "are all `None` (null in config.json). No BOS is prepended in training or generation.",
        "Entries were separated by a blank line (`\\n\\n`) in training, so a blank line is the",
        "model's natural \"end of fortune\"; callers that want to stop there can stop on it.",
        "",
        "## Result",
        "",
        "| | |",
        "|---|---|",
        f"| validation loss | **{record['validation_loss']:.4f} nats/byte** ({record['validation_loss'] / math.log(2):.3f} bits/byte), over {record['validation_bytes']:,} predicted held-out bytes (every whole {hp['context']}-byte window) |",
        f"| train loss | {record['train_loss']:.4f} nats/byte (first {record['train_eval_bytes']:,} bytes of the training stream) |",
        f"| last-100-step mean training-batch loss | {record['recent_batch_loss']:.4f} nats/byte |",
        f"| parameters | {record['parameters']:,} |",
        f"| model.safetensors | {record['file_bytes']:,} bytes (float16) |",
        f"| steps | {record['steps']:,} |",
        f"| tokens (bytes) seen | {record['tokens_seen']:,} ({record['epochs']:.2f} epochs of the training split) |",
        f"| wall time | {record['train_seconds'] / 60:.1f} min training + {record['eval_seconds']:.0f} s evaluation |",
        f"| threads | {record['threads']} (`torch.set_num_threads`) |",
        f"| seed | {record['seed']} (`random`, `numpy`, `torch.manual_seed`) |",
        "",
        "Loss is the mean of -ln p(next byte) over predicted bytes (natural log). A uniform guess is",
        "ln 256 = 5.545 nats/byte.",
        "",
        "## Corpus",
        "",
        "Debian packages (BSD fortune(6) database; BSD licence, see",
        "`/usr/share/doc/fortunes/copyright`): "
        + ", ".join(f"`{name}` {version}" for name, version in record["packages"].items())
        + ".",
        "",
        f"Files read from `{FORTUNES_DIR}` (plain text only; `.dat` indexes, `.u8` symlinks and the",
        "offensive `off/` folder excluded): " + ", ".join(record["files"]) + ".",
        "",
        "Preparation: each file is split on its `%` lines into entries; backspace overstrikes",
        "(`_\\bX` underlining) are resolved to the struck letter; trailing spaces are stripped;",
        "entries are shuffled with the seed, "
        f"{hp['validation_fraction']:.0%} of them held out for validation, and each split is",
        "concatenated with a blank line after each entry.",
        "",
        "| | entries | bytes |",
        "|---|---|---|",
        f"| all | {record['entries']:,} | {record['corpus_bytes']:,} |",
        f"| train | {record['train_entries']:,} | {record['train_bytes']:,} |",
        f"| validation | {record['validation_entries']:,} | {record['validation_stream_bytes']:,} |",
        "",
        "## Hyper-parameters",
        "",
        "| name | value |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value} |" for name, value in hp.items()]
    lines += [
        "",
        "Derived: head_dim = hidden_size / num_attention_heads = "
        f"{hp['hidden_size'] // hp['num_attention_heads']}; vocab_size = 256.",
        "Optimiser: `torch.optim.AdamW` (weight decay on matrices only, not on norms);",
        "learning rate: linear warmup, then cosine from peak_lr to min_lr_fraction * peak_lr",
        "reached at the end of the budget. Batches are random windows of `context + 1` bytes",
        "from the training stream. Training ran under bf16 autocast on the CPU"
        if hp["autocast_bf16"] else
        "from the training stream. Training ran in float32 on the CPU",
        "(master weights float32); weights were converted to float16 only for saving, and",
        "the losses above were measured on the float16 weights run in float32.",
        "",
        "## Software",
        "",
        f"python {record['python']}, torch {record['torch']}, transformers {record['transformers']},",
        f"numpy {record['numpy']}, safetensors {record['safetensors']}; {record['cpu']}.",
        "",
        "## Samples (float16 weights run in float32; 200 new bytes each)",
        "",
        "Greedy = argmax each step; sampled = temperature 0.8, top-k 40, `torch.manual_seed("
        f"{record['seed']} + prompt index)` before each.",
        "",
    ]
    for sample in record["samples"]:
        lines += [
            f"### Prompt {sample['prompt']!r}",
            "",
            "Greedy:",
            "",
            fenced(sample["prompt"] + sample["greedy"]),
            "",
            "Sampled:",
            "",
            fenced(sample["prompt"] + sample["sampled"]),
            "",
        ]
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    defaults = Hyperparameters()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=40.0, help="training wall-clock budget (default 40)")
    parser.add_argument("--max-steps", type=int, default=None, help="also stop after this many steps")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--corpus-dir", type=Path, default=FORTUNES_DIR)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--train-eval-bytes", type=int, default=200_000,
                        help="bytes of the training stream used for the final train loss")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 instead of bf16 autocast")
    for field_name, value in asdict(defaults).items():
        if field_name in ("autocast_bf16",):
            continue
        parser.add_argument("--" + field_name.replace("_", "-"), type=type(value), default=value)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python scripts/train_tiny_model.py " + " ".join(sys.argv[1:] if argv is None else argv)

    import torch
    import transformers
    import safetensors
    from transformers import LlamaForCausalLM

    hp_fields = {name: getattr(args, name) for name in asdict(Hyperparameters()) if name != "autocast_bf16"}
    hp = Hyperparameters(**hp_fields, autocast_bf16=not args.no_bf16)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    entries, files = load_fortunes(args.corpus_dir)
    train_entries, validation_entries = split_train_validation(entries, hp.validation_fraction, args.seed)
    train_data = entries_to_bytes(train_entries)
    validation_data = entries_to_bytes(validation_entries)
    corpus_bytes = len(train_data) + len(validation_data)
    print(f"corpus: {len(entries)} entries, {corpus_bytes:,} bytes; train {len(train_data):,}, "
          f"validation {len(validation_data):,}", flush=True)

    config = build_config(hp)
    model = LlamaForCausalLM(config)
    model.float().train()
    n_parameters = sum(p.numel() for p in model.parameters())
    print(f"model: {n_parameters:,} parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp.peak_lr, betas=(hp.beta1, hp.beta2), eps=1e-8,
    )

    budget_seconds = args.minutes * 60.0
    step = 0
    tokens_seen = 0
    recent_losses: list[float] = []
    offsets = np.arange(hp.context + 1)
    start = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        progress = elapsed / budget_seconds
        if args.max_steps is not None:
            progress = max(progress, step / args.max_steps)
            if step >= args.max_steps:
                break
        if elapsed >= budget_seconds:
            break
        lr = learning_rate(hp, step, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr

        starts = rng.integers(0, len(train_data) - hp.context - 1, size=hp.batch_size)
        windows = torch.from_numpy(train_data[starts[:, None] + offsets].astype(np.int64))
        x, y = windows[:, :-1], windows[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=hp.autocast_bf16):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 256), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
        optimizer.step()

        step += 1
        tokens_seen += y.numel()
        recent_losses = (recent_losses + [loss.item()])[-100:]
        if step % args.log_every == 0 or step == 1:
            done = time.perf_counter() - start
            print(f"step {step:6d}  {done / 60:6.2f} min  lr {lr:.2e}  loss {loss.item():.4f}  "
                  f"avg100 {np.mean(recent_losses):.4f}  tok/s {tokens_seen / done:,.0f}",
                  flush=True)
    train_seconds = time.perf_counter() - start
    print(f"training stopped after {step} steps, {train_seconds / 60:.2f} min", flush=True)

    # Save in float16 (the shipped precision) and evaluate *those* weights in float32,
    # so the recorded losses describe the file on disk, not the training copy.
    args.output.mkdir(parents=True, exist_ok=True)
    model.half()
    model.generation_config.pad_token_id = None
    model.save_pretrained(args.output, safe_serialization=True)
    add_classic_config_keys(args.output / "config.json")
    (args.output / "model.safetensors").chmod(0o644)  # safetensors writes 0600; this is package data
    model.float()
    file_bytes = (args.output / "model.safetensors").stat().st_size

    eval_start = time.perf_counter()
    validation_loss = evaluate(model, validation_data, hp.context, 32, None, autocast=False)
    train_loss = evaluate(model, train_data, hp.context, 32, args.train_eval_bytes, autocast=False)
    samples = generate_samples(model, SAMPLE_PROMPTS, max_new_tokens=200, seed=args.seed)
    eval_seconds = time.perf_counter() - eval_start
    print(f"final: train {train_loss:.4f} nats/byte, validation {validation_loss:.4f} nats/byte", flush=True)
    for sample in samples:
        print(f"--- {sample['prompt']!r} greedy:\n{sample['prompt']}{sample['greedy']}\n"
              f"--- sampled:\n{sample['prompt']}{sample['sampled']}", flush=True)

    record = {
        "command": command,
        "hyperparameters": asdict(hp),
        "packages": package_versions(CORPUS_PACKAGES),
        "files": files,
        "entries": len(entries),
        "train_entries": len(train_entries),
        "validation_entries": len(validation_entries),
        "corpus_bytes": corpus_bytes,
        "train_bytes": len(train_data),
        "validation_stream_bytes": len(validation_data),
        "validation_bytes": ((len(validation_data) - 1) // hp.context) * hp.context,
        "train_eval_bytes": ((min(len(train_data), args.train_eval_bytes + 1) - 1) // hp.context) * hp.context,
        "validation_loss": validation_loss,
        "train_loss": train_loss,
        "recent_batch_loss": float(np.mean(recent_losses)) if recent_losses else float("nan"),
        "parameters": n_parameters,
        "file_bytes": file_bytes,
        "steps": step,
        "tokens_seen": tokens_seen,
        "epochs": tokens_seen / len(train_data),
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "threads": args.threads,
        "seed": args.seed,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "cpu": cpu_name(),
        "samples": samples,
    }
    write_training_md(args.output / "TRAINING.md", record)
    print(f"wrote {args.output} ({file_bytes:,} bytes of weights)", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
