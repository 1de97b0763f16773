"""Per-batch plans for tree methods from a measured experiment: at every batch size, the tree
size (or chain length) with the best tokens-per-round / round-cost, or plain decoding
(`jdecode.analysis.spec_cost.plan_by_batch`), written as the method options that apply it.

    python scripts/spec_plan.py OUT/results.jsonl [more.jsonl ...] --out OUT/plan.json

For each method among medusa, medusa-typical, blockwise and eagle, every row of that method is a
candidate at its batch size; its tau (mean tokens per step) and round cost (tau / measured
speedup, in plain decode steps) come from the rows. Writes plan.json: per method the chosen
candidate, predicted speedup and the options entry (`nodes_by_batch` or `k_by_batch`, with 1 or
0 meaning plain decoding) to paste into an experiment YAML; prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jdecode.analysis.spec_cost import plan_by_batch, round_cost

# method -> (the option that sizes its tree or chain, its "plain decoding" value, plan option)
SHAPE_OPTION = {"medusa": ("tree_nodes", 1, "nodes_by_batch"),
                "medusa-typical": ("tree_nodes", 1, "nodes_by_batch"),
                "eagle": ("tree_nodes", 1, "nodes_by_batch"),
                "blockwise": ("k", 0, "k_by_batch")}


def plans(rows: list[dict], min_speedup: float = 1.0) -> dict[str, dict]:
    """method -> {"batches": {batch: {choice, predicted, tau, cost, value}}, "options": {...}}."""
    out = {}
    for method, (size, plain, plan_key) in SHAPE_OPTION.items():
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        tau: dict[int, dict[str, float]] = {}
        cost: dict[int, dict[str, float]] = {}
        value: dict[str, int] = {}
        for r in mine:
            tau.setdefault(r["batch"], {})[r["label"]] = r["mean_accepted"]
            cost.setdefault(r["batch"], {})[r["label"]] = round_cost(r["mean_accepted"],
                                                                     r["speedup"])
            value[r["label"]] = r["options"][size]
        chosen = plan_by_batch(tau, cost, min_speedup)
        batches = {b: {"choice": c, "predicted": s, "value": plain if c is None else value[c]}
                   for b, (c, s) in chosen.items()}
        first = batches[min(batches)]["value"]
        by_batch = {b: v["value"] for b, v in batches.items() if b != min(batches)}
        template = next(r["options"] for r in mine if r["batch"] == min(batches))
        out[method] = {"batches": batches,
                       "options": {**template, size: first, plan_key: by_batch or None}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="results.jsonl files of `jdecode experiment`")
    ap.add_argument("--min-speedup", type=float, default=1.0,
                    help="a tree or chain must beat this to be kept (1.0 = break-even)")
    ap.add_argument("--out", default=None, help="write the plans as JSON here")
    args = ap.parse_args()
    rows = [json.loads(line) for path in args.results
            for line in Path(path).read_text().splitlines() if line.strip()]
    result = plans(rows, args.min_speedup)
    for method, plan in result.items():
        print(f"{method}: {json.dumps(plan['options'])}")
        for b, v in plan["batches"].items():
            print(f"  batch {b:>3}: {v['choice'] or 'plain decoding'} "
                  f"(predicted {v['predicted']:.2f}x)")
    if args.out:
        Path(args.out).write_text(json.dumps({"min_speedup": args.min_speedup,
                                              "sources": args.results, "plans": result},
                                             indent=1))


if __name__ == "__main__":
    main()
