"""Paged-attention launch parameters by page size, head_dim, dtype and device kind."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from pallas_kernels.flash_attention.tuning import device_kind


@dataclasses.dataclass(frozen=True)
class PagedConfig:
    block_k: int  # tokens per inner-loop step (a whole number of pages)
    num_splits: int  # split-K partitions per sequence (decode); 0 = pick from the grid size
    num_warps: int
    num_stages: int
    block_rows: int  # ragged kernel: query rows (tokens x heads of a group) per program
    ragged_block_k: int  # ragged kernel: tokens per inner-loop step
    # Decode programs an SM the split rule aims for (`decode_num_splits` with num_splits 0).
    programs_per_sm: int = 2


_HOPPER = ("H100", "H200", "H800")


def paged_config(page_size: int, head_dim: int, dtype, kind: str | None = None) -> PagedConfig:
    """Launch parameters for the decode and ragged kernels on this device.

    Hopper decode values from scripts/tune_paged_decode.py on an H200, jax 0.11.2
    (benchmarks/paged_decode_tuning.md; GQA 32/8 D128 bf16, page 16): block_k 128, 4 warps,
    2 stages is within 3% of the best of 75 launch configurations at B32 S4096 (3.83 TB/s,
    read stream 4.36) and the best or near it at B8/B64 and S16k. The best 8-warp config
    there is 4% behind (3.70 vs 3.85 TB/s), the best block_k 256 one 9% (3.51). Ragged 28
    decodes + 4 chunks of 512 (H100): 64 rows per program 509 us, 32 rows 1246 us, 16 rows
    1695 us (block_k 64).

    What num_stages did there: compiled for sm_90a (stop 68, benchmarks/deviceless_h200.md),
    the decode kernel's K/V buffers have one slot at 2, 3 and 4 stages alike (the extra stages
    go to the block table's ids), so those launches differ in when the ids load, not in how
    many K/V blocks are in flight. From 5 stages on Triton double-buffers them, and
    `paged_attention(prefetch=True)` keeps a block in flight by hand; neither is in this
    table until a card has timed it (bench_kernels.py --only decode_b8_pf).
    """
    kind = device_kind() if kind is None else kind
    # f32 K/V of head_dim <= 64: 64-token blocks and a grid of about four decode programs an
    # SM. Why: SmolLM2's f32 writing decode kernel (64 rows, GQA 9/3 D64: 192 programs) on an
    # H100 (stop 62, benchmarks/engine_decode_h200.md) took 46.8 us a layer at context 328 and
    # 204.2 at 2000 with 128-token blocks and 1 split (the bf16 launch), 39.0 and 162.5 (with
    # the merge) with 64-token blocks and 2 splits, the best of 36 launches at 328; in the
    # engine's 64-sequence probe the step's device time fell 9% (2.46 -> 2.24 ms). bf16 at the
    # same shape stays best on the bf16 launch (12.8 us; 2 splits 13.2-13.6). D128 in f32 spills
    # at every block size on 4 warps (stop 57) and is not timed: it keeps the bf16 launch.
    f32_short = np.dtype(dtype).itemsize >= 4 and head_dim <= 64
    if any(h in kind for h in _HOPPER):
        return PagedConfig(
            block_k=max(page_size, 64 if f32_short else 128),
            num_splits=0,
            num_warps=4,
            num_stages=2,
            block_rows=64,
            ragged_block_k=max(page_size, 64),
            programs_per_sm=4 if f32_short else 2,
        )
    # Interpret mode (CPU): few, small loop steps.
    return PagedConfig(
        block_k=max(page_size, 64),
        num_splits=2,
        num_warps=4,
        num_stages=2,
        block_rows=32,
        ragged_block_k=max(page_size, 64),
    )


def decode_num_splits(batch: int, num_kv_heads: int, num_blocks: int, cfg: PagedConfig) -> int:
    """Split-K partitions for the decode grid (batch, kv_heads, splits).

    With few sequences the grid is too small to keep every SM streaming: split each context
    into the largest power of 2 that keeps the grid at or below about `cfg.programs_per_sm`
    programs per SM (2; 4 for f32 at D <= 64 on Hopper, see `paged_config`), but keep >= 2
    blocks of work per split. On an H200 (132 SMs; tune_paged_decode.py) this
    is 1 at B32 (3.83 TB/s; 2 splits 3.70), 4 at B8 (2.61 at S4096, 3.81 at S16k; 5 splits,
    the former rule, 3.13) and 32 at B1 (S32k); a power of 2 also divides the context's
    power-of-2 block count evenly.
    """
    if cfg.num_splits:
        return max(1, min(cfg.num_splits, num_blocks))
    return grid_splits(batch * num_kv_heads, num_blocks, per_sm=cfg.programs_per_sm)


def grid_splits(programs: int, num_blocks: int, max_splits: int = 64, per_sm: int = 2) -> int:
    """The rule of `decode_num_splits` for any grid of (programs x splits) over num_blocks
    blocks of context: the largest power of 2 keeping it at about `per_sm` programs per SM or
    fewer, with >= 2 blocks per split."""
    num_sms = getattr(jax.devices()[0], "core_count", None) or 132
    want = max(1, per_sm * num_sms // max(1, programs))
    want = 1 << (want.bit_length() - 1)  # largest power of 2 <= want
    return max(1, min(want, num_blocks // 2, max_splits))


# Where "auto" sends a ragged call's items on Hopper, by (head_dim, dtype name). H200, jax
# 0.11.2 (benchmarks/paged_attention_h200.md; 28 decodes at 4096 + 4 chunks of 512, GQA 32/8,
# page 16): D128, the Mosaic kernel 289.6-324.5 us against the Triton one's 387.1 (runs 4-5);
# D64, the Mosaic kernel with decodes joined (what the engine's "short" steps run) against
# Triton, runs 6, 12 and 13 (1.13-1.19x). Its idle launch in an "auto" step of decodes only
# costs more than Triton's, but the engine sends those steps to the decode kernel alone
# ("only"). f16 runs the same kernel but is not measured.
_HOPPER_RAGGED: dict[tuple[int, str], str] = {(128, "bfloat16"): "mosaic",
                                              (64, "bfloat16"): "mosaic"}

# The longest context a decode may have to join the Mosaic ragged launch (split_decodes="auto"):
# there it is one CTA's serial read, where the split-K decode kernel spreads it over SMs. At 4096
# joining was faster (289.6 vs 324.5 us in the mixed batch); 8192 is a guess, not measured.
UNIFIED_DECODE_MAX_CONTEXT = 8192


def ragged_backend(head_dim: int, dtype, kind: str | None = None) -> str:
    """"mosaic" or "triton" for the ragged items of a call the Hopper kernel can take."""
    kind = device_kind() if kind is None else kind
    if not any(k in kind for k in _HOPPER):
        return "triton"
    return _HOPPER_RAGGED.get((head_dim, np.dtype(dtype).name), "triton")
