"""Shared by the Jacobi, lookahead and consistency tests: a tiny random model config, prompts of
different lengths, and the generation loop compiled once per decoder and driven step by step."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.config import ModelConfig
from jdecode.decoding.autoregressive import autoregressive
from jdecode.decoding.loop import init_loop, run_loop
from jdecode.decoding.sampling import SamplingArrays, SamplingParams
from pallas_kernels.testing import jit_for_tests

CFG = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=128, max_position_embeddings=512)
MAX_LEN, T_BUCKET, MAX_NEW = 128, 32, 40
PROMPT_LENS = (5, 11, 17)


def make_prompts(rng: np.random.Generator, lens=PROMPT_LENS, cfg=CFG
                 ) -> tuple[jax.Array, jax.Array]:
    """Right-padded random prompts [B, T_BUCKET] and their lengths [B]."""
    prompt = np.zeros((len(lens), T_BUCKET), np.int32)
    for i, n in enumerate(lens):
        prompt[i, :n] = rng.integers(0, cfg.vocab_size, n)
    return jnp.asarray(prompt), jnp.asarray(lens, jnp.int32)


_COMPILED: dict = {}


def start(name, decoder, params, prompt, lengths, max_new=MAX_NEW, temperature=0.0, seed=0):
    """The prefilled LoopState and the loop (params bound); one jitted (init, loop) pair per
    decoder name, shared by the tests (the step limit is an array: no recompiles)."""
    b = prompt.shape[0]
    if name not in _COMPILED:
        _COMPILED[name] = (jit_for_tests(partial(init_loop, decoder, max_out=max_new)),
                           jit_for_tests(partial(run_loop, decoder)))
    init, loop = _COMPILED[name]
    sampling = SamplingArrays.from_params([SamplingParams(temperature=temperature)] * b,
                                          specialize_greedy=True)
    keys = jax.vmap(jax.random.key)(jnp.arange(b) + seed)
    ls = init(params, prompt, lengths, sampling, keys, jnp.full((b,), max_new, jnp.int32),
              jnp.full((b, 1), -1, jnp.int32))
    return ls, partial(loop, params)


def decode_stepwise(name, decoder, params, prompt, lengths, on_step=None, max_new=MAX_NEW):
    """Runs the loop one step per call. on_step(before, after) sees both LoopStates. Returns
    the tokens [B, max_new] and the tokens each row emitted per step [steps, B] (0 once done)."""
    ls, loop = start(name, decoder, params, prompt, lengths, max_new)
    emitted = []
    while not bool(ls.done.all()):
        before, ls = ls, loop(ls, jnp.int32(1))
        emitted.append(np.asarray(ls.n_out) - np.asarray(before.n_out))
        if on_step is not None:
            on_step(before, ls)
    return np.asarray(ls.out), np.asarray(emitted)


def greedy_reference(params, prompt, lengths, cfg=CFG):
    """Autoregressive greedy tokens [B, MAX_NEW]."""
    ls, loop = start(f"ar-{cfg.vocab_size}", autoregressive(cfg, MAX_LEN), params, prompt,
                     lengths)
    return np.asarray(loop(ls, jnp.int32(1 << 20)).out)


def rows_differ(emitted: np.ndarray) -> bool:
    """Whether, at some step where every row was live, rows emitted different counts."""
    live = emitted[(emitted > 0).all(1)]
    return any(len(set(row)) > 1 for row in live)
