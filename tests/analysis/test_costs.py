"""Hand-checked FLOPs and bytes of the per-operator model on the tiny config, and the roofline."""

from pathlib import Path

import pytest

from jdecode.analysis.costs import (
    decode_phase,
    kv_cache_bytes,
    layer_costs,
    model_costs,
    prefill_phase,
    verify_phase,
    weight_bytes,
)
from jdecode.analysis.hardware import Hardware, get_hardware
from jdecode.analysis.roofline import (
    analyze,
    decode_tokens_per_s_vs_batch,
    memory_floor_tokens_per_s,
    place,
)
from jdecode.config import load_model_config_yaml

ROOT = Path(__file__).resolve().parents[2]
# tiny: E=64, h=4, k=2, d=16, F=128, V=256, L=2, untied, float32 (4 bytes per element)
TINY = load_model_config_yaml(ROOT / "configs/models/tiny.yaml")


def rows(ops):
    return {op.name: op for op in ops}


def test_prefill_rows_by_hand():
    ops = rows(layer_costs(TINY, prefill_phase(2, 8), "float32"))  # M = B*T = 16 rows
    q = ops["q_proj"]  # [16, 64] @ [64, 64]
    assert (q.flops, q.bytes_read, q.bytes_written) == (2 * 16 * 64 * 64, (1024 + 4096) * 4,
                                                        1024 * 4)
    k = ops["k_proj"]  # [16, 64] @ [64, 32]: GQA halves the K/V width
    assert (k.flops, k.bytes_read, k.bytes_written) == (65536, (1024 + 2048) * 4, 512 * 4)
    a = ops["attention"]
    # 4*b*t*s*h*(d+1) = 4*2*8*8*4*17; scores b*t*s*h = 512; Q = O = 1024, K = V = 512 elements
    assert a.flops == 34816
    assert a.bytes_textbook == (2 * 512 + 2 * 512) * 4  # seed: K/V operand + score matrix x2
    assert a.bytes_read == (1024 + 2 * 512 + 2 * 512) * 4
    assert a.bytes_written == (2 * 512 + 1024) * 4
    flash = ops["attention_flash"]
    assert flash.flops == a.flops and flash.alternative and not a.alternative
    assert (flash.bytes_read, flash.bytes_written) == ((1024 + 1024) * 4, 1024 * 4)
    n = ops["attn_norm"]
    assert (n.flops, n.bytes_read, n.bytes_written) == (4 * 1024, (1024 + 64) * 4, 1024 * 4)
    r = ops["rope"]  # q 16*64 + k 16*32 = 1536 elements, 3 FLOPs each, tables 16*16
    assert (r.flops, r.bytes_read) == (3 * 1536, (1536 + 256) * 4)
    s = ops["swiglu"]
    assert (s.flops, s.bytes_read, s.bytes_written) == (5 * 16 * 128, 2 * 2048 * 4, 2048 * 4)
    assert ops["kv_append"].flops == 0 and ops["kv_append"].bytes_written == 2 * 16 * 32 * 4


def test_decode_rows_by_hand():
    ops = rows(layer_costs(TINY, decode_phase(3, 10), "float32"))  # M = 3
    g = ops["gate_proj"]
    assert (g.flops, g.bytes_read) == (2 * 3 * 64 * 128, (3 * 64 + 64 * 128) * 4)
    a = ops["attention"]
    assert a.flops == 4 * 3 * 1 * 10 * 4 * 17
    # K and V: 3*10*2*16 elements each; scores 3*1*10*4
    assert a.bytes_textbook == (2 * 960 + 2 * 120) * 4
    assert ops["attention"].seed == "④" and ops["kv_append"].seed == "③"


def test_model_rows_and_totals():
    ops = model_costs(TINY, prefill_phase(2, 8), "float32")
    head = rows(ops)["lm_head"]
    assert not head.per_layer and head.flops == 2 * 2 * 64 * 256  # last position only
    verify = rows(model_costs(TINY, verify_phase(2, 20, 3), "float32"))["lm_head"]
    assert verify.flops == 2 * 8 * 64 * 256  # all k+1 = 4 positions of 2 sequences
    rep = analyze(TINY, decode_phase(1, 16), get_hardware("h100"), convention="textbook")
    # one decode token: linear FLOPs = 2 x (matrix parameters), embedding gather excluded
    linear = sum(r.op.flops * (2 if r.op.per_layer else 1) for r in rep.rows
                 if r.op.group == "linear")
    matrices = 2 * (64 * 128 + 64 * 64 + 3 * 64 * 128) + 64 * 256
    assert linear == 2 * matrices


def test_weight_and_kv_bytes_match_the_model_params():
    from jdecode.model.params import param_bytes

    assert weight_bytes(TINY, "float32") == param_bytes(TINY) == 427264
    tied = TINY.replace(tie_word_embeddings=True, qkv_bias=True)
    assert weight_bytes(tied, "bfloat16") == param_bytes(tied, "bfloat16")
    assert kv_cache_bytes(TINY, 3, 10, "float32") == 3 * 10 * 2 * 2 * 2 * 16 * 4


def test_conventions_and_errors():
    for op in model_costs(TINY, prefill_phase(2, 8), "bfloat16"):
        assert op.bytes("full") >= op.bytes("textbook")
    op = model_costs(TINY, prefill_phase(2, 8), "bfloat16")[1]
    with pytest.raises(ValueError, match="convention='mixed'"):
        op.bytes("mixed")
    with pytest.raises(ValueError, match="dtype='float64'"):
        layer_costs(TINY, prefill_phase(1, 4), "float64")
    with pytest.raises(ValueError, match="attention='paged'"):
        layer_costs(TINY, prefill_phase(1, 4), "float32", attention="paged")
    with pytest.raises(ValueError, match="batch=0"):
        decode_phase(0, 4)


def test_place_on_roofline():
    hw = Hardware("toy", {"float32": 100.0}, bandwidth_gbps=1e-8, memory_gb=1, source="test")
    assert hw.bandwidth == 10.0 and hw.ridge("float32") == 10.0
    ops = rows(layer_costs(TINY, prefill_phase(2, 8), "float32"))
    q = place(ops["q_proj"], hw, "float32", "textbook")  # 131072 FLOPs / 20480 B = 6.4
    assert q.intensity == 6.4 and q.bound == "memory" and q.time_s == 20480 / 10.0
    a = place(ops["attention_flash"], hw, "float32", "textbook")  # 34816 / 8192 = 4.25
    assert a.bound == "memory"
    hw2 = hw.replace(peak_flops={"float32": 10.0})  # ridge 1.0: now compute-bound
    q2 = place(ops["q_proj"], hw2, "float32", "textbook")
    assert q2.bound == "compute" and q2.time_s == 131072 / 10.0


def test_report_totals_and_tokens_per_s():
    rep = analyze(TINY, decode_phase(4, 32), get_hardware("a100"), convention="full")
    summed = [r for r in rep.rows if not r.op.alternative]
    assert rep.flops == sum(r.op.flops * (2 if r.op.per_layer else 1) for r in summed)
    assert rep.step_time_s == pytest.approx(
        sum(r.time_s * (2 if r.op.per_layer else 1) for r in summed))
    assert rep.tokens_per_s == pytest.approx(4 / rep.step_time_s)
    assert rep.fused_time_s <= rep.step_time_s
    d = rep.to_dict()
    assert d["total"]["flops"] == rep.flops and len(d["rows"]) == len(rep.rows)


def test_decode_linear_crosses_the_ridge_near_batch_equal_ridge():
    hw = get_hardware("a100-80gb")  # ridge 153.0 (bf16)
    cfg = load_model_config_yaml(ROOT / "configs/models/llama-3-8b.yaml")
    curve = decode_tokens_per_s_vs_batch(cfg, hw, 1024, [64, 128, 256, 512], dtype="bfloat16",
                                         convention="textbook")
    # 1/(1/4096 + 1/B) passes 153.0 between B = 128 (124.1) and B = 256 (240.9)
    assert [c["linear_intensity"] > hw.ridge("bfloat16") for c in curve] == [
        False, False, True, True]
    tps = [c["tokens_per_s"] for c in curve]
    assert tps == sorted(tps)


def test_memory_floor_matches_gpu_md():
    # GPU.md: Llama-3.2-1B shape, 2.47 GB of weights, 2.71 TB/s read stream -> about 1100 tok/s
    cfg = load_model_config_yaml(ROOT / "configs/models/llama-3.2-1b.yaml")
    assert weight_bytes(cfg, "bfloat16") == pytest.approx(2.47e9, rel=0.01)
    floor = memory_floor_tokens_per_s(cfg, 1, 1, 2.71e12)
    assert 1090 < floor < 1110


def test_f32_scores_are_charged_four_bytes():
    # jdecode's XLA attention writes S in f32 and reads it back; P is cast to the model dtype.
    bf16 = rows(layer_costs(TINY, prefill_phase(2, 8), "bfloat16"))["attention"]
    f32s = rows(layer_costs(TINY, prefill_phase(2, 8), "bfloat16", score_bytes=4))["attention"]
    assert f32s.flops == bf16.flops
    assert f32s.bytes_read - bf16.bytes_read == 512 * 2  # S read: 512 scores x (4 - 2) bytes
    assert f32s.bytes_written - bf16.bytes_written == 512 * 2
