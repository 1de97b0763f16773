"""scripts/spec_plan.py: per-batch tree/chain/off plans from measured experiment rows."""

import json

from helpers import load_script


def row(method, label, batch, tau, speedup, **options):
    return {"method": method, "label": label, "batch": batch, "mean_accepted": tau,
            "speedup": speedup, "options": {"heads": "h", **options}}


def test_plans_choose_per_batch_and_write_options(tmp_path, capsys):
    rows = [row("medusa", "m64", 1, 2.6, 2.2, tree_nodes=64),
            row("medusa", "m8", 1, 2.0, 1.9, tree_nodes=8),
            row("medusa", "m64", 64, 2.5, 0.8, tree_nodes=64),
            row("medusa", "m8", 64, 1.9, 1.1, tree_nodes=8),
            row("medusa", "m64", 128, 2.5, 0.5, tree_nodes=64),
            row("medusa", "m8", 128, 1.9, 0.97, tree_nodes=8),
            row("blockwise", "b3", 1, 1.8, 1.7, k=3),
            row("autoregressive", "autoregressive", 1, 1.0, 1.0)]
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)))
    plan = load_script("spec_plan").plans(rows)
    assert set(plan) == {"medusa", "blockwise"}
    medusa = plan["medusa"]
    assert {b: v["choice"] for b, v in medusa["batches"].items()} == {1: "m64", 64: "m8",
                                                                       128: None}
    assert medusa["options"] == {"heads": "h", "tree_nodes": 64,
                                 "nodes_by_batch": {64: 8, 128: 1}}
    assert plan["blockwise"]["options"] == {"heads": "h", "k": 3, "k_by_batch": None}
