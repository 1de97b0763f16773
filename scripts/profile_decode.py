"""Where a decode step's time goes: per-kernel device time inside jdecode's generate loop.

Traces one `Generator.generate` call (after a warm-up) and reports, per decode step: the
number of kernels, their summed device time, the wall time, and the top ops by time with the
model function that produced each (from the HLO metadata). Wall minus busy time is the idle
gap between kernels (launch latency, host syncs).

GPU: PYTHONPATH=. python3 scripts/profile_decode.py --model llama-3.2-1b --batch 1 --out $OUT
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jdecode.analysis.profile import hlo_op_functions, stream_kernels, stream_launches
from jdecode.config import load_model_config_yaml
from jdecode.decoding.generate import Generator
from jdecode.decoding.sampling import SamplingParams
from jdecode.io.registry import Model
from jdecode.model.fused_decode import impl_variant
from jdecode.model.params import init_params


def load_trace(trace_dir: str):
    """The profiler's XSpace of a trace directory (`jax.profiler.ProfileData`)."""
    from jax.profiler import ProfileData

    return ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])


def tally(events: list[tuple[str, int, int]]) -> dict[str, list]:
    """name -> [calls, summed seconds] over (name, start_ns, duration_ns) events."""
    out: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for name, _, dur in events:
        out[name][0] += 1
        out[name][1] += dur * 1e-9
    return out


def loop_events(data, module: str) -> list[tuple[str, int, int]]:
    """(hlo_op, start_ns, duration_ns) of every kernel of `module` on the device.

    A device plane may list a kernel on its stream line and again on a derived "XLA Ops" line;
    the derived line is used when present. CPU runs have host-side op events only.
    """
    lines: dict[tuple[bool, str], list] = collections.defaultdict(list)
    seen = collections.Counter()
    for plane in data.planes:
        on_device = plane.name.startswith("/device:")
        for line in plane.lines:
            for ev in line.events:
                stats = dict(ev.stats)
                seen[(plane.name[:30], line.name[:30], str(stats.get("hlo_module", ""))[:30])] += 1
                if module not in str(stats.get("hlo_module", "")) or "hlo_op" not in stats:
                    continue
                lines[(on_device, line.name)].append(
                    (str(stats["hlo_op"]), ev.start_ns, ev.duration_ns))
    device = {k: v for k, v in lines.items() if k[0]}
    if device:
        return device.get((True, "XLA Ops")) or [e for v in device.values() for e in v]
    if lines:
        return [e for v in lines.values() for e in v]
    raise SystemExit(f"no events of module {module!r}; seen (plane, line, module): "
                     f"{seen.most_common(15)}")


def in_window(events: list[tuple[str, int, int]], first: int, last: int
              ) -> list[tuple[str, int, int]]:
    """The (name, start_ns, duration_ns) events lying wholly inside [first, last] ns."""
    return [e for e in events if e[1] >= first and e[1] + e[2] <= last]


def per_step(calls: int, seconds: float, steps: int) -> dict:
    """A tally entry as the tables print it: calls and device us per step, us per call."""
    return dict(calls_per_step=calls / steps, us_per_step=1e6 * seconds / steps,
                us_per_call=1e6 * seconds / calls)


def kernel_table(kernels: list[tuple[str, int, int]], steps: int,
                 launches: dict[str, dict] | None = None) -> list[dict]:
    """Per kernel name (cut to 60 characters), `per_step`, and its "launch" (grid, registers,
    shared memory, occupancy) where `launches` (`stream_launches`) has it; costliest first."""
    by_kernel = tally([(name[:60], start, dur) for name, start, dur in kernels])
    cut = {name[:60]: launch for name, launch in (launches or {}).items()}
    return [dict(kernel=k, **per_step(c, t, steps), launch=cut.get(k, {}))
            for k, (c, t) in sorted(by_kernel.items(), key=lambda kv: -kv[1][1])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--impl", default="pallas",
                    help="xla, pallas, or pallas-fused (pallas with the opt-in fused decode step)")
    ap.add_argument("--dtype", default=None, help="override the config's dtype")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default="out")
    args = ap.parse_args()

    cfg = load_model_config_yaml(f"configs/models/{args.model}.yaml")
    cfg = cfg.replace(dtype=args.dtype or cfg.dtype)
    model = Model(args.model, cfg, init_params(cfg, jax.random.key(0)), None)
    sp = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size,
                                                (args.batch, args.prompt_len)).tolist()
    with impl_variant(args.impl) as impl:  # holds while the first generate traces
        gen = Generator(model, impl=impl, layout="inference")
        gen.generate(prompts, sp)  # compile and warm up
    (exe,) = gen._compiled.values()
    ops = hlo_op_functions(exe.loop.as_text())
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        t0 = time.perf_counter()
        res = gen.generate(prompts, sp)
        wall = time.perf_counter() - t0
        jax.profiler.stop_trace()
        # A while loop's own span contains its body's kernels: count the kernels only.
        trace = load_trace(tmp)
        events = [e for e in loop_events(trace, "run_loop")
                  if ops.get(e[0], ("", ""))[1] != "<container>"]
        try:
            kernels, launches = stream_kernels(trace), stream_launches(trace)
        except Exception as e:  # noqa: BLE001 - the per-kernel view is an addition
            print(f"device_kernels: {e!r}")
            kernels, launches = [], {}
    steps = res[0].stats["decode_steps"]
    per_op = tally(events)
    busy = sum(d for _, _, d in events) * 1e-9
    first = min(s for _, s, _ in events)
    last = max(s + d for _, s, d in events)
    # The stream view spans the whole generate call, prefill included; only the kernels inside
    # the loop's window are the decode steps' (with command buffers on, the op view above sees
    # one command_buffer op per ~150 kernels, so this is the only per-kernel view of a step).
    kernel_rows = kernel_table(in_window(kernels, first, last), steps, launches)
    span = (last - first) * 1e-9
    top = sorted(per_op.items(), key=lambda kv: -kv[1][1])[:args.top]
    # The same op in every layer has its own name (fusion.12, fusion.13, ...): group them by
    # producing function and op kind to see which kind of kernel the step spends its time in.
    groups = collections.defaultdict(lambda: [0, 0.0])
    for k, (c, t) in per_op.items():
        kind = re.sub(r"[._]\d+$", "", k)
        g = groups[(ops.get(k, ("", ""))[1], kind, ops.get(k, ("", ""))[0].split("/")[-1])]
        g[0] += c
        g[1] += t
    result = dict(
        device=str(jax.devices()[0].device_kind), jax_version=jax.__version__,
        model=args.model, dtype=cfg.dtype, batch=args.batch, impl=args.impl, steps=steps,
        generate_wall_s=wall, loop_span_s=span,
        per_step=dict(kernels=len(events) / steps, busy_ms=1e3 * busy / steps,
                      span_ms=1e3 * span / steps, idle_ms=1e3 * (span - busy) / steps),
        device_kernels_per_step=sum(r["calls_per_step"] for r in kernel_rows),
        device_busy_ms_per_step=sum(r["us_per_step"] for r in kernel_rows) / 1e3,
        kernels=kernel_rows,  # the decode loop's, per step
        # the whole call's (prefill too), per step
        call_kernels=kernel_table(kernels, steps, launches),
        groups=[dict(function=f, kind=kind, last_op=last, **per_step(c, t, steps))
                for (f, kind, last), (c, t) in sorted(groups.items(), key=lambda kv: -kv[1][1])],
        top_ops=[dict(op=k, function=ops.get(k, ('', ''))[1], op_name=ops.get(k, ('', ''))[0][-90:],
                      **per_step(c, t, steps)) for k, (c, t) in top])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"profile_decode_{args.model}_{cfg.dtype}_{args.impl}_b{args.batch}.json"
    (out / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["per_step"]))
    for r in result["groups"][:args.top]:
        print(f"{r['us_per_step']:8.1f} us/step {r['calls_per_step']:6.1f}x "
              f"{r['us_per_call']:7.1f} us  {r['function']:<22} {r['kind']:<36} {r['last_op']}")
    print(f"device stream kernels in the loop: {result['device_kernels_per_step']:.1f}/step, "
          f"{result['device_busy_ms_per_step']:.3f} ms busy/step")
    for r in kernel_rows[:args.top]:
        ln = r["launch"]
        grid = (f"{ln.get('ctas', '?')} CTAs x {ln.get('threads', '?')} threads, "
                f"{ln.get('ctas_per_sm', '?')} an SM") if ln else ""
        print(f"{r['us_per_step']:8.1f} us/step {r['calls_per_step']:6.1f}x "
              f"{r['us_per_call']:7.2f} us  {r['kernel']}  {grid}")
    print("top single ops:")
    for r in result["top_ops"][:10]:
        print(f"{r['us_per_step']:8.1f} us/step {r['calls_per_step']:5.1f}x "
              f"{r['us_per_call']:7.1f} us  {r['function']:<22} {r['op']:<40} {r['op_name']}")


if __name__ == "__main__":
    main()
