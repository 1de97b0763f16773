"""Per-token decode latency of the serving engine (`LLM`, default flags) against `Generator`,
one request at a time, in the same run. Writes JSON + markdown.

The paths are run in alternation, `--repeats` times each, so a shared machine's load falls
on all alike; the record gives medians and the load average around the run.

`--engine-impls` times more than one engine: "auto" is the default engine; "pallas-fused" and
"pallas-general" are impl "pallas" with the fused decode step forced on or off
(`jdecode.model.fused_decode.impl_variant`; on the GPU the default takes the fused step for
decode-only steps of up to 5 rows, so a single request decodes through it).

  python scripts/bench_engine_latency.py --out benchmarks --tag cpu
  python scripts/bench_engine_latency.py --engine-impls pallas-fused,pallas-general \
      --out $OUT --tag h200
  python scripts/bench_engine_latency.py --model configs/models/smollm2-135m.yaml \
      --dtype bfloat16 --engine-impls pallas-fused,pallas-general --out $OUT --tag shape

A model config (random weights, no tokenizer) gets a prompt of `--prompt-tokens` token ids
in place of the chat prompt.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax

from jdecode.decoding.generate import Generator
from jdecode.decoding.sampling import SamplingParams
from jdecode.engine.engine import EngineArgs, LLMEngine
from jdecode.io.registry import DEFAULT_MODEL, load
from jdecode.model.fused_decode import impl_variant
from jdecode.provenance import git_sha, machine, write_record

PROMPT = "Tell me about the history of the city of Paris in a few sentences."


def generator_run(gen: Generator, prompt: str | list[int], new_tokens: int) -> dict:
    """One request: decode ms per token (prefill excluded) and the request's wall time.
    prompt: chat text, or token ids (a model without a tokenizer)."""
    sp = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    stats = gen.generate([prompt], sp, chat=isinstance(prompt, str))[0].stats
    return {"ms_per_token": 1e3 / stats["decode_tok_s"], "wall_s": time.perf_counter() - t0}


def engine_run(engine: LLMEngine, ids: list[int], new_tokens: int) -> dict:
    """One request through the engine's step loop: decode ms per token, the time from its
    first token (prefill's) to its last over the tokens between, and the request's wall time.

    Not the median gap between outputs: with several decodes per launch (a GPU's default) a
    step returns a burst of outputs at once, and the median gap read ~0 (2026-12-05, H100)."""
    engine.add_request("r", ids, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    t0 = time.perf_counter()
    stamps = []
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        stamps.extend(now for out in outs for _ in out.new_token_ids)  # a stamp per token
    decode_ms = 1e3 * (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    return {"ms_per_token": decode_ms, "wall_s": time.perf_counter() - t0}


def engine_label(impl: str) -> str:
    return "engine" if impl == "auto" else f"engine {impl}"


def markdown(r: dict) -> str:
    g = r["generator"]
    lines = [
        f"# Engine vs Generator, per-token decode latency: {r['model']} on {r['device']}", "",
        f"{r['date']} | {r['machine']} | jax {r['jax']} | git {r['git_sha'][:10]}", "",
        f"`{r['command']}`", "",
        (f"One request, a {r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens "
         f"(greedy, EOS ignored), {r['repeats']} runs of each in alternation; medians. Load "
         f"average {r['load_before']:.1f} before, {r['load_after']:.1f} after (shared machine)."),
        "", "| path | ms / token | request wall s | x Generator |", "|---|---|---|---|",
        f"| `Generator` (`jdecode generate`) | {g['ms_per_token']:.1f} | {g['wall_s']:.2f} | 1 |"]
    for impl in r["engine_impls"]:
        e = r[engine_label(impl)]
        what = "default flags" if impl == "auto" else f"impl {impl}"
        lines.append(f"| `LLM` / `serve` engine, {what} | {e['ms_per_token']:.1f} | "
                     f"{e['wall_s']:.2f} | {e['ms_per_token'] / g['ms_per_token']:.2f} |")
    lines += ["", "Engine settings as resolved: " + "; ".join(
        f"{engine_label(i)}: {r['engine_defaults'][i]}" for i in r["engine_impls"]) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--dtype", default="float32", help="weights' dtype (load's)")
    ap.add_argument("--prompt-tokens", type=int, default=45,
                    help="prompt length for a model without a tokenizer (a model config)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    ap.add_argument("--tag", default=jax.default_backend())
    ap.add_argument("--engine-impls", default="auto",
                    help="comma-separated: auto (the default engine), xla, pallas, "
                         "pallas-fused, pallas-general")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    model = load(args.model, dtype=args.dtype)
    gen = Generator(model)
    impls = args.engine_impls.split(",")
    engines = {}
    for impl in impls:
        with impl_variant(impl) as resolved:  # the switch holds while the runner is built
            engines[impl] = LLMEngine(model, EngineArgs(impl=resolved))
    if model.tokenizer is None:  # a model config: random weights, a prompt of token ids
        ids = [1 + i % (model.cfg.vocab_size - 1) for i in range(args.prompt_tokens)]
        prompt: str | list[int] = ids
    else:
        ids, prompt = gen.encode(PROMPT, chat=True), PROMPT

    def run_engine(impl: str) -> dict:
        with impl_variant(impl):  # and while its steps are traced
            return engine_run(engines[impl], ids, args.new_tokens)

    generator_run(gen, prompt, args.new_tokens)  # compile all before timing
    for impl in impls:
        run_engine(impl)
    runs: dict[str, list[dict]] = {"generator": [], **{engine_label(i): [] for i in impls}}
    for _ in range(args.repeats):
        runs["generator"].append(generator_run(gen, prompt, args.new_tokens))
        for impl in impls:
            runs[engine_label(impl)].append(run_engine(impl))
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("ms_per_token", "wall_s")}
           for k, v in runs.items()}
    defaults = {}
    for impl, engine in engines.items():
        runner = engine.runner
        defaults[impl] = (f"impl {runner.impl}, max_num_seqs {runner.max_num_seqs}, "
                          f"token buckets {runner.buckets}, fused decode buckets "
                          f"{runner.decode_buckets or 'none'}, block-table widths (pages of "
                          f"{runner.page_size}) {runner.kv_buckets}")
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "git_sha": git_sha(short=False), "command": shlex.join(["python", *sys.argv]),
        "model": model.name, "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
        "repeats": args.repeats, "load_before": load_before, "load_after": os.getloadavg()[0],
        "engine_impls": impls, "engine_defaults": defaults, **med,
        "ratio": med[engine_label(impls[0])]["ms_per_token"] / med["generator"]["ms_per_token"],
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"engine_latency_{args.tag}"
    write_record(stem, result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
