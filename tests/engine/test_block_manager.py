"""Exact allocator tests: which page ids, what eviction order, copy-on-write, atomicity."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jdecode.engine import block_manager
from jdecode.engine.block_manager import BlockManager, hash_page
from jdecode.engine.request import Request


def make(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens)


def compute(bm: BlockManager, req: Request, n: int, hits=()) -> None:
    """Allocates n tokens after the hits and marks them computed (as a finished step would)."""
    assert bm.allocate_slots(req, n, hits)
    req.num_computed_tokens += len(hits) * bm.page_size + n
    bm.check_invariants()


def test_host_modules_import_no_jax():
    # jdecode/__init__ imports jax for its convenience API, so an empty package stands in for
    # it: what is checked is that the engine's host-side modules pull in no jax themselves.
    package_dir = Path(block_manager.__file__).parents[1]
    code = ("import sys, types; pkg = types.ModuleType('jdecode'); "
            f"pkg.__path__ = [{str(package_dir)!r}]; sys.modules['jdecode'] = pkg; "
            "import jdecode.engine.request, jdecode.engine.block_manager, "
            "jdecode.engine.scheduler; "
            "assert 'jax' not in sys.modules, [m for m in sys.modules if m.startswith('jax')]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pages_come_from_the_front_of_the_free_queue_in_order():
    bm = BlockManager(num_pages=8, page_size=4)
    a, b = make("a", list(range(10))), make("b", list(range(20, 25)))
    compute(bm, a, 10)
    compute(bm, b, 5)
    assert bm.page_ids("a") == [0, 1, 2]
    assert bm.page_ids("b") == [3, 4]
    assert (bm.num_free_pages, bm.num_used_pages) == (3, 5)
    # Growing by one token inside page 2 needs no page; two more tokens need one.
    assert bm.allocate_slots(a, 2)
    assert bm.page_ids("a") == [0, 1, 2]
    a.num_computed_tokens = 12
    a.all_token_ids += [10, 11, 12]
    assert bm.allocate_slots(a, 1)
    assert bm.page_ids("a") == [0, 1, 2, 5]


def test_unhashed_pages_return_to_the_front_and_are_reused_first():
    bm = BlockManager(num_pages=6, page_size=4, enable_prefix_caching=False)
    a = make("a", list(range(10)))
    compute(bm, a, 10)
    bm.free(a)
    assert list(bm.free_queue) == [0, 1, 2, 3, 4, 5]
    b = make("b", list(range(5)))
    compute(bm, b, 5)
    assert bm.page_ids("b") == [0, 1]


def test_prefix_hit_shares_full_pages_and_skips_the_last_token():
    bm = BlockManager(num_pages=8, page_size=4)
    a = make("a", list(range(10)))
    compute(bm, a, 10)
    bm.free(a)
    # Pages 0 and 1 are full and cached; the partial page 2 is worthless and goes to the front.
    assert list(bm.free_queue) == [2, 3, 4, 5, 6, 7, 1, 0]
    assert bm.page_hash[0] == hash_page(None, [0, 1, 2, 3])
    assert bm.page_hash[1] == hash_page(bm.page_hash[0], [4, 5, 6, 7])
    b = make("b", list(range(9)) + [99])
    hits = bm.find_cached_prefix(b)
    assert hits == [0, 1]
    compute(bm, b, 2, hits)
    assert bm.page_ids("b") == [0, 1, 2]
    assert b.num_computed_tokens == 10
    # An exact 8-token prompt hits only one page: its last token must be computed for logits.
    c = make("c", list(range(8)))
    assert bm.find_cached_prefix(c) == [0]
    # A different first page breaks the chain even though page 2's tokens match.
    d = make("d", [7, 1, 2, 3, 4, 5, 6, 7, 0])
    assert bm.find_cached_prefix(d) == []


def test_lru_evicts_the_tail_of_the_oldest_prefix_first():
    bm = BlockManager(num_pages=6, page_size=2)
    a = make("a", [1, 2, 3, 4, 5])
    compute(bm, a, 5)  # pages 0, 1 full; 2 partial
    b = make("b", [7, 8, 9, 10])
    compute(bm, b, 4)  # pages 3, 4 full (the last token is computed here, so both hash)
    bm.free(a)
    bm.free(b)
    # a freed before b: a's pages are older. Reversed release puts each tail before its head.
    assert list(bm.free_queue) == [2, 5, 1, 0, 4, 3]
    e = make("e", [50, 51, 52, 53, 54, 55, 56])
    compute(bm, e, 7)
    assert bm.page_ids("e") == [2, 5, 1, 0]  # evicted a's tail (1) then a's head (0)
    assert bm.find_cached_prefix(make("a2", [1, 2, 3, 4, 5])) == []
    assert bm.find_cached_prefix(make("b2", [7, 8, 9, 10, 11])) == [3, 4]
    assert len(bm.cached) == 2


def test_hit_on_a_used_page_increments_its_ref_count():
    bm = BlockManager(num_pages=8, page_size=4)
    a = make("a", list(range(9)))
    compute(bm, a, 9)
    a.append_output(100)
    assert bm.allocate_slots(a, 1)  # hashes a's computed full pages 0, 1
    b = make("b", list(range(8)) + [42, 43])
    hits = bm.find_cached_prefix(b)
    assert hits == [0, 1]
    compute(bm, b, 2, hits)
    assert bm.ref_counts[:4] == [2, 2, 1, 1]
    assert bm.page_ids("b") == [0, 1, 3]
    bm.free(a)
    assert bm.ref_counts[:4] == [1, 1, 0, 1]
    assert next(iter(bm.free_queue)) == 2


def test_fork_shares_pages_and_copies_the_partial_page_on_write():
    bm = BlockManager(num_pages=8, page_size=4)
    parent = make("p", list(range(6)))
    compute(bm, parent, 5)  # stop before the last prompt token: the fork point
    child = parent.make_child("c", 1)
    bm.fork(parent, child)
    child.num_computed_tokens = 5
    bm.check_invariants()
    assert bm.ref_counts[:3] == [2, 2, 0]
    # The child writes position 5 into the shared page 1: it gets a private copy (page 2).
    assert bm.allocate_slots(child, 1)
    assert bm.page_ids("c") == [0, 2]
    assert bm.ref_counts[:3] == [2, 1, 1]
    # The parent is now page 1's only owner and writes in place.
    assert bm.allocate_slots(parent, 1)
    assert bm.page_ids("p") == [0, 1]
    assert bm.take_copies() == [(1, 2)]
    assert bm.take_copies() == []
    bm.check_invariants()


def test_page_arrays_follow_the_page_tables():
    """The int32 arrays the runner copies block-table rows from equal the page lists through
    growth past their capacity, a copy-on-write page swap and a free; views are read-only."""
    bm = BlockManager(num_pages=64, page_size=2)
    parent = make("p", list(range(41)))
    compute(bm, parent, 3)  # a partial second page: the fork point
    child = parent.make_child("c", 1)
    bm.fork(parent, child)
    child.num_computed_tokens = 3
    assert bm.allocate_slots(child, 1)  # writes into the shared page: swapped for a copy
    assert bm.page_array("c").tolist() == bm.page_ids("c") != bm.page_ids("p")
    compute(bm, parent, 37)  # 20 pages: past the array's first capacity (16)
    assert bm.page_array("p").tolist() == bm.page_ids("p") and len(bm.page_ids("p")) == 20
    with pytest.raises(ValueError, match="read-only"):
        bm.page_array("p")[0] = 5
    bm.free(parent)
    assert bm.page_array("p").size == 0
    bm.check_invariants()


def test_fork_at_a_page_boundary_needs_no_copy():
    bm = BlockManager(num_pages=8, page_size=4)
    parent = make("p", list(range(9)))
    compute(bm, parent, 8)
    child = parent.make_child("c", 1)
    bm.fork(parent, child)
    child.num_computed_tokens = 8
    assert bm.allocate_slots(child, 1) and bm.allocate_slots(parent, 1)
    assert bm.page_ids("c") == [0, 1, 2]
    assert bm.page_ids("p") == [0, 1, 3]
    assert bm.take_copies() == []


def test_freeing_a_copy_target_cancels_the_copy():
    bm = BlockManager(num_pages=8, page_size=4)
    parent = make("p", list(range(6)))
    compute(bm, parent, 5)
    child = parent.make_child("c", 1)
    bm.fork(parent, child)
    child.num_computed_tokens = 5
    assert bm.allocate_slots(child, 1)
    bm.free(child)
    assert bm.take_copies() == []
    assert bm.ref_counts[:3] == [1, 1, 0]


def test_failed_allocation_changes_nothing():
    bm = BlockManager(num_pages=4, page_size=4)
    a = make("a", list(range(8)))
    compute(bm, a, 8)
    bm.free(a)  # pages 1, 0 cached at the tail
    b = make("b", list(range(8)) + list(range(100, 120)))  # 28 tokens: 7 pages
    hits = bm.find_cached_prefix(b)
    assert hits == [0, 1]
    before = (list(bm.free_queue), list(bm.ref_counts), dict(bm.cached))
    assert not bm.allocate_slots(b, 20, hits)  # needs 5 new pages, 2 are free after the hits
    assert (list(bm.free_queue), list(bm.ref_counts), dict(bm.cached)) == before
    assert bm.page_ids("b") == []
    assert bm.allocate_slots(b, 8, hits)
    assert bm.page_ids("b") == [0, 1, 2, 3]
    assert bm.num_free_pages == 0


def test_prefix_hit_rejected_for_a_request_that_holds_pages():
    bm = BlockManager(num_pages=4, page_size=2)
    a = make("a", [1, 2, 3])
    compute(bm, a, 1)
    with pytest.raises(ValueError, match="already holds pages"):
        bm.allocate_slots(a, 1, [3])


def test_reset_prefix_cache_keeps_used_pages_hashed():
    bm = BlockManager(num_pages=6, page_size=2)
    a, b = make("a", [1, 2, 3]), make("b", [4, 5, 6])
    compute(bm, a, 3)
    compute(bm, b, 3)
    bm.free(a)
    assert bm.allocate_slots(b, 0)  # hashes b's full page
    bm.reset_prefix_cache()
    assert list(bm.cached.values()) == [2]
    bm.check_invariants()
