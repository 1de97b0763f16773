"""Parity with HF transformers (CPU torch, f32) on tiny random checkpoints saved as safetensors:
prefill logits, per-step decode logits, and 32 greedy tokens, for every architecture variant."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import seed_of
from hf_checkpoints import VARIANTS, make_checkpoint

from jdecode.cache.dense import init_cache
from jdecode.decoding import phases
from jdecode.decoding.generate import Generator
from jdecode.decoding.sampling import SamplingParams
from jdecode.io.registry import load

# HF and we both compute in f32 but in a different op order (einsum vs Linear, fused softmax,
# RoPE tables): the acceptance bar for logits is 1e-4 absolute, looser than the table's f32 1e-5.
PARITY_ATOL = 1e-4
PROMPT_LEN = 24  # longer than mistral_swa's window of 8
NEW_TOKENS = 32


@dataclasses.dataclass
class Case:
    variant: str
    hf: torch.nn.Module
    model: object  # jdecode Model
    prompt: list[int]
    hf_tokens: list[int]  # HF greedy continuation, NEW_TOKENS long
    hf_step_logits: np.ndarray  # [NEW_TOKENS, V]: logits that chose each hf token


def hf_greedy(hf, prompt: list[int], n: int, **kw) -> tuple[list[int], np.ndarray]:
    """HF `generate(do_sample=False)` with EOS disabled, so exactly n tokens come back."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        # An explicit mask: HF would otherwise mask every prompt token equal to pad_token_id.
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0, output_logits=True,
                          return_dict_in_generate=True, **kw)
    tokens = out.sequences[0, len(prompt):].tolist()
    assert len(tokens) == n
    return tokens, torch.cat(out.logits).float().numpy()


@pytest.fixture(scope="module", params=list(VARIANTS))
def case(request, tmp_path_factory) -> Case:
    variant = request.param
    path = tmp_path_factory.mktemp(variant)
    hf = make_checkpoint(variant, path, seed=seed_of(variant))
    model = load(str(path))
    rng = np.random.default_rng(seed_of(variant))
    prompt = rng.integers(0, model.cfg.vocab_size, PROMPT_LEN).tolist()
    tokens, logits = hf_greedy(hf, prompt, NEW_TOKENS)
    return Case(variant, hf, model, prompt, tokens, logits)


def test_config_maps_the_variant(case):
    hf_cfg, cfg = case.hf.config, case.model.cfg
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.tie_word_embeddings) == (
        hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads, hf_cfg.tie_word_embeddings)
    assert cfg.qkv_bias == (case.variant == "qwen2")
    assert cfg.sliding_window == (8 if case.variant == "mistral_swa" else None)
    assert (cfg.rope_scaling is not None) == (case.variant == "llama3_rope")
    assert (case.model.params.lm_head is None) == hf_cfg.tie_word_embeddings


@partial(jax.jit, static_argnames=("cfg", "max_len"))
def teacher_forced_logits(params, prompt, lengths, forced, *, cfg, max_len):
    """prefill, then decode_step on each forced token in turn (one compile for all steps).

    prompt: [1, T] right-padded; forced: [N] tokens fed at positions lengths, lengths+1, ...
    Returns [N + 1, V] f32: the prefill logits, then each step's.
    """
    cache = init_cache(cfg, 1, max_len)
    first, _, cache = phases.prefill(params, cache, prompt, lengths, cfg=cfg)

    def step(cache, xs):
        tok, pos = xs
        logits, _, cache = phases.decode_step(params, cache, tok[None], pos[None], cfg=cfg)
        return cache, logits[0]

    positions = lengths[0] + jnp.arange(forced.shape[0], dtype=jnp.int32)
    _, rest = jax.lax.scan(step, cache, (forced, positions))
    return jnp.concatenate([first, rest])


def test_prefill_and_decode_logits_match_hf(case):
    # Right-padded to a longer bucket, as the generator does: padding must not leak in.
    prompt = np.zeros((1, PROMPT_LEN + 8), np.int32)
    prompt[0, :PROMPT_LEN] = case.prompt
    # Teacher-force HF's greedy tokens one at a time through decode_step.
    ours = np.asarray(teacher_forced_logits(
        case.model.params, jnp.asarray(prompt), jnp.asarray([PROMPT_LEN], jnp.int32),
        jnp.asarray(case.hf_tokens[:-1], jnp.int32), cfg=case.model.cfg,
        max_len=PROMPT_LEN + NEW_TOKENS + 8))  # [NEW_TOKENS, V]
    np.testing.assert_allclose(ours[0], case.hf_step_logits[0], atol=PARITY_ATOL, rtol=0,
                               err_msg=f"{case.variant}: prefill logits")
    np.testing.assert_allclose(ours[1:], case.hf_step_logits[1:], atol=PARITY_ATOL, rtol=0,
                               err_msg=f"{case.variant}: decode-step logits")


def test_greedy_tokens_match_hf(case):
    gen = Generator(case.model, max_seq_len=128)
    (result,) = gen.generate([case.prompt], SamplingParams(max_new_tokens=NEW_TOKENS))
    assert result.token_ids == case.hf_tokens
    assert result.finish_reason == "length"


def test_repetition_penalty_greedy_matches_hf(tmp_path):
    """End to end: greedy with a repetition penalty over prompt + output tokens, as HF does."""
    variant = "llama_gqa"
    hf = make_checkpoint(variant, tmp_path, seed=seed_of("repetition " + variant))
    model = load(str(tmp_path))
    prompt = np.random.default_rng(seed_of("repetition")).integers(0, 128, 12).tolist()
    plain, _ = hf_greedy(hf, prompt, 16)
    expected, _ = hf_greedy(hf, prompt, 16, repetition_penalty=1.8)
    assert expected != plain, "the penalty must change the HF output for this test to bite"
    (result,) = Generator(model, max_seq_len=64).generate(
        [prompt], SamplingParams(max_new_tokens=16, repetition_penalty=1.8))
    assert result.token_ids == expected
