"""Compiling the Pallas kernels for an H200 on a machine without a GPU.

Why: the GPU is lent some sessions and not others, and a kernel that passes the interpreter
can still fail to compile on the card or compile badly (registers spilled, shared memory over
the limit). Lowering for CUDA needs no GPU, and the `triton` wheel compiles the Triton IR that
Pallas emits to a cubin for sm_90a with its own ptxas. Used by `scripts/deviceless_check.py`
(every kernel of the model's steps and of the kernel benchmarks) and by the CPU suite
(`tests/pallas_kernels/test_compile_sm90.py`).

Caveat: XLA compiles that IR with its own Triton (bundled in jaxlib), not the wheel's, so the
registers and shared memory here are close to the card's, not equal. Mosaic GPU kernels are
only lowered (their layout inference and TMA checks run then); their PTX is made on the card.
The private jax hooks this reads (`pallas_call_registration`) may move between versions:
`TritonCapture` raises ImportError where they did, so callers can skip.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import jax

from pallas_kernels.flash_attention import tuning as flash_tuning
from pallas_kernels.paged_attention import tuning as paged_tuning
from pallas_kernels.testing import abstract_gpu

DEVICE_KIND = "NVIDIA H200"
SM = 90  # the target's compute capability (sm_90a: wgmma and TMA)
SHARED_LIMIT = 232448  # bytes of shared memory one CTA may use on an H100/H200
NOT_COMPILED = "lowered (no triton wheel to compile with)"
# An H100/H200 SM: 64K 32-bit registers, allocated per warp in units of 256; 228 KB of shared
# memory, of which the system reserves 1 KB per CTA; at most 64 warps and 32 CTAs.
SM_REGISTERS, REG_UNIT, SM_SHARED, CTA_RESERVED, SM_WARPS, SM_CTAS = (
    65536, 256, 233472, 1024, 64, 32)
TRITON_TARGET = "__gpu$xla.gpu.triton"  # the custom call a Pallas Triton kernel lowers to


@contextlib.contextmanager
def as_gpu() -> Iterator[None]:
    """While it holds, dispatch and tuning see an H200: jax.default_backend() says "gpu" (so
    `resolve_interpret` compiles and the model takes its GPU paths) and the tuning tables read
    the H200's kind; lowering goes to CUDA under an abstract H200 (`testing.abstract_gpu`)."""
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


def lower(fn: Callable, *args) -> str:
    """Lowers jit(fn)(*args) for CUDA; the StableHLO text (Mosaic GPU calls are in it)."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def mosaic_calls(hlo_text: str) -> int:
    """How many Mosaic GPU kernels a lowered module launches."""
    return len(re.findall(r"custom_call @mosaic_gpu", hlo_text))


class TritonCapture:
    """While installed, collects every Pallas Triton kernel lowered: its module text and its
    launch's name, num_warps, num_stages and grid (from the custom call's backend config).
    Clears jax's caches on entry, so kernels lowered before are lowered again."""

    def __init__(self):
        from jax._src.pallas.triton import pallas_call_registration as reg

        if not hasattr(getattr(reg, "lowering", None), "lower_jaxpr_to_triton_module"):
            raise ImportError("this jax lowers Pallas Triton kernels differently")
        self.reg, self.kernels, self._pending = reg, [], []

    def __enter__(self) -> Self:
        reg = self.reg
        self._lower, self._call = reg.lowering.lower_jaxpr_to_triton_module, reg.mlir.custom_call

        def lower_module(*args, **kwargs):
            result = self._lower(*args, **kwargs)
            self._pending.append(result.module.operation.get_asm())
            return result

        def custom_call(*args, **kwargs):  # mlir's own: every custom call passes through
            target = kwargs.get("call_target_name", args[0] if args else None)
            if target == TRITON_TARGET and self._pending:
                cfg = kwargs["backend_config"]

                def attr(key):  # an MLIR attribute printed as "4 : i32"
                    return int(str(cfg[key]).split(":")[0])

                self.kernels.append({
                    "name": str(cfg["name"]).strip('"'), "num_warps": attr("num_warps"),
                    "num_stages": attr("num_stages"), "grid": [attr(f"grid_{a}") for a in "xyz"],
                    "ttir": self._pending.pop(0)})
            return self._call(*args, **kwargs)

        reg.lowering.lower_jaxpr_to_triton_module = lower_module
        reg.mlir.custom_call = custom_call
        jax.clear_caches()
        return self

    def __exit__(self, *exc) -> None:
        self.reg.lowering.lower_jaxpr_to_triton_module = self._lower
        self.reg.mlir.custom_call = self._call


def ctas_per_sm(registers: int, shared_bytes: int, num_warps: int) -> int:
    """How many CTAs of a kernel fit on one SM at once (occupancy), from its registers per
    thread, shared memory per CTA and warps: the least of what the register file, the shared
    memory, the warp slots and the CTA slots allow."""
    per_warp = -(-registers * 32 // REG_UNIT) * REG_UNIT
    by_registers = SM_REGISTERS // per_warp // num_warps
    by_shared = SM_SHARED // (shared_bytes + CTA_RESERVED)
    return min(by_registers, by_shared, SM_WARPS // num_warps, SM_CTAS)


def ptxas_binary() -> str | None:
    """The ptxas that reads the triton wheel's PTX: the wheel's own (its PTX version is newer
    than some CUDA installs know)."""
    try:
        import triton
    except ImportError:
        return None
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    return shutil.which("ptxas")


def compile_triton(kernel: dict, ptxas: str | None = None) -> dict:
    """Compiles one captured kernel (`TritonCapture.kernels`) for sm_90a with the triton wheel.

    Returns {"status": "compiled" | "compile error" | "over the shared memory limit" |
    NOT_COMPILED, "shared_bytes", and from `ptxas -v`: "registers", "spill_store_bytes",
    "spill_load_bytes" (per thread), and "ctas_per_sm" (`ctas_per_sm`)}."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError:
        return {"status": NOT_COMPILED}
    ptxas = ptxas or ptxas_binary()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ttir"
        src.write_text(kernel["ttir"])
        try:
            # FMA contraction on, as Triton has always compiled (and said explicitly: 3.9
            # warns when it is left to a default that 3.10 turns off).
            compiled = triton.compile(str(src), target=GPUTarget("cuda", SM, 32), options={
                "num_warps": kernel["num_warps"], "num_stages": kernel["num_stages"],
                "enable_fp_fusion": True})
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
            if out["registers"]:
                out["ctas_per_sm"] = ctas_per_sm(out["registers"], out["shared_bytes"],
                                                 kernel["num_warps"])
        if out["shared_bytes"] > SHARED_LIMIT:
            out["status"] = "over the shared memory limit"
        return out
