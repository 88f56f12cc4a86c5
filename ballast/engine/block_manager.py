"""The paged KV cache's bookkeeping: a fixed pool of blocks, block tables and prefix caching.

A full block is identified by a BLAKE2b digest chained over its parent's digest and its own token
ids, so equal prefixes map to equal blocks and no one can craft two prefixes that share a block
(Python's `hash` of a tuple can be collided on purpose, which would leak one tenant's KV cache to
another). Blocks are reference counted; a block whose count drops to zero keeps its contents and
digest and joins the free queue (an LRU, O(1) via OrderedDict) until it is reused, so a later
request with the same prefix finds it again.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from ballast.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hit_tokens = 0
        self.query_tokens = 0

    # ---- accounting ------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    # ---- allocation ------------------------------------------------------------------------
    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)  # least recently freed first
        h = self.block_hash[block]
        if h is not None:  # evict its cached contents
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None
        self.ref[block] = 1
        return block

    @staticmethod
    def _chain(parent: bytes | None, tokens: list[int]) -> bytes:
        h = hashlib.blake2b(parent or b"root", digest_size=32)
        h.update(array("q", tokens).tobytes())  # fixed-width ids: no two token lists give the same bytes
        return h.digest()

    def match_prefix(self, seq: Sequence) -> int:
        """On first admission: share cached full blocks of the prompt; returns tokens found cached.

        At least one token is always left to compute, so the step produces logits to sample from.
        """
        if not self.prefix_caching:
            return 0
        bs = self.block_size
        limit = (seq.num_tokens - 1) // bs
        parent = seq.cache_root
        matched = 0
        for i in range(limit):
            h = self._chain(parent, seq.token_ids[i * bs : (i + 1) * bs])
            block = self.hash_to_block.get(h)
            if block is None:
                break
            if self.ref[block] == 0:
                del self.free[block]
            self.ref[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
            matched += 1
        seq.num_hashed_blocks = matched
        if not seq.admitted:  # count a prompt once, not on every retry or resume
            self.query_tokens += seq.num_tokens
            self.hit_tokens += matched * bs
        return matched * bs

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table to hold `num_tokens`; False (and nothing taken) if the pool is short."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free):
            return False
        for _ in range(need):
            seq.block_table.append(self._take())
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: publish the sequence's newly completed full blocks in the prefix cache."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed // bs
        parent = seq.block_hashes[-1] if seq.block_hashes else seq.cache_root
        for i in range(seq.num_hashed_blocks, full):
            h = self._chain(parent, seq.token_ids[i * bs : (i + 1) * bs])
            block = seq.block_table[i]
            if h not in self.hash_to_block:
                self.hash_to_block[h] = block
                self.block_hash[block] = h
            seq.block_hashes.append(h)
            parent = h
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back tail blocks beyond `num_tokens` (taken for rejected speculative tokens, never cached)."""
        keep = -(-num_tokens // self.block_size)
        while len(seq.block_table) > max(keep, seq.num_hashed_blocks):
            block = seq.block_table.pop()
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None
                self.free.move_to_end(block, last=False)

    def free_seq(self, seq: Sequence) -> None:
        """Release a sequence's blocks (finish, abort or preemption)."""
        for block in reversed(seq.block_table):  # tail blocks are evicted before the shared prefix
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None
                if self.block_hash[block] is None:
                    self.free.move_to_end(block, last=False)  # nothing cached: reuse first
        seq.block_table = []
        seq.block_hashes = []
        seq.num_hashed_blocks = 0
        seq.draft_computed = 0  # a draft model's cache of it went with the blocks
