"""The hardware table's ridges and the seed's textbook table, to one decimal."""

import pytest

from jdecode.analysis.hardware import HARDWARE, get_hardware, seed_a100
from jdecode.analysis.textbook import (
    seed_formulas,
    textbook_conclusions,
    textbook_reports,
    textbook_summary,
)


def test_a100_ridge_both_ways():
    hw = get_hardware("a100-80gb")
    ridges = hw.ridges("float16")
    # 312e12 / (2039 * 2^30) is the seed's 142.5; 312e12 / 2039e9 with decimal GB/s is 153.0.
    assert round(ridges["GiB"], 1) == 142.5
    assert round(ridges["GB"], 1) == 153.0
    assert hw.ridge("float16") == ridges["GB"]  # the datasheet's reading is the default
    assert seed_a100().ridge("float16") == ridges["GiB"]
    assert seed_a100().bandwidth == 2039 * 2**30


def test_table_entries_are_complete():
    for name in ("a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h200", "l4", "rtx-4090"):
        hw = HARDWARE[name]
        assert hw.source and hw.bandwidth_gbps > 0
        assert hw.flops("bfloat16") == hw.flops("float16") > hw.flops("float32")
    assert get_hardware("H100") is HARDWARE["h100-sxm"]
    assert round(get_hardware("h100").ridge("bfloat16"), 1) == 295.3  # 989.4e12 / 3.35e12


def test_unknown_hardware_and_dtype_name_the_fix():
    with pytest.raises(ValueError, match="unknown hardware 'v100'.*a100-80gb"):
        get_hardware("v100")
    with pytest.raises(ValueError, match="no peak FLOP/s for dtype='int4'"):
        get_hardware("l4").flops("int4")


def test_textbook_headline_numbers():
    s = textbook_summary("textbook")
    p, d = s["prefill"], s["decode"]
    assert round(p["linear"]["intensity"], 1) == 2730.7
    assert round(p["attention"]["intensity"], 1) == 114.7
    assert round(p["other"]["intensity"], 1) == 1.0
    assert round(d["linear"]["intensity"], 1) == 8.0
    assert round(d["attention"]["intensity"], 1) == 1.0
    assert p["linear"]["bound"] == "compute"
    assert p["attention"]["bound"] == "memory"  # 114.7 < 142.5
    assert p["attention_flash"]["bound"] == "compute"
    assert d["linear"]["bound"] == d["attention"]["bound"] == "memory"
    # every other-op row of the cost model is O(1) and memory-bound
    lo, hi = p["other"]["model_range"]
    assert 0.2 <= lo <= hi <= 2.0


def test_textbook_reports_bounds_per_row():
    prefill, decode = textbook_reports()
    for r in prefill.rows:
        expected = "compute" if r.op.group == "linear" and r.op.name != "lm_head" else None
        if expected:
            assert r.bound == expected, r.op.name
    assert all(r.bound == "memory" for r in decode.rows)


def test_seed_formulas_evaluated():
    f = {p: {n: round(v, 1) for n, _, _, v in rows} for p, rows in seed_formulas().items()}
    assert f["prefill"] == {"①": 2730.7, "②": 1.0, "③": 114.7, "④": 2730.7, "⑤": 1.0,
                            "⑥": 2187.9, "⑦": 1.0, "⑧": 2187.9, "⑨": 1.0}
    assert f["decode"]["①"] == f["decode"]["⑤"] == 8.0
    assert f["decode"]["④"] == 1.0


def test_full_convention_reproduces_the_seeds_ffn_formula():
    # The seed's formulas 6 and 8, 1/(1/H + 1/H' + 1/BT) = 2187.9, count the output write too:
    # they are the "full" convention, while formula 1 (2730.7) is the "textbook" one.
    s = textbook_summary("full")
    assert round(s["prefill"]["ffn_gate_up"]["intensity"], 1) == 2187.9
    assert round(s["prefill"]["ffn_down"]["intensity"], 1) == 2187.9
    # Full unfused attention charges S and P both ways plus Q and O: exactly half of 114.7.
    assert round(s["prefill"]["attention"]["intensity"], 2) == round(114.6667 / 2, 2)


def test_conclusions_say_why_flash_attention_helps():
    text = " ".join(textbook_conclusions(textbook_summary()))
    assert "114.7 < 142.5 ridge" in text
    assert "mildly memory-bound even in prefill" in text and "FlashAttention" in text
    assert "153.0" in text and "memory wall" in text
