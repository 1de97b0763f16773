"""Roofline and throughput plots (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # the backend is chosen above
import numpy as np

from jdecode.analysis.hardware import Hardware
from jdecode.analysis.roofline import PhaseReport

_MARKERS = {"prefill": "o", "decode": "^", "verify": "s"}
_COLORS = {"linear": "tab:blue", "attention": "tab:red", "other": "tab:green",
           "cache": "tab:gray"}


def plot_roofline(reports: list[PhaseReport], path: str | Path,
                  measured: list[dict] | None = None) -> Path:
    """Log-log roofline with every operator of every report as a point.

    Prefill and decode use different markers; colour is the operator group. The slanted line is
    bandwidth x intensity, the flat one the peak; the ridge is marked. Pure data moves
    (intensity 0) are left out. `measured` adds achieved (intensity, FLOP/s) per phase.
    """
    if not reports:
        raise ValueError("plot_roofline needs at least one PhaseReport")
    hw: Hardware = reports[0].hardware
    dtype = reports[0].dtype
    peak, bw = hw.flops(dtype), hw.bandwidth
    points = [(r.intensity, r.op.flops / r.time_s, rep.phase.name, r.op.group, r.op.name,
               r.op.alternative) for rep in reports for r in rep.rows if r.intensity > 0]
    lo = min(p[0] for p in points) / 3
    hi = max(max(p[0] for p in points) * 3, hw.ridge(dtype) * 10)
    x = np.logspace(np.log10(lo), np.log10(hi), 200)

    fig, ax = plt.subplots(figsize=(9, 6))
    ax.loglog(x, np.minimum(peak, bw * x), "k-", lw=2)
    ridge = hw.ridge(dtype)
    ax.axvline(ridge, color="k", ls=":", lw=1)
    ax.annotate(f"ridge {ridge:.1f} FLOP/B", (ridge, peak / 30), rotation=90, ha="right")
    ax.annotate(f"peak {peak / 1e12:.4g} TFLOP/s ({dtype})", (ridge * 1.3, peak * 1.3))
    ax.set_ylim(top=peak * 2.5)
    ax.annotate(f"{hw.bandwidth_gbps:.4g} {hw.bandwidth_unit}/s = {bw / 1e12:.3g} TB/s",
                (lo * 2, bw * lo * 2 * 1.5), rotation=30)
    seen = set()
    for intensity, achieved, phase, group, name, alternative in points:
        label = f"{phase} {group}"
        color = _COLORS.get(group, "k")
        # the attention variant not summed into the step (flash vs unfused) is drawn hollow
        ax.scatter(intensity, achieved, marker=_MARKERS.get(phase, "x"), s=40, zorder=3,
                   facecolors="none" if alternative else color, edgecolors=color,
                   label=None if label in seen or alternative else label)
        seen.add(label)
        if name in ("q_proj", "attention") or (name == "attention_flash" and phase == "prefill"):
            ax.annotate(f"{phase} {name}", (intensity, achieved), fontsize=7,
                        xytext=(-40, -14) if name == "attention_flash" else (4, -10),
                        textcoords="offset points")
    for m in measured or []:
        ax.scatter(m["model_flops"] / m["model_bytes"], m["achieved_tflops"] * 1e12,
                   marker="*", s=160, color="gold", edgecolor="k", zorder=4,
                   label=f"measured {m['phase']} B={m['batch']}")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("attainable FLOP/s")
    ax.set_title(f"Roofline on {hw.name}: operators at their bound ({reports[0].convention} bytes)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def plot_tokens_vs_batch(curve: list[dict], path: str | Path, title: str = "") -> Path:
    """Predicted decode tok/s against batch size, marking the bandwidth -> compute crossover.

    Args:
      curve: from `roofline.decode_tokens_per_s_vs_batch`.
    """
    if not curve:
        raise ValueError("plot_tokens_vs_batch needs a non-empty curve")
    b = [c["batch"] for c in curve]
    tps = [c["tokens_per_s"] for c in curve]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.loglog(b, tps, "o-", color="tab:blue", label="predicted decode tok/s")
    linear = next((c for c in curve if c["linear_intensity"] > c["ridge"]), None)
    if linear is not None:
        ax.axvline(linear["batch"], color="tab:orange", ls=":",
                   label=f"linear layers compute-bound from B={linear['batch']}")
    step = next((c for c in curve if c["bound"] == "compute"), None)
    if step is not None:
        ax.axvline(step["batch"], color="tab:red", ls="--",
                   label=f"whole step compute-bound from B={step['batch']}")
    else:
        ax.plot([], [], " ", label="whole step stays bandwidth-bound (KV reads grow with B)")
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens / s")
    ax.set_title(title or "Decode throughput vs batch (roofline prediction)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
