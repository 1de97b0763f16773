"""Kernels per step, counted in what XLA:GPU compiles for an H200, without a GPU.

Why: issue 16 asks for a kernel-count table per step, before and after, and the device is
lent some sessions and not others. jax's CUDA plugin compiles for a device topology it is
given (`pallas_kernels.deviceless.xla_compile`), so the optimized HLO of a step, and the
kernels it launches (`deviceless.launches`), can be read on a CPU machine. These are static
counts of one step's launches, not timings: no autotuning ran, so XLA's GEMM tiles are its
heuristics'; the fusions and the count are what the card's compiler makes of the program.

Cases, per model (bf16, abstract params with the fused step's [N, K] copies, nothing
allocated):

- the Generator's decode step (`phases.decode_step` over a 1024-slot per-layer cache), fused
  and general, at 1 and 4 rows, and the default path at 64;
- the engine's decode-only step (`deviceless_cases.engine_forward_case`: one forward over
  the page pool and a greedy sample, 32 sequence slots (64 for 64 rows), 16-token pages,
  2048-token tables): the fused step over the 1- and 4-row decode buckets, and the general
  path over 16 and 64 rows.

  bash scripts/deviceless_env.sh run python scripts/deviceless_kernels.py --out out/kernels
"""

from __future__ import annotations

import argparse
import json

from jdecode.analysis.deviceless_cases import (
    count_kernels,
    engine_forward_case,
    model_params,
    step_case,
    write_record,
)
from jdecode.model.compile_options import step_compiler_options

# (label, impl variant, rows, XLA options) of the Generator's steps: at 64 rows with the
# options its loop compiles with there (cuBLAS GEMMs, `compile_options.step_compiler_options`) and
# without them (XLA's Triton GEMMs, as before stop 51).
GENERATOR = [("fused", "pallas-fused", 1, {}), ("general", "pallas-general", 1, {}),
             ("fused", "pallas-fused", 4, {}), ("general", "pallas-general", 4, {}),
             ("default", "pallas", 64, step_compiler_options(64, "gpu")),
             ("default, Triton GEMMs", "pallas", 64, {})]
# (label, impl variant, rows, XLA options) of the engine's decode-only steps: the fused step
# over the decode buckets of up to 5 rows, the general path over the token buckets past them
# (and wherever JDECODE_FUSED_DECODE=0); at 64 rows with the options the runner compiles that
# step with (`ModelRunner.step_options`, cuBLAS GEMMs, since stop 52) and without them.
ENGINE = [("fused, 1-row bucket (default)", "pallas", 1, {}),
          ("fused, 4-row bucket (default)", "pallas", 4, {}),
          ("general, 16-token bucket", "pallas-general", 16, {}),
          ("general, 64 rows (default)", "pallas", 64, step_compiler_options(64, "gpu")),
          ("general, 64 rows, Triton GEMMs", "pallas", 64, {})]


def markdown(result: dict) -> str:
    lines = [f"# Kernels per step, compiled by XLA:GPU for an {result['target']} without a GPU",
             "", f"{result.get('date', '')} | jax {result.get('jax_version')} | git "
             f"{result.get('git_sha')} | `{result['command']}`", "",
             "Static counts of one step's launches in the optimized HLO "
             "(`pallas_kernels.deviceless.launches`), not timings.", "",
             "| model | step | path | rows | kernels | Pallas | XLA fusions | the largest kinds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        kinds = r["kinds"]
        pallas = sum(v for k, v in kinds.items() if k.startswith("pallas"))
        fusions = sum(v for k, v in kinds.items() if k.startswith("fusion"))
        top = ", ".join(f"{k} {v}" for k, v in list(kinds.items())[:4])
        lines.append(f"| {r['model']} | {r['step']} | {r['path']} | {r['rows']} | "
                     f"{r['kernels']} | {pallas} | {fusions} | {top} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,llama-3.2-1b")
    ap.add_argument("--out", default="out/deviceless_kernels")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        cfg, params = model_params(name)
        cases = [("Generator decode", label, variant, n, opts,
                  step_case(cfg, params, variant, n, 1)) for label, variant, n, opts in GENERATOR]
        cases += [("engine decode-only", label, variant, n, opts,
                   engine_forward_case(cfg, params, n)) for label, variant, n, opts in ENGINE]
        for step, label, variant, n, opts, (fn, fargs) in cases:
            row = {"model": name, "step": step, "path": label, "variant": variant, "rows": n,
                   "compiler_options": opts, **count_kernels(fn, fargs, variant, opts or None)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_record(rows, args.out, "kernels", markdown)


if __name__ == "__main__":
    main()
