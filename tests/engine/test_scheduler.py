"""Exact scheduler tests: budget, decode-first order, chunked prefill, preemption, abort, static."""

from __future__ import annotations

import pytest

from jdecode.engine.block_manager import BlockManager
from jdecode.engine.request import Request, RequestStatus
from jdecode.engine.scheduler import Scheduler, SchedulerConfig


def make_scheduler(num_pages=32, page_size=4, **cfg) -> Scheduler:
    cfg.setdefault("max_model_len", 64)
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_pages, page_size))


def step(sched: Scheduler, max_new: int = 100):
    """Runs one step with a fake model whose next token is 1000 + number of outputs so far."""
    out = sched.schedule()
    plan = [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks]
    sampled = {c.request.request_id: 1000 + c.request.num_output_tokens
               for c in out.chunks if c.samples}
    for req in sched.update_from_output(out, sampled):
        if req.num_output_tokens >= max_new:
            sched.finish_request(req.request_id, RequestStatus.FINISHED_LENGTH)
    bm = sched.block_manager
    bm.check_invariants()
    for req in sched.running:  # exactly the pages the computed tokens need, no more
        assert len(bm.page_ids(req.request_id)) == bm.pages_needed(req.num_computed_tokens)
    return plan, out


def test_budget_is_respected_and_chunked_prefill_catches_up():
    sched = make_scheduler(max_num_batched_tokens=8)
    a = Request("a", list(range(20)))
    sched.add_request(a)
    assert step(sched)[0] == [("a", 0, 8)]
    assert step(sched)[0] == [("a", 8, 8)]
    assert a.output_token_ids == []
    assert step(sched)[0] == [("a", 16, 4)]  # caught up: this chunk samples
    assert a.output_token_ids == [1000]
    assert step(sched)[0] == [("a", 20, 1)]
    assert a.output_token_ids == [1000, 1001]


def test_decodes_first_then_prefill_chunks_then_admission():
    sched = make_scheduler(max_num_batched_tokens=6)
    a, b, c = Request("a", [1, 2]), Request("b", list(range(10))), Request("c", [5, 6, 7])
    sched.add_request(a)
    sched.add_request(b)
    assert step(sched)[0] == [("a", 0, 2), ("b", 0, 4)]
    sched.add_request(c)
    assert step(sched)[0] == [("a", 2, 1), ("b", 4, 5)]  # b's prefill takes the rest
    assert step(sched)[0] == [("a", 3, 1), ("b", 9, 1), ("c", 0, 3)]
    assert step(sched)[0] == [("a", 4, 1), ("b", 10, 1), ("c", 3, 1)]


def test_max_num_seqs_limits_admission():
    sched = make_scheduler(max_num_batched_tokens=100, max_num_seqs=2)
    for rid in "abc":
        sched.add_request(Request(rid, [1, 2, 3]))
    assert [r for r, _, _ in step(sched)[0]] == ["a", "b"]
    assert sched.num_waiting == 1


def test_max_chunk_tokens_caps_each_request():
    sched = make_scheduler(max_num_batched_tokens=100, max_chunk_tokens=5)
    sched.add_request(Request("a", list(range(12))))
    sched.add_request(Request("b", list(range(3))))
    assert step(sched)[0] == [("a", 0, 5), ("b", 0, 3)]
    assert step(sched)[0] == [("b", 3, 1), ("a", 5, 5)]


def test_preemption_by_recompute_when_pages_run_out_keeps_outputs():
    # 4 pages of 2 slots. a and b each hold 2 pages after prefill; the first decode that needs
    # a third page preempts the latest admitted request (b).
    sched = make_scheduler(num_pages=4, page_size=2, max_num_batched_tokens=16, max_model_len=8)
    a, b = Request("a", [1, 2, 3]), Request("b", [4, 5, 6])
    sched.add_request(a)
    sched.add_request(b)
    assert step(sched)[0] == [("a", 0, 3), ("b", 0, 3)]
    assert step(sched)[0] == [("a", 3, 1), ("b", 3, 1)]
    assert sched.block_manager.page_ids("a") == [0, 1]
    assert sched.block_manager.page_ids("b") == [2, 3]
    plan, out = step(sched)
    assert plan == [("a", 4, 1)]
    assert [r.request_id for r in out.preempted] == ["b"]
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0
    assert b.output_token_ids == [1000, 1001]  # recompute keeps what was sampled
    assert sched.stats.num_preemptions == 1
    assert sched.block_manager.page_ids("a") == [0, 1, 3]  # b's tail page, freed first
    sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    # b's full page [4, 5] stayed cached, so the recompute starts at token 2.
    assert step(sched)[0] == [("b", 2, 3)]
    assert b.output_token_ids == [1000, 1001, 1002]


def test_preempting_a_decode_already_scheduled_returns_its_budget():
    sched = make_scheduler(num_pages=4, page_size=2, max_num_batched_tokens=16, max_model_len=8)
    a, b = Request("a", [1, 2, 3, 4]), Request("b", [5, 6, 7])
    sched.add_request(a)
    sched.add_request(b)
    step(sched)  # a: pages 0, 1; b: pages 2, 3
    # b decodes first (its gap is 1) into its page 3; a's decode then needs a fifth page.
    plan, out = step(sched)
    assert [r.request_id for r in out.preempted] == ["b"]
    assert plan == [("a", 4, 1)]
    assert out.num_batched_tokens == 1


def test_abort_frees_pages_at_once():
    sched = make_scheduler(num_pages=8, page_size=4, max_num_batched_tokens=32, max_model_len=32)
    a, b = Request("a", list(range(10))), Request("b", list(range(6)))
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    assert sched.block_manager.num_free_pages == 3
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert sched.block_manager.num_free_pages == 6
    assert a.status == RequestStatus.FINISHED_ABORTED and sched.running == [b]
    sched.add_request(c := Request("c", [9]))
    sched.finish_request("c", RequestStatus.FINISHED_ABORTED)  # still waiting
    assert not sched.waiting and c.is_finished


def test_abort_during_a_step_drops_its_result():
    sched = make_scheduler()
    a = Request("a", [1, 2])
    sched.add_request(a)
    out = sched.schedule()
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert sched.update_from_output(out, {"a": 7}) == []
    assert a.output_token_ids == []


def test_static_batching_admits_the_next_batch_only_when_the_batch_is_done():
    sched = make_scheduler(max_num_batched_tokens=4, max_num_seqs=2, policy="static")
    for rid, n in (("a", 3), ("b", 3), ("c", 2)):
        sched.add_request(Request(rid, list(range(n))))
    # Both of the batch are admitted even though b's prefill does not fit this step's budget.
    assert step(sched, max_new=2)[0] == [("a", 0, 3), ("b", 0, 1)]
    assert step(sched, max_new=2)[0] == [("a", 3, 1), ("b", 1, 2)]
    assert step(sched, max_new=2)[0] == [("b", 3, 1)]  # a is done; its seat stays empty
    assert step(sched, max_new=2)[0] == [("c", 0, 2)]


def test_without_chunked_prefill_prefills_run_whole_and_alone():
    sched = make_scheduler(max_num_batched_tokens=64, enable_chunked_prefill=False)
    sched.add_request(Request("a", list(range(5))))
    assert step(sched)[0] == [("a", 0, 5)]
    sched.add_request(Request("b", list(range(7))))
    assert step(sched)[0] == [("b", 0, 7)]  # a's decode waits
    assert step(sched)[0] == [("a", 5, 1), ("b", 7, 1)]
    with pytest.raises(ValueError, match="without chunked prefill"):
        SchedulerConfig(max_num_batched_tokens=8, max_model_len=64, enable_chunked_prefill=False)


def test_without_chunked_prefill_a_prefill_step_waits_for_a_group_of_free_seats():
    sched = make_scheduler(max_num_batched_tokens=64, max_num_seqs=4, enable_chunked_prefill=False,
                           min_prefill_batch=2)
    for rid, n in zip("abcdefg", (3, 3, 3, 3, 4, 4, 4), strict=True):
        sched.add_request(Request(rid, list(range(n))))
    assert step(sched)[0] == [(r, 0, 3) for r in "abcd"]  # nothing running: admit at once
    sched.finish_request("a", RequestStatus.FINISHED_LENGTH)
    # One seat free, 3 waiting: a prefill step would stall 3 decodes to seat 1; decodes run.
    assert step(sched)[0] == [("b", 3, 1), ("c", 3, 1), ("d", 3, 1)]
    sched.finish_request("b", RequestStatus.FINISHED_LENGTH)
    assert step(sched)[0] == [("e", 0, 4), ("f", 0, 4)]  # two free seats: one prefill step
    sched.finish_request("c", RequestStatus.FINISHED_LENGTH)
    assert step(sched)[0] == [("g", 0, 4)]  # one seat and one waiting: no reason to wait
    with pytest.raises(ValueError, match="min_prefill_batch=0"):
        SchedulerConfig(min_prefill_batch=0)


def test_prefix_hit_skips_cached_pages_and_counts_hit_rate():
    sched = make_scheduler(max_num_batched_tokens=64)
    a = Request("a", list(range(10)))
    sched.add_request(a)
    step(sched)
    step(sched)  # a's computed full pages get hashed on its next allocation
    b = Request("b", list(range(9)) + [77])
    sched.add_request(b)
    plan, _ = step(sched)
    assert plan == [("a", 11, 1), ("b", 8, 2)]
    assert b.num_cached_tokens == 8
    assert sched.stats.prefix_hit_tokens == 8 and sched.stats.prefix_query_tokens == 20
    assert sched.block_manager.page_ids("b")[:2] == sched.block_manager.page_ids("a")[:2]


def test_fork_for_n_siblings_at_the_last_prompt_token():
    sched = make_scheduler(max_num_batched_tokens=64)
    parent = Request("p", list(range(6)))
    parent.children = [parent.make_child("p/1", 1), parent.make_child("p/2", 2)]
    sched.add_request(parent)
    assert sched.num_waiting == 3
    assert step(sched)[0] == [("p", 0, 5)]  # stops before the fork point
    plan, out = step(sched)
    assert plan == [("p", 5, 1), ("p/1", 5, 1), ("p/2", 5, 1)]
    # Page 1 (positions 4..7) is shared and partly filled: the first two writers copy it, the
    # last one owns it alone by then and writes in place.
    assert out.page_copies == [(1, 2), (1, 3)]
    bm = sched.block_manager
    assert [bm.page_ids(r) for r in ("p", "p/1", "p/2")] == [[0, 2], [0, 3], [0, 1]]
    assert [r.output_token_ids for r in sched.running] == [[1000]] * 3


def test_abort_of_an_unforked_parent_aborts_its_children():
    sched = make_scheduler()
    parent = Request("p", [1, 2, 3])
    parent.children = [child := parent.make_child("p/1", 1)]
    sched.add_request(parent)
    step(sched)
    sched.finish_request("p", RequestStatus.FINISHED_ABORTED)
    assert child.status == RequestStatus.FINISHED_ABORTED
    assert not sched.has_unfinished() and sched.block_manager.num_used_pages == 0


def test_fork_of_a_one_token_prompt():
    sched = make_scheduler()
    parent = Request("p", [7])
    parent.children = [parent.make_child("p/1", 1)]
    sched.add_request(parent)
    assert step(sched)[0] == []  # admitted with nothing to compute before the fork
    assert step(sched)[0] == [("p", 0, 1), ("p/1", 0, 1)]


def test_add_request_validation():
    sched = make_scheduler(num_pages=16, page_size=4, max_model_len=64, max_num_seqs=2)
    with pytest.raises(ValueError, match="prompt has 64 tokens; max_model_len is 64"):
        sched.add_request(Request("a", [1] * 64))
    parent = Request("p", [1])
    parent.children = [parent.make_child("p/1", 1), parent.make_child("p/2", 2)]
    with pytest.raises(ValueError, match="n=3"):
        sched.add_request(parent)
    with pytest.raises(ValueError, match="may need 16 pages"):
        make_scheduler(num_pages=8, page_size=4, max_model_len=64).add_request(Request("x", [1]))
    with pytest.raises(ValueError, match="policy"):
        SchedulerConfig(policy="lifo")
