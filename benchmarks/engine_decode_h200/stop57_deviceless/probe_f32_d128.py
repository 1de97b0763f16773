"""Deviceless: f32 D128 paged decode kernels (read-only and the engine's writing one), GQA 32/8,
64 rows, over block_k x warps x stages: registers, spills, shared memory, CTAs per SM, compiled
for sm_90a. Why: stop 56 found f32 D128 spilling at 128-, 64- and 32-token blocks on 4 warps
(the launches it tried); this looks for one that does not. Output: probe_f32_d128.log beside it.

    bash scripts/deviceless_env.sh run python \
      benchmarks/engine_decode_h200/stop57_deviceless/probe_f32_d128.py
"""
import itertools
import jax, jax.numpy as jnp, numpy as np
from pallas_kernels import deviceless as dl
from pallas_kernels.fused_decode import paged_decode_attention
from pallas_kernels.fused_decode.attention import rope_table
from pallas_kernels.paged_attention import kernel as pk

B, H, K, D, page, W, ctx = 64, 32, 8, 128, 16, 128, 328
P = B * W
tables = jnp.asarray(np.random.default_rng(1).permutation(P).reshape(B, W), jnp.int32)
slots = tables[:, ctx // page] * page + ctx % page
lens = jnp.full((B,), ctx + 1, jnp.int32)
table = rope_table(jnp.ones((B, D // 2)), jnp.zeros((B, D // 2)))
keys = ("registers", "spill_store_bytes", "shared_bytes", "ctas_per_sm")
for bk, warps, stages in itertools.product((64, 32, 16), (4, 8), (1, 2)):
    q = jax.ShapeDtypeStruct((B, H, D), jnp.float32)
    pool = jax.ShapeDtypeStruct((P, page, K, D), jnp.float32)
    with dl.as_gpu(), dl.TritonCapture() as cap:
        fn = lambda q, kp, vp: pk.paged_attention(q, kp, vp, tables, lens, num_splits=1,
                                                  block_k=bk, num_warps=warps, num_stages=stages)
        dl.lower(fn, q, pool, pool)
    for k in cap.kernels:
        r = dl.compile_triton(k)
        print("read-only", bk, warps, stages, {x: r.get(x) for x in keys}, flush=True)
    q = jax.ShapeDtypeStruct((B, (H + 2 * K) * D), jnp.float32)
    pool = jax.ShapeDtypeStruct((1, P, page, K, D), jnp.float32)
    with dl.as_gpu(), dl.TritonCapture() as cap:
        fn = lambda q, kp, vp: paged_decode_attention(q, kp, vp, 0, lens, slots, tables, table,
            num_heads=H, num_kv_heads=K, num_splits=1, block_k=bk, num_warps=warps,
            num_stages=stages)
        dl.lower(fn, q, pool, pool)
    for k in cap.kernels:
        if "paged" in k["name"]:
            r = dl.compile_triton(k)
            print("writing", bk, warps, stages, {x: r.get(x) for x in keys}, flush=True)
