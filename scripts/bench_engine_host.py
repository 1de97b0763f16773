"""The serving engine's host work per decode step, without the device: scheduling, the step's
host arrays, the launch call, and reading back with post-processing (detokenization, stop
checks), for a full batch of decoding sequences. Writes JSON + markdown.

Why: on the H200 the engine's 64-sequence decode step was bound by the host, not the device
(benchmarks/engine_decode_h200.md: device step 1.33 ms, engine step 1.85-2.4 ms). Multi-step
scheduling hides that for steps of decodes alone; steps with a prefill chunk, and one-decode
steps, still pay it. This times the host's part alone, on any machine: the runner's `launch`
is replaced by one that returns tokens already on the host (random ids, so the detokenizer
does real work), so no device work, transfer or compile is in the figures. Everything else
is the engine's own code.

`--server` also serves the same batch through the OpenAI server (`jdecode serve`'s app, in
this process, launch stubbed alike) to streaming clients in another process, and reports the
output tokens per second the server delivers: the host's ceiling for online serving.

  python scripts/bench_engine_host.py --out benchmarks --tag cpu
  python scripts/bench_engine_host.py --batch 64,256 --num-scheduler-steps 1,4 --out $OUT
  python scripts/bench_engine_host.py --server --num-scheduler-steps 1,4 --out $OUT
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import importlib.util
import json
import multiprocessing
import re
import shlex
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

from jdecode.decoding.sampling import SamplingParams
from jdecode.engine.engine import EngineArgs, LLMEngine
from jdecode.io.registry import DEFAULT_MODEL, load
from jdecode.provenance import environment, machine, write_record

PHASES = ("schedule", "step_inputs", "launch", "complete")


def timed(fn, into: collections.Counter, name: str):
    """fn, adding its wall time to into[name] on every call."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into[name] += time.perf_counter() - t
    return wrapper


def host_launch(runner, vocab: int, rng: np.random.Generator):
    """A `ModelRunner.launch` that runs nothing: [W, B] random token ids, on the host."""
    width, b = runner.last_burst.shape

    def launch(inputs, num_logprobs: int = 0, num_steps: int = 1, options=()):
        return rng.integers(0, vocab, (width, b), dtype=np.int32), None
    return launch


def stubbed_engine(model, batch: int, burst: int, max_len: int, rng: np.random.Generator
                   ) -> LLMEngine:
    """An engine of `batch` sequence slots and pages for sequences of `max_len` tokens, whose
    runner's launch is `host_launch`."""
    engine = LLMEngine(model, EngineArgs(max_num_seqs=batch, num_scheduler_steps=burst,
                                         max_model_len=max_len + 8,
                                         num_pages=batch * (max_len // 16 + 2)))
    engine.runner.launch = host_launch(engine.runner, model.cfg.vocab_size, rng)
    return engine


def probe(model, batch: int, burst: int, steps: int, prompt_len: int, seed: int,
          output_len: int = 0) -> dict:
    """ms per decode step (one token per sequence) of each host phase, at `batch` sequences
    decoding, with `burst` decodes per launch, timed once each sequence has `output_len`
    tokens (per-token work that grows with the output shows there)."""
    max_new = output_len + (steps + 4) * burst
    rng = np.random.default_rng(seed)
    engine = stubbed_engine(model, batch, burst, prompt_len + max_new, rng)
    runner = engine.runner
    spent: collections.Counter = collections.Counter()
    engine.scheduler.schedule = timed(engine.scheduler.schedule, spent, "schedule")
    runner.step_inputs = timed(runner.step_inputs, spent, "step_inputs")
    runner.launch = timed(runner.launch, spent, "launch")
    engine._complete = timed(engine._complete, spent, "complete")
    for i in range(batch):
        engine.add_request(f"r{i}", rng.integers(0, model.cfg.vocab_size, prompt_len).tolist(),
                           SamplingParams(max_new_tokens=max_new, ignore_eos=True))
    sched = engine.scheduler
    while sched.waiting or any(r.num_tokens_with_pending - r.num_computed_tokens > 1
                               for r in sched.running):
        engine.step()
    while sched.running[0].num_output_tokens < output_len:
        engine.step()
    engine.step()
    per_step: dict[str, list[float]] = {k: [] for k in (*PHASES, "total")}
    tokens0 = engine.num_generated_tokens
    for _ in range(steps):
        spent.clear()
        t = time.perf_counter()
        engine.step()
        per_step["total"].append(time.perf_counter() - t)
        for k in PHASES:
            per_step[k].append(spent[k])
    decodes = (engine.num_generated_tokens - tokens0) / batch / steps  # per engine step
    # Medians over the steps: a shared machine's stalls fall on a few steps, not on all.
    med = {k: 1e3 * statistics.median(v) / decodes for k, v in per_step.items()}
    return {"batch": batch, "num_scheduler_steps": burst, "output_len": output_len,
            "decodes_per_step": decodes, "ms_per_decode_step": med["total"],
            "phases_ms": {k: med[k] for k in PHASES},
            "mean_ms_per_decode_step": 1e3 * statistics.mean(per_step["total"]) / decodes}


async def _stream_one(port: int, body: bytes) -> int:
    """One streaming completion over a raw socket (a client that does almost nothing per
    chunk); returns the completion tokens the final usage chunk reports."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: "
                 b"application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    await writer.drain()
    data = await reader.read()
    writer.close()
    found = re.findall(rb'"completion_tokens":\s*(\d+)', data)
    if not found:
        raise RuntimeError(f"no usage in the response: {data[:300]!r}")
    return int(found[-1])


def _clients(port: int, bodies: list[bytes], out) -> None:
    """Runs the streams at once (in a process of its own); puts (tokens, seconds) on `out`."""
    async def run():
        t = time.perf_counter()
        counts = await asyncio.gather(*(_stream_one(port, b) for b in bodies))
        return sum(counts), time.perf_counter() - t
    out.put(asyncio.run(run()))


def stack_label(stack: str) -> str:
    """What uvicorn runs for `stack`: "auto" takes uvloop and httptools where installed."""
    if stack == "auto" and importlib.util.find_spec("uvloop") and importlib.util.find_spec(
            "httptools"):
        return "uvloop + httptools"
    return "asyncio + h11"


def probe_server(model, batch: int, burst: int, max_tokens: int, prompt_len: int,
                 seed: int, stack: str = "auto") -> dict:
    """Output tokens per second that the OpenAI server streams to `batch` clients at once
    (one streaming completion each, `max_tokens` tokens, EOS ignored), launch stubbed.
    stack: uvicorn's event loop and HTTP parser, "auto" (uvloop and httptools when
    installed, as `jdecode serve`) or "plain" (asyncio and h11)."""
    import uvicorn

    from jdecode.engine.server import Server, build_app

    rng = np.random.default_rng(seed)
    engine = stubbed_engine(model, batch, burst, prompt_len + max_tokens, rng)
    app, core = build_app(engine, "bench")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    loop, http = ("auto", "auto") if stack == "auto" else ("asyncio", "h11")
    srv = Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                loop=loop, http=http), core)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    bodies = [json.dumps({"model": "bench", "max_tokens": max_tokens, "ignore_eos": True,
                          "stream": True, "stream_options": {"include_usage": True},
                          "prompt": rng.integers(0, model.cfg.vocab_size,
                                                 prompt_len).tolist()}).encode()
              for _ in range(batch)]
    ctx = multiprocessing.get_context("spawn")
    try:
        for rounds in range(2):  # the first round warms the server's code paths up
            out = ctx.Queue()
            proc = ctx.Process(target=_clients, args=(port, bodies, out))
            steps0 = engine.num_steps
            proc.start()
            tokens, seconds = out.get(timeout=600)
            proc.join()
        steps = engine.num_steps - steps0
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
    if tokens != batch * max_tokens:
        raise RuntimeError(f"the server streamed {tokens} tokens, {batch * max_tokens} asked")
    return {"batch": batch, "num_scheduler_steps": burst, "max_tokens": max_tokens,
            "stack": stack_label(stack), "output_tok_s": tokens / seconds, "seconds": seconds,
            "engine_steps": steps, "ms_per_decode_step": 1e3 * seconds * batch / tokens}


def markdown(r: dict) -> str:
    env = r["environment"]
    lines = [f"# The engine's host work per decode step, without the device: {r['model']}", "",
             f"{env['date']} | {r['machine']} | jax {env['jax_version']} | git "
             f"{env['git_sha']}", "", f"`{r['command']}`", "",
             (f"{r['prompt_len']}-token prompts; once each sequence has its output tokens, "
              f"{r['steps']} engine steps of decodes alone, timed; the runner's launch returns "
              "random token ids from the host, so no device work is in these figures. ms per "
              "decode step (one token for every sequence): medians over the engine steps, "
              "divided by the decodes each runs (the phases' medians need not add up to the "
              "total's), and the mean total."), "",
             "| sequences | decodes per launch | output tokens | total | schedule | step inputs "
             "| launch | read back + post-process | mean total |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in r["probes"]:
        ph = p["phases_ms"]
        lines.append(f"| {p['batch']} | {p['num_scheduler_steps']} | {p['output_len']} | "
                     f"**{p['ms_per_decode_step']:.3f}** | {ph['schedule']:.3f} | "
                     f"{ph['step_inputs']:.3f} | {ph['launch']:.3f} | {ph['complete']:.3f} | "
                     f"{p['mean_ms_per_decode_step']:.3f} |")
    if r.get("server"):
        lines += ["", (f"Through the OpenAI server: {r['server'][0]['batch']} streaming "
                       f"completions of {r['server'][0]['max_tokens']} tokens at once (raw-socket "
                       "clients in another process), after one warm-up round."), "",
                  "| uvicorn | sequences | decodes per launch | output tok/s | "
                  "ms per decode step | engine steps |", "|---|---|---|---|---|---|"]
        for p in r["server"]:
            lines.append(f"| {p['stack']} | {p['batch']} | {p['num_scheduler_steps']} | "
                         f"**{p['output_tok_s']:.0f}** | {p['ms_per_decode_step']:.3f} | "
                         f"{p['engine_steps']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="a model with a tokenizer detokenizes as in serving")
    ap.add_argument("--batch", default="64", help="comma-separated sequence counts")
    ap.add_argument("--num-scheduler-steps", default="1,4", help="comma-separated")
    ap.add_argument("--steps", type=int, default=200, help="engine steps timed per probe")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", default="0",
                    help="comma-separated: tokens each sequence has produced when timing starts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server", action="store_true",
                    help="also stream the batch through the OpenAI server (see above)")
    ap.add_argument("--server-tokens", type=int, default=256,
                    help="tokens per streaming completion with --server")
    ap.add_argument("--server-stack", default="auto",
                    help="comma-separated: auto (uvloop + httptools when installed), plain "
                         "(asyncio + h11)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args(argv)
    model = load(args.model, dtype="float32")  # as its recorded runs: not auto
    probes = [probe(model, b, w, args.steps, args.prompt_len, args.seed, n)
              for b in map(int, args.batch.split(","))
              for w in map(int, args.num_scheduler_steps.split(","))
              for n in map(int, args.output_len.split(","))]
    server = [probe_server(model, b, w, args.server_tokens, args.prompt_len, args.seed, st)
              for st in args.server_stack.split(",")
              for b in map(int, args.batch.split(","))
              for w in map(int, args.num_scheduler_steps.split(","))] if args.server else []
    result = {"environment": environment(), "machine": machine(),
              "command": shlex.join(["python", *sys.argv]), "model": model.name,
              "prompt_len": args.prompt_len, "steps": args.steps, "probes": probes,
              "server": server}
    print(markdown(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"engine_host_{args.tag}"
        write_record(stem, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
