"""What the command line's XLA compile cache costs per compile as it fills: N small distinct
jitted functions compiled (and written) in a fresh process, into a cache pre-filled with
`--entries` fake executables or into an empty one, with the cache bounded as
`jdecode.io.compile_cache` bounds it ("prune": once per process) or through jax's own
`jax_compilation_cache_max_size` ("jax": a scan of every entry at each write). Writes JSON +
markdown.

  python scripts/bench_compile_cache.py --out benchmarks --tag cpu
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jdecode.io.compile_cache import ATIME_SUFFIX, SUFFIX  # noqa: E402
from jdecode.provenance import environment, machine, write_record  # noqa: E402

CHILD = """
import sys, time
import jax, jax.numpy as jnp
from jdecode.io.compile_cache import MAX_BYTES, enable_compile_cache
t0 = time.perf_counter()
enable_compile_cache()
t1 = time.perf_counter()
if sys.argv[1] == "jax":
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
for i in range(int(sys.argv[2])):
    f = jax.jit(lambda x, i=i: jnp.sin(x) * i + jnp.cos(x * (i + 1)))
    f(jnp.arange(8.0 + i)).block_until_ready()
print(t1 - t0, time.perf_counter() - t1)
"""


def fill(path: Path, entries: int, size: int) -> None:
    """`entries` fake executables of `size` bytes, each with the access-time file that jax's
    own eviction reads."""
    path.mkdir(parents=True)
    blob = os.urandom(size)
    for i in range(entries):
        (path / f"fake{i:06d}{SUFFIX}").write_bytes(blob)
        (path / f"fake{i:06d}{ATIME_SUFFIX}").write_bytes((1000 + i).to_bytes(8, "little"))


def run(bound: str, cache: Path, compiles: int) -> tuple[float, float]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JDECODE_COMPILE_CACHE": str(cache),
           "PYTHONPATH": str(ROOT)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", CHILD, bound, str(compiles)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=3000)
    ap.add_argument("--entry-bytes", type=int, default=50_000)
    ap.add_argument("--compiles", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for entries in (args.entries, 0):
                for bound in ("jax", "prune"):  # alternating, each into a fresh copy
                    cache = Path(tmp) / f"{bound}-{entries}-{rep}"
                    fill(cache, entries, args.entry_bytes)
                    enable_s, compile_s = run(bound, cache, args.compiles)
                    rows.append({"bound": bound, "entries": entries, "repeat": rep,
                                 "enable_s": enable_s, "compiles_s": compile_s})
                    print(rows[-1], flush=True)
    record = {**environment(), "machine": machine(),
              "command": "python scripts/bench_compile_cache.py " + " ".join(argv or sys.argv[1:]),
              "compiles": args.compiles, "entry_bytes": args.entry_bytes, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Compile cache bounds ({record['date'][:10]}, {record['machine']}, "
             f"jax {record['jax_version']}, git {record['git_sha']})", "",
             f"`{record['command']}`: {args.compiles} compiles in a fresh process; "
             "`enable_compile_cache()` timed apart.", "",
             "| cache entries | bound | repeat | enable s | compiles s |", "|---|---|---|---|---|"]
    lines += [f"| {r['entries']} | {r['bound']} | {r['repeat']} | {r['enable_s']:.3f} | "
              f"{r['compiles_s']:.2f} |" for r in rows]
    write_record(args.out / f"compile_cache_{args.tag}", record, "\n".join(lines) + "\n")
    return record


if __name__ == "__main__":
    main()
