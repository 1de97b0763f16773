"""Multi-step scheduling (several decodes per launch of an all-decode step) gives exactly the
outputs of one decode per launch: greedy at batch 1 and > 1 with stops, preemption and forks,
seeded sampling with a repetition penalty and logprobs, sync and async; and it launches fewer
steps."""

from __future__ import annotations

import numpy as np
import pytest

from jdecode.decoding.sampling import SamplingParams
from jdecode.engine.block_manager import BlockManager
from jdecode.engine.request import Request, RequestStatus
from jdecode.engine.scheduler import Scheduler, SchedulerConfig

from .test_async_scheduling import comparable, prompts_of


def runs(make_llm, prompts, params, steps=(1, 4), logprobs=None, **kw):
    """The same generate call on engines that differ only in num_scheduler_steps."""
    out = {}
    for s in steps:
        llm = make_llm(num_scheduler_steps=s, **kw)
        res = llm.generate(prompts, params, use_tqdm=False, logprobs=logprobs)
        out[s] = (llm.engine, res)
    return out


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_multi_step_equals_single_step_greedy(rng, make_llm, greedy_reference,
                                              async_scheduling):
    prompts = prompts_of(rng, 7, 24, 32)
    refs = [greedy_reference(p) for p in prompts]
    # Stop tokens end some sequences inside a burst; lengths end others at every offset of it.
    params = [SamplingParams(max_new_tokens=10, stop_token_ids=(ref[2],)) if i % 3 == 0
              else SamplingParams(max_new_tokens=3 + i) for i, ref in enumerate(refs)]
    got = runs(make_llm, prompts, params, steps=(1, 3, 4),
               async_scheduling=async_scheduling, max_num_batched_tokens=64)
    single_engine, single = got[1]
    for s in (3, 4):
        engine, multi = got[s]
        assert comparable(multi) == comparable(single), f"num_scheduler_steps={s}"
        assert engine.num_steps < single_engine.num_steps
        assert engine.block_manager.num_used_pages == 0
        assert not engine.has_unfinished_requests()
    for i, (out, ref) in enumerate(zip(single, refs, strict=True)):
        want = ref[:ref.index(ref[2]) + 1] if i % 3 == 0 else ref[:3 + i]
        assert out.outputs[0].token_ids == want, f"prompt {i}"
    # Batch 1: a lone request runs its decodes 4 at a time.
    one = runs(make_llm, prompts[1:2], SamplingParams(max_new_tokens=9),
               async_scheduling=async_scheduling)
    assert one[4][1][0].outputs[0].token_ids == refs[1][:9]
    assert one[4][0].num_steps < one[1][0].num_steps


def test_multi_step_equals_single_step_under_preemption_and_forks(rng, make_llm):
    prompts = prompts_of(rng, 6, 24, 32)
    params = [SamplingParams(max_new_tokens=12, n=2 if i == 0 else 1, temperature=0.8, seed=i)
              for i in range(6)]
    # A 22-page pool for 7 sequences of 28 to 44 tokens (7 to 11 pages each): preemptions, and
    # bursts whose pages are not free fall back to one decode.
    got = runs(make_llm, prompts, params, max_num_batched_tokens=16, num_pages=22)
    (single_engine, single), (multi_engine, multi) = got[1], got[4]
    assert comparable(multi) == comparable(single)
    assert multi_engine.num_steps < single_engine.num_steps
    assert multi_engine.scheduler.stats.num_preemptions > 0
    assert multi_engine.block_manager.num_used_pages == 0
    multi_engine.block_manager.check_invariants()


def test_multi_step_equals_single_step_sampling_penalty_and_logprobs(rng, make_llm):
    prompts = prompts_of(rng, 4)
    params = [SamplingParams(max_new_tokens=9, temperature=0.9, top_k=20, seed=s,
                             repetition_penalty=1.5) for s in range(4)]
    got = runs(make_llm, prompts, params, logprobs=3, max_num_batched_tokens=64, num_pages=80)
    assert comparable(got[4][1]) == comparable(got[1][1])
    assert got[4][0].num_steps < got[1][0].num_steps
    assert all(len(c.logprobs) == len(c.token_ids) for o in got[4][1] for c in o.outputs)


def test_sampling_runs_on_the_slots_a_step_can_fill(rng, make_llm, monkeypatch):
    """A step of N tokens samples min(N, max_num_seqs) slots, not all of them (chunks take
    slots 0..C-1 and each has a token): with 4-token decode buckets beside 8 slots, seeded
    sampling with a penalty and logprobs, one decode per launch and bursts of 3, gives what
    engines whose buckets hold every slot give."""
    from jdecode.engine import runner

    rows, real = [], runner.sample
    monkeypatch.setattr(runner, "sample", lambda logits, *a: rows.append(logits.shape[0])
                        or real(logits, *a))
    prompts = prompts_of(rng, 3)
    params = [SamplingParams(max_new_tokens=7, temperature=0.9, top_p=0.8, seed=s,
                             repetition_penalty=1.3) for s in range(3)]
    full = runs(make_llm, prompts, params, steps=(1, 3), logprobs=2,
                max_num_batched_tokens=64)
    assert set(rows) == {8}  # buckets of 16 and 64 tokens: every slot
    rows.clear()
    cut = runs(make_llm, prompts, params, steps=(1, 3), logprobs=2,
               max_num_batched_tokens=64, token_buckets=(4,))
    assert 4 in rows  # the decodes' new 4-token bucket (the 64's were traced above)
    for s in (1, 3):
        # Tokens exactly; logprobs to float noise (the LM head runs on fewer rows).
        for a, b in zip(cut[s][1], full[s][1], strict=True):
            a, b = a.outputs[0], b.outputs[0]
            assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text,
                                                              b.finish_reason), s
            for x, y in zip(a.logprobs, b.logprobs, strict=True):
                assert x.token_id == y.token_id and list(x.top) == list(y.top), s
                np.testing.assert_allclose([x.logprob, *x.top.values()],
                                           [y.logprob, *y.top.values()], rtol=0, atol=1e-5)


def test_scheduler_gives_each_decode_row_what_its_limits_leave():
    """An all-decode step runs up to num_scheduler_steps decodes per row, fewer where max
    tokens or max_model_len end the row, and reserves the pages; a prefill runs one step."""
    bm = BlockManager(32, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=32, max_model_len=16,
                                      num_scheduler_steps=4), bm)
    a, b, c = Request("a", [1, 2, 3]), Request("b", [4, 5, 6, 7, 8]), Request("c", [1] * 12)
    b.max_output_tokens = 3
    for r in (a, b, c):
        sched.add_request(r)
    first = sched.schedule()  # prefills: one step, one sample each
    assert first.num_steps == 1 and [ch.steps for ch in first.chunks] == [1, 1, 1]
    second = sched.schedule()  # all decodes, planned before the first is read back
    # a: 4. b: max_tokens 3 minus the one in flight = 2. c: 16 - 13 tokens = 3.
    assert [(ch.request.request_id, ch.start, ch.steps, ch.token_src, ch.output_index)
            for ch in second.chunks] == [("a", 3, 4, 0, 1), ("b", 5, 2, 1, 1),
                                         ("c", 12, 3, 2, 1)]
    assert second.num_steps == 4
    assert (a.num_pending, b.num_pending, c.num_pending) == (5, 3, 4)
    assert a.num_computed_tokens == 7 and len(bm.page_ids("a")) == 2  # positions 0..6
    # Landing: tokens arrive in order; a request that finishes takes no more of its burst.
    list(sched.land(first, {"a": [10], "b": [20], "c": [30]}))
    landed = []
    for req in sched.land(second, {"a": [11, 12, 13, 14], "b": [21, 22], "c": [31, 32, 33]}):
        landed.append((req.request_id, req.output_token_ids[-1]))
        if req.output_token_ids[-1] == 12:
            sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert landed == [("a", 11), ("a", 12), ("b", 21), ("b", 22), ("c", 31), ("c", 32),
                      ("c", 33)]
    assert b.output_token_ids == [20, 21, 22] and b.num_pending == 0
    with pytest.raises(ValueError, match="land it with Scheduler.land"):
        sched.update_from_output(second, {"b": 1})
    bm.check_invariants()


def test_num_scheduler_steps_must_be_positive():
    with pytest.raises(ValueError, match="num_scheduler_steps=0 must be > 0"):
        SchedulerConfig(num_scheduler_steps=0)


def test_a_waiting_request_gets_the_seat_a_burst_would_hold():
    """With requests waiting, a step where a row would end within the burst runs one decode,
    so the seat frees at once; with none waiting the others run their burst."""
    def plan(waiting: bool):
        sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=32,
                                          max_model_len=64, num_scheduler_steps=4),
                          BlockManager(32, 4))
        a, b = Request("a", [1, 2, 3]), Request("b", [4, 5, 6])
        b.max_output_tokens = 2
        for r in (a, b, *([Request("c", [7, 8])] if waiting else [])):
            sched.add_request(r)
        sched.schedule()  # a and b prefill; c waits for a seat
        return sched.schedule()

    busy, idle = plan(waiting=True), plan(waiting=False)
    assert busy.num_steps == 1 and [c.steps for c in busy.chunks] == [1, 1]
    # Without a queue: a runs 4, b the 1 its max_tokens leaves (and idles for the rest).
    assert idle.num_steps == 4 and [c.steps for c in idle.chunks] == [4, 1]


def test_default_is_four_decodes_per_launch_on_a_gpu_and_one_elsewhere(monkeypatch, make_engine):
    from jdecode.engine import engine as engine_mod

    assert make_engine().args.num_scheduler_steps == 1  # this CPU
    assert engine_mod.resolve_scheduler_steps(3) == 3
    monkeypatch.setattr(engine_mod.jax, "default_backend", lambda: "gpu")
    assert engine_mod.resolve_scheduler_steps(None) == engine_mod.DEFAULT_GPU_SCHEDULER_STEPS == 4


def test_a_burst_comes_as_one_output_per_sequence(rng, make_engine, greedy_reference):
    """With 4 decodes per launch a step gives each sequence one output holding its burst:
    the outputs' new tokens, in order, are the sequence's tokens, each with its logprob; a
    stop token inside a burst ends the sequence's last output, which holds no token after it."""
    engine = make_engine(num_scheduler_steps=4)
    prompts = prompts_of(rng, 3)
    stop = greedy_reference(prompts[1])[5]  # mid-burst: the burst after the prefill's token
    for i, p in enumerate(prompts):
        sp = SamplingParams(max_new_tokens=10, stop_token_ids=(stop,) if i == 1 else ())
        engine.add_request(f"r{i}", p, sp, logprobs=1)
    seen: dict[str, list] = {f"r{i}": [] for i in range(3)}
    while engine.has_unfinished_requests():
        outs = engine.step()
        assert len({o.request_id for o in outs}) == len(outs), "one output per sequence"
        for o in outs:
            assert len(o.logprobs) == len(o.new_token_ids) >= 1
            assert [lp.token_id for lp in o.logprobs] == o.new_token_ids
            seen[o.request_id].append(o)
    for rid, outs in seen.items():
        tokens = [t for o in outs for t in o.new_token_ids]
        assert tokens == list(outs[-1].token_ids), rid
        assert outs[-1].finished and not any(o.finished for o in outs[:-1]), rid
        assert max(len(o.new_token_ids) for o in outs) == 4, rid  # bursts did land together
    want = greedy_reference(prompts[1])
    assert list(seen["r1"][-1].token_ids) == want[:want.index(stop) + 1]
    assert seen["r1"][-1].finish_reason == "stop"
