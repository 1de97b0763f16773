"""Engine behaviour beyond greedy exactness: stops, lengths, seeds, n > 1, logprobs, aborts."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdecode.cache.dense import DenseMeta, init_cache, make_dense_attend
from jdecode.decoding.sampling import SamplingParams, stop_prefix_len
from jdecode.model.transformer import forward
from pallas_kernels.testing import assert_close


def prompts_of(rng, n, lo=17, hi=32):
    return [rng.integers(0, 256, size=int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def test_stop_token_and_heterogeneous_max_tokens(rng, make_llm, greedy_reference):
    a, b, c = prompts_of(rng, 3)
    ref_a = greedy_reference(a)
    stop = ref_a[3]
    cut = ref_a.index(stop) + 1  # the first occurrence ends the sequence, stop token included
    params = [SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)),
              SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=7)]
    outs = make_llm(max_num_batched_tokens=16).generate([a, b, c], params, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == ref_a[:cut]
    assert outs[0].outputs[0].finish_reason == "stop"
    assert outs[1].outputs[0].token_ids == greedy_reference(b)[:3]
    assert outs[2].outputs[0].token_ids == greedy_reference(c)[:7]
    assert [o.outputs[0].finish_reason for o in outs[1:]] == ["length", "length"]


def test_seeded_sampling_does_not_depend_on_batch_mix_or_chunking(rng, make_llm):
    target = prompts_of(rng, 1)[0]
    sp = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    alone = make_llm(max_num_batched_tokens=64).generate([target], sp, use_tqdm=False)
    others = prompts_of(rng, 5)
    mixed = make_llm(max_num_batched_tokens=16, max_chunk_tokens=3).generate(
        others + [target], [SamplingParams(max_new_tokens=8, temperature=0.7, seed=5)] * 5
        + [sp], use_tqdm=False)
    assert mixed[-1].outputs[0].token_ids == alone[0].outputs[0].token_ids
    other_seed = make_llm(max_num_batched_tokens=64).generate(
        [target], SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=99),
        use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != alone[0].outputs[0].token_ids


def test_n_sampled_siblings_differ_and_reproduce(rng, make_llm):
    prompt = prompts_of(rng, 1, 18, 18)[0]
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7, n=4)
    first = make_llm(max_num_batched_tokens=16).generate(prompt, sp, use_tqdm=False)[0]
    seqs = [tuple(o.token_ids) for o in first.outputs]
    assert [o.index for o in first.outputs] == [0, 1, 2, 3]
    assert len(set(seqs)) > 1
    again = make_llm(max_num_batched_tokens=64).generate(prompt, sp, use_tqdm=False)[0]
    assert [tuple(o.token_ids) for o in again.outputs] == seqs


def test_logprobs_match_the_dense_forward(rng, tiny, make_llm, greedy_reference):
    prompt = prompts_of(rng, 1)[0]
    out = make_llm(max_num_batched_tokens=16).generate(
        prompt, SamplingParams(max_new_tokens=4), logprobs=5, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy_reference(prompt)[:4]
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    # Dense forward over prompt + outputs: logprobs at each generating position.
    seq = prompt + out.token_ids[:-1]
    t = len(seq)
    cache = init_cache(tiny.cfg, 1, 64)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    logits, _, _ = forward(tiny.params, jnp.asarray([seq], jnp.int32), pos, cache,
                           DenseMeta(pos), cfg=tiny.cfg, attend=make_dense_attend(tiny.cfg))
    lp = np.asarray(jax.nn.log_softmax(logits[0, len(prompt) - 1:], axis=-1))  # [4, V]
    for i, got in enumerate(out.logprobs):
        top = np.argsort(-lp[i])[:5]
        assert list(got.top) == top.tolist()
        assert_close(list(got.top.values()), lp[i, top], "float32")
        assert_close(got.logprob, lp[i, got.token_id], "float32")
    assert out.cumulative_logprob == pytest.approx(sum(x.logprob for x in out.logprobs))


def test_abort_frees_pages_and_leaves_others_exact(rng, make_engine, greedy_reference):
    a, b = prompts_of(rng, 2)
    engine = make_engine(max_num_batched_tokens=16, num_pages=40)
    engine.add_request("a", a, SamplingParams(max_new_tokens=10))
    engine.add_request("b", b, SamplingParams(max_new_tokens=10))
    for _ in range(4):
        engine.step()
    used = engine.block_manager.num_used_pages
    held = len(engine.block_manager.page_ids(engine.scheduler.running[0].request_id))
    engine.abort_request("a")
    assert engine.block_manager.num_used_pages == used - held
    tokens = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == "b"
            tokens = out.token_ids
    assert tokens == greedy_reference(b)
    assert engine.block_manager.num_used_pages == 0


def test_add_request_errors_name_the_fix(make_engine):
    engine = make_engine()
    with pytest.raises(ValueError, match="prompt has 64 tokens; max_model_len is 64"):
        engine.add_request("x", [1] * 64)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 256\)"):
        engine.add_request("x", [1, 999])
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("x", [])
    with pytest.raises(ValueError, match="n=9 sequences do not fit max_num_seqs=8"):
        engine.add_request("x", [1], SamplingParams(max_new_tokens=1, n=9))
    engine.add_request("x", [1])
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("x", [2])


def test_generate_with_mismatched_params_raises(make_llm):
    with pytest.raises(ValueError, match="2 prompts but 3 SamplingParams"):
        make_llm().generate([[1], [2]], [SamplingParams()] * 3, use_tqdm=False)


def test_a_request_failing_in_post_processing_ends_alone(rng, make_engine, greedy_reference,
                                                         monkeypatch):
    good, bad = prompts_of(rng, 2)
    engine = make_engine(max_num_batched_tokens=16)
    postprocess = engine._postprocess

    def failing(seq, token, now):  # the "bad" request's third token breaks its host code
        if seq.user_id == "bad" and seq.req.num_output_tokens == 3:
            raise RuntimeError("broken detokenizer")
        return postprocess(seq, token, now)

    monkeypatch.setattr(engine, "_postprocess", failing)
    engine.add_request("good", good, SamplingParams(max_new_tokens=10))
    engine.add_request("bad", bad, SamplingParams(max_new_tokens=10, n=2, temperature=1.0))
    outs: dict[str, list] = {"good": [], "bad": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id].append(out)
    assert outs["good"][-1].token_ids == greedy_reference(good)
    assert all(o.error is None for o in outs["good"])
    failed = [o for o in outs["bad"] if o.error is not None]
    assert len(failed) == 1 and "RuntimeError" in failed[0].error
    assert failed[0].finished and failed[0].finish_reason == "abort"
    assert engine.num_unfinished_requests == 0 and engine.block_manager.num_used_pages == 0


def test_sampling_params_take_vllm_names_and_refuse_empty_stop_strings():
    sp = SamplingParams(max_tokens=7, n=3)
    assert (sp.max_new_tokens, sp.n) == (7, 3)
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        SamplingParams(stop=["ok", ""])  # "" would end every sequence at once


def test_stop_prefix_len_matches_brute_force(rng):
    def brute(text, stops):  # the longest suffix that is a proper prefix of a stop string
        return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)

    for _ in range(300):
        text = "".join(rng.choice(list("abc"), size=int(rng.integers(0, 12))))
        stops = ["".join(rng.choice(list("abc"), size=int(rng.integers(1, 8))))
                 for _ in range(int(rng.integers(1, 4)))]
        assert stop_prefix_len(text, stops) == brute(text, stops), (text, stops)


def test_outputs_token_ids_are_snapshots(rng, make_engine, greedy_reference):
    """Each step's output carries the tokens so far without copying them (`TokenIds`): a
    snapshot that later tokens leave as it was, equal to the list it shows."""
    prompt = prompts_of(rng, 1)[0]
    engine = make_engine()
    engine.add_request("a", prompt, SamplingParams(max_new_tokens=6))
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(engine.step())
    ref = greedy_reference(prompt)[:6]
    assert [list(o.token_ids) for o in outs] == [ref[:i + 1] for i in range(6)]
    first, last = outs[0].token_ids, outs[-1].token_ids
    assert first == ref[:1] and ref[:1] == first and first != ref[:2] and last == tuple(ref)
    assert len(first) == 1 and first[-1] == ref[0] and last[1:3] == ref[1:3]
    with pytest.raises(IndexError, match="out of range for 1 tokens"):
        first[1]
    assert repr(first) == repr(ref[:1])


def test_host_bench_times_the_engine_without_the_device(tmp_path, monkeypatch):
    """scripts/bench_engine_host.py on the tiny model: its launch stub runs no device step, the
    engine still lands every token, the record names its phases, and the server streams
    every token asked for to its clients (a process of their own)."""
    import importlib

    from helpers import SCRIPTS

    # Imported as a module (not loaded by path): the clients' process unpickles its function.
    monkeypatch.syspath_prepend(str(SCRIPTS))
    bench = importlib.import_module("bench_engine_host")
    tiny = str(Path(__file__).parents[2] / "configs/models/tiny.yaml")
    res = bench.main(["--model", tiny, "--batch", "4",
                      "--num-scheduler-steps", "1,2", "--steps", "6", "--prompt-len", "8",
                      "--output-len", "0,5", "--server", "--server-tokens", "8",
                      "--server-stack", "plain", "--out", str(tmp_path)])
    assert [(p["num_scheduler_steps"], p["stack"]) for p in res["server"]] == [
        (1, "asyncio + h11"), (2, "asyncio + h11")]
    assert all(p["output_tok_s"] > 0 and p["engine_steps"] > 0 for p in res["server"])
    assert [(p["batch"], p["num_scheduler_steps"], p["output_len"]) for p in res["probes"]] == [
        (4, 1, 0), (4, 1, 5), (4, 2, 0), (4, 2, 5)]
    for p in res["probes"]:
        assert p["decodes_per_step"] == p["num_scheduler_steps"]  # every row decoded each step
        assert p["ms_per_decode_step"] > 0 and set(p["phases_ms"]) == set(bench.PHASES)
    assert "| 4 | 2 | 5 |" in (tmp_path / "engine_host_cpu.md").read_text()


def test_serving_bench_runs_and_names_its_files_by_the_whole_tag(tmp_path):
    """scripts/bench_serving.py on the tiny model, offline and probe: the record holds both,
    and its files carry the whole tag. A tag with dots (a model's name, "llama-3.2-1b") once
    lost everything after its first dot to `Path.with_suffix`, so runs of one model's trees
    wrote over each other."""
    import subprocess
    import sys

    from helpers import SCRIPTS

    root = Path(__file__).parents[2]
    tag = "tiny-0.5_A"
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_serving.py"), "--model",
         str(root / "configs/models/tiny.yaml"), "--policies", "continuous", "--rates", "",
         "--num-requests", "6", "--max-prompt", "48", "--max-output", "8",
         "--max-model-len", "256", "--long-prompt", "64", "--max-num-seqs", "4",
         "--token-buckets", "4,64", "--probe-steps", "3", "--out", str(tmp_path),
         "--tag", tag], capture_output=True, text=True, cwd=root, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((tmp_path / f"serving_{tag}.json").read_text())
    assert res["offline"]["continuous"]["output_tok_s"] > 0
    assert res["probe"]["batch"] == 4 and res["probe"]["engine_step_ms"] > 0
    md = tmp_path / f"serving_{tag}.md"
    md.unlink()
    replot = subprocess.run([sys.executable, str(SCRIPTS / "bench_serving.py"), "--replot",
                             str(tmp_path / f"serving_{tag}.json")], capture_output=True,
                            text=True, cwd=root, timeout=120)
    assert replot.returncode == 0, replot.stderr[-3000:]
    assert "## Offline" in md.read_text()


def test_the_runner_reuses_sampling_arrays_only_for_the_same_rows(rng, make_engine,
                                                                   monkeypatch):
    """A step's sampling arrays are the last step's while its rows' SamplingParams are the
    same objects in the same order, and are stacked afresh when a request joins or leaves:
    every step's arrays equal `SamplingArrays.from_params` of its rows."""
    from jdecode.decoding.sampling import SamplingArrays

    engine = make_engine(max_num_batched_tokens=64)
    runner, used = engine.runner, []
    step_inputs = runner.step_inputs

    def check(out):
        want = SamplingArrays.from_params([c.request.sampling_params for c in out.chunks],
                                          runner.max_num_seqs, specialize_greedy=True)
        got = runner._sampling[1]
        for field in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
        assert got.all_greedy == want.all_greedy
        return got

    two_rows = []

    def checked(out, *args, **kwargs):
        result = step_inputs(out, *args, **kwargs)
        used.append(id(check(out)))
        if len(out.chunks) == 2 and not two_rows:
            two_rows.append((out, args, kwargs))
        return result

    monkeypatch.setattr(runner, "step_inputs", checked)
    a, b, c = prompts_of(rng, 3)
    engine.add_request("a", a, SamplingParams(max_new_tokens=6, temperature=0.8, seed=1))
    engine.add_request("b", b, SamplingParams(max_new_tokens=12, top_k=5, temperature=1.0,
                                              seed=2))
    for _ in range(3):
        engine.step()
    engine.add_request("c", c, SamplingParams(max_new_tokens=4))  # greedy, joins mid-way
    while engine.has_unfinished_requests():
        engine.step()
    assert len(set(used)) < len(used)  # steady steps reused their arrays
    assert len(set(used)) >= 3  # joins and departures restacked them
    # The same rows but another request in one of them (one left as another joined): new
    # arrays, though the count is the same.
    out, args, kwargs = two_rows[0]
    step_inputs(out, *args, **kwargs)
    out.chunks[0].request.sampling_params = SamplingParams(max_new_tokens=3, temperature=0.3)
    step_inputs(out, *args, **kwargs)
    check(out)
