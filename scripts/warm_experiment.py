"""Compiles every executable an experiment will need, in parallel threads, into XLA's persistent
compilation cache, so that `jdecode experiment` then loads them instead of compiling one after
another (a GPU compile of the unrolled model takes tens of seconds; XLA compiles outside the
GIL).

It generates, once per method, batch size and prompt-length bucket the run will meet, with the
experiment's own settings (same shapes, same executables). Set JAX_COMPILATION_CACHE_DIR for
both commands.

    JAX_COMPILATION_CACHE_DIR=/tmp/xla python scripts/warm_experiment.py \
        configs/experiments/nar.yaml --set model=model.gguf --workers 8
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import jax

from jdecode.decoding import generate as generate_mod
from jdecode.decoding.generate import Generator, next_pow2
from jdecode.decoding.sampling import SamplingParams
from jdecode.experiments.config import BASELINE, MethodEntry, load_config, resolve_prompts
from jdecode.experiments.runner import chunks
from jdecode.io.registry import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="an experiment YAML")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="key=value, as `jdecode experiment --set`")
    ap.add_argument("--workers", type=int, default=8, help="compiles in flight at once")
    ap.add_argument("--bucket", type=int, default=None,
                    help="smallest prompt-length bucket (the runner's must be the same)")
    args = ap.parse_args()
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        raise SystemExit("set JAX_COMPILATION_CACHE_DIR: the experiment reads the executables "
                         "from that cache")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if args.bucket is not None:
        generate_mod.MIN_PROMPT_BUCKET = args.bucket
    cfg = load_config(args.config, args.overrides)
    prompts = resolve_prompts(cfg)
    entries = [MethodEntry(BASELINE)] + [m for m in cfg.methods if m.name != BASELINE]
    t0 = time.perf_counter()
    jobs = []
    for model_name in cfg.model:
        model = load(model_name, dtype=cfg.dtype)
        for entry in entries:
            gen = Generator(model, impl=cfg.impl, method=entry.method, options=entry.options)
            ids = [gen.encode(p.text, cfg.chat) if p.token_ids is None else list(p.token_ids)
                   for p in prompts]
            for batch in cfg.batch_sizes:
                seen = set()
                for chunk in chunks(prompts, batch):  # the runner's chunks, one per bucket
                    bucket = next_pow2(max(len(ids[i]) for i in chunk),
                                       generate_mod.MIN_PROMPT_BUCKET)
                    if bucket not in seen:
                        seen.add(bucket)
                        jobs.append((gen, entry.name, batch, bucket, [ids[i] for i in chunk]))
    sps = SamplingParams(temperature=cfg.temperature, seed=cfg.seed,
                         max_new_tokens=cfg.max_new_tokens, ignore_eos=cfg.ignore_eos)

    def warm(job):
        gen, name, batch, bucket, inputs = job
        t = time.perf_counter()
        gen.generate(inputs, [sps] * len(inputs))
        return f"{name} b={batch} bucket={bucket}: {time.perf_counter() - t:.1f}s"

    with ThreadPoolExecutor(args.workers) as pool:
        for line in pool.map(warm, jobs):
            print(line, flush=True)
    print(f"{len(jobs)} executables warmed in {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
