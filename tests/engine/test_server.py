"""The OpenAI-compatible server, tested with the official `openai` client on 127.0.0.1.

The model is the tiny random one widened to SmolLM2's vocabulary, so the real tokenizer and
chat template apply; the expected outputs come from the offline `LLM` with the same engine.
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest

from .conftest import SERVED_NAME as NAME
from .conftest import running_server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server[0] + "/health").status_code == 200


def test_completion_matches_offline(client, offline):
    prompt = "The quick brown fox"
    want = offline.generate(prompt, _greedy(12), use_tqdm=False)[0].outputs[0]
    got = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.prompt_tokens == len(offline.model.tokenizer.encode(prompt))


def test_streaming_completion_and_token_prompt(client, offline):
    ids = offline.model.tokenizer.encode("Once upon a time")
    want = offline.generate(ids, _greedy(10), use_tqdm=False)[0].outputs[0]
    stream = client.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_chat_streaming_and_not(client, offline):
    tok = offline.model.tokenizer
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say hello."}]
    ids = tok.encode(tok.apply_chat_template(messages))
    want = offline.generate(ids, _greedy(9), use_tqdm=False)[0].outputs[0]
    got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=9,
                                         temperature=0)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=9,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text


def test_n_and_logprobs(client):
    got = client.completions.create(model=NAME, prompt="Hello", max_tokens=5, n=3,
                                    temperature=1.0, seed=11, logprobs=2)
    assert sorted(c.index for c in got.choices) == [0, 1, 2]
    for c in got.choices:
        assert len(c.logprobs.token_logprobs) == len(c.logprobs.tokens) == 5
        assert all(len(t) <= 2 for t in c.logprobs.top_logprobs)
    chat = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)
    # Greedy: the chosen token is the most likely one.
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)


def _greedy(n):
    from jdecode.decoding.sampling import SamplingParams

    return SamplingParams(max_new_tokens=n)


def test_64_concurrent_streaming_clients_get_correct_outputs(server, offline):
    prompts = [f"Request number {i}: tell me about item {i * 7 % 13}" for i in range(64)]
    lengths = [4 + i % 9 for i in range(64)]
    want = offline.generate(prompts, [_greedy(k) for k in lengths], use_tqdm=False)

    def one(i):
        c = openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)
        stream = c.completions.create(model=NAME, prompt=prompts[i], max_tokens=lengths[i],
                                      temperature=0, stream=True)
        text, reason = "", None
        for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    for i, (text, reason) in enumerate(results):
        assert (text, reason) == (want[i].outputs[0].text, want[i].outputs[0].finish_reason), i


def test_disconnect_mid_stream_aborts_and_frees_pages(server, client, offline):
    url, core = server
    engine = core.engine
    body = {"model": NAME, "prompt": "Count forever:", "max_tokens": 200, "temperature": 0,
            "stream": True, "ignore_eos": True}
    other_want = offline.generate("A steady neighbour", _greedy(30),
                                  use_tqdm=False)[0].outputs[0].text
    before = engine.num_generated_tokens
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        other = pool.submit(lambda: client.completions.create(
            model=NAME, prompt="A steady neighbour", max_tokens=30, temperature=0).choices[0])
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few tokens arrive, then we hang up
        assert any(g.startswith("data: {") for g in got)
        assert other.result().text == other_want
    deadline = time.time() + 30
    while engine.has_unfinished_requests() or engine.block_manager.num_used_pages:
        assert time.time() < deadline, "the abandoned request still holds pages"
        time.sleep(0.05)
    metrics = httpx.get(url + "/metrics").text
    assert "jdecode_kv_cache_usage_ratio 0.0" in metrics
    # The abandoned request stopped before its 200 tokens (the neighbour made 30).
    assert engine.num_generated_tokens - before < 200 + 30


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": NAME, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ({"model": NAME, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": NAME, "prompt": 42}, 400, "prompt"),
    ({"model": NAME, "prompt": "word " * 400}, 400, "prompt"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 300}, 400, "max_tokens"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ({"prompt": "hi"}, 400, "model"),
])
def test_bad_requests_get_openai_errors_and_server_stays_up(server, body, status, param):
    r = httpx.post(server[0] + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] is not None and err["param"].startswith(param)
    assert httpx.get(server[0] + "/health").status_code == 200


def test_malformed_json_and_client_errors(server, client):
    r = httpx.post(server[0] + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                       temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=NAME, prompt="word " * 400)
    assert client.completions.create(model=NAME, prompt="still up", max_tokens=2,
                                     temperature=0).choices[0].finish_reason == "length"


def test_metrics_exposes_latencies_and_cache(server, client):
    client.completions.create(model=NAME, prompt="metrics please", max_tokens=3, temperature=0)
    text = httpx.get(server[0] + "/metrics").text
    for name in ("jdecode_time_to_first_token_seconds_count",
                 "jdecode_inter_token_latency_seconds_count",
                 "jdecode_e2e_request_latency_seconds_count", "jdecode_num_requests_running",
                 "jdecode_num_requests_waiting", "jdecode_kv_cache_usage_ratio",
                 "jdecode_prefix_cache_hit_rate", "jdecode_num_preemptions_total"):
        assert name in text, name
    count = next(line for line in text.splitlines()
                 if line.startswith("jdecode_e2e_request_latency_seconds_count"))
    assert float(count.split()[-1]) >= 1


def test_multi_step_server_streams_what_one_decode_per_launch_gives(smol_tiny, offline):
    """The GPU default (4 decodes per launch): bursts stream the same text, a stop string
    inside a burst cuts it at the same place, and the usage counts the same tokens."""
    from jdecode.decoding.sampling import SamplingParams

    ids = offline.model.tokenizer.encode("Once upon a time")
    full = offline.generate(ids, _greedy(16), use_tqdm=False)[0].outputs[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), f"pick another stop: {stop!r}"
    want = offline.generate(ids, SamplingParams(max_new_tokens=16, stop=(stop,)),
                            use_tqdm=False)[0].outputs[0]
    assert want.finish_reason == "stop"
    with running_server(smol_tiny, {"num_scheduler_steps": 4}) as (url, core, _):
        assert core.engine.args.num_scheduler_steps == 4
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        for stop_args, expect in (({}, full), ({"stop": [stop]}, want.text)):
            chunks = list(client.completions.create(
                model=NAME, prompt=ids, max_tokens=16, temperature=0, stream=True,
                stream_options={"include_usage": True}, **stop_args))
            assert "".join(c.choices[0].text for c in chunks if c.choices) == expect
        assert chunks[-1].usage.completion_tokens == len(want.token_ids)
        assert core.engine.num_steps < core.engine.num_generated_tokens
