"""The engine on the real default model (SmolLM2-135M, f32): greedy equals single-request
`generate` for a handful of chat requests, with chunked prefill and a shared system prefix."""

from __future__ import annotations

import pytest

from jdecode.decoding.sampling import SamplingParams
from jdecode.engine.llm import LLM

pytestmark = pytest.mark.slow  # loads the 135M model; shares the session fixture with tests/model

QUESTIONS = ["What is the capital of France?", "Name three primary colors.",
             "Write a haiku about the sea.", "What is 12 times 12?"]


@pytest.fixture(scope="module")
def smol_llm(smol):
    # A 48-token budget splits every chat prompt into chunks, 16-token pages share the prefix.
    return LLM(smol, max_num_seqs=4, max_model_len=256, page_size=16,
               max_num_batched_tokens=48, num_pages=64)


def chat(smol, q):
    return smol.tokenizer.encode(smol.tokenizer.apply_chat_template([{"role": "user",
                                                                     "content": q}]))


def test_real_model_greedy_matches_generate(smol, smol_generator, smol_llm):
    prompts = [chat(smol, q) for q in QUESTIONS]
    sp = SamplingParams(max_new_tokens=16)
    outs = smol_llm.generate(prompts, sp, use_tqdm=False)
    for q, p, out in zip(QUESTIONS, prompts, outs, strict=True):
        ref = smol_generator.generate([p], sp)[0]
        assert out.outputs[0].token_ids == ref.token_ids, q
        assert out.outputs[0].text == ref.text
    # The chat template's system prompt is shared: later requests hit the prefix cache.
    assert smol_llm.engine.scheduler.stats.prefix_hit_tokens > 0


def test_real_model_stop_string_cuts_text(smol, smol_llm):
    prompt = chat(smol, QUESTIONS[2])
    full = smol_llm.generate(prompt, SamplingParams(max_new_tokens=16),
                             use_tqdm=False)[0].outputs[0]
    words = full.text.split()
    assert len(words) >= 3, full.text
    stop = words[2]
    out = smol_llm.generate(prompt, SamplingParams(max_new_tokens=16, stop=(stop,)),
                            use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.index(stop)]
