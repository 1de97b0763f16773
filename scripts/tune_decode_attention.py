"""Device time of the dense-cache decode attention kernel (`fused_decode.decode_attention`) over
its launch parameters, at one decode step of a model's shape and batch.

Why: at batch 64 of the Llama-3.2-1B shape the general path's attention (this kernel, since
d05913b) took 27.2 us per layer for ~80 MB of K/V (2.9 TB/s, benchmarks/fused_decode_h200.md).
Its launch (64-slot blocks, 4 warps, 2 stages) was never timed by device time at that shape.

Each variant runs once per layer of the model, unrolled in one jit over distinct caches (so
K/V stream from HBM), is checked against `decode_attention_reference` first, and is ranked by
the kernel's median device time per launch under the profiler.

    device: PYTHONPATH=. python3 scripts/tune_decode_attention.py --out $OUT
Writes tune_decode_attention_<model>_b<B>.json under --out and prints the variants, best last.
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

from jdecode.analysis.profile import kernel_device_us
from jdecode.config import load_model_config_yaml
from jdecode.provenance import environment
from pallas_kernels.fused_decode import decode_attention
from pallas_kernels.fused_decode import reference as ref
from pallas_kernels.paged_attention.tuning import grid_splits
from pallas_kernels.testing import assert_close


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=640, help="past tokens per row")
    ap.add_argument("--max-len", type=int, default=1024, help="cache slots per row")
    ap.add_argument("--layers", type=int, default=0, help="calls per jit (default: the model's)")
    ap.add_argument("--block-k", default="64,128,256")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--out", default="out")
    args = ap.parse_args()

    cfg = load_model_config_yaml(f"configs/models/{args.model}.yaml")
    B, H, K, D = args.batch, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    L = args.layers or cfg.num_layers
    rng = np.random.default_rng(0)

    def rnd(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(jnp.bfloat16)

    qkvs = [rnd(B, (H + 2 * K) * D) for _ in range(L)]
    caches = [(rnd(B, args.max_len, K, D), rnd(B, args.max_len, K, D)) for _ in range(L)]
    pos = jnp.full((B,), args.context, jnp.int32)
    splits = grid_splits(B * K, args.max_len // 64, max_splits=16)  # the model's rule
    want = ref.decode_attention_reference(qkvs[0], *caches[0], pos, num_heads=H,
                                          num_kv_heads=K)[0]
    kv_bytes = 2 * B * args.context * K * D * 2  # per layer, read
    rows = []
    for bk, warps, stages in itertools.product(
            *(map(int, a.split(",")) for a in (args.block_k, args.warps, args.stages))):
        kw = {"num_heads": H, "num_kv_heads": K, "num_splits": splits, "block_k": bk,
                  "num_warps": warps, "num_stages": stages}
        label = f"block_k {bk} warps {warps} stages {stages}"
        try:
            parts, lse, _, _ = jax.jit(lambda q, kc, vc, kw=kw: decode_attention(
                q, kc, vc, pos, **kw))(qkvs[0], *caches[0])
            assert_close(ref.merge_splits(parts, lse), want, "bfloat16")
            # Caches donated and threaded through the calls (the kernel writes them in
            # place), so no copy runs before a launch and leaves its cache in the L2.
            step = jax.jit(lambda cs, kw=kw: [decode_attention(q, kc, vc, pos, **kw)[2:]
                                              for q, (kc, vc) in zip(qkvs, cs)],
                           donate_argnums=0)
            state = [[(jnp.copy(k), jnp.copy(v)) for k, v in caches]]

            def call(step=step, state=state):
                state[0] = step(state[0])
                return state[0]

            jax.block_until_ready(call())
            us = kernel_device_us(call, ("decode_attention",), 5)
            del state[0]
        except Exception as e:  # noqa: BLE001 - a launch Triton rejects: recorded, not fatal
            rows.append({"block_k": bk, "warps": warps, "stages": stages, "error": str(e)[:300]})
            print(f"{label}: ERROR {str(e)[:150]}", flush=True)
            continue
        dev = us.get("decode_attention")
        row = {"block_k": bk, "warps": warps, "stages": stages, "device_us": dev,
               "TBps": kv_bytes / dev / 1e6 if dev else None}
        rows.append(row)
        print(f"{label}: {dev} us device, {row['TBps']} TB/s", flush=True)
    timed = [r for r in rows if r.get("device_us")]
    best = min(timed, key=lambda r: r["device_us"]) if timed else None
    print(f"best: {best}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**environment(), "command": " ".join(sys.argv), "model": args.model, "batch": B,
            "context": args.context, "max_len": args.max_len, "splits": splits,
            "kv_bytes_per_layer": kv_bytes, "layers": L}
    (out / f"tune_decode_attention_{args.model}_b{B}.json").write_text(
        json.dumps({**meta, "rows": rows, "best": best}, indent=2))


if __name__ == "__main__":
    main()
