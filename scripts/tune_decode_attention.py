"""Device time of a decode attention kernel that stores the step's K/V over its launch
parameters, at one decode step of a model's shape and batch: the Generator's dense-cache
`fused_decode.decode_attention` (--cache dense), or the engine's paged
`fused_decode.paged_decode_attention` (--cache paged).

Why: at batch 64 of the Llama-3.2-1B shape the general path's attention (the dense kernel,
since d05913b) took 27.2 us per layer for ~80 MB of K/V (2.9 TB/s, benchmarks/
fused_decode_h200.md); its launch (64-slot blocks, 4 warps, 2 stages) was never timed by device
time at that shape. The engine's paged kernel takes the paged decode kernel's launch
(`paged_config`: 128-token blocks), tuned at D128 and 4k+ contexts only; in the engine's
64-sequence probe of the 1B shape (D64, ~328 past tokens) it read its K/V at ~2 TB/s, 21.7 us
per layer inside the step (benchmarks/engine_decode_h200.md, stop 52), where the dense kernel,
timed alone, reads 640 past tokens at 3.4 TB/s (24.5 us). Compiled for sm_90a deviceless
(`pallas_kernels.deviceless`), a 128-token block takes 55 KB of shared memory, so 4 programs
fit an SM and the 512 programs (64 rows x 8 KV heads, one split) run as one full wave, each
streaming ~3 blocks: the per-program fixed work (q, RoPE, the new K/V's store, the block table)
is a large share at such contexts. 64-token blocks fit 7 an SM, 32-token blocks up to 12 (2
warps); more splits add programs and a merge. Which wins is what this times.

Each variant runs once per layer of the model, unrolled in one jit over distinct caches (so
K/V stream from HBM; the paged pool's pages of a row are scattered over its layer), is
checked against the kernel's reference first, and is timed under the profiler twice: the
kernel's median device time per launch, and all the layer's kernels per layer (the kernel and
the merge of its splits that the caller runs, `merged_output`), by which it is ranked. Why
both: on an H100 (stop 54, benchmarks/engine_decode_h200.md) 2 splits of 32-token blocks ran
the 1B shape's engine kernel 11% faster alone, and in the engine the merge's kernel took the
gain back. Splits follow the caller's rule (the Generator's `grid_splits(..., max_splits=16)`,
the engine's `decode_num_splits`) unless --splits names counts to try.

    device: PYTHONPATH=. python3 scripts/tune_decode_attention.py --out $OUT
            PYTHONPATH=. python3 scripts/tune_decode_attention.py --cache paged --context 328 \
              --max-len 2048 --block-k 16,32,64,128 --warps 2,4 --stages 2,3 --splits 1,2 \
              --out $OUT
Writes tune_decode_attention_<cache>_<model>_b<B>.json under --out and prints the variants,
best last. On CPU (interpret mode) nothing is timed; `--layers 1` and small sizes check the
script's plumbing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.analysis.profile import device_busy_us, kernel_device_us
from jdecode.config import DTYPES, load_model_config_yaml
from jdecode.provenance import environment
from pallas_kernels.fused_decode import decode_attention, paged_decode_attention
from pallas_kernels.fused_decode import reference as ref
from pallas_kernels.fused_decode.attention import (
    BLOCK_K,
    merged_output,
    rope_table,
    single_split_dtype,
)
from pallas_kernels.paged_attention.tuning import decode_num_splits, grid_splits, paged_config
from pallas_kernels.testing import assert_close

# The check before timing catches a launch that computes garbage, at bf16's tolerance in every
# dtype: on the card an f32 reference's dots run at XLA's default (TF32) precision, so f32's
# own 1e-5 would reject correct launches.
CHECK_TOLERANCE = "bfloat16"


def threaded(fn, state):
    """call() running jit(fn) on `state`, donated, and keeping its result for the next call.
    Why: the kernels write their caches in place, so with the caches donated and threaded
    through the calls no copy runs before a launch and leaves its cache in the L2."""
    run, box = jax.jit(fn, donate_argnums=0), [state]

    def call():
        box[0] = run(box[0])
        return box[0]
    return call


def dense_case(args, B, H, K, D, L, rnd):
    """(check(kw), step(kw) -> call, kernel name, splits(block_k)) for the dense cache."""
    qkvs = [rnd(B, (H + 2 * K) * D) for _ in range(L)]
    caches = [(rnd(B, args.max_len, K, D), rnd(B, args.max_len, K, D)) for _ in range(L)]
    pos = jnp.full((B,), args.context, jnp.int32)
    want = ref.decode_attention_reference(qkvs[0], *caches[0], pos, num_heads=H,
                                          num_kv_heads=K)[0]

    def check(kw):
        parts, lse, _, _ = jax.jit(lambda q, kc, vc: decode_attention(q, kc, vc, pos, **kw))(
            qkvs[0], *caches[0])
        assert_close(merged_output(parts, lse, jnp.float32), want, CHECK_TOLERANCE)

    def step(kw):
        def layers(state):
            cs, _ = state
            outs = [decode_attention(q, kc, vc, pos, **kw) for q, (kc, vc) in zip(qkvs, cs)]
            # The output as the caller forms it: with splits, a merge kernel the step pays too.
            return ([o[2:] for o in outs],
                    [merged_output(*o[:2], args.dtype) for o in outs])
        return threaded(layers, ([(jnp.copy(k), jnp.copy(v)) for k, v in caches],
                                 [jnp.zeros((B, H * D), args.dtype)] * L))

    def splits(block_k):  # the Generator's rule (model/pallas_dispatch.py), over its blocks
        return grid_splits(B * K, args.max_len // BLOCK_K, max_splits=16)
    return check, step, "decode_attention", splits


def paged_case(args, B, H, K, D, L, rnd):
    """The same for the engine's pool [L, P, page, K, D]: each row's W = max_len / page pages
    a random permutation of its layer's P = B * W, the new token at `context`, and an
    identity RoPE table (the engine's kernel rotates; cos 1, sin 0 leaves q and k as they are,
    so the unrotated reference holds)."""
    page = args.page
    W = args.max_len // page
    P = B * W
    rng = np.random.default_rng(1)
    tables = jnp.asarray(rng.permutation(P).reshape(B, W), jnp.int32)  # [B, W]
    ctx = args.context
    slots = tables[:, ctx // page] * page + ctx % page  # [B]: where the new K/V go
    lens = jnp.full((B,), ctx + 1, jnp.int32)  # keys after the step, the new one included
    qkvs = [rnd(B, (H + 2 * K) * D) for _ in range(L)]
    pools = (rnd(L, P, page, K, D), rnd(L, P, page, K, D))
    table = rope_table(jnp.ones((B, D // 2)), jnp.zeros((B, D // 2)))  # [B, 2, D]
    want = ref.paged_decode_attention_reference(qkvs[0], *pools, 0, lens, slots, tables,
                                                num_heads=H, num_kv_heads=K)[0]

    def check(kw):
        parts, lse, _, _ = jax.jit(lambda q, kp, vp: paged_decode_attention(
            q, kp, vp, 0, lens, slots, tables, table, **kw))(qkvs[0], *pools)
        assert_close(merged_output(parts, lse, jnp.float32), want, CHECK_TOLERANCE)

    def step(kw):
        def layers(state):
            (kp, vp), _ = state
            outs = []
            for layer, q in enumerate(qkvs):
                parts, lse, kp, vp = paged_decode_attention(q, kp, vp, layer, lens, slots,
                                                            tables, table, **kw)
                outs.append(merged_output(parts, lse, args.dtype))  # with splits, a merge too
            return (kp, vp), outs
        return threaded(layers, (tuple(jnp.copy(p) for p in pools),
                                 [jnp.zeros((B, H * D), args.dtype)] * L))

    cfg = paged_config(page, D, args.dtype)

    def splits(block_k):  # the engine's rule (cache/paged.py)
        return decode_num_splits(B, K, -(-W * page // block_k), cfg)
    return check, step, "paged_decode_attention", splits


CASES = {"dense": dense_case, "paged": paged_case}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="dense", choices=sorted(CASES))
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=640, help="past tokens per row")
    ap.add_argument("--max-len", type=int, default=1024, help="cache slots per row")
    ap.add_argument("--page", type=int, default=16, help="paged: tokens per page")
    ap.add_argument("--layers", type=int, default=0, help="calls per jit (default: the model's)")
    ap.add_argument("--block-k", default="64,128,256")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--prefetch", default="0",
                    help="0 (Triton pipelines by num_stages), 1 (the loop pipelined by hand: "
                         "the kernels' prefetch=True; stages are then 1) or 0,1")
    ap.add_argument("--splits", default="auto",
                    help="'auto' (the caller's rule) or split counts to try, e.g. 1,2")
    ap.add_argument("--repeats", type=int, default=5, help="profiled runs per variant")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                    help="of q and the K/V (SmolLM2's config says float32: what the engine runs)")
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)
    args.dtype = jnp.dtype(args.dtype)

    cfg = load_model_config_yaml(f"configs/models/{args.model}.yaml")
    B, H, K, D = args.batch, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    L = args.layers or cfg.num_layers
    if args.context >= args.max_len or (args.cache == "paged" and args.max_len % args.page):
        raise SystemExit(f"--context {args.context} must be below --max-len {args.max_len}, "
                         f"and with --cache paged --max-len a multiple of --page {args.page}")
    rng = np.random.default_rng(0)

    def rnd(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(args.dtype)

    prefetch = sorted({bool(int(x)) for x in args.prefetch.split(",")})
    check, step, kernel, rule = CASES[args.cache](args, B, H, K, D, L, rnd)
    kv_bytes = 2 * B * args.context * K * D * args.dtype.itemsize  # per layer, read
    rows = []
    launches = dict.fromkeys(  # with prefetch nothing is left for Triton to pipeline: stages 1
        (bk, warps, 1 if pf else stages, pf) for pf, bk, warps, stages in itertools.product(
            prefetch, *(map(int, a.split(",")) for a in (args.block_k, args.warps, args.stages))))
    for bk, warps, stages, pf in launches:
        for splits in ([rule(bk)] if args.splits == "auto"
                       else [int(s) for s in args.splits.split(",")]):
            kw = {"num_heads": H, "num_kv_heads": K, "num_splits": splits, "block_k": bk,
                  "num_warps": warps, "num_stages": stages,
                  "parts_dtype": single_split_dtype(splits, args.dtype)}
            if pf:
                kw["prefetch"] = True
            row = {"block_k": bk, "warps": warps, "stages": stages, "splits": splits,
                   "prefetch": pf}
            label = (f"block_k {bk} warps {warps} stages {stages} splits {splits}"
                     f"{' prefetch' if pf else ''}")
            try:
                check(kw)
                call = step(kw)
                jax.block_until_ready(call())
                us = kernel_device_us(call, (kernel,), args.repeats)
                busy = device_busy_us(call, args.repeats)
                del call
            except Exception as e:  # noqa: BLE001 - a launch Triton rejects: recorded, not fatal
                rows.append({**row, "error": str(e)[:300]})
                print(f"{label}: ERROR {str(e)[:150]}", flush=True)
                continue
            dev = us.get(kernel)
            # Per layer: the kernel alone, and every kernel of the layer's call (the kernel
            # and, with splits, the merge after it), which is what the step pays.
            row.update(device_us=dev, TBps=kv_bytes / dev / 1e6 if dev else None,
                       with_merge_us=busy / L if busy else None)
            rows.append(row)
            print(f"{label}: {dev} us device, {row['TBps']} TB/s; with the merge "
                  f"{row['with_merge_us']} us", flush=True)
    timed = [r for r in rows if r.get("with_merge_us")]
    best = min(timed, key=lambda r: r["with_merge_us"]) if timed else None
    print(f"best: {best}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**environment(), "command": " ".join(sys.argv), "cache": args.cache,
            "model": args.model, "dtype": args.dtype.name, "batch": B, "context": args.context,
            "max_len": args.max_len,
            "page": args.page if args.cache == "paged" else None, "layers": L,
            "kv_bytes_per_layer": kv_bytes}
    result = {**meta, "rows": rows, "best": best}
    suffix = "" if args.dtype == jnp.bfloat16 else f"_{args.dtype.name}"
    (out / f"tune_decode_attention_{args.cache}_{args.model}_b{B}{suffix}.json").write_text(
        json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
