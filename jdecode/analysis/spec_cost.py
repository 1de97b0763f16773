"""Cost model of speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers
via Speculative Decoding", sections 3.1-3.4), for the speculative, Medusa and early-exit
transforms to choose the draft length k or switch speculation off.

Units: all costs are relative to one target decode step (the roofline step time at the same
batch and context). c is the cost of one draft step; `verify_cost` is the cost of the target
scoring k+1 tokens in one pass: about 1 while decode is bandwidth-bound, growing with k once
the batch makes the step compute-bound, which is when speculation stops paying.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from jdecode.analysis.costs import decode_phase, verify_phase
from jdecode.analysis.hardware import Hardware
from jdecode.analysis.roofline import analyze
from jdecode.config import ModelConfig

VerifyCost = float | Callable[[int], float]


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"acceptance rate alpha={alpha} must lie in [0, 1]")


def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens per verification step with k drafted tokens: (1 - a^(k+1)) / (1 - a).

    Args:
      alpha: per-token acceptance rate in [0, 1] (i.i.d. assumption of the paper).
      k: drafted tokens per step (the paper's gamma), >= 0; k = 0 is plain decoding.
    Returns:
      Accepted drafts plus the one token the target always contributes, in [1, k + 1].
    """
    _check_alpha(alpha)
    if k < 0:
        raise ValueError(f"k={k}: the number of drafted tokens must be >= 0")
    if alpha == 1.0:  # limit of the geometric sum
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def expected_tokens_chain(accept_probs: Sequence[float]) -> float:
    """Expected tokens when draft i is accepted with probability p_i given all before it were.

    Medusa heads and early-exit drafts have per-position rates; 1 + sum_i prod_{j<=i} p_j.
    With every p_i = alpha this equals `expected_tokens(alpha, len(accept_probs))`.
    """
    total, run = 1.0, 1.0
    for p in accept_probs:
        _check_alpha(p)
        run *= p
        total += run
    return total


def _verify(verify_cost: VerifyCost, k: int) -> float:
    return verify_cost(k) if callable(verify_cost) else float(verify_cost)


def expected_speedup(alpha: float, k: int, c: float, verify_cost: VerifyCost = 1.0) -> float:
    """Predicted walltime speedup over plain decoding: E[tokens] / (k * c + verify_cost).

    With verify_cost = 1 this is the paper's (1 - a^(k+1)) / ((1 - a)(k c + 1)).

    Args:
      alpha: acceptance rate. k: draft length. c: draft step cost / target step cost.
      verify_cost: target cost of scoring k+1 tokens, relative to one decode step (a number,
        or a function of k such as `verify_cost_fn(...)`).
    """
    if c < 0:
        raise ValueError(f"draft cost ratio c={c} must be >= 0")
    return expected_tokens(alpha, k) / (k * c + _verify(verify_cost, k))


def choose_k(alpha: float, c: float, max_k: int, verify_cost: VerifyCost = 1.0,
             min_speedup: float = 1.0) -> int:
    """The draft length in 1..max_k with the best predicted speedup, or 0 to switch off.

    Speculation is off (0) when no k beats `min_speedup` (1.0 = break-even; pass e.g. 1.05 to
    demand a margin for the draft's fixed overheads).
    """
    if max_k < 1:
        raise ValueError(f"max_k={max_k} must be >= 1")
    best_k = max(range(1, max_k + 1), key=lambda k: expected_speedup(alpha, k, c, verify_cost))
    if expected_speedup(alpha, best_k, c, verify_cost) <= min_speedup:
        return 0
    return best_k


def should_speculate(alpha: float, c: float, k: int, verify_cost: VerifyCost = 1.0,
                     min_speedup: float = 1.0) -> bool:
    """The "speculation off" rule: True iff drafting k tokens is predicted to beat plain decode.

    Equivalent to alpha > `break_even_alpha(c, k, verify_cost)` (the speedup rises with alpha).
    """
    return expected_speedup(alpha, k, c, verify_cost) > min_speedup


def break_even_alpha(c: float, k: int, verify_cost: VerifyCost = 1.0,
                     min_speedup: float = 1.0) -> float:
    """Smallest acceptance rate at which k drafts reach `min_speedup` (1.0 if never)."""
    if expected_speedup(1.0, k, c, verify_cost) <= min_speedup:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection; expected_tokens is increasing in alpha
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if expected_speedup(mid, k, c, verify_cost) <= min_speedup else (lo, mid)
    return hi


def verify_cost_fn(cfg: ModelConfig, hw: Hardware, batch: int, context: int, *,
                   dtype: str | None = None, attention: str = "flash"
                   ) -> Callable[[int], float]:
    """verify_cost(k) from the roofline: time to score k+1 tokens / time of one decode step.

    At batch 1 this stays near 1 for small k (weights are read once either way); at large batch
    the linear layers become compute-bound and it grows towards k + 1.
    """
    kw = {"dtype": dtype, "convention": "full", "attention": attention}
    base = analyze(cfg, decode_phase(batch, context), hw, **kw).step_time_s
    cache: dict[int, float] = {}

    def cost(k: int) -> float:
        if k not in cache:
            cache[k] = analyze(cfg, verify_phase(batch, context, k), hw, **kw).step_time_s / base
        return cache[k]

    return cost


def draft_cost_ratio(target: ModelConfig, draft: ModelConfig, hw: Hardware, batch: int,
                     context: int, *, dtype: str | None = None, attention: str = "flash"
                     ) -> float:
    """c = roofline decode step time of the draft model / that of the target, same b, context."""
    kw = {"dtype": dtype, "convention": "full", "attention": attention}
    t_target = analyze(target, decode_phase(batch, context), hw, **kw).step_time_s
    t_draft = analyze(draft, decode_phase(batch, context), hw, **kw).step_time_s
    return t_draft / t_target


def plan_speculation(target: ModelConfig, draft: ModelConfig, hw: Hardware, alpha: float,
                     batch: int, context: int, max_k: int = 8, *, dtype: str | None = None,
                     min_speedup: float = 1.0) -> dict:
    """Chooses k for a draft/target pair at this batch and context from the roofline.

    Returns:
      {"k": chosen k (0 = speculation off), "speedup": predicted speedup at k (1.0 when off),
       "c": draft cost ratio, "verify_cost": verify cost at k, "expected_tokens": at k}.
    """
    c = draft_cost_ratio(target, draft, hw, batch, context, dtype=dtype)
    verify = verify_cost_fn(target, hw, batch, context, dtype=dtype)
    k = choose_k(alpha, c, max_k, verify, min_speedup)
    if k == 0:
        return {"k": 0, "speedup": 1.0, "c": c, "verify_cost": 1.0, "expected_tokens": 1.0}
    return {"k": k, "speedup": expected_speedup(alpha, k, c, verify), "c": c,
            "verify_cost": verify(k), "expected_tokens": expected_tokens(alpha, k)}
