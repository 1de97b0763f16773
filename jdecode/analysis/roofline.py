"""Roofline bounds: each operator's intensity against the ridge, its time at the roofline,
and the step totals (predicted step time and tok/s)."""

from __future__ import annotations

import dataclasses

from jdecode.analysis.costs import (
    OpCost,
    Phase,
    decode_phase,
    kv_cache_bytes,
    model_costs,
    prefill_phase,
    weight_bytes,
)
from jdecode.analysis.hardware import Hardware
from jdecode.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class OpRow:
    """One operator placed on a roofline (counts are per layer for per-layer operators)."""

    op: OpCost
    bytes: float
    intensity: float
    bound: str  # "compute" | "memory"
    time_s: float  # max(flops / peak, bytes / bandwidth), one instance

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self.op), "bytes": self.bytes, "intensity": self.intensity,
                "bound": self.bound, "time_s": self.time_s}


@dataclasses.dataclass(frozen=True)
class PhaseReport:
    """Every operator of one phase on one piece of hardware, plus model totals."""

    model: str
    phase: Phase
    hardware: Hardware
    dtype: str
    convention: str
    rows: list[OpRow]
    num_layers: int

    def _summed(self) -> list[tuple[OpRow, int]]:
        return [(r, self.num_layers if r.op.per_layer else 1) for r in self.rows
                if not r.op.alternative]

    @property
    def flops(self) -> float:
        return sum(r.op.flops * n for r, n in self._summed())

    @property
    def bytes(self) -> float:
        return sum(r.bytes * n for r, n in self._summed())

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes

    @property
    def step_time_s(self) -> float:
        """Sum of per-operator roofline times: each operator runs as its own kernel."""
        return sum(r.time_s * n for r, n in self._summed())

    @property
    def fused_time_s(self) -> float:
        """Whole-step roofline max(FLOPs / peak, bytes / bandwidth): the perfectly fused bound."""
        return max(self.flops / self.hardware.flops(self.dtype),
                   self.bytes / self.hardware.bandwidth)

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second at the predicted step time (prefill: prompt tokens processed)."""
        return self.phase.new_tokens / self.step_time_s

    @property
    def ridge(self) -> float:
        return self.hardware.ridge(self.dtype)

    def row(self, name: str) -> OpRow:
        for r in self.rows:
            if r.op.name == name:
                return r
        raise KeyError(f"no operator {name!r}; have {[r.op.name for r in self.rows]}")

    def layer_totals(self) -> dict[str, float]:
        """FLOPs, bytes and roofline time of one decoder layer (selected attention only)."""
        rows = [r for r in self.rows if r.op.per_layer and not r.op.alternative]
        return {"flops": sum(r.op.flops for r in rows), "bytes": sum(r.bytes for r in rows),
                "time_s": sum(r.time_s for r in rows)}

    def group_totals(self) -> dict[str, dict[str, float]]:
        """Model-wide FLOPs, bytes and time per operator group (linear, attention, ...)."""
        out: dict[str, dict[str, float]] = {}
        for r, n in self._summed():
            g = out.setdefault(r.op.group, {"flops": 0.0, "bytes": 0.0, "time_s": 0.0})
            g["flops"] += r.op.flops * n
            g["bytes"] += r.bytes * n
            g["time_s"] += r.time_s * n
        return out

    def to_dict(self) -> dict:
        return {
            "model": self.model, "phase": dataclasses.asdict(self.phase),
            "hardware": self.hardware.to_dict(), "dtype": self.dtype,
            "convention": self.convention, "num_layers": self.num_layers,
            "ridge": self.ridge, "ridges": self.hardware.ridges(self.dtype),
            "rows": [r.to_dict() for r in self.rows],
            "layer": self.layer_totals(), "groups": self.group_totals(),
            "total": {"flops": self.flops, "bytes": self.bytes, "intensity": self.intensity,
                      "step_time_s": self.step_time_s, "fused_time_s": self.fused_time_s,
                      "tokens_per_s": self.tokens_per_s},
        }


def place(op: OpCost, hw: Hardware, dtype: str, convention: str) -> OpRow:
    """Puts one operator on the roofline of `hw`."""
    nbytes = op.bytes(convention)
    intensity = op.intensity(convention)
    t_compute = op.flops / hw.flops(dtype)
    t_memory = nbytes / hw.bandwidth
    # A pure data move (intensity 0) is memory-bound; otherwise compare against the ridge.
    bound = "compute" if intensity > hw.ridge(dtype) else "memory"
    return OpRow(op, nbytes, intensity, bound, max(t_compute, t_memory))


def analyze(cfg: ModelConfig, phase: Phase, hw: Hardware, *, dtype: str | None = None,
            convention: str = "full", attention: str = "unfused", model: str = "",
            score_bytes: int | None = None) -> PhaseReport:
    """The per-operator roofline of one phase.

    Args:
      cfg: model shape. phase: from `prefill_phase` / `decode_phase` / `verify_phase`.
      hw: ceilings (a table entry or `measure_ceilings()`).
      dtype: bytes per element and which peak to use; defaults to cfg.dtype.
      convention: "textbook" (reads only, the seed's) or "full" (reads and writes).
      attention: "unfused" or "flash" (which attention row enters the totals).
      score_bytes: bytes per attention score in HBM (None: the dtype's, as the seed counts).
    Returns:
      A PhaseReport with one OpRow per operator and model totals.
    """
    dtype = dtype or cfg.dtype
    rows = [place(op, hw, dtype, convention)
            for op in model_costs(cfg, phase, dtype, attention, score_bytes)]
    return PhaseReport(model, phase, hw, dtype, convention, rows, cfg.num_layers)


def decode_tokens_per_s_vs_batch(cfg: ModelConfig, hw: Hardware, context: int,
                                 batches: list[int], *, dtype: str | None = None,
                                 convention: str = "full", attention: str = "flash"
                                 ) -> list[dict[str, float]]:
    """Predicted decode tok/s per batch size, with the step's intensity and bound.

    The linear layers cross from bandwidth-bound to compute-bound where their intensity
    1 / (1/H + 1/B) (the seed's decode formula 1) passes the ridge, i.e. near B = ridge. The
    whole step may never cross: attention reads B x context of KV at about 1 FLOP/byte.
    """
    out = []
    for b in batches:
        rep = analyze(cfg, decode_phase(b, context), hw, dtype=dtype, convention=convention,
                      attention=attention)
        out.append({"batch": b, "tokens_per_s": rep.tokens_per_s,
                    "step_time_s": rep.step_time_s, "intensity": rep.intensity,
                    "linear_intensity": rep.row("q_proj").intensity, "ridge": rep.ridge,
                    "bound": "compute" if rep.intensity > rep.ridge else "memory"})
    return out


def memory_floor_tokens_per_s(cfg: ModelConfig, batch: int, context: int, bandwidth: float,
                              dtype: str | None = None) -> float:
    """GPU.md's decode ceiling: batch / ((weight bytes + live KV bytes) / bandwidth)."""
    dtype = dtype or cfg.dtype
    total = weight_bytes(cfg, dtype) + kv_cache_bytes(cfg, batch, context, dtype)
    return batch * bandwidth / total


__all__ = ["OpRow", "PhaseReport", "analyze", "decode_phase", "decode_tokens_per_s_vs_batch",
           "memory_floor_tokens_per_s", "place", "prefill_phase"]
