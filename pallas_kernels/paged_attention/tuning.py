"""Paged-attention launch parameters by page size, head_dim, dtype and device kind."""

from __future__ import annotations

import dataclasses

import jax

from pallas_kernels.flash_attention.tuning import device_kind


@dataclasses.dataclass(frozen=True)
class PagedConfig:
    block_k: int  # tokens per inner-loop step (a whole number of pages)
    num_splits: int  # split-K partitions per sequence (decode); 0 = pick from the grid size
    num_warps: int
    num_stages: int
    block_rows: int  # ragged kernel: query rows (tokens x heads of a group) per program


_HOPPER = ("H100", "H200", "H800", "GH200")


def paged_config(page_size: int, head_dim: int, dtype, kind: str | None = None) -> PagedConfig:
    """Defaults measured with scripts/bench_kernels.py (decode B32 S4096 GQA 32/8 D128 bf16)."""
    kind = device_kind() if kind is None else kind
    del dtype  # same choice for f32/bf16/f16 so far
    if any(h in kind for h in _HOPPER):
        block_k = max(page_size, 64 if head_dim > 64 else 128)
        return PagedConfig(block_k=block_k, num_splits=0, num_warps=4, num_stages=3, block_rows=32)
    # Interpret mode (CPU): fewest loop steps.
    return PagedConfig(
        block_k=max(page_size, 64), num_splits=2, num_warps=4, num_stages=2, block_rows=32
    )


def decode_num_splits(batch: int, num_kv_heads: int, num_blocks: int, cfg: PagedConfig) -> int:
    """Split-K partitions for the decode grid (batch, kv_heads, splits).

    With few sequences the grid is too small to keep every SM streaming: split each context
    until there are about two programs per SM, but keep >= 2 blocks of work per split.
    """
    if cfg.num_splits:
        return max(1, min(cfg.num_splits, num_blocks))
    num_sms = getattr(jax.devices()[0], "core_count", None) or 132
    want = -(-2 * num_sms // max(1, batch * num_kv_heads))
    return max(1, min(want, num_blocks // 2, 64))
