"""Compiles the Pallas kernels for an H200 on a machine without a GPU: what a session without
a card can still check before the next one gets it.

Why: the device is lent some sessions and not others, and a kernel that lowers and passes
the interpreter can still fail on the card (stop 37's ragged kernel failed in Mosaic GPU's
layout inference there) or compile badly (registers spilled, shared memory over the limit).
This lowers every kernel the benchmarks and the model's fused steps launch, for CUDA, under
an abstract H200, at the benchmarks' shapes:

- the model's steps (`phases.decode_step`, `phases.verify`) at the SmolLM2-135M and
  Llama-3.2-1B shapes, bf16 (or `--dtypes`), on abstract params and caches (nothing is
  allocated), under the fused step and the general path at the row counts the benchmarks time;
- the engine's decode-only step of 1 and 4 rows over a page pool
  (`fused_paged_decode_step`, which the runner's decode buckets take by default), and of 64
  rows (the general path's forward and sample, `runner._forward_sample`);
- the standalone attention kernels at issue 17's benchmark points (flash, paged decode,
  ragged, the cache write; the Hopper flash and ragged kernels through Mosaic GPU).

Each Triton kernel's module (deduplicated) is then compiled to a cubin for sm_90a by the
`triton` wheel, where it is installed, with the launch's num_warps and num_stages, and
ptxas reports its registers, spills and shared memory; Mosaic GPU kernels are lowered only.
The kernels are lowered with dispatch and tuning patched to see an H200, so the launch
parameters are the card's. What the figures mean and do not: `pallas_kernels/deviceless.py`.
jax should be the card's version for its lowering checks to be the card's
(`scripts/deviceless_env.sh` builds jax 0.11.2 on Python 3.13 where the machine's Python is
older).

  PYTHONPATH=. python scripts/deviceless_check.py --out out/deviceless  # deviceless.{json,md}
  PYTHONPATH=. python scripts/deviceless_check.py --only steps --models smollm2-135m
  PYTHONPATH=. python scripts/deviceless_check.py --only steps --dtypes float32  # f32 steps
  bash scripts/deviceless_env.sh run python scripts/deviceless_check.py --out out/deviceless
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.analysis.deviceless_cases import (
    engine_forward_case,
    engine_fused_case,
    model_params,
    step_case,
)
from jdecode.config import DTYPES
from jdecode.provenance import environment
from pallas_kernels.deviceless import (
    DEVICE_KIND,
    NOT_COMPILED,
    SM,
    TritonCapture,
    as_gpu,
    compile_triton,
    lower,
    mosaic_calls,
    ptxas_binary,
)
from pallas_kernels.flash_attention import flash_attention, hopper_flash_attention
from pallas_kernels.paged_attention import (
    paged_attention,
    ragged_paged_attention,
    write_kv_pages,
)

# (impl variant, batch, tokens per row) of the steps lowered: the fused decode step at 1 and
# 4 rows, fused verify chains of 2..64 tokens at batch 1 (64: a tree's size) and 2 x 4, and
# the general step at batch 64, as bench_decode and bench_verify time them.
STEPS = [("pallas-fused", 1, 1), ("pallas-fused", 4, 1), ("pallas-fused", 1, 2),
         ("pallas-fused", 1, 5), ("pallas-fused", 1, 16), ("pallas-fused", 1, 64),
         ("pallas-fused", 2, 4), ("pallas", 64, 1)]


# Rows of the engine's decode-only steps lowered (`engine_fused_case`): its decode buckets
# 1 and 4; and of its general decode-only step (`engine_forward_case`, the writing paged
# kernel under `paged_config`'s launch): a full batch of 64.
ENGINE_ROWS = (1, 4)
ENGINE_GENERAL_ROWS = (64,)


def step_cases(models: list[str], dtypes: tuple[str, ...] = ("bfloat16",)
               ) -> Iterator[tuple[str, Callable, tuple]]:
    """(label, fn, abstract args) of every STEPS step and ENGINE_ROWS engine step of each
    model in each dtype (labels name a dtype other than bf16)."""
    for name in models:
        for dtype in dtypes:
            cfg, params = model_params(name, dtype)
            tag = "" if dtype == "bfloat16" else f" {dtype}"
            for variant, batch, tokens in STEPS:
                yield (f"{name}{tag} {variant} B{batch} T{tokens}",
                       *step_case(cfg, params, variant, batch, tokens))
            for rows in ENGINE_ROWS:
                yield (f"{name}{tag} engine fused decode B{rows}",
                       *engine_fused_case(cfg, params, rows))
            for rows in ENGINE_GENERAL_ROWS:
                yield (f"{name}{tag} engine general decode B{rows}",
                       *engine_forward_case(cfg, params, rows))


def kernel_cases() -> Iterator[tuple[str, Callable, tuple]]:
    """Issue 17's benchmark points, at a batch small enough to lower quickly (the launch
    parameters depend on the per-sequence shape, not on how many sequences)."""
    bf16 = jnp.bfloat16

    def z(*shape, dtype=bf16):
        return jax.ShapeDtypeStruct(shape, dtype)

    for d in (64, 128):
        for causal in (True, False):
            q, kv = z(1, 4096, 32, d), z(1, 4096, 8, d)
            yield (f"flash triton D{d} causal={causal} T4096",
                   partial(flash_attention, causal=causal, interpret=False, backend="triton"),
                   (q, kv, kv))
            yield (f"flash mosaic D{d} causal={causal} T4096",
                   partial(hopper_flash_attention, causal=causal, interpret=False), (q, kv, kv))
    for b, s in ((1, 4096), (8, 4096), (32, 4096), (8, 32768)):
        pool = z(b * s // 16 + 8, 16, 8, 128)
        args = (z(b, 32, 128), pool, pool, z(b, s // 16, dtype=jnp.int32), z(b, dtype=jnp.int32))
        yield f"paged decode B{b} S{s}", partial(paged_attention, interpret=False), args
        if (b, s) == (8, 4096):  # where the bar is missed (issue 17): the loops that keep a
            # block in flight, by hand and by Triton's pipeliner at 5 stages
            yield (f"paged decode B{b} S{s} prefetch bk64 w4",
                   partial(paged_attention, interpret=False, prefetch=True, block_k=64,
                           num_warps=4), args)
            yield (f"paged decode B{b} S{s} bk64 w4 5 stages",
                   partial(paged_attention, interpret=False, block_k=64, num_warps=4,
                           num_stages=5), args)
    q_lens = [1] * 28 + [512] * 4
    qsl = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    for d in (64, 128):
        pool = z(32 * 256 + 8, 16, 8, d)
        args = (z(sum(q_lens), 32, d), pool, pool, z(32, 256, dtype=jnp.int32),
                z(32, dtype=jnp.int32), qsl)
        for backend in ("triton", "mosaic"):
            yield (f"ragged {backend} D{d} 28 decodes + 4x512",
                   partial(ragged_paged_attention, interpret=False, backend=backend), args)
    pool = z(4096, 16, 8, 128)
    new = z(64, 8, 128)
    yield ("write_kv_pages 64 tokens", partial(write_kv_pages, interpret=False),
           (pool, pool, new, new, z(64, dtype=jnp.int32)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="steps,kernels", help="steps, kernels or both")
    ap.add_argument("--models", default="smollm2-135m,llama-3.2-1b")
    ap.add_argument("--dtypes", default="bfloat16",
                    help="the steps' dtypes, e.g. bfloat16,float32 (SmolLM2's config is f32: "
                         "its kernels spill where bf16's do not, benchmarks/"
                         "engine_decode_h200.md stop 56)")
    ap.add_argument("--out", default="out/deviceless")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    dtypes = tuple(args.dtypes.split(","))
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise SystemExit(f"--dtypes: {dtype!r} is not one of {', '.join(DTYPES)}")
    cases = []
    if "steps" in parts:
        cases += list(step_cases(args.models.split(","), dtypes))
    if "kernels" in parts:
        cases += list(kernel_cases())

    ptxas = ptxas_binary()
    rows, seen = [], {}
    for label, fn, fargs in cases:
        row = {"case": label}
        with as_gpu(), TritonCapture() as cap:
            try:
                text = lower(fn, *fargs)
                row["mosaic_calls"] = mosaic_calls(text)
                row["lowering"] = "ok"
            except Exception as e:  # noqa: BLE001 - a lowering error is the finding
                row["lowering"] = f"error: {type(e).__name__}: {str(e)[:300]}"
                row["traceback"] = traceback.format_exc()[-3000:]
        row["triton_kernels"] = []
        for k in cap.kernels:
            key = hashlib.sha1(
                f"{k['ttir']}|{k['num_warps']}|{k['num_stages']}".encode()).hexdigest()[:12]
            if key not in seen:
                seen[key] = compile_triton(k, ptxas)
            row["triton_kernels"].append({"name": k["name"], "num_warps": k["num_warps"],
                                          "num_stages": k["num_stages"], "grid": k["grid"],
                                          "id": key, **seen[key]})
        rows.append(row)
        print(json.dumps({x: v for x, v in row.items() if x != "traceback"}), flush=True)

    env = environment()
    result = {**env, "command": "python " + " ".join(sys.argv), "target": DEVICE_KIND,
              "sm": SM, "rows": rows}
    try:
        import triton
        result["triton_wheel"] = triton.__version__
    except ImportError:
        result["triton_wheel"] = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deviceless.json").write_text(json.dumps(result, indent=1))
    (out / "deviceless.md").write_text(markdown(result))
    print(f"wrote {out}/deviceless.json and .md")
    fine = ("compiled", NOT_COMPILED)
    if any(r["lowering"] != "ok" or any(k["status"] not in fine for k in r["triton_kernels"])
           for r in rows):
        sys.exit(1)


def markdown(result: dict) -> str:
    header = (f"{result.get('date', '')} | jax {result.get('jax_version')} | triton wheel "
              f"{result['triton_wheel']} | git {result.get('git_sha')} | `{result['command']}`")
    columns = ("| case | lowering | Mosaic calls | Triton kernel | warps, stages | grid | status "
               "| regs | spills (st/ld B) | shared B | CTAs/SM | async-copy rings; loop waits |")
    lines = [f"# Kernels compiled for an {result['target']} without a GPU", "", header, "",
             "Rings: the buffers Triton's pipeliner made, slots x tile (one slot: no load "
             "overlaps the loop's math in a program); loop waits: how many copy groups each "
             "wait in a loop leaves in flight (`deviceless.pipelining`).", "",
             columns, "|---" * 12 + "|"]
    for r in result["rows"]:
        head = f"| {r['case']} | {r['lowering']} | {r.get('mosaic_calls', '')} "
        if not r["triton_kernels"]:
            lines.append(head + "| | | | | | | | | |")
        names = {}
        for k in r["triton_kernels"]:  # one line per distinct kernel of the case
            if (k["name"], k["id"]) in names:
                continue
            names[(k["name"], k["id"])] = True
            spills = (f"{k.get('spill_store_bytes')}/{k.get('spill_load_bytes')}"
                      if k.get("spill_store_bytes") is not None else "")
            pipe = k.get("pipelining") or {}
            rings = ", ".join(pipe.get("rings", [])) or "none"
            waits = ",".join(map(str, pipe.get("loop_waits", []))) or "-"
            lines.append(head + f"| {k['name']} | {k['num_warps']}, {k['num_stages']} | "
                         f"{'x'.join(map(str, k['grid']))} | {k['status']} | "
                         f"{k.get('registers', '')} | {spills} | {k.get('shared_bytes', '')} | "
                         f"{k.get('ctas_per_sm', '')} | {rings if pipe else ''}"
                         f"{'; ' + waits if pipe else ''} |")
            head = "| | | "
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
