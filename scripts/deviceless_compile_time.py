"""Seconds XLA:GPU takes to lower and compile the Generator's decode loop for an H200, without
a GPU.

Why: a layer index that is a constant of a Pallas kernel makes every layer's call a kernel of
its own to compile. On an H200 the stacked decode weights (four GEMVs per layer) added 2.4-8
s to the Generator's compile and the stacked cache (one attention kernel per layer) 1-4 s
(benchmarks/fused_decode_h200.md, stop 50). The same compiler runs here for a described
H200 (`deviceless.xla_compile`), so a change to how kernels take the layer can be weighed
before a card is lent. The seconds are this machine's (a compile on 2 cores, no autotuning):
compare the cases of one run, not with the card's figures.

Cases, per model (bf16, abstract params with the fused step's [N, K] copies): the loop with
the plain method's cache stacked (the Generator's default) and per layer, each compiled
`--rounds` times with jax's caches cleared before each.

  bash scripts/deviceless_env.sh run python scripts/deviceless_compile_time.py --out out/ct
"""

from __future__ import annotations

import argparse
import json
import statistics

import jax

from jdecode.analysis.deviceless_cases import generate_loop_case, model_params, write_record
from pallas_kernels.deviceless import xla_compile


def markdown(result: dict) -> str:
    lines = [f"# The Generator's decode loop compiled by XLA:GPU for an {result['target']} "
             "without a GPU", "", f"{result.get('date', '')} | jax {result.get('jax_version')}"
             f" | git {result.get('git_sha')} | `{result['command']}`", "",
             "Medians over the rounds, seconds on this machine.", "",
             "| model | cache | lower s | compile s | Pallas kernels in the loop |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['cache']} | {r['lower_s']:.2f} | "
                     f"{r['compile_s']:.2f} | {r['pallas_calls']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,llama-3.2-1b")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="out/deviceless_compile_time")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        cfg, params = model_params(name)
        for cache in ("stacked", "per-layer"):
            fn, fargs = generate_loop_case(cfg, params, 1, stacked_cache=cache == "stacked")
            runs = []
            for _ in range(args.rounds):
                jax.clear_caches()
                t: dict = {}
                text = xla_compile(fn, *fargs, donate_argnums=(1,), timings=t)
                runs.append(t)
            row = {"model": name, "cache": cache,
                   "lower_s": statistics.median(r["lower_s"] for r in runs),
                   "compile_s": statistics.median(r["compile_s"] for r in runs),
                   "pallas_calls": text.count("__gpu$xla.gpu.triton"), "runs": runs}
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_record(rows, args.out, "compile_time", markdown)


if __name__ == "__main__":
    main()
