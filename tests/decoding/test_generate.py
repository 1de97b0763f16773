"""The Generator on a tiny random model (f32): batching is invisible, steady-state decoding never
retraces, top-k 1 is greedy, and seeds decide sampled tokens row by row."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
from helpers import seed_of, tiny_model

from jdecode.decoding import loop
from jdecode.decoding.generate import Generator
from jdecode.decoding.sampling import SamplingParams

MAX_NEW = 12  # output bucket 16
PROMPT_LENS = (3, 9, 14)  # different lengths, one prompt bucket (16)


@pytest.fixture(scope="module")
def gen() -> Generator:
    return Generator(tiny_model(seed_of(__name__)), max_seq_len=64)


@pytest.fixture(scope="module")
def first_request_traces(gen) -> collections.Counter:
    """Traces added by the generator's first requests (batch 1, prompt bucket 16): one greedy
    and one sampled, since an all-greedy batch has its own executable without the sampler."""
    before = collections.Counter(loop.TRACE_COUNTS)
    prompt = np.random.default_rng(seed_of("first")).integers(0, 256, 5).tolist()
    gen.generate([prompt], SamplingParams(max_new_tokens=MAX_NEW))
    greedy_only = collections.Counter(loop.TRACE_COUNTS) - before
    gen.generate([prompt], SamplingParams(max_new_tokens=MAX_NEW, temperature=0.5, seed=1))
    added = collections.Counter(loop.TRACE_COUNTS) - before
    # Exactly one executable pair per kind: the sampled request added one of each.
    assert added == greedy_only + greedy_only, (dict(greedy_only), dict(added))
    return added


def prompts(rng, lens=PROMPT_LENS) -> list[list[int]]:
    return [rng.integers(0, 256, n).tolist() for n in lens]


def test_second_request_in_the_same_bucket_adds_no_traces(gen, first_request_traces, rng):
    assert first_request_traces["init"] >= 1 and first_request_traces["loop"] >= 1
    before = collections.Counter(loop.TRACE_COUNTS)
    # Another prompt length in the same bucket, sampled with another temperature and seed,
    # streamed in chunks of a different size: every one of these is a runtime value.
    (prompt,) = prompts(rng, [11])
    sp = SamplingParams(max_new_tokens=MAX_NEW - 3, temperature=0.7, top_p=0.9, seed=123)
    chunks = list(gen.stream([prompt], sp, chunk_steps=3))
    assert len(chunks) > 2 and len(chunks[-1][1][0].token_ids) == MAX_NEW - 3
    gen.generate([prompt[:7]], SamplingParams(max_new_tokens=MAX_NEW, temperature=1.3, seed=9))
    gen.generate([prompt[:13]], SamplingParams(max_new_tokens=MAX_NEW - 1))  # greedy again
    added = collections.Counter(loop.TRACE_COUNTS) - before
    assert not added, f"steady-state requests retraced: {dict(added)}"


def test_batch_gives_each_prompt_its_solo_tokens(gen, rng):
    ps = prompts(rng)
    sp = SamplingParams(max_new_tokens=MAX_NEW)
    batched = gen.generate(ps, sp)
    for p, r in zip(ps, batched):
        (alone,) = gen.generate([p], sp)
        assert r.prompt_token_ids == p
        assert r.token_ids == alone.token_ids
        assert len(r.token_ids) == MAX_NEW and r.finish_reason == "length"
    # The prompts continue differently, so a row mix-up could not pass.
    assert len({tuple(r.token_ids) for r in batched}) == len(ps)


@pytest.mark.parametrize("interval_s, limits", [
    (1e9, [1, 2, 4, 8]),  # doubling; the last chunk ends at the token budget after 4 steps
    (1e-9, [1] * 11),  # an interval no step fits in keeps the first size (11 steps: the 12th
    # token is the prefill's)
    (0.0, [1] * 11),  # 0: fixed chunks
])
def test_stream_chunks_double_until_one_takes_the_interval(gen, rng, monkeypatch, interval_s,
                                                            limits):
    (prompt,) = prompts(rng, [6])
    sp = SamplingParams(max_new_tokens=MAX_NEW)
    (alone,) = gen.generate([prompt], sp)  # compiled, and the tokens to match
    asked = []
    for key, exe in list(gen._compiled.items()):
        def loop_recording(params, ls, limit, run=exe.loop):
            asked.append(int(limit))
            return run(params, ls, limit)
        monkeypatch.setitem(gen._compiled, key, dataclasses.replace(exe, loop=loop_recording))
    chunks = list(gen.stream([prompt], sp, chunk_steps=1, stream_interval_s=interval_s))
    assert chunks[-1][1][0].token_ids == alone.token_ids
    assert len(chunks) == len(limits) + 1  # a yield after the prefill and after every chunk
    assert asked == limits


def test_per_row_max_new_tokens(gen, rng):
    ps = prompts(rng)
    sps = [SamplingParams(max_new_tokens=n) for n in (2, MAX_NEW, 7)]
    results = gen.generate(ps, sps)
    full = gen.generate(ps, SamplingParams(max_new_tokens=MAX_NEW))
    for r, f, sp in zip(results, full, sps):
        assert r.token_ids == f.token_ids[:sp.max_new_tokens]
        assert r.finish_reason == "length"


def test_top_k_one_equals_greedy(gen, rng):
    (p,) = prompts(rng, [8])
    rows = [SamplingParams(max_new_tokens=MAX_NEW),
            SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, top_k=1, seed=1),
            SamplingParams(max_new_tokens=MAX_NEW, temperature=3.0, top_k=1, seed=2)]
    greedy, k1, k1_hot = gen.generate([p] * 3, rows)
    assert k1.token_ids == greedy.token_ids and k1_hot.token_ids == greedy.token_ids


def test_seeded_sampling_repeats_and_seeds_differ(gen, rng):
    (p,) = prompts(rng, [6])
    rows = [SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, seed=s)
            for s in (7, 7, 8)]
    a = gen.generate([p] * 3, rows)
    b = gen.generate([p] * 3, rows)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    # Same seed in two rows of one batch: same tokens (a row's stream ignores its neighbours).
    assert a[0].token_ids == a[1].token_ids
    assert a[0].token_ids != a[2].token_ids
    # A sampled row differs from greedy (a temperature-1 draw over 256 tokens, 12 times).
    (greedy,) = gen.generate([p], SamplingParams(max_new_tokens=MAX_NEW))
    assert a[0].token_ids != greedy.token_ids


def test_bad_requests_name_the_value(gen, rng):
    (p,) = prompts(rng, [10])
    with pytest.raises(ValueError, match="prompt 0 has 10 tokens and asks for 60 new ones; "
                                         "max_seq_len is 64"):
        gen.generate([p], SamplingParams(max_new_tokens=60))
    with pytest.raises(ValueError, match=r"token ids \[256\] are outside the vocabulary"):
        gen.generate([[1, 256]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        gen.generate([[]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="has no tokenizer"):
        gen.generate(["text needs a tokenizer"], SamplingParams(max_new_tokens=2))


@pytest.mark.parametrize("block", [2, 5])
def test_grouped_loop_gives_the_per_step_loop_tokens(gen, rng, block):
    """Fixed-trip-count groups of steps (run_loop's `block`) only change when "done" is checked:
    tokens, lengths and finish reasons are those of the one-step-at-a-time loop, including a row
    that stops on a stop id in the middle of a group and streaming chunks that split groups."""
    ps = prompts(rng)
    plain = Generator(gen.model, max_seq_len=64, loop_block=1, specialize_greedy=False)
    grouped = Generator(gen.model, max_seq_len=64, loop_block=block)
    ref = plain.generate(ps, SamplingParams(max_new_tokens=MAX_NEW))
    # Stop row 1 on its own 4th token: mid-group for both block sizes.
    sps = [SamplingParams(max_new_tokens=n, stop_token_ids=stop) for n, stop in
           ((MAX_NEW, ()), (MAX_NEW, (ref[1].token_ids[3],)), (7, ()))]
    want = plain.generate(ps, sps)
    assert len(want[1].token_ids) <= 4 and want[1].finish_reason == "stop"
    for chunk in (None, 3):
        got = grouped.generate(ps, sps, chunk_steps=chunk)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert [r.finish_reason for r in got] == [r.finish_reason for r in want]
    sampled = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.9, top_k=20, seed=5)
    assert (grouped.generate(ps, sampled)[0].token_ids ==
            plain.generate(ps, sampled)[0].token_ids)


def test_prompt_buckets_grow_linearly_past_1024():
    from jdecode.decoding.generate import prompt_bucket

    assert [prompt_bucket(n) for n in (1, 16, 17, 1000, 1024, 1025, 2048, 2049, 8000)] == [
        16, 16, 32, 1024, 1024, 2048, 2048, 3072, 8192]


def test_a_long_wait_is_reported_while_it_runs(monkeypatch):
    import time

    from jdecode.decoding import generate as generate_mod

    class Slow:  # an array whose computation takes 0.3 s
        def block_until_ready(self):
            time.sleep(0.3)

    monkeypatch.setattr(generate_mod, "PREFILL_POLL_S", 0.05)
    seen = []
    generate_mod.wait_reporting(Slow(), seen.append)
    assert len(seen) >= 3 and seen == sorted(seen) and seen[-1] < 0.5


def test_on_prefill_hook_gets_the_prompt_tokens(gen, rng):
    calls = []
    prompt = rng.integers(0, gen.model.cfg.vocab_size, 9).tolist()
    gen.generate([prompt], SamplingParams(max_new_tokens=2),
                 on_prefill=lambda n, s: calls.append((n, s)))
    assert all(n == 9 and s >= 0 for n, s in calls)  # a tiny prefill may finish at once


@pytest.mark.gpu
def test_cublas_loop_gives_the_triton_loops_tokens(monkeypatch):
    """The loop compiled for cuBLAS (64 rows) decodes the same greedy tokens as XLA's choice,
    f32 at highest precision: only the GEMMs' summation order differs."""
    import jax

    from jdecode.model import compile_options

    if jax.default_backend() != "gpu":
        pytest.skip("needs the GPU")
    rng = np.random.default_rng(seed_of("cublas"))
    ps = [rng.integers(0, 256, int(n)).tolist() for n in rng.integers(3, 15, 64)]
    sp = SamplingParams(max_new_tokens=MAX_NEW)
    model = tiny_model(seed_of(__name__))
    with jax.default_matmul_precision("highest"):
        cublas_gen = Generator(model, max_seq_len=64)
        cublas = cublas_gen.generate(ps, sp)
        (exe,) = cublas_gen._compiled.values()
        assert "cublas" in exe.loop.as_text(), "the 64-row loop's GEMMs are not cuBLAS calls"
        monkeypatch.setattr(compile_options, "CUBLAS_MIN_ROWS", None)
        triton = Generator(model, max_seq_len=64).generate(ps, sp)
    assert [r.token_ids for r in cublas] == [r.token_ids for r in triton]


def test_api_calls_share_one_generator_per_model_and_arguments(rng):
    """`jdecode.generate` reuses the Generator it built for the same model, impl, method and
    options (a second call traces nothing), gives the tokens a fresh Generator gives, and
    builds anew when the method, its options or the model's params differ."""
    import jdecode

    model = tiny_model(seed_of("shared"))
    prompt = rng.integers(0, 256, 6).tolist()
    sp = SamplingParams(max_new_tokens=MAX_NEW)
    (first,) = jdecode.generate(model, prompt, sp)
    built = model.shared_generator[2]
    before = collections.Counter(loop.TRACE_COUNTS)
    (again,) = jdecode.generate(model, prompt, sp)
    assert collections.Counter(loop.TRACE_COUNTS) == before, "a repeated call traced again"
    assert model.shared_generator[2] is built
    (fresh,) = Generator(model).generate([prompt], sp)
    assert first.token_ids == again.token_ids == fresh.token_ids

    jdecode.generate(model, prompt, sp, method="speculative", k=2)
    spec = model.shared_generator[2]
    assert spec is not built and spec.method == "speculative"
    jdecode.generate(model, prompt, sp, method="speculative", k=2)
    assert model.shared_generator[2] is spec
    jdecode.generate(model, prompt, sp, method="speculative", k=3)
    assert model.shared_generator[2] is not spec

    swapped = dataclasses.replace(model)  # a replaced model starts without one
    assert swapped.shared_generator is None
    jdecode.generate(model, prompt, sp)
    plain = model.shared_generator[2]
    model.params = tiny_model(seed_of("other")).params  # the same call on other weights
    (other,) = jdecode.generate(model, prompt, sp)
    assert model.shared_generator[2] is not plain
    assert other.token_ids == Generator(model).generate([prompt], sp)[0].token_ids
    assert other.token_ids != first.token_ids  # other weights, other tokens
