"""Compiles the Pallas kernels for an H200 on a machine without a GPU: what a session without
a card can still check before the next one gets it.

Why: the device is lent some sessions and not others, and a kernel that lowers and passes
the interpreter can still fail on the card (stop 37's ragged kernel failed in Mosaic GPU's
layout inference there) or compile badly (registers spilled, shared memory over the limit).
This lowers every kernel the benchmarks and the model's fused steps launch, for CUDA, under
an abstract H200, at the benchmarks' shapes:

- the model's steps (`phases.decode_step`, `phases.verify`) at the SmolLM2-135M and
  Llama-3.2-1B shapes, bf16, on abstract params and caches (nothing is allocated), under the
  fused step and the general path at the row counts the benchmarks time;
- the standalone attention kernels at issue 17's benchmark points (flash, paged decode,
  ragged, the cache write; the Hopper flash and ragged kernels through Mosaic GPU).

Each Triton kernel's module (deduplicated) is then compiled to a cubin for sm_90a by the
`triton` package, when it is installed, with the launch's num_warps and num_stages, and
ptxas reports its registers, spills and shared memory. Mosaic GPU kernels are lowered only
(their layout inference and TMA checks run then); their PTX is made on the card.

The kernels are lowered with the backend and device kind patched to a GPU's, so the same
dispatch and tuning tables choose them as on the card. Caveats: XLA compiles the Triton IR
with its own Triton, not the `triton` wheel's: registers and shared memory here are the
wheel's (close, not equal); and jax must be the card's version for its lowering checks to be
the card's (`scripts/deviceless_env.sh` builds a jax 0.11.2 environment on Python 3.13 where
the machine's Python is older).

  PYTHONPATH=. python scripts/deviceless_check.py --out out/deviceless  # deviceless.{json,md}
  PYTHONPATH=. python scripts/deviceless_check.py --only steps --models smollm2-135m
  bash scripts/deviceless_env.sh run python scripts/deviceless_check.py --out out/deviceless
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.cache.dense import init_cache
from jdecode.config import load_model_config_yaml
from jdecode.decoding import phases
from jdecode.model.fused_decode import impl_variant, with_decode_copies
from jdecode.model.layout import inference_layout
from jdecode.model.params import init_params
from jdecode.provenance import REPO_ROOT, environment
from pallas_kernels.flash_attention import flash_attention, hopper_flash_attention
from pallas_kernels.flash_attention import tuning as flash_tuning
from pallas_kernels.paged_attention import (
    paged_attention,
    ragged_paged_attention,
    write_kv_pages,
)
from pallas_kernels.paged_attention import tuning as paged_tuning
from pallas_kernels.testing import abstract_gpu

DEVICE_KIND = "NVIDIA H200"
SM = 90  # compute capability of the target
NOT_COMPILED = "lowered (no triton wheel to compile with)"
SHARED_LIMIT = 232448  # bytes of shared memory a CTA may use on an H100/H200 (opt-in maximum)


@contextlib.contextmanager
def as_gpu() -> Iterator[None]:
    """While it holds, dispatch and tuning see an H200: jax.default_backend() says "gpu" (so
    `resolve_interpret` compiles and the model picks its GPU paths) and the tuning tables read
    the H200's kind. Lowering goes to CUDA under an abstract H200 (`testing.abstract_gpu`)."""
    patched = [(jax, "default_backend", lambda: "gpu"),
               (flash_tuning, "device_kind", lambda: DEVICE_KIND),
               (paged_tuning, "device_kind", lambda: DEVICE_KIND)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patched]
    for mod, name, value in patched:
        setattr(mod, name, value)
    try:
        with abstract_gpu(DEVICE_KIND):
            yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


class Capture:
    """Collects each Triton kernel lowered while it is installed: its module text and the
    launch's name, num_warps, num_stages and grid (from the custom call's backend config)."""

    def __init__(self):
        from jax._src.pallas.triton import pallas_call_registration as reg
        self.reg, self.kernels, self._pending = reg, [], []

    def __enter__(self):
        reg = self.reg
        self._lower, self._call = reg.lowering.lower_jaxpr_to_triton_module, reg.mlir.custom_call

        def lower(*args, **kwargs):
            result = self._lower(*args, **kwargs)
            self._pending.append(result.module.operation.get_asm())
            return result

        def custom_call(*args, **kwargs):  # mlir's own: every custom call passes through
            target = kwargs.get("call_target_name", args[0] if args else None)
            if target == "__gpu$xla.gpu.triton" and self._pending:
                cfg = kwargs["backend_config"]
                self.kernels.append({
                    "name": str(cfg["name"]).strip('"'),
                    "num_warps": int(str(cfg["num_warps"]).split(":")[0]),
                    "num_stages": int(str(cfg["num_stages"]).split(":")[0]),
                    "grid": [int(str(cfg[f"grid_{a}"]).split(":")[0]) for a in "xyz"],
                    "ttir": self._pending.pop(0),
                })
            return self._call(*args, **kwargs)

        reg.lowering.lower_jaxpr_to_triton_module = lower
        reg.mlir.custom_call = custom_call
        return self

    def __exit__(self, *exc):
        self.reg.lowering.lower_jaxpr_to_triton_module = self._lower
        self.reg.mlir.custom_call = self._call


def lower(fn: Callable, *args) -> str:
    """Lowers jit(fn)(*args) for CUDA; returns the StableHLO text (Mosaic calls are in it)."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def abstract(tree):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def step_cases(models: list[str]) -> Iterator[tuple[str, Callable, tuple]]:
    """(label, fn, abstract args) of the model's steps, as bench_decode / bench_verify time
    them: fused decode at 1 and 4 rows, fused verify chains of 2..64 tokens at batch 1 and a
    tree-sized 64, the general path at batch 64."""
    for name in models:
        cfg = load_model_config_yaml(REPO_ROOT / "configs" / "models" / f"{name}.yaml")
        cfg = cfg.replace(dtype="bfloat16")
        params = jax.eval_shape(
            lambda c=cfg: with_decode_copies(inference_layout(init_params(c, jax.random.key(0)))))
        for variant, batch, tokens in [("pallas-fused", 1, 1), ("pallas-fused", 4, 1),
                                       ("pallas-fused", 1, 2), ("pallas-fused", 1, 5),
                                       ("pallas-fused", 1, 16), ("pallas-fused", 1, 64),
                                       ("pallas-fused", 2, 4), ("pallas", 64, 1)]:
            cache = abstract(jax.eval_shape(partial(init_cache, cfg, batch, 1024, per_layer=True)))
            toks = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)
            if tokens == 1:
                def fn(p, c, t, pos, cfg=cfg, variant=variant):
                    with impl_variant(variant) as impl:
                        return phases.decode_step(p, c, t[:, 0], pos[:, 0], cfg=cfg, impl=impl)
            else:
                def fn(p, c, t, pos, cfg=cfg, variant=variant):
                    with impl_variant(variant) as impl:
                        return phases.verify(p, c, t, pos, cfg=cfg, impl=impl)
            yield f"{name} {variant} B{batch} T{tokens}", fn, (params, cache, toks, toks)


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


def ptxas_binary() -> str | None:
    """The ptxas that takes the triton wheel's PTX (its own, which knows its PTX version)."""
    try:
        import triton
    except ImportError:
        return None
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    return shutil.which("ptxas")


def compile_triton(kernel: dict, ptxas: str | None) -> dict:
    """Compiles one captured module for sm_90a with the triton wheel; its resources from
    ptxas -v. Returns {"status": ...} with regs, spills and shared bytes where it compiled."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError:
        return {"status": NOT_COMPILED}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ttir"
        src.write_text(kernel["ttir"])
        try:
            compiled = triton.compile(str(src), target=GPUTarget("cuda", SM, 32), options={
                "num_warps": kernel["num_warps"], "num_stages": kernel["num_stages"]})
        except Exception as e:  # noqa: BLE001 - a compile error is the finding; keep going
            return {"status": "compile error", "error": f"{type(e).__name__}: {str(e)[:800]}"}
        out = {"status": "compiled", "shared_bytes": int(compiled.metadata.shared)}
        if ptxas:
            ptx = Path(tmp) / "kernel.ptx"
            ptx.write_text(compiled.asm["ptx"])
            info = subprocess.run([ptxas, f"-arch=sm_{SM}a", "-v", str(ptx), "-o", "/dev/null"],
                                  check=False, capture_output=True, text=True).stderr
            regs = re.search(r"Used (\d+) registers", info)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
            out["registers"] = int(regs.group(1)) if regs else None
            out["spill_store_bytes"] = int(spill.group(1)) if spill else None
            out["spill_load_bytes"] = int(spill.group(2)) if spill else None
        if out["shared_bytes"] > SHARED_LIMIT:
            out["status"] = "over the shared memory limit"
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="steps,kernels", help="steps, kernels or both")
    ap.add_argument("--models", default="smollm2-135m,llama-3.2-1b")
    ap.add_argument("--out", default="out/deviceless")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    cases = []
    if "steps" in parts:
        cases += list(step_cases(args.models.split(",")))
    if "kernels" in parts:
        cases += list(kernel_cases())

    ptxas = ptxas_binary()
    rows, seen = [], {}
    for label, fn, fargs in cases:
        row = {"case": label}
        with as_gpu(), Capture() as cap:
            try:
                text = lower(fn, *fargs)
                row["mosaic_calls"] = len(re.findall(r"custom_call @mosaic_gpu", text))
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
               "| regs | spills (st/ld B) | shared B |")
    lines = [f"# Kernels compiled for an {result['target']} without a GPU", "", header, "",
             columns, "|---" * 10 + "|"]
    for r in result["rows"]:
        head = f"| {r['case']} | {r['lowering']} | {r.get('mosaic_calls', '')} "
        if not r["triton_kernels"]:
            lines.append(head + "| | | | | | | |")
        names = {}
        for k in r["triton_kernels"]:  # one line per distinct kernel of the case
            if (k["name"], k["id"]) in names:
                continue
            names[(k["name"], k["id"])] = True
            spills = (f"{k.get('spill_store_bytes')}/{k.get('spill_load_bytes')}"
                      if k.get("spill_store_bytes") is not None else "")
            lines.append(head + f"| {k['name']} | {k['num_warps']}, {k['num_stages']} | "
                         f"{'x'.join(map(str, k['grid']))} | {k['status']} | "
                         f"{k.get('registers', '')} | {spills} | {k.get('shared_bytes', '')} |")
            head = "| | | "
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
