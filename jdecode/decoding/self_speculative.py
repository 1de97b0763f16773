"""Self-speculative decoding (LayerSkip, Elhoushi et al. 2024): the target's first E layers and
an exit head draft k tokens, and the full model verifies them, through `speculative`.

Drafting and verification share the target's cache. Each draft pass writes the early layers'
K/V of its token into it, and keeps that token's hidden state after layer E - 1. Verification
then runs only layers E..L-1 on those hidden states for the k+1 block tokens. The early
layers are never run twice: of an accepted token, the K/V are the ones the full model would
write, and of a rejected one, the slots are rewritten before any later query reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jdecode.cache.dense import DenseMeta, make_dense_attend
from jdecode.config import ModelConfig
from jdecode.decoding.drafters import Drafter, draw
from jdecode.decoding.early_exit import ExitHeads, exit_logits, init_exits, load_exits, resolve_exit
from jdecode.io.registry import Model
from jdecode.model.layers import rms_norm, rope_tables
from jdecode.model.linear import make_linear
from jdecode.model.transformer import lm_head, run_layers


def check_depth(cfg: ModelConfig, depth: int) -> None:
    if not 1 <= depth < cfg.num_layers:
        raise ValueError(f"self-speculation drafts with the first E of the target's "
                         f"{cfg.num_layers} layers: E={depth} must lie in "
                         f"1..{cfg.num_layers - 1}")


def layerskip_drafter(cfg: ModelConfig, depth: int, exit_index: int, impl: str = "xla"
                      ) -> Drafter:
    """The drafter for `speculative` whose draft params are `ExitHeads`.

    Args:
      cfg: the target's config. depth: E, the layers the draft runs (1 <= E < L).
      exit_index: the exit (of the heads) that follows layer E - 1. impl: attention impl.
    """
    check_depth(cfg, depth)
    attend, linear = make_dense_attend(cfg, impl), make_linear(impl)
    kw = {"cfg": cfg, "attend": attend, "linear": linear}
    eps = cfg.rms_norm_eps

    def init(heads, prompt, lengths):
        return None  # all state is in the target's cache

    def draft_and_score(params, heads: ExitHeads, aux: Any, cache: Any, tokens: jax.Array,
                        prev: jax.Array, positions: jax.Array, sampling: Any,
                        keys: jax.Array | None, k: int):
        step_keys = [None] * k if keys is None else list(
            jnp.swapaxes(jax.vmap(lambda key: jax.random.split(key, k))(keys), 0, 1))
        hidden, toks, qs, tok = [], [], [], tokens
        # k + 1 early passes (unrolled: k is small and static): the input token and every
        # draft, each writing layers < E at its slot; the last draft only needs its hidden
        # state for verification, not a distribution.
        for i in range(k + 1):
            pos = positions[:, None] + i  # [B, 1]
            cos, sin = rope_tables(pos, cfg)
            x, cache, _ = run_layers(params, params.embed[tok[:, None]], cos, sin, cache,
                                     DenseMeta(pos), stop=depth, **kw)
            hidden.append(x)  # [B, 1, E]
            if i < k:
                tok, q = draw(exit_logits(params, heads, exit_index, x, eps)[:, 0], sampling,
                              step_keys[i])
                toks.append(tok)
                qs.append(q)
        pos = positions[:, None] + jnp.arange(k + 1)  # [B, k+1]
        cos, sin = rope_tables(pos, cfg)
        x, cache, _ = run_layers(params, jnp.concatenate(hidden, axis=1), cos, sin, cache,
                                 DenseMeta(pos), start=depth, **kw)
        logits = lm_head(params, rms_norm(x, params.final_norm, eps))  # [B, k+1, V]
        q = None if keys is None else jnp.stack(qs, axis=1)  # [B, k, V]
        return jnp.stack(toks, axis=1), q, logits, cache, aux

    return Drafter(init=init, propose=None, draft_and_score=draft_and_score)


def build_self_draft(target: Model, spec: str, impl: str
                     ) -> tuple[ExitHeads, Callable[[ModelConfig, int], Drafter]]:
    """The draft of `speculative`'s draft="self:E" (the model's own final norm and head after
    E layers, untrained) or "self:E:EXITS" (a trained exits artifact's exit after E layers).

    Returns:
      (exit heads: the draft params, drafter_fn(cfg, max_len) -> Drafter).
    """
    _, depth, *path = spec.split(":", 2)
    if not depth.isdigit():
        raise ValueError(f"draft={spec!r}: write self:E or self:E:EXITS, E the draft's layers")
    depth = int(depth)
    check_depth(target.cfg, depth)
    if path:
        heads, _ = load_exits(path[0], target)
        exit_index = resolve_exit(heads, depth)
    else:
        heads, exit_index = init_exits(target.params, (depth - 1,), 0, jax.random.key(0)), 0
    return heads, lambda cfg, max_len: layerskip_drafter(cfg, depth, exit_index, impl)
