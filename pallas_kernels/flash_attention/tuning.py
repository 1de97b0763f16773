"""Flash-attention block sizes by head_dim, dtype and device kind, and the interpret default."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


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
