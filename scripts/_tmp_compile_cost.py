import time, sys, jax, jax.numpy as jnp
from functools import partial
from jdecode.analysis import deviceless_cases as dc
from jdecode.decoding.autoregressive import autoregressive
from jdecode.decoding.generate import LOOP_BLOCK
from jdecode.decoding.loop import init_loop, run_loop
from jdecode.decoding.sampling import SamplingArrays, SamplingParams
from pallas_kernels import deviceless as dl
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec
cfg, params = dc.model_params(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m")
i32 = dc.i32
mesh = topologies.make_mesh(dl.h200_topology(), (1,), ("x",))
sh = NamedSharding(mesh, PartitionSpec())
batch, prompt, max_len, max_out = 1, 512, 768, 128
for stacked in (False, True, False, True):
    dec = autoregressive(cfg, max_len, "pallas", stacked_cache=stacked)
    sp = SamplingArrays.from_params([SamplingParams()] * batch, batch, specialize_greedy=True)
    keys = jax.eval_shape(lambda: jax.vmap(jax.random.key)(jnp.zeros((batch,), jnp.uint32)))
    ls = jax.eval_shape(partial(init_loop, dec, max_out=max_out), params, i32((batch, prompt)), i32((batch,)), sp, keys, i32((batch,)), i32((batch, 1)))
    args = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), (params, ls, i32(())))
    jax.clear_caches()
    with dl.gpu_dispatch(), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        t = time.perf_counter()
        low = jax.jit(partial(run_loop, dec, block=LOOP_BLOCK), donate_argnums=(1,)).lower(*args)
        t1 = time.perf_counter()
        c = low.compile()
        t2 = time.perf_counter()
    print("stacked" if stacked else "per_layer", "lower", round(t1 - t, 2), "compile", round(t2 - t1, 2), c.as_text().count("__gpu$xla.gpu.triton"), flush=True)
