"""Our tokenizer (built from the GGUF vocabulary and merges) against HF's tokenizer loaded from
the same GGUF, and streaming detokenization on multi-byte text."""

from __future__ import annotations

import pytest

from jdecode.io.tokenizer import IncrementalDetokenizer

STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "import numpy as np\nx = np.arange(10)[::-1]",
    '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}',
    "SELECT * FROM users WHERE id = 42;",
    "<html><body><p class=\"x\">hi</p></body></html>",
    "    four leading spaces",
    "trailing spaces    ",
    "tabs\tand\t\ttabs",
    "newlines\n\n\nand\r\nCRLF",
    "a  b   c    d     e",
    "\n\n\n",
    " ",
    "Ünïcödé àccénts: café, naïve, Zürich",
    "Ελληνικά και русский текст",
    "日本語のテキストです。",
    "中文分词测试：你好，世界！",
    "한국어 문장입니다",
    "emoji 😀🎉👍🏽 and flags 🇫🇷🇯🇵",
    "family 👨‍👩‍👧‍👦 zwj sequence",
    "math ∑∫√∞ ≤ ≥ ≠ π ≈ 3.14159",
    "numbers 1234567890 and 3.14e-10 and 1,000,000",
    "MiXeD CaSe AND ALL CAPS",
    "it's don't won't y'all",
    "URL: https://example.com/path?q=1&r=two#frag",
    "email: someone@example.org",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after the end token",
    "mid<|im_end|>word special token",
    "",
    "ascii art: ¯\\_(ツ)_/¯",
    "zero\u200bwidth\u00a0nbsp",
]


def test_ids_match_hf_gguf_tokenizer(smol, hf_smol_tokenizer):
    assert len(STRINGS) >= 30
    mismatches = []
    for s in STRINGS:
        ours = smol.tokenizer.encode(s)
        theirs = hf_smol_tokenizer(s)["input_ids"]
        if ours != theirs:
            mismatches.append((s, ours, theirs))
    assert not mismatches, mismatches


def test_special_tokens_are_single_ids(smol):
    tok = smol.tokenizer
    ids = tok.encode("<|im_start|>user<|im_end|>")
    assert len(ids) == 3 and ids[0] == tok.backend.token_to_id("<|im_start|>")
    assert ids[2] == tok.backend.token_to_id("<|im_end|>")
    assert tok.eos_ids == (tok.backend.token_to_id("<|im_end|>"),)


def test_decode_matches_hf(smol, hf_smol_tokenizer):
    for s in STRINGS:
        ids = smol.tokenizer.encode(s)
        assert smol.tokenizer.decode(ids) == hf_smol_tokenizer.decode(
            ids, skip_special_tokens=True), s


@pytest.mark.parametrize("text", [
    "emoji 😀🎉👍🏽 and flags 🇫🇷🇯🇵 end",
    "日本語のテキストです。中文分词测试：你好，世界！",
    "한국어 문장입니다 👨‍👩‍👧‍👦",
    "mixed ascii, ∑∫√∞, café, ツ",
])
def test_streaming_deltas_never_split_a_character(smol, text):
    tok = smol.tokenizer
    ids = tok.encode(text)
    # Byte-level BPE splits these characters over several tokens, so holding back is needed.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    for one in (lambda d, i: d.add([i]), IncrementalDetokenizer.step):  # the engine's: step
        detok = IncrementalDetokenizer(tok)
        deltas = [one(detok, i) for i in ids]
        assert not [d for d in deltas if "\ufffd" in d]
        assert "".join(deltas) == text


def test_streaming_in_uneven_chunks(smol, rng):
    tok = smol.tokenizer
    text = "".join(STRINGS[15:24])
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    out, i = [], 0
    while i < len(ids):
        n = int(rng.integers(1, 5))
        out.append(detok.add(ids[i:i + n]))
        i += n
    assert "\ufffd" not in "".join(out)
    assert "".join(out) == tok.decode(ids) == text


def test_the_cached_tokenizer_json_is_the_same_tokenizer(smol):
    """The param cache keeps the GGUF's tokenizer as tokenizers' own JSON
    (`checkpoint.save_meta`): read back, it gives the same ids and text on every string."""
    from tokenizers import Tokenizer as HFTokenizer

    tok = smol.tokenizer
    again = HFTokenizer.from_str(tok.backend.to_str())
    for s in STRINGS:
        ids = tok.backend.encode(s, add_special_tokens=False).ids
        assert again.encode(s, add_special_tokens=False).ids == ids, s
        assert again.decode(ids, skip_special_tokens=False) == tok.backend.decode(
            ids, skip_special_tokens=False), s
    assert again.get_vocab(with_added_tokens=True) == tok.backend.get_vocab(True)
