"""The decode step's XLA options by row count: cuBLAS GEMMs from CUBLAS_MIN_ROWS on the GPU."""

from __future__ import annotations

from jdecode.model import compile_options


def test_wide_gpu_steps_compile_for_cublas():
    wide = compile_options.CUBLAS_MIN_ROWS
    assert compile_options.step_compiler_options(wide, "gpu") == {
        "xla_gpu_enable_triton_gemm": False}
    assert compile_options.step_compiler_options(4 * wide, "gpu") == {
        "xla_gpu_enable_triton_gemm": False}
    # Below the threshold XLA's Triton GEMMs measured faster; off the GPU the flag is moot.
    assert compile_options.step_compiler_options(wide - 1, "gpu") == {}
    assert compile_options.step_compiler_options(wide, "cpu") == {}


def test_no_threshold_keeps_xlas_choice(monkeypatch):
    monkeypatch.setattr(compile_options, "CUBLAS_MIN_ROWS", None)
    assert compile_options.step_compiler_options(1024, "gpu") == {}
