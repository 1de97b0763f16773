"""A decoder layer's decode step as fused Pallas kernels: the GEMVs with RMSNorm, RoPE, SwiGLU
and the residual adds fused in (`kernel`), and attention with the cache write (`attention`;
`paged_attention` over the engine's page pool; `block_attention` for a verify step's T tokens
per row)."""

from pallas_kernels.fused_decode.attention import decode_attention
from pallas_kernels.fused_decode.block_attention import block_attention
from pallas_kernels.fused_decode.kernel import (
    MAX_ROWS,
    GemvTiles,
    attn_o_residual,
    gate_up_swiglu,
    gemv_residual,
    qkv_rope,
)
from pallas_kernels.fused_decode.paged_attention import paged_decode_attention

__all__ = ["MAX_ROWS", "GemvTiles", "attn_o_residual", "block_attention", "decode_attention",
           "gate_up_swiglu", "gemv_residual", "paged_decode_attention", "qkv_rope"]
