"""The method registry: every decoding method by name, with a typed options dataclass and a
builder that returns what `Generator` needs.

A method module registers itself with `@register(...)` on its builder; `BUILTIN_METHODS` names
the modules imported on first lookup, so the CLI, the Python API, the experiment runner and the
benchmarks all resolve the same names and nobody branches on a method's name.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from jdecode import options
from jdecode.config import ConfigError
from jdecode.decoding.base import Decoder
from jdecode.io.registry import Model
from jdecode.model.attention import resolve_impl

# Modules whose import registers the built-in methods (one module per method).
BUILTIN_METHODS = (
    "jdecode.decoding.autoregressive",
    "jdecode.decoding.speculative",
    "jdecode.decoding.medusa",
    "jdecode.decoding.blockwise",
    "jdecode.decoding.eagle",
    "jdecode.decoding.jacobi",
    "jdecode.decoding.lookahead",
    "jdecode.decoding.cllm",
    "jdecode.decoding.early_exit",
    "jdecode.decoding.mixture_of_depths",
    "jdecode.decoding.cascade",
)


@dataclasses.dataclass
class MethodBuild:
    """What `Generator` needs to decode with a method.

    model: the model to decode; its `params` may bundle the method's extra parts, e.g.
      `(target_params, draft_params)`. decoder_fn(cfg, max_len) -> Decoder. describe(stats) ->
      extra per-result stats computed from the loop's (e.g. acceptance rates from the mean
      accepted length). score(params, tokens [B, T]) -> logits [B, T, V]: the method's own
      next-token distributions on given text, teacher-forced (lossy forward transforms give it,
      so quality metrics can compare it with the full model's; None for the others).
      run(generator, prompt_ids, sampling) -> list[GenerationResult]: for a method that is not
      one `Decoder` in one loop but drives whole generations of several models (the sequence-
      level cascade); `Generator` hands it the encoded, validated prompts instead of running
      its own loop (None for one-loop methods).
    """

    model: Model
    decoder_fn: Callable[..., Decoder]
    describe: Callable[[dict], dict] = lambda stats: {}
    score: Callable[[Any, Any], Any] | None = None
    run: Callable[..., list] | None = None


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registered method. build(model, options, impl) -> MethodBuild; `impl` is resolved
    ("xla" or "pallas"), `options` an instance of `options_cls`."""

    name: str
    options_cls: type
    build: Callable[[Model, Any, str], MethodBuild]
    lossless: bool
    summary: str


_REGISTRY: dict[str, MethodSpec] = {}
_LOADED = False


def register(name: str, options_cls: type, *, lossless: bool, summary: str
             ) -> Callable[[Callable], Callable]:
    """Decorator: registers `build(model, options, impl) -> MethodBuild` under `name`.

    Args:
      name: what `--method` takes. options_cls: a frozen dataclass whose every field has a
        default (use `option(default, help)`). lossless: greedy output equals autoregressive
        greedy exactly (and sampling keeps the target's distribution). summary: one line.
    """
    if not dataclasses.is_dataclass(options_cls):
        raise TypeError(f"method {name!r}: options_cls must be a dataclass")
    missing = [f.name for f in dataclasses.fields(options_cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise TypeError(f"method {name!r}: options {missing} need defaults")

    def wrap(build: Callable) -> Callable:
        if name in _REGISTRY and _REGISTRY[name].build is not build:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = MethodSpec(name, options_cls, build, lossless, summary)
        return build

    return wrap


def _load_builtins() -> None:
    global _LOADED
    if not _LOADED:
        for module in BUILTIN_METHODS:
            importlib.import_module(module)
        _LOADED = True


def available() -> dict[str, MethodSpec]:
    """Every registered method by name (imports the built-in ones first)."""
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> MethodSpec:
    """The method registered as `name`; an unknown name lists the valid ones."""
    methods = available()
    if name not in methods:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(methods)} "
                          "(`jdecode methods` lists them with their options)")
    return methods[name]


def parse_options(spec: MethodSpec, raw: Mapping[str, Any] | Any | None = None,
                  where: str = "") -> Any:
    """The options dataclass of `spec` from a mapping (YAML, --set, keyword arguments); unknown
    keys and mistyped values are ConfigErrors naming the key and the valid choices."""
    what = f"method {spec.name!r}" + (f" ({where})" if where else "")
    return options.parse(spec.options_cls, raw, what)


def build(name: str, model: Model, opts: Mapping[str, Any] | Any | None = None,
          impl: str = "auto") -> MethodBuild:
    """Resolves a method by name and builds it for `model`.

    Args:
      name: a registered method. model: the loaded target. opts: a mapping of option
        values, or the method's options instance. impl: "auto", "xla" or "pallas".
    Returns:
      the `MethodBuild` to pass to `Generator` (which does this itself when given `method=`).
    """
    spec = get(name)
    return spec.build(model, parse_options(spec, opts), resolve_impl(impl))
