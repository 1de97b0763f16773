"""The server under hostile input, abandoned requests, access control and shutdown.

Every error must come back in the OpenAI shape with the field named in `param`, before any
output, and the server must go on answering normal requests with the offline engine's output.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import openai
import pytest

from jdecode.decoding.sampling import SamplingParams
from jdecode.engine.server import load_chat_template

from .conftest import SERVED_NAME as NAME
from .conftest import running_server

CHAT = [{"role": "user", "content": "Say hello."}]


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert "#" not in err["message"]  # no internal request ids
    if param is not None:
        assert err["param"] == param, err
    return err


def assert_still_serves(url: str, offline, prompt: str = "The quick brown fox") -> None:
    want = offline.generate(prompt, SamplingParams(max_new_tokens=6), use_tqdm=False)
    r = httpx.post(url + "/v1/completions", timeout=30, json={
        "model": NAME, "prompt": prompt, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want[0].outputs[0].text


def completion(**fields) -> dict:
    return {"model": NAME, "prompt": "hi", "max_tokens": 4, **fields}


def chat(**fields) -> dict:
    return {"model": NAME, "messages": CHAT, "max_tokens": 4, **fields}


HOSTILE = [
    # Ranges the engine cannot represent (these used to crash the shared step).
    ("completions", completion(seed=-1), "seed"),
    ("completions", completion(seed=2**64), "seed"),
    ("completions", completion(top_k=10**10), "top_k"),
    ("chat/completions", chat(seed=2**32), "seed"),
    ("completions", completion(temperature=2.5), "temperature"),
    ("completions", completion(top_p=0), "top_p"),
    ("completions", completion(repetition_penalty=0), "repetition_penalty"),
    ("completions", completion(logprobs=6), "logprobs"),
    ("chat/completions", chat(top_logprobs=21, logprobs=True), "top_logprobs"),
    ("completions", completion(stop_token_ids=[-1]), "stop_token_ids.0"),
    ("completions", completion(stop_token_ids=[10**6]), "stop_token_ids"),
    ("completions", completion(prompt=[1, 2**40]), "prompt"),
    # Content parts that are not text.
    ("chat/completions", chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": 123}]}]), "messages.0.content"),
    ("chat/completions", chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": None}]}]), "messages.0.content"),
    ("chat/completions", chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]), "messages.0.content"),
    ("chat/completions", chat(messages=[{"role": "robot", "content": "x"}]), "messages.0.role"),
    # OpenAI's types and limits, without coercion.
    ("completions", completion(stream="yes"), "stream"),
    ("completions", completion(max_tokens=True), "max_tokens"),
    ("completions", completion(seed="42"), "seed"),
    ("completions", completion(n="2"), "n"),
    ("chat/completions", chat(max_completion_tokens=0), "max_completion_tokens"),
    ("chat/completions", chat(max_tokens=0), "max_tokens"),
    ("completions", completion(stop=""), "stop"),
    ("completions", completion(stop=["ok", ""]), "stop"),
    ("completions", completion(echo=True), "echo"),
    ("completions", completion(prompt=[]), "prompt"),
    # Known before generation: a 4xx, not a 200 with an error event.
    ("completions", completion(n=10000, stream=True), "n"),
    ("chat/completions", chat(n=17, stream=True), "n"),
    ("completions", completion(prompt="word " * 400, stream=True), "prompt"),
]


@pytest.mark.parametrize(("route", "body", "param"), HOSTILE,
                         ids=[f"{r}:{p}:{i}" for i, (r, _, p) in enumerate(HOSTILE)])
def test_hostile_fields_get_a_400_naming_the_field(server, offline, route, body, param):
    r = httpx.post(f"{server[0]}/v1/{route}", json=body, timeout=30)
    assert_openai_error(r, 400, param)
    assert_still_serves(server[0], offline)


@pytest.mark.parametrize(("route", "raw", "param"), [
    ("completions", b'{"model": "tiny-smol", "prompt": "a \\ud800 b"}', "prompt"),
    ("chat/completions",
     b'{"model": "tiny-smol", "messages": [{"role": "user", "content": "\\udfff"}]}',
     "messages.0.content"),
])
def test_lone_surrogate_is_a_400(server, offline, route, raw, param):
    r = httpx.post(f"{server[0]}/v1/{route}", content=raw,
                   headers={"content-type": "application/json"}, timeout=30)
    assert "lone surrogate" in assert_openai_error(r, 400, param)["message"]
    assert_still_serves(server[0], offline)


@pytest.mark.parametrize(("method", "path", "raw", "status"), [
    ("POST", "/v1/completions", b'{"model": "\xff\xfe"}', 400),  # not UTF-8
    ("POST", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400),  # nested 100k deep
    ("POST", "/v1/completions", b"{not json", 400),
    ("GET", "/v1/nothing-here", b"", 404),
    ("GET", "/v1/completions", b"", 405),
])
def test_every_error_has_the_openai_shape(server, offline, method, path, raw, status):
    r = httpx.request(method, server[0] + path, content=raw,
                      headers={"content-type": "application/json"}, timeout=30)
    assert_openai_error(r, status)
    assert_still_serves(server[0], offline)


def test_bad_requests_among_streams_in_flight_end_alone(server, offline):
    prompts = [f"Stream {i} tells a story about {i * 3}" for i in range(6)]
    want = offline.generate(prompts, SamplingParams(max_new_tokens=40, ignore_eos=True),
                            use_tqdm=False)
    started = threading.Barrier(len(prompts) + 1, timeout=60)

    def stream(i):
        body = completion(prompt=prompts[i], max_tokens=40, temperature=0, ignore_eos=True,
                          stream=True)
        text, first = "", True
        with httpx.stream("POST", server[0] + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if first and line.startswith("data: {"):
                    first = False
                    started.wait()  # every stream is in flight before the bad requests go
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    text += event["choices"][0]["text"]
        return text

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        streams = [pool.submit(stream, i) for i in range(len(prompts))]
        started.wait()
        for body, param in [(completion(seed=-1), "seed"), (completion(seed=2**64), "seed"),
                            (completion(top_k=10**10), "top_k")]:
            bad = httpx.post(server[0] + "/v1/completions", json=body, timeout=30)
            assert_openai_error(bad, 400, param)
        got = [s.result() for s in streams]
    assert got == [w.outputs[0].text for w in want]


def test_max_tokens_null_means_the_default(server, offline):
    r = httpx.post(server[0] + "/v1/completions", timeout=30, json=completion(
        max_tokens=None, ignore_eos=True, temperature=0))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 16  # OpenAI's default, not the context
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_long_stop_string_holds_back_only_a_possible_match(server, offline):
    prompt = "Once upon a time"
    want = offline.generate(prompt, SamplingParams(max_new_tokens=24, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].text
    body = completion(prompt=prompt, max_tokens=24, temperature=0, ignore_eos=True,
                      stream=True, stop=["\x00" + "z" * 10_000])
    with httpx.stream("POST", server[0] + "/v1/completions", json=body, timeout=30) as r:
        texts = [json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                 if line.startswith("data: {")]
    assert "".join(texts) == want
    assert sum(bool(t) for t in texts[:-1]) > 1  # text streamed before the final chunk


def _running(url: str) -> float:
    metrics = httpx.get(url + "/metrics").text
    return float(next(line.split()[-1] for line in metrics.splitlines()
                      if line.startswith("jdecode_num_requests_running ")))


def test_non_streaming_disconnect_aborts(server, offline):
    url, core = server
    body = completion(prompt="Count forever:", max_tokens=240, temperature=0, ignore_eos=True)
    # Once to the end first: the block-table widths it passes compile now, not while the
    # engine thread should be aborting the request below.
    assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
    before = core.engine.num_generated_tokens
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=0.5)
    deadline = time.time() + 5
    while _running(url) or core.engine.has_unfinished_requests():
        assert time.time() < deadline, "the abandoned request is still running"
        time.sleep(0.05)
    assert core.engine.block_manager.num_used_pages == 0
    assert core.engine.num_generated_tokens - before < 240  # it stopped early
    assert_still_serves(url, offline)


def test_api_key_chat_template_and_body_limit(smol_tiny, offline):
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    with running_server(smol_tiny, api_key="sesame", chat_template=template,
                        max_request_bytes=4000) as (url, _, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            for path in ("/v1/models", "/v1/completions"):
                r = httpx.post(url + path, json=completion(), headers=headers) \
                    if path != "/v1/models" else httpx.get(url + path, headers=headers)
                assert assert_openai_error(r, 401)["code"] == "invalid_api_key"
        assert httpx.get(url + "/health").status_code == 200  # not under /v1
        client = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        got = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=5,
                                             temperature=0)
        tok = offline.model.tokenizer
        want = offline.generate(tok.encode("<user>Say hello.<assistant>"),
                                SamplingParams(max_new_tokens=5), use_tqdm=False)
        assert got.choices[0].message.content == want[0].outputs[0].text
        key = {"Authorization": "Bearer sesame"}
        big = json.dumps(completion(prompt="x" * 5000)).encode()
        r = httpx.post(url + "/v1/completions", content=big, headers=key)
        assert "--max-request-bytes" in assert_openai_error(r, 413)["message"]
        chunked = httpx.post(url + "/v1/completions", content=iter([big[:3000], big[3000:]]),
                             headers={**key, "content-type": "application/json"})
        assert_openai_error(chunked, 413)
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            client.completions.create(model=NAME, prompt="word " * 400)


def test_shutdown_ends_requests_in_flight_at_once(smol_tiny):
    with running_server(smol_tiny) as (url, core, srv):
        body = completion(prompt="Count forever:", max_tokens=240, ignore_eos=True)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=30)
            deadline = time.time() + 10
            while not core.engine.has_unfinished_requests():
                assert time.time() < deadline and not pending.done(), "request did not start"
                time.sleep(0.01)
            t0 = time.monotonic()
            srv.should_exit = True  # what uvicorn's SIGTERM handler does
            assert_openai_error(pending.result(), 503)
            assert time.monotonic() - t0 < 5  # not after the 240 tokens
        while core.alive:  # the engine thread stops last, once every connection is closed
            assert time.monotonic() - t0 < 30, "shutdown is waiting on something"
            time.sleep(0.05)
        assert core.engine.num_unfinished_requests == 0
        assert core.engine.block_manager.num_used_pages == 0


def test_chat_template_from_a_file_or_inline(tmp_path):
    inline = "{% for m in messages %}{{ m.content }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(inline)
    assert load_chat_template(str(tmp_path / "t.jinja")) == inline
    assert load_chat_template(inline) == inline
    with pytest.raises(ValueError, match="no such file"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="jinja syntax error on line 1"):
        load_chat_template("{% for m in messages %}")
