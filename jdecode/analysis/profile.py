"""Per-operator measured time from a profiler trace, matched to the cost model's rows.

Each XLA op (kernel or fusion) in the trace carries its HLO name. A matmul is attributed by
its shapes (contracted size, output width: [E, H*D] is a Q projection, [E, V] the LM head, a
batched dot over head_dim is attention), because XLA's backends rewrite dots and often drop
their source metadata (on CPU every weight matmul loses it). Any other op is attributed by
the innermost Python function that produced it (`rms_norm`, `attention_xla`, `swiglu_mlp`,
...), read from the compiled HLO text; a fusion by its root instruction, so a residual add
fused into a matmul's epilogue counts as the matmul. What has neither shape nor metadata is
reported as unattributed, never guessed. Where the trace itself is missing,
`profile_breakdown` returns None and a reason.
"""

from __future__ import annotations

import collections
import glob
import math
import re
import tempfile
from collections.abc import Callable

from jdecode.analysis.roofline import PhaseReport

# Operator categories, each a set of the cost model's row names.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "norms": ("attn_norm", "mlp_norm", "final_norm"),
    "q/k/v projections": ("q_proj", "k_proj", "v_proj"),
    "rope": ("rope",),
    "kv append": ("kv_append",),
    "attention": ("attention", "attention_flash"),
    "o projection": ("o_proj",),
    "residual adds": ("resid_attn", "resid_mlp"),
    "gate/up/down projections": ("gate_proj", "up_proj", "down_proj"),
    "swiglu": ("swiglu",),
    "lm head": ("lm_head",),
    "embedding and other": ("embed",),
    # Not in the cost model: the stacked layout's scan slices every layer's weights out of
    # the [L, ...] stacks (on CPU a copy per layer per step).
    "per-layer weight slices (scan)": (),
    "unattributed (no shape, no source metadata)": (),
}
UNATTRIBUTED = "unattributed (no shape, no source metadata)"

# Innermost model function -> category (None: decided by whether the op is a matmul).
_FUNCTIONS = {
    "rms_norm": "norms", "_project": "q/k/v projections", "apply_rope": "rope",
    "dense_attend": "kv append", "attention_xla": "attention", "attention": "attention",
    "attention_pallas": "attention", "dense_decode_pallas": "attention",
    "flash_attention": "attention", "paged_attention": "attention", "lm_head": "lm head",
    # causal_attention_tiled and its per-tile helpers (prefill on the XLA path)
    "causal_attention_tiled": "attention", "query_tile": "attention", "key_tile": "attention",
    "tile_scores": "attention", "tile_values": "attention", "tile_mask": "attention",
    "decoder_layer": None, "swiglu_mlp": None,
}
_CONTAINERS = ("while", "conditional", "call", "async-start", "async-done")


def hlo_op_functions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Maps every HLO instruction name to (op_name metadata, innermost function name).

    Reads the StackFrames / FileLocations / FunctionNames tables of the compiled module's
    text (jax >= 0.6); instructions without a stack frame get function "".
    """
    tables = {}
    for section in ("FunctionNames", "FileLocations", "StackFrames"):
        m = re.search(rf"^{section}\n((?:\d+ .*\n?)*)", hlo_text, re.MULTILINE)
        tables[section] = dict(re.findall(r"^(\d+) (.*)$", m.group(1), re.MULTILINE)) if m else {}
    names = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
    loc_fn = {k: re.search(r"function_name_id=(\d+)", v).group(1)
              for k, v in tables["FileLocations"].items() if "function_name_id" in v}
    frame_loc = {k: re.search(r"file_location_id=(\d+)", v).group(1)
                 for k, v in tables["StackFrames"].items() if "file_location_id" in v}
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if not m:
            continue
        op_name = re.search(r'op_name="([^"]*)"', line)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        function = names.get(loc_fn.get(frame_loc.get(frame.group(1), ""), ""), "") \
            if frame else ""
        container = re.search(rf"\b({'|'.join(_CONTAINERS)})\(", line) is not None
        out[m.group(1)] = (op_name.group(1) if op_name else "", "<container>" if container
                           else function)
    return out


def categorize(op_name: str, function: str) -> str:
    """The cost-model category of one XLA op from its op_name and innermost function."""
    is_dot = op_name.endswith("dot_general")
    if "dynamic_index_in_dim" in op_name:  # lax.scan slicing a layer out of stacked params
        return "per-layer weight slices (scan)"
    if not function and not op_name:
        return UNATTRIBUTED
    if function in _FUNCTIONS and _FUNCTIONS[function] is not None:
        return _FUNCTIONS[function]
    if function in ("xla_linear", "pallas_linear", "gemv"):  # the projections' matmul helper
        return "o projection" if "/o_proj/" in op_name else "q/k/v projections"
    if function == "decoder_layer":  # o projection, residual adds; fused gate/up + SwiGLU
        mlp = "/mlp/" in op_name
        if is_dot:
            return "gate/up/down projections" if mlp else "o projection"
        return "swiglu" if mlp and not op_name.endswith("/add") else "residual adds"
    if function == "swiglu_mlp":
        return "gate/up/down projections" if is_dot else "swiglu"
    return "embedding and other"


_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\((.*?)\)")


def _dims(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _attr(line: str, name: str) -> list[int]:
    m = re.search(rf"{name}={{([\d,]*)}}", line)
    return _dims(m.group(1)) if m else []


def hlo_matmuls(hlo_text: str) -> dict[str, dict]:
    """Every op that runs a matmul: a dot, or a fusion whose computation holds one.

    Returns:
      op name -> {"k": contracted size, "m", "n": the lhs's and rhs's free sizes, "batched":
      whether the dot has batch dimensions (attention's do, a weight's do not), "inputs": the
      ops feeding it (for a fusion, the fusion's operands)}.
    """
    shapes: dict[str, list[int]] = {}
    comp_dot: dict[str, tuple[str, list[str], dict[str, int]]] = {}  # computation -> its dot
    calls: dict[str, tuple[str, list[str]]] = {}  # op -> (called computation, operands)
    dots: dict[str, tuple[str, list[str]]] = {}
    comp, params = None, {}
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and " = " not in line:
            comp, params = head.group(1), {}
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, _, dims, opcode, args = m.groups()
        shapes[name] = _dims(dims)
        operands = re.findall(r"%([\w.\-]+)", args)
        if opcode == "parameter":
            params[name] = int(args)
        elif opcode == "dot":
            dots[name] = (line, operands)
            if comp is not None:
                comp_dot[comp] = (line, operands, dict(params))
        elif opcode in ("fusion", "call") and (callee := re.search(r"calls=%([\w.\-]+)", line)):
            calls[name] = (callee.group(1), operands)

    def info(line: str, lhs: list[int], rhs: list[int], inputs: list[str]) -> dict:
        def free(shape, side):
            skip = set(_attr(line, f"{side}_contracting_dims")) | set(
                _attr(line, f"{side}_batch_dims"))
            return int(math.prod([d for i, d in enumerate(shape) if i not in skip]))

        k = int(math.prod([lhs[i] for i in _attr(line, "lhs_contracting_dims")]))
        return {"k": k, "m": free(lhs, "lhs"), "n": free(rhs, "rhs"),
                "batched": bool(_attr(line, "rhs_batch_dims")), "inputs": inputs}

    out = {}
    for name, (line, operands) in dots.items():
        if len(operands) >= 2 and all(o in shapes for o in operands[:2]):
            out[name] = info(line, shapes[operands[0]], shapes[operands[1]], operands[:2])
    for name, (callee, operands) in calls.items():
        if callee not in comp_dot:
            continue
        line, inner, params = comp_dot[callee]
        if len(inner) < 2 or any(x not in shapes for x in inner[:2]):
            continue
        # a dot operand that is the fusion's parameter i is the fusion's operand i
        inputs = [operands[params[x]] if x in params and params[x] < len(operands) else x
                  for x in inner[:2]]
        out[name] = info(line, shapes[inner[0]], shapes[inner[1]], inputs)
    return out


def matmul_category(cfg, mm: dict, shares_input: bool) -> str | None:
    """The category of a matmul from its shapes (see `hlo_matmuls`), or None if its shape is
    none of the model's. shares_input: another matmul reads one of its inputs (Q, K and V
    read the normed activations together; O reads attention's output alone), which tells Q
    from O when H*D == E."""
    e, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, kv, d = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
    if mm["batched"]:
        return "attention" if d in (mm["k"], mm["m"], mm["n"]) else None
    kinds = [((e, h), "q/k/v projections"), ((e, kv), "q/k/v projections"),
             ((e, h + 2 * kv), "q/k/v projections"), ((h, e), "o projection"),
             ((e, f), "gate/up/down projections"), ((e, 2 * f), "gate/up/down projections"),
             ((f, e), "gate/up/down projections"), ((e, v), "lm head")]
    for width in (mm["n"], mm["m"]):  # the weight may be either operand
        if h == e and (mm["k"], width) == (e, e):
            return "q/k/v projections" if shares_input else "o projection"
        found = {cat for shape, cat in kinds if shape == (mm["k"], width)}
        if len(found) == 1:
            return found.pop()
        if found:  # two operators of this shape (a small model): let the metadata decide
            return None
    return None


def _stream_events(data):
    """Every event on a trace's device stream lines (not the host plane, and not a device
    plane's derived lines, which repeat the stream's kernels)."""
    for plane in data.planes:
        if plane.name.startswith("/device:"):
            for line in plane.lines:
                if line.name.startswith("Stream"):
                    yield from line.events


def stream_kernels(data) -> list[tuple[str, int, int]]:
    """(kernel name, start_ns, duration_ns) of every kernel on a trace's device stream lines.

    Unlike the HLO-op view of `_trace_events`, this includes kernels that carry no HLO op
    (Pallas custom calls, named by the kernel itself, e.g. gate_up_swiglu), of every module.
    """
    return [(ev.name, ev.start_ns, ev.duration_ns) for ev in _stream_events(data)]


# Hopper's (and Ampere's) resident-thread limit per SM: what CUPTI's occupancy is a share of.
MAX_THREADS_PER_SM = 2048


def parse_launch(details: str) -> dict:
    """The launch of a kernel from its trace stat `kernel_details`, which XLA's CUPTI collector
    writes as "regs:R static_shared:S dynamic_shared:D grid:X,Y,Z block:X,Y,Z occ_pct:P".

    -> {"regs", "smem_bytes" (static + dynamic), "ctas", "threads" (per CTA), "occ_pct",
    "ctas_per_sm"}: the fields found, numbers only ({} for an empty text). ctas_per_sm is how
    many CTAs the occupancy lets an SM hold at once (occ_pct of MAX_THREADS_PER_SM). Why: a
    grid's waves (ctas / (ctas_per_sm * SMs)) tell a streaming kernel's per-program ramp from
    its read rate, and the trace already carries them.
    """
    fields = dict(kv.split(":", 1) for kv in details.split() if ":" in kv)
    out: dict = {}

    def dims(key):
        return math.prod(int(x) for x in fields[key].split(","))

    if "regs" in fields:
        out["regs"] = int(fields["regs"])
    if "static_shared" in fields or "dynamic_shared" in fields:
        out["smem_bytes"] = (int(fields.get("static_shared", 0))
                             + int(fields.get("dynamic_shared", 0)))
    if "grid" in fields:
        out["ctas"] = dims("grid")
    if "block" in fields:
        out["threads"] = dims("block")
    if "occ_pct" in fields:
        out["occ_pct"] = float(fields["occ_pct"])
        if out.get("threads"):
            out["ctas_per_sm"] = round(out["occ_pct"] / 100 * MAX_THREADS_PER_SM
                                       / out["threads"], 2)
    return out


def stream_launches(data) -> dict[str, dict]:
    """Kernel name -> `parse_launch` of its first launch on a trace's device stream lines
    (a kernel whose trace carries no `kernel_details` is left out)."""
    out: dict[str, dict] = {}
    for ev in _stream_events(data):
        if ev.name not in out and (details := dict(ev.stats).get("kernel_details")):
            out[ev.name] = parse_launch(str(details))
    return out


def _profiled(run: Callable[[], object], repeats: int):
    """The profiler's trace (`jax.profiler.ProfileData`) of `repeats` runs of `run`, or None
    when it wrote none. Raises ImportError where this jax has no ProfileData."""
    import jax  # here, not at the top: the command line reads CATEGORIES without jax
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        try:
            for _ in range(repeats):
                jax.block_until_ready(run())
        finally:
            jax.profiler.stop_trace()
        paths = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        return ProfileData.from_file(paths[0]) if paths else None


def _stream_trace(run: Callable[[], object], repeats: int) -> list[tuple[str, int, int]]:
    """`stream_kernels` of `repeats` runs of `run` under the profiler ([] where no trace)."""
    data = _profiled(run, repeats)
    return stream_kernels(data) if data is not None else []


def kernel_device_us(run: Callable[[], object], names: tuple[str, ...], repeats: int = 10
                     ) -> dict[str, float]:
    """Median device microseconds per launch of each kernel whose name contains one of
    `names`, over `repeats` runs of `run` under the profiler (GPU only: on CPU nothing runs
    on a device stream, and the result is empty).

    Why device time: a kernel of 2-5 us is smaller than a jit's dispatch, so wall time per
    call ranks such kernels by noise (benchmarks/fused_decode_h200.md)."""
    import numpy as np

    kernels = _stream_trace(run, repeats)
    out = {}
    for name in names:
        durs = [d for k, _, d in kernels if name in k]
        if durs:
            out[name] = float(np.median(durs)) * 1e-3
    return out


def device_busy_us(run: Callable[[], object], repeats: int = 10) -> float | None:
    """Device microseconds per run of `run`: all its kernels' durations summed (None where no
    kernel ran on a device stream, e.g. on CPU). Gaps between kernels are not counted."""
    kernels = _stream_trace(run, repeats)
    return sum(d for _, _, d in kernels) * 1e-3 / repeats if kernels else None


def device_span_us(run: Callable[[], object], repeats: int = 10) -> float | None:
    """Median device microseconds per run of `run` from its first kernel's start to its last
    kernel's end: the kernels and the gaps between them, without the host's dispatch before
    the first. None where no kernel ran on a device stream, or where the runs did not launch
    equally many kernels (each run must be the same jitted step).

    Why beside `device_busy_us`: a kernel that waits on the one before it pays a launch gap
    outside its duration (~1.4 us on the H200, scripts/probe_pdl.py), so summed durations
    flatter a chain of small kernels against one kernel that does their work."""
    import numpy as np

    kernels = sorted(_stream_trace(run, repeats), key=lambda k: k[1])
    if not kernels or len(kernels) % repeats:
        return None
    per = len(kernels) // repeats
    spans = [max(s + d for _, s, d in kernels[i:i + per]) - kernels[i][1]
             for i in range(0, len(kernels), per)]
    return float(np.median(spans)) * 1e-3


def kernel_tally(run: Callable[[], object], repeats: int = 10, top: int | None = None
                 ) -> list[dict]:
    """The kernels (the `top` ones, or all) by device time per run of `run`, most first:
    name, launches per run, device us per run and per launch. Empty where nothing runs on a
    device stream (CPU) or this jax cannot read traces. Kernel names, not HLO ops: Pallas
    kernels appear under their own names (see `stream_kernels`). "launch": the kernel's grid,
    registers, shared memory and occupancy (`parse_launch`; {} where the trace has none)."""
    try:
        data = _profiled(run, repeats)
    except ImportError:  # no jax.profiler.ProfileData
        return []
    if data is None:
        return []
    calls: collections.Counter = collections.Counter()
    ns: collections.Counter = collections.Counter()
    for name, _, dur in stream_kernels(data):
        calls[name] += 1
        ns[name] += dur
    launches = stream_launches(data)
    return [{"kernel": k, "calls_per_run": calls[k] / repeats,
             "us_per_run": ns[k] * 1e-3 / repeats, "us_per_call": ns[k] * 1e-3 / calls[k],
             "launch": launches.get(k, {})}
            for k, _ in ns.most_common(top)]


def _trace_events(run: Callable[[], object], repeats: int, module: str
                  ) -> dict[str, float] | str:
    """Total device (else host) time per HLO op name over `repeats` runs, or a reason."""
    try:
        data = _profiled(run, repeats)
    except ImportError:
        return "jax.profiler.ProfileData is not available in this jax"
    if data is None:
        return "the profiler wrote no xplane.pb trace"
    per_line: dict[tuple[str, str], dict[str, float]] = {}
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                stats = dict(ev.stats)
                hlo_op, hlo_module = stats.get("hlo_op"), str(stats.get("hlo_module", ""))
                if not hlo_op or not hlo_module.startswith(module):
                    continue
                bucket = per_line.setdefault((plane.name, line.name), collections.Counter())
                bucket[str(hlo_op)] += ev.duration_ns * 1e-9
    if not per_line:
        return f"no trace events carry hlo_op for module {module!r}"
    device = {k: v for k, v in per_line.items() if k[0].startswith("/device:")}
    lines = device or per_line
    # A device plane may repeat the kernels of its streams on a derived "XLA Ops" line.
    xla_ops = {k: v for k, v in lines.items() if k[1] == "XLA Ops"}
    total: collections.Counter = collections.Counter()
    for counter in (xla_ops or lines).values():
        total.update(counter)
    return dict(total)


def profile_breakdown(compiled, run: Callable[[], object], rep: PhaseReport,
                      repeats: int = 5, cfg=None) -> tuple[list[dict] | None, str]:
    """Measured seconds per step per category beside the roofline prediction.

    Args:
      compiled: the `jax.stages.Compiled` being timed. run: one call of it.
      rep: the cost model's PhaseReport for the same phase (the predicted times).
      cfg: the model's config, to attribute matmuls by shape (without it, by metadata only).
    Returns:
      (rows, note): rows of {"category", "measured_s", "predicted_s", "pct_of_bound"} per step,
      or (None, reason) when the trace cannot be attributed.
    """
    text = compiled.as_text()
    ops = hlo_op_functions(text)
    matmuls = hlo_matmuls(text) if cfg is not None else {}
    readers = collections.Counter(x for mm in matmuls.values() for x in set(mm["inputs"]))
    if not any(fn not in ("", "<container>") for _, fn in ops.values()):
        return None, "the compiled HLO carries no stack-frame metadata to attribute ops"
    module = re.search(r"^HloModule ([\w.\-]+)", text, re.MULTILINE)
    times = _trace_events(run, repeats, module.group(1) if module else "jit_")
    if isinstance(times, str):
        return None, times
    measured: collections.Counter = collections.Counter()
    unmatched = 0.0
    for hlo_op, seconds in times.items():
        op_name, function = ops.get(hlo_op, ("", ""))
        if function == "<container>":
            continue  # a while loop's own span contains its body's ops
        if hlo_op not in ops:
            unmatched += seconds
        mm = matmuls.get(hlo_op)
        by_shape = mm and matmul_category(cfg, mm, any(readers[x] > 1 for x in mm["inputs"]))
        measured[by_shape or categorize(op_name, function)] += seconds / repeats
    predicted = collections.Counter()
    for r in rep.rows:
        if r.op.alternative:
            continue
        n = rep.num_layers if r.op.per_layer else 1
        cat = next(c for c, names in CATEGORIES.items() if r.op.name in names)
        predicted[cat] += r.time_s * n
    rows = [{"category": c, "measured_s": measured[c], "predicted_s": predicted[c],
             "pct_of_bound": (100.0 * predicted[c] / measured[c]
                              if measured[c] and predicted[c] else None)}
            for c in CATEGORIES]
    note = f"{sum(measured.values()):.3g} s/step attributed from the trace"
    if unmatched:
        note += f"; {unmatched / repeats:.3g} s/step from ops not in the HLO text"
    return rows, note
