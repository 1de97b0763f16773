"""XLA options for a decode step's executable, chosen by the rows its GEMMs carry.

One policy for every executable that runs decode steps (the Generator's loop, the engine's
decode-only steps, the benchmarks that time them), so the step a benchmark times is the step a
user runs.
"""

from __future__ import annotations

# From this many rows a decode step's GEMMs are cuBLAS's, not XLA's Triton GEMMs
# (`step_compiler_options`); None keeps XLA's choice at every row count.
CUBLAS_MIN_ROWS: int | None = 64


def step_compiler_options(rows: int, backend: str) -> dict:
    """XLA options of a decode step's executable for `rows` rows (padded): on the GPU from
    `CUBLAS_MIN_ROWS` rows, cuBLAS for every GEMM (`xla_gpu_enable_triton_gemm` off).

    Why: XLA's autotuner times each GEMM alone, and at 64 rows picks split-K Triton GEMMs
    whose f32 partials the next fusions read back; cuBLAS reduces its own partials and folds
    the residual adds into its epilogues. On an H100 the 1B shape's batch-64 step took 2.1-2.5%
    less (benchmarks/fused_decode_h200.md, stop 47) and the 8-32-row steps 1.4-6.5% more
    (stop 48), hence the threshold. Per executable, not XLA_FLAGS: a library must not change
    how its user's other programs compile. Below the threshold, and off the GPU, nothing."""
    if backend != "gpu" or CUBLAS_MIN_ROWS is None or rows < CUBLAS_MIN_ROWS:
        return {}
    return {"xla_gpu_enable_triton_gemm": False}
