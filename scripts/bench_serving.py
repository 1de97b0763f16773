"""Serving benchmark: static batching vs continuous batching vs continuous + chunked prefill.

Workloads are seeded: offline, N requests at t=0 with ShareGPT-like lognormal prompt and output
lengths; online, Poisson arrivals at several rates with a few long-prompt arrivals mixed in.
Outputs are forced to their drawn lengths (ignore_eos), so every policy does the same work.
One engine per policy serves every part (executables are shared by engines of equal shape).
Results are rewritten after every run, and `--time-budget` cuts the rest cleanly, so a run
stopped by a wall-clock limit still leaves what finished.

GPU (Llama-3.2-1B shape, random weights; ~6-8 min on an H100; rates run in the order given, so
the saturation point 1x comes before the points in between):
  PYTHONPATH=. python3 scripts/bench_serving.py --model configs/models/llama-3.2-1b.yaml \
      --impl pallas --layout inference --token-buckets 64,256,1024 --num-requests 1000 \
      --online-requests 300 --rates 0.25x,1x,0.5x,0.75x --max-num-seqs 64 --num-pages 4096 \
      --time-budget 530 --out $OUT --tag h100
CPU (the real default model; scaled down to fit a 2-core box):
  python scripts/bench_serving.py --model smollm2-135m --num-requests 60 --online-requests 24 \
      --rates 0.25,0.5,1 --prompt-median 48 --output-median 32 --max-prompt 256 \
      --max-output 128 --long-prompt 384 --long-fraction 0.125 --max-num-seqs 16 \
      --max-num-batched-tokens 128 --max-model-len 512 --out benchmarks --tag cpu
Writes serving_<tag>.json, serving_<tag>.md and serving_<tag>.png under --out;
`--replot serving_<tag>.json` rewrites the markdown and plot from a saved JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import math
import shlex
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from jdecode.analysis.profile import kernel_tally
from jdecode.decoding.sampling import SamplingParams
from jdecode.engine.engine import EngineArgs, LLMEngine
from jdecode.engine.runner import resolve_layout
from jdecode.io.registry import Model
from jdecode.provenance import git_sha, write_record

POLICIES = {
    "static": {"policy": "static"},
    "continuous": {"policy": "continuous", "enable_chunked_prefill": False},
    "continuous+chunked": {"policy": "continuous", "enable_chunked_prefill": True},
    # A prefill-only step as soon as one request can be seated (the engine's earlier rule).
    "continuous-eager": {"policy": "continuous", "enable_chunked_prefill": False,
                         "min_prefill_batch": 1},
}
# "POLICY:sync" runs POLICY with the host's work after each step instead of overlapping it.
SYNC_SUFFIX = ":sync"
DECODE_REFERENCE = ("benchmarks/decode.md, 29.0k tok/s for batch 64 of this model in a "
                    "fori_loop with no scheduling (H100, Pallas, inference layout)")
# Reserved at the end of --time-budget for the final write and exit.
WRITE_MARGIN_S = 5.0


@dataclasses.dataclass
class Req:
    arrival: float  # seconds after the start
    prompt: list[int]
    max_new: int


def lognormal_lengths(rng, n, median, sigma, lo, hi) -> np.ndarray:
    return np.clip(rng.lognormal(np.log(median), sigma, n).astype(int), lo, hi)


def output_lengths(rng, args, prompt_lens: np.ndarray) -> np.ndarray:
    """Lognormal outputs, cut so prompt + output fits max_model_len (else the engine stops
    the request early and its forced length is never reached)."""
    o = lognormal_lengths(rng, len(prompt_lens), args.output_median, args.sigma, 2,
                          args.max_output)
    return np.minimum(o, args.max_model_len - prompt_lens)


def offline_workload(args, vocab: int) -> list[Req]:
    rng = np.random.default_rng(args.seed)
    p = lognormal_lengths(rng, args.num_requests, args.prompt_median, args.sigma, 4,
                          args.max_prompt)
    o = output_lengths(rng, args, p)
    return [Req(0.0, rng.integers(0, vocab, int(a)).tolist(), int(b)) for a, b in zip(p, o)]


def online_workload(args, vocab: int, rate: float) -> list[Req]:
    rng = np.random.default_rng(args.seed + int(rate * 1000))
    n = args.online_requests
    gaps = rng.exponential(1.0 / rate, n)
    p = lognormal_lengths(rng, n, args.prompt_median, args.sigma, 4, args.max_prompt)
    long = rng.random(n) < args.long_fraction
    p = np.where(long, args.long_prompt, p)  # the arrivals that stall an unchunked engine
    o = output_lengths(rng, args, p)
    return [Req(float(t), rng.integers(0, vocab, int(a)).tolist(), int(b))
            for t, a, b in zip(np.cumsum(gaps), p, o)]


def probe_decode(engine: LLMEngine, vocab: int, steps: int, prompt_len: int = 128) -> dict:
    """Full-batch decode: the engine's step (schedule, pack, dispatch, read back, postprocess)
    against the jitted step alone on the same batch. Without async scheduling the difference is
    the host's work per step; with it, the part of that work the device's step does not hide.

    Times are per decode step (one token per sequence): with multi-step scheduling an engine
    step runs up to num_scheduler_steps of them.
    """
    rng = np.random.default_rng(1)
    B = engine.runner.max_num_seqs
    burst = engine.args.num_scheduler_steps
    prompt_len = min(prompt_len, engine.max_model_len // 4)
    max_new = (burst + 1) * steps + 8
    if prompt_len + max_new > engine.max_model_len:
        raise SystemExit(f"--probe-steps {steps} needs max_model_len >= "
                         f"{prompt_len + max_new}: lower --probe-steps")
    for i in range(B):
        engine.add_request(f"probe{i}", rng.integers(0, vocab, prompt_len).tolist(),
                           SamplingParams(max_new_tokens=max_new, ignore_eos=True))
    sched = engine.scheduler
    while sched.waiting or any(r.num_tokens_with_pending - r.num_computed_tokens > 1
                               for r in sched.running):
        engine.step()
    engine.step()
    tokens0 = engine.num_generated_tokens
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = time.perf_counter() - t
    engine_tok_s = (engine.num_generated_tokens - tokens0) / elapsed
    engine_ms = 1e3 * B / engine_tok_s  # per decode step
    out = sched.schedule()  # run over and over below; the probe requests are aborted after
    tables = {c.request.request_id: engine.block_manager.page_ids(c.request.request_id)
              for c in out.chunks}
    inputs, k = engine.runner.step_inputs(out, tables)
    options = engine.runner.step_options(out)  # the executable engine.step ran
    launch = lambda: engine.runner.launch(inputs, k, num_steps=out.num_steps, options=options)[0]
    per = out.num_steps  # decode steps per launch
    t = time.perf_counter()
    for _ in range(steps):
        np.asarray(launch())  # synced every step, as the engine is
    device_ms = 1e3 * (time.perf_counter() - t) / (steps * per)
    # The same launches without waiting: the host's share of a step (argument transfers and
    # kernel launches). When it is close to the synced step, the step is bound by the host.
    t = time.perf_counter()
    sampled = [launch() for _ in range(steps)]
    dispatch_ms = 1e3 * (time.perf_counter() - t) / (steps * per)
    jax.block_until_ready(sampled)
    pipelined_ms = 1e3 * (time.perf_counter() - t) / (steps * per)
    # Where the device's step goes, kernel by kernel (GPU only; empty on CPU), per launch.
    kernels = kernel_tally(launch, repeats=10)
    for i in range(B):
        engine.abort_request(f"probe{i}")
    engine.block_manager.reset_prefix_cache()
    return {"batch": B, "context": prompt_len + steps * burst, "engine_step_ms": engine_ms,
            "num_scheduler_steps": burst, "decodes_per_launch": per,
            "async_scheduling": engine.args.async_scheduling, "dispatch_ms": dispatch_ms,
            "pipelined_step_ms": pipelined_ms, "kernels": kernels,
            "device_busy_ms": (sum(r["us_per_run"] for r in kernels) * 1e-3 / per
                               if kernels else None),
            "jitted_step_ms": device_ms, "engine_tok_s": engine_tok_s,
            "jitted_tok_s": 1e3 * B / device_ms}


def run(engine: LLMEngine, reqs: list[Req], desc: str, deadline: float) -> dict:
    """Drives the engine in real time; arrivals are admitted when their time has come.

    Past `deadline` (perf_counter seconds) the run is abandoned and reported as skipped.
    """
    engine.block_manager.reset_prefix_cache()  # each run starts cold, whatever ran before
    steps0 = engine.num_steps
    preempt0 = engine.scheduler.stats.num_preemptions
    pending = sorted(range(len(reqs)), key=lambda i: reqs[i].arrival)[::-1]
    times: dict[str, list[float]] = {}
    seen_tokens: set[int] = set()
    bar = tqdm(total=len(reqs), desc=desc, unit="req", leave=False,
               disable=not sys.stderr.isatty())
    t0 = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        if t0 + now > deadline:
            done = sum(1 for i, ts in times.items() if len(ts) == reqs[int(i)].max_new)
            for rid in list(times):
                engine.abort_request(rid)
            bar.close()
            return {"skipped": f"time budget ran out {now:.0f} s into the run, "
                               f"{done}/{len(reqs)} requests done"}
        while pending and reqs[pending[-1]].arrival <= now:
            i = pending.pop()
            r = reqs[i]
            engine.add_request(str(i), r.prompt,
                               SamplingParams(max_new_tokens=r.max_new, ignore_eos=True))
            times[str(i)] = []
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(reqs[pending[-1]].arrival, deadline - t0) - now))
            continue
        outs = engine.step()
        t = time.perf_counter() - t0
        for out in outs:
            # A token each: a multi-step burst comes as one output of several tokens.
            times[out.request_id].extend([t] * len(out.new_token_ids))
            seen_tokens.update(out.new_token_ids)
            bar.update(out.finished)
    duration = time.perf_counter() - t0
    bar.close()
    ttft = [times[str(i)][0] - r.arrival for i, r in enumerate(reqs)]
    itl = [b - a for ts in times.values() for a, b in itertools.pairwise(ts)]
    e2e = [times[str(i)][-1] - r.arrival for i, r in enumerate(reqs)]
    out_tokens = sum(len(ts) for ts in times.values())
    assert out_tokens == sum(r.max_new for r in reqs), "an output missed its forced length"
    prompt_tokens = sum(len(r.prompt) for r in reqs)
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else 0.0
    steps = engine.num_steps - steps0
    return {"duration_s": duration, "requests": len(reqs), "req_s": len(reqs) / duration,
            "output_tok_s": out_tokens / duration,
            "total_tok_s": (out_tokens + prompt_tokens) / duration,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
            "e2e_p50_s": pct(e2e, 50), "e2e_p99_s": pct(e2e, 99),
            "num_steps": steps, "mean_step_ms": 1e3 * duration / max(1, steps),
            "num_preemptions": engine.scheduler.stats.num_preemptions - preempt0,
            "output_tokens": out_tokens, "prompt_tokens": prompt_tokens,
            # Random weights give varied tokens; one repeated token means NaN/garbage logits.
            "distinct_output_tokens": len(seen_tokens)}


def load_model(name: str, dtype: str | None) -> Model:
    """A known name / checkpoint (real weights) or a configs/models YAML (random weights)."""
    if name.endswith((".yaml", ".yml")):
        from jdecode.config import load_model_config_yaml
        from jdecode.model.params import init_params

        cfg = load_model_config_yaml(name)
        cfg = cfg.replace(dtype=dtype) if dtype else cfg
        return Model(Path(name).stem, cfg, init_params(cfg, jax.random.key(0)), None)
    from jdecode.io.registry import load

    return load(name, dtype=dtype or "float32")


def parse_rates(spec: str) -> list[tuple[float, bool]]:
    """"2,4" -> absolute req/s; "0.5x,1x" -> multiples of the offline continuous req/s."""
    return [(float(r.rstrip("x")), r.endswith("x")) for r in spec.split(",") if r]


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is missing: no plot (rerun with --replot on a machine that has it)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for policy, rows in result["online"].items():
        rows = sorted((r for r in rows if "skipped" not in r), key=lambda r: r["rate"])
        if not rows:
            continue
        rates = [r["rate"] for r in rows]
        axes[0].plot(rates, [r["output_tok_s"] for r in rows], "o-", label=policy)
        axes[1].plot(rates, [1e3 * r["itl_p99_s"] for r in rows], "o-", label=policy)
        axes[2].plot(rates, [r["ttft_p99_s"] for r in rows], "o-", label=policy)
    axes[0].set(xlabel="request rate (req/s)", ylabel="output tok/s", title="throughput")
    axes[1].set(xlabel="request rate (req/s)", ylabel="p99 inter-token latency (ms)",
                title="p99 ITL", yscale="log")
    axes[2].set(xlabel="request rate (req/s)", ylabel="p99 time to first token (s)",
                title="p99 TTFT", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    a = result["args"]
    fig.suptitle(f"{result['model']} on {result['device']}: Poisson arrivals, "
                 f"{a['online_requests']} requests per rate, {a['long_fraction']:.0%} with a "
                 f"{a['long_prompt']}-token prompt; max_num_seqs {a['max_num_seqs']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ms(s: float) -> str:
    return f"{1e3 * s:.1f}" if s < 0.1 else f"{1e3 * s:.0f}"


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [f"# Serving benchmark: {result['model']} on {result['device']}", "",
             (f"{result['date']} | {result['device']} | jax {result['jax']} | "
             f"git {result['git_sha'][:10]} | impl {a['impl']}, layout {result['layout']}"), "",
             f"`{result['command']}`", ""]
    setup = result.get("setup", {})
    if setup:
        lines += ["Setup (s): " + ", ".join(f"{k} {v:.1f}" for k, v in setup.items()), ""]
    pr = result.get("probe")
    if pr:
        lines += [(f"Full-batch decode ({pr['batch']} running, context ~{pr['context']}): the "
                  f"engine step takes {pr['engine_step_ms']:.2f} ms ({pr['engine_tok_s']:.0f} "
                  f"tok/s), the jitted step alone {pr['jitted_step_ms']:.2f} ms "
                  f"({pr['jitted_tok_s']:.0f} tok/s): the engine adds "
                  f"{pr['engine_step_ms'] - pr['jitted_step_ms']:.2f} ms per step "
                  f"({'async' if pr.get('async_scheduling') else 'sync'} scheduling, "
                  f"{pr.get('num_scheduler_steps', 1)} decode(s) per launch at most; "
                  "times per decode step).")]
        if "dispatch_ms" in pr:
            lines += [(f"Launching the jitted step without waiting costs the host "
                       f"{pr['dispatch_ms']:.2f} ms per step; back-to-back launches run at "
                       f"{pr['pipelined_step_ms']:.2f} ms per step.")]
        if pr.get("kernels"):
            top = ", ".join(f"{r['kernel'][:40]} {r['us_per_run']:.0f} us "
                            f"({r['calls_per_run']:.0f}x)" for r in pr["kernels"][:6])
            lines += [(f"Device time of one decode step, its kernels summed: "
                       f"{pr['device_busy_ms']:.2f} ms; the largest: {top}.")]
        if "H100" in result["device"]:
            lines += [f"Figure compared: {DECODE_REFERENCE}."]
        lines += [""]
    lines += [f"## Offline: {a['num_requests']} requests at t=0", "",
              (f"Prompt lengths lognormal(median {a['prompt_median']}, sigma {a['sigma']}) "
              f"cut to [4, {a['max_prompt']}], outputs lognormal(median {a['output_median']}) "
              f"cut to [2, {a['max_output']}]; max_num_seqs {a['max_num_seqs']}, chunked "
              f"budget {a['max_num_batched_tokens']} tokens/step."), "",
              ("| policy | output tok/s | total tok/s | TTFT p50/p99 (s) | ITL p50/p99 (ms) | "
               "steps | ms/step | preemptions |"), "|---|---|---|---|---|---|---|---|"]
    for policy, r in result["offline"].items():
        if "skipped" in r:
            lines.append(f"| {policy} | skipped: {r['skipped']} | | | | | | |")
            continue
        lines.append(f"| {policy} | {r['output_tok_s']:.0f} | {r['total_tok_s']:.0f} | "
                     f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | "
                     f"{_ms(r['itl_p50_s'])} / {_ms(r['itl_p99_s'])} | "
                     f"{r['num_steps']} | {r['mean_step_ms']:.2f} | {r['num_preemptions']} |")
    for policy, r in result["offline"].items():
        sync = SYNC_SUFFIX if policy.endswith(SYNC_SUFFIX) else ""
        st = result["offline"].get("static" + sync, {})
        if policy.startswith("static") or "output_tok_s" not in st or "output_tok_s" not in r:
            continue
        ratio = r["output_tok_s"] / st["output_tok_s"]
        lines += ["", (f"{policy} / static{sync} output throughput: {ratio:.2f}x (target >= 3x: "
                       f"{'met' if ratio >= 3 else 'not met'})")]
    lines += ["", (f"## Online: Poisson arrivals, {a['online_requests']} requests per rate, "
                   f"{a['long_fraction']:.0%} with a {a['long_prompt']}-token prompt"), ""]
    if result.get("capacity_req_s"):
        lines += [(f"Rates given as multiples of the offline continuous throughput, "
                  f"{result['capacity_req_s']:.1f} req/s."), ""]
    lines += [("| policy | rate (req/s) | output tok/s | TTFT p50/p99 (s) | ITL p50/p99 (ms) | "
              "preemptions |"), "|---|---|---|---|---|---|"]
    for policy, rows in result["online"].items():
        for r in sorted(rows, key=lambda r: r["rate"]):
            if "skipped" in r:
                lines.append(f"| {policy} | {r['rate']:.3g} | skipped: {r['skipped']} | | | |")
                continue
            lines.append(f"| {policy} | {r['rate']:.3g} | {r['output_tok_s']:.0f} | "
                         f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | "
                         f"{_ms(r['itl_p50_s'])} / {_ms(r['itl_p99_s'])} | "
                         f"{r['num_preemptions']} |")
    chunked = {r["rate"]: r for r in result["online"].get("continuous+chunked", [])
               if "skipped" not in r}
    plain = {r["rate"]: r for r in result["online"].get("continuous", []) if "skipped" not in r}
    both = sorted(set(chunked) & set(plain))
    if both:
        lines += ["", "p99 ITL, continuous -> continuous+chunked: " + ", ".join(
            f"{_ms(plain[x]['itl_p99_s'])} -> {_ms(chunked[x]['itl_p99_s'])} ms at {x:.3g} req/s"
            for x in both)]
    return "\n".join(lines) + "\n"


def write(result: dict, stem: Path) -> None:
    """Rewrites the JSON, markdown and plot (called after every run)."""
    write_record(stem, result, markdown(result))
    if any("output_tok_s" in r for rows in result["online"].values() for r in rows):
        plot(result, Path(f"{stem}.png"))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--impl", default="xla", choices=["xla", "reference", "pallas"])
    ap.add_argument("--layout", default="auto", choices=["auto", "inference", "stacked"],
                    help="parameter layout (auto: inference on GPU)")
    ap.add_argument("--token-buckets", default="",
                    help="comma-separated padded token counts per step below the budget (each "
                    "compiles once); empty = powers of two from 16")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--online-requests", type=int, default=300)
    ap.add_argument("--rates", default="0.25x,1x,0.5x,0.75x",
                    help="req/s, or with an x suffix multiples of the offline continuous req/s; "
                    "run in this order")
    ap.add_argument("--prompt-median", type=int, default=128)
    ap.add_argument("--output-median", type=int, default=128)
    ap.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma (skew)")
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--max-output", type=int, default=1024)
    ap.add_argument("--long-fraction", type=float, default=0.05)
    ap.add_argument("--long-prompt", type=int, default=1536)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--num-scheduler-steps", type=int, default=None,
                    help="decodes per launch of an all-decode step (multi-step scheduling; "
                         "default: the engine's, 4 on a GPU and 1 elsewhere)")
    ap.add_argument("--num-pages", type=int, default=None)
    ap.add_argument("--policies", default="continuous,static,continuous+chunked",
                    help="run order within each part")
    ap.add_argument("--probe-steps", type=int, default=100,
                    help="full-batch decode steps timed before the runs (0 = no probe)")
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="seconds for the whole run (0 = none); later parts are skipped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--replot", default=None, help="rewrite md/png from this JSON and exit")
    return ap.parse_args(argv)


def main() -> None:
    t_start = time.perf_counter()
    args = parse_args()
    if args.replot:
        result = json.loads(Path(args.replot).read_text())
        write(result, Path(args.replot).with_suffix(""))
        print(markdown(result))
        return
    policies = args.policies.split(",")
    for p in policies:
        if p.removesuffix(SYNC_SUFFIX) not in POLICIES:
            raise SystemExit(f"--policies: {p!r} is unknown; choose from {', '.join(POLICIES)}, "
                             f"each optionally with {SYNC_SUFFIX}")
    rates = parse_rates(args.rates)
    if any(not 0 < r < float("inf") for r, _ in rates):
        raise SystemExit(f"--rates {args.rates!r}: each rate is a finite number of requests per "
                         "second above 0 (Poisson arrivals), or a multiple like 0.5x")
    if args.long_prompt < 1:
        raise SystemExit(f"--long-prompt {args.long_prompt}: give at least 1 token (and "
                         "--long-fraction 0 for no long prompts)")
    if any(rel for _, rel in rates) and ("continuous" not in policies or args.skip_offline):
        raise SystemExit("--rates with an x suffix needs the offline continuous run: add "
                         "continuous to --policies or give absolute rates")
    deadline = t_start + args.time_budget - WRITE_MARGIN_S if args.time_budget else math.inf
    left = lambda: deadline - time.perf_counter()
    clock = lambda: f"[{time.perf_counter() - t_start:6.1f} s]"

    layout = resolve_layout(args.layout)
    model = load_model(args.model, args.dtype)
    if layout == "inference":  # once, so the engines share one copy of the weights
        from jdecode.model.layout import inference_layout

        model = dataclasses.replace(model, params=inference_layout(model.params))
    jax.block_until_ready(model.params)
    buckets = tuple(int(b) for b in args.token_buckets.split(",") if b)
    base = {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
            "page_size": args.page_size, "num_pages": args.num_pages, "impl": args.impl,
            "layout": layout, "token_buckets": buckets,
            "num_scheduler_steps": args.num_scheduler_steps}

    def engine_args(policy: str) -> dict:
        name = policy.removesuffix(SYNC_SUFFIX)
        # Without chunking, a whole prompt must fit one step: the budget covers max_model_len.
        budget = args.max_num_batched_tokens
        if not POLICIES[name].get("enable_chunked_prefill", True):
            budget = max(budget, args.max_model_len)
        return {**base, **POLICIES[name], "max_num_batched_tokens": budget,
                "async_scheduling": not policy.endswith(SYNC_SUFFIX)}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"serving_{args.tag}"
    vocab = model.cfg.vocab_size
    result = {
        "model": model.name, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "git_sha": git_sha(short=False),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]), "layout": layout, "args": vars(args),
        "engine_args": {p: engine_args(p) for p in policies}, "setup": {},
        "offline": {}, "online": {p: [] for p in policies},
    }
    result["setup"]["load_model"] = time.perf_counter() - t_start
    print(clock(), f"{model.name} on {result['device']}, layout {layout}, impl {args.impl}",
          flush=True)

    engines: dict[str, LLMEngine] = {}

    def engine_for(policy: str) -> LLMEngine:
        if policy not in engines:
            t = time.perf_counter()
            engines[policy] = LLMEngine(model, EngineArgs(**engine_args(policy)))
            engines[policy].warmup()  # executables are shared by engines of equal shape
            result["setup"][f"warmup {policy}"] = time.perf_counter() - t
            print(clock(), f"warm {policy}: buckets {engines[policy].runner.buckets}, "
                  f"{time.perf_counter() - t:.1f} s", flush=True)
        return engines[policy]

    if "continuous" in policies and args.probe_steps:
        result["probe"] = probe_decode(engine_for("continuous"), vocab, args.probe_steps)
        pr = result["probe"]
        print(clock(), f"probe: engine {pr['engine_step_ms']:.2f} ms/step, jitted step alone "
              f"{pr['jitted_step_ms']:.2f} ms at batch {pr['batch']}", flush=True)
        for r in pr["kernels"][:25]:
            print(f"  {r['us_per_run']:8.1f} us/step {r['calls_per_run']:6.1f}x "
                  f"{r['us_per_call']:8.2f} us  {r['kernel'][:70]}")

    def record(row: dict, where: str) -> None:
        brief = row.get("skipped") or (
            f"{row['output_tok_s']:.0f} out tok/s, {row['duration_s']:.1f} s, "
            f"TTFT p99 {row['ttft_p99_s']:.2f} s, ITL p50/p99 {_ms(row['itl_p50_s'])}/"
            f"{_ms(row['itl_p99_s'])} ms, {row['mean_step_ms']:.2f} ms/step, "
            f"{row['distinct_output_tokens']} distinct tokens")
        print(clock(), where, brief, flush=True)
        write(result, stem)

    if not args.skip_offline:
        reqs = offline_workload(args, vocab)
        for policy in policies:
            if left() <= 0:
                result["offline"][policy] = {"skipped": "time budget"}
            else:
                result["offline"][policy] = run(engine_for(policy), reqs, f"offline {policy}",
                                                deadline)
            record(result["offline"][policy], f"offline {policy}:")
    capacity = result["offline"].get("continuous", {}).get("req_s")
    result["capacity_req_s"] = capacity
    for value, relative in rates:
        rate = value * capacity if relative and capacity else value
        reqs = online_workload(args, vocab, rate) if capacity or not relative else []
        for policy in policies:
            row = {"rate": rate, "rate_spec": f"{value:g}{'x' if relative else ''}"}
            # Arrivals span n / rate; an overloaded policy drains at its offline rate.
            drain = result["offline"].get(policy, {}).get("req_s") or rate
            need = args.online_requests / min(rate, drain)
            if not reqs:
                row["skipped"] = "no offline continuous throughput to scale the rate by"
            elif left() < need:
                row["skipped"] = f"time budget ({max(0, left()):.0f} s left, ~{need:.0f} s needed)"
            else:
                row.update(run(engine_for(policy), reqs, f"rate {rate:.3g} {policy}",
                               deadline))
            result["online"][policy].append(row)
            record(row, f"online {policy} @ {rate:.3g} req/s:")
    result["setup"]["total"] = time.perf_counter() - t_start
    write(result, stem)
    print(markdown(result))


if __name__ == "__main__":
    main()
