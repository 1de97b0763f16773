"""Speculative-decoding cost model: expected tokens, speedup, choice of k, switch-off rule."""

from pathlib import Path

import pytest

from jdecode.analysis.hardware import get_hardware
from jdecode.analysis.spec_cost import (
    break_even_alpha,
    choose_k,
    draft_cost_ratio,
    expected_speedup,
    expected_tokens,
    expected_tokens_chain,
    plan_speculation,
    should_speculate,
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
