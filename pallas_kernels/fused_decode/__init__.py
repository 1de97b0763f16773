"""A decoder layer's decode step as three fused Pallas kernels (see `kernel`)."""

from pallas_kernels.fused_decode.kernel import (
    MAX_ROWS,
    fused_attn,
    fused_mlp,
    fused_qkv,
)

__all__ = ["MAX_ROWS", "fused_attn", "fused_mlp", "fused_qkv"]
