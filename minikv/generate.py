"""Generation: prefill the prompt, then decode one token at a time.

    prefill:  logits = forward(prompt, cache)       # every prompt token in one pass (or in chunks)
    decode:   repeat: token = sample(last logits); logits = forward([token], cache)

Prefill is compute-bound (a matrix of tokens per matmul); decode is memory-bound (each step reads
every weight to produce one token per sequence), which is why the two are timed apart in
``GenerationStats``.

A batch of prompts of different lengths is right-padded into one array; ``n_new`` tells the
model how many tokens of each row are real, each sequence keeps its own positions and cache
length, and so each gets exactly the tokens it would get alone. A sequence that produces a stop
token stops (its later tokens are discarded); the others go on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from . import validate
from .cache import CACHE_KINDS, CACHE_OPTIONS, KVCache
from .errors import (CacheMismatchError, CacheOverflowError, ConfigError, InvalidInputError, MinikvError,
                     SequenceTooLongError, unknown_option)
from .sampling import SamplingParams, sample
from .tokenizer import require_tokenizer


@dataclass
class GenerationStats:
    """What a generation cost. ``decode_tokens_per_s`` counts tokens made by decode steps only."""

    prefill_ms: float = 0.0
    prefill_tokens: int = 0
    decode_ms: float = 0.0
    decode_tokens: int = 0
    tokens_generated: int = 0
    batch_size: int = 1
    cache_kind: str = "none"
    cache_bytes: int = 0
    # Speculative decoding (minikv/speculative.py): proposals made and kept, and verification forwards
    # counted once per sequence; all 0 for plain decoding.
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    verification_steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        """accepted_tokens / proposed_tokens: the share of proposals the model kept."""
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else float("nan")

    @property
    def mean_accepted_length(self) -> float:
        """Proposals kept per sequence per verification forward (each forward also makes one token of its own)."""
        return self.accepted_tokens / self.verification_steps if self.verification_steps else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / (self.decode_ms / 1e3) if self.decode_ms > 0 else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / (self.prefill_ms / 1e3) if self.prefill_ms > 0 else float("nan")

    def __str__(self) -> str:
        text = (f"prefill {self.prefill_ms:.1f} ms ({self.prefill_tokens} tokens) | decode "
                f"{self.decode_tokens_per_s:.1f} tokens/s ({self.tokens_generated} generated) | cache "
                f"{self.cache_kind} {self.cache_bytes / 1024:.1f} KiB")
        if self.verification_steps:
            text += (f" | speculative: {self.accepted_tokens}/{self.proposed_tokens} proposals accepted, "
                     f"{self.mean_accepted_length:.2f} per step")
        return text


@dataclass
class GenerationOutput:
    tokens: list[list[int]]                 # per prompt, the generated ids only (prompt excluded)
    text: Union[str, list[str], None]       # decoded generated text (a str when the prompt was one str)
    stats: GenerationStats
    finish_reasons: list[str] = field(default_factory=list)   # "stop" or "length", per prompt


@dataclass
class TokenEvent:
    """One generated token, as ``stream`` yields it."""

    sequence: int      # which prompt of the batch
    token: int
    text: str          # the text this token completes ("" while a multi-byte character is incomplete)


def _prompts_to_ids(model, prompt) -> tuple[list[list[int]], bool]:
    """Normalise a str / list of str / list of ids / list of lists of ids; return (ids, was_single_str)."""
    if isinstance(prompt, str):
        return [require_tokenizer(model.tokenizer, "a text prompt").encode(prompt)], True
    if isinstance(prompt, np.ndarray):
        if prompt.dtype.kind not in "iu":
            # As forward refuses them: a float id (or a bool) is a bug, never quietly truncated.
            raise InvalidInputError(f"prompt array has dtype {prompt.dtype}; token ids are integers (e.g. np.int64)")
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
        raise InvalidInputError(f"prompt must be a str, a list of str, or token ids; got {prompt!r:.80}")
    if all(isinstance(p, str) for p in prompt):
        tok = require_tokenizer(model.tokenizer, "a text prompt")
        return [tok.encode(p) for p in prompt], False
    if all(isinstance(p, (list, tuple, np.ndarray)) for p in prompt):
        return [validate.token_ids(p, f"prompt {i}", model.config.vocab_size) for i, p in enumerate(prompt)], False
    if not any(isinstance(p, (str, list, tuple, np.ndarray)) for p in prompt):
        return [validate.token_ids(prompt, "prompt", model.config.vocab_size)], False
    raise InvalidInputError("prompt must be a str, a list of str, a list of token ids, or a list of such lists")


def _check_prompts(model, prompts: list[list[int]]) -> None:
    vocab = model.config.vocab_size
    for i, ids in enumerate(prompts):
        if len(ids) == 0:
            raise InvalidInputError(f"prompt {i} is empty; give at least one token (or a non-empty string)")
        # Ids from a tokenizer were not checked by _prompts_to_ids (a tokenizer may exceed the model's vocabulary).
        validate.token_ids(ids, f"prompt {i}", vocab)


def _padded(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    ids = np.zeros((len(rows), int(lengths.max())), dtype=np.int64)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = row
    return ids, lengths


def _steps(model, prompts, max_new_tokens, cache, params, rng, stop_tokens, prefill_chunk, stats,
           cached_tokens=None) -> Iterator[np.ndarray]:
    """The generation loop; yields one (batch,) array of new tokens per step."""
    batch = len(prompts)
    history = [list(p) for p in prompts]          # prompt + generated, for recompute and the penalty
    # The repetition penalty sees the whole sequence, including what a given cache already holds.
    context = [list(c) for c in cached_tokens] if cached_tokens is not None else [[] for _ in range(batch)]
    ids, lengths = _padded(prompts)
    sync = model.backend.synchronize

    # ---- prefill: the whole prompt (or chunk by chunk) -> logits of each row's last prompt token
    t0 = time.perf_counter()
    if cache is None:
        logits = model.forward(ids, n_new=lengths, last_only=True)
    else:
        chunk = ids.shape[1] if not prefill_chunk else int(prefill_chunk)
        logits = np.zeros((batch, model.config.vocab_size), dtype=model.dtype)
        for start in range(0, ids.shape[1], chunk):
            n_new = np.clip(lengths - start, 0, chunk)
            if not n_new.any():
                break
            part = model.forward(ids[:, start:start + chunk], cache, n_new=n_new, last_only=True)
            # A row's last prompt token lies in this chunk iff its remaining count is within the chunk.
            ends_here = (lengths - start >= 1) & (lengths - start <= chunk)
            logits[ends_here] = part[ends_here]
    sync()
    stats.prefill_ms = (time.perf_counter() - t0) * 1e3
    stats.prefill_tokens = int(lengths.sum())

    # A backend may run the decode step its own way (backends/cuda/step.py: lengths on the device,
    # static buffers); None: model.forward, as everywhere else.
    device_step = getattr(model.backend, "try_decode_step", lambda *_: None)(model, cache)
    finished = np.zeros(batch, dtype=bool)
    # What the cache must hold before each decode step: anything else means another call wrote to it
    # while this generation was paused between tokens, and the next step would overflow or attend to
    # someone else's keys.
    expected = None if cache is None else cache.lengths.copy()
    decode_start = time.perf_counter()
    for step in range(max_new_tokens):
        previous = ([np.asarray(c + h, dtype=np.int64) for c, h in zip(context, history)]
                    if params.repetition_penalty != 1.0 else None)
        tokens = sample(logits, params, rng, previous)
        for b in range(batch):
            history[b].append(int(tokens[b]))
        yield tokens
        finished |= np.isin(tokens, stop_tokens)
        if finished.all() or step == max_new_tokens - 1:
            break
        if cache is None:
            # Recompute: the whole sequence again, every step (the baseline a cache removes).
            full, full_lengths = _padded(history)
            logits = model.forward(full, n_new=full_lengths, last_only=True)
        else:
            if not np.array_equal(cache.lengths, expected):
                raise CacheMismatchError(
                    f"the {cache.kind} cache holds lengths {cache.lengths.tolist()} but this generation left it at "
                    f"{expected.tolist()}: another call changed it between steps; give each generation its own cache"
                )
            if device_step is not None:
                logits = device_step(tokens)
            else:
                logits = model.forward(tokens[:, None], cache, last_only=True)
            expected = expected + 1
        stats.decode_tokens += int((~finished).sum())
    sync()
    stats.decode_ms = (time.perf_counter() - decode_start) * 1e3


class _Default:
    """The default of a sampling option: the checkpoint's generation_config.json, else LIBRARY_DEFAULTS.
    (A sentinel, not None: ``top_k=None`` passed explicitly means "no top-k" even when the file sets one.)"""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()
LIBRARY_DEFAULTS = {"max_new_tokens": 50, "temperature": 0.0, "top_k": None, "top_p": None, "min_p": None,
                    "repetition_penalty": 1.0}


def resolve_options(model, **given) -> dict:
    """Each generation option: the value passed, else the checkpoint's generation_config.json, else
    minikv's default (greedy, 50 new tokens). Stop tokens: those passed, else generation_config.json's
    eos_token_id, else config.json's."""
    checkpoint = model.generation_config.defaults() if getattr(model, "generation_config", None) else {}
    resolved = {}
    for name, value in given.items():
        unset = value is DEFAULT or (value is None and name in ("max_new_tokens", "stop_tokens"))
        if not unset:
            resolved[name] = value
        elif name in checkpoint:
            resolved[name] = checkpoint[name]
        elif name == "stop_tokens":
            config = model.config
            resolved[name] = list(config.eos_token_ids) or ([] if config.eos_token_id is None else [config.eos_token_id])
        else:
            resolved[name] = LIBRARY_DEFAULTS[name]
    return resolved


def _option_names() -> set[str]:
    """Every keyword generate/stream take: Stream's parameters, the cache options, and ``stream``."""
    import inspect

    named = inspect.signature(Stream.__init__).parameters
    cache_options = {name for names in CACHE_OPTIONS.values() for name in names}
    return ({name for name, p in named.items() if p.kind == p.KEYWORD_ONLY or name == "max_new_tokens"}
            | cache_options | {"stream"})


class Stream:
    """An iterator of ``TokenEvent``s; after it is exhausted, ``.output`` holds the GenerationOutput."""

    def __init__(self, model, prompt, max_new_tokens: Optional[int] = None, *,
                 cache: Union[str, KVCache, None] = "static", temperature=DEFAULT, top_k=DEFAULT, top_p=DEFAULT,
                 min_p=DEFAULT, repetition_penalty=DEFAULT, seed: Optional[int] = 0,
                 rng: Optional[np.random.Generator] = None, stop_tokens: Optional[Sequence[int]] = None,
                 prefill_chunk: Optional[int] = None, max_seq_len: Optional[int] = None,
                 cache_dtype: Optional[str] = None, cached_tokens: Optional[Sequence[Sequence[int]]] = None,
                 speculative=None, num_speculative_tokens: Optional[int] = None, **cache_options):
        # Every argument is checked here, before anything touches a cache (check at the door): a bad
        # seed found after the prefill would leave a caller's cache holding the prompt.
        stop_given = stop_tokens is not None
        options = resolve_options(model, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                  top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                                  stop_tokens=stop_tokens)
        max_new_tokens, stop_tokens = options.pop("max_new_tokens"), options.pop("stop_tokens")
        limit = model.config.max_positions
        max_new_tokens = validate.integer(max_new_tokens, "max_new_tokens")
        if max_new_tokens > limit:
            raise SequenceTooLongError(f"max_new_tokens={max_new_tokens} is more than the model's "
                                       f"{model.config.max_positions_name}={limit}; pass max_new_tokens<={limit}")
        prefill_chunk = validate.optional_integer(prefill_chunk, "prefill_chunk")
        self.model = model
        self.prompts, self._single = _prompts_to_ids(model, prompt)
        _check_prompts(model, self.prompts)
        self.params = SamplingParams(**options)
        self.rng = validate.rng(rng) if rng is not None else np.random.default_rng(validate.seed(seed))
        if stop_given:
            stop_tokens = validate.token_ids(stop_tokens, "stop_tokens", model.config.vocab_size)
        self.stop_tokens = np.asarray(list(stop_tokens), dtype=np.int64)
        self.max_new_tokens = max_new_tokens
        self.prefill_chunk = prefill_chunk
        self.cache = self._make_cache(cache, max_seq_len, cache_dtype, cache_options)
        self._check_room()
        self.cached_tokens = self._check_cached_tokens(cached_tokens)
        self.proposer = None
        if speculative is None and num_speculative_tokens is not None:
            raise ConfigError(f"num_speculative_tokens={num_speculative_tokens!r} applies to speculative decoding; "
                              "pass speculative=\"prompt_lookup\" or a draft model too")
        scaling = model.config.rope_scaling
        if scaling is not None and scaling.rope_type == "dynamic" and (speculative is not None or prefill_chunk):
            # Dynamic NTK rotates each forward call by that call's length (as transformers does): verifying
            # k drafted tokens in one call, or prefilling in chunks, would rotate differently from plain decoding.
            what = "speculative decoding" if speculative is not None else f"prefill_chunk={prefill_chunk}"
            raise ConfigError(f"{what} is not supported with dynamic NTK RoPE (rope_scaling rope_type 'dynamic'): "
                              "its frequencies depend on each forward call's length, so the tokens would differ "
                              "from plain generation")
        if speculative is not None:
            self._start_speculative(speculative, num_speculative_tokens, cache, cache_dtype, cache_options)
        self.stats = GenerationStats(batch_size=len(self.prompts),
                                     cache_kind="none" if self.cache is None else self.cache.kind)
        self.output: Optional[GenerationOutput] = None
        self._iterated = False

    def _positions_needed(self, cache: Optional[KVCache]) -> np.ndarray:
        """Per sequence, the positions this generation writes: what a given cache already holds, the
        prompt, and max_new_tokens - 1 decode steps (the last token is returned, never fed back)."""
        held = cache.lengths if cache is not None else 0
        return held + np.array([len(p) for p in self.prompts], dtype=np.int64) + self.max_new_tokens - 1

    def _make_cache(self, cache, max_seq_len, cache_dtype, options) -> Optional[KVCache]:
        if isinstance(cache, KVCache):
            # e.g. a loaded prefilled cache: continue after what it holds. Refuse a cache for another
            # model or batch now, not after the first forward.
            given = {"max_seq_len": max_seq_len, "cache_dtype": cache_dtype, **options}
            ignored = sorted(name for name, value in given.items() if value is not None)
            if ignored:
                raise ConfigError(f"{', '.join(ignored)} configure a cache that generate creates; this call was "
                                  "given a cache object, so they would be ignored: drop them or pass cache=<kind>")
            cache.check_compatible(self.model.config, len(self.prompts))
            return cache
        if cache is None:
            cache = "none"
        if cache not in CACHE_KINDS:
            raise ConfigError(f"cache={cache!r} is unknown; choose one of {CACHE_KINDS}")
        cache_options = {name for names in CACHE_OPTIONS.values() for name in names}
        for option in options:    # not a cache option either: a typo ("temprature") gets the nearest name
            if option not in cache_options:
                raise unknown_option(option, _option_names(), "generate()/stream()")
        limit = self.model.config.max_positions
        if max_seq_len is None:
            max_seq_len = min(int(self._positions_needed(None).max()), limit)
        return self.model.new_cache(cache, batch_size=len(self.prompts), max_seq_len=max_seq_len,
                                    dtype=cache_dtype, **options)

    def _check_cached_tokens(self, cached_tokens):
        """The ids a given cache holds, one list per sequence (only the repetition penalty reads them)."""
        if cached_tokens is None:
            return None
        held = self.cache.lengths.tolist() if self.cache is not None else None
        rows = None
        if isinstance(cached_tokens, (list, tuple)) and all(isinstance(c, (list, tuple, np.ndarray)) for c in cached_tokens):
            rows = [validate.token_ids(c, f"cached_tokens[{b}]", self.model.config.vocab_size)
                    for b, c in enumerate(cached_tokens)]
        if held is None or rows is None or [len(r) for r in rows] != held:
            raise InvalidInputError(f"cached_tokens must hold, per sequence, the ids the given cache holds "
                                    f"({held if held is not None else 'no cache given'} of them)")
        return rows

    def _check_room(self) -> None:
        """Fail before any work, not after tokens were already streamed: the last position must fit
        the model's position table and the cache's capacity."""
        needed = self._positions_needed(self.cache)
        worst = int(np.argmax(needed))
        held = int(self.cache.lengths[worst]) if self.cache is not None else 0
        what = (f"sequence {worst} ({held} cached + {len(self.prompts[worst])} prompt tokens + "
                f"max_new_tokens={self.max_new_tokens}) needs {int(needed[worst])} positions")
        limit = self.model.config.max_positions
        if needed[worst] > limit:
            room = limit - (int(needed[worst]) - self.max_new_tokens)
            fix = (f"pass max_new_tokens<={room}" if room >= 1 else
                   f"shorten the prompt so that prompt + max_new_tokens - 1 <= {limit - held}")
            raise SequenceTooLongError(f"{what} but the model has {self.model.config.max_positions_name}={limit}; "
                                       f"{fix}")
        if self.cache is not None and needed[worst] > self.cache.capacity:
            room = self.max_new_tokens - int(needed[worst]) + self.cache.capacity
            fix = f"max_seq_len>={int(needed[worst])}" + (f" or max_new_tokens<={room}" if room >= 1 else "")
            raise CacheOverflowError(f"{what} but the {self.cache.kind} cache holds {self.cache.capacity}; "
                                     f"pass {fix}")

    def _start_speculative(self, speculative, k, kind, cache_dtype, options) -> None:
        """Build the proposer (minikv/speculative.py) and its cache; refuse what cannot rewind, before any work."""
        from . import speculative as spec

        k = spec.DEFAULT_SPECULATIVE_TOKENS if k is None else k
        self.proposer = spec.make_proposer(speculative, k)
        self.num_speculative_tokens = int(k)
        if isinstance(kind, KVCache):
            raise ConfigError("speculative decoding builds the model's and the draft's caches itself; pass a cache "
                              f"kind ({', '.join(spec.SPECULATIVE_CACHE_KINDS)}), not a KVCache")
        needed = int(self._positions_needed(None).max())
        spec.check_cache_can_rewind(self.cache, needed)
        self.proposer.start(self.model, len(self.prompts), self.cache.kind, self.cache.capacity, cache_dtype, options)
        if getattr(self.proposer, "cache", None) is not None:
            spec.check_cache_can_rewind(self.proposer.cache, needed, who="draft model")

    def _token_steps(self):
        """Per step, each sequence's new tokens: one each (plain decoding) or 1..k+1 each (speculative)."""
        if self.proposer is None:
            for tokens in _steps(self.model, self.prompts, self.max_new_tokens, self.cache, self.params, self.rng,
                                 self.stop_tokens, self.prefill_chunk, self.stats, self.cached_tokens):
                yield tokens[:, None]
            return
        from .speculative import speculative_steps

        yield from speculative_steps(self.model, self.proposer, self.prompts, self.max_new_tokens, self.cache,
                                     self.params, self.rng, self.stop_tokens, self.num_speculative_tokens,
                                     self.prefill_chunk, self.stats)

    def __iter__(self) -> Iterator[TokenEvent]:
        # A second pass would prefill the prompt again behind what the first pass left in the cache.
        if self._iterated:
            raise MinikvError("this Stream has already been iterated; call model.stream(...) again for a new run")
        # Checked again now, not only when the stream was made: the caller's cache may have been
        # written to in between.
        self._check_room()
        self._iterated = True
        model, batch = self.model, len(self.prompts)
        generated: list[list[int]] = [[] for _ in range(batch)]
        reasons = ["length"] * batch
        decoders = [model.tokenizer.stream_decoder() if model.tokenizer else None for _ in range(batch)]
        done = np.zeros(batch, dtype=bool)
        for tokens in self._token_steps():
            for b in range(batch):
                for token in tokens[b]:
                    if done[b]:
                        break
                    token = int(token)
                    if token in self.stop_tokens:
                        done[b], reasons[b] = True, "stop"
                        break
                    generated[b].append(token)
                    yield TokenEvent(b, token, decoders[b].feed(token) if decoders[b] else "")
        self.stats.tokens_generated = sum(len(g) for g in generated)
        self.stats.cache_bytes = 0 if self.cache is None else self.cache.nbytes
        text = None
        if model.tokenizer is not None:
            texts = [model.tokenizer.decode(g) for g in generated]
            text = texts[0] if self._single else texts
        self.output = GenerationOutput(tokens=generated, text=text, stats=self.stats, finish_reasons=reasons)


def stream(model, prompt, max_new_tokens: Optional[int] = None, **kwargs) -> Stream:
    """Generate lazily: iterate to get ``TokenEvent``s as they are made; ``.output`` at the end."""
    return Stream(model, prompt, max_new_tokens, **kwargs)


def generate(model, prompt, max_new_tokens: Optional[int] = None, *, stream: bool = False, **kwargs):
    """Prefill then decode. Returns a GenerationOutput (or a Stream when ``stream=True``).

    prompt:          a str, a list of str, token ids, or a list of token-id lists (a ragged batch)
    cache:           "none" (recompute), "concat", "static" (default), "paged", "sliding", or a KVCache
                     (e.g. one loaded with minikv.load_cache: generation continues after what it holds)
    max_new_tokens:  how many tokens to generate at most (default: generation_config.json's, else 50)
    temperature:     0.0 = greedy; top_k, top_p, min_p, repetition_penalty: see minikv.sampling. Each
                     defaults to the checkpoint's generation_config.json (do_sample false or no file:
                     greedy); an argument passed explicitly always wins (see minikv.generation_config)
    seed / rng:      all randomness comes from one numpy Generator (same seed, same text)
    stop_tokens:     ids that end a sequence (default: generation_config.json's eos_token_id(s), else
                     config.json's, if any)
    prefill_chunk:   prefill the prompt N tokens at a time (same logits, less peak memory)
    cached_tokens:   with a given cache, the ids it already holds per sequence, so that the repetition
                     penalty counts them as a run over the whole sequence would (minikv.chat passes them)
    max_seq_len, cache_dtype ("float16" halves the cache), block_size / num_blocks (paged), window (sliding)
    speculative:     "prompt_lookup" or a draft model (a Transformer with the same vocabulary): propose
                     num_speculative_tokens (default 4) tokens per step, verify them in one forward;
                     the same tokens (greedy) or the same distribution (sampling): minikv/speculative.py

    Before any work, a generation that cannot fit is refused: prompt + max_new_tokens - 1 positions
    (the last token is never fed back) beyond max_position_embeddings -> SequenceTooLongError, beyond a
    given cache's capacity -> CacheOverflowError. A Stream can be iterated once.
    """
    s = Stream(model, prompt, max_new_tokens, **kwargs)
    if stream:
        return s
    for _ in s:
        pass
    return s.output
