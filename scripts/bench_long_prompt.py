"""Long-prompt prefill on CPU: jdecode's `Generator` against HF transformers, same run.

Each prompt length is timed in turns (jdecode, HF, jdecode, HF, ...), so background load on a
shared machine falls on both alike; the load average is recorded beside every run. jdecode's
figure is `stats["prefill_ms"]` (prefill + the first token) and the wall time of the whole
`generate` call (tokens in, text out, compile excluded: the first call compiles and is not
timed). HF's is `model.generate(max_new_tokens=1)` (eager, CPU torch, SDPA attention).
`--baseline-lengths` also times the prefill this repo had before tiled prompt attention
(attention over the whole cache buffer with [T, S] f32 scores), for the lengths given.

  python scripts/bench_long_prompt.py --lengths 2048,8000 --baseline-lengths 2048 \
      --out benchmarks --tag cpu
Writes long_prompt_<tag>.json and long_prompt_<tag>.md under --out.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.cache.dense import DenseMeta, init_cache, make_dense_attend
from jdecode.decoding.generate import Generator, prompt_bucket
from jdecode.decoding.sampling import SamplingParams
from jdecode.io.registry import KNOWN_MODELS, Model, load, resolve_model_path
from jdecode.model.linear import make_linear
from jdecode.model.transformer import forward
from jdecode.provenance import git_sha


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def time_jdecode(gen: Generator, ids: list[int]) -> dict:
    sp = SamplingParams(max_new_tokens=1, ignore_eos=True)
    t0, c0 = time.perf_counter(), time.process_time()
    (r,) = gen.generate([ids], sp)
    return {"prefill_s": r.stats["prefill_ms"] / 1e3, "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0, "compile_s": r.stats["compile_s"]}


def time_baseline(model: Model, ids: list[int]) -> float:
    """The earlier prefill: every query attends over the whole cache buffer (one jit)."""
    cfg, t = model.cfg, prompt_bucket(len(ids))
    max_len = -(-(t + 2) // 256) * 256

    def run(params, cache, tokens):
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)
        return forward(params, tokens, pos, cache, DenseMeta(pos), cfg=cfg,
                       attend=make_dense_attend(cfg, "xla"), logits_at=jnp.array([[len(ids) - 1]]),
                       linear=make_linear("xla"))[0]

    tokens = np.zeros((1, t), np.int32)
    tokens[0, :len(ids)] = ids
    fn = jax.jit(run).lower(model.params, init_cache(cfg, 1, max_len), tokens).compile()
    cache = init_cache(cfg, 1, max_len)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(model.params, cache, tokens))
    return time.perf_counter() - t0


def hf_model(name: str):
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if path.suffix == ".gguf" else path
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()


def time_hf(hf, ids: list[int]) -> tuple[float, float]:
    """(wall s, process CPU s) of HF `generate` with one new token."""
    import torch

    with torch.no_grad():
        t0, c0 = time.perf_counter(), time.process_time()
        hf.generate(torch.tensor([ids]), max_new_tokens=1, min_new_tokens=1, do_sample=False)
        return time.perf_counter() - t0, time.process_time() - c0


def markdown(result: dict) -> str:
    env = result["environment"]
    header = (f"{env['date']} | {env['cpu']} ({env['cores']} cores) | jax {env['jax_version']} "
              f"| torch {env['torch_version']} | transformers {env['transformers_version']} | "
              f"git {env['git_sha']}")
    legend = ("Median seconds over the timed runs (jdecode and HF in turns, same process). "
              "jdecode prefill = the jitted prefill + first token; jdecode wall = the whole "
              "`generate` call (compile excluded); HF = `generate(max_new_tokens=1)`; CPU s = "
              "the process's CPU time (all threads) for the same call, which background load "
              "disturbs less than wall time. Load = 1-minute load average during the runs.")
    columns = ("prompt tokens", "bucket", "jdecode prefill s", "jdecode wall s", "HF s",
               "HF / jdecode (wall)", "jdecode CPU s", "HF CPU s",
               "before (whole-buffer attention) s", "compile s", "load min-max")
    lines = [f"# Long-prompt prefill on CPU: {result['model']} (real weights, float32)", "",
             header, "", f"`{result['command']}`", "", legend, "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in result["rows"]:
        loads = [x["load"] for x in r["runs"]]
        hf, base = r.get("hf_s"), r.get("baseline_s")
        cells = [r["prompt_tokens"], r["bucket"], f"{r['jdecode_prefill_s']:.2f}",
                 f"{r['jdecode_wall_s']:.2f}", "-" if hf is None else f"{hf:.2f}",
                 "-" if hf is None else f"{hf / r['jdecode_wall_s']:.2f}x",
                 f"{r['jdecode_cpu_s']:.1f}",
                 "-" if hf is None else f"{r['hf_cpu_s']:.1f}",
                 "-" if base is None else f"{base:.2f}", f"{r['compile_s']:.1f}",
                 f"{min(loads):.1f}-{max(loads):.1f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="2048,8000", help="prompt lengths in tokens")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per length and side")
    ap.add_argument("--baseline-lengths", default="",
                    help="lengths at which to also time the earlier whole-buffer prefill")
    ap.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args()

    model = load(args.model, dtype="float32")  # as its recorded runs: not auto
    gen = Generator(model)
    hf = None if args.no_hf else hf_model(args.model)
    if hf is not None:
        time_hf(hf, list(range(1, 65)))  # first-call setup, untimed
    rng = np.random.default_rng(0)
    baseline = {int(x) for x in args.baseline_lengths.split(",") if x}
    rows = []
    for n in map(int, args.lengths.split(",")):
        ids = rng.integers(0, model.cfg.vocab_size, n).tolist()
        compile_s = time_jdecode(gen, ids)["compile_s"]  # compiles this bucket, untimed
        runs = []
        for i in range(args.repeats):
            ours = time_jdecode(gen, ids)
            run = {"load": load1(), **ours}
            if hf is not None:
                run["hf_s"], run["hf_cpu_s"] = time_hf(hf, ids)
            runs.append(run)
            print(json.dumps({"prompt_tokens": n, "run": i, **run}), flush=True)
        row = {"prompt_tokens": n, "bucket": prompt_bucket(n), "compile_s": compile_s,
               "runs": runs,
               "jdecode_prefill_s": statistics.median(r["prefill_s"] for r in runs),
               "jdecode_wall_s": statistics.median(r["wall_s"] for r in runs)}
        row["jdecode_cpu_s"] = statistics.median(r["cpu_s"] for r in runs)
        if hf is not None:
            row["hf_s"] = statistics.median(r["hf_s"] for r in runs)
            row["hf_cpu_s"] = statistics.median(r["hf_cpu_s"] for r in runs)
        if n in baseline:
            row["baseline_s"] = time_baseline(model, ids)
            row["baseline_load"] = load1()
        rows.append(row)
    env = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
           "python": platform.python_version(), "jax_version": jax.__version__,
           "torch_version": importlib.metadata.version("torch"),
           "transformers_version": importlib.metadata.version("transformers"),
           "git_sha": git_sha()}
    result = {"model": args.model, "weights": "real" if args.model in KNOWN_MODELS else "",
              "dtype": model.cfg.dtype,
              "command": "python " + " ".join(map(shlex.quote, sys.argv)),
              "environment": env, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"long_prompt_{args.tag}.json").write_text(json.dumps(result, indent=2))
    (out / f"long_prompt_{args.tag}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
