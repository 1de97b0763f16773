"""The server's resident memory across 1000 requests and a round of hostile ones, and /health's
latency while a huge prompt is being handled. Writes JSON + markdown.

The server runs in a subprocess (`jdecode.engine.server.serve`); RSS is read from /proc.

  python scripts/probe_server_memory.py --out benchmarks --tag cpu
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jax

from jdecode.io.registry import DEFAULT_MODEL
from jdecode.provenance import git_sha, write_record


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmRSS:"))) / 1024


def normal_requests(url: str, model: str, count: int, workers: int) -> int:
    """`count` short completions from `workers` clients; returns how many got a 200."""
    def one(i: int) -> bool:
        body = {"model": model, "prompt": f"Request {i}: say something about {i % 17}",
                "max_tokens": 8, "temperature": 0.7, "seed": i}
        return httpx.post(url + "/v1/completions", json=body, timeout=600).status_code == 200

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(one, range(count)))


def hostile_requests(url: str, model: str) -> dict[str, int | str]:
    """One of each hostile case from issue 18; returns the status each got."""
    def post(**kw) -> int | str:
        try:
            return httpx.post(url + "/v1/completions", timeout=600, **kw).status_code
        except httpx.TransportError as e:  # the server may close a huge upload after its 413
            return f"closed ({type(e).__name__})"

    json_ct = {"content-type": "application/json"}
    base = {"model": model, "prompt": "hi", "max_tokens": 4}
    statuses = {
        "50 MB body": post(content=b'{"prompt": "' + b"x" * 50_000_000 + b'"}', headers=json_ct),
        "3.9 MB prompt": post(json={**base, "prompt": "word " * 780_000}),
        "JSON nested 100k deep": post(content=b"[" * 100_000 + b"]" * 100_000,
                                      headers=json_ct),
        "non-UTF-8 body": post(content=b'{"model": "\xff"}', headers=json_ct),
        "lone surrogate": post(content=b'{"model": "m", "prompt": "\\ud800"}', headers=json_ct),
        "seed -1": post(json={**base, "seed": -1}),
        "seed 2**64": post(json={**base, "seed": 2**64}),
        "top_k 10**10": post(json={**base, "top_k": 10**10}),
        "n 10000, stream": post(json={**base, "n": 10_000, "stream": True}),
        "stop \"\"": post(json={**base, "stop": ""}),
    }
    gone = 0
    for _ in range(20):  # non-streaming clients that give up
        try:
            httpx.post(url + "/v1/completions", timeout=0.5, json={
                **base, "max_tokens": 200, "ignore_eos": True})
        except httpx.TimeoutException:
            gone += 1
    statuses["non-streaming disconnects (of 20)"] = gone
    for _ in range(20):  # streams abandoned after a few events
        with httpx.stream("POST", url + "/v1/completions", timeout=600, json={
                **base, "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
    return statuses


def health_during_huge_prompt(url: str, model: str) -> float:
    """The slowest /health answer (ms) while a 3.9 MB prompt is posted."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        big = pool.submit(httpx.post, url + "/v1/completions", timeout=600, json={
            "model": model, "prompt": "word " * 780_000, "max_tokens": 4})
        worst = 0.0
        while not big.done():
            t0 = time.perf_counter()
            httpx.get(url + "/health", timeout=600)
            worst = max(worst, time.perf_counter() - t0)
        return 1e3 * worst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    ap.add_argument("--tag", default=jax.default_backend())
    args = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    code = (f"from jdecode.engine.server import serve; serve({args.model!r}, port={port}, "
            "served_model_name='m')")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and proc.poll() is None, "the server did not start"
            time.sleep(0.5)
        rss = {"started": rss_mb(proc.pid)}
        normal_requests(url, "m", 32, args.workers)  # compiles the buckets a batch visits
        rss["warm"] = rss_mb(proc.pid)
        t0 = time.perf_counter()
        ok = normal_requests(url, "m", args.requests, args.workers)
        seconds = time.perf_counter() - t0
        rss[f"after {args.requests} requests"] = rss_mb(proc.pid)
        statuses = hostile_requests(url, "m")
        rss["after the hostile requests"] = rss_mb(proc.pid)
        health_ms = health_during_huge_prompt(url, "m")
        normal_requests(url, "m", 100, args.workers)
        rss["after 100 more requests"] = rss_mb(proc.pid)
    finally:
        proc.terminate()
        t_term = time.perf_counter()
        exit_code = proc.wait(timeout=60)
        exit_s = time.perf_counter() - t_term
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "cores": os.cpu_count(), "git_sha": git_sha(),
        "command": shlex.join(["python", *sys.argv]),
        "model": args.model, "requests_ok": ok, "requests": args.requests,
        "requests_s": seconds, "rss_mb": rss, "hostile_status": statuses,
        "health_worst_ms_during_huge_prompt": health_ms,
        "sigterm_exit_s": exit_s, "exit_code": exit_code,
    }
    lines = [f"# Server memory and hostile input: {args.model} on {result['device']}", "",
             (f"{result['date']} | {result['cores']} cores | jax {result['jax']} | git "
              f"{result['git_sha'][:10]}"), "",
             f"`{result['command']}`", "",
             (f"{ok}/{args.requests} short completions (8 tokens, {args.workers} clients) in "
              f"{seconds:.0f} s."), "", "| moment | RSS (MB) |", "|---|---|",
             *[f"| {k} | {v:.0f} |" for k, v in rss.items()], "",
             "| hostile request | status |", "|---|---|",
             *[f"| {k} | {v} |" for k, v in statuses.items()], "",
             f"Slowest /health answer while a 3.9 MB prompt was posted: {health_ms:.0f} ms.",
             (f"SIGTERM to exit: {exit_s:.1f} s (exit code {exit_code}: uvicorn shuts down, then "
              "re-raises the signal)."), ""]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"server_memory_{args.tag}"
    write_record(stem, result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
