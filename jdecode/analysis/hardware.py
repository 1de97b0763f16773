"""GPU hardware table for the roofline: peak FLOP/s per dtype, HBM bandwidth, and the ridge.

The seed lecture's A100 ridge of 142.5 FLOP/byte reads "2039 GB/s" as 2039 * 2^30 byte/s; the
datasheet means 2039e9 byte/s (ridge 153.0). Both readings are kept and labelled.
"""

from __future__ import annotations

import dataclasses

# Bytes per element of each dtype the cost model accepts.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1, "int8": 1}

BANDWIDTH_UNITS = {"GB": 1e9, "GiB": 2.0**30}


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator's roofline ceilings.

    `bandwidth_gbps` is the datasheet number (or the measured rate / 1e9); `bandwidth_unit`
    says how it is read: "GB" = 1e9 byte (the datasheet's meaning) or "GiB" = 2^30 byte (the
    seed lecture's reading). Peak FLOP/s are dense tensor-core figures (no 2:4 sparsity).
    """

    name: str
    peak_flops: dict[str, float]  # dtype name -> FLOP/s
    bandwidth_gbps: float
    memory_gb: float
    source: str
    bandwidth_unit: str = "GB"
    measured: dict | None = None  # raw figures when produced by measure_ceilings()

    def __post_init__(self) -> None:
        if self.bandwidth_unit not in BANDWIDTH_UNITS:
            raise ValueError(f"bandwidth_unit={self.bandwidth_unit!r}: choose GB or GiB")

    @property
    def bandwidth(self) -> float:
        """HBM bandwidth in byte/s under this entry's unit reading."""
        return self.bandwidth_gbps * BANDWIDTH_UNITS[self.bandwidth_unit]

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s for matmuls in `dtype`."""
        if dtype not in self.peak_flops:
            raise ValueError(f"{self.name} has no peak FLOP/s for dtype={dtype!r}; known: "
                             f"{', '.join(sorted(self.peak_flops))}")
        return self.peak_flops[dtype]

    def ridge(self, dtype: str, unit: str | None = None) -> float:
        """Ridge intensity peak / bandwidth in FLOP/byte (unit: "GB", "GiB" or this entry's)."""
        unit = unit or self.bandwidth_unit
        return self.flops(dtype) / (self.bandwidth_gbps * BANDWIDTH_UNITS[unit])

    def ridges(self, dtype: str) -> dict[str, float]:
        """The ridge under both readings of the bandwidth: {"GB": ..., "GiB": ...}."""
        return {unit: self.ridge(dtype, unit) for unit in BANDWIDTH_UNITS}

    def replace(self, **changes) -> Hardware:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "bandwidth_bytes_per_s": self.bandwidth}


def _tc(bf16: float, fp32: float, tf32: float, fp8: float | None = None) -> dict[str, float]:
    """Peak FLOP/s table from TFLOP/s figures (fp16 and bf16 tensor-core rates are equal)."""
    table = {"bfloat16": bf16 * 1e12, "float16": bf16 * 1e12, "float32": fp32 * 1e12,
             "tfloat32": tf32 * 1e12}
    if fp8 is not None:
        table["float8"] = fp8 * 1e12
    return table


_A100 = "NVIDIA A100 Tensor Core GPU datasheet (2021), SXM4, dense"
_H100 = "NVIDIA H100 Tensor Core GPU datasheet (2023), dense = half the sparsity figure"
HARDWARE: dict[str, Hardware] = {
    hw.name: hw
    for hw in (
        Hardware("a100-40gb", _tc(312, 19.5, 156), 1555, 40, _A100),
        Hardware("a100-80gb", _tc(312, 19.5, 156), 2039, 80, _A100),
        Hardware("h100-sxm", _tc(989.4, 66.9, 494.7, 1978.9), 3350, 80, _H100 + ", SXM5"),
        Hardware("h100-pcie", _tc(756.5, 51.2, 378.0, 1513.0), 2000, 80, _H100 + ", PCIe"),
        Hardware("h200", _tc(989.4, 66.9, 494.7, 1978.9), 4800, 141,
                 "NVIDIA H200 Tensor Core GPU datasheet (2024), SXM, dense"),
        Hardware("l4", _tc(121.0, 30.3, 60.0, 242.0), 300, 24,
                 "NVIDIA L4 Tensor Core GPU datasheet (2023), dense"),
        # GeForce parts run fp16/bf16 with fp32 accumulation at half the fp16-accumulate rate.
        Hardware("rtx-4090", _tc(165.2, 82.6, 82.6, 330.3), 1008, 24,
                 "NVIDIA Ada Lovelace architecture whitepaper v2.1, Appendix A, fp32 accumulate"),
    )
}

ALIASES = {"a100": "a100-80gb", "h100": "h100-sxm", "4090": "rtx-4090"}


def get_hardware(name: str) -> Hardware:
    """Looks up a hardware entry by name (case-insensitive; a100 / h100 / 4090 are aliases)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}; choose one of "
                         f"{', '.join(HARDWARE)} or 'measured'")
    return HARDWARE[key]


def seed_a100() -> Hardware:
    """The seed lecture's A100-80G: 312 TFLOP/s and 2039 GB/s read as GiB/s (ridge 142.5)."""
    return get_hardware("a100-80gb").replace(bandwidth_unit="GiB")
