"""The `jdecode` command line: generate, chat, methods, experiment, serve (train and roofline
register from their packages).

Every flag is checked before a model loads. Importing this module does not import jax, so
`jdecode --help` and flag errors take a fraction of a second.
"""

from __future__ import annotations

import json
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated

import typer

from jdecode import __version__
from jdecode.config import DTYPE_CHOICES, ConfigError
from jdecode.console import OneLineErrors, PrefillNotice, fail, stderr, stdout
from jdecode.io import registry
from jdecode.provenance import git_sha

app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True,
                  help="jdecode: fast LLM decoding in JAX/XLA.")

IMPLS = ("auto", "xla", "pallas", "reference")


def choice(*allowed: str):
    """A typer callback accepting only `allowed` values (None passes: the flag was not set)."""

    def check(value: str | None) -> str | None:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"{value!r}: choose one of {', '.join(allowed)}")
        return value

    return check


# -- flags shared by generate and chat -------------------------------------------------------
# Ranges are declared here, so a bad value fails before jax is imported; `SamplingParams`
# checks them again for the Python API (and its errors are given flag names, `flags_named`).
ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help="a known name (smollm2-135m), a model config in configs/models/ "
    "(e.g. llama-3.2-1b: random weights), an HF checkpoint directory or a .gguf file")]
MaxNewTokens = Annotated[int, typer.Option(min=1, help="generate at most this many tokens")]
Temperature = Annotated[float, typer.Option(
    min=0.0, help="0 = greedy; above 0, sample at this temperature")]
TopK = Annotated[int, typer.Option(min=0, help="sample from the k most likely tokens; 0 = off")]
TopP = Annotated[float, typer.Option(
    min=0.0, max=1.0, help="nucleus sampling: keep the most likely tokens up to this total "
    "probability, in (0, 1]; 1 = off")]
MinP = Annotated[float, typer.Option(
    min=0.0, max=1.0, help="drop tokens less likely than this fraction of the top token's "
    "probability; 0 = off")]
RepetitionPenalty = Annotated[float, typer.Option(
    min=0.0, help="HF-style penalty on tokens already in the prompt or output (> 0); 1 = off")]
Seed = Annotated[int | None, typer.Option(
    min=0, max=2**32 - 1, help="random seed for sampling (default: a fresh one per run)")]
Stop = Annotated[list[str] | None, typer.Option(
    help="stop when the output contains this string (repeatable)")]
Dtype = Annotated[str, typer.Option(
    callback=choice(*DTYPE_CHOICES), help=f"compute dtype: {', '.join(DTYPE_CHOICES)} (auto: "
    "bf16, or an HF checkpoint's saved f16, on a GPU or TPU; f32 on CPU; a model config keeps "
    "its own)")]
Impl = Annotated[str, typer.Option(
    callback=choice(*IMPLS), help="attention implementation: auto (Pallas kernels on GPU, XLA "
    "on CPU), xla, pallas or reference")]
MaxSeqLen = Annotated[int | None, typer.Option(
    min=1, help="KV-cache slots per sequence (default: the model's context length)")]

# Python field names that messages from the Python API use, and the flags that set them.
FIELD_FLAGS = ("max_new_tokens", "max_seq_len", "repetition_penalty", "top_k", "top_p",
               "min_p", "temperature", "seed")


def flags_named(message: str) -> str:
    """Names the flag where a message names a Python field: `top_p=1.5` -> `--top-p 1.5`,
    `max_seq_len` -> `--max-seq-len`."""
    for field in FIELD_FLAGS:
        flag = "--" + field.replace("_", "-")
        message = re.sub(rf"(?<![\w.-]){field}=", f"{flag} ", message)
        if "_" in field:
            message = re.sub(rf"(?<![\w.-]){field}\b", flag, message)
    return message


def version_callback(value: bool) -> None:
    if value:
        try:
            jax_version = version("jax")
        except PackageNotFoundError:
            jax_version = "not installed"
        print(f"jdecode {__version__} (jax {jax_version}, python "
              f"{sys.version.split()[0]})")
        raise typer.Exit()


@app.callback()
def main_options(
    show_version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=version_callback,
        help="print the versions of jdecode, jax and Python, and exit")] = False,
) -> None:
    """jdecode: fast LLM decoding in JAX/XLA."""


def check_model(model: str, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Fails (one line) for a model that names nothing, before anything loads."""
    try:
        registry.check_model(model, tuple(overrides))
    except (FileNotFoundError, ConfigError) as e:
        fail(str(e))


def compile_cache() -> None:
    """Executables from the run before, where the shapes match (`io.compile_cache`)."""
    from jdecode.io.compile_cache import enable_compile_cache

    enable_compile_cache()


def load_model(model: str, dtype: str, overrides: list[str] | tuple[str, ...] = ()):
    compile_cache()
    try:
        return registry.load(model, dtype=dtype, overrides=tuple(overrides))
    except (FileNotFoundError, ConfigError, ValueError, TypeError) as e:
        fail(str(e))


def sampling_params(temperature, top_k, top_p, min_p, repetition_penalty, seed, max_new_tokens,
                    stop, ignore_eos=False):
    from jdecode.decoding.sampling import SamplingParams

    try:
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty, seed=seed,
                              max_new_tokens=max_new_tokens, stop=tuple(stop or ()),
                              ignore_eos=ignore_eos)
    except ValueError as e:
        fail(flags_named(str(e)))


def read_prompt(prompt: str | None, file: Path | None) -> str:
    """The prompt from the argument, --file, or stdin (no argument, or `-`)."""
    if file is not None:
        if prompt not in (None, "-"):
            fail("give the prompt once: as an argument or with --file, not both")
        return file.read_text().rstrip("\n")
    if prompt not in (None, "-"):
        return prompt
    if sys.stdin is None or sys.stdin.isatty():
        fail('no prompt: pass it as an argument (jdecode generate "..."), with --file PATH, '
             "or on stdin (echo ... | jdecode generate)")
    text = sys.stdin.read().rstrip("\n")
    if not text:
        fail("the prompt read from stdin is empty: pipe some text in, or pass the prompt as an "
             "argument or with --file PATH")
    return text


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
    from jdecode.config import ModelConfig, parse_override

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


def prompt_ids(m, text: str, chat: bool, system: str | None) -> list[int] | str:
    """The prompt as the Generator takes it: text, or token ids for a system + user chat."""
    if system is None:
        return text
    if m.tokenizer is None or not m.tokenizer.chat_template:
        fail(f"model {m.name!r} has no chat template, so --system cannot be used")
    return m.tokenizer.encode(m.tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": text}]))


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(
        help="the prompt; leave it out (or pass -) to read it from stdin")] = None,
    file: Annotated[Path | None, typer.Option(
        "--file", "-f", exists=True, dir_okay=False, readable=True,
        help="read the prompt from this file")] = None,
    system: Annotated[str | None, typer.Option(
        help="a system message before the prompt (implies --chat)")] = None,
    model: ModelOpt = registry.DEFAULT_MODEL,
    chat: Annotated[bool, typer.Option(
        help="wrap the prompt in the model's chat template")] = False,
    max_new_tokens: MaxNewTokens = 64, temperature: Temperature = 0.0, top_k: TopK = 0,
    top_p: TopP = 1.0, min_p: MinP = 0.0, repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None, stop: Stop = None, dtype: Dtype = "auto", impl: Impl = "auto",
    max_seq_len: MaxSeqLen = None,
    ignore_eos: Annotated[bool, typer.Option(
        "--ignore-eos", help="generate all --max-new-tokens tokens, past the end-of-sequence "
        "token (for timing; --stop strings still stop)")] = False,
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
    text = read_prompt(prompt, file)
    check_model(model)
    from jdecode import options
    from jdecode.decoding import methods
    from jdecode.decoding.generate import Generator

    try:  # flags and configs are checked before the model loads
        raw = read_decode_config(config)
        spec = methods.get(method or raw.get("method", "autoregressive"))
        set_opts, model_overrides = split_set(set_ or [], spec)
        where = " with ".join(filter(None, (config, set_ and "--set")))
        opts = methods.parse_options(spec, {**(raw.get("options") or {}), **set_opts}, where)
    except ConfigError as e:
        fail(str(e))
    check_model(model, model_overrides)
    sp = sampling_params(temperature, top_k, top_p, min_p, repetition_penalty, seed,
                         max_new_tokens, stop, ignore_eos)
    m = load_model(model, dtype, model_overrides)
    notice = PrefillNotice(stderr())
    try:
        gen = Generator(m, impl=impl, max_seq_len=max_seq_len, method=spec.name, options=opts)
        results = None
        for deltas, results in gen.stream([prompt_ids(m, text, chat, system)], sp,
                                          chat=chat or system is not None, chunk_steps=8,
                                          on_prefill=notice):
            notice.done()
            if not as_json and deltas[0]:
                sys.stdout.write(deltas[0])
                sys.stdout.flush()
    except ValueError as e:
        fail(flags_named(str(e)))
    finally:
        notice.done()
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
    err = stderr()
    err.print(f"\n[dim]prefill {s['prefill_ms']:.1f} ms | decode {s['decode_tok_s']:.1f} tok/s | "
              f"{s['num_tokens']} tokens | finish: {r.finish_reason} | {m.cfg.dtype} | "
              f"compile {s['compile_s']:.1f} s[/]", highlight=False)
    if spec.name != "autoregressive":
        extra = " | ".join(f"{k} {v:.3g}" for k, v in gen.describe(s).items()
                           if k != "mean_accepted")
        named = ", ".join(f"{k}={v}" for k, v in options.to_dict(opts).items())
        err.print(f"[dim]{spec.name} ({named}): mean accepted {s['mean_accepted']:.2f} tokens "
                  "per step" + (f" | {extra}" if extra else "") + "[/]", highlight=False)


@app.command("methods")
def list_methods(
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """List the decoding methods, whether each is lossless, and their options."""
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
    stdout().print(table)


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
    from jdecode.experiments.config import load_config
    from jdecode.experiments.runner import run_experiment

    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as e:
        fail(str(e))
    out_dir = Path(out or f"experiments/{cfg.name}")
    compile_cache()
    command = "jdecode experiment " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else ""
    try:
        rows = run_experiment(cfg, out_dir, progress=not as_json, command=command)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    if as_json:
        for row in rows:
            print(json.dumps({k: v for k, v in row.items() if k != "config"}))
        return
    stderr().print(f"{len(rows)} cells in {out_dir}/results.jsonl; table: {out_dir}/results.md")
    print((out_dir / "results.md").read_text())  # plain: a markdown table must not be wrapped


@app.command()
def chat(
    model: ModelOpt = registry.DEFAULT_MODEL,
    system: Annotated[str | None, typer.Option(help="a system message for the conversation")
                      ] = None,
    max_new_tokens: MaxNewTokens = 256, temperature: Temperature = 0.0, top_k: TopK = 0,
    top_p: TopP = 1.0, min_p: MinP = 0.0, repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None, stop: Stop = None, dtype: Dtype = "auto", impl: Impl = "auto",
    max_seq_len: MaxSeqLen = None,
) -> None:
    """Multi-turn chat with the model's chat template: /reset clears the conversation, /exit
    (or Ctrl-D) quits, Ctrl-C stops a reply and keeps the conversation."""
    from jdecode import chat as chat_lib

    check_model(model)
    sp = sampling_params(temperature, top_k, top_p, min_p, repetition_penalty, seed,
                         max_new_tokens, stop)
    m = load_model(model, dtype)
    if m.tokenizer is None or not m.tokenizer.chat_template:
        fail(f"model {model!r} has no chat template: use `jdecode generate` instead")
    from jdecode.decoding.generate import Generator
    from jdecode.io.checkpoint import cache_root

    try:
        gen = Generator(m, impl=impl, max_seq_len=max_seq_len)
    except ValueError as e:
        fail(flags_named(str(e)))
    err = stderr()
    err.print(chat_lib.banner(model, m.cfg, sp), highlight=False)
    save_history = (chat_lib.enable_line_editing(cache_root() / "chat_history")
                    if sys.stdin.isatty() else lambda: None)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        chat_lib.run_chat(gen, m.tokenizer, sp, chat_lib.Conversation(system), write=write,
                          say=lambda line: err.print(flags_named(line), highlight=False,
                                                     markup=False),
                          notice=PrefillNotice(err))
    finally:
        save_history()


@app.command()
def serve(
    model: ModelOpt = registry.DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port to listen on")] = 8000,
    dtype: Dtype = "auto",
    served_model_name: Annotated[str | None, typer.Option(
        help="the model name clients send (default: --model)")] = None,
    max_num_seqs: Annotated[int, typer.Option(
        min=1, help="sequences decoded together at most (batch slots)")] = 32,
    max_num_batched_tokens: Annotated[int, typer.Option(
        min=1, help="tokens per engine step at most (prefill chunks + decodes)")] = 512,
    max_model_len: Annotated[int | None, typer.Option(
        min=1, help="prompt + output tokens per request at most (default: the model's)")
    ] = None,
    page_size: Annotated[int, typer.Option(min=1, help="tokens per KV-cache page")] = 16,
    num_pages: Annotated[int | None, typer.Option(
        min=1, help="KV-cache pages (default: what --kv-cache-gb holds)")] = None,
    kv_cache_gb: Annotated[float, typer.Option(
        min=0.0, help="memory for the KV cache when --num-pages is not given")] = 1.0,
    policy: Annotated[str, typer.Option(callback=choice("continuous", "static"),
                                        help="scheduling: continuous or static")
                      ] = "continuous",
    enable_chunked_prefill: Annotated[bool, typer.Option(
        help="cut long prompts into chunks that share steps with decodes")] = True,
    enable_prefix_caching: Annotated[bool, typer.Option(
        help="reuse the KV pages of a prompt prefix seen before")] = True,
    impl: Annotated[str, typer.Option(
        callback=choice("auto", "xla", "pallas"),
        help="attention implementation: auto (pallas on a GPU, else xla), xla or pallas")
    ] = "auto",
    api_key: Annotated[str | None, typer.Option(
        help="bearer token every /v1 request must send (default: $JDECODE_API_KEY; unset = "
             "no check)")] = None,
    chat_template: Annotated[str | None, typer.Option(
        help="a jinja file or inline template that replaces the model's chat template")
    ] = None,
    max_request_bytes: Annotated[int | None, typer.Option(
        min=1, help="request bodies larger than this answer 413 (default: 4 MiB)")] = None,
    num_scheduler_steps: Annotated[int | None, typer.Option(
        min=1, help="decodes per launch when a step is all decodes (vLLM's multi-step "
                    "scheduling): less host time per token, tokens stream in bursts "
                    "(default: 4 on a GPU, 1 elsewhere)")] = None,
    warmup: Annotated[bool | None, typer.Option(
        "--warmup/--no-warmup",
        help="compile every step shape before listening, so no request waits for a compile "
             "(default: on a GPU)")] = None,
) -> None:
    """OpenAI-compatible server (/v1/completions, /v1/chat/completions, /metrics)."""
    check_model(model)
    compile_cache()
    from jdecode.engine.server import serve as run_server

    try:
        run_server(model, host, port, dtype=dtype, served_model_name=served_model_name,
                   max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                   max_model_len=max_model_len, page_size=page_size, num_pages=num_pages,
                   kv_cache_gb=kv_cache_gb, policy=policy,
                   enable_chunked_prefill=enable_chunked_prefill,
                   enable_prefix_caching=enable_prefix_caching, impl=impl,
                   api_key=api_key, chat_template=chat_template,
                   max_request_bytes=max_request_bytes, num_scheduler_steps=num_scheduler_steps,
                   warmup=warmup)
    except (FileNotFoundError, ConfigError, ValueError, TypeError) as e:
        fail(str(e))


def _register_subcommands() -> None:
    """Subcommands that live with their packages."""
    from jdecode.analysis.cli import roofline
    from jdecode.training.cli import train

    app.command("roofline")(roofline)
    app.command("train")(train)


_register_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
