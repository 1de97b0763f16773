"""Summary of the dynamic-depth runs (issue 14): quality against cost for every exit criterion,
threshold and mixture-of-depths capacity, self-speculation against autoregressive, and the
issue's bars, from the experiment runner's results and the trained parts' manifests.

    python scripts/depth_report.py --runs OUT/depth_b1,OUT/depth_b32,OUT/depth_cmdbuf \
        --exits EXITS_DIR --router ROUTER_DIR --out OUT [--tag h200]

Writes depth_<tag>.json (rows, calibration curves, bar verdicts), depth_<tag>.md and
depth_<tag>.png (top-1 agreement and perplexity against the share of layer computations).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BARS = {
    "self_speculation": "self-speculation >= 1.3x at batch 1, exact",
    "early_exit": ">= 30% fewer layer computations at >= 95% greedy-token agreement (top-1)",
    "mixture_of_depths": ">= 25% fewer layer computations at <= 5% higher held-out perplexity",
}


def load_rows(runs: list[Path]) -> list[dict]:
    """Every cell of the runs, each tagged with its run's directory name."""
    rows = []
    for run in runs:
        file = run / "results.jsonl"
        if file.is_file():
            rows += [{**json.loads(line), "run": run.name}
                     for line in file.read_text().splitlines() if line.strip()]
    return rows


def summarize(row: dict, base_ppl: dict) -> dict:
    """The figures of one cell that the depth tables show."""
    q = row.get("quality") or {}
    stats = row.get("method_stats") or {}
    share = stats.get("layer_share", 1.0 if row["method"] == "autoregressive" else None)
    ppl, ppl0 = q.get("perplexity"), base_ppl.get((row["run"], row["batch"]))
    return {"run": row["run"], "label": row["label"], "method": row["method"],
            "batch": row["batch"],
            "tok_s": row["tok_s"], "speedup": row["speedup"], "tau": row["mean_accepted"],
            "exact": row["exact"], "layer_share": share, "agreement": q.get("agreement"),
            "top1": q.get("top1"), "kl": q.get("kl"), "perplexity": ppl,
            "ppl_ratio": ppl / ppl0 if ppl and ppl0 else None,
            "task_accuracy": q.get("task_accuracy"), "options": row["options"],
            "method_stats": stats}


def verdicts(table: list[dict]) -> dict:
    """Each bar: met or not, and the row that comes closest."""
    spec = [r for r in table if r["method"] == "speculative" and r["batch"] == 1]
    best_spec = max(spec, key=lambda r: r["speedup"], default=None)
    exits = [r for r in table if r["method"] == "early_exit" and r["layer_share"] is not None
             and r["top1"] is not None]
    mods = [r for r in table if r["method"] == "mixture_of_depths"
            and r["ppl_ratio"] is not None and r["layer_share"] is not None]

    def closest(rows, share, quality_ok, quality_key):
        """The cheapest row of good quality; if it costs too much, still the one to show; with
        no row of good quality, the best quality among the cheap enough rows."""
        good = [r for r in rows if quality_ok(r)]
        if good:
            best = min(good, key=lambda r: r["layer_share"])
            return best["layer_share"] <= share, best
        cheap = [r for r in rows if r["layer_share"] <= share]
        return False, min(cheap, key=quality_key, default=None)

    met_exit, best_exit = closest(exits, 0.7, lambda r: r["top1"] >= 0.95,
                                  lambda r: -r["top1"])
    met_mod, best_mod = closest(mods, 0.75, lambda r: r["ppl_ratio"] <= 1.05,
                                lambda r: r["ppl_ratio"])
    return {
        "self_speculation": {"bar": BARS["self_speculation"], "met": bool(
            best_spec and best_spec["speedup"] >= 1.3 and best_spec["exact"] == 1.0),
            "best": best_spec},
        "early_exit": {"bar": BARS["early_exit"], "met": met_exit, "best": best_exit},
        "mixture_of_depths": {"bar": BARS["mixture_of_depths"], "met": met_mod,
                              "best": best_mod},
    }


def fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def provenance(rows: list[dict], runs: list[Path]) -> list[str]:
    """One line per run: when, where and how it ran (its results.md holds the command), and
    its same-run baseline."""
    lines = []
    for run in runs:
        mine = [r for r in rows if r["run"] == run.name]
        if not mine:
            continue
        r = mine[0]
        md = run / "results.md"
        cmd = next((line.removeprefix("Command: ") for line in md.read_text().splitlines()
                    if line.startswith("Command: ")), "-") if md.is_file() else "-"
        lines.append(f"- {run.name}: {r['date']} | {r['device']} | jax {r['jax_version']} | "
                     f"git {r['git_sha']} | {r['dtype']} | {r['prompts']} prompts | baseline: "
                     f"autoregressive in the same run | command {cmd}")
    return lines


def markdown(table: list[dict], curves: dict, bars: dict, manifests: dict,
             curve_note: str, runs_lines: list[str]) -> str:
    lines = ["# Dynamic depth: quality against cost", "", *runs_lines, "",
             ("layer share: layer computations per token / L (early exit: teacher-forced on "
             "held-out prose; mixture-of-depths: exact). top-1 and KL: teacher-forced against the "
             "full model on its own greedy outputs. ppl ratio: held-out perplexity over the "
             "full model's."), "",
             ("| run | method | batch | tok/s | speedup | tau | layer share | exact | agreement "
             "| top-1 | KL | ppl ratio | task acc. |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['run']} | {r['label']} | {r['batch']} | {r['tok_s']:.1f} | "
                     f"{r['speedup']:.2f}x | "
                     f"{r['tau']:.2f} | {fmt(r['layer_share'])} | {fmt(r['exact'], '.2f')} | "
                     f"{fmt(r['agreement'])} | {fmt(r['top1'])} | {fmt(r['kl'], '.4f')} | "
                     f"{fmt(r['ppl_ratio'])} | {fmt(r['task_accuracy'])} |")
    lines += ["", "## Bars", ""]
    for name, v in bars.items():
        best = v["best"]
        detail = "no row" if best is None else (
            f"closest: {best['label']} b={best['batch']} ({best['run']}): speedup "
            f"{best['speedup']:.2f}x, "
            f"layer share {fmt(best['layer_share'])}, top-1 {fmt(best['top1'])}, "
            f"ppl ratio {fmt(best['ppl_ratio'])}, exact {fmt(best['exact'], '.2f')}")
        lines.append(f"- **{name}** ({v['bar']}): {'met' if v['met'] else 'missed'}; {detail}")
    for name, curve in curves.items():
        lines += ["", f"## Calibration: {name} (held-out, teacher-forced, {curve_note})", "",
                  "| threshold | top-1 | KL | layer share |", "|---|---|---|---|"]
        lines += [f"| {p['threshold']:.4g} | {p['top1']:.3f} | {p['kl']:.4f} | "
                  f"{p['layer_share']:.3f} |" for p in curve]
    exits = manifests.get("exits", {}).get("metrics", {})
    if exits.get("exits_trained"):
        lines += ["", "## Exit heads: held-out top-1 per exit (untrained -> trained)", ""]
        before, after = exits["exits_untrained"]["top1"], exits["exits_trained"]["top1"]
        lines += [f"- after {int(k.split('_')[1]) + 1} layers: {before[k]:.3f} -> {after[k]:.3f}"
                  for k in after]
    return "\n".join(lines) + "\n"


def plot(table: list[dict], curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, curve in curves.items():
        ax1.plot([p["layer_share"] for p in curve], [p["top1"] for p in curve], "-", lw=1,
                 label=f"{name} (calibration)")
    for r in table:
        if r["layer_share"] is None:
            continue
        if r["top1"] is not None:
            ax1.scatter(r["layer_share"], r["top1"], s=16)
            ax1.annotate(f"{r['label']} b={r['batch']}", (r["layer_share"], r["top1"]),
                         fontsize=6, xytext=(3, 3), textcoords="offset points")
        if r["ppl_ratio"] is not None:
            ax2.scatter(r["layer_share"], r["ppl_ratio"], s=16)
            ax2.annotate(f"{r['label']} b={r['batch']}", (r["layer_share"], r["ppl_ratio"]),
                         fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax1.axhline(0.95, color="gray", ls=":", lw=0.8)
    ax1.axvline(0.7, color="gray", ls=":", lw=0.8)
    ax1.set(xlabel="share of layer computations", ylabel="top-1 agreement with the full model",
            title="early exit and MoD: agreement vs cost")
    ax1.legend(fontsize=6)
    ax2.axhline(1.05, color="gray", ls=":", lw=0.8)
    ax2.axvline(0.75, color="gray", ls=":", lw=0.8)
    ax2.set(xlabel="share of layer computations", ylabel="held-out perplexity / full model's",
            title="perplexity vs cost")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="comma-separated experiment output dirs")
    ap.add_argument("--exits", help="the exits artifact directory (calibration curves)")
    ap.add_argument("--router", help="the router artifact directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default="gpu")
    args = ap.parse_args()
    runs = [Path(p) for p in args.runs.split(",")]
    rows = load_rows(runs)
    base_ppl = {(r["run"], r["batch"]): (r.get("quality") or {}).get("perplexity")
                for r in rows if r["method"] == "autoregressive"}
    table = [summarize(r, base_ppl) for r in rows]
    manifests = {name: json.loads((Path(d) / "manifest.json").read_text())
                 for name, d in (("exits", args.exits), ("router", args.router))
                 if d and (Path(d) / "manifest.json").is_file()}
    for m in manifests.values():
        m["target"].pop("probe", None)  # hundreds of floats nobody reads here
    # The curve measured with the early-exit method itself (skipped layers' K/V propagated)
    # where the artifact has one: it is what the calibrated thresholds are read from.
    metrics = manifests.get("exits", {}).get("metrics", {})
    curves = metrics.get("calibration_propagated") or metrics.get("calibration", {})
    curve_note = ("skipped layers' K/V propagated, as the method runs"
                  if metrics.get("calibration_propagated") else "full-model states")
    bars = verdicts(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"depth_{args.tag}.json").write_text(json.dumps(
        {"rows": table, "bars": bars, "manifests": manifests}, indent=1))
    (out / f"depth_{args.tag}.md").write_text(markdown(table, curves, bars, manifests, curve_note,
                 provenance(rows, runs)))
    plot(table, curves, out / f"depth_{args.tag}.png")
    print((out / f"depth_{args.tag}.md").read_text())


if __name__ == "__main__":
    main()
