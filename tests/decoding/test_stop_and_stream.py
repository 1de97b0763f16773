"""How generation ends (EOS, stop ids, stop strings, max_new_tokens) and what streaming emits,
on the real default model with chat prompts (batch 1, one shape bucket shared by every test here
and by the CLI happy path)."""

from __future__ import annotations

import pytest

from jdecode.decoding.sampling import SamplingParams

MAX_NEW = 16
FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def france(smol_generator):
    """The unconstrained greedy answer (EOS ignored) that the stop tests cut short."""
    (r,) = smol_generator.generate(FRANCE, SamplingParams(max_new_tokens=MAX_NEW,
                                                           ignore_eos=True), chat=True)
    assert "Paris" in r.text and len(r.token_ids) == MAX_NEW
    return r


def test_eos_ends_with_stop_and_is_not_in_the_text(smol, smol_generator, france):
    (r,) = smol_generator.generate(FRANCE, SamplingParams(max_new_tokens=MAX_NEW), chat=True)
    eos = smol.tokenizer.eos_ids
    assert r.finish_reason == "stop" and r.token_ids[-1] in eos
    n = len(r.token_ids)
    assert n < MAX_NEW and r.token_ids == france.token_ids[:n]
    assert r.text == smol.tokenizer.decode(r.token_ids[:-1])
    assert "<|im_end|>" not in r.text


def test_stop_token_id_ends_at_its_first_occurrence(smol_generator, france):
    stop_id = france.token_ids[4]
    cut = france.token_ids.index(stop_id) + 1
    (r,) = smol_generator.generate(FRANCE, SamplingParams(
        max_new_tokens=MAX_NEW, ignore_eos=True, stop_token_ids=(stop_id,)), chat=True)
    assert r.finish_reason == "stop"
    assert r.token_ids == france.token_ids[:cut]


def test_stop_string_cuts_the_text_before_it(smol_generator, france):
    (r,) = smol_generator.generate(FRANCE, SamplingParams(
        max_new_tokens=MAX_NEW, ignore_eos=True, stop=("Paris",)), chat=True)
    assert r.finish_reason == "stop"
    assert r.text == france.text[:france.text.index("Paris")]
    # token_ids end with the token that completes the stop string, as in vLLM.
    assert r.token_ids == france.token_ids[:len(r.token_ids)]
    assert "Paris" in smol_generator.model.tokenizer.decode(r.token_ids)
    assert "Paris" not in smol_generator.model.tokenizer.decode(r.token_ids[:-1])


def test_max_new_tokens_ends_with_length(smol_generator, france):
    (r,) = smol_generator.generate(FRANCE, SamplingParams(max_new_tokens=3, ignore_eos=True),
                                   chat=True)
    assert r.finish_reason == "length"
    assert r.token_ids == france.token_ids[:3]


@pytest.mark.parametrize("prompt", ["Say hello in Japanese.", "Translate 'cat' to Chinese."])
def test_stream_deltas_concatenate_to_the_text_without_split_characters(
        smol, smol_generator, prompt):
    sp = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    chunks = list(smol_generator.stream([prompt], sp, chat=True, chunk_steps=1,
                                        stream_interval_s=0))
    deltas = [d[0] for d, _ in chunks]
    (result,) = chunks[-1][1]
    # These answers are CJK, whose characters span several byte-level tokens.
    assert any("\ufffd" in smol.tokenizer.decode([t]) for t in result.token_ids)
    assert not [d for d in deltas if "\ufffd" in d]
    assert sum(bool(d) for d in deltas) > 3  # streamed, not one block at the end
    assert "".join(deltas) == result.text


def test_stream_with_stop_string_stops_the_deltas_too(smol_generator, france):
    sp = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, stop=("France is",))
    chunks = list(smol_generator.stream([FRANCE], sp, chat=True, chunk_steps=1,
                                        stream_interval_s=0))
    (result,) = chunks[-1][1]
    assert result.finish_reason == "stop"
    assert "".join(d[0] for d, _ in chunks) == result.text == \
        france.text[:france.text.index("France is")]


def test_stream_matches_the_text_when_the_budget_ends_mid_character(smol_generator):
    # The answer's first character, お, spans two tokens: 3 tokens end inside the second one.
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    chunks = list(smol_generator.stream(["Say hello in Japanese."], sp, chat=True,
                                        chunk_steps=1, stream_interval_s=0))
    (result,) = chunks[-1][1]
    assert "".join(d[0] for d, _ in chunks) == result.text


def test_a_row_stopped_by_a_string_mid_stream_leaves_the_other_rows_as_they_were(
        smol_generator):
    # A stop string is found on the host after a chunk: the stopped row's tokens past it
    # must not reach its result or its deltas, and the other row must not notice.
    sp = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    plain = smol_generator.generate([FRANCE, FRANCE], [sp, sp], chat=True)
    cut = plain[0].text.index("France is")
    stop = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, stop=("France is",))
    chunks = list(smol_generator.stream([FRANCE, FRANCE], [stop, sp], chat=True,
                                        chunk_steps=2, stream_interval_s=0))
    stopped, other = chunks[-1][1]
    assert stopped.finish_reason == "stop" and stopped.text == plain[0].text[:cut]
    assert stopped.token_ids == plain[0].token_ids[:len(stopped.token_ids)]
    assert len(stopped.token_ids) < MAX_NEW
    assert other.token_ids == plain[1].token_ids and other.text == plain[1].text
    assert "".join(d[0] for d, _ in chunks) == stopped.text
    assert "".join(d[1] for d, _ in chunks) == other.text
