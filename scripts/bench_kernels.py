"""Benchmarks the Pallas attention kernels against their anchors, all timed in one run.

Checks every kernel against its reference first, then times: flash causal prefill vs cuDNN and
JAX's bundled Pallas mha; paged decode vs JAX's bundled paged attention and an XLA gather;
a ragged mixed batch vs separate decode and prefill calls; a context x batch sweep (PNG); and
the memory ceilings (read-only stream, elementwise copy) measured in the same process.

    PYTHONPATH=. python3 scripts/bench_kernels.py --out $OUT

Writes kernels.json, kernels.md (after every section) and kernels_sweep.png under --out.
On an H100 the sections before the sweep took about 2 minutes (compiles included); each sweep
point adds a few seconds, so shorten it with --sweep-batches / --sweep-contexts when device
time is short.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.analysis.profile import device_busy_us, kernel_tally
from jdecode.provenance import git_sha
from pallas_kernels.flash_attention import flash_attention, flash_attention_reference
from pallas_kernels.paged_attention import (
    paged_attention,
    paged_attention_reference,
    ragged_paged_attention,
    write_kv_pages,
)
from pallas_kernels.paged_attention.reference import gather_pages

warnings.filterwarnings("ignore", category=DeprecationWarning)
BF16 = jnp.bfloat16
GiB = 2**30


# ----------------------------------------------------------------------------- timing helpers


def compile_time(fn, *args) -> tuple[object, float]:
    """(compiled executable, seconds to lower + compile)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def time_calls(compiled, *args, inner: int = 10, reps: int = 25) -> float:
    """Median seconds per call: `inner` back-to-back async calls per sample, `reps` samples."""
    jax.block_until_ready(compiled(*args))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = compiled(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def time_looped(step, tables, *args, inner: int = 20, reps: int = 15) -> dict:
    """Seconds per step, with `inner` steps inside one jitted fori_loop, by wall clock and by
    device time.

    step(table, *args) -> array. Each iteration takes the next of the stacked `tables`
    [R, ...] (block tables over disjoint pages), so repeated steps do not re-read the L2 and
    the loop body cannot be hoisted. (Writing the steps out unrolled does not work: steps that
    repeat operands are merged by XLA's CSE, and an optimization barrier did not stop that.)

    Returns {"s": median wall seconds per step, "compile_s", "device_s": the step's own kernel
    time per step, "kernels": the loop's four costliest kernels, each with its "launch" (grid,
    registers, shared memory, occupancy: `jdecode.analysis.profile.parse_launch`)}. The wall
    figure carries the loop's control per iteration (XLA's while loop reads its predicate on
    the host each time), which weighs at small sizes. The device figure is the kernels'
    summed durations per step under the profiler, less those of the same loop around an empty
    step (`tables[i]` passed through): the loop's own kernels. It is None where no kernel runs
    on a device stream (CPU).
    """
    r = tables.shape[0]

    def looped(step):
        def loop(tables, *args):
            def body(i, out):
                return step(tables[i % r], *args)

            first = step(tables[0], *args)
            return jax.lax.fori_loop(1, inner + 1, body, first)

        return loop

    compiled, c = compile_time(looped(step), tables, *args)
    jax.block_until_ready(compiled(tables, *args))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(tables, *args))
        samples.append((time.perf_counter() - t0) / (inner + 1))
    tally = kernel_tally(lambda: compiled(tables, *args), repeats=3)
    device_s, top = None, []
    if tally:
        empty, _ = compile_time(looped(lambda t, *a: t), tables, *args)
        idle = device_busy_us(lambda: empty(tables, *args), repeats=3) or 0.0
        busy = sum(k["us_per_run"] for k in tally)
        device_s = (busy - idle) / (inner + 1) * 1e-6
        top = [{"kernel": k["kernel"][:60], "us_per_call": k["us_per_call"],
                "calls_per_step": k["calls_per_run"] / (inner + 1), "launch": k["launch"]}
               for k in tally[:4]]
    return {"s": statistics.median(samples), "compile_s": c, "device_s": device_s,
            "kernels": top}


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in f32."""
    out, ref = jnp.asarray(out, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def check(name, out, ref, tol=2e-2) -> dict:
    err = rel_err(out, ref)
    finite = bool(jnp.all(jnp.isfinite(jnp.asarray(out, jnp.float32))))
    ok = finite and err <= tol
    print(f"  check {name}: rel err {err:.2e} finite={finite} -> {'ok' if ok else 'FAILED'}")
    if not ok:
        raise AssertionError(f"{name} disagrees with its reference (rel err {err:.2e})")
    return {"rel_err": err}


# ----------------------------------------------------------------------------- ceilings


def bench_ceilings() -> dict:
    """Read-only stream and elementwise copy from `measure_ceilings` (the one method every
    benchmark uses, written down in its `read_method`), plus PyTorch's copy as an anchor."""
    from jdecode.analysis.measure import measure_ceilings

    m = measure_ceilings("bfloat16", repeats=15).measured
    res = {"read_stream_TBps": m["read_bytes_per_s"] / 1e12, "read_method": m["read_method"],
           "copy_TBps": m["copy_bytes_per_s"] / 1e12}
    try:  # PyTorch device-to-device copy, as in GPU.md's anchor table
        import torch

        a = torch.empty(GiB, dtype=torch.bfloat16, device="cuda")
        b = torch.empty_like(a)
        for _ in range(3):
            b.copy_(a)
        torch.cuda.synchronize()
        ts = []
        for _ in range(15):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            b.copy_(a)
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1) / 1e3)
        res["torch_copy_TBps"] = 4 * GiB / statistics.median(ts) / 1e12
        del a, b
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001 - the anchor is optional
        res["torch_copy_error"] = repr(e)
    print(f"ceilings: {res}")
    return res


# ----------------------------------------------------------------------------- flash


FLASH_CONFIGS = [  # (block_q, block_k, num_warps, num_stages)
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (128, 128, 8, 2),
    (64, 64, 4, 3),
]


def bench_flash(b=2, t=4096, h=32, kv=8, d=128) -> dict:
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (b, t, h, d), BF16)
    k = jax.random.normal(ks[1], (b, t, kv, d), BF16)
    v = jax.random.normal(ks[2], (b, t, kv, d), BF16)
    flops = 4 * b * h * t * t * d / 2  # two matmuls, causal half
    res = {"shape": {"B": b, "T": t, "H": h, "KV": kv, "D": d, "dtype": "bfloat16", "causal": True}}
    ref = jax.jit(functools.partial(flash_attention_reference, causal=True))(q, k, v)

    def record(name, fn, *args):
        try:
            compiled, c = compile_time(fn, *args)
            res.setdefault("checks", {})[name] = check(name, compiled(*args), ref)
            s = time_calls(compiled, *args)
            res[name] = {"ms": s * 1e3, "TFLOPs": flops / s / 1e12, "compile_s": c}
            print(f"  {name}: {s * 1e3:.3f} ms  {flops / s / 1e12:.1f} TFLOP/s  (compile {c:.1f}s)")
        except Exception as e:  # noqa: BLE001 - keep the other variants' numbers
            res[name] = {"error": repr(e)[:500]}
            print(f"  {name}: ERROR {e!r}"[:400])

    print("flash causal prefill")
    for bq, bk, w, st in FLASH_CONFIGS:
        fn = functools.partial(
            flash_attention, causal=True, block_q=bq, block_k=bk, num_warps=w, num_stages=st
        )
        record(f"ours_bq{bq}_bk{bk}_w{w}_s{st}", fn, q, k, v)
    record("ours_default", functools.partial(flash_attention, causal=True), q, k, v)
    record(
        "cudnn",
        functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn"),
        q,
        k,
        v,
    )
    record(
        "xla",
        functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="xla"),
        q,
        k,
        v,
    )
    try:
        from jax.experimental.pallas.ops.gpu import attention as bundled

        # The bundled mha has no GQA: it gets K/V repeated to all heads (same FLOPs).
        kr, vr = (jnp.repeat(x, h // kv, axis=2) for x in (k, v))
        record(
            "jax_bundled_pallas_mha",
            lambda q, k, v: bundled.mha(q, k, v, None, d**-0.5, True),
            q,
            kr,
            vr,
        )
    except Exception as e:  # noqa: BLE001
        res["jax_bundled_pallas_mha"] = {"error": repr(e)[:500]}
    ours = {n: r for n, r in res.items() if n.startswith("ours_") and "TFLOPs" in r}
    if ours:
        best = max(ours, key=lambda n: ours[n]["TFLOPs"])
        res["ours_best"] = {"config": best, **ours[best]}
    return res


# ----------------------------------------------------------------------------- paged decode


def make_paged(b, ctx, kv, d, page, rotations, key, h=None, dtype=BF16):
    """A pool holding `rotations` disjoint copies of every sequence's pages, and the stacked
    block tables [R, B, pages] (random permutation of the pool) that address each copy."""
    pages_per_seq = ctx // page
    num_pages = rotations * b * pages_per_seq
    ks = jax.random.split(key, 3)
    k_pages = jax.random.normal(ks[0], (num_pages, page, kv, d), dtype)
    v_pages = jax.random.normal(ks[1], (num_pages, page, kv, d), dtype)
    perm = jax.random.permutation(ks[2], num_pages).astype(jnp.int32)
    tables = perm.reshape(rotations, b, pages_per_seq)
    return k_pages, v_pages, tables


def xla_gather_decode(q, k_pages, v_pages, tables, ctx):
    """The XLA anchor: gather the pages into a dense cache, then bf16 einsum attention."""
    b, h, d = q.shape
    k = gather_pages(k_pages, tables)  # [B, S, K, D]
    v = gather_pages(v_pages, tables)
    kv = k.shape[2]
    qg = q.reshape(b, kv, h // kv, d)
    s = jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=jnp.float32) * d**-0.5
    s = jnp.where(jnp.arange(k.shape[1]) < ctx[:, None, None, None], s, -1e30)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return (
        jnp.einsum("bkgs,bskd->bkgd", p, v, preferred_element_type=jnp.float32)
        .reshape(b, h, d)
        .astype(q.dtype)
    )


def bundled_paged_step(q, k_t, v_t, table, ctx):
    from jax.experimental.pallas.ops.gpu import paged_attention as bundled

    # It has no sm_scale argument: the caller scales q. Its defaults: block_h 16, 8 pages/block,
    # k_splits 16.
    return bundled.paged_attention(q * q.shape[-1] ** -0.5, k_t, v_t, table, ctx)


def bench_decode_point(b, ctx_len, h=32, kv=8, d=128, page=16, variants=None, anchors=True,
                       read_same=None):
    """One decode shape: every variant's TB/s (K/V bytes actually attended / time). The
    same-size read stream is timed too where read_same says so (default: with the anchors,
    or when only the default variant runs)."""
    kv_bytes = 2 * b * ctx_len * kv * d * 2
    rotations = max(1, min(32, math.ceil(256e6 / kv_bytes)))  # >= 256 MB touched: beats L2
    key = jax.random.key(ctx_len + b)
    k_pages, v_pages, tables = make_paged(b, ctx_len, kv, d, page, rotations, key)
    q = jax.random.normal(jax.random.key(7), (b, h, d), BF16)
    ctx = jnp.full((b,), ctx_len, jnp.int32)
    point = {"B": b, "context": ctx_len, "kv_bytes": kv_bytes, "rotations": rotations}
    ref = jax.jit(paged_attention_reference)(q, k_pages, v_pages, tables[0], ctx)

    def record(name, step, *pools):
        try:
            out = jax.jit(step)(tables[0], *pools)
            point.setdefault("checks", {})[name] = check(name, out, ref)["rel_err"]
            t = time_looped(step, tables, *pools)
            point[name] = rec = rates(t, kv_bytes)
            print(f"  B{b} ctx{ctx_len} {name}: {rec['us']:.1f} us  {rec['TBps']:.2f} TB/s"
                  f"{device_text(rec)}")
        except Exception as e:  # noqa: BLE001
            point[name] = {"error": repr(e)[:500]}
            print(f"  B{b} ctx{ctx_len} {name}: ERROR {e!r}"[:400])

    for name, kwargs in (variants or {"ours": {}}).items():
        record(
            name,
            lambda t, kp, vp, kw=kwargs: paged_attention(q, kp, vp, t, ctx, **kw),
            k_pages,
            v_pages,
        )
    if anchors:
        k_t, v_t = (jnp.transpose(x, (2, 0, 1, 3)) for x in (k_pages, v_pages))  # [K, P, page, D]
        record(
            "jax_bundled_paged", lambda t, kp, vp: bundled_paged_step(q, kp, vp, t, ctx), k_t, v_t
        )
        del k_t, v_t
        record(
            "xla_gather", lambda t, kp, vp: xla_gather_decode(q, kp, vp, t, ctx), k_pages, v_pages
        )
    if read_same if read_same is not None else (anchors or variants is None):
        point["read_same_bytes"] = read_same_bytes(kv_bytes, rotations)
        same = point["read_same_bytes"]
        print(f"  B{b} ctx{ctx_len} read_same_bytes: {same['TBps']:.2f} TB/s{device_text(same)}")
    return point


def rates(t: dict, nbytes: int) -> dict:
    """A `time_looped` result as us and TB/s of `nbytes` per step, by wall and device time."""
    rec = {"us": t["s"] * 1e6, "TBps": nbytes / t["s"] / 1e12, "compile_s": t["compile_s"]}
    if t["device_s"]:
        rec.update(device_us=t["device_s"] * 1e6, TBps_device=nbytes / t["device_s"] / 1e12,
                   kernels=t["kernels"])
    return rec


def launch_text(rec: dict) -> str:
    """A result's costliest kernel's launch ("256, 2, 128"), or "-" where none was traced."""
    launch = ((rec.get("kernels") or [{}])[0]).get("launch") or {}
    return ", ".join(str(launch.get(k, "?")) for k in ("ctas", "ctas_per_sm", "regs")) \
        if launch else "-"


def device_text(rec: dict) -> str:
    return (f"; device {rec['device_us']:.1f} us {rec['TBps_device']:.2f} TB/s"
            if "device_us" in rec else "")


def read_same_bytes(nbytes: int, rotations: int) -> dict:
    """The read stream at this point's size, in the same fori_loop harness as the kernels: a
    row sum of one of `rotations` bf16 [rows, 8192] arrays per step. At small sizes a step's
    fixed costs (launch, loop, tail) weigh more; this is the rate a kernel could reach there."""
    rows = max(1, nbytes // (2 * 8192))
    x = jax.random.normal(jax.random.key(5), (rotations, rows, 8192), BF16)
    t = time_looped(lambda i, a: jnp.sum(a[i], axis=1, dtype=jnp.float32),
                    jnp.arange(rotations), x)
    return rates(t, rows * 8192 * 2)


def mark_best_of_ours(res: dict) -> None:
    """res["ours_best"]: the fastest of a decode point's "ours_*" variants with its config
    name, ranked by device time where the profiler saw the kernels (the GPU), else wall."""
    ours = {n: r for n, r in res.items() if n.startswith("ours_") and "TBps" in r}
    if ours:
        best = max(ours, key=lambda n: ours[n].get("TBps_device", ours[n]["TBps"]))
        res["ours_best"] = {"config": best, **ours[best]}


def bench_decode(b: int = 32, ctx: int = 4096) -> dict:
    print(f"paged decode B{b} S{ctx} H32 KV8 D128 bf16 page 16")
    variants = {"ours_default": {}}
    for splits, bk in ((1, 64), (2, 32), (2, 64), (2, 128), (4, 64), (8, 64)):
        variants[f"ours_split{splits}_bk{bk}"] = {"num_splits": splits, "block_k": bk}
    if b < 32:  # few sequences: the split count decides how the grid fills the SMs
        for splits, bk, stages in ((2, 128, 3), (4, 128, 3), (8, 128, 2), (16, 64, 2),
                                   (4, 64, 3), (2, 64, 3), (4, 64, 4), (8, 64, 3)):
            variants[f"ours_split{splits}_bk{bk}_st{stages}"] = {
                "num_splits": splits, "block_k": bk, "num_stages": stages}
        for splits, bk, stages in ((4, 128, 2), (4, 64, 3), (8, 64, 2), (2, 128, 2)):
            variants[f"ours_split{splits}_bk{bk}_st{stages}_w8"] = {
                "num_splits": splits, "block_k": bk, "num_stages": stages, "num_warps": 8}
    res = bench_decode_point(b, ctx, variants=variants)
    mark_best_of_ours(res)
    for page in (32, 64) if b == 32 else ():
        p = bench_decode_point(32, 4096, page=page, anchors=False)
        res[f"ours_page{page}"] = p.get("ours")
    return res


# (splits, block_k, warps) of the hand-pipelined loop (`prefetch=True`, `attend_prefetched`)
# at B8 S4096. Compiled for sm_90a without a card (triton 3.9, `scripts/deviceless_check.py`'s
# compiler): registers / CTAs an SM / K/V bytes in flight an SM: bk64 w4 216 / 2 / 64 KB (at
# 4 and 8 splits), bk128 w8 208 / 1 / 64 KB, bk32 w2 242 / 4 / 64 KB, bk32 w4 147 / 3 /
# 48 KB (at 4 and 8 splits); none spills. bk128 w4 spills 5.8 KB and bk64 w8 fits one CTA an SM (152
# registers): left out.
PREFETCH_LAUNCHES = ((4, 64, 4), (8, 64, 4), (4, 128, 8), (8, 32, 2), (4, 32, 4), (8, 32, 4))
# (splits, block_k, warps, stages) where Triton's own pipeliner double-buffers this kernel's
# K/V: from 5 stages on (2 slots, 3 copy groups left in flight at the loop's wait; at 2-4
# stages, every launch the grids of runs 15-17 timed, one slot). Compiled as above: bk32
# 127 registers / 4 CTAs an SM, bk64 128 / 2, bk128 163 / 1 (173 KB of shared memory).
DEEP_STAGE_LAUNCHES = ((4, 64, 4, 5), (8, 64, 4, 5), (8, 32, 4, 5), (4, 128, 4, 5))


def bench_decode_prefetch(b: int = 8, ctx: int = 4096) -> dict:
    """The default launch against the launches whose loop keeps a block in flight during the
    math, same run, with the same-size read stream: the hand-pipelined loop's
    (PREFETCH_LAUNCHES) and Triton's own at 5 stages (DEEP_STAGE_LAUNCHES). Each variant's
    top kernel carries its launch (grid, registers, occupancy)."""
    print(f"paged decode B{b} S{ctx}: default against prefetch=True and 5-stage launches")
    variants = {"ours_default": {}}
    for splits, bk, warps in PREFETCH_LAUNCHES:
        variants[f"ours_pf_split{splits}_bk{bk}_w{warps}"] = {
            "prefetch": True, "num_splits": splits, "block_k": bk, "num_warps": warps}
    for splits, bk, warps, stages in DEEP_STAGE_LAUNCHES:
        variants[f"ours_split{splits}_bk{bk}_w{warps}_st{stages}"] = {
            "num_splits": splits, "block_k": bk, "num_warps": warps, "num_stages": stages}
    res = bench_decode_point(b, ctx, variants=variants, anchors=False, read_same=True)
    mark_best_of_ours(res)
    return res


SWEEP_BATCHES = (1, 8, 32, 64)
SWEEP_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)


def bench_sweep(batches=SWEEP_BATCHES, contexts=SWEEP_CONTEXTS, points=None,
                on_point=None) -> list[dict]:
    """Appends each point to `points` and calls on_point() after it (a timeout keeps those)."""
    print("decode sweep (context x batch)")
    points = [] if points is None else points
    for b in batches:
        for ctx_len in contexts:
            points.append(bench_decode_point(b, ctx_len, anchors=(b == 32)))
            if on_point:
                on_point()
    return points


# ----------------------------------------------------------------------------- ragged


RAGGED_CONFIGS = ((64, 64, 4, 3), (128, 64, 4, 2), (128, 128, 8, 3), (256, 64, 8, 2))


def bench_ragged(
    n_dec=28, n_pre=4, chunk=512, dec_ctx=4096, pre_ctx=2048, h=32, kv=8, d=128, page=16,
    configs=RAGGED_CONFIGS,
) -> dict:
    """28 decodes at context 4096 + 4 prefill chunks of 512 (positions 1536..2047).

    configs: (query rows per program, block_k, warps, stages) of the chunk items' launch.
    """
    print(f"ragged: {n_dec} decodes (ctx {dec_ctx}) + {n_pre} chunks of {chunk} (ctx {pre_ctx})")
    b = n_dec + n_pre
    lens = [dec_ctx] * n_dec + [pre_ctx] * n_pre
    q_lens = [1] * n_dec + [chunk] * n_pre
    max_pages = max(lens) // page
    need = [c // page for c in lens]
    num_pages = sum(need)
    ks = jax.random.split(jax.random.key(3), 4)
    k_pages = jax.random.normal(ks[0], (num_pages, page, kv, d), BF16)
    v_pages = jax.random.normal(ks[1], (num_pages, page, kv, d), BF16)
    perm = np.asarray(jax.random.permutation(ks[2], num_pages))
    tables = np.zeros((b, max_pages), np.int32)
    start = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[start : start + n]
        start += n
    tables = jnp.asarray(tables)
    ctx = jnp.asarray(lens, jnp.int32)
    qsl = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    n_tok = int(qsl[-1])
    q = jax.random.normal(ks[3], (n_tok, h, d), BF16)
    res = {
        "shape": {
            "decodes": n_dec,
            "prefill_chunks": n_pre,
            "chunk": chunk,
            "decode_context": dec_ctx,
            "prefill_context": pre_ctx,
            "tokens": n_tok,
            "H": h,
            "KV": kv,
            "D": d,
            "page": page,
        }
    }

    # Reference in two parts (a flat reference would materialize [N, S] per row):
    # decode rows vs paged_attention_reference, chunk rows vs flash reference on gathered K/V.
    ref_dec = paged_attention_reference(q[:n_dec], k_pages, v_pages, tables[:n_dec], ctx[:n_dec])
    kd = gather_pages(k_pages, tables[n_dec:, : pre_ctx // page])
    vd = gather_pages(v_pages, tables[n_dec:, : pre_ctx // page])
    q_pre = q[n_dec:].reshape(n_pre, chunk, h, d)
    q_off = jnp.full((n_pre,), pre_ctx - chunk, jnp.int32)
    ref_pre = flash_attention_reference(q_pre, kd, vd, causal=True, q_offset=q_off)
    ref = jnp.concatenate([ref_dec, ref_pre.reshape(-1, h, d)])

    pre_qsl = qsl[n_dec:] - n_dec
    dec_tables, pre_tables = tables[:n_dec], tables[n_dec:]

    def separate_ragged(q, kp, vp):
        dec = paged_attention(q[:n_dec], kp, vp, dec_tables, ctx[:n_dec])
        pre = ragged_paged_attention(
            q[n_dec:], kp, vp, pre_tables, ctx[n_dec:], pre_qsl, split_decodes=False,
            backend="triton",
        )
        return jnp.concatenate([dec, pre])

    def separate_flash(q, kp, vp):
        dec = paged_attention(q[:n_dec], kp, vp, dec_tables, ctx[:n_dec])
        k = gather_pages(kp, pre_tables[:, : pre_ctx // page])
        v = gather_pages(vp, pre_tables[:, : pre_ctx // page])
        pre = flash_attention(q[n_dec:].reshape(n_pre, chunk, h, d), k, v, q_offset=q_off)
        return jnp.concatenate([dec, pre.reshape(-1, h, d)])

    def ours(**kw):
        return lambda q, kp, vp: ragged_paged_attention(q, kp, vp, tables, ctx, qsl, **kw)

    gp = 1 << (h // kv - 1).bit_length()  # the kernel's padded group
    # "short": what the engine passes for such a step (a chunk, every decode within
    # UNIFIED_DECODE_MAX_CONTEXT: `PagedMeta.short_decodes`); "auto" cannot know that.
    variants = {"ours_ragged_default": ours(), "ours_ragged_short": ours(split_decodes="short"),
                "ours_triton_default": ours(backend="triton")}
    # (query rows per program, block_k, warps, stages): the chunk items' launch; decodes go to
    # the split-K decode kernel unless split_decodes=False (one launch serves all, as before).
    for rows, bk, w, st in configs:
        variants[f"ours_ragged_rows{rows}_bk{bk}_w{w}_s{st}"] = ours(
            block_q=rows // gp, block_k=bk, num_warps=w, num_stages=st, backend="triton"
        )
    variants["ours_one_launch_rows64_bk64"] = ours(block_q=64 // gp, block_k=64,
                                                   split_decodes=False, backend="triton")
    # The Hopper (Mosaic GPU) kernel on the chunk items, the decodes split out or inside it.
    for bk in (64, 128):
        for split in (True, False):
            name = f"ours_mosaic_bk{bk}_{'split' if split else 'one_launch'}"
            variants[name] = ours(backend="mosaic", block_k=bk, split_decodes=split)
    # Its ring beside the default (block_kv 128, 2 stages), every row in the one launch; a ring
    # that does not fit shared memory records its error.
    for bk, st in ((128, 3), (256, 2)):
        variants[f"ours_mosaic_bk{bk}_s{st}_one_launch"] = ours(
            backend="mosaic", block_k=bk, num_stages=st, split_decodes=False)
    variants["separate_decode_plus_ragged_prefill"] = separate_ragged
    variants["separate_decode_plus_gather_flash"] = separate_flash
    def record(name, fn, q, ref):
        """Checks fn(q, pools) against ref, then times it into res[name]."""
        try:
            compiled, c = compile_time(fn, q, k_pages, v_pages)
            res.setdefault("checks", {})[name] = check(name, compiled(q, k_pages, v_pages), ref)
            s = time_calls(compiled, q, k_pages, v_pages)
            res[name] = {"us": s * 1e6, "tokens_per_s": q.shape[0] / s, "compile_s": c}
            # Device time: the call's kernels summed under the profiler. The wall figure of
            # back-to-back calls spreads by up to 8% here between identical launches.
            tally = kernel_tally(lambda: compiled(q, k_pages, v_pages), repeats=5)
            if tally:
                res[name]["device_us"] = sum(k["us_per_run"] for k in tally)
                res[name]["kernels"] = [
                    {"kernel": k["kernel"][:60], "us_per_run": k["us_per_run"],
                     "calls": k["calls_per_run"], "launch": k["launch"]} for k in tally[:5]]
            print(f"  {name}: {s * 1e6:.1f} us  {q.shape[0] / s / 1e6:.2f} M tok/s  "
                  f"device {fmt(res[name], 'device_us', '.1f')} us")
        except Exception as e:  # noqa: BLE001
            res[name] = {"error": repr(e)[:500]}
            print(f"  {name}: ERROR {e!r}"[:400])

    for name, fn in variants.items():
        record(name, fn, q, ref)
    # The engine pads a step's tokens to a bucket (a power of 2 or the budget), with padding
    # rows that belong to no sequence. The same step with 4 such rows (2080, a multiple of 8):
    pad8 = -n_tok % 8
    q8 = jnp.pad(q, ((0, pad8), (0, 0), (0, 0)))
    ref8 = jnp.pad(ref, ((0, pad8), (0, 0), (0, 0)))
    record("ours_ragged_short_rows8", lambda q, kp, vp: ragged_paged_attention(
        q, kp, vp, tables, ctx, qsl, split_decodes="short"), q8, ref8)
    # Ranked by device time where the profiler gave it (as `bench_decode` ranks), over the
    # variants that do this step's work: the padded one does 4 rows more.
    ours = {n: r for n, r in res.items()
            if n.startswith("ours_") and "us" in r and n != "ours_ragged_short_rows8"}
    if ours:
        best = min(ours, key=lambda n: ours[n].get("device_us", ours[n]["us"]))
        res["ours_best"] = {"config": best, **ours[best]}

    # An all-decode step (the decodes alone): what the ragged entry point costs over a direct
    # decode call, i.e. its idle ragged launch plus the row gather/scatter.
    dec_qsl = jnp.arange(n_dec + 1, dtype=jnp.int32)
    all_decode = {
        "all_decode_ragged": lambda q, kp, vp: ragged_paged_attention(
            q, kp, vp, dec_tables, ctx[:n_dec], dec_qsl
        ),
        "all_decode_paged": lambda q, kp, vp: paged_attention(q, kp, vp, dec_tables, ctx[:n_dec]),
        "all_decode_mosaic_one_launch": lambda q, kp, vp: ragged_paged_attention(
            q, kp, vp, dec_tables, ctx[:n_dec], dec_qsl, backend="mosaic", split_decodes=False
        ),
    }
    for name, fn in all_decode.items():
        record(name, fn, q[:n_dec], ref_dec)

    # The page write for the same step: 2076 new K/V rows into the pool.
    slots = jnp.asarray(
        np.random.default_rng(0).choice(num_pages * page, n_tok, replace=False), jnp.int32
    )
    k_new = jax.random.normal(ks[0], (n_tok, kv, d), BF16)
    for impl in ("pallas", "xla"):

        def step(pools, slots, impl=impl):
            return write_kv_pages(*pools, k_new, k_new, slots, impl=impl)

        try:
            loop = jax.jit(
                lambda pools, slots: jax.lax.fori_loop(0, 20, lambda i, p: step(p, slots), pools),
                donate_argnums=0,
            )
            pools = (k_pages + 0, v_pages + 0)
            pools = jax.block_until_ready(loop(pools, slots))
            t0 = time.perf_counter()
            pools = jax.block_until_ready(loop(pools, slots))
            s = (time.perf_counter() - t0) / 20
            res[f"write_kv_pages_{impl}"] = {"us": s * 1e6, "tokens_per_s": n_tok / s}
            print(f"  write_kv_pages[{impl}]: {s * 1e6:.1f} us for {n_tok} rows")
        except Exception as e:  # noqa: BLE001
            res[f"write_kv_pages_{impl}"] = {"error": repr(e)[:500]}
            print(f"  write_kv_pages[{impl}]: ERROR {e!r}"[:400])
    return res


# ----------------------------------------------------------------------------- report


def plot_sweep(points, path, ceilings):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for b in sorted({p["B"] for p in points}):
        pts = [p for p in points if p["B"] == b and "TBps" in p.get("ours", {})]
        ax.plot(
            [p["context"] for p in pts],
            [p["ours"]["TBps"] for p in pts],
            "o-",
            label=f"ours, B={b}",
        )
        anchor = [p for p in pts if "TBps" in p.get("jax_bundled_paged", {})]
        if anchor:
            ax.plot(
                [p["context"] for p in anchor],
                [p["jax_bundled_paged"]["TBps"] for p in anchor],
                "s--",
                label=f"JAX bundled Pallas paged, B={b}",
            )
            ax.plot(
                [p["context"] for p in anchor],
                [p["xla_gather"]["TBps"] for p in anchor],
                "x:",
                label=f"XLA gather, B={b}",
            )
    for name, style in (("read_stream_TBps", "-"), ("copy_TBps", "--")):
        if name in ceilings:
            ax.axhline(
                ceilings[name],
                color="gray",
                ls=style,
                lw=1,
                label=f"{name.replace('_TBps', '')} {ceilings[name]:.2f} TB/s",
            )
    if ax.lines:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("effective K/V read bandwidth (TB/s)")
    ax.set_title("Paged decode, H32 KV8 D128 bf16, page 16")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def fmt(r, key, spec):
    return format(r[key], spec) if isinstance(r, dict) and key in r else "error"


def markdown(results) -> str:
    env, ceil = results["env"], results.get("ceilings", {})
    lines = [
        "# Kernel benchmarks",
        "",
        f"- date: {env['date']}",
        f"- card: {env['device_kind']}; jax {env['jax']}; git {env['git']}",
        f"- command: `{env['command']}`",
        (
            f"- ceilings (same run): read-only stream {fmt(ceil, 'read_stream_TBps', '.2f')} TB/s, "
            f"XLA elementwise copy {fmt(ceil, 'copy_TBps', '.2f')} TB/s, "
            f"PyTorch D2D copy {fmt(ceil, 'torch_copy_TBps', '.2f')} TB/s"
        ),
        "",
    ]
    fl = results.get("flash", {})
    if fl:
        lines += [
            "## Flash attention, causal prefill B2 T4096 H32 KV8 D128 bf16",
            "",
            "| variant | ms | TFLOP/s | compile s |",
            "|---|---|---|---|",
        ]
        for name, r in fl.items():
            if isinstance(r, dict) and ("ms" in r or "error" in r) and name != "ours_best":
                lines.append(
                    f"| {name} | {fmt(r, 'ms', '.3f')} | {fmt(r, 'TFLOPs', '.1f')} | "
                    f"{fmt(r, 'compile_s', '.1f')} |"
                )
        if "ours_best" in fl:
            lines.append(f"\nbest of ours: {fl['ours_best']['config']}")
        lines.append("")
    for de in (results.get(k, {}) for k in ("decode", "decode_b8", "decode_b8_8k",
                                            "decode_b8_pf")):
        if not de or "B" not in de:
            continue
        lines += [
            f"## Paged decode B{de['B']} S{de['context']} H32 KV8 D128 bf16, page 16",
            "",
            "| variant | us | TB/s | device us | TB/s by device time | compile s | top kernel's "
            "launch: CTAs, CTAs an SM, registers |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in de.items():
            if isinstance(r, dict) and ("us" in r or "error" in r):
                compile_s = fmt(r, "compile_s", ".1f") if "compile_s" in r or "error" in r else "-"
                lines.append(
                    f"| {name} | {fmt(r, 'us', '.1f')} | {fmt(r, 'TBps', '.2f')} | "
                    f"{fmt(r, 'device_us', '.1f')} | {fmt(r, 'TBps_device', '.2f')} | "
                    f"{compile_s} | {launch_text(r)} |"
                )
        if "ours_best" in de:
            lines.append(f"\nbest of ours: {de['ours_best']['config']}")
        lines.append("")
    for ra in (results.get("ragged", {}), results.get("ragged_d64", {})):
        if not ra:
            continue
        lines += [
            f"## Ragged mixed batch: {ra.get('shape')}",
            "",
            "| variant | us | device us | tokens/s | top kernels (device us in one call) |",
            "|---|---|---|---|---|",
        ]
        for name, r in ra.items():
            if isinstance(r, dict) and ("us" in r or "error" in r) and name != "ours_best":
                top = "; ".join(f"{k['kernel'][:28]} {k['us_per_run']:.1f}"
                                for k in (r.get("kernels") or [])[:3])
                lines.append(
                    f"| {name} | {fmt(r, 'us', '.1f')} | {fmt(r, 'device_us', '.1f')} | "
                    f"{fmt(r, 'tokens_per_s', '.3g')} | {top} |"
                )
        lines.append("")
    sw = results.get("sweep", [])
    if sw:
        stream = ceil.get("read_stream_TBps")

        def cell(p, key):
            r = p.get("ours")
            if not (isinstance(r, dict) and key in r and stream):
                return fmt(r, key, ".2f")
            same = p.get("read_same_bytes", {}).get(key)
            extra = f"; {100 * r[key] / same:.0f}% of {same:.2f}" if same else ""
            return f"{r[key]:.2f} ({100 * r[key] / stream:.0f}%{extra})"

        def table(key):  # a row per batch, a column per context
            contexts = sorted({p["context"] for p in sw})
            out = ["| B \\ context | " + " | ".join(map(str, contexts)) + " |",
                   "|---" * (1 + len(contexts)) + "|"]
            for b in sorted({p["B"] for p in sw}):
                out.append(f"| {b} | " + " | ".join(cell(p, key) for p in sw if p["B"] == b)
                           + " |")
            return out

        lines += ["## Decode sweep (ours, default tuning), TB/s", "", *table("TBps"), "",
                  ("Cells: TB/s of K/V read, 21 steps in one jitted fori_loop, by wall clock (% of"
                   " the read stream above; % of the same-size read stream, a row sum of as many"
                   " bytes timed in the same loop)."), ""]
        if any("TBps_device" in (p.get("ours") or {}) for p in sw):
            lines += [("The same steps by device time (the step's kernels' summed durations"
                       " under the profiler, less the loop's own kernels; the same-size read"
                       " stream likewise):"), "", *table("TBps_device"), ""]
        lines += [
            "![sweep](kernels_sweep.png)",
            "",
        ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks"))
    ap.add_argument("--only", default="ceilings,flash,decode,ragged,sweep")
    ap.add_argument("--sweep-batches", default=",".join(map(str, SWEEP_BATCHES)))
    ap.add_argument("--sweep-contexts", default=",".join(map(str, SWEEP_CONTEXTS)))
    args = ap.parse_args()
    batches = tuple(int(x) for x in args.sweep_batches.split(","))
    contexts = tuple(int(x) for x in args.sweep_contexts.split(","))
    os.makedirs(args.out, exist_ok=True)
    # The device machine's copy of the tree may carry a stale .git: pass JDECODE_GIT_SHA there.
    sha = git_sha() or "unknown"
    results = {
        "env": {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "device_kind": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "git": sha,
            "command": "PYTHONPATH=. python3 scripts/bench_kernels.py " + " ".join(sys.argv[1:]),
        }
    }
    print(results["env"])
    sections = {
        "ceilings": bench_ceilings,
        "flash": bench_flash,
        "decode": bench_decode,
        # The bar's hardest points (few sequences, short context): the launch grid, timed.
        "decode_b8": functools.partial(bench_decode, 8, 4096),
        "decode_b8_8k": functools.partial(bench_decode, 8, 8192),
        "decode_b8_pf": bench_decode_prefetch,
        "ragged": bench_ragged,
        # The default models' head size (Llama-3.2-1B, SmolLM2: D64), without the Triton grid.
        "ragged_d64": functools.partial(bench_ragged, d=64, configs=()),
    }

    def save():  # after every section and sweep point: a timeout keeps what finished
        with open(os.path.join(args.out, "kernels.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(os.path.join(args.out, "kernels.md"), "w") as f:
            f.write(markdown(results))
        if isinstance(results.get("sweep"), list) and results["sweep"]:
            try:
                plot_sweep(
                    results["sweep"],
                    os.path.join(args.out, "kernels_sweep.png"),
                    results.get("ceilings", {}),
                )
            except Exception:  # noqa: BLE001
                print(traceback.format_exc())

    results["sweep"] = []
    sections["sweep"] = functools.partial(bench_sweep, batches, contexts, results["sweep"], save)
    for name in args.only.split(","):
        try:
            results[name] = sections[name]()
        except Exception:  # noqa: BLE001 - write what we have
            results[name] = {"error": traceback.format_exc()[-2000:]}
            print(results[name]["error"])
        save()
    print(markdown(results))


if __name__ == "__main__":
    main()
