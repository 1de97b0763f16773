"""Greedy outputs of the engine equal single-request greedy generation, exactly, in f32:
whatever the arrival order, batch mix, chunk size, prefix-cache hits and preemptions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jdecode.decoding.sampling import SamplingParams

MAX_NEW = 10
GREEDY = SamplingParams(max_new_tokens=MAX_NEW)


def random_prompts(rng, n, lo=17, hi=32):
    return [rng.integers(0, 256, size=int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def assert_exact(outputs, prompts, greedy_reference):
    for i, (out, prompt) in enumerate(zip(outputs, prompts, strict=True)):
        want = greedy_reference(prompt)
        for comp in out.outputs:
            assert comp.token_ids == want, f"prompt {i} (len {len(prompt)})"
            assert comp.finish_reason == "length"


@pytest.mark.parametrize(("budget", "max_chunk"), [(16, 0), (64, 0), (16, 3), (64, 5), (16, 6)])
def test_any_order_and_chunk_size_matches_single_request_greedy(
        rng, make_llm, greedy_reference, budget, max_chunk):
    # Chunks of 3, 5 and 6 tokens split 4-token pages; a budget of 16 splits the prompts.
    prompts = random_prompts(rng, 6)
    order = rng.permutation(len(prompts))
    llm = make_llm(max_num_batched_tokens=budget, max_chunk_tokens=max_chunk,
                   num_pages=80)  # no preemption here: see the next test
    outs = llm.generate([prompts[i] for i in order], GREEDY, use_tqdm=False)
    assert_exact(outs, [prompts[i] for i in order], greedy_reference)
    assert llm.engine.scheduler.stats.num_preemptions == 0


def test_preemption_by_recompute_keeps_outputs(rng, make_llm, greedy_reference):
    # 8 sequences of up to 42 tokens need up to 88 pages; the pool has 40.
    prompts = random_prompts(rng, 8, 26, 32)
    llm = make_llm(max_num_batched_tokens=64, num_pages=40)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.stats.num_preemptions > 0
    assert_exact(outs, prompts, greedy_reference)
    assert llm.engine.block_manager.num_used_pages == 0


def test_prefix_cache_hits_keep_outputs(rng, make_llm, greedy_reference):
    shared = rng.integers(0, 256, size=14).tolist()  # 3 full pages + 2 tokens
    prompts = [shared + rng.integers(0, 256, size=int(k)).tolist() for k in (3, 6, 9, 12)]
    llm = make_llm(max_num_batched_tokens=16, num_pages=80)
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    rest = llm.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert [r.num_cached_tokens for r in rest] == [12, 12, 12]
    assert llm.engine.scheduler.stats.prefix_hit_tokens == 36
    assert_exact(first + rest, prompts, greedy_reference)
    # A repeated prompt hits every page but the last token's.
    again = llm.generate(prompts[3:], GREEDY, use_tqdm=False)
    assert again[0].num_cached_tokens == 24
    assert_exact(again, prompts[3:], greedy_reference)


@pytest.mark.parametrize("policy", ["static", "no-chunk"])
def test_static_and_unchunked_policies_match(rng, make_llm, greedy_reference, policy):
    prompts = random_prompts(rng, 5)
    args = ({"policy": "static", "max_num_seqs": 8} if policy == "static"
            else {"enable_chunked_prefill": False})
    llm = make_llm(max_num_batched_tokens=64, num_pages=80, **args)
    assert_exact(llm.generate(prompts, GREEDY, use_tqdm=False), prompts, greedy_reference)


def run_engine(engine, arrivals: dict[int, list[tuple[str, list[int]]]], sp=GREEDY):
    """Steps the engine, adding arrivals[k] before step k; returns id -> token ids."""
    done: dict[str, list[int]] = {}
    k = 0
    while k <= max(arrivals) or engine.has_unfinished_requests():
        for rid, prompt in arrivals.get(k, []):
            engine.add_request(rid, prompt, sp)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        k += 1
    return done


def test_requests_arriving_mid_flight(rng, make_engine, greedy_reference):
    prompts = random_prompts(rng, 7)
    steps = sorted(rng.integers(0, 12, size=len(prompts)).tolist())
    arrivals: dict[int, list] = {}
    for i, (s, p) in enumerate(zip(steps, prompts, strict=True)):
        arrivals.setdefault(s, []).append((f"r{i}", p))
    engine = make_engine(max_num_batched_tokens=16, max_chunk_tokens=5, num_pages=40)
    done = run_engine(engine, arrivals)
    for i, p in enumerate(prompts):
        assert done[f"r{i}"] == greedy_reference(p), f"request {i}"


def test_n_greedy_siblings_share_pages_and_match(rng, make_llm, greedy_reference):
    prompts = random_prompts(rng, 2, 18, 18)  # 18 tokens: the fork point splits page 4
    llm = make_llm(max_num_batched_tokens=16, num_pages=80)
    outs = llm.generate(prompts, dataclasses.replace(GREEDY, n=3), use_tqdm=False)
    assert [len(o.outputs) for o in outs] == [3, 3]
    assert_exact(outs, prompts, greedy_reference)
    assert llm.engine.block_manager.num_used_pages == 0


@pytest.mark.parametrize("impl,burst", [("xla", 1), ("pallas", 4)])
def test_trace_count_new_mixes_do_not_recompile(rng, make_engine, impl, burst):
    """After one greedy and one sampling workload, new mixes of arrivals compile nothing.
    impl "pallas" with bursts of 4 is the GPU's default engine (there the decode-only steps
    are executables of their own, `PagedMeta.decodes_only`); on the CPU its kernels are
    interpreted, which traces the same step."""
    from jdecode.engine.runner import TRACE_COUNTS

    def workload(seed):
        r = np.random.default_rng(seed)
        prompts = random_prompts(r, 6, 1, 40)
        steps = sorted(r.integers(0, 20, size=6).tolist())
        arrivals: dict[int, list] = {}
        for i, (s, p) in enumerate(zip(steps, prompts, strict=True)):
            arrivals.setdefault(s, []).append((f"r{i}", p))
        return arrivals

    shape = {"max_num_batched_tokens": 16, "num_pages": 80, "impl": impl,
             "num_scheduler_steps": burst}
    # Warm: the only bucket (16) compiles for all-greedy and for sampling steps, each as a
    # mixed step, and with impl "pallas" as a decode-only step of one decode and of a burst.
    # The sampling run decodes long enough to take both decode-only kinds (with 3 new tokens
    # it took only bursts, and on the GPU a later single sampled decode compiled anew).
    run_engine(make_engine(**shape), workload(0))
    run_engine(make_engine(**shape), workload(4),
               SamplingParams(max_new_tokens=10, temperature=0.3))
    before = TRACE_COUNTS["step"]
    for seed in (1, 2, 3):
        run_engine(make_engine(**shape), workload(seed),
                   SamplingParams(max_new_tokens=int(5 + seed), temperature=0.5 * seed))
    assert TRACE_COUNTS["step"] == before


@pytest.mark.gpu
@pytest.mark.parametrize("num_scheduler_steps", [1, 4])
def test_pallas_engine_matches_single_request_greedy(rng, make_llm, greedy_reference,
                                                     num_scheduler_steps):
    import jax

    if jax.default_backend() != "gpu":
        pytest.skip("needs the GPU")
    prompts = random_prompts(rng, 6)
    llm = make_llm(max_num_batched_tokens=16, max_chunk_tokens=5, num_pages=80, impl="pallas",
                   num_scheduler_steps=num_scheduler_steps)
    assert_exact(llm.generate(prompts, GREEDY, use_tqdm=False), prompts, greedy_reference)
