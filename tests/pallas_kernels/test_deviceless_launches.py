"""`deviceless.launches` (kernels per step in an optimized HLO module) and `xla_compile`
(XLA:GPU for an H200 without a GPU; it needs jax's CUDA plugin, which the deviceless root
of scripts/deviceless_env.sh has and the CPU suite does not: skipped there)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jdecode.analysis import deviceless_cases as cases
from pallas_kernels import deviceless

# The shape of XLA:GPU's optimized HLO text, cut down: a Pallas kernel (its launch name in
# the backend config), a Triton GEMM and a loop fusion, views that launch nothing, and a
# while loop whose body launches one fusion per iteration.
HLO = """HloModule jit_step

%fused_add (p0: f32[4], p1: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  %p1 = f32[4]{0} parameter(1)
  ROOT %add = f32[4]{0} add(%p0, %p1)
}

%body (carry: (s32[], f32[4])) -> (s32[], f32[4]) {
  %carry = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%carry), index=0
  %x = f32[4]{0} get-tuple-element(%carry), index=1
  %loop_add_fusion = f32[4]{0} fusion(%x, %x), kind=kLoop, calls=%fused_add
  ROOT %t = (s32[], f32[4]{0}) tuple(%i, %loop_add_fusion)
}

ENTRY %main.7 (a: bf16[1,576], w: bf16[960,576]) -> (f32[4], (s32[], f32[4])) {
  %a = bf16[1,576]{1,0} parameter(0), metadata={op_name="a"}
  %w = bf16[960,576]{1,0} parameter(1)
  %bitcast.1 = bf16[576]{0} bitcast(%a)
  %pallas_call.270 = bf16[1,15,64]{2,1,0} custom-call(%a, %w), {PALLAS}
  %gemm_fusion_dot = f32[4]{0} fusion(%a, %w), kind=kCustom, calls=%fused_add, {GEMM}
  %loop_add_fusion.1 = f32[4]{0} fusion(%gemm_fusion_dot, %w), kind=kLoop, calls=%fused_add
  %copy.1 = f32[4]{0} copy(%loop_add_fusion.1)
  %while.1 = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body
  %fusion-start = ((f32[4]), f32[4], u32[]) fusion-start(%copy.1), kind=kLoop, calls=%fused_add
  %fusion-done = f32[4]{0} fusion-done(%fusion-start)
  ROOT %tuple.3 = (f32[4]{0}, (s32[], f32[4]{0})) tuple(%copy.1, %while.1)
}
""".replace(
    "{PALLAS}", 'custom_call_target="__gpu$xla.gpu.triton", backend_config={debug = false, '
    'grid_x = 120 : i32, name = "qkv_rope", num_warps = 8 : i32}').replace(
    "{GEMM}", 'backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}')


def test_launches_counts_kernels_by_kind():
    assert deviceless.launches(HLO) == {
        "pallas qkv_rope": 1, "fusion __triton_nested_gemm_fusion": 1, "fusion kLoop": 1,
        "copy": 1, "loop: fusion kLoop": 1, "fusion-start": 1}  # an async pair launches once


def _has_cuda_plugin() -> bool:
    try:
        deviceless.h200_topology()
    except ImportError:
        return False
    return True


def test_xla_compile_counts_the_engines_fused_step():
    """The engine's decode-only step of one row at the SmolLM2 shape compiles to the fused
    step's five Pallas kernels per layer and a few XLA kernels (embedding, RoPE tables,
    final norm, LM head, the sample), where the general path's step over the 16-token
    bucket launches at least two more per layer (scripts/deviceless_kernels.py)."""
    if not _has_cuda_plugin():
        pytest.skip("no jax CUDA plugin to compile with")
    cfg, params = cases.model_params("smollm2-135m")
    fused = cases.count_kernels(*cases.engine_forward_case(cfg, params, 1), "pallas")
    general = cases.count_kernels(*cases.engine_forward_case(cfg, params, 16), "pallas-general")
    layers = cfg.num_layers
    for name in ("qkv_rope", "paged_decode_attention", "attn_o_residual", "gate_up_swiglu",
                 "gemv_residual"):
        assert fused["kinds"][f"pallas {name}"] == layers, fused["kinds"]
    assert fused["kernels"] - 5 * layers <= 12, fused["kinds"]
    assert general["kernels"] >= fused["kernels"] + 2 * layers, general["kinds"]


def test_xla_compile_names_the_missing_plugin():
    if _has_cuda_plugin():
        pytest.skip("this machine has jax's CUDA plugin")
    with pytest.raises(ImportError, match="jax-cuda13-plugin"):
        deviceless.xla_compile(lambda x: x + 1, jax.ShapeDtypeStruct((4,), jnp.float32))


def test_the_generate_loop_adds_few_kernels_to_the_step():
    """The Generator's loop launches at most 7 kernels per step besides the decode step's
    own: the greedy sample's 2 and 5 of its own (output write, stop checks, counters,
    positions, the group's index). Its own were 9 before the loop's state was laid out for
    XLA:GPU (stop 48; ~4.5 us a token on an H100)."""
    if not _has_cuda_plugin():
        pytest.skip("no jax CUDA plugin to compile with")
    cfg, params = cases.model_params("smollm2-135m")
    step = cases.count_kernels(*cases.step_case(cfg, params, "pallas-fused", 1, 1),
                               "pallas-fused")
    loop = cases.count_kernels(*cases.generate_loop_case(cfg, params, 1), "pallas-fused")
    # Two step bodies (the group's and the remainder's) and a couple of launches outside.
    extra = loop["kernels"] - 2 * step["kernels"]
    assert extra <= 2 * 7 + 2, (extra, loop["kinds"], step["kinds"])


def test_the_wide_generate_loop_calls_cublas_for_every_gemm():
    """At 64 rows the Generator compiles its loop with XLA's Triton GEMMs off
    (`compile_options.step_compiler_options`): every projection becomes a cuBLAS call, and the
    residual adds that XLA left as loop fusions after its Triton GEMMs go into cuBLAS's
    epilogues (at least one kernel a layer fewer)."""
    if not _has_cuda_plugin():
        pytest.skip("no jax CUDA plugin to compile with")
    from jdecode.model.compile_options import step_compiler_options

    cfg, params = cases.model_params("llama-3.2-1b")
    fn, args = cases.generate_loop_case(cfg, params, 64)
    cublas = cases.count_kernels(fn, args, "pallas", step_compiler_options(64, "gpu"))["kinds"]
    triton = cases.count_kernels(fn, args, "pallas")["kinds"]
    gemms = 2 * (4 * cfg.num_layers + 1)  # two step bodies: 4 projections a layer, the head
    assert cublas.get("loop: custom-call __cublas$lt$matmul") == gemms, cublas
    assert not any("gemm" in k for k in cublas if "cublas" not in k), cublas
    assert triton.get("loop: fusion __triton_nested_gemm_fusion") == gemms, triton
    assert sum(triton.values()) - sum(cublas.values()) >= 2 * cfg.num_layers, (triton, cublas)


# TTGIR cut down from the paged decode kernel compiled for sm_90a (triton 3.9): a one-slot
# ring per operand, a loop that waits for every copy and issues the next block's after its
# math, a nested region inside the loop (a reduction), and a second loop of register loads.
TTGIR = """module {
  tt.func public @kernel() {
    %0 = ttg.local_alloc : () -> !ttg.memdesc<1x128x128xbf16, #shared, #smem, mutable> loc(#l)
    %1 = ttg.local_alloc : () -> !ttg.memdesc<3x64xi32, #shared1, #smem, mutable> loc(#l)
    %2 = ttg.local_alloc %q : (tensor<16x128xbf16, #b>) -> !ttg.memdesc<16x128xbf16, #s> loc(#l)
    %3 = ttg.async_wait %t {num = 0 : i32} loc(#l)
    %4:2 = scf.for %i = %a to %b step %c iter_args(%x = %y, %t = %u) -> (f32, i32)  : i32 {
      %5 = ttg.async_wait %t {num = 2 : i32} loc(#l)
      %6 = "tt.reduce"(%s) <{axis = 1 : i32}> ({
      ^bb0(%p: f32, %q: f32):
        tt.reduce.return %p : f32 loc(#l)
      }) : (tensor<16x128xf32, #mma>) -> tensor<16xf32> loc(#l)
      %7 = ttg.async_copy_global_to_local %p, %0 : tensor<128x128x!tt.ptr<bf16>, #b> loc(#l)
      %8 = ttg.async_wait %t {num = 1 : i32} loc(#l)
      scf.yield %x, %t : f32, i32 loc(#l)
    } loc(#l)
    %9 = ttg.async_wait {num = 0 : i32} loc(#l)
    %10:2 = scf.for %i = %a to %b step %c iter_args(%k = %y) -> (f32)  : i32 {
      %11 = tt.load %ptrs : tensor<64x128x!tt.ptr<bf16>, #b> loc(#l)
      %12 = tt.load %ptr : !tt.ptr<i32> loc(#l)
      scf.yield %k : f32 loc(#l)
    } loc(#l)
    tt.return loc(#l)
  }
}
"""


def test_pipelining_reads_rings_and_loop_waits():
    """Rings are the pipeliner's empty-allocated buffers (not a tile copied into shared
    memory); waits and register loads count only inside loops, nested regions included."""
    assert deviceless.pipelining(TTGIR) == {
        "rings": ["1x128x128xbf16", "3x64xi32"],
        "loop_waits": [2, 1],  # the waits before and after the loops are not the loop's
        "loop_tensor_loads": 1,  # the scalar load is not a tensor load
    }
    assert deviceless.pipelining("") == {"rings": [], "loop_waits": [], "loop_tensor_loads": 0}
