"""Where a lossless method's greedy output first leaves autoregressive's, and how close the
two candidate tokens were there: the f32 logit margin between autoregressive's token and the
method's at the first differing position (teacher-forced on the prompt and the common prefix).

A lossless method that differs only at near-ties in a bf16 run is seeing bf16 rounding (a
verification pass over many tokens sums in another order than one-token decoding), not a bug;
a difference at a wide margin is a bug. Reads an experiment directory written by the runner.

    python scripts/divergence_report.py experiments/all-methods-b1 [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.decoding import phases
from jdecode.decoding.generate import Generator
from jdecode.experiments.config import parse_config, resolve_prompts
from jdecode.io.registry import load


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="an experiment output directory (results.jsonl, outputs/)")
    ap.add_argument("--model", default="smollm2-135m", help="the model, loaded in f32")
    ap.add_argument("--out", help="write the JSON here")
    args = ap.parse_args()
    run = Path(args.run)
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    cfg = parse_config(rows[0]["config"] | {"model": args.model}, "results.jsonl")
    model = load(args.model, dtype="float32")  # as its recorded runs: not auto
    gen = Generator(model)
    prompts = [gen.encode(p.text, chat=cfg.chat) if p.text is not None else list(p.token_ids)
               for p in resolve_prompts(cfg)]
    score = jax.jit(partial(phases.score, cfg=model.cfg))
    report = {}
    for row in rows:
        if not row["lossless"] or row["method"] == "autoregressive":
            continue
        base = json.loads((run / "outputs" / f"{row['baseline_cell']}.json").read_text())
        mine = json.loads((run / "outputs" / f"{row['cell']}.json").read_text())
        found = []
        for i, (a, b) in enumerate(zip(base["tokens"], mine["tokens"])):
            j = first_difference(a, b)
            if j is None or j >= min(len(a), len(b)):
                continue
            seq = prompts[i] + a[:j]
            n = -(-len(seq) // 128) * 128  # right-padded to a bucket: one compile per bucket
            padded = jnp.asarray([seq + [0] * (n - len(seq))], jnp.int32)
            logits = np.asarray(score(model.params, padded)[0][0, len(seq) - 1])
            found.append({"prompt": i, "position": j, "ar_token": a[j], "method_token": b[j],
                          "margin_f32": float(logits[a[j]] - logits[b[j]]),
                          "top1_f32": int(np.argmax(logits))})
        report[row["label"]] = {"exact": f"{row['exact_prompts']}/{row['prompts']}",
                                "differences": found}
        margins = [f["margin_f32"] for f in found]
        print(f"{row['label']:24s} exact {report[row['label']]['exact']:>6s}  first differences "
              f"at f32 margins {['%.3f' % m for m in sorted(margins)]}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
