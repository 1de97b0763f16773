"""The trained parts committed for the default model load, match it, and do their job: the
lossless ones give exactly the greedy tokens (f32) while emitting several tokens per step."""

import pytest

from jdecode.decoding.generate import Generator
from jdecode.decoding.sampling import SamplingParams

PROMPTS = ["Write a Python function that returns the factorial of n.",
           "What is the capital of France?"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def greedy_tokens(smol):
    return [r.token_ids for r in Generator(smol).generate(PROMPTS, GREEDY, chat=True)]


@pytest.mark.parametrize("method,options", [
    ("medusa", {"tree_nodes": 16}),  # the default heads: artifacts/smollm2-135m-medusa.tgz
    ("eagle", {"tree_nodes": 16, "depth": 3, "width": 4, "top_k": 4}),
])
def test_committed_parts_are_lossless_and_accept_several_tokens(smol, greedy_tokens, method,
                                                                options):
    out = Generator(smol, method=method, options=options).generate(PROMPTS, GREEDY, chat=True)
    assert [r.token_ids for r in out] == greedy_tokens
    # Untrained parts accept ~1 token per step; these accepted 3.0 / 3.1 when committed.
    assert out[0].stats["mean_accepted"] > 2.0, out[0].stats
