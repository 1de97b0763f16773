"""Paged attention: decode (split-K, GQA grouping), ragged mixed batches, and the K/V page write."""

from pallas_kernels.paged_attention.kernel import paged_attention
from pallas_kernels.paged_attention.reference import (
    paged_attention_reference,
    ragged_paged_attention_reference,
    write_kv_pages_reference,
)

__all__ = [
    "paged_attention",
    "paged_attention_reference",
    "ragged_paged_attention_reference",
    "write_kv_pages_reference",
]
