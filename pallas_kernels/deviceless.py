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
import time
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
def gpu_dispatch() -> Iterator[None]:
    """While it holds, dispatch and tuning see an H200: jax.default_backend() says "gpu" (so
    `resolve_interpret` compiles and the model takes its GPU paths) and the tuning tables read
    the H200's kind."""
    patched = [(jax, "default_backend", lambda: "gpu"),
               (flash_tuning, "device_kind", lambda: DEVICE_KIND),
               (paged_tuning, "device_kind", lambda: DEVICE_KIND)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patched]
    for mod, name, value in patched:
        setattr(mod, name, value)
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


@contextlib.contextmanager
def as_gpu() -> Iterator[None]:
    """`gpu_dispatch`, and lowering goes to CUDA under an abstract H200
    (`testing.abstract_gpu`)."""
    with gpu_dispatch(), abstract_gpu(DEVICE_KIND):
        yield


def lower(fn: Callable, *args) -> str:
    """Lowers jit(fn)(*args) for CUDA; the StableHLO text (Mosaic GPU calls are in it)."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


# The H200 as XLA:GPU's compiler sees it (a `stream_executor.GpuTargetConfigProto`): what a
# compile without the card reads instead of querying one. Figures from NVIDIA's H200 SXM
# sheet; the CUDA and cuDNN versions are those of the card's jax 0.11.2 install (CUDA 13).
H200_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 4800000000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 150754820096 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 12 }
runtime_version { major: 13 minor: 0 }
device_description_str: "NVIDIA H200"
"""


def h200_topology():
    """One H200 as a device topology of jax's CUDA plugin (no GPU needed); ImportError,
    naming the fix, where the plugin is missing."""
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(platform="cuda", topology_name="",
                                            target_config=H200_TARGET_CONFIG,
                                            topology="1x1x1")
    except Exception as e:  # noqa: BLE001 - the plugin's absence is reported, not raised raw
        raise ImportError(f"no deviceless CUDA topology ({type(e).__name__}: {e}); install "
                          "jax-cuda13-plugin (scripts/deviceless_env.sh setup does)") from e


def xla_compile(fn: Callable, *args, donate_argnums: tuple[int, ...] = (),
                timings: dict | None = None, compiler_options: dict | None = None) -> str:
    """Compiles jit(fn)(*args) with XLA:GPU for an H200 that is not there, and returns the
    optimized HLO text: the kernels XLA would launch (fusions, GEMMs, the Pallas kernels'
    custom calls), in order.

    Needs jax's CUDA plugin (jax-cuda13-plugin and -pjrt, with the nvcc and nvvm wheels), not
    a GPU: the plugin builds a device topology from `H200_TARGET_CONFIG` (`h200_topology`),
    and arguments placed on it compile for it. Without a
    card XLA does not autotune, so GEMM tiles are its heuristics', not the card's; the
    fusions and the kernel count are what the card's compiler makes of the same program,
    autotuning aside. args: arrays or ShapeDtypeStructs (pytrees), dispatched as on the card
    (`gpu_dispatch`); donate_argnums as jax.jit's (donate what the real call donates, or
    XLA copies every buffer a kernel updates in place). timings: a dict that receives the
    seconds spent lowering ("lower_s": tracing and the kernels' lowering to Triton IR) and
    compiling ("compile_s"). compiler_options: XLA options for this executable, as the
    Generator passes its loop's (`compile_options.step_compiler_options`)."""
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = topologies.make_mesh(h200_topology(), (1,), ("x",))
    sharding = NamedSharding(mesh, PartitionSpec())
    placed = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
    # The mesh's abstract view names the H200 too: Pallas asks it for the compute capability.
    with gpu_dispatch(), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        t0 = time.perf_counter()
        lowered = jax.jit(fn, donate_argnums=donate_argnums).lower(*placed)
        t1 = time.perf_counter()
        compiled = lowered.compile(compiler_options=compiler_options)
        if timings is not None:
            timings.update(lower_s=t1 - t0, compile_s=time.perf_counter() - t1)
        return compiled.as_text()


# Instructions that launch nothing (`launches`): views, tuples, parameters, and the "done"
# halves of asynchronous pairs (their "start" is the launch).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "opt-barrier", "add-dependency", "partition-id", "replica-id", "domain",
         "async-done", "async-update", "fusion-done", "copy-done"}
# Instructions that run other computations, whose launches count instead of theirs.
_CONTAINERS = {"call", "while", "conditional", "async-start"}


def launches(hlo_text: str) -> dict[str, int]:
    """Kernel launches of an optimized HLO module (`xla_compile`), by kind: the entry
    computation's instructions and those of the computations it calls (command buffers,
    async wrappers), a while loop's body counted once (one iteration) under "loop: ".

    Kinds: "pallas <name>" (a Pallas Triton kernel, by its launch name), "custom-call
    <target>", "fusion <kind>" (XLA's kLoop / kInput / kOutput, or a kCustom fusion's
    emitter: "__triton_nested_gemm_fusion" its Triton GEMMs, "__triton" its block-level
    fusions), and the opcode for the rest (copy, sort, ...).
    A proxy for kernels per step: one instruction is one kernel on XLA:GPU, except the few
    that split (a scatter with its init, a two-pass reduction)."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and " = " not in line:
            current = head.group(2)
            comps[current] = []
            entry = current if head.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    counts: dict[str, int] = {}

    def walk(name: str, prefix: str) -> None:
        for line in comps.get(name, []):
            m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = .*? ([a-z][\w\-]*)\(", line)
            if not m or m.group(1) in _FREE:
                continue
            op = m.group(1)
            if op in _CONTAINERS:
                body = re.search(r"body=%?([\w.\-]+)", line)
                if body:
                    walk(body.group(1), "loop: ")
                for called in re.findall(r"(?:to_apply|calls|branch_computations)="
                                         r"\{?%?([\w.\-]+)", line):
                    walk(called, prefix)
                continue
            if op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', line).group(1)
                pallas = re.search(r'\bname = "([\w\-]+)"', line)
                kind = (f"pallas {pallas.group(1)}" if target == "__gpu$xla.gpu.triton"
                        and pallas else f"custom-call {target}")
            elif op == "fusion":
                # kCustom fusions name their emitter: XLA's Triton GEMMs ("__triton_nested_
                # gemm_fusion"), block-level fusions ("__triton"), cuBLAS, ...
                custom = re.search(r'"kind":"(\w+)"', line)
                kind = "fusion " + (custom.group(1) if custom and "kind=kCustom" in line
                                    else re.search(r"kind=(\w+)", line).group(1))
            else:
                kind = op
            counts[prefix + kind] = counts.get(prefix + kind, 0) + 1

    walk(entry, "")
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


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


_RING = re.compile(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x([^,]+),")
_WAIT = re.compile(r"ttg\.async_wait\b.*\{num = (\d+)")


def pipelining(ttgir: str) -> dict:
    """What Triton's software pipeliner made of a kernel's loops, read from its TTGIR:

    - "rings": each buffer it allocated for async copies, as "slots x tile" (e.g.
      "1x128x128xbf16"). One slot means a load into it can only go out once the math has
      read the slot's last tile: no load overlaps the loop's math inside one program.
    - "loop_waits": the `num` of every async wait inside a loop (how many copy groups may
      stay in flight past it; 0 waits for all).
    - "loop_tensor_loads": tensor loads inside loops that are not async copies (registers).

    Why: which launch parameters a kernel can take is measured on the card, but whether its
    loop overlaps loads with math at all is decided here, and a session without a card can
    read it (benchmarks/paged_attention_h200.md, stop 68: the paged decode kernel's rings
    had one slot at every num_stages the tuning grid tried).
    """
    rings, waits, loads, depth = [], [], 0, []
    for line in ttgir.splitlines():
        indent = len(line) - len(line.lstrip())
        while depth and indent <= depth[-1] and line.strip().startswith("}"):
            depth.pop()
        if m := _RING.search(line):
            rings.append(f"{m.group(1)}x{m.group(2).strip()}")
        if depth:
            if m := _WAIT.search(line):
                waits.append(int(m.group(1)))
            if " tt.load " in line and "tensor<" in line:
                loads += 1
        if "scf.for " in line and line.rstrip().endswith("{"):
            depth.append(indent)
    return {"rings": rings, "loop_waits": waits, "loop_tensor_loads": loads}


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
    NOT_COMPILED, "shared_bytes", "pipelining" (`pipelining` of its TTGIR), and from
    `ptxas -v`: "registers", "spill_store_bytes", "spill_load_bytes" (per thread), and
    "ctas_per_sm" (`ctas_per_sm`)}."""
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
        out = {"status": "compiled", "shared_bytes": int(compiled.metadata.shared),
               "pipelining": pipelining(compiled.asm["ttgir"])}
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
