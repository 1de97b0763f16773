"""Deviceless: the engine's writing paged decode kernel at SmolLM2's shape, 64 rows, in bf16
and f32 (the model config's dtype), compiled for sm_90a: registers, spills, shared memory; then the
read-only paged decode kernel at three shapes. Output: probe_f32_spills.log beside this file.

    bash scripts/deviceless_env.sh run python \
      benchmarks/engine_decode_h200/stop56_h100/probe_f32_spills.py
"""
import jax, jax.numpy as jnp, numpy as np
from pallas_kernels import deviceless as dl
from pallas_kernels.fused_decode import paged_decode_attention
from pallas_kernels.fused_decode.attention import rope_table

B, H, K, D, page, W, ctx = 64, 9, 3, 64, 16, 128, 328
P = B * W
tables = jnp.asarray(np.random.default_rng(1).permutation(P).reshape(B, W), jnp.int32)
slots = tables[:, ctx // page] * page + ctx % page
lens = jnp.full((B,), ctx + 1, jnp.int32)
table = rope_table(jnp.ones((B, D // 2)), jnp.zeros((B, D // 2)))
for dt in (jnp.bfloat16, jnp.float32):
    for bk, warps in ((128, 4), (64, 4), (64, 2), (32, 4)):
        q = jax.ShapeDtypeStruct((B, (H + 2 * K) * D), dt)
        pool = jax.ShapeDtypeStruct((1, P, page, K, D), dt)
        with dl.as_gpu(), dl.TritonCapture() as cap:
            fn = lambda q, kp, vp: paged_decode_attention(q, kp, vp, 0, lens, slots, tables, table,
                num_heads=H, num_kv_heads=K, num_splits=1, block_k=bk, num_warps=warps, num_stages=2)
            dl.lower(fn, q, pool, pool)
        for k in cap.kernels:
            r = dl.compile_triton(k)
            print(jnp.dtype(dt).name, bk, warps, k["name"], k["grid"], r)

# The read-only paged decode kernel (the engine's general path and bench_kernels' decode).
from pallas_kernels.paged_attention import kernel as pk
for (H, K, D) in ((9, 3, 64), (32, 8, 64), (32, 8, 128)):
    for dt in (jnp.bfloat16, jnp.float32):
        for bk in (128, 64):
            q = jax.ShapeDtypeStruct((B, H, D), dt)
            pool = jax.ShapeDtypeStruct((P, page, K, D), dt)
            with dl.as_gpu(), dl.TritonCapture() as cap:
                fn = lambda q, kp, vp: pk.paged_attention(q, kp, vp, tables, lens, num_splits=1,
                                                          block_k=bk, num_warps=4, num_stages=2)
                dl.lower(fn, q, pool, pool)
            for k in cap.kernels:
                r = dl.compile_triton(k)
                print("read-only", H, K, D, jnp.dtype(dt).name, bk, k["name"], {x: r.get(x) for x in ("registers", "spill_store_bytes", "shared_bytes", "ctas_per_sm")})

# f32 blocks of 32 tokens (added after the first run).
for (H, K, D, bk) in ((32, 8, 128, 32), (9, 3, 64, 32)):
    q = jax.ShapeDtypeStruct((B, H, D), jnp.float32)
    pool = jax.ShapeDtypeStruct((P, page, K, D), jnp.float32)
    with dl.as_gpu(), dl.TritonCapture() as cap:
        fn = lambda q, kp, vp: pk.paged_attention(q, kp, vp, tables, lens, num_splits=1,
                                                  block_k=bk, num_warps=4, num_stages=2)
        dl.lower(fn, q, pool, pool)
    for k in cap.kernels:
        r = dl.compile_triton(k)
        print("read-only", H, K, D, "float32", bk, {x: r.get(x) for x in ("registers", "spill_store_bytes", "shared_bytes", "ctas_per_sm")})
