"""The `jdecode` command line: generate, chat, roofline, serve."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="jdecode: fast LLM decoding in JAX/XLA.")
err = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="name (smollm2-135m), HF dir or "
                                       ".gguf path")]


def _fail(message: str) -> None:
    """Prints a one-line error (no traceback) and exits 2."""
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def _git_sha() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _load(model: str, dtype: str, overrides: list[str]):
    from jdecode.config import ConfigError
    from jdecode.io.registry import load

    try:
        return load(model, dtype=dtype, overrides=tuple(overrides))
    except (FileNotFoundError, ConfigError, ValueError, TypeError) as e:
        _fail(str(e))


def _sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed, max_new_tokens, stop):
    from jdecode.decoding.sampling import SamplingParams

    try:
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty, seed=seed,
                              max_new_tokens=max_new_tokens, stop=tuple(stop or ()))
    except ValueError as e:
        _fail(str(e))


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt text")],
    model: ModelOpt = "smollm2-135m",
    chat: Annotated[bool, typer.Option(help="wrap the prompt in the chat template")] = False,
    max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
    min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    dtype: str = "float32", impl: str = "auto",
    max_seq_len: Annotated[int | None, typer.Option(help="cache slots per sequence")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="config key=value")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    method: Annotated[str, typer.Option(help="autoregressive or speculative")] = "autoregressive",
    draft: Annotated[str, typer.Option(help="speculative draft: ngram, a `jdecode train draft` "
                                       "directory or a model")] = "ngram",
    k: Annotated[int, typer.Option("--k", help="tokens drafted per speculative step")] = 4,
) -> None:
    """Generate text from a prompt, streaming it as it is produced."""
    from jdecode.decoding.generate import Generator
    from jdecode.decoding.speculative import acceptance_stats, build_decoder_fn

    sp = _sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed, max_new_tokens,
                   stop)
    m = _load(model, dtype, set_ or [])
    try:
        m, decoder_fn = build_decoder_fn(method, m, draft, k, impl)
        gen = Generator(m, decoder_fn, impl=impl, max_seq_len=max_seq_len)
        results = None
        for deltas, results in gen.stream([prompt], sp, chat=chat, chunk_steps=8):
            if not as_json and deltas[0]:
                sys.stdout.write(deltas[0])
                sys.stdout.flush()
    except ValueError as e:
        _fail(str(e))
    r = results[0]
    if method == "speculative":
        r.stats.update(acceptance_stats(r.stats["mean_accepted"], k))
    if as_json:
        import dataclasses

        import jax

        print(json.dumps({"model": model, "text": r.text, "token_ids": r.token_ids,
                          "finish_reason": r.finish_reason, "stats": r.stats,
                          "config": dataclasses.asdict(m.cfg),
                          "sampling": dataclasses.asdict(sp), "impl": gen.impl,
                          "jax_version": jax.__version__, "git_sha": _git_sha(),
                          "device": jax.devices()[0].device_kind}))
        return
    s = r.stats
    err.print(f"\n[dim]prefill {s['prefill_ms']:.1f} ms | decode {s['decode_tok_s']:.1f} tok/s | "
              f"{s['num_tokens']} tokens | finish: {r.finish_reason} | "
              f"compile {s['compile_s']:.1f} s[/]")
    if method == "speculative":
        err.print(f"[dim]speculative (draft {draft}, k={k}): acceptance rate "
                  f"{s['acceptance_rate']:.2f} | mean accepted length {s['mean_accepted']:.2f} "
                  "tokens per target step[/]")


@app.command()
def chat(model: ModelOpt = "smollm2-135m", max_new_tokens: int = 256,
         temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
         dtype: str = "float32", system: str | None = None) -> None:
    """Interactive multi-turn chat with the model's chat template (Ctrl-D or /exit quits)."""
    from jdecode.decoding.generate import Generator

    sp = _sampling(temperature, 0, top_p, 0.0, 1.0, seed, max_new_tokens, None)
    m = _load(model, dtype, [])
    if m.tokenizer is None or not m.tokenizer.chat_template:
        _fail(f"model {model!r} has no chat template: use `jdecode generate` instead")
    gen = Generator(m)
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            user = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if user.strip() in ("/exit", "/quit"):
            return
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        ids = m.tokenizer.encode(m.tokenizer.apply_chat_template(messages))
        try:
            for deltas, results in gen.stream([ids], sp, chunk_steps=8):
                sys.stdout.write(deltas[0])
                sys.stdout.flush()
        except ValueError as e:
            err.print(f"[red]error:[/] {e}")
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": results[0].text})


@app.command()
def serve(
    model: ModelOpt = "smollm2-135m", host: str = "127.0.0.1", port: int = 8000,
    dtype: str = "float32",
    served_model_name: Annotated[str | None, typer.Option(help="name clients send")] = None,
    max_num_seqs: int = 32, max_num_batched_tokens: int = 512,
    max_model_len: int | None = None, page_size: int = 16,
    num_pages: int | None = None, kv_cache_gb: float = 1.0,
    policy: Annotated[str, typer.Option(help="continuous or static")] = "continuous",
    enable_chunked_prefill: bool = True, enable_prefix_caching: bool = True,
    impl: str = "xla",
) -> None:
    """OpenAI-compatible server (/v1/completions, /v1/chat/completions, /metrics)."""
    from jdecode.config import ConfigError
    from jdecode.engine.server import serve as run_server

    try:
        run_server(model, host, port, dtype=dtype, served_model_name=served_model_name,
                   max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                   max_model_len=max_model_len, page_size=page_size, num_pages=num_pages,
                   kv_cache_gb=kv_cache_gb, policy=policy,
                   enable_chunked_prefill=enable_chunked_prefill,
                   enable_prefix_caching=enable_prefix_caching, impl=impl)
    except (FileNotFoundError, ConfigError, ValueError, TypeError) as e:
        _fail(str(e))


def _register_optional() -> None:
    """Subcommands owned by other packages, registered when they exist."""
    try:
        from jdecode.analysis.cli import roofline
        app.command("roofline")(roofline)
    except ImportError:
        pass
    try:
        from jdecode.training.cli import app as train_app
        app.add_typer(train_app, name="train")
    except ImportError:
        pass


_register_optional()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
