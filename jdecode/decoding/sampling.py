"""Sampling as pure functions over per-row parameter arrays (a new temperature never recompiles).

Order follows HF `generate`: repetition penalty, temperature, top-k, top-p, min-p, then draw.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# Seeds become uint32 PRNG key material; top_k an int32 array entry.
MAX_SEED = 2**32 - 1
MAX_TOP_K = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters (host side), validated on construction.

    temperature 0 means greedy. top_k 0, top_p 1, min_p 0 and repetition_penalty 1 are "off".
    `n` is the number of sequences sampled per prompt (the engine's `LLM`; `Generator` makes
    one). `max_tokens` is vLLM's name for `max_new_tokens`: when given, it sets it.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    max_tokens: dataclasses.InitVar[int | None] = None

    def __post_init__(self, max_tokens: int | None) -> None:
        if max_tokens is not None:
            object.__setattr__(self, "max_new_tokens", max_tokens)
        is_int = lambda x: isinstance(x, numbers.Integral) and not isinstance(x, bool)
        finite = lambda x: isinstance(x, numbers.Real) and math.isfinite(x)
        checks = [
            (finite(self.temperature) and self.temperature >= 0, "temperature",
             "use 0 for greedy or a value > 0"),
            (is_int(self.top_k) and 0 <= self.top_k <= MAX_TOP_K, "top_k",
             f"use 0 (off) or k in [1, {MAX_TOP_K}]"),
            (finite(self.top_p) and 0 < self.top_p <= 1, "top_p",
             "it must lie in (0, 1]; 1 turns it off"),
            (finite(self.min_p) and 0 <= self.min_p <= 1, "min_p",
             "it must lie in [0, 1]; 0 turns it off"),
            (finite(self.repetition_penalty) and self.repetition_penalty > 0,
             "repetition_penalty", "it must be finite and > 0; 1 is off"),
            (self.seed is None or (is_int(self.seed) and 0 <= self.seed <= MAX_SEED), "seed",
             f"use None (random) or an integer in [0, {MAX_SEED}]"),
            (is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
             "max_new_tokens", "ask for at least 1 token"),
            (is_int(self.n) and self.n >= 1, "n", "ask for at least 1 sequence"),
        ]
        for ok, name, fix in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range: {fix}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            # "" is in every text: it would end every sequence before its first token.
            raise ValueError(f"stop={stop!r}: stop strings must be non-empty strings")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string: the
    text a stream must hold back, since later tokens may complete the stop string.

    Only suffixes starting with a stop string's first character are compared, so a long stop
    string costs one `find` per occurrence of that character, not one comparison per length.
    """
    best = 0
    for s in stops:
        i = text.find(s[0], max(len(text) - len(s) + 1, 0))
        while i != -1 and len(text) - i > best:
            if s.startswith(text[i:]):
                best = len(text) - i  # the earliest match is the longest for this stop
                break
            i = text.find(s[0], i + 1)
    return best


@struct.dataclass
class SamplingArrays:
    """Device-side per-row parameters, [B] each.

    `all_greedy` and `specialized` are static (pytree metadata). On XLA:GPU a `lax.cond` copies
    its predicate to the host and waits, once per step, so a caller that knows the batch's kind
    says so: `specialized` batches compile without the cond, to a bare argmax with no key split
    when `all_greedy`, else to the sampling path (some row samples). Unspecialized batches keep
    one executable for every mix and branch on the device; either way a new temperature is just
    a new array value.
    """

    temperature: jax.Array  # [B] f32, 0 = greedy
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] f32
    min_p: jax.Array  # [B] f32
    repetition_penalty: jax.Array  # [B] f32
    all_greedy: bool = struct.field(pytree_node=False, default=False)
    specialized: bool = struct.field(pytree_node=False, default=False)

    @staticmethod
    def from_params(params: Sequence[SamplingParams], pad_to: int | None = None,
                    specialize_greedy: bool = False) -> SamplingArrays:
        """Stacks per-request parameters into [pad_to] arrays (padding rows are greedy).

        specialize_greedy: decide the branch on the host (`specialized`): an all-greedy batch
        compiles to a bare argmax, any other to the sampling path, neither with a `lax.cond`
        (two executables per shape, each compiled the first time a batch of its kind arrives).
        """
        rows = list(params) + [SamplingParams()] * ((pad_to or len(params)) - len(params))
        # Host arrays: the jitted step transfers them with its other arguments in one go.
        col = lambda f, dt: np.array([getattr(p, f) for p in rows], dt)
        return SamplingArrays(col("temperature", np.float32), col("top_k", np.int32),
                              col("top_p", np.float32), col("min_p", np.float32),
                              col("repetition_penalty", np.float32),
                              all_greedy=specialize_greedy and all(p.greedy for p in rows),
                              specialized=specialize_greedy)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array
                             ) -> jax.Array:
    """HF rule on tokens already in prompt or output: positive logits / p, negative * p.

    logits: [B, V] f32; seen: [B, V] bool; penalty: [B].
    """
    p = penalty[:, None]
    penalized = jnp.where(logits > 0, logits / p, logits * p)
    return jnp.where(seen, penalized, logits)


def filter_logits(logits: jax.Array, sp: SamplingArrays) -> jax.Array:
    """Temperature, then top-k, top-p and min-p masks (-inf outside), one sort per row.

    logits: [B, V] f32 -> [B, V] f32 scaled and masked; greedy rows are left unscaled.
    """
    temp = jnp.where(sp.temperature > 0, sp.temperature, 1.0)[:, None]
    scaled = logits / temp
    v = logits.shape[-1]
    sorted_desc = -jnp.sort(-scaled, axis=-1)  # [B, V]
    # top-k: threshold is the k-th largest value (ties at the threshold are kept, as in HF).
    k = jnp.where(sp.top_k > 0, jnp.minimum(sp.top_k, v), v)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # [B, 1]
    sorted_desc = jnp.where(jnp.arange(v)[None] < k[:, None], sorted_desc, -jnp.inf)
    # top-p on the top-k-renormalized distribution: keep a token if the mass strictly before
    # it is < top_p (HF's "cumulative ascending mass <= 1 - p is removed", descending form).
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < sp.top_p[:, None]
    keep_sorted = keep_sorted.at[:, 0].set(True)  # always keep the best token
    n_keep = keep_sorted.sum(-1)
    pth = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
    # min-p: drop tokens whose probability (after top-k/top-p) is < min_p * max probability,
    # i.e. logit < max_logit + log(min_p).
    minp_th = jnp.where(sp.min_p[:, None] > 0, sorted_desc[:, :1] + jnp.log(
        jnp.maximum(sp.min_p[:, None], 1e-30)), -jnp.inf)
    threshold = jnp.maximum(jnp.maximum(kth, pth), minp_th)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample(logits: jax.Array, sp: SamplingArrays, keys: jax.Array,
           seen: jax.Array | None = None) -> jax.Array:
    """Draws one token per row: greedy where temperature == 0, filtered sampling elsewhere.

    Args:
      logits: [B, V] f32. sp: per-row parameters. keys: [B] typed PRNG keys (one per request,
        so a request's samples do not depend on its batch neighbours). seen: optional [B, V]
        bool for the repetition penalty.
    Returns:
      [B] int32 tokens.
    """
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, sp.repetition_penalty)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if sp.all_greedy:
        return greedy

    def draw(_):
        filtered = filter_logits(logits, sp)
        drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
        return jnp.where(sp.temperature > 0, drawn, greedy)

    if sp.specialized:  # known on the host: some row samples
        return draw(None)
    # Skip the sort entirely when the whole batch is greedy (the common benchmark case).
    return jax.lax.cond(jnp.any(sp.temperature > 0), draw, lambda _: greedy, None)
