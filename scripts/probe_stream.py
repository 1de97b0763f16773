"""Where a streamed generation's time goes per chunk: the Generator's wall time at several
chunk sizes (fixed, and growing to `STREAM_INTERVAL_S` as `jdecode generate` streams), and
the parts of one chunk timed alone: the loop executable's call with no steps to run (its
dispatch, the while loop's entry and predicate read), the same with 8 steps, the transfer of
the state the host reads, and the put of a scalar.

Why: on an H100 the Generator read ~1130 tok/s streaming every 8 steps against ~1850 in one
dispatch (SmolLM2 shape, batch 1; benchmarks/fused_decode_h200.md, stop 49): ~2.6 ms per chunk
that neither the step nor the tokens explain.

GPU (random weights of a shape; about a minute):
  PYTHONPATH=. python3 scripts/probe_stream.py --model smollm2-135m --out $OUT
Writes probe_stream.json under --out and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import parse_loop_variant

from jdecode.analysis.measure import time_fn
from jdecode.config import load_model_config_yaml
from jdecode.decoding.generate import STREAM_INTERVAL_S, Generator
from jdecode.decoding.sampling import SamplingParams
from jdecode.io.registry import Model
from jdecode.model.fused_decode import impl_variant
from jdecode.model.layout import fuse_projections, unstack_layers
from jdecode.model.params import init_params
from jdecode.provenance import git_sha


def median_ms(fn, n: int) -> float:
    """`time_fn`'s median in ms, without its warm-up calls (each caller warms up its own)."""
    return 1e3 * time_fn(fn, repeats=n, warmup=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a configs/models YAML name")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--impl", default="auto")
    ap.add_argument("--loops", default="greedy4")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--chunks", default="0,8,16,32,64", help="0: one dispatch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="out")
    args = ap.parse_args()

    path = args.model if args.model.endswith(".yaml") else f"configs/models/{args.model}.yaml"
    cfg = load_model_config_yaml(path).replace(dtype=args.dtype)
    params = unstack_layers(fuse_projections(init_params(cfg, jax.random.key(0))))
    model = Model(Path(path).stem, cfg, params, None)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (1, args.prompt_len)).tolist()
    sp = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    res: dict = dict(model=args.model, dtype=args.dtype, impl=args.impl,
                     new_tokens=args.new_tokens, prompt_len=args.prompt_len,
                     device=jax.devices()[0].device_kind, jax_version=jax.__version__,
                     git_sha=git_sha(), command=" ".join(["python3", *sys.argv]))
    with impl_variant(args.impl) as run_impl:
        gen = Generator(model, impl=run_impl, layout="stacked", **parse_loop_variant(args.loops))
        gen.generate(prompts, sp)  # compiles
    res["param_leaves"] = len(jax.tree.leaves(gen.params))

    # The Generator end to end (prefill included), as a user's stream sees it.
    # Fixed chunks (stream_interval_s 0) and chunks growing to STREAM_INTERVAL_S (the default).
    wall = {}
    for c in map(int, args.chunks.split(",")):
        for mode, interval in (("fixed", 0.0), ("growing", STREAM_INTERVAL_S)):
            if c == 0 and mode == "growing":
                continue

            def whole(c=c, interval=interval):
                for _ in gen.stream(prompts, sp, chunk_steps=c or 1 << 30,
                                    stream_interval_s=interval):
                    pass
            whole()
            wall[f"{c or 'all'} {mode}"] = median_ms(whole, args.repeats)
    res["stream_wall_ms"] = wall

    # One chunk's parts, on the executables the Generator compiled.
    (exe,) = gen._compiled.values()
    state: dict = {}

    def fresh():
        state["ls"] = jax.block_until_ready(exe.init(*state["args"]))

    # init's arguments as `stream` builds them: captured from a stream's first chunk.
    captured = {}
    orig_init = exe.init

    def capture(*a):
        captured["args"] = a
        return orig_init(*a)

    gen._compiled[next(iter(gen._compiled))] = dataclasses.replace(exe, init=capture)
    next(iter(gen.stream(prompts, sp, chunk_steps=8)))
    gen._compiled[next(iter(gen._compiled))] = exe
    state["args"] = captured["args"]

    # A fresh limit scalar per call, as `stream` passed before it cached them (7585704): the
    # loop_* figures include its put (scalar_put_ms).
    def loop_call(limit: int, wait: bool):
        def f():
            t = time.perf_counter()
            state["ls"] = exe.loop(gen.params, state["ls"], jnp.int32(limit))
            state["ret"].append(time.perf_counter() - t)
            if wait:
                state["ls"].counts.block_until_ready()
        return f

    parts = {}
    for limit in (0, 8):
        fresh()
        state["ret"] = []
        calls = max(1, min(20, args.new_tokens // max(limit, 1) - 1))
        parts[f"loop_{limit}_total_ms"] = median_ms(loop_call(limit, True), calls)
        parts[f"loop_{limit}_return_ms"] = 1e3 * statistics.median(state["ret"])
    fresh()
    ls = state["ls"]
    parts["state_get_ms"] = median_ms(
        lambda: jax.device_get((ls.out, ls.n_out, ls.done, ls.counts)), 20)
    parts["scalar_put_ms"] = median_ms(lambda: jnp.int32(8).block_until_ready(), 20)
    res["parts"] = parts

    # The loop call's fixed cost, piece by piece: a jit over the same parameter leaves that
    # reads one element of each, the same over one leaf, the loop state passed through with
    # donation (the cache's buffers), and a while loop that runs no iteration.
    leaves = jax.tree.leaves(gen.params)
    one_each = jax.jit(lambda ps: sum(jnp.ravel(x)[0].astype(jnp.float32) for x in ps))
    first = jax.jit(lambda ps: jnp.ravel(ps[0])[0].astype(jnp.float32))
    one_leaf = [leaves[0]]
    passthrough = jax.jit(lambda ls: jax.tree.map(lambda x: x, ls), donate_argnums=0)
    no_iteration = jax.jit(lambda x, n: jax.lax.while_loop(lambda c: c[1] < n, lambda c: (
        c[0] + 1, c[1] + 1), (x, jnp.int32(0)))[0])
    zero, x0 = jnp.int32(0), jnp.zeros((), jnp.float32)
    for f, a in ((one_each, (leaves,)), (first, (one_leaf,)), (no_iteration, (x0, zero))):
        jax.block_until_ready(f(*a))
    dispatch = {
        f"jit_reading_{len(leaves)}_leaves_ms": median_ms(
            lambda: one_each(leaves).block_until_ready(), 50),
        "jit_reading_1_leaf_ms": median_ms(lambda: first(one_leaf).block_until_ready(), 50),
        "while_loop_no_iteration_ms": median_ms(
            lambda: no_iteration(x0, zero).block_until_ready(), 50),
    }
    fresh()
    state["ls"] = jax.block_until_ready(passthrough(state["ls"]))

    def donate():
        state["ls"] = passthrough(state["ls"])
        jax.block_until_ready(state["ls"])
    dispatch[f"jit_donating_loop_state_{len(jax.tree.leaves(state['ls']))}_leaves_ms"] = \
        median_ms(donate, 50)
    res["dispatch"] = dispatch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_stream.json").write_text(json.dumps(res, indent=1))
    print(f"{res['device']} | jax {res['jax_version']} | git {res['git_sha']} | "
          f"{res['param_leaves']} parameter leaves | `{res['command']}`")
    print("| first chunk, chunks | stream wall ms | tok/s (prefill included) |\n|---|---|---|")
    for c, ms in wall.items():
        print(f"| {c} | {ms:.2f} | {args.new_tokens / ms * 1e3:.1f} |")
    print("| part | ms |\n|---|---|")
    for k, v in {**parts, **dispatch}.items():
        print(f"| {k} | {v:.3f} |")


if __name__ == "__main__":
    main()
