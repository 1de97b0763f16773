"""Engine options that change how the step is compiled, not what it computes: the parameter
layout, the attention implementation (Pallas in interpret mode on CPU) and the token buckets."""

from __future__ import annotations

import pytest

from jdecode.cache.paged import PagedMeta, decode_layout
from jdecode.decoding.sampling import SamplingParams
from jdecode.engine import runner
from jdecode.engine.runner import token_buckets
from pallas_kernels.paged_attention.tuning import UNIFIED_DECODE_MAX_CONTEXT

MAX_NEW = 10
GREEDY = SamplingParams(max_new_tokens=MAX_NEW)


def random_prompts(rng, n, lo=17, hi=32):
    return [rng.integers(0, 256, size=int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def test_token_buckets_default_and_custom():
    assert token_buckets(512) == (16, 32, 64, 128, 256, 512)
    assert token_buckets(100) == (16, 32, 64, 100)
    assert token_buckets(512, (256, 64, 1024, 64)) == (64, 256, 512)
    assert token_buckets(2048, (64, 256, 1024)) == (64, 256, 1024, 2048)
    with pytest.raises(ValueError, match="positive"):
        token_buckets(512, (0, 64))


def test_decode_layout_picks_the_ragged_split():
    # The runner's static facts about a step, and the split_decodes they give the kernel.
    cap = UNIFIED_DECODE_MAX_CONTEXT
    cases = [((True, 9), {"decodes_only": True}, "only"),
             ((False, cap), {"short_decodes": True}, "short"),
             ((False, 0), {"short_decodes": True}, "short"),  # chunks only
             ((False, cap + 1), {"short_decodes": False}, "auto")]
    for args, facts, split in cases:
        assert decode_layout(*args) == facts, args
        assert PagedMeta(None, None, None, None, **facts).split_decodes == split, args


@pytest.mark.parametrize(("layout", "impl"), [("inference", "xla"), ("stacked", "pallas")])
def test_layout_and_impl_match_single_request_greedy(rng, make_llm, greedy_reference, layout,
                                                     impl):
    # Chunks of 5 tokens split 4-token pages; two buckets (8 and the budget 16) both run.
    prompts = random_prompts(rng, 4)
    llm = make_llm(max_num_batched_tokens=16, max_chunk_tokens=5, num_pages=80, layout=layout,
                   impl=impl, token_buckets=(8,))
    assert llm.engine.runner.buckets == (8, 16)
    for i, out in enumerate(llm.generate(prompts, GREEDY, use_tqdm=False)):
        assert out.outputs[0].token_ids == greedy_reference(prompts[i]), f"prompt {i}"


def test_block_table_width_buckets_match_single_request_greedy(rng, make_llm, greedy_reference,
                                                               monkeypatch):
    # 16-token width buckets: contexts of 17..42 tokens cross the 32-token boundary mid-decode.
    monkeypatch.setattr(runner, "MIN_KV_BUCKET_TOKENS", 16)
    prompts = random_prompts(rng, 4)
    llm = make_llm(max_num_batched_tokens=16, num_pages=80)
    assert llm.engine.runner.kv_buckets == (4, 8, 16)  # pages of 4 tokens
    assert runner.kv_buckets(16, 4, "pallas") == (16,)  # the kernel reads only the context
    for i, out in enumerate(llm.generate(prompts, GREEDY, use_tqdm=False)):
        assert out.outputs[0].token_ids == greedy_reference(prompts[i]), f"prompt {i}"
