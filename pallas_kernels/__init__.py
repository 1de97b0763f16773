"""Pallas GPU kernels (Triton lowering) with plain-jnp references; imports jax only.

Public entry points (each takes impl="pallas" | "xla" | "reference"; interpret=None runs the
Pallas interpreter on CPU backends and compiles on GPU):

- flash_attention(q [B,T,H,D], k/v [B,S,K,D], causal, sm_scale, q_offset [B], kv_lens [B], ...)
- paged_attention(q [B,H,D], k/v_pages [P,page,K,D], block_tables [B,max_pages],
  context_lens [B], ...) -> [B,H,D]
- ragged_paged_attention(q [N,H,D], k/v_pages, block_tables, context_lens, query_start_loc [B+1])
- write_kv_pages(k/v_pages, k/v_new [N,K,D], slot_mapping [N]) -> (k_pages, v_pages)
"""

from pallas_kernels.flash_attention import (
    attention_xla,
    flash_attention,
    flash_attention_reference,
)
from pallas_kernels.paged_attention import (
    paged_attention,
    paged_attention_reference,
    paged_attention_xla,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv_pages,
    write_kv_pages_reference,
)

__all__ = [
    "attention_xla",
    "flash_attention",
    "flash_attention_reference",
    "paged_attention",
    "paged_attention_reference",
    "paged_attention_xla",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "write_kv_pages",
    "write_kv_pages_reference",
]
