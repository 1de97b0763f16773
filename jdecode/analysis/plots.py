"""Roofline and throughput plots (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # the backend is chosen above
import numpy as np
from matplotlib.text import Text

from jdecode.analysis.hardware import Hardware
from jdecode.analysis.roofline import PhaseReport

_MARKERS = {"prefill": "o", "decode": "^", "verify": "s"}
_COLORS = {"linear": "tab:blue", "attention": "tab:red", "other": "tab:green",
           "cache": "tab:gray"}


def _line_angle(ax, x0: float, y0: float, x1: float, y1: float) -> float:
    """The on-screen angle (degrees) of the segment (x0, y0)-(x1, y1) in data coordinates."""
    (a, b), (c, d) = ax.transData.transform([(x0, y0), (x1, y1)])
    return float(np.degrees(np.arctan2(d - b, c - a)))


def _place_labels(ax, items: list[tuple[float, float, str]]) -> None:
    """Labels points (x, y, text) below them, to the right or else to the left, with a leader
    line, each moved down until it overlaps no other text (labels, annotations already on
    the axes, the legend), no marker and no axis edge."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    markers = [ax.transData.transform((x, y)) for x, y, _ in items]  # display px
    marker_r = 6.0
    for text in ax.texts:
        text.update_positions(renderer)
    boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]
    if ax.get_legend() is not None:
        boxes.append(ax.get_legend().get_window_extent(renderer))
    for x, y, text in sorted(items, key=lambda it: (-it[1], it[0])):
        for dy, dx in ((dy, dx) for dy in range(-14, -400, -12) for dx in (10, -10)):
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points",
                              fontsize=7, va="top", ha="left" if dx > 0 else "right",
                              bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                                    "alpha": 0.85},
                              arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.4"})
            # the text alone (an Annotation's own extent includes its leader line), once its
            # offset is applied
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer).expanded(1.05, 1.15)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            clear = not any(box.overlaps(b) for b in boxes) and not any(
                box.x0 - marker_r < px < box.x1 + marker_r
                and box.y0 - marker_r < py < box.y1 + marker_r for px, py in markers)
            if inside and clear:
                boxes.append(box)
                break
            ann.remove()
        else:  # no clear place: keep the nearest one rather than drop the label
            ax.annotate(text, (x, y), xytext=(10, -14), textcoords="offset points",
                        fontsize=7, va="top", ha="left")


def _label(names_by_phase: dict[str, list[str]]) -> str:
    """'prefill q/k/v/o/down_proj' per phase, one line each."""
    lines = []
    for phase, names in names_by_phase.items():
        names = list(dict.fromkeys(names))
        if len(names) > 1 and all(n.endswith("_proj") for n in names):
            names = ["/".join(n.removesuffix("_proj") for n in names) + "_proj"]
        lines.append(f"{phase} {' / '.join(names)}")
    return "\n".join(lines)


def plot_roofline(reports: list[PhaseReport], path: str | Path,
                  measured: list[dict] | None = None) -> Path:
    """Writes `roofline_figure` as a PNG."""
    return _save(roofline_figure(reports, measured), path, layout=False)


def roofline_figure(reports: list[PhaseReport], measured: list[dict] | None = None):
    """Log-log roofline with every operator of every report as a point.

    Prefill and decode use different markers; colour is the operator group. The slanted line is
    bandwidth x intensity, the flat one the peak; the ridge is marked. Pure data moves
    (intensity 0) are left out. Matmuls and attention are labelled (operators at the same
    point share a label), below the roofline where no point can be; `measured` adds achieved
    (intensity, FLOP/s) per phase.
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

    fig, ax = plt.subplots(figsize=(10, 6.5))
    ax.loglog(x, np.minimum(peak, bw * x), "k-", lw=2)
    ridge = hw.ridge(dtype)
    ax.axvline(ridge, color="k", ls=":", lw=1)
    stars = [(m["model_flops"] / m["model_bytes"], m["achieved_tflops"] * 1e12)
             for m in measured or []]
    ax.set_xlim(min([lo] + [x / 2 for x, _ in stars]), max([hi] + [x * 2 for x, _ in stars]))
    ax.set_ylim(min([bw * lo / 2] + [y / 3 for _, y in stars]), peak * 4)
    ax.annotate(f"ridge {ridge:.1f} FLOP/B", (ridge, peak * 2.5), xytext=(-4, 0),
                textcoords="offset points", ha="right", va="center", fontsize=8)
    ax.annotate(f"peak {peak / 1e12:.4g} TFLOP/s ({dtype})", (ridge, peak), xytext=(6, 8),
                textcoords="offset points", ha="left", va="bottom", fontsize=9)
    # The bandwidth label runs along the slanted line, above it (no point is above the line).
    x_bw = lo * 3
    angle = _line_angle(ax, x_bw, bw * x_bw, x_bw * 10, bw * x_bw * 10)
    ax.annotate(f"{hw.bandwidth_gbps:.4g} {hw.bandwidth_unit}/s = {bw / 1e12:.3g} TB/s",
                (x_bw, bw * x_bw), xytext=(0, 10), textcoords="offset points",
                rotation=angle, rotation_mode="anchor", ha="left", va="bottom", fontsize=9)
    seen = set()
    # matmul and attention points, by position (operators at one point share a label)
    labels: dict[tuple[float, float], dict[str, list[str]]] = {}
    for intensity, achieved, phase, group, name, alternative in points:
        label = f"{phase} {group}"
        color = _COLORS.get(group, "k")
        # the attention variant not summed into the step (flash vs unfused) is drawn hollow
        ax.scatter(intensity, achieved, marker=_MARKERS.get(phase, "x"), s=40, zorder=3,
                   facecolors="none" if alternative else color, edgecolors=color,
                   label=None if label in seen or alternative else label)
        seen.add(label)
        if group in ("linear", "attention"):
            key = (float(f"{intensity:.3g}"), float(f"{achieved:.3g}"))
            labels.setdefault(key, {}).setdefault(phase, []).append(name)
    items = [(i, a, _label(by_phase)) for (i, a), by_phase in labels.items()]
    for m, (x_m, y_m) in zip(measured or [], stars):  # achieved here, whatever the roofline
        ax.scatter(x_m, y_m, marker="*", s=160, color="gold", edgecolor="k", zorder=4,
                   label=f"measured {m['phase']} B={m['batch']}")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("attainable FLOP/s")
    ax.set_title(f"Roofline on {hw.name}: operators at their bound ({reports[0].convention} bytes)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    _place_labels(ax, items)
    return fig


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
    # wrapped, so a long title is never cut at the figure's edge
    ax.set_title(textwrap.fill(title or "Decode throughput vs batch (roofline prediction)", 70),
                 fontsize=10)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def _save(fig, path: str | Path, layout: bool = True) -> Path:
    """Writes the PNG; layout=False keeps a layout already fixed (labels placed against it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
