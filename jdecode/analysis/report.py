"""Terminal rendering (rich) of roofline reports, the seed's table and measured results."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from jdecode.analysis.profile import UNATTRIBUTED
from jdecode.analysis.roofline import PhaseReport
from jdecode.analysis.textbook import CONVENTION_WORDS, NUMBERING_NOTE


def si(x: float, unit: str = "") -> str:
    """Engineering notation: 2.73e12 -> '2.73 T'."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def seconds(x: float) -> str:
    if x >= 1:
        return f"{x:.3g} s"
    if x >= 1e-3:
        return f"{x * 1e3:.3g} ms"
    return f"{x * 1e6:.3g} µs"


def phase_table(rep: PhaseReport) -> Table:
    """One row per operator: FLOPs, bytes read / written, intensity, bound, roofline time."""
    p = rep.phase
    title = (f"{rep.model or 'model'} {p.name}: B={p.batch} t={p.q_len} s={p.kv_len} on "
             f"{rep.hardware.name} ({rep.dtype}, {rep.convention} bytes, ridge "
             f"{rep.ridge:.1f} FLOP/B)")
    table = Table(title=title, title_justify="left")
    for col, justify in (("op", "left"), ("seed", "center"), ("FLOPs", "right"),
                         ("read", "right"), ("written", "right"), (f"bytes ({rep.convention})",
                                                                   "right"),
                         ("FLOP/B", "right"), ("bound", "left"), ("time", "right"),
                         ("% step", "right")):
        table.add_column(col, justify=justify)
    step = rep.step_time_s
    for r in rep.rows:
        n = rep.num_layers if r.op.per_layer else 1
        name = r.op.name + (" ×L" if r.op.per_layer else "")
        share = "-" if r.op.alternative else f"{100 * r.time_s * n / step:.1f}"
        style = "dim" if r.op.alternative else ("red" if r.bound == "memory" else "green")
        label = name + (" (alt)" if r.op.alternative else "")
        table.add_row(label, r.op.seed, si(r.op.flops), si(r.op.bytes_read, "B"),
                      si(r.op.bytes_written, "B"), si(r.bytes, "B"), f"{r.intensity:.1f}",
                      r.bound, seconds(r.time_s), share, style=style)
    lt = rep.layer_totals()
    table.add_section()
    table.add_row("layer total", "", si(lt["flops"]), "", "", si(lt["bytes"], "B"),
                  f"{lt['flops'] / lt['bytes']:.1f}", "", seconds(lt["time_s"]), "")
    table.add_row("model total", "", si(rep.flops), "", "", si(rep.bytes, "B"),
                  f"{rep.intensity:.1f}",
                  "compute" if rep.intensity > rep.ridge else "memory",
                  seconds(rep.step_time_s), "100")
    return table


def phase_summary(rep: PhaseReport) -> str:
    unit = "prompt tok/s" if rep.phase.name == "prefill" else "tok/s"
    return (f"predicted step {seconds(rep.step_time_s)} (sum of per-operator bounds; perfectly "
            f"fused {seconds(rep.fused_time_s)}) -> {rep.tokens_per_s:,.0f} {unit}")


def seed_table(summary: dict) -> Table:
    """The seed's headline numbers with our cost model's values and bounds."""
    table = Table(title=f"The seed's table (B=8 T=1024 H=4096 D=128, A100-80G, "
                        f"{summary['convention']} bytes: what each operator reads)",
                  title_justify="left",
                  caption="FFN rows: the seed's formulas 6 and 8 also count the output "
                          "written, which gives "
                          f"{summary['prefill']['ffn_with_writes']['intensity']:.1f} for both "
                          "(see the formulas table and --convention full).",
                  caption_justify="left")
    for col in ("phase", "operators", "FLOP/byte", "bound"):
        table.add_column(col)
    rows = [("prefill", "linear (① Q/K/V, ④ O)", summary["prefill"]["linear"]),
            ("prefill", "attention (③, unfused)", summary["prefill"]["attention"]),
            ("prefill", "other ops (②⑤⑦⑨)", summary["prefill"]["other"]),
            ("prefill", "FFN gate/up (⑥)", summary["prefill"]["ffn_gate_up"]),
            ("prefill", "FFN down (⑧)", summary["prefill"]["ffn_down"]),
            ("prefill", "attention, fused (flash)", summary["prefill"]["attention_flash"]),
            ("decode", "linear (①⑤⑦⑨)", summary["decode"]["linear"]),
            ("decode", "attention (④)", summary["decode"]["attention"])]
    for phase, ops, e in rows:
        table.add_row(phase, ops, f"{e['intensity']:.1f}", e["bound"],
                      style="green" if e["bound"] == "compute" else "red")
    return table


def seed_formula_table(formulas: dict, checks: dict | None = None) -> Table:
    """The seed's intensity formulas, evaluated (constants of the O(.) set to 1), beside the
    cost model's value for the same operator under the bytes the formula counts (`checks`,
    from `textbook.formula_checks`)."""
    table = Table(title="The seed's formulas, evaluated", title_justify="left",
                  caption=NUMBERING_NOTE, caption_justify="left")
    for col in ("phase", "#", "operation", "intensity formula", "value", "cost model"):
        table.add_column(col)
    for phase, rows in formulas.items():
        for number, op, formula, value in rows:
            check = (checks or {}).get(phase, {}).get(number)
            model = "" if check is None else (
                f"{check[0]:.1f} ({CONVENTION_WORDS[check[1]]})")
            table.add_row(phase, number, op, formula, f"{value:.1f}", model)
    return table


def measured_table(result: dict) -> Table:
    """Measured mode: achieved rates beside the prediction, per phase."""
    ceil = result["ceilings"]
    m = ceil.get("measured") or {}
    title = (f"measured on {result['device']} (jax {result['jax_version']}): read stream "
             f"{si(m.get('read_bytes_per_s', ceil['bandwidth_bytes_per_s']), 'B/s')}, copy "
             f"{si(m.get('copy_bytes_per_s', float('nan')), 'B/s')}, matmul "
             f"{si(next(iter(ceil['peak_flops'].values())), 'FLOP/s')}")
    table = Table(title=title, title_justify="left")
    for col in ("phase", "B", "t", "s", "step", "predicted", "% of bound", "TFLOP/s", "TB/s",
                "tok/s", "compile"):
        table.add_column(col, justify="right")
    for r in result["phases"]:
        table.add_row(r["phase"], str(r["batch"]), str(r["q_len"]), str(r["kv_len"]),
                      seconds(r["step_s"]), seconds(r["predicted_step_s"]),
                      f"{r['pct_of_bound']:.1f}", f"{r['achieved_tflops']:.3g}",
                      f"{r['achieved_tbps']:.3g}", f"{r['tokens_per_s']:,.0f}",
                      seconds(r["compile_s"]))
    return table


def breakdown_table(r: dict) -> Table | str:
    """Measured time per operator category (profiler trace) beside the roofline bound."""
    head = f"{r['phase']} B={r['batch']} t={r['q_len']} s={r['kv_len']} [{r.get('impl', 'xla')}]"
    if not r.get("breakdown"):
        return f"per-operator breakdown of {head}: not available ({r.get('breakdown_note')})"
    measured = {row["category"]: row["measured_s"] for row in r["breakdown"]}
    notes = ["% of bound = roofline bound / measured time, per category."]
    if measured.get("per-layer weight slices (scan)"):
        notes.append("Weight slices: the stacked layout's lax.scan copies each layer's weights "
                     "out of the [L, ...] stacks; the roofline does not model this "
                     "(--layout inference unrolls the layers).")
    if measured.get(UNATTRIBUTED):
        notes.append("Unattributed: ops that are not matmuls and carry no source metadata "
                     "(XLA dropped it), so no category can be named for them.")
    if any((row["pct_of_bound"] or 0) > 100 for row in r["breakdown"]):
        notes.append("Above 100%: the op ran faster than the ceilings this bound assumes "
                     "(on CPU the measured ceilings come from a small matmul and stream).")
    if any(row["predicted_s"] and not row["measured_s"] for row in r["breakdown"]):
        notes.append("'not seen': no op of the trace was attributed to that category (XLA "
                     "fused it into another category's kernel).")
    table = Table(title=f"per-operator breakdown of {head}: {r['breakdown_note']}",
                  title_justify="left", caption=" ".join(notes), caption_justify="left")
    for col in ("category", "measured / step", "roofline bound", "% of bound"):
        table.add_column(col, justify="left" if col == "category" else "right")
    for row in r["breakdown"]:
        if not row["predicted_s"]:
            pct = "not modelled" if row["measured_s"] else "-"
        elif not row["measured_s"]:
            pct = "not seen"
        else:
            pct = f"{row['pct_of_bound']:.1f}"
        table.add_row(row["category"], seconds(row["measured_s"]), seconds(row["predicted_s"]),
                      pct)
    return table


def print_phase(console: Console, rep: PhaseReport) -> None:
    console.print(phase_table(rep))
    console.print(phase_summary(rep))
