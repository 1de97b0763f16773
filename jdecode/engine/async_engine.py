"""The engine in a thread beside the event loop: requests in and outputs out through queues,
plus the server's Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jdecode.engine.engine import LLMEngine, SequenceOutput
from jdecode.engine.protocol import APIError

log = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Prometheus series, in a registry per server (tests start several)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("jdecode_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("jdecode_inter_token_latency_seconds", "Inter-token latency",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("jdecode_e2e_request_latency_seconds", "End-to-end latency",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("jdecode_num_requests_running", "Sequences running", registry=r)
        self.waiting = Gauge("jdecode_num_requests_waiting", "Sequences waiting", registry=r)
        self.kv_usage = Gauge("jdecode_kv_cache_usage_ratio", "Fraction of KV pages in use",
                              registry=r)
        self.hit_rate = Gauge("jdecode_prefix_cache_hit_rate",
                              "Prompt tokens served by the prefix cache / prompt tokens",
                              registry=r)
        self.preemptions = Gauge("jdecode_num_preemptions_total", "Preemptions so far",
                                 registry=r)
        self.generated = Counter("jdecode_generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter("jdecode_request_success", "Finished requests",
                                ["finish_reason"], registry=r)


def _put_all(pairs: list[tuple[str, asyncio.Queue, Any]]) -> None:
    """On the event loop: each item into its stream's queue, in order."""
    for _, q, item in pairs:
        q.put_nowait(item)


class AsyncEngine:
    """Runs `LLMEngine.step` in a background thread; requests talk to it through queues.

    The event loop never runs model code, so a slow client (or a slow step) never blocks the
    others' I/O; the engine thread never awaits, so a stalled client never blocks a step.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.metrics = Metrics()
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._start: dict[str, float] = {}  # request id -> arrival
        self._open: dict[str, int] = {}  # request id -> sequences not finished yet
        self._last_token: dict[tuple[str, int], float] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="jdecode-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ---- called from the event loop --------------------------------------------------------

    def submit(self, request_id: str, prompt: list[int], sp, logprobs: int | None
               ) -> asyncio.Queue:
        """Queues a request; its SequenceOutputs (or an APIError) arrive on the queue."""
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._commands.put(("add", request_id, prompt, sp, logprobs, time.monotonic()))
        self._wake.set()
        return q

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._commands.put(("abort", request_id))
            self._wake.set()

    def abort_all(self, error: APIError) -> None:
        """Ends every request in flight with `error` (server shutdown)."""
        for request_id, (_, q) in list(self._streams.items()):
            q.put_nowait(error)
            self.abort(request_id)

    # ---- the engine thread -----------------------------------------------------------------

    def _send(self, request_id: str, item: Any) -> None:
        self._send_all([(request_id, item)])

    def _send_all(self, items: list[tuple[str, Any]]) -> None:
        """`_send` for a step's (request id, item) pairs, in order, with one wake-up per event
        loop instead of one per item: each call_soon_threadsafe writes to the loop's self-pipe,
        and at 64 streams a step has 64 items or more."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, item in items:
            target = self._streams.get(rid)
            if target is not None:
                by_loop.setdefault(target[0], []).append((rid, target[1], item))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, pairs)
            except RuntimeError:  # the event loop is closed: the server is shutting down
                for rid, _, _ in pairs:
                    self._streams.pop(rid, None)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt, sp, logprobs, t0 = cmd
                if rid not in self._streams:  # the client left before admission
                    continue
                try:
                    self.engine.add_request(rid, prompt, sp, logprobs=logprobs)
                    self._start[rid], self._open[rid] = t0, sp.n
                except Exception as e:  # this request fails; the others never see it
                    log.exception("could not add a request")
                    error = (APIError(str(e), param=getattr(e, "param", None))
                             if isinstance(e, ValueError) else _internal_error(e))
                    self._send(rid, error)
                    self._streams.pop(rid, None)
            else:
                self.engine.abort_request(cmd[1])
                self._start.pop(cmd[1], None)
                self._open.pop(cmd[1], None)

    def _run(self) -> None:
        while not self._stop:
            self._drain_commands()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # the batch's state is lost: end what was in it, keep serving
                log.exception("engine step failed")
                for rid in list(self._streams):
                    self._send(rid, _internal_error(e))
                    self.engine.abort_request(rid)
                self._streams.clear()
                continue
            now = time.monotonic()
            sends, failed = [], []
            for out in outputs:
                self._observe(out, now)
                if out.error is not None:  # the engine failed this request alone
                    sends.append((out.request_id, _internal_error(out.error)))
                    failed.append(out.request_id)
                else:
                    sends.append((out.request_id, out))
            self._send_all(sends)
            for rid in failed:
                self._streams.pop(rid, None)
            self.update_gauges()
        self._drain_commands()  # the aborts that shutdown sent
        for rid in list(self._open):  # and whatever no one is waiting for any more
            self.engine.abort_request(rid)
        self._open.clear()

    def _observe(self, out: SequenceOutput, now: float) -> None:
        m, key = self.metrics, (out.request_id, out.index)
        m.generated.inc(len(out.new_token_ids))
        last = self._last_token.get(key)
        if last is None:
            m.ttft.observe(now - self._start.get(out.request_id, now))
        else:
            m.itl.observe(now - last)
        for _ in range(len(out.new_token_ids) - 1):  # the rest of a multi-step burst came with it
            m.itl.observe(0.0)
        self._last_token[key] = now
        if out.finished:
            self._last_token.pop(key, None)
            m.finished.labels(out.finish_reason).inc()
            self._open[out.request_id] = self._open.get(out.request_id, 1) - 1
            if self._open[out.request_id] == 0:
                del self._open[out.request_id]
                m.e2e.observe(now - self._start.pop(out.request_id, now))

    def update_gauges(self) -> None:
        """Copies the engine's gauges into the metrics (the engine thread does so every step)."""
        s, m = self.engine.stats(), self.metrics
        m.running.set(s["num_running"])
        m.waiting.set(s["num_waiting"])
        m.kv_usage.set(s["kv_usage"])
        m.hit_rate.set(s["prefix_hit_rate"])
        m.preemptions.set(s["num_preemptions"])


def _internal_error(e: Exception | str) -> APIError:
    """A 500 that says what failed, not where (the details are in the server log)."""
    kind = e if isinstance(e, str) else type(e).__name__
    return APIError(f"generation failed ({kind.split(':')[0]}); see the server log",
                    status=500, type="server_error")
