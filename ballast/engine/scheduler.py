"""Continuous batching under a token budget, the vLLM V1 way: no prefill or decode phase.

Each step gives every scheduled sequence a number of tokens to compute: one for a decode, a chunk
of its prompt otherwise. Work is taken one priority class at a time, most important (lowest number)
first: that class's running sequences (decode first, oldest first), then its waiting ones in arrival
order while the budget, `max_num_seqs` and the block pool allow. Less important work therefore only
gets the slots, tokens and blocks left over. When a sequence needs blocks or a slot that isn't there,
the least important, most recently admitted running sequence is preempted: its blocks are freed and
it is recomputed later (its full blocks usually come back from the prefix cache; its generated tokens
are kept, so a greedy continuation is unchanged). A waiting sequence only preempts strictly less
important running work, so equal priorities never thrash.

Priorities are strict, with no aging: under a sustained flood of more important work, less important
work waits (or is preempted) indefinitely. That is the point of the classes (interactive traffic is
bounded by its clients, async and batch work has deadlines of minutes to hours and is retried or
re-queued by the platform), and aging would let a batch backlog steal interactive latency.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from ballast.engine.block_manager import BlockManager
from ballast.engine.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed
    draft: list[int] = field(default_factory=list)  # speculative tokens verified after a decode (speculative.py)
    draft_probs: torch.Tensor | None = None  # [len(draft), V] the draft's distributions (None: one-hot drafts)

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the known tokens, so a new token is sampled."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


def _waiting_key(seq: Sequence) -> tuple[int, float]:
    return (seq.priority, seq.arrival)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        # Sorted by (priority, arrival): a preempted sequence goes back ahead of later arrivals of its class.
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []  # in admission order: the last is the most recently admitted
        self.num_preemptions = 0
        self.unschedulable: Sequence | None = None
        self._preempted_now: set[int] = set()  # not readmitted in the step that preempted them
        self.max_loras = 0  # > 0: at most this many distinct adapters among running sequences (device slots)

    def add(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=_waiting_key)

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
        self.add(seq)
        self._preempted_now.add(id(seq))
        self.num_preemptions += 1

    def _victim(self, below: int, scheduled: set[int]) -> Sequence | None:
        """The least important, most recently admitted unscheduled running sequence with priority >= `below`."""
        best: Sequence | None = None
        for s in reversed(self.running):
            if id(s) not in scheduled and s.priority >= below and (best is None or s.priority > best.priority):
                best = s
        return best

    def schedule(self) -> list[ScheduledSeq]:
        out: list[ScheduledSeq] = []
        scheduled: set[int] = set()
        self._preempted_now = set()
        budget = self.max_tokens
        admitting = True
        for prio in sorted({s.priority for s in self.running} | {s.priority for s in self.waiting}):
            budget = self._schedule_running(out, scheduled, budget, prio)
            if admitting:
                budget, admitting = self._admit_waiting(out, scheduled, budget, prio)
        return out

    def _schedule_running(self, out: list[ScheduledSeq], scheduled: set[int], budget: int, prio: int) -> int:
        """Running sequences of `prio` into `out`, preempting when blocks run out; returns the budget left."""
        # Decodes before continuing prefills, each group oldest first.
        order = sorted((s for s in self.running if s.priority == prio),
                       key=lambda s: (s.num_tokens - s.num_computed > 1, s.arrival))
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
        """Blocks for `n` more tokens of `seq`, preempting unscheduled others (least important, newest
        first) until they fit; False when `seq` itself had to go."""
        while not self.blocks.allocate(seq, seq.num_computed + n):
            # Unscheduled running sequences are of this class or a less important one (classes go in order).
            victim = self._victim(seq.priority, scheduled | {id(seq)}) or seq
            self._preempt(victim)
            if victim is seq:
                break
        return seq.status is Status.RUNNING

    def _admit_waiting(self, out: list[ScheduledSeq], scheduled: set[int], budget: int,
                       prio: int) -> tuple[int, bool]:
        """Waiting sequences of `prio` in arrival order, preempting less important running work for a slot or
        blocks; returns the budget left and whether less important classes may still be admitted."""
        for seq in [s for s in self.waiting if s.priority == prio]:
            if budget <= 0 or id(seq) in self._preempted_now:
                return budget, False
            if not self._lora_fits(seq):
                continue  # its adapter would need one more device slot than there are; later work may run
            if not self._free_slot(prio, scheduled):
                return budget, False
            n = self._allocate_waiting(seq, budget, scheduled)
            if n is None:
                if not self.running and not out:
                    self.unschedulable = seq  # cannot fit even alone: the engine fails it
                return budget, False
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append(ScheduledSeq(seq, n))
            scheduled.add(id(seq))
            budget -= n
        return budget, True

    def _lora_fits(self, seq: Sequence) -> bool:
        if seq.lora is None or not self.max_loras:
            return True
        active = {s.lora.uid for s in self.running if s.lora is not None}
        return seq.lora.uid in active or len(active) < self.max_loras

    def _free_slot(self, prio: int, scheduled: set[int]) -> bool:
        """A sequence slot for a waiting sequence of `prio`, preempting a less important one if all are taken."""
        while len(self.running) >= self.max_num_seqs:
            victim = self._victim(prio + 1, scheduled)
            if victim is None:
                return False
            self._preempt(victim)
        return True

    def _allocate_waiting(self, seq: Sequence, budget: int, scheduled: set[int]) -> int | None:
        """Blocks for the next chunk of waiting `seq`, preempting less important running work while short;
        returns the chunk's size, or None (holding nothing) when it can't fit."""
        while True:
            # A waiting sequence holds no blocks: take its cached prefix now, give it back if it can't run.
            cached = self.blocks.match_prefix(seq)
            if not seq.admitted:
                seq.num_cached_tokens = cached
                seq.admitted = True
            seq.num_computed = cached
            n = min(seq.num_tokens - seq.num_computed, budget)
            if self.blocks.allocate(seq, seq.num_computed + n):
                return n
            self.blocks.free_seq(seq)
            seq.num_computed = 0
            victim = self._victim(seq.priority + 1, scheduled)
            if victim is None:
                return None
            self._preempt(victim)
