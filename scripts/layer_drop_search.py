"""How many whole layers can the frozen model lose before held-out perplexity rises 5%?

The mixture-of-depths bar of issue 14 asks for >= 25% fewer layer computations at <= 5% higher
held-out perplexity. A per-sequence router fixes one set of layers per text; this script shows
how much room there is for such choices, with the best set for a whole corpus, found by greedy
backward elimination (drop the layer whose removal hurts perplexity least, repeat), each choice
made on one set of prose paragraphs and reported on another, the experiments' own held-out
paragraphs (`prose_paragraphs()[:8]`, cut to the runner's PPL_TOKENS), with the runner's
perplexity (`quality.nll_sums`). A dropped layer is skipped whole: its residual passes
through, as a routed-out token's does.

    python scripts/layer_drop_search.py --max-drop 10 --out benchmarks/layer_drop_cpu

Writes OUT.json (per step: the dropped layer, both perplexities and their ratios to the full
model's) and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import jax
import jax.numpy as jnp

from jdecode.analysis import quality
from jdecode.data.heldout import prose_paragraphs, text_id
from jdecode.decoding import phases
from jdecode.experiments.runner import PPL_TOKENS, padded
from jdecode.io.registry import DEFAULT_MODEL, load
from jdecode.provenance import git_sha


def make_ppl(model):
    """ppl(idx, tokens, mask): perplexity of the model that keeps only layers idx [C] (sorted);
    compiled once per C."""
    layers = model.params.layers
    if isinstance(layers, tuple):  # per-layer buffers: stacked once, gathered per call
        layers = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layers)

    @jax.jit
    def logits(params, stacked, idx, tokens):
        sub = params.replace(layers=jax.tree_util.tree_map(lambda a: a[idx], stacked))
        return phases.score(sub, tokens, cfg=model.cfg.replace(num_layers=idx.shape[0]))[0]

    def ppl(idx: list[int], tokens, mask) -> float:
        out = logits(model.params, layers, jnp.asarray(idx, jnp.int32), tokens)
        return quality.perplexity(*quality.nll_sums(out, tokens, mask))

    return ppl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-drop", type=int, default=10, help="layers to drop, one per step")
    ap.add_argument("--select-paragraphs", type=int, default=8,
                    help="paragraphs after the 8 evaluation ones, used to choose each layer")
    ap.add_argument("--out", required=True, help="output path without extension")
    args = ap.parse_args()

    model = load(args.model, dtype=args.dtype)
    paras = prose_paragraphs(8 + args.select_paragraphs)
    if len(paras) < 8 + args.select_paragraphs:
        raise SystemExit(f"only {len(paras)} held-out paragraphs exist; lower "
                         f"--select-paragraphs to {len(paras) - 8} or fewer")
    enc = [model.tokenizer.encode(p)[:PPL_TOKENS] for p in paras]
    ev_tok, ev_mask = (jnp.asarray(a) for a in padded(enc[:8]))
    se_tok, se_mask = (jnp.asarray(a) for a in padded(enc[8:]))
    ppl = make_ppl(model)

    n = model.cfg.num_layers
    keep = list(range(n))
    t0 = time.perf_counter()
    full_sel, full_ev = ppl(keep, se_tok, se_mask), ppl(keep, ev_tok, ev_mask)
    steps = [{"dropped": None, "kept": n, "layer_share": 1.0, "select_ppl": full_sel,
              "eval_ppl": full_ev, "select_ratio": 1.0, "eval_ratio": 1.0}]
    print(f"full model: select ppl {full_sel:.3f}, eval ppl {full_ev:.3f}")
    for _ in range(args.max_drop):
        trials = {layer: ppl([k for k in keep if k != layer], se_tok, se_mask) for layer in keep}
        best = min(trials, key=trials.get)
        keep.remove(best)
        ev = ppl(keep, ev_tok, ev_mask)
        steps.append({"dropped": best, "kept": len(keep), "layer_share": len(keep) / n,
                      "select_ppl": trials[best], "eval_ppl": ev,
                      "select_ratio": trials[best] / full_sel, "eval_ratio": ev / full_ev})
        print(f"drop layer {best:2d}: {len(keep)}/{n} layers, select ppl "
              f"x{trials[best] / full_sel:.3f}, eval ppl x{ev / full_ev:.3f}  "
              f"[{time.perf_counter() - t0:.0f}s]", flush=True)

    cmd = (f"python scripts/layer_drop_search.py --model {args.model} --dtype {args.dtype} "
           f"--max-drop {args.max_drop} --select-paragraphs {args.select_paragraphs} "
           f"--out {args.out}")
    within = [s for s in steps if s["eval_ratio"] <= 1.05]
    record = {"date": date.today().isoformat(), "device": jax.devices()[0].device_kind,
              "host": platform.processor() or platform.machine(), "jax": jax.__version__,
              "git_sha": git_sha(), "command": cmd, "model": args.model, "dtype": args.dtype,
              "num_layers": n, "eval_text": text_id(paras[:8]), "select_text": text_id(paras[8:]),
              "ppl_tokens": PPL_TOKENS, "seconds": time.perf_counter() - t0, "steps": steps,
              "fewest_layers_within_5pct": min(s["kept"] for s in within)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    header = (f"{record['date']} | {record['device']} ({record['host']}) | jax {jax.__version__}"
              f" | git {record['git_sha']}")
    legend = ("Each step drops the layer whose removal raises perplexity least on the selection "
              f"paragraphs ({record['select_text']}); the eval column is perplexity on the "
              f"experiments' held-out paragraphs ({record['eval_text']}), first {PPL_TOKENS} "
              "tokens each. Ratios are to the full model's perplexity on the same text.")
    columns = ("| step | dropped layer | layers kept | layer share | select ppl ratio | "
               "eval ppl | eval ppl ratio |")
    lines = [f"# Greedy layer dropping: {args.model} ({args.dtype})", "", header, "",
             f"Command: `{cmd}`", "", legend, "", columns, "|---|---|---|---|---|---|---|"]
    for i, s in enumerate(steps):
        lines.append(f"| {i} | {'-' if s['dropped'] is None else s['dropped']} | {s['kept']} | "
                     f"{s['layer_share']:.3f} | {s['select_ratio']:.3f} | {s['eval_ppl']:.2f} | "
                     f"{s['eval_ratio']:.3f} |")
    fewest = record["fewest_layers_within_5pct"]
    lines += ["", (f"Fewest layers within 5% of the full model's eval perplexity: {fewest} of "
                   f"{n} ({1 - fewest / n:.0%} fewer layer computations).")]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-1:]))


if __name__ == "__main__":
    main()
