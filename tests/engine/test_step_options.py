"""The engine's decode-only steps compile with the Generator's loop options at their row
count (`ModelRunner.step_options`): on the GPU, cuBLAS GEMMs from 64 rows."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import seed_of

from jdecode.decoding.sampling import SamplingParams
from jdecode.engine import runner
from jdecode.engine.engine import EngineArgs, LLMEngine
from jdecode.model import compile_options

from .test_async_scheduling import prompts_of

CUBLAS = (("xla_gpu_enable_triton_gemm", False),)


def test_wide_decode_only_steps_take_the_cublas_executable(rng, make_engine, greedy_reference,
                                                           monkeypatch):
    """With the runner taken for a GPU's and the threshold at the one token bucket (16), every
    decode-only step runs the executable compiled with Triton GEMMs off and the prefill steps
    the plain one; the tokens are single-request greedy decoding's (the option is accepted,
    and moot, on the CPU: this checks which executable each step runs, not cuBLAS)."""
    monkeypatch.setattr(compile_options, "CUBLAS_MIN_ROWS", 16)
    engine = make_engine(max_num_batched_tokens=16)
    engine.runner.backend = "gpu"
    seen = []
    step_options = engine.runner.step_options

    def recorded(out):
        options = step_options(out)
        seen.append((out.num_batched_tokens == len(out.chunks), options))
        return options

    monkeypatch.setattr(engine.runner, "step_options", recorded)
    prompts = prompts_of(rng, 3)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_new_tokens=6))
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert {decodes for decodes, _ in seen} == {True, False}, seen
    assert all(options == (CUBLAS if decodes else ()) for decodes, options in seen), seen
    assert runner._step_jit_with(CUBLAS)._cache_size() >= 1
    for i, p in enumerate(prompts):
        assert done[f"r{i}"] == greedy_reference(p, 6), i


def test_decode_only_steps_below_the_threshold_keep_xlas_gemms(make_engine):
    engine = make_engine(max_num_batched_tokens=16)
    engine.runner.backend = "gpu"  # 8 slots: at most the 16-token bucket, below 64 rows
    engine.add_request("a", [1, 2, 3], SamplingParams(max_new_tokens=3))
    engine.step()  # the prefill
    out = engine.scheduler.schedule()
    assert out.num_batched_tokens == len(out.chunks) == 1
    assert engine.runner.step_options(out) == ()


@pytest.mark.gpu
def test_wide_engine_decodes_give_the_triton_steps_tokens(tiny, monkeypatch):
    """64 requests decoding together: the engine's 64-row decode-only steps compiled for
    cuBLAS give the same f32 greedy tokens, at highest precision, as the same engine with XLA's
    Triton GEMMs (only the GEMMs' summation order differs)."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs the GPU")
    rng = np.random.default_rng(seed_of("engine-cublas"))
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in rng.integers(3, 15, 64)]
    args = EngineArgs(max_num_seqs=64, max_num_batched_tokens=256, max_model_len=64,
                      page_size=16, num_pages=4 * 64 + 8)

    def run() -> dict[str, list[int]]:
        engine = LLMEngine(tiny, args)
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, SamplingParams(max_new_tokens=8))
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        return done

    with jax.default_matmul_precision("highest"):
        before = runner._step_jit_with(CUBLAS)._cache_size()
        cublas = run()
        assert runner._step_jit_with(CUBLAS)._cache_size() > before, "no step ran with cuBLAS"
        monkeypatch.setattr(compile_options, "CUBLAS_MIN_ROWS", None)
        triton = run()
    assert cublas == triton
