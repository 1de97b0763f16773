"""`LLMEngine.warmup`: after it, plain requests of every step shape run without compiling, and
the engine keeps nothing of its throwaway requests."""

from __future__ import annotations

import pytest

from jdecode.decoding.sampling import SamplingParams
from jdecode.engine import runner

from .test_async_scheduling import prompts_of


def test_warmup_compiles_every_step_shape_and_forgets_its_requests(rng, make_engine,
                                                                   greedy_reference):
    # Token buckets 16 / 32 / 64; multi-step bursts of 2 at each row count's bucket.
    engine = make_engine(num_scheduler_steps=2, max_num_batched_tokens=64)
    info = engine.warmup()
    assert info["prefill_buckets"] == len(engine.runner.buckets) == 3
    assert info["burst_buckets"] == 1  # at most 8 rows: all in the 16-token bucket
    stats = engine.stats()
    assert stats["num_steps"] == 0 and stats["prefix_query_tokens"] == 0
    assert stats["num_preemptions"] == 0 and stats["num_running"] == 0
    assert engine.block_manager.num_used_pages == 0 and not engine.has_unfinished_requests()
    compiled = runner._step_jit._cache_size()

    # Prompts of 3 to 60 tokens, alone and 8 at a time: every token bucket, single and
    # multi-step decodes at several row counts, greedy and then sampled (a step with a sampled
    # row is an executable of its own). Greedy ones of 17..32 tokens (the reference's bucket)
    # must also come out as single-request greedy decoding.
    prompts = prompts_of(rng, 1, 20, 20) + prompts_of(rng, 4, 3, 16) + prompts_of(rng, 4, 17, 32)
    prompts += prompts_of(rng, 1, 60, 60)
    for sp in (SamplingParams(max_new_tokens=4), SamplingParams(max_new_tokens=4,
                                                                 temperature=0.8, seed=3)):
        for batch in (prompts[:1], prompts[1:9], prompts[9:]):
            ids = {f"r{i}": p for i, p in enumerate(batch)}
            for rid, p in ids.items():
                engine.add_request(rid, p, sp)
            done = {}
            while engine.has_unfinished_requests():
                done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
            assert done.keys() == ids.keys()
            for rid, p in ids.items():
                if 17 <= len(p) <= 32 and sp.temperature == 0:
                    assert done[rid] == greedy_reference(p, 4), rid
        assert runner._step_jit._cache_size() == compiled, f"{sp} compiled a new step shape"

    engine.add_request("pending", prompts[0], SamplingParams(max_new_tokens=2))
    with pytest.raises(RuntimeError, match="before adding requests"):
        engine.warmup()


@pytest.mark.parametrize("flag,want", [(None, False), (True, True), (False, False)])
def test_serve_warms_up_by_default_only_on_a_gpu(monkeypatch, capsys, tiny, flag, want):
    """`jdecode serve`'s --warmup/--no-warmup; the default (None) is on only where JAX runs on
    a GPU (this machine: CPU). The listening itself is stubbed out."""
    from jdecode.engine import server

    calls = []
    monkeypatch.setattr(server, "load", lambda model, dtype: tiny)
    monkeypatch.setattr(server, "build_app", lambda engine, name, **kw: (None, None))
    monkeypatch.setattr(server, "make_server", lambda *a: type("S", (), {"run": lambda s: None})())
    monkeypatch.setattr(server.LLMEngine, "warmup", lambda self: calls.append(self) or
                        {"prefill_buckets": 1, "burst_buckets": 0, "seconds": 0.0})
    server.serve("tiny", warmup=flag, max_num_seqs=2, max_model_len=32, num_pages=16,
                 page_size=4)
    assert bool(calls) is want
    assert "tiny: float32 on cpu" in capsys.readouterr().err  # the dtype auto chose, named
