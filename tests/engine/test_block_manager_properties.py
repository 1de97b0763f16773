"""Hypothesis state machine over allocate/append/fork/free/preempt with a shadow page store.

Besides the pool invariants (free + used = total, no page both free and referenced, ref counts
>= 0), a shadow copy of the device pages checks that every computed token of every live
sequence is readable through its page table: prefix hits, forks and copy-on-write included.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jdecode.engine.block_manager import BlockManager
from jdecode.engine.request import Request

NUM_PAGES, PAGE_SIZE = 12, 3
# A 3-token vocabulary makes equal prefixes (and so prefix hits) common.
tokens = st.lists(st.integers(0, 2), min_size=1, max_size=8)


class PagedPoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_PAGES, PAGE_SIZE)
        self.shadow = [[None] * PAGE_SIZE for _ in range(NUM_PAGES)]
        self.live: list[Request] = []
        self.preempted: list[Request] = []
        self.next_id = 0

    def _new_id(self) -> str:
        self.next_id += 1
        return f"r{self.next_id}"

    def _run(self, req: Request, n: int, hits=(), sampled: int = 0) -> bool:
        """One step for one sequence: allocate, apply copies, write n tokens' 'K/V'."""
        if not self.bm.allocate_slots(req, n, hits):
            return False
        for src, dst in self.bm.take_copies():
            self.shadow[dst] = list(self.shadow[src])
        start = req.num_computed_tokens + len(hits) * PAGE_SIZE
        pages = self.bm.page_ids(req.request_id)
        for pos in range(start, start + n):
            self.shadow[pages[pos // PAGE_SIZE]][pos % PAGE_SIZE] = req.all_token_ids[pos]
        req.num_computed_tokens = start + n
        if req.num_computed_tokens == req.num_tokens:  # caught up: the step sampled a token
            req.append_output(sampled)
        return True

    def _admit(self, req: Request, chunk: int) -> bool:
        hits = self.bm.find_cached_prefix(req)
        n = min(chunk, req.num_tokens - len(hits) * PAGE_SIZE)
        return self._run(req, n, hits)

    @rule(prompt=tokens, chunk=st.integers(1, 8))
    def add(self, prompt, chunk):
        req = Request(self._new_id(), prompt)
        if self._admit(req, chunk):
            self.live.append(req)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 99), chunk=st.integers(1, 8), sampled=st.integers(0, 1000))
    def step(self, i, chunk, sampled):
        req = self.live[i % len(self.live)]
        n = min(chunk, req.num_tokens - req.num_computed_tokens)
        self._run(req, n, sampled=sampled)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 99), chunk=st.integers(1, 8))
    def preempt_after_scheduling(self, i, chunk):
        # Pages allocated for a step that never runs (preempted later in the same schedule).
        req = self.live.pop(i % len(self.live))
        self.bm.allocate_slots(req, min(chunk, req.num_tokens - req.num_computed_tokens))
        self.bm.free(req)
        req.num_computed_tokens = 0
        self.preempted.append(req)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 99))
    def fork(self, i):
        parent = self.live[i % len(self.live)]
        child = Request(self._new_id(), parent.all_token_ids)
        child.num_computed_tokens = parent.num_computed_tokens
        self.bm.fork(parent, child)
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 99), rounds=st.integers(1, 4), sampled=st.integers(0, 1000))
    def fork_and_diverge(self, i, rounds, sampled):
        # n > 1 sampling: siblings decode in lockstep and sample different tokens, so they
        # write different K/V into the page they shared at the fork.
        self.fork(i)
        pair = (self.live[i % len(self.live)], self.live[-1])
        for r in range(rounds):
            for k, req in enumerate(pair):
                n = req.num_tokens - req.num_computed_tokens
                self._run(req, n, sampled=sampled + 2 * r + k)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 99))
    def free(self, i):
        self.bm.free(self.live.pop(i % len(self.live)))

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 99))
    def preempt(self, i):
        req = self.live.pop(i % len(self.live))
        self.bm.free(req)
        req.num_computed_tokens = 0
        self.preempted.append(req)

    @precondition(lambda self: self.preempted)
    @rule(chunk=st.integers(1, 8))
    def resume(self, chunk):
        req = self.preempted[0]
        if self._admit(req, chunk):
            self.live.append(self.preempted.pop(0))

    @invariant()
    def pool_is_consistent(self):
        self.bm.check_invariants()

    @invariant()
    def computed_tokens_are_readable(self):
        for req in self.live:
            pages = self.bm.page_ids(req.request_id)
            assert len(pages) == self.bm.pages_needed(req.num_computed_tokens)
            for pos in range(req.num_computed_tokens):
                got = self.shadow[pages[pos // PAGE_SIZE]][pos % PAGE_SIZE]
                assert got == req.all_token_ids[pos], (req, pos, pages)

    @invariant()
    def cached_pages_hold_their_tokens(self):
        # Every hashed page must hold computed tokens: a hit reads it without recomputing.
        for page in range(NUM_PAGES):
            assert (self.bm.page_hash[page] is None) or None not in self.shadow[page]


PagedPoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=50,
                                              deadline=None)
TestPagedPool = PagedPoolMachine.TestCase
