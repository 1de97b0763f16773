"""Does programmatic dependent launch (PDL) reach our Pallas Triton kernels? (issue 16)

Why: at batch 1 a decode step is ~100-175 short kernels, and each one's launch, ramp and tail
is most of its time (benchmarks/fused_decode_h200.md). Hopper's PDL lets a kernel start while
the one before it finishes: the later kernel runs up to `griddepcontrol.wait` (e.g. issues
its weight loads, which depend on nothing earlier) and the earlier one says when its
dependents may start (`griddepcontrol.launch_dependents`). XLA has a flag for it
(`--xla_gpu_enable_pdl`); whether it launches a Pallas kernel that way is what this finds out.

Three checks, each in a fresh process per XLA_FLAGS setting (default, pdl=true, pdl=false):

- race: kernel A triggers its dependents at once, then spins ~0.3 ms and sets a flag; kernel
  B reads the flag, then waits (`griddepcontrol.wait`), then reads it again. B reading 0 then 1
  means B was launched while A ran: PDL is live for our launches. 1 and 1: not.
- chain: N tiny dependent kernels; us per kernel with no PDL instructions, with a wait at the
  start, and with launch_dependents + wait.
- ptx: griddepcontrol instructions in the dumped PTX of each kernel (does XLA insert its own?).

  device: PYTHONPATH=. python3 scripts/probe_pdl.py --out $OUT
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

i32, f32 = jnp.int32, jnp.float32
N = 128
WAIT = "griddepcontrol.wait;\n\tmov.b32 $0, $1;"
LAUNCH = "griddepcontrol.launch_dependents;\n\tmov.b32 $0, $1;"


def _asm(x, asm):
    """x [N] int32 passed through `asm`; using the result orders what follows after it."""
    (y,) = plgpu.elementwise_inline_asm(asm, args=[x], constraints="=r,r", pack=1,
                                        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, i32)])
    return y


def _call(kernel, name, out_shape, *args, aliases=None):
    return pl.pallas_call(kernel, out_shape=out_shape, input_output_aliases=aliases or {},
                          compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
                          name=name)(*args)


def race_a(flag_in_ref, flag_ref, *, iters: int):
    del flag_in_ref  # aliased to flag_ref: zero until this kernel's store
    z = _asm(jnp.zeros((N,), i32), LAUNCH)
    v = jax.lax.fori_loop(0, iters, lambda i, v: v * 1.000001 + 1e-7, z.astype(f32) + 1.0)
    flag_ref[...] = (v > 0).astype(i32) + z


def race_b(flag_ref, o_ref):
    before = plgpu.load(flag_ref.at[pl.ds(0, N)], volatile=True)
    s = jnp.min(_asm(before, WAIT) * 0)  # 0, known only after the wait
    after = plgpu.load(flag_ref.at[pl.ds(s, N)], volatile=True)
    o_ref[0, :] = before
    o_ref[1, :] = after


def chain_step(x_ref, o_ref, *, mode: str):
    z = jnp.zeros((N,), i32)
    if mode == "launch+wait":
        z = _asm(z, LAUNCH)
    if mode in ("wait", "launch+wait"):
        z = _asm(z, WAIT) * 0
    s = jnp.min(z)
    o_ref[...] = plgpu.load(x_ref.at[pl.ds(s, N)]) + 1


def child(out: str) -> dict:
    res: dict = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__,
                 "device": str(jax.devices()[0].device_kind)}
    import functools

    @jax.jit
    def race(zeros):
        flag = _call(functools.partial(race_a, iters=50_000), "race_a",
                     jax.ShapeDtypeStruct((N,), i32), zeros, aliases={0: 0})
        return _call(race_b, "race_b", jax.ShapeDtypeStruct((2, N), i32), flag)

    outs = [jax.device_get(race(jnp.zeros((N,), i32))) for _ in range(5)]
    res["race_before_after"] = [[int(o[0].min()), int(o[0].max()), int(o[1].min())]
                                for o in outs]

    for mode in ("plain", "wait", "launch+wait"):
        step = functools.partial(chain_step, mode=mode)
        name = "chain_" + mode.replace("+", "_")

        @jax.jit
        def chain(x, step=step, name=name):
            for _ in range(200):
                x = _call(step, name, jax.ShapeDtypeStruct((N,), i32), x)
            return x

        x = jnp.zeros((N,), i32)
        r = chain(x).block_until_ready()
        assert int(r[0]) == 200, r
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            chain(x).block_until_ready()
            times.append((time.perf_counter() - t0) / 200 * 1e6)
        res[f"chain_us_per_kernel_{mode}"] = round(min(times), 3)
    return res


def ptx_counts(dump: str) -> dict:
    counts = {}
    for path in glob.glob(os.path.join(dump, "*.ptx")):
        with open(path) as f:
            text = f.read()
        n_wait = text.count("griddepcontrol.wait")
        n_launch = text.count("griddepcontrol.launch_dependents")
        if n_wait or n_launch:
            counts[os.path.basename(path)] = [n_wait, n_launch]
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.out)), flush=True)
        return
    os.makedirs(args.out, exist_ok=True)
    results = []
    for flag in ("", "--xla_gpu_enable_pdl=true", "--xla_gpu_enable_pdl=false"):
        dump = tempfile.mkdtemp()
        env = dict(os.environ, XLA_FLAGS=f"{flag} --xla_dump_to={dump}".strip())
        p = subprocess.run([sys.executable, __file__, "--child", "--out", args.out], env=env,
                           capture_output=True, text=True, timeout=300, check=False)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        r = json.loads(line[0][7:]) if line else {"xla_flags": flag, "error": p.stderr[-3000:]}
        r["ptx_griddepcontrol_wait_launch"] = ptx_counts(dump)
        results.append(r)
        print(json.dumps(r, indent=1), flush=True)
    with open(os.path.join(args.out, "probe_pdl.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
