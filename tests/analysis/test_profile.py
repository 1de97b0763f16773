"""Attributing profiler-trace time to the cost model's operators."""

from pathlib import Path
from types import SimpleNamespace as NS

import jax
import jax.numpy as jnp
import pytest

from jdecode.analysis import profile as profile_module
from jdecode.analysis.costs import decode_phase
from jdecode.analysis.hardware import get_hardware
from jdecode.analysis.profile import (
    CATEGORIES,
    categorize,
    device_busy_us,
    device_span_us,
    hlo_matmuls,
    hlo_op_functions,
    kernel_tally,
    matmul_category,
    parse_launch,
    profile_breakdown,
    stream_kernels,
    stream_launches,
)
from jdecode.analysis.roofline import analyze
from jdecode.config import load_model_config_yaml

ROOT = Path(__file__).resolve().parents[2]

# The shape of a compiled module's text (jax 0.10): instructions point at stack frames, which
# point at file locations, which name the innermost function.
HLO = """HloModule jit_decode_step, entry_computation_layout={()}

ENTRY %main {
  %ynn_fusion.8 = f32[2,32] fusion(%a), metadata={op_name="j/attn/dot_general" stack_frame_id=3}
  %wrapped_multiply = f32[2,64] fusion(%c), metadata={op_name="j/attn/mul" stack_frame_id=2}
  %fusion.1 = f32[2,64]{1,0} fusion(%d), metadata={op_name="j/mlp/add" stack_frame_id=4}
  ROOT %while.1 = (s32[], f32[2]) while(%t), condition=%cond, body=%body
}

FileNames
1 "/work/main/jdecode/model/layers.py"
2 "/work/main/jdecode/model/transformer.py"

FunctionNames
1 "rms_norm"
2 "_project"
3 "decoder_layer"

FileLocations
1 {file_name_id=1 function_name_id=1 line=21 end_line=21 column=28 end_column=75}
2 {file_name_id=2 function_name_id=2 line=19 end_line=19 column=8 end_column=39}
3 {file_name_id=2 function_name_id=3 line=43 end_line=43 column=12 end_column=54}

StackFrames
1 {file_location_id=3 parent_frame_id=1}
2 {file_location_id=1 parent_frame_id=1}
3 {file_location_id=2 parent_frame_id=1}
4 {file_location_id=3 parent_frame_id=1}
"""


def test_hlo_ops_map_to_functions_and_categories():
    ops = hlo_op_functions(HLO)
    assert ops["ynn_fusion.8"][1] == "_project"
    assert ops["wrapped_multiply"][1] == "rms_norm"
    assert ops["fusion.1"] == ("j/mlp/add", "decoder_layer")
    assert ops["while.1"][1] == "<container>"
    assert categorize(*ops["ynn_fusion.8"]) == "q/k/v projections"
    assert categorize(*ops["wrapped_multiply"]) == "norms"
    assert categorize(*ops["fusion.1"]) == "residual adds"
    assert categorize("x/attn/btf,fe->bte/dot_general", "decoder_layer") == "o projection"
    assert categorize("x/mlp/dot_general", "swiglu_mlp") == "gate/up/down projections"
    assert categorize("x/mlp/logistic", "swiglu_mlp") == "swiglu"
    # the fused inference layout runs gate/up and SwiGLU inside decoder_layer
    assert categorize("x/mlp/bte,ef->btf/dot_general", "decoder_layer") == (
        "gate/up/down projections")
    assert categorize("x/mlp/logistic", "decoder_layer") == "swiglu"
    assert categorize("x/mlp/add", "decoder_layer") == "residual adds"
    assert categorize("x/exp", "attention_xla") == "attention"
    assert categorize("x/gather", "forward") == "embedding and other"
    # every cost-model row belongs to exactly one category
    rep = analyze(load_model_config_yaml(ROOT / "configs/models/tiny.yaml"),
                  decode_phase(1, 8), get_hardware("h100"))
    names = [n for names in CATEGORIES.values() for n in names]
    assert sorted(names) == sorted(r.op.name for r in rep.rows)


def test_breakdown_from_a_real_trace_or_a_reason():
    from jdecode.analysis.measure import random_params
    from jdecode.analysis.xla_check import phase_fn
    from jdecode.cache.dense import init_cache

    cfg = load_model_config_yaml(ROOT / "configs/models/tiny.yaml")
    params = random_params(cfg)
    cache = init_cache(cfg, 2, 32)
    args = (params, cache, jnp.array([3, 5], jnp.int32), jnp.array([31, 31], jnp.int32))
    compiled = jax.jit(phase_fn(cfg, "decode")).lower(*args).compile()
    rep = analyze(cfg, decode_phase(2, 32), get_hardware("h100"))
    rows, note = profile_breakdown(compiled, lambda: compiled(*args)[0], rep, repeats=2,
                                   cfg=cfg)
    if rows is None:  # the profiler path is optional; it must then say why
        assert note
        return
    by_cat = {r["category"]: r for r in rows}
    assert set(by_cat) == set(CATEGORIES)
    for cat in ("q/k/v projections", "attention", "gate/up/down projections", "lm head"):
        assert by_cat[cat]["measured_s"] > 0, cat
    assert by_cat["attention"]["predicted_s"] == rep.row("attention").time_s * 2


# Weight matmuls as XLA:CPU leaves them: plain dots with no metadata (E=8, H*D=8, K*D=4,
# F=16, V=40), one inside a fusion, the weights sliced from scan stacks.
DOTS = """HloModule jit_decode_step

%fused_computation (p0: f32[1,16], p1: f32[16,8]) -> f32[1,8] {
  %p0 = f32[1,16]{1,0} parameter(0)
  %p1 = f32[16,8]{1,0} parameter(1)
  ROOT %dot.9 = f32[1,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main {
  %x = f32[1,8]{1,0} parameter(0)
  %attn = f32[1,8]{1,0} parameter(1)
  %act = f32[1,16]{1,0} parameter(2)
  %wq = f32[8,8]{1,0} fusion(%s), calls=%c, metadata={op_name="j/dynamic_index_in_dim/slice"}
  %wk = f32[8,4]{1,0} parameter(3)
  %wo = f32[8,8]{1,0} parameter(4)
  %wd = f32[16,8]{1,0} parameter(5)
  %emb = f32[40,8]{1,0} parameter(6)
  %dot.1 = f32[1,8]{1,0} dot(%x, %wq), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %dot.2 = f32[1,4]{1,0} dot(%x, %wk), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %dot.3 = f32[1,8]{1,0} dot(%attn, %wo), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %fusion.4 = f32[1,8]{1,0} fusion(%act, %wd), kind=kOutput, calls=%fused_computation
  ROOT %dot.5 = f32[1,40]{1,0} dot(%x, %emb), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}
"""


def test_matmuls_are_attributed_by_shape():
    import collections

    from jdecode.config import ModelConfig

    cfg = ModelConfig(vocab_size=40, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=4, intermediate_size=16)
    mms = hlo_matmuls(DOTS)
    assert mms["fusion.4"]["inputs"] == ["act", "wd"]  # through the fusion's parameters
    readers = collections.Counter(x for mm in mms.values() for x in set(mm["inputs"]))
    cats = {name: matmul_category(cfg, mm, any(readers[x] > 1 for x in mm["inputs"]))
            for name, mm in mms.items() if name.startswith(("dot.", "fusion."))}
    # Q and O have the same [8, 8] shape: Q shares its input with K, O reads attention alone
    assert cats == {"dot.1": "q/k/v projections", "dot.2": "q/k/v projections",
                    "dot.3": "o projection", "dot.9": "gate/up/down projections",
                    "fusion.4": "gate/up/down projections", "dot.5": "lm head"}
    ops = hlo_op_functions(DOTS)
    assert categorize(*ops["wq"]) == "per-layer weight slices (scan)"
    assert categorize(*ops["dot.1"]) == "unattributed (no shape, no source metadata)"


def test_stream_kernels_reads_device_streams_only():
    """Kernels come from the device planes' stream lines: not the host plane, and not a
    device plane's derived lines (which repeat the stream's kernels)."""
    def ev(name, start, dur):
        return NS(name=name, start_ns=start, duration_ns=dur, stats=[])

    data = NS(planes=[
        NS(name="/host:CPU", lines=[NS(name="Stream #1", events=[ev("host_op", 0, 5)])]),
        NS(name="/device:GPU:0", lines=[
            NS(name="Stream #13(Compute)", events=[ev("gate_up_swiglu", 10, 3000),
                                                    ev("fusion.4", 20, 700)]),
            NS(name="XLA Ops", events=[ev("fusion.4", 20, 700)]),
        ]),
    ])
    assert stream_kernels(data) == [("gate_up_swiglu", 10, 3000), ("fusion.4", 20, 700)]


def test_device_busy_is_none_without_device_streams():
    """On CPU no kernel runs on a device stream: no figure rather than a zero."""
    if jax.default_backend() != "cpu":
        pytest.skip("a device backend has streams")
    f = jax.jit(lambda x: x * 2)
    x = jnp.ones(8)
    assert device_busy_us(lambda: f(x), repeats=2) is None


def _device_trace(kernels):
    """A fake `ProfileData` with one device stream of (name, start, duration[, details])."""
    events = [NS(name=k[0], start_ns=k[1], duration_ns=k[2],
                 stats=[("kernel_details", k[3])] if len(k) > 3 else [])
              for k in kernels]
    return NS(planes=[NS(name="/device:GPU:0",
                         lines=[NS(name="Stream #13(Compute)", events=events)])])


def test_kernel_tally_sums_per_kernel_name(monkeypatch):
    """Launches and device time per run, by kernel name, the largest first; `top` keeps the
    first ones; each row carries its kernel's launch where the trace has one."""
    details = ("regs:40 static_shared:0 dynamic_shared:98304 grid:8,8,4 block:128,1,1 "
               "occ_pct:12.5")
    trace = _device_trace([("gemm", 0, 4000, details), ("norm", 5, 1000), ("gemm", 9, 6000),
                           ("norm", 12, 1000), ("attn", 20, 3000)])
    monkeypatch.setattr(profile_module, "_profiled", lambda run, repeats: trace)
    rows = kernel_tally(lambda: None, repeats=2)
    assert [r["kernel"] for r in rows] == ["gemm", "attn", "norm"]
    assert rows[0] == {"kernel": "gemm", "calls_per_run": 1.0, "us_per_run": 5.0,
                       "us_per_call": 5.0,
                       "launch": {"regs": 40, "smem_bytes": 98304, "ctas": 256, "threads": 128,
                                  "occ_pct": 12.5, "ctas_per_sm": 2.0}}
    assert rows[2]["us_per_call"] == 1.0 and rows[2]["calls_per_run"] == 1.0
    assert rows[2]["launch"] == {}
    assert [r["kernel"] for r in kernel_tally(lambda: None, repeats=2, top=1)] == ["gemm"]
    monkeypatch.setattr(profile_module, "_profiled", lambda run, repeats: None)
    assert kernel_tally(lambda: None, repeats=2) == []


def test_parse_launch_reads_xlas_kernel_details():
    """XLA's CUPTI text -> numbers; CTAs an SM from the occupancy (a share of 2048 threads);
    missing fields are left out, not guessed."""
    full = parse_launch("regs:168 static_shared:1024 dynamic_shared:65536 grid:132,1,1 "
                        "block:384,1,1 occ_pct:18.75")
    assert full == {"regs": 168, "smem_bytes": 66560, "ctas": 132, "threads": 384,
                    "occ_pct": 18.75, "ctas_per_sm": 1.0}
    assert parse_launch("regs:32 grid:2,3,1") == {"regs": 32, "ctas": 6}
    assert parse_launch("occ_pct:50") == {"occ_pct": 50.0}  # no block: no CTAs an SM
    assert parse_launch("") == {}


def test_stream_launches_keeps_each_kernels_first_launch():
    trace = _device_trace([("a", 0, 10, "grid:4,1,1 block:64,1,1"), ("a", 20, 10, "grid:8,1,1"),
                           ("b", 40, 5)])
    assert stream_launches(trace) == {"a": {"ctas": 4, "threads": 64}}


def test_device_span_counts_the_gaps_between_a_runs_kernels(monkeypatch):
    """Per run: the first kernel's start to the last one's end (gaps included, the host's
    time between runs not); the median over runs. Runs of unequal kernel counts: None."""
    trace = [("b", 1000, 500), ("a", 0, 400),  # run 1: 0..1500 (gap 400..1000 counted)
             ("a", 9000, 400), ("b", 9600, 400)]  # run 2: 9000..10000
    monkeypatch.setattr(profile_module, "_stream_trace", lambda run, repeats: trace)
    assert device_span_us(lambda: None, repeats=2) == pytest.approx(1.25)
    assert device_span_us(lambda: None, repeats=3) is None
    monkeypatch.setattr(profile_module, "_stream_trace", lambda run, repeats: [])
    assert device_span_us(lambda: None, repeats=2) is None
