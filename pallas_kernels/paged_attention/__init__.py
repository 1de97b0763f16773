"""Paged attention: decode (split-K, GQA grouping), ragged mixed batches, and the K/V page write.

Page pool layout, one layer: [num_pages, page_size, num_kv_heads, head_dim].
"""

from pallas_kernels.paged_attention.kernel import paged_attention
from pallas_kernels.paged_attention.ragged import ragged_paged_attention
from pallas_kernels.paged_attention.reference import (
    paged_attention_reference,
    paged_attention_xla,
    ragged_paged_attention_reference,
    ragged_paged_attention_xla,
    write_kv_pages_reference,
)
from pallas_kernels.paged_attention.write import write_kv_pages

__all__ = [
    "paged_attention",
    "paged_attention_reference",
    "paged_attention_xla",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "ragged_paged_attention_xla",
    "write_kv_pages",
    "write_kv_pages_reference",
]
