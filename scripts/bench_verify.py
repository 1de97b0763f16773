"""What a verify step of T tokens costs, general path vs the fused verify step, in units of one
fused decode step measured in the same run.

Why: at batch 1 on the H200 the fused one-token decode step (`fused_decode_step`) made plain
decoding ~2.3x faster, and every speculative method, which verifies T tokens per step through
the general path, now loses to it. A method wins only if its mean accepted tokens per step
exceeds the cost of its verify step in decode steps, so that ratio (`x_decode` below) is the
number this measures, for the general path ("pallas-general") and for `fused_verify_step`
("pallas-fused", JDECODE_FUSED_DECODE=1).

For each batch B it times, on random weights of a model's shape (the time of a step does not
depend on the weights' values) in the inference layout with the [N, K] copies, over a
per-layer cache of --max-len slots holding --context past tokens:
  decode  `phases.decode_step`, impl="pallas", the switch unset ("pallas-auto": the fused step
          where it is on by default), the baseline; also the general one-token step.
  verify  `phases.verify` of T tokens per row at positions context..context+T-1, under
          "pallas-auto" (the path a method gets by default), "pallas-general" and
          "pallas-fused", and for steps of FMA_MAX_ROWS+1..N rows also "pallas-fused-fmaN"
          (--fma-rows): the fused step with its GEMVs kept on CUDA cores, which by default
          stop at `kernel.FMA_MAX_ROWS` rows (5) and give way to tensor-core tiles.
Each row records the gate's verdict (`fused_decode_reason`: None = fused), the path its trace
really took (a `qkv_rope` kernel in its jaxpr = fused), the max abs difference of its logits
from the general path's on the same inputs (recorded, not asserted: bf16 sums in another
order), the median wall time per step and, on the GPU, the device time per step (all its
kernels summed, from a profile; gaps between kernels excluded), each also as a multiple of
the baseline decode step's.

Timing: each step is jitted with the cache donated and called --iters times in a Python loop,
its cache fed back (positions fixed: each step rewrites the same slots), with
`block_until_ready` only around the loop; wall time per step is the loop's over --iters,
median over --repeats, after a warm-up loop. It includes host dispatch where a step is shorter
than its dispatch, as a decoding loop of separate steps would pay it.

GPU: PYTHONPATH=. python3 scripts/bench_verify.py --out $OUT
CPU smoke (Pallas in interpret mode: slow, the times mean nothing):
  python scripts/bench_verify.py --model configs/models/tiny.yaml --head-dim 32 --tokens 2,4 \
      --max-len 128 --context 20 --iters 2 --repeats 1 --out out/bench_verify_smoke
Writes bench_verify.json and bench_verify.md under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.analysis.profile import device_busy_us
from jdecode.cache.dense import DenseKVCache, init_cache
from jdecode.config import ModelConfig, load_model_config_yaml
from jdecode.decoding import phases
from jdecode.model.fused_decode import (
    ENV_SWITCH,
    fused_decode_reason,
    impl_variant,
    with_decode_copies,
)
from jdecode.model.layout import inference_layout
from jdecode.model.params import Params, init_params
from jdecode.provenance import REPO_ROOT, environment
from pallas_kernels.fused_decode import kernel as gemv_kernel

# The baseline: impl="pallas" with the switch unset, as the Generator decodes by default.
AUTO = "pallas-auto"
GENERAL, FUSED = "pallas-general", "pallas-fused"
# A pallas_call of this name is the fused path's first kernel of every layer; the general
# path has none (its GEMVs are `pallas_linear`, its attention the paged kernel).
FUSED_KERNEL = "qkv_rope"


@contextlib.contextmanager
def variant(name: str) -> Iterator[str]:
    """The impl to trace under for a variant name: AUTO unsets the switch while it holds (a
    JDECODE_FUSED_DECODE in the caller's environment would otherwise make the baseline
    something else); FUSED + "-fmaN" is FUSED with the CUDA-core GEMVs allowed up to N rows
    (`kernel.FMA_MAX_ROWS`, 5 by default, set while the trace is made: `default_tiles` reads
    it then); the others are `impl_variant`'s."""
    if name.startswith(FUSED + "-fma"):
        limit, before = int(name.removeprefix(FUSED + "-fma")), gemv_kernel.FMA_MAX_ROWS
        gemv_kernel.FMA_MAX_ROWS = limit
        try:
            with impl_variant(FUSED) as impl:
                yield impl
        finally:
            gemv_kernel.FMA_MAX_ROWS = before
        return
    if name != AUTO:
        with impl_variant(name) as impl:
            yield impl
        return
    before = os.environ.pop(ENV_SWITCH, None)
    try:
        yield "pallas"
    finally:
        if before is not None:
            os.environ[ENV_SWITCH] = before


def model_config(name: str, dtype: str, head_dim: int | None) -> ModelConfig:
    """A model's shape: a YAML path, or a name in configs/models/ (random weights either way;
    a name of a checkpoint, e.g. smollm2-135m, means its config of the same name)."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = REPO_ROOT / "configs" / "models" / f"{name}.yaml"
    cfg = load_model_config_yaml(path).replace(dtype=dtype)
    # The fused kernels need head_dim >= 32; tests make the tiny model fusable this way.
    return cfg if head_dim is None else cfg.replace(head_dim=head_dim)


def random_cache(cfg: ModelConfig, batch: int, max_len: int, key: jax.Array) -> DenseKVCache:
    """A per-layer cache of random K/V (not zeros: attention over zero keys and values would
    hide a wrong read of the past from the logits check). L x [B, S, K, D] each."""
    empty = init_cache(cfg, batch, max_len, per_layer=True)
    leaves, treedef = jax.tree_util.tree_flatten(empty)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, a.shape, jnp.float32).astype(a.dtype)
                  for k, a in zip(keys, leaves, strict=True)])


def step_fn(cfg: ModelConfig, impl: str, tokens: int) -> Callable:
    """fn(params, cache, toks [B, T], pos [B, T]) -> (logits, hidden, cache), jitted with the
    cache donated: `decode_step` on column 0 when tokens == 1, else `verify`. A new jit per
    call, so each variant keeps its own trace (the switch is read while tracing)."""
    if tokens == 1:
        def fn(params, cache, toks, pos):
            return phases.decode_step(params, cache, toks[:, 0], pos[:, 0], cfg=cfg, impl=impl)
    else:
        fn = partial(phases.verify, cfg=cfg, impl=impl)
    return jax.jit(fn, donate_argnums=(1,))


def sub_jaxprs(eqn) -> Iterator:
    """The jaxprs nested in an equation's params (a ClosedJaxpr's or a bare Jaxpr)."""
    for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(sub, "jaxpr", sub)
            if hasattr(inner, "eqns"):
                yield inner


def has_dot(jaxpr) -> bool:
    """Whether a jaxpr (a kernel body) multiplies with dot_general anywhere, loops included."""
    return any(e.primitive.name == "dot_general" or any(map(has_dot, sub_jaxprs(e)))
               for e in jaxpr.eqns)


def pallas_kernels(jaxpr) -> dict[str, bool]:
    """The pallas_calls in a jaxpr and its sub-jaxprs: name -> whether its body uses
    tensor-core dots (False: the CUDA-core GEMVs). jax 0.10 keeps the name in `name`, others
    in `name_and_src_info`."""
    found = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            info = eqn.params.get("name_and_src_info")
            name = eqn.params.get("name") or getattr(info, "name", None)
            if name:
                found[str(name)] = has_dot(eqn.params["jaxpr"])
            continue
        for inner in sub_jaxprs(eqn):
            found |= pallas_kernels(inner)
    return found


def time_steps(step: Callable, params: Params, cache: DenseKVCache, toks: jax.Array,
               pos: jax.Array, iters: int, repeats: int, device_time: bool) -> dict:
    """Wall (and device) microseconds per step, and the first step's logits.

    `cache` is donated by the first call; the returned cache of each step feeds the next.
    """
    logits, _, cache = step(params, cache, toks, pos)  # compiles; the logits check's sample
    first = np.asarray(jax.device_get(logits), np.float32)  # [B, (T,) V]

    def loop(cache):
        for _ in range(iters):
            _, _, cache = step(params, cache, toks, pos)
        return cache

    cache = jax.block_until_ready(loop(cache))  # warm-up
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        cache = jax.block_until_ready(loop(cache))
        walls.append((time.perf_counter() - t0) / iters)
    busy = None
    if device_time:
        state = [cache]

        def one():
            state[0] = step(params, state[0], toks, pos)[2]
            return state[0]
        try:
            busy = device_busy_us(one, iters)  # all kernels of a step, summed
        except ImportError:  # a jax without jax.profiler.ProfileData
            busy = None
    return {"wall_us": statistics.median(walls) * 1e6, "device_us": busy, "logits": first}


def measure(params: Params, cache0: DenseKVCache, cfg: ModelConfig, batch: int, tokens: int,
            context: int, name: str, args: argparse.Namespace) -> dict:
    """One row: the step of `tokens` tokens per row under variant `name`."""
    toks = jax.random.randint(jax.random.key(tokens), (batch, tokens), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(context + jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))
    cache = jax.tree_util.tree_map(jnp.copy, cache0)  # donated below; cache0 stays
    # The fused GEMVs are jitted with their tiles chosen inside (`default_tiles`): their
    # traces are cached by shape, so a variant that changes FMA_MAX_ROWS must not meet
    # another's. Clearing before and after every variant keeps each one its own.
    jax.clear_caches()
    with variant(name) as impl:
        reason = fused_decode_reason(params, cache, cfg, rows=batch * tokens, tokens=tokens)
        step = step_fn(cfg, impl, tokens)
        kernels = pallas_kernels(step.trace(params, cache, toks, pos).jaxpr)
        # The first call traces again (or reuses that trace) inside the context: it must.
        res = time_steps(step, params, cache, toks, pos, args.iters, args.repeats,
                         args.device_time)
    jax.clear_caches()
    # "unknown": no named pallas_call found (a jax that keeps the name elsewhere).
    path = "fused" if FUSED_KERNEL in kernels else ("general" if kernels else "unknown")
    gemv = None if FUSED_KERNEL not in kernels else (
        "tensor cores" if kernels[FUSED_KERNEL] else "CUDA cores")
    if (reason is None) != (path == "fused"):
        print(f"WARNING: B={batch} T={tokens} {name}: the gate says "
              f"{reason or 'fused'} but the trace ran {path}", flush=True)
    return {"batch": batch, "step": "decode" if tokens == 1 else "verify", "tokens": tokens,
            "variant": name, "reason": reason, "path": path, "gemv": gemv, **res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m",
                    help="a name in configs/models/ or a YAML path (random weights)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--head-dim", type=int, default=None,
                    help="override the config's head_dim (the tiny model needs 32 to fuse)")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--tokens", default="2,3,4,5,8,16,32,64",
                    help="tokens per row of the verify step (batch x tokens <= 64)")
    ap.add_argument("--max-len", type=int, default=1024, help="cache slots (a multiple of 64)")
    ap.add_argument("--context", type=int, default=600, help="past tokens in the cache")
    ap.add_argument("--iters", type=int, default=20, help="steps per timed loop")
    ap.add_argument("--repeats", type=int, default=5, help="timed loops (median)")
    ap.add_argument("--device-time", choices=("auto", "on", "off"), default="auto",
                    help="device time per step from a profile (auto: on the GPU only)")
    ap.add_argument("--fma-rows", default="8",
                    help="also time the fused step with the CUDA-core GEMVs allowed up to N "
                         "rows (a comma list; by default they stop at kernel.FMA_MAX_ROWS)")
    ap.add_argument("--out", default="out")
    args = ap.parse_args()
    args.fma_rows = [int(n) for n in args.fma_rows.split(",") if n]
    args.device_time = (args.device_time == "on" or
                        (args.device_time == "auto" and jax.default_backend() == "gpu"))

    cfg = model_config(args.model, args.dtype, args.head_dim)
    params = with_decode_copies(inference_layout(init_params(cfg, jax.random.key(0))))
    rows, notes = [], []
    for batch in map(int, args.batch.split(",")):
        cache0 = random_cache(cfg, batch, args.max_len, jax.random.key(batch))
        base = None
        for tokens in [1, *map(int, args.tokens.split(","))]:
            if batch * tokens > 64:
                notes.append(f"batch {batch} x {tokens} tokens: skipped, over the fused "
                             "kernels' 64 rows")
                continue
            if args.context + tokens > args.max_len:
                notes.append(f"batch {batch} x {tokens} tokens: skipped, context "
                             f"{args.context} + tokens > --max-len {args.max_len}")
                continue
            fma = [f"{FUSED}-fma{n}" for n in args.fma_rows
                   if n >= batch * tokens > gemv_kernel.FMA_MAX_ROWS]
            # AUTO at T > 1: the path a method gets by default (fused or general by its gate).
            names = (AUTO, GENERAL) if tokens == 1 else (AUTO, GENERAL, FUSED, *fma)
            group = [measure(params, cache0, cfg, batch, tokens, args.context, n, args)
                     for n in names]
            want = next(r["logits"] for r in group if r["variant"] == GENERAL)
            for r in group:
                r["max_abs_diff"] = float(np.max(np.abs(r.pop("logits") - want)))
                r["max_abs_logit"] = float(np.max(np.abs(want)))
                if r["variant"] == AUTO and tokens == 1:
                    base = r
                r["x_decode_wall"] = r["wall_us"] / base["wall_us"]
                r["x_decode_device"] = (None if r["device_us"] is None
                                        or base["device_us"] is None
                                        else r["device_us"] / base["device_us"])
                rows.append(r)
                print(json.dumps(r), flush=True)

    env = environment()
    result = {**env, "command": "python " + " ".join(sys.argv), "model": args.model,
              "weights": "random", "dtype": cfg.dtype, "head_dim": cfg.head_dim,
              "max_len": args.max_len, "context": args.context, "iters": args.iters,
              "repeats": args.repeats, "device_time": args.device_time, "notes": notes,
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_verify.json").write_text(json.dumps(result, indent=2))
    (out / "bench_verify.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    """The rows as a table, with where and how they were measured."""
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    timing = ("wall and device time (device: all kernels of a step summed, from a profile)"
              if result["device_time"] else "wall time only (no device time: "
              f"{result['backend']} backend or --device-time off)")
    title = (f"# Verify step vs decode step: {result['model']} (random weights, "
             f"{result['dtype']})")
    where = (f"{result['date']} | {result['device']} | jax {result['jax_version']} | git "
             f"{result['git_sha']} | `{result['command']}`")
    how = (f"Cache {result['max_len']} slots, {result['context']} past tokens; median over "
           f"{result['repeats']} loops of {result['iters']} steps; {timing}. x decode = the "
           "step's time / the baseline decode step's (decode, pallas-auto) of that batch: a "
           "method whose verify step costs x wins only if it accepts more than x tokens per "
           "step. path: what the trace ran (fused = the fused kernels, their GEMVs on tensor or "
           "CUDA cores); reason: "
           "`fused_decode_reason` (none = fused). max abs diff: logits vs pallas-general's.")
    header = ("| B | step | T | variant | path | wall us | x decode | device us | "
              "x decode (dev) | max abs diff | max abs logit | reason |")
    lines = [title, "", where, "", how, "", header,
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['batch']} | {r['step']} | {r['tokens']} | {r['variant']} | {r['path']}"
            f"{' (' + r['gemv'] + ')' if r['gemv'] else ''} | "
            f"{r['wall_us']:.1f} | {r['x_decode_wall']:.2f} | {num(r['device_us'], '.1f')} | "
            f"{num(r['x_decode_device'], '.2f')} | {r['max_abs_diff']:.3g} | "
            f"{r['max_abs_logit']:.3g} | {r['reason'] or 'none'} |")
    lines += [""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
