"""The scheduler: which tokens of which sequences run in the next step, within a token budget.

Each step gets at most ``max_num_tokens`` tokens (the budget) and ``max_num_seqs`` sequences:

1. **Running sequences first, oldest first.** Each needs its next chunk: one token if it is
   decoding, up to the rest of the budget if its prompt is still being prefilled (chunked
   prefill: a long prompt is spread over several steps instead of stalling every decode).
2. **Then waiting sequences, in arrival order**, while budget and blocks last: admission takes the
   cached blocks of the longest cached prefix (prefix caching) and schedules the first chunk of
   the rest.

Every scheduled chunk needs its blocks (``BlockManager.write_blocks``). When the pool cannot give
them, the youngest running sequence is **preempted**: its blocks go back (full ones stay cached),
it returns to the front of the waiting queue, and later it is recomputed from its tokens (prompt
+ what it has generated so far), which gives exactly the K/V it had. The oldest sequence can
always run by preempting all younger ones, because the engine refuses at the door a request that
could not fit the whole pool alone; so the engine never deadlocks and never fails for lack of blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..sampling import SamplingParams
from .blocks import BlockManager

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)
class Sequence:
    """One stream of tokens the engine is producing (a request with ``n`` answers has ``n`` of them)."""

    seq_id: int
    request_id: str
    token_ids: list[int]                 # prompt + generated so far
    num_prompt_tokens: int
    max_tokens: int
    params: SamplingParams
    rng: Optional[np.random.Generator]
    stop_token_ids: frozenset
    n_forks: int = 0                     # siblings to fork off after the prompt (parallel sampling)
    child_rngs: list = field(default_factory=list)
    status: str = WAITING
    num_computed: int = 0                # leading tokens whose K/V are in the pool
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    finish_reason: Optional[str] = None
    index: int = 0                       # which of the request's n answers this is

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclass
class ScheduledChunk:
    seq: Sequence
    n_tokens: int                        # tokens num_computed .. num_computed + n_tokens - 1 run this step


@dataclass
class Schedule:
    chunks: list[ScheduledChunk]
    copies: list[tuple[int, int]]        # copy-on-write block copies to make before the forward
    preempted: list[Sequence]


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_tokens: int = 256, max_num_seqs: int = 64):
        self.blocks = blocks
        self.max_num_tokens, self.max_num_seqs = int(max_num_tokens), int(max_num_seqs)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence, schedule: Schedule) -> None:
        """Free ``seq``'s blocks and queue it first for recompute (its tokens are all it needs)."""
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.num_computed, seq.status = 0, WAITING
        self.waiting.appendleft(seq)
        schedule.preempted.append(seq)
        self.num_preemptions += 1

    def schedule(self) -> Schedule:
        schedule = Schedule([], [], [])
        budget = self.max_num_tokens
        # 1. Running sequences, oldest first; preempt from the youngest when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_write(seq, n) and self.running[-1] is not seq:
                self._preempt(self.running[-1], schedule)
            if not self.blocks.can_write(seq, n):
                self._preempt(seq, schedule)      # it was the youngest: it waits for the others
                break
            schedule.copies += self.blocks.write_blocks(seq, n)
            schedule.chunks.append(ScheduledChunk(seq, n))
            budget -= n
            i += 1
        # 2. Waiting sequences, in order, while there is budget, room in the batch, and blocks.
        # (Not after a preemption this step: the preempted one would be admitted again at once.)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not schedule.preempted:
            seq = self.waiting[0]
            seq.num_computed = self.blocks.take_cached_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_write(seq, n):
                self.blocks.release(seq)           # give the prefix back; try again next step
                seq.num_computed = 0
                break
            self.waiting.popleft()
            self.blocks.record_admission(seq, seq.num_computed)
            seq.status = RUNNING
            self.running.append(seq)
            schedule.copies += self.blocks.write_blocks(seq, n)
            schedule.chunks.append(ScheduledChunk(seq, n))
            budget -= n
        return schedule

    def finish(self, seq: Sequence, reason: str) -> None:
        """``seq`` is done (stop token, max tokens, or aborted): its blocks go back (full ones cached)."""
        if seq.status == RUNNING:
            self.running.remove(seq)
        elif seq.status == WAITING:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status, seq.finish_reason = FINISHED, reason
