"""The engine's decode-only steps of a few rows through the fused kernels
(`fused_paged_decode_step` over the page pool), in the Pallas interpreter on CPU.

Greedy outputs equal single-request greedy generation (the Generator's general path), in f32,
at one row and at three, with one decode per step and with multi-step bursts; each test also
proves the fused step was traced, so a silent fallback to the general path fails it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jdecode.cache.paged import PagedMeta, init_paged_cache
from jdecode.config import load_model_config_yaml
from jdecode.decoding.generate import Generator
from jdecode.decoding.sampling import SamplingParams
from jdecode.engine import runner
from jdecode.engine.engine import EngineArgs, LLMEngine
from jdecode.engine.llm import LLM
from jdecode.io.registry import Model
from jdecode.model.fused_decode import (
    ENV_SWITCH,
    DecodeParams,
    fused_paged_reason,
    with_decode_copies,
)
from jdecode.model.layout import inference_layout
from jdecode.model.params import init_params
from pallas_kernels.fused_decode.kernel import FMA_MAX_ROWS

ROOT = __import__("pathlib").Path(__file__).parents[2]
# Pages of 4 tokens: a prompt crosses pages, and a 64-token block of the kernel holds 16.
SHAPES = {"max_num_seqs": 8, "max_model_len": 64, "page_size": 4, "num_pages": 80,
          "max_num_batched_tokens": 16, "impl": "pallas", "layout": "inference"}
MAX_NEW = 8


@pytest.fixture(scope="module")
def fusable():
    """The tiny test model with 32-wide heads (the fused kernels want head_dim >= 32)."""
    cfg = load_model_config_yaml(ROOT / "configs/models/tiny.yaml").replace(head_dim=32)
    return Model("tiny-d32", cfg, init_params(cfg, jax.random.key(11)), None)


@pytest.fixture(scope="module")
def reference(fusable):
    gen = Generator(fusable, max_seq_len=128)
    return lambda prompt: gen.generate([prompt], SamplingParams(max_new_tokens=MAX_NEW)
                                       )[0].token_ids


@pytest.fixture
def fused_traces(monkeypatch):
    """Counts the traces of the runner's step that took the fused decode step."""
    calls, real = [], runner.fused_paged_decode_step

    def spy(*args, **kwargs):
        calls.append(args[2].shape[0])  # the step's rows
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "fused_paged_decode_step", spy)
    return calls


@pytest.mark.parametrize("num_prompts,num_scheduler_steps", [(1, 1), (3, 4)])
def test_fused_engine_decode_matches_single_request_greedy(rng, fusable, reference,
                                                          fused_traces, num_prompts,
                                                          num_scheduler_steps):
    prompts = [rng.integers(0, 256, size=int(n)).tolist() for n in (19, 26, 7)[:num_prompts]]
    llm = LLM(fusable, **SHAPES, num_scheduler_steps=num_scheduler_steps)
    r = llm.engine.runner
    assert isinstance(r.params, DecodeParams)  # the copies the default path needs
    assert r.decode_buckets == (1, 2, 4, FMA_MAX_ROWS)
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW), use_tqdm=False)
    for i, (out, prompt) in enumerate(zip(outs, prompts, strict=True)):
        assert out.outputs[0].token_ids == reference(prompt), f"prompt {i}"
    # Decodes of 1 row, and of 3 rows (bucket 4) while all three decode.
    if num_prompts == 1:
        assert set(fused_traces) == {1}
    else:
        assert 4 in fused_traces
    assert llm.engine.block_manager.num_used_pages == 0


def test_decode_buckets_follow_the_switch(fusable, monkeypatch):
    cases = {"0": (), "1": (1, 2, 4, 8), "layer": ()}  # "1": up to the 8 sequence slots
    for value, want in cases.items():
        monkeypatch.setenv(ENV_SWITCH, value)
        r = runner.ModelRunner(fusable.cfg, fusable.params, num_pages=8, page_size=4,
                               max_num_seqs=8, max_num_batched_tokens=16, max_model_len=32,
                               impl="pallas", layout="inference")
        assert r.decode_buckets == want, value
        assert r.bucket(3, decodes_only=True) == (4 if want else 16), value
        assert r.bucket(3) == 16, value  # a step with a chunk keeps the token buckets
    monkeypatch.delenv(ENV_SWITCH)
    xla = runner.ModelRunner(fusable.cfg, fusable.params, num_pages=8, page_size=4,
                             max_num_seqs=8, max_num_batched_tokens=16, max_model_len=32,
                             impl="xla", layout="inference")
    assert xla.decode_buckets == () and not isinstance(xla.params, DecodeParams)


def test_fused_paged_step_declines_what_it_does_not_cover(fusable, monkeypatch):
    cfg = fusable.cfg
    params = with_decode_copies(inference_layout(fusable.params))
    pool = init_paged_cache(cfg, 8, 4)
    zeros = jnp.zeros

    def meta(slots=8, **layout):
        return PagedMeta(zeros(2, "int32"), zeros((slots, 4), "int32"), zeros(slots, "int32"),
                         zeros(slots + 1, "int32"), **layout)

    assert fused_paged_reason(params, pool, meta(decodes_only=True), cfg, 2) is None
    assert "prefill chunks" in fused_paged_reason(params, pool, meta(), cfg, 2)
    assert "sequence slots" in fused_paged_reason(params, pool, meta(1, decodes_only=True),
                                                  cfg, 2)
    assert "rows" in fused_paged_reason(params, pool, meta(decodes_only=True), cfg,
                                        FMA_MAX_ROWS + 1)  # by default; =1 forces it
    assert "copies" in fused_paged_reason(inference_layout(fusable.params), pool,
                                          meta(decodes_only=True), cfg, 2)
    assert "page size 3" in fused_paged_reason(params, init_paged_cache(cfg, 8, 3),
                                               meta(decodes_only=True), cfg, 2)
    assert "dtype" in fused_paged_reason(params, init_paged_cache(cfg, 8, 4, "bfloat16"),
                                         meta(decodes_only=True), cfg, 2)
    monkeypatch.setenv(ENV_SWITCH, "layer")
    assert "dense cache" in fused_paged_reason(params, pool, meta(decodes_only=True), cfg, 2)


def test_warmup_compiles_the_decode_buckets(rng, fusable):
    """After `warmup`, decodes of 1..3 rows (the fused step's buckets, the last of them the
    slot count, not a power of two) and bursts of 2 compile nothing new."""
    # One layer and three slots: which step shapes warm-up compiles does not depend on the
    # depth or on how many buckets there are, and each interpreted executable is seconds of
    # CPU compile (on the 2-core dev machine, alone: 49 s on 8 slots, whose buckets are
    # 1/2/4/5 and the token bucket's 8 rows; full suites: 103 s on two layers, 86-92 s on one).
    cfg = fusable.cfg.replace(num_layers=1)
    shallow = Model("tiny-d32-1layer", cfg, init_params(cfg, jax.random.key(11)), None)
    engine = LLMEngine(shallow, EngineArgs(**{**SHAPES, "max_num_seqs": 3},
                                           num_scheduler_steps=2))
    assert engine.runner.decode_buckets == (1, 2, 3)
    info = engine.warmup()
    assert info["burst_buckets"] == 3  # decode buckets 1/2/3; the token bucket's rows are 3
    compiled = runner._step_jit._cache_size()
    for n in (1, 3, 5):
        for i in range(n):
            engine.add_request(f"r{n}-{i}", rng.integers(0, 256, 9).tolist(),
                               SamplingParams(max_new_tokens=4))
        while engine.has_unfinished_requests():
            engine.step()
    assert runner._step_jit._cache_size() == compiled, "a decode compiled a new step shape"
