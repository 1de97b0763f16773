"""Serving benchmark: static batching vs continuous batching vs continuous + chunked prefill.

Workloads are seeded: offline, N requests at t=0 with ShareGPT-like lognormal prompt and output
lengths; online, Poisson arrivals at several rates with a few long-prompt arrivals mixed in.
Outputs are forced to their drawn lengths (ignore_eos), so every policy does the same work.

GPU (Llama-3.2-1B shape, random weights):
  PYTHONPATH=. python scripts/bench_serving.py --model configs/models/llama-3.2-1b.yaml \
      --impl pallas --num-requests 1000 --max-num-seqs 64 --out benchmarks/ --tag h100
CPU (the real default model; scaled down to fit a 2-core box):
  python scripts/bench_serving.py --model smollm2-135m --num-requests 120 --out benchmarks/ \
      --tag cpu
Writes serving_<tag>.json, serving_<tag>.md and serving_<tag>.png under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from jdecode.decoding.sampling import SamplingParams
from jdecode.engine.engine import EngineArgs, LLMEngine
from jdecode.io.registry import Model

POLICIES = {
    "static": {"policy": "static"},
    "continuous": {"policy": "continuous", "enable_chunked_prefill": False},
    "continuous+chunked": {"policy": "continuous", "enable_chunked_prefill": True},
}


@dataclasses.dataclass
class Req:
    arrival: float  # seconds after the start
    prompt: list[int]
    max_new: int


def lognormal_lengths(rng, n, median, sigma, lo, hi) -> np.ndarray:
    return np.clip(rng.lognormal(np.log(median), sigma, n).astype(int), lo, hi)


def offline_workload(args, vocab: int) -> list[Req]:
    rng = np.random.default_rng(args.seed)
    p = lognormal_lengths(rng, args.num_requests, args.prompt_median, args.sigma, 4,
                          args.max_prompt)
    o = lognormal_lengths(rng, args.num_requests, args.output_median, args.sigma, 2,
                          args.max_output)
    return [Req(0.0, rng.integers(0, vocab, int(a)).tolist(), int(b)) for a, b in zip(p, o)]


def online_workload(args, vocab: int, rate: float) -> list[Req]:
    rng = np.random.default_rng(args.seed + int(rate * 1000))
    n = args.online_requests
    gaps = rng.exponential(1.0 / rate, n)
    p = lognormal_lengths(rng, n, args.prompt_median, args.sigma, 4, args.max_prompt)
    long = rng.random(n) < args.long_fraction
    p = np.where(long, args.long_prompt, p)  # the arrivals that stall an unchunked engine
    o = lognormal_lengths(rng, n, args.output_median, args.sigma, 2, args.max_output)
    return [Req(float(t), rng.integers(0, vocab, int(a)).tolist(), int(b))
            for t, a, b in zip(np.cumsum(gaps), p, o)]


def warmup(engine: LLMEngine) -> None:
    """Compiles every token bucket (executables are shared by engines of equal shape)."""
    for i, b in enumerate(engine.runner.buckets):
        n = min(b, engine.max_model_len - 4)
        # A different token per request: a prefix hit would shrink the chunk to a smaller bucket.
        engine.add_request(f"warm{i}", [i + 1] * n,
                           SamplingParams(max_new_tokens=2, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
    engine.block_manager.reset_prefix_cache()


def run(model: Model, engine_args: dict, reqs: list[Req], desc: str) -> dict:
    """Drives the engine in real time; arrivals are admitted when their time has come."""
    engine = LLMEngine(model, EngineArgs(**engine_args))
    warmup(engine)
    pending = sorted(range(len(reqs)), key=lambda i: reqs[i].arrival)[::-1]
    times: dict[str, list[float]] = {}
    bar = tqdm(total=len(reqs), desc=desc, unit="req", leave=False)
    t0 = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while pending and reqs[pending[-1]].arrival <= now:
            i = pending.pop()
            r = reqs[i]
            engine.add_request(str(i), r.prompt,
                               SamplingParams(max_new_tokens=r.max_new, ignore_eos=True))
            times[str(i)] = []
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, reqs[pending[-1]].arrival - now))
            continue
        outs = engine.step()
        t = time.perf_counter() - t0
        for out in outs:
            times[out.request_id].append(t)
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
    stats = engine.stats()
    return {"duration_s": duration, "output_tok_s": out_tokens / duration,
            "total_tok_s": (out_tokens + prompt_tokens) / duration,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
            "e2e_p50_s": pct(e2e, 50), "e2e_p99_s": pct(e2e, 99),
            "num_steps": stats["num_steps"], "num_preemptions": stats["num_preemptions"],
            "output_tokens": out_tokens, "prompt_tokens": prompt_tokens}


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


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for policy, rows in result["online"].items():
        rates = [r["rate"] for r in rows]
        ax1.plot(rates, [r["output_tok_s"] for r in rows], "o-", label=policy)
        ax2.plot(rates, [1e3 * r["itl_p99_s"] for r in rows], "o-", label=policy)
    ax1.set(xlabel="request rate (req/s)", ylabel="output tok/s", title="throughput")
    ax2.set(xlabel="request rate (req/s)", ylabel="p99 inter-token latency (ms)",
            title="p99 ITL", yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['model']} on {result['device']}: online serving, "
                 f"{result['args']['long_fraction']:.0%} long prompts "
                 f"({result['args']['long_prompt']} tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(result: dict) -> str:
    lines = [f"# Serving benchmark: {result['model']} on {result['device']}", "",
             f"jax {result['jax']}, git {result['git_sha'][:10]}, {result['date']}", "",
             f"## Offline: {result['args']['num_requests']} requests at t=0", "",
             ("| policy | output tok/s | total tok/s | TTFT p50/p99 (s) | ITL p50/p99 (ms) | "
             "steps | preemptions |"), "|---|---|---|---|---|---|---|"]
    for policy, r in result["offline"].items():
        lines.append(f"| {policy} | {r['output_tok_s']:.1f} | {r['total_tok_s']:.1f} | "
                     f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | "
                     f"{1e3 * r['itl_p50_s']:.0f} / {1e3 * r['itl_p99_s']:.0f} | "
                     f"{r['num_steps']} | {r['num_preemptions']} |")
    st, co = result["offline"].get("static"), result["offline"].get("continuous")
    if st and co:
        lines += ["", (f"Continuous / static output throughput: "
                  f"{co['output_tok_s'] / st['output_tok_s']:.2f}x")]
    lines += ["", (f"## Online: Poisson arrivals, {result['args']['online_requests']} requests "
              f"per rate, {result['args']['long_fraction']:.0%} with a "
              f"{result['args']['long_prompt']}-token prompt"), "",
              "| policy | rate (req/s) | output tok/s | TTFT p50/p99 (s) | ITL p50/p99 (ms) |",
              "|---|---|---|---|---|"]
    for policy, rows in result["online"].items():
        for r in rows:
            lines.append(f"| {policy} | {r['rate']} | {r['output_tok_s']:.1f} | "
                         f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | "
                         f"{1e3 * r['itl_p50_s']:.0f} / {1e3 * r['itl_p99_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--impl", default="xla", choices=["xla", "reference", "pallas"])
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--online-requests", type=int, default=200)
    ap.add_argument("--rates", default="1,2,4,8")
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
    ap.add_argument("--num-pages", type=int, default=None)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--out", default="benchmarks")
    args = ap.parse_args()

    model = load_model(args.model, args.dtype)
    base = {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
            "page_size": args.page_size, "num_pages": args.num_pages, "impl": args.impl}
    policies = args.policies.split(",")
    for p in policies:
        if p not in POLICIES:
            raise SystemExit(f"--policies: {p!r} is unknown; choose from {', '.join(POLICIES)}")

    def engine_args(policy: str) -> dict:
        # Without chunking, a whole prompt must fit one step: the budget covers max_model_len.
        budget = args.max_num_batched_tokens
        if not POLICIES[policy].get("enable_chunked_prefill", True):
            budget = max(budget, args.max_model_len)
        return {**base, **POLICIES[policy], "max_num_batched_tokens": budget}

    vocab = model.cfg.vocab_size
    result = {
        "model": model.name, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "git_sha": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, check=False,
                                  text=True).stdout.strip(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "args": vars(args), "engine_args": {p: engine_args(p) for p in policies},
        "offline": {}, "online": {p: [] for p in policies},
    }
    if not args.skip_offline:
        reqs = offline_workload(args, vocab)
        for policy in policies:
            result["offline"][policy] = run(model, engine_args(policy), reqs, f"offline {policy}")
            print(policy, "offline", json.dumps(result["offline"][policy]))
    for rate in [float(r) for r in args.rates.split(",") if r]:
        reqs = online_workload(args, vocab, rate)
        for policy in policies:
            row = {"rate": rate, **run(model, engine_args(policy), reqs,
                                       f"rate {rate} {policy}")}
            result["online"][policy].append(row)
            print(policy, "online", json.dumps(row))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"serving_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(markdown(result))
    if any(result["online"].values()):
        plot(result, stem.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
