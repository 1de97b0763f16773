"""The `jdecode` command line: generate, chat, roofline, serve."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from jdecode.provenance import git_sha

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="jdecode: fast LLM decoding in JAX/XLA.")
# soft_wrap: a one-line error or stats line stays one line (rich wraps at 80 columns when
# stderr is not a terminal, which cuts messages in logs and in tests).
err = Console(stderr=True, soft_wrap=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="name (smollm2-135m), HF dir or "
                                       ".gguf path")]


def _fail(message: str) -> None:
    """Prints a one-line error (no traceback) and exits 2."""
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


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


def read_decode_config(path: str | None) -> dict:
    """A decoding config (configs/decode/*.yaml): `method` and its `options`."""
    from jdecode.config import ConfigError, read_yaml_mapping

    if path is None:
        return {}
    raw = read_yaml_mapping(path, "decoding config", "pass a YAML file from configs/decode/")
    unknown = sorted(set(raw) - {"method", "options"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; a decoding config has keys "
                          "method and options")
    return raw


def split_set(items: list[str], spec) -> tuple[dict, list[str]]:
    """Routes `--set key=value` items: the method's options first, then (as before methods
    had options) the model config's fields; `model.key=value` picks the model explicitly."""
    import dataclasses

    from jdecode import options
    from jdecode.config import ConfigError, ModelConfig, parse_override

    method_keys = options.fields_of(spec.options_cls)
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    opts, model_items = {}, []
    for item in items:
        key, value = parse_override(item)
        if key.startswith("model."):
            model_items.append(item.split(".", 1)[1])
        elif key in method_keys:
            opts[key] = value
        elif key.split(".")[0] in model_keys:
            model_items.append(item)
        else:
            valid = ", ".join(sorted(method_keys)) or "none"
            raise ConfigError(f"--set {item}: unknown key(s) [{key!r}]: method {spec.name!r} "
                              f"takes {valid}, and model configs (YAML) take ModelConfig "
                              f"fields; valid keys are: {valid}, "
                              f"{', '.join(sorted(model_keys))}")
    return opts, model_items


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
    method: Annotated[str | None, typer.Option(
        help="decoding method (`jdecode methods` lists them); default autoregressive")] = None,
    config: Annotated[str | None, typer.Option(
        "--config", help="decoding config YAML (configs/decode/*.yaml): method and options")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="key=value: a method option (e.g. k=4), or a model config field for "
        "YAML model configs (model.key=value to be explicit); repeatable")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Generate text from a prompt, streaming it as it is produced."""
    from jdecode import options
    from jdecode.config import ConfigError
    from jdecode.decoding import methods
    from jdecode.decoding.generate import Generator

    sp = _sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed, max_new_tokens,
                   stop)
    try:  # flags and configs are checked before the model loads
        raw = read_decode_config(config)
        spec = methods.get(method or raw.get("method", "autoregressive"))
        set_opts, model_overrides = split_set(set_ or [], spec)
        where = " with ".join(filter(None, (config, set_ and "--set")))
        opts = methods.parse_options(spec, {**(raw.get("options") or {}), **set_opts}, where)
    except ConfigError as e:
        _fail(str(e))
    m = _load(model, dtype, model_overrides)
    try:
        gen = Generator(m, impl=impl, max_seq_len=max_seq_len, method=spec.name, options=opts)
        results = None
        for deltas, results in gen.stream([prompt], sp, chat=chat, chunk_steps=8):
            if not as_json and deltas[0]:
                sys.stdout.write(deltas[0])
                sys.stdout.flush()
    except ValueError as e:
        _fail(str(e))
    r = results[0]
    if as_json:
        import dataclasses

        import jax

        print(json.dumps({"model": model, "method": spec.name,
                          "options": options.to_dict(opts), "text": r.text,
                          "token_ids": r.token_ids, "finish_reason": r.finish_reason,
                          "stats": r.stats, "config": dataclasses.asdict(m.cfg),
                          "sampling": dataclasses.asdict(sp), "impl": gen.impl,
                          "jax_version": jax.__version__, "git_sha": git_sha(),
                          "device": jax.devices()[0].device_kind}))
        return
    s = r.stats
    err.print(f"\n[dim]prefill {s['prefill_ms']:.1f} ms | decode {s['decode_tok_s']:.1f} tok/s | "
              f"{s['num_tokens']} tokens | finish: {r.finish_reason} | "
              f"compile {s['compile_s']:.1f} s[/]")
    if spec.name != "autoregressive":
        extra = " | ".join(f"{k} {v:.3g}" for k, v in gen.describe(s).items()
                           if k != "mean_accepted")
        err.print(f"[dim]{spec.name} ({', '.join(f'{k}={v}' for k, v in options.to_dict(opts).items())}): "
                  f"mean accepted {s['mean_accepted']:.2f} tokens per step"
                  + (f" | {extra}" if extra else "") + "[/]")


@app.command("methods")
def list_methods(
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """List the decoding methods, whether each is lossless, and their options."""
    from rich.console import Console
    from rich.table import Table

    from jdecode import options
    from jdecode.decoding import methods

    rows = {name: {"lossless": spec.lossless, "summary": spec.summary, "options": {
        key: {"type": options.type_name(tp), "default": default, "help": help_}
        for key, (tp, default, help_) in options.fields_of(spec.options_cls).items()}}
        for name, spec in methods.available().items()}
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(title="decoding methods: jdecode generate --method NAME --set option=value",
                  show_lines=True)
    for col in ("method", "lossless", "what it does", "options: type = default, meaning"):
        table.add_column(col, overflow="fold")
    for name, row in rows.items():
        opts = "\n".join(f"{k}: {o['type']} = {o['default']!r}, {o['help']}"
                         for k, o in row["options"].items())
        table.add_row(name, "yes" if row["lossless"] else "no (lossy)", row["summary"],
                      opts or "(none)")
    Console().print(table)


@app.command()
def experiment(
    config: Annotated[str, typer.Argument(help="experiment YAML (configs/experiments/*.yaml)")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="key=value override; dotted keys reach into lists, e.g. "
        "batch_sizes=[1,4] or methods.0.options.k=3; repeatable")] = None,
    out: Annotated[str | None, typer.Option(help="output directory (default "
                                            "experiments/<name>); a rerun resumes")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the rows as JSON lines")
                       ] = False,
) -> None:
    """Run a grid of methods x batch sizes with autoregressive decoding as the same-run
    baseline; writes results.jsonl, results.md and plots, and skips cells already done."""
    from jdecode.config import ConfigError
    from jdecode.experiments.config import load_config
    from jdecode.experiments.runner import run_experiment

    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as e:
        _fail(str(e))
    out_dir = Path(out or f"experiments/{cfg.name}")
    command = "jdecode experiment " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else ""
    try:
        rows = run_experiment(cfg, out_dir, progress=not as_json, command=command)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if as_json:
        for row in rows:
            print(json.dumps({k: v for k, v in row.items() if k != "config"}))
        return
    err.print(f"{len(rows)} cells in {out_dir}/results.jsonl; table: {out_dir}/results.md")
    print((out_dir / "results.md").read_text())  # plain: a markdown table must not be wrapped


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
        from jdecode.training.cli import train
        app.command("train")(train)
    except ImportError:
        pass


_register_optional()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
