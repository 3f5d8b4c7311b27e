"""The engine: continuous batching. Requests enter and leave at any step; every step is one forward.

    engine = Engine(model, num_blocks=256, block_size=16, max_num_tokens=128)
    engine.add_request([72, 105], max_tokens=20)          # any time, also between steps
    while engine.has_unfinished():
        for out in engine.step():                          # one forward over every scheduled token
            print(out.request_id, out.new_token_ids, out.finish_reason)

One step:

1. the scheduler picks this step's chunks (decodes and prefill chunks, within the token budget),
   taking blocks, preempting when they run out (scheduler.py, blocks.py);
2. the K/V store makes the copy-on-write copies, then the chunks are flattened into T rows of one
   token each, every row with its position and its sequence's block table (kv_store.py);
3. ``model.forward(ids (T, 1), cache=store, last_only=True)``: the unchanged model, one forward;
4. each sequence whose chunk reached its last token samples its next token from its own row, with
   its own sampling parameters and random generator; full blocks get their hashes (prefix caching);
   a stop token or ``max_tokens`` finishes a sequence and its blocks go back.

Greedy output equals ``model.generate(prompt, temperature=0.0)`` of each prompt alone, whatever
else runs beside it, with or without prefix caching and preemption (tests/test_serving.py); a
sampled one equals ``generate(prompt, temperature=T, seed=s)`` too, since each request draws from
its own ``default_rng(seed)`` exactly once per token, as ``generate`` does.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence as TypingSequence

import numpy as np

from ..errors import CacheOverflowError, ConfigError, InvalidInputError, SequenceTooLongError
from ..generate import resolve_options
from ..sampling import SamplingParams, sample
from .blocks import BlockManager, PrefixStats
from .kv_store import PagedKVStore
from .scheduler import FINISHED, RUNNING, Scheduler, Sequence

_GREEDY = SamplingParams(temperature=0.0)


@dataclass
class RequestOutput:
    """What one step produced for one answer of one request."""

    request_id: str
    index: int                               # which of the request's n answers
    new_token_ids: list[int]                 # 0 or 1 tokens (0 when it finished on a stop token)
    finished: bool = False
    finish_reason: Optional[str] = None      # "stop", "length" or "abort"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


@dataclass
class EngineStats:
    steps: int = 0
    scheduled_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    forward_s: float = 0.0
    prefix: PrefixStats = field(default_factory=PrefixStats)


def _positive_int(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInputError(f"{name}={value!r} must be a positive integer")
    return int(value)


class Engine:
    """Continuous batching over one paged K/V pool, with prefix caching and preemption."""

    def __init__(self, model, *, num_blocks: Optional[int] = None, block_size: int = 16, max_num_tokens: int = 256,
                 max_num_seqs: int = 64, prefix_caching: bool = True, cache_dtype: Optional[str] = None):
        for name, value in (("block_size", block_size), ("max_num_tokens", max_num_tokens),
                            ("max_num_seqs", max_num_seqs)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        self.model = model
        max_positions = model.config.max_position_embeddings
        if num_blocks is None:
            num_blocks = max(1024, -(-max_positions // block_size))
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching=prefix_caching)
        self.store = PagedKVStore(model, num_blocks, block_size, dtype=cache_dtype)
        self.scheduler = Scheduler(self.blocks, max_num_tokens=max_num_tokens, max_num_seqs=max_num_seqs)
        self.stats = EngineStats(prefix=self.blocks.stats)
        # The stop ids generate uses by default: generation_config.json's eos ids, else config.json's.
        self.default_stop_ids = frozenset(resolve_options(model, stop_tokens=None)["stop_tokens"])
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self.requests: dict[str, list[Sequence]] = {}
        self.last_step: list[tuple[str, int, int, int]] = []

    # ------------------------------------------------------------ requests in and out
    def add_request(self, prompt_ids: TypingSequence[int], max_tokens: int = 16, *, temperature: float = 0.0,
                    top_p: Optional[float] = None, top_k: Optional[int] = None, seed: Optional[int] = None,
                    stop_token_ids: Optional[Iterable[int]] = None, n: int = 1,
                    request_id: Optional[str] = None) -> str:
        """Queue a request; it joins the batch at the next step. Checked here, at the door:
        returns its id, or raises a MinikvError naming the bad value and changes nothing."""
        config = self.model.config
        if isinstance(prompt_ids, np.ndarray):
            prompt_ids = prompt_ids.tolist()
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise InvalidInputError(f"prompt_ids={prompt_ids!r:.60} must be a non-empty list of token ids")
        for t in prompt_ids:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < config.vocab_size:
                raise InvalidInputError(f"token id {t!r} is out of range for a vocabulary of {config.vocab_size} "
                                        f"(valid ids are 0..{config.vocab_size - 1})")
        max_tokens, n = _positive_int("max_tokens", max_tokens), _positive_int("n", n)
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
        # The last token is returned, never fed back: prompt + max_tokens - 1 positions.
        needed = len(prompt_ids) + max_tokens - 1
        if needed > config.max_position_embeddings:
            raise SequenceTooLongError(
                f"prompt of {len(prompt_ids)} tokens + max_tokens={max_tokens} needs {needed} positions but the model "
                f"has {config.max_position_embeddings} (max_position_embeddings); pass max_tokens<="
                f"{config.max_position_embeddings - len(prompt_ids) + 1} or shorten the prompt")
        if self.blocks.blocks_for(needed) > self.blocks.num_blocks:
            raise CacheOverflowError(
                f"a request of {needed} positions needs {self.blocks.blocks_for(needed)} blocks of "
                f"{self.blocks.block_size}; the pool has {self.blocks.num_blocks} (pass a larger num_blocks)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise InvalidInputError(f"seed={seed!r} must be a non-negative integer or None")
        stop = self.default_stop_ids if stop_token_ids is None else frozenset(int(t) for t in stop_token_ids)
        request_id = f"req-{next(self._request_ids)}" if request_id is None else str(request_id)
        if request_id in self.requests:
            raise InvalidInputError(f"request_id={request_id!r} is already in use")

        def rng(i):
            # Answer i draws from default_rng(seed + i): answer 0 is exactly generate(..., seed=seed).
            return np.random.default_rng(None if seed is None else seed + i)

        seq = Sequence(seq_id=next(self._seq_ids), request_id=request_id, token_ids=[int(t) for t in prompt_ids],
                       num_prompt_tokens=len(prompt_ids), max_tokens=max_tokens, params=params, rng=rng(0),
                       stop_token_ids=stop, n_forks=n - 1, child_rngs=[rng(i) for i in range(1, n)])
        self.requests[request_id] = [seq]
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str, index: Optional[int] = None) -> None:
        """Stop a request now (a client went away), or only its answer ``index`` (a stop string ended
        it): those sequences finish and their blocks go back."""
        seqs = self.requests.get(request_id, [])
        for seq in seqs:
            if seq.status != FINISHED and index in (None, seq.index):
                self.scheduler.finish(seq, "abort")
        if index is None or all(s.status == FINISHED for s in seqs):
            self.requests.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------ one step
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward over every scheduled token, sample, finish. Returns the outputs."""
        schedule = self.scheduler.schedule()
        self.stats.preemptions = self.scheduler.num_preemptions
        if not schedule.chunks:
            return []
        self.store.copy_blocks(schedule.copies)
        # What ran, for lessons and debugging: (request, answer, first position, tokens) per chunk.
        self.last_step = [(c.seq.request_id, c.seq.index, c.seq.num_computed, c.n_tokens) for c in schedule.chunks]
        ids, positions, tables, last_rows = self._flatten(schedule.chunks)
        # rows segments[i]:segments[i+1] are chunk i's tokens (last_rows[i] + 1 = where chunk i ends)
        self.store.bind(positions, tables, np.array([0] + [row + 1 for row in last_rows], dtype=np.int64))
        t0 = time.perf_counter()
        # Logits only for the rows that end a chunk at its sequence's last token (they sample next).
        sampling = [i for i, (c, row) in enumerate(zip(schedule.chunks, last_rows))
                    if c.seq.num_computed + c.n_tokens == len(c.seq.token_ids)]
        logits = self.model.forward(ids[:, None], cache=self.store, last_only=True,
                                    logit_rows=np.array([last_rows[i] for i in sampling], dtype=np.int64))
        logit_of = dict(zip(sampling, range(len(sampling))))        # chunk -> its row of logits
        self.stats.forward_s += time.perf_counter() - t0
        self.stats.steps += 1
        self.stats.scheduled_tokens += len(ids)
        pending = []                         # (sequence, its row of logits): each samples one token now
        for i, chunk in enumerate(schedule.chunks):
            seq = chunk.seq
            seq.num_computed += chunk.n_tokens
            self.blocks.register_full_blocks(seq)
            if seq.num_computed < len(seq.token_ids):
                continue                     # a prefill chunk that did not reach the end of the prompt
            pending += [(member, logit_of[i]) for member in [seq] + self._fork_children(seq)]
        return [self._append_token(seq, token) for (seq, _), token in zip(pending, self._sample(pending, logits))]

    def _sample(self, pending, logits) -> list[int]:
        """One token per (sequence, row of logits). The greedy ones in one ``sample`` call over their rows
        together: greedy takes each row's argmax and draws no random numbers, so batching them changes no
        token (and saves a call with its checks per row: ~2% of a 32-sequence step on `mid`). The others
        one call each, with the sequence's own generator: its seed's stream must not depend on which
        other sequences share the step."""
        tokens = [0] * len(pending)
        greedy = [k for k, (seq, _) in enumerate(pending) if seq.params.is_greedy]
        if greedy:
            rows = [pending[k][1] for k in greedy]
            # (greedy, vocab); the common case, every row greedy and in order, without a copy
            greedy_logits = logits if rows == list(range(len(logits))) else logits[rows]
            for k, token in zip(greedy, sample(greedy_logits, _GREEDY, None).tolist()):
                tokens[k] = token
        for k, (seq, row) in enumerate(pending):
            if not seq.params.is_greedy:
                tokens[k] = int(sample(logits[row:row + 1], seq.params, seq.rng)[0])
        return tokens

    def _flatten(self, chunks):
        """The step's ragged batch as T rows of one token: ids (T,), positions (T,), block tables
        (T, columns) (row r gets its sequence's table), and the row of each chunk's last token."""
        total = sum(c.n_tokens for c in chunks)
        columns = max(len(c.seq.block_table) for c in chunks)
        ids = np.empty(total, dtype=np.int64)
        positions = np.empty(total, dtype=np.int64)
        tables = np.full((total, columns), -1, dtype=np.int32)
        last_rows, row = [], 0
        for c in chunks:
            start, n = c.seq.num_computed, c.n_tokens
            ids[row:row + n] = c.seq.token_ids[start:start + n]
            positions[row:row + n] = np.arange(start, start + n)
            tables[row:row + n, :len(c.seq.block_table)] = c.seq.block_table
            row += n
            last_rows.append(row - 1)
        return ids, positions, tables, last_rows

    def _fork_children(self, seq: Sequence) -> list[Sequence]:
        """Parallel sampling: after the prompt, n - 1 siblings share its blocks (copy-on-write)."""
        children = []
        for i, rng in enumerate(seq.child_rngs, start=1):
            child = Sequence(seq_id=next(self._seq_ids), request_id=seq.request_id, token_ids=list(seq.token_ids),
                             num_prompt_tokens=seq.num_prompt_tokens, max_tokens=seq.max_tokens, params=seq.params,
                             rng=rng, stop_token_ids=seq.stop_token_ids, status=RUNNING,
                             num_computed=seq.num_computed, index=i)
            self.blocks.fork(seq, child)
            self.scheduler.running.append(child)
            self.requests[seq.request_id].append(child)
            children.append(child)
        seq.child_rngs, seq.n_forks = [], 0
        return children

    def _append_token(self, seq: Sequence, token: int) -> RequestOutput:
        new = []
        if token in seq.stop_token_ids:
            reason = "stop"                  # like generate: the stop token is not part of the output
        else:
            seq.token_ids.append(token)
            new = [token]
            reason = "length" if len(seq.output_ids) >= seq.max_tokens else None
        self.stats.generated_tokens += len(new)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            if all(s.status == FINISHED for s in self.requests.get(seq.request_id, [])) and not seq.n_forks:
                self.requests.pop(seq.request_id, None)
        return RequestOutput(seq.request_id, seq.index, new, reason is not None, reason, seq.num_prompt_tokens,
                             len(seq.output_ids))

    # ------------------------------------------------------------ conveniences
    def generate(self, prompts: TypingSequence[TypingSequence[int]], max_tokens: int = 16,
                 **options) -> list[list[int]]:
        """Run these prompts to completion together; per prompt, the generated ids (answer 0)."""
        ids = [self.add_request(p, max_tokens, **options) for p in prompts]
        tokens = {i: [] for i in ids}
        while self.has_unfinished():
            for out in self.step():
                if out.index == 0:
                    tokens[out.request_id] += out.new_token_ids
        return [tokens[i] for i in ids]

    def live_block_tables(self) -> list[list[int]]:
        return [s.block_table for s in self.scheduler.running + list(self.scheduler.waiting)]

    def check_blocks(self) -> None:
        """The block accounting matches the live sequences (AssertionError otherwise)."""
        self.blocks.check(self.live_block_tables())
