"""`jdecode roofline`: per-operator roofline of a model's prefill and decode, the seed's table
(`--preset textbook`), measured ceilings and timings (`--measure`), JSON and PNG outputs.

The lead's `jdecode/cli.py` registers it: `app.command("roofline")(roofline)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from jdecode.analysis import report as rpt
from jdecode.analysis.costs import CONVENTIONS, Phase, decode_phase, prefill_phase
from jdecode.analysis.hardware import ALIASES, HARDWARE, get_hardware
from jdecode.analysis.roofline import PhaseReport, analyze, decode_tokens_per_s_vs_batch
from jdecode.analysis.textbook import (
    NUMBERING_NOTE,
    TEXTBOOK_BATCH,
    TEXTBOOK_CONFIG,
    TEXTBOOK_SEQ,
    formula_checks,
    seed_formulas,
    textbook_conclusions,
    textbook_reports,
    textbook_summary,
)
from jdecode.config import DTYPES, ConfigError, ModelConfig
from jdecode.console import fail, stdout
from jdecode.io import registry
from jdecode.provenance import git_sha

PHASES = ("prefill", "decode", "both")
BATCH_SWEEP = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def resolve_model(model: str, overrides: tuple[str, ...] = ()) -> tuple[str, ModelConfig]:
    """--model -> (label, shape): a model config (name in configs/models/ or YAML path), an HF
    checkpoint directory (its config.json) or a .gguf file (its metadata); no weights load."""
    try:
        cfg = registry.load_config(model, overrides)
    except (FileNotFoundError, ConfigError) as e:
        fail(str(e))
    path = Path(model)
    return (path.stem if path.suffix in (".gguf", ".yaml", ".yml") else path.name), cfg


def check_hardware(value: str) -> str:
    """--hardware: a table entry (or alias) or `measured`, checked before anything runs."""
    if value != "measured":
        try:
            get_hardware(value)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    return value


def _choice(name: str, value: str, allowed) -> str:
    if value not in allowed:
        raise typer.BadParameter(f"{name} {value!r}: choose one of {', '.join(allowed)}")
    return value


def _phases(phase: str, batch: int, seq: int) -> list[Phase]:
    out = []
    if phase in ("prefill", "both"):
        out.append(prefill_phase(batch, seq))
    if phase in ("decode", "both"):
        out.append(decode_phase(batch, seq))
    return out


def roofline(
    model: Annotated[str, typer.Option(
        help="Model name in configs/models/, a YAML path, an HF checkpoint directory or a "
             ".gguf file (the shape is read from it; no weights load).")] = "smollm2-135m",
    preset: Annotated[str | None, typer.Option(
        help="'textbook': the seed's B=8 T=1024 H=4096 D=128 table on an A100-80G.")] = None,
    phase: Annotated[str, typer.Option(help="prefill | decode | both")] = "both",
    batch: Annotated[int, typer.Option(help="Sequences per step (B).")] = 1,
    seq: Annotated[int, typer.Option(
        help="Prompt length for prefill; cached context length for decode.")] = 1024,
    hardware: Annotated[str, typer.Option(
        callback=check_hardware,
        help=f"{' | '.join(HARDWARE)} (aliases {', '.join(ALIASES)}) | measured (ceilings "
             "measured on this device).")] = "h100-sxm",
    dtype: Annotated[str | None, typer.Option(help="Element type; default: the model's.")]
    = None,
    convention: Annotated[str | None, typer.Option(
        help="Bytes: 'textbook' (reads only, the seed's) or 'full' (reads + writes). "
             "Default: textbook with --preset textbook, else full.")] = None,
    attention: Annotated[str, typer.Option(
        help="Attention summed into totals: unfused | flash.")] = "unfused",
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Write the full report (config, device, git sha, metrics) here.")]
    = None,
    plot: Annotated[Path | None, typer.Option(
        help="Roofline PNG; a tok/s-vs-batch plot is written beside it (*_batch.png).")]
    = None,
    measure: Annotated[bool, typer.Option(
        "--measure", help="Time the jitted phases here with random params, ceilings measured "
                          "in the same run.")] = False,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Model config override key=value (repeatable).")] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per measurement (median).")] = 10,
    impl: Annotated[str, typer.Option(
        help="Attention implementation timed by --measure: xla | pallas.")] = "xla",
    layout: Annotated[str, typer.Option(
        help="Param layout timed by --measure: auto | inference (fused, unrolled) | "
             "stacked (scan).")] = "auto",
) -> None:
    """Per-operator FLOPs, bytes, intensity and bound of prefill and decode on a GPU."""
    console = stdout()
    _choice("--phase", phase, PHASES)
    _choice("--attention", attention, ("unfused", "flash"))
    _choice("--impl", impl, ("xla", "pallas"))
    _choice("--layout", layout, ("auto", "inference", "stacked"))
    out: dict = {"git_sha": git_sha(short=False) or "unknown"}
    if preset is not None:
        _choice("--preset", preset, ("textbook",))
        conv = _choice("--convention", convention or "textbook", CONVENTIONS)
        out.update(_run_textbook(console, conv, attention, phase, plot))
    else:
        conv = _choice("--convention", convention or "full", CONVENTIONS)
        label, cfg = resolve_model(model, tuple(set_ or ()))
        if dtype in DTYPES:  # float8/int8 stay analysis-only: the model runs f32/bf16/f16
            cfg = cfg.replace(dtype=dtype)
        out.update(_run_model(console, label, cfg, dtype or cfg.dtype, conv, attention, phase,
                              batch, seq, hardware, measure, plot, repeats, impl, layout))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(out, indent=2, default=str))
        console.print(f"wrote {json_path}")


def _run_textbook(console: Console, conv: str, attention: str, phase: str,
                  plot: Path | None) -> dict:
    summary = textbook_summary(conv)
    console.print(rpt.seed_table(summary))
    console.print(rpt.seed_formula_table(seed_formulas(), formula_checks()))
    for line in textbook_conclusions(summary):
        console.print("• " + line)
    reports = [r for r in textbook_reports(conv, attention)
               if phase == "both" or r.phase.name == phase]
    for rep in reports:
        rpt.print_phase(console, rep)
    if plot is not None:
        _plots(console, reports, TEXTBOOK_CONFIG, TEXTBOOK_SEQ, plot, "textbook", attention,
               None)
    return {"preset": "textbook", "batch": TEXTBOOK_BATCH, "seq": TEXTBOOK_SEQ,
            "config": TEXTBOOK_CONFIG.__dict__, "summary": summary,
            "conclusions": textbook_conclusions(summary),
            "reports": [r.to_dict() for r in reports]}


def _run_model(console: Console, label: str, cfg: ModelConfig, dtype: str, conv: str,
               attention: str, phase: str, batch: int, seq: int, hardware: str, measure: bool,
               plot: Path | None, repeats: int, impl: str, layout: str) -> dict:
    import jax

    from jdecode.analysis.measure import device_kind

    out: dict = {"model": label, "config": cfg.__dict__, "jax_version": jax.__version__,
                 "device": device_kind(), "batch": batch, "seq": seq}
    measured_hw = None
    if measure or hardware == "measured":
        from jdecode.analysis.measure import measure_ceilings

        with console.status("measuring ceilings (read stream, copy, matmul)"):
            measured_hw = measure_ceilings(dtype, repeats=repeats)
    hw = measured_hw if hardware == "measured" else get_hardware(hardware)
    phases = _phases(phase, batch, seq)
    reports = [analyze(cfg, p, hw, dtype=dtype, convention=conv, attention=attention,
                       model=label) for p in phases]
    for rep in reports:
        rpt.print_phase(console, rep)
    if len(reports) > 1:
        console.print(NUMBERING_NOTE, highlight=False)
    out["reports"] = [r.to_dict() for r in reports]
    measured = None
    if measure:
        from jdecode.analysis.measure import run_measured

        with console.status("timing the jitted phases") as status:
            result = run_measured(cfg, phases, hw=measured_hw, convention=conv,
                                  repeats=repeats, impl=impl, layout=layout, breakdown=True,
                                  progress=lambda m: status.update(m))
        console.print(rpt.measured_table(result))
        for r in result["phases"]:
            console.print(rpt.breakdown_table(r))
        measured = result["phases"]
        out["measured"] = result
    if plot is not None:
        _plots(console, reports, cfg, seq, plot, label, attention, measured)
    return out


def _plots(console: Console, reports: list[PhaseReport], cfg: ModelConfig, seq: int,
           plot: Path, label: str, attention: str, measured: list[dict] | None) -> None:
    from jdecode.analysis.plots import plot_roofline, plot_tokens_vs_batch

    rep0 = reports[0]
    plot_roofline(reports, plot, measured)
    curve = decode_tokens_per_s_vs_batch(cfg, rep0.hardware, seq, BATCH_SWEEP,
                                         dtype=rep0.dtype, convention=rep0.convention,
                                         attention=attention)
    batch_png = plot.with_name(plot.stem + "_batch.png")
    plot_tokens_vs_batch(curve, batch_png,
                         f"{label}: predicted decode tok/s vs batch, context {seq}, "
                         f"{rep0.hardware.name}, {attention} attention")
    console.print(f"wrote {plot} and {batch_png}")
