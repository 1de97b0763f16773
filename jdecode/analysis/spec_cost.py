"""Cost model of speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers
via Speculative Decoding", sections 3.1-3.4), for the speculative, Medusa and early-exit
transforms to choose the draft length k, a tree or a chain, or switch speculation off.

Units: all costs are relative to one target decode step (the roofline step time at the same
batch and context). c is the cost of one draft step; `verify_cost` is the cost of the target
scoring k+1 tokens in one pass: about 1 while decode is bandwidth-bound, growing with k once
the batch makes the step compute-bound, which is when speculation stops paying.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

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


def expected_tokens_tree(paths: Sequence[Sequence[int]],
                         rank_accuracy: Sequence[Sequence[float]]) -> float:
    """Expected tokens per step of a static candidate tree under independent per-head hits.

    Node (r_1, ..., r_d) is on the accepted path iff the rank-r_i candidate of head i was the
    right token at every depth i, with probability prod_i rank_accuracy[i - 1][r_i] (Medusa's
    model, sec. 2.3.3; heads are treated as independent). Every node contributes that
    probability to the accepted length, plus the target's own token.

    Args:
      paths: the tree's non-root nodes as rank paths (`tree.StaticTree.paths`).
      rank_accuracy: [depth][rank] probability that the rank-th candidate at that depth is right.
    Returns:
      1 + sum over nodes of their path probability; a chain of rank-0 nodes gives
      `expected_tokens_chain` of the heads' top-1 rates.
    """
    total = 1.0
    for path in paths:
        if len(path) > len(rank_accuracy) or any(r >= len(rank_accuracy[d])
                                                 for d, r in enumerate(path)):
            raise ValueError(f"tree path {tuple(path)} reaches past the {len(rank_accuracy)} "
                             "depths x ranks of rank_accuracy: measure more heads or ranks")
        total += math.prod(rank_accuracy[d][r] for d, r in enumerate(path))
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
    speedups = {k: expected_speedup(alpha, k, c, verify_cost) for k in range(1, max_k + 1)}
    return _best_or_off(speedups, min_speedup)[0]


def _best_or_off(speedups: Mapping[int, float], min_speedup: float) -> tuple[int, float]:
    """(k, speedup) of the best k (the smallest on ties), or (0, 1.0) if none beats min_speedup."""
    best_k = max(sorted(speedups), key=lambda k: speedups[k])
    if speedups[best_k] <= min_speedup:
        return 0, 1.0
    return best_k, speedups[best_k]


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


# -- calibrated from a measured full round ----------------------------------------------------
# The functions above price a round as k * c + verify_cost, with parts timed in isolation. On
# the H100 that missed two costs that grow with batch (benchmarks/speculative.md): per-row
# bookkeeping (n-gram lookup, acceptance, cache writes) and stragglers, since a batch iterates
# until its slowest row is done. Below, the round is timed whole, as the jitted decoder runs
# it, and the batch's rounds are E[max over rows] rather than tokens / mean accepted length.


def tokens_per_round_pmf(alpha: float, k: int) -> list[float]:
    """P(one round emits j tokens) for j = 0..k+1, under i.i.d. acceptance at rate alpha.

    j - 1 drafts accepted then one rejected: alpha^(j-1) (1 - alpha) for j <= k; all k accepted:
    alpha^k. Entry 0 is 0 (the target always adds a token). Its mean is expected_tokens(alpha, k).
    """
    expected_tokens(alpha, k)  # validates alpha and k
    return [0.0, *(alpha ** (j - 1) * (1.0 - alpha) for j in range(1, k + 1)), alpha**k]


def rounds_cdf(alpha: float, k: int, num_tokens: int) -> list[float]:
    """P(a row has emitted >= num_tokens within r rounds), for r = 0..num_tokens.

    A round emits at least one token, so the last entry is 1. Dynamic programming over the
    tokens emitted so far by rows not yet done: O(num_tokens^2 k).
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens={num_tokens} must be >= 1")
    pmf = tokens_per_round_pmf(alpha, k)
    running = [1.0] + [0.0] * (num_tokens - 1)  # running[n]: P(n emitted, still short)
    cdf = [0.0]
    for _ in range(num_tokens):
        nxt = [0.0] * num_tokens
        for n, p in enumerate(running):
            if p:
                for j in range(1, min(k + 1, num_tokens - 1 - n) + 1):  # n + j stays short
                    nxt[n + j] += p * pmf[j]
        running = nxt
        cdf.append(1.0 - sum(running))
    cdf[-1] = 1.0  # exact; the sum above leaves rounding
    return cdf


def expected_batch_rounds(row_alphas: Sequence[float], k: int, num_tokens: int) -> float:
    """E[max over rows of the rounds each needs for num_tokens tokens], rows independent.

    A rectangular batch steps until its slowest row is done: E[max R_i] = sum over r of
    (1 - prod_i P(R_i <= r)). With one row this is about num_tokens / expected_tokens (a bit
    more: the last round overshoots); k = 0 gives num_tokens (plain decoding).
    """
    if not row_alphas:
        raise ValueError("row_alphas is empty: give one acceptance rate per row of the batch")
    counts = Counter(row_alphas)  # a homogeneous batch needs one cdf
    cdfs = {a: rounds_cdf(a, k, num_tokens) for a in counts}
    return sum(1.0 - math.prod(cdfs[a][r] ** n for a, n in counts.items())
               for r in range(num_tokens))


def calibrated_speedup(round_s: float, step_s: float, row_alphas: Sequence[float], k: int,
                       num_tokens: int | None = None) -> float:
    """Predicted speedup from a measured full speculative round and a measured plain step.

    Args:
      round_s: seconds of one full speculative iteration at this batch size (k draft steps,
        verify, acceptance, cache writes and rollback, as the jitted decoder runs it).
      step_s: seconds of one autoregressive step at the same batch size.
      row_alphas: per-token acceptance rate of each row of the batch ([alpha] * batch for a
        homogeneous batch). k: draft length.
      num_tokens: tokens each row decodes. Given, the batch takes E[max rows' rounds] rounds
        (stragglers) against num_tokens plain steps; None: the steady state, mean expected
        tokens per round (no stragglers).
    Returns:
      plain decode time / speculative decode time for the same tokens.
    """
    if round_s <= 0 or step_s <= 0:
        raise ValueError(f"round_s={round_s}, step_s={step_s}: both must be measured times > 0")
    if num_tokens is None:
        tokens = sum(expected_tokens(a, k) for a in row_alphas) / max(len(row_alphas), 1)
        return tokens * step_s / round_s
    return num_tokens * step_s / (expected_batch_rounds(row_alphas, k, num_tokens) * round_s)


def choose_k_calibrated(round_s: Mapping[int, float], step_s: float,
                        row_alphas: Mapping[int, Sequence[float]], num_tokens: int | None = None,
                        min_speedup: float = 1.0) -> tuple[int, float]:
    """The draft length with the best `calibrated_speedup`, or 0 (speculation off).

    Args:
      round_s: k -> measured seconds of one full speculative round at this batch size.
      step_s: measured seconds of one autoregressive step at the same batch size.
      row_alphas: k -> per-row acceptance rates measured at that k (acceptance is not i.i.d.
        in practice: n-gram drafts accept differently at different k).
      num_tokens, min_speedup: see `calibrated_speedup` and `choose_k`.
    Returns:
      (k, predicted speedup); (0, 1.0) when no measured k beats min_speedup.
    """
    missing = sorted(set(round_s) - set(row_alphas))
    if not round_s or missing:
        raise ValueError(f"round times for k={sorted(round_s)} but acceptance for "
                         f"k={sorted(row_alphas)}: give both for every candidate k")
    speedups = {k: calibrated_speedup(round_s[k], step_s, row_alphas[k], k, num_tokens)
                for k in round_s}
    return _best_or_off(speedups, min_speedup)


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


# -- tree, chain or no speculation, per batch size ---------------------------------------------
# A tree verifies more tokens per round than a chain and accepts more of them; once a batch
# makes the target's pass cost more per verified token, the chain wins, then plain decoding.
# Each candidate is priced as its tokens per round over its round's cost in plain decode steps
# at the same batch size: tau / (round_s / step_s), i.e. its speedup.


def round_cost(tokens_per_round: float, speedup: float) -> float:
    """A round's cost in plain decode steps, from a measured tau and speedup (same batch size):
    speedup = tau * step_s / round_s."""
    if tokens_per_round < 1.0 or speedup <= 0.0:
        raise ValueError(f"tau={tokens_per_round}, speedup={speedup}: tau is >= 1 (a round "
                         "emits at least the target's token) and the speedup is > 0")
    return tokens_per_round / speedup


def choose_shape(tokens_per_round: Mapping[str, float], cost: Mapping[str, float],
                 min_speedup: float = 1.0) -> tuple[str | None, float]:
    """The candidate (a tree, a chain, ...) with the best tokens_per_round / cost, or no
    speculation.

    Args:
      tokens_per_round: candidate -> expected (or measured) tokens per round per row.
      cost: candidate -> one round's cost in plain decode steps at this batch size.
      min_speedup: a candidate must beat this (1.0: break-even; e.g. 1.02 keeps a margin).
    Returns:
      (candidate, predicted speedup); (None, 1.0) when none beats min_speedup: decode plainly.
    """
    missing = sorted(set(tokens_per_round) ^ set(cost))
    if missing:
        raise ValueError(f"candidates {missing} have tokens or a cost but not both")
    speedups = {c: tokens_per_round[c] / cost[c] for c in sorted(cost)}
    best = max(speedups, key=lambda c: speedups[c], default=None)
    if best is None or speedups[best] <= min_speedup:
        return None, 1.0
    return best, speedups[best]


def plan_by_batch(tokens_per_round: Mapping[int, Mapping[str, float]],
                  cost: Mapping[int, Mapping[str, float]], min_speedup: float = 1.0
                  ) -> dict[int, tuple[str | None, float]]:
    """`choose_shape` at every batch size: batch -> (candidate or None, predicted speedup).

    tokens_per_round and cost are keyed by batch size, then by candidate; a batch size may
    price a subset of the candidates.
    """
    return {b: choose_shape(tokens_per_round[b], cost[b], min_speedup) for b in sorted(cost)}
