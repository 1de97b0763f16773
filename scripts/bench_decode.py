"""Decode throughput of jdecode's jitted generation loop against the HBM ceiling of this run.

GPU (random weights of a real shape; a config path takes a model's shape where its name
would load its real weights):
  PYTHONPATH=. python3 scripts/bench_decode.py --model llama-3.2-1b --batch 1,64 --out $OUT
  PYTHONPATH=. python3 scripts/bench_decode.py --model configs/models/smollm2-135m.yaml ...
CPU (the real default model, against HF transformers in the same run):
  python scripts/bench_decode.py --model smollm2-135m --batch 1 --new-tokens 64 --hf --out out/
Writes bench_decode.json and bench_decode.md under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import statistics
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.analysis.measure import measure_ceilings
from jdecode.analysis.profile import device_span_us
from jdecode.config import load_model_config_yaml
from jdecode.decoding import phases
from jdecode.decoding.generate import Generator, compile_loop
from jdecode.decoding.sampling import SamplingParams
from jdecode.io.registry import KNOWN_MODELS, Model, load
from jdecode.model.fused_decode import impl_variant
from jdecode.model.layout import fuse_projections, unstack_layers
from jdecode.model.params import init_params, param_bytes
from jdecode.provenance import git_sha, switches


def kv_bytes_per_step(cfg, batch: int, context: float, itemsize: int) -> float:
    """K and V bytes a decode step must read: every layer, every live cached token."""
    return 2 * cfg.num_layers * batch * context * cfg.num_kv_heads * cfg.head_dim * itemsize


def bare_loop(model: Model, batch: int, prompt_len: int, new: int, impl: str) -> dict:
    """Anchor: decode_step in a bare fori_loop (greedy argmax, no stop checks or bookkeeping).

    Returns {"tok_s": by wall clock, "step_us": device us per step (the loop's first kernel's
    start to its last one's end over `new` steps, gaps included; None off the GPU)}. Why the
    second: one dispatch runs all steps, so it carries no host time, and it resolves 1-2%
    between kernel variants where wall tok/s of the Generator spread by ~5% between runs
    (benchmarks/fused_decode_h200.md)."""
    cfg = model.cfg
    # The params as the Generator holds them (the fused step's [N, K] copies where it adds
    # them), and its impl ("auto" resolved: the steps take a concrete one): the bare loop
    # times the step the Generator runs, not the general path.
    gen = Generator(model, impl=impl, layout="stacked")
    params, impl = gen.params, gen.impl
    max_len = -(-(prompt_len + new + 1) // 256) * 256
    cache = phases.decode_cache(params, cfg, batch, max_len, impl)  # the Generator's layout
    prompt = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, cfg.vocab_size)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    logits, _, cache = jax.jit(partial(phases.prefill, cfg=cfg, impl=impl))(
        params, cache, prompt, lengths)

    def run(params, cache, tok):
        def body(i, carry):
            cache, tok = carry
            lg, _, cache = phases.decode_step(params, cache, tok, lengths + i, cfg=cfg,
                                              impl=impl)
            return cache, jnp.argmax(lg, -1).astype(jnp.int32)
        return jax.lax.fori_loop(0, new, body, (cache, tok))

    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    # Compiled with the XLA options the Generator's loop takes at this batch (cuBLAS GEMMs
    # from 64 rows, `compile_loop`).
    loop = compile_loop(jax.jit(run, donate_argnums=(1,)), batch, params, cache, tok)
    cache, out = loop(params, cache, tok)  # warm up
    jax.block_until_ready(out)
    times = []
    for _ in range(3):
        cache = phases.decode_cache(params, cfg, batch, max_len, impl)
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        cache, out = loop(params, cache, tok)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    state = [cache]  # re-run on the donated cache: each run rewrites the same slots

    def again():
        state[0], out = loop(params, state[0], tok)
        return out
    span = device_span_us(again, repeats=3)
    return {"tok_s": batch * new / statistics.median(times),
            "step_us": None if span is None else span / new}


def parse_loop_variant(name: str) -> dict:
    """"greedyN" = all-greedy specialization + groups of N steps; "dynN" = the general
    sampler (a `lax.cond` per step) + groups of N (N=1: the plain checked while_loop)."""
    for prefix, greedy in (("greedy", True), ("dyn", False)):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return {"specialize_greedy": greedy, "loop_block": int(name[len(prefix):])}
    raise SystemExit(f"--loops {name!r}: use greedyN or dynN, e.g. greedy4,dyn1")


def ours_tok_s(model: Model, batch: int, prompt_len: int, new: int, impl: str,
               loop: str = "greedy4", chunk_steps: int | None = None) -> dict:
    with impl_variant(impl) as run_impl:  # the variant holds while the generator traces
        gen = Generator(model, impl=run_impl, layout="stacked",  # keep the layout chosen here
                        **parse_loop_variant(loop))
        return _time_generator(gen, model, batch, prompt_len, new, chunk_steps)


def _time_generator(gen: Generator, model: Model, batch: int, prompt_len: int, new: int,
                    chunk_steps: int | None = None) -> dict:
    """chunk_steps: decode in chunks as streaming does, the first of that many steps (`jdecode
    generate`: 8); None: one dispatch for the whole decode."""
    rng = np.random.default_rng(0)
    sp = SamplingParams(max_new_tokens=new, ignore_eos=True)
    runs = []
    for i in range(4):  # the first run compiles; report the median of the rest
        prompts = rng.integers(0, model.cfg.vocab_size, (batch, prompt_len)).tolist()
        res = gen.generate(prompts, sp, chunk_steps=chunk_steps)
        assert all(len(r.token_ids) == new for r in res), "a row stopped early"
        if i:
            runs.append(res[0].stats)
    return {"decode_tok_s": statistics.median(s["decode_tok_s"] for s in runs),
            "prefill_ms": statistics.median(s["prefill_ms"] for s in runs),
            "compile_s": runs[0]["compile_s"]}


def hf_tok_s(model_name: str, prompt_len: int, new: int) -> float:
    """HF transformers eager `generate` on CPU torch, greedy, same prompt length."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    package, filename, _ = KNOWN_MODELS[model_name]
    folder = next(iter(importlib.util.find_spec(package).submodule_search_locations))
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename,
                                              dtype=torch.float32).eval()
    ids = torch.randint(0, hf.config.vocab_size, (1, prompt_len))
    kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False}
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=4, do_sample=False)
        t0 = time.perf_counter()
        hf.generate(ids, **kw)
        t_total = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, do_sample=False)
        t_prefill = time.perf_counter() - t0
    return (new - 1) / max(t_total - t_prefill, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--impl", default="xla")
    ap.add_argument("--hf", action="store_true", help="also time HF transformers (CPU)")
    ap.add_argument("--bare", action="store_true", help="also time the bare fori_loop anchor")
    ap.add_argument("--loops", default="greedy4",
                    help="comma-separated loop variants: greedyN (all-greedy executable, groups "
                    "of N fixed steps) or dynN (general sampler); the Generator default is "
                    "greedy4")
    ap.add_argument("--layers", default="stacked",
                    help="comma-separated layouts: stacked (lax.scan), unstacked (unrolled), "
                    "fused-stacked, fused-unstacked (Q/K/V and gate/up concatenated)")
    ap.add_argument("--chunk-steps", type=int, default=0,
                    help="the Generator decodes in chunks as streaming does, the first of "
                    "this many steps (`jdecode generate`: 8); 0: one dispatch")
    ap.add_argument("--out", default="out")
    args = ap.parse_args()

    if args.model in KNOWN_MODELS:
        model = load(args.model, dtype=args.dtype or "float32")
        weights = "real"
    else:
        path = args.model if args.model.endswith(".yaml") else f"configs/models/{args.model}.yaml"
        cfg = load_model_config_yaml(path)
        cfg = cfg.replace(dtype=args.dtype or cfg.dtype)
        model = Model(Path(path).stem, cfg, init_params(cfg, jax.random.key(0)), None)
        weights = "random"
    cfg = model.cfg
    itemsize = jnp.dtype(cfg.dtype).itemsize
    hw = measure_ceilings("bfloat16")  # the one ceiling every benchmark uses
    read_bw = hw.measured["read_bytes_per_s"]
    rows = []
    stacked = model
    for layout, impl, loop in itertools.product(args.layers.split(","), args.impl.split(","),
                                                args.loops.split(",")):
        params = stacked.params
        if "fused" in layout:
            params = fuse_projections(params)
        if "unstacked" in layout:
            params = unstack_layers(params)
        model = dataclasses.replace(stacked, params=params)
        for batch in map(int, args.batch.split(",")):
            ours = ours_tok_s(model, batch, args.prompt_len, args.new_tokens, impl, loop,
                              args.chunk_steps or None)
            # Mean live context over the decode: prompt + half the new tokens.
            ctx = args.prompt_len + args.new_tokens / 2
            step_bytes = param_bytes(cfg) + kv_bytes_per_step(cfg, batch, ctx, itemsize)
            ceiling = batch * read_bw / step_bytes
            row = dict(layers=layout, impl=impl, loop=loop, batch=batch, **ours,
                       ceiling_tok_s=ceiling, pct_of_ceiling=100 * ours["decode_tok_s"] / ceiling,
                       achieved_tb_s=ours["decode_tok_s"] / batch * step_bytes / 1e12)
            if args.bare and loop == args.loops.split(",")[0]:  # once per layout and impl
                with impl_variant(impl) as bare_impl:
                    bare = bare_loop(model, batch, args.prompt_len, args.new_tokens, bare_impl)
                row["bare_loop_tok_s"], row["bare_loop_device_step_us"] = (
                    bare["tok_s"], bare["step_us"])
            if args.hf and batch == 1:
                row["hf_transformers_tok_s"] = hf_tok_s(args.model, args.prompt_len,
                                                        args.new_tokens)
            rows.append(row)
            print(json.dumps(row), flush=True)
    sha = git_sha()  # JDECODE_GIT_SHA when the device copy's .git is stale
    flags = " ".join([f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                      if not isinstance(v, bool)] + [f"--{k}" for k, v in vars(args).items()
                                                     if v is True])
    # The switches set (XLA_FLAGS, JDECODE_FUSED_DECODE) lead the command: it re-runs as run.
    command = " ".join(filter(None, (switches(), "python scripts/bench_decode.py", flags)))
    result = {
        "date": datetime.date.today().isoformat(), "device": hw.name,
        "jax_version": jax.__version__,
        "command": command,
        "git_sha": sha, "model": args.model, "weights": weights, "dtype": cfg.dtype,
        "param_bytes": param_bytes(cfg), "ceilings": hw.measured, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_decode.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Decode throughput: {args.model} ({weights} weights, {cfg.dtype})", "",
             f"{result['date']} | {hw.name} | jax {jax.__version__} | `{result['command']}`",
             "", (f"Ceiling = batch x read-stream bandwidth ({read_bw / 1e12:.2f} TB/s, measured "
             "in this run) / (weight bytes + live KV bytes per step)."), "",
             ("| layers | impl | loop | batch | tok/s | ceiling tok/s | % of ceiling | TB/s | "
              "prefill ms | bare loop tok/s | bare loop device us/step | HF tok/s |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['layers']} | {r['impl']} | {r['loop']} | {r['batch']} "
            f"| {r['decode_tok_s']:.1f} | {r['ceiling_tok_s']:.1f} "
            f"| {r['pct_of_ceiling']:.1f} | {r['achieved_tb_s']:.3f} | {r['prefill_ms']:.1f} | "
            f"{r.get('bare_loop_tok_s', float('nan')):.1f} | "
            f"{r.get('bare_loop_device_step_us') or float('nan'):.2f} | "
            f"{r.get('hf_transformers_tok_s', float('nan')):.1f} |")
    (out / "bench_decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
