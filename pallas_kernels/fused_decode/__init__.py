"""A decoder layer's decode-step matmuls with RMSNorm, RoPE, SwiGLU and the residual adds
fused in (see `kernel`)."""

from pallas_kernels.fused_decode.kernel import (
    MAX_ROWS,
    GemvTiles,
    gate_up_swiglu,
    gemv_residual,
    qkv_rope,
)

__all__ = ["MAX_ROWS", "GemvTiles", "gate_up_swiglu", "gemv_residual", "qkv_rope"]
