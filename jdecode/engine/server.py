"""OpenAI-compatible server: FastAPI + uvicorn over the engine thread (`AsyncEngine`).

Endpoints: /v1/completions, /v1/chat/completions (SSE streaming or not), /v1/models, /health,
/metrics (Prometheus). Every error is an OpenAI error body. A client that disconnects aborts
its request, streaming or not, and shutdown ends what is in flight at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import jax
import jinja2
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jdecode import console
from jdecode.engine.async_engine import AsyncEngine
from jdecode.engine.engine import EngineArgs, LLMEngine, SequenceOutput
from jdecode.engine.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    sampling_params,
    validation_error,
)
from jdecode.engine.request import InvalidRequest
from jdecode.io.registry import DEFAULT_MODEL, Model, load
from jdecode.io.tokenizer import Tokenizer

log = logging.getLogger(__name__)
# Request bodies above this answer 413. A full 4096-token context is ~20 KB of text or JSON
# token ids; 4 MiB leaves room for long chat histories and batched prompts.
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
# After shutdown starts, requests get this long to deliver their 503 before being cancelled.
SHUTDOWN_GRACE_S = 5
_bearer = HTTPBearer(auto_error=False)  # the /v1 routes' `Authorization: Bearer ...` header


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


class BodySizeLimit:
    """ASGI middleware: a request body over `max_bytes` answers 413 with an OpenAI error body,
    whether the client declares its length or streams it chunked.

    Starlette's own limiter answers in plain text, so it cannot give the OpenAI shape.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> APIError:
        return APIError(f"the request body is over {self.max_bytes} bytes: send less, or start "
                        "the server with a larger --max-request-bytes", status=413)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _error(self._too_large())(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # raised inside the body read: the handler answers 413
                e = self._too_large()
                raise HTTPException(e.status, e.message)
            return message

        await self.app(scope, counted, send)


def load_chat_template(template: str) -> str:
    """A chat template from a file path or given inline (as vLLM's --chat-template).

    Raises:
      ValueError naming the file or the jinja syntax error.
    """
    path = Path(template)
    source = template
    if "{" not in template:  # no jinja markup: it names a file
        if not path.is_file():
            raise ValueError(f"--chat-template {template}: no such file (give a jinja file or "
                             "the template itself)")
        source = path.read_text()
    try:
        jinja2.Environment().parse(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template: jinja syntax error on line {e.lineno}: {e.message}"
                         ) from None
    return source


def _max_token_chars(tok: Tokenizer) -> int:
    """Most characters one token can cover: a text longer than max_model_len times this can
    only be too long, so it is rejected without tokenizing it. Byte-level vocabularies spell
    each byte as one character, so a token's vocabulary string is never shorter than its text.
    """
    return max(len(t) for t in tok.backend.get_vocab(with_added_tokens=True))


async def _until_disconnected(raw: Request) -> None:
    """Returns when the client hangs up (the body was read already: only disconnects arrive)."""
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def build_app(engine: LLMEngine, model_name: str, *, api_key: str | None = None,
              chat_template: str | None = None,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
              ) -> tuple[FastAPI, AsyncEngine]:
    """The FastAPI app over an engine; the AsyncEngine starts its thread immediately.

    Args:
      engine: the engine to serve. model_name: the name clients pass as `model`.
      api_key: if set, every /v1 route wants `Authorization: Bearer <api_key>`.
      chat_template: a jinja template replacing the model's (see `load_chat_template`).
      max_request_bytes: larger request bodies answer 413.
    """
    core = AsyncEngine(engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        core.shutdown()

    app = FastAPI(title="jdecode", version="0.1.0", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    app.state.core = core
    tok = engine.model.tokenizer
    if tok is not None and chat_template is not None:
        tok = dataclasses.replace(tok, chat_template=chat_template)
    max_len = engine.max_model_len
    max_chars = max_len * _max_token_chars(tok) if tok is not None else 0

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(validation_error(exc.errors()))

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        response = _error(APIError(str(exc.detail), status=exc.status_code, type=kind))
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(APIError(f"internal error ({type(exc).__name__}); see the server log",
                               status=500, type="server_error"))

    async def authorized(
            cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        if api_key is not None and (cred is None or not secrets.compare_digest(
                cred.credentials.encode(), api_key.encode())):
            raise APIError("missing or incorrect API key: send `Authorization: Bearer <key>` "
                           "with the server's --api-key", status=401, code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if core.alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        core.update_gauges()
        return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "jdecode",
                                            "max_model_len": max_len}]}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(f"The model `{name}` does not exist: this server serves "
                           f"`{model_name}`", status=404, param="model", code="model_not_found")

    def too_long(what: str, n: int, unit: str) -> APIError:
        return APIError(f"This model's maximum context length is {max_len} tokens. However, "
                        f"{what} has {n} {unit}. Please reduce the prompt.", param=what,
                        code="context_length_exceeded")

    def encode(text: str) -> list[int]:
        """Runs in a worker thread: tokenizing a long text must not stall the event loop."""
        if tok is None:
            raise APIError("this model has no tokenizer: send token ids as the prompt",
                           param="prompt")
        if len(text) > max_chars:  # decided before the work
            raise too_long("prompt", len(text), "characters")
        return tok.encode(text)

    def encode_chat(messages: list[dict[str, str]]) -> list[int]:
        """Renders the chat template and tokenizes, in a worker thread."""
        if tok is None or not tok.chat_template:
            raise APIError("this model has no chat template: use /v1/completions, or start "
                           "the server with --chat-template")
        if sum(len(m["content"]) for m in messages) > max_chars:
            raise too_long("messages", sum(len(m["content"]) for m in messages), "characters")
        try:
            return tok.encode(tok.apply_chat_template(messages))
        except jinja2.TemplateError as e:  # the template's own checks (roles, order, ...)
            raise APIError(f"the chat template rejected the messages: {e}",
                           param="messages") from None

    def budget(prompt: list[int], max_tokens: int | None) -> int:
        """The request's output cap: max_tokens, or the room left in the context if None."""
        room = max_len - len(prompt)
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            raise APIError(
                f"This model's maximum context length is {max_len} tokens. However, you "
                f"requested {len(prompt) + (max_tokens or 0)} tokens ({len(prompt)} in the "
                f"prompt, {max_tokens or 0} in the completion). Please reduce the prompt or "
                "max_tokens.", param="prompt" if room <= 0 else "max_tokens",
                code="context_length_exceeded")
        return room if max_tokens is None else max_tokens

    def checked(prompts: list[list[int]], body, max_tokens: int | None,
                logprobs: int | None) -> list:
        """SamplingParams per prompt, once the engine has accepted each (4xx before output)."""
        sps = []
        for ids in prompts:
            sp = sampling_params(body, budget(ids, max_tokens))
            try:
                engine.validate_request(ids, sp, logprobs)
            except InvalidRequest as e:
                raise APIError(str(e), param=e.param) from None
            sps.append(sp)
        return sps

    @v1.post("/completions")
    async def completions(body: CompletionRequest, raw: Request):
        check_model(body.model)
        prompts = [await run_in_threadpool(encode, p) if isinstance(p, str) else p
                   for p in body.prompts()]
        sps = checked(prompts, body, body.max_tokens, body.logprobs)
        return await _respond(core, raw, "text_completion", model_name, body, prompts, sps,
                              body.logprobs, tok)

    @v1.post("/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request):
        check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = await run_in_threadpool(encode_chat, messages)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        sps = checked([ids], body, body.completion_limit, logprobs)
        return await _respond(core, raw, "chat.completion", model_name, body, [ids], sps,
                              logprobs, tok)

    app.include_router(v1)
    return app, core


async def _respond(core: AsyncEngine, raw: Request, kind: str, model_name: str, body,
                   prompts: list[list[int]], sps: list, logprobs: int | None, tok):
    """Submits one engine request per prompt and answers, streaming or not."""
    prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
    rid = f"{prefix}-{uuid.uuid4().hex}"
    created = int(time.time())
    n = body.n
    sub_ids = [f"{rid}-{i}" for i in range(len(prompts))]
    queues = [core.submit(s, p, sp, logprobs) for s, p, sp in zip(sub_ids, prompts, sps)]
    fmt = _Formatter(kind, rid, created, model_name, tok)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(core, fmt, sub_ids, queues, n, include_usage, sum(len(p) for p in prompts)),
            media_type="text/event-stream")

    async def collect() -> dict[int, SequenceOutput]:
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
        return finals

    # A client that hangs up before the answer cancels the work (uvicorn would let it run).
    work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(_until_disconnected(raw))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        work.cancel()
        gone.cancel()
        for s in sub_ids:
            core.abort(s)  # no-op once finished; frees pages if the client left or we failed
    if not work.done() or work.cancelled():
        return Response(status_code=499)  # nobody is listening
    finals = work.result()
    choices = [fmt.choice(k, finals[k]) for k in sorted(finals)]
    completion = sum(len(o.token_ids) for o in finals.values())
    prompt_tokens = sum(len(p) for p in prompts)
    return {"id": rid, "object": kind, "created": created, "model": model_name,
            "choices": choices, "usage": {"prompt_tokens": prompt_tokens,
                                          "completion_tokens": completion,
                                          "total_tokens": prompt_tokens + completion}}


async def _stream(core: AsyncEngine, fmt: _Formatter, sub_ids: list[str],
                  queues: list[asyncio.Queue], n: int, include_usage: bool,
                  prompt_tokens: int) -> AsyncIterator[str]:
    """SSE chunks as tokens arrive; an abandoned stream aborts its engine requests.

    Every event that is ready when the stream wakes goes out as one chunk: each chunk costs
    the event loop a trip through the ASGI send chain and a socket write, and under load
    (or with multi-step bursts) several tokens are waiting at once. The events are the same
    either way; only their grouping into writes changes.
    """
    if len(queues) == 1:  # one prompt: read its queue directly, no pump task
        merged, tasks = queues[0], []
        unwrap = lambda item: (0, item)  # noqa: E731
    else:
        merged = asyncio.Queue()
        unwrap = lambda pair: pair  # noqa: E731

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
            yield "".join(_sse(fmt.chunk(k, {"role": "assistant", "content": ""}, None, None))
                          for k in range(remaining))
        failed = False
        while remaining and not failed:
            events = []
            i, item = unwrap(await merged.get())
            while True:
                if isinstance(item, APIError):
                    events.append(_sse(item.body()))
                    failed = True
                    break
                completion += len(item.new_token_ids)
                events.append(_sse(fmt.delta(i * n + item.index, item)))
                remaining -= item.finished
                if not remaining:
                    break
                try:
                    i, item = unwrap(merged.get_nowait())
                except asyncio.QueueEmpty:
                    break
            yield "".join(events)
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


class Server(uvicorn.Server):
    """uvicorn's server, but shutdown (SIGTERM, Ctrl-C) first ends every request in flight with
    a 503: uvicorn alone would wait for each to finish generating."""

    def __init__(self, config: uvicorn.Config, core: AsyncEngine) -> None:
        super().__init__(config)
        self.core = core

    async def shutdown(self, sockets=None) -> None:
        self.core.abort_all(APIError("the server is shutting down: retry the request later",
                                     status=503, type="server_error"))
        await super().shutdown(sockets)


def make_server(app: FastAPI, core: AsyncEngine, host: str = "127.0.0.1", port: int = 8000,
                log_level: str = "info") -> Server:
    """A `Server` for the app of `build_app`; `.run()` serves until shutdown."""
    return Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                 timeout_graceful_shutdown=SHUTDOWN_GRACE_S), core)


def serve(model: str = DEFAULT_MODEL, host: str = "127.0.0.1", port: int = 8000, *,
          dtype: str = "auto", served_model_name: str | None = None,
          api_key: str | None = None, chat_template: str | None = None,
          max_request_bytes: int | None = None, warmup: bool | None = None,
          **engine_args) -> None:
    """Loads a model and serves it until interrupted (`jdecode serve`).

    Args:
      model: a known name, HF directory or .gguf file. host, port: where to listen.
      dtype: parameter dtype (auto: `io.registry.resolve_dtype`).
      served_model_name: the name clients pass as `model`.
      api_key: bearer token wanted on every /v1 route; None reads $JDECODE_API_KEY (unset or
        empty = no check).
      chat_template: a jinja file or inline template replacing the model's.
      max_request_bytes: larger request bodies answer 413 (None = DEFAULT_MAX_REQUEST_BYTES).
      warmup: compile the engine's steps before listening (`LLMEngine.warmup`); None = on a
        GPU, where each step shape otherwise costs the first request that needs it seconds.
      **engine_args: `EngineArgs` fields (max_num_seqs, max_num_batched_tokens, ...).
    """
    template = load_chat_template(chat_template) if chat_template is not None else None
    loaded: Model = load(model, dtype=dtype)
    engine = LLMEngine(loaded, EngineArgs(**engine_args))
    err, backend = console.stderr(), jax.default_backend()
    # dtype auto depends on the backend, so say what it chose (as vLLM logs its dtype).
    err.print(f"{served_model_name or model}: {loaded.cfg.dtype} on {backend}", highlight=False)
    if backend == "gpu" if warmup is None else warmup:
        with err.status("compiling the engine's steps (--no-warmup skips this)"):
            info = engine.warmup()
        err.print(f"warm-up: {info['prefill_buckets']} token buckets, "
                  f"{info['burst_buckets']} decode-only buckets in {info['seconds']:.1f} s")
    app, core = build_app(engine, served_model_name or model,
                          api_key=api_key or os.environ.get("JDECODE_API_KEY") or None,
                          chat_template=template,
                          max_request_bytes=DEFAULT_MAX_REQUEST_BYTES if max_request_bytes is None
                          else max_request_bytes)
    make_server(app, core, host, port).run()
