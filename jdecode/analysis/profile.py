"""Per-operator measured time from a profiler trace, matched to the cost model's rows.

Each XLA op (kernel or fusion) in the trace carries its HLO name; the compiled HLO text maps
that name to the innermost Python function that produced it (`rms_norm`, `_project`,
`attention_xla`, `swiglu_mlp`, ...), which maps to the cost model's operators. A fusion is
attributed by its root instruction, so a residual add fused into a matmul's epilogue counts
as the matmul. Where the trace or the metadata is missing, `profile_breakdown` returns None
and a reason instead of guessing.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
from collections.abc import Callable

import jax

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
}

# Innermost model function -> category (None: decided by whether the op is a matmul).
_FUNCTIONS = {
    "rms_norm": "norms", "_project": "q/k/v projections", "apply_rope": "rope",
    "dense_attend": "kv append", "attention_xla": "attention", "attention": "attention",
    "attention_pallas": "attention", "dense_decode_pallas": "attention",
    "flash_attention": "attention", "paged_attention": "attention", "lm_head": "lm head",
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


def _trace_events(run: Callable[[], object], repeats: int, module: str
                  ) -> dict[str, float] | str:
    """Total device (else host) time per HLO op name over `repeats` runs, or a reason."""
    try:
        from jax.profiler import ProfileData
    except ImportError:
        return "jax.profiler.ProfileData is not available in this jax"
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        try:
            for _ in range(repeats):
                jax.block_until_ready(run())
        finally:
            jax.profiler.stop_trace()
        paths = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        if not paths:
            return "the profiler wrote no xplane.pb trace"
        data = ProfileData.from_file(paths[0])
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
                      repeats: int = 5) -> tuple[list[dict] | None, str]:
    """Measured seconds per step per category beside the roofline prediction.

    Args:
      compiled: the `jax.stages.Compiled` being timed. run: one call of it.
      rep: the cost model's PhaseReport for the same phase (the predicted times).
    Returns:
      (rows, note): rows of {"category", "measured_s", "predicted_s", "pct_of_bound"} per step,
      or (None, reason) when the trace cannot be attributed.
    """
    text = compiled.as_text()
    ops = hlo_op_functions(text)
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
        measured[categorize(op_name, function)] += seconds / repeats
    predicted = collections.Counter()
    for r in rep.rows:
        if r.op.alternative:
            continue
        n = rep.num_layers if r.op.per_layer else 1
        cat = next(c for c, names in CATEGORIES.items() if r.op.name in names)
        predicted[cat] += r.time_s * n
    rows = [{"category": c, "measured_s": measured[c], "predicted_s": predicted[c],
             "pct_of_bound": 100.0 * predicted[c] / measured[c] if measured[c] else None}
            for c in CATEGORIES]
    note = f"{sum(measured.values()):.3g} s/step attributed from the trace"
    if unmatched:
        note += f"; {unmatched / repeats:.3g} s/step from ops not in the HLO text"
    return rows, note
