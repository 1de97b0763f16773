"""OpenAI-compatible server: FastAPI + uvicorn, the engine loop in a thread beside the event loop.

Endpoints: /v1/completions, /v1/chat/completions (SSE streaming or not), /v1/models, /health,
/metrics (Prometheus). A client that disconnects mid-stream aborts its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from jdecode.engine.engine import EngineArgs, LLMEngine, SequenceOutput
from jdecode.engine.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    sampling_params,
)
from jdecode.io.registry import DEFAULT_MODEL, Model

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

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ---- called from the event loop --------------------------------------------------------

    def submit(self, request_id: str, prompt: list[int], sp, n: int, logprobs: int | None
               ) -> asyncio.Queue:
        """Queues a request; its SequenceOutputs (or an exception) arrive on the queue."""
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._commands.put(("add", request_id, prompt, sp, n, logprobs, time.monotonic()))
        self._wake.set()
        return q

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._commands.put(("abort", request_id))
            self._wake.set()

    # ---- the engine thread -----------------------------------------------------------------

    def _send(self, request_id: str, item: Any) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the event loop is closed: the server is shutting down
                self._streams.pop(request_id, None)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt, sp, n, logprobs, t0 = cmd
                if rid not in self._streams:  # the client left before admission
                    continue
                try:
                    self.engine.add_request(rid, prompt, sp, n=n, logprobs=logprobs)
                    self._start[rid], self._open[rid] = t0, n
                except ValueError as e:
                    self._send(rid, APIError(str(e)))
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
            except Exception as e:  # keep serving: fail the requests in flight, not the server
                log.exception("engine step failed")
                for rid in list(self._streams):
                    self._send(rid, APIError(f"engine error: {e}", 500, type="server_error"))
                    self.engine.abort_request(rid)
                self._streams.clear()
                continue
            now = time.monotonic()
            for out in outputs:
                self._observe(out, now)
                self._send(out.request_id, out)
            self._update_gauges()

    def _observe(self, out: SequenceOutput, now: float) -> None:
        m, key = self.metrics, (out.request_id, out.index)
        m.generated.inc(len(out.new_token_ids))
        last = self._last_token.get(key)
        if last is None:
            m.ttft.observe(now - self._start.get(out.request_id, now))
        else:
            m.itl.observe(now - last)
        self._last_token[key] = now
        if out.finished:
            self._last_token.pop(key, None)
            m.finished.labels(out.finish_reason).inc()
            self._open[out.request_id] = self._open.get(out.request_id, 1) - 1
            if self._open[out.request_id] == 0:
                del self._open[out.request_id]
                m.e2e.observe(now - self._start.pop(out.request_id, now))

    def _update_gauges(self) -> None:
        s, m = self.engine.stats(), self.metrics
        m.running.set(s["num_running"])
        m.waiting.set(s["num_waiting"])
        m.kv_usage.set(s["kv_usage"])
        m.hit_rate.set(s["prefix_hit_rate"])
        m.preemptions.set(s["num_preemptions"])


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def build_app(engine: LLMEngine, model_name: str) -> tuple[FastAPI, AsyncEngine]:
    """The FastAPI app over an engine; the AsyncEngine starts its thread immediately."""
    core = AsyncEngine(engine)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        core.shutdown()

    app = FastAPI(title="jdecode", version="0.1.0", lifespan=lifespan)
    app.state.core = core
    tok = engine.model.tokenizer
    max_len = engine.max_model_len

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return _error(APIError(f"request body is not valid JSON: {err.get('msg')}"))
        param = ".".join(loc) or None
        return _error(APIError(f"{param or 'body'}: {err.get('msg', 'invalid request')}",
                               param=param))

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error(exc)

    @app.get("/health")
    async def health() -> Response:
        alive = core._thread.is_alive()
        return Response(status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "jdecode",
                                            "max_model_len": max_len}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        core._update_gauges()
        return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(f"The model `{name}` does not exist: this server serves "
                           f"`{model_name}`", status=404, param="model", code="model_not_found")

    def encode(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if tok is None:
                raise APIError("this model has no tokenizer: send token ids as the prompt",
                               param="prompt")
            return tok.encode(prompt)
        vocab = engine.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise APIError(f"prompt token ids must lie in [0, {vocab})", param="prompt")
        return list(prompt)

    def budget(prompt: list[int], max_tokens: int | None) -> int:
        if not prompt:
            raise APIError("the prompt is empty", param="prompt")
        if max_tokens is not None and max_tokens <= 0:
            raise APIError(f"max_tokens={max_tokens}: must be at least 1", param="max_tokens")
        room = max_len - len(prompt)
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            raise APIError(
                f"This model's maximum context length is {max_len} tokens. However, you "
                f"requested {len(prompt) + (max_tokens or 0)} tokens ({len(prompt)} in the "
                f"prompt, {max_tokens or 0} in the completion). Please reduce the prompt or "
                "max_tokens.", param="prompt",
                code="context_length_exceeded")
        return room if max_tokens is None else max_tokens

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        check_model(body.model)
        p = body.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise APIError("the prompt is empty", param="prompt")
        if body.logprobs is not None and not 0 <= body.logprobs <= 5:
            raise APIError(f"logprobs={body.logprobs}: must lie in [0, 5]", param="logprobs")
        encoded = [encode(x) for x in prompts]
        sps = [sampling_params(body, budget(ids, body.max_tokens)) for ids in encoded]
        return await _respond(core, raw, "text_completion", model_name, body, encoded, sps,
                              body.logprobs, tok)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request):
        check_model(body.model)
        if tok is None or not tok.chat_template:
            raise APIError("this model has no chat template: use /v1/completions")
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
            raise APIError(f"top_logprobs={body.top_logprobs}: must lie in [0, 20]",
                           param="top_logprobs")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = tok.encode(tok.apply_chat_template(messages))
        max_tokens = body.max_completion_tokens or body.max_tokens
        sp = sampling_params(body, budget(ids, max_tokens))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await _respond(core, raw, "chat.completion", model_name, body, [ids], [sp],
                              logprobs, tok)

    return app, core


async def _respond(core: AsyncEngine, raw: Request, kind: str, model_name: str, body,
                   prompts: list[list[int]], sps: list, logprobs: int | None, tok):
    """Submits one engine request per prompt and answers, streaming or not."""
    prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
    rid = f"{prefix}-{uuid.uuid4().hex}"
    created = int(time.time())
    n = body.n
    sub_ids = [f"{rid}-{i}" for i in range(len(prompts))]
    queues = [core.submit(s, p, sp, n, logprobs) for s, p, sp in zip(sub_ids, prompts, sps)]
    fmt = _Formatter(kind, rid, created, model_name, tok)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(core, raw, fmt, sub_ids, queues, n, include_usage,
                    sum(len(p) for p in prompts)),
            media_type="text/event-stream")
    try:
        finals: dict[int, SequenceOutput] = {}
        for i, q in enumerate(queues):
            done = 0
            while done < n:
                item = await q.get()
                if isinstance(item, APIError):
                    raise item
                fmt.track(i * n + item.index, item)
                if item.finished:
                    finals[i * n + item.index] = item
                    done += 1
    finally:
        for s in sub_ids:
            core.abort(s)  # no-op once finished; frees pages if the handler was cancelled
    choices = [fmt.choice(k, finals[k]) for k in sorted(finals)]
    completion = sum(len(o.token_ids) for o in finals.values())
    prompt_tokens = sum(len(p) for p in prompts)
    return {"id": rid, "object": kind, "created": created, "model": model_name,
            "choices": choices, "usage": {"prompt_tokens": prompt_tokens,
                                          "completion_tokens": completion,
                                          "total_tokens": prompt_tokens + completion}}


async def _stream(core: AsyncEngine, raw: Request, fmt: _Formatter, sub_ids: list[str],
                  queues: list[asyncio.Queue], n: int, include_usage: bool,
                  prompt_tokens: int) -> AsyncIterator[str]:
    """SSE chunks as tokens arrive; an abandoned stream aborts its engine requests."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, q: asyncio.Queue) -> None:
        done = 0
        while done < n:
            item = await q.get()
            await merged.put((i, item))
            if isinstance(item, APIError):
                return
            done += item.finished

    tasks = [asyncio.create_task(pump(i, q)) for i, q in enumerate(queues)]
    remaining = len(queues) * n
    completion = 0
    try:
        if fmt.kind == "chat.completion":
            for k in range(remaining):
                yield _sse(fmt.chunk(k, {"role": "assistant", "content": ""}, None, None))
        while remaining:
            i, item = await merged.get()
            if isinstance(item, APIError):
                yield _sse(item.body())
                break
            k = i * n + item.index
            completion += len(item.new_token_ids)
            yield _sse(fmt.delta(k, item))
            if item.finished:
                remaining -= 1
        if include_usage:
            yield _sse({"id": fmt.rid, "object": fmt.chunk_kind, "created": fmt.created,
                        "model": fmt.model, "choices": [],
                        "usage": {"prompt_tokens": prompt_tokens,
                                  "completion_tokens": completion,
                                  "total_tokens": prompt_tokens + completion}})
        yield _sse("[DONE]")
    finally:
        for t in tasks:
            t.cancel()
        for s in sub_ids:
            core.abort(s)  # a client gone mid-stream lands here: its pages are freed at once


class _Formatter:
    """Builds OpenAI choice objects (final or streaming) from SequenceOutputs."""

    def __init__(self, kind: str, rid: str, created: int, model: str, tok) -> None:
        self.kind, self.rid, self.created, self.model, self.tok = kind, rid, created, model, tok
        self.chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind
        self.logprobs: dict[int, list] = {}

    def track(self, k: int, out: SequenceOutput) -> None:
        if out.logprobs:
            self.logprobs.setdefault(k, []).extend(out.logprobs)

    def _token(self, t: int) -> str:
        return self.tok.decode([t], skip_special_tokens=False) if self.tok else str(t)

    def _logprobs(self, lps) -> dict | None:
        if lps is None:
            return None
        if self.kind == "chat.completion":
            return {"content": [
                {"token": self._token(lp.token_id), "logprob": lp.logprob, "bytes": None,
                 "top_logprobs": [{"token": self._token(t), "logprob": v, "bytes": None}
                                  for t, v in lp.top.items()]} for lp in lps]}
        return {"tokens": [self._token(lp.token_id) for lp in lps],
                "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{self._token(t): v for t, v in lp.top.items()} for lp in lps],
                "text_offset": []}

    def choice(self, k: int, out: SequenceOutput) -> dict:
        lps = self._logprobs(self.logprobs.get(k, []) if out.logprobs is not None else None)
        if self.kind == "chat.completion":
            return {"index": k, "message": {"role": "assistant", "content": out.text},
                    "logprobs": lps, "finish_reason": out.finish_reason}
        return {"index": k, "text": out.text, "logprobs": lps,
                "finish_reason": out.finish_reason}

    def chunk(self, k: int, delta: dict | str, lps, finish_reason) -> dict:
        if self.kind == "chat.completion":
            choice = {"index": k, "delta": delta, "logprobs": lps,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": k, "text": delta, "logprobs": lps, "finish_reason": finish_reason}
        return {"id": self.rid, "object": self.chunk_kind, "created": self.created,
                "model": self.model, "choices": [choice]}

    def delta(self, k: int, out: SequenceOutput) -> dict:
        lps = self._logprobs(out.logprobs)
        delta = ({"content": out.delta_text} if self.kind == "chat.completion"
                 else out.delta_text)
        return self.chunk(k, delta, lps, out.finish_reason)


def serve(model: str = DEFAULT_MODEL, host: str = "127.0.0.1", port: int = 8000, *,
          dtype: str = "float32", served_model_name: str | None = None,
          **engine_args) -> None:
    """Loads a model and serves it until interrupted (`jdecode serve`).

    Args:
      model: a known name, HF directory or .gguf file. host, port: where to listen.
      dtype: parameter dtype. served_model_name: the name clients pass as `model`.
      **engine_args: `EngineArgs` fields (max_num_seqs, max_num_batched_tokens, ...).
    """
    import uvicorn

    from jdecode.io.registry import load

    loaded: Model = load(model, dtype=dtype)
    engine = LLMEngine(loaded, EngineArgs(**engine_args))
    app, _ = build_app(engine, served_model_name or model)
    uvicorn.run(app, host=host, port=port, log_level="info")
