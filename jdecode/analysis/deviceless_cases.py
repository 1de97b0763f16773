"""The model's steps as (function, abstract arguments) for compiles without a GPU.

`scripts/deviceless_check.py` lowers them and compiles their Triton kernels with the
`triton` wheel; `scripts/deviceless_kernels.py` compiles them with XLA:GPU for an H200 and
counts their kernels (`pallas_kernels.deviceless`); the sm_90a compile tests use both. All
shapes are abstract (`jax.eval_shape`): nothing is allocated, so the 1B shape costs no memory.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp

from jdecode.cache.dense import init_cache
from jdecode.cache.paged import PagedMeta, init_paged_cache
from jdecode.config import load_model_config_yaml
from jdecode.decoding import phases
from jdecode.decoding.autoregressive import autoregressive
from jdecode.decoding.generate import LOOP_BLOCK
from jdecode.decoding.loop import init_loop, run_loop
from jdecode.decoding.sampling import SamplingArrays, SamplingParams
from jdecode.engine import runner
from jdecode.model.fused_decode import (
    fused_paged_decode_step,
    fused_paged_reason,
    impl_variant,
    with_decode_copies,
)
from jdecode.model.layout import inference_layout
from jdecode.model.params import init_params
from jdecode.provenance import REPO_ROOT, environment
from pallas_kernels.deviceless import DEVICE_KIND, launches, xla_compile

i32 = partial(jax.ShapeDtypeStruct, dtype=jnp.int32)


def abstract(tree):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def model_params(name: str, dtype: str = "bfloat16"):
    """(config, abstract inference params with the [N, K] copies) of configs/models/NAME in
    `dtype` (bf16 by default, as the benchmarks time the shapes; SmolLM2's config, which
    users get, says float32)."""
    cfg = load_model_config_yaml(REPO_ROOT / "configs" / "models" / f"{name}.yaml")
    cfg = cfg.replace(dtype=dtype)
    params = jax.eval_shape(
        lambda: with_decode_copies(inference_layout(init_params(cfg, jax.random.key(0)))))
    return cfg, params


def step_case(cfg, params, variant: str, batch: int, tokens: int) -> tuple[Callable, tuple]:
    """(fn, abstract args) of one step over a 1024-slot per-layer cache: `decode_step` for one
    token per row, else `verify`, traced under the impl variant (`impl_variant`)."""
    cache = abstract(jax.eval_shape(partial(init_cache, cfg, batch, 1024, per_layer=True)))
    toks = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)

    def fn(p, c, t, pos):
        with impl_variant(variant) as impl:
            if tokens == 1:
                return phases.decode_step(p, c, t[:, 0], pos[:, 0], cfg=cfg, impl=impl)
            return phases.verify(p, c, t, pos, cfg=cfg, impl=impl)

    return fn, (params, cache, toks, toks)


def generate_loop_case(cfg, params, batch: int, *, prompt: int = 512, max_len: int = 768,
                       max_out: int = 128, stacked_cache: bool = True
                       ) -> tuple[Callable, tuple]:
    """(fn, abstract args) of the Generator's decode loop (`run_loop` around the
    autoregressive decoder, groups of `LOOP_BLOCK` steps, all-greedy) after a `prompt`-token
    prefill: what `Generator.generate` dispatches once per call. Its launches hold two step
    bodies, the group's and the remainder's (`run_loop`). stacked_cache: the plain method's
    (True), or per-layer buffers."""
    dec = autoregressive(cfg, max_len, "pallas", stacked_cache=stacked_cache)
    sp = SamplingArrays.from_params([SamplingParams()] * batch, batch, specialize_greedy=True)
    keys = jax.eval_shape(lambda: jax.vmap(jax.random.key)(jnp.zeros((batch,), jnp.uint32)))
    ls = jax.eval_shape(partial(init_loop, dec, max_out=max_out), params,
                        i32((batch, prompt)), i32((batch,)), sp, keys, i32((batch,)),
                        i32((batch, 1)))
    return partial(run_loop, dec, block=LOOP_BLOCK), (params, ls, i32(()))


def engine_pool(cfg, rows: int, slots: int, page_size: int = 16, max_len: int = 2048):
    """(abstract page pool, PagedMeta) of an engine's decode-only step of `rows` flat tokens
    over `slots` sequences of `max_len` tokens in `page_size`-token pages, as the runner
    packs it (`PagedMeta.decodes_only`)."""
    pool = abstract(jax.eval_shape(partial(init_paged_cache, cfg, slots * max_len // page_size,
                                           page_size)))
    meta = PagedMeta(i32((rows,)), i32((slots, max_len // page_size)), i32((slots,)),
                     i32((slots + 1,)), decodes_only=True)
    return pool, meta


def engine_fused_case(cfg, params, rows: int, *, slots: int = 64, max_len: int = 1024
                      ) -> tuple[Callable, tuple]:
    """(fn, abstract args) of the engine's decode-only step through the fused kernels
    (`fused_paged_decode_step`); raises where the step would not take them."""
    pool, meta = engine_pool(cfg, rows, slots, max_len=max_len)

    def fn(p, c, t, pos, m):
        reason = fused_paged_reason(p, c, m, cfg, t.shape[0])
        if reason is not None:
            raise ValueError(f"the engine's step would not take the fused kernels: {reason}")
        return fused_paged_decode_step(p, c, t, pos, m, cfg=cfg)

    return fn, (params, pool, i32((rows,)), i32((rows,)), meta)


def engine_forward_case(cfg, params, rows: int, *, slots: int | None = None
                        ) -> tuple[Callable, tuple]:
    """(fn, abstract args) of the engine's decode-only step as `runner._step` runs it: a
    forward over the page pool and a greedy sample (`runner._forward_sample`), the fused
    step or the general path as the switch and the rows decide; `slots` sequence slots
    (default: 32, or `rows` past that, as a full batch packs)."""
    slots = slots or max(32, rows)
    pool, meta = engine_pool(cfg, rows, slots)
    sp = SamplingArrays.from_params([SamplingParams()] * slots, slots, specialize_greedy=True)
    fn = partial(runner._forward_sample, cfg=cfg, impl="pallas", num_logprobs=0, seen=None)
    u32 = jax.ShapeDtypeStruct((slots,), jnp.uint32)
    return fn, (params, pool, i32((rows,)), i32((rows,)), meta, i32((slots,)), sp, u32,
                i32((slots,)), i32((slots,)))


def count_kernels(fn, args, variant: str, compiler_options: dict | None = None) -> dict:
    """{"kernels": launches of one step, "kinds": by kind} of fn(*args) compiled by XLA:GPU
    for an H200 (`deviceless.xla_compile`; its argument 1, the cache, donated as in the real
    calls), traced under the impl variant, with these XLA options (e.g. the Generator's loop
    options at its batch, `compile_options.step_compiler_options`)."""
    with impl_variant(variant):  # the switch holds while the step is traced
        text = xla_compile(fn, *args, donate_argnums=(1,), compiler_options=compiler_options)
    kinds = launches(text)
    return {"kernels": sum(kinds.values()), "kinds": kinds}


def write_record(rows: list, out: str, name: str, markdown: Callable[[dict], str]) -> dict:
    """A deviceless script's record: provenance, its command line, the target and its rows,
    written as NAME.json and NAME.md (`markdown(record)`) under `out`; the table is printed."""
    record = {**environment(), "command": "python " + " ".join(sys.argv),
              "target": DEVICE_KIND, "rows": rows}
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{name}.json").write_text(json.dumps(record, indent=1))
    (path / f"{name}.md").write_text(markdown(record))
    print(markdown(record))
    return record
