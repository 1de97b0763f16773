"""Async scheduling (step n+1 planned and dispatched before step n is read back) gives exactly
the outputs of the synchronous engine: greedy, seeded sampling with a repetition penalty (whose
mask misses the in-flight token on the host), logprobs, stops, forks, preemption, prefix hits."""

from __future__ import annotations

import numpy as np

from jdecode.decoding.sampling import SamplingParams
from jdecode.engine.block_manager import BlockManager
from jdecode.engine.request import Request
from jdecode.engine.scheduler import Scheduler, SchedulerConfig


def prompts_of(rng, n, lo=17, hi=32):
    return [rng.integers(0, 256, size=int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def both(make_llm, prompts, params, **kw):
    """The same generate call on a synchronous and an async engine of equal shape."""
    gen_kw = {"logprobs": 3} if kw.pop("_logprobs", False) else {}
    runs = []
    for async_scheduling in (False, True):
        llm = make_llm(async_scheduling=async_scheduling, **kw)
        runs.append((llm.engine, llm.generate(prompts, params, use_tqdm=False, **gen_kw)))
    return runs


def comparable(outs):
    return [[(c.token_ids, c.text, c.finish_reason,
              None if c.logprobs is None else [(lp.token_id, round(lp.logprob, 5), lp.top)
                                               for lp in c.logprobs])
             for c in o.outputs] for o in outs]


def test_async_equals_sync_greedy_with_stops_preemption_and_forks(rng, make_llm,
                                                                  greedy_reference):
    prompts = prompts_of(rng, 8, 24, 32)
    refs = [greedy_reference(p) for p in prompts]
    # Stop tokens end some sequences early: the async engine has already planned their next
    # decode when the stop lands, and must drop it.
    params = [SamplingParams(max_new_tokens=10, stop_token_ids=(ref[2],)) if i % 3 == 0
              else SamplingParams(max_new_tokens=3 + i) for i, ref in enumerate(refs)]
    # A 20-page pool for 8 sequences of 27 to 42 tokens (7 to 11 pages each): preemptions.
    (sync_engine, sync), (async_engine, asyn) = both(
        make_llm, prompts, params, max_num_batched_tokens=16, max_chunk_tokens=5, num_pages=20)
    assert comparable(asyn) == comparable(sync)
    assert async_engine.scheduler.stats.num_preemptions > 0
    for i, (out, ref) in enumerate(zip(asyn, refs, strict=True)):
        want = ref[:ref.index(ref[2]) + 1] if i % 3 == 0 else ref[:3 + i]
        assert out.outputs[0].token_ids == want, f"prompt {i}"
    for engine in (sync_engine, async_engine):
        assert engine.block_manager.num_used_pages == 0
        assert not engine.has_unfinished_requests()


def test_async_equals_sync_sampling_with_repetition_penalty_logprobs_and_n(rng, make_llm):
    prompts = prompts_of(rng, 4)
    params = [SamplingParams(max_new_tokens=9, temperature=0.9, top_k=20, seed=s,
                             repetition_penalty=1.5) for s in range(4)]
    (_, sync), (_, asyn) = both(make_llm, prompts, params, max_num_batched_tokens=16,
                                num_pages=80, _logprobs=True)
    assert comparable(asyn) == comparable(sync)
    # The penalty matters here: without it (or with the in-flight token missing from the mask)
    # the draws differ.
    plain = make_llm(num_pages=80).generate(
        prompts, [SamplingParams(max_new_tokens=9, temperature=0.9, top_k=20, seed=s)
                  for s in range(4)], use_tqdm=False)
    assert comparable(plain) != comparable(sync)
    (_, sync_n), (_, async_n) = both(
        make_llm, prompts[:2], SamplingParams(max_new_tokens=6, temperature=1.0, seed=3),
        max_num_batched_tokens=16, num_pages=80)
    assert comparable(async_n) == comparable(sync_n)


def test_async_launches_no_step_past_max_tokens(rng, make_llm):
    prompts = prompts_of(rng, 6)
    params = [SamplingParams(max_new_tokens=2 + 3 * i) for i in range(6)]
    (sync_engine, _), (async_engine, _) = both(make_llm, prompts, params,
                                               max_num_batched_tokens=64, num_pages=80)
    # The last step's read-back is one extra engine.step() call, not an extra device step.
    assert async_engine.num_steps == sync_engine.num_steps


def test_scheduler_plans_the_next_decode_from_the_in_flight_sample():
    """Two steps planned before the first is read back: the second's decode takes its token
    from row 1 of the first step, the sample keys count on, and the pages are the same."""
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_model_len=64),
                      BlockManager(16, 4))
    a, b = Request("a", [1, 2, 3]), Request("b", [4, 5, 6, 7, 8])
    b.max_output_tokens = 2
    sched.add_request(a)
    sched.add_request(b)
    first = sched.schedule()
    assert [(c.request.request_id, c.start, c.num_tokens, c.samples, c.token_src)
            for c in first.chunks] == [("a", 0, 3, True, -1), ("b", 0, 5, True, -1)]
    second = sched.schedule()  # nothing read back yet
    assert [(c.request.request_id, c.start, c.num_tokens, c.token_src, c.output_index)
            for c in second.chunks] == [("a", 3, 1, 0, 1), ("b", 5, 1, 1, 1)]
    assert (a.num_pending, b.num_pending) == (2, 2) and a.output_token_ids == []
    # b's two in-flight samples reach max_output_tokens: no third decode for it.
    third = sched.schedule()
    assert [(c.request.request_id, c.start) for c in third.chunks] == [("a", 4)]
    assert [r.request_id for r in sched.update_from_output(first, {"a": 10, "b": 20})] == [
        "a", "b"]
    assert (a.all_token_ids, a.num_pending) == ([1, 2, 3, 10], 2)
    sched.update_from_output(second, {"a": 11, "b": 21})
    assert b.output_token_ids == [20, 21] and b.num_pending == 0
    # 5 tokens of a computed: pages 0 and 3 (b took 1 and 2 in the first step).
    assert sched.block_manager.page_ids("a") == [0, 3]
    sched.block_manager.check_invariants()


def test_prefix_cache_is_not_offered_pages_whose_tokens_are_still_in_flight():
    bm = BlockManager(16, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_model_len=64), bm)
    a = Request("a", [1, 2, 3])
    sched.add_request(a)
    first = sched.schedule()
    sched.schedule()  # a's decode of its in-flight token completes page 0 on the device
    sched.schedule()  # allocation hashes computed pages: page 0's 4th token is not known yet
    assert bm.cached == {}
    sched.update_from_output(first, {"a": 9})
    sched.schedule()
    assert list(bm.cached.values()) == [0]
    probe = Request("p", [1, 2, 3, 9, 5])
    assert bm.find_cached_prefix(probe) == [0]
    assert np.all(np.asarray(bm.ref_counts) >= 0)
