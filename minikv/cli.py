"""The ``minikv`` command: generate, bench, info (also ``python -m minikv``).

    minikv generate "Once upon a time" --max-new-tokens 80 --cache static
    minikv bench                      # every cache kind vs recompute, on the bundled model
    minikv info                       # the config, parameter count, KV bytes per token, backends
    minikv chat --model PATH_OR_HUB_ID    # multi-turn chat with the checkpoint's template; the KV cache is kept
    minikv serve --port 8000              # an OpenAI-compatible server (pip install 'minikv[serve]')

Bad arguments and bad paths print one line on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .cache import CACHE_KINDS
from .errors import MinikvError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(EXIT_USAGE, f"minikv: error: {message} (see 'minikv {self._sub_name()}--help')\n")

    def _sub_name(self) -> str:
        parts = self.prog.split()
        return " ".join(parts[1:]) + " " if len(parts) > 1 else ""


def _int_at_least(minimum: int, why: str = ""):
    """An argparse type: an integer >= minimum, or a usage error naming the value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}{why}")
        return value
    return parse


_positive_int = _int_at_least(1)
_seed = _int_at_least(0, " (a seed is a non-negative integer)")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default (they are the Python API's). An option whose default is None
    is not passed on when not given, and its help says in words what decides instead."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    formatter = _DefaultsFormatter
    parser = _Parser(prog="minikv", description="Transformer inference from scratch in NumPy.",
                     formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"minikv {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True)

    def model_args(p):
        p.add_argument("--model", default=None, help="a Hugging Face checkpoint folder or Hub id such as Org/name "
                       "(default: the bundled tiny model)")
        p.add_argument("--backend", default=None, help="numpy, numba, cuda or cuda-sim (default: numpy)")
        p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="weights and compute")

    gen = sub.add_parser("generate", help="stream a continuation of a prompt, then a stats line",
                         formatter_class=formatter)
    gen.add_argument("prompt", help="the text to continue")
    model_args(gen)
    # No default of its own: a flag not given is not passed, so the defaults are model.generate's.
    gen.add_argument("--max-new-tokens", type=_positive_int, default=None,
                     help="tokens to generate (default: generation_config.json's, else 50)")
    gen.add_argument("--cache", default="static", choices=CACHE_KINDS, help="KV cache kind")
    sampling_args(gen, defaults="the checkpoint's generation_config.json, else greedy")
    gen.add_argument("--speculative", default=None, metavar="PROPOSER",
                     help="prompt_lookup, draft (the bundled model's draft) or a draft checkpoint folder")
    gen.add_argument("--num-speculative-tokens", type=_positive_int, default=None, metavar="K",
                     help="tokens proposed per step (default: 4)")

    bench = sub.add_parser("bench", help="decode tokens/s of every cache kind vs recompute",
                           formatter_class=formatter)
    model_args(bench)
    bench.add_argument("--prompt", default="The meaning of life is", help="the prompt every run continues")
    bench.add_argument("--max-new-tokens", type=_positive_int, default=100, help="tokens per run")
    bench.add_argument("--repeats", type=_positive_int, default=3, help="runs per cache kind (the median is shown)")

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching, prefix caching)",
                           formatter_class=formatter)
    model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    serve.add_argument("--port", type=_positive_int, default=8000, help="port to listen on")
    serve.add_argument("--served-model-name", default=None, help="the model id clients ask for (None: the folder name)")
    serve.add_argument("--block-size", type=_positive_int, default=16, help="positions per K/V block")
    serve.add_argument("--num-blocks", type=_positive_int, default=None, help="K/V pool size in blocks (None: 1024, or enough for one full-length sequence)")
    serve.add_argument("--max-num-tokens", type=_positive_int, default=256, help="token budget per step")
    serve.add_argument("--max-num-seqs", type=_positive_int, default=64, help="requests running at once")
    serve.add_argument("--no-prefix-caching", action="store_true", help="recompute shared prompt prefixes")

    info = sub.add_parser("info", help="the model's config, size, KV bytes per token, and the backends here",
                          formatter_class=formatter)
    model_args(info)

    chat = sub.add_parser("chat", help="an interactive multi-turn chat that keeps its KV cache across turns",
                          formatter_class=formatter)
    model_args(chat)
    chat.add_argument("--system", default=None, help="a system message to start the conversation with")
    chat.add_argument("--max-new-tokens", type=_positive_int, default=256, help="tokens per reply")
    chat.add_argument("--max-seq-len", type=_positive_int, default=None,
                      help="positions the conversation's cache holds (default: the model's maximum, at most 4096)")
    sampling_args(chat, defaults="the checkpoint's generation_config.json, else greedy")
    return parser


def sampling_args(p, defaults: str) -> None:
    """Sampling flags that default to None: a flag not given is not passed, so the model's
    generation_config.json (then minikv's default) decides."""
    p.add_argument("--temperature", type=_float, default=None, help=f"0 = greedy (default: {defaults})")
    p.add_argument("--top-k", type=_positive_int, default=None,
                   help="keep the k most likely tokens (default: generation_config.json's, else off)")
    p.add_argument("--top-p", type=_float, default=None,
                   help="keep the smallest set of tokens with probability >= p (default: generation_config.json's, "
                        "else off)")
    p.add_argument("--min-p", type=_float, default=None,
                   help="keep tokens with probability >= min-p x the largest (default: generation_config.json's, "
                        "else off)")
    p.add_argument("--repetition-penalty", type=_float, default=None,
                   help="> 1 discourages repeats (default: generation_config.json's, else 1 = off)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (sampling only)")


def _given_sampling(args) -> dict:
    names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _load(args):
    from .model import load

    return load(args.model, dtype=args.dtype, backend=args.backend)


def _proposer(args):
    """--speculative: "prompt_lookup", "draft" (the bundled draft) or a draft checkpoint folder."""
    from .model import load
    from .speculative import BUNDLED_DRAFT

    if args.speculative in (None, "prompt_lookup"):
        return args.speculative
    path = BUNDLED_DRAFT if args.speculative == "draft" else args.speculative
    return load(path, dtype=args.dtype, backend=args.backend)


def cmd_generate(args) -> int:
    from .seq2seq import EncoderDecoder

    model = _load(args)
    if isinstance(model, EncoderDecoder):
        return _generate_seq2seq(model, args)
    options = _given_sampling(args)     # the rest: generation_config.json's, else model.generate's (greedy)
    stream = model.stream(args.prompt, max_new_tokens=args.max_new_tokens, cache=args.cache, seed=args.seed,
                          speculative=_proposer(args), num_speculative_tokens=args.num_speculative_tokens, **options)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    for event in stream:
        out.write(event.text)
        out.flush()
    out.write("\n")
    out.flush()            # the text first, then the stats line
    print(f"[{stream.stats}]", file=sys.stderr)
    return 0


def _generate_seq2seq(model, args) -> int:
    """An encoder-decoder (T5, BART) reads the prompt as its source and writes a new text, not a continuation."""
    options = _given_sampling(args)     # flags not given: model.generate's defaults (greedy, 50 tokens)
    if args.max_new_tokens is not None:
        options["max_new_tokens"] = args.max_new_tokens
    out = model.generate(args.prompt, cache=args.cache, seed=args.seed, **options)
    print(out.text, flush=True)
    print(f"[{out.stats}]", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from tqdm import tqdm

    model = _load(args)
    kinds = list(CACHE_KINDS)
    rows = {}
    with tqdm(total=len(kinds) * args.repeats, desc="minikv bench", unit="run", file=sys.stderr) as bar:
        for _ in range(args.repeats):
            for kind in kinds:     # alternate kinds so drift in machine speed hits all alike
                bar.set_postfix_str(kind)
                out = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, cache=kind, temperature=0.0,
                                     stop_tokens=[])
                rows.setdefault(kind, []).append(out)
                bar.update()
    tokens = {kind: runs[0].tokens for kind, runs in rows.items()}
    same = all(t == tokens["none"] for t in tokens.values())

    def median(values):
        values = sorted(values)
        return values[len(values) // 2]

    speed = {kind: median([r.stats.decode_tokens_per_s for r in runs]) for kind, runs in rows.items()}
    print(f"prompt {len(args.prompt.encode())} bytes, {args.max_new_tokens} new tokens, median of {args.repeats}, "
          f"backend {model.backend.name}, {model.dtype.name}")
    print(f"{'cache':<9} {'decode tok/s':>13} {'speedup vs none':>16} {'cache KiB':>10}")
    for kind in kinds:
        print(f"{kind:<9} {speed[kind]:>13.1f} {speed[kind] / speed['none']:>15.2f}x "
              f"{rows[kind][0].stats.cache_bytes / 1024:>10.1f}")
    print("same tokens with every cache kind: " + ("yes" if same else "NO"))
    return 0 if same else 1


def cmd_info(args) -> int:
    from .backend import available_backends
    from .model import BUNDLED_MODEL
    from .seq2seq import EncoderDecoder

    model = _load(args)
    cfg = model.config
    if isinstance(model, EncoderDecoder):      # T5 / BART: its own summary
        print(f"model         {model.source}\n{model!r}")
        return 0
    print(f"model         {model.source}")
    print(f"architecture  {cfg.model_type} ({cfg.family} family)")
    print(f"layers        {cfg.n_layers}, hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}")
    print(f"heads         {cfg.n_heads} query, {cfg.n_kv_heads} key/value (head_dim {cfg.head_dim})")
    print(f"vocabulary    {cfg.vocab_size}, max positions {cfg.max_position_embeddings} "
          f"(prompt + generated tokens must fit)")
    if model.source == BUNDLED_MODEL:
        print("usable length the bundled model was trained on 256-byte windows: prompt + generated bytes "
              "<= 256 (past that its text turns to gibberish)")
    if cfg.uses_rope:
        print(f"rope          theta {cfg.rope_theta:g}, convention {cfg.rope_convention}")
    if cfg.sliding_window:
        print(f"window        {cfg.sliding_window}")
    print(f"parameters    {model.n_parameters:,} ({model.n_parameters * model.dtype.itemsize / 2**20:.1f} MiB "
          f"in {model.dtype.name})")
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * model.dtype.itemsize
    print(f"KV cache      {per_token:,} bytes per token = 2 * {cfg.n_layers} layers * {cfg.n_kv_heads} kv heads * "
          f"{cfg.head_dim} * {model.dtype.itemsize} bytes")
    tok = model.tokenizer
    kind = "none (token ids only)" if tok is None else f"{type(tok).__name__}, vocabulary {tok.vocab_size}"
    print(f"tokenizer     {kind}; chat template: {'yes' if getattr(tok, 'chat_template', None) else 'no'}")
    gen = model.generation_config
    if gen is not None:
        sampling = ", ".join(f"{k} {v}" for k, v in gen.defaults().items() if v is not None and k != "stop_tokens")
        print(f"generation    stop ids {list(gen.eos_token_ids)}; defaults: {sampling} (generation_config.json)")
    print(f"backends      {', '.join(available_backends())} (this machine)")
    return 0


def cmd_chat(args) -> int:
    from .chat import run_repl

    model = _load(args)
    return run_repl(model, sys.stdin, sys.stdout, sys.stderr, system=args.system, max_seq_len=args.max_seq_len,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, **_given_sampling(args))


def cmd_serve(args) -> int:
    from .serving.server import serve

    model = _load(args)
    serve(model, host=args.host, port=args.port, model_name=args.served_model_name, block_size=args.block_size,
          num_blocks=args.num_blocks, max_num_tokens=args.max_num_tokens, max_num_seqs=args.max_num_seqs,
          prefix_caching=not args.no_prefix_caching)
    return 0


COMMANDS = {"generate": cmd_generate, "bench": cmd_bench, "info": cmd_info, "chat": cmd_chat, "serve": cmd_serve}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MinikvError as exc:
        print(f"minikv: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nminikv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
