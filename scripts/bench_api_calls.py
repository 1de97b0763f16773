"""What repeated one-line API calls cost: `jdecode.generate(model, ...)` N times on one loaded
`Model` (its shared Generator: only the first call compiles) against N calls that each build a
fresh `Generator(model)` (each traces and compiles again). Wall seconds per call, prompt and
sampling fixed, the model loaded once before either loop. Writes JSON + markdown.

  python scripts/bench_api_calls.py --model configs/models/tiny.yaml --out benchmarks --tag cpu
  GPU: PYTHONPATH=. python3 scripts/bench_api_calls.py \
         --model configs/models/smollm2-135m.yaml --dtype bfloat16 --out $OUT --tag h200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jdecode  # noqa: E402
from jdecode.decoding.generate import Generator  # noqa: E402
from jdecode.provenance import environment, write_record  # noqa: E402

PROMPT = [1, 2, 3, 4, 5]  # token ids: a model config (random weights) has no tokenizer


def time_calls(call, n: int) -> list[float]:
    """Wall seconds of each of n calls of `call()`; each waits for its tokens (generate
    returns host-side results)."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="configs/models/tiny.yaml")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args(argv)
    model = jdecode.load(args.model, dtype=args.dtype)
    sp = jdecode.SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens,
                                ignore_eos=True)
    rows = {
        # Fresh first: the API's Generator would otherwise hold a second weight copy (GPU
        # layout) while the fresh ones are built.
        "fresh Generator per call": time_calls(lambda: Generator(model).generate([PROMPT], sp),
                                               args.calls),
        "jdecode.generate": time_calls(lambda: jdecode.generate(model, [PROMPT], sp),
                                       args.calls),
    }
    record = {**environment(), "model": args.model, "dtype": model.cfg.dtype,
              "new_tokens": args.new_tokens,
              "command": "python scripts/bench_api_calls.py " + " ".join(argv or sys.argv[1:]),
              "seconds_per_call": rows}
    lines = [f"# Repeated API calls ({record['date'][:10]}, {record['device']}, "
             f"jax {record['jax_version']}, git {record['git_sha']})", "",
             f"`{record['command']}`: {args.model} in {model.cfg.dtype}, one prompt, "
             f"{args.new_tokens} greedy tokens; wall seconds per call, in call order.", "",
             "| path | " + " | ".join(f"call {i + 1}" for i in range(args.calls)) + " |",
             "|---|" + "---|" * args.calls]
    lines += [f"| {path} | " + " | ".join(f"{t:.3f}" for t in ts) + " |"
              for path, ts in rows.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    write_record(args.out / f"api_calls_{args.tag}", record, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return record


if __name__ == "__main__":
    main()
