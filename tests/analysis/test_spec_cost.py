"""Speculative-decoding cost model: expected tokens, speedup, choice of k, switch-off rule."""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from jdecode.analysis.hardware import get_hardware
from jdecode.analysis.spec_cost import (
    break_even_alpha,
    calibrated_speedup,
    choose_k,
    choose_k_calibrated,
    choose_shape,
    draft_cost_ratio,
    expected_batch_rounds,
    expected_speedup,
    expected_tokens,
    expected_tokens_chain,
    expected_tokens_tree,
    plan_by_batch,
    plan_speculation,
    round_cost,
    rounds_cdf,
    should_speculate,
    tokens_per_round_pmf,
    verify_cost_fn,
)
from jdecode.config import load_model_config_yaml

ROOT = Path(__file__).resolve().parents[2]


def test_expected_tokens_closed_form():
    assert expected_tokens(0.8, 4) == pytest.approx((1 - 0.8**5) / 0.2) == pytest.approx(3.3616)
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.7, 0) == 1.0
    with pytest.raises(ValueError, match="alpha=1.2"):
        expected_tokens(1.2, 3)


def test_chain_matches_geometric_and_per_head_rates():
    assert expected_tokens_chain([0.7] * 5) == pytest.approx(expected_tokens(0.7, 5))
    assert expected_tokens_chain([0.9, 0.5, 0.2]) == pytest.approx(1 + 0.9 + 0.45 + 0.09)


def test_speedup_is_the_papers_formula():
    # Leviathan et al.: (1 - a^(k+1)) / ((1 - a)(k c + 1)); a=0.8, k=4, c=0.05 -> 3.3616 / 1.2
    assert expected_speedup(0.8, 4, 0.05) == pytest.approx(3.3616 / 1.2)
    assert expected_speedup(0.8, 4, 0.05, verify_cost=2.0) == pytest.approx(3.3616 / 2.2)
    assert expected_speedup(0.8, 2, 0.1, verify_cost=lambda k: 1 + 0.1 * k) == pytest.approx(
        2.44 / 1.4)


def test_choose_k_and_switch_off():
    assert choose_k(0.9, 0.0, 8) == 8  # a free draft: draft as far as allowed
    # a=0.8, c=0.1: speedups 2.4595 (k=5), 2.4696 (k=6), 2.4477 (k=7): the optimum is 6
    assert choose_k(0.8, 0.1, 10) == 6
    assert choose_k(0.8, 0.1, 4) == 4  # capped by max_k
    assert choose_k(0.3, 0.5, 8) == 0  # E[tokens] <= 1.43 never pays for a half-cost draft
    assert choose_k(0.8, 0.05, 8, verify_cost=lambda k: 1.0 + 0.8 * k) == 0  # compute-bound
    assert not should_speculate(0.3, 0.5, 2) and should_speculate(0.8, 0.05, 4)
    with pytest.raises(ValueError, match="max_k=0"):
        choose_k(0.5, 0.1, 0)


def test_break_even_alpha():
    a = break_even_alpha(0.2, 3)
    assert expected_speedup(a, 3, 0.2) == pytest.approx(1.0, abs=1e-9)
    assert should_speculate(a + 0.01, 0.2, 3) and not should_speculate(a - 0.01, 0.2, 3)
    assert break_even_alpha(1.0, 3) == 1.0  # k c + 1 = 4 = k + 1: never strictly faster


def test_roofline_driven_plan_switches_off_at_large_batch():
    hw = get_hardware("h100-sxm")
    target = load_model_config_yaml(ROOT / "configs/models/llama-3-8b.yaml")
    draft = load_model_config_yaml(ROOT / "configs/models/llama-3.2-1b.yaml")
    verify = verify_cost_fn(target, hw, 1, 1024)
    assert 1.0 <= verify(4) < 1.02  # batch 1: the weights are read once for 1 or 5 tokens
    assert verify_cost_fn(target, hw, 1024, 128)(4) > 3.0  # compute-bound: ~k+1
    c = draft_cost_ratio(target, draft, hw, 1, 1024)
    assert 0.1 < c < 0.25  # 1B / 8B weight bytes
    small = plan_speculation(target, draft, hw, 0.6, batch=1, context=1024)
    assert small["k"] >= 1 and small["speedup"] > 1.3
    large = plan_speculation(target, draft, hw, 0.6, batch=1024, context=128)
    assert large == {"k": 0, "speedup": 1.0, "c": pytest.approx(large["c"]),
                     "verify_cost": 1.0, "expected_tokens": 1.0}


# -- calibrated from measured full rounds -------------------------------------------------------
def _rounds_brute_force(alpha: float, k: int, n: int) -> dict[int, float]:
    """P(R = r) by enumerating every sequence of round outcomes (tokens 1..k+1) until >= n."""
    probs = {j: alpha ** (j - 1) * (1 - alpha) for j in range(1, k + 1)} | {k + 1: alpha**k}
    dist: dict[int, float] = {}
    for r in range(1, n + 1):
        for seq in itertools.product(range(1, k + 2), repeat=r):
            if sum(seq) >= n and sum(seq[:-1]) < n:  # done exactly at round r
                dist[r] = dist.get(r, 0.0) + math.prod(probs[j] for j in seq)
    return dist


def test_round_distribution_matches_enumeration():
    pmf = tokens_per_round_pmf(0.6, 3)
    assert pmf == pytest.approx([0.0, 0.4, 0.24, 0.144, 0.216])
    assert sum(j * p for j, p in enumerate(pmf)) == pytest.approx(expected_tokens(0.6, 3))
    for alpha, k, n in [(0.6, 2, 7), (0.25, 3, 6), (0.9, 1, 5)]:
        exact = _rounds_brute_force(alpha, k, n)
        cdf = rounds_cdf(alpha, k, n)
        assert cdf == pytest.approx([sum(p for r, p in exact.items() if r <= x)
                                     for x in range(n + 1)], abs=1e-12)
    assert rounds_cdf(0.0, 4, 5) == [0, 0, 0, 0, 0, 1]  # one token a round
    assert rounds_cdf(1.0, 2, 7)[2:4] == pytest.approx([0.0, 1.0])  # 3 tokens a round: 3 rounds


def test_straggler_rounds_against_brute_force_and_monte_carlo():
    alphas, k, n = [0.3, 0.6, 0.6], 2, 7
    exact = [_rounds_brute_force(a, k, n) for a in alphas]
    brute = sum(max(rs) * math.prod(exact[i][r] for i, r in enumerate(rs))
                for rs in itertools.product(*(sorted(e) for e in exact)))
    assert expected_batch_rounds(alphas, k, n) == pytest.approx(brute, abs=1e-12)
    # Monte Carlo over the decode loop itself: rows draw accepted drafts until n tokens.
    rng = np.random.default_rng(0)
    trials, rounds = 20000, np.zeros(20000)
    emitted = np.zeros((trials, len(alphas)))
    while (emitted < n).any():
        live = emitted < n
        rounds += live.any(1)
        accepted = (rng.random((trials, len(alphas), k)) < np.asarray(alphas)[:, None])
        emitted += live * (1 + np.cumprod(accepted, axis=2).sum(2))
    assert rounds.mean() == pytest.approx(brute, abs=0.03)  # about 4 standard errors
    # One row is never slower than the batch it joins; plain decoding takes n rounds.
    assert expected_batch_rounds([0.6], k, n) < expected_batch_rounds([0.6] * 8, k, n)
    assert expected_batch_rounds([0.6] * 4, 0, n) == pytest.approx(n)


def test_calibrated_speedup_reduces_to_the_isolated_model():
    # One row in the steady state, a round priced as k c + verify_cost: expected_speedup.
    step = 2e-3
    for alpha, k, c, vc in [(0.7, 3, 0.1, 1.05), (0.3, 5, 0.0, 1.2)]:
        assert calibrated_speedup((k * c + vc) * step, step, [alpha], k) == pytest.approx(
            expected_speedup(alpha, k, c, vc))
    # Stragglers: the same round costs more tokens' worth of time in a batch of 64.
    one = calibrated_speedup(2.2e-3, step, [0.5], 4, num_tokens=63)
    many = calibrated_speedup(2.2e-3, step, [0.5] * 64, 4, num_tokens=63)
    assert many < 0.9 * one
    with pytest.raises(ValueError, match="round_s=0"):
        calibrated_speedup(0, step, [0.5], 4)


def test_choose_k_calibrated_switches_off_when_rounds_grow_with_batch():
    step = 1e-3
    # Batch 1, cheap rounds: the k of the largest speedup (1.75/1.05, 1.875/1.1, 1.9375/1.2).
    k, s = choose_k_calibrated({2: 1.05e-3, 3: 1.1e-3, 4: 1.2e-3}, step,
                               {k: [0.5] for k in (2, 3, 4)})
    assert (k, s) == (3, pytest.approx(1.875 / 1.1))
    # Batch 16, rounds cost 1.8-2.2 steps: E[tokens] <= 1.94 cannot pay for them.
    alphas = {k: [0.5] * 16 for k in (2, 3, 4)}
    assert choose_k_calibrated({2: 1.8e-3, 3: 2.0e-3, 4: 2.2e-3}, step, alphas) == (0, 1.0)
    # Rounds of 1.6 steps: the steady state still says 1.75 / 1.6 = 1.09x at k = 2, but the
    # slowest of 16 rows over 63 tokens needs about 41 rounds, not 36: a loss, so off.
    rounds = {2: 1.6e-3, 3: 1.8e-3, 4: 2.0e-3}
    assert choose_k_calibrated(rounds, step, alphas) == (2, pytest.approx(1.75 / 1.6))
    assert choose_k_calibrated(rounds, step, alphas, num_tokens=63) == (0, 1.0)
    # Acceptance measured per k: a draft that accepts more at k = 2 is chosen there.
    per_k = {2: [0.9] * 16, 3: [0.2] * 16, 4: [0.2] * 16}
    assert choose_k_calibrated({2: 1.05e-3, 3: 1.1e-3, 4: 1.2e-3}, step, per_k)[0] == 2
    with pytest.raises(ValueError, match="acceptance for"):
        choose_k_calibrated({2: 1e-3, 3: 1e-3}, step, {2: [0.5]})


# -- tree, chain or off per batch size ----------------------------------------------------------
def test_tree_expectation_sums_path_probabilities():
    acc = [[0.5, 0.2], [0.4, 0.1]]
    # Nodes (0,), (1,), (0, 0), (0, 1): 1 + 0.5 + 0.2 + 0.5 * 0.4 + 0.5 * 0.1.
    assert expected_tokens_tree([(0,), (1,), (0, 0), (0, 1)], acc) == pytest.approx(1.95)
    assert expected_tokens_tree([(0,), (0, 0)], acc) == pytest.approx(
        expected_tokens_chain([0.5, 0.4]))


def test_choose_shape_picks_tree_chain_or_off_by_batch():
    # Tokens per round do not depend on the batch; a round's cost in plain steps grows with it
    # (a 64-node tree verifies 64 tokens per row, a chain 5). Costs as an H200 might measure.
    tau = {"tree64": 2.6, "chain4": 1.9}
    costs = {1: {"tree64": 1.15, "chain4": 0.95},   # 2.26x vs 2.0x: the tree
             16: {"tree64": 1.6, "chain4": 1.05},   # 1.625x vs 1.81x: the chain
             64: {"tree64": 3.2, "chain4": 1.6},    # 0.81x vs 1.19x: the chain
             256: {"tree64": 9.0, "chain4": 2.0}}   # 0.29x vs 0.95x: off
    plan = plan_by_batch({b: tau for b in costs}, costs)
    assert {b: c for b, (c, _) in plan.items()} == {1: "tree64", 16: "chain4", 64: "chain4",
                                                    256: None}
    assert plan[1][1] == pytest.approx(2.6 / 1.15) and plan[256][1] == 1.0
    # A margin switches a marginal chain off.
    assert choose_shape(tau, {"tree64": 3.0, "chain4": 1.85}, min_speedup=1.05) == (None, 1.0)
    assert choose_shape(tau, {"tree64": 3.0, "chain4": 1.85})[0] == "chain4"
    with pytest.raises(ValueError, match=r"\['chain4'\] have tokens or a cost"):
        choose_shape(tau, {"tree64": 1.0})


def test_round_cost_from_a_measured_speedup():
    assert round_cost(2.4, 2.0) == pytest.approx(1.2)  # tau 2.4 at 2x: a round is 1.2 steps
    assert choose_shape({"t": 2.4}, {"t": round_cost(2.4, 2.0)}) == ("t", pytest.approx(2.0))
    with pytest.raises(ValueError, match="tau=0.5"):
        round_cost(0.5, 1.0)
