"""Speculative decoding of the real default model (SmolLM2-135M, f32) with prompt lookup and
with a distilled draft: greedy output token-identical to plain greedy decoding, in one batch of
mixed prompts."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jdecode.cache.dense import init_cache
from jdecode.decoding import phases
from jdecode.decoding.generate import Generator
from jdecode.decoding.sampling import SamplingParams
from jdecode.decoding.speculative import build_speculative
from jdecode.training.corpus import Corpus
from jdecode.training.distill import DraftOptions, train_draft_model
from jdecode.training.trainer import TrainConfig

NEW_TOKENS = 32
SP = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
TIE_GAP = 1e-3  # where paths may part: the baseline's top-2 logit gap is below this (f32 order)
PASSAGE = ("The river Aare flows through Bern, the capital of Switzerland. The old town of Bern "
           "sits on a narrow hill surrounded on three sides by the Aare.")
PROMPTS = [
    f"{PASSAGE}\nSummarize the passage above in one sentence: The river Aare",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4, 5, 6, 7,",
]


def first_divergence_gap(smol, ids: list[int], tokens: list[int], j: int) -> float:
    """The baseline's top-2 logit gap where it emitted tokens[j] (fresh prefill, f32)."""
    ctx = np.asarray([ids + tokens[:j]], np.int32)
    cache = init_cache(smol.cfg, 1, ctx.shape[1])
    logits = phases.prefill(smol.params, cache, jnp.asarray(ctx),
                            jnp.asarray([ctx.shape[1]], jnp.int32), cfg=smol.cfg)[0][0]
    top2 = np.sort(np.asarray(logits))[-2:]
    return float(top2[1] - top2[0])


@pytest.fixture(scope="module")
def prompt_ids(smol):
    return [smol.tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def baseline(smol_generator, prompt_ids):
    return smol_generator.generate(prompt_ids, SP)


def assert_same_greedy(smol, prompt_ids, results, baseline):
    for i, (r, b) in enumerate(zip(results, baseline)):
        if r.token_ids != b.token_ids:
            j = next(j for j, (x, y) in enumerate(zip(r.token_ids, b.token_ids)) if x != y)
            gap = first_divergence_gap(smol, prompt_ids[i], b.token_ids, j)
            assert gap < TIE_GAP, f"prompt {i} differs at token {j} with top-2 gap {gap}"


def test_ngram_greedy_matches_autoregressive(smol, prompt_ids, baseline):
    model, decoder_fn = build_speculative(smol, "ngram", k=4)
    results = Generator(model, decoder_fn=decoder_fn).generate(prompt_ids, SP)
    assert_same_greedy(smol, prompt_ids, results, baseline)
    # Prompt lookup finds the summary's and the code's repeats: well above 1 token per step.
    assert results[0].stats["mean_accepted"] > 1.3


def test_distilled_greedy_matches_autoregressive(smol, prompt_ids, baseline, tmp_path):
    """A distilled draft from a tiny training run (2 layers, 3 steps on the target's own
    greedy text): the test checks exactness, not the draft's quality."""
    seqs = [ids + b.token_ids for ids, b in zip(prompt_ids, baseline)]
    tc = TrainConfig(steps=3, batch_size=2, checkpoint_every=3)
    train_draft_model(smol, tmp_path, DraftOptions(num_layers=2), tc, progress=False,
                      corpus=Corpus.from_sequences(seqs, 32))  # skips corpus generation
    model, decoder_fn = build_speculative(smol, str(tmp_path), k=3)
    results = Generator(model, decoder_fn=decoder_fn).generate(prompt_ids, SP)
    assert_same_greedy(smol, prompt_ids, results, baseline)
