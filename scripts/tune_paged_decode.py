"""Tunes the paged decode kernel on this GPU: a launch-parameter grid, then the best
configurations across batch and context, every anchor timed in the same run.

    PYTHONPATH=. python3 scripts/tune_paged_decode.py --out $OUT

Stage 1 times every (block_k, num_warps, num_stages, num_splits) of the grid at B32 S4096
(GQA 32/8, D128, bf16, page 16; --first, --head-dim and --page change the shape: the 1B
model's batch-64 decode over the dense cache is `--head-dim 64 --page 64 --first 64x640`). Stage 2 takes the best few (block_k, warps, stages) and
tries each with several split counts and the default heuristic at the points of --points. Each variant is checked against the f32 reference before it is timed
(scripts/bench_kernels.py: rotating block tables over >= 256 MB, so the L2 never serves K/V).
Writes paged_decode_tuning.json and .md under --out after every point.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys

import jax

from jdecode.provenance import git_sha
from scripts.bench_kernels import bench_ceilings, bench_decode_point, bench_ragged

# The ragged kernel's chunk items: (query rows per program, block_k, warps, stages).
RAGGED_GRID = [
    (rows, bk, w, st)
    for rows in (64, 128, 256)
    for bk in (64, 128)
    for w, st in ((4, 2), (4, 3), (8, 2), (8, 3))
]

GRID = {
    "block_k": (64, 128, 256),
    "warps_stages": ((4, 2), (4, 3), (4, 4), (8, 2), (8, 3)),
    "num_splits": (1, 2, 4),
}


def name_of(kw: dict) -> str:
    s = kw.get("num_splits")
    return (f"bk{kw['block_k']}_w{kw['num_warps']}_s{kw['num_stages']}"
            f"_split{'auto' if s is None else s}")


def grid_variants() -> dict:
    out = {}
    for bk, (w, st), ns in itertools.product(
        GRID["block_k"], GRID["warps_stages"], GRID["num_splits"]
    ):
        kw = {"block_k": bk, "num_warps": w, "num_stages": st, "num_splits": ns}
        out[name_of(kw)] = kw
    return out


def header(title: str, env: dict) -> list[str]:
    return [
        f"# {title}",
        "",
        f"- date: {env['date']}; card: {env['device_kind']}; jax {env['jax']}; git {env['git']}",
        f"- command: `{env['command']}`",
    ]


def write(out: str, stem: str, res: dict, md: str) -> None:
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(md)


def ragged_markdown(res: dict) -> str:
    rows = [(n, r) for n, r in res["ragged"].items() if isinstance(r, dict) and "us" in r]
    lines = header("Ragged mixed-batch tuning", res["env"])
    lines += [f"- shape: {res['ragged']['shape']}", "", "| variant | us |", "|---|---|"]
    lines += [f"| {n} | {r['us']:.1f} |" for n, r in sorted(rows, key=lambda nr: nr[1]["us"])]
    return "\n".join(lines) + "\n"


def markdown(res: dict) -> str:
    lines = header("Paged decode tuning", res["env"]) + [
        f"- read stream (same run, `measure_ceilings`): {res.get('ceilings', {}).get('read_stream_TBps', float('nan')):.2f} TB/s",
        "",
    ]
    for point in res.get("points", []):
        rows = [(n, r) for n, r in point.items() if isinstance(r, dict) and "TBps" in r]
        rows.sort(key=lambda nr: -nr[1]["TBps"])
        lines += [f"## B{point['B']} S{point['context']} ({point['kv_bytes'] / 1e6:.0f} MB of K/V)",
                  "", "| variant | us | TB/s |", "|---|---|---|"]
        lines += [f"| {n} | {r['us']:.1f} | {r['TBps']:.2f} |" for n, r in rows]
        errs = [n for n, r in point.items() if isinstance(r, dict) and "error" in r]
        if errs:
            lines += ["", "errors: " + ", ".join(errs)]
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks"))
    ap.add_argument("--points", default="8x4096,64x4096,8x16384,32x16384,1x32768")
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--splits", default="1,2,4,8")
    ap.add_argument("--first", default="32x4096", help="BxS of the stage-1 grid")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--ragged", action="store_true",
                    help="instead: the ragged mixed batch over RAGGED_GRID (ragged_tuning.*)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    res = {"env": {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
        "git": git_sha() or "unknown",
        "command": "PYTHONPATH=. python3 scripts/tune_paged_decode.py " + " ".join(sys.argv[1:]),
    }, "points": []}

    def save():
        write(args.out, "paged_decode_tuning", res, markdown(res))

    if args.ragged:
        res["ragged"] = bench_ragged(configs=RAGGED_GRID)
        write(args.out, "ragged_tuning", res, ragged_markdown(res))
        print(ragged_markdown(res))
        return
    res["ceilings"] = bench_ceilings()
    variants = grid_variants()
    shape = {"d": args.head_dim, "page": args.page}
    b0, s0 = (int(x) for x in args.first.split("x"))
    first = bench_decode_point(b0, s0, variants=variants, **shape)
    res["points"].append(first)
    save()
    timed = {n: first[n]["TBps"] for n in variants if "TBps" in first.get(n, {})}
    best = {}  # launch config without splits -> its best TB/s
    for n, tbps in timed.items():
        kw = {k: v for k, v in variants[n].items() if k != "num_splits"}
        key = tuple(sorted(kw.items()))
        best[key] = max(best.get(key, 0.0), tbps)
    top = [dict(k) for k, _ in sorted(best.items(), key=lambda kv: -kv[1])[: args.top]]
    res["top"] = top
    print("top configurations:", top)
    for spec in args.points.split(","):
        b, ctx = (int(x) for x in spec.split("x"))
        pv = {}
        for kw in top:
            for ns in [None, *(int(s) for s in args.splits.split(","))]:
                v = dict(kw, num_splits=ns)
                pv[name_of(v)] = v
        res["points"].append(bench_decode_point(b, ctx, variants=pv, **shape))
        save()
    print(markdown(res))


if __name__ == "__main__":
    main()
