"""Continuous batching under a token budget, the vLLM V1 way: no prefill or decode phase.

Each step gives every scheduled sequence a number of tokens to compute: one for a decode, a chunk
of its prompt otherwise. Running sequences go first (decode first, oldest first); waiting ones are
admitted in arrival order while the budget, `max_num_seqs` and the block pool allow. When blocks
run out, the newest running sequence is preempted: its blocks are freed and it is recomputed later
(its full blocks usually come back from the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ballast.engine.block_manager import BlockManager
from ballast.engine.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the known tokens, so a new token is sampled."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.unschedulable: Sequence | None = None

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[ScheduledSeq]:
        out: list[ScheduledSeq] = []
        budget = self._schedule_running(out, self.max_tokens)
        self._admit_waiting(out, budget)
        return out

    def _schedule_running(self, out: list[ScheduledSeq], budget: int) -> int:
        """Running sequences into `out`, preempting the newest when blocks run out; returns the budget left."""
        # Decodes before continuing prefills, each group oldest first.
        order = sorted(self.running, key=lambda s: (s.num_tokens - s.num_computed > 1, s.arrival))
        scheduled: set[int] = set()
        for seq in order:
            if budget <= 0:
                break
            if seq not in self.running:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._allocate_or_preempt(seq, n, scheduled):
                continue
            out.append(ScheduledSeq(seq, n))
            scheduled.add(id(seq))
            budget -= n
        return budget

    def _allocate_or_preempt(self, seq: Sequence, n: int, scheduled: set[int]) -> bool:
        """Blocks for `n` more tokens of `seq`, preempting the newest unscheduled others until they fit;
        False when `seq` itself had to go."""
        while not self.blocks.allocate(seq, seq.num_computed + n):
            victim = next((s for s in reversed(self.running) if id(s) not in scheduled and s is not seq), None)
            if victim is None:
                victim = seq
            self._preempt(victim)
            if victim is seq:
                break
        return seq.status is Status.RUNNING

    def _admit_waiting(self, out: list[ScheduledSeq], budget: int) -> None:
        """Waiting sequences in arrival order while the budget, `max_num_seqs` and the block pool allow."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # A waiting sequence holds no blocks: take its cached prefix now, give it back if it can't run.
            cached = self.blocks.match_prefix(seq)
            if not seq.admitted:
                seq.num_cached_tokens = cached
                seq.admitted = True
            seq.num_computed = cached
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.blocks.allocate(seq, seq.num_computed + n):
                self.blocks.free_seq(seq)
                seq.num_computed = 0
                if not self.running and not out:
                    self.unschedulable = seq  # cannot fit even alone: the engine fails it
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append(ScheduledSeq(seq, n))
            budget -= n
