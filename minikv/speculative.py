"""Speculative decoding: a cheap guesser proposes k tokens, the model checks them all in one forward.

A decode step reads every weight of the model to make one token per sequence, and on a CPU or GPU
that read, not the arithmetic, sets the time. Feeding k + 1 tokens costs about as much as feeding
one, so if someone can *guess* the next k tokens, one forward can confirm several of them::

    proposer:  d_1 .. d_k                              (a small draft model, or prompt lookup)
    model:     forward([last, d_1, .., d_k]) -> p_0, p_1, .., p_k
               p_i: the model's next-token distribution after d_1 .. d_i (p_0: after `last`)

    greedy:    keep d_1 .. d_n while d_i == argmax p_{i-1}; then append argmax p_n
    sampling:  accept d_i with probability min(1, p_{i-1}(d_i) / q_{i-1}(d_i)); at the first rejection
               draw from  r = max(0, p_{i-1} - q_{i-1}) / sum(max(0, p_{i-1} - q_{i-1}))  and stop;
               if all k pass, draw a bonus token from p_k

Every step makes 1 to k + 1 tokens per sequence; rejected tokens are thrown out of both caches with
``cache.truncate`` (the rewind of minikv/cache.py).

**Why it is exact.** Greedy: every kept token is the model's own argmax given the tokens before it,
which are themselves the model's; so the output is token for token plain greedy decoding. Sampling
(Leviathan et al. 2023, Chen et al. 2023): the first token is x either because the draft proposed x
and it was accepted, or because the draft was rejected and x was drawn from r::

    P(x) = q(x) min(1, p(x)/q(x)) + P(reject) r(x)
         = min(q(x), p(x))        + (1 - sum_y min(p(y), q(y))) max(0, p(x) - q(x)) / sum_y max(0, p(y) - q(y))

and ``sum_y max(0, p - q) = sum_y (p - min(p, q)) = 1 - sum_y min(p, q)``, so the second term is
``max(0, p(x) - q(x))`` and ``P(x) = min(p(x), q(x)) + max(0, p(x) - q(x)) = p(x)``. The same holds at
every later position given the accepted prefix, so every token is drawn from the model's own
distribution, whatever the draft's quality; a bad draft only costs speed.

A deterministic proposer (prompt lookup) is the case ``q = one-hot(x)``: accept with probability
``p(x)``, and the residual is ``p`` with ``x`` removed, renormalised.

"The same distribution" is not "the same tokens": with a seed, speculative sampling uses its random
numbers differently from plain sampling (uniforms for the acceptance tests, draws for the draft), so
the same seed gives other, equally likely, text. A seed still makes a speculative run repeatable.

**When it does not pay.** Each step costs one forward of the model on k + 1 tokens plus the
proposer's work (a draft model: k small forwards). If few proposals are accepted, that is more work
than plain decoding for the same tokens. benchmarks/speculative.py measures both sides.

Exact equality with plain decoding holds in exact arithmetic. In float32, the verification forward
(k + 1 queries at once) rounds differently from a one-token decode step, so a near-tie between the
two most likely tokens can break the other way, as in any batched or chunked computation; the tests
compare in float64.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .cache import KVCache, SlidingCache
from .errors import CacheRewindError, ConfigError, InvalidInputError
from .sampling import SamplingParams, distribution, draw, sample

SPECULATIVE_CACHE_KINDS = ("concat", "static", "paged", "sliding")
DEFAULT_SPECULATIVE_TOKENS = 4       # k when generate(speculative=...) is not told num_speculative_tokens
# A draft for the bundled model: 0.43M parameters, same byte vocabulary (its TRAINING.md says how).
BUNDLED_DRAFT = Path(__file__).parent / "data" / "tiny-fortunes-draft"


# ----------------------------------------------------------------------------------------
# Verification: which proposed tokens the model keeps
# ----------------------------------------------------------------------------------------


def verify_greedy(choices: np.ndarray, draft_tokens: np.ndarray, n_draft: np.ndarray):
    """Greedy verification. Returns (n_accepted (batch,), next_token (batch,)), int64.

    choices:      (batch, k + 1) the model's own (argmax) token at each position: choices[b, i] is
                  what it picks after the row's last token and d_1 .. d_i
    draft_tokens: (batch, k) proposals; n_draft: (batch,) how many of them are real per row

    Keeps the longest prefix of proposals that agree with the model, then the model's own next token.
    """
    batch, k = draft_tokens.shape
    agree = (draft_tokens == choices[:, :k]) & (np.arange(k)[None, :] < n_draft[:, None])
    n_accepted = np.cumprod(agree, axis=1).sum(axis=1).astype(np.int64)    # longest agreeing prefix
    return n_accepted, choices[np.arange(batch), n_accepted].astype(np.int64)


def acceptance_probability(p_x: np.ndarray, q_x: np.ndarray) -> np.ndarray:
    """min(1, p(x) / q(x)): the chance of keeping a proposal x drawn from q (q(x) > 0 since x was drawn)."""
    return np.minimum(1.0, p_x / q_x)


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """max(0, p - q) normalised, per row: what a rejection draws from (rows of p and q: (n, vocab)).

    Its mass is zero only when p == q, and then the proposal is always accepted; rounding can still
    get here, and then p itself is the right answer."""
    r = np.maximum(p - q, 0.0)
    total = r.sum(axis=-1, keepdims=True)
    return np.where(total > 0, r / np.where(total > 0, total, 1.0), p)


def verify_sampled(p: np.ndarray, draft_tokens: np.ndarray, n_draft: np.ndarray, q: Optional[np.ndarray],
                   rng: np.random.Generator):
    """The rejection rule of Leviathan et al. / Chen et al. Returns (n_accepted, next_token), int64 (batch,).

    p:            (batch, k + 1, vocab) the model's (processed) distributions at each position
    draft_tokens: (batch, k) proposals; n_draft: (batch,) how many are real per row
    q:            (batch, k, vocab) the distributions the proposals were drawn from; None for a
                  deterministic proposer (q = one-hot at the proposal)
    rng:          all randomness: one uniform per position and row, one draw per row at the end

    Row b accepts d_i with probability min(1, p_{i-1}(d_i) / q_{i-1}(d_i)); at its first rejection
    the next token is drawn from residual(p_{i-1}, q_{i-1}); if all n_draft[b] pass, from p_{n_draft[b]}.
    """
    batch, k = draft_tokens.shape
    rows = np.arange(batch)
    n_accepted = np.zeros(batch, dtype=np.int64)
    next_token = np.zeros(batch, dtype=np.int64)
    rejected = np.zeros(batch, dtype=bool)
    for i in range(k):
        live = ~rejected & (i < n_draft)
        if not live.any():
            break
        x = draft_tokens[:, i]
        p_x = p[rows, i, x]
        q_x = np.ones(batch) if q is None else q[rows, i, x]
        u = rng.random(batch)
        # u ~ U[0, 1): P(u < a) = a, so a proposal is kept with probability exactly min(1, p/q).
        keep = u < acceptance_probability(p_x, np.where(live, q_x, 1.0))
        n_accepted += live & keep
        reject = live & ~keep
        if reject.any():
            if q is None:
                q_rows = np.zeros((int(reject.sum()), p.shape[-1]))
                q_rows[np.arange(q_rows.shape[0]), x[reject]] = 1.0     # the point mass at the proposal
            else:
                q_rows = q[reject, i]
            next_token[reject] = draw(residual(p[reject, i], q_rows), rng)
            rejected |= reject
    # Every proposal of a row accepted: a bonus token from the model's distribution after all of them.
    bonus = ~rejected
    if bonus.any():
        next_token[bonus] = draw(p[rows[bonus], n_draft[bonus]], rng)
    return n_accepted, next_token


# ----------------------------------------------------------------------------------------
# Proposers
# ----------------------------------------------------------------------------------------


class PromptLookup:
    """Propose the continuation of the latest earlier occurrence of the last n tokens (no second model).

    Tries n = max_ngram first, then shorter n-grams down to min_ngram; a row with no match proposes
    nothing (its step makes one token, as plain decoding). Deterministic: its q is a point mass.
    Pays off where the output repeats the input: code edits, summaries quoting their source, loops.
    """

    deterministic = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        for name, value in (("max_ngram", max_ngram), ("min_ngram", min_ngram)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"prompt lookup {name}={value!r} must be a positive integer")
        if min_ngram > max_ngram:
            raise ConfigError(f"prompt lookup min_ngram={min_ngram} must be <= max_ngram={max_ngram}")
        self.max_ngram, self.min_ngram = int(max_ngram), int(min_ngram)

    def start(self, model, batch_size: int, cache_kind: str, max_seq_len: int, cache_dtype, options) -> None:
        pass

    def lookup(self, history: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of history's last n tokens."""
        tokens = np.asarray(history, dtype=np.int64)
        length = tokens.size
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            pattern = tokens[length - n:]
            # (length - n, n): every earlier n-gram, starting at 0 .. length - n - 1 (not the last one itself)
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:length - 1], n)
            starts = np.nonzero((windows == pattern).all(axis=1))[0]
            if starts.size:
                follow = int(starts[-1]) + n
                return tokens[follow:follow + k].tolist()
        return []

    def propose(self, history, n_max: np.ndarray, params: SamplingParams, rng):
        """(draft_tokens (batch, k), n_draft (batch,), q=None): up to n_max[b] tokens for row b."""
        found = [self.lookup(h, int(m)) if m > 0 else [] for h, m in zip(history, n_max)]
        n_draft = np.array([len(f) for f in found], dtype=np.int64)
        draft_tokens = np.zeros((len(history), int(n_max.max(initial=0))), dtype=np.int64)
        for b, tokens in enumerate(found):
            draft_tokens[b, :len(tokens)] = tokens
        return draft_tokens, n_draft, None

    def rewind(self, lengths: np.ndarray) -> None:
        pass


class DraftModel:
    """A small model with the same vocabulary proposes k tokens, one cheap decode step each.

    It keeps its own KV cache of the same kind as the model's, holding a prefix of each sequence's
    tokens: each proposal first feeds what it has not seen yet (the prompt, the last step's accepted
    tokens), then k - 1 single tokens. After verification its cache is rewound past the rejected ones.
    """

    deterministic = False

    def __init__(self, model):
        self.model = model
        self.cache: Optional[KVCache] = None

    def start(self, target, batch_size: int, cache_kind: str, max_seq_len: int, cache_dtype, options) -> None:
        cfg, target_cfg = self.model.config, target.config
        if cfg.vocab_size != target_cfg.vocab_size:
            raise ConfigError(f"draft model has vocab_size={cfg.vocab_size} but the model has "
                              f"{target_cfg.vocab_size}; a draft must share the model's tokenizer")
        if cfg.max_position_embeddings < max_seq_len:
            raise ConfigError(f"draft model holds max_position_embeddings={cfg.max_position_embeddings} positions; "
                              f"this generation needs {max_seq_len} (shorten it or use a longer draft)")
        self.cache = self.model.new_cache(cache_kind, batch_size=batch_size, max_seq_len=max_seq_len,
                                          dtype=cache_dtype, **options)

    def propose(self, history, n_max: np.ndarray, params: SamplingParams, rng):
        """(draft_tokens (batch, k), n_draft = n_max, q (batch, k, vocab) or None when greedy)."""
        batch, k = len(history), int(n_max.max(initial=0))
        draft_tokens = np.zeros((batch, k), dtype=np.int64)
        q = None if params.is_greedy else np.zeros((batch, k, self.model.config.vocab_size))
        if k == 0:
            return draft_tokens, n_max.copy(), q
        # First forward: every token the draft has not seen yet (at least the last one), right-padded.
        fed = self.cache.lengths
        pending = [h[int(fed[b]):] if n_max[b] > 0 else [] for b, h in enumerate(history)]
        n_new = np.array([len(p) for p in pending], dtype=np.int64)
        ids = np.zeros((batch, int(n_new.max())), dtype=np.int64)
        for b, tokens in enumerate(pending):
            ids[b, :len(tokens)] = tokens
        logits = self.model.forward(ids, self.cache, n_new=n_new, last_only=True)   # (batch, vocab)
        for i in range(k):
            if i > 0:
                # Feed the previous proposal of every row that wants more: (batch, 1)
                n_new = (i < n_max).astype(np.int64)
                logits = self.model.forward(draft_tokens[:, i - 1:i], self.cache, n_new=n_new, last_only=True)
            previous = _previous(history, draft_tokens, i, params)
            if q is None:
                draft_tokens[:, i] = sample(logits, params, None, previous)     # argmax
            else:
                q[:, i] = distribution(logits, params, previous)
                draft_tokens[:, i] = draw(q[:, i], rng)
        return draft_tokens, n_max.copy(), q

    def rewind(self, lengths: np.ndarray) -> None:
        """Keep at most lengths[b] positions of row b (those that agree with the accepted tokens)."""
        self.cache.truncate(np.minimum(self.cache.lengths, lengths))


def _previous(history, draft_tokens, i: int, params: SamplingParams):
    """Tokens before position i of each row (history + the first i proposals), for the repetition penalty."""
    if params.repetition_penalty == 1.0:
        return None
    return [np.asarray(list(h) + draft_tokens[b, :i].tolist(), dtype=np.int64) for b, h in enumerate(history)]


def make_proposer(speculative, num_speculative_tokens):
    """``speculative=``: "prompt_lookup", a PromptLookup / DraftModel, or a Transformer (a draft model)."""
    from .model import Transformer

    k = num_speculative_tokens
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInputError(f"num_speculative_tokens={k!r} must be a positive integer (tokens proposed per step)")
    if isinstance(speculative, str):
        if speculative != "prompt_lookup":
            raise ConfigError(f"speculative={speculative!r} is unknown; pass \"prompt_lookup\" or a draft model "
                              "(a minikv Transformer with the same vocabulary)")
        return PromptLookup()
    if isinstance(speculative, Transformer):
        return DraftModel(speculative)
    if isinstance(speculative, (PromptLookup, DraftModel)):
        return speculative
    raise ConfigError(f"speculative={type(speculative).__name__} is not a proposer; pass \"prompt_lookup\" or a "
                      "draft model (a minikv Transformer with the same vocabulary)")


def check_cache_can_rewind(cache: KVCache, positions_needed: int, who: str = "model") -> None:
    """Speculative decoding rewinds every step; a ring that wraps cannot (CacheRewindError, before any work)."""
    if cache is None:
        raise ConfigError("speculative decoding needs a KV cache to rewind; pass cache=\"static\" "
                          "(or \"concat\", \"paged\", \"sliding\"), not cache=\"none\"")
    if isinstance(cache, SlidingCache) and cache.window < positions_needed:
        raise CacheRewindError(
            f"speculative decoding rewinds the {who}'s cache past rejected tokens, but a sliding ring of window "
            f"{cache.window} overwrites positions once it wraps and cannot rewind them; this generation writes "
            f"{positions_needed} positions: pass window>={positions_needed}, or use cache=\"static\" or \"paged\"")


# ----------------------------------------------------------------------------------------
# The generation loop
# ----------------------------------------------------------------------------------------


def speculative_steps(model, proposer, prompts, max_new_tokens: int, cache: KVCache, params: SamplingParams,
                      rng, stop_tokens: np.ndarray, k: int, prefill_chunk, stats):
    """Prefill, then propose / verify / rewind; yields per step a list of each row's new tokens.

    Invariant between steps: the model's cache holds every token of a row but its last one (``last``),
    whose logits the next verification computes together with the proposals'. A row stops at a
    stop token (tokens after it are dropped) or after max_new_tokens tokens; a stopped row feeds
    nothing more (n_new = 0).
    """
    batch = len(prompts)
    history = [list(p) for p in prompts]
    sync = model.backend.synchronize

    # ---- prefill: each prompt but its last token (n_new[b] = len - 1 may be 0)
    t0 = time.perf_counter()
    lengths = np.array([len(p) for p in prompts], dtype=np.int64) - 1
    width = int(lengths.max())
    chunk = width if not prefill_chunk else int(prefill_chunk)
    ids = np.zeros((batch, max(width, 1)), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p) - 1] = p[:-1]
    for start in range(0, width, max(chunk, 1)):
        n_new = np.clip(lengths - start, 0, chunk)
        model.forward(ids[:, start:start + chunk], cache, n_new=n_new, last_only=True)
    sync()
    stats.prefill_ms = (time.perf_counter() - t0) * 1e3
    stats.prefill_tokens = int(lengths.sum())

    generated = np.zeros(batch, dtype=np.int64)
    done = np.zeros(batch, dtype=bool)
    decode_start = time.perf_counter()
    while not done.all():
        # Never propose past max_new_tokens: k proposals all accepted make k + 1 tokens.
        n_max = np.where(done, 0, np.minimum(k, max_new_tokens - generated - 1))
        draft_tokens, n_draft, q = proposer.propose(history, n_max, params, rng)
        kk = draft_tokens.shape[1]
        # One forward of [last, d_1 .. d_n] per row, right-padded: (batch, 1 + kk)
        n_new = np.where(done, 0, 1 + n_draft)
        ids = np.zeros((batch, 1 + kk), dtype=np.int64)
        ids[:, 0] = [h[-1] for h in history]
        ids[:, 1:] = draft_tokens
        held = cache.lengths.copy()
        logits = model.forward(ids, cache, n_new=n_new)                          # (batch, 1 + kk, vocab)
        n_accepted, next_token = _verify(logits, history, draft_tokens, n_draft, q, params, rng)
        n_accepted[done] = 0
        # Rewind past the rejected proposals: keep `last` and the accepted ones.
        keep = np.where(done, held, held + 1 + n_accepted)
        cache.truncate(keep)
        proposer.rewind(keep)
        stats.proposed_tokens += int(n_draft[~done].sum())
        stats.accepted_tokens += int(n_accepted[~done].sum())
        stats.verification_steps += int((~done).sum())

        new_tokens: list[list[int]] = []
        for b in range(batch):
            if done[b]:
                new_tokens.append([])
                continue
            tokens = draft_tokens[b, :n_accepted[b]].tolist() + [int(next_token[b])]
            stops = np.nonzero(np.isin(tokens, stop_tokens))[0]
            if stops.size:
                tokens, done[b] = tokens[:int(stops[0]) + 1], True
            history[b].extend(tokens)
            generated[b] += len(tokens)
            done[b] |= generated[b] >= max_new_tokens
            new_tokens.append(tokens)
        yield new_tokens
    sync()
    stats.decode_ms = (time.perf_counter() - decode_start) * 1e3
    stats.decode_tokens = int(generated.sum())


def _verify(logits, history, draft_tokens, n_draft, q, params: SamplingParams, rng):
    """The model's distributions (or choices) at each of the 1 + kk positions, then the acceptance rule."""
    batch, width, vocab = logits.shape
    # Position i of row b follows history[b] + d_1 .. d_i (for the repetition penalty).
    previous = None
    if params.repetition_penalty != 1.0:
        previous = [np.asarray(list(history[b]) + draft_tokens[b, :i].tolist(), dtype=np.int64)
                    for b in range(batch) for i in range(width)]
    rows = logits.reshape(batch * width, vocab)                                   # (batch * (1 + kk), vocab)
    if params.is_greedy:
        choices = sample(rows, params, None, previous).reshape(batch, width)
        return verify_greedy(choices, draft_tokens, n_draft)
    p = distribution(rows, params, previous).reshape(batch, width, vocab)
    return verify_sampled(p, draft_tokens, n_draft, q, rng)
