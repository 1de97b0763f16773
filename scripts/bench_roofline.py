"""Measured roofline record: the model's jitted prefill and decode timed beside ceilings measured
in the same run, next to the datasheet prediction.

GPU record (Llama-3.2-1B shape, random bf16 weights):
  PYTHONPATH=. python3 scripts/bench_roofline.py --out $OUT
CPU smoke run:
  PYTHONPATH=. python3 scripts/bench_roofline.py --model tiny --prefill 1x64 --decode 1x64 \
      --impls xla --out out/
Writes bench_roofline.json, bench_roofline.md and roofline_measured.png under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import jax

from jdecode.analysis.costs import decode_phase, prefill_phase
from jdecode.analysis.hardware import get_hardware
from jdecode.analysis.measure import device_kind, measure_ceilings, measure_phase, model_params
from jdecode.analysis.plots import plot_roofline
from jdecode.analysis.roofline import analyze
from jdecode.analysis.xla_check import cross_check
from jdecode.config import load_model_config_yaml
from jdecode.provenance import git_sha

ROOT = Path(__file__).resolve().parents[1]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'1x2048,64x1024' -> [(1, 2048), (64, 1024)] as (batch, tokens); 'none' -> []."""
    if text.strip().lower() == "none":
        return []
    try:
        return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    except ValueError:
        raise SystemExit(f"bad shape list {text!r}: expected BxT items, e.g. 1x2048,64x1024")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3.2-1b", help="name in configs/models/")
    ap.add_argument("--prefill", default="1x2048", help="BxT prompt shapes, or none")
    ap.add_argument("--decode", default="1x1024,64x1024", help="BxS (batch x context), or none")
    ap.add_argument("--impls", default="xla,pallas" if jax.default_backend() == "gpu" else "xla",
                    help="attention implementations to time (pallas needs the GPU)")
    ap.add_argument("--layout", default="auto",
                    help="params: auto (inference on GPU), inference (fused, unrolled), stacked")
    ap.add_argument("--datasheet", default="h100-sxm", help="hardware table entry to compare")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    cfg = load_model_config_yaml(ROOT / "configs" / "models" / f"{args.model}.yaml")
    phases = [prefill_phase(b, t) for b, t in parse_shapes(args.prefill)]
    phases += [decode_phase(b, s) for b, s in parse_shapes(args.decode)]
    sheet = get_hardware(args.datasheet)

    print(f"device {device_kind()}, jax {jax.__version__}: measuring ceilings", flush=True)
    hw = measure_ceilings(cfg.dtype, repeats=args.repeats)
    m = hw.measured
    print(f"  read {m['read_bytes_per_s'] / 1e12:.3f} TB/s, copy "
          f"{m['copy_bytes_per_s'] / 1e12:.3f} TB/s, matmul "
          f"{m['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)
    t0 = time.perf_counter()
    params = model_params(cfg, layout=args.layout)
    jax.block_until_ready(params)
    layout = args.layout if args.layout != "auto" else (
        "inference" if jax.default_backend() == "gpu" else "stacked")
    print(f"random params ({layout} layout) in {time.perf_counter() - t0:.1f} s", flush=True)

    rows = []
    for impl in args.impls.split(","):
        for phase in phases:
            label = f"{phase.name} B={phase.batch} t={phase.q_len} s={phase.kv_len} [{impl}]"
            print(f"timing {label}", flush=True)
            try:
                row = measure_phase(cfg, params, phase, hw, repeats=args.repeats, impl=impl,
                                    breakdown=True)
            # Any failure (a kernel not lowering, out of memory) is recorded and the run goes on:
            # one GPU call must return every other row.
            except Exception as e:  # noqa: BLE001
                print(f"  FAILED: {type(e).__name__}: {e}", flush=True)
                rows.append({"phase": phase.name, "impl": impl, "batch": phase.batch,
                             "q_len": phase.q_len, "kv_len": phase.kv_len,
                             "error": f"{type(e).__name__}: {e}"})
                continue
            attention = "flash" if impl == "pallas" else "unfused"
            pred = analyze(cfg, phase, sheet, convention="full", attention=attention,
                           score_bytes=4 if impl == "xla" else None)
            row["datasheet_step_s"] = pred.step_time_s
            row["datasheet_tokens_per_s"] = pred.tokens_per_s
            rows.append(row)

    print("XLA cross-check (whole model, inference layout)", flush=True)
    xla = cross_check(cfg, 1, 2048 if cfg.max_position_embeddings >= 2048 else 64)

    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device_kind(), "jax_version": jax.__version__, "git_sha": git_sha(short=False) or "unknown",
        "command": "PYTHONPATH=. python3 scripts/bench_roofline.py "
                   + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model, "layout": layout, "config": cfg.__dict__, "ceilings": hw.to_dict(),
        "datasheet": sheet.to_dict(), "phases": rows, "xla_cross_check": xla,
    }
    (args.out / "bench_roofline.json").write_text(json.dumps(result, indent=2, default=str))
    table = markdown_table(result)
    (args.out / "bench_roofline.md").write_text(table)
    ok = [r for r in rows if "error" not in r]
    if ok:
        reports = [analyze(cfg, p, hw, convention="full") for p in phases]
        plot_roofline(reports, args.out / "roofline_measured.png", ok)
    print(table)
    return result


def markdown_table(result: dict) -> str:
    m = result["ceilings"]["measured"]
    lines = [
        f"# Roofline record: {result['model']} on {result['device']}",
        "",
        (f"{result['date']}, jax {result['jax_version']}, git {result['git_sha'][:12]}, "
         f"{result['layout']} layout. "
         f"Ceilings measured in this run: read stream {m['read_bytes_per_s'] / 1e12:.3f} TB/s, "
         f"copy {m['copy_bytes_per_s'] / 1e12:.3f} TB/s, {m['dtype']} matmul "
         f"{m['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s."),
        "",
        ("| phase | impl | B | t | s | measured | bound (measured ceilings) | % of bound | "
         "datasheet bound | TFLOP/s | TB/s | tok/s | % of decode floor | compile |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["phases"]:
        if "error" in r:
            lines.append(f"| {r['phase']} | {r['impl']} | {r['batch']} | {r['q_len']} | "
                         f"{r['kv_len']} | failed: {r['error'][:80]} |||||||||")
            continue
        floor = f"{r['pct_of_floor']:.1f}" if "pct_of_floor" in r else "-"
        lines.append(
            f"| {r['phase']} | {r['impl']} | {r['batch']} | {r['q_len']} | {r['kv_len']} | "
            f"{r['step_s'] * 1e3:.3f} ms | {r['predicted_step_s'] * 1e3:.3f} ms | "
            f"{r['pct_of_bound']:.1f} | {r['datasheet_step_s'] * 1e3:.3f} ms | "
            f"{r['achieved_tflops']:.1f} | {r['achieved_tbps']:.3f} | "
            f"{r['tokens_per_s']:,.0f} | {floor} | {r['compile_s']:.1f} s |")
    lines += ["", "XLA cost_analysis vs our FLOPs (whole model): " + ", ".join(
        f"{k} {v['flop_ratio']:.4f}" for k, v in result["xla_cross_check"].items()), ""]
    for r in result["phases"]:
        if not r.get("breakdown"):
            continue
        lines += [(f"Per-operator breakdown, {r['phase']} B={r['batch']} s={r['kv_len']} "
                   f"[{r['impl']}] ({r['breakdown_note']}):"), "",
                  "| category | measured / step | roofline bound | % of bound |",
                  "|---|---|---|---|"]
        for b in r["breakdown"]:
            pct = "-" if b["pct_of_bound"] is None else f"{b['pct_of_bound']:.1f}"
            lines.append(f"| {b['category']} | {b['measured_s'] * 1e6:.1f} µs | "
                         f"{b['predicted_s'] * 1e6:.1f} µs | {pct} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
