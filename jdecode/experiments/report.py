"""An experiment's tables and plots from its rows: results.md (main table and, Spec-Bench
style, mean accepted length and speedup per prompt kind), speedup_vs_batch.png and, for
methods with quality metrics, quality_vs_cost.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jdecode.experiments.config import BASELINE, ExperimentConfig


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(cfg: ExperimentConfig, rows: list[dict], command: str) -> str:
    """The results table: one line per cell, quality beside cost."""
    if not rows:
        return f"# {cfg.name}\n\nno cells have run yet\n"
    r0 = rows[0]
    lines = [f"# {cfg.name}", "",
             f"{r0['date'][:10]} | {r0['device']} ({r0['backend']}) | jax {r0['jax_version']} | "
             f"git {r0['git_sha'] or '?'} | {r0['dtype']} | impl {r0['impl']} | "
             f"{r0['prompts']} prompts ({', '.join(cfg.prompts)}), {cfg.max_new_tokens} new "
             f"tokens, temperature {cfg.temperature:g}"
             + (f" | {r0['switches']}" if r0.get("switches") else ""), "",
             f"Command: `{command}`" if command else "", "",
             "Speedup is decode throughput over autoregressive decoding at the same batch size in "
             "the same run; tau is the mean number of tokens a decoding step emits per row "
             "(independent of the hardware). Exact: prompts whose greedy output equals "
             "autoregressive's. Agreement: share of autoregressive's tokens reproduced.", "",
             "| model | method | options | batch | tok/s | speedup | tau | exact | agreement "
             "| task acc. | KL | perplexity | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = r.get("quality") or {}
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        exact = "-" if r["exact"] is None else f"{r['exact_prompts']}/{r['prompts']}"
        lossy = "" if r["lossless"] else " (lossy)"
        lines.append(
            f"| {r['model']} | {r['label']}{lossy} | {opts} | {r['batch']} | {r['tok_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['mean_accepted']:.2f} | {exact} | "
            f"{_fmt(q.get('agreement'), '.3f')} | {_fmt(q.get('task_accuracy'), '.3f')} | "
            f"{_fmt(q.get('kl'), '.4f')} | {_fmt(q.get('perplexity'), '.2f')} | "
            f"{_fmt(r['compile_s'], '.1f')} |")
    kinds = sorted({k for r in rows for k in r["by_kind"] if k != "mixed"})
    single = [r for r in rows if r["batch"] == 1 and r["method"] != BASELINE]
    if kinds and single:
        lines += ["", "Per prompt kind at batch 1 (tau / speedup):", "",
                  "| method | " + " | ".join(kinds) + " |",
                  "|---|" + "---|" * len(kinds)]
        for r in single:
            cells = [f"{r['by_kind'][k]['mean_accepted']:.2f} / "
                     f"{r['by_kind'][k]['speedup']:.2f}x" if k in r["by_kind"] else "-"
                     for k in kinds]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    extra = [r for r in rows if r["method_stats"]]
    if extra:
        lines += ["", "Method statistics (from the whole cell):", ""]
        for r in extra:
            stats = ", ".join(f"{k} {v:.3g}" for k, v in r["method_stats"].items())
            lines.append(f"- {r['label']} b={r['batch']}: {stats}")
    return "\n".join(lines) + "\n"


def plot_speedup(rows: list[dict], path: Path) -> None:
    """Speedup against batch size, one line per method (autoregressive is the 1.0 line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = sorted({(r["model"], r["label"]) for r in rows if r["method"] != BASELINE})
    for model, label in labels:
        pts = sorted((r["batch"], r["speedup"]) for r in rows
                     if (r["model"], r["label"]) == (model, label))
        name = label if len({m for m, _ in labels}) == 1 else f"{label} ({model})"
        ax.plot(*zip(*pts), "o-", label=name)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="autoregressive")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="batch size", ylabel="speedup over autoregressive (same run)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality(rows: list[dict], path: Path) -> bool:
    """Agreement (and task accuracy) against relative cost (1 / speedup) for lossy methods and
    the baseline; returns False when no lossy row has quality metrics."""
    lossy = [r for r in rows if not r["lossless"] and r.get("quality")]
    if not lossy:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = lossy + [r for r in rows if r["method"] == BASELINE and r.get("quality")]
    metrics = [m for m in ("agreement", "task_accuracy") if any(
        m in r["quality"] for r in shown)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for r in shown:
            if metric not in r["quality"]:
                continue
            cost = 1.0 / r["speedup"]
            ax.scatter(cost, r["quality"][metric], s=18)
            ax.annotate(f"{r['label']} b={r['batch']}", (cost, r["quality"][metric]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="time per token relative to autoregressive", ylabel=metric,
               ylim=(-0.02, 1.05))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(cfg: ExperimentConfig, rows: list[dict], out: Path, command: str = "") -> None:
    """results.md and the plots for the rows so far."""
    (out / "results.md").write_text(markdown(cfg, rows, command))
    if rows and np.isfinite([r["speedup"] for r in rows]).all():
        plot_speedup(rows, out / "speedup_vs_batch.png")
        plot_quality(rows, out / "quality_vs_cost.png")
