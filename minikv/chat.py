"""Chat: a conversation rendered with the checkpoint's own template, and a multi-turn session that
keeps its KV cache from turn to turn.

A chat model was trained on conversations laid out one exact way, e.g. ChatML (Qwen)::

    <|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n

The checkpoint ships that layout as a Jinja template (``chat_template.jinja``, or ``chat_template`` in
``tokenizer_config.json``). ``apply_chat_template`` renders it exactly as transformers does (``jinja2``,
``pip install 'minikv[chat]'``): a sandboxed environment (the template is code from the internet), with
``trim_blocks``/``lstrip_blocks``, the helpers ``raise_exception``, ``strftime_now`` and a ``tojson`` that
does not escape HTML, and the tokenizer's special tokens (``bos_token``, ``eos_token``, ...) as variables.
The text is then tokenized without adding special tokens: the template writes them.

Multi-turn chat without re-reading the conversation
---------------------------------------------------
Turn n's prompt is turn n-1's prompt + the reply + the new user message (+ the generation prompt).
``ChatSession`` keeps one cache for the whole conversation and the ids it holds; each turn renders the
whole conversation and, when the new ids *extend* the cached ones, prefills only the suffix::

    cached = [ids of turn n-1's prompt] + [reply tokens fed back]     # what the cache holds
    new    = render(messages + [user])                               # the whole conversation
    new[:len(cached)] == cached  ->  prefill new[len(cached):] only  # the prefix is reused

When it does not (a template that rewrites earlier turns, e.g. one that drops past "thinking", or a
reply that tokenizes differently when re-read) the session rewinds the cache (``cache.truncate``) to the
longest common prefix, says so, and prefills from there: the tokens are the same either way, only the
work differs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterator, Optional, TextIO

import numpy as np

from .errors import BackendUnavailableError, ChatTemplateError, InvalidInputError, MinikvError

# Names a message's reasoning comes under; transformers copies it to "reasoning_content" and "thinking".
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# ---------------------------------------------------------------- rendering


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; a prompt needs the plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


_compiled: dict[str, Any] = {}


def _compile(template: str):
    """The template compiled in transformers' environment (cached: a chat renders it every turn)."""
    if template in _compiled:
        return _compiled[template]
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise BackendUnavailableError("rendering a chat template needs jinja2: pip install 'minikv[chat]'") from None
    if tuple(int(x) for x in jinja2.__version__.split(".")[:3] if x.isdigit()) < (3, 1, 6):
        # Templates come from the internet; older jinja2 sandboxes have known escapes (as transformers refuses).
        raise BackendUnavailableError(f"jinja2 {jinja2.__version__} has known sandbox escapes; chat templates need "
                                      "jinja2>=3.1.6: pip install -U 'minikv[chat]'")

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` marks the assistant's text for training masks;
        rendering keeps the text as it is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_keep"), [], [], body).set_lineno(lineno)

        def _keep(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the checkpoint's chat template does not parse (line {exc.lineno}: {exc})") from None
    _compiled[template] = compiled
    return compiled


def _plain(value):
    """A copy built only of JSON types: a template sees data, never an object with methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return _plain(value.item())
    for base in (bool, str, int, float):          # a subclass (an enum, a str subclass) as its plain base type
        if isinstance(value, base):
            return base(value) if base is not str else str.__str__(value)
    return f"<{type(value).__name__}>"


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidInputError(f"messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts; "
                                f"got {messages!r:.80}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidInputError(f"message {i} is {message!r:.80}; each message must be a dict with a 'role' "
                                    "string (and usually 'content')")
        # As transformers: a key set to None is dropped (templates test for a key, not for None).
        message = {k: v for k, v in _plain(message).items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat(tokenizer, messages, add_generation_prompt: bool = False, tools=None, documents=None,
                **template_kwargs) -> str:
    """The conversation as text, rendered with the tokenizer's chat template.

    ``template_kwargs`` become template variables (e.g. ``enable_thinking=False`` for Qwen3,
    ``date_string=...`` for Llama 3); they override the special-token variables."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ChatTemplateError(
            "this model has no chat template (no chat_template.jinja and no 'chat_template' in "
            "tokenizer_config.json): it is a plain text model, so use model.generate(text), or use a chat "
            "(\"-Instruct\") checkpoint"
        )
    compiled = _compile(template)
    variables = {**getattr(tokenizer, "special_tokens", {}), **_plain(template_kwargs)}
    try:
        return compiled.render(messages=_check_messages(messages), tools=_plain(tools), documents=_plain(documents),
                               add_generation_prompt=bool(add_generation_prompt), **variables)
    except MinikvError:
        raise
    except Exception as exc:       # raise_exception(...) in the template, or a template bug
        raise ChatTemplateError(f"the checkpoint's chat template refused these messages: "
                                f"{type(exc).__name__}: {exc}") from None


def apply_chat_template(tokenizer, messages, add_generation_prompt: bool = False, tools=None, documents=None,
                        **template_kwargs) -> list[int]:
    """The token ids of ``render_chat(...)``: equal to transformers'
    ``tokenizer.apply_chat_template(messages, add_generation_prompt=..., tokenize=True)``."""
    if tokenizer is None:
        raise ChatTemplateError("this model has no tokenizer, so it has no chat template; pass token ids to generate")
    text = render_chat(tokenizer, messages, add_generation_prompt, tools, documents, **template_kwargs)
    return tokenizer.encode(text, add_special_tokens=False)     # the template wrote the special tokens


def chat(model, messages, max_new_tokens: Optional[int] = None, *, chat_template_kwargs: Optional[dict] = None,
         **generate_options):
    """The assistant's reply to ``messages``: a GenerationOutput whose ``text`` is the reply (a str).

    The conversation is rendered with the model's chat template (a generation prompt added) and
    generated from with ``generate_options`` (each defaults to the checkpoint's generation_config.json)."""
    ids = apply_chat_template(model.tokenizer, messages, add_generation_prompt=True, **(chat_template_kwargs or {}))
    out = model.generate([ids], max_new_tokens=max_new_tokens, **generate_options)
    return dataclasses.replace(out, text=out.text[0])


# ---------------------------------------------------------------- a conversation with a kept cache


@dataclass
class TurnStats:
    """What one turn of a ChatSession cost, and how much of the conversation its cache already held."""

    turn: int
    reused: int              # prompt tokens whose K/V the cache already held
    prefilled: int           # prompt tokens this turn computed
    rewound: int             # cached tokens the new prompt did not share (re-rendered differently): dropped
    generated: int
    prefill_ms: float
    decode_tokens_per_s: float
    cache_positions: int
    cache_capacity: int

    def __str__(self) -> str:
        rate = "n/a" if np.isnan(self.decode_tokens_per_s) else f"{self.decode_tokens_per_s:.1f}"
        return (f"turn {self.turn}: {self.reused} tokens reused from the cache, {self.prefilled} prefilled "
                f"({self.prefill_ms:.1f} ms){f', {self.rewound} cached tokens rewound' if self.rewound else ''} | "
                f"{self.generated} "
                f"generated at {rate} tok/s | cache {self.cache_positions}/{self.cache_capacity} positions")


class ChatSession:
    """A multi-turn conversation with one KV cache kept across turns (only each new turn is prefilled).

        session = ChatSession(model, system="You are terse.")
        for piece in session.send("Hi!"):   # the reply, streamed
            print(piece, end="")
        print(session.last_turn)             # tokens reused / prefilled, tok/s

    ``generate_options`` (temperature, top_p, max_new_tokens, seed, ...) go to ``model.stream`` each
    turn; each defaults to the checkpoint's generation_config.json. The cache is a static one of
    ``max_seq_len`` positions (default: the model's maximum, at most 4096).
    """

    def __init__(self, model, system: Optional[str] = None, *, max_seq_len: Optional[int] = None,
                 chat_template_kwargs: Optional[dict] = None, **generate_options):
        if getattr(model.tokenizer, "chat_template", None) is None:
            render_chat(model.tokenizer, [{"role": "user", "content": ""}])     # raises the no-template error
        for option in ("cache", "stream", "cached_tokens"):
            if option in generate_options:
                raise InvalidInputError(f"{option}= is not an option of a ChatSession: it keeps its own static "
                                        "cache (size it with max_seq_len=)")
        self.model = model
        self.system = system
        self.template_kwargs = dict(chat_template_kwargs or {})
        self.options = generate_options
        limit = model.config.max_position_embeddings
        self.cache = model.new_cache("static", batch_size=1, max_seq_len=max_seq_len or min(limit, 4096))
        self.messages: list[dict] = []
        self.cached_ids: list[int] = []     # the tokens whose K/V the cache holds, in order
        self.last_turn: Optional[TurnStats] = None
        self.last_tokens: list[int] = []    # the last reply's token ids (a stop token excluded)
        self.turns = 0
        self.reset()

    def reset(self) -> None:
        """Start the conversation over (the system message stays)."""
        self.messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.cached_ids = []
        self.cache.reset()

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the reply's text; the reply joins the conversation at the end.
        A turn refused before it starts (e.g. CacheOverflowError) changes nothing; a stream not run to
        the end drops the turn and empties the cache (the next turn prefills the whole conversation)."""
        if not isinstance(text, str):
            raise InvalidInputError(f"a chat message must be a str, not {type(text).__name__}")
        messages = self.messages + [{"role": "user", "content": text}]
        ids = apply_chat_template(self.model.tokenizer, messages, add_generation_prompt=True, **self.template_kwargs)
        # Reuse the longest common prefix of what the cache holds and the new prompt (all of it when the
        # template only appended the new turn), keeping at least one token to prefill.
        held = len(self.cached_ids)
        limit = min(held, len(ids) - 1)
        differ = np.flatnonzero(np.asarray(self.cached_ids[:limit]) != np.asarray(ids[:limit]))
        common = int(differ[0]) if differ.size else limit
        saved_lengths = self.cache.lengths.copy()
        self.cache.truncate(np.array([common]))      # rewind past what the new prompt does not share
        try:
            stream = self.model.stream([ids[common:]], cache=self.cache, cached_tokens=[ids[:common]], **self.options)
        except MinikvError:
            # Refused before any work (no room, a bad option): a static cache's truncation only lowered
            # its length, so restoring the length restores the cache exactly.
            self.cache.lengths = saved_lengths
            raise
        finished = False
        try:
            for event in stream:
                yield event.text
            finished = True
        finally:
            if not finished:                           # interrupted: the cache holds part of a turn
                self.cached_ids = []
                self.cache.reset()
        out = stream.output
        tokens, reason = out.tokens[0], out.finish_reasons[0]
        # Every sampled token but the last was fed back: a stop token is never fed, nor is the last one
        # of a max_new_tokens run.
        self.cached_ids = ids + (tokens if reason == "stop" else tokens[:-1])
        reply = self.model.tokenizer.decode(tokens, skip_special_tokens=True)
        self.messages = messages + [{"role": "assistant", "content": reply}]
        self.last_tokens = tokens
        self.turns += 1
        self.last_turn = TurnStats(
            turn=self.turns, reused=common, prefilled=out.stats.prefill_tokens, rewound=held - common,
            generated=len(tokens), prefill_ms=out.stats.prefill_ms, decode_tokens_per_s=out.stats.decode_tokens_per_s,
            cache_positions=int(self.cache.lengths[0]), cache_capacity=self.cache.capacity)


def run_repl(model, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr, *,
             system: Optional[str] = None, max_seq_len: Optional[int] = None, **generate_options) -> int:
    """``minikv chat``: read a user line, stream the reply, print the turn's stats; repeat until EOF.

    Commands: ``/reset`` starts the conversation over, ``/exit`` (or end of input) quits. Ctrl-C stops
    a reply; the turn is dropped. The reply goes to ``stdout``, stats and notes to ``stderr``."""
    session = ChatSession(model, system=system, max_seq_len=max_seq_len, **generate_options)
    stderr.write(f"minikv chat with {model.source or 'a model'} ({model.config.model_type}); "
                 "/reset starts over, /exit or Ctrl-D quits\n")
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            session.reset()
            stderr.write("[conversation cleared]\n")
            continue
        stdout.write("assistant> ")
        started = time.perf_counter()
        try:
            for piece in session.send(text):
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            stdout.write("\n")
            stderr.write("[interrupted: this turn is dropped]\n")
            continue
        except MinikvError as exc:
            stdout.write("\n")
            stderr.write(f"minikv: error: {type(exc).__name__}: {exc}\n")
            continue
        stdout.write("\n")
        stdout.flush()
        if session.last_turn.rewound:
            stderr.write(f"[the new prompt does not extend the cached one (the template re-rendered earlier turns "
                         f"differently): {session.last_turn.rewound} cached tokens dropped and re-prefilled]\n")
        stderr.write(f"[{session.last_turn} | {time.perf_counter() - started:.2f} s]\n")
        stderr.flush()
