"""Flash-attention block sizes by head_dim, dtype and device kind, and the interpret default."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from pallas_kernels.flash_attention.hopper import Tweaks


def resolve_interpret(interpret: bool | None) -> bool:
    """None means: interpret on backends without a GPU (CPU CI), compile on GPU."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    return interpret


def device_kind() -> str:
    """The first device's kind, e.g. 'NVIDIA H100 80GB HBM3', or 'cpu'."""
    return jax.devices()[0].device_kind


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


# Hopper rows: B2 T4096 H32 KV8 D128 causal bf16 on an H100, jax 0.11.2 (benchmarks/kernels.md):
# (128, 128, 8 warps, 3 stages) 367 TFLOP/s; (128, 64, 8, 3) 357; (128, 128, 8, 2) 338;
# (64, 64, 4, 3) 335; (128, 64, 4, 3) 291. The head_dim 64 rows are not measured yet.
# Keys: (device-kind substrings, head_dim, dtype name); () matches any device.
_HOPPER = ("H100", "H200", "H800")
_TABLE: dict[tuple[tuple[str, ...], int, str], FlashConfig] = {
    (_HOPPER, 128, "bfloat16"): FlashConfig(128, 128, 8, 3),
    (_HOPPER, 128, "float16"): FlashConfig(128, 128, 8, 3),
    (_HOPPER, 64, "bfloat16"): FlashConfig(128, 64, 4, 3),
    (_HOPPER, 64, "float16"): FlashConfig(128, 64, 4, 3),
    ((), 128, "float32"): FlashConfig(64, 32, 4, 2),
    ((), 64, "float32"): FlashConfig(64, 64, 4, 2),
}
_DEFAULT = FlashConfig(64, 64, 4, 2)


def flash_config(head_dim: int, dtype, kind: str | None = None) -> FlashConfig:
    """Block sizes and launch parameters for the flash kernel on this device."""
    kind = device_kind() if kind is None else kind
    name = np.dtype(dtype).name
    for (kinds, d, dt), cfg in _TABLE.items():
        if kinds and any(k in kind for k in kinds) and d == head_dim and dt == name:
            return cfg
    for (kinds, d, dt), cfg in _TABLE.items():
        if not kinds and d == head_dim and dt == name:
            return cfg
    return _DEFAULT


@dataclasses.dataclass(frozen=True)
class HopperConfig:
    """The Mosaic GPU kernel's tiles: block_q rows per compute warpgroup (two per CTA)."""
    block_q: int
    block_kv: int
    stages: int
    pingpong: bool
    tweaks: Tweaks = dataclasses.field(default_factory=Tweaks)
    persistent: bool = False  # about one CTA per SM, each looping over tiles (`hopper._kernel`)
    q_ahead: bool = False  # a persistent CTA loads the next tile's queries during this tile
    split_tail: bool = False  # non-causal: the last round's tiles' keys split over idle CTAs


HOPPER_SMEM = 227 * 1024  # shared memory one H100/H200 CTA can have


def hopper_smem_bytes(block_q: int, block_kv: int, stages: int, d: int, itemsize: int,
                      q_ahead: bool) -> int:
    """Shared memory of `hopper.py`'s tiles: two [block_q, D] query tiles (and two output
    tiles with q_ahead) plus the K and V rings of `stages` [block_kv, D] slots."""
    return (2 * (2 if q_ahead else 1) * block_q + 2 * stages * block_kv) * d * itemsize


def sm_count() -> int:
    """Streaming multiprocessors of the first device (132 on an H100/H200 SXM), for a
    persistent grid; 132 where the device does not say."""
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


# The shortest key range at which D64 takes 256-key blocks, by causal. On an H200
# (bench_flash --extra, benchmarks/flash_h200.md runs 7-8): block_kv 256 without q_ahead read
# 1.02-1.11x the 128-key default at non-causal T 2k-16k, and 1.02-1.03x causal at T >= 8192;
# at causal T <= 4096 and T 1024 it lost (0.92-0.99x): more of a 256-key block is masked or
# idle there, and fewer blocks per tile leave the query load exposed.
LONG_KV_D64 = {False: 2048, True: 8192}


def hopper_config(head_dim: int, *, causal: bool = True, kv_len: int = 0) -> HopperConfig:
    """Tiles of `hopper.py` by head_dim (and, for D64, by causal and the key length): K and V
    rings of `stages` [block_kv, D] slots plus two [block_q, D] query tiles (and, with
    q_ahead, two output tiles) must fit the 227 KB of shared memory. The defaults of causal
    and kv_len give the short-range tiles (the ragged kernel's)."""
    # All three Tweaks on: on an H200 (bench_flash --tweaks, 92a1056) +3-16% at D64, 0-6% at
    # D128 over none, and the best or within 2% of the best single tweak at 8 points.
    tweaks = Tweaks(fma=True, fence=True, early_k=True)
    # Persistent with q_ahead: on an H200 (bench_flash --persistent, 5d5ac50) 1.00-1.27x a CTA
    # per tile at the 20 points of D 64/128 x causal or not x T 1k-16k, most at short T
    # (D128 causal T1024: 333 -> 419 TFLOP/s), 0.98-1.00x at the long causal points. D256 is
    # not measured: it keeps a CTA per tile.
    # split_tail only acts on non-causal launches whose last round is at most half full.
    if head_dim <= 64 and kv_len >= LONG_KV_D64[bool(causal)]:
        return HopperConfig(64, 256, 2, True, tweaks, persistent=True, q_ahead=False,
                            split_tail=True)
    if head_dim <= 128:
        return HopperConfig(64, 128, 2, True, tweaks, persistent=True, q_ahead=True,
                            split_tail=True)
    return HopperConfig(64, 64, 2, True, tweaks)


# Where "auto" sends a call on Hopper: (head_dim, dtype name) -> backend. bf16 on an H200
# (benchmarks/flash_h200.md, jax 0.11.2, B = 16384 // T, GQA 32/8): the Mosaic kernel beat
# the Triton one at all 20 points of D 64/128 x causal or not x T 1k-16k, 1.02-1.47x (D128
# causal T4096: 519 vs 378 TFLOP/s). f16 runs the same kernel but was not measured.
_HOPPER_BACKEND: dict[tuple[int, str], str] = {
    (64, "bfloat16"): "mosaic",
    (128, "bfloat16"): "mosaic",
}


def flash_backend(head_dim: int, t: int, dtype, kind: str | None = None) -> str:
    """"mosaic" or "triton" for an unmasked call of T queries on this device."""
    kind = device_kind() if kind is None else kind
    if not any(k in kind for k in _HOPPER) or t < 128:
        return "triton"
    return _HOPPER_BACKEND.get((head_dim, np.dtype(dtype).name), "triton")
