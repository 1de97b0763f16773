"""Scratch: what a jitted call's host dispatch costs on the GPU, by argument count and kernels."""
import dataclasses, sys, time, json, os
import numpy as np, jax, jax.numpy as jnp
from jax.experimental import pallas as pl
sys.path.insert(0, "scripts")
import bench_serving as bs
from jdecode.model.layout import inference_layout
from jdecode.cache.paged import init_paged_cache

def dispatch_ms(f, *args, n=200):
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    outs = [f(*args) for _ in range(n)]
    d = 1e3 * (time.perf_counter() - t) / n
    jax.block_until_ready(outs)
    return d, 1e3 * (time.perf_counter() - t) / n

res = {"xla_flags": os.environ.get("XLA_FLAGS", "")}
x = jnp.zeros(8)
res["x only"] = dispatch_ms(jax.jit(lambda x: x + 1), x)
model = bs.load_model("configs/models/llama-3.2-1b.yaml", None)
params = inference_layout(model.params)
res["n_param_leaves"] = len(jax.tree.leaves(params))
res["params + x"] = dispatch_ms(jax.jit(lambda p, x: x + 1), params, x)
cache = init_paged_cache(model.cfg, 4096, 16)
g = jax.jit(lambda p, c, x: (x + 1, c), donate_argnums=(1,))
y, cache = g(params, cache, x)
t = time.perf_counter()
for _ in range(200): y, cache = g(params, cache, x)
res["params + donated cache + x"] = 1e3 * (time.perf_counter() - t) / 200
jax.block_until_ready(y)

def chain(n):
    def f(x):
        for i in range(n):
            x = jax.lax.optimization_barrier(jnp.sin(x) * 1.0001)
        return x
    return jax.jit(f)
for n in (10, 100, 300):
    res[f"xla chain {n}"] = dispatch_ms(chain(n), jnp.zeros((64, 2048)))

def pallas_chain(n):
    def k(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0
    def f(x):
        for i in range(n):
            x = pl.pallas_call(k, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)
        return x
    return jax.jit(f)
for n in ((10, 100) if jax.default_backend() == "gpu" else ()):
    res[f"pallas chain {n}"] = dispatch_ms(pallas_chain(n), jnp.zeros((16, 128)))
print(json.dumps(res, indent=1))
